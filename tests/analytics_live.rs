//! The live analytics task end to end: telemetry published by a simulated device through the
//! public edge comes back as one anomaly alert per incident, trend predictions and error replies.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

/// Normal readings before the fault: enough for the detector's warm-up (256 points) and the
/// 500 scored points it needs before it may alert.
const NORMAL: usize = 1000;
/// Readings of the fault: a jump of 6 degrees, then a ramp of 0.05 degrees per reading towards
/// the 85-degree limit of the default configuration, staying below it (ends near 76).
const FAULT: usize = 200;
/// Readings published at once.
const CHUNK: usize = 100;

/// Waits until vigil logs that the analytics task holds its subscription.
fn wait_subscribed(v: &Vigil) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !v.log().contains("analytics subscribed") {
        assert!(
            Instant::now() < deadline,
            "analytics never subscribed; log:\n{}",
            v.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// Deterministic uniform noise in [-0.5, 0.5) from `seed` (a 64-bit LCG).
fn uniform_noise(mut seed: u64) -> impl FnMut() -> f64 {
    move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
}

/// One JSON reading per line, one second apart in the device's clock and ending now: the
/// fields `fields(i, noise)` returns for reading `i` (`noise` draws deterministic noise, about
/// N(0, 0.35)), then the time stamp. Returns the lines and the time stamp of reading `NORMAL`.
fn telemetry_lines(
    mut fields: impl FnMut(usize, &mut dyn FnMut() -> f64) -> String,
) -> (String, i64) {
    let t0 = now_ms() - ((NORMAL + FAULT) as i64) * 1000;
    let mut uniform = uniform_noise(42);
    let mut noise = move || (uniform() + uniform() + uniform()) * 0.4;
    let mut lines = String::new();
    for i in 0..NORMAL + FAULT {
        let ts = t0 + i as i64 * 1000;
        let fields = fields(i, &mut noise);
        lines.push_str(&format!("{{{fields},\"timestamp\":{ts}}}\n"));
    }
    (lines, t0 + NORMAL as i64 * 1000)
}

/// Publishes `lines` on `device/sim-1/telemetry` and waits until every reading was scored: the
/// last reading's prediction has arrived on `predictions`.
///
/// Devices report about once a second, so a refit (a few milliseconds) always finishes between
/// two readings. A test that replays 20 minutes of readings at once must keep that property, or
/// the debug build's slower refits would leave the detector unscored for hundreds of points: it
/// publishes in chunks and lets each chunk be scored and its refit installed before the next.
fn replay(v: &Vigil, lines: &str, fault_start_ms: i64, predictions: &mut Sub) {
    let lines: Vec<&str> = lines.lines().collect();
    for (i, chunk) in lines.chunks(CHUNK).enumerate() {
        let mut text = chunk.join("\n");
        text.push('\n');
        publish_lines(v.port(), "device/sim-1/telemetry", &text);
        let sent = (i * CHUNK + chunk.len()).to_string();
        wait_metrics(v, |m| {
            value(m, "vigil_analytics_messages_total") == Some(sent.as_str())
                && value(m, "vigil_analytics_refits_running") == Some("0")
        });
    }
    let last_ts = fault_start_ms + (FAULT as i64 - 1) * 1000;
    let done = predictions.wait_for(
        |l| l.contains(&format!("\"timestamp\":{last_ts}")),
        Duration::from_secs(40),
    );
    assert!(
        done.is_some(),
        "the last prediction never arrived ({} predictions); log:\n{}",
        predictions.messages.len(),
        v.log()
    );
}

/// The anomaly alerts among `got`, each checked for the wire format and QoS 1.
fn anomaly_alerts(got: &[String]) -> Vec<serde_json::Value> {
    got.iter()
        .map(|m| payload(m))
        .filter(|(_, a)| a["kind"] == "anomaly")
        .inspect(|(qos, a)| {
            assert_eq!(*qos, 1, "alerts are published at QoS 1: {a}");
            assert_eq!(a["type"], "ALERT");
            assert_eq!(a["device_id"], "sim-1");
        })
        .map(|(_, a)| a)
        .collect()
}

/// A device's run through a fresh vigil, and the one anomaly alert it raised.
struct Incident {
    vigil: Vigil,
    predictions: Sub,
    alert: serde_json::Value,
    fault_start_ms: i64,
}

/// Replays `NORMAL + FAULT` readings of `device/sim-1` (fields from `fields`, as in
/// `telemetry_lines`) through a fresh vigil and checks that they raised exactly one anomaly
/// alert, after the fault started.
fn one_incident(fields: impl FnMut(usize, &mut dyn FnMut() -> f64) -> String) -> Incident {
    let vigil = Vigil::start();
    wait_subscribed(&vigil);
    let mut alerts = Sub::start(vigil.port(), &["-t", "device/sim-1/alerts", "-q", "1"]);
    let mut predictions = Sub::start(vigil.port(), &["-t", "device/sim-1/predictions", "-q", "1"]);
    let (lines, fault_start_ms) = telemetry_lines(fields);
    replay(&vigil, &lines, fault_start_ms, &mut predictions);
    let got = alerts.drain(Duration::from_millis(500));
    let mut anomalies = anomaly_alerts(&got);
    assert_eq!(
        anomalies.len(),
        1,
        "expected exactly one anomaly alert for the incident: {got:#?}"
    );
    let alert = anomalies.remove(0);
    assert!(
        alert["timestamp"].as_i64().unwrap_or(0) >= fault_start_ms,
        "anomaly alert before the fault: {alert}"
    );
    Incident {
        vigil,
        predictions,
        alert,
        fault_start_ms,
    }
}

/// Publishes every line of `lines` as one message, from one `mosquitto_pub -l` process.
fn publish_lines(port: u16, topic: &str, lines: &str) {
    common::publish_lines(port, &["-t", topic, "-q", "1"], lines.lines());
}

/// The JSON payload of a `MSG|topic|qos|retain|payload` line.
fn payload(msg: &str) -> (u8, serde_json::Value) {
    let mut parts = msg.splitn(4, '|');
    let _topic = parts.next();
    let qos = parts.next().and_then(|q| q.parse().ok()).unwrap_or(9);
    let _retain = parts.next();
    let json = parts.next().unwrap_or("");
    let value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {msg}"));
    (qos, value)
}

fn metrics(v: &Vigil) -> String {
    let mut s = TcpStream::connect(v.http).expect("http");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of an unlabelled sample in a metrics page.
fn value<'a>(page: &'a str, name: &str) -> Option<&'a str> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
}

fn wait_metrics(v: &Vigil, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(v);
        if pred(&m) {
            return;
        }
        assert!(Instant::now() < deadline, "metrics never matched:\n{m}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_payload_is_answered_on_the_errors_topic() {
    let v = Vigil::start();
    wait_subscribed(&v);
    let mut errors = Sub::start(v.port(), &["-t", "device/+/errors", "-q", "1"]);
    publish(
        v.port(),
        &["-t", "device/pump-7/telemetry", "-m", "temperature=80"],
    );
    let got = errors.expect_messages(1, Duration::from_secs(10));
    assert_eq!(got.len(), 1, "no error reply: {got:?}");
    assert!(got[0].starts_with("device/pump-7/errors|0|"), "{got:?}");
    let (_, e) = payload(&got[0]);
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["code"], "not_json");
    assert_eq!(e["device_id"], "pump-7");
    assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
    assert!(e["timestamp"].as_i64().is_some_and(|t| t > 0), "{e}");
    let m = metrics(&v);
    assert!(
        m.contains("vigil_analytics_telemetry_errors_total{code=\"not_json\"} 1"),
        "{m}"
    );
}

#[test]
fn one_anomaly_alert_per_incident_and_a_prediction_towards_the_limit() {
    // A temperature around 60, then a jump of 6 degrees and a ramp towards the limit.
    let Incident {
        vigil: mut v,
        predictions,
        alert,
        fault_start_ms,
    } = one_incident(|i, noise| {
        let value = if i < NORMAL {
            60.0 + noise()
        } else {
            66.0 + 0.05 * (i - NORMAL) as f64 + noise()
        };
        format!("\"temperature\":{value:.3}")
    });
    assert_eq!(alert["metric"], "temperature");
    assert!(alert.get("expected").is_none(), "{alert}");

    let towards_limit = predictions
        .messages
        .iter()
        .map(|m| payload(m).1)
        .filter(|p| p["timestamp"].as_i64().unwrap_or(0) >= fault_start_ms)
        .find(|p| {
            p["trend"] == "rising"
                && p["seconds_to_limit"]
                    .as_f64()
                    .is_some_and(|s| s.is_finite() && s > 0.0)
        });
    assert!(
        towards_limit.is_some(),
        "no rising prediction with a finite time to the limit: {:#?}",
        predictions
            .messages
            .iter()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
    );

    let m = metrics(&v);
    let points = format!("vigil_analytics_points_total {}", NORMAL + FAULT);
    assert!(m.contains(&points), "{m}");
    assert!(m.contains("vigil_analytics_devices 1"), "{m}");

    // The analytics task leaves with the rest at shutdown.
    let (status, took) = v.terminate();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
}

#[test]
fn a_broken_relationship_between_metrics_gives_one_cross_metric_alert() {
    // A motor's current follows a slow load cycle and its temperature follows the current.
    // The fault is a cooling loss: the temperature drifts up to 3 degrees above what the
    // current explains, well inside the range it covers anyway (64-76).
    let Incident {
        vigil: mut v,
        alert,
        ..
    } = one_incident(|i, noise| {
        let current = 15.0 + 3.0 * (i as f64 / 60.0).sin() + 0.3 * noise();
        let drift = if i < NORMAL {
            0.0
        } else {
            (0.03 * (i - NORMAL) as f64).min(3.0)
        };
        let temperature = 40.0 + 2.0 * current + 0.3 * noise() + drift;
        format!("\"current\":{current:.3},\"temperature\":{temperature:.3}")
    });
    // With two metrics the relationship is what broke; the alert names one and the message
    // the other.
    let (named, other) = match alert["metric"].as_str() {
        Some("temperature") => ("temperature", "current"),
        Some("current") => ("current", "temperature"),
        _ => panic!("unexpected metric: {alert}"),
    };
    let value = alert["value"].as_f64().unwrap_or(f64::NAN);
    let expected = alert["expected"].as_f64().unwrap_or(f64::NAN);
    assert!(
        (value - expected).abs() > 0.2,
        "the alert gives the prediction it broke: {alert}"
    );
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(named) && m.contains(&format!("does not fit {other}"))),
        "{alert}"
    );
    let (status, _) = v.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_sensor_that_freezes_at_a_steady_load_gives_one_stuck_sensor_alert() {
    // A motor at a constant load: nothing but noise, so the value, its level and its relation
    // to the current all stay ordinary when the temperature sensor freezes at its last reading.
    let mut last = String::new();
    let Incident {
        vigil: mut v,
        alert,
        fault_start_ms,
        ..
    } = one_incident(|i, noise| {
        let current = 15.0 + 0.3 * noise();
        let temperature = 60.0 + 0.3 * noise();
        if i < NORMAL {
            last = format!("{temperature:.3}");
        }
        format!("\"current\":{current:.3},\"temperature\":{last}")
    });
    assert_eq!(alert["metric"], "temperature", "{alert}");
    assert_eq!(alert["severity"], "MEDIUM", "{alert}");
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains("for 30 readings in a row") && m.contains("stuck")),
        "{alert}"
    );
    // The last normal reading began the run, so the 29th frozen one completes 30 readings.
    assert_eq!(
        alert["timestamp"].as_i64(),
        Some(fault_start_ms + 28 * 1000),
        "{alert}"
    );
    let (status, _) = v.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_device_that_goes_silent_gets_one_alert_per_silence() {
    // One second of silence is enough here (the default is 60 s).
    let mut v = Vigil::start_with(|t| t.replace("silence_min_secs = 60", "silence_min_secs = 1"));
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/+/alerts", "-q", "1"]);
    let readings = |n: usize| {
        (0..n)
            .map(|i| format!("{{\"temperature\":{}}}", 60 + i % 7))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // sim-quiet sends 20 messages (19 intervals known), sim-new only 10: too few to judge;
    // sim-off sends 20, then says it is going offline (retained, as a last will would).
    publish_lines(v.port(), "device/sim-quiet/telemetry", &readings(20));
    publish_lines(v.port(), "device/sim-new/telemetry", &readings(10));
    publish_lines(v.port(), "device/sim-off/telemetry", &readings(20));
    let said = publish(
        v.port(),
        &[
            "-t",
            "device/sim-off/status",
            "-q",
            "1",
            "-r",
            "-m",
            "{\"status\":\"offline\"}",
        ],
    );
    assert!(said.status.success(), "{said:?}");
    let quiet = |l: &str| l.starts_with("MSG|device/sim-quiet/alerts");
    if alerts.wait_for(quiet, Duration::from_secs(10)).is_none() {
        panic!("no silence alert; log:\n{}", v.log());
    }
    let (qos, alert) = payload(&alerts.messages[0]);
    assert_eq!(qos, 1);
    assert_eq!(alert["kind"], "anomaly", "{alert}");
    assert_eq!(alert["metric"], "telemetry", "{alert}");
    assert_eq!(alert["severity"], "MEDIUM", "{alert}");
    assert!(alert["value"].as_f64().is_some_and(|s| s >= 1.0), "{alert}");
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("no telemetry for")),
        "{alert}"
    );
    // Once per silence, and nothing about the device with too short a record or the one that
    // said it was going offline.
    let all = alerts.drain(Duration::from_millis(2500));
    assert_eq!(all.len(), 1, "{all:#?}");
    // It reports again, then falls silent again: a new alert.
    publish_lines(v.port(), "device/sim-quiet/telemetry", &readings(1));
    let again = alerts.wait_for(quiet, Duration::from_secs(10));
    assert!(again.is_some(), "no alert for the second silence");
    assert!(metrics(&v).contains("vigil_analytics_silences_total 2"));
    let (status, _) = v.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn metrics_that_stop_arriving_give_one_missing_metric_alert() {
    let mut v = Vigil::start();
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/sim-2/alerts", "-q", "1"]);
    // 150 readings with three metrics, then 40 with the temperature alone.
    let lines = (0..190)
        .map(|i| {
            let t = 60.0 + f64::from(i % 7) / 10.0;
            if i < 150 {
                format!(
                    "{{\"temperature\":{t},\"vibration\":1.{},\"current\":15.{}}}",
                    i % 9,
                    i % 5
                )
            } else {
                format!("{{\"temperature\":{t}}}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    publish_lines(v.port(), "device/sim-2/telemetry", &lines);
    wait_metrics(&v, |m| {
        value(m, "vigil_analytics_messages_total") == Some("190")
    });
    alerts.expect_messages(1, Duration::from_secs(10));
    let got = alerts.drain(Duration::from_millis(500));
    let missing: Vec<_> = got
        .iter()
        .map(|m| payload(m).1)
        .filter(|a| a["message"].as_str().is_some_and(|m| m.contains("missing")))
        .collect();
    assert_eq!(missing.len(), 1, "{got:#?}");
    let alert = &missing[0];
    // The metrics of a flat reading come in name order; the first one missing is named.
    assert_eq!(alert["metric"], "current", "{alert}");
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m
                .starts_with("current (and vibration) missing from the device's last 30 readings")),
        "{alert}"
    );
    let (status, _) = v.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn limits_for_a_device_pattern_replace_the_general_ones() {
    let mut v = Vigil::start_with(|t| {
        format!(
            "{t}\n[[analytics.device_limits]]\ndevices = \"MOTOR-*\"\nlimits = {{ temperature = 95.0 }}\n"
        )
    });
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/+/alerts", "-q", "1"]);
    // 90 degrees: over the general 85, under the motors' 95.
    for id in ["MOTOR-1", "PUMP-1"] {
        publish_lines(
            v.port(),
            &format!("device/{id}/telemetry"),
            "{\"temperature\":90.0}",
        );
    }
    publish_lines(
        v.port(),
        "device/MOTOR-1/telemetry",
        "{\"temperature\":96.0}",
    );
    alerts.expect_messages(2, Duration::from_secs(10));
    let got = alerts
        .drain(Duration::from_millis(500))
        .iter()
        .map(|m| payload(m).1)
        .map(|a| {
            (
                a["device_id"].clone(),
                a["kind"].clone(),
                a["value"].clone(),
            )
        })
        .collect::<Vec<_>>();
    let mut seen = got
        .iter()
        .map(|(d, k, v)| {
            format!(
                "{} {} {}",
                d.as_str().unwrap_or("?"),
                k.as_str().unwrap_or("?"),
                v
            )
        })
        .collect::<Vec<_>>();
    seen.sort();
    assert_eq!(seen, ["MOTOR-1 threshold 96.0", "PUMP-1 threshold 90.0"]);
    let (status, _) = v.terminate();
    assert!(status.success(), "{status:?}");
}

/// Devices in the field write time stamps and values in more ways than RFC 3339 and JSON numbers:
/// a gateway's tagged value as a string and an ISO 8601 offset without a colon are read (the
/// threshold alert carries both), metrics inside objects are read, a flat number sent as a
/// string is refused with a reason that says so, and `1e400` is refused as not finite.
#[test]
fn gateway_style_strings_and_offsets_are_read_and_a_string_metric_is_explained() {
    let v = Vigil::start();
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/+/alerts", "-q", "1"]);
    let mut errors = Sub::start(v.port(), &["-t", "device/+/errors", "-q", "1"]);
    publish_lines(
        v.port(),
        "device/gw-1/telemetry",
        r#"{"deviceId":"gw-1","timestamp":"2026-01-02T03:04:05.250+0100","values":[{"tag":"temperature","value":"90.5","unit":"C"}]}"#,
    );
    publish_lines(
        v.port(),
        "device/gw-2/telemetry",
        r#"{"device_id":"gw-2","temperature":"78.2"}"#,
    );
    let got = alerts.expect_messages(1, Duration::from_secs(10));
    let (_, a) = payload(&got[0]);
    assert_eq!(a["kind"], "threshold", "{a}");
    assert_eq!(a["value"], 90.5, "{a}");
    assert_eq!(a["timestamp"], 1_767_319_445_250_i64, "{a}");
    let got = errors.expect_messages(1, Duration::from_secs(10));
    assert!(got[0].starts_with("device/gw-2/errors|0|"), "{got:?}");
    let (_, e) = payload(&got[0]);
    assert_eq!(e["code"], "no_metrics", "{e}");
    assert!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("\"temperature\" holds a number as a string")),
        "{e}"
    );

    // Metrics inside objects are read: a `values` object is a container and a `{"value": ...}`
    // object is one metric, so this is `temperature` and meets its limit.
    publish_lines(
        v.port(),
        "device/gw-3/telemetry",
        r#"{"device_id":"gw-3","values":{"temperature":{"value":92.5,"unit":"C"}}}"#,
    );
    let got = alerts.expect_messages(2, Duration::from_secs(10));
    assert!(got[1].starts_with("device/gw-3/alerts|"), "{got:?}");
    let (_, a) = payload(&got[1]);
    assert_eq!(
        (&a["metric"], &a["value"]),
        (&"temperature".into(), &92.5.into()),
        "{a}"
    );
    // A literal beyond the range of a float is an infinite value, reported as such.
    publish_lines(
        v.port(),
        "device/gw-4/telemetry",
        r#"{"device_id":"gw-4","temperature":1e400}"#,
    );
    let got = errors.expect_messages(2, Duration::from_secs(10));
    assert!(got[1].starts_with("device/gw-4/errors|0|"), "{got:?}");
    let (_, e) = payload(&got[1]);
    assert_eq!(e["code"], "non_finite", "{e}");
}

/// One machine's run to failure, as `vigil export` writes it: "wear" rises over its last 100
/// readings, "noise" is noise.
fn run_to_failure(life: u32) -> String {
    let mut csv = String::from("timestamp_ms,noise,wear\n");
    for c in 1..=life {
        let wear = (f64::from(c) - f64::from(life) + 100.0).max(0.0);
        let noise = f64::from(c * 7919 % 13) / 13.0;
        csv.push_str(&format!(
            "{},{noise},{wear}\n",
            1_734_512_000_000_i64 + i64::from(c)
        ));
    }
    csv
}

/// A remaining-useful-life model trained with `vigil train-rul` from exported run-to-failure
/// histories is applied live to the devices of its pattern: an estimate every
/// `prediction_every` readings on `device/<id>/predictions`, equal to what the saved model
/// gives offline for the same readings, and one forecast alert as the end nears.
#[test]
fn a_rul_model_trained_from_exported_runs_estimates_live_and_alerts_once() {
    use vigil_analytics::rul::{parse_runs_csv, RulModel};
    let dir = TempDir::new();
    let mut files = Vec::new();
    for k in 0..16 {
        let path = dir.0.join(format!("run-{k}.csv"));
        std::fs::write(&path, run_to_failure(150 + 5 * k)).expect("write run");
        files.push(path.to_string_lossy().into_owned());
    }
    let model_path = dir.0.join("pump.json");
    let out = std::process::Command::new(vigil_bin())
        .arg("train-rul")
        .args(&files)
        .arg("-o")
        .arg(&model_path)
        .args([
            "--config",
            r#"{"rounds":30,"learning_rate":0.2,"min_leaf":20}"#,
        ])
        .output()
        .expect("vigil train-rul");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("trained on 16 machines"), "{said}");
    assert!(said.contains("the model reads noise, wear"), "{said}");

    let model_line = format!("model = {:?}", model_path.to_string_lossy());
    let mut v = Vigil::start_with(|t| {
        format!("{t}\n[[analytics.rul]]\ndevices = \"PUMP-*\"\n{model_line}\nalert_below = 30\n")
    });
    wait_subscribed(&v);
    let mut predictions = Sub::start(v.port(), &["-t", "device/+/predictions"]);
    let mut alerts = Sub::start(v.port(), &["-t", "device/+/alerts", "-q", "1"]);
    let life = 200;
    let run = run_to_failure(life);
    // One reading a minute, the last one a minute ago.
    let start_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 60 * u64::from(life);
    let lines: String = run
        .lines()
        .skip(1)
        .enumerate()
        .map(|(i, l)| {
            let cells: Vec<&str> = l.split(',').collect();
            format!(
                "{{\"noise\":{},\"wear\":{},\"timestamp\":{}}}\n",
                cells[1],
                cells[2],
                start_s + 60 * i as u64
            )
        })
        .collect();
    publish_lines(v.port(), "device/PUMP-9/telemetry", &lines);
    publish_lines(v.port(), "device/FAN-1/telemetry", &lines);
    // 20 estimates for the pump, the last after its 200th reading; none for the fan (no
    // model matches it).
    predictions.wait_for(
        |m| m.contains("\"RUL\"") && m.contains(&format!("\"readings\":{life}")),
        Duration::from_secs(30),
    );
    let rul: Vec<serde_json::Value> = predictions
        .drain(Duration::from_millis(500))
        .iter()
        .map(|m| payload(m).1)
        .filter(|p| p["type"] == "RUL")
        .collect();
    assert_eq!(rul.len(), 20, "{rul:?}");
    assert!(rul.iter().all(|p| p["device_id"] == "PUMP-9"), "{rul:?}");
    let last = &rul[19];
    assert_eq!(
        (&last["readings"], &last["cap"]),
        (&serde_json::json!(life), &serde_json::json!(125.0))
    );
    let model = RulModel::from_json(&std::fs::read_to_string(&model_path).expect("model"))
        .expect("the saved model");
    let (_, rows) = parse_runs_csv(&[&run]).expect("the run");
    let offline = model.predict_history(&rows).expect("estimate");
    assert_eq!(last["remaining_cycles"].as_f64(), Some(offline), "{last}");
    let seconds = last["remaining_seconds"].as_f64().unwrap_or(f64::NAN);
    assert!((seconds - offline * 60.0).abs() < 1e-6, "{last}");
    assert!(offline < 15.0, "{offline}");
    let got = alerts.expect_messages(1, Duration::from_secs(10));
    let (_, a) = payload(&got[0]);
    assert_eq!(
        (&a["device_id"], &a["kind"], &a["metric"]),
        (
            &serde_json::json!("PUMP-9"),
            &serde_json::json!("forecast"),
            &serde_json::json!("remaining_useful_life")
        ),
        "{a}"
    );
    let all = alerts.drain(Duration::from_millis(500));
    let rul_alerts = all
        .iter()
        .filter(|m| m.contains("remaining_useful_life"))
        .count();
    assert_eq!(rul_alerts, 1, "{all:?}");
    let (status, _) = v.terminate();
    assert!(status.success(), "{status:?}");
}

/// A vibration sensor that reports 20 times a second: a bearing starts to wear after ten
/// minutes and its vibration climbs past the 7.1 limit over the next one and a half. Counted in
/// readings, every debounce (100 readings, 30 readings), the trend window (120 readings) and the
/// detector's memory (about 1,000 readings) would last seconds; with the settings for fast
/// devices (`score_min_interval_ms` 1000, and `trend_min_interval_ms` at its default 1000) and
/// the debounces' time floors, the incident gives exactly one anomaly alert, one forecast alert
/// and one threshold alert, and the predictions come at most once per metric every 10 s.
#[test]
fn a_device_reporting_20_times_a_second_gets_one_alert_of_each_kind_per_incident() {
    const STEP_MS: i64 = 50;
    const NORMAL: usize = 12_000;
    const FAULT: usize = 1800;
    let v = Vigil::start_with(|c| {
        c.replacen(
            "\nscore_min_interval_ms = 0\n",
            "\nscore_min_interval_ms = 1000\n",
            1,
        )
    });
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/fast-1/alerts", "-q", "1"]);
    let mut predictions = Sub::start(v.port(), &["-t", "device/fast-1/predictions", "-q", "1"]);
    let t0 = now_ms() - (NORMAL + FAULT) as i64 * STEP_MS;
    let mut u = uniform_noise(7);
    let mut noise = move || (u() + u() + u()) * 0.3;
    let lines: Vec<String> = (0..NORMAL + FAULT)
        .map(|i| {
            let wear = i.saturating_sub(NORMAL) as f64 * (6.0 / FAULT as f64);
            format!(
                "{{\"vibration\":{:.3},\"timestamp\":{}}}",
                2.0 + wear + noise(),
                t0 + i as i64 * STEP_MS
            )
        })
        .collect();
    for (i, chunk) in lines.chunks(200).enumerate() {
        publish_lines(v.port(), "device/fast-1/telemetry", &chunk.join("\n"));
        let sent = (i * 200 + chunk.len()).to_string();
        wait_metrics(&v, |m| {
            value(m, "vigil_analytics_messages_total") == Some(sent.as_str())
                && value(m, "vigil_analytics_refits_running") == Some("0")
        });
    }
    let got = alerts.drain(Duration::from_millis(500));
    let kinds: Vec<(String, i64)> = got
        .iter()
        .map(|m| payload(m).1)
        .map(|a| {
            let at = a["timestamp"].as_i64().unwrap_or(0);
            (
                a["kind"].as_str().unwrap_or("").to_string(),
                (at - t0) / STEP_MS,
            )
        })
        .collect();
    let count = |kind: &str| kinds.iter().filter(|(k, _)| k == kind).count();
    assert_eq!(
        (count("anomaly"), count("forecast"), count("threshold")),
        (1, 1, 1),
        "alerts (kind, reading): {kinds:?}"
    );
    assert!(
        kinds.iter().all(|(_, at)| *at >= NORMAL as i64),
        "an alert before the fault: {kinds:?}"
    );
    // 690 s of readings: about 69 predictions, never one per 10 readings (1,380).
    let n = predictions.drain(Duration::from_millis(200)).len();
    assert!((60..=75).contains(&n), "{n} predictions");
    // The detector scored about one reading a second.
    let m = metrics(&v);
    let scored: f64 = value(&m, "vigil_analytics_points_total")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    assert!((690.0..=800.0).contains(&scored), "{scored} points scored");
}

/// A machine that runs for 3,000 s and stands for 2,000 s (vibration and current 0), over and
/// over, then develops a bearing fault: with a running condition (`[[analytics.running]]`,
/// current above 1) its stops and starts raise nothing, and the fault one anomaly alert. A
/// twin without a matching condition learns its rest (`rest_after_secs`, 600 s) during its
/// first stop: that stop is reported, later stops and starts are not, and the fault is. A
/// third machine is first seen standing (its readings begin with the first stop): its first
/// start and stop raise nothing either, and its fault one alert. A fourth spins down and up
/// over two minutes: once its rest is learned, what the detector reports while it slows down
/// is withheld and withdrawn when it stands, and its fault is one alert.
#[test]
fn stops_and_starts_are_not_incidents_with_a_running_condition_or_a_learned_rest() {
    const READINGS: i64 = 20_000;
    const FAULT_AT: i64 = 16_200;
    let v = Vigil::start_with(|c| {
        format!(
            "{c}\n[[analytics.running]]\ndevices = \"shift-*\"\nmetric = \"current\"\nabove = 1.0\nsettle_secs = 60\n"
        )
    });
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/+/alerts", "-q", "1"]);
    let t0 = now_ms() - READINGS * 1000;
    let mut noise = uniform_noise(3);
    let mut temperature = 25.0;
    // Each reading as the first three machines send it, and as the fourth, spinning up and
    // down over 120 s.
    let (lines, slow): (Vec<String>, Vec<String>) = (0..READINGS)
        .map(|i| {
            let runs = i % 5000 < 3000;
            let spin = ((i % 5000).min(3000 - i % 5000) as f64 / 120.0).clamp(0.0, 1.0);
            let load = match runs {
                true => 0.5 - 0.4 * (i as f64 * std::f64::consts::TAU / 600.0).cos(),
                false => 0.0,
            };
            let target = if runs { 50.0 + 10.0 * load } else { 25.0 };
            temperature += (target - temperature) / 300.0;
            let wear = (i - FAULT_AT).max(0) as f64 * 0.02;
            let (vib, cur) = match runs {
                true => (1.8 + load + wear + 0.1 * noise(), 8.0 + 10.0 * load + 0.3 * noise()),
                false => (0.0, 0.0),
            };
            let t = temperature + 0.4 * noise();
            let line = |spin: f64| {
                format!(
                    "{{\"temperature\":{t:.2},\"vibration\":{:.3},\"current\":{:.2},\"timestamp\":{}}}",
                    spin * vib,
                    spin * cur,
                    t0 + i * 1000
                )
            };
            (line(1.0), line(spin))
        })
        .unzip();
    // The idle machine's readings begin with the first stop, at reading 3000.
    const IDLE_FROM: usize = 3000;
    let mut sent = 0;
    for (i, (chunk, slow)) in lines.chunks(500).zip(slow.chunks(500)).enumerate() {
        let body = chunk.join("\n");
        publish_lines(v.port(), "device/shift-1/telemetry", &body);
        publish_lines(v.port(), "device/other-1/telemetry", &body);
        publish_lines(v.port(), "device/slow-1/telemetry", &slow.join("\n"));
        sent += 3 * chunk.len();
        if i * 500 >= IDLE_FROM {
            publish_lines(v.port(), "device/idle-1/telemetry", &body);
            sent += chunk.len();
        }
        let sent_text = sent.to_string();
        wait_metrics(&v, |m| {
            value(m, "vigil_analytics_messages_total") == Some(sent_text.as_str())
                && value(m, "vigil_analytics_refits_running") == Some("0")
        });
    }
    let got = alerts.drain(Duration::from_millis(500));
    // (metric and its alternatives, reading) of each anomaly alert.
    let at = |device: &str| -> Vec<(Vec<String>, i64)> {
        got.iter()
            .filter(|m| m.starts_with(&format!("device/{device}/alerts|")))
            .map(|m| payload(m).1)
            .filter(|a| a["kind"] == "anomaly")
            .map(|a| {
                let reading = (a["timestamp"].as_i64().unwrap_or(0) - t0) / 1000;
                let named = std::iter::once(&a["metric"])
                    .chain(a["alternatives"].as_array().into_iter().flatten())
                    .filter_map(|m| m.as_str().map(str::to_string))
                    .collect();
                (named, reading)
            })
            .collect()
    };
    // The fault's alert: the wear is the vibration's, so it is named, as the metric or as
    // the alternative to current, which moves in proportion with it.
    let one_fault_alert = |alerts: &[(Vec<String>, i64)]| {
        assert_eq!(
            alerts.len(),
            1,
            "anomaly alerts after the start (metrics named, reading): {alerts:?}"
        );
        assert!(alerts[0].1 >= FAULT_AT, "{alerts:?}");
        assert!(alerts[0].0.iter().any(|m| m == "vibration"), "{alerts:?}");
    };
    one_fault_alert(&at("shift-1"));
    let (first_stop, later): (Vec<_>, Vec<_>) =
        at("other-1").into_iter().partition(|(_, i)| *i < 3600);
    assert!(
        !first_stop.is_empty() && first_stop.iter().all(|(_, i)| *i >= 3000),
        "the twin's alerts before its rest was learned: {first_stop:?}"
    );
    one_fault_alert(&later);
    one_fault_alert(&at("idle-1"));
    let (first_stop, later): (Vec<_>, Vec<_>) =
        at("slow-1").into_iter().partition(|(_, i)| *i < 3900);
    assert!(
        first_stop.iter().all(|(_, i)| *i >= 2880),
        "the slow machine's alerts before its rest was learned: {first_stop:?}"
    );
    // Its fault's alert comes first; the spin-down of the worn machine (vibration at five
    // times its limit by then) may be reported again.
    one_fault_alert(&later[..later.len().min(1)]);
    assert!(
        later.iter().all(|(_, i)| *i >= FAULT_AT),
        "the slow machine's alerts after its rest was learned: {later:?}"
    );
    // Three rests learned: the twin's, the idle machine's and the slow one's (the device
    // with a running condition learns none); the slow one's later spin-downs raised alerts
    // that were withdrawn.
    let m = metrics(&v);
    assert_eq!(value(&m, "vigil_analytics_rests_learned_total"), Some("3"));
    let withdrawn = value(&m, "vigil_analytics_alerts_withdrawn_total");
    assert!(
        withdrawn.and_then(|w| w.parse::<u64>().ok()) >= Some(1),
        "withdrawn: {withdrawn:?}"
    );
}

#[test]
fn a_door_that_opens_every_twenty_minutes_is_news_only_the_first_few_times() {
    // Six hours at one reading a second: the door opens for a minute every 20-25 minutes
    // (further apart than the 1000 readings the point tiers of the recurrence check remember),
    // the temperature stays steady until it jumps 5 degrees in the last half hour.
    const READINGS: i64 = 6 * 3600;
    const JUMP_AT: i64 = READINGS - 1800;
    let v = Vigil::start();
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/door-1/alerts", "-q", "1"]);
    let t0 = now_ms() - READINGS * 1000;
    let mut noise = uniform_noise(11);
    let mut next_open = 1200;
    let mut openings = 0;
    let lines: Vec<String> = (0..READINGS)
        .map(|i| {
            if i >= next_open + 60 {
                next_open = i + 1140 + (noise() + 0.5).mul_add(300.0, 0.0) as i64;
                openings += 1;
            }
            let door = u8::from((next_open..next_open + 60).contains(&i));
            let jump = if i >= JUMP_AT { 5.0 } else { 0.0 };
            format!(
                "{{\"door\":{door},\"temperature\":{:.2},\"timestamp\":{}}}",
                21.0 + jump + 0.3 * noise(),
                t0 + i * 1000
            )
        })
        .collect();
    assert!(openings >= 12, "{openings} openings");
    for (i, chunk) in lines.chunks(500).enumerate() {
        publish_lines(v.port(), "device/door-1/telemetry", &chunk.join("\n"));
        let sent = (i * 500 + chunk.len()).to_string();
        wait_metrics(&v, |m| {
            value(m, "vigil_analytics_messages_total") == Some(sent.as_str())
                && value(m, "vigil_analytics_refits_running") == Some("0")
        });
    }
    let got = alerts.drain(Duration::from_millis(500));
    // (metric, reading) of each anomaly alert.
    let anomalies: Vec<(String, i64)> = got
        .iter()
        .map(|m| payload(m).1)
        .filter(|a| a["kind"] == "anomaly")
        .map(|a| {
            let metric = a["metric"].as_str().unwrap_or("").to_string();
            (metric, (a["timestamp"].as_i64().unwrap_or(0) - t0) / 1000)
        })
        .collect();
    let door: Vec<i64> = anomalies
        .iter()
        .filter(|(m, _)| m == "door")
        .map(|&(_, i)| i)
        .collect();
    assert!(
        !door.is_empty() && door.len() <= 5 && door.iter().all(|&i| i < 3 * 3600),
        "the door's anomaly alerts (reading) after {openings} openings: {anomalies:?}"
    );
    let temperature: Vec<i64> = anomalies
        .iter()
        .filter(|(m, _)| m == "temperature")
        .map(|&(_, i)| i)
        .collect();
    assert!(
        temperature.len() == 1 && temperature[0] >= JUMP_AT,
        "the temperature's jump is one incident: {anomalies:?}"
    );
}

#[test]
fn a_device_that_reports_by_exception_is_silent_only_beyond_its_usual_quiet_spells() {
    // One second of silence is enough here (the default is 60 s). The device sends a burst
    // when its value changes, then nothing for 3 s, five times, then nothing at all.
    let v = Vigil::start_with(|t| t.replace("silence_min_secs = 60", "silence_min_secs = 1"));
    wait_subscribed(&v);
    let mut alerts = Sub::start(v.port(), &["-t", "device/rbe-1/alerts", "-q", "1"]);
    let burst = (0..20)
        .map(|i| format!("{{\"temperature\":{}}}", 60 + i % 7))
        .collect::<Vec<_>>()
        .join("\n");
    // Silence alerts received by the end of each spell.
    let mut so_far = Vec::new();
    for _ in 0..5 {
        publish_lines(v.port(), "device/rbe-1/telemetry", &burst);
        std::thread::sleep(Duration::from_secs(3));
        so_far.push(alerts.drain(Duration::from_millis(10)).len());
    }
    // The first three quiet spells are silences: the device had none before. Then they are
    // its routine.
    assert_eq!(
        so_far,
        vec![1, 2, 3, 3, 3],
        "silence alerts by the end of each spell"
    );
    // Quiet for longer than its spells (twice, to the next power of two): a silence.
    publish_lines(v.port(), "device/rbe-1/telemetry", &burst);
    let outage = alerts.wait_for(|l| l.contains("no telemetry for"), Duration::from_secs(12));
    assert!(
        outage.is_some(),
        "no alert for the outage; log:\n{}",
        v.log()
    );
    assert!(metrics(&v).contains("vigil_analytics_silences_total 4"));
}
