//! Stores N retained messages on N topics of any MQTT 3.1.1 broker, then times how long a new
//! wildcard subscription takes to receive them, and how many arrive.
//!
//! ```text
//! cargo run --release --example retained_bench -- --port 1883 [--topics 20000] [--payload 100] [--qos 1] [--rounds 3]
//! ```
//! The publisher sends QoS 1 publishes with up to 100 in flight. Each round connects a new
//! subscriber to `rb/<run>/+` at `--qos`, acknowledges what it gets (QoS 1 PUBACK, QoS 2
//! PUBREC/PUBCOMP), and stops when all N have arrived or nothing came for 2 s. Prints
//! `stored N in S ms` and per round `qos Q: got M of N in T ms`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![header];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

/// A blocking MQTT 3.1.1 connection that reads whole packets.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(port: u16, id: &str) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut c = Conn { s, buf: Vec::new() };
        let mut body = string(b"MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 60]);
        body.extend(string(id.as_bytes()));
        c.send(&packet(0x10, &body));
        let (kind, body) = c.next(Duration::from_secs(5)).expect("CONNACK");
        assert!(kind >> 4 == 2 && body[1] == 0, "refused");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
    }

    /// The next packet (first byte, body), or `None` when nothing came within `wait`.
    fn next(&mut self, wait: Duration) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (mut len, mut mul, mut i) = (0usize, 1usize, 1usize);
                let mut complete = false;
                while i < self.buf.len() {
                    let b = self.buf[i];
                    len += (b & 0x7F) as usize * mul;
                    mul *= 128;
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if complete && self.buf.len() >= i + len {
                    let first = self.buf[0];
                    let body = self.buf[i..i + len].to_vec();
                    self.buf.drain(..i + len);
                    return Some((first, body));
                }
            }
            self.s.set_read_timeout(Some(wait)).expect("timeout");
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let port: u16 = get("--port", "1883").parse().expect("--port");
    let topics: usize = get("--topics", "20000").parse().expect("--topics");
    let size: usize = get("--payload", "100").parse().expect("--payload");
    let qos: u8 = get("--qos", "1").parse().expect("--qos");
    let rounds: usize = get("--rounds", "3").parse().expect("--rounds");
    let run = format!("{}-{}", std::process::id(), qos);
    let payload = vec![b'r'; size];

    let mut publisher = Conn::open(port, &format!("rb-pub-{run}"));
    let started = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < topics {
        while sent < topics && sent - acked < 100 {
            let pkid = (sent % 60_000 + 1) as u16;
            let mut body = string(format!("rb/{run}/{sent}").as_bytes());
            body.extend_from_slice(&pkid.to_be_bytes());
            body.extend_from_slice(&payload);
            publisher.send(&packet(0x33, &body));
            sent += 1;
        }
        match publisher.next(Duration::from_secs(5)) {
            Some((first, _)) if first >> 4 == 4 => acked += 1,
            Some(_) => {}
            None => panic!("no PUBACK within 5 s ({acked} of {topics})"),
        }
    }
    println!("stored {topics} in {} ms", started.elapsed().as_millis());

    let filter = format!("rb/{run}/+");
    for round in 0..rounds {
        let mut sub = Conn::open(port, &format!("rb-sub-{run}-{round}"));
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend(string(filter.as_bytes()));
        body.push(qos);
        let started = Instant::now();
        sub.send(&packet(0x82, &body));
        let mut got = HashSet::new();
        let mut last = started;
        while got.len() < topics {
            let Some((first, body)) = sub.next(Duration::from_secs(2)) else {
                break;
            };
            match first >> 4 {
                3 => {
                    let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                    got.insert(body[2..2 + tl].to_vec());
                    last = Instant::now();
                    let q = (first >> 1) & 3;
                    if q > 0 {
                        let id = [body[2 + tl], body[3 + tl]];
                        sub.send(&packet(if q == 1 { 0x40 } else { 0x50 }, &id));
                    }
                }
                5 => sub.send(&packet(0x62, &body[..2])),
                _ => {}
            }
        }
        println!(
            "qos {qos}: got {} of {topics} in {:.1} ms",
            got.len(),
            (last - started).as_secs_f64() * 1000.0
        );
    }
}
