//! What the embedded core keeps per distinct name a client chooses, measured from outside:
//! the broker's resident memory (`/proc/PID/status`) after rounds of
//!
//! - `ids`: connect-disconnect cycles, each with a client id never used before (as MQTT.js
//!   and mosquitto_pub pick them);
//! - `topics`: QoS 0 publishes, each to a topic name never used before, that all match a
//!   filter subscribed once and left (`growth/+`);
//! - `filters`: subscriptions to a filter never used before, each left at once, then 64 KiB
//!   published to each filter's topic;
//! - `names`: QoS 1 publishes of 10 KiB, one at a time (each PUBACK awaited, so each arrives
//!   in a read of its own), each to a topic name never used before that no filter matches.
//!   The core keeps nothing for these; what grows is what the broker keeps per name it
//!   counts (vigil's `limits.max_distinct_topics` set);
//! - `retained`: the same with 100 KiB retained payloads: what the broker keeps of retained
//!   messages (vigil caps it at `limits.max_retained_bytes`);
//! - `sessions`: persistent sessions (clean session false), each with a client id never used
//!   before, subscribed at QoS 1 to one filter shared by all (`growth/sessions`), left
//!   offline: what the broker keeps per offline session (vigil caps their number at
//!   `limits.max_persistent_sessions`).
//!
//! ```sh
//! cargo run --release --example core_growth -- --port 1883 --pid $(pgrep -x vigil) \
//!     --what ids --rounds 8 --per-round 20000
//! ```
//!
//! Works against any MQTT 3.1.1 broker that allows anonymous clients (mosquitto too). One
//! line per round: `ROUND what=ids n=20000 total=40000 rss_mb=23.15`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn main() {
    let mut port = 1883u16;
    let mut pid = 0u32;
    let mut what = String::from("ids");
    let mut rounds = 8usize;
    let mut per_round = 20_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--port" => port = value().parse().unwrap_or_else(|_| usage("bad --port")),
            "--pid" => pid = value().parse().unwrap_or_else(|_| usage("bad --pid")),
            "--what" => what = value(),
            "--rounds" => rounds = value().parse().unwrap_or_else(|_| usage("bad --rounds")),
            "--per-round" => {
                per_round = value().parse().unwrap_or_else(|_| usage("bad --per-round"))
            }
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if pid == 0 {
        usage("--pid is required");
    }
    let tag = std::process::id();
    println!("START what={what} rss_mb={:.2}", rss_mb(pid));
    if what == "topics" {
        let mut s = connect(port, &format!("growth-sub-{tag}"));
        s.write_all(&subscribe(1, "growth/+")).expect("subscribe");
        drop(s);
    }
    for round in 0..rounds {
        let base = round * per_round;
        match what.as_str() {
            "ids" => {
                for i in 0..per_round {
                    let mut s = connect(port, &format!("growth-{tag}-{}", base + i));
                    let _ = s.write_all(&[0xE0, 0]);
                }
            }
            "topics" => {
                let mut s = connect(port, &format!("growth-pub-{tag}"));
                let mut batch = Vec::new();
                for i in 0..per_round {
                    batch.extend(publish(&format!("growth/{tag}-{}", base + i), b"x"));
                    if batch.len() > 64 * 1024 {
                        s.write_all(&batch).expect("publish");
                        batch.clear();
                    }
                }
                batch.extend([0xE0, 0]);
                s.write_all(&batch).expect("publish");
            }
            "filters" => {
                let payload = vec![b'x'; 64 * 1024];
                for i in 0..per_round {
                    let filter = format!("growth/f-{tag}-{}", base + i);
                    let mut s = connect(port, &format!("growth-f-{tag}"));
                    s.write_all(&subscribe(1, &filter)).expect("subscribe");
                    let mut ack = [0u8; 5];
                    let _ = s.read_exact(&mut ack);
                    let _ = s.write_all(&[0xE0, 0]);
                    drop(s);
                    let mut p = connect(port, &format!("growth-fp-{tag}"));
                    let mut out = publish(&filter, &payload);
                    out.extend([0xE0, 0]);
                    p.write_all(&out).expect("publish");
                }
            }
            "names" | "retained" => {
                let retain = what == "retained";
                let payload = vec![b'x'; if retain { 100 * 1024 } else { 10 * 1024 }];
                let mut s = connect(port, &format!("growth-n-{tag}"));
                for i in 0..per_round {
                    let pkid = (i % 65_535 + 1) as u16;
                    let topic = format!("growth/n-{tag}-{}", base + i);
                    s.write_all(&publish_qos1(&topic, pkid, retain, &payload))
                        .expect("publish");
                    let mut ack = [0u8; 4];
                    s.read_exact(&mut ack).expect("PUBACK");
                }
                let _ = s.write_all(&[0xE0, 0]);
            }
            "sessions" => {
                for i in 0..per_round {
                    let id = format!("growth-s-{tag}-{}", base + i);
                    let mut s = connect_with(port, &id, false);
                    s.write_all(&subscribe_qos(1, "growth/sessions", 1))
                        .expect("subscribe");
                    let mut ack = [0u8; 5];
                    let _ = s.read_exact(&mut ack);
                    let _ = s.write_all(&[0xE0, 0]);
                }
            }
            other => usage(&format!("unknown --what {other}")),
        }
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "ROUND what={what} n={per_round} total={} rss_mb={:.2}",
            base + per_round,
            rss_mb(pid)
        );
    }
}

fn usage(why: &str) -> ! {
    eprintln!("{why}\nusage: core_growth --port P --pid PID [--what ids|topics|filters|names|retained|sessions] [--rounds N] [--per-round N]");
    std::process::exit(2)
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            return;
        }
    }
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// A 3.1.1 clean-session connection, CONNACK read.
fn connect(port: u16, client_id: &str) -> TcpStream {
    connect_with(port, client_id, true)
}

fn connect_with(port: u16, client_id: &str, clean: bool) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the broker");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut body = string("MQTT");
    body.extend([4, if clean { 2 } else { 0 }, 0, 60]);
    body.extend(string(client_id));
    s.write_all(&packet(0x10, &body)).expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack[3], 0, "connection refused: {connack:?}");
    s
}

fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

fn publish_qos1(topic: &str, pkid: u16, retain: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    body.extend(pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32 | u8::from(retain), &body)
}

fn subscribe(pkid: u16, filter: &str) -> Vec<u8> {
    subscribe_qos(pkid, filter, 0)
}

fn subscribe_qos(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend(string(filter));
    body.push(qos);
    packet(0x82, &body)
}
