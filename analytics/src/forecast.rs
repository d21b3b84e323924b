//! Per-metric trend forecasting: slope over a bounded recent window and time until a limit.
//!
//! A `TrendTracker` keeps the last `capacity` `(timestamp, value)` points of one metric (16 bytes
//! each) and fits an ordinary least-squares line with linfa-linear. With a minimum spacing
//! (`push`'s `min_spacing_ms`), readings closer than that to the start of the newest point are
//! averaged into it, so a device that reports 20 times a second gets a trend over the same
//! stretch of time as one reporting once a second, from less noisy points, instead of one over
//! 6 seconds. From the fit it reports the
//! slope per second, whether the trend is statistically distinguishable from flat (|t| ≥ 2 on the
//! slope), the seconds until a configured limit is crossed if the metric is heading towards it,
//! and a confidence equal to the fit's R² (the share of the recent variation the trend explains).

use std::collections::VecDeque;

use linfa::dataset::DatasetBase;
use linfa::traits::Fit;
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2};

use crate::alert::Trend;

/// Errors of the forecast module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForecastError {
    /// Fewer points than `min_points`, or all at the same time.
    #[error("not enough data: {points} points over {span_s} s")]
    NotEnoughData {
        /// Points held.
        points: usize,
        /// Time covered in seconds.
        span_s: f64,
    },
    /// The regression failed (for example a singular system).
    #[error("regression failed: {0}")]
    Regression(String),
}

/// Which side of a limit is unsafe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// Alarm when the metric rises to or above the value (e.g. temperature 85).
    Above(f64),
    /// Alarm when the metric falls to or below the value (e.g. pressure 2.0).
    Below(f64),
}

/// Result of a trend fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// Slope in metric units per second.
    pub slope_per_s: f64,
    /// Fitted value at the newest point.
    pub fitted_now: f64,
    /// Coefficient of determination of the line, in 0..1.
    pub r2: f64,
    /// Direction, `Stable` unless the slope is significant.
    pub trend: Trend,
    /// Seconds until the limit is reached if the trend heads towards it within the horizon;
    /// `Some(0.0)` if it is already reached.
    pub seconds_to_limit: Option<f64>,
    /// Confidence in 0..1 (R² of the fit).
    pub confidence: f64,
    /// Timestamp of the newest point (unix milliseconds).
    pub timestamp_ms: i64,
    /// Points the line was fitted to.
    pub points: usize,
    /// Seconds from the oldest to the newest of them.
    pub span_s: f64,
    /// The points are a step, not a trend: two flat stretches (the values before and after
    /// one break) fit them with at most 1/[`STEP_FIT_RATIO`] of the line's squared error. A
    /// machine starting, a set point changed: the line through such a step heads somewhere,
    /// but nothing is moving.
    pub step: bool,
}

/// A line that leaves this many times the squared error of two flat stretches describes a
/// step, not a trend. A true step leaves 30-50 times (120 points, noise a twentieth of the
/// step); a ramp at most 2.1 times, wherever in the window it starts.
pub const STEP_FIT_RATIO: f64 = 4.0;

/// Bounded history of one metric plus the forecast settings.
#[derive(Debug, Clone)]
pub struct TrendTracker {
    points: VecDeque<(i64, f64)>,
    capacity: usize,
    min_points: usize,
    max_horizon_s: f64,
    /// Time of the first reading averaged into the newest point.
    bucket_start_ms: i64,
    /// Readings averaged into the newest point.
    merged: u32,
}

impl TrendTracker {
    /// Keeps up to `capacity` points (at least 3); forecasts need `min(10, capacity)` points and
    /// crossings further than 7 days out are not reported, since a linear extrapolation that far
    /// from a short window is not meaningful.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(3);
        Self {
            points: VecDeque::with_capacity(capacity),
            capacity,
            min_points: capacity.min(10),
            max_horizon_s: 7.0 * 86_400.0,
            bucket_start_ms: 0,
            merged: 0,
        }
    }

    /// Overrides the longest horizon (seconds) for `seconds_to_limit`.
    pub fn with_max_horizon(mut self, seconds: f64) -> Self {
        self.max_horizon_s = seconds;
        self
    }

    /// Bytes of history held at most (16 per point).
    pub fn bytes(&self) -> usize {
        self.capacity * std::mem::size_of::<(i64, f64)>()
    }

    /// Adds a reading; true when it starts a new point, false when it was averaged into the
    /// newest one or ignored (non-finite). A reading less than `min_spacing_ms` after the first
    /// reading of the newest point is averaged into it (its time and its value; 0: never).
    /// Out-of-order timestamps are accepted (the regression does not need sorted input); one
    /// earlier than the newest point's start starts a new point.
    pub fn push(&mut self, timestamp_ms: i64, value: f64, min_spacing_ms: i64) -> bool {
        if !value.is_finite() {
            return false;
        }
        let since = timestamp_ms.saturating_sub(self.bucket_start_ms);
        if self.merged > 0 && (0..min_spacing_ms).contains(&since) {
            if let Some(last) = self.points.back_mut() {
                // Running means; k readings are in the point already.
                let k = f64::from(self.merged);
                let t = last.0 as f64 + (timestamp_ms - last.0) as f64 / (k + 1.0);
                last.0 = t.round() as i64;
                last.1 += (value - last.1) / (k + 1.0);
                self.merged = self.merged.saturating_add(1);
                return false;
            }
        }
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back((timestamp_ms, value));
        self.bucket_start_ms = timestamp_ms;
        self.merged = 1;
        true
    }

    /// Fits the trend over the held points and, given a limit, the time until it is crossed.
    pub fn forecast(&self, limit: Option<Limit>) -> Result<Forecast, ForecastError> {
        let n = self.points.len();
        let newest = self.points.iter().map(|p| p.0).max().unwrap_or(0);
        let oldest = self.points.iter().map(|p| p.0).min().unwrap_or(0);
        let span_s = (newest - oldest) as f64 / 1000.0;
        if n < self.min_points || span_s <= 0.0 {
            return Err(ForecastError::NotEnoughData { points: n, span_s });
        }
        // Time in seconds relative to the newest point and values centred on their mean keep
        // the normal equations well conditioned whatever the epoch and the metric's scale.
        let mean_v = self.points.iter().map(|p| p.1).sum::<f64>() / n as f64;
        let x = Array2::from_shape_fn((n, 1), |(i, _)| (self.points[i].0 - newest) as f64 / 1000.0);
        let y = Array1::from_iter(self.points.iter().map(|p| p.1 - mean_v));
        let fit = LinearRegression::new()
            .fit(&DatasetBase::new(x.clone(), y.clone()))
            .map_err(|e| ForecastError::Regression(e.to_string()))?;
        let slope = fit.params()[0];
        let intercept = fit.intercept();
        if !slope.is_finite() || !intercept.is_finite() {
            return Err(ForecastError::Regression("non-finite coefficients".into()));
        }
        let (mut ss_res, mut ss_tot, mut sxx) = (0.0, 0.0, 0.0);
        let mean_x = x.sum() / n as f64;
        for (xi, yi) in x.iter().zip(y.iter()) {
            let r = yi - (intercept + slope * xi);
            ss_res += r * r;
            ss_tot += yi * yi;
            sxx += (xi - mean_x).powi(2);
        }
        let r2 = if ss_tot > 0.0 {
            (1.0 - ss_res / ss_tot).clamp(0.0, 1.0)
        } else {
            1.0
        };
        // t statistic of the slope: the trend only counts when it stands out of the noise.
        let dof = (n as f64 - 2.0).max(1.0);
        let se = (ss_res / dof / sxx.max(f64::MIN_POSITIVE)).sqrt();
        let significant = if se > 0.0 {
            (slope / se).abs() >= 2.0
        } else {
            slope != 0.0
        };
        let trend = match (significant, slope > 0.0) {
            (false, _) => Trend::Stable,
            (true, true) => Trend::Rising,
            (true, false) => Trend::Falling,
        };
        let fitted_now = mean_v + intercept;
        let seconds_to_limit = limit.and_then(|l| {
            let (reached, gap, heading) = match l {
                Limit::Above(v) => (fitted_now >= v, v - fitted_now, trend == Trend::Rising),
                Limit::Below(v) => (fitted_now <= v, fitted_now - v, trend == Trend::Falling),
            };
            if reached {
                return Some(0.0);
            }
            if !heading {
                return None;
            }
            let secs = gap / slope.abs();
            (secs.is_finite() && secs <= self.max_horizon_s).then_some(secs)
        });
        Ok(Forecast {
            slope_per_s: slope,
            fitted_now,
            r2,
            trend,
            seconds_to_limit,
            confidence: r2,
            timestamp_ms: newest,
            points: n,
            span_s,
            step: self.two_levels_error(mean_v) * STEP_FIT_RATIO < ss_res,
        })
    }

    /// The least squared error of two flat stretches over the points in their order (each
    /// stretch at its mean, the break wherever it fits best): O(n) with running sums, of the
    /// values less `centre` (their mean), which keeps the sums well conditioned.
    fn two_levels_error(&self, centre: f64) -> f64 {
        let n = self.points.len();
        let (total, total_sq) = self.points.iter().fold((0.0, 0.0), |(s, q), p| {
            let v = p.1 - centre;
            (s + v, q + v * v)
        });
        let (mut sum, mut sq) = (0.0, 0.0);
        let mut best = f64::INFINITY;
        for (k, p) in self.points.iter().enumerate().take(n.saturating_sub(1)) {
            let v = p.1 - centre;
            sum += v;
            sq += v * v;
            let left = (k + 1) as f64;
            let right = (n - k - 1) as f64;
            let (rs, rq) = (total - sum, total_sq - sq);
            let error = (sq - sum * sum / left) + (rq - rs * rs / right);
            best = best.min(error);
        }
        best.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_734_512_000_000;

    #[test]
    fn rising_temperature_reaches_limit() {
        let mut t = TrendTracker::new(120);
        // 0.01 degrees per second from 80, one point every 10 s, with tiny alternating noise.
        for i in 0..100 {
            let noise = if i % 2 == 0 { 0.01 } else { -0.01 };
            t.push(T0 + i * 10_000, 80.0 + 0.1 * i as f64 + noise, 0);
        }
        let f = t.forecast(Some(Limit::Above(85.0))).expect("fit");
        assert_eq!(f.trend, Trend::Rising);
        assert!((f.slope_per_s - 0.01).abs() < 1e-4);
        // Now at about 89.9: the limit is already crossed.
        assert_eq!(f.seconds_to_limit, Some(0.0));
        let f = t.forecast(Some(Limit::Above(100.0))).expect("fit");
        let secs = f.seconds_to_limit.expect("approaching");
        assert!((secs - 1010.0).abs() < 5.0, "{secs}");
        assert!(f.confidence > 0.99);
    }

    #[test]
    fn a_step_is_not_a_trend_and_a_ramp_that_starts_late_is() {
        let noise = |i: i64| 0.1 * ((i * 7919 % 13) as f64 / 6.0 - 1.0);
        let fit = |value: &dyn Fn(i64) -> f64| {
            let mut t = TrendTracker::new(120);
            for i in 0..120 {
                t.push(T0 + i * 1000, value(i) + noise(i), 0);
            }
            t.forecast(Some(Limit::Above(7.1))).expect("forecast")
        };
        // A machine standing at 0 starts: the line heads for the limit, but it is a step.
        for at in [30, 60, 90, 110] {
            let f = fit(&|i| if i < at { 0.0 } else { 2.3 });
            assert_eq!(f.trend, Trend::Rising);
            assert!(f.step, "step at {at}: {f:?}");
        }
        // A wear ramp from the start of the window, or starting inside it, is a trend.
        for knee in [0, 30, 60, 90] {
            let f = fit(&|i| 2.0 + 0.02 * (i - knee).max(0) as f64);
            assert!(!f.step, "ramp from {knee}: {f:?}");
        }
        assert!(!fit(&|_| 2.0).step, "flat noise");
    }

    #[test]
    fn flat_noisy_signal_is_stable_and_not_approaching() {
        let mut t = TrendTracker::new(60);
        for i in 0..60 {
            let noise = ((i * 7919) % 13) as f64 / 13.0 - 0.5;
            t.push(T0 + i * 1000, 50.0 + noise, 0);
        }
        let f = t.forecast(Some(Limit::Above(85.0))).expect("fit");
        assert_eq!(f.trend, Trend::Stable);
        assert_eq!(f.seconds_to_limit, None);
        assert!(f.confidence < 0.3);
    }

    #[test]
    fn falling_towards_lower_limit_and_horizon() {
        let mut t = TrendTracker::new(50);
        for i in 0..50 {
            t.push(T0 + i * 1000, 10.0 - 0.001 * i as f64, 0);
        }
        let f = t.forecast(Some(Limit::Below(9.0))).expect("fit");
        assert_eq!(f.trend, Trend::Falling);
        let secs = f.seconds_to_limit.expect("approaching");
        assert!((secs - 951.0).abs() < 1.0, "{secs}");
        let short = t.clone().with_max_horizon(100.0);
        assert_eq!(
            short
                .forecast(Some(Limit::Below(9.0)))
                .expect("fit")
                .seconds_to_limit,
            None
        );
    }

    #[test]
    fn readings_closer_than_the_spacing_are_averaged_into_one_point() {
        // 20 readings a second for 120 s, rising 0.01 per second, with noise of +-0.5.
        let mut fast = TrendTracker::new(120);
        let mut new_points = 0;
        for i in 0..2400i64 {
            let noise = if i % 2 == 0 { 0.5 } else { -0.5 };
            if fast.push(T0 + i * 50, 50.0 + 0.01 * (i as f64 / 20.0) + noise, 1000) {
                new_points += 1;
            }
        }
        assert_eq!(new_points, 120, "one point per second");
        assert_eq!(fast.points.len(), 120);
        // Each point is the mean of its 20 readings (time and value): the noise cancels.
        let (t, v) = fast.points[0];
        assert_eq!(t, T0 + 475);
        assert!((v - (50.0 + 0.01 * 0.475)).abs() < 1e-9, "{v}");
        let f = fast.forecast(None).expect("fit");
        assert!((f.slope_per_s - 0.01).abs() < 1e-6, "{}", f.slope_per_s);
        assert!(f.confidence > 0.99, "{}", f.confidence);
        // Without the spacing the same readings cover the last 6 s and the trend is noise.
        let mut raw = TrendTracker::new(120);
        for i in 0..2400i64 {
            let noise = if i % 2 == 0 { 0.5 } else { -0.5 };
            assert!(raw.push(T0 + i * 50, 50.0 + 0.01 * (i as f64 / 20.0) + noise, 0));
        }
        assert!(raw.forecast(None).expect("fit").confidence < 0.1);
        // A reading earlier than the newest point's start (a clock step back) starts a point.
        assert!(fast.push(T0, 1.0, 1000));
    }

    #[test]
    fn not_enough_data_and_bounded_memory() {
        let mut t = TrendTracker::new(20);
        assert!(matches!(
            t.forecast(None),
            Err(ForecastError::NotEnoughData { .. })
        ));
        for i in 0..15 {
            t.push(T0, i as f64, 0);
        }
        assert!(matches!(
            t.forecast(None),
            Err(ForecastError::NotEnoughData { .. })
        ));
        for i in 0..100 {
            t.push(T0 + i * 1000, 1.0, 0);
        }
        t.push(T0, f64::NAN, 0);
        assert_eq!(t.points.len(), 20);
        assert_eq!(t.bytes(), 320);
        let f = t.forecast(None).expect("constant");
        assert_eq!(f.trend, Trend::Stable);
    }
}
