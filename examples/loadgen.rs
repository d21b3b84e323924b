//! MQTT load generator: N publishers, M subscribers, one broker; prints delivered messages per
//! second and end-to-end latency percentiles. Works against any MQTT 3.1.1 broker, so vigil,
//! the bare rumqttd core and mosquitto are measured by the same client code.
//!
//! ```text
//! cargo run --release --example loadgen -- --port 1883 --publishers 1 --subscribers 1 \
//!     --qos 1 --size 100 --count 200000 [--rate 10000] [--inflight 100] \
//!     [--user U --password P] [--tcp-nodelay on]
//! ```
//!
//! Clients keep rumqttc's default of Nagle on (as libmosquitto does); `--tcp-nodelay on` turns it
//! off for every client.
//!
//! Every publisher sends `count` messages to `<prefix>/<publisher>`; every subscriber
//! subscribes to `<prefix>/#`, so each message is delivered `subscribers` times. Payloads carry
//! the send time, so latency is measured from publish call to delivery. Output is one line of
//! `key=value` pairs for scripts, preceded by a human-readable summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[derive(Debug, Clone)]
struct Args {
    host: String,
    port: u16,
    publishers: usize,
    subscribers: usize,
    qos: u8,
    size: usize,
    count: u64,
    rate: Option<u64>,
    inflight: u16,
    prefix: String,
    label: String,
    /// Credentials for brokers that require them (`--user`, `--password`).
    user: Option<String>,
    password: Option<String>,
    tcp_nodelay: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 1883,
        publishers: 1,
        subscribers: 1,
        qos: 0,
        size: 100,
        count: 100_000,
        rate: None,
        inflight: 100,
        prefix: format!("bench/{}", std::process::id()),
        label: String::new(),
        user: None,
        password: None,
        tcp_nodelay: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--host" => a.host = v,
            "--port" => a.port = v.parse().expect("--port"),
            "--publishers" => a.publishers = v.parse().expect("--publishers"),
            "--subscribers" => a.subscribers = v.parse().expect("--subscribers"),
            "--qos" => a.qos = v.parse().expect("--qos"),
            "--size" => a.size = v.parse().expect("--size"),
            "--count" => a.count = v.parse().expect("--count"),
            "--rate" => a.rate = Some(v.parse().expect("--rate (messages/s over all publishers)")),
            "--inflight" => a.inflight = v.parse().expect("--inflight"),
            "--prefix" => a.prefix = v,
            "--label" => a.label = v,
            "--user" => a.user = Some(v),
            "--password" => a.password = Some(v),
            "--tcp-nodelay" => a.tcp_nodelay = v == "on",
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    assert!(
        a.size >= 16,
        "--size must be at least 16 (the payload carries a timestamp)"
    );
    a
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn options(args: &Args, id: String) -> MqttOptions {
    let mut o = MqttOptions::new(id, args.host.clone(), args.port);
    if let (Some(user), Some(password)) = (&args.user, &args.password) {
        o.set_credentials(user.clone(), password.clone());
    }
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(args.inflight);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let base = Instant::now();
    let expected = args.count * args.publishers as u64 * args.subscribers as u64;
    let received = Arc::new(AtomicU64::new(0));
    let last_receive = Arc::new(AtomicU64::new(0));

    // Subscribers first; each reports its latencies (microseconds) when done.
    let mut sub_tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.subscribers.max(1));
    for s in 0..args.subscribers {
        let args = args.clone();
        let received = received.clone();
        let last_receive = last_receive.clone();
        let ready = ready_tx.clone();
        sub_tasks.push(tokio::spawn(async move {
            let per_sub = args.count * args.publishers as u64;
            let (client, mut el) = AsyncClient::new(options(&args, format!("lg-sub-{s}-{}", std::process::id())), 1000);
            el.network_options.set_tcp_nodelay(args.tcp_nodelay);
            client.subscribe(format!("{}/#", args.prefix), qos(args.qos)).await.expect("subscribe");
            let mut latencies: Vec<u32> = Vec::with_capacity(per_sub as usize);
            let mut got = 0u64;
            loop {
                let ev = tokio::time::timeout(Duration::from_secs(5), el.poll()).await;
                match ev {
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                        let _ = ready.send(()).await;
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let now = base.elapsed().as_nanos() as u64;
                        if p.payload.len() >= 8 {
                            let mut ts = [0u8; 8];
                            ts.copy_from_slice(&p.payload[..8]);
                            let sent = u64::from_le_bytes(ts);
                            latencies.push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                        }
                        got += 1;
                        received.fetch_add(1, Ordering::Relaxed);
                        last_receive.fetch_max(now, Ordering::Relaxed);
                        if got == per_sub {
                            break;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        eprintln!("subscriber {s}: {e}");
                        break;
                    }
                    // Nothing for 5 s: whatever is missing is lost.
                    Err(_) => break,
                }
            }
            let _ = client.disconnect().await;
            latencies
        }));
    }
    drop(ready_tx);
    for _ in 0..args.subscribers {
        let _ = ready_rx.recv().await;
    }

    let start = base.elapsed().as_nanos() as u64;
    let mut pub_tasks = Vec::new();
    for p in 0..args.publishers {
        let args = args.clone();
        pub_tasks.push(tokio::spawn(async move {
            let (client, mut el) = AsyncClient::new(
                options(&args, format!("lg-pub-{p}-{}", std::process::id())),
                1000,
            );
            el.network_options.set_tcp_nodelay(args.tcp_nodelay);
            let acked = Arc::new(AtomicU64::new(0));
            let acked_in_driver = acked.clone();
            let driver = tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_)))
                        | Ok(Event::Incoming(Packet::PubComp(_))) => {
                            acked_in_driver.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("publisher: {e}");
                            break;
                        }
                    }
                }
            });
            let topic = format!("{}/{p}", args.prefix);
            let per_pub_rate = args
                .rate
                .map(|r| (r as f64 / args.publishers as f64).max(1.0));
            let mut payload = vec![0u8; args.size];
            for i in 0..args.count {
                if let Some(rate) = per_pub_rate {
                    let due = Duration::from_secs_f64(i as f64 / rate);
                    let now = base.elapsed().saturating_sub(Duration::from_nanos(start));
                    if due > now {
                        tokio::time::sleep(due - now).await;
                    }
                }
                let ts = base.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&ts.to_le_bytes());
                client
                    .publish(topic.clone(), qos(args.qos), false, payload.clone())
                    .await
                    .expect("publish");
            }
            // Disconnecting with acknowledgements outstanding would drop messages in the
            // client; wait for them (bounded).
            let wait_until = Instant::now() + Duration::from_secs(30);
            while args.qos > 0
                && acked.load(Ordering::Relaxed) < args.count
                && Instant::now() < wait_until
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let _ = client.disconnect().await;
            let _ = driver.await;
        }));
    }
    for t in pub_tasks {
        let _ = t.await;
    }
    let publish_done = base.elapsed().as_nanos() as u64;
    let mut latencies = Vec::new();
    for t in sub_tasks {
        latencies.extend(t.await.unwrap_or_default());
    }
    let got = received.load(Ordering::Relaxed);
    let end = last_receive.load(Ordering::Relaxed).max(start + 1);
    let secs = (end - start) as f64 / 1e9;
    let rate = got as f64 / secs;
    let publish_rate =
        (args.count * args.publishers as u64) as f64 / ((publish_done - start) as f64 / 1e9);
    latencies.sort_unstable();
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let idx = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[idx] as f64 / 1000.0
    };
    let lost = expected.saturating_sub(got);
    println!(
        "{}: {} pub x {} sub, QoS {}, {} B: delivered {got}/{expected} in {secs:.2} s = {rate:.0} msg/s; latency ms p50 {:.2} p99 {:.2} max {:.2}; lost {lost}",
        if args.label.is_empty() { "loadgen" } else { &args.label },
        args.publishers, args.subscribers, args.qos, args.size, pct(0.5), pct(0.99), pct(1.0)
    );
    println!(
        "RESULT label={} delivered={got} expected={expected} secs={secs:.3} msgs_per_sec={rate:.0} publish_rate={publish_rate:.0} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} lost={lost}",
        if args.label.is_empty() { "-" } else { &args.label },
        pct(0.5), pct(0.99), pct(1.0)
    );
}
