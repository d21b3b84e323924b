//! MQTT.js (the npm `mqtt` package browsers use) against vigil, over MQTT-over-WebSocket on
//! `/mqtt` and on `/` (MQTT.js's default path, with its default `mqtt` subprotocol), and over
//! TCP, in MQTT 3.1.1 and 5. Interop with mosquitto_pub both ways, at every QoS.
//!
//! Needs Node.js and `npm ci --prefix tests/mqttjs` (done by `./scripts/setup`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

fn mqttjs(url: &str, prefix: &str, version: u8, tcp_port: u16) -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqttjs");
    assert!(
        std::path::Path::new(dir).join("node_modules/mqtt").exists(),
        "MQTT.js missing: run ./scripts/setup (npm ci --prefix tests/mqttjs)"
    );
    let mut child = Command::new("node")
        .arg("interop.mjs")
        .args([url, prefix, &version.to_string()])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (Node.js) must be installed");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let mut published = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        if line == "READY" && !published {
            for q in 0..=2 {
                publish(
                    tcp_port,
                    &[
                        "-t",
                        &format!("{prefix}/tcp/{q}"),
                        "-m",
                        &format!("tcp{q}"),
                        "-q",
                        &q.to_string(),
                    ],
                );
            }
            published = true;
        } else if line == "DONE" {
            break;
        } else {
            lines.push(line);
        }
    }
    let out = child.wait_with_output().expect("node exit");
    assert!(
        out.status.success(),
        "MQTT.js failed on {url}: {}\nreceived: {lines:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines.sort();
    lines
}

/// The lines MQTT.js prints; in v5 each message carries the subscription's identifier, 42.
fn expected(prefix: &str, version: u8) -> Vec<String> {
    let sid = if version == 5 { r#","sid":[42]"# } else { "" };
    let mut v: Vec<String> = ["js", "tcp"]
        .iter()
        .flat_map(|src| {
            (0..=2).map(move |q| {
                format!(r#"{{"topic":"{prefix}/{src}/{q}","payload":"{src}{q}","qos":{q},"retain":false{sid}}}"#)
            })
        })
        .collect();
    v.sort();
    v
}

/// Runs MQTT.js in protocol `version` against each of `urls` (topic prefix `<tag><index>`) and
/// checks what it received.
fn check_each(v: &Vigil, urls: &[String], version: u8, tag: &str) {
    for (i, url) in urls.iter().enumerate() {
        let prefix = format!("{tag}{i}");
        assert_eq!(
            mqttjs(url, &prefix, version, v.port()),
            expected(&prefix, version),
            "{url}"
        );
    }
}

#[test]
fn mqttjs_over_websocket_paths_and_tcp() {
    let v = Vigil::start();
    let urls = [
        format!("ws://{}/mqtt", v.http),
        format!("ws://{}/", v.http),
        format!("ws://{}", v.http),
        format!("mqtt://{}", v.mqtt),
    ];
    check_each(&v, &urls, 4, "js");
}

#[test]
fn mqttjs_v5_over_websocket_and_tcp() {
    let v = Vigil::start();
    let urls = [
        format!("ws://{}/mqtt", v.http),
        format!("mqtt://{}", v.mqtt),
    ];
    check_each(&v, &urls, 5, "js5-");
}

/// MQTT.js 5 accepting topic aliases reads the deliveries vigil sends with them: the first
/// message on a topic names it and sets the alias, later ones at QoS 0 and 1 carry only the
/// alias (QoS 2 ones the topic too: MQTT.js loses the resolved topic of an alias-only QoS 2
/// message), and the client resolves every one to its topic.
#[test]
fn mqttjs_v5_resolves_the_topic_aliases_of_deliveries() {
    let v = Vigil::start_with(|c| c.replacen("topic_aliases = 0", "topic_aliases = 32", 1));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqttjs");
    let out = Command::new("node")
        .args(["aliases.mjs", &format!("mqtt://{}", v.mqtt), "ta"])
        .current_dir(dir)
        .output()
        .expect("node (Node.js) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "MQTT.js failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"topic":"ta/a","payload":"m0","alias":1}"#,
            r#"{"topic":"ta/a","payload":"m1","alias":1}"#,
            r#"{"topic":"ta/a","payload":"m2","alias":1}"#,
            r#"{"topic":"ta/b","payload":"m3","alias":2}"#,
            r#"{"topic":"ta/a","payload":"m4","alias":1}"#,
            "DONE",
        ]
    );
}

/// Runs `resume.mjs`: MQTT.js connects `client_id` without a clean start, subscribes to
/// `topic` at QoS 1 only if the broker had no session, and prints what it gets within `wait_ms`.
fn mqttjs_resume(url: &str, client_id: &str, topic: &str, version: u8, wait_ms: u32) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqttjs");
    let out = Command::new("node")
        .args([
            "resume.mjs",
            url,
            client_id,
            topic,
            &version.to_string(),
            &wait_ms.to_string(),
        ])
        .current_dir(dir)
        .output()
        .expect("node (Node.js) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "MQTT.js failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// With `[persistence] dir`, MQTT.js devices (3.1.1 and 5) that subscribed once find their
/// sessions after a restart of vigil and get the commands published while they were away,
/// before the restart as well as after it.
#[test]
fn mqttjs_sessions_survive_a_restart_with_persistence() {
    let data = TempDir::new();
    let start = || Vigil::start_persistent(&data, |c| c);
    let mut v = start();
    for version in [4, 5] {
        let (id, topic) = (format!("js-device-{version}"), format!("cmd/js{version}"));
        let out = mqttjs_resume(&format!("mqtt://{}", v.mqtt), &id, &topic, version, 100);
        assert_eq!(out, "present false\nDONE\n");
        publish(v.port(), &["-t", &topic, "-m", "close-valve", "-q", "1"]);
    }
    let (status, _) = v.terminate();
    assert!(status.success());

    let v = start();
    for version in [4, 5] {
        let (id, topic) = (format!("js-device-{version}"), format!("cmd/js{version}"));
        publish(v.port(), &["-t", &topic, "-m", "open-valve", "-q", "1"]);
        let out = mqttjs_resume(&format!("ws://{}/mqtt", v.http), &id, &topic, version, 1000);
        // MQTT.js may hand over a message that came with the CONNACK before its `connect`.
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort();
        let before = format!("message {topic} close-valve 1");
        let after = format!("message {topic} open-valve 1");
        assert_eq!(
            lines,
            ["DONE", &before, &after, "present true"],
            "MQTT {version}"
        );
        // In the order published.
        assert!(out.find("close-valve") < out.find("open-valve"), "{out}");
    }
}
