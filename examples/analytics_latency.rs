//! Telemetry-in to analytics-out latency through a running vigil.
//!
//! Devices publish JSON telemetry at a total rate; a subscriber on `device/+/predictions` and
//! `device/+/alerts` measures, for every message the analytics task publishes, the time since
//! the reading it is based on was sent. Predictions are published every
//! `analytics.prediction_every` trend points of a metric and go through the same path as alerts
//! (parse, score, model, publish), so they give a steady sample; alerts are counted too.
//!
//! Each device's readings are time-stamped one second apart (ending about now), however fast
//! they are sent: with `[analytics] trend_min_interval_ms = 1000` (the default) vigil averages readings less
//! than a second apart into one trend point, so with real time stamps 100 devices at 10,000
//! readings/s would give one prediction per metric every 10 s instead of every 10 readings; this
//! way the sample is the same with the setting on or off. A message's latency is measured from the moment the
//! reading with its `timestamp` was sent (a table from device and time stamp to send time).
//!
//! ```text
//! cargo run --release --example analytics_latency -- --port 1883 --devices 100 --rate 10000 --secs 20
//! ```
//!
//! `--echo` measures the readings themselves instead (subscribing to `device/+/telemetry`), which
//! works against any broker; `--nodelay` sets TCP_NODELAY on the publisher; `LAT_SLOW=FILE`
//! writes every message that took 20 ms or more to FILE.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = arg(&args, "--port", "1883").parse().expect("--port");
    let devices: usize = arg(&args, "--devices", "100").parse().expect("--devices");
    let rate: f64 = arg(&args, "--rate", "10000").parse().expect("--rate");
    let secs: f64 = arg(&args, "--secs", "20").parse().expect("--secs");
    // Readings sent before measuring: the detectors warm up first (256 points per metric).
    let warmup: f64 = arg(&args, "--warmup-secs", "5")
        .parse()
        .expect("--warmup-secs");

    let mut opts = MqttOptions::new(format!("lat-sub-{}", std::process::id()), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_el) = AsyncClient::new(opts, 100);
    if args.iter().any(|a| a == "--echo") {
        // The readings themselves, to separate the broker's share of the latency from the
        // analytics task's.
        sub.subscribe("device/+/telemetry", QoS::AtMostOnce)
            .await
            .expect("subscribe");
    } else {
        sub.subscribe("device/+/predictions", QoS::AtMostOnce)
            .await
            .expect("subscribe");
        sub.subscribe("device/+/alerts", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let measure_from = now_ms() + (warmup * 1000.0) as i64;
    // (device, reading time stamp) -> send time (Unix ms).
    let sent_at: Arc<Mutex<HashMap<(usize, i64), i64>>> = Arc::default();
    let sent_at_reader = sent_at.clone();
    // `LAT_SLOW=FILE`: one line per message that took 20 ms or more (receive time in Unix ms,
    // latency, topic), to see whether slow messages come in bursts.
    let mut slow = std::env::var_os("LAT_SLOW")
        .map(|path| std::io::BufWriter::new(std::fs::File::create(path).expect("LAT_SLOW")));
    let collector = tokio::spawn(async move {
        let mut latencies = Vec::new();
        let mut alerts = 0u64;
        let deadline = Instant::now() + Duration::from_secs_f64(warmup + secs + 5.0);
        while Instant::now() < deadline {
            let ev = tokio::time::timeout(Duration::from_secs(1), sub_el.poll()).await;
            let Ok(Ok(Event::Incoming(Packet::Publish(p)))) = ev else {
                continue;
            };
            let received = now_ms();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                continue;
            };
            let Some(ts) = v.get("timestamp").and_then(|t| t.as_i64()) else {
                continue;
            };
            let Some(device) = p
                .topic
                .strip_prefix("device/lat-")
                .and_then(|rest| rest.split('/').next())
                .and_then(|d| d.parse::<usize>().ok())
            else {
                continue;
            };
            let sent = sent_at_reader
                .lock()
                .ok()
                .and_then(|mut m| m.remove(&(device, ts)));
            let Some(sent) = sent.filter(|&sent| sent >= measure_from) else {
                continue;
            };
            if p.topic.ends_with("/alerts") {
                alerts += 1;
            }
            let latency = (received - sent).max(0) as u64;
            if let Some(out) = slow.as_mut() {
                if latency >= 20 {
                    use std::io::Write;
                    let _ = writeln!(out, "{received} {latency} {}", p.topic);
                }
            }
            latencies.push(latency);
        }
        (latencies, alerts)
    });

    let mut opts = MqttOptions::new(format!("lat-pub-{}", std::process::id()), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut pub_el) = AsyncClient::new(opts, 1000);
    // rumqttc leaves Nagle on by default, as libmosquitto does; `--nodelay` turns it off.
    if args.iter().any(|a| a == "--nodelay") {
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        pub_el.set_network_options(net);
    }
    tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let total = ((warmup + secs) * rate) as u64;
    // Device d's n-th reading is stamped `first_ts + n * 1000`.
    let per_device = (total as usize).div_ceil(devices) as i64;
    let first_ts = now_ms() - per_device * 1000;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = Duration::from_secs_f64(sent as f64 / rate);
        let elapsed = start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
        let d = sent as usize % devices;
        let t = sent as f64 / rate;
        // A daily-ish cycle and noise per device; values stay normal (no faults).
        let temperature =
            60.0 + 5.0 * (t / 30.0 + d as f64).sin() + ((sent * 7919) % 100) as f64 / 100.0;
        let ts = first_ts + (sent as usize / devices) as i64 * 1000;
        if let Ok(mut m) = sent_at.lock() {
            m.insert((d, ts), now_ms());
        }
        let payload =
            format!(r#"{{"device_id":"lat-{d}","temperature":{temperature:.3},"timestamp":{ts}}}"#);
        publisher
            .publish(
                format!("device/lat-{d}/telemetry"),
                QoS::AtMostOnce,
                false,
                payload,
            )
            .await
            .expect("publish");
        sent += 1;
    }
    let send_secs = start.elapsed().as_secs_f64();
    let (mut latencies, alerts) = collector.await.expect("collector");
    latencies.sort_unstable();
    let pct = |q: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        latencies[((latencies.len() - 1) as f64 * q).round() as usize]
    };
    println!(
        "sent {sent} readings in {send_secs:.1} s ({:.0}/s) from {devices} devices; analytics messages measured {} (alerts {alerts}); latency ms p50 {} p99 {} max {}",
        sent as f64 / send_secs,
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
