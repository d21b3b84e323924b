//! Persistent sessions across a broker restart, for any MQTT 3.1.1 broker.
//!
//! ```text
//! cargo run --release --example session_bench -- --port 1883 --sessions 10000 setup
//! cargo run --release --example session_bench -- --port 1883 --sessions 10000 queue   # optional
//! (restart the broker)
//! cargo run --release --example session_bench -- --port 1883 ready
//! cargo run --release --example session_bench -- --port 1883 --sessions 10000 check
//! ```
//! `setup` opens N persistent sessions (`sb-<i>`, Clean Session 0) on 4 threads; each
//! subscribes at QoS 1 to `sb/<i>/cmd` and `sb/all` and leaves with DISCONNECT. `ready` tries
//! to connect every 10 ms and prints how long after its own start the broker first accepted
//! a client. `queue` (before the restart) and `check` (after it) each publish one QoS 1 message
//! to `sb/all` and one to each `sb/<i>/cmd`; `check` then resumes every session (Clean Session
//! 0) and counts those the broker still had (CONNACK session present) and the queued messages
//! that arrive (2 per session, 4 with `--per-session 4` after a `queue`), ending each session
//! with a clean connect so a second run starts from nothing.

#[path = "support/bench.rs"]
mod bench;

use std::time::{Duration, Instant};

use bench::{arg as get, Conn};
use bytes::Bytes;
use vigil::mqtt::{self, Version};

const THREADS: usize = 4;

fn main() {
    let port: u16 = get("--port", "1883").parse().expect("--port");
    let sessions: usize = get("--sessions", "10000").parse().expect("--sessions");
    match std::env::args().next_back().as_deref() {
        Some("setup") => setup(port, sessions),
        Some("ready") => ready(port),
        Some("queue") => {
            let started = Instant::now();
            let n = publish_to_all(port, sessions, "before");
            println!(
                "queue: {n} messages in {} ms",
                started.elapsed().as_millis()
            );
        }
        Some("check") => {
            let per_session = get("--per-session", "2").parse().expect("--per-session");
            check(port, sessions, per_session)
        }
        _ => panic!("last argument: setup, queue, ready or check"),
    }
}

/// Runs `work(i)` for i in 0..n on [`THREADS`] threads.
fn on_threads(n: usize, work: impl Fn(usize) + Sync) {
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let work = &work;
            s.spawn(move || (t..n).step_by(THREADS).for_each(work));
        }
    });
}

fn setup(port: u16, sessions: usize) {
    let started = Instant::now();
    on_threads(sessions, |i| {
        let (mut c, _) = Conn::open_session(port, &format!("sb-{i}"), false);
        let filters = [
            (Bytes::from(format!("sb/{i}/cmd")), 1),
            (Bytes::from_static(b"sb/all"), 1),
        ];
        mqtt::put_core_subscribe(&mut c.out, 1, &filters);
        c.flush();
        match c.next(Duration::from_secs(10)) {
            Some(frame) if frame.kind() == mqtt::SUBACK => {}
            other => panic!("sb-{i}: no SUBACK: {other:?}"),
        }
        mqtt::put_disconnect(&mut c.out, Version::V311, 0);
        c.flush();
    });
    println!(
        "setup: {sessions} sessions in {} ms",
        started.elapsed().as_millis()
    );
}

fn ready(port: u16) {
    let started = Instant::now();
    // A broker that accepts but does not answer yet makes `Conn::open` panic: no message.
    std::panic::set_hook(Box::new(|_| {}));
    loop {
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && std::panic::catch_unwind(|| Conn::open(port, "sb-ready")).is_ok();
        if up {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("ready after {} ms", started.elapsed().as_millis());
}

/// Publishes `payload` at QoS 1 to `sb/all` and to every `sb/<i>/cmd`; returns how many.
fn publish_to_all(port: u16, sessions: usize, payload: &str) -> usize {
    let mut publisher = Conn::open(port, "sb-publisher");
    let topics: Vec<String> = std::iter::once("sb/all".to_string())
        .chain((0..sessions).map(|i| format!("sb/{i}/cmd")))
        .collect();
    publisher.publish_all(&topics, payload.as_bytes(), false, Duration::from_secs(10));
    topics.len()
}

fn check(port: u16, sessions: usize, per_session: usize) {
    publish_to_all(port, sessions, "queued");
    let present = std::sync::atomic::AtomicUsize::new(0);
    let messages = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    on_threads(sessions, |i| {
        let id = format!("sb-{i}");
        let (mut c, was_there) = Conn::open_session(port, &id, false);
        if was_there {
            present.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut got = 0;
            while got < per_session {
                let Some(frame) = c.next(Duration::from_secs(2)) else {
                    break;
                };
                if frame.kind() == mqtt::PUBLISH {
                    let p = mqtt::parse_core_publish(&frame).expect("a PUBLISH");
                    mqtt::put_ack(&mut c.out, mqtt::PUBACK, p.pkid);
                    got += 1;
                }
            }
            c.flush();
            messages.fetch_add(got, std::sync::atomic::Ordering::Relaxed);
        }
        mqtt::put_disconnect(&mut c.out, Version::V311, 0);
        c.flush();
        drop(c);
        // A clean session ends the persistent one.
        drop(Conn::open(port, &id));
    });
    println!(
        "check: {} of {sessions} sessions present, {} of {} queued messages in {} ms",
        present.into_inner(),
        messages.into_inner(),
        per_session * sessions,
        started.elapsed().as_millis()
    );
}
