//! The analytics task's telemetry parser (`vigil_analytics::telemetry::parse`), which reads
//! every payload a device publishes to `device/<id>/telemetry`.
//!
//! Nothing may panic, and an accepted payload must respect the limits the detectors rely on:
//! at least one reading, at most `max_batch`; each with 1..=`max_metrics` distinct metric names
//! of 1..=`max_name_len` bytes without control characters, finite values, and a timestamp in
//! [2000-01-01, now + `max_future_ms`]. The RFC 3339 reader is also fed the raw text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_analytics::telemetry::{self, Limits, MIN_TIMESTAMP_MS};

/// 2023-11-14T22:13:20Z, a fixed receive time.
const NOW_MS: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let device = telemetry::device_id_from_topic("device/pump-1/telemetry").unwrap();
    assert_eq!(device, "pump-1");
    match telemetry::parse(device, data, NOW_MS, &limits) {
        Ok(readings) => {
            assert!(!readings.is_empty() && readings.len() <= limits.max_batch);
            for r in &readings {
                assert!(
                    r.timestamp_ms >= MIN_TIMESTAMP_MS
                        && r.timestamp_ms <= NOW_MS + limits.max_future_ms,
                    "timestamp {} out of range",
                    r.timestamp_ms
                );
                assert!(!r.metrics.is_empty() && r.metrics.len() <= limits.max_metrics);
                for (i, (name, value)) in r.metrics.iter().enumerate() {
                    assert!(!name.is_empty() && name.len() <= limits.max_name_len);
                    assert!(!name.chars().any(char::is_control));
                    assert!(value.is_finite());
                    assert!(r.metrics[..i].iter().all(|(n, _)| n != name), "duplicate {name}");
                }
            }
        }
        Err(e) => {
            let _ = (e.code(), e.to_string());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = telemetry::parse_datetime_ms(text);
        if let Some(id) = telemetry::device_id_from_topic(text) {
            assert!(!id.is_empty() && !id.contains(['/', '+', '#']));
        }
    }
});
