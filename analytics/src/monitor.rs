//! Per-device facade for the live service: anomaly detection, limit checks and trend forecasts
//! in one object, producing ready-to-publish alert and prediction messages.
//!
//! The broker keeps one `DeviceMonitor` per device, feeds it every parsed `Reading`, publishes
//! the returned messages, and runs the refit jobs it hands out on a worker of its choice. Each
//! source of alerts is debounced on its own: an anomaly alert opens an incident (see
//! `detector`), a threshold alert fires when a metric enters the unsafe side of its limit, and a
//! forecast alert when the trend predicts a crossing within `forecast_alert_horizon_s`. Both
//! re-arm only after their condition has been clear for `rearm_after` readings of the metric
//! and `rearm_after_s` seconds (5 minutes), so a value hovering at its limit, or spikes
//! crossing it, give one alert, not one per crossing, however often the device reports. While a
//! metric's threshold alert stands (fired, not re-armed), its forecast latch counts as fired
//! too: once the limit has been crossed, "predicted to reach its limit" is not news.
//!
//! Trends follow time, not the reporting rate: readings less than `trend_min_spacing_ms`
//! (1 s) apart by the device's time stamps are averaged into one trend point, and a prediction
//! is published every `prediction_every` points, so a device reporting 10 times a second gets
//! a trend over two minutes and a prediction every 10 s, as one reporting once a second does.
//! Readings without the device's time stamp are each a point.
//!
//! One setting, off by default, adapts the anomaly detector to devices that report faster than
//! once a second: with `score_min_spacing_ms`, it scores each metric at most about once per
//! that many ms of the device's time stamps (limits and trends still see every reading), so its
//! memory of about 1,000 scored readings spans a quarter of an hour however fast a device
//! reports. Off, every reading is scored, as a stream replayed in a burst with real time stamps
//! needs: with it on, such a stream is mostly skipped.
//!
//! A machine slowing to a stop looks like an incident to the anomaly detector for the seconds
//! before it stands: vibration and current fall faster than any load change. So once the
//! machine's rest is learned (`rest`), an anomaly alert on a metric of that rest, raised while
//! it and the rest's other metrics all lie on the rest's side of their usual running levels or
//! fall towards it (`RestGate::heading_to_rest`), is
//! held for `STOP_HOLD_MS` (2 minutes): withdrawn if the machine stands within that time (a
//! stop, counted in `MonitorOutput::withdrawn`), published with its own time stamp otherwise.
//! At most `MAX_HELD` alerts are held; a device that goes silent gets its held alerts back from
//! `DeviceMonitor::take_held`. Alerts away from the rest (a vibration rising) are never held.
//!
//! A device may also carry a remaining-useful-life model (`DeviceMonitor::set_rul`): every
//! `prediction_every` readings that carry its metrics it estimates the cycles left, and raises
//! one forecast alert when the estimate falls to `alert_below`, latched like the others.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::alert::{
    duration_text, AlertKind, AlertMessage, PredictionMessage, RulMessage, Severity,
};
use crate::detector::{
    DetectorConfig, DetectorError, DeviceDetector, MetricOutcome, RefitJob, TrainedModel,
};
use crate::forecast::{Limit, TrendTracker};
use crate::rest::{settled, RestConfig, RestGate};
use crate::rul::{RulModel, RulTracker};
use crate::telemetry::{secs_to_ms, Reading};

/// Errors of the monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The monitor's own settings are inconsistent.
    #[error("invalid monitor configuration: {0}")]
    InvalidConfig(&'static str),
    /// The embedded detector configuration was rejected.
    #[error(transparent)]
    Detector(#[from] DetectorError),
}

/// A configured safety limit of one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricLimit {
    /// Metric name as it appears in telemetry.
    pub metric: String,
    /// Alarm at or above this value.
    #[serde(default)]
    pub above: Option<f64>,
    /// Alarm at or below this value.
    #[serde(default)]
    pub below: Option<f64>,
}

impl MetricLimit {
    /// The limit used for forecasting: the upper one if set, else the lower one.
    fn forecast_limit(&self) -> Option<Limit> {
        self.above
            .map(Limit::Above)
            .or_else(|| self.below.map(Limit::Below))
    }

    fn violated(&self, v: f64) -> bool {
        self.above.is_some_and(|a| v >= a) || self.below.is_some_and(|b| v <= b)
    }
}

/// Safety limits for the devices whose id matches `devices`, a pattern in which `*` stands for
/// any run of characters (none included) and `?` for exactly one; every other character stands
/// for itself (`MOTOR-*`, `plc-1??`, `*-north`, or an exact id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceLimits {
    /// Which devices: a pattern over the device id.
    pub devices: String,
    /// Their limits, per metric.
    pub limits: Vec<MetricLimit>,
}

/// A machine's running condition, for the devices whose id matches `devices`: the machine runs
/// while `metric` is above `above` and below `below` (either may be absent). While it stands,
/// and for `settle_secs` after it starts again, the anomaly detector is not fed and no forecast
/// alert is raised (limits, predictions and history still see every reading); when feeding
/// resumes the detector starts a new segment (`DeviceDetector::resume`) and the trends start
/// afresh, so a daily stop and start is not an incident. A reading without `metric` keeps the
/// state of the last one that had it; until one has, the machine counts as running. A machine
/// first seen running is settling from that reading on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningRule {
    /// Which devices: a pattern over the device id, as for [`DeviceLimits`].
    pub devices: String,
    /// The metric that tells whether the machine runs.
    pub metric: String,
    /// The machine runs while the metric is above this ...
    #[serde(default)]
    pub above: Option<f64>,
    /// ... and below this.
    #[serde(default)]
    pub below: Option<f64>,
    /// Seconds after a start (of the readings' time) before the detector is fed again.
    #[serde(default)]
    pub settle_secs: u64,
}

impl RunningRule {
    /// Checks the rule's own settings (not its device pattern).
    pub fn validate(&self) -> Result<(), MonitorError> {
        let finite = |b: Option<f64>| b.map_or(true, f64::is_finite);
        if self.metric.is_empty()
            || (self.above.is_none() && self.below.is_none())
            || !finite(self.above)
            || !finite(self.below)
            || self.settle_secs > 86_400
        {
            return Err(MonitorError::InvalidConfig(
                "a running rule needs a metric, a finite above or below (or both), and \
                 settle_secs of at most 86400",
            ));
        }
        Ok(())
    }

    fn runs(&self, value: f64) -> bool {
        self.above.map_or(true, |a| value > a) && self.below.map_or(true, |b| value < b)
    }
}

/// A device's running condition and where it stands.
#[derive(Debug, Clone)]
struct Gate {
    rule: RunningRule,
    running: bool,
    /// When the machine last started to run (the first reading that held the condition).
    since_ms: Option<i64>,
}

impl Gate {
    /// Updates the state with `reading`; whether the detector is to be fed with it.
    fn admits(&mut self, reading: &Reading) -> bool {
        let ts = reading.timestamp_ms;
        if let Some((_, v)) = reading.metrics.iter().find(|(n, _)| *n == self.rule.metric) {
            let runs = self.rule.runs(*v);
            if runs && (!self.running || self.since_ms.is_none()) {
                self.since_ms = Some(ts);
            }
            self.running = runs;
        }
        self.running && settled(self.since_ms, ts, self.rule.settle_secs)
    }
}

/// Whether `id` matches `pattern` (see [`DeviceLimits`]). Linear in their lengths times the
/// pattern's `*`s at worst; runs once per device, when its monitor is created.
pub fn device_matches(pattern: &str, id: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = id.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen and the text position it is currently taken to end at.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again from there.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    pi = sp + 1;
                    ti = st + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Settings of a `DeviceMonitor`; every field is optional when deserialising.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Streaming anomaly detector settings.
    pub detector: DetectorConfig,
    /// Safety limits per metric, for every device.
    pub limits: Vec<MetricLimit>,
    /// Limits for the devices whose id matches a pattern. For each metric, the first entry
    /// (in order) that matches the device and names the metric sets its limit, in place of
    /// `limits`; a metric none of them names keeps its entry in `limits`.
    pub device_limits: Vec<DeviceLimits>,
    /// Points kept per metric for the trend fit.
    pub trend_capacity: usize,
    /// A prediction message is produced every this many readings of a metric.
    pub prediction_every: usize,
    /// Forecast alerts fire when a limit is predicted within this many seconds.
    pub forecast_alert_horizon_s: f64,
    /// Forecast alerts need at least this confidence (R² of the trend).
    pub forecast_min_confidence: f64,
    /// Forecast alerts need a trend fitted to at least this many points. A line through few
    /// noisy points often explains much of their variation by chance: with 10 points, an R²
    /// of 0.5 comes from noise alone in about 2% of fits; with 30, in about 1 in 100,000.
    /// Predictions are published from the first 10 points all the same, with their confidence.
    /// At most `trend_capacity` counts.
    pub forecast_min_points: usize,
    /// Forecast alerts need the limit to be at most this many times the fitted points' time
    /// span away (0: no such bound). A line through two minutes of readings says little about
    /// the next hour: on a healthy machine whose load cycles every 10 minutes, the rising half
    /// of each cycle, or a temperature warming up after a start towards its usual level, was
    /// extrapolated to the limit "in 3,000 s" and raised a forecast alert every few cycles.
    pub forecast_max_extrapolation: f64,
    /// Threshold and forecast alerts re-arm after their condition has been clear for this many
    /// consecutive readings of the metric ...
    pub rearm_after: u64,
    /// ... and for at least this many seconds since it last held (by the readings' time stamps):
    /// 30 readings of a 20-per-second sensor pass in 1.5 s, and vibration wobbling across its
    /// limit gave a threshold alert per wobble; with 30 s, a wearing bearing whose vibration
    /// spikes crossed the limit a minute or two apart gave a threshold alert per spike.
    pub rearm_after_s: u64,
    /// Readings less than this many ms apart (by the device's time stamps) are averaged into
    /// one trend point (1000 by default; 0: every reading is a point); the trend holds
    /// `trend_capacity` points.
    pub trend_min_spacing_ms: i64,
    /// The detector scores a metric's reading only when it comes at least 90% of this many ms
    /// after the metric's last scored one (0, the default: every reading). Its windows count
    /// scored readings: at 0, a metric reported 20 times a second is judged against under a
    /// minute of its past, and a healthy one raised false alarms every half hour.
    pub score_min_spacing_ms: i64,
    /// Running conditions per device pattern; the first matching one applies (none: the
    /// detector is fed every reading, or gated on the machine's learned rest, below).
    pub running: Vec<RunningRule>,
    /// How a device without a running condition learns its machine's rest (`rest::RestGate`):
    /// while it stands, and for `settle_secs` after it starts, the detector is not fed, as with
    /// a running condition.
    pub rest: RestConfig,
}

impl MonitorConfig {
    /// The limits that apply to `device_id`: per metric, the first matching `device_limits`
    /// entry that names it, else its entry in `limits`.
    pub fn limits_of(&self, device_id: &str) -> Vec<MetricLimit> {
        let mut out: Vec<MetricLimit> = Vec::new();
        let matching = self
            .device_limits
            .iter()
            .filter(|d| device_matches(&d.devices, device_id));
        for limit in matching.flat_map(|d| &d.limits).chain(&self.limits) {
            if !out.iter().any(|l| l.metric == limit.metric) {
                out.push(limit.clone());
            }
        }
        out
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            detector: DetectorConfig::default(),
            limits: Vec::new(),
            device_limits: Vec::new(),
            trend_capacity: 120,
            prediction_every: 10,
            forecast_alert_horizon_s: 3600.0,
            forecast_min_confidence: 0.5,
            forecast_min_points: 30,
            forecast_max_extrapolation: 4.0,
            rearm_after: 30,
            rearm_after_s: 300,
            trend_min_spacing_ms: 1000,
            score_min_spacing_ms: 0,
            running: Vec::new(),
            rest: RestConfig::default(),
        }
    }
}

/// The `metric` of remaining-useful-life alerts.
pub const RUL_METRIC: &str = "remaining_useful_life";

/// How long an anomaly alert that may be a stop is held (module docs): a machine's spin-down
/// takes up to about this long to reach its rest (`shift_stop --ramp 120`).
pub const STOP_HOLD_MS: i64 = 120_000;
/// Alerts held at most per device; beyond this they are published at once.
pub const MAX_HELD: usize = 8;

/// Per-metric state besides the anomaly detector.
#[derive(Debug, Clone)]
struct MetricState {
    name: String,
    trend: TrendTracker,
    /// Readings of the metric.
    seen: u64,
    /// Trend points started (readings, for a metric reported at most once a second).
    points: u64,
    /// Time stamp of the metric's last reading the detector scored.
    last_scored_ms: Option<i64>,
    over_limit: Latch,
    forecast: Latch,
    /// Highest anomaly score since the last prediction.
    score_max: f64,
}

/// Debounce of an alert raised by a condition (a limit crossed, a crossing forecast): it fires
/// when the condition starts and re-arms once the condition has been clear for `rearm_after`
/// readings in a row and for `rearm_after_s` seconds.
#[derive(Debug, Clone, Default)]
struct Latch {
    fired: bool,
    /// Reading count at which the condition was first seen clear after firing.
    clear_since: Option<u64>,
    /// Time of the last reading at which the condition held.
    last_held_ms: i64,
}

impl Latch {
    /// Updates the latch with the condition at reading `seen`, time `now_ms`; true if an alert
    /// fires now.
    fn fires(&mut self, condition: bool, seen: u64, now_ms: i64, cfg: &MonitorConfig) -> bool {
        if condition {
            self.clear_since = None;
            self.last_held_ms = now_ms;
            let fire = !self.fired;
            self.fired = true;
            return fire;
        }
        if self.fired {
            let since = *self.clear_since.get_or_insert(seen);
            // The reading at `since` is the first clear one.
            let readings = seen.saturating_sub(since) + 1 >= cfg.rearm_after;
            let rearm_ms = secs_to_ms(cfg.rearm_after_s);
            // A reading older than the last one that held (a device clock set back) cannot
            // tell how long the condition has been clear: the readings decide alone.
            let elapsed = now_ms.saturating_sub(self.last_held_ms);
            if readings && (elapsed >= rearm_ms || elapsed < 0) {
                self.fired = false;
                self.clear_since = None;
            }
        }
        false
    }

    /// Counts the condition as holding at `now_ms` without firing: the latch stays (or becomes)
    /// fired and starts its clear spell again.
    fn hold(&mut self, now_ms: i64) {
        self.fired = true;
        self.clear_since = None;
        self.last_held_ms = now_ms;
    }
}

/// Everything one reading produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonitorOutput {
    /// Per-metric anomaly verdicts (scores for dashboards).
    pub outcomes: Vec<MetricOutcome>,
    /// Alerts to publish on `device/<id>/alerts`.
    pub alerts: Vec<AlertMessage>,
    /// Predictions to publish on `device/<id>/predictions`.
    pub predictions: Vec<PredictionMessage>,
    /// A remaining-useful-life estimate to publish on `device/<id>/predictions`.
    pub rul: Option<RulMessage>,
    /// The reading taught the monitor a rest of the machine (`rest::RestGate`): it stands now.
    pub rest_learned: bool,
    /// Held anomaly alerts withdrawn because the machine came to rest (module docs).
    pub withdrawn: usize,
}

impl MonitorOutput {
    /// Metric values the reading carried and the detector scored (the outcomes of metrics
    /// that went missing from it are not values of this reading).
    pub fn scored_points(&self) -> usize {
        self.outcomes.iter().filter(|o| o.missing.is_none()).count()
    }
}

/// A device's remaining-useful-life model and the alert latched on it.
#[derive(Debug, Clone)]
struct RulWatch {
    tracker: RulTracker,
    /// Alert when the estimate is at or below this many cycles (0: never).
    alert_below: f64,
    low: Latch,
}

/// Analytics state of one device.
#[derive(Debug, Clone)]
pub struct DeviceMonitor {
    device_id: String,
    config: MonitorConfig,
    detector: DeviceDetector,
    metrics: Vec<MetricState>,
    rul: Option<RulWatch>,
    gate: Option<Gate>,
    /// The learned running condition, for a device no running rule names.
    rest: Option<RestGate>,
    /// Whether readings have been withheld from the detector since it was last fed.
    paused: bool,
    /// Anomaly alerts that may be the machine stopping, oldest first (module docs; at most
    /// `MAX_HELD`).
    held: Vec<AlertMessage>,
}

impl DeviceMonitor {
    /// Creates the monitor of `device_id` after validating `config`. The device's limits are
    /// resolved now (`MonitorConfig::device_limits`); the monitor keeps only its own.
    pub fn new(device_id: &str, mut config: MonitorConfig) -> Result<Self, MonitorError> {
        if config.trend_capacity < 3 || config.prediction_every == 0 {
            return Err(MonitorError::InvalidConfig(
                "trend_capacity must be at least 3 and prediction_every positive",
            ));
        }
        let x = config.forecast_max_extrapolation;
        if !(x.is_finite() && x >= 0.0) {
            return Err(MonitorError::InvalidConfig(
                "forecast_max_extrapolation must be 0 (off) or a positive number",
            ));
        }
        for rule in &config.running {
            rule.validate()?;
        }
        config.limits = config.limits_of(device_id);
        config.device_limits = Vec::new();
        let gate = config
            .running
            .iter()
            .find(|r| device_matches(&r.devices, device_id))
            .map(|rule| Gate {
                rule: rule.clone(),
                running: true,
                since_ms: None,
            });
        config.running = Vec::new();
        let rest = (gate.is_none() && config.rest.after_secs > 0)
            .then(|| RestGate::new(config.rest, config.detector.max_metrics));
        Ok(Self {
            device_id: device_id.to_string(),
            detector: DeviceDetector::new(config.detector.clone())?,
            config,
            metrics: Vec::new(),
            rul: None,
            gate,
            rest,
            paused: false,
            held: Vec::new(),
        })
    }

    /// Gives the device a remaining-useful-life model: from now on its readings feed it, and an
    /// estimate at or below `alert_below` cycles raises a forecast alert (0 or less: never).
    pub fn set_rul(&mut self, model: Arc<RulModel>, alert_below: f64) {
        self.rul = Some(RulWatch {
            tracker: RulTracker::new(model),
            alert_below,
            low: Latch::default(),
        });
    }

    /// The device this monitor belongs to.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Upper bound of this monitor's memory: the detector's bound plus the trend buffers.
    pub fn memory_bound_bytes(&self) -> usize {
        let d = &self.config.detector;
        d.bytes_per_device()
            + d.max_metrics * (self.config.trend_capacity * 16 + 128)
            + self.rul.as_ref().map_or(0, |w| w.tracker.bytes())
            + self
                .rest
                .as_ref()
                .map_or(0, |_| RestGate::bytes(d.max_metrics) + Self::held_bytes())
    }

    /// Upper bound of the held alerts' memory (`MAX_HELD`), the device id aside: each is the
    /// message and its texts, at most 1.5 KiB (about 250 bytes of fixed text; a cross-metric
    /// alert names up to `MAX_JOINT` metrics of at most 64 bytes, and its rivals again).
    fn held_bytes() -> usize {
        MAX_HELD * (std::mem::size_of::<AlertMessage>() + 1536)
    }

    /// Which metrics of a reading at `ts` the detector scores (bit `i` for `reading.metrics[i]`;
    /// all of them beyond the 64th), and how many: those never scored, or last scored at least
    /// 90% of `score_min_spacing_ms` before `ts` (or after it: a device clock set back). All of
    /// them when the time is the receive time (`Reading::device_time` false): readings sent in a
    /// burst without time stamps are not readings a few ms apart.
    fn due_for_scoring(&self, reading: &Reading) -> (u64, usize) {
        let spacing = self.config.score_min_spacing_ms;
        let n = reading.metrics.len();
        if spacing <= 0 || n > 64 || !reading.device_time {
            return (u64::MAX, n);
        }
        let gap = spacing - spacing / 10;
        let ts = reading.timestamp_ms;
        let mut mask = 0u64;
        for (i, (name, _)) in reading.metrics.iter().enumerate() {
            let last = self
                .metrics
                .iter()
                .find(|m| &m.name == name)
                .and_then(|m| m.last_scored_ms);
            if last.map_or(true, |last| ts < last || ts - last >= gap) {
                mask |= 1 << i;
            }
        }
        (mask, mask.count_ones() as usize)
    }

    /// Withdraws the held alerts if the machine stands now, or moves those held for
    /// `STOP_HOLD_MS` by `ts` (or stamped after it: a clock set back) to `out`.
    fn settle_held(&mut self, ts: i64, out: &mut MonitorOutput) {
        if self.held.is_empty() {
            return;
        }
        if self.rest.as_ref().is_some_and(RestGate::resting) {
            out.withdrawn = self.held.len();
            self.held.clear();
            return;
        }
        let due = |a: &AlertMessage| ts < a.timestamp || ts - a.timestamp >= STOP_HOLD_MS;
        let n = self.held.iter().take_while(|a| due(a)).count();
        out.alerts.extend(self.held.drain(..n));
    }

    /// Whether `alert` is to be held: an anomaly of a metric of the machine's rest while the
    /// machine may be spinning down to it (module docs).
    fn holds(&self, alert: &AlertMessage) -> bool {
        alert.kind == AlertKind::Anomaly
            && self.held.len() < MAX_HELD
            && self
                .rest
                .as_ref()
                .is_some_and(|r| r.heading_to_rest(&alert.metric))
    }

    /// The alerts held now, published by the caller: for a device that went silent while the
    /// machine may have been stopping (a machine that stopped goes on reporting its rest).
    pub fn take_held(&mut self) -> Vec<AlertMessage> {
        std::mem::take(&mut self.held)
    }

    /// Whether any alert is held now.
    pub fn holds_alerts(&self) -> bool {
        !self.held.is_empty()
    }

    /// Feeds one reading and returns the scores, alerts and predictions it produced.
    pub fn ingest(&mut self, reading: &Reading) -> MonitorOutput {
        let (mut due, mut count) = self.due_for_scoring(reading);
        // Whether the machine stands or settles (its running condition does not admit the
        // reading): no anomaly scoring and no forecast alert then.
        let (mut rest_learned, mut restart) = (false, false);
        let admits = match (&mut self.gate, &mut self.rest) {
            (Some(gate), _) => gate.admits(reading),
            (None, Some(rest)) => {
                let before = (rest.learned(), rest.restarts());
                let admits = rest.admits(reading);
                rest_learned = rest.learned() > before.0;
                restart = rest.restarts() > before.1;
                admits
            }
            (None, None) => true,
        };
        // The detector was fed the machine's rest as if it were running (for `after_secs`, or
        // all along when the machine was first seen standing and now starts): it starts over,
        // to learn the running machine alone. Without this a slow bearing wear on the third
        // day was found only by the vibration limit on 2 of 8 seeds (`shift_stop --wear-at
        // 58`, analytics/README "A machine's rest, learned").
        if restart {
            self.detector.restart();
        }
        let standing = !admits;
        if standing {
            self.paused = true;
            (due, count) = (0, 0);
        } else if self.paused {
            self.paused = false;
            // A machine that was on its way down and ran on at a lower level did not stop
            // (`RestGate::ran_on`): the detector carries on and judges the new level.
            if !self.rest.as_ref().is_some_and(RestGate::ran_on) {
                self.detector.resume(Some(reading.timestamp_ms));
                // A trend across a stop and a start (zeros, then a step) is no trend.
                for state in &mut self.metrics {
                    state.trend = TrendTracker::new(self.config.trend_capacity);
                }
            }
        }
        let outcomes = if count == reading.metrics.len() {
            self.detector.feed(reading)
        } else if count == 0 {
            Vec::new()
        } else {
            let metrics = reading
                .metrics
                .iter()
                .enumerate()
                .filter(|(i, _)| due >> i & 1 == 1)
                .map(|(_, m)| m.clone())
                .collect();
            self.detector.feed(&Reading {
                timestamp_ms: reading.timestamp_ms,
                device_time: reading.device_time,
                metrics,
            })
        };
        let mut out = MonitorOutput {
            outcomes,
            rest_learned,
            ..MonitorOutput::default()
        };
        let ts = reading.timestamp_ms;
        self.settle_held(ts, &mut out);
        for o in &out.outcomes {
            if let Some(a) = o.to_alert(&self.device_id) {
                if self.holds(&a) {
                    self.held.push(a);
                } else {
                    out.alerts.push(a);
                }
            }
        }
        for (i, (name, value)) in reading.metrics.iter().enumerate() {
            let idx = match self.metrics.iter().position(|m| &m.name == name) {
                Some(i) => i,
                // At most `max_metrics` metrics here too, which keeps the memory bound of the
                // two in step: a metric the detector refused (over the bound) is not tracked
                // here either. Not "whatever the detector tracks": a machine standing since it
                // was first seen (a running condition) feeds the detector nothing, and its
                // limits must be checked all the same.
                None if !self.detector.tracks(name)
                    && self.metrics.len() >= self.config.detector.max_metrics =>
                {
                    continue
                }
                None => {
                    self.metrics.push(MetricState {
                        name: name.clone(),
                        trend: TrendTracker::new(self.config.trend_capacity),
                        seen: 0,
                        points: 0,
                        last_scored_ms: None,
                        over_limit: Latch::default(),
                        forecast: Latch::default(),
                        score_max: 0.0,
                    });
                    self.metrics.len() - 1
                }
            };
            let limit = self.config.limits.iter().find(|l| &l.metric == name);
            let device_id = &self.device_id;
            let cfg = &self.config;
            let Some(state) = self.metrics.get_mut(idx) else {
                continue;
            };
            if due >> i.min(63) & 1 == 1 {
                state.last_scored_ms = Some(ts);
            }
            // Readings without the device's time are not averaged by their receive times.
            let spacing = if reading.device_time {
                cfg.trend_min_spacing_ms
            } else {
                0
            };
            let new_point = state.trend.push(ts, *value, spacing);
            state.seen += 1;
            state.points += u64::from(new_point);
            if let Some(o) = out.outcomes.iter().find(|o| &o.metric == name) {
                state.score_max = state.score_max.max(o.outcome.score);
            }

            if let Some(l) = limit {
                if state
                    .over_limit
                    .fires(l.violated(*value), state.seen, ts, cfg)
                {
                    out.alerts.push(AlertMessage::new(
                        device_id,
                        Severity::High,
                        AlertKind::Threshold,
                        name,
                        *value,
                        1.0,
                        format!("{name} = {value} crossed its limit"),
                        ts,
                    ));
                }
            }

            // A standing threshold alert is this metric's incident: the forecast latch holds
            // with it, so it neither fires nor starts re-arming until the limit alert re-arms.
            if state.over_limit.fired {
                state.forecast.hold(ts);
            }
            if !new_point || state.points % cfg.prediction_every as u64 != 0 {
                continue;
            }
            let Ok(f) = state
                .trend
                .forecast(limit.and_then(MetricLimit::forecast_limit))
            else {
                continue;
            };
            let reach = match cfg.forecast_max_extrapolation {
                x if x > 0.0 => cfg.forecast_alert_horizon_s.min(x * f.span_s),
                _ => cfg.forecast_alert_horizon_s,
            };
            // A step (a start, a set point changed) is no trend: no forecast alert on it.
            let approaching = !standing
                && !f.step
                && f.seconds_to_limit.is_some_and(|s| s > 0.0 && s <= reach)
                && f.confidence >= cfg.forecast_min_confidence
                && f.points >= cfg.forecast_min_points.min(cfg.trend_capacity);
            if state.forecast.fires(approaching, state.seen, ts, cfg) {
                let secs = f.seconds_to_limit.unwrap_or(0.0);
                out.alerts.push(AlertMessage::new(
                    device_id,
                    Severity::Medium,
                    AlertKind::Forecast,
                    name,
                    *value,
                    f.confidence,
                    format!("{name} is predicted to reach its limit in {secs:.0} s"),
                    ts,
                ));
            }
            out.predictions.push(PredictionMessage {
                kind_tag: "PREDICTION".into(),
                device_id: device_id.clone(),
                metric: name.clone(),
                trend: f.trend,
                slope: f.slope_per_s,
                seconds_to_limit: f.seconds_to_limit,
                confidence: f.confidence,
                fitted: f.fitted_now,
                anomaly_score: state.score_max,
                timestamp: f.timestamp_ms,
            });
            state.score_max = 0.0;
        }
        self.estimate_rul(reading, &mut out);
        out
    }

    /// Feeds the RUL model, if any, and every `prediction_every` of its readings adds its
    /// estimate (and the alert, if the estimate has fallen low) to `out`.
    fn estimate_rul(&mut self, reading: &Reading, out: &mut MonitorOutput) {
        let Some(watch) = self.rul.as_mut() else {
            return;
        };
        if !watch.tracker.push(&reading.metrics) {
            return;
        }
        let n = watch.tracker.readings();
        if n % self.config.prediction_every as u64 != 0 {
            return;
        }
        let Some(left) = watch.tracker.predict() else {
            return;
        };
        // The device's pace: the sampling interval the detector measures on the model's metrics.
        let seconds = watch
            .tracker
            .used_metrics()
            .find_map(|m| self.detector.usual_interval_ms(m))
            .map(|ms| left * ms as f64 / 1000.0);
        let low = watch.alert_below > 0.0 && left <= watch.alert_below;
        if watch.low.fires(low, n, reading.timestamp_ms, &self.config) {
            let severity = if left <= watch.alert_below / 2.0 {
                Severity::High
            } else {
                Severity::Medium
            };
            out.alerts.push(AlertMessage::new(
                &self.device_id,
                severity,
                AlertKind::Forecast,
                RUL_METRIC,
                left,
                1.0,
                format!(
                    "about {left:.0} operating cycles of useful life left{} (alert at {:.0})",
                    seconds.map_or(String::new(), |s| format!(
                        ", {} at its usual pace",
                        duration_text(s)
                    )),
                    watch.alert_below
                ),
                reading.timestamp_ms,
            ));
        }
        out.rul = Some(RulMessage {
            kind_tag: "RUL".into(),
            device_id: self.device_id.clone(),
            remaining_cycles: left,
            remaining_seconds: seconds,
            cap: watch.tracker.cap(),
            readings: n,
            timestamp: reading.timestamp_ms,
        });
    }

    /// The next model refit the detector wants (see `DeviceDetector::needs_refit`).
    pub fn needs_refit(&mut self) -> Option<RefitJob> {
        self.detector.needs_refit()
    }

    /// Installs a model produced by a refit job (see `DeviceDetector::install`).
    pub fn install(&mut self, model: TrainedModel) -> bool {
        self.detector.install(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::Trend;

    fn reading(t: i64, v: f64) -> Reading {
        Reading {
            timestamp_ms: 1_734_512_000_000 + t * 1000,
            device_time: true,
            metrics: vec![("temperature".into(), v)],
        }
    }

    fn monitor() -> DeviceMonitor {
        let config = MonitorConfig {
            limits: vec![MetricLimit {
                metric: "temperature".into(),
                above: Some(85.0),
                below: None,
            }],
            detector: DetectorConfig {
                n_trees: 10,
                ..DetectorConfig::default()
            },
            ..MonitorConfig::default()
        };
        DeviceMonitor::new("MOTOR-01", config).expect("config")
    }

    #[test]
    fn a_rul_model_gives_estimates_and_one_alert_as_the_machine_wears() {
        use crate::rul::{CycleRow, RulConfig, N_SENSORS};
        // "wear" rises over the last 100 cycles of every run, "noise" is noise.
        let run = |life: u32| -> Vec<[f64; 2]> {
            (1..=life)
                .map(|c| {
                    let wear = (f64::from(c) - f64::from(life) + 100.0).max(0.0);
                    [wear, f64::from(c * 7919 % 13) / 13.0]
                })
                .collect()
        };
        let mut rows = Vec::new();
        for unit in 1..=20u32 {
            for (c, [wear, noise]) in run(150 + 5 * unit).into_iter().enumerate() {
                let mut sensors = [0.0; N_SENSORS];
                sensors[0] = wear;
                sensors[1] = noise;
                rows.push(CycleRow {
                    unit,
                    cycle: c as u32 + 1,
                    settings: [0.0; 3],
                    sensors,
                });
            }
        }
        let config = RulConfig {
            rounds: 30,
            learning_rate: 0.2,
            min_leaf: 20,
            ..RulConfig::default()
        };
        let model = RulModel::train(&rows, &config)
            .expect("train")
            .with_names(vec!["wear".into(), "noise".into()], Vec::new())
            .expect("names");
        let mut m = monitor();
        m.set_rul(Arc::new(model), 30.0);
        let life = 200;
        let (mut estimates, mut alerts) = (Vec::new(), Vec::new());
        for (i, [wear, noise]) in run(life).into_iter().enumerate() {
            let out = m.ingest(&Reading {
                timestamp_ms: 1_734_512_000_000 + i as i64 * 1000,
                device_time: true,
                metrics: vec![("wear".into(), wear), ("noise".into(), noise)],
            });
            estimates.extend(out.rul.map(|r| (i + 1, r)));
            alerts.extend(
                out.alerts
                    .into_iter()
                    .filter(|a| a.metric == RUL_METRIC)
                    .map(|a| (i + 1, a)),
            );
        }
        assert_eq!(estimates.len(), life as usize / 10);
        let (n, first) = &estimates[0];
        assert_eq!((*n, first.readings, first.cap), (10, 10, 125.0));
        assert_eq!(first.kind_tag, "RUL");
        assert!(first.remaining_cycles > 100.0, "{first:?}");
        // One reading a second.
        assert_eq!(first.remaining_seconds, Some(first.remaining_cycles));
        let (_, last) = estimates.last().expect("estimates");
        assert!(last.remaining_cycles < 15.0, "{last:?}");
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let (at, alert) = &alerts[0];
        let true_left = life as usize - at;
        assert!(
            (15..=45).contains(&true_left),
            "alert {true_left} cycles before the end"
        );
        assert_eq!(alert.kind, AlertKind::Forecast);
        assert!(
            alert.message.contains(" s at its usual pace"),
            "{}",
            alert.message
        );
        assert!(alert.value <= 30.0);
        // Readings without the model's metrics are not cycles of the machine.
        let out = m.ingest(&reading(1000, 20.0));
        assert!(out.rul.is_none());
    }

    #[test]
    fn device_patterns_and_the_limits_they_select() {
        for (pattern, id, expected) in [
            ("MOTOR-*", "MOTOR-01", true),
            ("MOTOR-*", "MOTOR-", true),
            ("MOTOR-*", "motor-01", false),
            ("plc-1??", "plc-101", true),
            ("plc-1??", "plc-1011", false),
            ("*-north", "pump-7-north", true),
            ("*-north", "pump-7-northeast", false),
            ("a*b*c", "axxbyybzc", true),
            ("a*b*c", "axxcyyb", false),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("pompe-?", "pompe-é", true),
            ("exact-id", "exact-id", true),
        ] {
            assert_eq!(device_matches(pattern, id), expected, "{pattern} {id}");
        }
        let limit = |metric: &str, above: f64| MetricLimit {
            metric: metric.into(),
            above: Some(above),
            below: None,
        };
        let config = MonitorConfig {
            limits: vec![limit("temperature", 85.0), limit("vibration", 7.1)],
            device_limits: vec![
                DeviceLimits {
                    devices: "MOTOR-9*".into(),
                    limits: vec![limit("temperature", 110.0)],
                },
                DeviceLimits {
                    devices: "MOTOR-*".into(),
                    limits: vec![limit("temperature", 95.0), limit("current", 20.0)],
                },
            ],
            ..MonitorConfig::default()
        };
        let above = |id: &str| {
            let mut l: Vec<_> = config
                .limits_of(id)
                .into_iter()
                .map(|l| (l.metric, l.above.unwrap_or(f64::NAN)))
                .collect();
            l.sort_by(|a, b| a.0.cmp(&b.0));
            l
        };
        let s = |m: &str, v: f64| (m.to_string(), v);
        assert_eq!(
            above("PUMP-1"),
            [s("temperature", 85.0), s("vibration", 7.1)]
        );
        assert_eq!(
            above("MOTOR-1"),
            [
                s("current", 20.0),
                s("temperature", 95.0),
                s("vibration", 7.1)
            ]
        );
        assert_eq!(
            above("MOTOR-90"),
            [
                s("current", 20.0),
                s("temperature", 110.0),
                s("vibration", 7.1)
            ]
        );
        // A monitor keeps only its own limits: 90 degrees alarms a pump, not a motor.
        for (id, alarms) in [("PUMP-1", 1), ("MOTOR-1", 0)] {
            let mut m = DeviceMonitor::new(id, config.clone()).expect("config");
            let out = m.ingest(&Reading {
                timestamp_ms: 0,
                device_time: true,
                metrics: vec![("temperature".into(), 90.0)],
            });
            let n = out
                .alerts
                .iter()
                .filter(|a| a.kind == AlertKind::Threshold)
                .count();
            assert_eq!(n, alarms, "{id}");
        }
    }

    #[test]
    fn threshold_alert_fires_once_per_incident_and_rearms_after_a_clear_spell() {
        let mut m = monitor();
        // Readings one second apart. Hovering at the limit, then clear for 29 readings: still
        // the same incident.
        let mut values = vec![80.0, 86.0, 87.0, 84.0, 86.0, 84.5, 85.5];
        values.extend(std::iter::repeat(80.0).take(29));
        values.push(86.0);
        // A spike every two minutes (a wearing bearing): still the same incident.
        for _ in 0..3 {
            values.extend(std::iter::repeat(80.0).take(119));
            values.push(86.0);
        }
        // Clear for 5 minutes: a new incident.
        values.extend(std::iter::repeat(80.0).take(300));
        values.push(86.0);
        let fired: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(i, v)| {
                m.ingest(&reading(*i as i64, **v))
                    .alerts
                    .iter()
                    .any(|a| a.kind == AlertKind::Threshold)
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(fired, vec![1, values.len() - 1]);
    }

    /// A healthy machine that runs for 3,000 s, stands for 2,000 s (vibration and current 0)
    /// and runs again, four times: every start and stop alerts without a running condition or
    /// a learned rest, none with a condition. Returns the anomaly alerts' reading indices.
    fn shift_machine(running: Vec<RunningRule>, rest: RestConfig) -> Vec<i64> {
        let config = MonitorConfig {
            detector: DetectorConfig {
                n_trees: 10,
                ..DetectorConfig::default()
            },
            running,
            rest,
            ..MonitorConfig::default()
        };
        let mut m = DeviceMonitor::new("m", config).expect("config");
        let mut noise = crate::testing::uniform_noise(11);
        let mut alerts = Vec::new();
        let mut temperature = 25.0;
        for i in 0..20_000i64 {
            let runs = i % 5000 < 3000;
            let load = if runs {
                0.5 - 0.4 * (i as f64 * std::f64::consts::TAU / 600.0).cos()
            } else {
                0.0
            };
            temperature += (if runs { 50.0 + 10.0 * load } else { 25.0 } - temperature) / 300.0;
            let (v, c) = match runs {
                true => (
                    1.8 + load + 0.1 * noise(),
                    8.0 + 10.0 * load + 0.3 * noise(),
                ),
                false => (0.0, 0.0),
            };
            let out = m.ingest(&Reading {
                timestamp_ms: 1_790_000_000_000 + i * 1000,
                device_time: true,
                metrics: vec![
                    ("temperature".into(), temperature + 0.4 * noise()),
                    ("vibration".into(), v),
                    ("current".into(), c),
                ],
            });
            if out.alerts.iter().any(|a| a.kind == AlertKind::Anomaly) {
                alerts.push(i);
            }
            while let Some(job) = m.needs_refit() {
                m.install(job.run().expect("refit"));
            }
        }
        alerts
    }

    /// A machine that runs 3,000 s, stands 1,000 s (its rest is learned), runs 3,000 s and
    /// then, from reading `T`, has the vibration and current `then(seconds since T)` gives
    /// (`None`: as before) for 600 s. Returns every anomaly alert published from `T` on, as
    /// the reading it came out with and the reading it is stamped with, and the alerts
    /// withdrawn.
    fn after_a_learned_rest(
        then: impl Fn(i64, f64, f64) -> (f64, f64),
    ) -> (Vec<(i64, i64)>, usize) {
        const T: i64 = 7000;
        let config = MonitorConfig {
            detector: DetectorConfig {
                n_trees: 10,
                ..DetectorConfig::default()
            },
            ..MonitorConfig::default()
        };
        let mut m = DeviceMonitor::new("m", config).expect("config");
        let mut noise = crate::testing::uniform_noise(5);
        let (mut published, mut withdrawn) = (Vec::new(), 0);
        let t0 = 1_790_000_000_000i64;
        for i in 0..T + 600 {
            let load = 0.5 - 0.3 * (i as f64 * std::f64::consts::TAU / 600.0).cos();
            let (mut v, mut c) = (
                1.8 + load + 0.1 * noise(),
                8.0 + 10.0 * load + 0.3 * noise(),
            );
            if (3000..4000).contains(&i) {
                (v, c) = (0.0, 0.0);
            } else if i >= T {
                (v, c) = then(i - T, v, c);
            }
            let out = m.ingest(&Reading {
                timestamp_ms: t0 + i * 1000,
                device_time: true,
                metrics: vec![
                    ("temperature".into(), 50.0 + 0.4 * noise()),
                    ("vibration".into(), v),
                    ("current".into(), c),
                ],
            });
            withdrawn += out.withdrawn;
            for a in out.alerts.iter().filter(|a| a.kind == AlertKind::Anomaly) {
                if i >= T {
                    published.push((i, (a.timestamp - t0) / 1000));
                }
            }
            while let Some(job) = m.needs_refit() {
                m.install(job.run().expect("refit"));
            }
        }
        assert_eq!(m.rest.as_ref().map(RestGate::learned), Some(1));
        (published, withdrawn)
    }

    #[test]
    fn an_alert_while_the_machine_slows_to_its_rest_is_held_and_withdrawn_if_it_stops() {
        // Spinning down over 100 s: the alerts it raises are withdrawn when it stands.
        let (published, withdrawn) = after_a_learned_rest(|s, v, c| {
            let left = (1.0 - s as f64 / 100.0).max(0.0);
            (v * left, c * left)
        });
        assert!(withdrawn >= 1, "the spin-down raised no alert to withdraw");
        assert_eq!(published, []);

        // Falling halfway to the rest and running on there (a lost load): the machine is taken
        // for stopping for 2 minutes, then the detector judges the new level as it comes.
        let (published, withdrawn) = after_a_learned_rest(|_, v, c| (v / 2.0, c / 2.0));
        assert_eq!(withdrawn, 0);
        let &(out_at, stamped) = published.first().expect("an alert for the drop");
        assert!(
            (7000..=7000 + STOP_HOLD_MS / 1000 + 10).contains(&out_at),
            "{published:?}"
        );
        assert_eq!(out_at, stamped);

        // Away from the rest (a vibration rising): published at once.
        let (published, withdrawn) = after_a_learned_rest(|_, v, c| (v + 1.5, c));
        assert_eq!(withdrawn, 0);
        let &(out_at, stamped) = published.first().expect("an alert for the rise");
        assert_eq!(out_at, stamped);
    }

    #[test]
    fn a_machine_that_stops_and_starts_is_not_an_incident_with_a_running_condition() {
        let off = RestConfig {
            after_secs: 0,
            ..RestConfig::default()
        };
        let without = shift_machine(Vec::new(), off);
        // After the warm-up, starts (at 5000, 10000, ...) and stops (3000, 8000, ...) alert.
        let at_transitions = without
            .iter()
            .filter(|&&i| i > 5000 && (i % 5000 < 60 || (3000..3060).contains(&(i % 5000))))
            .count();
        assert!(at_transitions >= 6, "{without:?}");
        let rule = RunningRule {
            devices: "*".into(),
            metric: "current".into(),
            above: Some(1.0),
            below: None,
            settle_secs: 60,
        };
        let with = shift_machine(vec![rule.clone()], off);
        assert_eq!(with, Vec::<i64>::new());
        // Without a condition the machine's rest is learned 600 s into the first stop: no
        // alert after that, at a start or a stop.
        let learned = shift_machine(Vec::new(), RestConfig::default());
        assert!(learned.iter().all(|&i| i < 3600), "{learned:?}");
        // The first rule whose pattern matches the device applies.
        let other = RunningRule {
            devices: "press-*".into(),
            ..rule.clone()
        };
        let config = MonitorConfig {
            running: vec![other, rule.clone()],
            ..MonitorConfig::default()
        };
        let gated = |id| DeviceMonitor::new(id, config.clone()).map(|m| m.gate.map(|g| g.rule));
        assert_eq!(
            gated("press-1").expect("config").map(|r| r.devices),
            Some("press-*".into())
        );
        assert_eq!(
            gated("m").expect("config").map(|r| r.devices),
            Some("*".into())
        );
        // A machine first seen standing still has its limits checked.
        let config = MonitorConfig {
            limits: monitor().config.limits,
            running: vec![rule.clone()],
            ..MonitorConfig::default()
        };
        let mut m = DeviceMonitor::new("m", config).expect("config");
        let out = m.ingest(&Reading {
            timestamp_ms: 1_790_000_000_000,
            device_time: true,
            metrics: vec![("temperature".into(), 90.0), ("current".into(), 0.0)],
        });
        assert_eq!(out.alerts.len(), 1, "{out:?}");
        assert_eq!(out.alerts[0].kind, AlertKind::Threshold);
        let bad = RunningRule {
            above: None,
            ..rule
        };
        let config = MonitorConfig {
            running: vec![bad],
            ..MonitorConfig::default()
        };
        assert!(DeviceMonitor::new("m", config).is_err());
    }

    #[test]
    fn no_forecast_alert_while_the_threshold_alert_stands() {
        let mut m = monitor();
        // Readings one second apart: a steady climb across the limit (a forecast, then the
        // threshold), 7 minutes over it, then a dip under it that climbs back.
        let mut values: Vec<f64> = (0..250).map(|i| 60.0 + 0.1 * i as f64).collect();
        values.extend((0..420).map(|i| 86.0 + 0.5 * (i % 2) as f64));
        values.extend((0..120).map(|i| 82.0 + 0.02 * i as f64));
        let mut kinds = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let out = m.ingest(&reading(i as i64, *v));
            kinds.extend(out.alerts.iter().map(|a| (i, a.kind)));
        }
        let forecasts = kinds.iter().filter(|(_, k)| *k == AlertKind::Forecast);
        let thresholds = kinds.iter().filter(|(_, k)| *k == AlertKind::Threshold);
        assert_eq!(forecasts.count(), 1, "{kinds:?}");
        assert_eq!(thresholds.count(), 1, "{kinds:?}");
        assert!(
            kinds[0].1 == AlertKind::Forecast && kinds[0].0 < 250,
            "{kinds:?}"
        );
    }

    #[test]
    fn a_fast_metric_is_scored_about_once_a_second_and_untimed_readings_always() {
        let fast = || {
            let mut m = monitor();
            m.config.score_min_spacing_ms = 1000;
            m
        };
        let mut m = fast();
        let mut scored = 0;
        let mut limit_alerts = 0;
        // 20 readings a second for 10 s; one of them crosses the limit (85).
        for i in 0..200 {
            let value = if i == 107 { 90.0 } else { 60.0 };
            let out = m.ingest(&Reading {
                timestamp_ms: i * 50,
                device_time: true,
                metrics: vec![("temperature".into(), value)],
            });
            scored += out.scored_points();
            limit_alerts += out.alerts.len();
        }
        // Every 18th reading: 0.9 s apart.
        assert_eq!(scored, 12);
        assert_eq!(limit_alerts, 1, "the limit sees every reading");
        // Without the device's time stamps every reading is scored.
        let mut m = fast();
        let untimed = (0..50)
            .map(|i| {
                m.ingest(&Reading {
                    timestamp_ms: i,
                    device_time: false,
                    metrics: vec![("temperature".into(), 60.0)],
                })
                .scored_points()
            })
            .sum::<usize>();
        assert_eq!(untimed, 50);
    }

    #[test]
    fn latch_rearms_only_after_rearm_after_clear_readings_and_seconds() {
        let cfg = MonitorConfig {
            rearm_after: 3,
            rearm_after_s: 0,
            ..MonitorConfig::default()
        };
        let mut l = Latch::default();
        // Readings one second apart.
        let mut fires = |condition, seen: u64| l.fires(condition, seen, seen as i64 * 1000, &cfg);
        assert!(fires(true, 1));
        assert!(!fires(true, 2));
        assert!(!fires(false, 3));
        assert!(!fires(false, 4));
        assert!(!fires(true, 5), "clear for 2 readings only");
        assert!(!fires(false, 6));
        assert!(!fires(false, 7));
        assert!(!fires(false, 8), "third clear reading: re-armed now");
        assert!(fires(true, 9));
        // A condition checked every 10th reading (forecasts) counts the readings in between.
        assert!(!fires(false, 20));
        assert!(!fires(false, 30));
        assert!(fires(true, 40));

        // 20 readings a second: 3 clear readings are not enough, 60 clear seconds are (from
        // the last reading at which the condition held: 999).
        let cfg = MonitorConfig {
            rearm_after: 3,
            rearm_after_s: 60,
            ..MonitorConfig::default()
        };
        let mut l = Latch::default();
        let mut fires = |condition, seen: u64| l.fires(condition, seen, seen as i64 * 50, &cfg);
        assert!(fires(true, 1));
        for seen in 2..1000 {
            // Wobbling across the limit for 50 s.
            assert!(!fires(seen % 7 != 0, seen), "reading {seen}");
        }
        for seen in 1000..2199 {
            assert!(!fires(false, seen), "clear, but for less than 60 s: {seen}");
        }
        assert!(!fires(false, 2199), "60 s clear: re-armed now");
        assert!(fires(true, 2200));
        // A device clock set back: the readings decide alone.
        let mut l = Latch::default();
        assert!(l.fires(true, 1, 1_000_000, &cfg));
        for seen in 2..5 {
            assert!(!l.fires(false, seen, 1000 + seen as i64, &cfg));
        }
        assert!(l.fires(true, 5, 1005, &cfg));
    }

    #[test]
    fn rising_trend_gives_prediction_and_one_forecast_alert() {
        let mut m = monitor();
        let mut forecasts = Vec::new();
        let mut first = None;
        for i in 0..1100 {
            let out = m.ingest(&reading(i, 70.0 + 0.01 * i as f64));
            if out.alerts.iter().any(|a| a.kind == AlertKind::Forecast) {
                forecasts.push(i);
            }
            if let (None, Some(p)) = (&first, out.predictions.last()) {
                first = Some(p.clone());
            }
            while let Some(job) = m.needs_refit() {
                let model = job.run().expect("fit");
                m.install(model);
            }
        }
        let p = first.expect("predictions every 10 readings");
        assert_eq!(p.trend, Trend::Rising);
        assert_eq!(p.device_id, "MOTOR-01");
        let secs = p.seconds_to_limit.expect("approaching 85");
        // 85 - 70.09 = 14.91 degrees at 0.01 per second.
        assert!((secs - 1491.0).abs() < 2.0, "{secs}");
        // The alert waits until the limit is at most 4 spans of the fitted points (119 s)
        // away: 85 - 4.76 = 80.24 degrees, reached at reading 1024.
        assert_eq!(forecasts.len(), 1, "{forecasts:?}");
        assert!((1020..=1035).contains(&forecasts[0]), "{forecasts:?}");
        assert!(m.memory_bound_bytes() > 0);
    }

    /// A flat, noisy metric far below its limit: the first fits hold few points, and a line
    /// through ten noisy points explains half of their variation (R² ≥ 0.5) about once in
    /// fifty fits, heading for the limit half of those times. No forecast alert may come of it.
    #[test]
    fn noise_alone_raises_no_forecast_alert() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(7);
        let mut forecasts = 0;
        for _ in 0..1000 {
            let mut m = monitor();
            for i in 0..150 {
                // Uniform noise of the same spread as a 0.5-degree Gaussian.
                let v = 60.0 + rng.gen_range(-0.87..0.87);
                let out = m.ingest(&reading(i, v));
                forecasts += out
                    .alerts
                    .iter()
                    .filter(|a| a.kind == AlertKind::Forecast)
                    .count();
            }
        }
        assert_eq!(forecasts, 0);
    }

    #[test]
    fn config_from_json() {
        let cfg: MonitorConfig = serde_json::from_str(
            r#"{"limits":[{"metric":"temperature","above":85}],"detector":{"n_trees":50}}"#,
        )
        .expect("json");
        assert_eq!(cfg.detector.n_trees, 50);
        assert_eq!(cfg.limits[0].above, Some(85.0));
        assert!(DeviceMonitor::new(
            "x",
            MonitorConfig {
                prediction_every: 0,
                ..MonitorConfig::default()
            }
        )
        .is_err());
    }
}
