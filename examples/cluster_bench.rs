//! Scale-out benchmark: 1, 2 and 3 vigil instances sharing one Redis (src/cluster.rs,
//! docs/cluster.md), with mosquitto as the same-run peer for one instance.
//!
//! ```text
//! cargo build --release --bin vigil
//! cargo run --release --example cluster_bench -- [--vigil target/release/vigil] \
//!     [--instances 1,2,3] [--publishers 30] [--subscribers 3] [--rate 10000] [--qos 1] \
//!     [--payload 100] [--secs 10] [--warmup-secs 2] [--inflight 100] [--aof] \
//!     [--mosquitto | --no-mosquitto] [--mosquitto-bin PATH] [--redis-server PATH] \
//!     [--analytics] [--standalone]
//! ```
//!
//! For each K in `--instances` (in turn, each with a fresh Redis) it starts a real
//! `redis-server` on a free loopback port in a temp dir (`--save '' --appendonly no`; with
//! `--aof`: `--appendonly yes --appendfsync everysec`) and K vigil processes
//! (`--vigil PATH`) on free ports, each with its built-in configuration (`vigil
//! print-config`) changed to: `[redis] url` = that Redis, `instance_id = "bench-<i>"`;
//! `[limits] max_connections` and `max_connections_per_ip` = 100000 (every client comes from
//! 127.0.0.1); `[auth]` left empty (local-only mode, anonymous clients); and
//! `[analytics] enabled = false` unless `--analytics` (the benchmark measures routing; the
//! analytics task only reads `device/+/telemetry` anyway).
//!
//! The workload (raw MQTT 3.1.1 over TCP, clean sessions, keep-alive 0):
//!
//! - `--subscribers` S subscribers per instance, each subscribed to `bench/#` at the highest
//!   QoS in `--qos`, so every message reaches every subscriber on every instance: a fan-out of
//!   S*K. Each one acknowledges as MQTT requires (PUBACK, or PUBREC then PUBCOMP).
//! - `--publishers` P publishers, publisher p connected to instance p % K, publishing to
//!   `bench/<p>/t` at `--rate / P` messages/s each (the total rate is the same for every K),
//!   spread evenly over one period, with QoS `qos[p % len]` when `--qos` lists several
//!   (e.g. `--qos 0,1`), at most `--inflight` unacknowledged QoS 1/2 messages each. They
//!   publish for `--warmup-secs` + `--secs` seconds.
//! - Each payload (`--payload` bytes, at least 24) starts with the send time (ns since the
//!   bench's clock base, u64 LE), the publisher's sequence number (u64 LE), the publisher
//!   index (u32 LE) and its QoS (u8). A subscriber de-duplicates by (publisher, sequence),
//!   and classes each delivery as *local* (publisher on the subscriber's instance) or
//!   *cross-instance* (it went through Redis).
//!
//! Before publishing, one probe message per instance is sent until every subscriber has seen
//! all of them, so every importer is reading the stream when the run starts.
//!
//! Rates are over the measured window (after the warm-up): messages published/s counts
//! messages sent in the window, deliveries/s the unique deliveries received in it. Latency
//! percentiles (publish write to delivery, same clock) are over messages sent in the window.
//! Losses and duplicates are over the whole run including the warm-up: after the publishers
//! finish (all acknowledgements in), the bench waits until every subscriber has everything or
//! nothing has arrived for 5 s. RSS (VmRSS) of every broker process and redis-server is read
//! at the end; CPU time (utime+stime from /proc) over the window is given per process and
//! for this client.
//!
//! `--mosquitto` (the default when `mosquitto` is on PATH or at /usr/sbin/mosquitto) runs the
//! K=1 workload against a mosquitto started from a config written into the temp dir
//! (`listener PORT 127.0.0.1`, `allow_anonymous true`, `max_queued_messages 100000`, and
//! `max_inflight_messages 100`, rumqttd's fixed window, as in BENCHMARKS.md), right after
//! vigil K=1, and prints both with the vigil/mosquitto ratios. `--standalone` also runs one
//! vigil without `[redis]` (K=1 without the cluster's cost).
//!
//! Everything (this client, redis-server, every vigil, mosquitto) runs on the same machine and
//! shares its cores; the output says how many. Every child process is killed when the bench
//! ends, panics, or receives SIGINT/SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vigil::mqtt::{self, Version};

/// Bytes at the start of every payload: time (8), sequence (8), publisher (4), QoS (1).
const HEADER: usize = 21;
const MIN_PAYLOAD: usize = 24;
/// Publisher index marking a probe message (its sequence number is the instance).
const PROBE: u32 = u32::MAX;
const TOPIC_FILTER: &str = "bench/#";

#[derive(Debug, Clone)]
struct Args {
    vigil: String,
    redis_server: String,
    instances: Vec<usize>,
    publishers: usize,
    subscribers: usize,
    rate: u64,
    qos: Vec<u8>,
    payload: usize,
    secs: u64,
    warmup_secs: u64,
    inflight: usize,
    aof: bool,
    mosquitto: Option<String>,
    analytics: bool,
    standalone: bool,
}

fn find_mosquitto() -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("mosquitto"))
        .chain([PathBuf::from("/usr/sbin/mosquitto")])
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

fn parse_args() -> Args {
    let mut a = Args {
        vigil: "target/release/vigil".into(),
        redis_server: "redis-server".into(),
        instances: vec![1, 2, 3],
        publishers: 30,
        subscribers: 3,
        rate: 10_000,
        qos: vec![1],
        payload: 100,
        secs: 10,
        warmup_secs: 2,
        inflight: 100,
        aof: false,
        mosquitto: None,
        analytics: false,
        standalone: false,
    };
    // None: not asked; Some(true/false): --mosquitto / --no-mosquitto.
    let mut want_mosquitto: Option<bool> = None;
    let mut mosquitto_bin: Option<String> = None;
    let list = |v: &str, what: &str| -> Vec<u64> {
        v.split(',')
            .map(|x| x.trim().parse().unwrap_or_else(|_| panic!("{what}: {v:?}")))
            .collect()
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        let mut step = 2;
        match argv[i].as_str() {
            "--vigil" => a.vigil = v,
            "--redis-server" => a.redis_server = v,
            "--instances" => {
                a.instances = list(&v, "--instances 1,2,3")
                    .into_iter()
                    .map(|k| k as usize)
                    .collect()
            }
            "--publishers" => a.publishers = v.parse().expect("--publishers"),
            "--subscribers" => a.subscribers = v.parse().expect("--subscribers (per instance)"),
            "--rate" => a.rate = v.parse().expect("--rate (messages/s over all publishers)"),
            "--qos" => {
                a.qos = list(&v, "--qos 0|1|2[,..]")
                    .into_iter()
                    .map(|q| q as u8)
                    .collect()
            }
            "--payload" => a.payload = v.parse().expect("--payload (bytes)"),
            "--secs" => a.secs = v.parse().expect("--secs"),
            "--warmup-secs" => a.warmup_secs = v.parse().expect("--warmup-secs"),
            "--inflight" => a.inflight = v.parse().expect("--inflight"),
            "--mosquitto-bin" => mosquitto_bin = Some(v),
            "--aof" => {
                a.aof = true;
                step = 1;
            }
            "--mosquitto" => {
                want_mosquitto = Some(true);
                step = 1;
            }
            "--no-mosquitto" => {
                want_mosquitto = Some(false);
                step = 1;
            }
            "--analytics" => {
                a.analytics = true;
                step = 1;
            }
            "--standalone" => {
                a.standalone = true;
                step = 1;
            }
            other => panic!("unknown argument {other} (see the top of examples/cluster_bench.rs)"),
        }
        i += step;
    }
    a.mosquitto = match want_mosquitto {
        Some(false) => None,
        Some(true) => Some(mosquitto_bin.or_else(find_mosquitto).expect(
            "--mosquitto: no mosquitto on PATH or at /usr/sbin/mosquitto (--mosquitto-bin PATH)",
        )),
        None => mosquitto_bin.or_else(find_mosquitto),
    };
    assert!(
        !a.instances.is_empty() && a.instances.iter().all(|&k| (1..=16).contains(&k)),
        "--instances: between 1 and 16 each"
    );
    assert!(
        !a.qos.is_empty() && a.qos.iter().all(|&q| q <= 2),
        "--qos 0, 1 or 2"
    );
    assert!(a.publishers > 0 && a.subscribers > 0 && a.rate > 0 && a.secs > 0);
    assert!(a.inflight > 0 && a.inflight < 65_000, "--inflight 1..65000");
    assert!(
        a.payload >= MIN_PAYLOAD,
        "--payload must be at least {MIN_PAYLOAD} bytes (time, sequence, publisher, QoS)"
    );
    a
}

// ---------------------------------------------------------------------------------------------
// Child processes: killed and reaped on drop, and on SIGINT/SIGTERM.

/// Pids of the children alive now, and the temp dirs, for the signal handler.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc, String> {
        // Hold the lock across the spawn so the signal handler never misses a child.
        let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        children.push(child.id());
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.child.kill();
        let _ = self.child.wait();
        children.retain(|&p| p != self.child.id());
    }
}

/// On SIGINT or SIGTERM: kill every child still registered (by pid), then exit.
fn install_signal_handler() {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        let children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        // Newest first: the brokers before the Redis they use.
        for pid in children.iter().rev() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for dir in TEMP_DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!(
            "cluster_bench: interrupted; killed {} child processes",
            children.len()
        );
        std::process::exit(130);
    });
}

/// A directory removed on drop (declared after the processes that use it).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vigil-cluster-bench-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TEMP_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.clone());
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        TEMP_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d != &self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Busy time of the whole machine (all cores), in clock ticks: user, nice, system, irq,
/// softirq and steal from /proc/stat.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum())
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Brokers.

struct Redis {
    proc: Proc,
    port: u16,
}

fn start_redis(args: &Args, dir: &Path) -> Result<Redis, String> {
    let port = free_port();
    let mut cmd = Command::new(&args.redis_server);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", "redis.log"]);
    if args.aof {
        cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut proc = Proc::spawn("redis-server", &mut cmd)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"PING\r\n")?;
            let mut b = [0u8; 7];
            s.read_exact(&mut b)?;
            Ok(b == *b"+PONG\r\n")
        });
        if matches!(pong, Ok(true)) {
            return Ok(Redis { proc, port });
        }
        if !proc.alive() || Instant::now() > deadline {
            return Err(format!(
                "redis-server did not answer PING on port {port}; log: {}",
                std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Instance {
    proc: Proc,
    mqtt: SocketAddr,
    http: Option<SocketAddr>,
}

/// Sets `key = value` in `[section]` of a broker.toml text (`vigil::config::set_value`).
fn set(config: &str, section: &str, key: &str, value: &str) -> String {
    vigil::config::set_value(config, section, key, value)
}

fn start_vigil(args: &Args, dir: &Path, i: usize, redis: Option<u16>) -> Result<Instance, String> {
    let out = Command::new(&args.vigil)
        .arg("print-config")
        .output()
        .map_err(|e| format!("cannot run {} ({e})", args.vigil))?;
    let mut config = String::from_utf8(out.stdout).map_err(|_| "config text".to_string())?;
    config = set(&config, "limits", "max_connections", "100000");
    config = set(&config, "limits", "max_connections_per_ip", "100000");
    if !args.analytics {
        config = set(&config, "analytics", "enabled", "false");
    }
    if let Some(port) = redis {
        config = set(
            &config,
            "redis",
            "url",
            &format!("\"redis://127.0.0.1:{port}/0\""),
        );
        config = set(&config, "redis", "instance_id", &format!("\"bench-{i}\""));
    }
    let path = dir.join(format!("vigil-{i}.toml"));
    std::fs::write(&path, config).map_err(|e| format!("write config: {e}"))?;
    let name = format!("vigil-{i}");
    let mut cmd = Command::new(&args.vigil);
    cmd.arg("--config")
        .arg(&path)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        // VIGIL_BENCH_LOG overrides, e.g. "info,rumqttd=warn" to see the core's warnings.
        .env(
            "RUST_LOG",
            std::env::var("VIGIL_BENCH_LOG").unwrap_or_else(|_| "info,rumqttd=off".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut proc = Proc::spawn(&name, &mut cmd)?;
    let stderr = proc.child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut started = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !started {
                started = line.contains("vigil listening");
                let _ = tx.send(line);
            } else if line.contains("WARN") || line.contains("ERROR") {
                // Keep draining so vigil never blocks on a full pipe; show what matters.
                eprintln!("{name}: {line}");
            }
        }
    });
    let field = |line: &str, key: &str| -> Option<SocketAddr> {
        let key = format!("{key}=");
        let start = line.find(&key)? + key.len();
        line[start..].split_whitespace().next()?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = String::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| format!("vigil-{i} did not start; log:\n{log}"))?;
        log.push_str(&line);
        log.push('\n');
        if line.contains("vigil listening") {
            let mqtt = field(&line, "mqtt").ok_or("no mqtt address in the log")?;
            let http = field(&line, "http");
            return Ok(Instance { proc, mqtt, http });
        }
    }
}

fn start_mosquitto(bin: &str, dir: &Path) -> Result<Instance, String> {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n\
             max_inflight_messages 100\npersistence false\n"
        ),
    )
    .map_err(|e| format!("write mosquitto.conf: {e}"))?;
    let log = std::fs::File::create(dir.join("mosquitto.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut proc = Proc::spawn("mosquitto", &mut cmd)?;
    let mqtt: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(mqtt).is_err() {
        if !proc.alive() || Instant::now() > deadline {
            return Err(format!(
                "mosquitto did not start; log: {}",
                std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Instance {
        proc,
        mqtt,
        http: None,
    })
}

/// The text of vigil's `/metrics`.
fn metrics_page(http: SocketAddr) -> Option<String> {
    let mut s = std::net::TcpStream::connect(http).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    Some(page)
}

fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The cluster counters of one instance, in one line.
fn cluster_counters(http: SocketAddr) -> String {
    let Some(page) = metrics_page(http) else {
        return "metrics unavailable".into();
    };
    let m = |n: &str| metric(&page, n).map_or("?".to_string(), |v| v.to_string());
    format!(
        "exported={} imported={} outbox={} dropped_qos0={} duplicates_skipped={} redis_errors={} edge_dropped_too_large={}",
        m("vigil_cluster_messages_total{direction=\"exported\"}"),
        m("vigil_cluster_messages_total{direction=\"imported\"}"),
        m("vigil_cluster_outbox_messages"),
        m("vigil_cluster_dropped_total{reason=\"outbox_full_qos0\"}"),
        m("vigil_cluster_duplicates_skipped_total"),
        m("vigil_cluster_redis_errors_total"),
        m("vigil_dropped_total{reason=\"too_large_for_client\"}"),
    )
}

/// Waits until every instance reports Redis up (both cluster tasks connected).
fn wait_redis_up(instances: &[Instance]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, inst) in instances.iter().enumerate() {
        let http = inst.http.ok_or("no http address")?;
        loop {
            let up = metrics_page(http).and_then(|p| metric(&p, "vigil_cluster_redis_up"));
            if up == Some(1) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "vigil-{} never reported vigil_cluster_redis_up 1",
                    i + 1
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// State shared by the clients of one run; times are ns since `base`.
struct Shared {
    base: Instant,
    window_start: AtomicU64,
    window_end: AtomicU64,
    stop: AtomicBool,
    ready: AtomicUsize,
    /// Unique deliveries (not probes), for the drain.
    unique: AtomicU64,
    /// Probes seen, one bit per instance, per subscriber.
    probes: Vec<AtomicU64>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn tokio_at(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.base + Duration::from_nanos(ns))
    }
}

fn put_connect(out: &mut BytesMut, client_id: &str) {
    out.put_u8(mqtt::CONNECT << 4);
    mqtt::put_varint(out, 10 + 2 + client_id.len());
    out.put_u16(4);
    out.put_slice(b"MQTT");
    out.put_u8(4);
    out.put_u8(0x02); // clean session
    out.put_u16(0); // keep-alive off
    out.put_u16(client_id.len() as u16);
    out.put_slice(client_id.as_bytes());
}

/// TCP connect, CONNECT, CONNACK accepted.
async fn mqtt_connect(addr: SocketAddr, client_id: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{client_id}: connect {addr}: {e}"))?;
    s.set_nodelay(true).ok();
    let mut out = BytesMut::new();
    put_connect(&mut out, client_id);
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
        .await
        .map_err(|_| format!("{client_id}: no CONNACK in 10 s"))?
        .map_err(|e| format!("{client_id}: CONNACK: {e}"))?;
    if ack[0] != 0x20 || ack[3] != 0 {
        return Err(format!("{client_id}: refused, CONNACK {ack:?}"));
    }
    Ok(s)
}

fn fill_payload(payload: &mut [u8], ts: u64, seq: u64, publisher: u32, qos: u8) {
    payload[..8].copy_from_slice(&ts.to_le_bytes());
    payload[8..16].copy_from_slice(&seq.to_le_bytes());
    payload[16..20].copy_from_slice(&publisher.to_le_bytes());
    payload[20] = qos;
}

struct SubSpec {
    idx: usize,
    instance: usize,
    instances: usize,
    addr: SocketAddr,
    qos: u8,
    publishers: usize,
}

#[derive(Default)]
struct SubStats {
    /// Latencies (us) of messages sent in the window: [local, cross].
    lat: [Vec<u32>; 2],
    /// Unique deliveries received in the window: [local, cross].
    in_window: [u64; 2],
    /// Unique deliveries and duplicates by the publisher's QoS.
    unique: [u64; 3],
    dups: [u64; 3],
    foreign: u64,
    /// Highest QoS the broker granted.
    granted: u8,
}

async fn subscriber(spec: SubSpec, shared: Arc<Shared>) -> Result<SubStats, String> {
    let id = format!("cb-sub-{}-{}", spec.idx, std::process::id());
    let stream = mqtt_connect(spec.addr, &id).await?;
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::with_capacity(8 * 1024);
    mqtt::put_core_subscribe(&mut out, 1, &[(Bytes::from_static(b"bench/#"), spec.qos)]);
    wr.write_all(&out).await.map_err(|e| format!("{id}: {e}"))?;
    let mut st = SubStats::default();
    // seen[publisher] is a bitset of sequence numbers.
    let mut seen: Vec<Vec<u64>> = vec![Vec::new(); spec.publishers];
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while !shared.stop.load(Relaxed) {
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        match tokio::time::timeout(Duration::from_millis(200), rd.read_buf(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) => return Err(format!("{id}: the broker closed the connection")),
            Ok(Err(e)) => return Err(format!("{id}: {e}")),
            Ok(Ok(_)) => {}
        }
        let now = shared.now();
        let (ws, we) = (
            shared.window_start.load(Relaxed),
            shared.window_end.load(Relaxed),
        );
        out.clear();
        while let Some(frame) =
            mqtt::read_frame(&mut buf, 1 << 24).map_err(|e| format!("{id}: {e}"))?
        {
            match frame.kind() {
                mqtt::SUBACK => {
                    let code = frame.body.get(2).copied().unwrap_or(0x80);
                    if code > 2 {
                        return Err(format!("{id}: SUBACK refused {TOPIC_FILTER} ({code:#x})"));
                    }
                    st.granted = code;
                    shared.ready.fetch_add(1, Relaxed);
                }
                mqtt::PUBLISH => {
                    let p = mqtt::parse_core_publish(&frame).map_err(|e| format!("{id}: {e}"))?;
                    match p.qos {
                        1 => mqtt::put_ack(&mut out, mqtt::PUBACK, p.pkid),
                        2 => mqtt::put_ack(&mut out, mqtt::PUBREC, p.pkid),
                        _ => {}
                    }
                    let b = &p.payload[..];
                    if b.len() < HEADER {
                        st.foreign += 1;
                        continue;
                    }
                    let ts = u64::from_le_bytes(b[..8].try_into().unwrap());
                    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
                    let publisher = u32::from_le_bytes(b[16..20].try_into().unwrap());
                    let qos = (b[20] as usize).min(2);
                    if publisher == PROBE {
                        shared.probes[spec.idx].fetch_or(1 << (seq & 63), Relaxed);
                        continue;
                    }
                    let Some(bits) = seen.get_mut(publisher as usize) else {
                        st.foreign += 1;
                        continue;
                    };
                    let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                    if bits.len() <= word {
                        bits.resize(word + 1024, 0);
                    }
                    if bits[word] & bit != 0 {
                        st.dups[qos] += 1;
                        continue;
                    }
                    bits[word] |= bit;
                    st.unique[qos] += 1;
                    shared.unique.fetch_add(1, Relaxed);
                    let cross = usize::from(publisher as usize % spec.instances != spec.instance);
                    if now >= ws && now < we {
                        st.in_window[cross] += 1;
                    }
                    if ts >= ws && ts < we {
                        let us = now.saturating_sub(ts) / 1000;
                        st.lat[cross].push(us.min(u32::MAX as u64) as u32);
                    }
                }
                mqtt::PUBREL => {
                    if let Ok((pkid, _)) = mqtt::parse_ack(&frame) {
                        mqtt::put_ack(&mut out, mqtt::PUBCOMP, pkid);
                    }
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await.map_err(|e| format!("{id}: {e}"))?;
        }
    }
    let _ = wr.write_all(&[mqtt::DISCONNECT << 4, 0]).await;
    Ok(st)
}

struct PubSpec {
    p: usize,
    addr: SocketAddr,
    qos: u8,
    per_sec: f64,
    /// Offset of the first publish, as a fraction of the period.
    phase: f64,
    size: usize,
    window: usize,
    start: u64,
    until: u64,
}

#[derive(Default)]
struct PubStats {
    qos: u8,
    sent: u64,
    sent_in_window: u64,
    acked: u64,
    /// Largest delay of a publish behind its schedule (window full or client busy), ns.
    max_lag: u64,
    error: Option<String>,
}

async fn publisher(spec: PubSpec, shared: Arc<Shared>) -> PubStats {
    let mut st = PubStats {
        qos: spec.qos,
        ..PubStats::default()
    };
    let id = format!("cb-pub-{}-{}", spec.p, std::process::id());
    let stream = match mqtt_connect(spec.addr, &id).await {
        Ok(s) => s,
        Err(e) => {
            st.error = Some(e);
            return st;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let topic = format!("bench/{}/t", spec.p);
    let period_ns = 1e9 / spec.per_sec;
    let due = |seq: u64| spec.start + ((seq as f64 + spec.phase) * period_ns) as u64;
    let (ws, we) = (
        shared.window_start.load(Relaxed),
        shared.window_end.load(Relaxed),
    );
    let mut seq = 0u64;
    let mut payload = vec![0u8; spec.size];
    // Per packet id: 0 free, 1 awaiting PUBACK/PUBREC, 2 awaiting PUBCOMP.
    let mut state = vec![0u8; 65_536];
    let mut outstanding = 0usize;
    let mut next_pkid = 0u16;
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let give_up = shared.tokio_at(spec.until) + Duration::from_secs(30);
    loop {
        let sending = due(seq) < spec.until;
        if !sending && outstanding == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(shared.tokio_at(due(seq))), if sending && outstanding < spec.window => {
                let now = shared.now();
                out.clear();
                // Everything due now (catching up if late), within the window.
                while due(seq) <= now && due(seq) < spec.until && outstanding < spec.window {
                    st.max_lag = st.max_lag.max(now - due(seq));
                    let pkid = if spec.qos > 0 {
                        loop {
                            next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                            if state[next_pkid as usize] == 0 {
                                break;
                            }
                        }
                        state[next_pkid as usize] = 1;
                        outstanding += 1;
                        next_pkid
                    } else {
                        0
                    };
                    let ts = shared.now();
                    fill_payload(&mut payload, ts, seq, spec.p as u32, spec.qos);
                    mqtt::put_publish(&mut out, Version::V311, false, spec.qos, false, topic.as_bytes(), pkid, &[], &[&payload]);
                    st.sent += 1;
                    if ts >= ws && ts < we {
                        st.sent_in_window += 1;
                    }
                    seq += 1;
                }
                if let Err(e) = wr.write_all(&out).await {
                    st.error = Some(format!("{id}: {e}"));
                    break;
                }
            }
            r = rd.read_buf(&mut buf) => {
                match r {
                    Ok(0) => {
                        st.error = Some(format!("{id}: the broker closed the connection"));
                        break;
                    }
                    Err(e) => {
                        st.error = Some(format!("{id}: {e}"));
                        break;
                    }
                    Ok(_) => {}
                }
                out.clear();
                while let Ok(Some(frame)) = mqtt::read_frame(&mut buf, 1 << 20) {
                    let Ok((pkid, _)) = mqtt::parse_ack(&frame) else { continue };
                    let slot = &mut state[pkid as usize];
                    match (frame.kind(), *slot) {
                        (mqtt::PUBACK, 1) | (mqtt::PUBCOMP, 2) => {
                            *slot = 0;
                            outstanding -= 1;
                            st.acked += 1;
                        }
                        (mqtt::PUBREC, 1) => {
                            *slot = 2;
                            mqtt::put_ack(&mut out, mqtt::PUBREL, pkid);
                        }
                        _ => {}
                    }
                }
                if !out.is_empty() {
                    if let Err(e) = wr.write_all(&out).await {
                        st.error = Some(format!("{id}: {e}"));
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(give_up) => {
                st.error = Some(format!("{id}: {outstanding} acknowledgements missing 30 s after the end"));
                break;
            }
        }
    }
    let _ = wr.write_all(&[mqtt::DISCONNECT << 4, 0]).await;
    st
}

/// Publishes one QoS 0 probe per instance every 250 ms until every subscriber saw them all.
async fn probe(addrs: &[SocketAddr], shared: &Shared) -> Result<Duration, String> {
    let start = Instant::now();
    let mut conns = Vec::new();
    for (k, addr) in addrs.iter().enumerate() {
        let s = mqtt_connect(*addr, &format!("cb-probe-{k}-{}", std::process::id())).await?;
        conns.push(s);
    }
    let all = (1u64 << addrs.len()) - 1;
    let mut payload = vec![0u8; MIN_PAYLOAD];
    let mut out = BytesMut::new();
    loop {
        for (k, s) in conns.iter_mut().enumerate() {
            out.clear();
            fill_payload(&mut payload, shared.now(), k as u64, PROBE, 0);
            let topic = format!("bench/probe{k}/t");
            mqtt::put_publish(
                &mut out,
                Version::V311,
                false,
                0,
                false,
                topic.as_bytes(),
                0,
                &[],
                &[&payload],
            );
            s.write_all(&out).await.map_err(|e| format!("probe: {e}"))?;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if shared.probes.iter().all(|m| m.load(Relaxed) == all) {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let masks: Vec<u64> = shared.probes.iter().map(|m| m.load(Relaxed)).collect();
            return Err(format!(
                "probes not delivered everywhere in 30 s (seen masks {masks:?})"
            ));
        }
    }
    for mut s in conns {
        let _ = s.write_all(&[mqtt::DISCONNECT << 4, 0]).await;
    }
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------------------
// One run.

#[derive(Clone, Copy, Default)]
struct Lat {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Lat {
    fn of(mut v: Vec<u32>) -> Lat {
        if v.is_empty() {
            return Lat {
                n: 0,
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
        Lat {
            n: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    fn cell(&self) -> String {
        if self.n == 0 {
            "–".into()
        } else {
            format!("{:.2} / {:.2} / {:.1}", self.p50, self.p99, self.max)
        }
    }
}

struct Outcome {
    label: String,
    k: usize,
    subs: usize,
    published: u64,
    published_window: u64,
    acked: u64,
    max_lag_ms: f64,
    /// Per QoS in use: (qos, expected deliveries, unique deliveries, duplicates).
    per_qos: Vec<(u8, u64, u64, u64)>,
    delivered_window: [u64; 2],
    lat: [Lat; 2],
    granted: u8,
    foreign: u64,
    probe_time: Duration,
    drain_time: Duration,
    errors: Vec<String>,
    secs: f64,
}

impl Outcome {
    fn published_per_sec(&self) -> f64 {
        self.published_window as f64 / self.secs
    }

    fn deliveries_per_sec(&self) -> f64 {
        (self.delivered_window[0] + self.delivered_window[1]) as f64 / self.secs
    }

    fn dups(&self) -> u64 {
        self.per_qos.iter().map(|q| q.3).sum()
    }

    /// p99 of all deliveries' latencies is not kept; the worse of local and cross is the
    /// figure compared with the peer (for K = 1 every delivery is local).
    fn p99(&self) -> f64 {
        match (self.lat[0].n, self.lat[1].n) {
            (0, _) => self.lat[1].p99,
            (_, 0) => self.lat[0].p99,
            _ => self.lat[0].p99.max(self.lat[1].p99),
        }
    }
}

fn workload(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    label: &str,
    addrs: &[SocketAddr],
    procs: &[(String, u32)],
) -> Result<(Outcome, Vec<(String, f64)>), String> {
    let k = addrs.len();
    let nsubs = args.subscribers * k;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        window_start: AtomicU64::new(u64::MAX),
        window_end: AtomicU64::new(u64::MAX),
        stop: AtomicBool::new(false),
        ready: AtomicUsize::new(0),
        unique: AtomicU64::new(0),
        probes: (0..nsubs).map(|_| AtomicU64::new(0)).collect(),
    });
    let sub_qos = *args.qos.iter().max().unwrap_or(&1);
    let subs: Vec<_> = (0..nsubs)
        .map(|idx| {
            let spec = SubSpec {
                idx,
                instance: idx % k,
                instances: k,
                addr: addrs[idx % k],
                qos: sub_qos,
                publishers: args.publishers,
            };
            rt.spawn(subscriber(spec, shared.clone()))
        })
        .collect();
    let abort_subs = |subs: Vec<tokio::task::JoinHandle<Result<SubStats, String>>>| {
        shared.stop.store(true, Relaxed);
        for s in subs {
            let _ = rt.block_on(s);
        }
    };
    let setup = Instant::now();
    while shared.ready.load(Relaxed) < nsubs {
        if let Some(i) = subs.iter().position(|s| s.is_finished()) {
            shared.stop.store(true, Relaxed);
            let err = match rt.block_on(subs.into_iter().nth(i).unwrap()) {
                Ok(Err(e)) => e,
                _ => "a subscriber ended during setup".into(),
            };
            return Err(err);
        }
        if setup.elapsed() > Duration::from_secs(30) {
            abort_subs(subs);
            return Err("subscribers not ready after 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let probe_time = match rt.block_on(probe(addrs, &shared)) {
        Ok(t) => t,
        Err(e) => {
            abort_subs(subs);
            return Err(e);
        }
    };

    // Schedule: publishers start at t0; the window is [t0 + warm-up, t0 + warm-up + secs).
    let t0 = shared.now() + 300_000_000;
    let ws = t0 + args.warmup_secs * 1_000_000_000;
    let we = ws + args.secs * 1_000_000_000;
    shared.window_start.store(ws, Relaxed);
    shared.window_end.store(we, Relaxed);
    let per_pub = args.rate as f64 / args.publishers as f64;
    let pubs: Vec<_> = (0..args.publishers)
        .map(|p| {
            let spec = PubSpec {
                p,
                addr: addrs[p % k],
                qos: args.qos[p % args.qos.len()],
                per_sec: per_pub,
                phase: p as f64 / args.publishers as f64,
                size: args.payload,
                window: args.inflight,
                start: t0,
                until: we,
            };
            rt.spawn(publisher(spec, shared.clone()))
        })
        .collect();
    let sleep_until = |ns: u64| {
        let now = shared.now();
        if ns > now {
            std::thread::sleep(Duration::from_nanos(ns - now));
        }
    };
    let self_pid = std::process::id();
    let sample = || -> Vec<Option<u64>> {
        procs
            .iter()
            .map(|(_, pid)| cpu_ticks(*pid))
            .chain([cpu_ticks(self_pid)])
            .collect()
    };
    sleep_until(ws);
    let (cpu0, machine0) = (sample(), machine_busy_ticks());
    sleep_until(we);
    let (cpu1, machine1) = (sample(), machine_busy_ticks());
    let hz = clock_ticks_per_sec();
    let secs = args.secs as f64;
    let mut cpu: Vec<(String, f64)> = procs
        .iter()
        .map(|(n, _)| n.clone())
        .chain(["bench client".to_string()])
        .zip(cpu0.iter().zip(&cpu1))
        .map(|(n, (a, b))| match (a, b) {
            (Some(a), Some(b)) => (n, (b - a) as f64 / hz / secs * 100.0),
            _ => (n, f64::NAN),
        })
        .collect();
    // Everything else running on the machine meanwhile (another build, tests...).
    let ours: f64 = cpu.iter().map(|(_, c)| c).filter(|c| c.is_finite()).sum();
    let machine = match (machine0, machine1) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / hz / secs * 100.0,
        _ => f64::NAN,
    };
    cpu.push(("other processes".into(), (machine - ours).max(0.0)));

    let mut errors = Vec::new();
    let mut published_qos = [0u64; 3];
    let (mut published, mut published_window, mut acked, mut max_lag) = (0, 0, 0, 0);
    for p in pubs {
        let st = rt.block_on(p).map_err(|e| format!("publisher task: {e}"))?;
        published += st.sent;
        published_qos[st.qos as usize] += st.sent;
        published_window += st.sent_in_window;
        acked += st.acked;
        max_lag = max_lag.max(st.max_lag);
        errors.extend(st.error);
    }
    // Drain: until everything arrived or nothing arrived for 5 s (at most 60 s).
    let expected_total = published * nsubs as u64;
    let drain = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    loop {
        let got = shared.unique.load(Relaxed);
        if got >= expected_total
            || last_change.elapsed() > Duration::from_secs(5)
            || drain.elapsed() > Duration::from_secs(60)
        {
            break;
        }
        if got != last {
            (last, last_change) = (got, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drain_time = drain.elapsed();
    shared.stop.store(true, Relaxed);
    let mut lat: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    let (mut unique, mut dups) = ([0u64; 3], [0u64; 3]);
    let (mut delivered_window, mut foreign, mut granted) = ([0u64; 2], 0, 0);
    for s in subs {
        match rt.block_on(s) {
            Ok(Ok(mut st)) => {
                for c in 0..2 {
                    lat[c].append(&mut st.lat[c]);
                    delivered_window[c] += st.in_window[c];
                }
                for q in 0..3 {
                    unique[q] += st.unique[q];
                    dups[q] += st.dups[q];
                }
                foreign += st.foreign;
                granted = granted.max(st.granted);
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("subscriber task: {e}")),
        }
    }
    let mut qos_used: Vec<u8> = args.qos.clone();
    qos_used.sort_unstable();
    qos_used.dedup();
    let per_qos = qos_used
        .iter()
        .map(|&q| {
            let q = q as usize;
            (q as u8, published_qos[q] * nsubs as u64, unique[q], dups[q])
        })
        .collect();
    let [local, cross] = lat;
    let outcome = Outcome {
        label: label.to_string(),
        k,
        subs: nsubs,
        published,
        published_window,
        acked,
        max_lag_ms: max_lag as f64 / 1e6,
        per_qos,
        delivered_window,
        lat: [Lat::of(local), Lat::of(cross)],
        granted,
        foreign,
        probe_time,
        drain_time,
        errors,
        secs,
    };
    Ok((outcome, cpu))
}

struct Row {
    outcome: Outcome,
    rss: Vec<(String, u64)>,
    cpu: Vec<(String, f64)>,
}

impl Row {
    fn markdown(&self) -> String {
        let o = &self.outcome;
        let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
        let brokers: Vec<String> = self
            .rss
            .iter()
            .filter(|(n, _)| n != "redis-server")
            .map(|(_, k)| mib(*k))
            .collect();
        let redis = self
            .rss
            .iter()
            .find(|(n, _)| n == "redis-server")
            .map_or("–".to_string(), |(_, k)| mib(*k));
        let cpu: Vec<String> = self.cpu.iter().map(|(_, c)| format!("{c:.0}")).collect();
        let lost: Vec<String> = o
            .per_qos
            .iter()
            .map(|(q, e, u, _)| format!("{} (QoS {q})", e.saturating_sub(*u)))
            .collect();
        format!(
            "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            o.label,
            o.k,
            o.subs,
            o.published_per_sec(),
            o.deliveries_per_sec(),
            lost.join(", "),
            o.dups(),
            o.lat[0].cell(),
            o.lat[1].cell(),
            brokers.join(" / "),
            redis,
            cpu.join(" / "),
        )
    }
}

const TABLE_HEADER: &str = "| broker | instances | subscribers (fan-out) | published/s | deliveries/s | lost | duplicates | local p50 / p99 / max ms | cross-instance p50 / p99 / max ms | broker RSS MiB (each) | redis RSS MiB | CPU % of one core (each broker, [redis,] client, other processes) |\n|---|---:|---:|---:|---:|---|---:|---|---|---|---:|---|";

fn print_outcome(row: &Row) {
    let o = &row.outcome;
    println!(
        "published {} messages ({} acknowledged), {} in the {:.0} s window = {:.0} msg/s; publishers at most {:.1} ms behind schedule",
        o.published,
        o.acked,
        o.published_window,
        o.secs,
        o.published_per_sec(),
        o.max_lag_ms
    );
    println!(
        "deliveries in the window: {:.0}/s ({} local + {} cross-instance, unique), subscribers granted QoS {}; probe round {} ms, drain after the last acknowledgement {} ms",
        o.deliveries_per_sec(),
        o.delivered_window[0],
        o.delivered_window[1],
        o.granted,
        o.probe_time.as_millis(),
        o.drain_time.as_millis()
    );
    for (q, expected, unique, dups) in &o.per_qos {
        println!(
            "QoS {q}: expected {expected} deliveries (whole run), received {unique} unique, lost {}, duplicates {dups}",
            expected.saturating_sub(*unique)
        );
    }
    if o.foreign > 0 {
        println!("foreign payloads (not from this bench): {}", o.foreign);
    }
    for (name, l) in ["local", "cross-instance"].iter().zip(&o.lat) {
        if l.n > 0 {
            println!(
                "latency {name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} deliveries of messages sent in the window)",
                l.p50, l.p99, l.max, l.n
            );
        }
    }
    let rss: Vec<String> = row
        .rss
        .iter()
        .map(|(n, k)| format!("{n} {:.1} MiB", *k as f64 / 1024.0))
        .collect();
    println!("RSS at the end: {}", rss.join(", "));
    let cpu: Vec<String> = row
        .cpu
        .iter()
        .map(|(n, c)| format!("{n} {c:.0}%"))
        .collect();
    let total: f64 = row
        .cpu
        .iter()
        .map(|(_, c)| c)
        .filter(|c| c.is_finite())
        .sum();
    println!(
        "CPU in the window (% of one core): {}; machine total {total:.0}% of {}%",
        cpu.join(", "),
        cores() * 100
    );
    for e in o.errors.iter().take(10) {
        println!("ERROR: {e}");
    }
    if o.errors.len() > 10 {
        println!("... {} errors in all", o.errors.len());
    }
    println!("row: {}", row.markdown());
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

enum Target<'a> {
    /// K vigil instances sharing one Redis.
    Cluster(usize),
    /// One vigil without `[redis]`.
    Standalone,
    Mosquitto(&'a str),
}

fn run(rt: &tokio::runtime::Runtime, args: &Args, target: Target<'_>) -> Result<Row, String> {
    let dir = TempDir::new("run");
    let (label, title) =
        match &target {
            Target::Cluster(k) => {
                (
                    "vigil".to_string(),
                    format!(
                "vigil, {k} instance(s) sharing one redis-server (appendonly {}), analytics {}",
                if args.aof { "yes, appendfsync everysec" } else { "no" },
                if args.analytics { "on" } else { "off" }
            ),
                )
            }
            Target::Standalone => (
                "vigil (no redis)".to_string(),
                format!(
                    "vigil, 1 instance without [redis], analytics {}",
                    if args.analytics { "on" } else { "off" }
                ),
            ),
            Target::Mosquitto(_) => (
                "mosquitto".to_string(),
                "mosquitto, 1 instance (max_inflight_messages 100, max_queued_messages 100000)"
                    .to_string(),
            ),
        };
    println!();
    println!("=== {title} ===");
    println!("load average before the run: {}", load_average());
    // On an early return, locals drop in reverse order: instances, redis, then the directory.
    let mut redis: Option<Redis> = None;
    let mut instances: Vec<Instance> = Vec::new();
    match target {
        Target::Cluster(k) => {
            let r = start_redis(args, &dir.0)?;
            for i in 1..=k {
                instances.push(start_vigil(args, &dir.0, i, Some(r.port))?);
            }
            redis = Some(r);
            wait_redis_up(&instances)?;
        }
        Target::Standalone => instances.push(start_vigil(args, &dir.0, 1, None)?),
        Target::Mosquitto(bin) => instances.push(start_mosquitto(bin, &dir.0)?),
    }
    let k = instances.len();
    let mut procs: Vec<(String, u32)> = instances
        .iter()
        .map(|i| (i.proc.name.clone(), i.proc.pid()))
        .collect();
    if let Some(r) = &redis {
        procs.push(("redis-server".into(), r.proc.pid()));
    }
    let addrs: Vec<SocketAddr> = instances.iter().map(|i| i.mqtt).collect();
    println!(
        "{} publishers (publisher p on instance p % {k}), {} subscribers ({} per instance, fan-out {}), QoS {:?}, {} B payloads, {} msg/s in all for {} s warm-up + {} s measured",
        args.publishers,
        args.subscribers * k,
        args.subscribers,
        args.subscribers * k,
        args.qos,
        args.payload,
        args.rate,
        args.warmup_secs,
        args.secs
    );
    let (outcome, cpu) = workload(rt, args, &label, &addrs, &procs)?;
    let rss = procs
        .iter()
        .map(|(n, pid)| (n.clone(), rss_kib(*pid).unwrap_or(0)))
        .collect();
    let row = Row { outcome, rss, cpu };
    print_outcome(&row);
    for (i, inst) in instances.iter_mut().enumerate() {
        if !inst.proc.alive() {
            println!("ERROR: {} exited during the run", inst.proc.name);
        }
        if redis.is_some() {
            if let Some(http) = inst.http {
                println!(
                    "vigil-{} cluster counters: {}",
                    i + 1,
                    cluster_counters(http)
                );
            }
        }
    }
    if let Some(r) = &redis {
        println!("redis port {}: {}", r.port, redis_info(r.port));
    }
    drop(instances);
    drop(redis);
    drop(dir);
    Ok(row)
}

/// A few facts from Redis: stream length and used memory.
fn redis_info(port: u16) -> String {
    let query = |cmd: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        s.write_all(cmd.as_bytes()).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut text = String::new();
        // Enough for the small replies asked for here.
        for _ in 0..4 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
            if text.ends_with("\r\n") && (text.starts_with(':') || text.len() > 200) {
                break;
            }
        }
        Some(text)
    };
    let xlen = query("XLEN {vigil}:bus\r\n")
        .and_then(|t| t.trim().strip_prefix(':').map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let mem = query("INFO memory\r\n")
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("used_memory_human:").map(str::to_string))
        })
        .unwrap_or_else(|| "?".into());
    format!("stream {{vigil}}:bus length {xlen}, used_memory {mem}")
}

fn main() {
    let args = parse_args();
    if !Path::new(&args.vigil).is_file() {
        eprintln!(
            "cluster_bench: no vigil binary at {}: run `cargo build --release` first (or pass --vigil PATH)",
            args.vigil
        );
        std::process::exit(2);
    }
    if Command::new(&args.redis_server)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "cluster_bench: cannot run {} (install redis-server or pass --redis-server PATH)",
            args.redis_server
        );
        std::process::exit(2);
    }
    install_signal_handler();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "cluster_bench: vigil {} | redis {} | mosquitto {} | analytics {}",
        args.vigil,
        args.redis_server,
        args.mosquitto.as_deref().unwrap_or("off"),
        if args.analytics {
            "on"
        } else {
            "off (routing alone)"
        }
    );
    println!(
        "NOTE: this machine has {} cores and everything shares them: this client, redis-server, every vigil instance and mosquitto. Figures are noisy; compare ratios within one run.",
        cores()
    );
    println!(
        "workload: {} publishers, {} subscribers per instance on bench/#, {} msg/s in all, QoS {:?}, {} B, inflight {}, {} s warm-up + {} s; instances {:?}; redis {}",
        args.publishers,
        args.subscribers,
        args.rate,
        args.qos,
        args.payload,
        args.inflight,
        args.warmup_secs,
        args.secs,
        args.instances,
        if args.aof { "--appendonly yes --appendfsync everysec" } else { "--save '' --appendonly no" }
    );
    // vigil K=1 first, then its peers right after it, then the other K.
    let mut targets: Vec<Target<'_>> = Vec::new();
    let mut peers_added = false;
    for &k in &args.instances {
        targets.push(Target::Cluster(k));
        if k == 1 && !peers_added {
            peers_added = true;
            if let Some(bin) = &args.mosquitto {
                targets.push(Target::Mosquitto(bin));
            }
            if args.standalone {
                targets.push(Target::Standalone);
            }
        }
    }
    if !peers_added {
        if let Some(bin) = &args.mosquitto {
            targets.push(Target::Mosquitto(bin));
        }
        if args.standalone {
            targets.push(Target::Standalone);
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut failures = 0;
    for (n, target) in targets.into_iter().enumerate() {
        if n > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match run(&rt, &args, target) {
            Ok(row) => rows.push(row),
            Err(e) => {
                failures += 1;
                println!("ERROR: run failed: {e}");
            }
        }
    }

    println!();
    println!(
        "=== summary ({} cores shared by all processes; {} msg/s, QoS {:?}, {} B, {} s measured after {} s warm-up; analytics {}; redis appendonly {}) ===",
        cores(),
        args.rate,
        args.qos,
        args.payload,
        args.secs,
        args.warmup_secs,
        if args.analytics { "on" } else { "off" },
        if args.aof { "yes (everysec)" } else { "no" }
    );
    println!("{TABLE_HEADER}");
    for row in &rows {
        println!("{}", row.markdown());
    }
    let vigil1 = rows
        .iter()
        .find(|r| r.outcome.label == "vigil" && r.outcome.k == 1);
    let mosq = rows.iter().find(|r| r.outcome.label == "mosquitto");
    if let (Some(v), Some(m)) = (vigil1, mosq) {
        let (v, m) = (&v.outcome, &m.outcome);
        println!(
            "vigil K=1 vs mosquitto (same run): deliveries/s {:.0} vs {:.0} = {:.2}x; p99 {:.2} vs {:.2} ms = {:.2}x (vigil/mosquitto; below 1 is vigil faster for p99)",
            v.deliveries_per_sec(),
            m.deliveries_per_sec(),
            v.deliveries_per_sec() / m.deliveries_per_sec(),
            v.p99(),
            m.p99(),
            v.p99() / m.p99()
        );
    }
    if let Some(v1) = vigil1 {
        for r in rows
            .iter()
            .filter(|r| r.outcome.label == "vigil" && r.outcome.k > 1)
        {
            println!(
                "vigil K={} vs K=1: deliveries/s {:.2}x (ideal {}x: fan-out grows with K at the same publish rate)",
                r.outcome.k,
                r.outcome.deliveries_per_sec() / v1.outcome.deliveries_per_sec(),
                r.outcome.k
            );
        }
    }
    if failures > 0 {
        drop(rows);
        drop(rt);
        std::process::exit(1);
    }
}
