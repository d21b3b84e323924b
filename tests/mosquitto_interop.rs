//! vigil driven by Debian's mosquitto_pub / mosquitto_sub, MQTT 3.1.1 and 5.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(5);

fn versions() -> [(&'static str, &'static [&'static str]); 2] {
    [("v311", &["-V", "mqttv311"]), ("v5", &["-V", "mqttv5"])]
}

#[test]
fn qos_0_1_2_both_directions_in_both_versions() {
    let v = Vigil::start();
    for (name, ver) in versions() {
        for sub_qos in 0..=2u8 {
            let topic = format!("interop/{name}/sub{sub_qos}");
            let q = sub_qos.to_string();
            let mut args = vec!["-t", topic.as_str(), "-q", q.as_str()];
            args.extend_from_slice(ver);
            let mut sub = Sub::start(v.port(), &args);
            for pub_qos in 0..=2u8 {
                let pq = pub_qos.to_string();
                let payload = format!("p{pub_qos}");
                let mut pargs = vec![
                    "-t",
                    topic.as_str(),
                    "-m",
                    payload.as_str(),
                    "-q",
                    pq.as_str(),
                ];
                pargs.extend_from_slice(ver);
                publish(v.port(), &pargs);
            }
            let mut got = sub.expect_messages(3, T);
            // Delivered at min(publish QoS, subscription QoS). Each message comes from its own
            // mosquitto_pub connection, and MQTT orders messages only per publisher: a QoS 0
            // publisher exits without waiting for the broker, so the next one may overtake it.
            got.sort_by(|a, b| a.rsplit('|').next().cmp(&b.rsplit('|').next()));
            let expected: Vec<String> = (0..=2u8)
                .map(|p| format!("{topic}|{}|0|p{p}", p.min(sub_qos)))
                .collect();
            assert_eq!(got, expected, "{name} subscription QoS {sub_qos}");
        }
    }
}

#[test]
fn several_core_listeners_route_between_each_other() {
    // `[core] listeners = 3` with 2 accept loops each: consecutive clients land on different
    // core ports and threads, and messages, QoS 2 included, and retained messages still reach
    // every subscriber.
    let v = Vigil::start_with(|c| {
        c.replace("listeners = 1", "listeners = 3")
            .replace("accept_loops = 16", "accept_loops = 2")
    });
    let log = v.log();
    assert!(
        log.contains("threads=3") && log.contains("ports=6"),
        "{log}"
    );
    publish(
        v.port(),
        &["-t", "listeners/retained", "-m", "kept", "-q", "1", "-r"],
    );
    let mut subs: Vec<Sub> = (0..3)
        .map(|_| Sub::start(v.port(), &["-t", "listeners/#", "-q", "2"]))
        .collect();
    for sub in &mut subs {
        assert_eq!(sub.expect_messages(1, T), ["listeners/retained|1|1|kept"]);
    }
    for q in ["0", "1", "2"] {
        let topic = format!("listeners/q{q}");
        publish(v.port(), &["-t", topic.as_str(), "-m", q, "-q", q]);
    }
    for sub in &mut subs {
        let mut got = sub.expect_messages(4, T);
        got.sort();
        assert_eq!(
            got,
            [
                "listeners/q0|0|0|0",
                "listeners/q1|1|0|1",
                "listeners/q2|2|0|2",
                "listeners/retained|1|1|kept"
            ]
        );
    }
}

#[test]
fn wildcard_device_telemetry() {
    let v = Vigil::start();
    let mut sub = Sub::start(v.port(), &["-t", "device/+/telemetry", "-q", "1"]);
    publish(
        v.port(),
        &[
            "-t",
            "device/MOTOR-01/telemetry",
            "-m",
            r#"{"temperature":78.2}"#,
            "-q",
            "1",
        ],
    );
    publish(
        v.port(),
        &["-t", "device/MOTOR-01/status", "-m", "online", "-q", "1"],
    );
    publish(
        v.port(),
        &["-t", "device/plc-101/telemetry", "-m", "x", "-q", "0"],
    );
    publish(
        v.port(),
        &["-t", "device/a/b/telemetry", "-m", "deep", "-q", "1"],
    );
    let got = sub.expect_messages(2, T);
    let extra = sub.drain(Duration::from_millis(500));
    assert_eq!(
        extra,
        vec![
            r#"device/MOTOR-01/telemetry|1|0|{"temperature":78.2}"#.to_string(),
            "device/plc-101/telemetry|0|0|x".to_string(),
        ],
        "{got:?}"
    );
}

#[test]
fn retained_messages_and_clearing() {
    let v = Vigil::start();
    for (name, ver) in versions() {
        let topic = format!("retained/{name}");
        let mut a = vec!["-t", topic.as_str(), "-m", "last-value", "-q", "1", "-r"];
        a.extend_from_slice(ver);
        publish(v.port(), &a);
        // A new subscriber gets it with the retain flag set.
        let mut sargs = vec!["-t", topic.as_str(), "-q", "1"];
        sargs.extend_from_slice(ver);
        let mut sub = Sub::start(v.port(), &sargs);
        assert_eq!(
            sub.expect_messages(1, T),
            vec![format!("{topic}|1|1|last-value")]
        );
        // A live delivery to an existing subscriber has retain 0.
        publish(v.port(), &a);
        assert_eq!(
            sub.expect_messages(2, T)[1],
            format!("{topic}|1|0|last-value")
        );
        // A non-retained empty publish does not clear it.
        let mut e = vec!["-t", topic.as_str(), "-n", "-q", "1"];
        e.extend_from_slice(ver);
        publish(v.port(), &e);
        let mut sub2 = Sub::start(v.port(), &sargs);
        assert_eq!(
            sub2.expect_messages(1, T),
            vec![format!("{topic}|1|1|last-value")]
        );
        // A retained empty publish clears it.
        let mut c = vec!["-t", topic.as_str(), "-n", "-q", "1", "-r"];
        c.extend_from_slice(ver);
        publish(v.port(), &c);
        let mut sub3 = Sub::start(v.port(), &sargs);
        assert!(
            sub3.drain(Duration::from_millis(700)).is_empty(),
            "{name}: retained not cleared"
        );
    }
}

/// rumqttd alone sends a new subscription at most 100 retained messages at QoS 1/2 and 200 at
/// QoS 0, and silently drops the rest; mosquitto sends them all (at QoS 1/2 up to its queue
/// limits). 1,500 devices' retained statuses, half at QoS 0 and half at QoS 1, must all reach a
/// wildcard subscriber at each QoS, once each, with RETAIN set and at min(publish,
/// subscription) QoS.
#[test]
fn a_wildcard_subscription_gets_every_retained_message() {
    const N: usize = 1500;
    let v = Vigil::start();
    let statuses: Vec<_> = (0..N)
        .map(|i| {
            let topic = format!("fleet/{i:04}/status");
            (topic, format!("up-{i}").into_bytes(), (i % 2) as u8)
        })
        .collect();
    store_retained(v.mqtt, "fleet-statuses", &statuses);
    for (name, ver) in versions() {
        for sub_qos in 0..=2u8 {
            let q = sub_qos.to_string();
            let mut args = vec!["-t", "fleet/+/status", "-q", q.as_str()];
            args.extend_from_slice(ver);
            let mut sub = Sub::start(v.port(), &args);
            let got = sub.expect_messages(N, Duration::from_secs(20));
            assert_eq!(got.len(), N, "{name} QoS {sub_qos}: {} of {N}", got.len());
            let mut topics = std::collections::HashSet::new();
            for line in &got {
                let f: Vec<&str> = line.split('|').collect();
                let i: usize = f[0][6..10].parse().unwrap();
                assert_eq!(f[2], "1", "{name}: {line}: RETAIN not set");
                assert_eq!(
                    f[1],
                    (sub_qos.min((i % 2) as u8)).to_string(),
                    "{name}: {line}"
                );
                assert_eq!(f[3], format!("up-{i}"));
                topics.insert(f[0].to_string());
            }
            assert_eq!(topics.len(), N, "{name} QoS {sub_qos}: duplicates");
            assert!(
                sub.drain(Duration::from_millis(300)).len() == N,
                "{name} QoS {sub_qos}: more than one copy"
            );
        }
    }
    let text = http_get(v.http, "/metrics");
    assert_eq!(metric(&text, "vigil_retained_messages"), Some(N as f64));
}

/// Retained values are rewritten (4 publishers, 200 topics, 30 rounds of increasing values)
/// while 12 subscribers, QoS 0 and 1, join at different moments: each must end with every
/// topic at its final value. A subscriber gets a topic from the store or live; an older
/// retained value arriving after a newer live one would leave it stale.
#[test]
fn subscribers_joining_while_retained_values_change_end_with_the_final_values() {
    const TOPICS: usize = 200;
    const ROUNDS: usize = 30;
    let v = Vigil::start();
    let addr = v.mqtt;
    let publishers: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                let id = format!("cv-pub-{k}");
                let mut c = Raw::connected(addr, &ConnectOpts::v311(&id));
                let mut pkid = 0u16;
                for round in 0..ROUNDS {
                    for t in (k..TOPICS).step_by(4) {
                        pkid = pkid % 60_000 + 1;
                        let topic = format!("cv/{t}");
                        let value = round.to_string();
                        c.send(&publish_packet(
                            &topic,
                            value.as_bytes(),
                            1,
                            true,
                            pkid,
                            false,
                        ));
                        assert_eq!(c.recv().expect("PUBACK").kind(), 4);
                    }
                }
            })
        })
        .collect();
    let subscribers: Vec<_> = (0..12u8)
        .map(|j| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(60 * j as u64));
                let id = format!("cv-sub-{j}");
                let mut c = Raw::connected(addr, &ConnectOpts::v311(&id));
                c.send(&subscribe_packet(1, &[("cv/#", j % 2)]));
                let mut last = vec![None; TOPICS];
                while let Some(p) = c.recv_timeout(Duration::from_millis(1500)) {
                    if p.kind() != 3 {
                        continue;
                    }
                    let (topic, qos, _, _, pkid, payload) = parse_publish(&p);
                    let t: usize = topic[3..].parse().unwrap();
                    last[t] = Some(String::from_utf8(payload).unwrap());
                    if qos == 1 {
                        c.send(&ack_packet(4, pkid));
                    }
                }
                last
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher");
    }
    let want = Some((ROUNDS - 1).to_string());
    for (j, s) in subscribers.into_iter().enumerate() {
        let last = s.join().expect("subscriber");
        let stale: Vec<usize> = (0..TOPICS).filter(|&t| last[t] != want).collect();
        assert!(
            stale.is_empty(),
            "subscriber {j}: {} topics not at their final value, e.g. cv/{} at {:?}",
            stale.len(),
            stale[0],
            last[stale[0]]
        );
    }
}

#[test]
fn last_will_published_on_abnormal_disconnect_only() {
    let v = Vigil::start();
    let mut watcher = Sub::start(v.port(), &["-t", "device/+/status", "-q", "1"]);

    // A client that vanishes without DISCONNECT: its will is published.
    let will = ConnectOpts {
        will: Some(("device/w1/status", b"offline", 1, false)),
        ..ConnectOpts::v311("w1")
    };
    let raw = Raw::connected(v.mqtt, &will);
    drop(raw);
    assert_eq!(
        watcher.expect_messages(1, T),
        vec!["device/w1/status|1|0|offline"]
    );

    // A client that disconnects cleanly: no will.
    let will2 = ConnectOpts {
        will: Some(("device/w2/status", b"offline", 1, false)),
        ..ConnectOpts::v311("w2")
    };
    let mut raw = Raw::connected(v.mqtt, &will2);
    raw.send(&[0xE0, 0]);
    assert!(raw.closed_within(T));
    assert_eq!(
        watcher.drain(Duration::from_millis(700)).len(),
        1,
        "will sent after clean DISCONNECT"
    );

    // mosquitto_sub with --will-topic, killed: will published (v5 client, v3.1.1 watcher).
    let mut dying = Sub::start(
        v.port(),
        &[
            "-t",
            "x/y",
            "-V",
            "mqttv5",
            "--will-topic",
            "device/w3/status",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ],
    );
    dying.kill();
    let got = watcher.expect_messages(2, T);
    assert_eq!(got[1], "device/w3/status|1|0|gone");
}

#[test]
fn persistent_session_receives_offline_messages() {
    let v = Vigil::start();
    for (name, ver) in versions() {
        let id = format!("persist-{name}");
        let topic = format!("cmd/{name}");
        let mut args = vec!["-t", topic.as_str(), "-q", "2", "-c", "-i", id.as_str()];
        args.extend_from_slice(ver);
        if name == "v5" {
            args.extend_from_slice(&["-x", "3600"]);
        }
        let mut sub = Sub::start(v.port(), &args);
        sub.kill();
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..3 {
            let payload = format!("offline-{i}");
            let q = (i % 2 + 1).to_string();
            publish(v.port(), &["-t", &topic, "-m", &payload, "-q", &q]);
        }
        let mut sub = Sub::start(v.port(), &args);
        let mut got = sub.expect_messages(3, T);
        // libmosquitto hands a QoS 2 message to the application only after PUBREL, so QoS 1
        // messages may overtake it (as against mosquitto): compare as a set.
        got.sort();
        assert_eq!(
            got,
            vec![
                format!("{topic}|1|0|offline-0"),
                format!("{topic}|1|0|offline-2"),
                format!("{topic}|2|0|offline-1"),
            ],
            "{name}"
        );
    }
}

#[test]
fn v5_user_properties_reach_v5_subscribers_and_never_v311_ones() {
    let v = Vigil::start();
    let mut v5 = Sub::start(
        v.port(),
        &[
            "-t",
            "props/#",
            "-q",
            "1",
            "-V",
            "mqttv5",
            "-F",
            "MSG|%t|%P|%p",
        ],
    );
    let mut v4 = Sub::start(v.port(), &["-t", "props/#", "-q", "1"]);
    publish(
        v.port(),
        &[
            "-t",
            "props/a",
            "-m",
            "hello",
            "-q",
            "1",
            "-V",
            "mqttv5",
            "-D",
            "publish",
            "user-property",
            "site",
            "plant-7",
        ],
    );
    assert_eq!(v5.expect_messages(1, T), vec!["props/a|site:plant-7|hello"]);
    assert_eq!(v4.expect_messages(1, T), vec!["props/a|1|0|hello"]);
    assert_broker_serves(v.port(), "after-props");
}

#[test]
fn shared_subscriptions_split_messages_between_members() {
    let v = Vigil::start();
    let mut a = Sub::start(
        v.port(),
        &["-t", "$share/workers/jobs/#", "-q", "1", "-V", "mqttv5"],
    );
    let mut b = Sub::start(
        v.port(),
        &["-t", "$share/workers/jobs/#", "-q", "1", "-V", "mqttv5"],
    );
    let mut all = Sub::start(v.port(), &["-t", "jobs/#", "-q", "1"]);
    for i in 0..20 {
        publish(
            v.port(),
            &["-t", "jobs/x", "-m", &format!("j{i}"), "-q", "1"],
        );
    }
    assert_eq!(
        all.expect_messages(20, T).len(),
        20,
        "a normal subscriber gets every message"
    );
    let (ga, gb) = (
        a.drain(Duration::from_millis(700)),
        b.drain(Duration::from_millis(300)),
    );
    let mut seen: Vec<String> = ga.iter().chain(gb.iter()).cloned().collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        ga.len() + gb.len(),
        20,
        "each message to exactly one member: {ga:?} {gb:?}"
    );
    assert_eq!(seen.len(), 20);
    assert!(
        !ga.is_empty() && !gb.is_empty(),
        "both members get work: {} / {}",
        ga.len(),
        gb.len()
    );
}
