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
use std::time::{Duration, Instant};

use bytes::Bytes;
use vigil::mqtt;

#[path = "support/bench.rs"]
mod bench;
use bench::{arg as get, Conn};

fn main() {
    let port: u16 = get("--port", "1883").parse().expect("--port");
    let topics: usize = get("--topics", "20000").parse().expect("--topics");
    let size: usize = get("--payload", "100").parse().expect("--payload");
    let qos: u8 = get("--qos", "1").parse().expect("--qos");
    let rounds: usize = get("--rounds", "3").parse().expect("--rounds");
    let run = format!("{}-{}", std::process::id(), qos);
    let payload = vec![b'r'; size];

    let mut publisher = Conn::open(port, &format!("rb-pub-{run}"));
    let started = Instant::now();
    let names: Vec<String> = (0..topics).map(|i| format!("rb/{run}/{i}")).collect();
    publisher.publish_all(&names, &payload, true, Duration::from_secs(5));
    println!("stored {topics} in {} ms", started.elapsed().as_millis());

    let filter = format!("rb/{run}/+");
    for round in 0..rounds {
        let mut sub = Conn::open(port, &format!("rb-sub-{run}-{round}"));
        mqtt::put_core_subscribe(&mut sub.out, 1, &[(Bytes::from(filter.clone()), qos)]);
        let started = Instant::now();
        sub.flush();
        let mut got = HashSet::new();
        let mut last = started;
        while got.len() < topics {
            let Some(frame) = sub.next(Duration::from_secs(2)) else {
                break;
            };
            match frame.kind() {
                mqtt::PUBLISH => {
                    let p = mqtt::parse_core_publish(&frame).expect("a PUBLISH");
                    got.insert(p.topic);
                    last = Instant::now();
                    match p.qos {
                        1 => mqtt::put_ack(&mut sub.out, mqtt::PUBACK, p.pkid),
                        2 => mqtt::put_ack(&mut sub.out, mqtt::PUBREC, p.pkid),
                        _ => {}
                    }
                }
                mqtt::PUBREL => {
                    let (pkid, _) = mqtt::parse_ack(&frame).expect("a PUBREL");
                    mqtt::put_ack(&mut sub.out, mqtt::PUBCOMP, pkid);
                }
                _ => {}
            }
            sub.flush();
        }
        println!(
            "qos {qos}: got {} of {topics} in {:.1} ms",
            got.len(),
            (last - started).as_secs_f64() * 1000.0
        );
    }
}
