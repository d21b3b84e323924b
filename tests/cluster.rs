//! Scale-out over Redis, proven with real processes: a real `redis-server` on a free port,
//! three vigil instances, `mosquitto_pub`/`mosquitto_sub`, a JSON-bridge browser session and an
//! MQTT device (rumqttc). Traffic crosses instances once each, retained messages are seen
//! everywhere, and a Redis crash mid-stream loses no QoS 1/2 message and duplicates no QoS 2
//! one.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{http_get, publish, publish_lines, Sub, TempDir, Vigil};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// A real redis-server.

struct Redis {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    /// More `redis-server` arguments (cluster mode).
    extra: Vec<String>,
}

impl Redis {
    /// Starts redis-server on a free port with an append-only file fsynced on every write, so a
    /// SIGKILL loses nothing Redis acknowledged.
    fn start() -> Redis {
        let mut redis = Redis::not_started();
        redis.spawn();
        redis
    }

    /// A free port for a Redis that `spawn` starts later. Taken below the kernel's ephemeral
    /// range: a client that keeps connecting to a port nobody listens on (vigil retrying its
    /// Redis) can be handed that very port as its own source port and connect to itself
    /// (TCP self-connect), which then keeps redis-server from binding it.
    fn not_started() -> Redis {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        // Different for every call in this process and across processes running at once.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = now ^ u64::from(std::process::id()) << 20;
        let span = u64::from(low.saturating_sub(10_000).max(1));
        let port = (0..span)
            .map(|i| 10_000 + ((seed % span + call * 101 + i) % span) as u16)
            .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
            .expect("a free port below the ephemeral range");
        Redis {
            child: None,
            port,
            dir: TempDir::new(),
            extra: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir.0)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + T;
        while self.ping().as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command in RESP, the first line of the answer.
    fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        text.lines().next().map(str::to_string)
    }

    fn ping(&self) -> Option<String> {
        self.command(&["PING"])
    }

    /// SIGKILL: no shutdown, no final save.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An instance of a cluster sharing `redis`.
fn instance(redis: &Redis, name: &str) -> Vigil {
    let url = redis.url();
    let name = name.to_string();
    Vigil::start_with(move |c| {
        c.replacen("url = \"\"", &format!("url = {url:?}"), 1)
            .replacen("instance_id = \"\"", &format!("instance_id = {name:?}"), 1)
    })
}

fn metric(http: SocketAddr, name: &str) -> f64 {
    common::metric(&http_get(http, "/metrics"), name).unwrap_or_else(|| panic!("no metric {name}"))
}

fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ready_status(http: SocketAddr) -> String {
    let page = http_get(http, "/readyz");
    let body = page.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Counts by payload: how many times each arrived.
fn tally(payloads: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for p in payloads {
        *t.entry(p).or_insert(0) += 1;
    }
    t
}

// ---------------------------------------------------------------------------------------------

#[test]
fn three_instances_share_traffic_once_each_with_retained_and_no_loops() {
    let redis = Redis::start();
    let v1 = instance(&redis, "n1");
    let v2 = instance(&redis, "n2");
    let v3 = instance(&redis, "n3");
    for v in [&v1, &v2, &v3] {
        wait_until("redis connected", || ready_status(v.http) == "ready");
    }
    let rt = rt();
    rt.block_on(async {
        let mut browser = Browser::connect(v2.http, "ui-1", "plant/#", 2).await;
        let mut sub3 = tokio::task::block_in_place(|| {
            Sub::start(v3.port(), &["-t", "plant/#", "-q", "2", "-v"])
        });
        let mut sub1 = tokio::task::block_in_place(|| {
            Sub::start(v1.port(), &["-t", "plant/from-browser", "-q", "2"])
        });
        // A device on instance 1, at every QoS, and a retained message.
        tokio::task::block_in_place(|| {
            for qos in 0..3 {
                publish(
                    v1.port(),
                    &["-t", &format!("plant/line/{qos}"), "-m", &format!("m{qos}"), "-q", &qos.to_string()],
                );
            }
            publish(v1.port(), &["-t", "plant/state", "-m", "running", "-q", "1", "-r"]);
        });
        // The browser on instance 2 publishes too.
        browser
            .send(json!({"op": "publish", "topic": "plant/from-browser", "payload": "hi", "qos": 2, "id": 1}))
            .await;
        let got2 = browser
            .collect(Duration::from_millis(1500), Instant::now() + T)
            .await;
        let texts2: Vec<_> = got2.iter().map(|(t, q, p)| format!("{t}|{q}|{p}")).collect();
        for want in ["plant/line/0|0|m0", "plant/line/1|1|m1", "plant/line/2|2|m2", "plant/state|1|running", "plant/from-browser|2|hi"] {
            assert_eq!(
                texts2.iter().filter(|t| t.as_str() == want).count(),
                1,
                "browser on instance 2 must get {want} once: {texts2:?}"
            );
        }
        let got3 = tokio::task::block_in_place(|| sub3.drain(Duration::from_millis(1500)));
        let mut got3 = got3.clone();
        got3.sort();
        assert_eq!(
            got3,
            vec![
                "plant/from-browser|2|0|hi",
                "plant/line/0|0|0|m0",
                "plant/line/1|1|0|m1",
                "plant/line/2|2|0|m2",
                "plant/state|1|0|running",
            ],
            "mosquitto_sub on instance 3 gets each message once"
        );
        let got1 = tokio::task::block_in_place(|| sub1.drain(Duration::from_millis(500)));
        assert_eq!(got1, vec!["plant/from-browser|2|0|hi"], "browser -> instance 1");
    });
    // Retained: a new subscriber on any instance sees it.
    for v in [&v1, &v2, &v3] {
        let mut s = Sub::start(v.port(), &["-t", "plant/state", "-q", "1"]);
        assert_eq!(
            s.expect_messages(1, T),
            vec!["plant/state|1|1|running"],
            "retained message on {}",
            v.mqtt
        );
    }
    // A retained clear reaches every instance too.
    publish(v3.port(), &["-t", "plant/state", "-n", "-r", "-q", "1"]);
    std::thread::sleep(Duration::from_millis(500));
    for v in [&v1, &v2, &v3] {
        let mut s = Sub::start(v.port(), &["-t", "plant/state", "-q", "1"]);
        assert!(
            s.drain(Duration::from_millis(500)).is_empty(),
            "cleared on {}",
            v.mqtt
        );
    }
    // No loops: the stream holds each message once (5 published + 1 clear).
    let len = redis.command(&["XLEN", "{vigil}:bus"]).expect("XLEN");
    assert_eq!(len, ":6", "stream length");
    // A fourth instance started later sees nothing retained (cleared) and joins the traffic.
    let v4 = instance(&redis, "n4");
    wait_until("n4 ready", || ready_status(v4.http) == "ready");
    let mut s4 = Sub::start(v4.port(), &["-t", "plant/#", "-q", "1"]);
    publish(v2.port(), &["-t", "plant/late", "-m", "x", "-q", "1"]);
    assert_eq!(s4.expect_messages(1, T), vec!["plant/late|1|0|x"]);
}

#[test]
fn analytics_scores_each_device_once_where_it_is_connected() {
    let redis = Redis::start();
    let v1 = instance(&redis, "a1");
    let v2 = instance(&redis, "a2");
    for v in [&v1, &v2] {
        wait_until("redis connected", || ready_status(v.http) == "ready");
    }
    let mut remote_sub = Sub::start(v2.port(), &["-t", "device/+/telemetry", "-q", "1"]);
    for i in 0..5 {
        publish(
            v1.port(),
            &[
                "-t",
                "device/m-1/telemetry",
                "-m",
                &format!("{{\"temperature\": {}}}", 40 + i),
                "-q",
                "1",
            ],
        );
    }
    assert_eq!(remote_sub.expect_messages(5, T).len(), 5);
    wait_until("instance 1 scored 5 messages", || {
        metric(v1.http, "vigil_analytics_messages_total") == 5.0
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(v2.http, "vigil_analytics_messages_total"), 0.0);
    assert_eq!(
        metric(
            v2.http,
            "vigil_cluster_messages_total{direction=\"imported\"}"
        ),
        5.0
    );
}

/// The issue's proof: a device on instance 1, a browser on instance 2 and mosquitto_sub on
/// instance 3; Redis is killed (SIGKILL) mid-stream and restarted after an outage. Every QoS 1
/// and QoS 2 message arrives, no QoS 2 message twice; QoS 0 losses are counted and reported.
/// Redis runs with `appendfsync always` (docs/cluster.md: what Redis keeps is its persistence
/// setting).
#[test]
fn redis_killed_mid_stream_loses_no_qos1_or_qos2_message() {
    let mut redis = Redis::start();
    let v1 = instance(&redis, "k1");
    let v2 = instance(&redis, "k2");
    let v3 = instance(&redis, "k3");
    for v in [&v1, &v2, &v3] {
        wait_until("redis connected", || ready_status(v.http) == "ready");
    }
    // Defaults: 600 messages per QoS over ~7 s, Redis away for 3 s of it. The issue's 30-second
    // outage: VIGIL_TEST_OUTAGE_SECS=30 VIGIL_TEST_MESSAGES=4000 (BENCHMARKS.md has the run).
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let n = env("VIGIL_TEST_MESSAGES", 600) as usize;
    let outage = Duration::from_secs(env("VIGIL_TEST_OUTAGE_SECS", 3));
    let rt = rt();
    let (browser_got, sub_got, qos0_sent) = rt.block_on(async {
        let mut browser = Browser::connect(v2.http, "ui-k", "line/#", 2).await;
        let mut sub3 = tokio::task::block_in_place(|| {
            Sub::start(v3.port(), &["-t", "line/#", "-q", "2", "-c", "-i", "sub-k"])
        });
        // The device: rumqttc on instance 1, persistent session.
        let mut opts = rumqttc::MqttOptions::new("dev-k", "127.0.0.1", v1.port());
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(50);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
        let driver = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        // Collects until nothing arrived for longer than the outage plus the reconnect backoff.
        let quiet = outage + Duration::from_secs(8);
        let browser_task = tokio::spawn(async move {
            browser
                .collect(quiet, Instant::now() + Duration::from_secs(300))
                .await
        });
        // N messages per QoS, interleaved, one every ~5 ms; Redis dies a third of the way in
        // and is back after the outage while the device keeps publishing.
        let mut redis_handle = Some(&mut redis);
        let mut killed_at = None;
        for i in 0..n {
            for qos in [0u8, 1, 2] {
                let q = match qos {
                    0 => rumqttc::QoS::AtMostOnce,
                    1 => rumqttc::QoS::AtLeastOnce,
                    _ => rumqttc::QoS::ExactlyOnce,
                };
                client
                    .publish(format!("line/{qos}"), q, false, format!("q{qos}-{i}"))
                    .await
                    .expect("queue publish");
            }
            if i == n / 3 {
                if let Some(r) = redis_handle.as_mut() {
                    r.kill();
                    killed_at = Some(Instant::now());
                }
            }
            if let Some(at) = killed_at {
                if at.elapsed() >= outage {
                    if let Some(r) = redis_handle.take() {
                        tokio::task::block_in_place(|| {
                            // Degraded, not unready, while Redis is away.
                            assert_eq!(ready_status(v1.http), "degraded");
                            r.spawn();
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            redis_handle.is_none(),
            "the stream ended before the outage did: raise VIGIL_TEST_MESSAGES"
        );
        let browser_got = browser_task.await.expect("browser task");
        let sub_got = tokio::task::block_in_place(|| sub3.drain(Duration::from_secs(3)));
        driver.abort();
        (browser_got, sub_got, n)
    });
    for v in [&v1, &v2, &v3] {
        wait_until("ready again", || ready_status(v.http) == "ready");
    }

    let check = |who: &str, messages: Vec<(u8, String)>| -> usize {
        for qos in [1u8, 2] {
            let t = tally(
                messages
                    .iter()
                    .filter(|(q, _)| *q == qos)
                    .map(|(_, p)| p.clone()),
            );
            let missing: Vec<_> = (0..n)
                .map(|i| format!("q{qos}-{i}"))
                .filter(|p| !t.contains_key(p))
                .collect();
            assert!(
                missing.is_empty(),
                "{who}: QoS {qos} lost {} messages, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            if qos == 2 {
                let dups: Vec<_> = t.iter().filter(|(_, n)| **n > 1).collect();
                assert!(dups.is_empty(), "{who}: QoS 2 duplicates {dups:?}");
            }
        }
        let q0 = messages.iter().filter(|(q, _)| *q == 0).count();
        eprintln!("{who}: QoS 0 received {q0} of {n} (lost {})", n - q0.min(n));
        n - q0.min(n)
    };
    let browser: Vec<(u8, String)> = browser_got
        .into_iter()
        .map(|(t, _, p)| (t.trim_start_matches("line/").parse().unwrap_or(9), p))
        .collect();
    let sub: Vec<(u8, String)> = sub_got
        .iter()
        .filter_map(|m| {
            let mut parts = m.splitn(4, '|');
            let topic = parts.next()?;
            let _qos = parts.next()?;
            let _retain = parts.next()?;
            let payload = parts.next()?;
            Some((
                topic.trim_start_matches("line/").parse().ok()?,
                payload.to_string(),
            ))
        })
        .collect();
    let lost_browser = check("browser on instance 2", browser);
    let lost_sub = check("mosquitto_sub on instance 3", sub);
    let dropped = metric(
        v1.http,
        "vigil_cluster_dropped_total{reason=\"outbox_full_qos0\"}",
    );
    eprintln!(
        "QoS 0: sent {qos0_sent}, lost {lost_browser} (browser) / {lost_sub} (mosquitto_sub); exporter dropped {dropped}; redis errors on instance 1: {}",
        metric(v1.http, "vigil_cluster_redis_errors_total")
    );
    // The exporter keeps QoS 0 messages in its outbox through the outage too (it was far from
    // full), so nothing is lost unless counted.
    assert_eq!(
        lost_sub as f64, dropped,
        "QoS 0 losses are the counted drops"
    );
}

/// History lives in Redis: a device that moves to another instance is warm-started there from
/// what the first instance stored, and its history is readable and exportable from anywhere.
#[test]
fn device_moving_to_another_instance_keeps_its_model_and_history() {
    let redis = Redis::start();
    let v1 = instance(&redis, "h1");
    let v2 = instance(&redis, "h2");
    for v in [&v1, &v2] {
        wait_until("redis connected", || ready_status(v.http) == "ready");
        wait_until("history writer connected", || {
            metric(v.http, "vigil_history_up") == 1.0
        });
    }
    let reading = |i: u64| {
        format!(
            "{{\"temperature\": {}, \"timestamp\": {}}}",
            30 + i % 5,
            1_790_000_000 + i
        )
    };
    publish_lines(
        v1.port(),
        &["-t", "device/m-9/telemetry", "-q", "1"],
        (0..100).map(reading),
    );
    wait_until("100 readings stored by instance 1", || {
        metric(v1.http, "vigil_history_points_total{result=\"stored\"}") == 100.0
    });
    // The device reconnects to instance 2.
    publish(
        v2.port(),
        &["-t", "device/m-9/telemetry", "-m", &reading(100), "-q", "1"],
    );
    wait_until("instance 2 warm-started m-9", || {
        metric(v2.http, "vigil_analytics_warm_starts_total") == 1.0
    });
    wait_until("instance 2 stored its reading", || {
        metric(v2.http, "vigil_history_points_total{result=\"stored\"}") == 1.0
    });
    let answer = rt().block_on(async {
        let mut b = Browser::login(v2.http, serde_json::json!({"op": "connect"})).await;
        b.ask(
            serde_json::json!({"op": "history", "device": "m-9", "limit": 1000}),
            "history",
        )
        .await
    });
    assert_eq!(
        answer["points"].as_array().map(Vec::len),
        Some(101),
        "{answer}"
    );
    let csv = v2.command(&["export", "--device", "m-9", "--limit", "3"]);
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&csv.stdout),
        "timestamp_ms,temperature\n1790000098000,33\n1790000099000,34\n1790000100000,30\n"
    );
}

/// An instance whose Redis is not there at start serves its own clients (degraded), and joins
/// the cluster when Redis comes up.
#[test]
fn instance_started_without_redis_serves_locally_then_joins() {
    let mut redis = Redis::not_started();
    let v1 = instance(&redis, "late-1");
    let v2 = instance(&redis, "late-2");
    assert_eq!(ready_status(v1.http), "degraded");
    let mut local = Sub::start(v1.port(), &["-t", "t/#", "-q", "1"]);
    publish(v1.port(), &["-t", "t/local", "-m", "here", "-q", "1"]);
    assert_eq!(local.expect_messages(1, T), vec!["t/local|1|0|here"]);
    redis.spawn();
    for v in [&v1, &v2] {
        wait_until("redis connected", || ready_status(v.http) == "ready");
    }
    publish(v2.port(), &["-t", "t/remote", "-m", "there", "-q", "1"]);
    assert_eq!(
        local.expect_messages(2, T),
        vec!["t/local|1|0|here", "t/remote|1|0|there"]
    );
}

/// With Redis away and the outbox full, QoS 0 messages are dropped and counted while QoS 1
/// messages wait in the core; all of them cross once Redis is back.
#[test]
fn full_outbox_drops_qos0_counted_and_holds_qos1() {
    let mut redis = Redis::start();
    let url = redis.url();
    let v1 = Vigil::start_with(move |c| {
        c.replacen("url = \"\"", &format!("url = {url:?}"), 1)
            .replacen(
                "outbox_max_messages = 200000",
                "outbox_max_messages = 100",
                1,
            )
    });
    let v2 = instance(&redis, "o2");
    for v in [&v1, &v2] {
        wait_until("redis connected", || ready_status(v.http) == "ready");
    }
    let mut sub = Sub::start(v2.port(), &["-t", "o/#", "-q", "1"]);
    redis.kill();
    wait_until("instance 1 sees redis gone", || {
        ready_status(v1.http) == "degraded"
    });
    publish_lines(
        v1.port(),
        &["-t", "o/zero", "-q", "0"],
        (0..200).map(|i| format!("z{i}")),
    );
    publish_lines(
        v1.port(),
        &["-t", "o/one", "-q", "1"],
        (0..300).map(|i| format!("q{i}")),
    );
    wait_until("100 QoS 0 messages dropped", || {
        metric(
            v1.http,
            "vigil_cluster_dropped_total{reason=\"outbox_full_qos0\"}",
        ) == 100.0
    });
    assert_eq!(metric(v1.http, "vigil_cluster_outbox_messages"), 100.0);
    redis.spawn();
    let got = sub.expect_messages(400, Duration::from_secs(30));
    let zero = got.iter().filter(|m| m.starts_with("o/zero|")).count();
    let one: BTreeMap<&str, usize> = got
        .iter()
        .filter_map(|m| m.strip_prefix("o/one|1|0|"))
        .fold(BTreeMap::new(), |mut t, p| {
            *t.entry(p).or_insert(0) += 1;
            t
        });
    assert_eq!(zero, 100, "the QoS 0 messages that fitted");
    assert_eq!(one.len(), 300, "every QoS 1 message crossed");
    assert!(one.values().all(|&n| n == 1), "once each");
    assert_eq!(
        metric(
            v1.http,
            "vigil_cluster_dropped_total{reason=\"outbox_full_qos0\"}"
        ),
        100.0
    );
}

/// Three `redis-server`s in cluster mode (no replicas), made a cluster with `redis-cli`.
struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            let mut node = Redis::not_started();
            // The cluster bus listens on the port + 10000.
            if node.port > 55_000 || TcpListener::bind(("127.0.0.1", node.port + 10_000)).is_err() {
                continue;
            }
            let conf = node.dir.0.join("nodes.conf");
            node.extra = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                conf.to_string_lossy().into_owned(),
            ];
            node.spawn();
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        wait_until("the cluster is ok", || {
            cluster.nodes.iter().all(|n| {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            })
        });
        cluster
    }

    fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The same sharing through a Redis Cluster: messages, retained messages and history.
#[test]
fn instances_share_traffic_through_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let start = |name: &str| {
        let (url, name) = (url.clone(), name.to_string());
        Vigil::start_with(move |c| {
            c.replacen("url = \"\"", &format!("url = {url:?}"), 1)
                .replacen("cluster = false", "cluster = true", 1)
                .replacen("instance_id = \"\"", &format!("instance_id = {name:?}"), 1)
        })
    };
    let v1 = start("c1");
    let v2 = start("c2");
    for v in [&v1, &v2] {
        wait_until("redis cluster connected", || {
            ready_status(v.http) == "ready"
        });
        wait_until("history writer connected", || {
            metric(v.http, "vigil_history_up") == 1.0
        });
    }
    let mut sub = Sub::start(v2.port(), &["-t", "plant/#", "-q", "2"]);
    for qos in 0..3 {
        publish(
            v1.port(),
            &[
                "-t",
                &format!("plant/{qos}"),
                "-m",
                &format!("m{qos}"),
                "-q",
                &qos.to_string(),
            ],
        );
    }
    publish(
        v1.port(),
        &["-t", "plant/state", "-m", "on", "-q", "1", "-r"],
    );
    let mut got = sub.expect_messages(4, T);
    got.sort();
    assert_eq!(
        got,
        [
            "plant/0|0|0|m0",
            "plant/1|1|0|m1",
            "plant/2|2|0|m2",
            "plant/state|1|0|on"
        ]
    );
    let mut late = Sub::start(v2.port(), &["-t", "plant/state", "-q", "1"]);
    assert_eq!(late.expect_messages(1, T), vec!["plant/state|1|1|on"]);
    publish_lines(
        v1.port(),
        &["-t", "device/k-1/telemetry", "-q", "1"],
        (0..20).map(|i| format!("{{\"temperature\": {i}}}")),
    );
    wait_until("20 readings stored", || {
        metric(v1.http, "vigil_history_points_total{result=\"stored\"}") == 20.0
    });
    let answer = rt().block_on(async {
        let mut b = Browser::login(v2.http, json!({"op": "connect"})).await;
        b.ask(
            json!({"op": "history", "device": "k-1", "limit": 100}),
            "history",
        )
        .await
    });
    assert_eq!(
        answer["points"].as_array().map(Vec::len),
        Some(20),
        "{answer}"
    );
}
