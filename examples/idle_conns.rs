//! Opens N idle MQTT 3.1.1 connections (each optionally with one subscription) and holds them,
//! so a script can read the broker's memory per connection.
//!
//! ```text
//! cargo run --release --example idle_conns -- --port 1883 --count 2000 --hold-secs 10 [--subscribe] [--parallel N] [--gap-ms M]
//! ```
//! `--parallel N` connects N clients at once (default 1: one after another); `--gap-ms M`
//! makes each of them pause M ms before each connection (clients trickling in).
//! Prints `connected N in S s` once every CONNACK (and SUBACK) has arrived, then the median and
//! 99th percentile of the time from the TCP connect to the CONNACK and from SUBSCRIBE to SUBACK,
//! then holds.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![header, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// Connects client `i` (CONNECT, and SUBSCRIBE when asked) and returns its open socket, the
/// time from the TCP connect to the CONNACK and from SUBSCRIBE to SUBACK.
async fn connect(port: u16, i: usize, subscribe: bool) -> (TcpStream, Duration, Duration) {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    body.extend(string(
        format!("idle-{}-{i}", std::process::id()).as_bytes(),
    ));
    s.write_all(&packet(0x10, &body))
        .await
        .expect("write CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("CONNACK");
    assert_eq!(ack[3], 0, "refused");
    let connack = t0.elapsed();
    let t1 = Instant::now();
    if subscribe {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend(string(format!("idle/{i}").as_bytes()));
        body.push(1);
        s.write_all(&packet(0x82, &body))
            .await
            .expect("write SUBSCRIBE");
        let mut suback = [0u8; 5];
        s.read_exact(&mut suback).await.expect("SUBACK");
    }
    (s, connack, t1.elapsed())
}

/// Median and 99th percentile in microseconds.
fn percentiles(mut d: Vec<Duration>) -> (u128, u128) {
    d.sort_unstable();
    let at = |q: f64| d.get(((d.len() as f64 * q) as usize).min(d.len().saturating_sub(1)));
    let us = |x: Option<&Duration>| x.map_or(0, |x| x.as_micros());
    (us(at(0.5)), us(at(0.99)))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let port: u16 = get("--port", "1883").parse().expect("--port");
    let count: usize = get("--count", "2000").parse().expect("--count");
    let hold: u64 = get("--hold-secs", "10").parse().expect("--hold-secs");
    let parallel: usize = get("--parallel", "1").parse().expect("--parallel");
    let subscribe = args.iter().any(|a| a == "--subscribe");
    // A pause before each connection of a worker: clients trickling in rather than a loop.
    let gap = Duration::from_micros(
        (get("--gap-ms", "0").parse::<f64>().expect("--gap-ms") * 1000.0) as u64,
    );
    let start = Instant::now();
    // `parallel` clients connect at once, each taking the next index when done (a fleet
    // reconnecting together); 1 connects them one after another.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..parallel.max(1))
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut conns = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return conns;
                    }
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    conns.push(connect(port, i, subscribe).await);
                }
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(count);
    let (mut connacks, mut subacks) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for w in workers {
        for (s, c, sub) in w.await.expect("connecting task") {
            conns.push(s);
            connacks.push(c);
            subacks.push(sub);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (c50, c99) = percentiles(connacks);
    let (s50, s99) = percentiles(subacks);
    println!("connected {count} in {elapsed:.2} s");
    println!("connect to CONNACK p50 {c50} us p99 {c99} us; SUBSCRIBE to SUBACK p50 {s50} us p99 {s99} us");
    tokio::time::sleep(Duration::from_secs(hold)).await;
    drop(conns);
}
