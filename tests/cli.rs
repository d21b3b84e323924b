//! The command line: configuration handling, clear errors, binding and graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn vigil(args: &[&str]) -> Output {
    Command::new(vigil_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run vigil")
}

fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.0.join("broker.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn print_config_prints_the_embedded_default() {
    let out = vigil(&["print-config"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), DEFAULT_CONFIG);
}

#[test]
fn check_config_accepts_the_default_and_names_bad_keys_and_values() {
    let dir = TempDir::new();
    let ok = write_config(&dir, DEFAULT_CONFIG);
    let out = vigil(&["check-config", &ok]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let typo = write_config(
        &dir,
        &DEFAULT_CONFIG.replace("max_packet_size", "max_pakcet_size"),
    );
    let out = vigil(&["check-config", &typo]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_pakcet_size"), "{err}");

    let bad = write_config(
        &dir,
        &DEFAULT_CONFIG.replace("max_connections = 10000", "max_connections = 0"),
    );
    let out = vigil(&["check-config", &bad]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_connections"));

    let wrong_type = write_config(
        &dir,
        &DEFAULT_CONFIG.replace("max_connections = 10000", "max_connections = \"many\""),
    );
    let out = vigil(&["check-config", &wrong_type]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_connections"));

    let out = vigil(&["check-config", "/nonexistent/broker.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/broker.toml"));
}

#[test]
fn running_with_a_bad_config_fails_instead_of_defaulting() {
    let dir = TempDir::new();
    let typo = write_config(
        &dir,
        &DEFAULT_CONFIG.replace("[limits]", "[limits]\nmax_conns = 5"),
    );
    let out = vigil(&[
        "--config",
        &typo,
        "--mqtt-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_conns"));
}

#[test]
fn port_in_use_is_an_error_naming_the_port_and_key() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let out = vigil(&["--mqtt-listen", &addr, "--http-listen", "127.0.0.1:0"]);
    assert!(!out.status.success(), "vigil started on a port in use");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&port.to_string()) && err.contains("mqtt.listen"),
        "{err}"
    );

    let out = vigil(&["--mqtt-listen", "127.0.0.1:0", "--http-listen", &addr]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&port.to_string()) && err.contains("http.listen"),
        "{err}"
    );
}

#[test]
fn local_only_mode_binds_loopback_and_warns() {
    let mut child = Command::new(vigil_bin())
        .args(["--mqtt-listen", "0.0.0.0:0", "--http-listen", "0.0.0.0:0"])
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        let mut seen = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("vigil listening") {
                break;
            }
        }
        seen
    });
    let seen = lines.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("local-only mode"), "{seen}");
    let listening = seen
        .lines()
        .find(|l| l.contains("vigil listening"))
        .unwrap();
    assert!(
        listening.contains("mqtt=127.0.0.1:") && listening.contains("http=127.0.0.1:"),
        "{listening}"
    );
}

#[test]
fn sigterm_closes_clients_and_exits_zero_within_five_seconds() {
    let mut v = Vigil::start();
    let _sub = Sub::start(v.port(), &["-t", "a/#", "-q", "1"]);
    let _v5 = Sub::start(v.port(), &["-t", "b/#", "-q", "1", "-V", "mqttv5"]);
    let mut raw = Raw::connected(
        v.mqtt,
        &ConnectOpts {
            v5: true,
            ..ConnectOpts::v311("shutdown-watch")
        },
    );
    let (status, took) = v.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The v5 client was told the server is shutting down.
    let d = raw.recv().expect("DISCONNECT before close");
    assert_eq!((d.kind(), d.body[0]), (14, 0x8B));
}

/// `/readyz` reports the core and the analytics task; `vigil status` summarises a running
/// instance from it and from `/metrics`.
#[test]
fn readyz_and_status() {
    let v = Vigil::start();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = http_get(v.http, "/readyz");
        if r.starts_with("HTTP/1.1 200") {
            assert!(
                r.contains("\"core\":\"ok\"") && r.contains("\"analytics\":\"ok\""),
                "{r}"
            );
            break;
        }
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(std::time::Instant::now() < deadline, "never ready: {r}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    publish(v.port(), &["-t", "status/x", "-m", "1"]);
    publish(v.port(), &["-t", "status/r", "-m", "1", "-r", "-q", "1"]);
    let out = std::process::Command::new(vigil_bin())
        .args(["status", "--addr", &v.http.to_string()])
        .output()
        .expect("vigil status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("\"status\":\"ready\""), "{text}");
    assert!(text.contains("connections: tcp"), "{text}");
    assert!(text.contains("messages: in 2"), "{text}");
    assert!(text.contains("retained: 1 messages"), "{text}");
    assert!(text.contains("persistent sessions: 0 kept"), "{text}");
    // Nothing listening: a clear error, exit 1.
    let out = std::process::Command::new(vigil_bin())
        .args(["status", "--addr", "127.0.0.1:1"])
        .output()
        .expect("vigil status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// `vigil demo`: a simulated fleet connects over MQTT and, within about a minute, the
/// analytics raise a forecast and a threshold alert (the overheating motor) and an anomaly
/// alert (the motor whose current jumps).
#[test]
fn demo_fleet_raises_alerts_within_a_minute() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(vigil_bin())
        .args([
            "demo",
            "--devices",
            "10",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vigil demo");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut banner = false;
    let mqtt = loop {
        let line = lines.next().expect("demo log").expect("demo log line");
        banner |= line.contains("vigil demo: 10 simulated devices")
            && line.contains("Dashboard: http://");
        if line.contains("vigil listening") {
            break field(&line, "mqtt").expect("mqtt address");
        }
    };
    assert!(banner, "no dashboard banner");
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let mut sub = Sub::start(mqtt.port(), &["-t", "device/+/alerts", "-q", "1"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(100);
    let wanted = [
        ("demo-3", "\"kind\":\"forecast\""),
        ("demo-3", "\"kind\":\"threshold\""),
        ("demo-7", "\"kind\":\"anomaly\""),
    ];
    let mut seen = [false; 3];
    while !seen.iter().all(|&s| s) && std::time::Instant::now() < deadline {
        for line in sub.drain(Duration::from_millis(500)) {
            for (i, (device, kind)) in wanted.iter().enumerate() {
                seen[i] |=
                    line.starts_with(&format!("device/{device}/alerts")) && line.contains(kind);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, [true; 3], "alerts seen: {:?} of {wanted:?}", seen);
}

/// With `[persistence] dir`, retained messages survive a restart as mosquitto's do with
/// `persistence true`: after a crash (saved by the autosave), after SIGTERM (saved at
/// shutdown), with their properties and what is left of their expiry; a cleared or expired
/// one does not come back, and a damaged file is set aside instead of stopping vigil.
#[test]
fn retained_messages_survive_a_restart_with_persistence() {
    const T: Duration = Duration::from_secs(5);
    let data = TempDir::new();
    let start = |autosave: &str| {
        Vigil::start_persistent(&data, |c| {
            vigil::config::set_value(&c, "persistence", "autosave_interval_secs", autosave)
        })
    };
    let v5_sub = |v: &Vigil| {
        Sub::start(
            v.port(),
            &[
                "-t",
                "keep/#",
                "-q",
                "1",
                "-V",
                "mqttv5",
                "-F",
                "MSG|%t|%q|%r|%P|%p",
            ],
        )
    };
    let retained = |v: &Vigil, topic: &str, payload: &str, extra: &[&str]| {
        let mut args = vec!["-t", topic, "-m", payload, "-q", "1", "-r"];
        args.extend_from_slice(extra);
        publish(v.port(), &args);
    };
    let v5 = ["-V", "mqttv5"];

    // A crash: what the autosave (every second) wrote is there after a SIGKILL.
    let v = start("1");
    retained(&v, "keep/a", "A", &[]);
    let props = [
        "-V",
        "mqttv5",
        "-D",
        "publish",
        "user-property",
        "line",
        "7",
        "-D",
        "publish",
        "message-expiry-interval",
        "3600",
    ];
    retained(&v, "keep/b", "B", &props);
    let short = [
        "-V",
        "mqttv5",
        "-D",
        "publish",
        "message-expiry-interval",
        "1",
    ];
    retained(&v, "keep/short", "S", &short);
    retained(&v, "keep/c", "C", &[]);
    publish(v.port(), &["-t", "keep/c", "-n", "-q", "1", "-r"]);
    std::thread::sleep(Duration::from_millis(2500));
    let text = http_get(v.http, "/metrics");
    assert!(
        text.contains("vigil_retained_saves_total{outcome=\"ok\"}"),
        "{text}"
    );
    drop(v); // SIGKILL
    assert!(data.0.join("retained.bin").exists());

    let mut v = start("3600");
    assert!(v.log().contains("retained messages loaded"), "{}", v.log());
    let mut sub = v5_sub(&v);
    let mut got = sub.expect_messages(2, T);
    got.sort();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], "keep/a|1|1||A");
    // The expiry left is under the hour, counted from the first publish.
    assert!(got[1].starts_with("keep/b|1|1|line:7|B"), "{got:?}");
    assert!(
        sub.drain(Duration::from_millis(500)).len() == 2,
        "cleared or expired came back"
    );
    let text = http_get(v.http, "/metrics");
    assert_eq!(metric(&text, "vigil_retained_messages"), Some(2.0));

    // A clean stop: saved at shutdown, with no autosave in between.
    retained(&v, "keep/d", "D", &v5);
    publish(v.port(), &["-t", "keep/a", "-n", "-q", "1", "-r"]);
    let (status, _) = v.terminate();
    assert!(status.success());
    let v = start("3600");
    let mut sub = v5_sub(&v);
    let mut got = sub.expect_messages(2, T);
    got.sort();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("keep/b|1|1|line:7|B"), "{got:?}");
    assert_eq!(got[1], "keep/d|1|1||D");
    drop(v);

    // A damaged file: vigil starts without it, says so, and keeps the file aside.
    damage(&data.0.join("retained.bin"));
    let v = start("3600");
    assert!(
        v.log().contains("retained messages not loaded"),
        "{}",
        v.log()
    );
    assert!(data.0.join("retained.bin.damaged").exists());
    let mut sub = v5_sub(&v);
    assert!(sub.drain(Duration::from_millis(500)).is_empty());
}

/// With `[persistence] dir`, what the core held for an offline persistent session at a clean
/// stop (messages queued for it, and deliveries its client had not acknowledged) is saved with
/// the session and delivered when the client comes back after the restart: first the
/// unacknowledged ones under the packet ids the client knows, with DUP, then the queued ones,
/// then what was published since the restart. What the client leaves unacknowledged again
/// is kept for its next connection in the same way.
#[test]
fn queued_messages_of_offline_sessions_survive_a_restart() {
    const T: Duration = Duration::from_secs(5);
    let data = TempDir::new();
    let start = || Vigil::start_persistent(&data, |c| c);
    // (topic, QoS, DUP, packet id, payload) of the next PUBLISH.
    let next = |raw: &mut Raw| {
        let p = raw.recv_timeout(T).expect("a delivery");
        let (topic, qos, _, dup, pkid, payload) = parse_publish(&p);
        (topic, qos, dup, pkid, String::from_utf8(payload).unwrap())
    };
    let mut v = start();
    let (mut raw, present) = Raw::resume(v.mqtt, "dev");
    assert!(!present);
    raw.send(&subscribe_packet(1, &[("cmd/#", 2)]));
    assert_eq!(raw.recv_timeout(T).expect("SUBACK").kind(), 9);
    // Received, never acknowledged.
    publish(v.port(), &["-t", "cmd/1", "-m", "one", "-q", "1"]);
    publish(v.port(), &["-t", "cmd/2", "-m", "two", "-q", "2"]);
    let (_, _, _, id1, one) = next(&mut raw);
    let (_, _, _, id2, two) = next(&mut raw);
    assert_eq!((one.as_str(), two.as_str()), ("one", "two"));
    drop(raw);
    // Queued while the client is away.
    publish(v.port(), &["-t", "cmd/3", "-m", "three", "-q", "1"]);
    publish(v.port(), &["-t", "cmd/4", "-m", "four", "-q", "2"]);
    publish(v.port(), &["-t", "cmd/5", "-m", "five", "-q", "0"]);
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = v.terminate();
    assert!(status.success());
    assert!(
        v.log()
            .contains("queued messages of offline sessions kept for the restart")
            && v.log().contains("messages=5"),
        "{}",
        v.log()
    );

    let mut v = start();
    publish(v.port(), &["-t", "cmd/6", "-m", "six", "-q", "1"]);
    let (mut raw, present) = Raw::resume(v.mqtt, "dev");
    assert!(present);
    assert_eq!(next(&mut raw), ("cmd/1".into(), 1, true, id1, "one".into()));
    assert_eq!(next(&mut raw), ("cmd/2".into(), 2, true, id2, "two".into()));
    let (topic, qos, dup, id3, three) = next(&mut raw);
    assert_eq!(
        (topic.as_str(), qos, dup, three.as_str()),
        ("cmd/3", 1, false, "three")
    );
    let (_, qos, _, id4, four) = next(&mut raw);
    assert_eq!((qos, four.as_str()), (2, "four"));
    let (_, qos, _, _, five) = next(&mut raw);
    assert_eq!((qos, five.as_str()), (0, "five"));
    let (_, _, _, id6, six) = next(&mut raw);
    assert_eq!(
        six, "six",
        "published after the restart: after the restored ones"
    );
    // Acknowledge the first two, not "three", "four" or "six", and go away again.
    raw.send(&ack_packet(4, id1));
    raw.send(&ack_packet(5, id2));
    let rel = raw.recv_timeout(T).expect("PUBREL");
    assert_eq!(
        (rel.kind(), rel.body[..2].to_vec()),
        (6, id2.to_be_bytes().to_vec())
    );
    raw.send(&ack_packet(7, id2));
    std::thread::sleep(Duration::from_millis(200));
    drop(raw);

    let (mut raw, present) = Raw::resume(v.mqtt, "dev");
    assert!(present);
    assert_eq!(
        next(&mut raw),
        ("cmd/3".into(), 1, true, id3, "three".into())
    );
    assert_eq!(
        next(&mut raw),
        ("cmd/4".into(), 2, true, id4, "four".into())
    );
    assert_eq!(next(&mut raw), ("cmd/6".into(), 1, true, id6, "six".into()));
    raw.send(&ack_packet(4, id3));
    raw.send(&ack_packet(5, id4));
    assert_eq!(raw.recv_timeout(T).expect("PUBREL").kind(), 6);
    raw.send(&ack_packet(7, id4));
    raw.send(&ack_packet(4, id6));
    std::thread::sleep(Duration::from_millis(200));
    drop(raw);
    let (mut raw, _) = Raw::resume(v.mqtt, "dev");
    assert!(
        raw.recv_timeout(Duration::from_millis(500)).is_none(),
        "everything was acknowledged"
    );
    drop(raw);
    let (status, _) = v.terminate();
    assert!(status.success());

    // `drain_secs = 0`: the sessions are kept, their queued messages are not.
    let mut v = Vigil::start_persistent(&data, |c| {
        vigil::config::set_value(&c, "persistence", "drain_secs", "0")
    });
    publish(v.port(), &["-t", "cmd/7", "-m", "seven", "-q", "1"]);
    let (status, _) = v.terminate();
    assert!(status.success());
    assert!(!v.log().contains("kept for the restart"), "{}", v.log());
    let v = start();
    let (mut raw, present) = Raw::resume(v.mqtt, "dev");
    assert!(present);
    assert!(
        raw.recv_timeout(Duration::from_millis(500)).is_none(),
        "not kept"
    );
}

#[test]
fn persistent_sessions_survive_a_restart_with_persistence() {
    const T: Duration = Duration::from_secs(5);
    let data = TempDir::new();
    let start = |autosave: &str| {
        Vigil::start_persistent(&data, |c| {
            vigil::config::set_value(&c, "persistence", "autosave_interval_secs", autosave)
        })
    };
    let v5_session = |v: &Vigil, id: &str, expiry: &str| {
        let filter = format!("cmd/{id}/#");
        let args = [
            "-V", "mqttv5", "-c", "-i", id, "-x", expiry, "-q", "1", "-t", &filter,
        ];
        Sub::start(v.port(), &args)
    };

    // A crash: what the autosave (every second) wrote comes back after a SIGKILL.
    let v = start("1");
    // A 3.1.1 persistent session, connected when vigil dies.
    let mut keeper = Sub::start(
        v.port(),
        &["-c", "-i", "keeper", "-q", "1", "-t", "cmd/keeper/#"],
    );
    // v5 sessions gone offline: an hour of expiry left, and four seconds.
    v5_session(&v, "away", "3600").kill();
    v5_session(&v, "brief", "4").kill();
    // A clean session is not kept.
    Sub::start(v.port(), &["-i", "passer", "-q", "1", "-t", "cmd/passer/#"]).kill();
    std::thread::sleep(Duration::from_millis(2500));
    let text = http_get(v.http, "/metrics");
    assert!(
        text.contains("vigil_session_saves_total{outcome=\"ok\"}"),
        "{text}"
    );
    drop(v); // SIGKILL
    keeper.kill();
    assert!(data.0.join("sessions.bin").exists());
    std::thread::sleep(Duration::from_secs(2)); // "brief" expires meanwhile

    let mut v = start("3600");
    let log = v.log();
    assert!(
        log.contains("persistent sessions restored")
            && log.contains("restored=2")
            && log.contains("expired=1"),
        "{log}"
    );
    let text = http_get(v.http, "/metrics");
    assert_eq!(
        metric(&text, "vigil_persistent_sessions"),
        Some(2.0),
        "{text}"
    );
    let status = std::process::Command::new(vigil_bin())
        .args(["status", "--addr", &v.http.to_string()])
        .output()
        .expect("vigil status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("persistent sessions: 2 kept; restored at start 2 (not restored 1)"),
        "{status}"
    );
    // Published while the sessions' clients are away: queued for them, as before the restart.
    for topic in ["cmd/keeper/x", "cmd/away/y", "cmd/brief/z", "cmd/passer/w"] {
        publish(v.port(), &["-t", topic, "-m", topic, "-q", "1"]);
    }
    let (mut raw, present) = Raw::resume(v.mqtt, "keeper");
    assert!(present, "keeper's session was restored");
    let p = raw.recv_timeout(T).expect("the queued message");
    let (topic, qos, ..) = parse_publish(&p);
    assert_eq!((topic.as_str(), qos), ("cmd/keeper/x", 1));
    drop(raw);
    let mut away = v5_session(&v, "away", "3600");
    assert_eq!(
        away.expect_messages(1, T),
        ["cmd/away/y|1|0|cmd/away/y"],
        "{:?}",
        away.debug
    );
    away.kill();
    let (_, present) = Raw::resume(v.mqtt, "brief");
    assert!(!present, "brief's session expired while vigil was down");
    let (_, present) = Raw::resume(v.mqtt, "passer");
    assert!(!present);

    // A clean stop saves at shutdown, with no autosave in between: "brief" and "passer" now
    // have 3.1.1 persistent sessions without subscriptions, "keeper" and "away" theirs.
    let (status, _) = v.terminate();
    assert!(status.success());
    let mut v = start("3600");
    assert!(v.log().contains("restored=4"), "{}", v.log());
    publish(v.port(), &["-t", "cmd/keeper/again", "-m", "k", "-q", "1"]);
    let (mut raw, present) = Raw::resume(v.mqtt, "keeper");
    assert!(present);
    // "keeper" left "cmd/keeper/x" unacknowledged above: kept across the restart, it comes
    // again first, as a re-delivery.
    let p = raw.recv_timeout(T).expect("the unacknowledged delivery");
    let (topic, _, _, dup, ..) = parse_publish(&p);
    assert_eq!((topic.as_str(), dup), ("cmd/keeper/x", true));
    let p = raw.recv_timeout(T).expect("the queued message");
    assert_eq!(parse_publish(&p).0, "cmd/keeper/again");
    drop(raw);
    let (status, _) = v.terminate();
    assert!(status.success());

    // A lower `limits.max_persistent_sessions`: the saved sessions beyond it are not restored.
    let v = Vigil::start_persistent(&data, |c| {
        vigil::config::set_value(&c, "limits", "max_persistent_sessions", "3")
    });
    assert!(
        v.log().contains("restored=3") && v.log().contains("over_cap=1"),
        "{}",
        v.log()
    );
    let text = http_get(v.http, "/metrics");
    assert_eq!(
        metric(
            &text,
            "vigil_sessions_restored_total{outcome=\"not_restored\"}"
        ),
        Some(1.0),
        "{text}"
    );
    drop(v);

    // A damaged file: vigil starts without it, says so, and keeps the file aside.
    damage(&data.0.join("sessions.bin"));
    let v = start("3600");
    assert!(
        v.log().contains("persistent sessions not restored"),
        "{}",
        v.log()
    );
    assert!(data.0.join("sessions.bin.damaged").exists());
    let (_, present) = Raw::resume(v.mqtt, "keeper");
    assert!(!present);
}

/// While saved sessions are restored, the web port answers HTTP (`/healthz` 200, `/metrics`,
/// `/readyz` 503 with `"sessions":"restoring"`) and holds a WebSocket client until the
/// sessions are back; MQTT clients wait in the listener's queue and find their sessions.
#[test]
fn the_web_port_answers_while_sessions_are_restored() {
    const SESSIONS: usize = 1500;
    let data = TempDir::new();
    let mut v = Vigil::start_persistent(&data, |c| c);
    // 1,500 persistent sessions: about 1.7 s to restore with one core accept loop.
    for i in 0..SESSIONS {
        let (mut raw, _) = Raw::resume(v.mqtt, &format!("restore-{i}"));
        raw.send(&subscribe_packet(1, &[(&format!("restore/{i}"), 1)]));
        assert_eq!(raw.recv().expect("SUBACK").kind(), 9);
    }
    let (status, _) = v.terminate();
    assert!(status.success());

    // Started by hand, on ports known before vigil logs its addresses (after the restore).
    let free = || {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let (mqtt, http) = (free(), free());
    let config = data.0.join("broker.toml");
    let dir = format!("{:?}", data.0.to_string_lossy());
    let text = vigil::config::set_value(DEFAULT_CONFIG, "persistence", "dir", &dir);
    // One accept loop, so the restore lasts long enough to be seen.
    let text = vigil::config::set_value(&text, "core", "accept_loops", "1");
    std::fs::write(&config, text).unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _vigil = Killed(
        Command::new(vigil_bin())
            .arg("--config")
            .arg(&config)
            .arg("--mqtt-listen")
            .arg(mqtt.to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vigil"),
    );
    let ready = poll(
        Duration::from_secs(10),
        || match std::net::TcpStream::connect(http) {
            Ok(_) => http_get(http, "/readyz"),
            Err(_) => String::new(),
        },
        |r| !r.is_empty(),
    );
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("\"sessions\":\"restoring\""),
        "{ready}"
    );
    assert!(http_get(http, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(http, "/metrics").contains("vigil_persistent_sessions"));
    // A WebSocket upgrade waits for the restore, then succeeds.
    let mut ws = std::net::TcpStream::connect(http).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let upgrade = "GET /mqtt HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Protocol: mqtt\r\n\r\n";
    ws.write_all(upgrade.as_bytes()).unwrap();
    let mut answer = [0u8; 12];
    ws.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 101");
    let ready = http_get(http, "/readyz");
    assert!(ready.contains("\"sessions\":\"ok\""), "{ready}");
    // Ready once the analytics task, started after the restore, has subscribed too.
    let ready = poll(
        Duration::from_secs(10),
        || http_get(http, "/readyz"),
        |r| r.starts_with("HTTP/1.1 200"),
    );
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(Raw::resume(mqtt, "restore-7").1, "session present");
}

/// `limits.persistent_session_expiry_secs` counts the time vigil was down: a session that has
/// been offline longer than that, restart included, is not restored; one offline for less is.
#[test]
fn the_offline_limit_counts_the_time_vigil_was_down() {
    let data = TempDir::new();
    let start = || {
        Vigil::start_persistent(&data, |c| {
            vigil::config::set_value(&c, "limits", "persistent_session_expiry_secs", "3")
        })
    };
    let mut v = start();
    drop(Raw::resume(v.mqtt, "stale")); // offline from now
    std::thread::sleep(Duration::from_secs(2));
    drop(Raw::resume(v.mqtt, "fresh")); // offline 2 s later
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = v.terminate();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(1500)); // "stale": 3.7 s offline by now

    let v = start();
    assert!(
        v.log().contains("restored=1") && v.log().contains("expired=1"),
        "{}",
        v.log()
    );
    assert!(
        Raw::resume(v.mqtt, "fresh").1,
        "offline for about 1.7 s: restored"
    );
    assert!(!Raw::resume(v.mqtt, "stale").1, "offline for 3.7 s: ended");
}

#[test]
fn check_config_reads_the_rul_models_and_names_a_bad_one() {
    let dir = TempDir::new();
    let with = |entry: &str| {
        write_config(
            &dir,
            &format!("{DEFAULT_CONFIG}\n[[analytics.rul]]\n{entry}\n"),
        )
    };
    let missing = with("devices = \"PUMP-*\"\nmodel = \"/nonexistent/pump.json\"");
    let out = vigil(&["check-config", &missing]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("analytics.rul.model") && err.contains("/nonexistent/pump.json"),
        "{err}"
    );
    let broken = dir.0.join("broken.json");
    std::fs::write(&broken, "{\"format\":\"vigil-rul-1\"}").unwrap();
    let out = vigil(&[
        "check-config",
        &with(&format!(
            "devices = \"PUMP-*\"\nmodel = {:?}",
            broken.to_string_lossy()
        )),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("analytics.rul.model") && err.contains("broken.json"),
        "{err}"
    );
    let out = vigil(&[
        "check-config",
        &with("devices = \"a/b\"\nmodel = \"m.json\""),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("analytics.rul.devices"));
    let out = vigil(&["train-rul", "/nonexistent/run.csv", "-o", "/tmp/never.json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/run.csv"));
}
