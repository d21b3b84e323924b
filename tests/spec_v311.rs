//! MQTT 3.1.1 (and v5 where it differs) as the specification and mosquitto behave, checked
//! byte by byte with a raw client.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(5);

#[test]
fn keep_alive_zero_is_accepted() {
    let v = Vigil::start();
    let mut c = Raw::connected(
        v.mqtt,
        &ConnectOpts {
            keep_alive: 0,
            ..ConnectOpts::v311("ka0")
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    c.send(&subscribe_packet(1, &[("ka0/t", 1)]));
    assert_eq!(c.recv().map(|p| p.kind()), Some(9));
    c.send(&publish_packet("ka0/t", b"x", 1, false, 2, false));
    let mut kinds = vec![c.recv().unwrap().kind(), c.recv().unwrap().kind()];
    kinds.sort();
    assert_eq!(kinds, vec![3, 4], "PUBLISH echo and PUBACK");
}

#[test]
fn keep_alive_is_enforced_and_the_will_published() {
    let v = Vigil::start();
    let mut watcher = Sub::start(v.port(), &["-t", "ka/will", "-q", "1"]);
    let mut c = Raw::connected(
        v.mqtt,
        &ConnectOpts {
            keep_alive: 1,
            will: Some(("ka/will", b"timeout", 1, false)),
            ..ConnectOpts::v311("ka1")
        },
    );
    let start = std::time::Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(4)),
        "idle client not disconnected"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "closed too early: {took:?}"
    );
    assert_eq!(watcher.expect_messages(1, T), vec!["ka/will|1|0|timeout"]);
}

#[test]
fn pubrel_resent_after_reconnect_completes_exactly_once() {
    let v = Vigil::start();
    let mut sub = Sub::start(v.port(), &["-t", "q2/resend", "-q", "2"]);
    let o = ConnectOpts {
        clean: false,
        ..ConnectOpts::v311("q2-resender")
    };
    let mut c = Raw::connected(v.mqtt, &o);
    c.send(&publish_packet("q2/resend", b"once", 2, false, 7, false));
    let rec = c.recv().unwrap();
    assert_eq!((rec.kind(), rec.body.clone()), (5, vec![0, 7]), "PUBREC");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));

    let (mut c, ack) = Raw::connect(v.mqtt, &o);
    assert_eq!(ack.body, vec![1, 0], "session present");
    // The client, unsure whether its PUBLISH arrived, re-sends it with DUP, then releases it.
    c.send(&publish_packet("q2/resend", b"once", 2, false, 7, true));
    let rec = c.recv().unwrap();
    assert_eq!(
        (rec.kind(), rec.body.clone()),
        (5, vec![0, 7]),
        "PUBREC for the re-sent PUBLISH"
    );
    c.send(&ack_packet(6, 7));
    let comp = c.recv().unwrap();
    assert_eq!(
        (comp.kind(), comp.body.clone()),
        (7, vec![0, 7]),
        "PUBCOMP after reconnect"
    );
    assert_eq!(
        sub.drain(Duration::from_millis(800)),
        vec!["q2/resend|2|0|once"],
        "exactly once"
    );
}

/// MQTT-4.3.3 method A, as mosquitto behaves: a QoS 2 message reaches subscribers when the
/// publisher releases it, not when it arrives; PUBREC comes at once, PUBCOMP after routing.
#[test]
fn qos2_message_is_delivered_at_pubrel_not_before() {
    let v = Vigil::start();
    let mut sub = Sub::start(v.port(), &["-t", "q2/held", "-q", "2"]);
    let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("q2-holder"));
    c.send(&publish_packet("q2/held", b"later", 2, false, 3, false));
    let rec = c.recv().unwrap();
    assert_eq!((rec.kind(), rec.body.clone()), (5, vec![0, 3]), "PUBREC");
    assert_eq!(
        sub.drain(Duration::from_millis(600)),
        Vec::<String>::new(),
        "delivered before PUBREL"
    );
    c.send(&ack_packet(6, 3));
    let comp = c.recv().unwrap();
    assert_eq!((comp.kind(), comp.body.clone()), (7, vec![0, 3]), "PUBCOMP");
    assert_eq!(sub.expect_messages(1, T), vec!["q2/held|2|0|later"]);

    // A message the client never releases is the edge's once it has its PUBREC: it is
    // delivered, once, when the connection ends.
    c.send(&publish_packet(
        "q2/held",
        b"unreleased",
        2,
        false,
        4,
        false,
    ));
    assert_eq!(c.recv().map(|p| p.kind()), Some(5), "PUBREC");
    drop(c);
    assert_eq!(
        sub.expect_messages(2, T),
        vec!["q2/held|2|0|later", "q2/held|2|0|unreleased"]
    );
    assert_eq!(
        sub.drain(Duration::from_millis(500)).len(),
        2,
        "exactly once"
    );
}

/// Unreleased QoS 2 messages are held up to a byte bound per connection; past it a message is
/// routed on arrival (counted), and every flow still completes with its PUBCOMP.
#[test]
fn qos2_messages_past_the_held_bound_are_routed_on_arrival() {
    let v = Vigil::start();
    let mut s = Raw::connected(v.mqtt, &ConnectOpts::v311("q2-big-sub"));
    s.send(&subscribe_packet(1, &[("q2/big", 0)]));
    assert_eq!(s.recv().map(|p| p.kind()), Some(9));
    let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("q2-big-pub"));
    let body = vec![b'x'; 120 * 1024];
    for (pkid, fill) in [(1u16, b'a'), (2, b'b'), (3, b'c')] {
        let mut payload = body.clone();
        payload[0] = fill;
        c.send(&publish_packet("q2/big", &payload, 2, false, pkid, false));
        let rec = c.recv().unwrap();
        assert_eq!(
            (rec.kind(), rec.body.clone()),
            (5, pkid.to_be_bytes().to_vec())
        );
    }
    // Two fit under the bound (256 KiB) and wait for their PUBREL; the third does not.
    let first = s
        .recv_timeout(T)
        .expect("the third message, routed on arrival");
    assert_eq!(parse_publish(&first).5[0], b'c');
    assert!(s.recv_timeout(Duration::from_millis(500)).is_none());
    for pkid in 1..=3u16 {
        c.send(&ack_packet(6, pkid));
    }
    let mut comps: Vec<u16> = (0..3)
        .map(|_| {
            let p = c.recv_timeout(T).expect("PUBCOMP");
            assert_eq!(p.kind(), 7);
            u16::from_be_bytes([p.body[0], p.body[1]])
        })
        .collect();
    comps.sort();
    assert_eq!(comps, vec![1, 2, 3]);
    let rest: Vec<u8> = (0..2)
        .map(|_| parse_publish(&s.recv_timeout(T).expect("released message")).5[0])
        .collect();
    assert_eq!(rest, vec![b'a', b'b']);
    assert!(
        s.recv_timeout(Duration::from_millis(500)).is_none(),
        "exactly once"
    );
    let page = http_get(v.http, "/metrics");
    assert_eq!(
        metric(&page, "vigil_publish_qos2_routed_unreleased_total"),
        Some(1.0)
    );
}

#[test]
fn dollar_topics_are_not_matched_by_wildcards() {
    let v = Vigil::start();
    let mut all = Sub::start(v.port(), &["-t", "#", "-t", "+/status", "-q", "1"]);
    publish(v.port(), &["-t", "$SYS/status", "-m", "sys", "-q", "1"]);
    publish(
        v.port(),
        &["-t", "$internal/status", "-m", "int", "-q", "1"],
    );
    publish(v.port(), &["-t", "plain/status", "-m", "plain", "-q", "1"]);
    let got = all.drain(Duration::from_millis(800));
    assert!(got.iter().all(|m| !m.starts_with('$')), "{got:?}");
    assert!(got.iter().any(|m| m.starts_with("plain/status")), "{got:?}");
}

#[test]
fn overlapping_subscriptions_deliver_as_the_spec_allows() {
    let v = Vigil::start();
    let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("overlap"));
    c.send(&subscribe_packet(1, &[("ov/#", 2), ("ov/+", 1)]));
    let suback = c.recv().unwrap();
    assert_eq!(suback.body, vec![0, 1, 2, 1]);
    publish(v.port(), &["-t", "ov/a", "-m", "m", "-q", "2"]);
    let mut qos = Vec::new();
    while let Some(p) = c.recv_timeout(Duration::from_millis(800)) {
        if p.kind() == 3 {
            let (topic, q, _, _, pkid, payload) = parse_publish(&p);
            assert_eq!((topic.as_str(), &payload[..]), ("ov/a", &b"m"[..]));
            qos.push(q);
            match q {
                1 => c.send(&ack_packet(4, pkid)),
                2 => c.send(&ack_packet(5, pkid)),
                _ => {}
            }
        } else if p.kind() == 6 {
            let pkid = u16::from_be_bytes([p.body[0], p.body[1]]);
            c.send(&ack_packet(7, pkid));
        }
    }
    qos.sort();
    // MQTT-3.3.5-1: one message at the maximum QoS, or one per matching subscription.
    assert!(qos == vec![2] || qos == vec![1, 2], "{qos:?}");
}

#[test]
fn acks_in_any_order_are_accepted() {
    let v = Vigil::start();
    let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("ooo"));
    c.send(&subscribe_packet(1, &[("ooo/t", 1)]));
    assert_eq!(c.recv().unwrap().kind(), 9);
    for i in 0..3 {
        publish(
            v.port(),
            &["-t", "ooo/t", "-m", &format!("m{i}"), "-q", "1"],
        );
    }
    let ids: Vec<u16> = (0..3)
        .map(|_| parse_publish(&c.recv().unwrap()).4)
        .collect();
    // Acknowledge in reverse order: rumqttd alone would disconnect us.
    for id in ids.iter().rev() {
        c.send(&ack_packet(4, *id));
    }
    publish(v.port(), &["-t", "ooo/t", "-m", "after", "-q", "1"]);
    let p = c.recv().expect("still connected after out-of-order acks");
    assert_eq!(parse_publish(&p).5, b"after");
}

#[test]
fn connect_validation_and_client_ids() {
    let v = Vigil::start();
    // Unsupported protocol level: CONNACK 1; past MQTT 5, the v5 form with 0x84.
    for (level, body) in [(2, vec![0, 1]), (9, vec![0, 0x84, 0])] {
        let mut raw = Raw::open(v.mqtt);
        let mut pkt = connect_packet(&ConnectOpts::v311("lvl"));
        pkt[8] = level;
        raw.send(&pkt);
        assert_eq!(raw.recv().map(|p| p.body), Some(body), "level {level}");
        assert!(raw.closed_within(Duration::from_secs(2)), "level {level}");
    }
    // Empty client id with a persistent session: identifier rejected (2).
    let (_r, ack) = Raw::connect(
        v.mqtt,
        &ConnectOpts {
            clean: false,
            ..ConnectOpts::v311("")
        },
    );
    assert_eq!(ack.body, vec![0, 2]);
    // Empty client id with a clean session: accepted.
    let _ok = Raw::connected(v.mqtt, &ConnectOpts::v311(""));
    // v5 with an empty id gets an assigned client identifier (property 0x12).
    let (_r, ack) = Raw::connect(
        v.mqtt,
        &ConnectOpts {
            v5: true,
            ..ConnectOpts::v311("")
        },
    );
    assert_eq!(ack.body[1], 0);
    assert!(ack.body.windows(1).any(|w| w[0] == 0x12), "{ack:?}");
    // Too long a client id: rejected.
    let long = "x".repeat(300);
    let (_r, ack) = Raw::connect(v.mqtt, &ConnectOpts::v311(&long));
    assert_eq!(ack.body, vec![0, 2]);
    // Session present on resume.
    let o = ConnectOpts {
        clean: false,
        ..ConnectOpts::v311("resume-me")
    };
    let (r, ack) = Raw::connect(v.mqtt, &o);
    assert_eq!(ack.body, vec![0, 0]);
    drop(r);
    std::thread::sleep(Duration::from_millis(200));
    let (_r, ack) = Raw::connect(v.mqtt, &o);
    assert_eq!(ack.body, vec![1, 0]);
}

#[test]
fn protocol_violations_close_only_the_offender() {
    let v = Vigil::start();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "wildcard in publish topic",
            publish_packet("a/+", b"x", 0, false, 0, false),
        ),
        (
            "second CONNECT",
            connect_packet(&ConnectOpts::v311("again")),
        ),
        ("reserved type 0", vec![0x00, 0x00]),
        (
            "bad remaining length",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        ),
        ("SUBSCRIBE bad flags", vec![0x80, 0x06, 0, 1, 0, 1, b'a', 0]),
        (
            "invalid UTF-8 topic",
            packet(0x30, &[0, 2, 0xC3, 0x28, b'x']),
        ),
        ("oversized", packet(0x30, &vec![0u8; 2 * 1024 * 1024])),
    ];
    for (name, bytes) in cases {
        let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("violator"));
        c.send_lossy(&bytes);
        assert!(c.closed_within(T), "{name}: not closed");
    }
    // v5: told why before the close.
    let mut c = Raw::connected(
        v.mqtt,
        &ConnectOpts {
            v5: true,
            ..ConnectOpts::v311("v5-violator")
        },
    );
    let mut body = string(b"a/#");
    body.push(0);
    body.extend_from_slice(b"x");
    c.send(&packet(0x30, &body));
    let d = c.recv().expect("DISCONNECT");
    assert_eq!((d.kind(), d.body[0]), (14, 0x82));
    // v5, a second CONNECT: closed without a DISCONNECT, as mosquitto does (see
    // `End::SecondConnect` for the client this keeps from hanging).
    let o = ConnectOpts {
        v5: true,
        ..ConnectOpts::v311("v5-twice")
    };
    let mut c = Raw::connected(v.mqtt, &o);
    c.send(&connect_packet(&o));
    assert!(c.closed_within(T), "second CONNECT: not closed");
    assert!(
        c.unparsed().is_empty(),
        "second CONNECT: answered with {:?}",
        c.unparsed()
    );
    // First packet not CONNECT: closed.
    let mut c = Raw::open(v.mqtt);
    c.send(&[0xC0, 0]);
    assert!(c.closed_within(T));
    assert_broker_serves(v.port(), "violations");
}

#[test]
fn authentication_failures_get_not_authorized() {
    let v = Vigil::start_with_users(&[("sensor-01", "s3cret", "admin")], |c| c);
    let deny = |o: ConnectOpts<'_>, expected: &[u8]| {
        let (mut r, ack) = Raw::connect(v.mqtt, &o);
        assert_eq!(&ack.body[..2], expected);
        assert!(r.closed_within(T));
    };
    deny(ConnectOpts::v311("anon"), &[0, 5]);
    deny(
        ConnectOpts {
            user: Some("sensor-01"),
            password: Some(b"wrong"),
            ..ConnectOpts::v311("a")
        },
        &[0, 5],
    );
    deny(
        ConnectOpts {
            user: Some("nobody"),
            password: Some(b"s3cret"),
            ..ConnectOpts::v311("b")
        },
        &[0, 5],
    );
    deny(
        ConnectOpts {
            v5: true,
            ..ConnectOpts::v311("c")
        },
        &[0, 0x86],
    );
    let good = ConnectOpts {
        user: Some("sensor-01"),
        password: Some(b"s3cret"),
        ..ConnectOpts::v311("d")
    };
    let _ok = Raw::connected(v.mqtt, &good);
    // mosquitto_pub with the right and wrong password.
    publish(
        v.port(),
        &["-t", "x", "-m", "1", "-u", "sensor-01", "-P", "s3cret"],
    );
    let out = try_publish(
        v.port(),
        &["-t", "x", "-m", "1", "-u", "sensor-01", "-P", "nope"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not authorised") || err.contains("not authorized"),
        "{err}"
    );
    assert!(v.log().contains("authentication failed"));
}

#[test]
fn v5_takeover_tells_the_old_client() {
    let v = Vigil::start();
    let o = ConnectOpts {
        v5: true,
        ..ConnectOpts::v311("twin")
    };
    let mut old = Raw::connected(v.mqtt, &o);
    let _new = Raw::connected(v.mqtt, &o);
    let d = old.recv().expect("DISCONNECT to the old client");
    assert_eq!((d.kind(), d.body[0]), (14, 0x8E));
}

/// Paho's interoperability `test_redelivery_on_reconnect`: unacknowledged QoS 1/2 deliveries to
/// a persistent session are sent again after it reconnects, and a PUBREL whose PUBCOMP was lost
/// is re-sent.
#[test]
fn unacknowledged_deliveries_are_redelivered_after_reconnect() {
    let v = Vigil::start();
    let o = ConnectOpts {
        clean: false,
        ..ConnectOpts::v311("redeliver")
    };
    let mut c = Raw::connected(v.mqtt, &o);
    c.send(&subscribe_packet(1, &[("redeliver/#", 2)]));
    assert_eq!(c.recv().unwrap().kind(), 9);
    publish(v.port(), &["-t", "redeliver/q1", "-m", "one", "-q", "1"]);
    publish(v.port(), &["-t", "redeliver/q2", "-m", "two", "-q", "2"]);
    let first: Vec<_> = (0..2).map(|_| parse_publish(&c.recv().unwrap())).collect();
    assert_eq!(first.iter().map(|p| p.1).collect::<Vec<_>>(), vec![1, 2]);
    // Vanish without acknowledging anything.
    drop(c);
    std::thread::sleep(Duration::from_millis(300));

    let (mut c, ack) = Raw::connect(v.mqtt, &o);
    assert_eq!(ack.body, vec![1, 0]);
    let mut again = Vec::new();
    while let Some(p) = c.recv_timeout(Duration::from_secs(2)) {
        if p.kind() == 3 {
            let pp = parse_publish(&p);
            match pp.1 {
                1 => c.send(&ack_packet(4, pp.4)),
                2 => c.send(&ack_packet(5, pp.4)),
                _ => {}
            }
            assert!(pp.3, "redelivery without DUP (MQTT-3.3.1-1)");
            again.push((pp.0, pp.1, pp.5));
        } else if p.kind() == 6 {
            // PUBREL for the QoS 2 message; lose the PUBCOMP by disconnecting.
            break;
        }
    }
    assert_eq!(
        again,
        vec![
            ("redeliver/q1".to_string(), 1, b"one".to_vec()),
            ("redeliver/q2".to_string(), 2, b"two".to_vec())
        ]
    );
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    // The PUBREL is sent again on the next reconnect; completing it finishes the flow.
    let (mut c, _) = Raw::connect(v.mqtt, &o);
    let rel = c
        .recv_timeout(Duration::from_secs(2))
        .expect("PUBREL re-sent");
    assert_eq!(rel.kind(), 6, "{rel:?}");
    let pkid = u16::from_be_bytes([rel.body[0], rel.body[1]]);
    c.send(&ack_packet(7, pkid));
    assert!(
        c.recv_timeout(Duration::from_millis(800)).is_none(),
        "nothing more after PUBCOMP"
    );
}

/// MQTT-4.4.0-1: a resumed session re-sends unacknowledged PUBLISH and PUBREL packets under
/// their original packet ids (rumqttd numbers every connection afresh); MQTT-2.2.1-3: no id
/// is reused while its exchange is open; and an UNSUBSCRIBE on the resumed session removes a
/// subscription made on the earlier connection.
#[test]
fn resumed_session_keeps_packet_ids_and_can_unsubscribe() {
    let v = Vigil::start();
    let o = ConnectOpts {
        clean: false,
        ..ConnectOpts::v311("keeps-ids")
    };
    let mut c = Raw::connected(v.mqtt, &o);
    c.send(&subscribe_packet(1, &[("ids/#", 2)]));
    assert_eq!(c.recv().unwrap().kind(), 9);
    publish(v.port(), &["-t", "ids/a", "-m", "a", "-q", "1"]);
    publish(v.port(), &["-t", "ids/b", "-m", "b", "-q", "2"]);
    publish(v.port(), &["-t", "ids/c", "-m", "c", "-q", "1"]);
    let got: Vec<_> = (0..3).map(|_| parse_publish(&c.recv().unwrap())).collect();
    let names: Vec<&str> = got.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["ids/a", "ids/b", "ids/c"]);
    let (a, b, cc) = (got[0].4, got[1].4, got[2].4);
    // a is acknowledged; b gets its PUBREC and PUBREL but no PUBCOMP; c is not acknowledged.
    c.send(&ack_packet(4, a));
    c.send(&ack_packet(5, b));
    let rel = c.recv().unwrap();
    assert_eq!(
        (rel.kind(), rel.body.clone()),
        (6, b.to_be_bytes().to_vec())
    );
    drop(c);
    std::thread::sleep(Duration::from_millis(300));

    let (mut c, ack) = Raw::connect(v.mqtt, &o);
    assert_eq!(ack.body, vec![1, 0], "session present");
    let mut pubrel = None;
    let mut again = None;
    while pubrel.is_none() || again.is_none() {
        let p = c.recv_timeout(T).expect("PUBREL and re-sent PUBLISH");
        match p.kind() {
            6 => pubrel = Some(u16::from_be_bytes([p.body[0], p.body[1]])),
            3 => again = Some(parse_publish(&p)),
            other => panic!("unexpected packet {other}: {p:?}"),
        }
    }
    assert_eq!(pubrel, Some(b), "PUBREL under its original id");
    let again = again.unwrap();
    assert_eq!(
        (again.0.as_str(), again.3, again.4),
        ("ids/c", true, cc),
        "the unacknowledged PUBLISH again, with DUP and its original id"
    );
    // A new delivery while b awaits its PUBCOMP and c its PUBACK gets another id.
    publish(v.port(), &["-t", "ids/d", "-m", "d", "-q", "2"]);
    let d = parse_publish(&c.recv_timeout(T).expect("new delivery"));
    assert_eq!((d.0.as_str(), d.3), ("ids/d", false));
    assert!(d.4 != b && d.4 != cc, "id {} reused while in flight", d.4);
    c.send(&ack_packet(7, b));
    c.send(&ack_packet(4, cc));
    c.send(&ack_packet(5, d.4));
    let rel = c.recv_timeout(T).expect("PUBREL for d");
    assert_eq!(
        (rel.kind(), rel.body.clone()),
        (6, d.4.to_be_bytes().to_vec())
    );
    c.send(&ack_packet(7, d.4));

    // The subscription was made on the first connection.
    let mut unsub = vec![0, 9];
    unsub.extend(string(b"ids/#"));
    c.send(&packet(0xA2, &unsub));
    let unsuback = c.recv_timeout(T).expect("UNSUBACK");
    assert_eq!((unsuback.kind(), unsuback.body.clone()), (11, vec![0, 9]));
    publish(v.port(), &["-t", "ids/e", "-m", "e", "-q", "1"]);
    assert!(
        c.recv_timeout(Duration::from_millis(800)).is_none(),
        "delivered after UNSUBSCRIBE"
    );
}

#[test]
fn unsubscribe_stops_delivery() {
    let v = Vigil::start();
    for v5 in [false, true] {
        let mut c = Raw::connected(
            v.mqtt,
            &ConnectOpts {
                v5,
                ..ConnectOpts::v311("unsub")
            },
        );
        let mut sub = subscribe_packet(1, &[("u/a", 1), ("u/b", 1), ("u/c", 1)]);
        if v5 {
            // v5 SUBSCRIBE carries a property length after the packet id.
            sub = {
                let mut body = vec![0, 1, 0];
                body.extend(string(b"u/a"));
                body.push(1);
                body.extend(string(b"u/b"));
                body.push(1);
                body.extend(string(b"u/c"));
                body.push(1);
                packet(0x82, &body)
            };
        }
        c.send(&sub);
        assert_eq!(c.recv().unwrap().kind(), 9);
        let mut body = vec![0, 2];
        if v5 {
            body.push(0);
        }
        body.extend(string(b"u/b"));
        c.send(&packet(0xA2, &body));
        let unsuback = c.recv().unwrap();
        assert_eq!(unsuback.kind(), 11);
        if v5 {
            assert_eq!(
                unsuback.body,
                vec![0, 2, 0, 0],
                "one reason code per filter"
            );
        } else {
            assert_eq!(unsuback.body, vec![0, 2]);
        }
        for t in ["u/a", "u/b", "u/c"] {
            publish(v.port(), &["-t", t, "-m", t, "-q", "0"]);
        }
        let mut got = Vec::new();
        while let Some(p) = c.recv_timeout(Duration::from_millis(600)) {
            if p.kind() == 3 {
                got.push(String::from_utf8(p.body[2..5].to_vec()).unwrap());
            }
        }
        assert_eq!(got, vec!["u/a", "u/c"], "v5={v5}");
    }
}

#[test]
fn packets_pipelined_behind_connect_are_handled() {
    let v = Vigil::start();
    let mut c = Raw::open(v.mqtt);
    let mut burst = connect_packet(&ConnectOpts::v311("pipeliner"));
    burst.extend(subscribe_packet(1, &[("pipe/t", 1)]));
    burst.extend(publish_packet("pipe/t", b"self", 1, false, 2, false));
    c.send(&burst);
    let mut kinds = Vec::new();
    while let Some(p) = c.recv_timeout(Duration::from_secs(2)) {
        kinds.push(p.kind());
        if kinds.len() == 4 {
            break;
        }
    }
    kinds.sort();
    assert_eq!(kinds, vec![2, 3, 4, 9], "CONNACK, PUBLISH, PUBACK, SUBACK");
}

/// Wills are published by the edge: on takeover (old connection's will), on v5 DISCONNECT
/// with reason 0x04, retained when asked; never after a clean DISCONNECT.
#[test]
fn will_cases_the_edge_publishes() {
    let v = Vigil::start();
    let mut watcher = Sub::start(v.port(), &["-t", "wills/#", "-q", "1"]);
    // Takeover: the old connection's will is published.
    let o = ConnectOpts {
        will: Some(("wills/takeover", b"old-gone", 1, false)),
        ..ConnectOpts::v311("twin-will")
    };
    let _old = Raw::connected(v.mqtt, &o);
    let new = ConnectOpts {
        will: Some(("wills/takeover", b"new-gone", 1, false)),
        ..ConnectOpts::v311("twin-will")
    };
    let mut newer = Raw::connected(v.mqtt, &new);
    assert_eq!(
        watcher.expect_messages(1, T),
        vec!["wills/takeover|1|0|old-gone"]
    );
    // The new one disconnects cleanly: nothing.
    newer.send(&[0xE0, 0]);
    assert!(newer.closed_within(T));
    // v5 DISCONNECT with reason 0x04: the will is published.
    let v5 = ConnectOpts {
        v5: true,
        will: Some(("wills/v5", b"asked-for", 0, false)),
        ..ConnectOpts::v311("v5-will")
    };
    let mut c = Raw::connected(v.mqtt, &v5);
    c.send(&[0xE0, 1, 0x04]);
    assert!(c.closed_within(T));
    assert_eq!(watcher.expect_messages(2, T)[1], "wills/v5|0|0|asked-for");
    // A retained will is retained.
    let r = ConnectOpts {
        will: Some(("wills/retained", b"last", 1, true)),
        ..ConnectOpts::v311("retained-will")
    };
    drop(Raw::connected(v.mqtt, &r));
    assert_eq!(watcher.expect_messages(3, T)[2], "wills/retained|1|0|last");
    let mut late = Sub::start(v.port(), &["-t", "wills/retained", "-q", "1"]);
    assert_eq!(late.expect_messages(1, T), vec!["wills/retained|1|1|last"]);
    assert!(
        watcher.drain(Duration::from_millis(500)).len() == 3,
        "a clean DISCONNECT published a will"
    );
}

/// MQTT-3.3.4-9: a v5 client's Receive Maximum bounds the unacknowledged QoS 1/2 deliveries
/// it is sent (rumqttd alone would send up to 100).
#[test]
fn v5_receive_maximum_is_honoured() {
    let v = Vigil::start();
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 30]);
    body.extend_from_slice(&[3, 0x21, 0, 2]); // properties: Receive Maximum 2
    body.extend(string(b"recv-max"));
    let mut c = Raw::open(v.mqtt);
    c.send(&packet(0x10, &body));
    assert_eq!(c.recv().map(|p| (p.kind(), p.body[1])), Some((2, 0)));
    let mut sub = vec![0, 1, 0];
    sub.extend(string(b"rm/t"));
    sub.push(1);
    c.send(&packet(0x82, &sub));
    assert_eq!(c.recv().map(|p| p.kind()), Some(9));
    for i in 0..5 {
        publish(v.port(), &["-t", "rm/t", "-m", &format!("m{i}"), "-q", "1"]);
    }
    let mut pkids = Vec::new();
    while let Some(p) = c.recv_timeout(Duration::from_millis(800)) {
        if p.kind() == 3 {
            let tl = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
            pkids.push(u16::from_be_bytes([p.body[2 + tl], p.body[3 + tl]]));
        }
    }
    assert_eq!(pkids.len(), 2, "more in flight than the Receive Maximum");
    // Each acknowledgement makes room for one more.
    c.send(&ack_packet(4, pkids[0]));
    let mut more = 0;
    while let Some(p) = c.recv_timeout(Duration::from_millis(800)) {
        if p.kind() == 3 {
            more += 1;
        }
    }
    assert_eq!(more, 1);
}

/// rumqttd drops a connection subscribing to `$SYS/#` and answers UNSUBSCRIBE with one UNSUBACK
/// per previously subscribed filter (none for an unknown one). Through vigil: `$` filters are
/// granted, and every UNSUBSCRIBE gets exactly one UNSUBACK (MQTT-3.10.4-5).
#[test]
fn dollar_filters_and_unsubscribe_answers() {
    let v = Vigil::start();
    let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("dollar-sub"));
    c.send(&subscribe_packet(
        1,
        &[("$SYS/#", 1), ("ds/t", 1), ("$internal/x", 0)],
    ));
    let suback = c.recv().expect("SUBACK");
    assert_eq!(
        (suback.kind(), suback.body.clone()),
        (9, vec![0, 1, 1, 1, 0])
    );
    // Only `$` filters.
    c.send(&subscribe_packet(2, &[("$SYS/broker/uptime", 0)]));
    assert_eq!(
        c.recv().map(|p| (p.kind(), p.body)),
        Some((9, vec![0, 2, 0]))
    );
    // Still connected and receiving.
    publish(v.port(), &["-t", "ds/t", "-m", "alive", "-q", "1"]);
    let p = c.recv().expect("delivery");
    assert_eq!(parse_publish(&p).5, b"alive");
    c.send(&ack_packet(4, parse_publish(&p).4));
    // One UNSUBACK for two subscribed filters, one for an unknown filter, one for a `$` filter.
    for (pkid, filters) in [
        (3u16, vec!["ds/t", "$SYS/#"]),
        (4, vec!["never/subscribed"]),
        (5, vec!["$internal/x"]),
    ] {
        let mut body = pkid.to_be_bytes().to_vec();
        for f in &filters {
            body.extend(string(f.as_bytes()));
        }
        c.send(&packet(0xA2, &body));
        let ack = c.recv().expect("UNSUBACK");
        assert_eq!(
            (ack.kind(), ack.body.clone()),
            (11, pkid.to_be_bytes().to_vec()),
            "{filters:?}"
        );
    }
    assert!(
        c.recv_timeout(Duration::from_millis(500)).is_none(),
        "an extra UNSUBACK arrived"
    );
    publish(v.port(), &["-t", "ds/t", "-m", "gone", "-q", "1"]);
    assert!(
        c.recv_timeout(Duration::from_millis(500)).is_none(),
        "delivered after UNSUBACK"
    );
}

/// A SUBSCRIBE that reached the broker before another client's PUBLISH gets that message,
/// even when the subscriber has not waited for its SUBACK, as on mosquitto's single loop (the
/// edge's subscribe fence; paho's `test_subscribe_options` publishes this way). Each round:
/// `a` holds a subscription (so the filter exists in the core), `b` sends its SUBSCRIBE, and
/// `a` publishes half a millisecond later. The fence cannot order a PUBLISH the edge reads
/// before the SUBSCRIBE (two sockets, two tasks), which a loaded machine makes possible even
/// half a millisecond apart: two misses in 20 are tolerated, more mean the fence is broken.
#[test]
fn a_subscribe_sent_before_another_clients_publish_gets_it() {
    let v = Vigil::start();
    let mut missed = Vec::new();
    for round in 0..20 {
        let topic = format!("fence/{round}");
        let mut a = Raw::connected(v.mqtt, &ConnectOpts::v311("fence-a"));
        let mut b = Raw::connected(v.mqtt, &ConnectOpts::v311("fence-b"));
        a.send(&subscribe_packet(1, &[(&topic, 1)]));
        assert_eq!(a.recv().map(|p| p.kind()), Some(9), "SUBACK");
        b.send(&subscribe_packet(1, &[(&topic, 1)]));
        std::thread::sleep(Duration::from_micros(500));
        a.send(&publish_packet(&topic, b"m", 1, false, 2, false));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut got = false;
        while let Some(p) =
            b.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            if p.kind() == 3 {
                got = true;
                break;
            }
        }
        if !got {
            missed.push(round);
        }
    }
    let waits = metric(
        &http_get(v.http, "/metrics"),
        "vigil_publish_fence_waits_total",
    );
    assert!(waits.is_some(), "vigil_publish_fence_waits_total missing");
    assert!(
        missed.len() <= 2,
        "rounds {missed:?} of 20 missed the message (fence waits: {waits:?})"
    );
}

/// The edge acknowledges a QoS 1 PUBLISH when it hands it to the core, so a publisher that
/// waits for each PUBACK pays one hop. What that must not show: a retained message whose
/// PUBACK came back before another client sends its SUBSCRIBE is delivered on that SUBSCRIBE,
/// as on mosquitto (the SUBSCRIBE waits at the publish fence until the message is in place).
/// Each round, `b` subscribes right after `a` has its PUBACK, without any pause.
#[test]
fn a_retained_message_acknowledged_before_a_subscribe_is_delivered_on_it() {
    let v = Vigil::start();
    let mut a = Raw::connected(v.mqtt, &ConnectOpts::v311("early-a"));
    let mut b = Raw::connected(v.mqtt, &ConnectOpts::v311("early-b"));
    let mut missed = Vec::new();
    for round in 0..20u16 {
        let topic = format!("early/{round}");
        a.send(&publish_packet(&topic, b"kept", 1, true, round + 1, false));
        let ack = a.recv().expect("PUBACK");
        assert_eq!(
            (ack.kind(), &ack.body[..]),
            (4, &(round + 1).to_be_bytes()[..])
        );
        b.send(&subscribe_packet(round + 1, &[(&topic, 1)]));
        let mut got = false;
        while let Some(p) = b.recv_timeout(Duration::from_secs(2)) {
            if p.kind() == 3 {
                let (t, _, retain, _, pkid, payload) = parse_publish(&p);
                assert_eq!(
                    (t.as_str(), retain, &payload[..]),
                    (&*topic, true, &b"kept"[..])
                );
                b.send(&ack_packet(4, pkid));
                got = true;
                break;
            }
        }
        if !got {
            missed.push(round);
        }
    }
    assert!(
        missed.is_empty(),
        "rounds {missed:?} of 20 missed the retained message"
    );
}

/// A clean session ends whatever session its client id had (MQTT-3.1.2-6), also now that
/// clean sessions run under pooled core ids: the persistent session's subscription is gone,
/// and a later persistent connection starts afresh (session present 0, no old messages).
#[test]
fn a_clean_session_discards_the_persistent_one_before_it() {
    let v = Vigil::start();
    let persistent = ConnectOpts {
        clean: false,
        ..ConnectOpts::v311("flip")
    };
    let (mut c, ack) = Raw::connect(v.mqtt, &persistent);
    assert_eq!(ack.body, vec![0, 0]);
    c.send(&subscribe_packet(1, &[("flip/t", 1)]));
    assert_eq!(c.recv().map(|p| p.kind()), Some(9));
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    for round in 0..2 {
        let (mut c, ack) = Raw::connect(v.mqtt, &ConnectOpts::v311("flip"));
        assert_eq!(
            ack.body,
            vec![0, 0],
            "round {round}: clean session, none present"
        );
        publish(v.port(), &["-t", "flip/t", "-m", "lost", "-q", "1"]);
        assert!(
            c.recv_timeout(Duration::from_millis(300)).is_none(),
            "round {round}: the old subscription is gone"
        );
        c.send(&packet(0xE0, &[]));
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut c, ack) = Raw::connect(v.mqtt, &persistent);
    assert_eq!(ack.body, vec![0, 0], "the persistent session was discarded");
    assert!(
        c.recv_timeout(Duration::from_millis(300)).is_none(),
        "nothing queued for the discarded session"
    );
}

/// A message published after another client's UNSUBSCRIBE reached the broker is not delivered
/// to that client, as on a single-threaded broker, even when it has not waited for its
/// UNSUBACK (paho's `test_unsubscribe` publishes this way): the subscribe fence holds the
/// PUBLISH until the core has processed the UNSUBSCRIBE. Each round, `b` unsubscribes and `a`
/// publishes 300 us later; `b` then takes its UNSUBACK and waits 100 ms for a stray message.
/// Measured on 2 cores (5 runs each): without the fence 0-5 of 20 rounds delivered it (12 in
/// 100), with it none in 100. As with the SUBSCRIBE test above, the fence cannot order a
/// PUBLISH the edge reads first, so one delivery in 20 is tolerated.
#[test]
fn a_message_published_after_an_unsubscribe_is_not_delivered_on_it() {
    let v = Vigil::start();
    let mut a = Raw::connected(v.mqtt, &ConnectOpts::v311("left-a"));
    let mut b = Raw::connected(v.mqtt, &ConnectOpts::v311("left-b"));
    let mut delivered = Vec::new();
    for round in 0..20u16 {
        let topic = format!("left/{round}");
        b.send(&subscribe_packet(2 * round + 1, &[(&topic, 1)]));
        assert_eq!(b.recv().map(|p| p.kind()), Some(9), "SUBACK");
        let mut unsubscribe = (2 * round + 2).to_be_bytes().to_vec();
        unsubscribe.extend(string(topic.as_bytes()));
        b.send(&packet(0xA2, &unsubscribe));
        std::thread::sleep(Duration::from_micros(300));
        a.send(&publish_packet(&topic, b"late", 0, false, 0, false));
        let mut unsubacked = false;
        let mut wait = Duration::from_secs(2);
        while let Some(p) = b.recv_timeout(wait) {
            match p.kind() {
                11 => {
                    unsubacked = true;
                    wait = Duration::from_millis(100);
                }
                3 => delivered.push(round),
                k => panic!("round {round}: unexpected packet type {k}"),
            }
        }
        assert!(unsubacked, "round {round}: no UNSUBACK");
    }
    assert!(
        delivered.len() <= 1,
        "rounds {delivered:?} of 20 delivered a message published after the UNSUBSCRIBE"
    );
}

/// A client that has just connected and subscribed gets a message another client publishes
/// right after that SUBSCRIBE, without waiting for the SUBACK (paho's `test_subscribe_options`
/// does this), as on mosquitto, whose single loop reads the two in the order they came. The
/// two connections run on different threads here, so the PUBLISH may be read first: the
/// subscribe fence holds it while the new client has not sent its first packet.
#[test]
fn a_message_published_right_after_a_new_clients_subscribe_reaches_it() {
    let v = Vigil::start();
    let mut a = Raw::connected(v.mqtt, &ConnectOpts::v311("fresh-a"));
    let mut missed = Vec::new();
    for round in 0..30u16 {
        let topic = format!("fresh/{round}");
        let mut b = Raw::connected(v.mqtt, &ConnectOpts::v311(&format!("fresh-b{round}")));
        b.send(&subscribe_packet(1, &[(&topic, 0)]));
        a.send(&publish_packet(&topic, b"first", 0, false, 0, false));
        let (mut subacked, mut got) = (false, false);
        let mut wait = Duration::from_secs(2);
        while !(subacked && got) {
            match b.recv_timeout(wait).map(|p| p.kind()) {
                Some(9) => {
                    subacked = true;
                    wait = Duration::from_millis(200);
                }
                Some(3) => got = true,
                Some(k) => panic!("round {round}: unexpected packet type {k}"),
                None => break,
            }
        }
        assert!(subacked, "round {round}: no SUBACK");
        if !got {
            missed.push(round);
        }
    }
    // Without the fence 8-15 of the 30 rounds missed it. The fence waits at most 5 ms, which
    // a loaded machine running the whole suite in parallel sometimes exceeds (2 of 30 once).
    assert!(
        missed.len() <= 4,
        "rounds {missed:?} of 30 missed the message"
    );
}

/// A client may reuse a packet id as soon as its PUBACK arrives, even though the core may not
/// have acknowledged the message yet: the edge numbers publishes to the core itself. 1,000
/// messages under the same two packet ids, two in flight, all arrive once and in order.
#[test]
fn qos1_packet_ids_are_reusable_as_soon_as_acknowledged() {
    let v = Vigil::start();
    let mut sub = Raw::connected(v.mqtt, &ConnectOpts::v311("reuse-sub"));
    sub.send(&subscribe_packet(1, &[("reuse/t", 1)]));
    assert_eq!(sub.recv().map(|p| p.kind()), Some(9), "SUBACK");
    let mut publisher = Raw::connected(v.mqtt, &ConnectOpts::v311("reuse-pub"));
    const N: u32 = 1000;
    publisher.send(&publish_packet(
        "reuse/t",
        &0u32.to_be_bytes(),
        1,
        false,
        1,
        false,
    ));
    for i in 1..N {
        let pkid = (i % 2 + 1) as u16;
        publisher.send(&publish_packet(
            "reuse/t",
            &i.to_be_bytes(),
            1,
            false,
            pkid,
            false,
        ));
        let ack = publisher.recv().expect("PUBACK");
        assert_eq!(
            (ack.kind(), &ack.body[..]),
            (4, &(((i - 1) % 2 + 1) as u16).to_be_bytes()[..])
        );
    }
    assert_eq!(publisher.recv().map(|p| p.kind()), Some(4), "last PUBACK");
    for i in 0..N {
        let p = sub
            .recv()
            .unwrap_or_else(|| panic!("message {i} of {N} never arrived"));
        let (_, qos, _, _, pkid, payload) = parse_publish(&p);
        assert_eq!(
            (qos, &payload[..]),
            (1, &i.to_be_bytes()[..]),
            "message {i}"
        );
        sub.send(&ack_packet(4, pkid));
    }
    assert!(
        sub.recv_timeout(Duration::from_millis(300)).is_none(),
        "a message arrived twice"
    );
}

/// Persistent sessions are bounded (`limits.max_persistent_sessions`): a new one beyond the
/// cap ends the session offline longest, and when every kept session is connected the CONNECT
/// is refused (3.1.1 code 3, v5 0x97); `limits.persistent_session_expiry_secs` ends sessions
/// that stay offline too long, as mosquitto's `persistent_client_expiration` does.
#[test]
fn persistent_sessions_are_bounded_and_can_expire() {
    let v = Vigil::start_with(|c| {
        let c = vigil::config::set_value(&c, "limits", "max_persistent_sessions", "2");
        vigil::config::set_value(&c, "limits", "persistent_session_expiry_secs", "3")
    });
    let persistent = |id| ConnectOpts {
        clean: false,
        ..ConnectOpts::v311(id)
    };
    let session_present = |id| {
        let (c, ack) = Raw::connect(v.mqtt, &persistent(id));
        assert_eq!(ack.body[1], 0, "{id}: refused: {ack:?}");
        (c, ack.body[0] & 1 == 1)
    };
    // p1 and p2 subscribe and go offline, p1 first.
    for id in ["p1", "p2"] {
        let (mut c, present) = session_present(id);
        assert!(!present);
        c.send(&subscribe_packet(1, &[(&format!("cap/{id}"), 1)]));
        assert_eq!(c.recv().map(|p| p.kind()), Some(9));
        c.send(&packet(0xE0, &[]));
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
    }
    publish(v.port(), &["-t", "cap/p2", "-m", "kept", "-q", "1"]);
    // p3 is new: p1, offline longest, makes room; p2 keeps its session and its message.
    let (p3, present) = session_present("p3");
    assert!(!present);
    let (mut p2, present) = session_present("p2");
    assert!(present, "p2's session must survive p1's eviction");
    let (_, _, _, _, pkid, payload) = parse_publish(&p2.recv().expect("queued message"));
    assert_eq!(payload, b"kept");
    p2.send(&ack_packet(4, pkid));
    // p2 and p3 are connected: a new session has no place, a clean one does.
    let (_, ack) = Raw::connect(v.mqtt, &persistent("p4"));
    assert_eq!(ack.body, vec![0, 3], "server unavailable");
    let mut v5 = Raw::open(v.mqtt);
    v5.send(&connect_packet(&ConnectOpts {
        v5: true,
        ..persistent("p4")
    }));
    let ack = v5.recv().expect("CONNACK");
    assert_eq!(
        (ack.kind(), ack.body[1]),
        (2, 0x97),
        "quota exceeded: {ack:?}"
    );
    let _clean = Raw::connected(v.mqtt, &ConnectOpts::v311("p5"));
    // p1's session is gone: it comes back to a new one (which evicts nothing: p2 and p3 are
    // connected, so it needs p2 to leave first).
    p2.send(&packet(0xE0, &[]));
    drop(p2);
    std::thread::sleep(Duration::from_millis(200));
    let (p1, present) = session_present("p1");
    assert!(!present, "p1's session was evicted");
    let metrics = http_get(v.http, "/metrics");
    assert_eq!(metric(&metrics, "vigil_sessions_evicted_total"), Some(2.0));
    assert_eq!(metric(&metrics, "vigil_persistent_sessions"), Some(2.0));
    assert_eq!(
        metric(
            &metrics,
            "vigil_limit_refusals_total{limit=\"persistent_sessions\"}"
        ),
        Some(2.0)
    );
    // Offline for longer than the configured expiry, a session ends.
    drop((p1, p3));
    std::thread::sleep(Duration::from_millis(4000));
    let (_p1, present) = session_present("p1");
    assert!(!present, "p1's session expired after 3 s offline");
    assert_eq!(
        metric(
            &http_get(v.http, "/metrics"),
            "vigil_sessions_expired_total"
        ),
        Some(2.0),
        "p1 and p3 expired"
    );
}
