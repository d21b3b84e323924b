//! Parsing and validation of device telemetry JSON published on `device/<id>/telemetry`.
//!
//! Three payload shapes are accepted:
//! - flat: `{"device_id":"MOTOR-01","temperature":78.2,"vibration":0.92,"timestamp":1734512000}`,
//!   where every numeric field other than the timestamp is a metric, also inside nested objects
//!   (`{"motor":{"temperature":78.2}}` is the metric `motor.temperature`, and
//!   `{"temperature":{"value":78.2,"unit":"C"}}` the metric `temperature`);
//! - tagged: `{"deviceId":"plc-101","timestamp":...,"values":[{"tag":"temperature","value":42.5}]}`;
//! - batch: `{"type":"batch","data":[...flat or tagged objects...]}`.
//!
//! Descriptive fields such as `unit` and `quality` are accepted and ignored: quality flags differ
//! between vendors, and a "bad" reading is still worth scoring (it may itself be the anomaly).
//! The device id in the topic is the authority: a payload naming another device is rejected.
//! Every error carries a stable machine code (`TelemetryError::code`) so the broker can count and
//! report rejections without matching on human text. Parsing never panics on any input.

use serde_json::{Map, Value};

/// 2000-01-01T00:00:00Z in unix milliseconds: earlier timestamps are treated as clock faults.
pub const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;

/// `secs` seconds in milliseconds, saturating: settings given in seconds, compared with
/// readings' millisecond time stamps.
pub fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000)
}

/// A numeric timestamp's unit is read from its magnitude: below 1e11 seconds, then milliseconds,
/// microseconds and nanoseconds, each range a thousand times the previous one. 1e11 seconds is
/// the year 5138 while 1e11 milliseconds is 1973 (likewise for each larger unit), so the units
/// cannot be confused for any clock between 2000 and 5000; numbers from 1e20 up are rejected.
const UNIT_STEPS: [(f64, f64); 4] = [(1e11, 1e3), (1e14, 1.0), (1e17, 1e-3), (1e20, 1e-6)];

/// Keys of a flat payload that are never metrics.
const RESERVED_KEYS: [&str; 7] = [
    "device_id",
    "deviceId",
    "timestamp",
    "type",
    "quality",
    "values",
    "data",
];

/// Resource limits applied while parsing one MQTT payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest accepted payload in bytes.
    pub max_payload_bytes: usize,
    /// Largest number of readings in one batch.
    pub max_batch: usize,
    /// Largest number of metrics in one reading.
    pub max_metrics: usize,
    /// Deepest accepted nesting of JSON arrays and objects.
    pub max_depth: usize,
    /// Longest accepted metric name in bytes.
    pub max_name_len: usize,
    /// How far in the future of `now` a timestamp may lie (clock skew allowance).
    pub max_future_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_batch: 500,
            max_metrics: 64,
            max_depth: 8,
            max_name_len: 64,
            max_future_ms: 86_400_000,
        }
    }
}

/// One timestamped set of metric values from one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Unix time in milliseconds.
    pub timestamp_ms: i64,
    /// Whether the device gave the time (false: the receive time, for a payload without
    /// `timestamp`; the monitor then scores every reading, as their spacing is not known).
    pub device_time: bool,
    /// `(metric name, value)` pairs; values are always finite.
    pub metrics: Vec<(String, f64)>,
}

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TelemetryError {
    /// The payload exceeds `Limits::max_payload_bytes`.
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload is not valid UTF-8 JSON.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// Arrays and objects nest deeper than `Limits::max_depth`.
    #[error("payload nests deeper than {0} levels")]
    TooDeep(usize),
    /// The top level (or a batch element) is not a JSON object.
    #[error("expected a JSON object")]
    NotObject,
    /// The reading contains no numeric metric. The text, empty or starting with a space, names
    /// a likely cause: a number sent as a string, or an array of numbers.
    #[error("the reading contains no numeric metric{0}")]
    NoMetrics(String),
    /// A tagged value spells NaN or infinity, or a number lies beyond f64's range (`1e400`; the
    /// text then names its position, as the metric is not known yet).
    #[error("metric {0} is not a finite number")]
    NonFinite(String),
    /// The timestamp is unreadable, before 2000 or too far in the future.
    #[error("bad timestamp: {0}")]
    BadTimestamp(String),
    /// The payload names a different device than its topic.
    #[error("payload names device {payload:?} but was published for {topic:?}")]
    DeviceMismatch {
        /// The id from the topic.
        topic: String,
        /// The id from the payload.
        payload: String,
    },
    /// The batch holds more readings than `Limits::max_batch`.
    #[error("batch of {size} readings exceeds the limit of {limit}")]
    BatchTooLarge {
        /// Readings in the batch.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A reading holds more metrics than `Limits::max_metrics`.
    #[error("{count} metrics exceed the limit of {limit}")]
    TooManyMetrics {
        /// Metrics in the reading.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A metric name is empty, too long or contains control characters.
    #[error("invalid metric name {0:?}")]
    BadMetricName(String),
    /// A batch is malformed (no `data` array, or a batch inside a batch).
    #[error("malformed batch: {0}")]
    BadBatch(&'static str),
}

impl TelemetryError {
    /// A stable, machine-readable code for metrics and error replies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::NotJson(_) => "not_json",
            Self::TooDeep(_) => "too_deep",
            Self::NotObject => "not_object",
            Self::NoMetrics(_) => "no_metrics",
            Self::NonFinite(_) => "non_finite",
            Self::BadTimestamp(_) => "bad_timestamp",
            Self::DeviceMismatch { .. } => "device_mismatch",
            Self::BatchTooLarge { .. } => "batch_too_large",
            Self::TooManyMetrics { .. } => "too_many_metrics",
            Self::BadMetricName(_) => "bad_metric_name",
            Self::BadBatch(_) => "bad_batch",
        }
    }
}

/// Extracts `<id>` from a `device/<id>/telemetry` topic, or `None` for any other topic.
pub fn device_id_from_topic(topic: &str) -> Option<&str> {
    device_id_from(topic, "telemetry")
}

/// Extracts `<id>` from a `device/<id>/<leaf>` topic (one level of id, no wildcard), or `None`.
pub fn device_id_from<'a>(topic: &'a str, leaf: &str) -> Option<&'a str> {
    let id = topic
        .strip_prefix("device/")?
        .strip_suffix(leaf)?
        .strip_suffix('/')?;
    if id.is_empty() || id.contains('/') || id.contains('+') || id.contains('#') {
        return None;
    }
    Some(id)
}

/// Parses one telemetry payload published for `topic_device_id`.
///
/// `now_ms` is the receive time: it is used for readings without a timestamp and to reject
/// timestamps too far in the future. A batch is accepted or rejected as a whole so that a device
/// never sees a partially ingested batch.
pub fn parse(
    topic_device_id: &str,
    payload: &[u8],
    now_ms: i64,
    limits: &Limits,
) -> Result<Vec<Reading>, TelemetryError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(TelemetryError::PayloadTooLarge {
            size: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    // Check the nesting depth before handing the bytes to serde_json, so a hostile payload of
    // nested brackets costs one linear scan and no recursion.
    let depth = nesting_depth(payload);
    if depth > limits.max_depth {
        return Err(TelemetryError::TooDeep(limits.max_depth));
    }
    let value: Value = serde_json::from_slice(payload).map_err(|e| {
        let text = e.to_string();
        // A literal beyond f64's range (`1e400`) is an infinite value, not a syntax error.
        if text.starts_with("number out of range") {
            TelemetryError::NonFinite(format!("at line {} column {}", e.line(), e.column()))
        } else {
            TelemetryError::NotJson(text)
        }
    })?;
    let Value::Object(obj) = value else {
        return Err(TelemetryError::NotObject);
    };
    if obj.get("type").and_then(Value::as_str) == Some("batch") {
        let data = obj
            .get("data")
            .and_then(Value::as_array)
            .ok_or(TelemetryError::BadBatch("missing data array"))?;
        if data.len() > limits.max_batch {
            return Err(TelemetryError::BatchTooLarge {
                size: data.len(),
                limit: limits.max_batch,
            });
        }
        if data.is_empty() {
            return Err(TelemetryError::NoMetrics(" (the batch is empty)".into()));
        }
        check_device(topic_device_id, &obj)?;
        let mut out = Vec::with_capacity(data.len());
        for item in data {
            let Value::Object(inner) = item else {
                return Err(TelemetryError::NotObject);
            };
            if inner.get("type").and_then(Value::as_str) == Some("batch") {
                return Err(TelemetryError::BadBatch("nested batch"));
            }
            out.push(parse_reading(topic_device_id, inner, now_ms, limits)?);
        }
        Ok(out)
    } else {
        Ok(vec![parse_reading(topic_device_id, &obj, now_ms, limits)?])
    }
}

/// Largest nesting depth of arrays/objects in `bytes`, ignoring brackets inside strings.
fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_str, mut escaped) = (false, false);
    for &b in bytes {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Rejects an object whose `device_id`/`deviceId` differs from the topic's id.
fn check_device(topic_id: &str, obj: &Map<String, Value>) -> Result<(), TelemetryError> {
    for key in ["device_id", "deviceId"] {
        if let Some(v) = obj.get(key) {
            let named = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            if named != topic_id {
                return Err(TelemetryError::DeviceMismatch {
                    topic: topic_id.to_string(),
                    payload: truncate(&named, 64),
                });
            }
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Parses one flat or tagged reading object.
fn parse_reading(
    topic_id: &str,
    obj: &Map<String, Value>,
    now_ms: i64,
    limits: &Limits,
) -> Result<Reading, TelemetryError> {
    check_device(topic_id, obj)?;
    let (timestamp_ms, device_time) = match obj.get("timestamp") {
        None | Some(Value::Null) => (now_ms, false),
        Some(v) => (parse_timestamp(v, now_ms, limits)?, true),
    };
    let mut metrics: Vec<(String, f64)> = Vec::new();
    let mut push = |name: &str, value: f64| -> Result<(), TelemetryError> {
        if name.is_empty() || name.len() > limits.max_name_len || name.chars().any(char::is_control)
        {
            return Err(TelemetryError::BadMetricName(truncate(name, 64)));
        }
        if !value.is_finite() {
            return Err(TelemetryError::NonFinite(truncate(name, 64)));
        }
        if metrics.len() >= limits.max_metrics {
            return Err(TelemetryError::TooManyMetrics {
                count: metrics.len() + 1,
                limit: limits.max_metrics,
            });
        }
        // A repeated name keeps its last value instead of appearing twice.
        if let Some(slot) = metrics.iter_mut().find(|(n, _)| n == name) {
            slot.1 = value;
        } else {
            metrics.push((name.to_string(), value));
        }
        Ok(())
    };
    if let Some(values) = obj.get("values").and_then(Value::as_array) {
        for item in values {
            let Some(tag) = item.as_object() else {
                continue;
            };
            let Some(name) = tag
                .get("tag")
                .or_else(|| tag.get("name"))
                .and_then(Value::as_str)
            else {
                continue;
            };
            if let Some(value) = tag.get("value") {
                read_value(name, value, &mut push)?;
            }
        }
    }
    // `values` (when not a tagged list) and `data` (outside a batch) are containers: the fields
    // of such an object keep their own names.
    for container in ["values", "data"] {
        if let Some(Value::Object(inner)) = obj.get(container) {
            read_fields(&mut String::new(), inner, &mut push)?;
        }
    }
    read_fields(&mut String::new(), obj, &mut push)?;
    if metrics.is_empty() {
        return Err(TelemetryError::NoMetrics(why_no_metrics(obj)));
    }
    Ok(Reading {
        timestamp_ms,
        device_time,
        metrics,
    })
}

/// Reads the metrics of a flat object: every numeric field, named by `prefix` plus its key. A
/// nested object is read the same way under `prefix.key.`, except that an object with a `value`
/// field (`"temperature": {"value": 78.2, "unit": "C"}`) is one metric named by its path, read
/// like a tagged value. Reserved keys (device id, timestamp, ...) are skipped at every level;
/// arrays are not read. The recursion is bounded by `Limits::max_depth`, checked before parsing.
fn read_fields(
    prefix: &mut String,
    obj: &Map<String, Value>,
    push: &mut impl FnMut(&str, f64) -> Result<(), TelemetryError>,
) -> Result<(), TelemetryError> {
    for (key, v) in obj {
        if RESERVED_KEYS.contains(&key.as_str()) {
            continue;
        }
        match v {
            Value::Number(n) if prefix.is_empty() => {
                if let Some(x) = n.as_f64() {
                    push(key, x)?;
                }
            }
            Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    let len = prefix.len();
                    prefix.push_str(key);
                    let pushed = push(prefix, x);
                    prefix.truncate(len);
                    pushed?;
                }
            }
            Value::Object(inner) => {
                let len = prefix.len();
                prefix.push_str(key);
                let read = match inner.get("value") {
                    Some(value) => read_value(prefix, value, push),
                    None => {
                        prefix.push('.');
                        read_fields(prefix, inner, push)
                    }
                };
                prefix.truncate(len);
                read?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads the `value` of a tagged entry or of a `{"value": ...}` object as the metric `name`: a
/// number, or a string holding one (as some gateways send); a spelled-out NaN or infinity is an
/// error rather than silently dropped. Anything else is not a measurement and is skipped.
fn read_value(
    name: &str,
    value: &Value,
    push: &mut impl FnMut(&str, f64) -> Result<(), TelemetryError>,
) -> Result<(), TelemetryError> {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(v) => push(name, v),
            None => Ok(()),
        },
        Value::String(s) if is_non_finite_word(s) => {
            Err(TelemetryError::NonFinite(truncate(name, 64)))
        }
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(v) => push(name, v),
            Err(_) => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The likely reason a flat reading has no metric, for the error's text: a field holding a number
/// as a string (flat fields that are strings are descriptive, so they are not read as numbers),
/// or an array of numbers (arrays are not read). Empty when neither is there.
fn why_no_metrics(obj: &Map<String, Value>) -> String {
    let fields = || {
        obj.iter()
            .filter(|(key, _)| !RESERVED_KEYS.contains(&key.as_str()))
    };
    if let Some((key, _)) = fields().find(|(_, v)| {
        v.as_str()
            .is_some_and(|s| s.trim().parse::<f64>().is_ok_and(f64::is_finite))
    }) {
        return format!(
            " (field {:?} holds a number as a string: send it as a JSON number)",
            truncate(key, 64)
        );
    }
    if let Some((key, _)) = fields().find(|(_, v)| {
        v.as_array()
            .is_some_and(|items| items.first().is_some_and(Value::is_number))
    }) {
        return format!(
            " (field {:?} is an array: arrays are not read, send one number per metric)",
            truncate(key, 64)
        );
    }
    String::new()
}

fn is_non_finite_word(s: &str) -> bool {
    let t = s.trim().trim_start_matches(['+', '-']).to_ascii_lowercase();
    t == "nan" || t == "inf" || t == "infinity"
}

/// Reads a timestamp given as unix seconds, unix milliseconds or an RFC 3339 string.
fn parse_timestamp(v: &Value, now_ms: i64, limits: &Limits) -> Result<i64, TelemetryError> {
    let ms = match v {
        Value::Number(n) => {
            let x = n
                .as_f64()
                .ok_or_else(|| TelemetryError::BadTimestamp("not a number".into()))?;
            numeric_to_ms(x)?
        }
        Value::String(s) => {
            let t = s.trim();
            if let Ok(x) = t.parse::<f64>() {
                numeric_to_ms(x)?
            } else {
                parse_datetime_ms(t)
                    .ok_or_else(|| TelemetryError::BadTimestamp("unreadable date".into()))?
            }
        }
        _ => return Err(TelemetryError::BadTimestamp("wrong type".into())),
    };
    if ms < MIN_TIMESTAMP_MS {
        return Err(TelemetryError::BadTimestamp("before 2000".into()));
    }
    if ms > now_ms.saturating_add(limits.max_future_ms) {
        return Err(TelemetryError::BadTimestamp("too far in the future".into()));
    }
    Ok(ms)
}

fn numeric_to_ms(x: f64) -> Result<i64, TelemetryError> {
    if !x.is_finite() || x < 0.0 {
        return Err(TelemetryError::BadTimestamp("out of range".into()));
    }
    let (_, to_ms) = UNIT_STEPS
        .iter()
        .find(|(below, _)| x < *below)
        .ok_or_else(|| TelemetryError::BadTimestamp("out of range".into()))?;
    Ok((x * to_ms).round() as i64)
}

/// Days in month `m` (1-12) of year `y` in the proleptic Gregorian calendar.
fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DD[T| ]HH:MM[:SS[.fff]][Z|±HH:MM|±HHMM|±HH]` (RFC 3339, the common
/// space-separated variant and ISO 8601's other offset forms; no offset means UTC) into unix
/// milliseconds. Returns `None` for anything else, a day the month does not have included.
pub fn parse_datetime_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 16 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' {
        return None;
    }
    let (h, mi) = (num(11..13)?, num(14..16)?);
    let mut i = 16;
    let mut sec = 0i64;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b':') {
        sec = num(i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return None;
            }
            // Keep millisecond precision: pad or cut the fraction to three digits.
            let digits: String = s[start..i].chars().chain("000".chars()).take(3).collect();
            frac_ms = digits.parse().ok()?;
        }
    }
    let offset_min = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            // `+01:30`, `+0130` or `+01`.
            let minutes = match b.len() - i {
                6 if b[i + 3] == b':' => num(i + 4..i + 6)?,
                5 => num(i + 3..i + 5)?,
                3 => 0,
                _ => return None,
            };
            let off = num(i + 1..i + 3)? * 60 + minutes;
            if off > 18 * 60 || minutes > 59 {
                return None;
            }
            if sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 {
        return None;
    }
    if sec > 60 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + frac_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_734_512_000_000 + 3_600_000;

    fn p(payload: &str) -> Result<Vec<Reading>, TelemetryError> {
        parse("MOTOR-01", payload.as_bytes(), NOW, &Limits::default())
    }

    fn code(payload: &str) -> &'static str {
        match p(payload) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e.code(),
        }
    }

    #[test]
    fn flat_shape_seconds() {
        let r = p(r#"{"device_id":"MOTOR-01","temperature":78.2,"vibration":0.92,"current":15.3,"timestamp":1734512000}"#)
            .expect("valid");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_000);
        assert_eq!(r[0].metrics.len(), 3);
        assert!(r[0].metrics.contains(&("vibration".to_string(), 0.92)));
    }

    #[test]
    fn flat_shape_millis_iso_and_missing_timestamp() {
        let r = p(r#"{"deviceId":"MOTOR-01","t":1,"timestamp":1734512000123}"#).expect("ms");
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_123);
        let r = p(r#"{"t":1,"timestamp":"2024-12-18T08:53:20.5Z"}"#).expect("iso");
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_500);
        let r = p(r#"{"t":1,"timestamp":"2024-12-18T10:53:20+02:00"}"#).expect("offset");
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_000);
        let r = p(r#"{"t":1}"#).expect("no timestamp");
        assert_eq!(r[0].timestamp_ms, NOW);
        // Microseconds and nanoseconds, told apart by magnitude like seconds and milliseconds.
        let r = p(r#"{"t":1,"timestamp":1734512000123456}"#).expect("us");
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_123);
        let r = p(r#"{"t":1,"timestamp":1734512000123456789}"#).expect("ns");
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_123);
        let r = p(r#"{"t":1,"timestamp":"1734512000123456"}"#).expect("us as a string");
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_123);
    }

    #[test]
    fn iso_8601_offsets_and_calendar_days() {
        let at = Some(1_734_512_000_000);
        for s in [
            "2024-12-18T10:53:20+02:00",
            "2024-12-18T10:53:20+0200",
            "2024-12-18T10:53:20+02",
            "2024-12-18T07:23:20-01:30",
            "2024-12-18T07:23:20-0130",
            "2024-12-18 08:53:20z",
        ] {
            assert_eq!(parse_datetime_ms(s), at, "{s}");
        }
        assert_eq!(
            parse_datetime_ms("2024-12-18T10:53:20.250+0200"),
            Some(1_734_512_000_250)
        );
        for s in [
            "2024-12-18T10:53:20+2",
            "2024-12-18T10:53:20+020",
            "2024-12-18T10:53:20+02:0",
            "2024-12-18T10:53:20+02:60",
            "2024-12-18T10:53:20+19:00",
            "2024-12-18T10:53:20+02:00Z",
            "2023-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2024-04-31T00:00:00Z",
        ] {
            assert_eq!(parse_datetime_ms(s), None, "{s}");
        }
        assert!(parse_datetime_ms("2024-02-29T00:00:00Z").is_some());
        assert!(parse_datetime_ms("2000-02-29T00:00:00Z").is_some());
    }

    #[test]
    fn non_numeric_fields_are_not_metrics() {
        let r = p(r#"{"t":1.5,"status":"ok","x":"NaN","on":true,"nested":{"s":"a"},"v":[1,2]}"#)
            .expect("ok");
        assert_eq!(r[0].metrics, vec![("t".to_string(), 1.5)]);
    }

    #[test]
    fn nested_objects_are_read_with_dotted_names() {
        // Fields come in key order (serde_json's map is sorted).
        let names = |payload: &str| -> Vec<(String, f64)> {
            p(payload).expect("valid").swap_remove(0).metrics
        };
        let m = |pairs: &[(&str, f64)]| -> Vec<(String, f64)> {
            pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
        };
        assert_eq!(
            names(
                r#"{"device_id":"MOTOR-01","motor":{"temperature":78.2,"bearing":{"vibration":0.9}},"current":15.3}"#
            ),
            m(&[
                ("current", 15.3),
                ("motor.bearing.vibration", 0.9),
                ("motor.temperature", 78.2)
            ])
        );
        // An object with a `value` is one metric, read like a tagged value; its other fields
        // describe it.
        assert_eq!(
            names(
                r#"{"temperature":{"value":78.2,"unit":"C","timestamp":5},"pressure":{"value":"2.5"}}"#
            ),
            m(&[("pressure", 2.5), ("temperature", 78.2)])
        );
        // `values` and `data` objects are containers: their fields keep their names. The reserved
        // keys are skipped inside objects too.
        assert_eq!(
            names(r#"{"timestamp":1734512000,"values":{"temperature":78.2,"rpm":{"value":1500}}}"#),
            m(&[("rpm", 1500.0), ("temperature", 78.2)])
        );
        assert_eq!(
            names(r#"{"data":{"temperature":78.2,"device_id":"MOTOR-01","timestamp":1}}"#),
            m(&[("temperature", 78.2)])
        );
        // Limits and errors apply to the full names and to nested values.
        let long = "x".repeat(40);
        assert_eq!(
            code(&format!(r#"{{"{long}":{{"{long}":1}}}}"#)),
            "bad_metric_name"
        );
        assert_eq!(code(r#"{"t":{"value":"NaN"}}"#), "non_finite");
        let too_many: Vec<String> = (0..65).map(|i| format!(r#""m{i}":{i}"#)).collect();
        assert_eq!(
            code(&format!(r#"{{"a":{{{}}}}}"#, too_many.join(","))),
            "too_many_metrics"
        );
        assert_eq!(
            code(r#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}"#),
            "too_deep"
        );
    }

    #[test]
    fn a_number_beyond_the_range_of_a_float_is_non_finite() {
        let err = p(r#"{"temperature":1e400}"#).expect_err("out of range");
        assert_eq!(err.code(), "non_finite");
        assert_eq!(
            err.to_string(),
            "metric at line 1 column 20 is not a finite number"
        );
        assert_eq!(code(r#"{"temperature":-1e400}"#), "non_finite");
        assert_eq!(code(r#"{"temperature":1e40"#), "not_json");
    }

    #[test]
    fn tagged_shape() {
        let r = p(r#"{"deviceId":"MOTOR-01","timestamp":"2024-12-18 08:53:20","values":[{"tag":"temperature","value":42.5,"unit":"°C"},{"tag":"state","value":"RUN"}],"quality":"good"}"#)
            .expect("tagged");
        assert_eq!(r[0].metrics, vec![("temperature".to_string(), 42.5)]);
        assert_eq!(r[0].timestamp_ms, 1_734_512_000_000);
        // A tagged value written as a string is still a measurement.
        let r = p(r#"{"values":[{"tag":"t","value":" 42.5 "},{"tag":"u","value":"-1e3"}]}"#)
            .expect("string values");
        assert_eq!(
            r[0].metrics,
            vec![("t".to_string(), 42.5), ("u".to_string(), -1000.0)]
        );
    }

    #[test]
    fn a_reading_without_metrics_says_what_was_probably_meant() {
        let reason = |payload: &str| p(payload).expect_err("no metric").to_string();
        assert_eq!(
            reason(r#"{"status":"ok"}"#),
            "the reading contains no numeric metric"
        );
        assert_eq!(
            reason(r#"{"status":"ok","temperature":"78.2"}"#),
            "the reading contains no numeric metric (field \"temperature\" holds a number as a string: send it as a JSON number)"
        );
        assert_eq!(
            reason(r#"{"vibration":[0.1,0.2]}"#),
            "the reading contains no numeric metric (field \"vibration\" is an array: arrays are not read, send one number per metric)"
        );
        assert_eq!(code(r#"{"temperature":"78.2"}"#), "no_metrics");
        assert_eq!(code(r#"{"type":"batch","data":[]}"#), "no_metrics");
    }

    #[test]
    fn batch_shape() {
        let r = p(r#"{"type":"batch","data":[{"t":1,"timestamp":1734512000},{"values":[{"tag":"t","value":2}],"timestamp":1734512001}]}"#)
            .expect("batch");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].metrics, vec![("t".to_string(), 2.0)]);
        assert_eq!(code(r#"{"type":"batch"}"#), "bad_batch");
        assert_eq!(
            code(r#"{"type":"batch","data":[{"type":"batch","data":[]}]}"#),
            "bad_batch"
        );
        assert_eq!(code(r#"{"type":"batch","data":[1]}"#), "not_object");
        let limits = Limits {
            max_batch: 2,
            ..Limits::default()
        };
        let big = r#"{"type":"batch","data":[{"t":1},{"t":2},{"t":3}]}"#;
        let e = parse("MOTOR-01", big.as_bytes(), NOW, &limits).expect_err("too large");
        assert_eq!(e.code(), "batch_too_large");
    }

    #[test]
    fn each_error_has_its_code() {
        assert_eq!(code("{not json"), "not_json");
        assert_eq!(code("[1,2]"), "not_object");
        assert_eq!(code(r#"{"status":"ok"}"#), "no_metrics");
        assert_eq!(
            code(r#"{"values":[{"tag":"t","value":"NaN"}]}"#),
            "non_finite"
        );
        assert_eq!(code(r#"{"t":1,"timestamp":86400}"#), "bad_timestamp");
        assert_eq!(code(r#"{"t":1,"timestamp":"yesterday"}"#), "bad_timestamp");
        assert_eq!(code(r#"{"t":1,"timestamp":4102444800}"#), "bad_timestamp");
        assert_eq!(code(r#"{"t":1,"timestamp":true}"#), "bad_timestamp");
        assert_eq!(code(r#"{"t":1,"timestamp":1e20}"#), "bad_timestamp");
        assert_eq!(code(r#"{"t":1,"timestamp":-1734512000}"#), "bad_timestamp");
        assert_eq!(
            code(r#"{"t":1,"timestamp":"2023-02-29T00:00:00Z"}"#),
            "bad_timestamp"
        );
        assert_eq!(code(r#"{"device_id":"MOTOR-02","t":1}"#), "device_mismatch");
        assert_eq!(code(r#"{"deviceId":7,"t":1}"#), "device_mismatch");
        assert_eq!(code(r#"{"":1}"#), "bad_metric_name");
        assert_eq!(code(&"[".repeat(100)), "too_deep");
        let many: Vec<String> = (0..65).map(|i| format!("\"m{i}\":{i}")).collect();
        assert_eq!(code(&format!("{{{}}}", many.join(","))), "too_many_metrics");
        let big = format!(r#"{{"t":1,"pad":"{}"}}"#, "x".repeat(70_000));
        assert_eq!(code(&big), "payload_too_large");
    }

    #[test]
    fn never_panics_on_garbage() {
        let samples: [&[u8]; 8] = [
            b"",
            b"\xff\xfe",
            b"null",
            b"{\"timestamp\":1e308,\"t\":1}",
            b"{\"t\":1e400}",
            b"{\"timestamp\":\"2024-13-45T99:99:99Z\",\"t\":1}",
            b"{\"timestamp\":\"2024-01-01T00:00:00.Z\",\"t\":1}",
            b"{\"values\":[null,{\"tag\":5,\"value\":1},{\"name\":\"a\",\"value\":1}]}",
        ];
        for s in samples {
            let _ = parse("MOTOR-01", s, NOW, &Limits::default());
        }
    }

    #[test]
    fn topic_and_datetime_helpers() {
        assert_eq!(device_id_from_topic("device/a-1/telemetry"), Some("a-1"));
        assert_eq!(device_id_from_topic("device//telemetry"), None);
        assert_eq!(device_id_from_topic("device/a/b/telemetry"), None);
        assert_eq!(device_id_from_topic("devices/a/telemetry"), None);
        assert_eq!(device_id_from_topic("device/a/xtelemetry"), None);
        assert_eq!(device_id_from("device/a-1/status", "status"), Some("a-1"));
        assert_eq!(device_id_from("device/a-1/status", "telemetry"), None);
        assert_eq!(device_id_from("device/+/status", "status"), None);
        assert_eq!(parse_datetime_ms("1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_datetime_ms("2000-01-01T00:00:00Z"),
            Some(MIN_TIMESTAMP_MS)
        );
        assert_eq!(
            parse_datetime_ms("2014-04-10 07:15:00.000000"),
            parse_datetime_ms("2014-04-10T07:15:00Z")
        );
        assert_eq!(parse_datetime_ms("2014-04-10"), None);
    }
}
