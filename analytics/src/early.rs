//! The early channel: gross outliers while a metric's learned channels are young.
//!
//! The forest and shape channels need a warm-up and then a history of their own scores before
//! they may alert (`warmup + min_history` readings, 406 with the defaults), and demand a raised
//! bar until that history is full (`warmup + history`, 1,256). A short or slow stream can show
//! its first fault inside that stretch. Until then, this channel judges each value against the
//! values the metric has sent so far: it is surprising when it lies outside their range by at
//! least `beyond` of the range *and* at least `bar` robust standard deviations (1.4826 × the
//! median absolute deviation) from their median. The range condition is the recurrence check
//! of this channel: a spike no higher than one already seen is not news, and a slow drift or
//! the gradual rise of a cycle never gets far enough beyond the range. A metric whose values
//! have no spread (more than half of them equal: a flat line, a mostly-zero counter) is not
//! judged, and nothing is judged before the values span `min_span_ms`, because the first high
//! phase of a daily pattern looks exactly like a gross outlier.

/// When a value is surprising to the early channel; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyRule {
    /// Robust standard deviations from the median a value must lie.
    pub bar: f64,
    /// How far outside the earlier values' range a value must lie, as a share of the range.
    pub beyond: f64,
    /// Values seen before any is judged.
    pub min_points: usize,
    /// Time the values must span before any is judged, when they carry time stamps.
    pub min_span_ms: i64,
    /// Values kept for the median (later ones still widen the range).
    pub limit: usize,
}

/// Values of one metric held until its learned channels are mature. Memory: at most
/// `2 × limit × 8` bytes (the values and a scratch copy for the medians), released by
/// [`EarlyOutliers::finish`].
#[derive(Debug, Clone, Default)]
pub struct EarlyOutliers {
    values: Vec<f64>,
    scratch: Vec<f64>,
    min: f64,
    max: f64,
    first_ms: Option<i64>,
    finished: bool,
}

/// Median of `xs`, reordering them.
fn median(xs: &mut [f64]) -> f64 {
    let mid = xs.len() / 2;
    let (_, m, _) = xs.select_nth_unstable_by(mid, f64::total_cmp);
    *m
}

impl EarlyOutliers {
    /// Whether [`EarlyOutliers::finish`] has been called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Judges `value` (time stamp `at_ms`, if known) against the values before it, then
    /// records it. Returns its robust standard score when it is surprising under `rule`.
    pub fn judge(&mut self, rule: &EarlyRule, value: f64, at_ms: Option<i64>) -> Option<f64> {
        if self.finished || !value.is_finite() {
            return None;
        }
        let n = self.values.len();
        if n == 0 {
            self.first_ms = at_ms;
            self.min = value;
            self.max = value;
        }
        let spanned = match (self.first_ms, at_ms) {
            (Some(first), Some(now)) => now.saturating_sub(first) >= rule.min_span_ms,
            _ => true,
        };
        let outside = (value - self.max).max(self.min - value);
        let mut surprise = None;
        if spanned && n >= rule.min_points.max(2) && outside > rule.beyond * (self.max - self.min) {
            // Only values outside the range get here, so the medians are rarely computed.
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.values);
            let med = median(&mut self.scratch);
            for x in &mut self.scratch {
                *x = (*x - med).abs();
            }
            let spread = 1.4826 * median(&mut self.scratch);
            let z = (value - med).abs() / spread;
            if spread > 0.0 && z >= rule.bar {
                surprise = Some(z);
            }
        }
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        if n < rule.limit {
            self.values.push(value);
        }
        surprise
    }

    /// Stops the channel and releases its memory.
    pub fn finish(&mut self) {
        self.finished = true;
        self.values = Vec::new();
        self.scratch = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: EarlyRule = EarlyRule {
        bar: 10.0,
        beyond: 0.0,
        min_points: 50,
        min_span_ms: 0,
        limit: 500,
    };

    impl EarlyOutliers {
        fn judge_n(&mut self, v: f64, min_points: usize) -> Option<f64> {
            let rule = EarlyRule { min_points, ..RULE };
            self.judge(&rule, v, None)
        }
    }

    #[test]
    fn a_gross_outlier_is_surprising_once() {
        let mut e = EarlyOutliers::default();
        for i in 0..100 {
            let v = 10.0 + (i % 7) as f64 * 0.1;
            assert_eq!(e.judge_n(v, 50), None);
        }
        let z = e.judge_n(30.0, 50).expect("surprising");
        assert!(z > 10.0, "{z}");
        // No higher than the spike already seen: not news.
        assert_eq!(e.judge_n(29.0, 50), None);
        assert!(e.judge_n(40.0, 50).is_some());
    }

    #[test]
    fn too_few_points_or_no_spread_are_never_judged() {
        let mut e = EarlyOutliers::default();
        for _ in 0..10 {
            e.judge_n(1.0, 50);
        }
        assert_eq!(e.judge_n(100.0, 5), None, "constant history");
        let mut e = EarlyOutliers::default();
        for i in 0..10 {
            e.judge_n(i as f64, 50);
        }
        assert_eq!(e.judge_n(1000.0, 50), None, "too few points");
        e.finish();
        assert!(e.is_finished());
        assert_eq!(e.judge_n(1e9, 0), None);
    }

    #[test]
    fn the_range_margin_and_the_time_span_hold_judgement_back() {
        let rule = EarlyRule {
            beyond: 0.5,
            min_span_ms: 86_400_000,
            ..RULE
        };
        let mut e = EarlyOutliers::default();
        let hour = 3_600_000;
        for i in 0..100 {
            let v = 10.0 + (i % 7) as f64 * 0.1;
            assert_eq!(e.judge(&rule, v, Some(i * hour / 10)), None);
        }
        // Ten hours of values: too short a span, however far out.
        assert_eq!(e.judge(&rule, 100.0, Some(10 * hour)), None);
        let mut e = EarlyOutliers::default();
        for i in 0..100 {
            // One earlier excursion to 20 widens the range to 10..20.
            let v = if i == 50 {
                20.0
            } else {
                10.0 + (i % 7) as f64 * 0.1
            };
            e.judge(&rule, v, Some(i * hour));
        }
        // Far from the median but less than half the range beyond it: held back.
        assert_eq!(e.judge(&rule, 24.0, Some(100 * hour)), None);
        // 24 widened the range to 10..24; 40 lies 16 beyond it.
        assert!(e.judge(&rule, 40.0, Some(101 * hour)).is_some());
    }
}
