//! MQTT 5 behaviour the core (rumqttd, spoken to in 3.1.1) cannot provide and the edge does:
//! flow control that never holds back acknowledgements, subscription options (No Local, Retain
//! As Published, Retain Handling), Subscription Identifiers, Message Expiry, Session Expiry and
//! Will Delay. Checked
//! against the real binary with a raw v5 client and with mosquitto_sub/mosquitto_pub in v5
//! mode, as the paho interoperability suite checks mosquitto.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(5);

const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBACK: u8 = 9;
const DISCONNECT: u8 = 14;

/// A v5 property block: its length, then the properties.
fn props(bytes: &[u8]) -> Vec<u8> {
    let mut out = remaining_length(bytes.len());
    out.extend_from_slice(bytes);
    out
}

fn u32_prop(id: u8, value: u32) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(value.to_be_bytes());
    out
}

/// A v5 CONNECT with `properties` (unencoded property bytes) and no will.
fn connect5(client_id: &str, clean: bool, properties: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(5);
    body.push(if clean { 0x02 } else { 0 });
    body.extend(30u16.to_be_bytes());
    body.extend(props(properties));
    body.extend(string(client_id.as_bytes()));
    packet(0x10, &body)
}

fn subscribe5(pkid: u16, filter: &str, options: u8) -> Vec<u8> {
    subscribe5_with(pkid, filter, options, &[])
}

/// A v5 SUBSCRIBE with `properties` (unencoded property bytes).
fn subscribe5_with(pkid: u16, filter: &str, options: u8, properties: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend(props(properties));
    body.extend(string(filter.as_bytes()));
    body.push(options);
    packet(0x82, &body)
}

/// A Subscription Identifier property.
fn sub_id(id: u32) -> Vec<u8> {
    let mut out = vec![0x0B];
    out.extend(remaining_length(id as usize));
    out
}

fn publish5(topic: &str, payload: &[u8], qos: u8, retain: bool, pkid: u16) -> Vec<u8> {
    publish5_with(topic, payload, qos, retain, pkid, &[])
}

/// A v5 PUBLISH with `properties` (unencoded property bytes).
fn publish5_with(
    topic: &str,
    payload: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
    properties: &[u8],
) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    if qos > 0 {
        body.extend(pkid.to_be_bytes());
    }
    body.extend(props(properties));
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | retain as u8, &body)
}

/// A v5 DISCONNECT with `properties`.
fn disconnect5(properties: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    body.extend(props(properties));
    packet(0xE0, &body)
}

/// A received v5 PUBLISH.
#[derive(Debug)]
struct Publish5 {
    topic: String,
    qos: u8,
    retain: bool,
    pkid: u16,
    /// Message Expiry Interval, when present.
    expiry: Option<u32>,
    /// Subscription Identifiers, in the order sent.
    sub_ids: Vec<u32>,
    /// Topic Alias, when present.
    alias: Option<u16>,
    payload: Vec<u8>,
}

fn parse5(p: &Packet) -> Publish5 {
    assert_eq!(p.kind(), PUBLISH, "not a PUBLISH: {p:?}");
    let qos = (p.header >> 1) & 3;
    let b = &p.body;
    let tl = u16::from_be_bytes([b[0], b[1]]) as usize;
    let topic = String::from_utf8(b[2..2 + tl].to_vec()).unwrap();
    let mut pos = 2 + tl;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([b[pos], b[pos + 1]]);
        pos += 2;
    }
    // Property lengths here stay under 128 bytes.
    let plen = b[pos] as usize;
    pos += 1;
    let (mut expiry, mut sub_ids, mut alias) = (None, Vec::new(), None);
    let mut at = pos;
    while at < pos + plen {
        let id = b[at];
        at += 1;
        let len2 = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]) as usize;
        match id {
            0x01 => at += 1,
            0x02 => {
                expiry = Some(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]));
                at += 4;
            }
            0x0B => {
                let (mut value, mut shift) = (0u32, 0);
                loop {
                    value |= ((b[at] & 0x7F) as u32) << shift;
                    shift += 7;
                    at += 1;
                    if b[at - 1] & 0x80 == 0 {
                        break;
                    }
                }
                sub_ids.push(value);
            }
            0x23 => {
                alias = Some(len2(at) as u16);
                at += 2;
            }
            0x03 | 0x08 | 0x09 => at += 2 + len2(at),
            0x26 => {
                at += 2 + len2(at);
                at += 2 + len2(at);
            }
            _ => panic!("unexpected property {id:#x} in {p:?}"),
        }
    }
    Publish5 {
        topic,
        qos,
        retain: p.header & 1 == 1,
        pkid,
        expiry,
        sub_ids,
        alias,
        payload: b[pos + plen..].to_vec(),
    }
}

/// Connects a raw v5 client and returns it with its CONNACK's session-present flag.
fn connect(v: &Vigil, client_id: &str, clean: bool, properties: &[u8]) -> (Raw, bool) {
    let (c, ack) = connect_acked(v, client_id, clean, properties);
    (c, ack.body[0] & 1 == 1)
}

/// Connects (v5) and returns the successful CONNACK, for its properties.
fn connect_acked(v: &Vigil, client_id: &str, clean: bool, properties: &[u8]) -> (Raw, Packet) {
    let mut c = Raw::open(v.mqtt);
    c.send(&connect5(client_id, clean, properties));
    let ack = c.recv().expect("CONNACK");
    assert_eq!(ack.kind(), 2, "expected CONNACK, got {ack:?}");
    assert_eq!(ack.body[1], 0, "refused: {ack:?}");
    (c, ack)
}

fn subscribe(c: &mut Raw, filter: &str, options: u8) {
    c.send(&subscribe5(1, filter, options));
    let ack = c.recv().expect("SUBACK");
    assert_eq!(ack.kind(), SUBACK, "{ack:?}");
    assert!(ack.body[3] < 0x80, "subscription refused: {ack:?}");
}

/// Everything that arrives within `window`.
fn drain(c: &mut Raw, window: Duration) -> Vec<Packet> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    while let Some(p) = c.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        out.push(p);
        if Instant::now() >= deadline {
            break;
        }
    }
    out
}

#[test]
fn receive_maximum_never_holds_back_the_clients_own_acknowledgements() {
    // paho's test_flow_control1: a client with Receive Maximum 2, subscribed to its own topic,
    // publishes three QoS 1 messages. It must get all three PUBACKs while it has not
    // acknowledged the two deliveries it may have in flight, and the third delivery only
    // after it acknowledges one.
    let v = Vigil::start();
    let (mut c, _) = connect(&v, "fc1", true, &[0x21, 0, 2]);
    subscribe(&mut c, "fc/t", 1);
    for id in 1..=3u16 {
        c.send(&publish5("fc/t", format!("m{id}").as_bytes(), 1, false, id));
    }
    let mut acks = Vec::new();
    let mut deliveries = Vec::new();
    while acks.len() < 3 || deliveries.len() < 2 {
        let p = c.recv().unwrap_or_else(|| {
            panic!("stalled with PUBACKs {acks:?} and deliveries {deliveries:?}")
        });
        match p.kind() {
            PUBACK => acks.push(u16::from_be_bytes([p.body[0], p.body[1]])),
            PUBLISH => deliveries.push(parse5(&p)),
            other => panic!("unexpected packet {other}: {p:?}"),
        }
    }
    acks.sort();
    assert_eq!(acks, vec![1, 2, 3]);
    assert!(deliveries.iter().all(|d| d.qos == 1), "{deliveries:?}");
    assert!(
        drain(&mut c, Duration::from_millis(700)).is_empty(),
        "a third delivery went past the client's Receive Maximum"
    );
    c.send(&ack_packet(PUBACK, deliveries[0].pkid));
    let third = parse5(
        &c.recv()
            .expect("the third delivery once one is acknowledged"),
    );
    let mut payloads: Vec<Vec<u8>> = deliveries.iter().map(|d| d.payload.clone()).collect();
    payloads.push(third.payload);
    assert_eq!(
        payloads,
        vec![b"m1".to_vec(), b"m2".to_vec(), b"m3".to_vec()]
    );
}

/// Every retained message reaches a subscriber whose Receive Maximum is 3, never more than 3
/// unacknowledged at a time; its own publishes are acknowledged meanwhile.
#[test]
fn retained_messages_respect_the_receive_maximum_and_all_arrive() {
    const N: usize = 60;
    let v = Vigil::start();
    let retained: Vec<_> = (0..N)
        .map(|i| (format!("rm/{i:03}"), b"r".to_vec(), 1))
        .collect();
    store_retained(v.mqtt, "rm-pub", &retained);
    let (mut c, _) = connect(&v, "rm-sub", true, &[0x21, 0, 3]);
    subscribe(&mut c, "rm/+", 1);
    let mut got = std::collections::BTreeSet::new();
    let mut acked_own = false;
    c.send(&publish5("rm-own", b"x", 1, false, 9));
    while got.len() < N {
        let batch = drain(&mut c, Duration::from_millis(100));
        assert!(!batch.is_empty(), "stalled at {} of {N}", got.len());
        let mut in_flight = Vec::new();
        for packet in &batch {
            match packet.kind() {
                PUBACK => acked_own = true,
                PUBLISH => {
                    let m = parse5(packet);
                    assert!(m.retain && m.qos == 1, "{m:?}");
                    got.insert(m.topic);
                    in_flight.push(m.pkid);
                }
                other => panic!("unexpected packet {other}"),
            }
        }
        assert!(
            in_flight.len() <= 3,
            "{} past Receive Maximum 3",
            in_flight.len()
        );
        for pkid in in_flight {
            c.send(&ack_packet(PUBACK, pkid));
        }
    }
    assert!(acked_own, "the client's own publish was not acknowledged");
    assert_eq!(got.len(), N);
}

/// A retained message published after a subscription's SUBACK reaches it once, live, even
/// while the subscription's retained messages still wait to be sent (here behind a delivery
/// the client, with Receive Maximum 1, has not acknowledged): the replay stops at what was
/// stored when the SUBACK was read. Before, the replay read the store when it got its turn and
/// sent the new message a second time, as retained.
#[test]
fn a_retained_message_published_after_the_suback_comes_once() {
    let v = Vigil::start();
    store_retained(v.mqtt, "ra-pub0", &[("ra/old".into(), b"old".to_vec(), 1)]);
    let (mut c, _) = connect(&v, "ra-sub", true, &[0x21, 0, 1]);
    subscribe(&mut c, "ra-first", 1);
    c.send(&publish5("ra-first", b"x", 1, false, 1));
    let mut first = None;
    while first.is_none() {
        let p = c.recv().expect("PUBACK and the delivery");
        if p.kind() == PUBLISH {
            first = Some(parse5(&p).pkid);
        }
    }
    // No room for another delivery: the new subscription's retained messages wait.
    subscribe(&mut c, "ra/+", 1);
    store_retained(v.mqtt, "ra-pub1", &[("ra/new".into(), b"new".to_vec(), 1)]);
    c.send(&ack_packet(PUBACK, first.unwrap_or_default()));
    let mut got = Vec::new();
    loop {
        let batch = drain(&mut c, Duration::from_millis(500));
        if batch.is_empty() {
            break;
        }
        for p in batch.iter().filter(|p| p.kind() == PUBLISH) {
            let m = parse5(p);
            c.send(&ack_packet(PUBACK, m.pkid));
            got.push((m.topic, m.retain));
        }
    }
    got.sort();
    assert_eq!(
        got,
        vec![("ra/new".to_string(), false), ("ra/old".to_string(), true)],
        "the old one as retained, the new one once, live"
    );
}

/// UNSUBSCRIBE of `filters` (v5, no properties); returns the UNSUBACK's reason codes.
fn unsubscribe5(c: &mut Raw, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0);
    for f in filters {
        body.extend(string(f.as_bytes()));
    }
    c.send(&packet(0xA2, &body));
    let ack = c.recv().expect("UNSUBACK");
    let [hi, lo] = pkid.to_be_bytes();
    assert_eq!((ack.kind(), &ack.body[..3]), (11, &[hi, lo, 0][..]));
    ack.body[3..].to_vec()
}

#[test]
fn unsuback_says_which_filters_had_no_subscription() {
    let v = Vigil::start();
    let (mut c, _) = connect(&v, "unsub-codes", true, &[]);
    subscribe(&mut c, "us/keep", 0);
    subscribe(&mut c, "us/remove", 0);
    assert_eq!(
        unsubscribe5(&mut c, 2, &["us/remove", "us/never"]),
        [0x00, 0x11]
    );
    assert_eq!(unsubscribe5(&mut c, 3, &["us/remove"]), [0x11]);
    // A resumed session knows the subscriptions of its earlier connection when the edge kept
    // them (some had an identifier or options); otherwise every code is success.
    let expiry = u32_prop(0x11, 60);
    for (id, codes) in [(7, [0x00, 0x11]), (0, [0x00, 0x00])] {
        let client = format!("unsub-resumed-{id}");
        let (mut p, _) = connect(&v, &client, true, &expiry);
        subscribe_with_id(&mut p, "us/a", id);
        subscribe_with_id(&mut p, "us/b", id);
        p.send(&disconnect5(&[]));
        drop(p);
        let (mut p, present) = connect(&v, &client, false, &expiry);
        assert!(present);
        assert_eq!(
            unsubscribe5(&mut p, 4, &["us/a", "us/c"]),
            codes,
            "{client}"
        );
        publish(v.port(), &["-t", "us/a", "-m", "gone", "-q", "1"]);
        publish(v.port(), &["-t", "us/b", "-m", "kept", "-q", "1"]);
        let got = publishes(&mut p, Duration::from_millis(700));
        assert_eq!(got.len(), 1, "{client}: {got:?}");
        assert_eq!(got[0].payload, b"kept");
    }
}

#[test]
fn shared_subscriptions_end_with_their_unsubscribe_and_malformed_ones_are_refused() {
    let v = Vigil::start();
    let (mut c, _) = connect(&v, "shared-unsub", true, &[]);
    subscribe(&mut c, "$share/workers/sh/tasks", 1);
    publish(v.port(), &["-t", "sh/tasks", "-m", "before", "-q", "1"]);
    let got = parse5(&c.recv().expect("a delivery while subscribed"));
    c.send(&ack_packet(PUBACK, got.pkid));
    assert_eq!(unsubscribe5(&mut c, 2, &["$share/workers/sh/tasks"]), [0]);
    publish(v.port(), &["-t", "sh/tasks", "-m", "after", "-q", "1"]);
    assert!(
        publishes(&mut c, Duration::from_millis(700)).is_empty(),
        "delivered after the UNSUBSCRIBE"
    );
    // Subscribed again, it works again.
    subscribe(&mut c, "$share/workers/sh/tasks", 1);
    publish(v.port(), &["-t", "sh/tasks", "-m", "again", "-q", "1"]);
    let got = publishes(&mut c, Duration::from_millis(700));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload, b"again");

    // A malformed shared filter gets 0x8F in its SUBACK (MQTT-4.8.2-1, -2); the others of the
    // packet are granted and the connection goes on.
    let filters = [
        "$share/gr+oup/t",
        "$share/grouponly",
        "$share//t",
        "$share/g/",
        "sh/ok",
    ];
    let mut body = 9u16.to_be_bytes().to_vec();
    body.push(0);
    for f in filters {
        body.extend(string(f.as_bytes()));
        body.push(1);
    }
    c.send(&packet(0x82, &body));
    let ack = c.recv().expect("SUBACK");
    assert_eq!(ack.kind(), SUBACK);
    assert_eq!(ack.body[3..], [0x8F, 0x8F, 0x8F, 0x8F, 1]);
    c.send(&[0xC0, 0]);
    assert_eq!(c.recv().expect("PINGRESP").kind(), 13);
}

/// A v5 PUBLISH with Topic Alias `alias` (and `topic`, possibly empty).
fn publish5_aliased(topic: &str, alias: u16, payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let alias = [&[0x23][..], &alias.to_be_bytes()].concat();
    publish5_with(topic, payload, qos, false, pkid, &alias)
}

#[test]
fn clients_may_publish_with_topic_aliases() {
    let v = Vigil::start();
    let (mut p, ack) = connect_acked(&v, "alias-pub", true, &[]);
    assert!(
        ack.body.windows(3).any(|w| w == [0x22, 0, 10]),
        "Topic Alias Maximum 10 in {ack:?}"
    );
    let (mut sub, _) = connect(&v, "alias-sub", true, &[]);
    subscribe(&mut sub, "al/#", 1);
    p.send(&publish5_aliased("al/one", 1, b"a", 1, 1));
    p.send(&publish5_aliased("", 1, b"b", 1, 2));
    p.send(&publish5_aliased("al/two", 1, b"c", 0, 0));
    p.send(&publish5_aliased("", 1, b"d", 1, 3));
    p.send(&publish5_aliased("al/ten", 10, b"e", 1, 4));
    p.send(&publish5_aliased("", 10, b"f", 1, 5));
    // Sorted: MQTT orders messages per QoS level, and one of them is QoS 0.
    let mut got: Vec<(String, Vec<u8>)> = take_and_ack(&mut sub, 6, true)
        .into_iter()
        .map(|(topic, _, _, payload)| (topic, payload))
        .collect();
    got.sort();
    let expected: Vec<(String, Vec<u8>)> = [
        ("al/one", "a"),
        ("al/one", "b"),
        ("al/ten", "e"),
        ("al/ten", "f"),
        ("al/two", "c"),
        ("al/two", "d"),
    ]
    .iter()
    .map(|(t, m)| (t.to_string(), m.as_bytes().to_vec()))
    .collect();
    assert_eq!(got, expected);
    // An alias beyond the maximum, or 0: 0x94; one never set: a protocol error.
    for (alias, topic, code) in [(11, "al/x", 0x94), (0, "al/x", 0x94), (2, "", 0x82)] {
        let (mut c, _) = connect(&v, "alias-bad", true, &[]);
        c.send(&publish5_aliased(topic, alias, b"x", 0, 0));
        let d = c.recv().expect("DISCONNECT");
        assert_eq!((d.kind(), d.body[0]), (DISCONNECT, code), "alias {alias}");
    }
}

#[test]
fn publishes_to_dollar_topics_are_refused_not_lost_unseen() {
    // The core routes no `$` topic, not even to a filter that names it.
    let v = Vigil::start();
    let (mut c, _) = connect(&v, "dollar-pub", true, &[]);
    c.send(&publish5("$foo/t", b"x", 1, false, 3));
    let ack = c.recv().expect("PUBACK");
    assert_eq!((ack.kind(), &ack.body[..]), (PUBACK, &[0, 3, 0x90][..]));
    c.send(&publish5("plain/t", b"x", 1, false, 4));
    // Accepted; nobody subscribed, which the PUBACK says (0x10) as mosquitto's does.
    assert_eq!(c.recv().expect("PUBACK").body, [0, 4, 0x10]);
    let page = http_get(v.http, "/metrics");
    assert_eq!(
        metric(&page, "vigil_limit_refusals_total{limit=\"dollar_topic\"}"),
        Some(1.0)
    );
}

#[test]
fn a_qos2_delivery_keeps_its_place_in_the_receive_maximum_until_pubcomp() {
    // MQTT-4.9.0-2: the send quota comes back at PUBCOMP, not at PUBREC.
    let v = Vigil::start();
    let (mut c, _) = connect(&v, "fc-q2", true, &[0x21, 0, 1]);
    subscribe(&mut c, "fcq2/t", 2);
    for m in ["first", "second"] {
        publish(v.port(), &["-t", "fcq2/t", "-m", m, "-q", "2"]);
    }
    let first = parse5(&c.recv().expect("the first delivery"));
    assert_eq!((first.qos, &first.payload[..]), (2, &b"first"[..]));
    assert!(drain(&mut c, Duration::from_millis(500)).is_empty());
    c.send(&ack_packet(5, first.pkid));
    let rel = c.recv().expect("PUBREL");
    assert_eq!(
        (rel.kind(), &rel.body[..2]),
        (6, &first.pkid.to_be_bytes()[..])
    );
    assert!(
        drain(&mut c, Duration::from_millis(500)).is_empty(),
        "a delivery went out before the PUBCOMP"
    );
    c.send(&ack_packet(7, first.pkid));
    let second = parse5(&c.recv().expect("the second delivery after PUBCOMP"));
    assert_eq!(second.payload, b"second");
}

#[test]
fn qos2_publishes_past_the_receive_maximum_end_the_connection() {
    // paho's test_flow_control2: a client that never releases its QoS 2 publishes may keep as
    // many open as the CONNACK's Receive Maximum; the next one gets DISCONNECT 0x93. Like
    // paho's client, it goes on writing (PUBRELs for the PUBRECs it reads) after the broker
    // has decided to close: those writes must not meet a reset, which fails the client's
    // next write and can destroy the DISCONNECT unread. A client that releases each one
    // publishes as many as it likes.
    let v = Vigil::start();
    let (mut c, connack) = connect_acked(&v, "fc2", true, &[]);
    let props = &connack.body[3..];
    let at = props
        .iter()
        .position(|&b| b == 0x21)
        .expect("Receive Maximum in CONNACK");
    let receive_max = u16::from_be_bytes([props[at + 1], props[at + 2]]);
    let burst: Vec<u8> = (1..=receive_max + 1)
        .flat_map(|id| publish5("fc2/t", b"m", 2, false, id))
        .collect();
    c.send(&burst);
    let end = loop {
        let p = c.recv().expect("PUBREC or DISCONNECT");
        match p.kind() {
            5 => c.send(&ack_packet(6, u16::from_be_bytes([p.body[0], p.body[1]]))),
            _ => break p,
        }
    };
    assert_eq!((end.kind(), end.body[0]), (DISCONNECT, 0x93), "{end:?}");
    for _ in 0..3 {
        c.send(&[0xC0, 0]);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c.closed_within(T));

    let mut ok = Raw::open(v.mqtt);
    ok.send(&connect5("fc2-ok", true, &[]));
    assert_eq!(ok.recv().map(|p| p.kind()), Some(2));
    for id in 1..=receive_max + 5 {
        ok.send(&publish5("fc2/t", b"m", 2, false, id));
        assert_eq!(ok.recv().map(|p| p.kind()), Some(5), "PUBREC {id}");
        ok.send(&ack_packet(6, id));
        assert_eq!(ok.recv().map(|p| p.kind()), Some(7), "PUBCOMP {id}");
    }
}

#[test]
fn deliveries_use_topic_aliases_when_the_client_accepts_them() {
    // paho's test_server_topic_alias: a client accepting one alias gets its first topic with
    // the alias, then the alias and an empty topic (at QoS 2 the full topic too, for
    // MQTT.js); a second topic goes in full. A client that accepts none gets no alias, and
    // with `limits.topic_aliases` at its default of 0 nobody does.
    let v = Vigil::start_with(|c| c.replacen("topic_aliases = 0", "topic_aliases = 32", 1));
    let (mut c, _) = connect(&v, "ta", true, &[0x22, 0, 1]);
    subscribe(&mut c, "ta/+", 2);
    // The QoS 2 message is routed at its PUBREL: the last two are published once the first
    // three have arrived, so the deliveries come in publishing order.
    let mut got = Vec::new();
    let mut pkid = 10;
    for (batch, want) in [
        (&[(0, "ta/a"), (1, "ta/a"), (2, "ta/a")][..], 3),
        (&[(1, "ta/b"), (1, "ta/a")][..], 5),
    ] {
        for &(qos, topic) in batch {
            pkid += 1;
            c.send(&publish5(topic, topic.as_bytes(), qos, false, pkid));
        }
        while got.len() < want {
            let p = c.recv().expect("a delivery");
            match p.kind() {
                PUBLISH => {
                    let d = parse5(&p);
                    match d.qos {
                        1 => c.send(&ack_packet(PUBACK, d.pkid)),
                        2 => c.send(&ack_packet(5, d.pkid)),
                        _ => {}
                    }
                    got.push((d.topic, d.alias, d.payload));
                }
                7 | PUBACK => {}
                5 => c.send(&ack_packet(6, u16::from_be_bytes([p.body[0], p.body[1]]))),
                6 => c.send(&ack_packet(7, u16::from_be_bytes([p.body[0], p.body[1]]))),
                other => panic!("unexpected packet {other}: {p:?}"),
            }
        }
    }
    let a = (b"ta/a".to_vec(), b"ta/b".to_vec());
    assert_eq!(
        got,
        vec![
            ("ta/a".to_string(), Some(1), a.0.clone()),
            (String::new(), Some(1), a.0.clone()),
            ("ta/a".to_string(), Some(1), a.0.clone()),
            ("ta/b".to_string(), None, a.1.clone()),
            (String::new(), Some(1), a.0.clone()),
        ]
    );
    let (mut plain, _) = connect(&v, "ta-none", true, &[]);
    subscribe(&mut plain, "ta/+", 0);
    plain.send(&publish5("ta/a", b"x", 0, false, 0));
    let d = parse5(&plain.recv().expect("a delivery"));
    assert_eq!((d.topic.as_str(), d.alias), ("ta/a", None));

    let v = Vigil::start();
    let (mut c, _) = connect(&v, "ta-off", true, &[0x22, 0, 8]);
    subscribe(&mut c, "ta/+", 0);
    for _ in 0..2 {
        c.send(&publish5("ta/a", b"x", 0, false, 0));
        let d = parse5(&c.recv().expect("a delivery"));
        assert_eq!((d.topic.as_str(), d.alias), ("ta/a", None));
    }
}

#[test]
fn no_local_retain_as_published_and_retain_handling() {
    let v = Vigil::start();

    // No Local: the publisher does not get its own message; another No Local subscriber does.
    let (mut a, _) = connect(&v, "nl-a", true, &[]);
    let (mut b, _) = connect(&v, "nl-b", true, &[]);
    subscribe(&mut a, "nl/t", 0x04 | 1);
    subscribe(&mut b, "nl/t", 0x04 | 1);
    a.send(&publish5("nl/t", b"mine", 1, false, 7));
    let got = parse5(&b.recv().expect("the other No Local subscriber gets it"));
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("nl/t", &b"mine"[..])
    );
    let to_a: Vec<u8> = drain(&mut a, Duration::from_millis(700))
        .iter()
        .map(|p| p.kind())
        .collect();
    assert_eq!(to_a, vec![PUBACK], "the publisher got its own message back");
    // Another client's message does reach a No Local subscriber.
    publish(v.port(), &["-t", "nl/t", "-m", "theirs", "-q", "1"]);
    assert_eq!(
        parse5(&a.recv().expect("others' messages")).payload,
        b"theirs"
    );

    // Retain As Published: the RETAIN flag as the publisher set it, only for that subscriber.
    let (mut rap, _) = connect(&v, "rap", true, &[]);
    let (mut plain, _) = connect(&v, "plain", true, &[]);
    subscribe(&mut rap, "rap/t", 0x08 | 1);
    subscribe(&mut plain, "rap/t", 1);
    publish(v.port(), &["-t", "rap/t", "-m", "r", "-q", "1", "-r"]);
    let (r, p) = (
        parse5(&rap.recv().expect("rap")),
        parse5(&plain.recv().expect("plain")),
    );
    assert!(r.retain, "Retain As Published lost the flag");
    assert!(
        !p.retain,
        "a live delivery must have RETAIN 0 without Retain As Published"
    );

    // Retain Handling 2: no retained messages when subscribing; 0: the retained message.
    let (mut rh2, _) = connect(&v, "rh2", true, &[]);
    subscribe(&mut rh2, "rap/#", 0x20 | 1);
    assert!(
        drain(&mut rh2, Duration::from_millis(700)).is_empty(),
        "Retain Handling 2 got the retained message"
    );
    let (mut rh0, _) = connect(&v, "rh0", true, &[]);
    subscribe(&mut rh0, "rap/#", 1);
    let got = parse5(&rh0.recv().expect("the retained message"));
    assert!(got.retain && got.payload == b"r");
    // A live message still reaches the Retain Handling 2 subscriber.
    publish(v.port(), &["-t", "rap/t", "-m", "live", "-q", "1"]);
    assert_eq!(parse5(&rh2.recv().expect("live message")).payload, b"live");
    publish(v.port(), &["-t", "rap/t", "-r", "-n"]);

    // Overlapping subscriptions, one with No Local and one without: the publisher gets the
    // other's copy only, as from mosquitto; Retain As Published also holds per copy.
    let (mut o, _) = connect(&v, "nl-overlap", true, &[]);
    subscribe(&mut o, "nlo/t", 0x04 | 0x08 | 1);
    o.send(&subscribe5_with(2, "nlo/+", 1, &sub_id(5)));
    assert_eq!(o.recv().expect("SUBACK").kind(), SUBACK);
    o.send(&publish5("nlo/t", b"own", 1, true, 9));
    let got: Vec<(u8, Vec<u32>, bool)> = drain(&mut o, Duration::from_millis(800))
        .iter()
        .map(|p| match p.kind() {
            PUBLISH => {
                let d = parse5(p);
                (PUBLISH, d.sub_ids, d.retain)
            }
            kind => (kind, Vec::new(), false),
        })
        .collect();
    assert!(
        got.contains(&(PUBACK, Vec::new(), false)) && got.contains(&(PUBLISH, vec![5], false)),
        "{got:?}"
    );
    assert_eq!(got.len(), 2, "the No Local copy came back: {got:?}");
    publish(v.port(), &["-t", "nlo/t", "-m", "theirs", "-q", "1", "-r"]);
    let mut got: Vec<(Vec<u32>, bool)> = publishes(&mut o, Duration::from_millis(800))
        .into_iter()
        .map(|d| (d.sub_ids, d.retain))
        .collect();
    got.sort();
    assert_eq!(got, vec![(vec![], true), (vec![5], false)]);
    publish(v.port(), &["-t", "nlo/t", "-r", "-n"]);

    // No Local on a shared subscription is a protocol error (MQTT-3.8.3-4).
    let (mut shared, _) = connect(&v, "nl-shared", true, &[]);
    shared.send(&subscribe5(1, "$share/g/nl/t", 0x04 | 1));
    let d = shared.recv().expect("DISCONNECT");
    assert_eq!((d.kind(), d.body[0]), (DISCONNECT, 0x82), "{d:?}");
}

#[test]
fn expired_messages_are_not_delivered_and_the_rest_carry_what_is_left() {
    let v = Vigil::start();
    // An offline persistent session with a QoS 1 subscription.
    let (mut b, _) = connect(&v, "me-b", true, &u32_prop(0x11, 300));
    subscribe(&mut b, "me/t", 1);
    b.send(&disconnect5(&[]));
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    for (expiry, text) in [("1", "short"), ("60", "long")] {
        publish(
            v.port(),
            &[
                "-V",
                "mqttv5",
                "-t",
                "me/t",
                "-q",
                "1",
                "-m",
                text,
                "-D",
                "publish",
                "message-expiry-interval",
                expiry,
            ],
        );
    }
    std::thread::sleep(Duration::from_millis(2200));
    let (mut b, present) = connect(&v, "me-b", false, &u32_prop(0x11, 300));
    assert!(present);
    let got: Vec<Publish5> = drain(&mut b, Duration::from_millis(1500))
        .iter()
        .map(parse5)
        .collect();
    assert_eq!(got.len(), 1, "expected only the unexpired message: {got:?}");
    assert_eq!(got[0].payload, b"long");
    let left = got[0].expiry.expect("Message Expiry Interval forwarded");
    assert!(
        (55..60).contains(&left),
        "expiry left should be 60 minus the wait: {left}"
    );
    let page = http_get(v.http, "/metrics");
    assert_eq!(
        metric(&page, "vigil_dropped_total{reason=\"expired\"}"),
        Some(1.0)
    );
}

#[test]
fn session_expiry_is_enforced_and_can_be_changed_on_disconnect() {
    let v = Vigil::start();
    let expiry_2s = u32_prop(0x11, 2);
    let (mut c, present) = connect(&v, "se", true, &expiry_2s);
    assert!(!present);
    subscribe(&mut c, "se/t", 1);
    c.send(&disconnect5(&[]));
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let (mut c, present) = connect(&v, "se", false, &expiry_2s);
    assert!(present, "the session should outlive the connection");
    c.send(&disconnect5(&[]));
    drop(c);
    // A message published while the session is offline is queued for it...
    publish(v.port(), &["-t", "se/t", "-m", "queued", "-q", "1"]);
    std::thread::sleep(Duration::from_millis(3000));
    // ...until the session expires, with its subscription.
    let (mut c, present) = connect(&v, "se", false, &expiry_2s);
    assert!(!present, "the session should have expired");
    assert!(drain(&mut c, Duration::from_millis(700)).is_empty());
    publish(v.port(), &["-t", "se/t", "-m", "after", "-q", "1"]);
    assert!(
        drain(&mut c, Duration::from_millis(700)).is_empty(),
        "the expired session's subscription is still routed"
    );
    c.send(&disconnect5(&u32_prop(0x11, 0)));
    drop(c);

    // DISCONNECT can shorten the expiry to 0: the session ends with the connection.
    let (mut c, _) = connect(&v, "se0", true, &u32_prop(0x11, 60));
    subscribe(&mut c, "se/t", 1);
    c.send(&disconnect5(&u32_prop(0x11, 0)));
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let (_c, present) = connect(&v, "se0", false, &[]);
    assert!(!present, "DISCONNECT with expiry 0 must end the session");

    // ...and lengthen it, unless CONNECT set none (a protocol error).
    let (mut c, _) = connect(&v, "se1", true, &u32_prop(0x11, 1));
    c.send(&disconnect5(&u32_prop(0x11, 60)));
    drop(c);
    std::thread::sleep(Duration::from_millis(2000));
    let (_c, present) = connect(&v, "se1", false, &[]);
    assert!(present, "DISCONNECT lengthened the expiry to 60 s");
    let (mut c, _) = connect(&v, "se2", true, &[]);
    c.send(&disconnect5(&u32_prop(0x11, 60)));
    let d = c.recv().expect("DISCONNECT");
    assert_eq!((d.kind(), d.body[0]), (DISCONNECT, 0x82), "{d:?}");
    assert_eq!(
        metric(
            &http_get(v.http, "/metrics"),
            "vigil_sessions_expired_total"
        ),
        Some(1.0)
    );
}

/// `mosquitto_sub` with a will delayed by `delay` seconds and Session Expiry `expiry` (when
/// given), subscribed to something else.
fn will_client(v: &Vigil, id: &str, delay: &str, expiry: Option<&str>, clean: bool) -> Sub {
    will_client_qos(v, id, delay, expiry, clean, "0")
}

/// `will_client` with a will of QoS `qos`.
fn will_client_qos(
    v: &Vigil,
    id: &str,
    delay: &str,
    expiry: Option<&str>,
    clean: bool,
    qos: &str,
) -> Sub {
    let mut args = vec![
        "-V",
        "mqttv5",
        "-i",
        id,
        "-t",
        "wd/other",
        "--will-topic",
        "wd/will",
        "--will-payload",
        id,
        "--will-qos",
        qos,
        "-D",
        "will",
        "will-delay-interval",
        delay,
    ];
    if let Some(e) = expiry {
        args.extend(["-x", e]);
    }
    if !clean {
        args.push("-c");
    }
    Sub::start(v.port(), &args)
}

#[test]
fn a_will_waits_for_its_delay_and_a_reconnection_cancels_it() {
    let v = Vigil::start();
    let mut watcher = Sub::start(v.port(), &["-t", "wd/will", "-q", "1"]);

    // Delay 2 s, session expiry 10 s: the will goes 2 s after the connection breaks.
    let mut a = will_client(&v, "wd-a", "2", Some("10"), true);
    a.kill();
    let start = Instant::now();
    assert_eq!(watcher.expect_messages(1, T), vec!["wd/will|0|0|wd-a"]);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1700) && took < Duration::from_millis(3500),
        "will after {took:?}, expected about 2 s"
    );

    // A reconnection of the session within the delay: no will.
    let mut b = will_client(&v, "wd-b", "2", Some("10"), true);
    b.kill();
    std::thread::sleep(Duration::from_millis(500));
    let _b = will_client(&v, "wd-b", "30", Some("10"), false);
    assert_eq!(
        watcher.drain(Duration::from_millis(3000)).len(),
        1,
        "the will of a session that reconnected in time was published"
    );

    // Session expiry shorter than the delay: the will goes when the session ends, here at
    // once (no expiry given means 0).
    let mut c = will_client(&v, "wd-c", "30", None, true);
    c.kill();
    let start = Instant::now();
    let got = watcher.expect_messages(2, T);
    assert_eq!(got.last().map(String::as_str), Some("wd/will|0|0|wd-c"));
    assert!(start.elapsed() < Duration::from_millis(1500));
}

/// With `[persistence] dir`, an offline session's delayed will survives a restart: it goes
/// when due, counting the time vigil was down, or right after the restore when the session
/// expired meanwhile, and persistent subscribers restored with it receive it.
#[test]
fn delayed_wills_survive_a_restart_with_persistence() {
    let data = TempDir::new();
    let start = || Vigil::start_persistent(&data, |c| c);
    let watch = |v: &Vigil| {
        let args = ["-c", "-i", "will-watcher", "-q", "1", "-t", "wd/will"];
        Sub::start(v.port(), &args)
    };
    let will_client = |v: &Vigil, id: &str, delay: &str, expiry: &str| {
        will_client_qos(v, id, delay, Some(expiry), true, "1")
    };
    let mut v = start();
    let mut watcher = watch(&v);
    // Will Delay 5 s, Session Expiry 1 h: the will is due 5 s after the connection breaks.
    let mut late = will_client(&v, "wd-late", "5", "3600");
    // Will Delay 30 s, Session Expiry 2 s: the session, and the wait, end after 2 s.
    let mut gone = will_client(&v, "wd-gone", "30", "2");
    late.kill();
    gone.kill();
    let broke = Instant::now();
    watcher.kill();
    let (status, _) = v.terminate();
    assert!(status.success());
    std::thread::sleep(Duration::from_secs(3)); // wd-gone's session expires meanwhile

    let v = start();
    assert!(
        v.log().contains("restored=2") && v.log().contains("expired=1"),
        "{}",
        v.log()
    );
    let mut watcher = watch(&v);
    let got = watcher.expect_messages(2, T);
    let took = broke.elapsed();
    assert_eq!(got, ["wd/will|1|0|wd-gone", "wd/will|1|0|wd-late"]);
    assert!(
        took >= Duration::from_millis(4700) && took < Duration::from_millis(7000),
        "wd-late's will after {took:?}, expected about 5 s"
    );
}

/// Receives `n` PUBLISHes, acknowledging each as its QoS asks (QoS 2: PUBREC, and PUBCOMP for
/// the PUBREL that must follow), until no PUBREL is owed; returns them sorted.
fn take_and_ack(c: &mut Raw, n: usize, v5: bool) -> Vec<(String, u8, bool, Vec<u8>)> {
    let mut got = Vec::new();
    let mut owed = Vec::new();
    while got.len() < n || !owed.is_empty() {
        let p = c
            .recv()
            .unwrap_or_else(|| panic!("stalled with {got:?}, PUBRELs owed {owed:?}"));
        if p.kind() == 6 {
            let pkid = u16::from_be_bytes([p.body[0], p.body[1]]);
            assert!(owed.contains(&pkid), "PUBREL for {pkid}, owed {owed:?}");
            owed.retain(|&id| id != pkid);
            c.send(&ack_packet(7, pkid));
            continue;
        }
        let (topic, qos, retain, pkid, payload) = if v5 {
            let d = parse5(&p);
            (d.topic, d.qos, d.retain, d.pkid, d.payload)
        } else {
            let (topic, qos, retain, _, pkid, payload) = parse_publish(&p);
            (topic, qos, retain, pkid, payload)
        };
        match qos {
            1 => c.send(&ack_packet(PUBACK, pkid)),
            2 => {
                c.send(&ack_packet(5, pkid));
                owed.push(pkid);
            }
            _ => {}
        }
        got.push((topic, qos, retain, payload));
    }
    got.sort();
    got
}

#[test]
fn a_replaced_subscription_gets_its_retained_messages_again() {
    // MQTT-3.8.4-3 (3.1.1 and v5 with Retain Handling 0); rumqttd sends retained messages
    // only for a new subscription, so the edge fetches them.
    let v = Vigil::start();
    publish(v.port(), &["-t", "rs/a", "-m", "A", "-q", "1", "-r"]);
    publish(v.port(), &["-t", "rs/b", "-m", "B", "-q", "2", "-r"]);
    let expected = vec![
        ("rs/a".to_string(), 1, true, b"A".to_vec()),
        ("rs/b".to_string(), 2, true, b"B".to_vec()),
    ];

    let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("rs-311"));
    for round in 0..2 {
        c.send(&subscribe_packet(1, &[("rs/#", 2)]));
        assert_eq!(c.recv().map(|p| p.kind()), Some(SUBACK));
        assert_eq!(take_and_ack(&mut c, 2, false), expected, "round {round}");
    }
    // The edge's own deliveries leave the session's flow intact.
    publish(v.port(), &["-t", "rs/a", "-m", "live", "-q", "2"]);
    assert_eq!(
        take_and_ack(&mut c, 1, false),
        vec![("rs/a".to_string(), 2, false, b"live".to_vec())]
    );
    assert!(drain(&mut c, Duration::from_millis(500)).is_empty());

    // v5: Retain Handling 1 (only for a new subscription) gets nothing, 0 gets them again.
    let (mut c, _) = connect(&v, "rs-5", true, &[]);
    subscribe(&mut c, "rs/#", 2);
    assert_eq!(take_and_ack(&mut c, 2, true), expected);
    subscribe(&mut c, "rs/#", 0x10 | 2);
    assert!(drain(&mut c, Duration::from_millis(700)).is_empty());
    subscribe(&mut c, "rs/#", 1);
    assert_eq!(
        take_and_ack(&mut c, 2, true),
        vec![
            ("rs/a".to_string(), 1, true, b"A".to_vec()),
            ("rs/b".to_string(), 1, true, b"B".to_vec()),
        ]
    );
    publish(v.port(), &["-t", "rs/a", "-r", "-n"]);
    publish(v.port(), &["-t", "rs/b", "-r", "-n"]);
}

/// Subscribes `filter` at QoS 1 with Subscription Identifier `id` (none when 0).
fn subscribe_with_id(c: &mut Raw, filter: &str, id: u32) {
    let properties = if id == 0 { Vec::new() } else { sub_id(id) };
    c.send(&subscribe5_with(1, filter, 1, &properties));
    let ack = c.recv().expect("SUBACK");
    assert_eq!(ack.kind(), SUBACK, "{ack:?}");
    assert!(ack.body[3] < 0x80, "subscription refused: {ack:?}");
}

/// The PUBLISHes that arrive within `window`.
fn publishes(c: &mut Raw, window: Duration) -> Vec<Publish5> {
    drain(c, window)
        .iter()
        .filter(|p| p.kind() == PUBLISH)
        .map(parse5)
        .collect()
}

#[test]
fn subscription_identifiers_come_back_with_the_messages_they_matched() {
    let v = Vigil::start();
    // CONNACK announces them available (absence would mean the same; some clients look).
    let (mut a, ack) = connect_acked(&v, "sid-a", true, &[]);
    assert!(ack.body.windows(2).any(|w| w == [0x29, 1]), "{ack:?}");

    // One subscription, one identifier (a multi-byte variable byte integer).
    subscribe_with_id(&mut a, "sid1/t", 456_789);
    publish(v.port(), &["-t", "sid1/t", "-m", "one", "-q", "1"]);
    let got = parse5(&a.recv().expect("the message"));
    assert_eq!(
        (&got.payload[..], got.sub_ids),
        (&b"one"[..], vec![456_789])
    );

    // Overlapping subscriptions: a copy per subscription, as mosquitto sends, each with the
    // identifier of its own subscription (MQTT-3.3.4-5), at its own QoS.
    let (mut b, _) = connect(&v, "sid-b", true, &[]);
    subscribe_with_id(&mut b, "sid2/t", 2);
    subscribe_with_id(&mut b, "sid2/#", 3);
    b.send(&subscribe5_with(1, "sid2/+", 0, &sub_id(4)));
    assert_eq!(b.recv().expect("SUBACK").kind(), SUBACK);
    for round in 0..3 {
        publish(v.port(), &["-t", "sid2/t", "-m", "two", "-q", "1"]);
        let mut copies: Vec<(Vec<u32>, u8)> = publishes(&mut b, Duration::from_millis(800))
            .into_iter()
            .map(|c| {
                if c.qos > 0 {
                    b.send(&ack_packet(PUBACK, c.pkid));
                }
                (c.sub_ids, c.qos)
            })
            .collect();
        copies.sort();
        assert_eq!(
            copies,
            vec![(vec![2], 1), (vec![3], 1), (vec![4], 0)],
            "round {round}"
        );
    }
    // Subscribing again without an identifier removes it (MQTT-3.8.2.1.2); only `sid2/#`
    // matches `sid2/x/y`.
    subscribe_with_id(&mut b, "sid2/#", 0);
    publish(v.port(), &["-t", "sid2/x/y", "-m", "three", "-q", "1"]);
    let got = parse5(&b.recv().expect("the message"));
    assert!(got.sub_ids.is_empty(), "{got:?}");

    // A retained message sent because of the subscription carries its identifier.
    publish(v.port(), &["-t", "sid3/r", "-m", "kept", "-q", "1", "-r"]);
    let (mut c, _) = connect(&v, "sid-c", true, &[]);
    subscribe_with_id(&mut c, "sid3/+", 9);
    let got = parse5(&c.recv().expect("the retained message"));
    assert!(got.retain, "{got:?}");
    assert_eq!(got.sub_ids, vec![9]);
    // Two overlapping SUBSCRIBEs sent back to back: each one's retained copy carries its own
    // identifier (the edge knows which subscription it is sending retained messages for).
    let (mut d, _) = connect(&v, "sid-d", true, &[]);
    d.send(&subscribe5_with(1, "sid3/#", 1, &sub_id(11)));
    d.send(&subscribe5_with(2, "sid3/+", 1, &sub_id(12)));
    let mut ids: Vec<Vec<u32>> = publishes(&mut d, Duration::from_millis(800))
        .into_iter()
        .map(|c| {
            assert!(c.retain, "{c:?}");
            c.sub_ids
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![vec![11], vec![12]]);
    publish(v.port(), &["-t", "sid3/r", "-r", "-n"]);

    // A resumed session keeps its subscriptions' identifiers.
    let expiry = u32_prop(0x11, 60);
    let (mut p, _) = connect(&v, "sid-p", true, &expiry);
    subscribe_with_id(&mut p, "sid4/t", 77);
    p.send(&disconnect5(&[]));
    drop(p);
    let (mut p, present) = connect(&v, "sid-p", false, &expiry);
    assert!(present);
    publish(v.port(), &["-t", "sid4/t", "-m", "later", "-q", "1"]);
    assert_eq!(parse5(&p.recv().expect("the message")).sub_ids, vec![77]);

    // 3.1.1 subscribers get the messages without properties, as before.
    let mut sub = Sub::start(v.port(), &["-t", "sid1/t", "-q", "1"]);
    publish(v.port(), &["-t", "sid1/t", "-m", "plain", "-q", "1"]);
    assert_eq!(
        sub.expect_messages(1, T),
        vec!["sid1/t|1|0|plain".to_string()]
    );

    // Identifier 0, or two of them in one SUBSCRIBE, is a protocol error.
    for properties in [sub_id(0), [sub_id(1), sub_id(2)].concat()] {
        let (mut bad, _) = connect(&v, "sid-bad", true, &[]);
        bad.send(&subscribe5_with(1, "sid5/t", 1, &properties));
        let d = bad.recv().expect("DISCONNECT");
        assert_eq!((d.kind(), d.body[0]), (DISCONNECT, 0x82), "{d:?}");
    }
}

/// With `[persistence] dir`, a v5 session comes back after a restart with everything the
/// edge applies to its subscriptions: identifiers, No Local, and exact UNSUBACK codes.
#[test]
fn subscription_options_survive_a_restart_with_persistence() {
    let data = TempDir::new();
    let start = || Vigil::start_persistent(&data, |c| c);
    let expiry = u32_prop(0x11, 3600);
    let mut v = start();
    let (mut c, _) = connect(&v, "opt", true, &expiry);
    // QoS 1, No Local, identifier 5; and a plain QoS 1 subscription.
    c.send(&subscribe5_with(1, "opt/t", 0x05, &sub_id(5)));
    assert_eq!(c.recv().expect("SUBACK").body[3], 1);
    subscribe(&mut c, "opt/u", 1);
    // A QoS 2 publish the client leaves unreleased (PUBREC, no PUBREL).
    c.send(&publish5("opt/q2", b"once", 2, false, 7));
    assert_eq!(c.recv().expect("PUBREC").kind(), 5);
    c.send(&disconnect5(&[]));
    drop(c);
    let (status, _) = v.terminate();
    assert!(status.success());

    let v = start();
    assert!(v.log().contains("restored=1"), "{}", v.log());
    publish(v.port(), &["-t", "opt/t", "-m", "while away", "-q", "1"]);
    let (mut c, present) = connect(&v, "opt", false, &expiry);
    assert!(present);
    let got = parse5(&c.recv().expect("the queued message"));
    assert_eq!(
        (&got.payload[..], got.sub_ids),
        (&b"while away"[..], vec![5])
    );
    c.send(&ack_packet(PUBACK, got.pkid));
    // No Local: the client's own publish does not come back.
    c.send(&publish5("opt/t", b"mine", 1, false, 9));
    let back = drain(&mut c, Duration::from_millis(800));
    assert!(
        back.iter().all(|p| p.kind() == PUBACK),
        "only the PUBACK: {back:?}"
    );
    // The unreleased QoS 2 publish: a re-send is acknowledged, not routed again, and the
    // PUBREL completes it (PUBCOMP with success, not 0x92 "packet identifier not found").
    let mut watcher = Sub::start(v.port(), &["-t", "opt/q2", "-q", "2"]);
    c.send(&publish5("opt/q2", b"once", 2, false, 7));
    assert_eq!(c.recv().expect("PUBREC").kind(), 5);
    c.send(&ack_packet(6, 7));
    let comp = c.recv().expect("PUBCOMP");
    assert_eq!(comp.kind(), 7, "{comp:?}");
    assert_eq!(comp.body.get(2).copied().unwrap_or(0), 0, "{comp:?}");
    assert!(watcher.drain(Duration::from_millis(500)).is_empty());
    assert_eq!(
        unsubscribe5(&mut c, 2, &["opt/u", "never/subscribed"]),
        [0x00, 0x11]
    );
}

/// As mosquitto: a v5 QoS 1 publish that no subscription matches is acknowledged with 0x10
/// (no matching subscribers), retained or not; one that some filter matches (a client's
/// wildcard, the analytics task's `device/+/telemetry`) with success; 3.1.1 PUBACKs carry no
/// code. QoS 2 PUBRECs are sent before routing and stay 0x00.
#[test]
fn puback_says_when_no_subscription_matches() {
    let v = Vigil::start();
    let (mut p, _) = connect(&v, "nosubs-pub", true, &[]);
    let puback = |p: &mut Raw, topic: &str, retain: bool, pkid: u16| {
        p.send(&publish5(topic, b"m", 1, retain, pkid));
        let ack = p.recv().expect("PUBACK");
        assert_eq!(ack.kind(), PUBACK, "{ack:?}");
        assert_eq!(ack.body[..2], pkid.to_be_bytes(), "{ack:?}");
        ack.body.get(2).copied().unwrap_or(0)
    };
    assert_eq!(puback(&mut p, "nosubs/a", false, 1), 0x10);
    assert_eq!(puback(&mut p, "nosubs/a/b", false, 2), 0x10);
    assert_eq!(puback(&mut p, "nosubs/a/b", true, 3), 0x10, "retained");
    assert_eq!(
        puback(&mut p, "device/d1/telemetry", false, 4),
        0,
        "analytics"
    );
    // Another client subscribes to a wildcard that matches: the publisher learns it at once.
    let (mut s, _) = connect(&v, "nosubs-sub", true, &[]);
    subscribe(&mut s, "nosubs/+/b", 1);
    assert_eq!(puback(&mut p, "nosubs/a/b", false, 5), 0);
    assert_eq!(puback(&mut p, "nosubs/a", false, 6), 0x10);
    // QoS 2: PUBREC before routing, always success.
    p.send(&publish5("nosubs/q2", b"m", 2, false, 7));
    let rec = p.recv().expect("PUBREC");
    assert_eq!((rec.kind(), rec.body.get(2).copied().unwrap_or(0)), (5, 0));
    // 3.1.1 has no reason codes.
    let mut old = Raw::connected(v.mqtt, &ConnectOpts::v311("nosubs-311"));
    old.send(&publish_packet("nosubs/c", b"m", 1, false, 1, false));
    let ack = old.recv().expect("PUBACK");
    assert_eq!((ack.kind(), ack.body.clone()), (PUBACK, vec![0, 1]));
}

/// `limits.persistent_session_expiry_secs` caps a v5 client's Session Expiry Interval, at
/// CONNECT (the CONNACK says the value used) and at DISCONNECT.
#[test]
fn the_configured_expiry_caps_what_a_v5_session_asks_for() {
    let v = Vigil::start_with(|c| {
        vigil::config::set_value(&c, "limits", "persistent_session_expiry_secs", "2")
    });
    let announced = |ack: &Packet| {
        let at = ack.body.windows(5).position(|w| w[0] == 0x11)?;
        Some(u32::from_be_bytes(
            ack.body[at + 1..at + 5].try_into().ok()?,
        ))
    };
    let (mut c, ack) = connect_acked(&v, "cap-long", true, &u32_prop(0x11, 3600));
    assert_eq!(announced(&ack), Some(2), "{ack:?}");
    subscribe(&mut c, "cap/t", 1);
    drop(c);
    let (_c, ack) = connect_acked(&v, "cap-short", true, &u32_prop(0x11, 1));
    assert_eq!(
        announced(&ack),
        None,
        "a shorter expiry is used as asked: {ack:?}"
    );
    // DISCONNECT cannot lengthen it past the cap either.
    let (mut d, _) = connect_acked(&v, "cap-disc", true, &u32_prop(0x11, 1));
    d.send(&disconnect5(&u32_prop(0x11, 3600)));
    drop(d);
    std::thread::sleep(Duration::from_millis(3000));
    for id in ["cap-long", "cap-disc"] {
        let (_c, present) = connect(&v, id, false, &u32_prop(0x11, 60));
        assert!(!present, "{id}: the session should have expired after 2 s");
    }
}
