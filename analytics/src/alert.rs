//! Serde types for the messages vigil publishes on `device/<id>/alerts` and `device/<id>/predictions`.
//!
//! The field names and enum spellings here are the wire format that dashboards and downstream
//! consumers parse, so they are pinned by tests.

use serde::{Deserialize, Serialize};

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    /// Unusual but probably harmless.
    Low,
    /// Worth a look.
    Medium,
    /// Needs attention soon.
    High,
    /// Needs attention now.
    Critical,
}

impl Severity {
    /// The wire spelling (`"LOW"` … `"CRITICAL"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "LOW",
            Self::Medium => "MEDIUM",
            Self::High => "HIGH",
            Self::Critical => "CRITICAL",
        }
    }
}

/// What raised an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// The streaming anomaly detector.
    Anomaly,
    /// A configured hard limit was crossed.
    Threshold,
    /// The trend forecast predicts a limit crossing soon.
    Forecast,
}

/// The message type tag; always `"ALERT"` on the alerts topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertTag {
    /// Serialised as `"ALERT"`.
    #[serde(rename = "ALERT")]
    Alert,
}

/// Message published on `device/<id>/alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertMessage {
    /// Always `"ALERT"`.
    #[serde(rename = "type")]
    pub kind_tag: AlertTag,
    /// The device the alert is about.
    pub device_id: String,
    /// Urgency.
    pub severity: Severity,
    /// What raised it.
    pub kind: AlertKind,
    /// The metric concerned.
    pub metric: String,
    /// The metric's value at the time of the alert.
    pub value: f64,
    /// Anomaly score in 0..1 (1 for threshold alerts).
    pub score: f64,
    /// Human-readable description.
    pub message: String,
    /// Suggested action for the operator.
    pub action: String,
    /// Unix time in milliseconds of the reading that raised the alert.
    pub timestamp: i64,
    /// Cross-metric anomalies only: the value the device's other metrics predict for `metric`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<f64>,
    /// Cross-metric anomalies only: other metrics whose change would explain the readings as
    /// well as a change of `metric` (they move in proportion with it); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<String>,
}

impl AlertMessage {
    /// Builds an alert with the `"ALERT"` tag filled in.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device_id: &str,
        severity: Severity,
        kind: AlertKind,
        metric: &str,
        value: f64,
        score: f64,
        message: String,
        timestamp: i64,
    ) -> Self {
        Self {
            kind_tag: AlertTag::Alert,
            device_id: device_id.to_string(),
            severity,
            kind,
            metric: metric.to_string(),
            value,
            score,
            message,
            action: suggested_action(kind, severity).to_string(),
            timestamp,
            expected: None,
            alternatives: Vec::new(),
        }
    }
}

/// A default operator action per kind and severity, so every alert says what to do next.
pub fn suggested_action(kind: AlertKind, severity: Severity) -> &'static str {
    match (kind, severity) {
        (_, Severity::Critical) => "stop the equipment and inspect it now",
        (AlertKind::Threshold, _) => "reduce load and inspect the equipment",
        (AlertKind::Forecast, _) => "schedule maintenance before the limit is reached",
        (AlertKind::Anomaly, Severity::High) => "inspect the equipment soon",
        (AlertKind::Anomaly, _) => "check the recent readings for this metric",
    }
}

/// A duration for people: seconds below 90 s, minutes below 90 min, hours below 48 h, else days.
pub fn duration_text(secs: f64) -> String {
    match secs {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}

/// Direction of a metric's recent trend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trend {
    /// Increasing.
    Rising,
    /// Decreasing.
    Falling,
    /// No significant slope.
    Stable,
}

/// Message published on `device/<id>/predictions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionMessage {
    /// Always `"PREDICTION"`.
    #[serde(rename = "type")]
    pub kind_tag: String,
    /// The device the prediction is about.
    pub device_id: String,
    /// The metric concerned.
    pub metric: String,
    /// Trend direction.
    pub trend: Trend,
    /// Fitted slope in metric units per second.
    pub slope: f64,
    /// Seconds until the configured limit is crossed, if the trend approaches it.
    pub seconds_to_limit: Option<f64>,
    /// Confidence in 0..1.
    pub confidence: f64,
    /// The trend line's value at `timestamp` (with `slope`, the whole line, for charts).
    pub fitted: f64,
    /// The highest anomaly score (0..1) of the metric's readings since the previous
    /// prediction, for an anomaly-score plot at the prediction rate.
    pub anomaly_score: f64,
    /// Unix time in milliseconds of the newest reading used.
    pub timestamp: i64,
}

/// Remaining-useful-life estimate published on `device/<id>/predictions` beside the per-metric
/// trend predictions, for devices that have a RUL model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulMessage {
    /// Always `"RUL"`.
    #[serde(rename = "type")]
    pub kind_tag: String,
    /// The device the estimate is about.
    pub device_id: String,
    /// Estimated operating cycles left before failure, one cycle being one reading of the
    /// device (as one row of the training histories); at most `cap`.
    pub remaining_cycles: f64,
    /// `remaining_cycles` in seconds at the device's usual pace (the median interval between
    /// readings of the model's metrics, as the anomaly detector measures it); `None` until it
    /// is known.
    pub remaining_seconds: Option<f64>,
    /// The model's cap: an estimate at the cap means "no wear visible yet".
    pub cap: f64,
    /// Readings of the device the model has taken since vigil started tracking it.
    pub readings: u64,
    /// Unix time in milliseconds of the newest reading used.
    pub timestamp: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_for_people() {
        assert_eq!(duration_text(59.6), "60 s");
        assert_eq!(duration_text(90.0), "2 min");
        assert_eq!(duration_text(5400.0), "1.5 h");
        assert_eq!(duration_text(3.0 * 86_400.0), "3.0 days");
    }

    #[test]
    fn alert_wire_format() {
        let a = AlertMessage::new(
            "MOTOR-01",
            Severity::High,
            AlertKind::Anomaly,
            "temperature",
            91.5,
            0.99,
            "temperature is anomalous".into(),
            1_734_512_000_000,
        );
        let v: serde_json::Value = serde_json::to_value(&a).expect("serialise");
        assert_eq!(v["type"], "ALERT");
        assert_eq!(v["severity"], "HIGH");
        assert_eq!(v["kind"], "anomaly");
        assert_eq!(v["device_id"], "MOTOR-01");
        assert_eq!(v["timestamp"], 1_734_512_000_000i64);
        let back: AlertMessage = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, a);
        assert!(Severity::Critical > Severity::Low);
        assert_eq!(Severity::Medium.as_str(), "MEDIUM");
    }

    #[test]
    fn prediction_wire_format() {
        let p = PredictionMessage {
            kind_tag: "PREDICTION".into(),
            device_id: "MOTOR-01".into(),
            metric: "temperature".into(),
            trend: Trend::Rising,
            slope: 0.01,
            seconds_to_limit: None,
            confidence: 0.8,
            fitted: 71.5,
            anomaly_score: 0.25,
            timestamp: 1,
        };
        let v: serde_json::Value = serde_json::to_value(&p).expect("serialise");
        assert_eq!(v["trend"], "rising");
        assert!(v["seconds_to_limit"].is_null());
        assert_eq!(v["fitted"], 71.5);
        assert_eq!(v["anomaly_score"], 0.25);
    }
}
