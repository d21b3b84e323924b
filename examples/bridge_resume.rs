//! Resume measurement of the JSON WebSocket bridge (`/ws`, docs/bridge-protocol.md): does a
//! persistent bridge session lose or duplicate messages when its WebSocket is cut at random
//! points and resumed?
//!
//! ```text
//! cargo build --release --bin vigil
//! cargo run --release --example bridge_resume -- [--vigil target/release/vigil] \
//!     [--count 10000] [--cuts 8] [--seed 1] [--max-gap-ms 300]
//! # or against a vigil that is already running (anonymous access):
//! cargo run --release --example bridge_resume -- --http 127.0.0.1:8080 --mqtt 127.0.0.1:1883
//! ```
//!
//! Without `--http`/`--mqtt` it starts the vigil binary itself (`--vigil PATH`, default
//! `target/release/vigil`) with its built-in configuration on free loopback ports.
//!
//! One persistent bridge session (`clean: false`) subscribes `resume/<run>/#` at QoS 2, so the
//! delivery QoS is the publisher's. An MQTT client (rumqttc over TCP) then publishes `--count`
//! QoS 1 messages to `resume/<run>/q1` and `--count` QoS 2 messages to `resume/<run>/q2`,
//! interleaved, as fast as its 100-message window allows. Meanwhile the bridge client drops its
//! socket abruptly (no close frame, no `disconnect`) `--cuts` times at random frame counts, half
//! the time before it handled the frame it just read (so that delivery is unacknowledged) and
//! half the time right after its acknowledgement went out, waits a random 0..`--max-gap-ms`,
//! and reconnects with the same client id and `clean: false`. It acknowledges as the spec says
//! (QoS 1 `puback`; QoS 2 `pubrec`, then `pubcomp` on `pubrel`) and de-duplicates QoS 2 by id
//! from the `message` until its `pubcomp`, keeping that state across reconnects.
//!
//! Counted: unique messages received, lost ones, QoS 2 messages handed to the application more
//! than once (must be 0), QoS 1 duplicates (allowed, reported), frames flagged `dup`, QoS 2
//! re-deliveries recognised by id, resumes without `session_present`, error frames. The last
//! line is one `key=value` summary; the exit status is 1 when a message was lost, a QoS 2
//! message was duplicated or a resume found no session. `--trace FILE` logs every frame in
//! (`<`) and out (`>`) with its WebSocket number, and every cut.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Args {
    vigil: String,
    http: Option<SocketAddr>,
    mqtt: Option<SocketAddr>,
    count: usize,
    cuts: usize,
    seed: u64,
    max_gap_ms: u64,
    /// After the last expected message, keep reading this long to catch late duplicates.
    grace_ms: u64,
    /// Write every frame in and out, and every cut, to this file.
    trace: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        vigil: "target/release/vigil".into(),
        http: None,
        mqtt: None,
        count: 10_000,
        cuts: 8,
        seed: std::process::id() as u64,
        max_gap_ms: 300,
        grace_ms: 1000,
        trace: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--vigil" => a.vigil = v,
            "--http" => a.http = Some(v.parse().expect("--http HOST:PORT")),
            "--mqtt" => a.mqtt = Some(v.parse().expect("--mqtt HOST:PORT")),
            "--count" => a.count = v.parse().expect("--count"),
            "--cuts" => a.cuts = v.parse().expect("--cuts"),
            "--seed" => a.seed = v.parse().expect("--seed"),
            "--max-gap-ms" => a.max_gap_ms = v.parse().expect("--max-gap-ms"),
            "--grace-ms" => a.grace_ms = v.parse().expect("--grace-ms"),
            "--trace" => a.trace = Some(v),
            other => panic!("unknown argument {other} (see the top of examples/bridge_resume.rs)"),
        }
        i += 2;
    }
    assert!(
        a.http.is_some() == a.mqtt.is_some(),
        "--http and --mqtt go together"
    );
    a
}

/// A vigil started by this program; killed on drop.
struct Vigil {
    child: Child,
    http: SocketAddr,
    mqtt: SocketAddr,
}

impl Drop for Vigil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin` on free loopback ports and reads its addresses from the `vigil listening` log.
fn start_vigil(bin: &str) -> Vigil {
    let child = Command::new(bin)
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
        .unwrap_or_else(|e| panic!("cannot start {bin} ({e}); build it or pass --vigil PATH"));
    // Owned by the guard from here on, so every exit path kills and reaps it.
    let unknown: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let mut v = Vigil {
        child,
        http: unknown,
        mqtt: unknown,
    };
    let mut lines = BufReader::new(v.child.stderr.take().unwrap()).lines();
    let field = |line: &str, name: &str| -> Option<SocketAddr> {
        let key = format!("{name}=");
        let start = line.find(&key)? + key.len();
        line[start..].split_whitespace().next()?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "vigil did not start");
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

/// What the application saw, kept across reconnects (the client's session state).
#[derive(Default)]
struct App {
    /// Times each sequence number was handed to the application, per QoS.
    q1: Vec<u32>,
    q2: Vec<u32>,
    /// QoS 2 ids between `message` and our `pubcomp`: a `message` with one of them is a
    /// re-delivery, acknowledged again but not processed.
    q2_window: HashSet<u64>,
    unique: usize,
    dup_flagged: u64,
    q2_redeliveries: u64,
    pubrels: u64,
    errors: Vec<String>,
    errors_total: u64,
    /// Per QoS 2 sequence number: the id and WebSocket of its first delivery, and whether
    /// that exchange was completed with our `pubcomp`.
    q2_first: Vec<Option<(u64, u64)>>,
    q2_completed_ids: HashSet<(u64, u64)>,
    /// Descriptions of QoS 2 duplicates, for the report.
    q2_dup_notes: Vec<String>,
    /// The current WebSocket's number.
    conn: u64,
    frames: u64,
    session_lost: u64,
    resumes: u64,
    last_new: Option<Instant>,
}

type Ws = WebSocketStream<TcpStream>;

async fn open(http: SocketAddr, client_id: &str) -> Result<(Ws, Value), String> {
    let stream = TcpStream::connect(http)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    stream.set_nodelay(true).ok();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{http}/ws"), stream)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let connect =
        json!({"op": "connect", "client_id": client_id, "clean": false, "keep_alive": 30});
    ws.send(Message::text(connect.to_string()))
        .await
        .map_err(|e| format!("send connect: {e}"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                if v["op"] == "connack" && v["ok"] == true {
                    return Ok((ws, v));
                }
                return Err(format!("connect refused: {v}"));
            }
            Ok(Some(Ok(_))) => {}
            other => return Err(format!("no connack: {other:?}")),
        }
    }
}

impl App {
    /// Handles one frame like a correct client; returns the frames to send back.
    fn handle(&mut self, frame: &Value, prefix: &str) -> Vec<Value> {
        self.frames += 1;
        match frame["op"].as_str() {
            Some("message") => {
                if frame["dup"] == true {
                    self.dup_flagged += 1;
                }
                let qos = frame["qos"].as_u64().unwrap_or(0);
                let id = frame["id"].clone();
                let mut out = Vec::new();
                let new = match qos {
                    1 => {
                        out.push(json!({"op": "puback", "id": id}));
                        true
                    }
                    2 => {
                        out.push(json!({"op": "pubrec", "id": id}));
                        let n = id.as_u64().unwrap_or(0);
                        if self.q2_window.insert(n) {
                            true
                        } else {
                            self.q2_redeliveries += 1;
                            false
                        }
                    }
                    _ => true,
                };
                if new {
                    self.deliver(frame, prefix);
                }
                out
            }
            Some("pubrel") => {
                self.pubrels += 1;
                let id = frame["id"].clone();
                let n = id.as_u64().unwrap_or(0);
                if self.q2_window.remove(&n) {
                    self.q2_completed_ids.insert((self.conn, n));
                }
                vec![json!({"op": "pubcomp", "id": id})]
            }
            Some("error") => {
                self.errors_total += 1;
                if self.errors.len() < 20 {
                    self.errors.push(frame.to_string());
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// The application receives one message.
    fn deliver(&mut self, frame: &Value, prefix: &str) {
        let topic = frame["topic"].as_str().unwrap_or("");
        let payload = frame["payload"].as_str().unwrap_or("");
        let seq = payload
            .split_once('-')
            .and_then(|(_, n)| n.parse::<usize>().ok());
        let table = if topic == format!("{prefix}/q1") {
            &mut self.q1
        } else if topic == format!("{prefix}/q2") {
            &mut self.q2
        } else {
            self.errors.push(format!("unexpected message {frame}"));
            return;
        };
        let q2 = topic.ends_with("/q2");
        let id = frame["id"].as_u64().unwrap_or(0);
        match seq {
            Some(n) if n < table.len() => {
                table[n] += 1;
                if q2 {
                    match self.q2_first[n] {
                        None => self.q2_first[n] = Some((id, self.conn)),
                        Some((first_id, first_conn)) => {
                            if self.q2_dup_notes.len() < 10 {
                                let completed =
                                    self.q2_completed_ids.contains(&(first_conn, first_id));
                                self.q2_dup_notes.push(format!(
                                    "q2-{n}: first as id {first_id} on WebSocket {first_conn} \
                                     (pubcomp sent: {completed}), again as id {id} dup {} on \
                                     WebSocket {}",
                                    frame["dup"], self.conn
                                ));
                            }
                        }
                    }
                }
                if table[n] == 1 {
                    self.unique += 1;
                    self.last_new = Some(Instant::now());
                }
            }
            _ => self.errors.push(format!("unexpected payload {frame}")),
        }
    }
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let own = match (args.http, args.mqtt) {
        (Some(_), Some(_)) => None,
        _ => Some(start_vigil(&args.vigil)),
    };
    let (http, mqtt) = match &own {
        Some(v) => (v.http, v.mqtt),
        None => (args.http.unwrap(), args.mqtt.unwrap()),
    };
    let run = format!("{}-{}", std::process::id(), args.seed);
    let prefix = format!("resume/{run}");
    let client_id = format!("resume-{run}");
    let n = args.count;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    // Cut points, as counts of frames received: spread over the first two thirds of the
    // roughly 3n frames (n QoS 1 messages, n QoS 2 messages and their n pubrels).
    let mut cuts: Vec<u64> = (0..args.cuts)
        .map(|_| rng.gen_range(50..(2 * n as u64).max(51)))
        .collect();
    cuts.sort_unstable();
    println!(
        "bridge_resume: vigil http={http} mqtt={mqtt}; {n} QoS 1 + {n} QoS 2 messages; {} cuts at frames {cuts:?}; seed {}",
        args.cuts, args.seed
    );

    // The bridge session subscribes first; then the publisher starts.
    let (mut ws, connack) = open(http, &client_id).await.expect("first connect");
    assert_eq!(
        connack["session_present"], false,
        "stale session: {connack}"
    );
    let sub = json!({"op": "subscribe", "ref": 1,
                     "filters": [{"filter": format!("{prefix}/#"), "qos": 2}]});
    ws.send(Message::text(sub.to_string())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["op"] == "suback" {
                    assert_eq!(v["results"][0]["qos"], 2, "subscription refused: {v}");
                    break;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no suback: {other:?}"),
        }
    }

    let acked = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let publisher = {
        let (acked, completed, prefix) = (acked.clone(), completed.clone(), prefix.clone());
        tokio::spawn(async move {
            let mut opts = MqttOptions::new(
                format!("resume-pub-{}", std::process::id()),
                mqtt.ip().to_string(),
                mqtt.port(),
            );
            opts.set_inflight(100);
            opts.set_keep_alive(Duration::from_secs(30));
            let (client, mut el) = AsyncClient::new(opts, 200);
            let driver = tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::PubComp(_))) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("publisher connection error: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            });
            for i in 0..n {
                client
                    .publish(
                        format!("{prefix}/q1"),
                        QoS::AtLeastOnce,
                        false,
                        format!("q1-{i}"),
                    )
                    .await
                    .unwrap();
                client
                    .publish(
                        format!("{prefix}/q2"),
                        QoS::ExactlyOnce,
                        false,
                        format!("q2-{i}"),
                    )
                    .await
                    .unwrap();
            }
            (client, driver)
        })
    };

    let mut app = App {
        q1: vec![0; n],
        q2: vec![0; n],
        q2_first: vec![None; n],
        conn: 1,
        ..App::default()
    };
    let mut trace = args
        .trace
        .as_ref()
        .map(|p| std::io::BufWriter::new(std::fs::File::create(p).expect("--trace file")));
    let mut log = |line: String| {
        if let Some(t) = trace.as_mut() {
            use std::io::Write;
            let _ = writeln!(t, "{line}");
        }
    };
    let mut next_cut = 0;
    let mut connections = 1u64;
    let idle_limit = Duration::from_secs(15);
    let mut done_at: Option<Instant> = None;
    'session: loop {
        // One WebSocket.
        loop {
            if app.unique == 2 * n && done_at.is_none() {
                done_at = Some(Instant::now());
            }
            if done_at.is_some_and(|d| d.elapsed() >= Duration::from_millis(args.grace_ms)) {
                break 'session;
            }
            let wait = match done_at {
                Some(d) => Duration::from_millis(args.grace_ms).saturating_sub(d.elapsed()),
                None => idle_limit,
            };
            let msg = match tokio::time::timeout(wait, ws.next()).await {
                Err(_) if done_at.is_some() => break 'session,
                Err(_) => {
                    eprintln!("nothing received for {idle_limit:?}: giving up");
                    break 'session;
                }
                Ok(Some(Ok(m))) => m,
                Ok(other) => {
                    eprintln!("connection ended by the server ({other:?}); reconnecting");
                    log(format!("{connections} ENDED BY SERVER {other:?}"));
                    break;
                }
            };
            let Message::Text(text) = msg else {
                continue;
            };
            let frame: Value = serde_json::from_str(text.as_str()).expect("frame is JSON");
            log(format!("{connections} < {text}"));
            let cut_here = next_cut < cuts.len() && app.frames + 1 >= cuts[next_cut];
            if cut_here && rng.gen_bool(0.5) {
                // Cut before handling: this frame is never acknowledged. It was read, so count
                // it as seen by the network but not by the application.
                app.frames += 1;
                next_cut += 1;
                log(format!("{connections} CUT before handling"));
                break;
            }
            let answers = app.handle(&frame, &prefix);
            let mut failed = false;
            for a in answers {
                log(format!("{connections} > {a}"));
                if ws.feed(Message::text(a.to_string())).await.is_err() {
                    failed = true;
                }
            }
            if failed || ws.flush().await.is_err() {
                // Find out why: the server's close frame may still be readable.
                let mut why = String::from("no close frame");
                while let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(500), ws.next()).await
                {
                    match m {
                        Ok(Message::Close(f)) => {
                            why = format!("{f:?}");
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            why = e.to_string();
                            break;
                        }
                    }
                }
                eprintln!("send failed ({why}); reconnecting");
                log(format!("{connections} SEND FAILED {why}"));
                break;
            }
            if cut_here {
                next_cut += 1;
                log(format!("{connections} CUT after handling"));
                break;
            }
        }
        // Cut: drop the socket abruptly, wait, resume.
        drop(ws);
        let gap = rng.gen_range(0..=args.max_gap_ms);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let mut attempt = 0;
        ws = loop {
            match open(http, &client_id).await {
                Ok((ws, connack)) => {
                    log(format!("{} CONNACK {connack}", connections + 1));
                    app.resumes += 1;
                    if connack["session_present"] != true {
                        app.session_lost += 1;
                        eprintln!("resume without session: {connack}");
                    }
                    break ws;
                }
                Err(e) => {
                    attempt += 1;
                    assert!(attempt < 20, "cannot reconnect: {e}");
                    eprintln!("reconnect failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        connections += 1;
        app.conn = connections;
    }
    let elapsed = started.elapsed();
    let (client, driver) = publisher.await.unwrap();
    // Give the publisher's last acknowledgements a moment, then stop it.
    let pub_deadline = Instant::now() + Duration::from_secs(5);
    while (acked.load(Ordering::Relaxed) < n as u64 || completed.load(Ordering::Relaxed) < n as u64)
        && Instant::now() < pub_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = client.disconnect().await;
    driver.abort();
    let _ = ws
        .send(Message::text(json!({"op": "disconnect"}).to_string()))
        .await;

    let lost_q1 = app.q1.iter().filter(|&&c| c == 0).count();
    let lost_q2 = app.q2.iter().filter(|&&c| c == 0).count();
    let dups_q1: u64 = app.q1.iter().map(|&c| c.saturating_sub(1) as u64).sum();
    let dups_q2: u64 = app.q2.iter().map(|&c| c.saturating_sub(1) as u64).sum();
    let pub_acked = acked.load(Ordering::Relaxed);
    let pub_completed = completed.load(Ordering::Relaxed);
    println!("publisher: QoS 1 {pub_acked}/{n} acknowledged, QoS 2 {pub_completed}/{n} completed");
    println!(
        "bridge: {} cuts, {connections} WebSockets, {} resumes ({} without session_present), {} frames read, {elapsed:.2?}",
        next_cut, app.resumes, app.session_lost, app.frames
    );
    println!(
        "received unique {}/{} (QoS 1 {}, QoS 2 {}); lost {} (QoS 1 {lost_q1}, QoS 2 {lost_q2})",
        app.unique,
        2 * n,
        n - lost_q1,
        n - lost_q2,
        lost_q1 + lost_q2
    );
    println!(
        "QoS 2 duplicates delivered to the application: {dups_q2}; QoS 2 re-deliveries recognised by id: {}; pubrel frames: {}",
        app.q2_redeliveries, app.pubrels
    );
    println!(
        "QoS 1 duplicates (allowed): {dups_q1}; frames flagged dup: {}",
        app.dup_flagged
    );
    for note in &app.q2_dup_notes {
        println!("QoS 2 duplicate: {note}");
    }
    println!("error frames from the server: {}", app.errors_total);
    for e in &app.errors {
        println!("server error frame or unexpected message: {e}");
    }
    println!(
        "summary: published_q1={n} published_q2={n} cuts={next_cut} received_unique={} lost={} q2_dups={dups_q2} q1_dups={dups_q1} dup_frames={} q2_redeliveries={} session_lost={} errors={} elapsed_s={:.2}",
        app.unique,
        lost_q1 + lost_q2,
        app.dup_flagged,
        app.q2_redeliveries,
        app.session_lost,
        app.errors_total,
        elapsed.as_secs_f64()
    );
    let ok = lost_q1 + lost_q2 == 0 && dups_q2 == 0 && app.session_lost == 0;
    // `exit` skips destructors: stop the vigil this program started first.
    drop(own);
    std::process::exit(if ok { 0 } else { 1 });
}
