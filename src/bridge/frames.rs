//! The bridge's JSON frames (docs/bridge-protocol.md): parsing what a browser sends into
//! typed requests, and writing what it receives.
//!
//! Parsing first reads every known field as raw JSON, then converts each one, so a field of
//! the wrong type is reported by name and the request's `ref` is still echoed. Outgoing frames
//! are written by hand into one `String`: a delivered payload that is JSON text is embedded as
//! is, without building a value tree.

use std::borrow::Cow;

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::mqtt;

/// Why a frame cannot be acted on: a stable code (the protocol's error table) and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    pub code: &'static str,
    pub message: Cow<'static, str>,
}

impl FrameError {
    pub fn new(code: &'static str, message: impl Into<Cow<'static, str>>) -> FrameError {
        FrameError {
            code,
            message: message.into(),
        }
    }
}

fn bad_frame(message: impl Into<Cow<'static, str>>) -> FrameError {
    FrameError::new("bad_frame", message)
}

/// Every field any frame may carry, still as raw JSON. Unknown fields are ignored.
#[derive(Deserialize, Default)]
struct RawFrame<'a> {
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow, rename = "ref")]
    reference: Option<&'a RawValue>,
    #[serde(borrow)]
    client_id: Option<&'a RawValue>,
    #[serde(borrow)]
    clean: Option<&'a RawValue>,
    #[serde(borrow)]
    keep_alive: Option<&'a RawValue>,
    #[serde(borrow)]
    username: Option<&'a RawValue>,
    #[serde(borrow)]
    password: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    will: Option<&'a RawValue>,
    #[serde(borrow)]
    filters: Option<&'a RawValue>,
    #[serde(borrow)]
    device: Option<&'a RawValue>,
    #[serde(borrow)]
    limit: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    encoding: Option<&'a RawValue>,
    #[serde(borrow)]
    qos: Option<&'a RawValue>,
    #[serde(borrow)]
    retain: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    dup: Option<&'a RawValue>,
}

/// A request from the browser.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Connect(ConnectReq),
    Disconnect,
    Ping,
    Subscribe(Vec<FilterReq>),
    Unsubscribe(Vec<Result<String, FrameError>>),
    Publish(PublishReq),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    /// Stored telemetry of one device, most recent `limit` readings.
    History {
        device: String,
        limit: usize,
    },
    /// The most recent `limit` alerts and acknowledgements (`alert_log`).
    RecentAlerts {
        limit: usize,
    },
}

/// Readings a `history` request returns when it names no `limit`, and the most it may ask.
pub const HISTORY_DEFAULT_LIMIT: usize = 500;
pub const HISTORY_MAX_LIMIT: usize = 10_000;
/// Messages a `recent_alerts` request returns when it names no `limit`; at most the log's size.
pub const RECENT_ALERTS_DEFAULT_LIMIT: usize = 200;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnectReq {
    pub client_id: Option<String>,
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub will: Option<PublishReq>,
}

/// One filter of a `subscribe`: valid, or refused with its own error (the others go ahead).
#[derive(Debug, Clone, PartialEq)]
pub struct FilterReq {
    pub filter: String,
    pub qos: Result<u8, FrameError>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublishReq {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub id: u16,
    pub dup: bool,
}

/// A parsed frame: the request, or why not, with the `ref` to echo either way.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub reference: Option<&'a RawValue>,
    pub request: Result<Request, FrameError>,
    /// For a refused `publish` that names a QoS 1 or 2 and a valid id: `(qos, id)`, so the
    /// refusal is answered on the acknowledgement path the client waits on.
    pub refused_publish: Option<(u8, u16)>,
}

/// Parses one text message. `max_payload` bounds a publish's payload after decoding.
pub fn parse(text: &str, max_payload: usize) -> Parsed<'_> {
    let raw: RawFrame<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            return Parsed {
                reference: None,
                request: Err(FrameError::new(
                    "bad_json",
                    format!("not a JSON object: {e}"),
                )),
                refused_publish: None,
            }
        }
    };
    let (reference, request) = match raw.reference.map(|r| (r, r.get().as_bytes().first())) {
        None | Some((_, Some(b'n'))) => (None, request(&raw, max_payload)),
        Some((r, Some(b'"' | b'-' | b'0'..=b'9'))) => (Some(r), request(&raw, max_payload)),
        Some(_) => (None, Err(bad_frame("`ref` must be a string or a number"))),
    };
    let refused_publish = match (&request, raw.op.map(RawValue::get)) {
        (Err(_), Some("\"publish\"")) => match (qos(raw.qos), required_id(raw.id)) {
            (Ok(q @ 1..=2), Ok(id)) => Some((q, id)),
            _ => None,
        },
        _ => None,
    };
    Parsed {
        reference,
        request,
        refused_publish,
    }
}

fn request(raw: &RawFrame<'_>, max_payload: usize) -> Result<Request, FrameError> {
    let op: String = match raw.op {
        Some(op) => serde_json::from_str(op.get())
            .map_err(|_| FrameError::new("unknown_op", "`op` must be a string"))?,
        None => return Err(FrameError::new("unknown_op", "missing `op`")),
    };
    Ok(match op.as_str() {
        "connect" => Request::Connect(connect(raw, max_payload)?),
        "disconnect" => Request::Disconnect,
        "ping" => Request::Ping,
        "subscribe" => Request::Subscribe(subscribe(raw)?),
        "unsubscribe" => Request::Unsubscribe(unsubscribe(raw)?),
        "publish" => Request::Publish(publish(raw, max_payload, true)?),
        "puback" => Request::PubAck(required_id(raw.id)?),
        "pubrec" => Request::PubRec(required_id(raw.id)?),
        "pubrel" => Request::PubRel(required_id(raw.id)?),
        "pubcomp" => Request::PubComp(required_id(raw.id)?),
        "history" => history(raw)?,
        "recent_alerts" => Request::RecentAlerts {
            limit: positive_limit(
                raw,
                RECENT_ALERTS_DEFAULT_LIMIT,
                crate::alert_log::MAX_ENTRIES,
            )?,
        },
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(FrameError::new(
                "unknown_op",
                format!("unknown op `{shown}`"),
            ));
        }
    })
}

fn history(raw: &RawFrame<'_>) -> Result<Request, FrameError> {
    let device: String = field(raw.device, "device", "a string")?
        .ok_or_else(|| bad_frame("`history` needs a `device`"))?;
    if device.is_empty()
        || device.len() > 256
        || device.contains(['/', '+', '#'])
        || device.contains('\0')
    {
        return Err(FrameError::new(
            "bad_device",
            "a device id is 1 to 256 bytes without `/`, `+`, `#`",
        ));
    }
    let limit = positive_limit(raw, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT)?;
    Ok(Request::History { device, limit })
}

/// A request's `limit`: `default` when absent, at most `max`; 0 or not a number is an error.
fn positive_limit(raw: &RawFrame<'_>, default: usize, max: usize) -> Result<usize, FrameError> {
    match field::<u64>(raw.limit, "limit", "a positive integer")? {
        None => Ok(default),
        Some(0) => Err(bad_frame("`limit` must be a positive integer")),
        Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX).min(max)),
    }
}

/// The answer to a `recent_alerts` request: `messages` oldest first, each with its `topic`, the
/// time this server received it (`t`, Unix ms) and its payload encoded as in a `message` frame.
pub fn recent_alerts_answer(
    entries: &[crate::alert_log::Entry],
    reference: Option<&str>,
) -> String {
    let mut out =
        String::with_capacity(64 + entries.iter().map(|e| e.payload.len() + 96).sum::<usize>());
    out.push_str("{\"op\":\"recent_alerts\"");
    push_ref(&mut out, reference);
    out.push_str(",\"messages\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"topic\":");
        push_str(&mut out, &e.topic);
        out.push_str(",\"t\":");
        out.push_str(&e.received_ms.to_string());
        push_payload(&mut out, &e.payload);
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// The answer to a `history` request: `points` oldest first, each `{"t": ms, "v": {metric:
/// value}}`.
pub fn history_answer(
    device: &str,
    points: &[crate::history::Point],
    reference: Option<&str>,
) -> String {
    let mut out = String::with_capacity(64 + points.len() * 48);
    out.push_str("{\"op\":\"history\"");
    push_ref(&mut out, reference);
    out.push_str(",\"device\":");
    push_str(&mut out, device);
    out.push_str(",\"points\":[");
    for (i, p) in points.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"t\":");
        out.push_str(&p.ts_ms.to_string());
        out.push_str(",\"v\":{");
        let mut first = true;
        for (name, value) in &p.values {
            // JSON has no NaN or infinity; stored values are finite, but never write bad JSON.
            if !value.is_finite() {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            push_str(&mut out, name);
            out.push(':');
            out.push_str(&value.to_string());
        }
        out.push_str("}}");
    }
    out.push_str("]}");
    out
}

fn field<'de, T: Deserialize<'de>>(
    raw: Option<&'de RawValue>,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<T>, FrameError> {
    match raw {
        None => Ok(None),
        Some(v) if v.get() == "null" => Ok(None),
        Some(v) => serde_json::from_str(v.get())
            .map(Some)
            .map_err(|_| bad_frame(format!("`{name}` must be {expected}"))),
    }
}

fn qos(raw: Option<&RawValue>) -> Result<u8, FrameError> {
    match field::<u64>(raw, "qos", "0, 1 or 2") {
        Ok(None) => Ok(0),
        Ok(Some(q @ 0..=2)) => Ok(q as u8),
        _ => Err(FrameError::new("bad_qos", "`qos` must be 0, 1 or 2")),
    }
}

fn required_id(raw: Option<&RawValue>) -> Result<u16, FrameError> {
    match field::<u64>(raw, "id", "an integer") {
        Ok(Some(id @ 1..=65535)) => Ok(id as u16),
        Ok(None) => Err(FrameError::new("bad_id", "`id` is required")),
        _ => Err(FrameError::new(
            "bad_id",
            "`id` must be an integer 1..=65535",
        )),
    }
}

fn connect(raw: &RawFrame<'_>, max_payload: usize) -> Result<ConnectReq, FrameError> {
    let keep_alive = match field::<u64>(raw.keep_alive, "keep_alive", "an integer")? {
        None => 60,
        Some(k) if k <= u16::MAX as u64 => k as u16,
        Some(_) => return Err(bad_frame("`keep_alive` must be 0..=65535 seconds")),
    };
    let will = match raw.will {
        Some(w) if w.get() != "null" => {
            let inner: RawFrame<'_> =
                serde_json::from_str(w.get()).map_err(|_| bad_frame("`will` must be an object"))?;
            Some(
                publish(&inner, max_payload, false)
                    .map_err(|e| FrameError::new(e.code, format!("will: {}", e.message)))?,
            )
        }
        _ => None,
    };
    Ok(ConnectReq {
        client_id: field(raw.client_id, "client_id", "a string")?,
        clean: field(raw.clean, "clean", "a boolean")?.unwrap_or(true),
        keep_alive,
        username: field(raw.username, "username", "a string")?,
        password: field(raw.password, "password", "a string")?,
        token: field(raw.token, "token", "a string")?,
        will,
    })
}

/// `filters` as a non-empty array, at most this many entries per request.
const MAX_FILTERS_PER_REQUEST: usize = 128;

fn filter_list<'a>(raw: &RawFrame<'a>) -> Result<Vec<&'a RawValue>, FrameError> {
    let list: Vec<&RawValue> = field(raw.filters, "filters", "an array")?
        .ok_or_else(|| bad_frame("`filters` is required"))?;
    if list.is_empty() {
        return Err(bad_frame("`filters` must not be empty"));
    }
    if list.len() > MAX_FILTERS_PER_REQUEST {
        return Err(bad_frame(format!(
            "at most {MAX_FILTERS_PER_REQUEST} filters per request"
        )));
    }
    Ok(list)
}

fn check_filter(filter: &str) -> Result<(), FrameError> {
    if filter.len() > u16::MAX as usize {
        return Err(FrameError::new("bad_filter", "filter too long"));
    }
    mqtt::validate_topic_filter(filter.as_bytes())
        .map_err(|e| FrameError::new("bad_filter", e.to_string()))
}

fn subscribe(raw: &RawFrame<'_>) -> Result<Vec<FilterReq>, FrameError> {
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        filter: Option<&'a RawValue>,
        #[serde(borrow)]
        qos: Option<&'a RawValue>,
    }
    let mut out = Vec::new();
    for entry in filter_list(raw)? {
        let item: Item<'_> = serde_json::from_str(entry.get()).map_err(|_| {
            bad_frame("each entry of `filters` must be an object {\"filter\", \"qos\"}")
        })?;
        let filter: String = field(item.filter, "filter", "a string")?
            .ok_or_else(|| bad_frame("each entry of `filters` needs a `filter`"))?;
        let qos = check_filter(&filter).and_then(|()| qos(item.qos));
        out.push(FilterReq { filter, qos });
    }
    Ok(out)
}

fn unsubscribe(raw: &RawFrame<'_>) -> Result<Vec<Result<String, FrameError>>, FrameError> {
    let mut out = Vec::new();
    for entry in filter_list(raw)? {
        let filter: String = serde_json::from_str(entry.get())
            .map_err(|_| bad_frame("each entry of `filters` must be a string"))?;
        out.push(check_filter(&filter).map(|()| filter));
    }
    Ok(out)
}

/// A `publish` request, or a will when `with_id` is false (a will has no packet id).
fn publish(
    raw: &RawFrame<'_>,
    max_payload: usize,
    with_id: bool,
) -> Result<PublishReq, FrameError> {
    let topic: String = field(raw.topic, "topic", "a string")?
        .ok_or_else(|| FrameError::new("bad_topic", "`topic` is required"))?;
    check_topic(&topic)?;
    let qos = qos(raw.qos)?;
    let id = match (qos, with_id) {
        (0, _) | (_, false) => 0,
        (_, true) => required_id(raw.id)?,
    };
    let payload = payload(raw.payload, raw.encoding, max_payload)?;
    Ok(PublishReq {
        topic,
        payload,
        qos,
        retain: field(raw.retain, "retain", "a boolean")?.unwrap_or(false),
        id,
        dup: field(raw.dup, "dup", "a boolean")?.unwrap_or(false),
    })
}

fn check_topic(topic: &str) -> Result<(), FrameError> {
    if topic.is_empty() {
        return Err(FrameError::new("bad_topic", "empty topic name"));
    }
    if topic.len() > u16::MAX as usize {
        return Err(FrameError::new("bad_topic", "topic name too long"));
    }
    mqtt::validate_utf8(topic.as_bytes())
        .and_then(|_| mqtt::validate_topic_name(topic.as_bytes()))
        .map_err(|e| FrameError::new("bad_topic", e.to_string()))
}

/// The message bytes a `payload` and `encoding` describe.
fn payload(
    raw: Option<&RawValue>,
    encoding: Option<&RawValue>,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let encoding: Option<String> = field(encoding, "encoding", "a string")?;
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let text = raw.get();
    let is_string = text.starts_with('"');
    let too_large = || {
        FrameError::new(
            "payload_too_large",
            format!("payload over the {max}-byte limit"),
        )
    };
    let bytes = match encoding.as_deref() {
        Some("json") | None if !is_string => text.as_bytes().to_vec(),
        Some("json") => text.as_bytes().to_vec(),
        Some("utf8") | None => {
            if !is_string {
                return Err(FrameError::new(
                    "bad_payload",
                    "`utf8` payloads must be strings",
                ));
            }
            let s: String = serde_json::from_str(text)
                .map_err(|_| FrameError::new("bad_payload", "bad string"))?;
            s.into_bytes()
        }
        Some("base64") => {
            if !is_string {
                return Err(FrameError::new(
                    "bad_payload",
                    "`base64` payloads must be strings",
                ));
            }
            let s: Cow<'_, str> = serde_json::from_str(text)
                .map_err(|_| FrameError::new("bad_payload", "bad string"))?;
            if s.len() / 4 * 3 > max + 3 {
                return Err(too_large());
            }
            BASE64
                .decode(s.as_bytes())
                .map_err(|_| FrameError::new("bad_payload", "payload is not valid base64"))?
        }
        Some(_) => {
            return Err(FrameError::new(
                "bad_payload",
                "`encoding` must be json, utf8 or base64",
            ))
        }
    };
    if bytes.len() > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Standard alphabet, padding optional on input.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

// ---------------------------------------------------------------------------------------------
// Writing frames.

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1F => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends `,"ref":<ref>` when the request had one.
pub fn push_ref(out: &mut String, reference: Option<&str>) {
    if let Some(r) = reference {
        out.push_str(",\"ref\":");
        out.push_str(r);
    }
}

pub fn error(code: &str, message: &str, reference: Option<&str>) -> String {
    let mut out = String::with_capacity(64 + message.len());
    out.push_str("{\"op\":\"error\",\"code\":");
    push_str(&mut out, code);
    out.push_str(",\"message\":");
    push_str(&mut out, message);
    push_ref(&mut out, reference);
    out.push('}');
    out
}

/// `puback`, `pubrec`, `pubrel` or `pubcomp`, with an error code when the broker refused.
pub fn ack(op: &str, id: u16, refused: Option<(&str, &str)>) -> String {
    let mut out = String::with_capacity(40);
    out.push_str("{\"op\":\"");
    out.push_str(op);
    out.push_str("\",\"id\":");
    out.push_str(itoa(id as u64).as_str());
    if let Some((code, message)) = refused {
        out.push_str(",\"code\":");
        push_str(&mut out, code);
        out.push_str(",\"message\":");
        push_str(&mut out, message);
    }
    out.push('}');
    out
}

/// `puback` for a message no subscription matched (the broker's reason code 0x10, as a v5
/// client sees it).
pub fn puback_no_subscribers(id: u16) -> String {
    format!("{{\"op\":\"puback\",\"id\":{id},\"no_subscribers\":true}}")
}

fn itoa(n: u64) -> String {
    n.to_string()
}

/// A `message` frame. The payload is embedded as JSON when it is JSON text, as a string when it
/// is other UTF-8, and as base64 otherwise.
pub fn message(topic: &str, qos: u8, id: u16, retain: bool, dup: bool, payload: &[u8]) -> String {
    let mut out = String::with_capacity(96 + topic.len() + payload.len() + payload.len() / 3);
    out.push_str("{\"op\":\"message\",\"topic\":");
    push_str(&mut out, topic);
    out.push_str(",\"qos\":");
    out.push((b'0' + qos) as char);
    if qos > 0 {
        out.push_str(",\"id\":");
        out.push_str(itoa(id as u64).as_str());
    }
    out.push_str(if retain {
        ",\"retain\":true"
    } else {
        ",\"retain\":false"
    });
    out.push_str(if dup {
        ",\"dup\":true"
    } else {
        ",\"dup\":false"
    });
    push_payload(&mut out, payload);
    out.push('}');
    out
}

/// Appends `,"encoding":...,"payload":...`: JSON text embedded as is, other UTF-8 as a string,
/// anything else as base64.
fn push_payload(out: &mut String, payload: &[u8]) {
    match std::str::from_utf8(payload) {
        Ok(text) if is_json(text) => {
            out.push_str(",\"encoding\":\"json\",\"payload\":");
            out.push_str(text);
        }
        Ok(text) => {
            out.push_str(",\"encoding\":\"utf8\",\"payload\":");
            push_str(out, text);
        }
        Err(_) => {
            out.push_str(",\"encoding\":\"base64\",\"payload\":\"");
            BASE64_OUT.encode_string(payload, out);
            out.push('"');
        }
    }
}

const BASE64_OUT: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Whether `text` is one complete JSON value (surrounding whitespace allowed).
fn is_json(text: &str) -> bool {
    let trimmed = text.trim_start();
    // Cheap rejection of the common non-JSON text before running the parser.
    match trimmed.as_bytes().first() {
        Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {}
        _ => return false,
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<Request, FrameError> {
        parse(text, 1024).request
    }

    #[test]
    fn connect_defaults_and_fields() {
        let Ok(Request::Connect(c)) = req(r#"{"op":"connect"}"#) else {
            panic!()
        };
        assert!(c.clean);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(c.client_id, None);
        let Ok(Request::Connect(c)) = req(
            r#"{"op":"connect","client_id":"ui-1","clean":false,"keep_alive":0,"username":"u","password":"p",
               "will":{"topic":"a/b","payload":"bye","qos":1,"retain":true}}"#,
        ) else {
            panic!()
        };
        assert_eq!(c.client_id.as_deref(), Some("ui-1"));
        assert!(!c.clean);
        assert_eq!(c.keep_alive, 0);
        let will = c.will.unwrap();
        assert_eq!(
            (will.topic.as_str(), &will.payload[..]),
            ("a/b", &b"bye"[..])
        );
        assert!(will.retain);
        assert_eq!(will.qos, 1);
    }

    #[test]
    fn errors_have_stable_codes_and_keep_ref() {
        let p = parse("not json", 10);
        assert_eq!(p.request.unwrap_err().code, "bad_json");
        let p = parse(r#"{"op":"frobnicate","ref":7}"#, 10);
        assert_eq!(p.request.unwrap_err().code, "unknown_op");
        assert_eq!(p.reference.map(|r| r.get()), Some("7"));
        let code = |t: &str| req(t).unwrap_err().code;
        assert_eq!(code(r#"{"ref":1}"#), "unknown_op");
        assert_eq!(code(r#"{"op":"publish","topic":"a/+"}"#), "bad_topic");
        assert_eq!(code(r#"{"op":"publish","topic":""}"#), "bad_topic");
        assert_eq!(code(r#"{"op":"publish","topic":"a","qos":3}"#), "bad_qos");
        assert_eq!(code(r#"{"op":"publish","topic":"a","qos":1}"#), "bad_id");
        assert_eq!(
            code(r#"{"op":"publish","topic":"a","qos":1,"id":0}"#),
            "bad_id"
        );
        assert_eq!(
            code(r#"{"op":"publish","topic":"a","qos":2,"id":70000}"#),
            "bad_id"
        );
        assert_eq!(
            code(r#"{"op":"publish","topic":"a","payload":"%%%","encoding":"base64"}"#),
            "bad_payload"
        );
        assert_eq!(
            code(r#"{"op":"publish","topic":"a","payload":"x","encoding":"rot13"}"#),
            "bad_payload"
        );
        assert_eq!(
            code(&format!(
                r#"{{"op":"publish","topic":"a","payload":"{}"}}"#,
                "x".repeat(2000)
            )),
            "payload_too_large"
        );
        assert_eq!(
            code(r#"{"op":"publish","topic":"a","retain":"yes"}"#),
            "bad_frame"
        );
        assert_eq!(code(r#"{"op":"puback"}"#), "bad_id");
        assert_eq!(code(r#"{"op":"subscribe","filters":[]}"#), "bad_frame");
        assert_eq!(code(r#"{"op":"subscribe","filters":"a/b"}"#), "bad_frame");
        // A bad ref (an object) is not echoed.
        let p = parse(r#"{"op":"ping","ref":{"a":1}}"#, 10);
        assert!(p.reference.is_none());
    }

    #[test]
    fn refused_qos1_publish_keeps_its_id() {
        let p = parse(r#"{"op":"publish","topic":"a/+","qos":1,"id":4}"#, 10);
        assert_eq!(p.request.unwrap_err().code, "bad_topic");
        assert_eq!(p.refused_publish, Some((1, 4)));
        let p = parse(r#"{"op":"publish","topic":"a/+","qos":0}"#, 10);
        assert_eq!(p.refused_publish, None);
        let p = parse(
            r#"{"op":"publish","topic":"a","qos":2,"id":4,"payload":"xxxxxxxxxxxxxxxxxxxxxxx"}"#,
            10,
        );
        assert_eq!(p.request.unwrap_err().code, "payload_too_large");
        assert_eq!(p.refused_publish, Some((2, 4)));
    }

    #[test]
    fn payload_encodings() {
        let publish = |t: &str| match req(t) {
            Ok(Request::Publish(p)) => p.payload,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            publish(r#"{"op":"publish","topic":"a","payload":{"cmd":"stop"}}"#),
            br#"{"cmd":"stop"}"#
        );
        assert_eq!(
            publish(r#"{"op":"publish","topic":"a","payload":"hi\n"}"#),
            b"hi\n"
        );
        assert_eq!(
            publish(r#"{"op":"publish","topic":"a","payload":"hi","encoding":"json"}"#),
            br#""hi""#
        );
        assert_eq!(
            publish(r#"{"op":"publish","topic":"a","payload":"AAH/","encoding":"base64"}"#),
            [0, 1, 255]
        );
        assert_eq!(
            publish(r#"{"op":"publish","topic":"a","payload":"AAE=","encoding":"base64"}"#),
            [0, 1]
        );
        assert_eq!(publish(r#"{"op":"publish","topic":"a"}"#), b"");
        assert_eq!(
            publish(r#"{"op":"publish","topic":"a","payload":42}"#),
            b"42"
        );
    }

    #[test]
    fn subscribe_filters_fail_one_by_one() {
        let Ok(Request::Subscribe(f)) = req(
            r#"{"op":"subscribe","filters":[{"filter":"a/+","qos":1},{"filter":"a/#/b"},{"filter":"c","qos":5}]}"#,
        ) else {
            panic!()
        };
        assert_eq!(f[0].qos, Ok(1));
        assert_eq!(f[1].qos.as_ref().unwrap_err().code, "bad_filter");
        assert_eq!(f[2].qos.as_ref().unwrap_err().code, "bad_qos");
    }

    #[test]
    fn message_frames_embed_json_text_or_encode() {
        let m = message("d/1/t", 1, 5, false, false, br#"{"t":1}"#);
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["payload"]["t"], 1);
        assert_eq!(v["encoding"], "json");
        assert_eq!(v["id"], 5);
        let m = message("a\"b", 0, 0, true, false, b"plain \x01text");
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["payload"], "plain \u{1}text");
        assert_eq!(v["encoding"], "utf8");
        assert_eq!(v["topic"], "a\"b");
        assert!(v.get("id").is_none());
        let m = message("a", 2, 9, false, true, &[0xff, 0, 1]);
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["payload"], "/wAB");
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["dup"], true);
        // Text that merely starts like JSON is not JSON.
        let m = message("a", 0, 0, false, false, b"12 apples");
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["encoding"], "utf8");
    }

    #[test]
    fn history_requests_and_answers() {
        assert_eq!(
            req(r#"{"op":"history","device":"m-1"}"#),
            Ok(Request::History {
                device: "m-1".into(),
                limit: HISTORY_DEFAULT_LIMIT
            })
        );
        assert_eq!(
            req(r#"{"op":"history","device":"m-1","limit":99999}"#),
            Ok(Request::History {
                device: "m-1".into(),
                limit: HISTORY_MAX_LIMIT
            })
        );
        for bad in [
            r#"{"op":"history"}"#,
            r#"{"op":"history","device":"a/b"}"#,
            r#"{"op":"history","device":""}"#,
            r#"{"op":"history","device":"m","limit":0}"#,
            r#"{"op":"history","device":"m","limit":"x"}"#,
        ] {
            assert!(req(bad).is_err(), "{bad}");
        }
        let points = vec![
            crate::history::Point {
                ts_ms: 5,
                values: vec![("temperature".into(), 20.5), ("v\"x".into(), 1.0)],
            },
            crate::history::Point {
                ts_ms: 6,
                values: vec![("temperature".into(), 21.0)],
            },
        ];
        let text = history_answer("m-1", &points, Some("7"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["op"], "history");
        assert_eq!(v["ref"], 7);
        assert_eq!(v["device"], "m-1");
        assert_eq!(v["points"][0]["t"], 5);
        assert_eq!(v["points"][0]["v"]["temperature"], 20.5);
        assert_eq!(v["points"][0]["v"]["v\"x"], 1.0);
        assert_eq!(v["points"][1]["v"]["temperature"], 21.0);
    }

    #[test]
    fn recent_alerts_requests_and_answers() {
        assert_eq!(
            req(r#"{"op":"recent_alerts"}"#),
            Ok(Request::RecentAlerts {
                limit: RECENT_ALERTS_DEFAULT_LIMIT
            })
        );
        assert_eq!(
            req(r#"{"op":"recent_alerts","limit":1000000}"#),
            Ok(Request::RecentAlerts {
                limit: crate::alert_log::MAX_ENTRIES
            })
        );
        assert!(req(r#"{"op":"recent_alerts","limit":0}"#).is_err());
        let entry = |topic: &str, payload: &'static [u8], t| crate::alert_log::Entry {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            received_ms: t,
        };
        let text = recent_alerts_answer(
            &[
                entry("device/m-1/alerts", br#"{"severity":"HIGH"}"#, 5),
                entry("device/m-1/alerts", b"\xff", 6),
                entry("device/m-1/alerts/ack", b"ok", 7),
            ],
            Some("\"x\""),
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["op"], "recent_alerts");
        assert_eq!(v["ref"], "x");
        let m = &v["messages"];
        assert_eq!(
            (&m[0]["topic"], &m[0]["t"]),
            (&"device/m-1/alerts".into(), &5.into())
        );
        assert_eq!(
            (&m[0]["encoding"], &m[0]["payload"]["severity"]),
            (&"json".into(), &"HIGH".into())
        );
        assert_eq!(
            (&m[1]["encoding"], &m[1]["payload"]),
            (&"base64".into(), &"/w==".into())
        );
        assert_eq!(
            (&m[2]["encoding"], &m[2]["payload"]),
            (&"utf8".into(), &"ok".into())
        );
        let empty: serde_json::Value =
            serde_json::from_str(&recent_alerts_answer(&[], None)).expect("valid JSON");
        assert_eq!(empty["messages"], serde_json::json!([]));
    }

    #[test]
    fn ack_and_error_frames_are_json() {
        let v: serde_json::Value =
            serde_json::from_str(&ack("puback", 17, Some(("not_authorized", "no")))).unwrap();
        assert_eq!(v["id"], 17);
        assert_eq!(v["code"], "not_authorized");
        let v: serde_json::Value =
            serde_json::from_str(&error("bad_json", "x \"y\"", Some("\"r\""))).unwrap();
        assert_eq!(v["ref"], "r");
    }
}
