//! The online streaming anomaly detector shared by the live broker and the offline evaluation.
//!
//! For every metric of a device the detector:
//! 1. turns each value into a causal feature vector (`features::FeatureState`) and keeps the
//!    recent vectors (`window`) plus a uniform sample of older ones (`reservoir`) for training;
//! 2. once `warmup` points have been seen, fits an isolation forest on those vectors and from
//!    then on gives each point a raw isolation score; it refits every `refit_every` points, so
//!    drifts and permanent level changes become the new normal;
//! 3. also measures shape novelty (`features::ShapeNovelty`): how far the last `shape_len`
//!    values are from the most similar earlier stretch of the signal, which catches contextual
//!    anomalies (a missing daily peak, a flattened cycle) that no single value reveals;
//!    and a level channel (`level_span`): a leaky two-sided CUSUM of the value against a
//!    long-horizon baseline, in units of its long-horizon spread, which reports a level that
//!    stays away from the long-run one after the other channels have absorbed the change
//!    (judged unsmoothed, like the shape channel, at or above `level_floor` only);
//! 4. for the forest and shape channels, smooths the score over about `avg_window` points (the
//!    forest's over fewer for a metric slower than one reading per `avg_span_s / avg_window`,
//!    so the smoothing spans about an hour) and judges
//!    it against the distribution of the same smoothed score over the last `history` points: a
//!    standard score `z` (for the forest channel with a spread of at least its long-horizon
//!    spread, `long_spread_half_life`, and at most the standard score of the tail probability a
//!    generalised Pareto fit to its past excursion peaks gives it, `tail_fit_quantile`) and its
//!    Gaussian tail probability, the "anomaly likelihood" of Numenta's NAB detectors. This
//!    makes one threshold meaningful across metrics whose raw scores sit at different levels.
//!    The point's `score` is `1 − tail(max z)`;
//! 5. treats a channel as unsurprising when its smoothed score is no higher than one it already
//!    produced between `recurrence_window` and `recurrence_gap` points ago (the recurrence
//!    check): a daily spike, a periodic batch job or the after-effects of an incident that was
//!    already reported do not open a new incident, only a bigger excursion does. A far tier
//!    extends this to `recurrence_far_window` points back at a discount: an excursion whose
//!    rise above the channel's usual level is no more than `recurrence_far_share` of the rise
//!    of one from up to that far back is not news either. Both tiers forget scores more than
//!    `recurrence_span_s` old. A long tier remembers in time what the point tiers cannot at
//!    fast rates (1000 readings a second apart are 17 minutes): an excursion is routine when
//!    the channel made `recurrence_long_count` comparable ones (rise and size) in the last
//!    `recurrence_long_span_s`;
//! 6. raises an alert when `z` reaches the standard score of `alert_tail` (plus `young_margin`
//!    scaled by how empty the score history still is, so the first alerts after the warm-up,
//!    judged against few points, must be clearer; for the forest channel it also fades over
//!    `young_span_s` from the first score, so a slow metric is not held back for months), or
//!    when `z` has stayed at the looser bar of `sustain_tail` (same margin) for
//!    `sustain_points` points in a row (an incident that holds the score just under the bar);
//!    then it stays silent until the likelihood has
//!    dropped below `rearm_likelihood` and `cooldown` points have passed, so one incident gives
//!    one alert.
//!
//! Across metrics, a device whose readings carry several metrics also gets a cross-metric
//! channel (`joint`): each metric predicted from the others by least squares, the largest
//! standardised residual smoothed and judged like the channels above. It alerts when a
//! relationship breaks (temperature rising at constant current) while each value on its own
//! looks ordinary. It and the per-metric channels share incidents: within `recurrence_window`
//! readings of a cross-metric alert, neither it nor a per-metric channel of one of the model's
//! metrics alerts again, and within as many readings of such a per-metric alert it does not.
//!
//! A stuck-sensor check (`stuck_run`, see [`crate::stuck`]) reports a metric that normally
//! changes and then repeats one value for too long: the value is ordinary, so no channel above
//! sees it. From the reading where such a run becomes stuck until the value changes, the
//! metric's learned channels and the cross-metric channel skip its readings, so the frozen
//! stretch is neither reported twice nor learned as normal.
//!
//! Refitting is the only expensive step, so it is handed to the caller: `needs_refit` returns a
//! `RefitJob` that owns a copy of the training data, `RefitJob::run` is a pure function the
//! caller may run on any thread, and `install` puts the resulting model in place. Until then the
//! previous model keeps scoring. The evaluation simply runs the job inline.
//!
//! Windows are counted in readings, which suits devices that report at a steady rate. Time
//! stamps, when readings carry them, only bound the recurrence memory (`recurrence_span_s`),
//! give the sampling interval the forest smoothing adapts to (`avg_span_s`), and let the forest
//! channel's young margin and the early channel's start count time as well as readings
//! (`young_span_s`, `early_min_span_s`).
//!
//! Memory per metric is bounded by the configuration (`DetectorConfig::bytes_per_metric`): with
//! the defaults at most about 616 KB, typically about 240 KB (the forest's trees are rarely
//! full), and a device tracks at most `max_metrics` metrics.

use std::collections::VecDeque;

use linfa::dataset::DatasetBase;
use linfa::traits::Fit;
use linfa::ParamGuard;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::alert::{AlertKind, AlertMessage, Severity};
use crate::early::{EarlyOutliers, EarlyRule};
use crate::features::{FeatureState, N_FEATURES};
use crate::iforest::{IForestError, IsolationForest, IsolationForestParams};
use crate::joint::{JointError, JointModel, MAX_JOINT};
use crate::stuck::{RunRule, RunWatch, StuckCheck};
use crate::telemetry::{secs_to_ms, Reading};

/// Errors from the detector.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// The configuration is inconsistent.
    #[error("invalid detector configuration: {0}")]
    InvalidConfig(&'static str),
    /// Fitting the isolation forest failed.
    #[error("refit failed: {0}")]
    Fit(#[from] IForestError),
    /// Fitting the cross-metric model failed.
    #[error("cross-metric refit failed: {0}")]
    Joint(#[from] JointError),
}

/// Tuning of the streaming detector. The defaults are general-purpose settings (isolation
/// forest: 100 trees, subsample 256; anomaly likelihood: 10-point smoothing judged against the
/// last 1000 points, alert at a one-in-100,000 tail, recurrence check over the same 1000 points)
/// and are not fitted to any data file.
///
/// It deserialises with every field optional (missing fields keep their defaults), so a
/// service can embed it in its own configuration file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Points seen before the first model is fitted; no scores or alerts before that.
    pub warmup: usize,
    /// Most recent feature vectors kept for training.
    pub window: usize,
    /// Size of a uniform sample of older feature vectors also used for training (0 disables):
    /// it lets the forest remember regimes older than the recent window.
    pub reservoir: usize,
    /// Points between refits.
    pub refit_every: usize,
    /// Trees per forest.
    pub n_trees: usize,
    /// Rows drawn per tree.
    pub subsample: usize,
    /// Base seed; each refit derives its own seed from it so runs are reproducible.
    pub seed: u64,
    /// Points over which channel scores are smoothed.
    pub avg_window: usize,
    /// Time the forest channel's smoothing spans when readings carry time stamps: a metric
    /// sampled more slowly than `avg_span_s / avg_window` is smoothed over fewer readings (at
    /// least `avg_min_window`), so an hourly metric's one-reading spike is not averaged over
    /// ten hours (0: always `avg_window` readings).
    pub avg_span_s: u64,
    /// Fewest readings the forest channel's smoothing spans (see `avg_span_s`).
    pub avg_min_window: usize,
    /// Smoothed scores kept per channel to estimate their normal distribution.
    pub history: usize,
    /// Smoothed scores needed before alerts are allowed at all (a distribution estimated from
    /// fewer points is too unreliable to call anything a one-in-100,000 event); between this
    /// and `history` the bar is raised by `young_margin`.
    pub min_history: usize,
    /// Lower bound on the standard deviation of smoothed isolation scores, so a very regular
    /// signal does not turn tiny score wobbles into alerts: with 0.03 the smoothed score must
    /// rise by at least about 0.13 (a third of the usual spread of isolation scores) to alert.
    pub min_std: f64,
    /// The smoothed isolation score only counts as surprising if it is also at least this high
    /// in absolute terms; 0.5 is the isolation forest's own boundary between points that are
    /// easier to isolate than average and points that are not.
    pub min_smoothed_score: f64,
    /// Length of the subsequences compared by the shape-novelty channel (0 disables it).
    pub shape_len: usize,
    /// Recent values held for shape comparisons.
    pub shape_capacity: usize,
    /// Older subsequences kept (uniform sample) for shape comparisons (0 disables).
    pub shape_reservoir: usize,
    /// Lower bound on the standard deviation of smoothed shape-novelty scores.
    pub shape_min_std: f64,
    /// Alert when the upper-tail probability of a channel's smoothed score is at most this.
    pub alert_tail: f64,
    /// The reading interval, in seconds, at which `alert_tail` and `sustain_tail` apply as
    /// given (0 disables the scaling). A metric whose median interval between time-stamped
    /// readings is shorter gets both tails multiplied by its interval over this one, so its
    /// false alarms per day, not per reading, stay what they are at this pace: at one reading
    /// a second a healthy metric makes 300 times as many readings a day as at NAB's 5 minutes,
    /// and without the scaling raised about 13 false alerts a day on its own.
    pub alert_interval_s: u64,
    /// After an alert, the likelihood must drop below this before another alert is possible.
    pub rearm_likelihood: f64,
    /// After an alert, at least this many points pass before another alert.
    pub cooldown: usize,
    /// ... and, for time-stamped readings, at least this many seconds (0: readings only). A
    /// device that reports many times a second passes `cooldown` readings in seconds, while
    /// the incident (a bearing wearing out) lasts minutes: without this floor such a fault
    /// gave an alert every few seconds whenever its likelihood dipped and rose again. At
    /// NAB's 5-minute sampling the readings bound is the longer one (100 readings = 8 h).
    pub cooldown_s: u64,
    /// Most metrics tracked per device; further metrics are ignored.
    pub max_metrics: usize,
    /// Extra standard deviations demanded of an alert while a channel's score history is
    /// still filling: the bar is `z(alert_tail) + young_margin * (1 - filled / history)`, so
    /// the first alerts after the warm-up, judged against a distribution estimated from few
    /// points, must be clearly larger than later ones.
    pub young_margin: f64,
    /// Recurrence check: a channel's smoothed score only counts as surprising if it exceeds
    /// every smoothed score of the same channel from `recurrence_window` down to
    /// `recurrence_gap` points ago, so a periodic spike or a repeated batch job that the metric
    /// has already produced recently does not alert again (0 disables).
    pub recurrence_window: usize,
    /// The recurrence check also forgets smoothed scores older than this, when readings carry
    /// time stamps (0: only `recurrence_window` counts). For a slow metric (hourly, half-hourly)
    /// 1000 points are months: an excursion that old no longer masks a new one. Weekly and
    /// daily cycles stay remembered.
    pub recurrence_span_s: u64,
    /// Most recent smoothed scores left out of the recurrence check, so an incident's own
    /// rising edge cannot mask it.
    pub recurrence_gap: usize,
    /// Far tier of the recurrence check: a smoothed score between `recurrence_window` and this
    /// many points ago (within `recurrence_span_s`) still masks a new one whose rise above the
    /// channel's usual level (the mean of its score history) is no more than
    /// `recurrence_far_share` of its own rise, so an excursion clearly smaller than one the
    /// metric produced a few days ago is not news either, while a comparable one is (0
    /// disables).
    pub recurrence_far_window: usize,
    /// Share of an older peak's rise a smoothed score's rise must exceed to escape the far tier,
    /// in (0, 1].
    pub recurrence_far_share: f64,
    /// Long tier of the recurrence check, in time, for metrics read faster than the point tiers
    /// can remember (at one reading a second, 1000 and 3000 points are 17 and 50 minutes): a
    /// smoothed score is routine, and not news, when the channel made at least
    /// `recurrence_long_count` comparable excursions (peaks whose rise above the channel's
    /// usual level is at least `recurrence_far_share` of its own, and whose values strayed
    /// from the metric's 100-point mean at least that share as far as the current one) that
    /// ended at least `recurrence_gap` points and at most this many seconds ago. A door that
    /// opens every quarter of an hour, an hourly batch, a battery's steps: news the first few
    /// times, routine from then on. Time-stamped readings only; 0 disables. NAB's detections
    /// (five-minute and slower files) are the same with and without it.
    pub recurrence_long_span_s: u64,
    /// Comparable excursions within `recurrence_long_span_s` that make one routine (at least 1).
    /// One earlier incident alone never masks a second.
    pub recurrence_long_count: usize,
    /// Metrics in the device's cross-metric model (0 disables it, at most 8): the metrics of
    /// the first reading that carries two or more, in its order. Only readings carrying all of
    /// them are used; after `warmup` multi-metric readings in a row with another set, the model
    /// is rebuilt for that set.
    pub joint_metrics: usize,
    /// A metric is scored by the cross-metric model only if the device's other metrics explain
    /// at least this share of its variance (R² of its regression on them).
    pub joint_min_r2: f64,
    /// The cross-metric channel's smoothed residual must also be at least this many residual
    /// standard deviations to alert, whatever its standard score.
    pub joint_min_residual: f64,
    /// Sustained evidence: a channel also alerts when its standard score has stayed at or above
    /// the standard score of `sustain_tail` (plus the young margin) for `sustain_points` points
    /// in a row, so an incident that holds the score just under the `alert_tail` bar is still
    /// reported (0 disables).
    pub sustain_points: usize,
    /// Upper-tail probability of the sustained-evidence bar; it only adds alerts when it is
    /// looser (larger) than `alert_tail`.
    pub sustain_tail: f64,
    /// Early channel: until the learned channels' score history is full (`warmup + history`
    /// readings), a value also alerts when it lies `early_beyond` of the range outside every
    /// earlier value of the metric and at least this many robust standard deviations from
    /// their median (0 disables; see [`crate::early`]).
    pub early_bar: f64,
    /// Values the early channel needs before it judges any.
    pub early_min_points: usize,
    /// How far outside the earlier values' range a value must lie for the early channel, as a
    /// share of that range.
    pub early_beyond: f64,
    /// Time the early channel's values must span before it judges any, when readings carry
    /// time stamps (0: no such condition).
    pub early_min_span_s: u64,
    /// The forest channel's young margin also fades with time, when readings carry time
    /// stamps: it is `young_margin × min(1 − filled/history, 1 − t/young_span_s)`, `t` being
    /// the time since the metric's first scored reading, so a slow metric (hourly, or
    /// five-minutely with gaps) whose first scores already span several days is judged at the
    /// full bar before it has 1000 of them (0: readings only). The shape channel keeps the
    /// readings-only margin: its novelty is a distance to the nearest of the stretches seen so
    /// far, and it falls as their number grows, whatever time they span.
    pub young_span_s: u64,
    /// Half-life, in readings, of a long-horizon spread of the forest channel's smoothed
    /// scores (an exponentially weighted variance; a plain variance of every score while
    /// there are fewer than `half-life / ln 2` of them). The forest channel's standard score is
    /// measured against the larger of its score history's standard deviation and this spread,
    /// so a quiet stretch that shrinks the recent spread does not make a modest bump look
    /// extreme (0 disables).
    pub long_spread_half_life: usize,
    /// Extreme-value calibration of the forest channel (peaks over threshold, as in SPOT,
    /// Siffer et al., KDD 2017): a generalised Pareto distribution is fitted to the peaks of
    /// the channel's last `tail_fit_clusters` excursions above this quantile of its score
    /// history, and the channel's standard score is at most the one of the tail probability
    /// the fit gives its smoothed score. A Gaussian bar on a bursty metric's scores is crossed
    /// by bursts like the ones it produced before; the fit, over more of the past than the
    /// score history, knows how often such peaks come (0 disables). See "Extreme-value
    /// calibration of the forest channel" in the README.
    pub tail_fit_quantile: f64,
    /// Excursion peaks the tail fit keeps (one excursion ends after `avg_window` smoothed
    /// scores below the threshold, so the peaks of a 10-point smoothed series are not counted
    /// ten times).
    pub tail_fit_clusters: usize,
    /// Fewest excursion peaks above the current threshold a fit needs; with fewer the
    /// Gaussian standard score stands alone.
    pub tail_fit_min_peaks: usize,
    /// Smoothed scores between two fits (each costs a selection over the score history).
    pub tail_fit_every: usize,
    /// Level channel: the leak span, in readings, of a two-sided CUSUM of the value measured
    /// against a long-horizon baseline in units of its long-horizon spread (0 disables). The
    /// accumulated evidence decays by `1 − 1/level_span` per reading, so it weighs a sustained
    /// shift over about this many readings; the channel's score is judged like the others (its
    /// own score history, the recurrence check, the young margin), so a daily cycle or a regime
    /// the metric keeps returning to does not alert, while a level that stays away from the
    /// long-run one after the forest's refits have absorbed the change can. (A steady drift
    /// over thousands of readings does not: its evidence climbs as slowly as its history.)
    pub level_span: usize,
    /// Half-life, in readings, of the level channel's baseline (an exponentially weighted mean)
    /// and spread (standard deviation).
    pub level_half_life: usize,
    /// Slack of the level channel's CUSUM, in spreads: a reading adds evidence only by how far
    /// it lies beyond this many spreads from the baseline.
    pub level_k: f64,
    /// Each reading's standardised deviation is clipped to this many spreads before it adds
    /// to the level channel's CUSUM, so evidence of a shift takes several readings: one spike,
    /// however tall (the forest's business), adds at most `level_clip − level_k`.
    pub level_clip: f64,
    /// Decision threshold of the level channel's CUSUM (in spreads × readings): below it the
    /// channel's score never counts as surprising. Its score is 0 most of the time, so its
    /// history's spread alone would make any small excursion look extreme.
    pub level_floor: f64,
    /// Stuck-sensor check: a metric that keeps changing is reported when it repeats one value
    /// for at least this many readings in a row and `stuck_factor` times its longest run of
    /// the last one or two epochs of `history` readings (and a day, with time stamps); 0
    /// disables. See [`crate::stuck`].
    pub stuck_run: usize,
    /// How many times the longest remembered run a stuck run must reach.
    pub stuck_factor: usize,
    /// Value changes a metric must have made before the stuck-sensor check judges it.
    pub stuck_min_changes: usize,
    /// The stuck-sensor check only judges a metric whose remembered readings repeat their
    /// predecessor at most this share of the time (a set point, a counter resting at 0 or a
    /// coarsely quantised signal repeats itself often and is never judged).
    pub stuck_max_repeat_share: f64,
    /// Missing-metric check: a metric that has been in almost every reading of its device is
    /// reported when it is absent from this many of the device's readings in a row (and
    /// `stuck_factor` times its longest absence of the last one or two epochs), once it has
    /// been present 100 times; 0 disables. Only whole readings (`DeviceDetector::feed`) count.
    pub missing_readings: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            warmup: 256,
            window: 512,
            reservoir: 512,
            refit_every: 256,
            n_trees: 100,
            subsample: 256,
            seed: 0x0071_6115,
            avg_window: 10,
            avg_span_s: 3600,
            avg_min_window: 4,
            history: 1000,
            min_history: 150,
            min_std: 0.03,
            min_smoothed_score: 0.5,
            shape_len: 12,
            shape_capacity: 1024,
            shape_reservoir: 0,
            shape_min_std: 0.05,
            alert_tail: 1e-5,
            alert_interval_s: 300,
            rearm_likelihood: 0.99,
            cooldown: 100,
            cooldown_s: 900,
            max_metrics: 32,
            young_margin: 3.0,
            recurrence_window: 1000,
            recurrence_span_s: 7 * 86_400,
            recurrence_gap: 50,
            recurrence_far_window: 3000,
            recurrence_far_share: 0.75,
            recurrence_long_span_s: 86_400,
            recurrence_long_count: 3,
            joint_metrics: 8,
            joint_min_r2: 0.5,
            joint_min_residual: 3.0,
            sustain_points: 3,
            sustain_tail: 3e-5,
            early_bar: 10.0,
            early_min_points: 64,
            early_beyond: 0.5,
            early_min_span_s: 86_400,
            young_span_s: 4 * 86_400,
            long_spread_half_life: 10_000,
            tail_fit_quantile: 0.98,
            tail_fit_clusters: 64,
            tail_fit_min_peaks: 8,
            tail_fit_every: 25,
            level_span: 1200,
            level_half_life: 4000,
            level_k: 1.5,
            level_clip: 5.0,
            level_floor: 100.0,
            stuck_run: 30,
            stuck_factor: 4,
            stuck_min_changes: 100,
            stuck_max_repeat_share: 0.05,
            missing_readings: 30,
        }
    }
}

impl DetectorConfig {
    /// Checks the configuration for consistency.
    pub fn validate(&self) -> Result<(), DetectorError> {
        if self.warmup < 16 {
            return Err(DetectorError::InvalidConfig("warmup must be at least 16"));
        }
        if self.window < self.warmup {
            return Err(DetectorError::InvalidConfig(
                "window must be at least warmup",
            ));
        }
        if self.refit_every == 0
            || self.avg_window == 0
            || self.avg_min_window == 0
            || self.history == 0
        {
            return Err(DetectorError::InvalidConfig(
                "refit_every, avg_window, avg_min_window and history must be positive",
            ));
        }
        if !(self.alert_tail > 0.0 && self.alert_tail < 0.5) {
            return Err(DetectorError::InvalidConfig(
                "alert_tail must be in (0, 0.5)",
            ));
        }
        if !(self.sustain_tail > 0.0 && self.sustain_tail < 0.5) {
            return Err(DetectorError::InvalidConfig(
                "sustain_tail must be in (0, 0.5)",
            ));
        }
        if !(self.rearm_likelihood > 0.0 && self.rearm_likelihood < 1.0) {
            return Err(DetectorError::InvalidConfig(
                "rearm_likelihood must be in (0, 1)",
            ));
        }
        if !(self.min_std > 0.0 && self.shape_min_std > 0.0) {
            return Err(DetectorError::InvalidConfig(
                "min_std and shape_min_std must be positive",
            ));
        }
        if self.shape_len > 0 && self.shape_capacity < 3 * self.shape_len {
            return Err(DetectorError::InvalidConfig(
                "shape_capacity must be at least 3 * shape_len",
            ));
        }
        if self.min_history > self.history {
            return Err(DetectorError::InvalidConfig(
                "min_history must not exceed history",
            ));
        }
        if !(self.tail_fit_quantile >= 0.0 && self.tail_fit_quantile < 1.0) {
            return Err(DetectorError::InvalidConfig(
                "tail_fit_quantile must be in [0, 1)",
            ));
        }
        if self.tail_fit_quantile > 0.0
            && (self.tail_fit_every == 0
                || self.tail_fit_min_peaks < 3
                || self.tail_fit_clusters < self.tail_fit_min_peaks)
        {
            return Err(DetectorError::InvalidConfig(
                "tail fit: tail_fit_every must be positive and tail_fit_clusters >= tail_fit_min_peaks >= 3",
            ));
        }
        if !(self.young_margin >= 0.0 && self.young_margin.is_finite()) {
            return Err(DetectorError::InvalidConfig(
                "young_margin must be finite and not negative",
            ));
        }
        if self.recurrence_window > 0 && self.recurrence_gap >= self.recurrence_window {
            return Err(DetectorError::InvalidConfig(
                "recurrence_gap must be smaller than recurrence_window",
            ));
        }
        let far_ok = self.recurrence_far_window == 0
            || (self.recurrence_far_window > self.recurrence_window
                && self.recurrence_far_share > 0.0
                && self.recurrence_far_share <= 1.0);
        if !far_ok {
            return Err(DetectorError::InvalidConfig(
                "recurrence_far_window must be 0 (off) or larger than recurrence_window, \
                 with recurrence_far_share in (0, 1]",
            ));
        }
        if self.recurrence_long_span_s > 0 && self.recurrence_long_count == 0 {
            return Err(DetectorError::InvalidConfig(
                "recurrence_long_count must be at least 1 while recurrence_long_span_s is not 0",
            ));
        }
        if self.max_metrics == 0 {
            return Err(DetectorError::InvalidConfig("max_metrics must be positive"));
        }
        if self.joint_metrics == 1 || self.joint_metrics > MAX_JOINT {
            return Err(DetectorError::InvalidConfig(
                "joint_metrics must be 0 (off) or 2 to 8",
            ));
        }
        let r2_ok = self.joint_min_r2 > 0.0 && self.joint_min_r2 < 1.0;
        let residual_ok = self.joint_min_residual >= 0.0 && self.joint_min_residual.is_finite();
        if !(r2_ok && residual_ok) {
            return Err(DetectorError::InvalidConfig(
                "joint_min_r2 must be in (0, 1) and joint_min_residual finite and not negative",
            ));
        }
        let early_ok = self.early_bar >= 0.0
            && self.early_bar.is_finite()
            && self.early_beyond >= 0.0
            && self.early_beyond.is_finite();
        if !early_ok {
            return Err(DetectorError::InvalidConfig(
                "early_bar and early_beyond must be finite and not negative",
            ));
        }
        let level_ok = self.level_k >= 0.0
            && self.level_k.is_finite()
            && self.level_clip > 0.0
            && self.level_clip.is_finite()
            && self.level_floor.is_finite()
            && self.level_half_life > 0;
        if !level_ok {
            return Err(DetectorError::InvalidConfig(
                "level_k, level_clip and level_floor must be finite, level_k not negative, \
                 level_clip and level_half_life positive",
            ));
        }
        if !(0.0..=1.0).contains(&self.stuck_max_repeat_share) {
            return Err(DetectorError::InvalidConfig(
                "stuck_max_repeat_share must be in [0, 1]",
            ));
        }
        self.forest_params().check_ref()?;
        Ok(())
    }

    fn forest_params(&self) -> IsolationForestParams {
        IsolationForestParams::new()
            .n_trees(self.n_trees)
            .subsample(self.subsample)
    }

    /// The stuck-sensor check's rule; its epochs are `history` readings long (and a day).
    fn stuck_rule(&self) -> RunRule {
        let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        RunRule {
            min_run: narrow(self.stuck_run),
            factor: narrow(self.stuck_factor),
            min_changes: narrow(self.stuck_min_changes),
            max_repeat_share: self.stuck_max_repeat_share,
            epoch_readings: narrow(self.history),
        }
    }

    /// The missing-metric check's rule: a run is the readings since the metric was last
    /// present, that reading included, so `missing_readings` absences make `missing_readings
    /// + 1`; how often a metric is absent does not matter, only how long.
    fn missing_rule(&self) -> RunRule {
        RunRule {
            min_run: u32::try_from(self.missing_readings.saturating_add(1)).unwrap_or(u32::MAX),
            max_repeat_share: 1.0,
            ..self.stuck_rule()
        }
    }

    /// `recurrence_long_span_s` in milliseconds; `None` when the long tier is off.
    fn recurrence_long_span_ms(&self) -> Option<i64> {
        (self.recurrence_long_span_s > 0).then(|| secs_to_ms(self.recurrence_long_span_s))
    }

    /// `recurrence_span_s` in milliseconds; `None` when it is 0 (no limit in time).
    fn recurrence_span_ms(&self) -> Option<i64> {
        (self.recurrence_span_s > 0).then(|| secs_to_ms(self.recurrence_span_s))
    }

    /// Upper bound of the heap memory one metric takes: the training vectors, the score
    /// histories, the shape buffers and the worst-case forest (`n_trees * (2 * subsample - 1)`
    /// nodes of 8 bytes). A refit job temporarily holds one more copy of the training vectors.
    pub fn bytes_per_metric(&self) -> usize {
        let training = (self.window + self.reservoir) * N_FEATURES * 8;
        let channels = if self.level_span > 0 { 3 } else { 2 };
        let scores = (channels * self.history + self.avg_window) * 8 + CADENCE_SAMPLES * 8;
        let shape = (self.shape_capacity + self.shape_reservoir * self.shape_len) * 8;
        let forest = self.n_trees * (2 * self.subsample.min(self.window + self.reservoir) - 1) * 8
            + self.n_trees * 4;
        // Two or three channels' recurrence queues.
        let recurrence = channels * self.bytes_recurrence();
        // The early channel's values and scratch copy, held only while the channels are young.
        let early = if self.early_bar > 0.0 {
            2 * (self.warmup + self.history) * 8
        } else {
            0
        };
        // The forest channel's excursion peaks, and the copy of its score history a tail fit
        // selects the threshold from (a per-thread scratch buffer; counted here as an upper bound).
        let tail = if self.tail_fit_quantile > 0.0 {
            self.tail_fit_clusters * 16 + self.history * 8
        } else {
            0
        };
        std::mem::size_of::<MetricDetector>()
            + training
            + scores
            + shape
            + forest
            + recurrence
            + early
            + tail
    }

    /// Upper bound of one channel's recurrence queues: at most `recurrence_window` (index,
    /// value, time) entries plus the `recurrence_gap` (value, time) pairs not yet eligible,
    /// as many block maxima for the far tier, and `LONG_PEAKS` excursion peaks for the long
    /// tier.
    fn bytes_recurrence(&self) -> usize {
        let near = if self.recurrence_window > 0 {
            self.recurrence_window * 24 + self.recurrence_gap * 16
        } else {
            0
        };
        let far = if self.recurrence_far_window > 0 {
            self.recurrence_far_window.div_ceil(FAR_BLOCK) * 24
                + self.recurrence_gap.div_ceil(FAR_BLOCK) * 16
        } else {
            0
        };
        let long = if self.recurrence_long_span_s > 0 {
            LONG_PEAKS * 32
        } else {
            0
        };
        near + far + long
    }

    /// Upper bound of the memory one device takes (`max_metrics` metrics plus names, and the
    /// cross-metric channel).
    pub fn bytes_per_device(&self) -> usize {
        self.max_metrics * (self.bytes_per_metric() + 64) + self.bytes_joint()
    }

    /// Upper bound of the cross-metric channel's memory: its training rows, score history and
    /// recurrence queue, the model and the metric names.
    pub fn bytes_joint(&self) -> usize {
        if self.joint_metrics == 0 {
            return 0;
        }
        let rows = (self.window + self.reservoir) * MAX_JOINT * 8;
        let scores = (self.history + self.avg_window) * 8;
        let recurrence = self.bytes_recurrence();
        std::mem::size_of::<JointChannel>()
            + std::mem::size_of::<JointModel>()
            + rows
            + scores
            + recurrence
            + self.joint_metrics * 64
    }
}

/// A training job handed to the caller. It owns everything it needs, so it can be sent to a
/// worker thread; `run` is pure and deterministic.
#[derive(Debug, Clone)]
pub struct RefitJob {
    /// The metric the model is for (for the cross-metric model: its metrics joined by `+`).
    pub metric: String,
    /// Generation the resulting model will have; stale models are ignored by `install`.
    pub generation: u64,
    /// The detector's `restarts` when the job was handed out: a model fitted on what it
    /// learned before a restart is refused by `install`.
    epoch: u64,
    work: Work,
}

#[derive(Debug, Clone)]
enum Work {
    Forest {
        data: Array2<f64>,
        params: IsolationForestParams,
    },
    Joint {
        data: Array2<f64>,
        min_r2: f64,
    },
}

impl RefitJob {
    /// Number of training rows.
    pub fn rows(&self) -> usize {
        match &self.work {
            Work::Forest { data, .. } | Work::Joint { data, .. } => data.nrows(),
        }
    }

    /// Fits the model. This is the expensive step (a few milliseconds for a forest with the
    /// defaults, well under one for the cross-metric model).
    pub fn run(self) -> Result<TrainedModel, DetectorError> {
        let model = match self.work {
            Work::Forest { data, params } => {
                let dataset = DatasetBase::new(data, ());
                Model::Forest(<IsolationForestParams as Fit<
                    Array2<f64>,
                    (),
                    IForestError,
                >>::fit(&params, &dataset)?)
            }
            Work::Joint { data, min_r2 } => Model::Joint(Box::new(JointModel::fit(&data, min_r2)?)),
        };
        Ok(TrainedModel {
            metric: self.metric,
            generation: self.generation,
            epoch: self.epoch,
            model,
        })
    }
}

/// A model produced by `RefitJob::run`, ready for `DeviceDetector::install`.
#[derive(Debug, Clone)]
pub struct TrainedModel {
    /// The metric the model is for (as in the job).
    pub metric: String,
    /// Generation of the job that produced it.
    pub generation: u64,
    /// The detector's restarts when the job was handed out.
    epoch: u64,
    /// The fitted model.
    pub model: Model,
}

/// A fitted model of either kind.
#[derive(Debug, Clone)]
pub enum Model {
    /// One metric's isolation forest.
    Forest(IsolationForest),
    /// The device's cross-metric model (boxed: about 800 bytes of fixed-size arrays).
    Joint(Box<JointModel>),
}

/// The detector's verdict on one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointOutcome {
    /// Anomaly likelihood in 0..1 (0 while warming up): the probability that the smoothed
    /// isolation score is lower than it is now under the recent normal behaviour.
    pub score: f64,
    /// The raw isolation forest score, once a model exists.
    pub raw_score: Option<f64>,
    /// Set on the point that opens an incident; `None` on all other points.
    pub alert: Option<Severity>,
    /// Set when the alert is the stuck-sensor check's: the readings in a row that have carried
    /// this same value.
    pub stuck: Option<u32>,
}

/// Mean and variance over the last `cap` values of a stream, in O(1) per value.
#[derive(Debug, Clone, Default)]
struct RollingStats {
    buf: VecDeque<f64>,
    sum: f64,
    sumsq: f64,
    pushes: u64,
}

impl RollingStats {
    fn len(&self) -> usize {
        self.buf.len()
    }

    /// Standard score of `x` against the held values (standard deviation at least `min_std`);
    /// 0 with fewer than two values.
    fn z(&self, x: f64, min_std: f64) -> f64 {
        let n = self.buf.len();
        if n < 2 || x.is_nan() {
            return 0.0;
        }
        let x = x.clamp(-1e150, 1e150);
        let mean = self.sum / n as f64;
        let var = (self.sumsq / n as f64 - mean * mean).max(0.0);
        (x - mean) / var.sqrt().max(min_std)
    }

    fn push(&mut self, x: f64, cap: usize) {
        // Clamp so that squares cannot overflow and poison the running sums.
        let x = if x.is_nan() {
            0.0
        } else {
            x.clamp(-1e150, 1e150)
        };
        if self.buf.len() >= cap {
            if let Some(old) = self.buf.pop_front() {
                self.sum -= old;
                self.sumsq -= old * old;
            }
        }
        self.buf.push_back(x);
        self.sum += x;
        self.sumsq += x * x;
        self.pushes += 1;
        // Recompute the sums from scratch now and then so floating-point drift of the running
        // sums cannot accumulate over a stream of billions of points.
        if self.pushes % 4096 == 0 {
            self.sum = self.buf.iter().sum();
            self.sumsq = self.buf.iter().map(|v| v * v).sum();
        }
    }
}

/// Spread of a stream over a long horizon in O(1) memory: an exponentially weighted mean and
/// variance with the given half-life (in values), which are the plain mean and variance of
/// every value while there are fewer than `half_life / ln 2` of them, so the first values do
/// not weigh more than later ones.
#[derive(Debug, Clone, Default)]
struct LongSpread {
    n: u64,
    mean: f64,
    var: f64,
}

impl LongSpread {
    fn std(&self) -> f64 {
        self.var.max(0.0).sqrt()
    }

    fn push(&mut self, x: f64, half_life: usize) {
        if x.is_nan() || half_life == 0 {
            return;
        }
        let x = x.clamp(-1e150, 1e150);
        self.n += 1;
        let alpha = (1.0 / self.n as f64).max(std::f64::consts::LN_2 / half_life as f64);
        let d = x - self.mean;
        let inc = alpha * d;
        self.mean += inc;
        self.var = (1.0 - alpha) * (self.var + d * inc);
    }
}

/// The level channel's state: a long-horizon baseline and spread of the value (exponentially
/// weighted, half-life `level_half_life`; the plain mean and variance while there are fewer
/// than `half-life / ln 2` values) and a leaky two-sided CUSUM of the value standardised by
/// them. 40 bytes, O(1) per value.
#[derive(Debug, Clone, Default)]
struct LevelState {
    base: LongSpread,
    up: f64,
    down: f64,
}

impl LevelState {
    /// Feeds `x`: returns the accumulated evidence of a sustained shift of the level in either
    /// direction (measured against the baseline before `x`), then lets the baseline learn `x`.
    fn update(&mut self, cfg: &DetectorConfig, x: f64) -> Option<f64> {
        if !x.is_finite() {
            return None;
        }
        let x = x.clamp(-1e150, 1e150);
        let known = self.base.n >= 2;
        if known {
            let sd = self.base.std().max(1e-9 * self.base.mean.abs()).max(1e-12);
            let z = ((x - self.base.mean) / sd).clamp(-cfg.level_clip, cfg.level_clip);
            let leak = 1.0 - 1.0 / cfg.level_span.max(1) as f64;
            self.up = (leak * self.up + z - cfg.level_k).max(0.0);
            self.down = (leak * self.down - z - cfg.level_k).max(0.0);
        }
        // The baseline learns the value clipped to `level_clip` spreads (once it has a spread),
        // so one gross outlier cannot inflate the spread and blind the channel for thousands
        // of readings, while a lasting new level is still followed.
        let learned = match self.base.std() {
            sd if self.base.n >= 32 && sd > 0.0 => {
                let reach = cfg.level_clip * sd;
                x.clamp(self.base.mean - reach, self.base.mean + reach)
            }
            _ => x,
        };
        self.base.push(learned, cfg.level_half_life);
        if !(self.up.is_finite() && self.down.is_finite() && self.base.var.is_finite()) {
            *self = Self::default();
            return None;
        }
        known.then(|| self.up.max(self.down))
    }
}

/// Maximum of the values pushed between `window` and `gap` pushes ago, in amortised O(1) per
/// value (a monotonic queue), leaving out values stamped before a time given by
/// `forget_before`. Holds at most `window` values.
#[derive(Debug, Clone, Default)]
struct LaggedMax {
    /// The last `gap` values with their time stamps, not yet eligible.
    pending: VecDeque<(f64, i64)>,
    /// (push index, value, time stamp) with decreasing values: the candidates for the maximum.
    peaks: VecDeque<(u64, f64, i64)>,
    pushes: u64,
}

/// The time stamp of a value that came without one: never too old.
const NO_TIME: i64 = i64::MAX;

impl LaggedMax {
    fn max(&self) -> Option<f64> {
        self.peaks.front().map(|&(_, v, _)| v)
    }

    /// Forgets the values stamped before `cutoff_ms`. Candidates are in push order, and time
    /// stamps almost always are too; one that is not stays until the values before it have
    /// gone (the `window` bound holds whatever the stamps).
    fn forget_before(&mut self, cutoff_ms: i64) {
        while self.peaks.front().is_some_and(|&(_, _, t)| t < cutoff_ms) {
            self.peaks.pop_front();
        }
    }

    /// Adds `x`, stamped `at_ms` (if known), then forgets what is older than `window` pushes.
    fn push(&mut self, x: f64, at_ms: Option<i64>, window: usize, gap: usize) {
        if x.is_nan() {
            return;
        }
        self.pending.push_back((x, at_ms.unwrap_or(NO_TIME)));
        // Values older than `gap` pushes become candidates; a candidate is dropped as soon as a
        // later, at least as large one arrives, so the queue is decreasing and its front is the
        // maximum.
        while self.pending.len() > gap {
            let Some((v, t)) = self.pending.pop_front() else {
                break;
            };
            // Push index of `v`: the current value has index `pushes`, and the values still
            // pending after `v` are the ones just before it.
            let idx = self.pushes.saturating_sub(self.pending.len() as u64);
            while self.peaks.back().is_some_and(|&(_, p, _)| p <= v) {
                self.peaks.pop_back();
            }
            self.peaks.push_back((idx, v, t));
        }
        self.pushes += 1;
        let oldest = self.pushes.saturating_sub(window as u64);
        while self.peaks.front().is_some_and(|&(i, _, _)| i < oldest) {
            self.peaks.pop_front();
        }
    }
}

/// The training rows of one model: the most recent `window` rows, plus a uniform sample of
/// everything older (`reservoir` rows, Algorithm R), so a model keeps knowing regimes older
/// than the recent window at a fixed memory cost.
#[derive(Debug, Clone)]
struct TrainingSet<T> {
    recent: VecDeque<T>,
    reservoir: Vec<T>,
    evicted: u64,
    rng: Xoshiro256PlusPlus,
}

impl<T: Copy> TrainingSet<T> {
    fn new(cfg: &DetectorConfig) -> Self {
        Self {
            recent: VecDeque::with_capacity(cfg.window),
            reservoir: Vec::new(),
            evicted: 0,
            rng: Xoshiro256PlusPlus::seed_from_u64(cfg.seed),
        }
    }

    /// Adds a row; the oldest recent row is offered to the reservoir when the window is full.
    fn push(&mut self, cfg: &DetectorConfig, row: T) {
        if self.recent.len() == cfg.window {
            if let Some(old) = self.recent.pop_front() {
                self.remember(cfg, old);
            }
        }
        self.recent.push_back(row);
    }

    fn remember(&mut self, cfg: &DetectorConfig, row: T) {
        if cfg.reservoir == 0 {
            return;
        }
        self.evicted += 1;
        if self.reservoir.len() < cfg.reservoir {
            self.reservoir.push(row);
        } else {
            let j = self.rng.gen_range(0..self.evicted);
            if let Some(slot) = usize::try_from(j)
                .ok()
                .and_then(|j| self.reservoir.get_mut(j))
            {
                *slot = row;
            }
        }
    }

    /// Every training row: the reservoir, then the recent ones, oldest first.
    fn rows(&self) -> impl Iterator<Item = &T> {
        self.reservoir.iter().chain(self.recent.iter())
    }

    fn len(&self) -> usize {
        self.reservoir.len() + self.recent.len()
    }

    /// Every training row as a matrix of its first `cols` values, oldest first.
    fn matrix(&self, cols: usize) -> Array2<f64>
    where
        T: AsRef<[f64]>,
    {
        let mut data = Array2::zeros((self.len(), cols));
        for (mut row, values) in data.rows_mut().into_iter().zip(self.rows()) {
            for (d, s) in row.iter_mut().zip(values.as_ref()) {
                *d = *s;
            }
        }
        data
    }
}

/// When a model is due for a refit, and which generation the next one gets.
#[derive(Debug, Clone, Default)]
struct RefitClock {
    generation: u64,
    /// Generation and point count of a job handed out but not installed yet.
    pending: Option<(u64, u64)>,
    since_fit: usize,
    points: u64,
}

impl RefitClock {
    fn tick(&mut self) {
        self.points += 1;
        self.since_fit += 1;
    }

    /// The generation of a job to hand out now, if one is due: the first once `recent` rows
    /// reach the warm-up, then one every `refit_every` points.
    fn due(&mut self, cfg: &DetectorConfig, has_model: bool, recent: usize) -> Option<u64> {
        let due = if has_model {
            self.since_fit >= cfg.refit_every
        } else {
            recent >= cfg.warmup
        };
        if !due {
            return None;
        }
        // A job handed out and never installed (the worker died, the caller dropped it) is
        // re-issued after a few refit periods instead of blocking refits for ever.
        if let Some((_, issued_at)) = self.pending {
            if self.points.saturating_sub(issued_at) < 4 * cfg.refit_every as u64 {
                return None;
            }
        }
        let generation = self.generation + 1;
        self.pending = Some((generation, self.points));
        Some(generation)
    }

    /// Records that the model of `generation` is installed; false if it is stale.
    fn install(&mut self, generation: u64) -> bool {
        if generation <= self.generation {
            return false;
        }
        self.generation = generation;
        self.since_fit = 0;
        if self.pending.is_some_and(|(g, _)| g <= generation) {
            self.pending = None;
        }
        true
    }
}

/// Smoothed scores per block of the recurrence check's far tier: its queue holds block maxima,
/// so it stays small (`recurrence_far_window / FAR_BLOCK` entries) whatever the scores do.
const FAR_BLOCK: usize = 10;

/// The far tier's maxima: the largest score of each block of `FAR_BLOCK` consecutive scores,
/// from `recurrence_far_window` down to `recurrence_gap` points back (both rounded up to whole
/// blocks), with the time stamp of that score.
#[derive(Debug, Clone, Default)]
struct FarPeaks {
    /// The block being filled: its largest score and that score's time stamp.
    block: Option<(f64, Option<i64>)>,
    filled: usize,
    blocks: LaggedMax,
}

impl FarPeaks {
    fn push(&mut self, cfg: &DetectorConfig, x: f64, at_ms: Option<i64>) {
        if x.is_nan() {
            return;
        }
        if self.block.map_or(true, |(m, _)| x > m) {
            self.block = Some((x, at_ms));
        }
        self.filled += 1;
        if self.filled == FAR_BLOCK {
            if let Some((m, t)) = self.block.take() {
                self.blocks.push(
                    m,
                    t,
                    cfg.recurrence_far_window.div_ceil(FAR_BLOCK),
                    cfg.recurrence_gap.div_ceil(FAR_BLOCK),
                );
            }
            self.filled = 0;
        }
    }
}

/// Excursion peaks the long tier keeps per channel (the most recent; older ones are dropped
/// first). A channel that makes more excursions than this in `recurrence_long_span_s` finds
/// enough comparable ones among the most recent.
const LONG_PEAKS: usize = 64;

/// A channel's smoothed score is in an excursion, for the long tier, while its standard score
/// (before the recurrence checks) is at least this.
const LONG_EXCURSION_Z: f64 = 4.0;

/// The long tier's memory: the peaks of a channel's recent excursions (highest smoothed score,
/// and largest size: how far the metric's values strayed, in its own units), each with the
/// push count and time stamp at which it ended. Excursions are runs of standard scores at or
/// above `LONG_EXCURSION_Z`, ended by `avg_window` scores below it; only time-stamped ones
/// count.
#[derive(Debug, Clone, Default)]
struct LongPeaks {
    peaks: VecDeque<(f64, f64, u64, i64)>,
    /// The running excursion's peak score and size, and the scores below the bar since it.
    cur: Option<(f64, f64)>,
    below: usize,
    pushes: u64,
}

impl LongPeaks {
    /// Whether `avg` (of a point of size `size`; NaN: not known) is routine: at least
    /// `recurrence_long_count` excursions that ended at least `recurrence_gap` scores and at
    /// most `recurrence_long_span_s` before `now_ms` peaked with a rise above `base` of at
    /// least `recurrence_far_share` of `avg`'s, and strayed at least that share of `size`.
    /// The size matters because the channels' scores saturate: a bump three times as high
    /// can score as one seen before.
    fn routine(&self, cfg: &DetectorConfig, avg: f64, size: f64, base: f64, now_ms: i64) -> bool {
        let Some(span_ms) = cfg.recurrence_long_span_ms() else {
            return false;
        };
        let rise = avg - base;
        if rise.is_nan() || rise <= 0.0 {
            return false;
        }
        let reach = cfg.recurrence_gap as u64;
        let need = cfg.recurrence_long_count.max(1);
        let share = cfg.recurrence_far_share;
        self.peaks
            .iter()
            .filter(|&&(peak, strayed, at, t)| {
                // Peaks stamped after `now_ms` (a device clock set back) do not count.
                self.pushes.saturating_sub(at) >= reach
                    && (0..=span_ms).contains(&now_ms.saturating_sub(t))
                    && peak - base >= share * rise
                    // A size not known (NaN) on either side does not decide.
                    && (strayed.is_nan() || size.is_nan() || strayed >= share * size)
            })
            .take(need)
            .count()
            >= need
    }

    /// Records `avg` with its standard score `z` (before the recurrence checks) and its
    /// point's size.
    fn push(&mut self, cfg: &DetectorConfig, avg: f64, z: f64, size: f64, now_ms: i64) {
        self.pushes += 1;
        if z >= LONG_EXCURSION_Z {
            self.cur = Some(match self.cur {
                None => (avg, size),
                Some((p, s)) => (p.max(avg), s.max(size)),
            });
            self.below = 0;
        } else if let Some((peak, strayed)) = self.cur {
            // The score lags the values: the excursion's size keeps growing while it lasts.
            self.cur = Some((peak, strayed.max(size)));
            self.below += 1;
            if self.below >= cfg.avg_window.max(1) {
                if self.peaks.len() >= LONG_PEAKS {
                    self.peaks.pop_front();
                }
                self.peaks
                    .push_back((peak, strayed.max(size), self.pushes, now_ms));
                self.cur = None;
            }
        }
        if let Some(span_ms) = cfg.recurrence_long_span_ms() {
            let cutoff = now_ms.saturating_sub(span_ms);
            while self.peaks.front().is_some_and(|p| p.3 < cutoff) {
                self.peaks.pop_front();
            }
        }
    }
}

/// A channel's smoothed scores judged against their own recent history: the standard score and
/// the recurrence check (near, far and long tiers).
#[derive(Debug, Clone, Default)]
struct ScoreHistory {
    hist: RollingStats,
    peak: LaggedMax,
    far: FarPeaks,
    long: LongPeaks,
}

/// What only the forest channel's judgement uses: the long-horizon spread that floors its
/// spread (`long_spread_half_life`) and the extreme-value fit that caps its standard score
/// (`tail_fit_quantile`). Kept beside that channel's `ScoreHistory`, not in every channel's.
#[derive(Debug, Clone, Default)]
struct ForestCalibration {
    long: LongSpread,
    tail: TailFit,
}

thread_local! {
    /// Scratch space for `TailFit::refit`, one per thread and reused, so that a fit allocates
    /// nothing once the buffer has grown to a score history's length (8 KB with the defaults).
    static TAIL_SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Peaks over threshold on declustered excursions: the peaks of the last excursions of a
/// channel's smoothed scores above a high quantile `t` of its score history, with a
/// generalised Pareto distribution fitted to their excesses by probability-weighted moments
/// (Hosking and Wallis, 1987), so a score `x > t` peaks an excursion that high with
/// probability `rate (1 + xi (x - t) / sigma)^(-1/xi)` per score (`rate`: excursions above
/// `t` per score over the span the peaks cover). Smoothed scores come in runs, so their
/// exceedances are not independent; one peak per excursion is (nearly).
#[derive(Debug, Clone, Default)]
struct TailFit {
    /// Peaks of the last `tail_fit_clusters` excursions, with the push count at which each
    /// ended.
    peaks: VecDeque<(f64, u64)>,
    /// The running excursion's peak, and the scores at or below the threshold since it.
    cur: Option<f64>,
    below: usize,
    pushes: u64,
    since_fit: usize,
    /// The threshold excursions are measured against (the last fit's quantile).
    t: Option<f64>,
    /// The fit: scale, shape and excursions per score.
    fit: Option<(f64, f64, f64)>,
}

impl TailFit {
    /// The probability per score of an excursion peaking above `x` (at or below the
    /// threshold: that of any excursion); None without a fit.
    fn tail(&self, x: f64) -> Option<f64> {
        let ((sigma, xi, rate), t) = (self.fit?, self.t?);
        if x.is_nan() || x <= t {
            return Some(rate);
        }
        let y = (x - t) / sigma;
        if xi.abs() < 1e-9 {
            return Some(rate * (-y).exp());
        }
        let b = 1.0 + xi * y;
        Some(if b <= 0.0 {
            0.0
        } else {
            rate * b.powf(-1.0 / xi)
        })
    }

    /// Records `x` (just added to `hist`) and refits every `tail_fit_every` scores.
    fn push(&mut self, cfg: &DetectorConfig, x: f64, hist: &VecDeque<f64>) {
        self.pushes += 1;
        if let Some(t) = self.t {
            if x > t {
                self.cur = Some(self.cur.map_or(x, |c| c.max(x)));
                self.below = 0;
            } else if let Some(peak) = self.cur {
                self.below += 1;
                if self.below >= cfg.avg_window {
                    while self.peaks.len() >= cfg.tail_fit_clusters.max(1) {
                        self.peaks.pop_front();
                    }
                    self.peaks.push_back((peak, self.pushes));
                    self.cur = None;
                }
            }
        }
        self.since_fit += 1;
        if self.since_fit >= cfg.tail_fit_every.max(1) {
            self.since_fit = 0;
            self.refit(cfg, hist);
        }
    }

    fn refit(&mut self, cfg: &DetectorConfig, hist: &VecDeque<f64>) {
        TAIL_SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut buf) => self.refit_in(cfg, hist, &mut buf),
            Err(_) => self.refit_in(cfg, hist, &mut Vec::new()),
        });
    }

    /// `refit` with `buf` as scratch space: first a copy of the history to select the
    /// threshold from, then the excesses of the peaks over it.
    fn refit_in(&mut self, cfg: &DetectorConfig, hist: &VecDeque<f64>, buf: &mut Vec<f64>) {
        self.fit = None;
        let n = hist.len();
        if n < cfg.min_history.max(2) {
            return;
        }
        buf.clear();
        buf.extend(hist.iter().copied());
        let idx = ((cfg.tail_fit_quantile * n as f64) as usize).min(n - 1);
        let (_, &mut t, _) = buf.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
        self.t = Some(t);
        let Some(&(_, oldest)) = self.peaks.front() else {
            return;
        };
        buf.clear();
        buf.extend(self.peaks.iter().filter(|p| p.0 > t).map(|p| p.0 - t));
        let y = buf;
        if y.len() < cfg.tail_fit_min_peaks.max(3) {
            return;
        }
        // Probability-weighted moments: a0 = E[y], a1 = E[y (1 - F(y))], plotting positions
        // (i - 0.35) / k.
        let k = y.len() as f64;
        y.sort_unstable_by(|a, b| a.total_cmp(b));
        let a0 = y.iter().sum::<f64>() / k;
        let a1 = y
            .iter()
            .enumerate()
            .map(|(i, &e)| (1.0 - (i as f64 + 0.65) / k) * e)
            .sum::<f64>()
            / k;
        let d = a0 - 2.0 * a1;
        if !(a0 > 0.0 && d > 0.0) {
            return;
        }
        let sigma = 2.0 * a0 * a1 / d;
        let xi = 2.0 - a0 / d;
        let span = (self.pushes.saturating_sub(oldest) as usize).max(n) as f64;
        if sigma > 0.0 && sigma.is_finite() && xi.is_finite() {
            self.fit = Some((sigma, xi, k / span));
        }
    }
}

impl ScoreHistory {
    /// Smoothed scores held.
    fn len(&self) -> usize {
        self.hist.len()
    }

    /// The standard score of `avg` against the history (spread at least `min_std`; with the
    /// forest channel's `calib` also at least the long-horizon spread, `long_spread_half_life`,
    /// and the score at most the standard score of the tail probability the extreme-value fit
    /// gives it, `tail_fit_quantile`), capped at 0 when `avg` is below `floor` or no higher
    /// than the channel's recent peak (the recurrence check); then records `avg`.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &mut self,
        cfg: &DetectorConfig,
        avg: f64,
        size: f64,
        at_ms: Option<i64>,
        min_std: f64,
        floor: f64,
        calib: Option<&mut ForestCalibration>,
    ) -> f64 {
        let tail_fit = calib.is_some() && cfg.tail_fit_quantile > 0.0;
        let long_floor = calib.is_some() && cfg.long_spread_half_life > 0;
        let min_std = match calib.as_deref() {
            Some(c) if long_floor => min_std.max(c.long.std()),
            _ => min_std,
        };
        let mut z = self.hist.z(avg, min_std);
        if avg < floor {
            z = z.min(0.0);
        }
        // The level the far tier measures excursions from: the history's mean before `avg`
        // joins it (isolation scores sit near 0.4-0.5 when nothing happens, so a share of the
        // raw score would mask almost nothing on the forest channel).
        // Only needed with the far or the long tier on.
        let n = self.hist.len();
        let long_tier = cfg.recurrence_long_span_s > 0 && at_ms.is_some();
        let base = if (cfg.recurrence_far_window > 0 || long_tier) && n > 0 {
            self.hist.sum / n as f64
        } else {
            0.0
        };
        // The extreme-value cap (forest channel). Only where the Gaussian score is high: the
        // inverse is a bisection, and lower scores are far from any alert bar.
        if let (true, Some(c)) = (tail_fit && z > 3.0, calib.as_deref()) {
            if let Some(p) = c.tail.tail(avg) {
                if p > 0.0 {
                    z = z.min(z_for_upper_tail(p.min(0.5)));
                }
            }
        }
        self.hist.push(avg, cfg.history);
        if let Some(c) = calib {
            if tail_fit {
                c.tail.push(cfg, avg, &self.hist.buf);
            }
            if long_floor {
                c.long.push(avg, cfg.long_spread_half_life);
            }
        }
        if let (Some(now), Some(span_ms)) = (at_ms, cfg.recurrence_span_ms()) {
            self.peak.forget_before(now.saturating_sub(span_ms));
            self.far.blocks.forget_before(now.saturating_sub(span_ms));
        }
        if let (true, Some(now)) = (long_tier, at_ms) {
            let routine = self.long.routine(cfg, avg, size, base, now);
            self.long.push(cfg, avg, z, size, now);
            if routine {
                z = z.min(0.0);
            }
        }
        if cfg.recurrence_window > 0 && self.peak.max().is_some_and(|m| avg <= m) {
            z = z.min(0.0);
        }
        if cfg.recurrence_far_window > 0 {
            let far_peak = self.far.blocks.max();
            if far_peak.is_some_and(|m| avg - base <= cfg.recurrence_far_share * (m - base)) {
                z = z.min(0.0);
            }
            self.far.push(cfg, avg, at_ms);
        }
        self.peak
            .push(avg, at_ms, cfg.recurrence_window, cfg.recurrence_gap);
        z
    }
}

/// The mean of the last `cap` values pushed into `buf`, after pushing `x`.
fn moving_mean(buf: &mut VecDeque<f64>, cap: usize, x: f64) -> f64 {
    while buf.len() >= cap.max(1) {
        buf.pop_front();
    }
    buf.push_back(x);
    buf.iter().sum::<f64>() / buf.len() as f64
}

/// Whether an alert at `at` (reading index, time stamp) and a reading at `now` belong to one
/// incident: fewer than `recurrence_window` readings (at least `cooldown`) apart and, like the
/// recurrence check, at most `recurrence_span_s` apart in time (when that is not 0).
fn same_incident(cfg: &DetectorConfig, at: (u64, i64), now: (u64, i64)) -> bool {
    let readings = cfg.recurrence_window.max(cfg.cooldown) as u64;
    now.0.saturating_sub(at.0) < readings
        && cfg
            .recurrence_span_ms()
            .map_or(true, |span_ms| now.1.saturating_sub(at.1) <= span_ms)
}

/// A metric's sampling interval: the median of the last `CADENCE_SAMPLES` positive intervals
/// between its time-stamped readings, first known after `CADENCE_FIRST` of them and then
/// recomputed every `CADENCE_SAMPLES`, so a gap or a burst does not move it.
#[derive(Debug, Clone, Default)]
struct Cadence {
    last_ms: Option<i64>,
    intervals: VecDeque<i64>,
    since: usize,
    median: Option<i64>,
}

const CADENCE_SAMPLES: usize = 63;
const CADENCE_FIRST: usize = 8;

impl Cadence {
    fn note(&mut self, at_ms: i64) {
        let interval = self.last_ms.map(|prev| at_ms.saturating_sub(prev));
        self.last_ms = Some(at_ms);
        let Some(d) = interval.filter(|&d| d > 0) else {
            return;
        };
        if self.intervals.len() == CADENCE_SAMPLES {
            self.intervals.pop_front();
        }
        self.intervals.push_back(d);
        self.since += 1;
        let first = self.median.is_none() && self.intervals.len() >= CADENCE_FIRST;
        if first || self.since >= CADENCE_SAMPLES {
            self.since = 0;
            let mut sorted = [0i64; CADENCE_SAMPLES];
            let n = self.intervals.len();
            for (slot, &d) in sorted.iter_mut().zip(&self.intervals) {
                *slot = d;
            }
            sorted[..n].sort_unstable();
            self.median = sorted[..n].get(n / 2).copied();
        }
    }

    fn median_ms(&self) -> Option<i64> {
        self.median
    }
}

/// One alert per incident: after an alert a channel stays silent until its likelihood has
/// dropped below `rearm_likelihood` and `cooldown` points (and `cooldown_s` seconds) have
/// passed.
#[derive(Debug, Clone)]
struct Debounce {
    cooldown_left: usize,
    /// Time stamp before which no alert opens (the alert's time plus `cooldown_s`).
    quiet_until_ms: Option<i64>,
    armed: bool,
    /// Standard score whose upper tail is `alert_tail`.
    alert_z: f64,
    /// Standard score whose upper tail is `sustain_tail`.
    sustain_z: f64,
    /// The reading interval the two bars are scaled for (`alert_interval_s`; `None`: as
    /// configured).
    interval_ms: Option<i64>,
    /// Consecutive points at or above the sustained-evidence bar.
    run: usize,
}

impl Debounce {
    fn new(cfg: &DetectorConfig) -> Self {
        Self {
            cooldown_left: 0,
            quiet_until_ms: None,
            armed: true,
            alert_z: z_for_upper_tail(cfg.alert_tail),
            sustain_z: z_for_upper_tail(cfg.sustain_tail),
            interval_ms: None,
            run: 0,
        }
    }

    /// Scales the bars to a metric read every `interval_ms` (`alert_interval_s`). Cheap when
    /// the interval has not changed, which is almost always (the median is recomputed every
    /// 63 readings).
    fn pace(&mut self, cfg: &DetectorConfig, interval_ms: Option<i64>) {
        if interval_ms == self.interval_ms {
            return;
        }
        self.interval_ms = interval_ms;
        let reference_ms = secs_to_ms(cfg.alert_interval_s) as f64;
        let share = match interval_ms {
            Some(step) if reference_ms > 0.0 => (step as f64 / reference_ms).min(1.0),
            _ => 1.0,
        };
        self.alert_z = z_for_upper_tail(cfg.alert_tail * share);
        self.sustain_z = z_for_upper_tail(cfg.sustain_tail * share);
    }

    /// The alert this point raises, if any, given its standard score `z`, its likelihood
    /// `score`, the `n` smoothed scores it was judged against and its time stamp.
    fn judge(
        &mut self,
        cfg: &DetectorConfig,
        z: f64,
        score: f64,
        n: usize,
        at_ms: Option<i64>,
    ) -> Option<Severity> {
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
        }
        if !self.armed && score < cfg.rearm_likelihood {
            self.armed = true;
        }
        let young = 1.0 - (n as f64 / cfg.history as f64).min(1.0);
        let margin = cfg.young_margin * young;
        if z >= self.sustain_z + margin {
            self.run += 1;
        } else {
            self.run = 0;
        }
        let sustained = cfg.sustain_points > 0 && self.run >= cfg.sustain_points;
        if n >= cfg.min_history
            && self.may_open(at_ms, cfg)
            && (z >= self.alert_z + margin || sustained)
        {
            return Some(self.open(cfg, z, at_ms));
        }
        None
    }

    /// Whether an alert may open an incident at `at_ms`: armed and out of the cooldown. A
    /// reading older than the alert (a device clock set back) leaves the readings to decide.
    fn may_open(&self, at_ms: Option<i64>, cfg: &DetectorConfig) -> bool {
        let quiet = match (at_ms, self.quiet_until_ms) {
            (Some(now), Some(until)) => {
                now < until && until.saturating_sub(now) <= secs_to_ms(cfg.cooldown_s)
            }
            _ => false,
        };
        self.armed && self.cooldown_left == 0 && !quiet
    }

    /// Opens an incident of standard score `z`: disarms and starts the cooldown.
    fn open(&mut self, cfg: &DetectorConfig, z: f64, at_ms: Option<i64>) -> Severity {
        self.hold(cfg, at_ms);
        severity_for(z)
    }

    /// Starts the cooldown as after an alert at `at_ms`, but stays armed: once it has passed,
    /// a high score may open an incident even if the scores never dropped in between (a fault
    /// that began during the cooldown is still reported; the recurrence check then asks for a
    /// score above those of the cooldown).
    fn grace(&mut self, cfg: &DetectorConfig, at_ms: Option<i64>) {
        self.cooldown_left = cfg.cooldown;
        self.quiet_until_ms = at_ms.map(|t| t.saturating_add(secs_to_ms(cfg.cooldown_s)));
        self.run = 0;
    }

    /// Disarms and starts the cooldown, as after an alert at `at_ms`.
    fn hold(&mut self, cfg: &DetectorConfig, at_ms: Option<i64>) {
        self.armed = false;
        self.cooldown_left = cfg.cooldown;
        self.quiet_until_ms = at_ms.map(|t| t.saturating_add(secs_to_ms(cfg.cooldown_s)));
    }

    /// Re-arms at once and forgets the cooldown (an alert withdrawn as the same incident).
    fn release(&mut self) {
        self.armed = true;
        self.cooldown_left = 0;
        self.quiet_until_ms = None;
    }

    /// Before the first model: counts the point down the cooldown and re-arms (there is no
    /// likelihood yet).
    fn tick_unscored(&mut self) {
        self.cooldown_left = self.cooldown_left.saturating_sub(1);
        self.armed = true;
        self.run = 0;
    }

    /// An early-channel alert of standard score `z`, if the debouncing allows one now; it
    /// then debounces like any other alert.
    fn early(&mut self, cfg: &DetectorConfig, z: f64, at_ms: Option<i64>) -> Option<Severity> {
        if !self.may_open(at_ms, cfg) {
            return None;
        }
        Some(self.open(cfg, z, at_ms))
    }
}

/// Streaming state of one metric.
#[derive(Debug, Clone)]
pub struct MetricDetector {
    features: FeatureState,
    training: TrainingSet<[f64; N_FEATURES]>,
    model: Option<IsolationForest>,
    clock: RefitClock,
    recent_raw: VecDeque<f64>,
    cadence: Cadence,
    forest_scores: ScoreHistory,
    forest_calib: ForestCalibration,
    shape: crate::features::ShapeNovelty,
    shape_avg: f64,
    shape_scores: ScoreHistory,
    level: LevelState,
    level_scores: ScoreHistory,
    /// Whether the level channel's evidence has drained to 0 (the level came back within
    /// `level_k` spreads of the baseline) since the metric's last alert (any channel): the
    /// channel only reports a shift whose evidence built up after that alert, not the lasting
    /// aftermath of a jump that was already reported.
    level_fresh: bool,
    /// `level_fresh` before the last alert, for [`Self::withhold`].
    fresh_before_alert: bool,
    debounce: Debounce,
    early: EarlyOutliers,
    /// Time stamp of the first scored reading (for `young_span_s`).
    first_scored_ms: Option<i64>,
    stuck: StuckCheck,
    /// The stuck-sensor check's `is_reported` before the last alert, for [`Self::withhold`].
    stuck_before_alert: bool,
    /// Runs of the device's readings without this metric (`missing_readings`).
    absence: RunWatch,
    /// The device's reading count when this metric was last in one (`DeviceDetector::feed`).
    seen_in: u64,
}

impl MetricDetector {
    fn new(cfg: &DetectorConfig) -> Self {
        Self {
            features: FeatureState::new(),
            training: TrainingSet::new(cfg),
            model: None,
            clock: RefitClock::default(),
            recent_raw: VecDeque::with_capacity(cfg.avg_window),
            cadence: Cadence::default(),
            forest_scores: ScoreHistory::default(),
            forest_calib: ForestCalibration::default(),
            shape: crate::features::ShapeNovelty::new(
                cfg.shape_capacity,
                cfg.shape_len,
                cfg.shape_reservoir,
                cfg.seed,
            ),
            shape_avg: f64::NAN,
            shape_scores: ScoreHistory::default(),
            level: LevelState::default(),
            level_scores: ScoreHistory::default(),
            level_fresh: true,
            fresh_before_alert: true,
            debounce: Debounce::new(cfg),
            early: Default::default(),
            first_scored_ms: None,
            stuck: StuckCheck::default(),
            stuck_before_alert: false,
            absence: RunWatch::default(),
            seen_in: 0,
        }
    }

    /// Readings the forest channel's smoothing spans: `avg_window`, or as many as cover
    /// `avg_span_s` at the metric's sampling interval if that is fewer (at least
    /// `avg_min_window`). The shape channel always smooths over `avg_window`: its novelty
    /// already compares stretches of `shape_len` readings, so a one-reading event is not
    /// diluted there.
    fn forest_span(&self, cfg: &DetectorConfig) -> usize {
        match self.cadence.median_ms() {
            Some(step) if cfg.avg_span_s > 0 => {
                let n = (cfg.avg_span_s as f64 * 1000.0 / step as f64).round();
                // `n` is finite and non-negative (`step` > 0); the cast saturates.
                (n as usize).clamp(cfg.avg_min_window.min(cfg.avg_window), cfg.avg_window)
            }
            _ => cfg.avg_window,
        }
    }

    /// Whether a model is installed (the warm-up is over).
    pub fn is_ready(&self) -> bool {
        self.model.is_some()
    }

    /// `paced`: whether the alert bars follow the metric's pace (`alert_interval_s`).
    fn feed(
        &mut self,
        cfg: &DetectorConfig,
        value: f64,
        at_ms: Option<i64>,
        paced: bool,
    ) -> PointOutcome {
        let was_frozen = self.is_frozen();
        let stuck = if cfg.stuck_run > 0 {
            self.stuck.update(&cfg.stuck_rule(), value, at_ms)
        } else {
            None
        };
        if was_frozen && !self.is_frozen() {
            // The sensor is back: its first value jumps from the frozen one to the real one,
            // which is the end of the incident, not a new one. The learned channels wait as
            // after an alert of their own.
            self.debounce.hold(cfg, at_ms);
        }
        if stuck.is_none() && self.is_frozen() {
            // A stuck run (reported by this check, or covered by an earlier alert) is not a
            // measurement: the learned channels skip it, so they neither report it again nor
            // learn it as the new normal (after two thousand frozen readings the sensor's
            // return to its usual noise looked like a CRITICAL anomaly).
            return PointOutcome {
                score: 0.0,
                raw_score: None,
                alert: None,
                stuck: None,
            };
        }
        let mut outcome = self.feed_inner(cfg, value, at_ms, paced);
        if let Some(run) = stuck {
            // The learned channels' alert on the same reading, if any, is this incident.
            let severity = outcome
                .alert
                .map_or(Severity::Medium, |s| s.max(Severity::Medium));
            outcome.alert = Some(severity);
            outcome.stuck = Some(run);
        } else if outcome.alert.is_some() {
            // The learned channels' alert covers the current run: if it turns out stuck, it is
            // the incident this alert reported.
            self.stuck_before_alert = self.stuck.is_reported();
            self.stuck.cover();
        }
        if outcome.alert.is_some() {
            self.fresh_before_alert = self.level_fresh;
            self.level_fresh = false;
        }
        outcome
    }

    /// Whether the metric's current readings are a stuck run (the learned channels, and the
    /// cross-metric channel, skip them from the reading where the run became stuck on).
    fn is_frozen(&self) -> bool {
        self.stuck.is_frozen()
    }

    /// Input resumes at `at_ms` after readings that were not fed (`DeviceDetector::resume`):
    /// the features and the shape window start a new segment, and the learned channels sit out
    /// a cooldown (`Debounce::grace`).
    fn resume(&mut self, cfg: &DetectorConfig, at_ms: Option<i64>) {
        self.features.break_continuity();
        self.shape.break_continuity();
        self.debounce.grace(cfg, at_ms);
    }

    /// The device withheld this point's alert (`JointChannel::ordinary`): no incident was
    /// reported, so the metric re-arms at once instead of waiting for its likelihood to drop
    /// and the cooldown to pass, and can still report the incident if it grows. Without this a
    /// steady overheating ramp whose first LOW alert was withheld was never reported.
    fn withhold(&mut self) {
        self.debounce.release();
        self.level_fresh = self.fresh_before_alert;
        self.stuck.set_reported(self.stuck_before_alert);
    }

    fn feed_inner(
        &mut self,
        cfg: &DetectorConfig,
        value: f64,
        at_ms: Option<i64>,
        paced: bool,
    ) -> PointOutcome {
        let quiet = PointOutcome {
            score: 0.0,
            raw_score: None,
            alert: None,
            stuck: None,
        };
        if !value.is_finite() {
            return quiet;
        }
        let feats = self.features.update(value);
        let novelty = if cfg.shape_len > 0 {
            // Distances are measured in units of the signal's recent spread, so the channel
            // works the same for a temperature and for a byte counter.
            let scale = self.features.long_std().max(1e-9 * value.abs()).max(1e-12);
            self.shape.update(value, scale)
        } else {
            None
        };
        // The level channel learns from the first reading, so its baseline spans the warm-up.
        let level = if cfg.level_span > 0 {
            self.level.update(cfg, value)
        } else {
            None
        };
        self.clock.tick();
        if let Some(t) = at_ms {
            self.cadence.note(t);
            let pace = self.cadence.median_ms().filter(|_| paced);
            self.debounce.pace(cfg, pace);
        }
        let early = self.early_surprise(cfg, value, at_ms);
        let raw = self.model.as_ref().map(|m| m.score_one(&feats));
        self.training.push(cfg, feats);
        let Some(raw) = raw else {
            self.debounce.tick_unscored();
            return self.early_outcome(cfg, quiet, early, at_ms);
        };

        let span = self.forest_span(cfg);
        let avg = moving_mean(&mut self.recent_raw, span, raw);
        // Judge each smoothed score against its history *before* adding it, so an anomaly does
        // not lower its own surprise.
        let n = self.forest_scores.len();
        // How far the value strays from the metric's 100-point mean, in its own units: the size
        // the long tier of the recurrence check compares (the scores saturate).
        let size = feats[3].abs();
        // Only the forest channel's spread is floored by its long-horizon spread: the shape
        // channel's novelty falls as the stretches seen so far grow in number, so its recent
        // spread is the right yardstick (flooring it loses windows).
        let z_forest = self.forest_scores.judge(
            cfg,
            avg,
            size,
            at_ms,
            cfg.min_std,
            cfg.min_smoothed_score,
            Some(&mut self.forest_calib),
        );
        let z_shape = match novelty {
            Some(d) => {
                if self.shape_avg.is_nan() {
                    self.shape_avg = d;
                }
                // An exponential average with the same centre of mass as the forest channel's
                // moving average, so both channels react on the same time scale.
                self.shape_avg += (d - self.shape_avg) * 2.0 / (cfg.avg_window as f64 + 1.0);
                self.shape_scores.judge(
                    cfg,
                    self.shape_avg,
                    size,
                    at_ms,
                    cfg.shape_min_std,
                    f64::NEG_INFINITY,
                    None,
                )
            }
            None => f64::NEG_INFINITY,
        };
        // The level channel's evidence already sums many readings: it is judged unsmoothed
        // against its own history (spread at least `shape_min_std`, like the other unbounded
        // score), only at or above `level_floor`, with the recurrence check (a shift the metric
        // made in the last 1000 readings, or a comparable one within the far tier, is not news)
        // and the shape channel's readings-only young margin.
        let z_level = match level {
            Some(l) => self.level_scores.judge(
                cfg,
                l,
                size,
                at_ms,
                cfg.shape_min_std,
                cfg.level_floor,
                None,
            ),
            None => f64::NEG_INFINITY,
        };
        // A jump that an alert already reported keeps the level channel's evidence high for
        // hundreds of readings; that evidence is not news.
        if level == Some(0.0) {
            self.level_fresh = true;
        }
        let z_level = if self.level_fresh {
            z_level
        } else {
            z_level.min(0.0)
        };
        let z_shape = z_shape.max(z_level);
        let z = z_forest.max(z_shape);
        let score = if n >= 2 { 1.0 - upper_tail(z) } else { 0.0 };
        // The debouncing adds the readings-only young margin to the bar; the forest channel's
        // share of it that time has already retired (`young_span_s`) is credited to its score
        // for that decision only: the severity is the surprise measured.
        let z_alert = z_shape.max(z_forest + self.forest_time_relief(cfg, n, at_ms));
        let outcome = PointOutcome {
            score,
            raw_score: Some(raw),
            alert: self
                .debounce
                .judge(cfg, z_alert, score, n, at_ms)
                .map(|_| severity_for(z)),
            stuck: None,
        };
        if outcome.alert.is_some() {
            return outcome;
        }
        self.early_outcome(cfg, outcome, early, at_ms)
    }

    /// The part of the young margin (in standard deviations) that the time since the first
    /// scored reading has retired for the forest channel: `young_margin × (y_n − min(y_n,
    /// 1 − t/young_span_s))` with `y_n = 1 − n/history` the readings-only share; 0 without
    /// time stamps or with `young_span_s` 0.
    fn forest_time_relief(&mut self, cfg: &DetectorConfig, n: usize, at_ms: Option<i64>) -> f64 {
        let Some(now) = at_ms else {
            return 0.0;
        };
        let first = *self.first_scored_ms.get_or_insert(now);
        if cfg.young_span_s == 0 {
            return 0.0;
        }
        let by_readings = 1.0 - (n as f64 / cfg.history as f64).min(1.0);
        let elapsed = now.saturating_sub(first) as f64 / (cfg.young_span_s as f64 * 1000.0);
        let by_time = (1.0 - elapsed).clamp(0.0, 1.0);
        cfg.young_margin * (by_readings - by_readings.min(by_time))
    }

    /// `outcome`, or an early-channel alert if `early` holds the robust standard score of a
    /// surprising value and the debouncing allows it. Its score and severity are those of a
    /// standard score scaled so that `early_bar` is the learned channels' alert bar.
    fn early_outcome(
        &mut self,
        cfg: &DetectorConfig,
        outcome: PointOutcome,
        early: Option<f64>,
        at_ms: Option<i64>,
    ) -> PointOutcome {
        let Some(robust_z) = early else {
            return outcome;
        };
        let z = self.debounce.alert_z * robust_z / cfg.early_bar;
        match self.debounce.early(cfg, z, at_ms) {
            Some(severity) => PointOutcome {
                score: outcome.score.max(1.0 - upper_tail(z)),
                alert: Some(severity),
                ..outcome
            },
            None => outcome,
        }
    }

    /// The early channel's verdict on `value` (its robust standard score if surprising) while
    /// the learned channels are young; releases its memory once their score history is full.
    fn early_surprise(
        &mut self,
        cfg: &DetectorConfig,
        value: f64,
        at_ms: Option<i64>,
    ) -> Option<f64> {
        if cfg.early_bar <= 0.0 || self.early.is_finished() {
            return None;
        }
        if self.forest_scores.len() >= cfg.history {
            self.early.finish();
            return None;
        }
        let rule = EarlyRule {
            bar: cfg.early_bar,
            beyond: cfg.early_beyond,
            min_points: cfg.early_min_points,
            min_span_ms: secs_to_ms(cfg.early_min_span_s),
            limit: cfg.warmup + cfg.history,
        };
        self.early.judge(&rule, value, at_ms)
    }

    fn needs_refit(&mut self, cfg: &DetectorConfig, metric: &str) -> Option<RefitJob> {
        let generation = self
            .clock
            .due(cfg, self.model.is_some(), self.training.recent.len())?;
        let data = self.training.matrix(N_FEATURES);
        // Mix the generation into the seed so successive forests differ but every run of the
        // same stream produces the same models.
        let seed = cfg.seed ^ generation.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Some(RefitJob {
            metric: metric.to_string(),
            generation,
            epoch: 0,
            work: Work::Forest {
                data,
                params: cfg.forest_params().seed(seed),
            },
        })
    }

    fn install(&mut self, generation: u64, forest: IsolationForest) -> bool {
        if !self.clock.install(generation) {
            return false;
        }
        self.model = Some(forest);
        true
    }
}

/// The cross-metric channel of one device: training rows, the installed [`JointModel`] and the
/// same smoothing, likelihood, recurrence and debouncing as a metric's channels.
#[derive(Debug, Clone)]
struct JointChannel {
    /// The model's metrics, in column order.
    names: Vec<String>,
    /// The reservoir lets the model remember the long-term relationship, so a slow drift of
    /// it stays visible.
    training: TrainingSet<[f64; MAX_JOINT]>,
    model: Option<JointModel>,
    clock: RefitClock,
    recent: VecDeque<f64>,
    scores: ScoreHistory,
    debounce: Debounce,
    /// Multi-metric readings in a row whose metrics differ from `names` (a sensor removed,
    /// added or renamed); at `warmup` the channel is rebuilt for the new set.
    changed: usize,
}

/// What the cross-metric channel says about one reading.
#[derive(Debug, Clone, Copy)]
struct JointVerdict {
    /// Index into `JointChannel::names` of the metric with the largest residual (of the
    /// culprit, on an alert).
    metric: usize,
    expected: f64,
    score: f64,
    alert: Option<Severity>,
    /// On an alert: the metrics whose fault would explain it as well (`JointModel::culprit`).
    rivals: [bool; MAX_JOINT],
}

/// Lower bound on the standard deviation of the smoothed residual history (the smoothed largest
/// residual of normal readings varies by about 0.2).
const JOINT_MIN_STD: f64 = 0.1;

/// A metric is explained by the others while the mean of its recent residuals stays under this
/// many residual standard deviations (a mean of 10 healthy readings rarely exceeds 1).
const EXPLAINED_RESIDUAL: f64 = 2.0;

/// A value within this many standard deviations of its metric's usual level is no news by
/// itself (Gaussian noise goes beyond 5 about once in 1.7 million values).
const ORDINARY_VALUE: f64 = 5.0;

impl JointChannel {
    fn new(cfg: &DetectorConfig, names: Vec<String>) -> Self {
        Self {
            names,
            training: TrainingSet::new(cfg),
            model: None,
            clock: RefitClock::default(),
            recent: VecDeque::with_capacity(cfg.avg_window),
            scores: ScoreHistory::default(),
            debounce: Debounce::new(cfg),
            changed: 0,
        }
    }

    /// The reading's values in the model's order, if it carries every one of them.
    fn values(&self, reading: &Reading) -> Option<[f64; MAX_JOINT]> {
        let mut v = [0.0; MAX_JOINT];
        for (slot, name) in v.iter_mut().zip(&self.names) {
            *slot = reading
                .metrics
                .iter()
                .find(|(n, _)| n == name)
                .map(|&(_, x)| x)
                .filter(|x| x.is_finite())?;
        }
        Some(v)
    }

    fn feed(
        &mut self,
        cfg: &DetectorConfig,
        values: [f64; MAX_JOINT],
        at_ms: Option<i64>,
    ) -> Option<JointVerdict> {
        self.clock.tick();
        let residual = self.model.as_ref().and_then(|m| m.residual(&values));
        self.training.push(cfg, values);
        let residual = residual?;

        let avg = moving_mean(&mut self.recent, cfg.avg_window, residual.size);
        let n = self.scores.len();
        let z = self.scores.judge(
            cfg,
            avg,
            f64::NAN,
            at_ms,
            JOINT_MIN_STD,
            cfg.joint_min_residual,
            None,
        );
        let score = if n >= 2 { 1.0 - upper_tail(z) } else { 0.0 };
        let alert = self.debounce.judge(cfg, z, score, n, at_ms);
        // Which metric broke away is worked out only when it is reported, on the mean of the
        // readings the smoothed score covers: the model is linear, so that is their mean
        // residual pattern, with less noise than one reading's.
        let mut verdict = JointVerdict {
            metric: residual.metric,
            expected: residual.expected,
            score,
            alert,
            rivals: [false; MAX_JOINT],
        };
        if let (Some(_), Some(m)) = (alert, self.model.as_ref()) {
            if let Some(c) = self.recent_mean(cfg).and_then(|mean| m.culprit(&mean)) {
                // The value predicted for this reading, not for the mean.
                if let Some(expected) = m.expected(c.metric, &values) {
                    verdict.metric = c.metric;
                    verdict.expected = expected;
                    verdict.rivals = c.rivals;
                }
            }
        }
        Some(verdict)
    }

    /// The mean of the last `avg_window` rows, the readings a smoothed score covers; `None`
    /// before the first row.
    fn recent_mean(&self, cfg: &DetectorConfig) -> Option<[f64; MAX_JOINT]> {
        let rows = &self.training.recent;
        let recent = rows.len().min(cfg.avg_window);
        if recent == 0 {
            return None;
        }
        let mut mean = [0.0; MAX_JOINT];
        for row in rows.iter().rev().take(recent) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / recent as f64;
            }
        }
        Some(mean)
    }

    /// Whether a per-metric alert of `severity` on metric `j`, raised on `value`, is about
    /// readings that are ordinary for this machine, judged on their recent mean
    /// ([`Self::recent_mean`]). For a metric the others explain, a LOW one whose mean leaves a
    /// residual under [`EXPLAINED_RESIDUAL`]: the machine moving along its usual relationship;
    /// and a MEDIUM one with such a mean while the machine sits at a usual operating point
    /// (every metric's mean within [`EXPLAINED_RESIDUAL`] standard deviations of its level over
    /// the model's training readings, the value within [`ORDINARY_VALUE`]): a healthy motor's
    /// scores reached MEDIUM about twice per machine-day that way over runs of two days, which
    /// runs of 20,000 readings did not show. For one they do not, a LOW or MEDIUM one whose
    /// mean lies within [`EXPLAINED_RESIDUAL`] standard deviations of the metric's usual level
    /// and whose value within
    /// [`ORDINARY_VALUE`]: sensor noise on a steady machine, which the smoothed scores'
    /// calibration alone flagged about once per 5,000 values.
    fn ordinary(&self, cfg: &DetectorConfig, j: usize, severity: Severity, value: f64) -> bool {
        let (Some(model), Some(mean)) = (self.model.as_ref(), self.recent_mean(cfg)) else {
            return false;
        };
        let within = |z: Option<f64>, bar: f64| z.is_some_and(|z| z.abs() < bar);
        let mut now = mean;
        now[j] = value;
        if model.is_explained(j) {
            if !within(model.residual_of(j, &mean), EXPLAINED_RESIDUAL) {
                return false;
            }
            // A MEDIUM one only at a usual operating point.
            let usual_point = || {
                (0..model.len()).all(|i| {
                    model
                        .level_of(i, &mean)
                        .map_or(true, |z| z.abs() < EXPLAINED_RESIDUAL)
                })
            };
            return match severity {
                Severity::Low => true,
                Severity::Medium => {
                    usual_point() && within(model.level_of(j, &now), ORDINARY_VALUE)
                }
                _ => false,
            };
        }
        severity <= Severity::Medium
            && within(model.level_of(j, &mean), EXPLAINED_RESIDUAL)
            && within(model.level_of(j, &now), ORDINARY_VALUE)
    }

    fn needs_refit(&mut self, cfg: &DetectorConfig) -> Option<RefitJob> {
        let generation = self
            .clock
            .due(cfg, self.model.is_some(), self.training.recent.len())?;
        let data = self.training.matrix(self.names.len());
        Some(RefitJob {
            metric: self.names.join("+"),
            generation,
            epoch: 0,
            work: Work::Joint {
                data,
                min_r2: cfg.joint_min_r2,
            },
        })
    }

    fn install(&mut self, generation: u64, model: Box<JointModel>) -> bool {
        if model.len() != self.names.len() || !self.clock.install(generation) {
            return false;
        }
        self.model = Some(*model);
        true
    }
}

/// The standard score whose upper-tail probability is `tail` (by bisection on `upper_tail`,
/// which stays accurate down to 1e-300); 0 for `tail` at or above 0.5 (or NaN).
fn z_for_upper_tail(tail: f64) -> f64 {
    if tail.is_nan() || tail >= 0.5 {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0, 40.0);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if upper_tail(mid) > tail {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Upper-tail probability of the standard normal distribution, `Q(z) = erfc(z / sqrt 2) / 2`.
pub fn upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function with fractional error below 1.2e-7 everywhere (the Chebyshev
/// fit from Numerical Recipes), which is ample for tail probabilities down to 1e-300.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Maps the surprise of an alert (in standard deviations) to a severity.
fn severity_for(z: f64) -> Severity {
    if z >= 10.0 {
        Severity::Critical
    } else if z >= 7.0 {
        Severity::High
    } else if z >= 5.5 {
        Severity::Medium
    } else {
        Severity::Low
    }
}

/// The operator action a missing-metric alert suggests.
pub const MISSING_ACTION: &str =
    "check the sensor's connection and the device's configuration: it stopped sending this metric";

/// The operator action a stuck-sensor alert suggests.
pub const STUCK_ACTION: &str =
    "check the sensor, its wiring and the device's firmware: the value has stopped changing";

/// The verdict on one metric of one reading.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricOutcome {
    /// Metric name.
    pub metric: String,
    /// The value fed.
    pub value: f64,
    /// Reading time in unix milliseconds.
    pub timestamp_ms: i64,
    /// Score and alert.
    pub outcome: PointOutcome,
    /// Set when the alert comes from the cross-metric channel.
    pub cross: Option<CrossMetric>,
    /// Set when the alert is the missing-metric check's; `value` is then the metric's last
    /// value, not one of this reading.
    pub missing: Option<Missing>,
}

/// A metric gone missing from its device's readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Missing {
    /// The device's readings in a row without it.
    pub readings: u32,
    /// Other metrics that went missing on the same reading (one incident).
    pub also: Vec<String>,
}

/// Why the cross-metric channel alerted on a metric.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossMetric {
    /// The value the other metrics predict for it.
    pub expected: f64,
    /// The other metrics of the model. With two metrics the relationship itself is what
    /// broke: either one may be the one named.
    pub others: Vec<String>,
    /// Other metrics whose fault would explain the readings as well: they move in proportion
    /// with this one, so the model cannot tell which of them changed.
    pub rivals: Vec<String>,
}

impl MetricOutcome {
    /// The alert message to publish for this outcome, if it raised one.
    pub fn to_alert(&self, device_id: &str) -> Option<AlertMessage> {
        let severity = self.outcome.alert?;
        let (metric, value, score) = (&self.metric, self.value, self.outcome.score);
        // The rule-based checks state a fact, like a threshold alert: score 1.
        let (message, score, action) = if let Some(missing) = &self.missing {
            let also = if missing.also.is_empty() {
                String::new()
            } else {
                format!(" (and {})", missing.also.join(", "))
            };
            let message = format!(
                "{metric}{also} missing from the device's last {} readings; it was in almost \
                 every reading before (last value {value})",
                missing.readings
            );
            (message, 1.0, Some(MISSING_ACTION))
        } else if let Some(run) = self.outcome.stuck {
            let message = format!(
                "{metric} has reported {value} for {run} readings in a row; it normally changes \
                 from one reading to the next (sensor stuck?)"
            );
            (message, 1.0, Some(STUCK_ACTION))
        } else if let Some(cross) = &self.cross {
            let mut message = format!(
                "{metric} = {value} does not fit {}, which predict about {:.4} (likelihood \
                 {score:.6})",
                cross.others.join(", "),
                cross.expected,
            );
            if !cross.rivals.is_empty() {
                let rivals = cross.rivals.join(" or ");
                message.push_str(&format!(
                    "; {rivals} moves with {metric}, and a change of {rivals} fits the readings \
                     as well"
                ));
            }
            (message, score, None)
        } else {
            let message = format!("{metric} = {value} is anomalous (likelihood {score:.6})");
            (message, score, None)
        };
        let mut alert = AlertMessage::new(
            device_id,
            severity,
            AlertKind::Anomaly,
            metric,
            value,
            score,
            message,
            self.timestamp_ms,
        );
        if let Some(action) = action {
            alert.action = action.to_string();
        }
        alert.expected = self.cross.as_ref().map(|c| c.expected);
        alert.alternatives = self
            .cross
            .as_ref()
            .map_or_else(Vec::new, |c| c.rivals.clone());
        Some(alert)
    }
}

/// The streaming detector for one device: one `MetricDetector` per metric, created on first
/// sight of the metric, up to `max_metrics`, and the device's cross-metric channel.
#[derive(Debug, Clone)]
pub struct DeviceDetector {
    config: DetectorConfig,
    metrics: Vec<(String, MetricDetector)>,
    ignored_metrics: u64,
    joint: Option<JointChannel>,
    /// Readings fed through `feed`.
    readings: u64,
    /// Reading index and time stamp of the last per-metric alert on one of the cross-metric
    /// model's metrics, and of the last cross-metric alert: each channel stays quiet while the
    /// other's incident is recent.
    last_metric_alert: Option<(u64, i64)>,
    last_joint_alert: Option<(u64, i64)>,
    /// Times `restart` was called: the epoch of the refit jobs handed out since.
    restarts: u64,
}

impl DeviceDetector {
    /// Creates a detector after validating `config`.
    pub fn new(config: DetectorConfig) -> Result<Self, DetectorError> {
        config.validate()?;
        Ok(Self {
            config,
            metrics: Vec::new(),
            ignored_metrics: 0,
            joint: None,
            readings: 0,
            last_metric_alert: None,
            last_joint_alert: None,
            restarts: 0,
        })
    }

    /// Forgets everything learned (models, training rows, score histories, baselines, the
    /// cross-metric model) and starts again as a new detector with the same settings. A model
    /// from a refit job handed out before is then refused, even if its metric is fed again
    /// before it arrives: it was fitted on what was forgotten.
    pub fn restart(&mut self) {
        self.restarts += 1;
        self.metrics.clear();
        self.ignored_metrics = 0;
        self.joint = None;
        self.readings = 0;
        self.last_metric_alert = None;
        self.last_joint_alert = None;
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Number of metric values dropped because the device already had `max_metrics` metrics.
    pub fn ignored_metrics(&self) -> u64 {
        self.ignored_metrics
    }

    /// Names of the metrics tracked so far.
    pub fn metric_names(&self) -> impl Iterator<Item = &str> {
        self.metrics.iter().map(|(n, _)| n.as_str())
    }

    /// The usual time between readings of `metric`, in milliseconds: the median of its recent
    /// positive intervals (the sampling interval the forest smoothing adapts to); `None`
    /// until 8 are known, or for a metric not tracked.
    pub fn usual_interval_ms(&self, metric: &str) -> Option<i64> {
        self.metrics
            .iter()
            .find(|(n, _)| n == metric)
            .and_then(|(_, m)| m.cadence.median_ms())
    }

    /// The cross-metric model's metrics and, once fitted, how well the others explain each
    /// (R², NaN for a constant metric); empty until a reading carried two or more metrics.
    pub fn joint_fit(&self) -> Vec<(&str, Option<f64>)> {
        let Some(j) = &self.joint else {
            return Vec::new();
        };
        j.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), j.model.as_ref().map(|m| m.r2(i))))
            .collect()
    }

    /// Feeds one value of one metric; `None` if the metric could not be tracked. This bypasses
    /// the cross-metric channel, which needs whole readings (`feed`).
    pub fn feed_value(&mut self, metric: &str, value: f64) -> Option<PointOutcome> {
        self.feed_at(metric, value, None)
    }

    fn feed_at(&mut self, metric: &str, value: f64, at_ms: Option<i64>) -> Option<PointOutcome> {
        let idx = match self.metrics.iter().position(|(n, _)| n == metric) {
            Some(i) => i,
            None if self.metrics.len() < self.config.max_metrics => {
                self.metrics
                    .push((metric.to_string(), MetricDetector::new(&self.config)));
                self.metrics.len() - 1
            }
            None => {
                self.ignored_metrics += 1;
                return None;
            }
        };
        let cfg = &self.config;
        let seen_in = self.readings + 1;
        // A metric in the device's fitted cross-metric model has its ordinary LOW and MEDIUM
        // alerts dropped there (`JointChannel::ordinary`); the others keep false alarms per
        // day in check by their pace (`alert_interval_s`).
        let paced = !self
            .joint
            .as_ref()
            .is_some_and(|j| j.model.is_some() && j.names.iter().any(|n| n == metric));
        self.metrics.get_mut(idx).map(|(_, m)| {
            m.seen_in = seen_in;
            m.feed(cfg, value, at_ms, paced)
        })
    }

    /// Tells the detector that its input resumes at `at_ms` after a stretch of the device's
    /// readings it was not given (the machine was standing, `monitor::RunningRule`): no metric
    /// compares its next value with the last one before the gap (first differences, short
    /// means, shape subsequences start afresh), and every channel, the cross-metric one too,
    /// sits out a cooldown (`cooldown` readings and `cooldown_s` seconds) without being
    /// disarmed, so a machine's return to work is not an incident, while a fault that starts
    /// meanwhile and keeps growing is reported once the cooldown has passed. Long-run state
    /// (models, training rows, score histories, baselines) carries on.
    pub fn resume(&mut self, at_ms: Option<i64>) {
        let cfg = &self.config;
        for (_, m) in &mut self.metrics {
            m.resume(cfg, at_ms);
        }
        if let Some(j) = &mut self.joint {
            j.debounce.grace(cfg, at_ms);
        }
    }

    /// Whether the detector tracks `metric` (it has been fed and was within `max_metrics`).
    pub fn tracks(&self, metric: &str) -> bool {
        self.metrics.iter().any(|(n, _)| n == metric)
    }

    /// Feeds every metric of a reading and returns one outcome per tracked metric.
    pub fn feed(&mut self, reading: &Reading) -> Vec<MetricOutcome> {
        let mut out = Vec::with_capacity(reading.metrics.len());
        for (name, value) in &reading.metrics {
            if let Some(outcome) = self.feed_at(name, *value, Some(reading.timestamp_ms)) {
                out.push(MetricOutcome {
                    metric: name.clone(),
                    value: *value,
                    timestamp_ms: reading.timestamp_ms,
                    outcome,
                    cross: None,
                    missing: None,
                });
            }
        }
        self.readings += 1;
        if self.config.joint_metrics >= 2 {
            self.feed_joint(reading, &mut out);
        }
        if self.config.missing_readings > 0 {
            self.check_missing(reading.timestamp_ms, &mut out);
        }
        out
    }

    /// The missing-metric check's part of `feed`: every tracked metric absent from the
    /// reading just fed extends its absence; the metrics whose absence becomes too long on
    /// this reading give one alert, on the first of them, naming the others.
    fn check_missing(&mut self, at_ms: i64, out: &mut Vec<MetricOutcome>) {
        let rule = self.config.missing_rule();
        let now = self.readings;
        let mut found: Option<MetricOutcome> = None;
        for (name, m) in &mut self.metrics {
            let present = m.seen_in == now;
            let Some(run) = m.absence.step(&rule, present, Some(at_ms)) else {
                continue;
            };
            match &mut found {
                Some(first) => {
                    if let Some(missing) = &mut first.missing {
                        missing.also.push(name.clone());
                    }
                }
                None => {
                    found = Some(MetricOutcome {
                        metric: name.clone(),
                        // Every finite value reaches the features, a stuck run's
                        // repeats aside, which equal the last one they saw.
                        value: m.features.last().unwrap_or(f64::NAN),
                        timestamp_ms: at_ms,
                        outcome: PointOutcome {
                            score: 0.0,
                            raw_score: None,
                            alert: Some(Severity::Medium),
                            stuck: None,
                        },
                        cross: None,
                        missing: Some(Missing {
                            readings: run - 1,
                            also: Vec::new(),
                        }),
                    })
                }
            }
        }
        out.extend(found);
    }

    /// The cross-metric channel's part of `feed`, and the incident rule it shares with the
    /// per-metric channels.
    fn feed_joint(&mut self, reading: &Reading, out: &mut [MetricOutcome]) {
        let cfg = &self.config;
        // The model's metrics are the first `joint_metrics` finite ones of a reading.
        let wanted = || {
            out.iter()
                .filter(|o| o.value.is_finite())
                .take(cfg.joint_metrics)
        };
        if let Some(joint) = self.joint.as_mut() {
            // A device whose multi-metric readings keep carrying another set of metrics than
            // the model's (a sensor removed, added or renamed) gets a new model for the new
            // set once that has lasted a warm-up's worth of readings; a reading with one
            // metric says nothing about the set.
            let n = wanted().count();
            let same = n == joint.names.len() && wanted().all(|o| joint.names.contains(&o.metric));
            if same {
                joint.changed = 0;
            } else if n >= 2 {
                joint.changed += 1;
            }
            if joint.changed >= cfg.warmup {
                self.joint = None;
            }
        }
        if self.joint.is_none() && out.len() >= 2 {
            let names = wanted().map(|o| o.metric.clone()).collect::<Vec<_>>();
            if names.len() >= 2 {
                self.joint = Some(JointChannel::new(cfg, names));
            }
        }
        let Some(joint) = self.joint.as_mut() else {
            return;
        };
        let now = (self.readings, reading.timestamp_ms);
        let recent = |at: Option<(u64, i64)>| at.is_some_and(|at| same_incident(cfg, at, now));
        // A reading in which one of the model's metrics is in a stuck run is skipped, like a
        // reading that lacks one of them.
        let frozen = self
            .metrics
            .iter()
            .any(|(n, m)| m.is_frozen() && joint.names.contains(n));
        let verdict = joint
            .values(reading)
            .filter(|_| !frozen)
            .and_then(|v| joint.feed(cfg, v, Some(reading.timestamp_ms)));
        for o in out.iter_mut().filter(|o| o.outcome.alert.is_some()) {
            let Some(j) = joint.names.iter().position(|n| *n == o.metric) else {
                continue;
            };
            // A per-metric alert on one of the model's metrics while a cross-metric incident
            // is recent is the same incident seen again.
            if recent(self.last_joint_alert) {
                o.outcome.alert = None;
            // A LOW one on a metric the others explain, while they still explain it, is the
            // machine moving along its normal relationship (a load excursion all its sensors
            // follow), not a fault of that metric; a LOW or MEDIUM one on a metric they do not
            // explain, while its recent level and its value are its usual ones, is sensor
            // noise (a steady machine's Gaussian noise alone raised one per 5,000 values).
            // Dropped, and the metric re-armed (`JointChannel::ordinary`, `withhold`).
            } else if o.outcome.alert.is_some_and(|severity| {
                o.outcome.stuck.is_none() && joint.ordinary(cfg, j, severity, o.value)
            }) {
                o.outcome.alert = None;
                if let Some((_, m)) = self.metrics.iter_mut().find(|(n, _)| *n == o.metric) {
                    m.withhold();
                }
            } else {
                self.last_metric_alert = Some(now);
            }
        }
        let Some(verdict) = verdict else {
            return;
        };
        let Some(severity) = verdict.alert else {
            return;
        };
        // A broken relationship tends to stay broken, and a growing fault keeps setting new
        // peaks: one cross-metric alert per incident window, like the rule above.
        if recent(self.last_metric_alert) || recent(self.last_joint_alert) {
            return;
        }
        let Some(name) = joint.names.get(verdict.metric) else {
            return;
        };
        if let Some(o) = out.iter_mut().find(|o| &o.metric == name) {
            o.outcome.alert = Some(severity);
            o.outcome.score = o.outcome.score.max(verdict.score);
            o.cross = Some(CrossMetric {
                expected: verdict.expected,
                others: joint.names.iter().filter(|n| *n != name).cloned().collect(),
                rivals: joint
                    .names
                    .iter()
                    .zip(verdict.rivals)
                    .filter(|&(_, rival)| rival)
                    .map(|(n, _)| n.clone())
                    .collect(),
            });
            self.last_joint_alert = Some(now);
            if let Some((_, m)) = self.metrics.iter_mut().find(|(n, _)| n == name) {
                m.stuck.cover();
            }
        }
    }

    /// The next refit the detector wants, if any. Call it after feeding; run the job wherever
    /// convenient and pass the result to `install`. Each call hands out at most one job.
    pub fn needs_refit(&mut self) -> Option<RefitJob> {
        let cfg = &self.config;
        let mut job = self
            .metrics
            .iter_mut()
            .find_map(|(name, m)| m.needs_refit(cfg, name))
            .or_else(|| self.joint.as_mut().and_then(|j| j.needs_refit(cfg)))?;
        job.epoch = self.restarts;
        Some(job)
    }

    /// Installs a model produced by a `RefitJob`. Returns false (and drops the model) if the
    /// metric is unknown, a newer model is already installed, or the detector restarted since
    /// the job was handed out.
    pub fn install(&mut self, model: TrainedModel) -> bool {
        if model.epoch != self.restarts {
            return false;
        }
        match model.model {
            Model::Forest(forest) => {
                match self.metrics.iter_mut().find(|(n, _)| *n == model.metric) {
                    Some((_, m)) => m.install(model.generation, forest),
                    None => false,
                }
            }
            Model::Joint(joint) => match self.joint.as_mut() {
                Some(j) if j.names.join("+") == model.metric => j.install(model.generation, joint),
                _ => false,
            },
        }
    }

    /// Convenience for synchronous callers: runs every pending refit inline.
    pub fn refit_inline(&mut self) -> Result<usize, DetectorError> {
        let mut done = 0;
        while let Some(job) = self.needs_refit() {
            let model = job.run()?;
            self.install(model);
            done += 1;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default configuration with a smaller forest, to keep debug-mode tests fast.
    fn small_config() -> DetectorConfig {
        DetectorConfig {
            n_trees: 25,
            ..DetectorConfig::default()
        }
    }

    #[test]
    fn a_metric_read_more_often_than_alert_interval_needs_stronger_evidence() {
        let cfg = DetectorConfig::default();
        let full = cfg.history;
        let just_over = z_for_upper_tail(cfg.alert_tail) + 0.05;
        let alerts_at = |cfg: &DetectorConfig, pace: Option<i64>| {
            let mut debounce = Debounce::new(cfg);
            debounce.pace(cfg, pace);
            debounce
                .judge(cfg, just_over, 0.99999, full, None)
                .is_some()
        };
        // As configured at the reference pace, slower, or without a pace.
        assert!(alerts_at(&cfg, None));
        assert!(alerts_at(&cfg, Some(300_000)));
        assert!(alerts_at(&cfg, Some(3_600_000)));
        // One reading a second: the tail is 300 times smaller.
        assert!(!alerts_at(&cfg, Some(1_000)));
        let mut debounce = Debounce::new(&cfg);
        debounce.pace(&cfg, Some(1_000));
        let expected = z_for_upper_tail(cfg.alert_tail / 300.0);
        assert!(
            (debounce.alert_z - expected).abs() < 1e-9,
            "{}",
            debounce.alert_z
        );
        assert!(debounce.sustain_z > z_for_upper_tail(cfg.sustain_tail));
        // Back at the reference pace, the bars are the configured ones again.
        debounce.pace(&cfg, None);
        assert_eq!(debounce.alert_z, z_for_upper_tail(cfg.alert_tail));
        // 0 turns the scaling off.
        let off = DetectorConfig {
            alert_interval_s: 0,
            ..cfg.clone()
        };
        assert!(alerts_at(&off, Some(1_000)));
    }

    #[test]
    fn a_score_held_just_under_the_bar_alerts_once_it_is_sustained() {
        let cfg = DetectorConfig {
            young_margin: 0.0,
            ..DetectorConfig::default()
        };
        let full = cfg.history;
        let between = (z_for_upper_tail(cfg.sustain_tail) + z_for_upper_tail(cfg.alert_tail)) / 2.0;
        let mut debounce = Debounce::new(&cfg);
        let alerts: Vec<bool> = (0..cfg.sustain_points)
            .map(|_| debounce.judge(&cfg, between, 0.9999, full, None).is_some())
            .collect();
        let mut expected = vec![false; cfg.sustain_points];
        expected[cfg.sustain_points - 1] = true;
        assert_eq!(alerts, expected);
        // One incident, one alert: the run continues but the channel is disarmed.
        assert!(debounce.judge(&cfg, between, 0.9999, full, None).is_none());

        // A run broken by one ordinary point starts again.
        let mut debounce = Debounce::new(&cfg);
        for z in [between, between, 0.0, between, between] {
            assert!(debounce.judge(&cfg, z, 0.5, full, None).is_none());
        }

        // Switched off, the same run never alerts.
        let off = DetectorConfig {
            sustain_points: 0,
            ..cfg.clone()
        };
        let mut debounce = Debounce::new(&off);
        for _ in 0..10 {
            assert!(debounce.judge(&off, between, 0.9999, full, None).is_none());
        }
    }

    #[test]
    fn after_an_alert_a_fast_device_waits_cooldown_s_too() {
        let cfg = DetectorConfig::default();
        let full = cfg.history;
        let high = z_for_upper_tail(cfg.alert_tail) + 1.0;
        let mut debounce = Debounce::new(&cfg);
        assert!(debounce.judge(&cfg, high, 0.9999, full, Some(0)).is_some());
        // 20 readings a second, calm and surprising by turns (100 readings each), for just
        // under `cooldown_s`: the readings bound passes many times over, the time bound holds.
        let last = cfg.cooldown_s as i64 * 20 - 1;
        for i in 1..=last {
            let (z, score) = if i % 200 < 100 {
                (0.0, 0.5)
            } else {
                (high, 0.9999)
            };
            assert!(
                debounce.judge(&cfg, z, score, full, Some(i * 50)).is_none(),
                "reading {i}"
            );
        }
        assert!(debounce
            .judge(&cfg, 0.0, 0.5, full, Some((last + 1) * 50))
            .is_none());
        assert!(
            debounce
                .judge(&cfg, high, 0.9999, full, Some((last + 2) * 50))
                .is_some(),
            "after cooldown_s, the next incident alerts"
        );
        // A device clock set back (the next readings older than the alert by more than
        // `cooldown_s`) leaves the readings to decide, rather than silence for the difference.
        let mut debounce = Debounce::new(&cfg);
        let later = 10 * secs_to_ms(cfg.cooldown_s);
        assert!(debounce
            .judge(&cfg, high, 0.9999, full, Some(later))
            .is_some());
        for i in 0..cfg.cooldown as i64 {
            assert!(debounce.judge(&cfg, 0.0, 0.5, full, Some(i * 50)).is_none());
        }
        assert!(debounce
            .judge(&cfg, high, 0.9999, full, Some(10_000))
            .is_some());
        // Without time stamps only the readings count.
        let mut debounce = Debounce::new(&cfg);
        assert!(debounce.judge(&cfg, high, 0.9999, full, None).is_some());
        for _ in 0..cfg.cooldown {
            assert!(debounce.judge(&cfg, 0.0, 0.5, full, None).is_none());
        }
        assert!(debounce.judge(&cfg, high, 0.9999, full, None).is_some());
    }

    fn noise(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        (0..n)
            .map(|i| 10.0 + (i as f64 / 20.0).sin() + 0.2 * (rng.gen::<f64>() - 0.5))
            .collect()
    }

    fn run(det: &mut DeviceDetector, values: &[f64]) -> Vec<PointOutcome> {
        values
            .iter()
            .map(|&v| {
                let o = det.feed_value("m", v).expect("tracked");
                det.refit_inline().expect("refit");
                o
            })
            .collect()
    }

    /// Feeds `values` as readings `step_ms` apart, as `DeviceDetector::feed` gets them from a
    /// live device; returns the indices that raised an alert.
    fn feed_timed(det: &mut DeviceDetector, values: &[f64], step_ms: i64) -> Vec<usize> {
        let mut alerts = Vec::new();
        for (i, &v) in values.iter().enumerate() {
            let reading = Reading {
                timestamp_ms: 1_700_000_000_000 + i as i64 * step_ms,
                device_time: true,
                metrics: vec![("m".to_string(), v)],
            };
            if det.feed(&reading).iter().any(|o| o.outcome.alert.is_some()) {
                alerts.push(i);
            }
            det.refit_inline().expect("refit");
        }
        alerts
    }

    #[test]
    fn a_slow_stream_reports_a_gross_outlier_before_the_learned_channels_may() {
        let mut values = noise(600, 5);
        values[300] = 40.0;
        // Hourly readings: the first day is past by reading 24, but the learned channels
        // cannot alert before warmup + min_history = 406 readings.
        let mut det = DeviceDetector::new(DetectorConfig::default()).expect("config");
        assert_eq!(feed_timed(&mut det, &values, 3_600_000), vec![300]);
        // Readings a second apart span less than a day: the early channel holds back, and the
        // spike is no longer news once the learned channels may alert.
        let mut det = DeviceDetector::new(DetectorConfig::default()).expect("config");
        assert_eq!(feed_timed(&mut det, &values, 1_000), Vec::<usize>::new());
        // Switched off.
        let cfg = DetectorConfig {
            early_bar: 0.0,
            ..DetectorConfig::default()
        };
        let mut det = DeviceDetector::new(cfg).expect("config");
        assert_eq!(
            feed_timed(&mut det, &values, 3_600_000),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn the_forest_young_margin_fades_with_time_on_a_slow_stream() {
        let cfg = DetectorConfig::default();
        let day = 86_400_000;
        let mut m = MetricDetector::new(&cfg);
        // The first scored reading starts the clock.
        assert_eq!(m.forest_time_relief(&cfg, 0, Some(0)), 0.0);
        // Two of four days and 200 of 1000 scores: the time share (0.5) is below the readings
        // share (0.8), so 3 × 0.3 of the margin is retired.
        assert!((m.forest_time_relief(&cfg, 200, Some(2 * day)) - 0.9).abs() < 1e-9);
        // After four days the whole margin is gone for the forest channel.
        assert!((m.forest_time_relief(&cfg, 200, Some(5 * day)) - 2.4).abs() < 1e-9);
        // A full history has no margin to retire; no time stamp, no relief.
        assert_eq!(m.forest_time_relief(&cfg, 1000, Some(5 * day)), 0.0);
        assert_eq!(m.forest_time_relief(&cfg, 200, None), 0.0);
        // A fast stream (1000 readings in under four days) keeps the readings-only margin.
        let mut fast = MetricDetector::new(&cfg);
        fast.forest_time_relief(&cfg, 0, Some(0));
        let five_min = 300_000;
        assert!(fast.forest_time_relief(&cfg, 500, Some(500 * five_min)) == 0.0);
        let off = DetectorConfig {
            young_span_s: 0,
            ..DetectorConfig::default()
        };
        let mut m = MetricDetector::new(&off);
        m.forest_time_relief(&off, 0, Some(0));
        assert_eq!(m.forest_time_relief(&off, 200, Some(5 * day)), 0.0);
    }

    #[test]
    fn tail_probability() {
        assert!((upper_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((upper_tail(1.959_964) - 0.025).abs() < 1e-6);
        assert!((upper_tail(4.264_891) - 1e-5).abs() < 1e-8);
        assert!((upper_tail(-3.0) - 0.998_650_1).abs() < 1e-6);
    }

    #[test]
    fn warms_up_then_scores() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        let out = run(&mut det, &noise(600, 1));
        assert!(out[..256]
            .iter()
            .all(|o| o.raw_score.is_none() && o.score == 0.0));
        assert!(out[256..].iter().all(|o| o.raw_score.is_some()));
        assert!(out.iter().all(|o| (0.0..=1.0).contains(&o.score)));
    }

    #[test]
    fn spike_gives_exactly_one_alert() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        let mut values = noise(1500, 2);
        for v in &mut values[1000..1030] {
            *v += 8.0;
        }
        let out = run(&mut det, &values);
        let alerts: Vec<usize> = (0..out.len()).filter(|&i| out[i].alert.is_some()).collect();
        assert_eq!(alerts.len(), 1, "alerts at {alerts:?}");
        assert!((1000..1010).contains(&alerts[0]), "alerts at {alerts:?}");
    }

    #[test]
    fn alert_bar_matches_the_tail() {
        assert!((z_for_upper_tail(1e-5) - 4.264_891).abs() < 1e-5);
        assert!((z_for_upper_tail(0.025) - 1.959_964).abs() < 1e-5);
        assert!(z_for_upper_tail(1e-300) > 37.0);
        assert_eq!(z_for_upper_tail(0.5), 0.0);
    }

    #[test]
    fn lagged_max_ignores_recent_and_old_values() {
        let mut m = LaggedMax::default();
        for x in [5.0, 1.0, 2.0, 3.0] {
            m.push(x, None, 3, 1);
        }
        // Eligible: pushes 1..=2 (window 3 back, the newest one left out) -> max(1, 2).
        assert_eq!(m.max(), Some(2.0));
        m.push(0.0, None, 3, 1);
        assert_eq!(m.max(), Some(3.0));
        let mut empty = LaggedMax::default();
        empty.push(1.0, None, 10, 5);
        assert_eq!(empty.max(), None);
    }

    #[test]
    fn an_incident_lasts_a_thousand_readings_or_a_week() {
        let cfg = DetectorConfig::default();
        let (second, hour) = (1_000, 3_600_000);
        // One reading a second: the readings end the incident.
        assert!(same_incident(&cfg, (0, 0), (999, 999 * second)));
        assert!(!same_incident(&cfg, (0, 0), (1000, 1000 * second)));
        // One an hour: the week ends it first.
        assert!(same_incident(&cfg, (0, 0), (168, 168 * hour)));
        assert!(!same_incident(&cfg, (0, 0), (169, 169 * hour)));
        let no_span = DetectorConfig {
            recurrence_span_s: 0,
            ..DetectorConfig::default()
        };
        assert!(same_incident(&no_span, (0, 0), (999, 999 * hour)));
    }

    #[test]
    fn the_cadence_is_the_median_interval_and_ignores_gaps() {
        let mut c = Cadence::default();
        let minute = 60_000;
        let mut t = 0;
        for i in 0..CADENCE_FIRST {
            assert_eq!(c.median_ms(), None, "after {i} intervals");
            c.note(t);
            t += 5 * minute;
        }
        c.note(t);
        assert_eq!(c.median_ms(), Some(5 * minute));
        // A day-long gap, a repeated time stamp and a clock step back change nothing.
        for step in [86_400_000, 0, -minute] {
            t += step;
            c.note(t);
        }
        for _ in 0..CADENCE_SAMPLES {
            t += 5 * minute;
            c.note(t);
        }
        assert_eq!(c.median_ms(), Some(5 * minute));
        // A lasting change of rate is taken up within two rounds of samples.
        for _ in 0..2 * CADENCE_SAMPLES {
            t += 60 * minute;
            c.note(t);
        }
        assert_eq!(c.median_ms(), Some(60 * minute));
    }

    #[test]
    fn the_forest_smoothing_spans_about_an_hour_of_readings() {
        let cfg = DetectorConfig::default();
        let span_at = |interval_ms: i64| {
            let mut m = MetricDetector::new(&cfg);
            for i in 0..=CADENCE_FIRST as i64 {
                m.cadence.note(i * interval_ms);
            }
            m.forest_span(&cfg)
        };
        assert_eq!(span_at(1_000), cfg.avg_window, "one a second");
        assert_eq!(
            span_at(300_000),
            cfg.avg_window,
            "five-minutely: 12, capped"
        );
        assert_eq!(span_at(600_000), 6, "ten-minutely");
        assert_eq!(span_at(3_600_000), cfg.avg_min_window, "hourly: 1, raised");
        assert_eq!(
            MetricDetector::new(&cfg).forest_span(&cfg),
            cfg.avg_window,
            "no time stamps"
        );
        let off = DetectorConfig {
            avg_span_s: 0,
            ..DetectorConfig::default()
        };
        let mut m = MetricDetector::new(&off);
        for i in 0..=CADENCE_FIRST as i64 {
            m.cadence.note(i * 3_600_000);
        }
        assert_eq!(m.forest_span(&off), off.avg_window);
    }

    #[test]
    fn lagged_max_forgets_values_older_than_its_span() {
        let hour = 3_600_000;
        let mut m = LaggedMax::default();
        // Hourly values in a window of 1000 pushes, the newest one left out.
        m.push(9.0, Some(0), 1000, 1);
        for h in 1..=10 {
            m.push(1.0, Some(h * hour), 1000, 1);
        }
        m.forget_before(0);
        assert_eq!(m.max(), Some(9.0), "stamped at the cut-off: kept");
        m.forget_before(1);
        assert_eq!(m.max(), Some(1.0), "stamped before it: forgotten");
        // Values without a time stamp are never forgotten for their age.
        let mut n = LaggedMax::default();
        n.push(9.0, None, 1000, 1);
        n.push(1.0, None, 1000, 1);
        n.forget_before(i64::MAX - 1);
        assert_eq!(n.max(), Some(9.0));
    }

    #[test]
    fn far_peaks_are_block_maxima_between_the_gap_and_the_far_window() {
        let cfg = DetectorConfig {
            recurrence_far_window: 100,
            recurrence_gap: 20,
            ..DetectorConfig::default()
        };
        let mut far = FarPeaks::default();
        for i in 0..30 {
            far.push(&cfg, if i == 3 { 5.0 } else { 1.0 }, None);
        }
        // Three blocks of 10 complete: the newest two are left out (the gap of 20), the first,
        // holding the 5, counts.
        assert_eq!(far.blocks.max(), Some(5.0));
        for _ in 0..80 {
            far.push(&cfg, 1.0, None);
        }
        // 110 values: the block holding the 5 is now more than 100 values back.
        assert_eq!(far.blocks.max(), Some(1.0));
        far.push(&cfg, f64::NAN, None);
        assert_eq!(far.filled, 0, "NaN is not counted");
    }

    #[test]
    fn a_quiet_stretch_does_not_shrink_the_forest_spread_below_the_long_one() {
        let cfg = DetectorConfig {
            recurrence_window: 0,
            recurrence_far_window: 0,
            ..DetectorConfig::default()
        };
        let off = DetectorConfig {
            long_spread_half_life: 0,
            ..cfg.clone()
        };
        // 4000 scores alternating 0.4 and 0.6 (spread 0.1), then 2000 alternating 0.49 and
        // 0.51 (spread 0.01): the 1000-score history only holds the quiet stretch. Then 0.6.
        let z_after_quiet = |cfg: &DetectorConfig| {
            let (mut h, mut c) = (ScoreHistory::default(), ForestCalibration::default());
            for i in 0..6000 {
                let amp = if i < 4000 { 0.1 } else { 0.01 };
                let x = 0.5 + if i % 2 == 0 { amp } else { -amp };
                h.judge(cfg, x, f64::NAN, None, 1e-6, 0.0, Some(&mut c));
            }
            let long = c.long.std();
            (
                h.judge(cfg, 0.6, f64::NAN, None, 1e-6, 0.0, Some(&mut c)),
                long,
            )
        };
        let (z_off, _) = z_after_quiet(&off);
        assert!((z_off - 10.0).abs() < 1e-6, "{z_off}");
        // With the floor the bump is measured against the long spread: over 4000 scores of
        // spread 0.1 and then 2000 of 0.01 (half-life 10,000) it is still about 0.08.
        let (z_on, long) = z_after_quiet(&cfg);
        assert!(long > 0.07 && long < 0.09, "{long}");
        assert!((z_on - 0.1 / long).abs() < 1e-6, "{z_on}");
        assert!(z_on < z_off / 5.0);
        // A stream whose spread does not change is judged as before (the long spread then
        // equals the recent one, up to rounding).
        let steady = |cfg: &DetectorConfig| {
            let (mut h, mut c) = (ScoreHistory::default(), ForestCalibration::default());
            for i in 0..3000 {
                let x = if i % 2 == 0 { 0.6 } else { 0.4 };
                h.judge(cfg, x, f64::NAN, None, 1e-6, 0.0, Some(&mut c));
            }
            h.judge(cfg, 0.9, f64::NAN, None, 1e-6, 0.0, Some(&mut c))
        };
        let (a, b) = (steady(&cfg), steady(&off));
        assert!((a - b).abs() < 1e-6, "{a} {b}");
    }

    #[test]
    fn the_tail_fit_caps_scores_like_past_excursion_peaks() {
        let cfg = DetectorConfig::default();
        // Quiet scores near 0.45 with a burst every 97 scores whose peak varies (0.6-0.9),
        // as a bursty metric's smoothed isolation scores do.
        let mut hist = VecDeque::new();
        let mut fit = TailFit::default();
        for i in 0..6000u32 {
            let phase = i % 97;
            let x = if phase < 6 {
                0.6 + 0.3 * f64::from((i / 97 * 37) % 11) / 10.0 * f64::from(6 - phase) / 6.0
            } else {
                0.45 + 0.01 * f64::from((i * 7) % 5)
            };
            if hist.len() >= cfg.history {
                hist.pop_front();
            }
            hist.push_back(x);
            fit.push(&cfg, x, &hist);
        }
        let (sigma, _, rate) = fit.fit.expect("a fit");
        assert!(sigma > 0.0);
        // About one excursion per 97 scores.
        assert!(rate > 0.003 && rate < 0.02, "{rate}");
        // A peak like the past ones is common; far beyond them it is rare (or impossible).
        let common = fit.tail(0.8).expect("tail");
        let far = fit.tail(3.0).expect("tail");
        assert!(common > 1e-4, "{common}");
        assert!(far < common && far < 1e-6, "{far}");
        // A peak within the range of the past ones (0.88) is far above the Gaussian bar
        // (the quiet scores make the spread small) but not rare by the fit; one beyond the
        // fitted tail's end (these peaks never exceed 0.9) is not capped at all.
        let alert_z = z_for_upper_tail(cfg.alert_tail);
        let h = RollingStats {
            buf: hist.clone(),
            sum: hist.iter().sum(),
            sumsq: hist.iter().map(|x| x * x).sum(),
            pushes: 0,
        };
        assert!(h.z(0.88, 1e-6) > alert_z, "{}", h.z(0.88, 1e-6));
        let p = fit.tail(0.88).expect("tail");
        assert!(z_for_upper_tail(p) < alert_z, "{p}");
        assert_eq!(fit.tail(1.2), Some(0.0));
        // Through the channel with the forest calibration, recurrence check off so that only the
        // cap can hold the score down; and nothing is capped with the fit switched off.
        let z_after = |cfg: &DetectorConfig| {
            let (mut sh, mut c) = (ScoreHistory::default(), ForestCalibration::default());
            for &x in &hist {
                sh.judge(
                    cfg,
                    x,
                    f64::NAN,
                    None,
                    1e-6,
                    f64::NEG_INFINITY,
                    Some(&mut c),
                );
            }
            if cfg.tail_fit_quantile > 0.0 {
                c.tail = fit.clone();
            }
            sh.judge(
                cfg,
                0.88,
                f64::NAN,
                None,
                1e-6,
                f64::NEG_INFINITY,
                Some(&mut c),
            )
        };
        let on = DetectorConfig {
            recurrence_window: 0,
            recurrence_far_window: 0,
            long_spread_half_life: 0,
            ..DetectorConfig::default()
        };
        let off = DetectorConfig {
            tail_fit_quantile: 0.0,
            ..on.clone()
        };
        let (z_on, z_off) = (z_after(&on), z_after(&off));
        assert!(z_on < alert_z && z_off > alert_z, "{z_on} {z_off}");
    }

    #[test]
    fn long_spread_is_the_plain_spread_until_the_half_life_matters() {
        let mut l = LongSpread::default();
        for i in 0..100 {
            l.push(f64::from(i % 2), 10_000);
        }
        assert!((l.std() - 0.5).abs() < 1e-12);
        assert!((l.mean - 0.5).abs() < 1e-12);
        l.push(f64::NAN, 10_000);
        assert_eq!(l.n, 100, "NaN is not counted");
        // With a short half-life old values fade: after many 0s the spread is near 0.
        let mut l = LongSpread::default();
        for i in 0..1500 {
            l.push(if i < 500 { f64::from(i % 2) } else { 0.0 }, 50);
        }
        assert!(l.std() < 0.001, "{}", l.std());
    }

    #[test]
    fn the_far_tier_masks_only_clearly_smaller_excursions() {
        let hour = 3_600_000;
        // A peak of 10, `quiet` readings of 1 (one a minute, or one an hour), then `x`.
        let z_after_peak = |cfg: &DetectorConfig, quiet: i64, step_ms: i64, x: f64| {
            let mut h = ScoreHistory::default();
            h.judge(cfg, 10.0, f64::NAN, Some(0), 0.1, 0.0, None);
            for i in 1..=quiet {
                h.judge(cfg, 1.0, f64::NAN, Some(i * step_ms), 0.1, 0.0, None);
            }
            h.judge(
                cfg,
                x,
                f64::NAN,
                Some((quiet + 1) * step_ms),
                0.1,
                0.0,
                None,
            )
        };
        let cfg = DetectorConfig::default();
        let minute = 60_000;
        // 1500 readings back: beyond the near tier, within the far one.
        assert_eq!(z_after_peak(&cfg, 1500, minute, 7.0), 0.0);
        assert!(z_after_peak(&cfg, 1500, minute, 8.0) > 0.0);
        let off = DetectorConfig {
            recurrence_far_window: 0,
            ..cfg.clone()
        };
        assert!(z_after_peak(&off, 1500, minute, 7.0) > 0.0);
        // Excursions are measured from the history's mean (1 here): 7.6 rises 6.6 above it,
        // no more than three quarters of the old peak's 9, so it is masked too (a share of the
        // raw scores would let it pass: 7.6 > 0.75 × 10).
        assert_eq!(z_after_peak(&cfg, 1500, minute, 7.6), 0.0);
        assert!(z_after_peak(&cfg, 1500, minute, 7.9) > 0.0);
        // Beyond the far window nothing masks it; nor (hourly readings) more than a week back,
        // while within the week the near tier still does.
        assert!(z_after_peak(&cfg, 3100, minute, 7.0) > 0.0);
        assert!(z_after_peak(&cfg, 200, hour, 7.0) > 0.0);
        assert_eq!(z_after_peak(&cfg, 160, hour, 7.0), 0.0);
    }

    #[test]
    fn recurring_spikes_do_not_keep_alerting() {
        // A spike of the same size every 150 points on a noisy level: once the detector has
        // seen a few of them, later ones are a known pattern, not new incidents.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(8);
        let values: Vec<f64> = (0..3000)
            .map(|i| 10.0 + 0.2 * rng.gen::<f64>() + if i % 150 < 3 { 3.0 } else { 0.0 })
            .collect();
        let alerts_with = |cfg: DetectorConfig| {
            let mut det = DeviceDetector::new(cfg).expect("config");
            let out = run(&mut det, &values);
            (0..out.len())
                .filter(|&i| out[i].alert.is_some())
                .collect::<Vec<usize>>()
        };
        let alerts = alerts_with(small_config());
        let without = alerts_with(DetectorConfig {
            recurrence_window: 0,
            ..small_config()
        });
        assert!(
            alerts.len() <= 1,
            "alerts at {alerts:?} (without the check: {without:?})"
        );
        assert!(without.len() > alerts.len(), "{alerts:?} {without:?}");
    }

    #[test]
    fn an_excursion_made_every_half_hour_is_routine_after_three_and_a_bigger_one_is_not() {
        // One reading a second: a minute-long bump every 25 minutes (1,500 readings, beyond
        // the near tier's 1,000) for twelve hours, then one three times as high.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let n = 12 * 3600;
        let values: Vec<f64> = (0..n + 1500)
            .map(|i| {
                let bump = match (i % 1500 >= 1400 && i % 1500 < 1460, i >= n) {
                    (true, false) => 3.0,
                    (true, true) => 9.0,
                    _ => 0.0,
                };
                10.0 + 0.2 * rng.gen::<f64>() + bump
            })
            .collect();
        let alerts = feed_timed(
            &mut DeviceDetector::new(small_config()).expect("config"),
            &values,
            1000,
        );
        let without = feed_timed(
            &mut DeviceDetector::new(DetectorConfig {
                recurrence_long_span_s: 0,
                ..small_config()
            })
            .expect("config"),
            &values,
            1000,
        );
        let routine = alerts.iter().filter(|&&i| i < n).count();
        assert!(routine <= 4, "alerts at {alerts:?}");
        assert!(
            without.iter().filter(|&&i| i < n).count() >= 10,
            "without the long tier: {without:?}"
        );
        assert!(
            alerts.iter().any(|&i| i >= n),
            "the bigger bump is news: {alerts:?}, without the long tier {without:?}"
        );
    }

    #[test]
    fn the_level_channel_accumulates_sustained_shifts_not_spikes() {
        let cfg = DetectorConfig::default();
        let mut level = LevelState::default();
        let noise = noise(3000, 5);
        let mut feed = |x: f64| level.update(&cfg, x).unwrap_or(0.0);
        let quiet = (0..2000).map(|i| feed(noise[i])).fold(0.0_f64, f64::max);
        assert!(quiet < cfg.level_floor / 4.0, "noise builds {quiet}");
        // One huge spike adds at most level_clip - level_k.
        let spike = feed(1e6);
        assert!(
            spike <= quiet + cfg.level_clip - cfg.level_k + 1e-9,
            "{spike}"
        );
        let drained = (0..200)
            .map(|i| feed(noise[2000 + i]))
            .last()
            .unwrap_or(1.0);
        assert_eq!(drained, 0.0);
        // A sustained shift of 4 spreads passes the floor within a few dozen readings.
        let crossed = (0..200).position(|i| feed(4.0 + noise[2200 + i]) >= cfg.level_floor);
        assert!(crossed.is_some_and(|n| n > 20 && n < 60), "{crossed:?}");
    }

    #[test]
    fn steady_signals_do_not_alert() {
        for values in [vec![5.0; 3000], noise(3000, 3)] {
            let mut det = DeviceDetector::new(small_config()).expect("config");
            let out = run(&mut det, &values);
            let alerts: Vec<usize> = (0..out.len()).filter(|&i| out[i].alert.is_some()).collect();
            assert!(alerts.is_empty(), "alerts at {alerts:?}");
        }
    }

    #[test]
    fn flattened_cycle_is_caught() {
        // A noisy sine with a 100-point period whose cycle goes flat for half a period: every
        // value stays inside the usual range, only the shape is new.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        let mut values: Vec<f64> = (0..2400)
            .map(|i| (i as f64 * std::f64::consts::TAU / 100.0).sin() + 0.02 * rng.gen::<f64>())
            .collect();
        for v in &mut values[1850..1900] {
            *v = 0.02 * rng.gen::<f64>();
        }
        let mut det = DeviceDetector::new(small_config()).expect("config");
        let out = run(&mut det, &values);
        let alerts: Vec<usize> = (0..out.len()).filter(|&i| out[i].alert.is_some()).collect();
        assert!(
            alerts.iter().any(|&i| (1850..1910).contains(&i)),
            "alerts at {alerts:?}"
        );
        assert!(alerts.iter().all(|&i| i >= 1850), "alerts at {alerts:?}");
    }

    #[test]
    fn reservoir_keeps_old_vectors_for_training() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        run(&mut det, &noise(2000, 5));
        // Jobs are installed inline by `run`, so none is pending now.
        assert!(det.needs_refit().is_none());
        for v in noise(256, 6) {
            det.feed_value("m", v);
        }
        let job = det.needs_refit().expect("refit due");
        let cfg = DetectorConfig::default();
        assert_eq!(job.rows(), cfg.window + cfg.reservoir);
    }

    #[test]
    fn extreme_inputs_never_break_scores() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        let values: Vec<f64> = (0..1200)
            .map(|i| match i % 7 {
                0 => f64::MAX,
                1 => -f64::MAX,
                2 => f64::NAN,
                3 => 1e-300,
                _ => rng.gen::<f64>() * 1e200,
            })
            .collect();
        let out = run(&mut det, &values);
        assert!(out.iter().all(|o| (0.0..=1.0).contains(&o.score)));
        assert!(out.iter().any(|o| o.raw_score.is_some()));
    }

    #[test]
    fn jobs_and_models_can_move_to_worker_threads() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<RefitJob>();
        assert_send::<TrainedModel>();
        assert_send::<DeviceDetector>();
    }

    #[test]
    fn config_deserialises_with_defaults() {
        let cfg: DetectorConfig =
            serde_json::from_str(r#"{"alert_tail":1e-4,"n_trees":50}"#).expect("json");
        assert_eq!(cfg.n_trees, 50);
        assert_eq!(cfg.window, DetectorConfig::default().window);
        assert!(serde_json::from_str::<DetectorConfig>(r#"{"bogus":1}"#).is_err());
    }

    #[test]
    fn refit_jobs_are_handed_out_once_and_stale_models_ignored() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        for v in noise(256, 4) {
            det.feed_value("m", v);
        }
        let job = det.needs_refit().expect("warm-up done");
        assert_eq!(job.rows(), 256);
        assert!(det.needs_refit().is_none(), "job already pending");
        let model = job.clone().run().expect("fit");
        assert!(det.install(model.clone()));
        assert!(!det.install(model), "same generation twice");
        let stranger = TrainedModel {
            metric: "other".into(),
            ..job.run().expect("fit")
        };
        assert!(!det.install(stranger));
        // A job handed out before a restart is stale even when its metric is fed again (and
        // takes the same generation) before the model arrives.
        let mut fresh = DeviceDetector::new(small_config()).expect("config");
        for v in noise(256, 4) {
            fresh.feed_value("m", v);
        }
        let before = fresh
            .needs_refit()
            .expect("warm-up done")
            .run()
            .expect("fit");
        fresh.restart();
        for v in noise(256, 5) {
            fresh.feed_value("m", v);
        }
        assert!(!fresh.install(before), "fitted before the restart");
        let after = fresh
            .needs_refit()
            .expect("warm-up done")
            .run()
            .expect("fit");
        assert!(fresh.install(after));
    }

    #[test]
    fn metric_limit_and_config_validation() {
        let cfg = DetectorConfig {
            max_metrics: 1,
            ..small_config()
        };
        let mut det = DeviceDetector::new(cfg).expect("config");
        let reading = Reading {
            timestamp_ms: 0,
            device_time: true,
            metrics: vec![("a".into(), 1.0), ("b".into(), 2.0)],
        };
        assert_eq!(det.feed(&reading).len(), 1);
        assert_eq!(det.ignored_metrics(), 1);
        assert!(DeviceDetector::new(DetectorConfig {
            warmup: 4,
            ..DetectorConfig::default()
        })
        .is_err());
        assert!(DeviceDetector::new(DetectorConfig {
            n_trees: 0,
            ..DetectorConfig::default()
        })
        .is_err());
        let bytes = DetectorConfig::default().bytes_per_metric();
        assert!(bytes > 400_000 && bytes < 650_000, "{bytes}");
        for far in [500, 1000] {
            assert!(DeviceDetector::new(DetectorConfig {
                recurrence_far_window: far,
                ..DetectorConfig::default()
            })
            .is_err());
        }
        assert!(DeviceDetector::new(DetectorConfig {
            recurrence_long_count: 0,
            ..DetectorConfig::default()
        })
        .is_err());
        assert!(DeviceDetector::new(DetectorConfig {
            recurrence_long_count: 0,
            recurrence_long_span_s: 0,
            ..DetectorConfig::default()
        })
        .is_ok());
        for share in [0.0, 1.5, f64::NAN] {
            assert!(DeviceDetector::new(DetectorConfig {
                recurrence_far_share: share,
                ..DetectorConfig::default()
            })
            .is_err());
        }
    }

    /// A motor: current with a slow cycle, a winding temperature that follows it, an unrelated
    /// vibration. `hot(i)` is added to the temperature, `shake(i)` to the vibration.
    fn motor(
        det: &mut DeviceDetector,
        range: std::ops::Range<usize>,
        hot: impl Fn(usize) -> f64,
        shake: impl Fn(usize) -> f64,
    ) -> Vec<AlertMessage> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(range.start as u64);
        let mut alerts = Vec::new();
        for i in range {
            let current = 15.0 + 3.0 * (i as f64 / 60.0).sin() + 0.4 * (rng.gen::<f64>() - 0.5);
            let temperature = 40.0 + 2.0 * current + 0.5 * (rng.gen::<f64>() - 0.5) + hot(i);
            let vibration = 0.9 + 0.05 * (rng.gen::<f64>() - 0.5) + shake(i);
            let reading = Reading {
                timestamp_ms: i as i64 * 1000,
                device_time: true,
                metrics: vec![
                    ("current".into(), current),
                    ("temperature".into(), temperature),
                    ("vibration".into(), vibration),
                ],
            };
            for o in det.feed(&reading) {
                alerts.extend(o.to_alert("m1"));
            }
            det.refit_inline().expect("refit");
        }
        alerts
    }

    #[test]
    fn the_cross_metric_model_follows_a_lasting_change_of_the_metric_set() {
        let cfg = small_config();
        let mut det = DeviceDetector::new(cfg.clone()).expect("config");
        motor(&mut det, 0..600, |_| 0.0, |_| 0.0);
        let names = |det: &DeviceDetector| {
            det.joint_fit()
                .iter()
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&det), ["current", "temperature", "vibration"]);
        // The vibration sensor is removed: readings carry two of the model's three metrics.
        let feed = |det: &mut DeviceDetector, range: std::ops::Range<usize>, single: bool| {
            for i in range {
                let current = 15.0 + 3.0 * (i as f64 / 60.0).sin();
                let mut metrics = vec![("current".to_string(), current)];
                if !single {
                    metrics.push(("temperature".to_string(), 40.0 + 2.0 * current));
                }
                det.feed(&Reading {
                    timestamp_ms: i as i64 * 1000,
                    device_time: true,
                    metrics,
                });
                det.refit_inline().expect("refit");
            }
        };
        feed(&mut det, 600..600 + cfg.warmup - 1, false);
        // Single-metric readings in between say nothing about the set.
        feed(&mut det, 2000..2100, true);
        assert_eq!(names(&det), ["current", "temperature", "vibration"]);
        feed(&mut det, 3000..3001, false);
        assert_eq!(names(&det), ["current", "temperature"]);
        assert!(det.joint_fit().iter().all(|(_, r2)| r2.is_none()));
        // It trains again like a new model.
        feed(&mut det, 3001..3001 + cfg.warmup, false);
        assert!(det.joint_fit().iter().all(|(_, r2)| r2.is_some()));

        // A model whose metrics keep coming, now and then with another set, is kept.
        let mut det = DeviceDetector::new(cfg.clone()).expect("config");
        for i in 0..2 * cfg.warmup {
            motor(&mut det, 2 * i..2 * i + 1, |_| 0.0, |_| 0.0);
            feed(&mut det, 2 * i + 1..2 * i + 2, false);
        }
        assert_eq!(names(&det), ["current", "temperature", "vibration"]);
    }

    #[test]
    fn a_broken_relationship_between_metrics_gives_one_alert_naming_the_metric() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        let normal = motor(&mut det, 0..3000, |_| 0.0, |_| 0.0);
        assert!(normal.is_empty(), "normal running: {normal:?}");
        let fit = det.joint_fit();
        assert_eq!(fit.len(), 3);
        assert!(fit[1].1.is_some_and(|r2| r2 > 0.9), "{fit:?}");
        // Cooling fault: the temperature climbs 3 degrees above what the current explains,
        // which keeps it inside its normal range (64-76) most of the time.
        let fault = motor(
            &mut det,
            3000..3400,
            |i| ((i - 3000) as f64 * 0.03).min(3.0),
            |_| 0.0,
        );
        assert_eq!(fault.len(), 1, "{fault:?}");
        assert_eq!(fault[0].metric, "temperature");
        let expected = fault[0].expected.expect("cross-metric alert");
        assert!(fault[0].value - expected > 0.5, "{:?}", fault[0]);
        assert!(
            fault[0].message.contains("does not fit current, vibration"),
            "{}",
            fault[0].message
        );

        // The per-metric channels alone do not see it.
        let mut alone = DeviceDetector::new(DetectorConfig {
            joint_metrics: 0,
            ..small_config()
        })
        .expect("config");
        assert!(motor(&mut alone, 0..3000, |_| 0.0, |_| 0.0).is_empty());
        let missed = motor(
            &mut alone,
            3000..3400,
            |i| ((i - 3000) as f64 * 0.03).min(3.0),
            |_| 0.0,
        );
        assert!(missed.is_empty(), "{missed:?}");
    }

    #[test]
    fn a_cross_metric_alert_names_the_metric_that_moves_in_proportion_with_the_one_it_names() {
        // Vibration and current both follow the load in proportion, the temperature follows
        // it slowly: whichever of the two is off, the residuals look the same. The vibration
        // ramps up; the alert names it, or names it as the alternative to current.
        let mut det = DeviceDetector::new(small_config()).expect("config");
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let mut noise = move |scale: f64| scale * (rng.gen::<f64>() - 0.5) * 3.4;
        let mut temperature = 55.0;
        let mut alerts = Vec::new();
        for i in 0..4000 {
            let load = 0.5 - 0.4 * (i as f64 * std::f64::consts::TAU / 600.0).cos();
            temperature += (50.0 + 10.0 * load - temperature) / 300.0;
            let wear = 0.02 * (i as i64 - 3000).max(0) as f64;
            let reading = Reading {
                timestamp_ms: i as i64 * 1000,
                device_time: true,
                metrics: vec![
                    ("temperature".into(), temperature + noise(0.4)),
                    ("vibration".into(), 1.8 + load + wear + noise(0.1)),
                    ("current".into(), 8.0 + 10.0 * load + noise(0.3)),
                ],
            };
            for o in det.feed(&reading) {
                alerts.extend(o.to_alert("m1").map(|a| (i, a)));
            }
            det.refit_inline().expect("refit");
        }
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let (at, alert) = &alerts[0];
        assert!(*at >= 3000, "{alerts:?}");
        assert!(alert.expected.is_some(), "a cross-metric alert: {alert:?}");
        let names = |m: &str| alert.metric == m || alert.alternatives.iter().any(|a| a == m);
        assert!(names("vibration"), "{alert:?}");
        if alert.metric != "vibration" {
            assert!(
                alert.message.contains("vibration moves with"),
                "{}",
                alert.message
            );
        }
    }

    #[test]
    fn a_medium_alert_is_ordinary_only_at_a_usual_operating_point() {
        let cfg = small_config();
        let mut det = DeviceDetector::new(cfg.clone()).expect("config");
        motor(&mut det, 0..3000, |_| 0.0, |_| 0.0);
        let joint = det.joint.as_ref().expect("cross-metric channel");
        assert_eq!(joint.names, ["current", "temperature", "vibration"]);
        // The current, at a usual load: explained, at a usual operating point.
        assert!(joint.ordinary(&cfg, 0, Severity::Low, 16.0));
        assert!(joint.ordinary(&cfg, 0, Severity::Medium, 16.0));
        assert!(!joint.ordinary(&cfg, 0, Severity::High, 16.0));
        // An overload that keeps the relationship (the temperature follows the current) but
        // lies beyond the loads the model has seen: a LOW alert is still dropped, a MEDIUM one
        // is not.
        for i in 3000..3000 + cfg.avg_window as i64 {
            det.feed(&Reading {
                timestamp_ms: i * 1000,
                device_time: true,
                metrics: vec![
                    ("current".into(), 25.0),
                    ("temperature".into(), 90.0),
                    ("vibration".into(), 0.9),
                ],
            });
        }
        let joint = det.joint.as_ref().expect("cross-metric channel");
        assert!(joint.ordinary(&cfg, 0, Severity::Low, 25.0));
        assert!(!joint.ordinary(&cfg, 0, Severity::Medium, 25.0));
    }

    #[test]
    fn per_metric_alerts_on_ordinary_readings_are_dropped() {
        // A bar low enough that healthy noise raises LOW per-metric alerts (at any pace).
        let loose = DetectorConfig {
            alert_tail: 1e-2,
            alert_interval_s: 0,
            young_margin: 0.0,
            ..small_config()
        };
        let explained = |alerts: &[AlertMessage]| {
            alerts
                .iter()
                .filter(|a| a.expected.is_none() && a.metric != "vibration")
                .count()
        };
        let mut alone = DeviceDetector::new(DetectorConfig {
            joint_metrics: 0,
            ..loose.clone()
        })
        .expect("config");
        let without = motor(&mut alone, 0..4000, |_| 0.0, |_| 0.0);
        assert!(explained(&without) > 0, "{without:?}");
        assert!(without.iter().all(|a| a.severity == Severity::Low));

        assert!(
            without.iter().any(|a| a.metric == "vibration"),
            "{without:?}"
        );

        // Current and temperature follow each other, so their noise is the machine moving
        // along its usual relationship; the vibration is unrelated to both, and its readings
        // stay at their usual level, so its alerts are noise too. All dropped.
        let mut det = DeviceDetector::new(loose).expect("config");
        let with = motor(&mut det, 0..4000, |_| 0.0, |_| 0.0);
        assert!(with.is_empty(), "{with:?}");
        // A vibration that leaves its usual level is reported as soon as its recent mean is
        // 2 standard deviations off (18 readings into this ramp; the loose bar reports the
        // ramp again after each cooldown).
        let shift = motor(&mut det, 4000..4300, |_| 0.0, |i| (i - 4000) as f64 * 0.002);
        assert!(shift.iter().all(|a| a.metric == "vibration"), "{shift:?}");
        assert!(
            shift.first().is_some_and(|a| a.timestamp < 4_030_000),
            "{shift:?}"
        );
    }

    #[test]
    fn a_frozen_sensor_is_one_stuck_incident() {
        // Readings 3000..5000 repeat the last value of one metric: the vibration (which the
        // others do not explain), then, on a fresh device, the temperature (which they do).
        for frozen in ["vibration", "temperature"] {
            let mut det = DeviceDetector::new(small_config()).expect("config");
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
            let mut held = f64::NAN;
            let mut alerts = Vec::new();
            for i in 0..6000 {
                let current = 15.0 + 3.0 * (i as f64 / 60.0).sin() + 0.4 * (rng.gen::<f64>() - 0.5);
                let mut metrics = vec![
                    ("current".to_string(), current),
                    (
                        "temperature".into(),
                        40.0 + 2.0 * current + rng.gen::<f64>() - 0.5,
                    ),
                    ("vibration".into(), 0.9 + 0.05 * (rng.gen::<f64>() - 0.5)),
                ];
                for (_, value) in metrics.iter_mut().filter(|(n, _)| n == frozen) {
                    if i == 2999 {
                        held = *value;
                    } else if (3000..5000).contains(&i) {
                        *value = held;
                    }
                }
                let reading = Reading {
                    timestamp_ms: i * 1000,
                    device_time: true,
                    metrics,
                };
                for o in det.feed(&reading) {
                    alerts.extend(o.to_alert("m1").map(|a| (i, a)));
                }
                det.refit_inline().expect("refit");
            }
            assert_eq!(alerts.len(), 1, "{frozen}: {alerts:?}");
            let (at, alert) = &alerts[0];
            assert_eq!(alert.metric, frozen);
            if frozen == "vibration" {
                // Nothing else sees it: the stuck check reports it on the 30th reading.
                assert_eq!(*at, 3028);
                assert_eq!(alert.severity, Severity::Medium);
                assert!(
                    alert.message.contains("for 30 readings in a row"),
                    "{alert:?}"
                );
                assert_eq!(alert.action, STUCK_ACTION);
            } else {
                // The temperature stops following the load: whichever channel sees it first
                // reports it, once.
                assert!((3000..3100).contains(at), "{alerts:?}");
            }
        }
    }

    #[test]
    fn metrics_that_go_missing_are_one_incident_and_sparse_ones_are_not() {
        fn feed(
            det: &mut DeviceDetector,
            i: i64,
            names: &[&str],
            alerts: &mut Vec<(i64, AlertMessage)>,
        ) {
            let reading = Reading {
                timestamp_ms: i * 1000,
                device_time: true,
                metrics: names
                    .iter()
                    .map(|n| (n.to_string(), 10.0 + (i % 17) as f64))
                    .collect(),
            };
            for o in det.feed(&reading) {
                alerts.extend(o.to_alert("m1").map(|a| (i, a)));
            }
        }
        let mut det = DeviceDetector::new(small_config()).expect("config");
        let mut alerts = Vec::new();
        // Three metrics in every reading, then only the temperature: vibration and current go
        // missing together (one alert naming both, on the 30th reading without them).
        let all = ["temperature", "vibration", "current"];
        for i in 0..500 {
            feed(&mut det, i, &all, &mut alerts);
        }
        for i in 500..700 {
            feed(&mut det, i, &["temperature"], &mut alerts);
        }
        // They come back; no alert for that.
        for i in 700..900 {
            feed(&mut det, i, &all, &mut alerts);
        }
        let missing: Vec<_> = alerts
            .iter()
            .filter(|(_, a)| a.action == MISSING_ACTION)
            .collect();
        assert_eq!(missing.len(), 1, "{alerts:?}");
        let (at, alert) = missing[0];
        assert_eq!(*at, 529);
        assert_eq!(alert.metric, "vibration");
        assert_eq!(alert.severity, Severity::Medium);
        assert!(
            alert
                .message
                .starts_with("vibration (and current) missing from the device's last 30 readings"),
            "{alert:?}"
        );
        // A device that sends one tag per message, in turn, never has a metric missing for
        // long compared with its usual absences.
        let mut tagged = DeviceDetector::new(small_config()).expect("config");
        alerts.clear();
        for i in 0..3000 {
            feed(&mut tagged, i, &[all[(i % 3) as usize]], &mut alerts);
        }
        assert!(
            alerts.iter().all(|(_, a)| a.action != MISSING_ACTION),
            "{alerts:?}"
        );
        // ... until one of its tags stops: absent 3 times in a row at most before, so 30
        // readings (10 rounds) without it are news.
        for i in 3000..3100 {
            feed(&mut tagged, i, &[all[(i % 2) as usize]], &mut alerts);
        }
        let missing = alerts
            .iter()
            .filter(|(_, a)| a.action == MISSING_ACTION)
            .map(|(i, a)| (*i, a.metric.clone()))
            .collect::<Vec<_>>();
        assert_eq!(missing, [(3029, "current".to_string())]);
    }

    #[test]
    fn a_fault_both_channels_see_is_still_one_incident() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        assert!(motor(&mut det, 0..3000, |_| 0.0, |_| 0.0).is_empty());
        // The temperature jumps far out of range: per-metric and cross-metric channels both
        // see it.
        let fault = motor(
            &mut det,
            3000..3300,
            |i| if i >= 3000 { 15.0 } else { 0.0 },
            |_| 0.0,
        );
        assert_eq!(fault.len(), 1, "{fault:?}");
        assert_eq!(fault[0].metric, "temperature");
    }

    #[test]
    fn single_metric_streams_and_disabled_config_have_no_cross_metric_channel() {
        let mut det = DeviceDetector::new(small_config()).expect("config");
        run(&mut det, &noise(600, 9));
        assert!(det.joint_fit().is_empty());
        let mut off = DeviceDetector::new(DetectorConfig {
            joint_metrics: 0,
            ..small_config()
        })
        .expect("config");
        motor(&mut off, 0..300, |_| 0.0, |_| 0.0);
        assert!(off.joint_fit().is_empty());
        assert!(DeviceDetector::new(DetectorConfig {
            joint_metrics: 9,
            ..small_config()
        })
        .is_err());
    }
}
