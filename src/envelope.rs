//! The envelope vigil puts in front of every payload stored in the core.
//!
//! rumqttd delivers at the subscription's QoS, treats any empty payload as "clear the retained
//! message" and knows nothing of MQTT 5 properties. The edge therefore never hands the core a
//! bare payload: it prefixes one header byte carrying the publisher's QoS (so the edge can deliver
//! at min(publish QoS, subscription QoS)) and, when present, the message's end-to-end v5
//! properties (so v5 subscribers get them and 3.1.1 subscribers never see them). The only bare
//! payload the core ever sees is the empty one of a retained publish meant to clear a retained
//! message.
//!
//! Layout: `0b111T_RPQQ` then, if P, a variable byte integer length and the property bytes,
//! then the application payload. R marks a message that another vigil instance accepted and
//! the cluster importer (`cluster`) brought in from Redis: it is delivered like any other, but
//! never exported again (no loops) and never scored by this instance's analytics (the
//! instance the device is connected to does that). T records that the publisher set RETAIN
//! (and the edge stored the message, `edge::retained`): the core sees no RETAIN flag at all,
//! and Retain As Published and the exporter need to know.
//!
//! The property block may begin with vigil's own fields, which are never sent to a client:
//! each is `0x00` (no MQTT property has that identifier), a tag and an 8-byte big-endian value.
//! Tag 1 is the publisher's *origin* (a digest of its client id, for subscriptions with No
//! Local), written only once some client has subscribed with No Local; tag 2 is when the
//! message *expires* (Unix milliseconds), from the publisher's Message Expiry Interval.

use bytes::{BufMut, Bytes, BytesMut};

use crate::mqtt;

const MAGIC_MASK: u8 = 0xE0;
const MAGIC: u8 = 0xE0;
const RETAINED: u8 = 0x10;
const REMOTE: u8 = 0x08;
const HAS_PROPERTIES: u8 = 0x04;
/// The first byte of one of vigil's own fields in the property block.
const PRIVATE: u8 = 0x00;
const TAG_ORIGIN: u8 = 1;
const TAG_EXPIRES: u8 = 2;
const PRIVATE_LEN: usize = 10;

/// vigil's own per-message fields (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Private {
    /// Digest of the publisher's client id ([`origin_of`]).
    pub origin: Option<u64>,
    /// When the message expires, in Unix milliseconds.
    pub expires_at: Option<u64>,
}

impl Private {
    fn len(&self) -> usize {
        PRIVATE_LEN * (self.origin.is_some() as usize + self.expires_at.is_some() as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.origin.is_none() && self.expires_at.is_none()
    }
}

/// The origin digest of a client id (FNV-1a, 64 bits): equal ids give equal digests on every
/// instance, and a collision between two different ids is as good as impossible.
pub fn origin_of(client_id: &str) -> u64 {
    client_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Now, in Unix milliseconds (the clock message expiry is measured on, shared by instances).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// When a message with a Message Expiry Interval of `secs`, published now, expires (Unix ms);
/// an interval of 0 is taken as none, as mosquitto does.
pub fn expires_at(secs: Option<u32>) -> Option<u64> {
    secs.filter(|&s| s > 0)
        .map(|s| unix_millis() + s as u64 * 1000)
}

/// A decoded core payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The QoS the publisher used; `None` for a bare payload (a retained-message clear).
    pub qos: Option<u8>,
    /// Brought in from another instance by the cluster importer.
    pub remote: bool,
    /// The publisher set RETAIN.
    pub retained: bool,
    /// vigil's own fields.
    pub private: Private,
    /// The v5 properties a subscriber gets (vigil's own fields removed).
    pub properties: Bytes,
    pub payload: Bytes,
}

/// Writes the envelope header for a message published at `qos` with `properties`.
/// Returns the header as a small buffer to be written before the payload.
pub fn header(qos: u8, properties: &[u8]) -> BytesMut {
    header_with(qos, Private::default(), properties)
}

/// [`header`] with vigil's own fields.
pub fn header_with(qos: u8, private: Private, properties: &[u8]) -> BytesMut {
    let block = private.len() + properties.len();
    let mut out = BytesMut::with_capacity(1 + if block == 0 { 0 } else { 4 + block });
    if block == 0 {
        out.put_u8(MAGIC | (qos & 0x03));
    } else {
        out.put_u8(MAGIC | HAS_PROPERTIES | (qos & 0x03));
        mqtt::put_varint(&mut out, block);
        for (tag, value) in [
            (TAG_ORIGIN, private.origin),
            (TAG_EXPIRES, private.expires_at),
        ] {
            if let Some(value) = value {
                out.put_u8(PRIVATE);
                out.put_u8(tag);
                out.put_u64(value);
            }
        }
        out.extend_from_slice(properties);
    }
    out
}

/// The one-byte header of a message without properties (the common case, no allocation).
pub fn plain_header(qos: u8) -> [u8; 1] {
    [MAGIC | (qos & 0x03)]
}

/// The first envelope byte `first` with the mark that the publisher set RETAIN.
pub fn mark_retained(first: u8) -> u8 {
    first | RETAINED
}

/// Writes a PUBLISH for the core (always MQTT 3.1.1) holding `payload` behind the envelope
/// `header`, or bare when it is a retained empty payload (a clear). `retain` marks the envelope
/// only: the core stores no retained message, the edge does (`edge::retained`), so the core
/// routes every publish as a plain one to the current subscribers, an empty clear included,
/// as mosquitto delivers it. Every writer of core publishes (the edge, its wills, the
/// analytics task, the cluster importer) goes through here.
#[allow(clippy::too_many_arguments)]
pub fn put_core_publish(
    out: &mut BytesMut,
    dup: bool,
    qos: u8,
    retain: bool,
    topic: &[u8],
    pkid: u16,
    header: &[u8],
    payload: &[u8],
) {
    let first;
    let parts: &[&[u8]] = match header.split_first() {
        _ if retain && payload.is_empty() => &[],
        Some((&b, rest)) if retain => {
            first = [mark_retained(b)];
            &[&first, rest, payload]
        }
        _ => &[header, payload],
    };
    mqtt::put_publish(
        out,
        mqtt::Version::V311,
        dup,
        qos,
        false,
        &mqtt::core_topic(topic),
        pkid,
        &[],
        parts,
    );
}

/// Whether a core payload carries the remote mark, without opening it (the exporter's test).
pub fn is_remote(raw: &[u8]) -> bool {
    matches!(raw.first(), Some(&b) if b & MAGIC_MASK == MAGIC && b & 0x03 != 3 && b & REMOTE != 0)
}

/// The publisher's QoS recorded in a core payload, without opening it; `None` for a bare one.
pub fn open_qos(raw: &[u8]) -> Option<u8> {
    match raw.first() {
        Some(&b) if b & MAGIC_MASK == MAGIC && b & 0x03 != 3 => Some(b & 0x03),
        _ => None,
    }
}

/// Whether the publisher of a core payload set RETAIN (recorded by [`put_core_publish`]).
pub fn published_retained(raw: &[u8]) -> bool {
    matches!(raw.first(), Some(&b) if b & MAGIC_MASK == MAGIC && b & 0x03 != 3 && b & RETAINED != 0)
}

/// The first byte of `raw` (an enveloped core payload) with the remote mark set, for the
/// importer, which writes it in front of `raw[1..]`. `None` for a bare payload.
pub fn remote_first_byte(raw: &[u8]) -> Option<u8> {
    match raw.first() {
        Some(&b) if b & MAGIC_MASK == MAGIC && b & 0x03 != 3 => Some(b | REMOTE),
        _ => None,
    }
}

/// Opens a payload read from the core. Anything not produced by [`header`] is returned as a
/// bare payload, so a malformed envelope can never crash or confuse delivery.
pub fn open(raw: Bytes) -> Opened {
    match parse(&raw) {
        Some(p) => Opened {
            qos: Some(p.qos),
            remote: p.remote,
            retained: p.retained,
            private: p.private,
            properties: raw.slice(p.properties),
            payload: raw.slice(p.payload_from..),
        },
        None => Opened {
            qos: None,
            remote: false,
            retained: false,
            private: Private::default(),
            properties: Bytes::new(),
            payload: raw,
        },
    }
}

/// When the message in an enveloped payload expires (Unix milliseconds), if it does.
pub fn expires_at_of(raw: &[u8]) -> Option<u64> {
    parse(raw)?.private.expires_at
}

/// An envelope's fields, with where the properties and the payload lie in it.
struct Parsed {
    qos: u8,
    remote: bool,
    retained: bool,
    private: Private,
    properties: std::ops::Range<usize>,
    payload_from: usize,
}

/// Reads the envelope in front of `raw`; `None` when there is none (a bare payload) or it is
/// malformed.
fn parse(raw: &[u8]) -> Option<Parsed> {
    let &first = raw.first()?;
    if first & MAGIC_MASK != MAGIC || first & 0x03 == 3 {
        return None;
    }
    let mut parsed = Parsed {
        qos: first & 0x03,
        remote: first & REMOTE != 0,
        retained: first & RETAINED != 0,
        private: Private::default(),
        properties: 1..1,
        payload_from: 1,
    };
    if first & HAS_PROPERTIES == 0 {
        return Some(parsed);
    }
    // Variable byte integer length of the property block.
    let mut len = 0usize;
    let mut pos = 1;
    for i in 0..4 {
        let &b = raw.get(pos)?;
        pos += 1;
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    if raw.len() < pos + len {
        return None;
    }
    let (mut start, end) = (pos, pos + len);
    while end - start >= PRIVATE_LEN && raw[start] == PRIVATE {
        let mut value = [0u8; 8];
        value.copy_from_slice(&raw[start + 2..start + PRIVATE_LEN]);
        let value = u64::from_be_bytes(value);
        match raw[start + 1] {
            TAG_ORIGIN => parsed.private.origin = Some(value),
            TAG_EXPIRES => parsed.private.expires_at = Some(value),
            _ => {}
        }
        start += PRIVATE_LEN;
    }
    parsed.properties = start..end;
    parsed.payload_from = end;
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_plain_and_with_properties() {
        for qos in 0..3 {
            let mut raw = BytesMut::from(&plain_header(qos)[..]);
            raw.extend_from_slice(b"data");
            let o = open(raw.freeze());
            assert_eq!(o.qos, Some(qos));
            assert!(o.properties.is_empty());
            assert_eq!(&o.payload[..], b"data");
        }
        let props = [0x26u8, 0, 1, b'k', 0, 1, b'v'];
        let mut raw = header(2, &props);
        raw.extend_from_slice(b"");
        let o = open(raw.freeze());
        assert_eq!(o.qos, Some(2));
        assert_eq!(&o.properties[..], &props[..]);
        assert!(o.payload.is_empty());
    }

    #[test]
    fn remote_mark_survives_and_is_recognised() {
        let props = [0x26u8, 0, 1, b'k', 0, 1, b'v'];
        for local in [header(1, &[]), header(2, &props)] {
            let mut local = local;
            local.extend_from_slice(b"data");
            assert!(!is_remote(&local));
            assert!(!open(local.clone().freeze()).remote);
            let mut remote = BytesMut::new();
            remote.extend_from_slice(&[remote_first_byte(&local).expect("enveloped")]);
            remote.extend_from_slice(&local[1..]);
            assert!(is_remote(&remote));
            let o = open(remote.freeze());
            let l = open(local.freeze());
            assert!(o.remote);
            assert_eq!(
                (o.qos, o.properties, o.payload),
                (l.qos, l.properties, l.payload)
            );
        }
        assert_eq!(remote_first_byte(b""), None);
        let mut out = BytesMut::new();
        put_core_publish(&mut out, false, 1, true, b"t", 1, &plain_header(2), b"x");
        // Fixed header (2), topic (3), packet id (2), then the envelope.
        assert!(published_retained(&out[7..]));
        assert_eq!(open(Bytes::copy_from_slice(&out[7..])).qos, Some(2));
        out.clear();
        put_core_publish(&mut out, false, 1, false, b"t", 1, &plain_header(2), b"x");
        assert!(!published_retained(&out[7..]));
        assert_eq!(remote_first_byte(b"{}"), None);
        assert!(!is_remote(b"\xEB"));
    }

    #[test]
    fn private_fields_are_read_and_kept_from_subscribers() {
        let props = [0x26u8, 0, 1, b'k', 0, 1, b'v'];
        for public in [&props[..], &[]] {
            let private = Private {
                origin: Some(origin_of("dev-1")),
                expires_at: Some(1_800_000_000_000),
            };
            let mut raw = header_with(1, private, public);
            raw.extend_from_slice(b"data");
            let o = open(raw.freeze());
            assert_eq!(o.private, private);
            assert_eq!(&o.properties[..], public);
            assert_eq!(&o.payload[..], b"data");
            let only_expiry = Private {
                origin: None,
                ..private
            };
            let mut raw = header_with(0, only_expiry, public);
            raw.extend_from_slice(b"x");
            assert_eq!(open(raw.freeze()).private, only_expiry);
        }
        assert_ne!(origin_of("a"), origin_of("b"));
    }

    #[test]
    fn empty_and_foreign_payloads_are_bare() {
        assert_eq!(open(Bytes::new()).qos, None);
        assert_eq!(open(Bytes::from_static(b"{\"a\":1}")).qos, None);
        // Claims properties but is truncated.
        assert_eq!(open(Bytes::from_static(&[0xE4, 0x05, 0x26])).qos, None);
    }
}
