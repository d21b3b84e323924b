//! The cross-metric model: each of a device's metrics predicted from its other metrics.
//!
//! Metrics of one machine move together: motor current and winding temperature, pump speed and
//! flow, two temperature probes on one housing. A fault often shows first as a broken
//! relationship while every value is still in its usual range: the temperature rising with the
//! current flat (a cooling fault), flow falling at constant speed (a clogged filter). The
//! per-metric channels cannot see that; this model can.
//!
//! A [`JointModel`] is fitted on a window of readings that carry all of the model's metrics
//! (at most [`MAX_JOINT`]): the values are standardised and each metric is regressed on all the
//! others with linfa-linear's least squares, with a small ridge penalty (added as extra rows) so
//! that duplicated or constant sensors cannot make the fit singular. Only metrics that the
//! others explain well (R² at least `min_r2`) are scored; for each new reading the score is the
//! largest standardised residual among them, and the metric that has it is the one reported.

use linfa::dataset::DatasetBase;
use linfa::traits::Fit;
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2, Axis};

/// Most metrics in one cross-metric model.
pub const MAX_JOINT: usize = 8;

/// Residuals are measured in units of at least this many standard deviations of the target, so
/// a near-perfect fit (two copies of one sensor) does not turn rounding noise into anomalies.
const MIN_RESIDUAL_STD: f64 = 0.05;

/// Ridge penalty per training row, on standardised values.
const RIDGE: f64 = 1e-3;

/// A culprit's rivals leave a remainder at most this share of the residual pattern's size
/// above the culprit's (see [`JointModel::culprit`]).
pub const AMBIGUOUS_SHARE: f64 = 0.1;

/// Errors of the cross-metric fit.
#[derive(Debug, thiserror::Error)]
pub enum JointError {
    /// The training data cannot be used.
    #[error("cross-metric model needs {need} rows of 2 to {max} metrics, got {rows} x {cols}", max = MAX_JOINT)]
    Shape {
        /// Rows needed.
        need: usize,
        /// Rows given.
        rows: usize,
        /// Columns given.
        cols: usize,
    },
    /// linfa-linear could not solve the least-squares problem.
    #[error("cross-metric least squares failed: {0}")]
    Solve(String),
}

/// The metric whose fault best explains a reading's residuals ([`JointModel::culprit`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Culprit {
    /// Its index in the model's metric order.
    pub metric: usize,
    /// The value the other metrics predict for it.
    pub expected: f64,
    /// The other metrics whose fault would explain the residuals about as well.
    pub rivals: [bool; MAX_JOINT],
}

/// A fitted cross-metric model (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct JointModel {
    k: usize,
    mean: [f64; MAX_JOINT],
    std: [f64; MAX_JOINT],
    /// Row `j`: coefficients of the standardised metrics predicting metric `j` (0 at `j`).
    coef: [[f64; MAX_JOINT]; MAX_JOINT],
    /// Residual standard deviation of each target, in its standard deviations (floored).
    resid_std: [f64; MAX_JOINT],
    /// R² of each target's regression; NaN for a constant metric.
    r2: [f64; MAX_JOINT],
    explained: [bool; MAX_JOINT],
}

/// The cross-metric verdict on one reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Residual {
    /// Index (in the model's metric order) of the metric with the largest residual.
    pub metric: usize,
    /// That residual's size, in the metric's residual standard deviations.
    pub size: f64,
    /// The value the other metrics predict for it.
    pub expected: f64,
}

impl JointModel {
    /// Fits the model on `data` (one row per reading, one column per metric). Metrics whose
    /// regression reaches R² `min_r2` are scored.
    pub fn fit(data: &Array2<f64>, min_r2: f64) -> Result<Self, JointError> {
        let (n, k) = data.dim();
        let need = 4 * MAX_JOINT;
        if !(2..=MAX_JOINT).contains(&k) || n < need {
            return Err(JointError::Shape {
                need,
                rows: n,
                cols: k,
            });
        }
        let mut model = JointModel {
            k,
            mean: [0.0; MAX_JOINT],
            std: [0.0; MAX_JOINT],
            coef: [[0.0; MAX_JOINT]; MAX_JOINT],
            resid_std: [1.0; MAX_JOINT],
            r2: [f64::NAN; MAX_JOINT],
            explained: [false; MAX_JOINT],
        };
        for (j, col) in data.axis_iter(Axis(1)).enumerate() {
            let mean = col.sum() / n as f64;
            let var = col.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
            model.mean[j] = mean;
            // A metric that does not move (within rounding of its level) is left out: it
            // neither predicts nor is predicted.
            model.std[j] = if var.sqrt() > 1e-9 * mean.abs().max(1e-300) {
                var.sqrt()
            } else {
                0.0
            };
        }
        let z = Array2::from_shape_fn((n, k), |(i, j)| model.standardise(j, data[(i, j)]));
        let ridge = (RIDGE * n as f64).sqrt();
        for target in 0..k {
            if model.std[target] == 0.0 {
                continue;
            }
            // Predictors: the other metrics, plus one ridge row per predictor (value
            // sqrt(ridge * n) on its own column, response 0).
            let mut x = Array2::zeros((n + k - 1, k - 1));
            let mut y = Array1::zeros(n + k - 1);
            for i in 0..n {
                for (c, j) in (0..k).filter(|&j| j != target).enumerate() {
                    x[(i, c)] = z[(i, j)];
                }
                y[i] = z[(i, target)];
            }
            for c in 0..k - 1 {
                x[(n + c, c)] = ridge;
            }
            let fitted = LinearRegression::new()
                .with_intercept(false)
                .fit(&DatasetBase::new(x, y))
                .map_err(|e| JointError::Solve(e.to_string()))?;
            let params = fitted.params();
            for (c, j) in (0..k).filter(|&j| j != target).enumerate() {
                model.coef[target][j] = params.get(c).copied().unwrap_or(0.0);
            }
            let mut sq = 0.0;
            for row in z.axis_iter(Axis(0)) {
                let pred: f64 = (0..k).map(|j| model.coef[target][j] * row[j]).sum();
                sq += (row[target] - pred) * (row[target] - pred);
            }
            let resid = (sq / n as f64).sqrt();
            // Standardised target: its variance is 1, so R² = 1 - residual variance.
            model.r2[target] = 1.0 - resid * resid;
            model.resid_std[target] = resid.max(MIN_RESIDUAL_STD);
            model.explained[target] = model.r2[target] >= min_r2;
        }
        Ok(model)
    }

    fn standardise(&self, j: usize, v: f64) -> f64 {
        if self.std[j] > 0.0 {
            (v - self.mean[j]) / self.std[j]
        } else {
            0.0
        }
    }

    /// Number of metrics the model covers.
    pub fn len(&self) -> usize {
        self.k
    }

    /// Whether the model covers no metric (never true for a fitted model).
    pub fn is_empty(&self) -> bool {
        self.k == 0
    }

    /// Whether any metric is explained well enough by the others to be scored.
    pub fn scores_anything(&self) -> bool {
        self.explained.iter().any(|&e| e)
    }

    /// R² of metric `j`'s regression on the others (NaN for a constant metric).
    pub fn r2(&self, j: usize) -> f64 {
        self.r2.get(j).copied().unwrap_or(f64::NAN)
    }

    /// The largest standardised residual of a reading (`values` in the model's metric order),
    /// or `None` if no metric is scored.
    pub fn residual(&self, values: &[f64; MAX_JOINT]) -> Option<Residual> {
        let mut z = [0.0; MAX_JOINT];
        for (j, slot) in z.iter_mut().enumerate().take(self.k) {
            *slot = self.standardise(j, values[j]);
        }
        let mut worst: Option<Residual> = None;
        for j in (0..self.k).filter(|&j| self.explained[j]) {
            let pred: f64 = (0..self.k).map(|i| self.coef[j][i] * z[i]).sum();
            let size = ((z[j] - pred) / self.resid_std[j]).abs();
            if worst.map_or(true, |w| size > w.size) {
                worst = Some(Residual {
                    metric: j,
                    size,
                    expected: self.mean[j] + self.std[j] * pred,
                });
            }
        }
        worst
    }
}

impl JointModel {
    /// Metric `j`'s standardised residual in a reading (in its residual standard deviations,
    /// signed), or `None` if the model does not score it.
    pub fn residual_of(&self, j: usize, values: &[f64; MAX_JOINT]) -> Option<f64> {
        if j >= self.k || !self.explained[j] {
            return None;
        }
        let pred: f64 = (0..self.k)
            .map(|i| self.coef[j][i] * self.standardise(i, values[i]))
            .sum();
        Some((self.standardise(j, values[j]) - pred) / self.resid_std[j])
    }

    /// Metric `j`'s value in a reading, in standard deviations from its mean over the readings
    /// the model was fitted to (signed); `None` if the model does not cover it or it did not
    /// vary there.
    pub fn level_of(&self, j: usize, values: &[f64; MAX_JOINT]) -> Option<f64> {
        (j < self.k && self.std[j] > 0.0).then(|| self.standardise(j, values[j]))
    }

    /// Whether the other metrics explain metric `j` (R² of at least the fit's `min_r2`).
    pub fn is_explained(&self, j: usize) -> bool {
        j < self.k && self.explained[j]
    }

    /// The value the other metrics predict for metric `j` in a reading.
    pub fn expected(&self, j: usize, values: &[f64; MAX_JOINT]) -> Option<f64> {
        if j >= self.k || self.std[j] == 0.0 {
            return None;
        }
        let pred: f64 = (0..self.k)
            .map(|i| self.coef[j][i] * self.standardise(i, values[i]))
            .sum();
        Some(self.mean[j] + self.std[j] * pred)
    }

    /// The single metric whose fault best explains a reading's pattern of residuals, and the
    /// value the others predict for it. If only metric `j` is off, by `d` of its standard
    /// deviations, its own residual is `d / s_j` and every other metric `i` gets
    /// `-coef[i][j] * d / s_i` (its prediction leans on `j`). For each candidate `j` the best
    /// `d` is a least-squares projection; the candidate leaving the smallest remainder wins.
    /// This tells a stuck temperature sensor from the current it no longer matches, which the
    /// largest residual alone does not.
    ///
    /// Two metrics that move in proportion (vibration and current both following the load)
    /// leave the same pattern whichever of them is off, and the residuals cannot tell them
    /// apart: the candidates whose remainder exceeds the best one's by at most
    /// [`AMBIGUOUS_SHARE`] of the pattern's size are returned as its rivals.
    pub fn culprit(&self, values: &[f64; MAX_JOINT]) -> Option<Culprit> {
        let k = self.k;
        let mut z = [0.0; MAX_JOINT];
        let mut pred = [0.0; MAX_JOINT];
        let mut r = [0.0; MAX_JOINT];
        for (j, slot) in z.iter_mut().enumerate().take(k) {
            *slot = self.standardise(j, values[j]);
        }
        let live = |j: usize| self.std[j] > 0.0;
        for i in (0..k).filter(|&i| live(i)) {
            pred[i] = (0..k).map(|j| self.coef[i][j] * z[j]).sum();
            r[i] = (z[i] - pred[i]) / self.resid_std[i];
        }
        let total: f64 = r.iter().take(k).map(|x| x * x).sum();
        let mut remainders = [f64::INFINITY; MAX_JOINT];
        let mut best: Option<(usize, f64)> = None;
        for j in (0..k).filter(|&j| live(j) && self.explained[j]) {
            let mut dot = 0.0;
            let mut norm = 0.0;
            for i in (0..k).filter(|&i| live(i)) {
                let a = if i == j {
                    1.0 / self.resid_std[i]
                } else {
                    -self.coef[i][j] / self.resid_std[i]
                };
                dot += a * r[i];
                norm += a * a;
            }
            let remainder = total - dot * dot / norm.max(1e-300);
            remainders[j] = remainder;
            if best.map_or(true, |(_, b)| remainder < b) {
                best = Some((j, remainder));
            }
        }
        let (metric, least) = best?;
        let mut rivals = [false; MAX_JOINT];
        for (j, rival) in rivals.iter_mut().enumerate().take(k) {
            *rival = j != metric && remainders[j] <= least + AMBIGUOUS_SHARE * total;
        }
        Some(Culprit {
            metric,
            expected: self.mean[metric] + self.std[metric] * pred[metric],
            rivals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    /// Current, a temperature that follows it, and an unrelated vibration.
    fn machine(n: usize, seed: u64) -> Array2<f64> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut data = Array2::zeros((n, 3));
        for i in 0..n {
            let current = 15.0 + 3.0 * (i as f64 / 40.0).sin() + rng.gen::<f64>() - 0.5;
            data[(i, 0)] = current;
            data[(i, 1)] = 40.0 + 2.0 * current + 0.5 * (rng.gen::<f64>() - 0.5);
            data[(i, 2)] = 0.9 + 0.1 * (rng.gen::<f64>() - 0.5);
        }
        data
    }

    #[test]
    fn explains_related_metrics_only() {
        let m = JointModel::fit(&machine(512, 1), 0.5).expect("fit");
        assert!(m.r2(0) > 0.9, "current from temperature: {}", m.r2(0));
        assert!(m.r2(1) > 0.9, "temperature from current: {}", m.r2(1));
        assert!(m.r2(2) < 0.1, "vibration is unrelated: {}", m.r2(2));
        assert!(m.scores_anything());
    }

    #[test]
    fn a_broken_relationship_has_a_large_residual_and_normal_readings_do_not() {
        let m = JointModel::fit(&machine(512, 2), 0.5).expect("fit");
        let fresh = machine(200, 3);
        let mut largest: f64 = 0.0;
        for row in fresh.axis_iter(Axis(0)) {
            let mut v = [0.0; MAX_JOINT];
            for (slot, x) in v.iter_mut().zip(row.iter()) {
                *slot = *x;
            }
            largest = largest.max(m.residual(&v).expect("scored").size);
        }
        assert!(largest < 4.5, "normal readings: {largest}");
        // Temperature 6 degrees too hot for its current: each value alone is ordinary.
        let mut v = [0.0; MAX_JOINT];
        v[0] = 15.0;
        v[1] = 40.0 + 2.0 * 15.0 + 6.0;
        v[2] = 0.9;
        let r = m.residual(&v).expect("scored");
        assert!(r.size > 10.0, "{r:?}");
        assert!(
            (r.expected - 70.0).abs() < 1.0 || (r.expected - 18.0).abs() < 1.0,
            "{r:?}"
        );
    }

    #[test]
    fn duplicated_and_constant_sensors_do_not_break_the_fit() {
        let mut data = machine(256, 4);
        // Column 2 becomes an exact copy of column 1; a constant column is appended.
        let copy = data.column(1).to_owned();
        data.column_mut(2).assign(&copy);
        let data = ndarray::concatenate(
            Axis(1),
            &[data.view(), Array2::from_elem((256, 1), 7.0).view()],
        )
        .expect("concat");
        let m = JointModel::fit(&data, 0.5).expect("fit");
        assert!(m.r2(1) > 0.99 && m.r2(2) > 0.99);
        assert!(m.r2(3).is_nan(), "constant metric is not a target");
        let mut v = [0.0; MAX_JOINT];
        for (slot, x) in v.iter_mut().zip(data.row(10).iter()) {
            *slot = *x;
        }
        assert!(m.residual(&v).expect("scored").size.is_finite());
    }

    #[test]
    fn rejects_unusable_shapes() {
        assert!(JointModel::fit(&Array2::zeros((100, 1)), 0.5).is_err());
        assert!(JointModel::fit(&Array2::zeros((10, 3)), 0.5).is_err());
        assert!(JointModel::fit(&Array2::zeros((100, MAX_JOINT + 1)), 0.5).is_err());
    }

    #[test]
    fn the_culprit_is_the_metric_whose_fault_explains_all_residuals() {
        // Three metrics driven by one load: a stuck first metric disturbs the predictions of
        // the other two as well, but only "the first is off" explains the whole pattern.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        let mut data = Array2::zeros((512, 3));
        for i in 0..512 {
            let load = (i as f64 / 50.0).sin();
            data[(i, 0)] = 60.0 + 7.0 * load + 0.3 * (rng.gen::<f64>() - 0.5);
            data[(i, 1)] = 13.0 + 5.0 * load + 0.2 * (rng.gen::<f64>() - 0.5);
            data[(i, 2)] = 2.4 + 0.6 * load + 0.08 * (rng.gen::<f64>() - 0.5);
        }
        let m = JointModel::fit(&data, 0.5).expect("fit");
        for (culprit, shift) in [(0, 3.0), (1, -2.0), (2, 0.4)] {
            let load: f64 = 0.5;
            let mut v = [0.0; MAX_JOINT];
            v[0] = 60.0 + 7.0 * load;
            v[1] = 13.0 + 5.0 * load;
            v[2] = 2.4 + 0.6 * load;
            v[culprit] += shift;
            let Culprit {
                metric: named,
                expected,
                rivals,
            } = m.culprit(&v).expect("scored");
            // Three metrics of one load, each with its own noise: not ambiguous.
            assert!(rivals.iter().all(|r| !r), "{rivals:?}");
            assert_eq!(named, culprit, "shift {shift} on {culprit}");
            assert!(
                (expected - (v[culprit] - shift)).abs() < 0.2 * shift.abs(),
                "{expected}"
            );
        }
    }
}
