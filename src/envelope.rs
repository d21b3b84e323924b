//! The envelope vigil puts in front of every payload stored in the core.
//!
//! rumqttd delivers at the subscription's QoS, treats any empty payload as "clear the retained
//! message" and knows nothing of MQTT 5 properties. The edge therefore never hands the core a
//! bare payload: it prefixes one header byte carrying the publisher's QoS (so the edge can deliver
//! at min(publish QoS, subscription QoS)) and, when present, the message's end-to-end v5
//! properties (so v5 subscribers get them and 3.1.1 subscribers never see them). The only bare
//! payload the core ever sees is the empty one of a retained publish meant to clear a retained
//! message, which is exactly when rumqttd's clearing behaviour is right.
//!
//! Layout: `0b1110_0PQQ` then, if P, a variable byte integer length and the property bytes,
//! then the application payload.

use bytes::{BufMut, Bytes, BytesMut};

use crate::mqtt;

const MAGIC_MASK: u8 = 0xF8;
const MAGIC: u8 = 0xE0;
const HAS_PROPERTIES: u8 = 0x04;

/// A decoded core payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The QoS the publisher used; `None` for a bare payload (a retained-message clear).
    pub qos: Option<u8>,
    pub properties: Bytes,
    pub payload: Bytes,
}

/// Writes the envelope header for a message published at `qos` with `properties`.
/// Returns the header as a small buffer to be written before the payload.
pub fn header(qos: u8, properties: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(
        1 + if properties.is_empty() {
            0
        } else {
            4 + properties.len()
        },
    );
    if properties.is_empty() {
        out.put_u8(MAGIC | (qos & 0x03));
    } else {
        out.put_u8(MAGIC | HAS_PROPERTIES | (qos & 0x03));
        mqtt::put_varint(&mut out, properties.len());
        out.extend_from_slice(properties);
    }
    out
}

/// The one-byte header of a message without properties (the common case, no allocation).
pub fn plain_header(qos: u8) -> [u8; 1] {
    [MAGIC | (qos & 0x03)]
}

/// Writes a PUBLISH for the core (always MQTT 3.1.1) holding `payload` behind the envelope
/// `header`, or bare when it is a retained empty payload: that one clears the retained message,
/// and it is the only payload the core ever sees without an envelope. Every writer of core
/// publishes (the edge, its wills, the analytics task) goes through here.
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
    let parts: &[&[u8]] = if retain && payload.is_empty() {
        &[]
    } else {
        &[header, payload]
    };
    mqtt::put_publish(
        out,
        mqtt::Version::V311,
        dup,
        qos,
        retain,
        topic,
        pkid,
        &[],
        parts,
    );
}

/// Opens a payload read from the core. Anything not produced by [`header`] is returned as a
/// bare payload, so a malformed envelope can never crash or confuse delivery.
pub fn open(raw: Bytes) -> Opened {
    let bare = |raw: Bytes| Opened {
        qos: None,
        properties: Bytes::new(),
        payload: raw,
    };
    let Some(&first) = raw.first() else {
        return bare(raw);
    };
    if first & MAGIC_MASK != MAGIC || first & 0x03 == 3 {
        return bare(raw);
    }
    let qos = first & 0x03;
    if first & HAS_PROPERTIES == 0 {
        return Opened {
            qos: Some(qos),
            properties: Bytes::new(),
            payload: raw.slice(1..),
        };
    }
    // Variable byte integer length of the property block.
    let mut len = 0usize;
    let mut pos = 1;
    for i in 0..4 {
        let Some(&b) = raw.get(pos) else {
            return bare(raw);
        };
        pos += 1;
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    if raw.len() < pos + len {
        return bare(raw);
    }
    Opened {
        qos: Some(qos),
        properties: raw.slice(pos..pos + len),
        payload: raw.slice(pos + len..),
    }
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
    fn empty_and_foreign_payloads_are_bare() {
        assert_eq!(open(Bytes::new()).qos, None);
        assert_eq!(open(Bytes::from_static(b"{\"a\":1}")).qos, None);
        // Claims properties but is truncated.
        assert_eq!(open(Bytes::from_static(&[0xE4, 0x05, 0x26])).qos, None);
    }
}
