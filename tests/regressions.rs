//! Regression tests for the rumqttd defects the edge must make unreachable (issue 2, notes
//! `rumqttd.md` items 1-3), and for the core being private. Each reproduces the trigger through
//! vigil's edge, then proves a fresh client can still connect, publish and receive on the same
//! listener.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(5);

/// (a) rumqttd defect 1: a v5 publish with a user property panicked every v3.1.1 subscriber's
/// connection task, and then (defect 2) the whole listener.
#[test]
fn issue2_a_v5_user_property_to_v311_subscriber() {
    let v = Vigil::start();
    let mut v311 = Sub::start(v.port(), &["-t", "reg/a", "-q", "1", "-V", "mqttv311"]);
    for i in 0..3 {
        publish(
            v.port(),
            &[
                "-t",
                "reg/a",
                "-m",
                &format!("m{i}"),
                "-q",
                "1",
                "-V",
                "mqttv5",
                "-D",
                "publish",
                "user-property",
                "k",
                "v",
            ],
        );
    }
    assert_eq!(
        v311.expect_messages(3, T),
        vec!["reg/a|1|0|m0", "reg/a|1|0|m1", "reg/a|1|0|m2"]
    );
    // The same subscriber is still connected and still receives.
    publish(v.port(), &["-t", "reg/a", "-m", "after", "-q", "1"]);
    assert_eq!(v311.expect_messages(4, T)[3], "reg/a|1|0|after");
    assert_broker_serves(v.port(), "a");
}

/// (b) rumqttd defect 2: a client id containing `/`, `+`, `#` or `$` connecting twice poisoned
/// the listener.
#[test]
fn issue2_b_client_ids_with_topic_characters_connect_twice() {
    let v = Vigil::start();
    for id in ["dev/1", "dev+1", "dev#1", "$dev", "a/+/#/$"] {
        let o = ConnectOpts::v311(id);
        let mut first = Raw::connected(v.mqtt, &o);
        let mut second = Raw::connected(v.mqtt, &o);
        // Takeover: the first connection is closed, the second works.
        assert!(
            first.closed_within(T),
            "{id}: old connection not closed on takeover"
        );
        second.send(&[0xC0, 0]);
        assert_eq!(
            second.recv().map(|p| p.kind()),
            Some(13),
            "{id}: no PINGRESP"
        );
        // And a third time after a clean disconnect.
        second.send(&[0xE0, 0]);
        let _third = Raw::connected(v.mqtt, &o);
    }
    assert_broker_serves(v.port(), "b");
}

/// rumqttd's router panicked, and the whole broker with it, on a topic whose first character
/// is not ASCII (it slices `&topic[..1]`): one QoS 0 PUBLISH to `\u{feff}x` from any client was
/// enough. Such names now reach every kind of subscription unchanged, retained ones included.
#[test]
fn topics_starting_beyond_ascii_are_routed_and_never_crash_the_core() {
    let v = Vigil::start();
    let mut sub = Raw::connected(v.mqtt, &ConnectOpts::v311("beyond-ascii"));
    let filters = [
        ("\u{feff}bom/t", 1),
        ("\u{6e29}\u{5ea6}/#", 1),
        ("+/x", 1),
        ("\u{1}ctl/t", 1),
        ("$share/g/\u{e9}/+", 1),
    ];
    sub.send(&subscribe_packet(1, &filters));
    assert_eq!(sub.recv().expect("SUBACK").body, [0, 1, 1, 1, 1, 1, 1]);
    let mut publisher = Raw::connected(v.mqtt, &ConnectOpts::v311("beyond-ascii-pub"));
    let topics = [
        "\u{feff}bom/t",
        "\u{6e29}\u{5ea6}/a/b",
        "\u{e9}/x",
        "\u{1}ctl/t",
        "ctl/t",
    ];
    for (i, topic) in topics.iter().enumerate() {
        publisher.send(&publish_packet(topic, b"p", 1, i == 0, i as u16 + 1, false));
        assert_eq!(publisher.recv().expect("PUBACK").kind(), 4);
    }
    let mut got = Vec::new();
    while let Some(p) = sub.recv_timeout(Duration::from_millis(700)) {
        let (topic, ..) = parse_publish(&p);
        got.push(topic);
    }
    got.sort();
    // `é/x` matches `+/x` and the shared `é/+`: two copies; `ctl/t` matches nothing.
    let mut expected = vec![
        "\u{1}ctl/t",
        "\u{e9}/x",
        "\u{e9}/x",
        "\u{6e29}\u{5ea6}/a/b",
        "\u{feff}bom/t",
    ];
    expected.sort();
    assert_eq!(got, expected);
    // The retained one, to a new subscription.
    let mut late = Raw::connected(v.mqtt, &ConnectOpts::v311("beyond-ascii-late"));
    late.send(&subscribe_packet(1, &[("#", 0)]));
    assert_eq!(late.recv().expect("SUBACK").kind(), 9);
    let (topic, _, retain, ..) = parse_publish(&late.recv().expect("the retained message"));
    assert_eq!((topic.as_str(), retain), ("\u{feff}bom/t", true));
    assert_broker_serves(v.port(), "beyond-ascii");
}

/// DUP is set per hop (MQTT-3.3.1-3): a publisher's re-send is a first delivery to subscribers.
#[test]
fn a_publishers_dup_flag_is_not_passed_on() {
    let v = Vigil::start();
    let mut sub = Raw::connected(v.mqtt, &ConnectOpts::v311("dup-sub"));
    sub.send(&subscribe_packet(1, &[("dup/t", 2)]));
    assert_eq!(sub.recv().expect("SUBACK").kind(), 9);
    let mut publisher = Raw::connected(v.mqtt, &ConnectOpts::v311("dup-pub"));
    for qos in [1, 2] {
        publisher.send(&publish_packet("dup/t", b"again", qos, false, 7, true));
        publisher.recv().expect("PUBACK / PUBREC");
        if qos == 2 {
            // Delivered once released.
            publisher.send(&ack_packet(6, 7));
        }
        let p = sub.recv().expect("the message");
        let (_, got_qos, _, dup, pkid, _) = parse_publish(&p);
        assert_eq!((got_qos, dup), (qos, false), "{p:?}");
        sub.send(&ack_packet(if qos == 2 { 5 } else { 4 }, pkid));
    }
}

/// (c) rumqttd defect 3: one idle TCP socket on the WebSocket port blocked every new
/// WebSocket client.
#[test]
fn issue2_c_idle_socket_on_websocket_port_does_not_block_websocket_clients() {
    let v = Vigil::start();
    let idle: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(v.http).unwrap())
        .collect();
    // A half-sent handshake too (slowloris).
    let mut slow = TcpStream::connect(v.http).unwrap();
    slow.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        .unwrap();

    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut opts =
            rumqttc::MqttOptions::new("ws-client", format!("ws://{}/mqtt", v.http), v.http.port());
        opts.set_transport(rumqttc::Transport::Ws);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
        client
            .subscribe("reg/c", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .publish("reg/c", rumqttc::QoS::AtLeastOnce, false, "over-ws")
            .await
            .unwrap();
        let got = tokio::time::timeout(T, async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                    eventloop.poll().await.unwrap()
                {
                    return p;
                }
            }
        })
        .await
        .expect("WebSocket client blocked by idle sockets");
        assert_eq!(&got.payload[..], b"over-ws");
    });
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    drop(idle);
    drop(slow);
    assert_broker_serves(v.port(), "c");
}

/// (d) rumqttd defect 2 again: more clients than the connection cap.
#[test]
fn issue2_d_clients_over_the_cap_are_refused_properly() {
    let v = Vigil::start_with(|c| c.replace("max_connections = 10000", "max_connections = 4"));
    let held: Vec<Raw> = (0..4)
        .map(|i| Raw::connected(v.mqtt, &ConnectOpts::v311(&format!("cap-{i}"))))
        .collect();
    // 3.1.1: CONNACK "server unavailable" (3).
    let (_r, ack) = Raw::connect(v.mqtt, &ConnectOpts::v311("over-1"));
    assert_eq!(ack.body, vec![0, 3]);
    // v5: CONNACK "server busy" (0x89).
    let (_r, ack) = Raw::connect(
        v.mqtt,
        &ConnectOpts {
            v5: true,
            ..ConnectOpts::v311("over-2")
        },
    );
    assert_eq!(&ack.body[..2], &[0, 0x89]);
    // The connected clients are unaffected.
    let mut first = held.into_iter().next().unwrap();
    first.send(&[0xC0, 0]);
    assert_eq!(first.recv().map(|p| p.kind()), Some(13));
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    // A slot is free again: a fresh client gets in and the broker serves.
    let _fresh = Raw::connected(v.mqtt, &ConnectOpts::v311("fresh"));
}

/// The core is private: a client connecting straight to its loopback port with guessed
/// credentials is refused.
#[test]
fn core_port_refuses_strangers() {
    let v = Vigil::start();
    for (user, pass) in [("vigil-internal", "guess"), ("admin", "admin"), ("", "")] {
        let mut s = TcpStream::connect(v.core).expect("core port reachable on loopback");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let o = ConnectOpts {
            user: Some(user),
            password: Some(pass.as_bytes()),
            ..ConnectOpts::v311("intruder")
        };
        s.write_all(&connect_packet(&o)).unwrap();
        let mut buf = [0u8; 4];
        let accepted = matches!(s.read(&mut buf), Ok(4) if buf[0] == 0x20 && buf[3] == 0);
        assert!(!accepted, "core accepted a stranger with {user}/{pass}");
    }
    // No credentials at all.
    let mut s = TcpStream::connect(v.core).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(&connect_packet(&ConnectOpts::v311("intruder2")))
        .unwrap();
    let mut buf = [0u8; 4];
    assert!(!matches!(s.read(&mut buf), Ok(4) if buf[3] == 0));
    assert!(!v.core.ip().is_unspecified() && v.core.ip().is_loopback());
    assert_broker_serves(v.port(), "core");
}

/// rumqttd raises two disconnect events for a connection that sends DISCONNECT; when a new
/// connection has reused the freed slot in between, the late event dropped it (about 5 in 3,000
/// persistent clients that subscribe and disconnect at once). The edge sends DISCONNECT to the
/// core only when a will must be discarded; no connection may be closed by the core.
#[test]
fn fast_connect_disconnect_churn_never_drops_a_new_client() {
    let v = Vigil::start();
    for i in 0..3000 {
        let (mut c, _) = Raw::resume(v.mqtt, &format!("churn-{i}"));
        c.send(&subscribe_packet(1, &[(&format!("churn/{i}"), 1)]));
        assert_eq!(c.recv().map(|p| p.kind()), Some(9), "client {i}: no SUBACK");
        c.send_lossy(&[0xE0, 0]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let metrics = http_get(v.http, "/metrics");
    assert!(
        metrics.contains("vigil_disconnects_total{reason=\"core_closed\"} 0"),
        "the core dropped connections:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("disconnects"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_broker_serves(v.port(), "churn");
}

/// Clients whose session ends with their connection take core connections opened ahead of
/// time (`edge::warm`): the pool fills at start and after each take, and clients on such
/// connections subscribe, publish and receive as on any other. A persistent session never
/// takes one; with `warm_connections = 0` there are none and clients connect as before.
#[test]
fn clean_clients_take_core_connections_opened_ahead_of_time() {
    let sample = |v: &Vigil| {
        let page = http_get(v.http, "/metrics");
        (
            metric(&page, "vigil_core_warm_connections"),
            metric(&page, "vigil_core_warm_taken_total"),
        )
    };
    let v = Vigil::start();
    let full = poll(T, || sample(&v), |s| s.0 == Some(8.0));
    assert_eq!(full, (Some(8.0), Some(0.0)));
    assert_broker_serves(v.port(), "warm");
    // mosquitto_sub and mosquitto_pub: two clean sessions, two warm connections.
    let (ready, taken) = poll(T, || sample(&v), |s| s.0 == Some(8.0));
    assert_eq!(
        (ready, taken),
        (Some(8.0), Some(2.0)),
        "refilled after the takes"
    );
    let (mut kept, _) = Raw::resume(v.mqtt, "warm-persistent");
    kept.send(&[0xC0, 0]);
    assert_eq!(kept.recv().map(|p| p.kind()), Some(13));
    assert_eq!(sample(&v).1, Some(2.0), "a persistent session took one");
    drop(v);

    let v = Vigil::start_with(|c| c.replace("warm_connections = 8", "warm_connections = 0"));
    assert_broker_serves(v.port(), "cold");
    assert_eq!(sample(&v), (Some(0.0), Some(0.0)));
}

/// A publish no subscription can match is answered by the edge and never reaches the core,
/// whose router would scan every filter it ever held for it (rumqttd keeps no memory of such
/// topics): acknowledged at each QoS, retained ones stored and replayed, counted. Once a
/// subscription matches, the same connection's next publishes to the same topic (whose "no
/// subscriber" answer the connection cached) reach it, in order.
#[test]
fn publishes_nobody_subscribed_to_are_answered_without_the_core() {
    let v = Vigil::start();
    let unrouted = || {
        metric(
            &http_get(v.http, "/metrics"),
            "vigil_publish_unrouted_total",
        )
    };
    let mut p = Raw::connected(v.mqtt, &ConnectOpts::v311("lonely-pub"));
    let send_all = |p: &mut Raw, round: &str| {
        for qos in 0..3u8 {
            let payload = format!("{round}{qos}");
            p.send(&publish_packet(
                "lone/t",
                payload.as_bytes(),
                qos,
                false,
                qos.into(),
                false,
            ));
            let ack = |p: &mut Raw| p.recv().map(|a| (a.kind(), a.body));
            match qos {
                1 => assert_eq!(ack(p), Some((4, vec![0, 1]))),
                2 => {
                    assert_eq!(ack(p), Some((5, vec![0, 2])));
                    p.send(&ack_packet(6, 2));
                    assert_eq!(ack(p), Some((7, vec![0, 2])));
                }
                _ => {}
            }
        }
    };
    send_all(&mut p, "a");
    p.send(&publish_packet("lone/r", b"kept", 1, true, 3, false));
    assert_eq!(p.recv().map(|a| (a.kind(), a.body)), Some((4, vec![0, 3])));
    assert_eq!(unrouted(), Some(4.0));
    // QoS 2 past the bytes a connection holds unreleased: the second is answered on arrival,
    // and its PUBREL ends the flow all the same.
    let big = vec![b'x'; 300 * 1024];
    for pkid in [4u16, 5] {
        p.send(&publish_packet("lone/big", &big, 2, false, pkid, false));
        assert_eq!(
            p.recv().map(|a| (a.kind(), a.body)),
            Some((5, pkid.to_be_bytes().to_vec()))
        );
    }
    assert_eq!(unrouted(), Some(5.0), "the unheld one, on arrival");
    for pkid in [5u16, 4] {
        p.send(&ack_packet(6, pkid));
        assert_eq!(
            p.recv().map(|a| (a.kind(), a.body)),
            Some((7, pkid.to_be_bytes().to_vec()))
        );
    }
    assert_eq!(unrouted(), Some(6.0));

    let mut s = Raw::connected(v.mqtt, &ConnectOpts::v311("lonely-sub"));
    s.send(&subscribe_packet(1, &[("lone/#", 2)]));
    assert_eq!(
        s.recv().map(|a| (a.kind(), a.body)),
        Some((9, vec![0, 1, 2]))
    );
    let retained = parse_publish(&s.recv().expect("retained"));
    assert_eq!(
        (retained.0.as_str(), retained.2, retained.5),
        ("lone/r", true, b"kept".to_vec())
    );
    if retained.1 > 0 {
        s.send(&ack_packet(4, retained.4));
    }

    send_all(&mut p, "b");
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = parse_publish(&s.recv().expect("live message"));
        match m.1 {
            1 => s.send(&ack_packet(4, m.4)),
            2 => {
                s.send(&ack_packet(5, m.4));
                assert_eq!(s.recv().map(|a| a.kind()), Some(6), "PUBREL");
                s.send(&ack_packet(7, m.4));
            }
            _ => {}
        }
        got.push((m.0, m.1, String::from_utf8(m.5).unwrap()));
    }
    let expected: Vec<_> = (0..3u8)
        .map(|q| ("lone/t".to_string(), q, format!("b{q}")))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(unrouted(), Some(6.0), "routed once subscribed");
}

/// A subscriber that stops reading is disconnected as a slow consumer after
/// `limits.write_stall_timeout_ms`, counted, and never slows the publisher or other subscribers.
#[test]
fn slow_consumer_is_disconnected_and_never_blocks_others() {
    let v = Vigil::start_with(|c| {
        c.replace(
            "write_stall_timeout_ms = 30000",
            "write_stall_timeout_ms = 1000",
        )
    });
    let mut stuck = Raw::connected(v.mqtt, &ConnectOpts::v311("never-reads"));
    stuck.send(&subscribe_packet(1, &[("flood/#", 0)]));
    assert_eq!(stuck.recv().map(|p| p.kind()), Some(9));
    let mut healthy = Sub::start(v.port(), &["-t", "flood/#", "-q", "0", "-F", "MSG|%t"]);

    // Let the stuck client's relay go idle first (its timer then sleeps until the next core
    // ping, 20 s away): the stall must still be caught within about the configured second.
    std::thread::sleep(Duration::from_millis(1500));
    // 40 MB at QoS 0: far more than the loopback socket buffers of the stuck client hold.
    let mut publisher = Raw::connected(v.mqtt, &ConnectOpts::v311("flooder"));
    let payload = vec![b'x'; 100 * 1024];
    let start = std::time::Instant::now();
    for _ in 0..400 {
        publisher.send(&publish_packet("flood/a", &payload, 0, false, 0, false));
    }
    publisher.send(&publish_packet("flood/a", b"done", 1, false, 7, false));
    let ack = publisher
        .recv_timeout(Duration::from_secs(20))
        .expect("publisher acknowledged");
    assert_eq!(ack.kind(), 4);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "publisher was held back for {took:?}"
    );
    // The healthy subscriber keeps receiving; the stuck one is cut off and counted.
    let got = healthy.drain(Duration::from_secs(3)).len();
    assert!(got > 100, "healthy subscriber starved: {got} messages");
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        let m = http_get(v.http, "/metrics");
        if m.contains("vigil_disconnects_total{reason=\"slow_consumer\"} 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slow consumer not disconnected:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stuck);
    assert_broker_serves(v.port(), "slow-consumer");
}

/// The core's bound on a lagging subscriber: rumqttd keeps a log per topic filter and moves a
/// subscriber that falls further behind than the log past the dropped part, QoS 1 included
/// (mosquitto drops in the same situation past `max_queued_messages`). Nothing may vanish
/// silently: every message is either delivered or counted in `vigil_core_lag_dropped_total`.
#[test]
fn messages_a_lagging_subscriber_misses_are_all_counted() {
    const SENT: usize = 2000;
    // A 64 KiB segment and one spare: a log of 128 KiB, overrun by 2,000 messages of 300 B.
    let v = Vigil::start_with(|c| {
        c.replacen("max_packet_size = 1048576", "max_packet_size = 65536", 1)
            .replacen("max_segment_size = 4194304", "max_segment_size = 65536", 1)
            .replacen("max_segment_count = 3", "max_segment_count = 1", 1)
    });
    let mut sub = Raw::connected(v.mqtt, &ConnectOpts::v311("lagger"));
    sub.send(&subscribe_packet(1, &[("lag/#", 1)]));
    assert_eq!(sub.recv().expect("SUBACK").kind(), 9);

    // The subscriber reads nothing while all of it is published and acknowledged.
    let mut publisher = Raw::connected(v.mqtt, &ConnectOpts::v311("fast"));
    for i in 0..SENT {
        let payload = format!("{i:06}{}", "x".repeat(294));
        publisher.send(&publish_packet(
            "lag/t",
            payload.as_bytes(),
            1,
            false,
            (i % 60000 + 1) as u16,
            false,
        ));
        if i % 100 == 99 {
            // Keep the window bounded: wait for this batch's acknowledgements.
            for _ in 0..100 {
                assert_eq!(publisher.recv().expect("PUBACK").kind(), 4);
            }
        }
    }

    // Now it reads and acknowledges everything it is given.
    let mut seen = std::collections::HashSet::new();
    while let Some(p) = sub.recv_timeout(Duration::from_secs(2)) {
        if p.kind() != 3 {
            continue;
        }
        let (_, qos, _, _, pkid, payload) = parse_publish(&p);
        assert_eq!(qos, 1);
        sub.send(&ack_packet(4, pkid));
        seen.insert(String::from_utf8_lossy(&payload[..6]).to_string());
    }
    let delivered = seen.len();
    assert!(
        delivered < SENT,
        "the log was meant to overrun, but all {SENT} arrived"
    );
    let counted = poll(
        Duration::from_secs(5),
        || {
            metric(
                &http_get(v.http, "/metrics"),
                "vigil_core_lag_dropped_total",
            )
            .unwrap_or(0.0)
        },
        |&n| n as usize + delivered >= SENT,
    );
    assert_eq!(
        delivered + counted as usize,
        SENT,
        "delivered {delivered} + counted as dropped {counted} != published {SENT}"
    );
    assert_broker_serves(v.port(), "after-lag");
}
