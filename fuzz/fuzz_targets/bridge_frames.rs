//! The WebSocket bridge's JSON frames (docs/bridge-protocol.md), both directions.
//!
//! Inbound: arbitrary text goes through `bridge::frames::parse` as a browser's text message
//! does. Nothing may panic, and every accepted request must satisfy what the session code relies
//! on (valid topics and filters, QoS 0..=2, ids 1..=65535 exactly when QoS > 0, payloads within
//! the limit, `ref` a string or number). Every refusal is answered with an `error` frame echoing
//! the `ref`, which must be valid JSON carrying the code and message unchanged.
//!
//! Outbound: arbitrary topic and payload bytes go through `frames::message` (and `ack`), whose
//! output must be one valid JSON object that reads back to the same topic, flags, id and payload
//! bytes under the announced `encoding`.

#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vigil::bridge::frames::{self, PublishReq, Request};
use vigil::mqtt;

/// A small limit (to reach `payload_too_large`) and the default `max_packet_size`.
const MAX_PAYLOADS: [usize; 2] = [16, 1 << 20];

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for max in MAX_PAYLOADS {
            check_inbound(text, max);
        }
    }
    check_outbound(data);
});

fn check_inbound(text: &str, max: usize) {
    let parsed = frames::parse(text, max);
    let reference = parsed.reference.map(|r| r.get());
    if let Some(r) = reference {
        let first = r.as_bytes()[0];
        assert!(
            first == b'"' || first == b'-' || first.is_ascii_digit(),
            "ref {r:?} is not a string or number"
        );
    }
    if let Some((q, id)) = parsed.refused_publish {
        assert!(parsed.request.is_err(), "refused_publish on an accepted request");
        assert!((1..=2).contains(&q) && id != 0);
    }
    match &parsed.request {
        Ok(Request::Connect(c)) => {
            if let Some(w) = &c.will {
                check_publish(w, max, false);
            }
        }
        Ok(Request::Publish(p)) => check_publish(p, max, true),
        Ok(Request::Subscribe(list)) => {
            assert!(!list.is_empty() && list.len() <= 128);
            for f in list {
                if let Ok(q) = f.qos {
                    assert!(q <= 2);
                    assert!(mqtt::validate_topic_filter(f.filter.as_bytes()).is_ok());
                }
            }
        }
        Ok(Request::Unsubscribe(list)) => {
            assert!(!list.is_empty() && list.len() <= 128);
            for f in list.iter().flatten() {
                assert!(mqtt::validate_topic_filter(f.as_bytes()).is_ok());
            }
        }
        Ok(Request::PubAck(id) | Request::PubRec(id) | Request::PubRel(id) | Request::PubComp(id)) => {
            assert_ne!(*id, 0)
        }
        Ok(Request::Disconnect | Request::Ping) => {}
        Err(e) => {
            // The `error` frame the session sends back.
            let out = frames::error(e.code, &e.message, reference);
            let v = json(&out);
            if let Some(v) = v {
                assert_eq!(v["op"], "error");
                assert_eq!(v["code"], e.code);
                assert_eq!(v["message"].as_str(), Some(&*e.message));
            }
        }
    }
}

fn check_publish(p: &PublishReq, max: usize, with_id: bool) {
    assert!(!p.topic.is_empty() && p.topic.len() <= u16::MAX as usize);
    assert!(mqtt::validate_utf8(p.topic.as_bytes()).is_ok());
    assert!(mqtt::validate_topic_name(p.topic.as_bytes()).is_ok());
    assert!(p.qos <= 2);
    if with_id {
        assert_eq!(p.id == 0, p.qos == 0, "id {} at QoS {}", p.id, p.qos);
    } else {
        assert_eq!(p.id, 0);
    }
    assert!(p.payload.len() <= max, "payload {} over {max}", p.payload.len());
}

/// Parses a frame the bridge wrote. It must be JSON text; `None` when it is valid JSON that
/// `serde_json::Value` cannot hold (a number beyond f64 range such as `1e400`, or nesting past
/// serde_json's 128 levels: both are legal JSON that a browser's `JSON.parse` reads).
fn json(out: &str) -> Option<Value> {
    match serde_json::from_str::<Value>(out) {
        Ok(v) => {
            assert!(v.is_object(), "frame is not an object: {out}");
            Some(v)
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("number out of range") || msg.contains("recursion limit exceeded"),
                "bridge wrote invalid JSON ({msg}): {out}"
            );
            // Still exactly one syntactically valid JSON text.
            assert!(
                valid_json_syntax(out),
                "bridge wrote invalid JSON ({msg}): {out}"
            );
            None
        }
    }
}

/// Syntax check without a depth limit or number range: serde_json's `IgnoredAny` parses
/// without building values (and keeps no numbers), but does stop at 128 levels; deeper frames
/// are only checked for balance here.
fn valid_json_syntax(s: &str) -> bool {
    match serde_json::from_str::<serde::de::IgnoredAny>(s) {
        Ok(_) => true,
        Err(e) if e.to_string().contains("recursion limit exceeded") => true,
        Err(_) => false,
    }
}

fn check_outbound(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (id, rest) = match rest {
        [a, b, rest @ ..] => (u16::from_be_bytes([*a, *b]), rest),
        _ => (0, rest),
    };
    // Topic and payload: split at the first 0xFF (never part of UTF-8).
    let (topic, payload) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let topic = String::from_utf8_lossy(topic);
    let qos = flags % 3;
    let retain = flags & 0x10 != 0;
    let dup = flags & 0x20 != 0;
    let out = frames::message(&topic, qos, id, retain, dup, payload);
    if let Some(v) = json(&out) {
        assert_eq!(v["op"], "message");
        assert_eq!(v["topic"].as_str(), Some(&*topic), "topic not escaped faithfully");
        assert_eq!(v["qos"], qos);
        if qos > 0 {
            assert_eq!(v["id"], id);
        } else {
            assert!(v.get("id").is_none());
        }
        assert_eq!(v["retain"], retain);
        assert_eq!(v["dup"], dup);
        match v["encoding"].as_str() {
            Some("json") => {
                let text = std::str::from_utf8(payload).expect("json payload is UTF-8");
                let expected: Value = serde_json::from_str(text).expect("json payload is JSON");
                assert_eq!(v["payload"], expected);
            }
            Some("utf8") => {
                assert_eq!(v["payload"].as_str().map(str::as_bytes), Some(payload));
            }
            Some("base64") => {
                assert!(std::str::from_utf8(payload).is_err(), "UTF-8 sent as base64");
                let b64 = v["payload"].as_str().expect("base64 payload is a string");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("valid base64");
                assert_eq!(bytes, payload);
            }
            other => panic!("unknown encoding {other:?}"),
        }
    }
    // Acknowledgements, with and without a refusal carrying arbitrary text.
    for op in ["puback", "pubrec", "pubrel", "pubcomp"] {
        let plain = frames::ack(op, id, None);
        let v = json(&plain).expect("plain ack is simple JSON");
        assert_eq!(v["op"], op);
        assert_eq!(v["id"], id);
        let refused = frames::ack(op, id, Some(("not_authorized", &topic)));
        if let Some(v) = json(&refused) {
            assert_eq!(v["message"].as_str(), Some(&*topic));
        }
    }
}
