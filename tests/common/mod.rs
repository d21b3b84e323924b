//! Test harness: the real `vigil` binary on free ports, real mosquitto clients, and a raw
//! MQTT client for byte-exact protocol checks.
#![allow(dead_code)]

pub mod browser;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DEFAULT_CONFIG: &str = include_str!("../../broker.toml");

/// A running vigil process, killed on drop.
pub struct Vigil {
    child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub core: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: TempDir,
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vigil-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A process killed just before may still be writing here for a moment (a browser's
        // helper processes exit shortly after it): try again briefly before giving up.
        for _ in 0..20 {
            match std::fs::remove_dir_all(&self.0) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => return,
            }
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// Flips a byte near the end of `file`, as a torn write or a bad disk would.
pub fn damage(file: &std::path::Path) {
    let mut bytes = std::fs::read(file).expect("the file to damage");
    let last = bytes.len() - 10;
    bytes[last] ^= 0xFF;
    std::fs::write(file, bytes).expect("write the damaged file");
}

pub fn vigil_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vigil")
}

impl Vigil {
    /// Starts vigil with the default config.
    pub fn start() -> Vigil {
        Vigil::start_with(|c| c)
    }

    /// Starts vigil with a password file of `(user, password, role)` entries, made with
    /// `vigil passwd add`, and the default config passed through `edit`.
    pub fn start_with_users(
        users: &[(&str, &str, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> Vigil {
        let dir = TempDir::new();
        let file = dir.0.join("passwords");
        for (user, password, role) in users {
            let out = Command::new(vigil_bin())
                .args(["passwd", "add"])
                .arg(&file)
                .args([user, "--password", password, "--role", role])
                .output()
                .expect("vigil passwd");
            assert!(
                out.status.success(),
                "vigil passwd add {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = format!("password_file = {:?}", file.to_string_lossy());
        Vigil::start_in(dir, |c| edit(c.replacen("password_file = \"\"", &line, 1)))
    }

    /// Starts vigil with the default config passed through `edit`.
    pub fn start_with(edit: impl FnOnce(String) -> String) -> Vigil {
        Vigil::start_in(TempDir::new(), edit)
    }

    /// Starts vigil with `[persistence] dir` in `data` (which outlives the instance, so the
    /// next one finds the files), then `edit` on that configuration.
    pub fn start_persistent(data: &TempDir, edit: impl FnOnce(String) -> String) -> Vigil {
        let dir = format!("{:?}", data.0.to_string_lossy());
        Vigil::start_with(|c| edit(vigil::config::set_value(&c, "persistence", "dir", &dir)))
    }

    fn start_in(dir: TempDir, edit: impl FnOnce(String) -> String) -> Vigil {
        let path = dir.0.join("broker.toml");
        std::fs::write(&path, edit(DEFAULT_CONFIG.to_string())).expect("write config");
        let mut child = Command::new(vigil_bin())
            .args(["--config", path.to_str().unwrap_or_default()])
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .env(
                "RUST_LOG",
                std::env::var("VIGIL_TEST_LOG").unwrap_or_else(|_| "info,rumqttd=off".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vigil");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let clean = strip_ansi(&line);
                log2.lock().unwrap().push_str(&clean);
                log2.lock().unwrap().push('\n');
                let _ = tx.send(clean);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut core = None;
        loop {
            let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("vigil did not start; log:\n{}", log.lock().unwrap());
                }
            };
            if let Some(addr) = field(&line, "core") {
                core = Some(addr);
            }
            if line.contains("vigil listening") {
                let mqtt = field(&line, "mqtt").expect("mqtt addr");
                let http = field(&line, "http").expect("http addr");
                return Vigil {
                    child,
                    mqtt,
                    http,
                    core: core.expect("core addr logged before listening"),
                    log,
                    _dir: dir,
                };
            }
        }
    }

    /// The directory holding this instance's config (and password file, if any).
    pub fn dir(&self) -> &std::path::Path {
        &self._dir.0
    }

    /// Runs a `vigil` subcommand (e.g. `export`) with this instance's configuration, to
    /// completion.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(vigil_bin())
            .arg("--config")
            .arg(self.dir().join("broker.toml"))
            .args(args)
            .output()
            .expect("run vigil")
    }

    pub fn port(&self) -> u16 {
        self.mqtt.port()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits; returns the exit status and how long the exit took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
                panic!("vigil did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Vigil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what vigil logged (set VIGIL_TEST_LOG for more detail).
        if std::thread::panicking() {
            if let Ok(log) = self.log.lock() {
                eprintln!("--- vigil log ---\n{log}--- end of vigil log ---");
            }
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn field(line: &str, name: &str) -> Option<SocketAddr> {
    let key = format!("{name}=");
    let start = line.find(&key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// mosquitto clients.

/// A running `mosquitto_sub` printing `MSG|topic|qos|retain|payload` lines.
pub struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub messages: Vec<String>,
    pub debug: Vec<String>,
}

pub const SUB_FORMAT: &str = "MSG|%t|%q|%r|%p";

impl Sub {
    /// Starts `mosquitto_sub -d` with `args` and waits for its SUBACK.
    pub fn start(port: u16, args: &[&str]) -> Sub {
        // stdbuf: mosquitto_sub's debug lines are block-buffered when stdout is a pipe.
        let mut cmd = Command::new("stdbuf");
        cmd.args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
        ]);
        if !args.contains(&"-F") {
            cmd.args(["-F", SUB_FORMAT]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut sub = Sub {
            child,
            lines: rx,
            messages: Vec::new(),
            debug: Vec::new(),
        };
        sub.wait_for(|l| l.contains("received SUBACK"), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("mosquitto_sub got no SUBACK: {:?}", sub.debug));
        sub
    }

    /// Reads lines until one satisfies `pred` (returned) or the timeout passes.
    pub fn wait_for(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            if let Some(msg) = line.strip_prefix("MSG|") {
                self.messages.push(msg.to_string());
            } else {
                self.debug.push(line.clone());
            }
            if pred(&line) {
                return Some(line);
            }
        }
    }

    /// Waits until `n` messages have arrived (or the timeout), returning all received.
    pub fn expect_messages(&mut self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        while self.messages.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wait_for(|l| l.starts_with("MSG|"), left).is_none() {
                break;
            }
        }
        self.messages.clone()
    }

    /// Collects whatever arrives within `window`.
    pub fn drain(&mut self, window: Duration) -> Vec<String> {
        let _ = self.wait_for(|_| false, window);
        self.messages.clone()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `mosquitto_pub` to completion; panics with its output on failure.
pub fn publish(port: u16, args: &[&str]) -> Output {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Samples `sample` every 250 ms until `done` holds or `limit` passes; returns the last sample.
pub fn poll<T>(limit: Duration, mut sample: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let last = sample();
        if done(&last) || Instant::now() >= deadline {
            return last;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Publishes each of `lines` as one message with a single `mosquitto_pub -l` (`args` give the
/// topic, QoS and anything else); panics with its output on failure.
pub fn publish_lines<L: std::fmt::Display>(
    port: u16,
    args: &[&str],
    lines: impl IntoIterator<Item = L>,
) {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-l"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    {
        let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
        for l in lines {
            writeln!(stdin, "{l}").expect("write a line to mosquitto_pub");
        }
    }
    let out = child.wait_with_output().expect("mosquitto_pub exits");
    assert!(
        out.status.success(),
        "mosquitto_pub -l {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `mosquitto_pub` and returns its output whatever the status.
pub fn try_publish(port: u16, args: &[&str]) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("mosquitto_pub")
}

// ---------------------------------------------------------------------------------------------
// A raw, blocking MQTT client that writes hand-built packets.

pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A received packet: first header byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub header: u8,
    pub body: Vec<u8>,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }
}

pub fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// Options for a hand-built CONNECT.
#[derive(Clone)]
pub struct ConnectOpts<'a> {
    pub v5: bool,
    pub client_id: &'a str,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<(&'a str, &'a [u8], u8, bool)>,
    pub user: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

impl<'a> ConnectOpts<'a> {
    pub fn v311(client_id: &'a str) -> Self {
        ConnectOpts {
            v5: false,
            client_id,
            clean: true,
            keep_alive: 30,
            will: None,
            user: None,
            password: None,
        }
    }
}

pub fn connect_packet(o: &ConnectOpts<'_>) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(if o.v5 { 5 } else { 4 });
    let mut flags = 0u8;
    if o.clean {
        flags |= 0x02;
    }
    if let Some((_, _, qos, retain)) = o.will {
        flags |= 0x04 | (qos << 3) | if retain { 0x20 } else { 0 };
    }
    if o.user.is_some() {
        flags |= 0x80;
    }
    if o.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend(o.keep_alive.to_be_bytes());
    if o.v5 {
        body.push(0);
    }
    body.extend(string(o.client_id.as_bytes()));
    if let Some((topic, payload, _, _)) = o.will {
        if o.v5 {
            body.push(0);
        }
        body.extend(string(topic.as_bytes()));
        body.extend(string(payload));
    }
    if let Some(u) = o.user {
        body.extend(string(u.as_bytes()));
    }
    if let Some(p) = o.password {
        body.extend(string(p));
    }
    packet(0x10, &body)
}

pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
    dup: bool,
) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    if qos > 0 {
        body.extend(pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | ((dup as u8) << 3) | (qos << 1) | retain as u8, &body)
}

/// Publishes retained messages (topic, payload, QoS 0 or 1) on one 3.1.1 connection and
/// returns once every one is stored: each QoS 1 one is acknowledged, and so is a QoS 1
/// publish sent behind them all (the broker handles a connection's publishes in order).
pub fn store_retained(addr: SocketAddr, client_id: &str, messages: &[(String, Vec<u8>, u8)]) {
    const LAST: u16 = 60_000;
    assert!(messages.len() < LAST as usize, "packet ids would wrap");
    let mut c = Raw::connected(addr, &ConnectOpts::v311(client_id));
    for (i, (topic, payload, qos)) in messages.iter().enumerate() {
        c.send(&publish_packet(
            topic,
            payload,
            *qos,
            true,
            1 + i as u16,
            false,
        ));
    }
    c.send(&publish_packet(
        "store-retained/last",
        b"",
        1,
        false,
        LAST,
        false,
    ));
    let owed = messages.iter().filter(|m| m.2 == 1).count() + 1;
    for _ in 0..owed {
        let ack = c.recv().expect("PUBACK");
        assert_eq!(ack.kind(), 4, "expected PUBACK, got {ack:?}");
    }
}

pub fn subscribe_packet(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (f, q) in filters {
        body.extend(string(f.as_bytes()));
        body.push(*q);
    }
    packet(0x82, &body)
}

pub fn ack_packet(kind: u8, pkid: u16) -> Vec<u8> {
    let flags = if kind == 6 { 0x02 } else { 0 };
    packet((kind << 4) | flags, &pkid.to_be_bytes())
}

/// A parsed PUBLISH: (topic, qos, retain, dup, pkid, payload), 3.1.1 layout.
pub fn parse_publish(p: &Packet) -> (String, u8, bool, bool, u16, Vec<u8>) {
    assert_eq!(p.kind(), 3, "not a PUBLISH: {p:?}");
    let qos = (p.header >> 1) & 3;
    let tl = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
    let topic = String::from_utf8(p.body[2..2 + tl].to_vec()).unwrap();
    let mut pos = 2 + tl;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([p.body[pos], p.body[pos + 1]]);
        pos += 2;
    }
    (
        topic,
        qos,
        p.header & 1 == 1,
        p.header & 8 == 8,
        pkid,
        p.body[pos..].to_vec(),
    )
}

impl Raw {
    pub fn open(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and returns the CONNACK.
    pub fn connect(addr: SocketAddr, o: &ConnectOpts<'_>) -> (Raw, Packet) {
        let mut raw = Raw::open(addr);
        raw.send(&connect_packet(o));
        let ack = raw.recv().expect("CONNACK");
        assert_eq!(ack.kind(), 2, "expected CONNACK, got {ack:?}");
        (raw, ack)
    }

    /// Connects `client_id` (3.1.1) without a clean session, asserts acceptance, and says
    /// whether the broker had the session (CONNACK session present).
    pub fn resume(addr: SocketAddr, client_id: &str) -> (Raw, bool) {
        let o = ConnectOpts {
            clean: false,
            ..ConnectOpts::v311(client_id)
        };
        let (raw, ack) = Raw::connect(addr, &o);
        assert_eq!(ack.body[1], 0, "CONNACK refused: {ack:?}");
        (raw, ack.body[0] & 1 == 1)
    }

    /// Connects and asserts acceptance.
    pub fn connected(addr: SocketAddr, o: &ConnectOpts<'_>) -> Raw {
        let (raw, ack) = Raw::connect(addr, o);
        assert_eq!(ack.body[1], 0, "CONNACK refused: {ack:?}");
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends, ignoring a write error (the server may close before reading everything).
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Next packet, or `None` on timeout or close.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Packet> {
        self.stream.set_read_timeout(Some(timeout)).ok();
        loop {
            if let Some(p) = self.try_parse() {
                return Some(p);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub fn recv(&mut self) -> Option<Packet> {
        self.recv_timeout(Duration::from_secs(5))
    }

    fn try_parse(&mut self) -> Option<Packet> {
        if self.buf.len() < 2 {
            return None;
        }
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut pos = 1;
        loop {
            let b = *self.buf.get(pos)?;
            len += (b & 0x7F) as usize * mult;
            mult *= 128;
            pos += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < pos + len {
            return None;
        }
        let header = self.buf[0];
        let body = self.buf[pos..pos + len].to_vec();
        self.buf.drain(..pos + len);
        Some(Packet { header, body })
    }

    /// True when the server closed the connection (EOF) within `timeout`.
    /// Bytes received and not yet parsed into a packet (what `closed_within` read).
    pub fn unparsed(&self) -> &[u8] {
        &self.buf
    }

    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .ok();
        while Instant::now() < deadline {
            let mut chunk = [0u8; 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// Proves the broker still serves: a fresh subscriber and publisher exchange a message.
pub fn assert_broker_serves(port: u16, tag: &str) {
    let topic = format!("health/{tag}");
    let mut sub = Sub::start(port, &["-t", &topic, "-q", "1"]);
    publish(port, &["-t", &topic, "-m", "alive", "-q", "1"]);
    let got = sub.expect_messages(1, Duration::from_secs(5));
    assert_eq!(
        got,
        vec![format!("{topic}|1|0|alive")],
        "broker no longer serves ({tag})"
    );
}

/// One sample of a `/metrics` page, e.g. `metric(&page, "vigil_bridge_sessions")`: the line
/// that is exactly `name value` (labelled samples include their labels in `name`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A plain HTTP GET on the web port; returns the whole response.
pub fn http_get(http: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(http).expect("connect to the web port");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
