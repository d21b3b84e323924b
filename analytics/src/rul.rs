//! Remaining-useful-life regression for multi-sensor machines trained on run-to-failure histories
//! (NASA C-MAPSS style: one row per engine cycle with 3 operating settings and 21 sensors).
//!
//! Pipeline:
//! 1. operating regimes are recognised from the three settings, and every sensor reading is
//!    expressed in standard deviations from the mean of its regime (for single-regime data such
//!    as FD001 this is plain standardisation); sensors that then carry no information (fewer than
//!    three distinct values) are dropped;
//! 2. every cycle gets causal features from the engine's own recent history: the mean of the
//!    last `short_window` cycles, the mean and the least-squares slope over the last
//!    `long_window` cycles per kept sensor; features are z-normalised with training statistics.
//!    The machine's age (cycles run so far) is deliberately not a feature: a live service rarely
//!    knows it (it sees a machine from whenever it started watching), and on FD001 it is worth
//!    only about 0.2 of RMSE;
//! 3. training targets are the piecewise-linear RUL, `min(cycles to failure, cap)`, since early
//!    life shows no measurable degradation;
//! 4. a linear model (linfa-linear OLS) captures the global trend, and gradient-boosted
//!    regression trees (implemented here, histogram-based) fit its residuals to model the
//!    non-linear knee of the capped target.
//!
//! Predictions are clamped to `[0, cap]`.
//!
//! A trained model is saved as JSON (`RulModel::to_json`, `RulModel::from_json`) with the
//! metric names its sensors and settings are read from, so the live service can apply it to a
//! device's telemetry: a [`RulTracker`] keeps the last `long_window` readings of one machine.
//! Besides C-MAPSS text, training data can be histories exported by `vigil export` (one CSV file
//! per machine run to failure, [`parse_runs_csv`]).

use std::collections::VecDeque;
use std::sync::Arc;

use linfa::dataset::DatasetBase;
use linfa::traits::{Fit, Predict};
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Number of real sensors per C-MAPSS row.
pub const N_SENSORS: usize = 21;

/// Errors of the RUL module.
#[derive(Debug, thiserror::Error)]
pub enum RulError {
    /// A data row could not be read.
    #[error("line {line}: {reason}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// Training needs data.
    #[error("no usable training data: {0}")]
    NoData(&'static str),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
    /// The linear regression failed.
    #[error("linear regression failed: {0}")]
    Linear(String),
    /// A saved model could not be read.
    #[error("not a model file of this version: {0}")]
    Format(String),
}

/// One engine cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct CycleRow {
    /// Engine id.
    pub unit: u32,
    /// Cycle number, starting at 1.
    pub cycle: u32,
    /// The three operating settings.
    pub settings: [f64; 3],
    /// The 21 sensor readings.
    pub sensors: [f64; N_SENSORS],
}

/// Parses C-MAPSS text: whitespace-separated `unit cycle set1 set2 set3 s1..s21` rows, with an
/// optional header line and ignored trailing padding columns.
pub fn parse_cmapss(text: &str) -> Result<Vec<CycleRow>, RulError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        // The first line may be a header; any other non-numeric row is an error.
        if i == 0 && fields[0].parse::<f64>().is_err() {
            continue;
        }
        let err = |reason: String| RulError::Parse {
            line: i + 1,
            reason,
        };
        if fields.len() < 5 + N_SENSORS {
            return Err(err(format!("expected 26 columns, got {}", fields.len())));
        }
        let mut nums = [0.0f64; 5 + N_SENSORS];
        for (slot, f) in nums.iter_mut().zip(&fields) {
            *slot = f
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(format!("not a number: {f}")))?;
        }
        if nums[0] < 0.0 || nums[1] < 0.0 || nums[0] > u32::MAX as f64 || nums[1] > u32::MAX as f64
        {
            return Err(err("unit and cycle must be non-negative integers".into()));
        }
        let mut sensors = [0.0; N_SENSORS];
        sensors.copy_from_slice(&nums[5..5 + N_SENSORS]);
        rows.push(CycleRow {
            unit: nums[0] as u32,
            cycle: nums[1] as u32,
            settings: [nums[2], nums[3], nums[4]],
            sensors,
        });
    }
    Ok(rows)
}

/// Number of distinct engines in `rows`.
pub fn engine_count(rows: &[CycleRow]) -> usize {
    let mut units: Vec<u32> = rows.iter().map(|r| r.unit).collect();
    units.sort_unstable();
    units.dedup();
    units.len()
}

/// Splits rows into per-engine histories ordered by cycle, engines in order of first appearance.
fn group_by_engine(rows: &[CycleRow]) -> Vec<Vec<&CycleRow>> {
    let mut groups: Vec<(u32, Vec<&CycleRow>)> = Vec::new();
    for r in rows {
        match groups.iter_mut().find(|(u, _)| *u == r.unit) {
            Some((_, g)) => g.push(r),
            None => groups.push((r.unit, vec![r])),
        }
    }
    groups
        .into_iter()
        .map(|(_, mut g)| {
            g.sort_by_key(|r| r.cycle);
            g
        })
        .collect()
}

/// Hyper-parameters of the RUL model. The defaults are common choices for C-MAPSS (cap 125,
/// 30-cycle windows) and for boosted trees (shallow trees, small learning rate, subsampling).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulConfig {
    /// Cap of the piecewise-linear target.
    pub cap: f64,
    /// Cycles averaged into the short mean feature.
    pub short_window: usize,
    /// Cycles used for the long mean and slope features.
    pub long_window: usize,
    /// Boosting rounds.
    pub rounds: usize,
    /// Shrinkage per round.
    pub learning_rate: f64,
    /// Depth of each tree.
    pub max_depth: usize,
    /// Fewest training rows per leaf.
    pub min_leaf: usize,
    /// Fraction of rows drawn for each tree.
    pub row_subsample: f64,
    /// Seed for the row subsampling.
    pub seed: u64,
}

impl Default for RulConfig {
    fn default() -> Self {
        Self {
            cap: 125.0,
            short_window: 10,
            long_window: 30,
            rounds: 300,
            learning_rate: 0.05,
            max_depth: 3,
            min_leaf: 50,
            row_subsample: 0.7,
            seed: 0x00c0_ffee,
        }
    }
}

impl RulConfig {
    fn validate(&self) -> Result<(), RulError> {
        if self.cap.is_nan() || self.cap <= 0.0 {
            return Err(RulError::InvalidConfig("cap must be positive"));
        }
        if self.short_window == 0 || self.long_window < 2 {
            return Err(RulError::InvalidConfig("windows too short"));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return Err(RulError::InvalidConfig("learning_rate must be in (0, 1]"));
        }
        if !(self.row_subsample > 0.0 && self.row_subsample <= 1.0) {
            return Err(RulError::InvalidConfig("row_subsample must be in (0, 1]"));
        }
        if self.max_depth == 0 || self.max_depth > 12 || self.min_leaf == 0 {
            return Err(RulError::InvalidConfig(
                "max_depth must be 1..=12 and min_leaf positive",
            ));
        }
        Ok(())
    }
}

/// Raw (unnormalised) features of the last cycle of `history` for the kept sensors. Only the
/// last `long_window` rows matter.
fn raw_features(history: &[&CycleRow], kept: &[usize], cfg: &RulConfig) -> Vec<f64> {
    let n = history.len();
    let mut out = Vec::with_capacity(kept.len() * 3);
    let short = &history[n.saturating_sub(cfg.short_window)..];
    let long = &history[n.saturating_sub(cfg.long_window)..];
    for &s in kept {
        let mean_short = short.iter().map(|r| r.sensors[s]).sum::<f64>() / short.len() as f64;
        let m = long.len() as f64;
        let mean_long = long.iter().map(|r| r.sensors[s]).sum::<f64>() / m;
        // Least-squares slope against the position in the window (per cycle).
        let tbar = (m - 1.0) / 2.0;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (t, r) in long.iter().enumerate() {
            let dt = t as f64 - tbar;
            sxy += dt * (r.sensors[s] - mean_long);
            sxx += dt * dt;
        }
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        out.extend([mean_short, mean_long, slope]);
    }
    out
}

/// Most operating regimes recognised; settings that produce more distinct keys are treated as
/// continuous and the data as a single regime.
const MAX_REGIMES: usize = 50;

/// Operating regimes found in the training settings and the per-regime sensor statistics used
/// to normalise sensors. Engines flown at different altitudes, Mach numbers and throttle
/// settings read very different temperatures and pressures; comparing each reading with the
/// typical reading of its own regime leaves the degradation signal. With a single regime (as in
/// FD001) this is plain z-normalisation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Regimes {
    keys: Vec<[i64; 3]>,
    mean: Vec<[f64; N_SENSORS]>,
    /// 1 / standard deviation, 0 for a sensor constant within the regime (mapped to 0).
    inv_std: Vec<[f64; N_SENSORS]>,
}

/// Regime key of a row: settings rounded to the resolution at which C-MAPSS conditions differ
/// (altitude in thousands of feet, Mach number in hundredths, throttle angle in degrees).
fn regime_key(settings: &[f64; 3]) -> [i64; 3] {
    [
        settings[0].round() as i64,
        (settings[1] * 100.0).round() as i64,
        settings[2].round() as i64,
    ]
}

impl Regimes {
    fn fit(rows: &[CycleRow]) -> Self {
        let mut keys: Vec<[i64; 3]> = rows.iter().map(|r| regime_key(&r.settings)).collect();
        keys.sort_unstable();
        keys.dedup();
        let per_row_key = keys.len() <= MAX_REGIMES;
        if !per_row_key {
            keys = vec![[0, 0, 0]];
        }
        let k = keys.len();
        let mut count = vec![0.0f64; k];
        let mut mean = vec![[0.0f64; N_SENSORS]; k];
        let mut std = vec![[0.0f64; N_SENSORS]; k];
        let index = |r: &CycleRow| -> usize {
            if per_row_key {
                keys.binary_search(&regime_key(&r.settings)).unwrap_or(0)
            } else {
                0
            }
        };
        for r in rows {
            let i = index(r);
            count[i] += 1.0;
            for (m, v) in mean[i].iter_mut().zip(&r.sensors) {
                *m += v;
            }
        }
        for (m, c) in mean.iter_mut().zip(&count) {
            m.iter_mut().for_each(|v| *v /= c.max(1.0));
        }
        for r in rows {
            let i = index(r);
            for ((s, v), m) in std[i].iter_mut().zip(&r.sensors).zip(&mean[i]) {
                *s += (v - m).powi(2);
            }
        }
        for (s, c) in std.iter_mut().zip(&count) {
            // A sensor that is constant within a regime is mapped to 0 rather than divided by 0.
            s.iter_mut().for_each(|v| {
                let sd = (*v / c.max(1.0)).sqrt();
                *v = if sd > 1e-9 { 1.0 / sd } else { 0.0 };
            });
        }
        Self {
            keys,
            mean,
            inv_std: std,
        }
    }

    /// The regime of `settings`: its own key if known, else the nearest known one.
    fn find(&self, settings: &[f64; 3]) -> usize {
        if self.keys.len() <= 1 {
            return 0;
        }
        let key = regime_key(settings);
        self.keys.binary_search(&key).unwrap_or_else(|_| {
            let dist =
                |k: &[i64; 3]| -> i64 { k.iter().zip(&key).map(|(a, b)| (a - b).abs()).sum() };
            (0..self.keys.len())
                .min_by_key(|&i| dist(&self.keys[i]))
                .unwrap_or(0)
        })
    }

    /// A copy of `row` with sensors expressed in standard deviations from its regime's mean.
    fn normalise(&self, row: &CycleRow) -> CycleRow {
        let i = self.find(&row.settings);
        let mut out = row.clone();
        if let (Some(mean), Some(inv_std)) = (self.mean.get(i), self.inv_std.get(i)) {
            for ((v, m), s) in out.sensors.iter_mut().zip(mean).zip(inv_std) {
                *v = (*v - m) * s;
            }
        }
        out
    }
}

/// Tag of the saved-model format; a file with another one is refused.
const MODEL_FORMAT: &str = "vigil-rul-1";

/// A fitted remaining-useful-life model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulModel {
    format: String,
    /// Telemetry metric names of sensor slots 0.. (C-MAPSS: `s1`..`s21`).
    sensor_names: Vec<String>,
    /// Telemetry metric names of the operating settings (C-MAPSS: `setting1`..`setting3`;
    /// none for histories without settings).
    setting_names: Vec<String>,
    config: RulConfig,
    regimes: Regimes,
    kept: Vec<usize>,
    mean: Vec<f64>,
    std: Vec<f64>,
    /// The linear model (linfa-linear OLS on the normalised features): coefficients and
    /// intercept, kept as plain numbers so the model can be saved.
    coef: Vec<f64>,
    intercept: f64,
    boost: Boosted,
}

impl RulModel {
    /// Trains on run-to-failure histories: each engine's last cycle is taken as its failure.
    pub fn train(rows: &[CycleRow], config: &RulConfig) -> Result<Self, RulError> {
        config.validate()?;
        if rows.is_empty() {
            return Err(RulError::NoData("no rows"));
        }
        let regimes = Regimes::fit(rows);
        let normalised: Vec<CycleRow> = rows.iter().map(|r| regimes.normalise(r)).collect();
        let engines = group_by_engine(&normalised);
        // Keep sensors with at least three distinct (regime-normalised) values: fewer cannot
        // show a trend.
        let kept: Vec<usize> = (0..N_SENSORS)
            .filter(|&s| {
                let mut vals: Vec<f64> = normalised.iter().map(|r| r.sensors[s]).collect();
                vals.sort_by(f64::total_cmp);
                vals.dedup();
                vals.len() >= 3
            })
            .collect();
        if kept.is_empty() {
            return Err(RulError::NoData("every sensor is constant"));
        }
        let mut feats: Vec<Vec<f64>> = Vec::with_capacity(rows.len());
        let mut targets: Vec<f64> = Vec::with_capacity(rows.len());
        for e in &engines {
            let life = e.len();
            for k in 1..=life {
                feats.push(raw_features(&e[..k], &kept, config));
                targets.push(((life - k) as f64).min(config.cap));
            }
        }
        let d = feats[0].len();
        let n = feats.len() as f64;
        let mut mean = vec![0.0; d];
        let mut std = vec![0.0; d];
        for f in &feats {
            for (m, v) in mean.iter_mut().zip(f) {
                *m += v / n;
            }
        }
        for f in &feats {
            for ((s, v), m) in std.iter_mut().zip(f).zip(&mean) {
                *s += (v - m).powi(2) / n;
            }
        }
        for s in &mut std {
            *s = if *s > 0.0 { s.sqrt() } else { 1.0 };
        }
        let x = Array2::from_shape_fn((feats.len(), d), |(i, j)| (feats[i][j] - mean[j]) / std[j]);
        let y = Array1::from(targets);
        let linear = LinearRegression::new()
            .fit(&DatasetBase::new(x.clone(), y.clone()))
            .map_err(|e| RulError::Linear(e.to_string()))?;
        let base: Array1<f64> = linear.predict(&x);
        let coef = linear.params().to_vec();
        let intercept = linear.intercept();
        if !intercept.is_finite() || coef.iter().any(|c| !c.is_finite()) {
            return Err(RulError::Linear("coefficients are not finite".into()));
        }
        let residual = &y - &base;
        let boost = Boosted::fit(&x, &residual, config);
        Ok(Self {
            format: MODEL_FORMAT.into(),
            sensor_names: (1..=N_SENSORS).map(|i| format!("s{i}")).collect(),
            setting_names: (1..=3).map(|i| format!("setting{i}")).collect(),
            config: config.clone(),
            regimes,
            kept,
            mean,
            std,
            coef,
            intercept,
            boost,
        })
    }

    /// Names the telemetry metrics the sensor slots (in order, at most [`N_SENSORS`]) and the
    /// operating settings (at most 3) are read from in the live service.
    pub fn with_names(
        mut self,
        sensors: Vec<String>,
        settings: Vec<String>,
    ) -> Result<Self, RulError> {
        if sensors.len() > N_SENSORS || settings.len() > 3 {
            return Err(RulError::InvalidConfig(
                "at most 21 sensor and 3 setting names",
            ));
        }
        self.sensor_names = sensors;
        self.setting_names = settings;
        Ok(self)
    }

    /// The telemetry metrics whose trends the model reads (the sensors it kept).
    pub fn used_metrics(&self) -> impl Iterator<Item = &str> {
        self.kept
            .iter()
            .filter_map(|&s| self.sensor_names.get(s).map(String::as_str))
    }

    /// The model's settings (cap, windows, boosting).
    pub fn config(&self) -> &RulConfig {
        &self.config
    }

    /// The model as JSON, to be read back by [`RulModel::from_json`].
    pub fn to_json(&self) -> Result<String, RulError> {
        serde_json::to_string(self).map_err(|e| RulError::Format(e.to_string()))
    }

    /// Reads a model saved by [`RulModel::to_json`], checking that its parts fit together.
    pub fn from_json(text: &str) -> Result<Self, RulError> {
        let model: Self =
            serde_json::from_str(text).map_err(|e| RulError::Format(e.to_string()))?;
        if model.format != MODEL_FORMAT {
            return Err(RulError::Format(format!(
                "format {:?}, expected {MODEL_FORMAT:?}",
                model.format
            )));
        }
        model.config.validate()?;
        let d = model.kept.len() * 3;
        let regimes_ok = !model.regimes.keys.is_empty()
            && model.regimes.mean.len() == model.regimes.keys.len()
            && model.regimes.inv_std.len() == model.regimes.keys.len();
        // Children come after their parent (as `build` grows them), so no walk can loop.
        let nodes_ok = model.boost.trees.iter().all(|t| {
            t.iter().enumerate().all(|(i, n)| match n {
                TreeNode::Split {
                    feature,
                    left,
                    right,
                    ..
                } => {
                    *feature < d
                        && (i + 1..t.len()).contains(left)
                        && (i + 1..t.len()).contains(right)
                }
                TreeNode::Leaf(_) => true,
            })
        });
        // Every sensor the model reads has a metric name to be fed from.
        if model.kept.iter().any(|&s| s >= model.sensor_names.len())
            || model.mean.len() != d
            || model.std.len() != d
            || model.coef.len() != d
            || model.sensor_names.len() > N_SENSORS
            || model.setting_names.len() > 3
            || !regimes_ok
            || !nodes_ok
        {
            return Err(RulError::Format("inconsistent model".into()));
        }
        Ok(model)
    }

    /// Number of model features.
    pub fn n_features(&self) -> usize {
        self.mean.len()
    }

    fn normalised(&self, history: &[&CycleRow]) -> Array2<f64> {
        let raw = raw_features(history, &self.kept, &self.config);
        Array2::from_shape_fn((1, raw.len()), |(_, j)| {
            (raw[j] - self.mean[j]) / self.std[j]
        })
    }

    /// Predicted remaining cycles after the last row of one engine's history (rows in any order;
    /// only the engine's own rows should be passed). Returns `None` for an empty history, or
    /// readings so far out of range that no number results.
    pub fn predict_history(&self, history: &[CycleRow]) -> Option<f64> {
        if history.is_empty() {
            return None;
        }
        let normalised: Vec<CycleRow> = history.iter().map(|r| self.regimes.normalise(r)).collect();
        let mut refs: Vec<&CycleRow> = normalised.iter().collect();
        refs.sort_by_key(|r| r.cycle);
        self.predict_sorted(&refs)
    }

    /// The prediction after the last of `history`'s rows, already regime-normalised and in
    /// cycle order; `None` when readings far outside anything trained on make it meaningless
    /// (not a number).
    fn predict_sorted(&self, history: &[&CycleRow]) -> Option<f64> {
        let x = self.normalised(history);
        let row: Vec<f64> = x.row(0).to_vec();
        let lin = self.intercept + row.iter().zip(&self.coef).map(|(v, c)| v * c).sum::<f64>();
        let p = lin + self.boost.predict(&row);
        // `clamp` keeps NaN, and an infinite sum of opposite infinities is NaN.
        (!p.is_nan()).then(|| p.clamp(0.0, self.config.cap))
    }

    /// Predicted RUL at the last cycle of every engine in `rows`, as `(unit, rul)` in order of
    /// first appearance.
    pub fn predict_last(&self, rows: &[CycleRow]) -> Result<Vec<(u32, f64)>, RulError> {
        let mut out = Vec::new();
        for e in group_by_engine(rows) {
            let owned: Vec<CycleRow> = e.iter().map(|r| (*r).clone()).collect();
            let p = self
                .predict_history(&owned)
                .ok_or(RulError::NoData("empty engine history"))?;
            out.push((e[0].unit, p));
        }
        Ok(out)
    }
}

/// The live side of a [`RulModel`] for one machine: the machine's last `long_window` readings
/// of the model's metrics. A metric missing from a reading keeps its previous value (0 before
/// its first). Memory: `long_window` rows of 21 sensors and 3 settings (about 6 KB with the
/// default window of 30), see [`RulTracker::bytes`].
#[derive(Debug, Clone)]
pub struct RulTracker {
    model: Arc<RulModel>,
    recent: VecDeque<CycleRow>,
    latest: CycleRow,
    readings: u64,
}

impl RulTracker {
    /// A tracker that has seen nothing yet.
    pub fn new(model: Arc<RulModel>) -> Self {
        Self {
            recent: VecDeque::with_capacity(model.config.long_window),
            model,
            latest: CycleRow {
                unit: 0,
                cycle: 0,
                settings: [0.0; 3],
                sensors: [0.0; N_SENSORS],
            },
            readings: 0,
        }
    }

    /// Takes the model's metrics from one reading's `(name, value)` pairs; a reading that
    /// carries none of them is not a cycle of this machine and is skipped (false).
    pub fn push(&mut self, metrics: &[(String, f64)]) -> bool {
        let mut any = false;
        for (name, value) in metrics {
            let model = &self.model;
            if let Some(i) = model.sensor_names.iter().position(|n| n == name) {
                if let Some(slot) = self.latest.sensors.get_mut(i) {
                    *slot = *value;
                    any = true;
                }
            } else if let Some(i) = model.setting_names.iter().position(|n| n == name) {
                if let Some(slot) = self.latest.settings.get_mut(i) {
                    *slot = *value;
                    any = true;
                }
            }
        }
        if !any {
            return false;
        }
        self.readings += 1;
        self.latest.cycle = u32::try_from(self.readings).unwrap_or(u32::MAX);
        if self.recent.len() == self.model.config.long_window {
            self.recent.pop_front();
        }
        self.recent
            .push_back(self.model.regimes.normalise(&self.latest));
        true
    }

    /// The telemetry metrics the model reads (see [`RulModel::used_metrics`]).
    pub fn used_metrics(&self) -> impl Iterator<Item = &str> {
        self.model.used_metrics()
    }

    /// Readings taken so far.
    pub fn readings(&self) -> u64 {
        self.readings
    }

    /// The predicted remaining cycles (readings) after the last reading taken, in
    /// `[0, cap]`; `None` before the first, or when readings far outside anything the model
    /// was trained on leave no number.
    pub fn predict(&self) -> Option<f64> {
        if self.recent.is_empty() {
            return None;
        }
        let refs: Vec<&CycleRow> = self.recent.iter().collect();
        self.model.predict_sorted(&refs)
    }

    /// The largest cap of the model: predictions never exceed it.
    pub fn cap(&self) -> f64 {
        self.model.config.cap
    }

    /// Upper bound of this tracker's own memory (the model is shared).
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.model.config.long_window * std::mem::size_of::<CycleRow>()
    }
}

/// Parses run-to-failure histories as `vigil export` writes them: one CSV text per machine run,
/// a header `timestamp_ms,<metric>,...` and one row per reading, the last row being the failure.
/// Returns the metric names (the union over all runs, sorted, at most [`N_SENSORS`]) and the
/// rows, run `k` as unit `k + 1`. An empty cell keeps the metric's previous value in its run
/// (0 before its first); no operating settings are read (a single regime).
pub fn parse_runs_csv(runs: &[&str]) -> Result<(Vec<String>, Vec<CycleRow>), RulError> {
    let headers: Vec<Vec<String>> = runs
        .iter()
        .map(|text| split_csv_line(text.lines().next().unwrap_or("")))
        .collect();
    let mut names: Vec<String> = headers
        .iter()
        .flat_map(|h| h.iter().skip(1).cloned())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(RulError::NoData("no metric columns"));
    }
    if names.len() > N_SENSORS {
        return Err(RulError::InvalidConfig(
            "the runs have more than 21 metrics: export only the ones that matter",
        ));
    }
    let mut rows = Vec::new();
    for (k, (text, header)) in runs.iter().zip(&headers).enumerate() {
        let slots: Vec<usize> = header
            .iter()
            .skip(1)
            .filter_map(|name| names.binary_search(name).ok())
            .collect();
        let unit = u32::try_from(k + 1).unwrap_or(u32::MAX);
        let mut latest = [0.0; N_SENSORS];
        let mut cycle = 0u32;
        for (i, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let cells = split_csv_line(line);
            for (cell, &slot) in cells.iter().skip(1).zip(&slots) {
                if cell.trim().is_empty() {
                    continue;
                }
                latest[slot] = cell
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| RulError::Parse {
                        line: i + 1,
                        reason: format!("run {}: not a number: {cell}", k + 1),
                    })?;
            }
            cycle = cycle.saturating_add(1);
            rows.push(CycleRow {
                unit,
                cycle,
                settings: [0.0; 3],
                sensors: latest,
            });
        }
    }
    if rows.is_empty() {
        return Err(RulError::NoData("no rows"));
    }
    Ok((names, rows))
}

/// The fields of one CSV line; `"..."` fields may hold commas and doubled quotes.
fn split_csv_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// A node of a regression tree: a split (`feature`, `threshold`, children) or a leaf value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum TreeNode {
    Split {
        feature: usize,
        threshold: f64,
        left: usize,
        right: usize,
    },
    Leaf(f64),
}

/// Gradient-boosted regression trees for squared loss, grown on 64-bin feature histograms.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Boosted {
    trees: Vec<Vec<TreeNode>>,
    learning_rate: f64,
}

const BINS: usize = 64;

impl Boosted {
    fn fit(x: &Array2<f64>, y: &Array1<f64>, cfg: &RulConfig) -> Self {
        let (n, d) = x.dim();
        // Quantile cut points per feature; bin(v) = number of cuts below v, so that
        // `v <= cuts[t]` exactly when `bin(v) <= t`.
        let mut cuts: Vec<Vec<f64>> = Vec::with_capacity(d);
        for j in 0..d {
            let mut col: Vec<f64> = x.column(j).to_vec();
            col.sort_by(f64::total_cmp);
            let mut c: Vec<f64> = (1..BINS)
                .map(|b| col[(b * n / BINS).min(n.saturating_sub(1))])
                .collect();
            c.dedup();
            cuts.push(c);
        }
        let mut bins = vec![0u8; n * d];
        for i in 0..n {
            for j in 0..d {
                bins[i * d + j] = cuts[j].partition_point(|&c| c < x[[i, j]]) as u8;
            }
        }
        let mut pred = vec![0.0; n];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed);
        let mut trees = Vec::with_capacity(cfg.rounds);
        for _ in 0..cfg.rounds {
            let residual: Vec<f64> = (0..n).map(|i| y[i] - pred[i]).collect();
            let rows: Vec<usize> = (0..n)
                .filter(|_| rng.gen::<f64>() < cfg.row_subsample)
                .collect();
            let mut nodes = Vec::new();
            build(&bins, d, &cuts, &residual, rows, 0, cfg, &mut nodes);
            for (i, p) in pred.iter_mut().enumerate() {
                *p += cfg.learning_rate * tree_predict(&nodes, |j| x[[i, j]]);
            }
            trees.push(nodes);
        }
        Self {
            trees,
            learning_rate: cfg.learning_rate,
        }
    }

    fn predict(&self, row: &[f64]) -> f64 {
        self.trees
            .iter()
            .map(|t| tree_predict(t, |j| row.get(j).copied().unwrap_or(0.0)))
            .sum::<f64>()
            * self.learning_rate
    }
}

fn tree_predict(nodes: &[TreeNode], x: impl Fn(usize) -> f64) -> f64 {
    let mut i = 0;
    loop {
        match nodes.get(i) {
            Some(TreeNode::Split {
                feature,
                threshold,
                left,
                right,
            }) => {
                i = if x(*feature) <= *threshold {
                    *left
                } else {
                    *right
                }
            }
            Some(TreeNode::Leaf(v)) => return *v,
            None => return 0.0,
        }
    }
}

/// Grows a tree over `rows` depth-first, appending nodes; returns the index of the subtree root.
#[allow(clippy::too_many_arguments)]
fn build(
    bins: &[u8],
    d: usize,
    cuts: &[Vec<f64>],
    g: &[f64],
    rows: Vec<usize>,
    depth: usize,
    cfg: &RulConfig,
    nodes: &mut Vec<TreeNode>,
) -> usize {
    let at = nodes.len();
    let total: f64 = rows.iter().map(|&i| g[i]).sum();
    let count = rows.len();
    // Leaf values are shrunk slightly towards zero (an L2 penalty of 1) for stability.
    nodes.push(TreeNode::Leaf(total / (count as f64 + 1.0)));
    if depth >= cfg.max_depth || count < 2 * cfg.min_leaf {
        return at;
    }
    let parent_gain = total * total / count as f64;
    let mut best: Option<(f64, usize, usize)> = None;
    let mut sum = [0.0f64; BINS];
    let mut cnt = [0usize; BINS];
    for j in 0..d {
        sum.iter_mut().for_each(|s| *s = 0.0);
        cnt.iter_mut().for_each(|c| *c = 0);
        for &i in &rows {
            let b = bins[i * d + j] as usize;
            sum[b] += g[i];
            cnt[b] += 1;
        }
        let (mut sl, mut cl) = (0.0, 0usize);
        for t in 0..cuts[j].len() {
            sl += sum[t];
            cl += cnt[t];
            let cr = count - cl;
            if cl < cfg.min_leaf || cr < cfg.min_leaf {
                continue;
            }
            let sr = total - sl;
            let gain = sl * sl / cl as f64 + sr * sr / cr as f64 - parent_gain;
            if best.map_or(true, |(bg, _, _)| gain > bg) {
                best = Some((gain, j, t));
            }
        }
    }
    let Some((gain, feature, t)) = best else {
        return at;
    };
    if gain <= 1e-9 {
        return at;
    }
    let (l, r): (Vec<usize>, Vec<usize>) = rows
        .into_iter()
        .partition(|&i| bins[i * d + feature] as usize <= t);
    let left = build(bins, d, cuts, g, l, depth + 1, cfg, nodes);
    let right = build(bins, d, cuts, g, r, depth + 1, cfg, nodes);
    nodes[at] = TreeNode::Split {
        feature,
        threshold: cuts[feature][t],
        left,
        right,
    };
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic fleet: sensor 2 degrades quadratically near the end of life, sensor 3 is noise,
    /// the others are constant.
    fn fleet(units: u32, seed: u64) -> Vec<CycleRow> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut rows = Vec::new();
        for u in 1..=units {
            let life = 120 + rng.gen_range(0..120);
            for c in 1..=life {
                let mut sensors = [1.0; N_SENSORS];
                let wear = ((c as f64 - (life as f64 - 100.0)).max(0.0) / 100.0).powi(2);
                sensors[2] = 500.0 + 20.0 * wear + rng.gen::<f64>();
                sensors[3] = rng.gen::<f64>();
                rows.push(CycleRow {
                    unit: u,
                    cycle: c,
                    settings: [0.0; 3],
                    sensors,
                });
            }
        }
        rows
    }

    /// Like `fleet`, but each cycle is flown in one of two operating regimes that shift the
    /// degrading sensor by far more than the degradation itself.
    fn two_regime_fleet(units: u32, seed: u64) -> Vec<CycleRow> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0xABCD);
        fleet(units, seed)
            .into_iter()
            .map(|mut r| {
                if rng.gen::<bool>() {
                    r.settings = [20.0 + 0.001 * rng.gen::<f64>(), 0.7, 100.0];
                    r.sensors[2] = r.sensors[2] * 1.3 + 200.0;
                } else {
                    r.settings = [0.001 * rng.gen::<f64>(), 0.0, 100.0];
                }
                r
            })
            .collect()
    }

    fn small_config() -> RulConfig {
        RulConfig {
            rounds: 40,
            learning_rate: 0.2,
            min_leaf: 20,
            ..RulConfig::default()
        }
    }

    #[test]
    fn parses_header_padding_and_rejects_garbage() {
        let text = "unit_number time a b c s1\n1 1 0 0 100 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21  \n";
        let rows = parse_cmapss(text).expect("parse");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].sensors[20], 21.0);
        assert!(parse_cmapss("h\n1 2 3\n").is_err());
        assert!(parse_cmapss(
            "h\n1 1 0 0 100 x 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21\n"
        )
        .is_err());
    }

    #[test]
    fn learns_degradation_and_drops_constant_sensors() {
        let model = RulModel::train(&fleet(30, 1), &small_config()).expect("train");
        assert_eq!(model.kept, vec![2, 3]);
        let test = fleet(10, 2);
        let mut err = 0.0;
        let mut k = 0.0;
        for e in group_by_engine(&test) {
            // Cut each engine 20 cycles before failure: the true RUL is 20.
            let cut: Vec<CycleRow> = e[..e.len() - 20].iter().map(|r| (*r).clone()).collect();
            let p = model.predict_history(&cut).expect("history");
            assert!((0.0..=125.0).contains(&p));
            err += (p - 20.0).powi(2);
            k += 1.0;
        }
        let rmse = (err / k).sqrt();
        assert!(rmse < 15.0, "rmse {rmse}");
        assert!(model.predict_history(&[]).is_none());
    }

    #[test]
    fn parses_the_shared_fd001_files_if_present() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cmapss");
        let Ok(train) = std::fs::read_to_string(dir.join("train_FD001.txt")) else {
            println!("note: {} not found, skipping", dir.display());
            return;
        };
        let rows = parse_cmapss(&train).expect("train_FD001 parses");
        assert_eq!(engine_count(&rows), 100);
        assert!(rows.iter().all(|r| r.cycle >= 1));
    }

    #[test]
    fn normalises_per_operating_regime() {
        let train = two_regime_fleet(30, 1);
        let model = RulModel::train(&train, &small_config()).expect("train");
        assert_eq!(model.regimes.keys.len(), 2);
        let mut err = 0.0;
        let mut k = 0.0;
        for e in group_by_engine(&two_regime_fleet(10, 2)) {
            let cut: Vec<CycleRow> = e[..e.len() - 20].iter().map(|r| (*r).clone()).collect();
            let p = model.predict_history(&cut).expect("history");
            err += (p - 20.0).powi(2);
            k += 1.0;
        }
        let rmse = (err / k).sqrt();
        assert!(rmse < 20.0, "rmse {rmse}");
        // An unseen regime falls back to the nearest known one instead of failing.
        let mut odd = train[0].clone();
        odd.settings = [35.0, 0.84, 60.0];
        assert!(model.predict_history(&[odd]).is_some());
    }

    #[test]
    fn a_saved_model_predicts_the_same_and_a_broken_file_is_refused() {
        let model = RulModel::train(&two_regime_fleet(20, 4), &small_config()).expect("train");
        let json = model.to_json().expect("save");
        let back = RulModel::from_json(&json).expect("load");
        assert_eq!(back, model);
        for e in group_by_engine(&two_regime_fleet(5, 5)) {
            let owned: Vec<CycleRow> = e.iter().map(|r| (*r).clone()).collect();
            let (a, b) = (model.predict_history(&owned), back.predict_history(&owned));
            assert_eq!(a.map(f64::to_bits), b.map(f64::to_bits));
        }
        assert!(RulModel::from_json("{}").is_err());
        assert!(RulModel::from_json(&json.replace("vigil-rul-1", "vigil-rul-0")).is_err());
        // A split whose child points back at it would make a walk loop: refused.
        let mut looping = model.clone();
        if let Some(TreeNode::Split { left, .. }) = looping.boost.trees[0].first_mut() {
            *left = 0;
        }
        let text = looping.to_json().expect("save");
        assert!(matches!(
            RulModel::from_json(&text),
            Err(RulError::Format(_))
        ));
        let mut short = model.clone();
        short.coef.pop();
        assert!(RulModel::from_json(&short.to_json().expect("save")).is_err());
        // A sensor the model reads must have a metric name.
        let unnamed = model
            .clone()
            .with_names(vec!["a".into(), "b".into()], Vec::new())
            .expect("names");
        assert!(RulModel::from_json(&unnamed.to_json().expect("save")).is_err());
    }

    #[test]
    fn the_live_tracker_predicts_what_the_whole_history_gives() {
        let names: Vec<String> = (0..N_SENSORS).map(|i| format!("m{i}")).collect();
        let model = RulModel::train(&two_regime_fleet(20, 6), &small_config())
            .expect("train")
            .with_names(
                names.clone(),
                vec!["alt".into(), "mach".into(), "tra".into()],
            )
            .expect("names");
        assert_eq!(model.used_metrics().collect::<Vec<_>>(), ["m2", "m3"]);
        let model = Arc::new(model);
        for e in group_by_engine(&two_regime_fleet(4, 7)) {
            let mut tracker = RulTracker::new(model.clone());
            assert_eq!(tracker.predict(), None);
            assert!(!tracker.push(&[("other".into(), 1.0)]));
            let mut history = Vec::new();
            for r in &e {
                let mut metrics: Vec<(String, f64)> =
                    names.iter().cloned().zip(r.sensors).collect();
                metrics.extend(
                    ["alt", "mach", "tra"]
                        .map(String::from)
                        .into_iter()
                        .zip(r.settings),
                );
                assert!(tracker.push(&metrics));
                history.push((*r).clone());
            }
            let whole = model.predict_history(&history).expect("history");
            assert_eq!(tracker.predict().map(f64::to_bits), Some(whole.to_bits()));
            assert_eq!(tracker.readings(), e.len() as u64);
            // Absurd readings give no estimate or a bounded one, never NaN.
            let huge: Vec<(String, f64)> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), if i % 2 == 0 { f64::MAX } else { -f64::MAX }))
                .collect();
            for _ in 0..40 {
                tracker.push(&huge);
                assert!(tracker
                    .predict()
                    .map_or(true, |p| (0.0..=125.0).contains(&p)));
            }
        }
        assert!(RulModel::train(&fleet(3, 1), &small_config())
            .expect("train")
            .with_names(vec![String::new(); 22], Vec::new())
            .is_err());
    }

    #[test]
    fn exported_runs_parse_with_a_union_of_metrics_and_carried_values() {
        let a = "timestamp_ms,temperature,\"flow, in\"\n1,50,2\n2,,3\n3,52,4\n";
        let b = "timestamp_ms,vibration,temperature\n10,0.1,40\n\n11,0.2,41\n";
        let (names, rows) = parse_runs_csv(&[a, b]).expect("parse");
        assert_eq!(names, ["flow, in", "temperature", "vibration"]);
        assert_eq!(rows.len(), 5);
        assert_eq!((rows[1].unit, rows[1].cycle), (1, 2));
        assert_eq!(&rows[1].sensors[..3], &[3.0, 50.0, 0.0]);
        assert_eq!((rows[4].unit, rows[4].cycle), (2, 2));
        assert_eq!(&rows[4].sensors[..3], &[0.0, 41.0, 0.2]);
        assert!(matches!(
            parse_runs_csv(&["timestamp_ms,t\n1,x\n"]),
            Err(RulError::Parse { line: 2, .. })
        ));
        assert!(parse_runs_csv(&["timestamp_ms\n1\n"]).is_err());
        assert!(parse_runs_csv(&["timestamp_ms,t\n"]).is_err());
        let wide: Vec<String> = (0..22).map(|i| format!("m{i}")).collect();
        let wide = format!("timestamp_ms,{}\n", wide.join(","));
        assert!(parse_runs_csv(&[&wide]).is_err());
    }

    #[test]
    fn rejects_bad_config_and_empty_data() {
        assert!(RulModel::train(&[], &RulConfig::default()).is_err());
        let bad = RulConfig {
            cap: 0.0,
            ..RulConfig::default()
        };
        assert!(RulModel::train(&fleet(2, 3), &bad).is_err());
    }
}
