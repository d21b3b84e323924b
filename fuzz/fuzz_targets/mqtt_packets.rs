//! The edge's packet inspection, fed bytes the way a hostile client sends them.
//!
//! The input is a client's byte stream. It is framed with `mqtt::read_frame` exactly as the edge
//! frames a client connection (whole buffer at once, then again one byte at a time: both must
//! give the same frames and the same error), and every frame goes through every client-packet
//! parser in both protocol versions, the envelope, and the ACL. Nothing may panic, and:
//!
//! - framing: a frame's wire length never exceeds the bytes it consumed, it consumed at most
//!   `max`, its body is the corresponding slice of the input, and chunking does not matter;
//! - an accepted PUBLISH holds a valid, non-empty topic name and a non-zero id when QoS > 0; it
//!   re-encodes (`put_publish`, `publish_wire_len`) to a packet that parses back to the same
//!   fields, and through the core path (envelope header, `put_core_publish`,
//!   `parse_core_publish`, `envelope::open`) it arrives with the same QoS, properties and payload;
//! - an accepted CONNECT agrees with `connect_version`, its strings are valid, and its session
//!   fields survive the edge's core CONNECT encoder;
//! - accepted SUBSCRIBE / UNSUBSCRIBE filters are valid filters and survive the core encoders;
//! - `envelope::open` never reads past its input, and `header` + payload always opens back to
//!   exactly what was put in;
//! - ACL decisions agree with a direct model for a fixed rule set.

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use vigil::edge::acl::{Acl, RoleRules, Subject};
use vigil::envelope;
use vigil::mqtt::{self, CodecError, Frame, Version};

/// The edge's default `[limits] max_packet_size` is 1 MiB; a small one exercises `TooLarge`.
const MAXES: [usize; 2] = [1 << 20, 64];

fuzz_target!(|data: &[u8]| {
    for max in MAXES {
        let (frames, end) = frame_all(data, max);
        let (frames_chunked, end_chunked) = frame_bytewise(data, max);
        assert_eq!(end, end_chunked, "framing result depends on chunking");
        assert_eq!(frames.len(), frames_chunked.len());
        for (a, b) in frames.iter().zip(&frames_chunked) {
            assert_eq!(a.header, b.header);
            assert_eq!(a.body, b.body);
        }
        if max == MAXES[0] {
            for frame in &frames {
                inspect(frame);
            }
        }
    }
    // The envelope and the ACL also see raw bytes (payloads, topics, filters).
    check_envelope(data);
    check_acl(data);
});

/// Frames the whole input at once, as the edge does after a large read.
fn frame_all(data: &[u8], max: usize) -> (Vec<Frame>, Result<(), CodecError>) {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    let mut offset = 0usize;
    loop {
        let before = buf.len();
        match mqtt::read_frame(&mut buf, max) {
            Ok(Some(frame)) => {
                let consumed = before - buf.len();
                assert!(consumed <= max, "frame of {consumed} bytes over max {max}");
                assert!(frame.wire_len() <= consumed, "wire_len over consumed");
                let header_len = consumed - frame.body.len();
                assert!((2..=5).contains(&header_len), "fixed header {header_len}");
                assert_eq!(frame.header, data[offset]);
                assert_eq!(&frame.body[..], &data[offset + header_len..offset + consumed]);
                offset += consumed;
                frames.push(frame);
            }
            Ok(None) => {
                // More bytes needed: nothing consumed, the tail is intact.
                assert_eq!(buf.len(), before);
                assert_eq!(&buf[..], &data[offset..]);
                return (frames, Ok(()));
            }
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// Frames the input arriving one byte per read, the worst case of a slow client.
fn frame_bytewise(data: &[u8], max: usize) -> (Vec<Frame>, Result<(), CodecError>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for &b in data {
        buf.extend_from_slice(&[b]);
        loop {
            match mqtt::read_frame(&mut buf, max) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
        assert!(buf.len() <= max.max(5), "buffered {} bytes over max {max}", buf.len());
    }
    (frames, Ok(()))
}

fn reframe(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = mqtt::read_frame(&mut buf, usize::MAX)
        .expect("encoder output must frame")
        .expect("encoder output must be complete");
    assert!(buf.is_empty(), "encoder wrote trailing bytes");
    assert_eq!(frame.wire_len(), bytes.len(), "encoder used a non-minimal length");
    frame
}

fn inspect(frame: &Frame) {
    let version = mqtt::connect_version(&frame.body);
    match mqtt::parse_connect(frame) {
        Ok(c) => {
            assert_eq!(version, Some(c.version), "connect_version disagrees");
            check_connect(&c);
        }
        Err(e) => {
            let _ = e.reason_code();
        }
    }
    for v in [Version::V311, Version::V5] {
        if let Ok(p) = mqtt::parse_publish(frame, v) {
            check_publish(frame, &p, v);
        }
        if let Ok(s) = mqtt::parse_subscribe(frame, v) {
            check_subscribe(&s, v);
        }
        if let Ok(u) = mqtt::parse_unsubscribe(frame, v) {
            check_unsubscribe(&u);
        }
        if let Ok(d) = mqtt::parse_disconnect(frame, v) {
            if v == Version::V311 {
                assert_eq!((d.code, d.session_expiry), (0, None));
                assert!(frame.body.is_empty());
            }
        }
    }
    if let Ok((_pkid, reason)) = mqtt::parse_ack(frame) {
        assert!(frame.body.len() >= 2);
        if frame.body.len() == 2 {
            assert_eq!(reason, 0);
        }
    }
    // What the edge runs on the core's side of the connection: framing only, must not panic.
    if let Ok(p) = mqtt::parse_core_publish(frame) {
        let _ = envelope::open(p.payload);
    }
    let _ = mqtt::parse_core_suback(frame);
    let _ = mqtt::parse_core_connack(frame);
    // The string validators on the raw body (a topic, filter or client id can be anything).
    let utf8_ok = mqtt::validate_utf8(&frame.body).is_ok();
    if mqtt::validate_topic_filter(&frame.body).is_ok() {
        assert!(utf8_ok, "a valid filter must be valid UTF-8");
        assert!(!frame.body.is_empty());
    }
    let _ = mqtt::validate_topic_name(&frame.body);
}

fn check_connect(c: &mqtt::Connect) {
    assert!(mqtt::validate_utf8(c.client_id.as_bytes()).is_ok());
    if let Some(u) = &c.username {
        assert!(mqtt::validate_utf8(u.as_bytes()).is_ok());
    }
    if c.version == Version::V311 {
        assert!(c.password.is_none() || c.username.is_some());
    }
    assert!(c.receive_maximum > 0);
    assert_ne!(c.max_packet_size, Some(0));
    if let Some(w) = &c.will {
        assert!(w.qos <= 2);
        assert!(mqtt::validate_utf8(&w.topic).is_ok());
        assert!(mqtt::validate_topic_name(&w.topic).is_ok());
        assert!(c.version == Version::V5 || w.properties.is_empty());
        // The edge publishes the will itself, enveloped like any publish.
        let opened = open_core_publish(&w.topic, w.qos, w.retain, 0, &w.properties, &w.payload);
        check_opened(&opened, w.qos, w.retain, &w.properties, &w.payload);
    }
    // The session fields survive the edge's own CONNECT to the core.
    let mut out = BytesMut::new();
    mqtt::put_core_connect(
        &mut out,
        &mqtt::CoreConnect {
            client_id: &c.client_id,
            clean_session: c.clean_start,
            keep_alive: c.keep_alive,
            username: "edge",
            password: "secret",
            will: None,
        },
    );
    let back = mqtt::parse_connect(&reframe(&out)).expect("core CONNECT must parse");
    assert_eq!(back.version, Version::V311);
    assert_eq!(back.client_id, c.client_id);
    assert_eq!(back.clean_start, c.clean_start);
    assert_eq!(back.keep_alive, c.keep_alive);
    assert_eq!(back.username.as_deref(), Some("edge"));
}

fn check_publish(frame: &Frame, p: &mqtt::Publish, v: Version) {
    assert!(p.qos <= 2);
    assert!(!p.topic.is_empty());
    let topic = mqtt::validate_utf8(&p.topic).expect("accepted topic is UTF-8");
    assert_eq!(p.topic_str(), topic);
    assert!(mqtt::validate_topic_name(&p.topic).is_ok());
    assert_eq!(p.pkid == 0, p.qos == 0, "pkid {} at QoS {}", p.pkid, p.qos);
    assert!(!(p.dup && p.qos == 0));
    assert!(v == Version::V5 || p.properties.is_empty());
    assert!(p.payload.len() + p.topic.len() + p.properties.len() <= frame.body.len());

    // Re-encode as the edge does towards a subscriber of the same version.
    let mut out = BytesMut::new();
    mqtt::put_publish(
        &mut out,
        v,
        p.dup,
        p.qos,
        p.retain,
        &p.topic,
        p.pkid,
        &p.properties,
        &[&p.payload],
    );
    assert_eq!(
        out.len(),
        mqtt::publish_wire_len(v, p.qos, p.topic.len(), p.properties.len(), p.payload.len())
    );
    let again = reframe(&out);
    let q = mqtt::parse_publish(&again, v).expect("re-encoded PUBLISH must parse");
    assert_eq!((q.dup, q.qos, q.retain, q.pkid), (p.dup, p.qos, p.retain, p.pkid));
    assert_eq!(q.topic, p.topic);
    assert_eq!(q.properties, p.properties, "end-to-end properties not stable");
    assert_eq!(q.payload, p.payload);
    if v == Version::V311 && frame.kind() == mqtt::PUBLISH {
        assert_eq!(again.body, frame.body, "3.1.1 PUBLISH does not round-trip byte for byte");
    }

    // Through the core and back, as a subscriber receives it.
    let opened = open_core_publish(&p.topic, p.qos, p.retain, p.pkid, &p.properties, &p.payload);
    check_opened(&opened, p.qos, p.retain, &p.properties, &p.payload);
}

/// Writes the PUBLISH the edge sends the core and reads it back as the edge reads the core.
fn open_core_publish(
    topic: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
    properties: &[u8],
    payload: &[u8],
) -> envelope::Opened {
    let header = envelope::header(qos, properties);
    if properties.is_empty() {
        assert_eq!(&header[..], &envelope::plain_header(qos)[..]);
    }
    let mut out = BytesMut::new();
    envelope::put_core_publish(&mut out, false, qos, retain, topic, pkid, &header, payload);
    let frame = reframe(&out);
    let p = mqtt::parse_core_publish(&frame).expect("core PUBLISH must parse");
    assert_eq!(&p.topic[..], topic);
    assert_eq!((p.qos, p.retain, p.pkid), (qos, retain, pkid));
    envelope::open(p.payload)
}

fn check_opened(o: &envelope::Opened, qos: u8, retain: bool, properties: &[u8], payload: &[u8]) {
    if retain && payload.is_empty() {
        // The one bare payload: a retained-message clear.
        assert_eq!(o.qos, None);
        assert!(o.payload.is_empty());
    } else {
        assert_eq!(o.qos, Some(qos));
        assert_eq!(&o.properties[..], properties);
        assert_eq!(&o.payload[..], payload);
    }
}

fn check_subscribe(s: &mqtt::Subscribe, v: Version) {
    assert_ne!(s.pkid, 0);
    assert!(!s.filters.is_empty());
    for (f, options) in &s.filters {
        assert!(mqtt::validate_topic_filter(f).is_ok());
        assert!(options & 0x03 <= 2);
        if v == Version::V311 {
            assert_eq!(options & 0xFC, 0);
        }
    }
    let mut out = BytesMut::new();
    mqtt::put_core_subscribe(&mut out, s.pkid, &s.filters);
    let back = mqtt::parse_subscribe(&reframe(&out), Version::V311)
        .expect("core SUBSCRIBE must parse");
    assert_eq!(back.pkid, s.pkid);
    assert_eq!(back.filters.len(), s.filters.len());
    for ((a, ao), (b, bo)) in back.filters.iter().zip(&s.filters) {
        assert_eq!(a, b);
        assert_eq!(*ao, bo & 0x03);
    }
}

fn check_unsubscribe(u: &mqtt::Unsubscribe) {
    assert_ne!(u.pkid, 0);
    assert!(!u.filters.is_empty());
    for f in &u.filters {
        assert!(mqtt::validate_topic_filter(f).is_ok());
    }
    let mut out = BytesMut::new();
    mqtt::put_core_unsubscribe(&mut out, u.pkid, &u.filters);
    let back = mqtt::parse_unsubscribe(&reframe(&out), Version::V311)
        .expect("core UNSUBSCRIBE must parse");
    assert_eq!(back.pkid, u.pkid);
    assert_eq!(back.filters, u.filters);
}

fn check_envelope(data: &[u8]) {
    // Whatever the core hands back: never reads past the input.
    let raw = Bytes::copy_from_slice(data);
    let o = envelope::open(raw.clone());
    match o.qos {
        None => {
            assert_eq!(o.payload, raw);
            assert!(o.properties.is_empty());
        }
        Some(q) => {
            assert!(q <= 2);
            assert!(1 + o.properties.len() + o.payload.len() <= raw.len());
            assert!(raw.ends_with(&o.payload));
        }
    }
    // Anything put in comes back out: the first byte picks QoS, the split point and which of
    // vigil's own fields are set. Properties that start with a 0 byte are left out of the
    // comparison: 0 is no property identifier (parse_publish refuses it), and it is what marks
    // vigil's own fields.
    if let Some((&first, rest)) = data.split_first() {
        let qos = first % 3;
        let split = (first as usize / 3).min(rest.len());
        let (props, payload) = rest.split_at(split);
        let digest = envelope::origin_of(&String::from_utf8_lossy(data));
        let private = envelope::Private {
            origin: (first & 0x40 != 0).then_some(digest),
            expires_at: (first & 0x80 != 0).then_some(digest.rotate_left(17)),
        };
        let mut wire = envelope::header_with(qos, private, props);
        wire.extend_from_slice(payload);
        let o = envelope::open(wire.freeze());
        assert_eq!(o.qos, Some(qos));
        if props.first() != Some(&0) {
            assert_eq!(o.private, private);
            assert_eq!(&o.properties[..], props);
        }
        assert_eq!(&o.payload[..], payload);
    }
}

fn acl() -> &'static Acl {
    static ACL: OnceLock<Acl> = OnceLock::new();
    ACL.get_or_init(|| {
        let mut roles = BTreeMap::new();
        roles.insert(
            "device".to_string(),
            RoleRules {
                publish: vec!["device/%u/telemetry".into(), "device/%u/status".into()],
                subscribe: vec!["device/%u/commands".into()],
                ..RoleRules::default()
            },
        );
        roles.insert(
            "viewer".to_string(),
            RoleRules {
                publish: vec![],
                subscribe: vec!["device/+/telemetry".into(), "device/+/alerts".into()],
                ..RoleRules::default()
            },
        );
        roles.insert(
            "admin".to_string(),
            RoleRules {
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
                ..RoleRules::default()
            },
        );
        roles.insert(
            "per-client".to_string(),
            RoleRules {
                publish: vec!["clients/%c/#".into()],
                subscribe: vec!["clients/%c/+/in".into()],
                ..RoleRules::default()
            },
        );
        Acl::new(&roles).expect("fixed rules are valid")
    })
}

fn check_acl(data: &[u8]) {
    let acl = acl();
    // The input's first line, if any, is the identity (user and client id); the rest the topic.
    let (ident, topic) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"pump-1"[..], data),
    };
    let ident = String::from_utf8_lossy(ident);
    let safe = !ident.is_empty() && !ident.bytes().any(|b| matches!(b, b'/' | b'+' | b'#' | 0));
    let valid_name = mqtt::validate_utf8(topic).is_ok() && mqtt::validate_topic_name(topic).is_ok();
    let valid_filter = mqtt::validate_topic_filter(topic).is_ok();
    let text = std::str::from_utf8(topic).ok();
    let is_dollar = topic.first() == Some(&b'$');
    for role in ["device", "viewer", "admin", "per-client", "nobody"] {
        let who = Subject {
            user: &ident,
            client_id: &ident,
            role,
        };
        let may_pub = acl.may_publish(&who, topic);
        let may_sub = acl.may_subscribe(&who, topic);
        if text.is_none() || role == "nobody" {
            assert!(!may_pub && !may_sub, "non-UTF-8 or unknown role allowed");
            continue;
        }
        let t = text.unwrap();
        // Publish: a direct model of each role's rules, for valid topic names.
        if valid_name {
            let expected = match role {
                "device" => {
                    safe && (t == format!("device/{ident}/telemetry")
                        || t == format!("device/{ident}/status"))
                }
                "viewer" => false,
                "admin" => !is_dollar,
                "per-client" => {
                    safe && (t == format!("clients/{ident}")
                        || t.starts_with(&format!("clients/{ident}/")))
                }
                _ => unreachable!(),
            };
            assert_eq!(may_pub, expected, "may_publish({role}, {ident:?}, {t:?})");
        }
        if valid_filter {
            // Subscribing to a wildcard-free filter is publishing's matching.
            let path = t.strip_prefix("$share/").and_then(|r| r.split_once('/')).map(|(_, f)| f);
            let plain = path.unwrap_or(t);
            let wild = plain.contains(['+', '#']);
            if role == "admin" {
                assert_eq!(may_sub, !plain.starts_with('$'), "admin subscribe {t:?}");
            }
            if role == "device" && !wild {
                assert_eq!(
                    may_sub,
                    safe && plain == format!("device/{ident}/commands"),
                    "device subscribe {t:?}"
                );
            }
            if role == "device" && wild {
                assert!(!may_sub, "device subscribed to wildcard {t:?}");
            }
            if role == "viewer" && may_sub {
                let levels: Vec<&str> = plain.split('/').collect();
                assert_eq!(levels.len(), 3, "viewer {t:?}");
                assert_eq!(levels[0], "device");
                assert!(levels[1] != "#" && matches!(levels[2], "telemetry" | "alerts"));
            }
        }
    }
}
