//! Scoring of anomaly alerts against labelled windows with the NAB standard profile.
//!
//! This reimplements the rules of the Numenta Anomaly Benchmark scorer so the evaluation binary
//! can measure the detector without Python: the first 15% of rows (at most 750) are a probation
//! period whose detections are ignored; inside a labelled window only the first detection counts
//! and earns `A_TP * σ(position)/σ(-1)` where the position runs from −1 at the window start to 0
//! at its end; a window without detection costs `A_FN`; a detection outside any window costs
//! `A_FP` times a sigmoid of its distance past the previous window (in window lengths), or the
//! full `A_FP` when no window precedes it. Here `σ(x) = 2 / (1 + e^(5x)) − 1`, clamped to −1 for
//! positions more than three window lengths out.
//!
//! A file's normalised score is `100 * (raw − null) / (perfect − null)` where null never detects
//! (−1 per window) and perfect detects every window at its first row. A file without windows has
//! null = perfect = 0, so its raw score is reported as is: 0 without alerts, negative with
//! false positives.

/// Standard-profile weight of a true positive.
pub const A_TP: f64 = 1.0;
/// Standard-profile weight of a false positive.
pub const A_FP: f64 = 0.11;
/// Standard-profile weight of a missed window.
pub const A_FN: f64 = 1.0;

/// NAB's scaled sigmoid of a relative position.
pub fn scaled_sigmoid(x: f64) -> f64 {
    if x > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }
}

/// Number of leading rows whose detections NAB ignores.
pub fn probation_rows(n_rows: usize) -> usize {
    ((0.15 * n_rows as f64).floor() as usize).min(750)
}

/// Score of one file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FileScore {
    /// Raw weighted score.
    pub raw: f64,
    /// Raw score of a detector that never fires.
    pub null: f64,
    /// Raw score of a detector that fires at the start of every window and nowhere else.
    pub perfect: f64,
    /// True positives (windows detected).
    pub tp: usize,
    /// False positives counted (outside windows, after probation).
    pub fp: usize,
    /// Windows missed.
    pub fn_: usize,
}

impl FileScore {
    /// `100 * (raw − null) / (perfect − null)`, or the raw score for files without windows.
    pub fn normalized(&self) -> f64 {
        let span = self.perfect - self.null;
        if span.abs() < 1e-12 {
            self.raw
        } else {
            100.0 * (self.raw - self.null) / span
        }
    }
}

/// Scores `alerts` (one flag per row) against `windows`, given as inclusive row-index ranges in
/// increasing order.
pub fn score_file(alerts: &[bool], windows: &[(usize, usize)]) -> FileScore {
    let n = alerts.len();
    let probation = probation_rows(n);
    let max_tp = scaled_sigmoid(-1.0);
    let mut detected = vec![false; windows.len()];
    let mut raw_tp = 0.0;
    let mut raw_fp = 0.0;
    let mut fp = 0;
    let mut next = 0usize;
    let mut cur: Option<usize> = None;
    let mut prev: Option<usize> = None;
    for (i, &alert) in alerts.iter().enumerate() {
        if cur.is_none() && next < windows.len() && i >= windows[next].0 {
            cur = Some(next);
            next += 1;
        }
        if alert && i >= probation {
            match cur {
                Some(w) => {
                    if !detected[w] {
                        let (s, e) = windows[w];
                        let width = (e - s + 1) as f64;
                        let pos = -((e as f64 - i as f64 + 1.0) / width);
                        raw_tp += scaled_sigmoid(pos) * A_TP / max_tp;
                        detected[w] = true;
                    }
                }
                None => {
                    let unweighted = match prev {
                        Some(p) => {
                            let (s, e) = windows[p];
                            let width = (e - s + 1) as f64;
                            let pos = (i as f64 - e as f64).abs() / (width - 1.0).max(1.0);
                            scaled_sigmoid(pos)
                        }
                        None => -1.0,
                    };
                    raw_fp += unweighted * A_FP;
                    fp += 1;
                }
            }
        }
        if let Some(w) = cur {
            if i >= windows[w].1 {
                prev = Some(w);
                cur = None;
            }
        }
    }
    let tp = detected.iter().filter(|d| **d).count();
    let fn_ = windows.len() - tp;
    FileScore {
        raw: raw_tp + raw_fp - A_FN * fn_ as f64,
        null: -A_FN * windows.len() as f64,
        perfect: A_TP * windows.len() as f64,
        tp,
        fp,
        fn_,
    }
}

/// Converts windows given as `[start, end]` timestamps into inclusive row ranges of a series
/// with the given (increasing) timestamps. Windows that cover no row are dropped.
pub fn windows_to_rows(timestamps: &[i64], windows: &[(i64, i64)]) -> Vec<(usize, usize)> {
    windows
        .iter()
        .filter_map(|&(start, end)| {
            let s = timestamps.partition_point(|&t| t < start);
            let e = timestamps.partition_point(|&t| t <= end);
            (e > s).then(|| (s, e - 1))
        })
        .collect()
}

/// Highest `anomaly_score` of a row that does not open an incident (see [`anomaly_score`]).
pub const QUIET_SCORE_MAX: f64 = 0.499_999;

/// The `anomaly_score` NAB's own tools should see for a row: 1 on a row that opens an incident
/// (an alert), and half the detector's likelihood, at most [`QUIET_SCORE_MAX`], on every other
/// row.
///
/// NAB's scorer counts every row whose score reaches its threshold as a detection, and its
/// optimiser picks the threshold. The raw likelihood stays near 1 for the whole of an incident
/// and on points the debouncing deliberately holds back, so thresholding it would report each
/// incident dozens of times (each one outside a window a false positive). With this mapping any
/// threshold above one half, NAB's usual 0.5 among them, reproduces exactly the alerts the
/// detector raised, while lower thresholds still order the quiet rows by surprise.
pub fn anomaly_score(likelihood: f64, alert: bool) -> f64 {
    if alert {
        1.0
    } else if likelihood.is_nan() {
        0.0
    } else {
        (0.5 * likelihood).clamp(0.0, QUIET_SCORE_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anomaly_scores_reach_one_half_only_on_alerts() {
        assert_eq!(anomaly_score(0.3, true), 1.0);
        assert_eq!(anomaly_score(1.0, false), QUIET_SCORE_MAX);
        assert_eq!(anomaly_score(0.999_999, false), QUIET_SCORE_MAX);
        assert_eq!(anomaly_score(0.5, false), 0.25);
        assert_eq!(anomaly_score(f64::NAN, false), 0.0);
        assert_eq!(anomaly_score(-1.0, false), 0.0);
        // Quiet rows keep their order below the cap.
        assert!(anomaly_score(0.9, false) > anomaly_score(0.8, false));
    }

    #[test]
    fn sigmoid_shape() {
        assert!((scaled_sigmoid(0.0)).abs() < 1e-12);
        assert!((scaled_sigmoid(-1.0) - 0.986_614_3).abs() < 1e-6);
        assert_eq!(scaled_sigmoid(3.5), -1.0);
        assert_eq!(probation_rows(4032), 604);
        assert_eq!(probation_rows(10_000), 750);
    }

    #[test]
    fn perfect_null_and_fp() {
        let windows = [(1000, 1199), (3000, 3199)];
        let mut alerts = vec![false; 4000];
        let null = score_file(&alerts, &windows);
        assert_eq!(null.normalized(), 0.0);
        assert_eq!(null.fn_, 2);
        alerts[1000] = true;
        alerts[3000] = true;
        let perfect = score_file(&alerts, &windows);
        assert!((perfect.normalized() - 100.0).abs() < 1e-9);
        // A second detection in the same window neither adds nor costs.
        alerts[1001] = true;
        assert!((score_file(&alerts, &windows).normalized() - 100.0).abs() < 1e-9);
        // A late detection earns less, and one at the window end about nothing.
        let mut late = vec![false; 4000];
        late[1199] = true;
        let s = score_file(&late, &windows);
        assert!(s.raw > -2.0 && s.raw < -0.95);
        // A false positive long after a window costs the full 0.11; one before any window too;
        // detections in probation are ignored.
        let mut fp = vec![false; 4000];
        fp[2500] = true;
        fp[700] = true;
        fp[10] = true;
        let s = score_file(&fp, &windows);
        assert_eq!(s.fp, 2);
        assert!((s.raw - (-2.0 - 0.11 - 0.11)).abs() < 1e-3);
        // No windows: the raw score is reported.
        let s = score_file(&fp, &[]);
        assert!((s.normalized() + 0.22).abs() < 1e-9);
    }

    #[test]
    fn shared_windows_file_parses_if_present() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/nab/combined_windows.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            println!("note: {} not found, skipping", path.display());
            return;
        };
        let windows: std::collections::BTreeMap<String, Vec<[String; 2]>> =
            serde_json::from_str(&text).expect("windows JSON");
        assert!(!windows.is_empty());
        for pair in windows.values().flatten() {
            let s = crate::telemetry::parse_datetime_ms(&pair[0]).expect("start");
            let e = crate::telemetry::parse_datetime_ms(&pair[1]).expect("end");
            assert!(s < e);
        }
    }

    #[test]
    fn window_rows_from_timestamps() {
        let ts: Vec<i64> = (0..10).map(|i| i * 10).collect();
        assert_eq!(windows_to_rows(&ts, &[(15, 45), (100, 200)]), vec![(2, 4)]);
    }
}
