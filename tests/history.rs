//! Telemetry history, through the real binary: readings published with mosquitto_pub are
//! stored, answered to the bridge's `history` request (under the subscribe ACL), kept across a
//! restart by the snapshot file, used to warm-start the models, and exported with
//! `vigil export`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{http_get, publish_lines, TempDir, Vigil};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(15);

/// `n` readings of temperature 20.0, 20.1, ... with timestamps one second apart.
fn readings(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{{\"temperature\": {:.1}, \"vibration\": 0.5, \"timestamp\": {}}}",
                20.0 + i as f64 / 10.0,
                1_790_000_000 + i
            )
        })
        .collect()
}

fn metric(http: SocketAddr, name: &str) -> f64 {
    common::metric(&http_get(http, "/metrics"), name).unwrap_or_else(|| panic!("no metric {name}"))
}

fn wait_metric(http: SocketAddr, name: &str, want: f64) {
    let deadline = Instant::now() + T;
    while metric(http, name) != want {
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {} (want {want})",
            metric(http, name)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn with_data_dir(dir: &TempDir) -> impl FnOnce(String) -> String {
    let line = format!("data_dir = {:?}", dir.0.to_string_lossy());
    move |c| c.replacen("data_dir = \"\"", &line, 1)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn history(http: SocketAddr, connect: Value, device: &str, limit: usize) -> Value {
    let mut b = Browser::login(http, connect).await;
    b.ask(
        json!({"op": "history", "ref": "h", "device": device, "limit": limit}),
        "history",
    )
    .await
}

/// The bridge's answer to `recent_alerts` for a browser that logs in with `connect`, asked
/// again until it holds at least `want` messages (at the deadline, the last answer).
fn recent_alerts(
    rt: &tokio::runtime::Runtime,
    http: SocketAddr,
    connect: &Value,
    want: usize,
) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let answer = rt.block_on(async {
            let mut b = Browser::login(http, connect.clone()).await;
            b.ask(json!({"op": "recent_alerts", "ref": 3}), "recent_alerts")
                .await
        });
        let n = answer["messages"].as_array().map_or(0, Vec::len);
        if n >= want || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn temperatures(answer: &Value) -> Vec<f64> {
    answer["points"]
        .as_array()
        .unwrap_or_else(|| panic!("no points: {answer}"))
        .iter()
        .map(|p| p["v"]["temperature"].as_f64().expect("temperature"))
        .collect()
}

#[test]
fn history_is_answered_kept_across_a_restart_warms_models_and_exports() {
    let data = TempDir::new();
    let mut v1 = Vigil::start_with(with_data_dir(&data));
    publish_lines(
        v1.port(),
        &["-t", "device/m-1/telemetry", "-q", "1"],
        readings(30),
    );
    wait_metric(
        v1.http,
        "vigil_history_points_total{result=\"stored\"}",
        30.0,
    );
    let rt = rt();
    let answer = rt.block_on(history(v1.http, json!({"op": "connect"}), "m-1", 10));
    assert_eq!(answer["op"], "history", "{answer}");
    assert_eq!(answer["ref"], "h");
    assert_eq!(answer["device"], "m-1");
    let t: Vec<f64> = temperatures(&answer);
    assert_eq!(t.len(), 10, "the 10 most recent, oldest first");
    assert!(
        (t[0] - 22.0).abs() < 1e-9 && (t[9] - 22.9).abs() < 1e-9,
        "{t:?}"
    );
    assert_eq!(answer["points"][9]["t"], 1_790_000_029_000i64);
    let unknown = rt.block_on(history(v1.http, json!({"op": "connect"}), "nobody", 10));
    assert_eq!(
        unknown["points"],
        json!([]),
        "an unknown device has no history"
    );

    // SIGTERM writes the snapshot; a new process answers from it and warm-starts the model.
    let (status, _) = v1.terminate();
    assert!(status.success());
    let csv = v1.command(&["export", "--device", "m-1"]);
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    let text = String::from_utf8_lossy(&csv.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "timestamp_ms,temperature,vibration");
    assert_eq!(lines.len(), 31, "header and 30 readings:\n{text}");
    assert_eq!(lines[1], "1790000000000,20,0.5");
    let missing = v1.command(&["export", "--device", "nobody"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no history for device `nobody`"));

    let v2 = Vigil::start_with(with_data_dir(&data));
    let answer = rt.block_on(history(v2.http, json!({"op": "connect"}), "m-1", 100));
    assert_eq!(
        temperatures(&answer).len(),
        30,
        "restored from the snapshot"
    );
    publish_lines(
        v2.port(),
        &["-t", "device/m-1/telemetry", "-q", "1"],
        &readings(31)[30..],
    );
    wait_metric(v2.http, "vigil_analytics_warm_starts_total", 1.0);
    wait_metric(v2.http, "vigil_analytics_points_total", 2.0);
}

#[test]
fn history_needs_the_right_to_read_the_device() {
    let data = TempDir::new();
    let v = Vigil::start_with_users(
        &[("m-1", "pw-m1", "device"), ("ui", "pw-ui", "viewer")],
        with_data_dir(&data),
    );
    publish_lines(
        v.port(),
        &[
            "-t",
            "device/m-1/telemetry",
            "-q",
            "1",
            "-u",
            "m-1",
            "-P",
            "pw-m1",
        ],
        readings(5),
    );
    wait_metric(v.http, "vigil_history_points_total{result=\"stored\"}", 5.0);
    let rt = rt();
    let device = json!({"op": "connect", "username": "m-1", "password": "pw-m1"});
    let refused = rt.block_on(history(v.http, device, "m-1", 10));
    assert_eq!(refused["op"], "error", "{refused}");
    assert_eq!(refused["code"], "not_authorized");
    assert_eq!(refused["ref"], "h");
    let viewer = json!({"op": "connect", "username": "ui", "password": "pw-ui"});
    let answer = rt.block_on(history(v.http, viewer, "m-1", 10));
    assert_eq!(temperatures(&answer).len(), 5, "{answer}");
    let bad = rt.block_on(async {
        let mut b = Browser::login(
            v.http,
            json!({"op": "connect", "username": "ui", "password": "pw-ui"}),
        )
        .await;
        b.ask(json!({"op": "history", "device": "a/b"}), "history")
            .await
    });
    assert_eq!(bad["code"], "bad_device", "{bad}");
}

/// The bridge's `recent_alerts` request: alerts that came before a page connected (a device's
/// own, vigil's, and an operator's acknowledgement) are answered in the order they came, to a
/// session allowed to subscribe to them, and to nobody else.
#[test]
fn recent_alerts_are_answered_in_order_under_the_subscribe_rule() {
    let v = Vigil::start_with_users(
        &[
            ("m-1", "pw-m1", "device"),
            ("ui", "pw-ui", "viewer"),
            ("op", "pw-op", "operator"),
        ],
        |c| c,
    );
    let viewer = json!({"op": "connect", "username": "ui", "password": "pw-ui"});
    let rt = rt();
    let recent = |connect: &Value, want: usize| recent_alerts(&rt, v.http, connect, want);
    let as_device = ["-u", "m-1", "-P", "pw-m1", "-q", "1"];
    publish_lines(
        v.port(),
        &[&["-t", "device/m-1/alerts"][..], &as_device].concat(),
        [r#"{"type":"ALERT","severity":"LOW","metric":"door","message":"door open"}"#],
    );
    recent(&viewer, 1);
    publish_lines(
        v.port(),
        &[&["-t", "device/m-1/telemetry"][..], &as_device].concat(),
        [r#"{"temperature": 91.5, "timestamp": 1790000000}"#],
    );
    recent(&viewer, 2);
    publish_lines(
        v.port(),
        &[
            "-t",
            "device/m-1/alerts/ack",
            "-q",
            "1",
            "-u",
            "op",
            "-P",
            "pw-op",
        ],
        [r#"{"ack": true, "alert_timestamp": 1790000000000, "by": "op"}"#],
    );
    let answer = recent(&viewer, 3);
    assert_eq!(answer["ref"], 3, "{answer}");
    let m = answer["messages"].as_array().expect("messages");
    let topics: Vec<&str> = m.iter().filter_map(|m| m["topic"].as_str()).collect();
    assert_eq!(
        topics,
        [
            "device/m-1/alerts",
            "device/m-1/alerts",
            "device/m-1/alerts/ack"
        ],
        "{answer}"
    );
    assert_eq!(m[0]["payload"]["message"], "door open", "{answer}");
    assert_eq!(m[1]["payload"]["kind"], "threshold", "{answer}");
    assert_eq!(m[1]["payload"]["value"], 91.5, "{answer}");
    assert_eq!(m[2]["payload"]["by"], "op", "{answer}");
    assert!(m
        .iter()
        .all(|m| m["t"].as_i64().is_some_and(|t| t > 1_700_000_000_000)));
    // A device may not subscribe to alerts, so it reads none of them.
    let device = json!({"op": "connect", "username": "m-1", "password": "pw-m1"});
    let none = recent(&device, 0);
    assert_eq!(none["messages"], json!([]), "{none}");
}

#[test]
fn recent_alerts_are_kept_across_a_restart_with_persistence() {
    let data = TempDir::new();
    let rt = rt();
    let recent =
        |v: &Vigil, want: usize| recent_alerts(&rt, v.http, &json!({"op": "connect"}), want);
    let mut v1 = Vigil::start_persistent(&data, |c| c);
    publish_lines(
        v1.port(),
        &["-t", "device/m-1/alerts", "-q", "1"],
        [r#"{"type":"ALERT","severity":"HIGH","metric":"door","message":"door open"}"#],
    );
    let before = recent(&v1, 1);
    assert_eq!(
        before["messages"].as_array().map_or(0, Vec::len),
        1,
        "{before}"
    );
    // SIGTERM saves the log; the next process answers from the file.
    let (status, _) = v1.terminate();
    assert!(status.success());
    let v2 = Vigil::start_persistent(&data, |c| c);
    let after = recent(&v2, 1);
    assert_eq!(after["messages"], before["messages"], "{after}");
    assert_eq!(after["messages"][0]["payload"]["message"], "door open");
}
