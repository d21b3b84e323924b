//! Benchmark of the JSON WebSocket bridge (`/ws`, docs/bridge-protocol.md): many concurrent
//! browser sessions receiving device telemetry published over MQTT.
//!
//! ```text
//! cargo build --release --bin vigil
//! cargo run --release --example bridge_bench -- [--vigil target/release/vigil] \
//!     [--sessions 1000] [--devices 100] [--rate 10000] [--secs 20] [--warmup-secs 2] \
//!     [--size 100] [--analytics] [--transport bridge|mqtt]
//! # or against a vigil that is already running (its /ws must allow the sessions):
//! cargo run --release --example bridge_bench -- --http 127.0.0.1:8080 --mqtt 127.0.0.1:1883 --pid PID
//! ```
//!
//! Without `--http`/`--mqtt` it starts the vigil binary itself (`--vigil PATH`, default
//! `target/release/vigil`) on free loopback ports, with its built-in configuration
//! (`vigil print-config`) changed in four places: `[bridge] max_sessions`,
//! `[limits] max_connections` and `max_connections_per_ip` are raised to fit the run (every
//! client comes from 127.0.0.1), and `[analytics] enabled = false`
//! unless `--analytics` is given (the benchmark measures the bridge, not the detector).
//!
//! Bridge session `i` (tokio-tungstenite) subscribes `device/dev-{i % devices}/telemetry` at
//! QoS 0, so each message fans out to `sessions / devices` sessions. `devices` MQTT 3.1.1
//! connections over TCP publish QoS 0 at `rate / devices` messages/s each for `secs` seconds;
//! each payload is a JSON object carrying the send time, so the end-to-end latency (MQTT publish
//! to the browser's decoded frame) is measured in this one process. Latencies of messages sent
//! during the first `--warmup-secs` are left out of the percentiles.
//!
//! Output: delivered messages/s, latency p50/p99/max, deliveries missing (and QoS 0 drops as
//! counted by vigil), vigil's RSS (VmRSS) before and after the sessions connect and after the
//! run, and RSS per session. The client runs on the same machine and shares its cores.
//!
//! `--transport mqtt` is the control experiment: the same sessions, subscriptions and load,
//! but each session is a plain MQTT 3.1.1 subscriber over TCP instead of a bridge WebSocket,
//! which separates the bridge's cost from the broker's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

struct Args {
    vigil: String,
    http: Option<SocketAddr>,
    mqtt: Option<SocketAddr>,
    pid: Option<u32>,
    sessions: usize,
    devices: usize,
    rate: u64,
    secs: u64,
    warmup_secs: u64,
    size: usize,
    analytics: bool,
    /// `bridge` (the default) or `mqtt` (plain MQTT subscribers, for comparison).
    transport: String,
    /// Keep-alive (s) in the MQTT CONNECTs of devices and `mqtt` sessions. 0 (the default)
    /// works with vigil; rumqttd alone (`examples/bare_core.rs`) refuses 0, so pass e.g. 60.
    keep_alive: u16,
}

fn parse_args() -> Args {
    let mut a = Args {
        vigil: "target/release/vigil".into(),
        http: None,
        mqtt: None,
        pid: None,
        sessions: 1000,
        devices: 100,
        rate: 10_000,
        secs: 20,
        warmup_secs: 2,
        size: 100,
        analytics: false,
        transport: "bridge".into(),
        keep_alive: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        let mut step = 2;
        match argv[i].as_str() {
            "--vigil" => a.vigil = v,
            "--http" => a.http = Some(v.parse().expect("--http HOST:PORT")),
            "--mqtt" => a.mqtt = Some(v.parse().expect("--mqtt HOST:PORT")),
            "--pid" => a.pid = Some(v.parse().expect("--pid")),
            "--sessions" => a.sessions = v.parse().expect("--sessions"),
            "--devices" => a.devices = v.parse().expect("--devices"),
            "--rate" => a.rate = v.parse().expect("--rate (messages/s over all devices)"),
            "--secs" => a.secs = v.parse().expect("--secs"),
            "--warmup-secs" => a.warmup_secs = v.parse().expect("--warmup-secs"),
            "--size" => a.size = v.parse().expect("--size (payload bytes, at least 40)"),
            "--transport" => a.transport = v,
            "--keep-alive" => a.keep_alive = v.parse().expect("--keep-alive SECS"),
            "--analytics" => {
                a.analytics = true;
                step = 1;
            }
            other => panic!("unknown argument {other} (see the top of examples/bridge_bench.rs)"),
        }
        i += step;
    }
    assert!(
        a.http.is_some() == a.mqtt.is_some(),
        "--http and --mqtt go together"
    );
    assert!(a.devices > 0 && a.sessions > 0 && a.rate > 0 && a.secs > 0);
    assert!(a.size >= 40, "--size must be at least 40 bytes");
    assert!(
        a.transport == "bridge" || a.transport == "mqtt",
        "--transport bridge|mqtt"
    );
    a
}

// ---------------------------------------------------------------------------------------------
// The vigil process.

struct Vigil {
    child: Child,
    http: SocketAddr,
    mqtt: SocketAddr,
    _config: TempFile,
}

impl Drop for Vigil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sets `key = value` in `[section]` of a broker.toml text (`vigil::config::set_value`).
fn set(config: &str, section: &str, key: &str, value: &str) -> String {
    vigil::config::set_value(config, section, key, value)
}

fn start_vigil(args: &Args) -> Vigil {
    let out = Command::new(&args.vigil)
        .arg("print-config")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); build it or pass --vigil PATH",
                args.vigil
            )
        });
    let mut config = String::from_utf8(out.stdout).expect("config text");
    let sessions = (args.sessions + 10).max(5000).to_string();
    config = set(&config, "bridge", "max_sessions", &sessions);
    let conns = (args.sessions + args.devices + 100).max(10000).to_string();
    config = set(&config, "limits", "max_connections", &conns);
    // Every client of the run comes from 127.0.0.1.
    config = set(&config, "limits", "max_connections_per_ip", &conns);
    if !args.analytics {
        config = set(&config, "analytics", "enabled", "false");
    }
    let path = std::env::temp_dir().join(format!("vigil-bridge-bench-{}.toml", std::process::id()));
    std::fs::write(&path, config).expect("write config");
    let config = TempFile(path);
    let child = Command::new(&args.vigil)
        .arg("--config")
        .arg(&config.0)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info,rumqttd=off")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vigil");
    // Owned by the guard from here on, so every exit path kills and reaps it.
    let unknown: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let mut v = Vigil {
        child,
        http: unknown,
        mqtt: unknown,
        _config: config,
    };
    let mut lines = BufReader::new(v.child.stderr.take().unwrap()).lines();
    let field = |line: &str, name: &str| -> Option<SocketAddr> {
        let key = format!("{name}=");
        let start = line.find(&key)? + key.len();
        line[start..].split_whitespace().next()?.parse().ok()
    };
    loop {
        let line = lines
            .next()
            .expect("vigil exited during start")
            .expect("vigil log");
        if line.contains("vigil listening") {
            v.http = field(&line, "http").expect("http address in the log");
            v.mqtt = field(&line, "mqtt").expect("mqtt address in the log");
            // Keep draining the log so vigil never blocks on a full pipe; show warnings.
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    if line.contains("WARN") || line.contains("ERROR") {
                        eprintln!("vigil: {line}");
                    }
                }
            });
            return v;
        }
    }
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// One sample from vigil's `/metrics`.
fn metric(http: SocketAddr, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(http).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// Shared counters and the clock every timestamp is relative to.
struct Shared {
    base: Instant,
    /// Set while deliveries count (from the first publish until the drain ends).
    counting: AtomicBool,
    /// Messages sent before this (micros since `base`) are warm-up: counted, not timed.
    timed_from_us: AtomicU64,
    delivered: AtomicU64,
    published: AtomicU64,
    ready: AtomicU64,
    /// Deliveries slower than 5 ms: (sent us, latency us, session), dumped to $BENCH_SLOW.
    slow: std::sync::Mutex<Vec<(u64, u64, u32)>>,
}

impl Shared {
    /// Counts one delivery of a message sent at `sent` (micros since `base`) to `session`, and
    /// times it unless it was sent during the warm-up.
    fn record(&self, sent: u64, session: usize, samples: &mut Vec<u32>) {
        let now = self.base.elapsed().as_micros() as u64;
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if sent < self.timed_from_us.load(Ordering::Relaxed) {
            return;
        }
        let latency = now.saturating_sub(sent);
        samples.push(latency.min(u32::MAX as u64) as u32);
        if latency >= 5000 {
            self.slow
                .lock()
                .unwrap()
                .push((sent, latency, session as u32));
        }
    }
}

/// The send time embedded in a message frame: the number after `"t":` in the payload.
fn sent_us(text: &str) -> Option<u64> {
    let at = text.find("\"payload\":{\"t\":")? + "\"payload\":{\"t\":".len();
    let digits = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// One browser session: connect, subscribe, then record the latency of every message.
async fn session(
    i: usize,
    http: SocketAddr,
    filter: String,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u32>, String> {
    let permit = gate.acquire().await.unwrap();
    let stream = TcpStream::connect(http)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    stream.set_nodelay(true).ok();
    // tungstenite zero-fills its whole read buffer (128 KiB by default) before every read; with
    // 1,000 sessions on the benchmark's own 2 cores that memset alone took a third of the
    // client's CPU and inflated the latency it measures. A browser has no such cost.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{http}/ws"),
        stream,
        Some(config),
    )
    .await
    .map_err(|e| format!("handshake: {e}"))?;
    let hello = json!({"op": "connect", "client_id": format!("bench-{i}"), "keep_alive": 0});
    ws.send(Message::text(hello.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let sub = json!({"op": "subscribe", "ref": 1, "filters": [{"filter": filter, "qos": 0}]});
    let mut subscribed = false;
    while !subscribed {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| "no connack/suback in 30 s".to_string())?
            .ok_or("closed during setup")?
            .map_err(|e| e.to_string())?;
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
        match v["op"].as_str() {
            Some("connack") if v["ok"] == true => ws
                .send(Message::text(sub.to_string()))
                .await
                .map_err(|e| e.to_string())?,
            Some("suback") if v["results"][0]["qos"] == 0 => subscribed = true,
            _ => return Err(format!("setup refused: {v}")),
        }
    }
    drop(permit);
    shared.ready.fetch_add(1, Ordering::Relaxed);
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(m))) => m,
            Ok(other) => return Err(format!("session {i} ended: {other:?}")),
        };
        let Message::Text(t) = msg else { continue };
        if !shared.counting.load(Ordering::Relaxed) {
            continue;
        }
        let Some(sent) = sent_us(t.as_str()) else {
            continue;
        };
        shared.record(sent, i, &mut samples);
    }
    let _ = ws
        .send(Message::text(json!({"op": "disconnect"}).to_string()))
        .await;
    Ok(samples)
}

/// The control: one plain MQTT 3.1.1 subscriber over TCP, recording latencies like `session`.
async fn mqtt_session(
    i: usize,
    mqtt: SocketAddr,
    filter: String,
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
    keep_alive: u16,
) -> Result<Vec<u32>, String> {
    let mut permit = Some(gate.acquire().await.unwrap());
    let mut s = TcpStream::connect(mqtt)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    s.set_nodelay(true).ok();
    let mut body = mqtt_string(b"MQTT");
    body.extend_from_slice(&[4, 0x02]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend(mqtt_string(format!("bench-mqtt-{i}").as_bytes()));
    let mut out = mqtt_packet(0x10, &body);
    let mut sub = vec![0, 1];
    sub.extend(mqtt_string(filter.as_bytes()));
    sub.push(0);
    out.extend(mqtt_packet(0x82, &sub));
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut subscribed = false;
    let mut samples = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Parse whole packets from `buf`.
        loop {
            if buf.len() < 2 {
                break;
            }
            let (mut len, mut mult, mut pos) = (0usize, 1usize, 1usize);
            let mut complete = true;
            loop {
                let Some(&b) = buf.get(pos) else {
                    complete = false;
                    break;
                };
                len += (b & 0x7F) as usize * mult;
                mult *= 128;
                pos += 1;
                if b & 0x80 == 0 {
                    break;
                }
            }
            if !complete || buf.len() < pos + len {
                break;
            }
            let kind = buf[0] >> 4;
            if kind == 9 {
                subscribed = true;
                permit = None;
                shared.ready.fetch_add(1, Ordering::Relaxed);
            } else if kind == 3 && shared.counting.load(Ordering::Relaxed) {
                let body = &buf[pos..pos + len];
                let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                let payload = std::str::from_utf8(&body[2 + tl..]).unwrap_or("");
                let sent = payload
                    .strip_prefix("{\"t\":")
                    .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|d| d.parse::<u64>().ok());
                if let Some(sent) = sent {
                    shared.record(sent, i, &mut samples);
                }
            }
            buf.drain(..pos + len);
        }
        if subscribed && stop.load(Ordering::Relaxed) {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return Err(format!("MQTT session {i} closed")),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    drop(permit);
    let _ = s.write_all(&[0xE0, 0]).await;
    Ok(samples)
}

fn mqtt_string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn mqtt_packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = bytes::BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(&[header]);
    vigil::mqtt::put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out.to_vec()
}

/// What one device publishes, and when.
struct DeviceSpec {
    d: usize,
    mqtt: SocketAddr,
    per_sec: f64,
    /// Offset of its first publish, as a fraction of its period.
    phase: f64,
    size: usize,
    keep_alive: u16,
    start: tokio::time::Instant,
    until: tokio::time::Instant,
}

/// One MQTT device publishing QoS 0 telemetry at `per_sec` messages/s until `until`.
async fn device(spec: DeviceSpec, shared: Arc<Shared>) {
    let DeviceSpec {
        d,
        mqtt,
        per_sec,
        phase,
        size,
        keep_alive,
        start,
        until,
    } = spec;
    let mut s = TcpStream::connect(mqtt).await.expect("device connect");
    s.set_nodelay(true).ok();
    let mut body = mqtt_string(b"MQTT");
    body.extend_from_slice(&[4, 0x02]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend(mqtt_string(
        format!("bench-dev-{d}-{}", std::process::id()).as_bytes(),
    ));
    s.write_all(&mqtt_packet(0x10, &body)).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("CONNACK");
    assert_eq!(ack, [0x20, 2, 0, 0], "device {d} refused");
    let (mut rd, mut wr) = s.into_split();
    tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let topic = format!("device/dev-{d}/telemetry");
    // Devices start spread over one period (`phase` in 0..1) so the load is even.
    let period = Duration::from_secs_f64(1.0 / per_sec);
    let mut next = start + period.mul_f64(phase);
    let mut seq = 0u64;
    while next < until {
        tokio::time::sleep_until(next).await;
        let t = shared.base.elapsed().as_micros() as u64;
        let head = format!("{{\"t\":{t},\"seq\":{seq},\"temperature\":21.5,\"pad\":\"");
        let pad = size.saturating_sub(head.len() + 2);
        let payload = format!("{head}{}\"}}", "x".repeat(pad));
        let mut body = mqtt_string(topic.as_bytes());
        body.extend_from_slice(payload.as_bytes());
        if wr.write_all(&mqtt_packet(0x30, &body)).await.is_err() {
            eprintln!("device {d}: connection lost");
            return;
        }
        shared.published.fetch_add(1, Ordering::Relaxed);
        seq += 1;
        next += period;
    }
    let _ = wr.write_all(&[0xE0, 0]).await;
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let args = parse_args();
    let own = match (args.http, args.mqtt) {
        (Some(_), Some(_)) => None,
        _ => Some(start_vigil(&args)),
    };
    let (http, mqtt, pid) = match &own {
        Some(v) => (v.http, v.mqtt, Some(v.child.id())),
        None => (args.http.unwrap(), args.mqtt.unwrap(), args.pid),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let fanout = args.sessions as f64 / args.devices as f64;
    println!(
        "bridge_bench: {} {} sessions, {} devices, {} msg/s for {} s, {} B payloads, QoS 0; fan-out {fanout:.1} sessions per message (session i subscribes device/dev-{{i % {}}}/telemetry); analytics {}",
        args.sessions,
        args.transport,
        args.devices,
        args.rate,
        args.secs,
        args.size,
        args.devices,
        if args.analytics || own.is_none() { "as configured" } else { "off" }
    );
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = pid.map(rss_kib);

    let shared = Arc::new(Shared {
        base: Instant::now(),
        counting: AtomicBool::new(false),
        timed_from_us: AtomicU64::new(u64::MAX),
        delivered: AtomicU64::new(0),
        published: AtomicU64::new(0),
        ready: AtomicU64::new(0),
        slow: Default::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(Semaphore::new(64));
    let connect_start = Instant::now();
    let keep_alive = args.keep_alive;
    let sessions: Vec<_> = (0..args.sessions)
        .map(|i| {
            let filter = format!("device/dev-{}/telemetry", i % args.devices);
            let (shared, gate, stop) = (shared.clone(), gate.clone(), stop.clone());
            if args.transport == "mqtt" {
                rt.spawn(mqtt_session(
                    i, mqtt, filter, shared, gate, stop, keep_alive,
                ))
            } else {
                rt.spawn(session(i, http, filter, shared, gate, stop))
            }
        })
        .collect();
    while (shared.ready.load(Ordering::Relaxed) as usize) < args.sessions {
        if sessions.iter().any(|s| s.is_finished()) {
            let failed = sessions.into_iter().find(|s| s.is_finished()).unwrap();
            let err = rt.block_on(failed).unwrap().err().unwrap_or_default();
            panic!("a session failed during setup: {err}");
        }
        assert!(
            connect_start.elapsed() < Duration::from_secs(120),
            "only {} sessions ready after 120 s",
            shared.ready.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let connect_time = connect_start.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let rss_sessions = pid.map(rss_kib);
    println!(
        "{} sessions connected and subscribed in {connect_time:.2?}",
        args.sessions
    );

    // Publish.
    let per_device = args.rate as f64 / args.devices as f64;
    shared.counting.store(true, Ordering::Relaxed);
    let t0 = shared.base.elapsed().as_micros() as u64;
    shared
        .timed_from_us
        .store(t0 + args.warmup_secs * 1_000_000, Ordering::Relaxed);
    let run_start = Instant::now();
    let dropped_before = metric(http, "vigil_bridge_dropped_qos0_total").unwrap_or(0.0);
    let lead = Duration::from_millis(200);
    let devices: Vec<_> = rt.block_on(async {
        let start = tokio::time::Instant::now() + lead;
        let until = start + Duration::from_secs(args.secs);
        (0..args.devices)
            .map(|d| {
                let spec = DeviceSpec {
                    d,
                    mqtt,
                    per_sec: per_device,
                    phase: d as f64 / args.devices as f64,
                    size: args.size,
                    keep_alive: args.keep_alive,
                    start,
                    until,
                };
                tokio::spawn(device(spec, shared.clone()))
            })
            .collect()
    });
    for d in devices {
        rt.block_on(d).expect("device task");
    }
    let publish_time = run_start.elapsed().saturating_sub(lead);
    let published = shared.published.load(Ordering::Relaxed);
    // Let deliveries in flight arrive.
    let expected = (published as f64 * fanout).round() as u64;
    let drain_start = Instant::now();
    while shared.delivered.load(Ordering::Relaxed) < expected
        && drain_start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let run_time = run_start.elapsed();
    shared.counting.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let rss_after = pid.map(rss_kib);
    let dropped =
        metric(http, "vigil_bridge_dropped_qos0_total").unwrap_or(f64::NAN) - dropped_before;
    let mut samples = Vec::new();
    let mut failed = 0;
    for s in sessions {
        match rt.block_on(s).expect("session task") {
            Ok(v) => samples.extend(v),
            Err(e) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("{e}");
                }
            }
        }
    }
    samples.sort_unstable();
    if let Ok(path) = std::env::var("BENCH_SLOW") {
        let mut slow = shared.slow.lock().unwrap().clone();
        slow.sort_unstable();
        let text: String = slow
            .iter()
            .map(|(s, l, i)| format!("{s} {l} {i}\n"))
            .collect();
        std::fs::write(path, text).ok();
    }
    let delivered = shared.delivered.load(Ordering::Relaxed);

    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "published {published} in {publish_time:.2?} ({:.0} msg/s); delivered {delivered} of {expected} expected ({:.0} msg/s over {run_time:.2?}); missing {}; vigil QoS 0 drops {dropped}; failed sessions {failed}",
        published as f64 / publish_time.as_secs_f64(),
        delivered as f64 / publish_time.as_secs_f64(),
        expected.saturating_sub(delivered)
    );
    let (p50, p99, max) = (
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
    );
    println!(
        "latency (publish -> decoded frame, {} samples after {} s warm-up): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; target p99 < 50 ms: {}",
        samples.len(),
        args.warmup_secs,
        if p99 < 50.0 { "met" } else { "MISSED" }
    );
    if let (Some(before), Some(with), Some(after)) = (rss_before, rss_sessions, rss_after) {
        let per = (with as f64 - before as f64) * 1024.0 / args.sessions as f64;
        println!(
            "vigil RSS: {:.1} MiB before sessions, {:.1} MiB with {} idle sessions ({:.1} KiB per session), {:.1} MiB after the run",
            mib(before),
            mib(with),
            args.sessions,
            per / 1024.0,
            mib(after)
        );
        println!(
            "summary: transport={} sessions={} devices={} fanout={fanout:.1} rate={} secs={} published={published} delivered={delivered} expected={expected} delivered_per_s={:.0} p50_ms={p50:.2} p99_ms={p99:.2} max_ms={max:.2} rss_before_kib={before} rss_sessions_kib={with} rss_after_kib={after} rss_per_session_kib={:.1} dropped_qos0={dropped} failed_sessions={failed}",
            args.transport,
            args.sessions,
            args.devices,
            args.rate,
            args.secs,
            delivered as f64 / publish_time.as_secs_f64(),
            per / 1024.0
        );
    } else {
        println!("vigil RSS: unknown (pass --pid with --http/--mqtt)");
    }
    drop(own);
}
