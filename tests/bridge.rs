//! The JSON WebSocket bridge at `/ws` (docs/bridge-protocol.md), through the real binary:
//! tokio-tungstenite plays the browser, mosquitto_pub / mosquitto_sub the MQTT devices.
//!
//! Every assertion quotes the protocol document; a failure here is either a server bug or a
//! spec change, never a flaky timing (timeouts are generous and only bound failures).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Upper bound for anything that should happen "at once"; only reached when a test fails.
const T: Duration = Duration::from_secs(10);
/// How long to watch for something that must not arrive.
const QUIET: Duration = Duration::from_millis(700);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Sets `key = value` in `[section]` of a broker.toml text (`vigil::config::set_value`).
fn set(config: &str, section: &str, key: &str, value: &str) -> String {
    vigil::config::set_value(config, section, key, value)
}

/// Runs blocking harness code (mosquitto clients, HTTP GETs) from inside the runtime.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

/// `mosquitto_pub` to completion.
fn mpub(port: u16, args: &[&str]) {
    blocking(|| {
        publish(port, args);
    });
}

/// Polls `/metrics` until `pred` holds for the sample `name`; panics with the page otherwise.
fn wait_metric(http: SocketAddr, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + T;
    loop {
        let page = blocking(|| http_get(http, "/metrics"));
        if let Some(v) = metric(&page, name) {
            if pred(v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metric {name} never reached the expected value:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// A small JSON-bridge client.

/// How a bridge WebSocket ended.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// A close frame: code and reason.
    Close(u16, String),
    /// The stream ended or failed without a close frame.
    Cut(String),
}

impl End {
    fn close_code(&self) -> Option<u16> {
        match self {
            End::Close(c, _) => Some(*c),
            End::Cut(_) => None,
        }
    }

    fn reason(&self) -> &str {
        match self {
            End::Close(_, r) => r,
            End::Cut(_) => "",
        }
    }
}

struct Bridge {
    ws: WebSocketStream<TcpStream>,
    /// The `Sec-WebSocket-Protocol` the server answered with.
    subprotocol: Option<String>,
    /// Frames `wait_op` passed over, for failure messages.
    skipped: Vec<Value>,
    /// QoS 2 ids received as `message` and not yet completed with `pubcomp` (the spec's
    /// de-duplication window).
    q2_window: HashSet<u64>,
    /// QoS 2 `message` frames that fell into that window (re-deliveries, not processed).
    q2_redeliveries: usize,
}

impl Bridge {
    /// Opens `ws://HTTP/ws` without sending anything.
    async fn open(http: SocketAddr) -> Bridge {
        Bridge::open_with(http, "/ws", None, None).await
    }

    /// Opens a bridge WebSocket; `subprotocol` is offered, `recv_buffer` sets SO_RCVBUF.
    async fn open_with(
        http: SocketAddr,
        path: &str,
        subprotocol: Option<&str>,
        recv_buffer: Option<u32>,
    ) -> Bridge {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = tokio::time::timeout(T, socket.connect(http))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        stream.set_nodelay(true).ok();
        let mut req = format!("ws://{http}{path}").into_client_request().unwrap();
        if let Some(p) = subprotocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        let (ws, resp) = tokio::time::timeout(T, tokio_tungstenite::client_async(req, stream))
            .await
            .expect("WebSocket handshake timed out")
            .unwrap_or_else(|e| panic!("WebSocket handshake on {path} failed: {e}"));
        let subprotocol = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Bridge {
            ws,
            subprotocol,
            skipped: Vec::new(),
            q2_window: HashSet::new(),
            q2_redeliveries: 0,
        }
    }

    /// Opens a WebSocket, sends `connect_frame` and returns the first answer (the connack).
    async fn connect(http: SocketAddr, connect_frame: Value) -> (Bridge, Value) {
        let mut b = Bridge::open(http).await;
        b.send(connect_frame).await;
        let connack = b.recv().await;
        assert_eq!(connack["op"], "connack", "first answer: {connack}");
        (b, connack)
    }

    /// A connected session; asserts `ok: true` and returns the connack too.
    async fn session(http: SocketAddr, client_id: &str, clean: bool) -> (Bridge, Value) {
        let (b, connack) = Bridge::connect(
            http,
            json!({"op": "connect", "client_id": client_id, "clean": clean}),
        )
        .await;
        assert_eq!(connack["ok"], true, "connect refused: {connack}");
        (b, connack)
    }

    async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    async fn send_text(&mut self, text: &str) {
        if std::env::var_os("BRIDGE_DEBUG").is_some() {
            eprintln!("> {text}");
        }
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .unwrap_or_else(|e| panic!("send {text}: {e}"));
    }

    /// The next frame or the end of the connection; `None` when nothing came within `within`.
    async fn event(&mut self, within: Duration) -> Option<Result<Value, End>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(Err(End::Cut("stream ended".into()))),
                Ok(Some(Err(e))) => return Some(Err(End::Cut(e.to_string()))),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    if std::env::var_os("BRIDGE_DEBUG").is_some() {
                        eprintln!("< {t}");
                    }
                    let v: Value = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("server frame is not JSON ({e}): {t}"));
                    assert!(v["op"].is_string(), "server frame without op: {v}");
                    return Some(Ok(v));
                }
                Message::Close(f) => {
                    return Some(Err(match f {
                        Some(f) => End::Close(u16::from(f.code), f.reason.to_string()),
                        None => End::Close(1005, String::new()),
                    }))
                }
                Message::Binary(b) => panic!("server sent a binary message: {b:?}"),
                _ => {}
            }
        }
    }

    /// The next frame; panics on timeout or close.
    async fn recv(&mut self) -> Value {
        match self.event(T).await {
            Some(Ok(v)) => v,
            Some(Err(end)) => panic!("connection ended instead of a frame: {end:?}"),
            None => panic!("no frame within {T:?} (skipped before: {:?})", self.skipped),
        }
    }

    /// The next frame if one arrives within `within`.
    async fn recv_within(&mut self, within: Duration) -> Option<Value> {
        match self.event(within).await {
            Some(Ok(v)) => Some(v),
            Some(Err(end)) => panic!("connection ended: {end:?}"),
            None => None,
        }
    }

    /// Skips frames until one with `op`; the skipped ones are kept in `skipped`.
    async fn wait_op(&mut self, op: &str) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.event(left).await {
                Some(Ok(v)) if v["op"] == op => return v,
                Some(Ok(v)) => self.skipped.push(v),
                Some(Err(end)) => panic!("connection ended waiting for {op}: {end:?}"),
                None => panic!("no {op} within {T:?}; skipped: {:?}", self.skipped),
            }
        }
    }

    /// Waits for the connection to end, skipping frames; panics if it stays open.
    async fn ended(&mut self) -> End {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.event(left).await {
                Some(Ok(v)) => self.skipped.push(v),
                Some(Err(end)) => return end,
                None => panic!("connection still open after {T:?}; got {:?}", self.skipped),
            }
        }
    }

    /// Asserts that nothing arrives for `QUIET`.
    async fn quiet(&mut self, what: &str) {
        if let Some(v) = self.recv_within(QUIET).await {
            panic!("{what}: unexpected frame {v}");
        }
    }

    /// Sends `ping` with `ref` and asserts the very next frame is the matching `pong`.
    async fn ping(&mut self, r: i64) {
        self.send(json!({"op": "ping", "ref": r})).await;
        let pong = self.recv().await;
        assert_eq!(pong, json!({"op": "pong", "ref": r}), "ping {r}");
    }

    /// Subscribes and returns the suback's `results`.
    async fn subscribe(&mut self, filters: &[(&str, u8)]) -> Vec<Value> {
        let list: Vec<Value> = filters
            .iter()
            .map(|(f, q)| json!({"filter": f, "qos": q}))
            .collect();
        self.send(json!({"op": "subscribe", "ref": "sub", "filters": list}))
            .await;
        let suback = self.wait_op("suback").await;
        assert_eq!(suback["ref"], "sub", "suback must carry the ref: {suback}");
        suback["results"].as_array().expect("results").clone()
    }

    /// Subscribes and asserts every filter was granted its QoS.
    async fn subscribed(&mut self, filters: &[(&str, u8)]) {
        let results = self.subscribe(filters).await;
        let expected: Vec<Value> = filters
            .iter()
            .map(|(f, q)| json!({"filter": f, "qos": q}))
            .collect();
        assert_eq!(results, expected);
    }

    /// Publishes and completes the QoS exchange; returns the frames of the exchange.
    async fn publish(&mut self, frame: Value) -> Vec<Value> {
        let qos = frame["qos"].as_u64().unwrap_or(0);
        let id = frame["id"].clone();
        self.send(frame).await;
        match qos {
            0 => Vec::new(),
            1 => {
                let ack = self.recv().await;
                // With `no_subscribers` when no subscription matched (v5 reason 0x10).
                let mut plain = ack.clone();
                if plain.get("no_subscribers") == Some(&json!(true)) {
                    plain.as_object_mut().map(|o| o.remove("no_subscribers"));
                }
                assert_eq!(plain, json!({"op": "puback", "id": id}));
                vec![ack]
            }
            _ => {
                let rec = self.recv().await;
                assert_eq!(rec, json!({"op": "pubrec", "id": id}));
                self.send(json!({"op": "pubrel", "id": id})).await;
                let comp = self.recv().await;
                assert_eq!(comp, json!({"op": "pubcomp", "id": id}));
                vec![rec, comp]
            }
        }
    }

    /// Handles one incoming frame as a well-behaved client: acknowledges messages, answers
    /// `pubrel` with `pubcomp`, de-duplicates QoS 2 by id. Returns the message when it is
    /// new for the application.
    async fn handle(&mut self, frame: Value) -> Option<Value> {
        match frame["op"].as_str() {
            Some("message") => {
                let qos = frame["qos"].as_u64().expect("qos");
                let id = frame["id"].clone();
                match qos {
                    0 => {
                        assert!(frame.get("id").is_none(), "QoS 0 message with id: {frame}");
                        Some(frame)
                    }
                    1 => {
                        self.send(json!({"op": "puback", "id": id})).await;
                        Some(frame)
                    }
                    2 => {
                        let n = id.as_u64().expect("QoS 2 message id");
                        self.send(json!({"op": "pubrec", "id": id})).await;
                        if self.q2_window.insert(n) {
                            Some(frame)
                        } else {
                            self.q2_redeliveries += 1;
                            None
                        }
                    }
                    q => panic!("message with qos {q}: {frame}"),
                }
            }
            Some("pubrel") => {
                let id = frame["id"].clone();
                self.q2_window.remove(&id.as_u64().expect("pubrel id"));
                self.send(json!({"op": "pubcomp", "id": id})).await;
                None
            }
            _ => {
                self.skipped.push(frame);
                None
            }
        }
    }

    /// Receives, acknowledging as it goes, until `n` new messages reached the application.
    async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let f = self.recv().await;
            if let Some(m) = self.handle(f).await {
                out.push(m);
            }
        }
        out
    }

    /// Receives, acknowledging, until a message with `payload == fence`; returns the messages
    /// before it. Also finishes QoS 2 exchanges still open.
    async fn messages_until(&mut self, fence: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let f = self.recv().await;
            if let Some(m) = self.handle(f).await {
                if m["payload"] == fence {
                    break;
                }
                out.push(m);
            }
        }
        while !self.q2_window.is_empty() {
            let f = self.recv().await;
            if let Some(m) = self.handle(f).await {
                out.push(m);
            }
        }
        out
    }

    /// Drops the TCP connection without a close frame or `disconnect` (a network cut).
    fn cut(self) {
        drop(self.ws);
    }

    /// Sends `disconnect` and asserts the server closes with 1000.
    async fn disconnect(mut self) {
        self.send(json!({"op": "disconnect"})).await;
        let end = self.ended().await;
        assert_eq!(end.close_code(), Some(1000), "after disconnect: {end:?}");
    }
}

/// How a persistent session gets its new WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// The old socket is cut and the server has ended that session before the reconnect.
    AfterGone,
    /// The old socket is cut and the client reconnects at once, as a browser does (the server
    /// may not have noticed the cut yet).
    Immediate,
    /// The old socket stays open; the new connection takes the client id over.
    Takeover,
}

const RESUME_MODES: [Resume; 3] = [Resume::AfterGone, Resume::Immediate, Resume::Takeover];

impl Bridge {
    /// Moves the persistent session `client_id` from `self` to a new WebSocket the `mode` way;
    /// asserts `session_present`.
    async fn resume(self, http: SocketAddr, client_id: &str, mode: Resume) -> Bridge {
        let (new, c) = match mode {
            Resume::AfterGone | Resume::Immediate => {
                let live =
                    blocking(|| metric(&http_get(http, "/metrics"), "vigil_bridge_sessions"))
                        .expect("vigil_bridge_sessions");
                self.cut();
                if mode == Resume::AfterGone {
                    wait_metric(http, "vigil_bridge_sessions", |n| n < live);
                }
                Bridge::session(http, client_id, false).await
            }
            Resume::Takeover => {
                let mut old = self;
                let (new, c) = Bridge::session(http, client_id, false).await;
                let end = old.ended().await;
                assert_eq!(end.close_code(), Some(1008), "{end:?}");
                assert!(end.reason().starts_with("session_taken_over"), "{end:?}");
                (new, c)
            }
        };
        assert_eq!(c["session_present"], true, "{mode:?}: {c}");
        new
    }
}

/// Runs `case` once per resume mode (each on its own task) and reports every mode that failed.
async fn each_resume_mode<F, Fut>(case: F)
where
    F: Fn(Resume) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut failures = Vec::new();
    for mode in RESUME_MODES {
        if let Err(e) = tokio::spawn(case(mode)).await {
            let why = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            failures.push(format!("{mode:?}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "failed in {} of {} resume modes:\n{}",
        failures.len(),
        RESUME_MODES.len(),
        failures.join("\n")
    );
}

/// `(topic, qos, retain, dup, payload)` of a message frame, for compact assertions.
fn summary(m: &Value) -> (String, u64, bool, bool, Value) {
    (
        m["topic"].as_str().expect("topic").to_string(),
        m["qos"].as_u64().expect("qos"),
        m["retain"].as_bool().expect("retain"),
        m["dup"].as_bool().expect("dup"),
        m["payload"].clone(),
    )
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s:?}"),
        }
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Session basics.

#[test]
fn connect_answers_connack_ping_and_disconnect() {
    let v = Vigil::start();
    rt().block_on(async {
        // The subprotocol is echoed; connack has every documented field and a generated id.
        let mut b = Bridge::open_with(v.http, "/ws", Some("vigil.bridge.v1"), None).await;
        assert_eq!(b.subprotocol.as_deref(), Some("vigil.bridge.v1"));
        b.send(json!({"op": "connect"})).await;
        let c = b.recv().await;
        assert_eq!(c["op"], "connack");
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["protocol"], 1, "{c}");
        assert_eq!(c["session_present"], false, "{c}");
        assert_eq!(c["keep_alive"], 60, "{c}");
        assert!(
            c["client_id"].as_str().is_some_and(|s| !s.is_empty()),
            "no generated client_id: {c}"
        );
        assert!(c["receive_maximum"].as_u64().is_some_and(|n| n > 0), "{c}");
        assert_eq!(c["max_message_size"], 1048576, "{c}");
        // ping / pong with a string ref and a number ref.
        b.send(json!({"op": "ping", "ref": "abc"})).await;
        assert_eq!(b.recv().await, json!({"op": "pong", "ref": "abc"}));
        b.ping(7).await;
        // A WebSocket ping is answered too.
        b.ws.send(Message::Ping(vec![1, 2, 3].into()))
            .await
            .unwrap();
        let pong = match tokio::time::timeout(T, b.ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => p,
            other => panic!("expected a WebSocket pong, got {other:?}"),
        };
        assert_eq!(&pong[..], &[1, 2, 3]);
        b.disconnect().await;

        // Without the subprotocol offered, none is chosen; the bridge works the same.
        let (mut b, c) = Bridge::session(v.http, "basic-2", true).await;
        assert_eq!(b.subprotocol, None);
        assert_eq!(c["client_id"], "basic-2");
        b.ping(1).await;
        b.disconnect().await;
    });
}

#[test]
fn keep_alive_timeout_closes_the_session() {
    let v = Vigil::start();
    rt().block_on(async {
        let (mut b, c) = Bridge::connect(
            v.http,
            json!({"op": "connect", "client_id": "ka", "keep_alive": 1}),
        )
        .await;
        assert_eq!(c["keep_alive"], 1, "{c}");
        let start = Instant::now();
        let end = b.ended().await;
        let took = start.elapsed();
        assert_eq!(end.close_code(), Some(1008), "{end:?}");
        assert!(end.reason().starts_with("keep_alive_timeout"), "{end:?}");
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
            "closed after {took:?}, keep_alive 1 s"
        );
    });
}

#[test]
fn will_published_on_cut_not_on_disconnect() {
    let v = Vigil::start();
    let mut watcher = Sub::start(v.port(), &["-t", "wills/#", "-q", "1"]);
    rt().block_on(async {
        let will = |name: &str| {
            json!({"op": "connect", "client_id": format!("will-{name}"),
                   "will": {"topic": format!("wills/{name}"), "payload": format!("gone-{name}"),
                            "qos": 1, "retain": false}})
        };
        // A cut WebSocket publishes the will.
        let (a, c) = Bridge::connect(v.http, will("a")).await;
        assert_eq!(c["ok"], true, "{c}");
        a.cut();
        let got = blocking(|| watcher.expect_messages(1, T));
        assert_eq!(got, vec!["wills/a|1|0|gone-a"]);
        // `disconnect` discards it.
        let (b, c) = Bridge::connect(v.http, will("b")).await;
        assert_eq!(c["ok"], true, "{c}");
        b.disconnect().await;
        mpub(v.port(), &["-t", "wills/fence", "-m", "fence", "-q", "1"]);
        let got = blocking(|| watcher.expect_messages(2, T));
        assert_eq!(
            got[1], "wills/fence|1|0|fence",
            "will sent after disconnect"
        );
    });
}

#[test]
fn takeover_closes_the_old_websocket() {
    let v = Vigil::start();
    rt().block_on(async {
        let (mut old, _) = Bridge::session(v.http, "taken", true).await;
        let (mut new, _) = Bridge::session(v.http, "taken", true).await;
        let end = old.ended().await;
        assert_eq!(end.close_code(), Some(1008), "{end:?}");
        assert!(end.reason().starts_with("session_taken_over"), "{end:?}");
        new.ping(1).await;
    });
}

#[test]
fn ref_is_copied_into_answers_and_errors() {
    let v = Vigil::start();
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "refs", true).await;
        let mut wrong = Vec::new();
        // A ref that is neither string nor number is a field of the wrong type: bad_frame.
        b.send(json!({"op": "ping", "ref": {"not": "allowed"}}))
            .await;
        let got = b.recv().await;
        if (&got["op"], &got["code"]) != (&json!("error"), &json!("bad_frame")) {
            wrong.push(format!("object ref: expected error bad_frame, got {got}"));
        }
        let mut check = |what: &str, got: &Value, r: Value| {
            if got["ref"] != r {
                wrong.push(format!("{what}: {got}"));
            }
        };
        b.send(json!({"op": "subscribe", "ref": 1, "filters": [{"filter": "refs/t", "qos": 2}]}))
            .await;
        check("suback", &b.recv().await, json!(1));
        b.send(json!({"op": "unsubscribe", "ref": "two", "filters": ["refs/t"]}))
            .await;
        check("unsuback", &b.recv().await, json!("two"));
        b.send(json!({"op": "ping", "ref": 3.5})).await;
        check("pong", &b.recv().await, json!(3.5));
        b.send(json!({"op": "bogus", "ref": 4})).await;
        check("error", &b.recv().await, json!(4));
        // Publish acknowledgements are matched by id and carry no ref; an error a publish
        // causes does.
        b.send(json!({"op": "publish", "topic": "refs/t", "qos": 1, "id": 1, "ref": 5}))
            .await;
        check("puback", &b.recv().await, Value::Null);
        b.send(json!({"op": "publish", "topic": "refs/t", "qos": 2, "id": 2, "ref": 6}))
            .await;
        check("pubrec", &b.recv().await, Value::Null);
        b.send(json!({"op": "pubrel", "id": 2, "ref": 7})).await;
        check("pubcomp", &b.recv().await, Value::Null);
        b.send(json!({"op": "publish", "topic": "refs/+", "ref": 8}))
            .await;
        check("publish error", &b.recv().await, json!(8));
        assert!(
            wrong.is_empty(),
            "`ref` not handled as documented:\n{}",
            wrong.join("\n")
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Publishing from the bridge, QoS 1 and 2.

#[test]
fn qos1_publish_is_acknowledged_after_the_broker_accepted_it() {
    let v = Vigil::start();
    let port = v.port();
    let mut live = Sub::start(port, &["-t", "acc/q1", "-q", "1"]);
    // A persistent MQTT session that is offline when the bridge publishes.
    let offline = ["-t", "acc/q1", "-q", "1", "-c", "-i", "acc-offline"];
    Sub::start(port, &offline).kill();
    wait_metric(v.http, "vigil_connections{listener=\"tcp\"}", |n| n == 1.0);
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "acc-pub", true).await;
        b.send(
            json!({"op": "publish", "topic": "acc/q1", "payload": "hello", "qos": 1,
                      "id": 17, "ref": "p17"}),
        )
        .await;
        let ack = b.recv().await;
        assert_eq!(ack, json!({"op": "puback", "id": 17}));
        // Accepted means routed (the live subscriber has it) and stored for the offline
        // persistent session, which gets it when it comes back right after the puback.
        let mut back = blocking(|| Sub::start(port, &offline));
        assert_eq!(
            blocking(|| back.expect_messages(1, T)),
            vec!["acc/q1|1|0|hello"]
        );
        assert_eq!(
            blocking(|| live.expect_messages(1, T)),
            vec!["acc/q1|1|0|hello"]
        );
        // A retained QoS 1 publish is in the retained store when its puback arrives, which
        // says that no subscription matched (as an MQTT 5 PUBACK's 0x10 would).
        let ack = b
            .publish(
                json!({"op": "publish", "topic": "acc/ret", "payload": "kept", "qos": 1,
                         "id": 18, "retain": true}),
            )
            .await;
        assert_eq!(
            ack,
            vec![json!({"op": "puback", "id": 18, "no_subscribers": true})]
        );
        let mut late = blocking(|| Sub::start(port, &["-t", "acc/ret", "-q", "1"]));
        assert_eq!(
            blocking(|| late.expect_messages(1, T)),
            vec!["acc/ret|1|1|kept"]
        );
        // The id is free again after its puback.
        b.publish(
            json!({"op": "publish", "topic": "acc/q1", "payload": "again", "qos": 1,
                         "id": 17}),
        )
        .await;
        assert_eq!(
            blocking(|| live.expect_messages(2, T))[1],
            "acc/q1|1|0|again"
        );
    });
}

#[test]
fn qos2_publish_resent_after_lost_pubrec_is_delivered_once() {
    let v = Vigil::start();
    let mut sub = Sub::start(v.port(), &["-t", "once/#", "-q", "2"]);
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "once-pub", true).await;
        let frame =
            json!({"op": "publish", "topic": "once/a", "payload": "only-once", "qos": 2, "id": 7});
        b.send(frame.clone()).await;
        // The pubrec is "lost": the client re-sends the publish.
        assert_eq!(b.recv().await, json!({"op": "pubrec", "id": 7}));
        let mut dup = frame.clone();
        dup["dup"] = json!(true);
        b.send(dup.clone()).await;
        assert_eq!(b.recv().await, json!({"op": "pubrec", "id": 7}));
        // Even a third time.
        b.send(dup).await;
        assert_eq!(b.recv().await, json!({"op": "pubrec", "id": 7}));
        b.send(json!({"op": "pubrel", "id": 7})).await;
        assert_eq!(b.recv().await, json!({"op": "pubcomp", "id": 7}));
        // The id is reusable for a new message after pubcomp.
        b.publish(
            json!({"op": "publish", "topic": "once/a", "payload": "fence", "qos": 2, "id": 7}),
        )
        .await;
        let got = blocking(|| {
            sub.wait_for(|l| l.ends_with("|fence"), T);
            sub.messages.clone()
        });
        assert_eq!(got, vec!["once/a|2|0|only-once", "once/a|2|0|fence"]);
    });
}

#[test]
fn qos2_publish_resent_on_a_new_websocket_is_delivered_once() {
    let v = Vigil::start();
    let (http, port) = (v.http, v.port());
    rt().block_on(each_resume_mode(move |mode| async move {
        let topic = format!("once/{mode:?}");
        let mut sub = blocking(|| Sub::start(port, &["-t", &topic, "-q", "2"]));
        let id = format!("once-resume-{mode:?}");
        let (mut b, c) = Bridge::session(http, &id, false).await;
        assert_eq!(c["session_present"], false, "{c}");
        let frame =
            json!({"op": "publish", "topic": topic, "payload": "across", "qos": 2, "id": 9});
        b.send(frame.clone()).await;
        assert_eq!(b.recv().await, json!({"op": "pubrec", "id": 9}));
        // The pubrec is "lost" with the socket; the new WebSocket re-sends the publish.
        let mut b = b.resume(http, &id, mode).await;
        let mut dup = frame;
        dup["dup"] = json!(true);
        b.send(dup).await;
        assert_eq!(b.recv().await, json!({"op": "pubrec", "id": 9}));
        b.send(json!({"op": "pubrel", "id": 9})).await;
        assert_eq!(b.recv().await, json!({"op": "pubcomp", "id": 9}));
        // The fence is QoS 2 too: mosquitto_sub shows a QoS 2 message when its PUBREL
        // arrives, so only two QoS 2 messages are shown in the order they were routed.
        b.publish(json!({"op": "publish", "topic": topic, "payload": "fence", "qos": 2, "id": 10}))
            .await;
        let got = blocking(|| {
            sub.wait_for(|l| l.ends_with("|fence"), T);
            sub.drain(QUIET)
        });
        let across = format!("{topic}|2|0|across");
        assert_eq!(
            got.iter().filter(|m| **m == across).count(),
            1,
            "the QoS 2 publish must reach the subscriber exactly once: {got:?}"
        );
        assert_eq!(
            got,
            vec![across, format!("{topic}|2|0|fence")],
            "delivered once, but after a later publish of the same session and topic \
             (pubcomp came before the message was routed)"
        );
        b.disconnect().await;
    }));
}

// ---------------------------------------------------------------------------------------------
// Deliveries to the bridge across reconnects.

#[test]
fn qos1_delivery_is_resent_with_dup_after_reconnect() {
    let v = Vigil::start();
    let (http, port) = (v.http, v.port());
    rt().block_on(each_resume_mode(move |mode| async move {
        let (topic, id) = (format!("rd/q1/{mode:?}"), format!("rd-q1-{mode:?}"));
        let (mut b, _) = Bridge::session(http, &id, false).await;
        b.subscribed(&[(&topic, 1)]).await;
        mpub(port, &["-t", &topic, "-m", "m1", "-q", "1"]);
        let first = b.wait_op("message").await;
        assert_eq!(
            summary(&first),
            (topic.clone(), 1, false, false, json!("m1"))
        );
        let n = first["id"].as_u64().expect("QoS 1 message has an id");
        assert!((1..=65535).contains(&n));
        // Not acknowledged on a live WebSocket: not re-sent there.
        b.quiet("QoS 1 re-sent on a live WebSocket").await;

        let mut b = b.resume(http, &id, mode).await;
        let again = b.wait_op("message").await;
        assert_eq!(
            summary(&again),
            (topic.clone(), 1, false, true, json!("m1"))
        );
        assert_eq!(again["id"], first["id"], "re-delivery must keep the id");
        b.send(json!({"op": "puback", "id": n})).await;
        // Acknowledged: the next message is a new one, and a later resume re-sends nothing.
        mpub(port, &["-t", &topic, "-m", "m2", "-q", "1"]);
        let next = b.messages(1).await;
        assert_eq!(
            summary(&next[0]),
            (topic.clone(), 1, false, false, json!("m2"))
        );
        b.disconnect().await;
        let (mut b, c) = Bridge::session(http, &id, false).await;
        assert_eq!(c["session_present"], true, "{c}");
        mpub(port, &["-t", &topic, "-m", "m3", "-q", "1"]);
        let next = b.messages(1).await;
        assert_eq!(
            summary(&next[0]),
            (topic.clone(), 1, false, false, json!("m3"))
        );
        b.disconnect().await;
    }));
}

#[test]
fn qos2_delivery_resumes_with_pubrel_not_the_message() {
    let v = Vigil::start();
    let (http, port) = (v.http, v.port());
    rt().block_on(each_resume_mode(move |mode| async move {
        let (topic, cid) = (format!("rd/q2/{mode:?}"), format!("rd-q2-{mode:?}"));
        let (mut b, _) = Bridge::session(http, &cid, false).await;
        b.subscribed(&[(&topic, 2)]).await;
        mpub(port, &["-t", &topic, "-m", "x1", "-q", "2"]);
        let m = b.wait_op("message").await;
        assert_eq!(summary(&m), (topic.clone(), 2, false, false, json!("x1")));
        let id = m["id"].clone();
        b.send(json!({"op": "pubrec", "id": id})).await;
        assert_eq!(b.recv().await, json!({"op": "pubrel", "id": id}));
        // Gone before pubcomp: the session resumes with pubrel, not the message.
        let mut b = b.resume(http, &cid, mode).await;
        let first = b.recv().await;
        assert_eq!(
            first,
            json!({"op": "pubrel", "id": id}),
            "expected pubrel first"
        );
        b.send(json!({"op": "pubcomp", "id": id})).await;

        // Gone after the message, before pubrec: the message is re-sent with dup and the same
        // id; the client recognises it (the spec's de-duplication window) and processes it once.
        mpub(port, &["-t", &topic, "-m", "x2", "-q", "2"]);
        let m = b.wait_op("message").await;
        assert_eq!(summary(&m), (topic.clone(), 2, false, false, json!("x2")));
        let mut b = b.resume(http, &cid, mode).await;
        let again = b.recv().await;
        assert_eq!(again["op"], "message", "{again}");
        assert_eq!(
            summary(&again),
            (topic.clone(), 2, false, true, json!("x2"))
        );
        assert_eq!(again["id"], m["id"]);
        b.send(json!({"op": "pubrec", "id": again["id"]})).await;
        assert_eq!(b.recv().await, json!({"op": "pubrel", "id": again["id"]}));
        b.send(json!({"op": "pubcomp", "id": again["id"]})).await;

        // Nothing else is pending: the next frames are the next message's.
        mpub(port, &["-t", &topic, "-m", "x3", "-q", "2"]);
        let before = b.messages_until("x3").await;
        assert!(before.is_empty(), "x1/x2 delivered again: {before:?}");
        assert_eq!(b.q2_redeliveries, 0);
        b.disconnect().await;
    }));
}

#[test]
fn persistent_session_receives_messages_queued_while_away() {
    let v = Vigil::start();
    rt().block_on(async {
        let (mut b, c) = Bridge::session(v.http, "away", false).await;
        assert_eq!(c["session_present"], false, "{c}");
        b.subscribed(&[("away/q1", 1), ("away/q2", 2)]).await;
        b.disconnect().await;
        for i in 0..3 {
            mpub(
                v.port(),
                &["-t", "away/q1", "-m", &format!("a{i}"), "-q", "1"],
            );
            mpub(
                v.port(),
                &["-t", "away/q2", "-m", &format!("b{i}"), "-q", "2"],
            );
        }
        let (mut b, c) = Bridge::session(v.http, "away", false).await;
        assert_eq!(c["session_present"], true, "{c}");
        assert_eq!(c["client_id"], "away");
        // The subscriptions are in place: a fence published now arrives after the queue.
        mpub(v.port(), &["-t", "away/q1", "-m", "fence", "-q", "1"]);
        let got = b.messages_until("fence").await;
        let mut by_topic: HashMap<String, Vec<(u64, Value)>> = HashMap::new();
        for m in &got {
            let (topic, qos, retain, _dup, payload) = summary(m);
            assert!(!retain, "{m}");
            by_topic.entry(topic).or_default().push((qos, payload));
        }
        assert_eq!(
            by_topic.get("away/q1").cloned().unwrap_or_default(),
            (0..3)
                .map(|i| (1, json!(format!("a{i}"))))
                .collect::<Vec<_>>(),
            "all: {got:?}"
        );
        assert_eq!(
            by_topic.get("away/q2").cloned().unwrap_or_default(),
            (0..3)
                .map(|i| (2, json!(format!("b{i}"))))
                .collect::<Vec<_>>(),
            "all: {got:?}"
        );
        assert_eq!(b.q2_redeliveries, 0, "QoS 2 re-sent on a live WebSocket");
        b.quiet("after the queue").await;
    });
}

// ---------------------------------------------------------------------------------------------
// Interop with MQTT clients.

/// The dashboard subscribes to `device/+/status` at QoS 1: a page opened on a fleet of 250
/// devices gets every device's retained status (rumqttd alone sent 100 and dropped the rest).
#[test]
fn a_bridge_session_gets_every_retained_status_of_a_large_fleet() {
    const DEVICES: usize = 250;
    let v = Vigil::start();
    let statuses: Vec<_> = (0..DEVICES)
        .map(|i| {
            let topic = format!("device/m-{i:03}/status");
            (topic, br#"{"status":"online"}"#.to_vec(), 1)
        })
        .collect();
    store_retained(v.mqtt, "fleet", &statuses);
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "fleet-page", true).await;
        b.subscribed(&[("device/+/status", 1)]).await;
        let got = b.messages(DEVICES).await;
        let topics: std::collections::BTreeSet<String> = got
            .iter()
            .map(|m| {
                assert_eq!(m["retain"], true, "{m}");
                m["topic"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(topics.len(), DEVICES);
        b.quiet("after the statuses").await;
    });
}

#[test]
fn mqtt_to_bridge_all_qos_retained_and_wildcards() {
    let v = Vigil::start();
    let port = v.port();
    publish(port, &["-t", "io/ret/a", "-m", "last-a", "-q", "1", "-r"]);
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "io-in", true).await;
        b.subscribed(&[("io/+/t", 2), ("io/all/#", 2), ("io/ret/#", 1)])
            .await;
        // The retained message follows the suback, flagged retain.
        let r = b.messages(1).await;
        assert_eq!(
            summary(&r[0]),
            ("io/ret/a".into(), 1, true, false, json!("last-a"))
        );
        assert_eq!(r[0]["encoding"], "utf8");
        for q in 0..=2u8 {
            let (topic, payload) = (format!("io/d{q}/t"), format!("tcp{q}"));
            mpub(port, &["-t", &topic, "-m", &payload, "-q", &q.to_string()]);
            let m = b.messages(1).await;
            assert_eq!(
                summary(&m[0]),
                (topic, q as u64, false, false, json!(payload))
            );
            assert_eq!(m[0]["encoding"], "utf8");
            assert_eq!(m[0].get("id").is_some(), q > 0, "{}", m[0]);
        }
        // `+` matches one level only; `#` matches the parent and any depth.
        mpub(port, &["-t", "io/d1/x", "-m", "no", "-q", "1"]);
        mpub(port, &["-t", "io/a/b/t", "-m", "no", "-q", "1"]);
        mpub(port, &["-t", "io/all", "-m", "parent", "-q", "1"]);
        mpub(port, &["-t", "io/all/x/y/z", "-m", "deep", "-q", "1"]);
        // Delivery QoS is the lower of publish and subscription QoS; a live retained publish
        // is not flagged retain.
        mpub(port, &["-t", "io/ret/b", "-m", "live", "-q", "2", "-r"]);
        mpub(port, &["-t", "io/all/end", "-m", "fence", "-q", "1"]);
        let got: Vec<_> = b
            .messages_until("fence")
            .await
            .iter()
            .map(summary)
            .collect();
        assert_eq!(
            got,
            vec![
                ("io/all".into(), 1, false, false, json!("parent")),
                ("io/all/x/y/z".into(), 1, false, false, json!("deep")),
                ("io/ret/b".into(), 1, false, false, json!("live")),
            ]
        );
        // Unsubscribe: the filter stops matching once unsuback arrives.
        b.send(json!({"op": "unsubscribe", "ref": 4, "filters": ["io/all/#"]}))
            .await;
        assert_eq!(
            b.recv().await,
            json!({"op": "unsuback", "ref": 4, "filters": ["io/all/#"]})
        );
        mpub(port, &["-t", "io/all/x", "-m", "gone", "-q", "1"]);
        mpub(port, &["-t", "io/d9/t", "-m", "fence2", "-q", "1"]);
        let got = b.messages_until("fence2").await;
        assert!(got.is_empty(), "delivered after unsubscribe: {got:?}");
    });
}

#[test]
fn bridge_to_mqtt_all_qos_and_retained() {
    let v = Vigil::start();
    let port = v.port();
    let mut sub = Sub::start(port, &["-t", "io/out/#", "-q", "2"]);
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "io-out", true).await;
        for q in 0..=2u8 {
            let mut f = json!({"op": "publish", "topic": format!("io/out/{q}"),
                               "payload": format!("ws{q}"), "qos": q});
            if q > 0 {
                f["id"] = json!(100 + q as u64);
            }
            b.publish(f).await;
        }
        assert_eq!(
            blocking(|| sub.expect_messages(3, T)),
            vec!["io/out/0|0|0|ws0", "io/out/1|1|0|ws1", "io/out/2|2|0|ws2"]
        );
        // Retained from the bridge: a later MQTT subscriber gets it flagged retain.
        b.publish(
            json!({"op": "publish", "topic": "io/keep", "payload": "kept",
                         "qos": 1, "id": 1, "retain": true}),
        )
        .await;
        let mut late = blocking(|| Sub::start(port, &["-t", "io/keep", "-q", "1"]));
        assert_eq!(
            blocking(|| late.expect_messages(1, T)),
            vec!["io/keep|1|1|kept"]
        );
        // An empty retained publish (no payload) clears it.
        b.publish(json!({"op": "publish", "topic": "io/keep", "qos": 1, "id": 2, "retain": true}))
            .await;
        let mut later = blocking(|| Sub::start(port, &["-t", "io/keep", "-q", "1"]));
        assert!(
            blocking(|| later.drain(QUIET)).is_empty(),
            "retained not cleared"
        );
        // The bridge's own subscription sees its retained messages too.
        b.publish(
            json!({"op": "publish", "topic": "io/keep2", "payload": {"v": 1},
                         "qos": 1, "id": 3, "retain": true}),
        )
        .await;
        b.subscribed(&[("io/keep2", 0)]).await;
        let m = b.messages(1).await;
        assert_eq!(
            summary(&m[0]),
            ("io/keep2".into(), 0, true, false, json!({"v": 1}))
        );
    });
}

#[test]
fn payload_encodings_both_ways() {
    let v = Vigil::start();
    let port = v.port();
    let bin: Vec<u8> = vec![0x00, 0xff, 0x10, 0x80, 0xfe, 0xc3];
    let file = TempDir::new();
    let bin_path = file.0.join("payload.bin");
    std::fs::write(&bin_path, &bin).unwrap();
    let mut hexsub = Sub::start(port, &["-t", "enc/out/#", "-q", "1", "-F", "MSG|%t|%x"]);
    rt().block_on(async {
        // MQTT -> bridge.
        let (mut b, _) = Bridge::session(v.http, "enc", true).await;
        b.subscribed(&[("enc/in/#", 1)]).await;
        let json_text = r#"{"temperature":78.2,"ok":true,"tags":["a","b"]}"#;
        mpub(port, &["-t", "enc/in/json", "-m", json_text, "-q", "1"]);
        mpub(port, &["-t", "enc/in/text", "-m", "plain text, not JSON", "-q", "1"]);
        mpub(port, &["-t", "enc/in/bin", "-f", bin_path.to_str().unwrap(), "-q", "1"]);
        mpub(port, &["-t", "enc/in/number", "-m", "42", "-q", "1"]);
        mpub(port, &["-t", "enc/in/empty", "-n", "-q", "1"]);
        let got = b.messages(5).await;
        let by_topic: HashMap<&str, &Value> = got
            .iter()
            .map(|m| (m["topic"].as_str().unwrap(), m))
            .collect();
        let m = by_topic["enc/in/json"];
        assert_eq!(m["encoding"], "json", "{m}");
        assert_eq!(
            m["payload"],
            json!({"temperature": 78.2, "ok": true, "tags": ["a", "b"]}),
            "JSON must be embedded as a value: {m}"
        );
        let m = by_topic["enc/in/text"];
        assert_eq!(
            (&m["encoding"], &m["payload"]),
            (&json!("utf8"), &json!("plain text, not JSON")),
            "{m}"
        );
        let m = by_topic["enc/in/bin"];
        assert_eq!(m["encoding"], "base64", "{m}");
        assert_eq!(base64_decode(m["payload"].as_str().expect("string")), bin);
        let m = by_topic["enc/in/number"];
        assert_eq!((&m["encoding"], &m["payload"]), (&json!("json"), &json!(42)), "{m}");
        let m = by_topic["enc/in/empty"];
        assert_eq!((&m["encoding"], &m["payload"]), (&json!("utf8"), &json!("")), "{m}");

        // Bridge -> MQTT: the bytes each encoding stands for.
        let cases: Vec<(&str, Value, Vec<u8>)> = vec![
            ("json", json!({"payload": {"cmd": "stop"}}), br#"{"cmd":"stop"}"#.to_vec()),
            ("array", json!({"payload": [1, 2.5, null]}), b"[1,2.5,null]".to_vec()),
            ("text", json!({"payload": "h\u{e9}llo"}), "h\u{e9}llo".as_bytes().to_vec()),
            (
                "jsonstring",
                json!({"payload": "x", "encoding": "json"}),
                b"\"x\"".to_vec(),
            ),
            (
                "b64",
                json!({"payload": base64_encode(&bin), "encoding": "base64"}),
                bin.clone(),
            ),
            (
                "b64nopad",
                json!({"payload": base64_encode(&bin[..5]).trim_end_matches('='), "encoding": "base64"}),
                bin[..5].to_vec(),
            ),
            ("empty", json!({}), Vec::new()),
        ];
        for (i, (name, extra, _)) in cases.iter().enumerate() {
            let mut f = json!({"op": "publish", "topic": format!("enc/out/{name}"), "qos": 1,
                               "id": i + 1});
            for (k, val) in extra.as_object().unwrap() {
                f[k] = val.clone();
            }
            b.publish(f).await;
        }
        let got = blocking(|| hexsub.expect_messages(cases.len(), T));
        let expected: Vec<String> = cases
            .iter()
            .map(|(name, _, bytes)| format!("enc/out/{name}|{}", hex(bytes)))
            .collect();
        assert_eq!(got, expected);
    });
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[test]
fn errors_are_answered_and_the_session_continues() {
    let v = Vigil::start();
    let mut sub = Sub::start(v.port(), &["-t", "err/#", "-q", "1"]);
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "errors", true).await;
        // (frame text, expected code, ref to echo)
        let cases: Vec<(String, &str, Option<Value>)> = vec![
            ("{not json".into(), "bad_json", None),
            ("[1, 2]".into(), "bad_json", None),
            ("\"connect\"".into(), "bad_json", None),
            (r#"{"op": "frobnicate", "ref": 1}"#.into(), "unknown_op", Some(json!(1))),
            (r#"{"ref": "no-op"}"#.into(), "unknown_op", Some(json!("no-op"))),
            (
                r#"{"op": "publish", "topic": "err/+/x", "payload": "w", "ref": 3}"#.into(),
                "bad_topic",
                Some(json!(3)),
            ),
            (r#"{"op": "publish", "topic": "err/#", "payload": "w"}"#.into(), "bad_topic", None),
            (r#"{"op": "publish", "topic": "", "payload": "w"}"#.into(), "bad_topic", None),
            (
                r#"{"op": "publish", "topic": "err/a", "qos": 3, "id": 1, "ref": "q"}"#.into(),
                "bad_qos",
                Some(json!("q")),
            ),
            (r#"{"op": "publish", "topic": "err/a", "qos": -1}"#.into(), "bad_qos", None),
            (r#"{"op": "publish", "topic": "err/a", "qos": 1}"#.into(), "bad_id", None),
            (r#"{"op": "publish", "topic": "err/a", "qos": 2}"#.into(), "bad_id", None),
            (r#"{"op": "publish", "topic": "err/a", "qos": 1, "id": 0}"#.into(), "bad_id", None),
            (
                r#"{"op": "publish", "topic": "err/a", "qos": 1, "id": 65536}"#.into(),
                "bad_id",
                None,
            ),
            (
                r#"{"op": "publish", "topic": "err/a", "payload": "!!not base64!!", "encoding": "base64"}"#
                    .into(),
                "bad_payload",
                None,
            ),
            (
                r#"{"op": "publish", "topic": "err/a", "payload": "x", "encoding": "hex"}"#.into(),
                "bad_payload",
                None,
            ),
            (r#"{"op": "publish", "topic": 5}"#.into(), "bad_frame", None),
            (r#"{"op": "publish", "topic": "err/a", "retain": "yes"}"#.into(), "bad_frame", None),
            (r#"{"op": "subscribe", "filters": "err/#"}"#.into(), "bad_frame", None),
            (r#"{"op": "puback", "id": 999, "ref": "u1"}"#.into(), "unknown_id", Some(json!("u1"))),
            (r#"{"op": "pubrec", "id": 998}"#.into(), "unknown_id", None),
            (r#"{"op": "pubcomp", "id": 997}"#.into(), "unknown_id", None),
            (r#"{"op": "connect", "client_id": "again"}"#.into(), "already_connected", None),
        ];
        for (i, (text, code, r)) in cases.iter().enumerate() {
            b.send_text(text).await;
            let e = match b.event(T).await {
                Some(Ok(e)) => e,
                other => panic!("{text}: expected an error frame {code}, got {other:?}"),
            };
            assert_eq!(e["op"], "error", "{text}: {e}");
            assert_eq!(e["code"], *code, "{text}: {e}");
            assert!(e["message"].is_string(), "{text}: error without message: {e}");
            match r {
                Some(r) => assert_eq!(&e["ref"], r, "{text}: ref not echoed: {e}"),
                None => assert!(e.get("ref").is_none(), "{text}: {e}"),
            }
            // The session keeps working.
            b.ping(1000 + i as i64).await;
        }
        // A binary WebSocket message.
        b.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        let e = b.recv().await;
        assert_eq!((&e["op"], &e["code"]), (&json!("error"), &json!("binary_frame")), "{e}");
        b.ping(1).await;
        // A refused filter is reported in the suback, not as an error frame.
        let results = b.subscribe(&[("err/#/x", 1), ("err/ok", 1)]).await;
        assert_eq!(results[0]["filter"], "err/#/x");
        assert_eq!(results[0]["error"], "bad_filter", "{results:?}");
        assert!(results[0].get("qos").is_none(), "{results:?}");
        assert_eq!(results[1], json!({"filter": "err/ok", "qos": 1}));
        // After all that, publishing works and reaches MQTT.
        b.publish(json!({"op": "publish", "topic": "err/after", "payload": "still here",
                         "qos": 1, "id": 1}))
            .await;
        assert_eq!(
            blocking(|| sub.expect_messages(1, T)),
            vec!["err/after|1|0|still here"],
            "a refused publish leaked to subscribers or the good one is missing"
        );
        let errors = blocking(|| http_get(v.http, "/metrics"));
        assert!(
            metric(&errors, "vigil_bridge_errors_total").unwrap_or(0.0) >= cases.len() as f64,
            "{errors}"
        );
    });
}

/// "payload_too_large: the message would exceed the maximum message size" (an error frame,
/// the session continues), and "a WebSocket message of more than 2 × max_packet_size + 4096
/// bytes closes the connection (WebSocket close 1009)".
#[test]
fn too_large_payload_is_an_error_and_oversized_message_closes_1009() {
    let v = Vigil::start_with(|c| set(&c, "limits", "max_packet_size", "4096"));
    rt().block_on(async {
        let (mut b, c) = Bridge::session(v.http, "too-large", true).await;
        let max = c["max_message_size"].as_u64().expect("max_message_size") as usize;
        assert!(
            max <= 4096,
            "max_message_size {max} over max_packet_size: {c}"
        );
        // One byte over the announced maximum message size, QoS 0 and QoS 1.
        let big = "x".repeat(max + 1);
        let frame = json!({"op": "publish", "topic": "big/t", "payload": big, "ref": "big"});
        b.send(frame.clone()).await;
        match b.event(T).await {
            Some(Ok(e)) => assert_eq!(
                (&e["op"], &e["code"], &e["ref"]),
                (&json!("error"), &json!("payload_too_large"), &json!("big")),
                "{e}"
            ),
            other => panic!(
                "a {}-byte payload (max_message_size {max}, frame {} bytes) got {other:?} \
                 instead of error payload_too_large",
                max + 1,
                frame.to_string().len()
            ),
        }
        b.ping(1).await;
        let mut q1 = frame;
        q1["qos"] = json!(1);
        q1["id"] = json!(5);
        b.send(q1).await;
        let ack = b.recv().await;
        assert_eq!(
            (&ack["op"], &ack["id"], &ack["code"]),
            (&json!("puback"), &json!(5), &json!("payload_too_large")),
            "{ack}"
        );
        b.ping(2).await;

        // A WebSocket message over 2 × max_packet_size + 4096 closes with 1009.
        let (mut b, _) = Bridge::session(v.http, "oversized", true).await;
        let huge =
            json!({"op": "publish", "topic": "big/t", "payload": "y".repeat(2 * 4096 + 4097)});
        b.send(huge).await;
        let end = b.ended().await;
        assert_eq!(end.close_code(), Some(1009), "oversized message: {end:?}");
    });
}

#[test]
fn first_frame_not_connect_closes_with_not_connected() {
    let v = Vigil::start();
    rt().block_on(async {
        for first in [
            json!({"op": "ping", "ref": 1}),
            json!({"op": "publish", "topic": "a", "payload": "x"}),
            json!({"op": "subscribe", "filters": [{"filter": "#", "qos": 0}]}),
        ] {
            let mut b = Bridge::open(v.http).await;
            b.send(first.clone()).await;
            let end = b.ended().await;
            assert!(
                matches!(end.close_code(), Some(1008) | Some(1002)),
                "{first}: {end:?}"
            );
            assert!(
                end.reason().starts_with("not_connected"),
                "{first}: reason {end:?}"
            );
            // An error frame before the close is allowed; nothing else is.
            for f in &b.skipped {
                assert_eq!(
                    (&f["op"], &f["code"]),
                    (&json!("error"), &json!("not_connected"))
                );
            }
        }
        // The bridge still accepts sessions.
        let (mut b, _) = Bridge::session(v.http, "after-bad", true).await;
        b.ping(1).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Back-pressure.

#[test]
fn stuck_bridge_client_does_not_slow_others_and_is_closed() {
    const N: usize = 6000;
    const RATE: usize = 3000; // messages/s: 6 MB in 2 s, more than the stuck socket buffers
    let v = Vigil::start_with(|c| {
        let c = set(&c, "limits", "write_stall_timeout_ms", "1000");
        set(&c, "bridge", "max_queued_bytes", "65536")
    });
    let port = v.port();
    let mqtt_addr = v.mqtt;
    let mut mqtt_sub = Sub::start(port, &["-t", "flood/#", "-q", "0", "-F", "MSG|%t"]);
    rt().block_on(async {
        // The stuck client: a tiny receive buffer, subscribes, then never reads again.
        let mut stuck = Bridge::open_with(v.http, "/ws", None, Some(4096)).await;
        stuck
            .send(json!({"op": "connect", "client_id": "stuck", "keep_alive": 0}))
            .await;
        assert_eq!(stuck.recv().await["ok"], true);
        stuck.subscribed(&[("flood/#", 0)]).await;

        let (mut healthy, _) = Bridge::session(v.http, "healthy", true).await;
        healthy.subscribed(&[("flood/#", 0)]).await;
        let reader = tokio::spawn(async move {
            let mut seqs = HashSet::new();
            let mut last = Instant::now();
            while seqs.len() < N {
                match healthy.event(Duration::from_secs(5)).await {
                    Some(Ok(m)) if m["op"] == "message" => {
                        let p = m["payload"].as_str().expect("utf8 payload");
                        seqs.insert(p[..6].parse::<usize>().expect("seq"));
                        last = Instant::now();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(end)) => panic!("healthy bridge client closed: {end:?}"),
                    None => break,
                }
            }
            (seqs.len(), last, healthy)
        });

        let publisher = tokio::task::spawn_blocking(move || {
            let mut p = Raw::connected(mqtt_addr, &ConnectOpts::v311("flooder"));
            let filler = "x".repeat(1000);
            let start = Instant::now();
            for i in 0..N {
                if i % 30 == 0 {
                    let due = start + Duration::from_secs_f64(i as f64 / RATE as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                let payload = format!("{i:06}{filler}");
                p.send(&publish_packet(
                    "flood/a",
                    payload.as_bytes(),
                    0,
                    false,
                    0,
                    false,
                ));
            }
            p.send(&[0xC0, 0]); // PINGREQ: its answer proves everything before was read
            assert_eq!(p.recv_timeout(T).map(|r| r.kind()), Some(13));
            (start, Instant::now())
        });
        let (start, end) = publisher.await.unwrap();
        let took = end - start;
        let paced = Duration::from_secs_f64(N as f64 / RATE as f64);
        assert!(
            took < paced + Duration::from_secs(3),
            "publisher held back: {took:?} for a {paced:?} schedule"
        );

        let (healthy_got, healthy_last, healthy) = reader.await.unwrap();
        assert!(
            healthy_got >= N * 95 / 100,
            "healthy bridge client got {healthy_got} of {N}"
        );
        let lag = healthy_last.saturating_duration_since(end);
        assert!(
            lag < Duration::from_secs(3),
            "healthy bridge lagged {lag:?}"
        );
        let mqtt_got = blocking(|| mqtt_sub.expect_messages(N, T)).len();
        assert!(
            mqtt_got >= N * 95 / 100,
            "MQTT subscriber got {mqtt_got} of {N}"
        );

        // The stuck session is closed and counted; QoS 0 drops are counted.
        wait_metric(v.http, "vigil_bridge_slow_consumers_total", |n| n >= 1.0);
        wait_metric(
            v.http,
            "vigil_disconnects_total{reason=\"slow_consumer\"}",
            |n| n >= 1.0,
        );
        wait_metric(v.http, "vigil_bridge_dropped_qos0_total", |n| n > 0.0);
        wait_metric(v.http, "vigil_bridge_sessions", |n| n == 1.0);
        // Reading now, the stuck client finds its connection ended (a close frame could not
        // be written into a full socket, so a plain cut is allowed too).
        let stuck_end = stuck.ended().await;
        if let End::Close(code, reason) = &stuck_end {
            assert_eq!(*code, 1008, "{stuck_end:?}");
            assert!(reason.starts_with("slow_consumer"), "{stuck_end:?}");
        }
        let mut healthy = healthy;
        healthy.ping(1).await;
    });
}

// ---------------------------------------------------------------------------------------------
// Limits and authentication.

#[test]
fn max_subscriptions_per_session() {
    let v = Vigil::start_with(|c| set(&c, "bridge", "max_subscriptions", "2"));
    rt().block_on(async {
        let (mut b, _) = Bridge::session(v.http, "subs", true).await;
        b.subscribed(&[("lim/1", 0), ("lim/2", 1)]).await;
        let r = b.subscribe(&[("lim/3", 1)]).await;
        assert_eq!(
            r,
            vec![json!({"filter": "lim/3", "error": "too_many_subscriptions"})]
        );
        // The refused filter delivers nothing; the granted ones work.
        mpub(v.port(), &["-t", "lim/3", "-m", "no", "-q", "1"]);
        mpub(v.port(), &["-t", "lim/1", "-m", "fence", "-q", "1"]);
        assert!(b.messages_until("fence").await.is_empty());
        // Unsubscribing frees a slot.
        b.send(json!({"op": "unsubscribe", "ref": 2, "filters": ["lim/1"]}))
            .await;
        assert_eq!(
            b.recv().await,
            json!({"op": "unsuback", "ref": 2, "filters": ["lim/1"]})
        );
        b.subscribed(&[("lim/3", 1)]).await;

        // Within one request: the third filter is refused, the first two granted.
        let (mut c, _) = Bridge::session(v.http, "subs-2", true).await;
        let r = c.subscribe(&[("l/a", 0), ("l/b", 0), ("l/c", 0)]).await;
        assert_eq!(
            r,
            vec![
                json!({"filter": "l/a", "qos": 0}),
                json!({"filter": "l/b", "qos": 0}),
                json!({"filter": "l/c", "error": "too_many_subscriptions"}),
            ]
        );
    });
}

#[test]
fn max_sessions_refuses_with_server_busy() {
    let v = Vigil::start_with(|c| set(&c, "bridge", "max_sessions", "1"));
    rt().block_on(async {
        let (mut first, _) = Bridge::session(v.http, "only-one", true).await;
        let (mut second, c) = Bridge::connect(
            v.http,
            json!({"op": "connect", "client_id": "one-too-many"}),
        )
        .await;
        assert_eq!(c["ok"], false, "{c}");
        assert_eq!(c["code"], "server_busy", "{c}");
        assert!(c["message"].is_string(), "{c}");
        assert_eq!(second.ended().await.close_code(), Some(1008));
        first.ping(1).await;
        // MQTT clients are not bridge sessions: unaffected.
        assert_broker_serves(v.port(), "bridge-busy");
        // Once the first leaves, a new session gets the slot.
        first.disconnect().await;
        let deadline = Instant::now() + T;
        loop {
            let (mut b, c) =
                Bridge::connect(v.http, json!({"op": "connect", "client_id": "next"})).await;
            if c["ok"] == true {
                b.ping(2).await;
                break;
            }
            assert_eq!(c["code"], "server_busy", "{c}");
            assert!(Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn auth_credentials_are_checked() {
    let v = Vigil::start_with_users(&[("u", "p", "admin")], |c| c);
    rt().block_on(async {
        for (what, frame) in [
            (
                "no credentials",
                json!({"op": "connect", "client_id": "a1"}),
            ),
            (
                "wrong password",
                json!({"op": "connect", "client_id": "a2", "username": "u", "password": "nope"}),
            ),
            (
                "unknown user",
                json!({"op": "connect", "client_id": "a3", "username": "x", "password": "p"}),
            ),
        ] {
            let (mut b, c) = Bridge::connect(v.http, frame).await;
            assert_eq!(c["ok"], false, "{what}: {c}");
            assert_eq!(c["code"], "not_authorized", "{what}: {c}");
            assert_eq!(b.ended().await.close_code(), Some(1008), "{what}");
        }
        let (mut b, c) = Bridge::connect(
            v.http,
            json!({"op": "connect", "client_id": "a4", "username": "u", "password": "p"}),
        )
        .await;
        assert_eq!(c["ok"], true, "{c}");
        b.publish(json!({"op": "publish", "topic": "auth/t", "payload": "in", "qos": 1, "id": 1}))
            .await;
        b.subscribed(&[("auth/#", 1)]).await;
        // A token is checked as the password.
        let (mut t, c) = Bridge::connect(
            v.http,
            json!({"op": "connect", "client_id": "a5", "username": "u", "token": "p"}),
        )
        .await;
        assert_eq!(c["ok"], true, "token as password: {c}");
        t.ping(1).await;
    });
}

// ---------------------------------------------------------------------------------------------
// The JavaScript client.

#[test]
fn javascript_client_test_script() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bridge_js");
    assert!(
        std::path::Path::new(dir).join("node_modules/ws").exists(),
        "ws missing: run ./scripts/setup (npm ci --prefix tests/bridge_js)"
    );
    let v = Vigil::start();
    let url = format!("ws://{}/ws", v.http);
    let child = std::process::Command::new("node")
        .args(["client_test.mjs", &url])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("node (Node.js) must be installed");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    // The script has its own 20 s timeout; this only guards against a hung node.
    let out = match rx.recv_timeout(Duration::from_secs(40)) {
        Ok(out) => out.expect("node output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("node client_test.mjs {url} hung");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "node client_test.mjs {url}: {}\nstdout:\n{stdout}\nstderr:\n{}\nvigil log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        v.log()
    );
}
