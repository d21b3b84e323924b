//! The MQTT wire format (3.1, 3.1.1 and 5.0): framing, parsing of every packet the edge
//! polices, and encoding of every packet the edge writes.
//!
//! This is the only module that knows byte layouts. Parsing never panics and never trusts a
//! length: every read is bounds-checked and every string is validated UTF-8 without U+0000, as
//! the specification requires. Packets are parsed from `Bytes` so that topics and payloads are
//! zero-copy slices of the read buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;
pub const AUTH: u8 = 15;

/// MQTT 5 property identifiers the edge reads or writes.
pub mod prop {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTH_METHOD: u8 = 0x15;
    pub const AUTH_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub const WILL_DELAY: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUB_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_ID_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUB_AVAILABLE: u8 = 0x2A;
}

/// MQTT 5 reason codes the edge sends.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
}

/// MQTT 3.1.1 CONNACK return codes.
pub mod rc {
    pub const ACCEPTED: u8 = 0;
    pub const UNACCEPTABLE_PROTOCOL: u8 = 1;
    pub const IDENTIFIER_REJECTED: u8 = 2;
    pub const SERVER_UNAVAILABLE: u8 = 3;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 4;
    pub const NOT_AUTHORIZED: u8 = 5;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed remaining length")]
    BadRemainingLength,
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
}

impl CodecError {
    /// The MQTT 5 reason code that describes this error in a DISCONNECT or CONNACK.
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            CodecError::Protocol(_) => reason::PROTOCOL_ERROR,
            CodecError::UnsupportedProtocol { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
            _ => reason::MALFORMED,
        }
    }
}

/// Protocol spoken by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 (`MQIsdp`, level 3) and 3.1.1 (`MQTT`, level 4) share one packet format.
    V311,
    V5,
}

/// One complete control packet: the first header byte and the bytes after the length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: u8,
    pub body: Bytes,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }

    pub fn flags(&self) -> u8 {
        self.header & 0x0F
    }

    /// Size of the packet on the wire.
    pub fn wire_len(&self) -> usize {
        1 + varint_len(self.body.len()) + self.body.len()
    }
}

/// Takes one complete packet off the front of `buf`, or returns `None` when more bytes are
/// needed. A declared length over `max` is an error as soon as the length is known, so a
/// client can never make the edge buffer more than `max` bytes.
pub fn read_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, CodecError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len: usize = 0;
    let mut shift = 0;
    let mut pos = 1;
    loop {
        let Some(&byte) = buf.get(pos) else {
            return Ok(None);
        };
        len |= ((byte & 0x7F) as usize) << shift;
        pos += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(CodecError::BadRemainingLength);
        }
    }
    let total = pos + len;
    if total > max {
        return Err(CodecError::TooLarge { size: total, max });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let header = buf[0];
    let mut packet = buf.split_to(total);
    packet.advance(pos);
    Ok(Some(Frame {
        header,
        body: packet.freeze(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Reading primitives.

/// A bounds-checked reader over a packet body.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        if self.buf.is_empty() {
            return Err(CodecError::Malformed("packet truncated"));
        }
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        if self.buf.len() < 2 {
            return Err(CodecError::Malformed("packet truncated"));
        }
        Ok(self.buf.get_u16())
    }

    fn take(&mut self, n: usize) -> Result<Bytes, CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Malformed("packet truncated"));
        }
        Ok(self.buf.split_to(n))
    }

    fn binary(&mut self) -> Result<Bytes, CodecError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// A UTF-8 string as the specification defines it: valid UTF-8, no U+0000.
    fn string(&mut self) -> Result<Bytes, CodecError> {
        let bytes = self.binary()?;
        validate_utf8(&bytes)?;
        Ok(bytes)
    }

    fn varint(&mut self) -> Result<usize, CodecError> {
        let mut value = 0usize;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= ((byte & 0x7F) as usize) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::Malformed("variable byte integer too long"))
    }

    fn properties(&mut self) -> Result<Bytes, CodecError> {
        let n = self.varint()?;
        self.take(n)
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
}

pub fn validate_utf8(bytes: &[u8]) -> Result<&str, CodecError> {
    let s = std::str::from_utf8(bytes).map_err(|_| CodecError::Malformed("invalid UTF-8"))?;
    if s.contains('\u{0}') {
        return Err(CodecError::Malformed("U+0000 in a string"));
    }
    Ok(s)
}

/// Walks a v5 property block, calling `f(id, value)` for each property; `value` is the
/// property's encoded value (integers big-endian, strings and binary with their length prefix).
/// A property other than User Property and Subscription Identifier (whose repeats the packets
/// that allow them check) may appear once (MQTT 5 section 2.2.2.2): twice is a protocol error.
pub fn for_each_property(
    props: &Bytes,
    mut f: impl FnMut(u8, &Bytes) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    let mut r = Reader::new(props.clone());
    let mut seen = 0u64;
    while r.remaining() > 0 {
        let id = r.u8()?;
        let value = match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => r.take(1)?,
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => r.take(2)?,
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => r.take(4)?,
            // Variable byte integer: re-slice the raw encoding.
            0x0B => {
                let before = r.buf.clone();
                let v = r.varint()?;
                if v == 0 {
                    return Err(CodecError::Protocol("subscription identifier 0"));
                }
                before.slice(..before.len() - r.remaining())
            }
            // UTF-8 string.
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
                let before = r.buf.clone();
                r.string()?;
                before.slice(..before.len() - r.remaining())
            }
            // Binary data.
            0x09 | 0x16 => {
                let before = r.buf.clone();
                r.binary()?;
                before.slice(..before.len() - r.remaining())
            }
            // String pair.
            0x26 => {
                let before = r.buf.clone();
                r.string()?;
                r.string()?;
                before.slice(..before.len() - r.remaining())
            }
            _ => return Err(CodecError::Malformed("unknown property")),
        };
        // Every id above is below 64.
        if id != prop::USER_PROPERTY && id != prop::SUBSCRIPTION_ID {
            if seen & (1 << id) != 0 {
                return Err(CodecError::Protocol("property included twice"));
            }
            seen |= 1 << id;
        }
        f(id, &value)?;
    }
    Ok(())
}

/// The value of a variable byte integer property as `for_each_property` hands it (its
/// encoding, at most 4 bytes, already checked).
fn varint_value(b: &[u8]) -> u32 {
    b.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |acc, (i, &x)| acc | (((x & 0x7F) as u32) << (7 * i)))
}

fn be_u32(b: &Bytes) -> u32 {
    b.iter().fold(0u32, |acc, &x| (acc << 8) | x as u32)
}

/// A PUBLISH's (or will's) v5 properties as the edge keeps them.
#[derive(Debug, Default)]
struct EndToEnd {
    /// The properties that travel unchanged from publisher to subscriber, wire encoded.
    properties: Bytes,
    /// Message Expiry Interval in seconds: kept apart, because a subscriber gets what is
    /// left of it when the message is delivered (MQTT-3.3.2-6).
    message_expiry: Option<u32>,
    /// Will Delay Interval in seconds (wills only).
    will_delay: u32,
    /// Topic Alias (PUBLISH only): the receiver checks it against its maximum.
    topic_alias: Option<u16>,
}

/// Properties of a PUBLISH (or will) that travel with the message from publisher to
/// subscriber. Per-hop properties (topic alias, subscription identifier) are not kept; the
/// message and will delay intervals are returned apart.
fn end_to_end_properties(props: &Bytes, will: bool) -> Result<EndToEnd, CodecError> {
    let mut out = EndToEnd::default();
    if props.is_empty() {
        return Ok(out);
    }
    let mut kept = BytesMut::new();
    for_each_property(props, |id, value| {
        match id {
            prop::PAYLOAD_FORMAT
            | prop::MESSAGE_EXPIRY
            | prop::CONTENT_TYPE
            | prop::RESPONSE_TOPIC
            | prop::CORRELATION_DATA
            | prop::WILL_DELAY => {
                if id == prop::PAYLOAD_FORMAT && value[0] > 1 {
                    return Err(CodecError::Protocol("bad payload format indicator"));
                }
                if id == prop::RESPONSE_TOPIC {
                    let topic = validate_utf8(&value[2..])?;
                    if topic.contains(['+', '#']) || topic.is_empty() {
                        return Err(CodecError::Protocol("bad response topic"));
                    }
                }
                match id {
                    prop::MESSAGE_EXPIRY => out.message_expiry = Some(be_u32(value)),
                    prop::WILL_DELAY if will => out.will_delay = be_u32(value),
                    prop::WILL_DELAY => {
                        return Err(CodecError::Protocol("property not allowed here"))
                    }
                    _ => {
                        kept.put_u8(id);
                        kept.extend_from_slice(value);
                    }
                }
            }
            prop::USER_PROPERTY => {
                kept.put_u8(id);
                kept.extend_from_slice(value);
            }
            prop::TOPIC_ALIAS if !will => out.topic_alias = Some(be_u32(value) as u16),
            _ => return Err(CodecError::Protocol("property not allowed here")),
        }
        Ok(())
    })?;
    out.properties = kept.freeze();
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Packets from clients.

#[derive(Debug, Clone)]
pub struct Will {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// End-to-end v5 properties, wire encoded, without the message expiry.
    pub properties: Bytes,
    /// Message Expiry Interval (seconds), counted from the will's publication.
    pub message_expiry: Option<u32>,
    /// Will Delay Interval (seconds).
    pub delay: u32,
}

#[derive(Debug, Clone)]
pub struct Connect {
    pub version: Version,
    /// The protocol name and level as sent, for MQTT 3.1 vs 3.1.1 bookkeeping.
    pub level: u8,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub session_expiry: u32,
    pub receive_maximum: u16,
    pub max_packet_size: Option<u32>,
    /// Topic aliases the client accepts on the PUBLISHes it receives (0: none).
    pub topic_alias_max: u16,
    pub auth_method: bool,
}

/// Reads the protocol name and level of a CONNECT without parsing the rest, so that even a
/// CONNECT that fails validation can be answered in the client's own protocol version.
pub fn connect_version(body: &Bytes) -> Option<Version> {
    let mut r = Reader::new(body.clone());
    let name = r.binary().ok()?;
    let level = r.u8().ok()?;
    match (&name[..], level) {
        (b"MQTT", 5) => Some(Version::V5),
        (b"MQTT", 4) | (b"MQIsdp", 3) => Some(Version::V311),
        _ => None,
    }
}

pub fn parse_connect(frame: &Frame) -> Result<Connect, CodecError> {
    if frame.flags() != 0 {
        return Err(CodecError::Malformed("CONNECT flags must be 0"));
    }
    let mut r = Reader::new(frame.body.clone());
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (&name[..], level) {
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", 4) | (b"MQIsdp", 3) => Version::V311,
        _ => {
            return Err(CodecError::UnsupportedProtocol {
                name: String::from_utf8_lossy(&name).into_owned(),
                level,
            })
        }
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(CodecError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(CodecError::Malformed("will QoS 3"));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(CodecError::Malformed("will QoS/retain without will flag"));
    }
    if version == Version::V311 && has_password && !has_username {
        return Err(CodecError::Malformed("password without user name"));
    }
    let keep_alive = r.u16()?;

    let mut session_expiry = 0;
    let mut receive_maximum = u16::MAX;
    let mut max_packet_size = None;
    let mut topic_alias_max = 0;
    let mut auth_method = false;
    if version == Version::V5 {
        let props = r.properties()?;
        for_each_property(&props, |id, value| {
            match id {
                prop::SESSION_EXPIRY => session_expiry = be_u32(value),
                prop::RECEIVE_MAXIMUM => {
                    receive_maximum = be_u32(value) as u16;
                    if receive_maximum == 0 {
                        return Err(CodecError::Protocol("receive maximum 0"));
                    }
                }
                prop::MAXIMUM_PACKET_SIZE => {
                    let v = be_u32(value);
                    if v == 0 {
                        return Err(CodecError::Protocol("maximum packet size 0"));
                    }
                    max_packet_size = Some(v);
                }
                prop::AUTH_METHOD => auth_method = true,
                prop::TOPIC_ALIAS_MAXIMUM => topic_alias_max = be_u32(value) as u16,
                prop::AUTH_DATA
                | prop::REQUEST_PROBLEM_INFO
                | prop::REQUEST_RESPONSE_INFO
                | prop::USER_PROPERTY => {}
                _ => return Err(CodecError::Protocol("property not allowed in CONNECT")),
            }
            Ok(())
        })?;
    }

    let client_id_bytes = r.string()?;
    let client_id = validate_utf8(&client_id_bytes)?.to_owned();

    let will = if will_flag {
        let props = if version == Version::V5 {
            let props = r.properties()?;
            end_to_end_properties(&props, true)?
        } else {
            EndToEnd::default()
        };
        let topic = r.string()?;
        validate_topic_name(&topic)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties: props.properties,
            message_expiry: props.message_expiry,
            delay: props.will_delay,
        })
    } else {
        None
    };
    let username = if has_username {
        let u = r.string()?;
        Some(validate_utf8(&u)?.to_owned())
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    if r.remaining() != 0 {
        return Err(CodecError::Malformed(
            "trailing bytes after CONNECT payload",
        ));
    }
    Ok(Connect {
        version,
        level,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        session_expiry,
        receive_maximum,
        max_packet_size,
        topic_alias_max,
        auth_method,
    })
}

#[derive(Debug, Clone)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: Bytes,
    pub pkid: u16,
    /// End-to-end v5 properties, wire encoded (empty for 3.1.1), without the message expiry.
    pub properties: Bytes,
    /// Message Expiry Interval (seconds), v5 only.
    pub message_expiry: Option<u32>,
    /// v5 Topic Alias: with an empty `topic`, the topic it was set to earlier on the
    /// connection; with a topic, set to that one (the receiver resolves it).
    pub topic_alias: Option<u16>,
    pub payload: Bytes,
}

impl Publish {
    pub fn topic_str(&self) -> &str {
        // Validated when parsed.
        std::str::from_utf8(&self.topic).unwrap_or("")
    }
}

/// Parses a PUBLISH from a client: topic validated, wildcards refused, v5 properties checked.
pub fn parse_publish(frame: &Frame, version: Version) -> Result<Publish, CodecError> {
    let flags = frame.flags();
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Err(CodecError::Malformed("PUBLISH QoS 3"));
    }
    let dup = flags & 0x08 != 0;
    if qos == 0 && dup {
        return Err(CodecError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let mut r = Reader::new(frame.body.clone());
    let topic = r.string()?;
    let pkid = if qos > 0 {
        let id = r.u16()?;
        if id == 0 {
            return Err(CodecError::Malformed("packet identifier 0"));
        }
        id
    } else {
        0
    };
    let props = if version == Version::V5 {
        let props = r.properties()?;
        end_to_end_properties(&props, false)?
    } else {
        EndToEnd::default()
    };
    if topic.is_empty() && props.topic_alias.is_none() {
        return Err(CodecError::Protocol("empty topic name"));
    }
    validate_topic_name(&topic)?;
    Ok(Publish {
        dup,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        pkid,
        properties: props.properties,
        message_expiry: props.message_expiry,
        topic_alias: props.topic_alias,
        payload: r.rest(),
    })
}

/// Parses a PUBLISH written by the core (always 3.1.1): no validation beyond framing. The
/// topic comes back as the client sent it (without the core's escape, see [`CORE_ESCAPE`]).
pub fn parse_core_publish(frame: &Frame) -> Result<Publish, CodecError> {
    let flags = frame.flags();
    let qos = (flags >> 1) & 0x03;
    let mut r = Reader::new(frame.body.clone());
    let mut topic = r.binary()?;
    if topic.first() == Some(&CORE_ESCAPE) {
        topic = topic.slice(1..);
    }
    let pkid = if qos > 0 { r.u16()? } else { 0 };
    Ok(Publish {
        dup: flags & 0x08 != 0,
        qos: qos.min(2),
        retain: flags & 0x01 != 0,
        topic,
        pkid,
        properties: Bytes::new(),
        message_expiry: None,
        topic_alias: None,
        payload: r.rest(),
    })
}

/// Topic names: no wildcards (MQTT-3.3.2-2), UTF-8 already checked.
pub fn validate_topic_name(topic: &[u8]) -> Result<(), CodecError> {
    if topic.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(CodecError::Protocol("wildcard in topic name"));
    }
    Ok(())
}

/// Topic filters: `#` only as the whole last level, `+` only as a whole level, and a shared
/// subscription names a non-empty group without wildcards.
pub fn validate_topic_filter(filter: &[u8]) -> Result<(), CodecError> {
    let s = validate_utf8(filter)?;
    if s.is_empty() {
        return Err(CodecError::Protocol("empty topic filter"));
    }
    if is_malformed_shared(filter) {
        return Err(CodecError::Protocol("bad shared subscription"));
    }
    let path = match s
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((_, path)) => path,
        None => s,
    };
    let mut levels = path.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(CodecError::Protocol("'#' must be the whole last level"));
        }
        if level.contains('+') && level != "+" {
            return Err(CodecError::Protocol("'+' must be a whole level"));
        }
    }
    Ok(())
}

/// A `$share/` filter without a group (non-empty, no wildcards) and a filter after it
/// (MQTT-4.8.2-1, MQTT-4.8.2-2). SUBSCRIBE lets it through so that the edge refuses it in the
/// SUBACK (0x8F), as EMQX and HiveMQ do, rather than ending the connection.
pub fn is_malformed_shared(filter: &[u8]) -> bool {
    let Some(rest) = filter.strip_prefix(b"$share/") else {
        return false;
    };
    match rest.iter().position(|&b| b == b'/') {
        Some(i) => {
            let (group, path) = (&rest[..i], &rest[i + 1..]);
            group.is_empty() || group.iter().any(|&b| b == b'+' || b == b'#') || path.is_empty()
        }
        None => true,
    }
}

#[derive(Debug, Clone)]
pub struct Subscribe {
    pub pkid: u16,
    /// Filter and the options byte as sent (QoS in the low two bits).
    pub filters: Vec<(Bytes, u8)>,
    /// v5 Subscription Identifier (1..=268,435,455), stored with every filter of the packet.
    pub subscription_id: Option<u32>,
}

pub fn parse_subscribe(frame: &Frame, version: Version) -> Result<Subscribe, CodecError> {
    if frame.flags() != 0x02 {
        return Err(CodecError::Malformed("SUBSCRIBE flags must be 0010"));
    }
    let mut r = Reader::new(frame.body.clone());
    let pkid = r.u16()?;
    if pkid == 0 {
        return Err(CodecError::Malformed("packet identifier 0"));
    }
    let mut subscription_id = None;
    if version == Version::V5 {
        let props = r.properties()?;
        for_each_property(&props, |id, value| match id {
            prop::SUBSCRIPTION_ID if subscription_id.is_some() => {
                Err(CodecError::Protocol("subscription identifier repeated"))
            }
            prop::SUBSCRIPTION_ID => {
                subscription_id = Some(varint_value(value));
                Ok(())
            }
            prop::USER_PROPERTY => Ok(()),
            _ => Err(CodecError::Protocol("property not allowed in SUBSCRIBE")),
        })?;
    }
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        let options = r.u8()?;
        let reserved = match version {
            Version::V311 => 0xFC,
            Version::V5 => 0xC0,
        };
        if options & reserved != 0 || options & 0x03 == 3 || (options >> 4) & 0x03 == 3 {
            return Err(CodecError::Malformed("bad subscription options"));
        }
        // `r.string()` checked the UTF-8; a malformed shared filter is refused in the SUBACK.
        if !is_malformed_shared(&filter) {
            validate_topic_filter(&filter)?;
        }
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(CodecError::Protocol("SUBSCRIBE without filters"));
    }
    Ok(Subscribe {
        pkid,
        filters,
        subscription_id,
    })
}

#[derive(Debug, Clone)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<Bytes>,
}

pub fn parse_unsubscribe(frame: &Frame, version: Version) -> Result<Unsubscribe, CodecError> {
    if frame.flags() != 0x02 {
        return Err(CodecError::Malformed("UNSUBSCRIBE flags must be 0010"));
    }
    let mut r = Reader::new(frame.body.clone());
    let pkid = r.u16()?;
    if pkid == 0 {
        return Err(CodecError::Malformed("packet identifier 0"));
    }
    if version == Version::V5 {
        let props = r.properties()?;
        for_each_property(&props, |id, _| match id {
            prop::USER_PROPERTY => Ok(()),
            _ => Err(CodecError::Protocol("property not allowed in UNSUBSCRIBE")),
        })?;
    }
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        validate_topic_filter(&filter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(CodecError::Protocol("UNSUBSCRIBE without filters"));
    }
    Ok(Unsubscribe { pkid, filters })
}

/// An acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP): its packet id and, for v5, its reason.
pub fn parse_ack(frame: &Frame) -> Result<(u16, u8), CodecError> {
    let expected_flags = if frame.kind() == PUBREL { 0x02 } else { 0 };
    if frame.flags() != expected_flags {
        return Err(CodecError::Malformed("bad acknowledgement flags"));
    }
    let mut r = Reader::new(frame.body.clone());
    let pkid = r.u16()?;
    let reason = if r.remaining() > 0 { r.u8()? } else { 0 };
    Ok((pkid, reason))
}

/// What a client's DISCONNECT says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// The v5 reason code (0 when absent, and for 3.1.1).
    pub code: u8,
    /// A new Session Expiry Interval (v5).
    pub session_expiry: Option<u32>,
}

pub fn parse_disconnect(frame: &Frame, version: Version) -> Result<Disconnect, CodecError> {
    if frame.flags() != 0 {
        return Err(CodecError::Malformed("DISCONNECT flags must be 0"));
    }
    match version {
        Version::V311 if !frame.body.is_empty() => {
            Err(CodecError::Malformed("DISCONNECT with a body"))
        }
        Version::V311 => Ok(Disconnect::default()),
        Version::V5 => {
            let mut r = Reader::new(frame.body.clone());
            let mut out = Disconnect::default();
            if r.remaining() > 0 {
                out.code = r.u8()?;
            }
            if r.remaining() > 0 {
                let props = r.properties()?;
                for_each_property(&props, |id, value| {
                    match id {
                        prop::SESSION_EXPIRY if out.session_expiry.is_none() => {
                            out.session_expiry = Some(be_u32(value))
                        }
                        prop::REASON_STRING | prop::USER_PROPERTY | prop::SERVER_REFERENCE => {}
                        _ => {
                            return Err(CodecError::Protocol("property not allowed in DISCONNECT"))
                        }
                    }
                    Ok(())
                })?;
            }
            Ok(out)
        }
    }
}

/// The filter a subscription matches with: `filter` without `$share/<group>/` for a shared
/// subscription (`None` when that part is cut short), else `filter`.
pub fn unshared(filter: &[u8]) -> Option<&[u8]> {
    match filter.strip_prefix(b"$share/") {
        Some(rest) => rest.iter().position(|&b| b == b'/').map(|i| &rest[i + 1..]),
        None => Some(filter),
    }
}

/// Whether topic `topic` matches subscription filter `filter` (`$share/<group>/` removed
/// first, `unshared`). Topics starting with `$` are not matched by a filter starting with a
/// wildcard (MQTT-4.7.2-1). Both are assumed valid.
pub fn filter_matches(filter: &[u8], topic: &[u8]) -> bool {
    let Some(filter) = unshared(filter) else {
        return false;
    };
    if topic.first() == Some(&b'$') && matches!(filter.first(), Some(b'+' | b'#')) {
        return false;
    }
    let mut f = filter.split(|&b| b == b'/');
    let mut t = topic.split(|&b| b == b'/');
    loop {
        match (f.next(), t.next()) {
            (Some(b"#"), _) => return true,
            (Some(b"+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// SUBACK return codes from the core.
pub fn parse_core_suback(frame: &Frame) -> Result<(u16, Bytes), CodecError> {
    let mut r = Reader::new(frame.body.clone());
    let pkid = r.u16()?;
    Ok((pkid, r.rest()))
}

pub fn parse_core_connack(frame: &Frame) -> Result<(bool, u8), CodecError> {
    let mut r = Reader::new(frame.body.clone());
    let flags = r.u8()?;
    let code = r.u8()?;
    Ok((flags & 0x01 != 0, code))
}

// ---------------------------------------------------------------------------------------------
// Encoding.

pub fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

fn put_binary(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.extend_from_slice(b);
}

/// Writes a PUBLISH. `properties` is only written for v5; `payload` is written as the given
/// parts in order, so callers can prepend an envelope without copying the payload twice.
#[allow(clippy::too_many_arguments)]
pub fn put_publish(
    out: &mut BytesMut,
    version: Version,
    dup: bool,
    qos: u8,
    retain: bool,
    topic: &[u8],
    pkid: u16,
    properties: &[u8],
    payload: &[&[u8]],
) {
    let payload_len: usize = payload.iter().map(|p| p.len()).sum();
    let props_len = match version {
        Version::V5 => varint_len(properties.len()) + properties.len(),
        Version::V311 => 0,
    };
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + props_len + payload_len;
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8((PUBLISH << 4) | ((dup as u8) << 3) | (qos << 1) | retain as u8);
    put_varint(out, remaining);
    put_binary(out, topic);
    if qos > 0 {
        out.put_u16(pkid);
    }
    if version == Version::V5 {
        put_varint(out, properties.len());
        out.extend_from_slice(properties);
    }
    for part in payload {
        out.extend_from_slice(part);
    }
}

/// Size on the wire of the PUBLISH [`put_publish`] would write.
pub fn publish_wire_len(
    version: Version,
    qos: u8,
    topic_len: usize,
    props_len: usize,
    payload_len: usize,
) -> usize {
    let props = match version {
        Version::V5 => varint_len(props_len) + props_len,
        Version::V311 => 0,
    };
    let remaining = 2 + topic_len + if qos > 0 { 2 } else { 0 } + props + payload_len;
    1 + varint_len(remaining) + remaining
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP with success (the two-byte form, valid in both versions).
pub fn put_ack(out: &mut BytesMut, kind: u8, pkid: u16) {
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    out.put_u8((kind << 4) | flags);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// A v5 acknowledgement carrying a reason code.
pub fn put_ack_reason(out: &mut BytesMut, kind: u8, pkid: u16, reason: u8) {
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    out.put_u8((kind << 4) | flags);
    out.put_u8(3);
    out.put_u16(pkid);
    out.put_u8(reason);
}

pub fn put_pingreq(out: &mut BytesMut) {
    out.put_slice(&[PINGREQ << 4, 0]);
}

pub fn put_pingresp(out: &mut BytesMut) {
    out.put_slice(&[PINGRESP << 4, 0]);
}

/// DISCONNECT: the bare form for 3.1.1 (client to server only), a reason code for v5.
pub fn put_disconnect(out: &mut BytesMut, version: Version, reason: u8) {
    match version {
        Version::V311 => out.put_slice(&[DISCONNECT << 4, 0]),
        Version::V5 => out.put_slice(&[DISCONNECT << 4, 2, reason, 0]),
    }
}

/// Server capabilities announced in a v5 CONNACK.
#[derive(Debug, Clone, Default)]
pub struct ConnackProperties {
    pub assigned_client_id: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
    /// Topic aliases the client may use (0: none, and the property is left out).
    pub topic_alias_maximum: u16,
    /// The Session Expiry Interval the server uses, when not the one the client asked for.
    pub session_expiry: Option<u32>,
}

pub fn put_connack(
    out: &mut BytesMut,
    version: Version,
    session_present: bool,
    code: u8,
    props: Option<&ConnackProperties>,
) {
    out.put_u8(CONNACK << 4);
    match version {
        Version::V311 => {
            out.put_u8(2);
            out.put_u8(session_present as u8);
            out.put_u8(code);
        }
        Version::V5 => {
            let mut p = BytesMut::new();
            if let Some(props) = props {
                if let Some(id) = &props.assigned_client_id {
                    p.put_u8(prop::ASSIGNED_CLIENT_ID);
                    put_binary(&mut p, id.as_bytes());
                }
                if let Some(ka) = props.server_keep_alive {
                    p.put_u8(prop::SERVER_KEEP_ALIVE);
                    p.put_u16(ka);
                }
                if let Some(expiry) = props.session_expiry {
                    p.put_u8(prop::SESSION_EXPIRY);
                    p.put_u32(expiry);
                }
                p.put_u8(prop::RECEIVE_MAXIMUM);
                p.put_u16(props.receive_maximum);
                p.put_u8(prop::MAXIMUM_PACKET_SIZE);
                p.put_u32(props.maximum_packet_size);
                if props.topic_alias_maximum > 0 {
                    p.put_u8(prop::TOPIC_ALIAS_MAXIMUM);
                    p.put_u16(props.topic_alias_maximum);
                }
                p.put_u8(prop::RETAIN_AVAILABLE);
                p.put_u8(1);
                p.put_u8(prop::WILDCARD_SUB_AVAILABLE);
                p.put_u8(1);
                // Absent means available too; said outright for clients that look for it.
                p.put_u8(prop::SUBSCRIPTION_ID_AVAILABLE);
                p.put_u8(1);
                p.put_u8(prop::SHARED_SUB_AVAILABLE);
                p.put_u8(1);
            }
            let remaining = 2 + varint_len(p.len()) + p.len();
            put_varint(out, remaining);
            out.put_u8(session_present as u8);
            out.put_u8(code);
            put_varint(out, p.len());
            out.extend_from_slice(&p);
        }
    }
}

pub fn put_suback(out: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    let props = if version == Version::V5 { 1 } else { 0 };
    out.put_u8(SUBACK << 4);
    put_varint(out, 2 + props + codes.len());
    out.put_u16(pkid);
    if version == Version::V5 {
        out.put_u8(0);
    }
    out.extend_from_slice(codes);
}

/// UNSUBACK with one reason code per filter (v5; 3.1.1 has none).
pub fn put_unsuback(out: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    out.put_u8(UNSUBACK << 4);
    match version {
        Version::V311 => {
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            put_varint(out, 3 + codes.len());
            out.put_u16(pkid);
            out.put_u8(0);
            out.extend_from_slice(codes);
        }
    }
}

/// What the edge sends the core in place of a client's CONNECT (always 3.1.1).
pub struct CoreConnect<'a> {
    pub client_id: &'a str,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub username: &'a str,
    pub password: &'a str,
    pub will: Option<CoreWill<'a>>,
}

/// A will as the core receives it: the payload already enveloped, as parts.
#[derive(Clone, Copy)]
pub struct CoreWill<'a> {
    pub topic: &'a [u8],
    pub qos: u8,
    pub retain: bool,
    pub payload: &'a [&'a [u8]],
}

pub fn put_core_connect(out: &mut BytesMut, c: &CoreConnect<'_>) {
    let will_len = c
        .will
        .map(|w| 2 + w.topic.len() + 2 + w.payload.iter().map(|x| x.len()).sum::<usize>())
        .unwrap_or(0);
    let remaining =
        10 + 2 + c.client_id.len() + will_len + 2 + c.username.len() + 2 + c.password.len();
    out.put_u8(CONNECT << 4);
    put_varint(out, remaining);
    put_binary(out, b"MQTT");
    out.put_u8(4);
    let mut flags = 0x80 | 0x40;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some(w) = c.will {
        flags |= 0x04 | (w.qos << 3) | if w.retain { 0x20 } else { 0 };
    }
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    put_binary(out, c.client_id.as_bytes());
    if let Some(w) = c.will {
        put_binary(out, w.topic);
        out.put_u16(w.payload.iter().map(|x| x.len()).sum::<usize>() as u16);
        for part in w.payload {
            out.extend_from_slice(part);
        }
    }
    put_binary(out, c.username.as_bytes());
    put_binary(out, c.password.as_bytes());
}

/// The core's escape for names that start with a character beyond ASCII.
///
/// rumqttd's router takes `&topic[..1]` of a `str` when it matches a topic (or a filter it
/// compares as one) and panics when the first character is not ASCII: its router thread dies,
/// and with it every connection. In the core, such a name therefore starts with U+0001 (after
/// `$share/<group>/` for a shared filter). The escape becomes part of the first level, so every
/// match stays as it was: `+` and `#` still cover that level, and an exact first level is
/// escaped on both sides. A name that already starts with U+0001 gets one more, so two names
/// never meet. The codec adds it when writing to the core and removes it from the core's
/// PUBLISHes (`parse_core_publish`); nothing else sees it.
pub const CORE_ESCAPE: u8 = 0x01;

/// Where the core escape goes in `name` (a topic name, or a filter when `filter`), if anywhere.
fn core_escape_at(name: &[u8], filter: bool) -> Option<usize> {
    // A topic name is written on every publish: only a filter can be shared.
    let shared = if filter {
        name.strip_prefix(b"$share/")
    } else {
        None
    };
    let start = match shared {
        Some(rest) => 8 + rest.iter().position(|&b| b == b'/')?,
        None => 0,
    };
    match name.get(start) {
        Some(&b) if b >= 0x80 || b == CORE_ESCAPE => Some(start),
        _ => None,
    }
}

/// `topic` as the core must see it (see [`CORE_ESCAPE`]); a copy only when escaped.
pub fn core_topic(topic: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match core_escape_at(topic, false) {
        Some(_) => [&[CORE_ESCAPE][..], topic].concat().into(),
        None => topic.into(),
    }
}

/// A filter for the core, escaped as needed (see [`CORE_ESCAPE`]).
fn put_core_filter(out: &mut BytesMut, filter: &[u8]) {
    match core_escape_at(filter, true) {
        None => put_binary(out, filter),
        Some(at) => {
            out.put_u16(filter.len() as u16 + 1);
            out.extend_from_slice(&filter[..at]);
            out.put_u8(CORE_ESCAPE);
            out.extend_from_slice(&filter[at..]);
        }
    }
}

fn core_filter_len(filter: &[u8]) -> usize {
    2 + filter.len() + usize::from(core_escape_at(filter, true).is_some())
}

/// SUBSCRIBE to the core (3.1.1): options reduced to the QoS bits.
pub fn put_core_subscribe(out: &mut BytesMut, pkid: u16, filters: &[(Bytes, u8)]) {
    let remaining = 2 + filters
        .iter()
        .map(|(f, _)| core_filter_len(f) + 1)
        .sum::<usize>();
    out.put_u8((SUBSCRIBE << 4) | 0x02);
    put_varint(out, remaining);
    out.put_u16(pkid);
    for (filter, qos) in filters {
        put_core_filter(out, filter);
        out.put_u8(qos & 0x03);
    }
}

pub fn put_core_unsubscribe(out: &mut BytesMut, pkid: u16, filters: &[Bytes]) {
    let remaining = 2 + filters.iter().map(|f| core_filter_len(f)).sum::<usize>();
    out.put_u8((UNSUBSCRIBE << 4) | 0x02);
    put_varint(out, remaining);
    out.put_u16(pkid);
    for filter in filters {
        put_core_filter(out, filter);
    }
}

/// (filter, topic, matches) as MQTT defines it, for every matcher of filters to check
/// against (`filter_matches`, `edge::filters::FilterIndex`).
#[cfg(test)]
pub(crate) const FILTER_CASES: &[(&str, &str, bool)] = &[
    ("a/b", "a/b", true),
    ("a/b", "a/c", false),
    ("a/b", "a/b/c", false),
    ("a/b", "a", false),
    ("a/+", "a/b", true),
    ("a/+", "a/", true),
    ("a/+", "a/b/c", false),
    ("a/#", "a", true),
    ("a/#", "a/b/c", true),
    ("a/#", "ab", false),
    ("#", "a/b", true),
    ("+/+", "/a", true),
    ("+", "/a", false),
    ("#", "x/y", true),
    ("+/+", "/x", true),
    ("+", "/x", false),
    ("/+", "/x", true),
    ("+/b/#", "a/b", true),
    ("+/b/#", "a/c", false),
    ("#", "$SYS/x", false),
    ("+/x", "$SYS/x", false),
    ("$SYS/#", "$SYS/x", true),
    ("$share/g/a/+", "a/b", true),
    ("$share/g/a/+", "b/b", false),
    ("$share/g/a/+", "g/a/b", false),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_core_cannot_route_are_escaped_and_come_back_unchanged() {
        let bom = "\u{feff}t/x".as_bytes();
        assert_eq!(&core_topic(bom)[..], [&[CORE_ESCAPE][..], bom].concat());
        assert_eq!(&core_topic(b"\x01t")[..], b"\x01\x01t");
        assert!(matches!(
            core_topic(b"plain/t"),
            std::borrow::Cow::Borrowed(_)
        ));
        // Filters: the first level of the filter proper.
        for (filter, core) in [
            ("\u{e9}/#", "\u{1}\u{e9}/#"),
            ("$share/g/\u{e9}/+", "$share/g/\u{1}\u{e9}/+"),
            ("$share/\u{e9}/t", "$share/\u{e9}/t"),
            ("+/\u{e9}", "+/\u{e9}"),
            ("$share/g", "$share/g"),
        ] {
            let mut out = BytesMut::new();
            put_core_unsubscribe(&mut out, 1, &[Bytes::from(filter)]);
            let mut expected = BytesMut::new();
            expected.put_u8((UNSUBSCRIBE << 4) | 0x02);
            put_varint(&mut expected, 4 + core.len());
            expected.put_u16(1);
            put_binary(&mut expected, core.as_bytes());
            assert_eq!(out, expected, "{filter}");
        }
        // The core's PUBLISH of an escaped topic parses to the client's topic.
        let mut out = BytesMut::new();
        put_publish(
            &mut out,
            Version::V311,
            false,
            0,
            false,
            &core_topic(bom),
            0,
            &[],
            &[b"p"],
        );
        let frame = read_frame(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(&parse_core_publish(&frame).unwrap().topic[..], bom);
    }

    /// A v5 QoS 0 PUBLISH of `x` to `topic` with `props`, encoded and parsed back.
    fn v5_qos0_publish(topic: &[u8], props: &[u8]) -> Result<Publish, CodecError> {
        let mut out = BytesMut::new();
        put_publish(
            &mut out,
            Version::V5,
            false,
            0,
            false,
            topic,
            0,
            props,
            &[b"x"],
        );
        parse_publish(&frame_of(&out), Version::V5)
    }

    fn frame_of(bytes: &[u8]) -> Frame {
        let mut buf = BytesMut::from(bytes);
        read_frame(&mut buf, 1 << 20).unwrap().unwrap()
    }

    #[test]
    fn framing_waits_for_whole_packet_and_rejects_oversize() {
        let mut buf = BytesMut::from(&[0x30u8, 0x05, 0x00][..]);
        assert!(read_frame(&mut buf, 100).unwrap().is_none());
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x7F][..]);
        assert!(matches!(
            read_frame(&mut buf, 1000),
            Err(CodecError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert_eq!(
            read_frame(&mut buf, usize::MAX).unwrap_err(),
            CodecError::BadRemainingLength
        );
    }

    #[test]
    fn connect_v311_roundtrip_through_core_encoder() {
        let mut out = BytesMut::new();
        put_core_connect(
            &mut out,
            &CoreConnect {
                client_id: "dev-1",
                clean_session: false,
                keep_alive: 30,
                username: "u",
                password: "p",
                will: Some(CoreWill {
                    topic: b"device/dev-1/status",
                    qos: 1,
                    retain: true,
                    payload: &[b"\xE1", b"gone"],
                }),
            },
        );
        let f = frame_of(&out);
        let c = parse_connect(&f).unwrap();
        assert_eq!(c.version, Version::V311);
        assert_eq!(c.client_id, "dev-1");
        assert!(!c.clean_start);
        assert_eq!(c.keep_alive, 30);
        let will = c.will.unwrap();
        assert_eq!(&will.topic[..], b"device/dev-1/status");
        assert_eq!(&will.payload[..], b"\xE1gone");
        assert_eq!((will.qos, will.retain), (1, true));
        assert_eq!(c.username.as_deref(), Some("u"));
    }

    #[test]
    fn connect_rejects_reserved_flag_and_bad_will() {
        // MQTT 3.1.1 CONNECT, flags 0x01 (reserved).
        let bytes = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x01, 0, 10, 0, 0];
        assert!(parse_connect(&frame_of(&bytes)).is_err());
        // Will QoS without will flag.
        let bytes = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x08, 0, 10, 0, 0];
        assert!(parse_connect(&frame_of(&bytes)).is_err());
        // Unknown protocol level.
        let bytes = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 10, 0, 0];
        assert!(matches!(
            parse_connect(&frame_of(&bytes)),
            Err(CodecError::UnsupportedProtocol { .. })
        ));
    }

    #[test]
    fn a_property_included_twice_is_a_protocol_error() {
        let twice = |id: u8, value: &[u8]| {
            let one = [&[id][..], value].concat();
            Bytes::from([&one[..], &one[..]].concat())
        };
        for (id, value) in [(0x11, &[0, 0, 1, 44][..]), (0x21, &[0, 5]), (0x01, &[1])] {
            assert!(
                matches!(
                    for_each_property(&twice(id, value), |_, _| Ok(())),
                    Err(CodecError::Protocol(_))
                ),
                "{id:#x}"
            );
        }
        // User properties may repeat, and so may Subscription Identifiers (a server's
        // PUBLISH carries one per matching subscription).
        let pair = [0x26, 0, 1, b'k', 0, 1, b'v'];
        assert!(for_each_property(&twice(0x26, &pair[1..]), |_, _| Ok(())).is_ok());
        assert!(for_each_property(&twice(0x0B, &[5]), |_, _| Ok(())).is_ok());
        let mut n = 0;
        for_each_property(&Bytes::from_static(&[0x11, 0, 0, 0, 1]), |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn publish_roundtrip_v5_with_user_property() {
        let mut props = BytesMut::new();
        props.put_u8(prop::USER_PROPERTY);
        put_binary(&mut props, b"k");
        put_binary(&mut props, b"v");
        let mut out = BytesMut::new();
        put_publish(
            &mut out,
            Version::V5,
            false,
            1,
            false,
            b"a/b",
            7,
            &props,
            &[b"hello"],
        );
        let p = parse_publish(&frame_of(&out), Version::V5).unwrap();
        assert_eq!(p.topic_str(), "a/b");
        assert_eq!(p.pkid, 7);
        assert_eq!(&p.properties[..], &props[..]);
        assert_eq!(&p.payload[..], b"hello");
        assert_eq!(
            out.len(),
            publish_wire_len(Version::V5, 1, 3, props.len(), 5)
        );
    }

    #[test]
    fn message_expiry_is_kept_apart_from_the_forwarded_properties() {
        let mut props = BytesMut::new();
        props.put_u8(prop::MESSAGE_EXPIRY);
        props.put_u32(30);
        props.put_u8(prop::CONTENT_TYPE);
        put_binary(&mut props, b"text/plain");
        let p = v5_qos0_publish(b"t", &props).unwrap();
        assert_eq!(p.message_expiry, Some(30));
        assert_eq!(&p.properties[..], &props[5..]);
        // A will delay belongs in a will, not in a PUBLISH.
        let mut props = BytesMut::new();
        props.put_u8(prop::WILL_DELAY);
        props.put_u32(3);
        assert!(v5_qos0_publish(b"t", &props).is_err());
    }

    #[test]
    fn disconnect_may_change_the_session_expiry() {
        let f = frame_of(&[0xE0, 7, 0x00, 5, prop::SESSION_EXPIRY, 0, 0, 0, 9]);
        let d = parse_disconnect(&f, Version::V5).unwrap();
        assert_eq!((d.code, d.session_expiry), (0, Some(9)));
        let f = frame_of(&[0xE0, 1, 0x04]);
        let d = parse_disconnect(&f, Version::V5).unwrap();
        assert_eq!((d.code, d.session_expiry), (0x04, None));
        let f = frame_of(&[0xE0, 0]);
        assert_eq!(
            parse_disconnect(&f, Version::V5).unwrap(),
            Disconnect::default()
        );
        let f = frame_of(&[0xE0, 4, 0x00, 2, prop::TOPIC_ALIAS, 0]);
        assert!(parse_disconnect(&f, Version::V5).is_err());
    }

    #[test]
    fn filters_match_topics_as_mqtt_says() {
        for &(filter, topic, expected) in FILTER_CASES {
            assert_eq!(
                filter_matches(filter.as_bytes(), topic.as_bytes()),
                expected,
                "{filter} vs {topic}"
            );
        }
    }

    #[test]
    fn publish_rejects_wildcards_and_qos3() {
        let mut out = BytesMut::new();
        put_publish(
            &mut out,
            Version::V311,
            false,
            0,
            false,
            b"a/+",
            0,
            &[],
            &[b"x"],
        );
        assert!(parse_publish(&frame_of(&out), Version::V311).is_err());
        let bytes = [0x36, 5, 0, 1, b'a', 0, 1];
        assert!(parse_publish(&frame_of(&bytes), Version::V311).is_err());
    }

    #[test]
    fn a_topic_alias_is_read_and_stands_in_for_an_empty_topic() {
        let p = v5_qos0_publish(b"a", &[prop::TOPIC_ALIAS, 0, 3]).unwrap();
        assert_eq!((&p.topic[..], p.topic_alias), (&b"a"[..], Some(3)));
        assert!(
            p.properties.is_empty(),
            "the alias is per hop: not forwarded"
        );
        let p = v5_qos0_publish(b"", &[prop::TOPIC_ALIAS, 0, 3]).unwrap();
        assert_eq!((&p.topic[..], p.topic_alias), (&b""[..], Some(3)));
        assert!(v5_qos0_publish(b"", &[]).is_err(), "no topic and no alias");
    }

    #[test]
    fn topic_filter_rules() {
        for ok in ["#", "+", "a/#", "a/+/c", "+/+", "/", "$share/g/a/#", "a//b"] {
            assert!(validate_topic_filter(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+/b",
            "$share/g",
            "$share//a",
            "$share/+/a",
            "$share/g/",
        ] {
            assert!(validate_topic_filter(bad.as_bytes()).is_err(), "{bad}");
        }
        for shared in [
            "$share/g",
            "$share//a",
            "$share/+/a",
            "$share/g#/a",
            "$share/g/",
        ] {
            assert!(is_malformed_shared(shared.as_bytes()), "{shared}");
        }
        for fine in ["$share/g/a", "$share/g/#", "$sharex/a", "a/$share/g"] {
            assert!(!is_malformed_shared(fine.as_bytes()), "{fine}");
        }
    }

    #[test]
    fn subscribe_options_checked_per_version() {
        let mut out = BytesMut::new();
        put_core_subscribe(&mut out, 3, &[(Bytes::from_static(b"a/#"), 1)]);
        let s = parse_subscribe(&frame_of(&out), Version::V311).unwrap();
        assert_eq!(s.pkid, 3);
        assert_eq!(s.filters[0].1, 1);
        // 3.1.1 with the v5 no-local bit is malformed.
        let bytes = [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 0x05];
        assert!(parse_subscribe(&frame_of(&bytes), Version::V311).is_err());
    }

    #[test]
    fn subscription_identifier_is_read_once_and_never_zero() {
        // v5 SUBSCRIBE, id 1, properties [0x0B varint], filter "a", options QoS 1.
        let with = |props: &[u8]| {
            let mut body = vec![0, 1, props.len() as u8];
            body.extend_from_slice(props);
            body.extend_from_slice(&[0, 1, b'a', 1]);
            let mut bytes = vec![0x82, body.len() as u8];
            bytes.extend(body);
            parse_subscribe(&frame_of(&bytes), Version::V5)
        };
        // 456,789 takes three bytes: 0xD5 0xF0 0x1B.
        let s = with(&[0x0B, 0xD5, 0xF0, 0x1B]).unwrap();
        assert_eq!(s.subscription_id, Some(456_789));
        assert_eq!(with(&[]).unwrap().subscription_id, None);
        assert_eq!(
            with(&[0x0B, 0xFF, 0xFF, 0xFF, 0x7F])
                .unwrap()
                .subscription_id,
            Some(268_435_455)
        );
        assert!(with(&[0x0B, 0x00]).is_err(), "identifier 0");
        assert!(with(&[0x0B, 0x01, 0x0B, 0x02]).is_err(), "two identifiers");
    }

    #[test]
    fn strings_with_nul_or_bad_utf8_are_malformed() {
        assert!(validate_utf8(b"a\0b").is_err());
        assert!(validate_utf8(&[0xC3, 0x28]).is_err());
    }

    /// Feeds mutated valid packets and random bytes through framing and every parser: none may
    /// panic, whatever a client sends. (A coverage-guided fuzz target needs a nightly toolchain;
    /// this deterministic mutation loop runs in every test run.)
    #[test]
    fn hostile_bytes_never_panic() {
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        let mut out = BytesMut::new();
        put_core_connect(
            &mut out,
            &CoreConnect {
                client_id: "dev",
                clean_session: false,
                keep_alive: 10,
                username: "u",
                password: "p",
                will: Some(CoreWill {
                    topic: b"w",
                    qos: 1,
                    retain: true,
                    payload: &[b"x"],
                }),
            },
        );
        seeds.push(out.to_vec());
        let mut v5 = BytesMut::new();
        put_publish(
            &mut v5,
            Version::V5,
            true,
            2,
            true,
            b"a/b",
            9,
            &[0x26, 0, 1, b'k', 0, 1, b'v'],
            &[b"p"],
        );
        seeds.push(v5.to_vec());
        let mut sub = BytesMut::new();
        put_core_subscribe(&mut sub, 1, &[(Bytes::from_static(b"$share/g/a/#"), 2)]);
        seeds.push(sub.to_vec());
        let mut unsub = BytesMut::new();
        put_core_unsubscribe(&mut unsub, 1, &[Bytes::from_static(b"a/+")]);
        seeds.push(unsub.to_vec());
        seeds.push(vec![0x62, 2, 0, 1]);
        seeds.push(vec![0xE0, 2, 0x04, 0]);

        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0u32;
        for i in 0..150_000u32 {
            let mut bytes = if i % 10 == 0 {
                (0..(rand() % 64)).map(|_| rand() as u8).collect()
            } else {
                seeds[(rand() % seeds.len() as u64) as usize].clone()
            };
            for _ in 0..(1 + rand() % 4) {
                if bytes.is_empty() {
                    break;
                }
                let at = (rand() % bytes.len() as u64) as usize;
                match rand() % 3 {
                    0 => bytes[at] = rand() as u8,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, rand() as u8),
                }
            }
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = read_frame(&mut buf, 1 << 16) {
                parsed += 1;
                for version in [Version::V311, Version::V5] {
                    let _ = connect_version(&frame.body);
                    let _ = parse_connect(&frame);
                    let _ = parse_publish(&frame, version);
                    let _ = parse_subscribe(&frame, version);
                    let _ = parse_unsubscribe(&frame, version);
                    let _ = parse_ack(&frame);
                    let _ = parse_disconnect(&frame, version);
                }
                let _ = parse_core_publish(&frame);
                let _ = parse_core_suback(&frame);
                let _ = parse_core_connack(&frame);
                let _ = crate::envelope::open(frame.body.clone());
            }
        }
        // Most mutants must reach the parsers, not stop at framing.
        assert!(parsed > 40_000, "only {parsed} frames parsed");
    }

    #[test]
    fn connack_v5_is_well_formed() {
        let mut out = BytesMut::new();
        let props = ConnackProperties {
            assigned_client_id: Some("x".into()),
            server_keep_alive: None,
            receive_maximum: 100,
            maximum_packet_size: 1024,
            topic_alias_maximum: 0,
            session_expiry: Some(60),
        };
        put_connack(&mut out, Version::V5, false, 0, Some(&props));
        let f = frame_of(&out);
        assert_eq!(f.kind(), CONNACK);
        assert_eq!(f.wire_len(), out.len());
    }
}
