//! Causal streaming features per device metric, computed from the current and past points only.
//!
//! Each metric keeps a fixed-size `FeatureState` (48 bytes: five `f64` and one counter), updated in
//! O(1) per point, so memory does not grow with the length of the stream. The features are chosen
//! so that an isolation forest can see the usual kinds of sensor anomaly:
//!
//! | index | feature | catches |
//! | --- | --- | --- |
//! | 0 | value | values outside the usual range |
//! | 1 | first difference | sudden jumps and drops |
//! | 2 | value − short EWMA | short spikes relative to the last few points |
//! | 3 | value − long EWMA | level shifts relative to the long-run level |
//! | 4 | short EWMA of abs(difference) | changes in noise or oscillation |
//!
//! The means used for deviations are the ones from *before* the current point, so a spike is
//! compared against what was expected rather than against a mean it already pulled towards itself.

/// Number of features produced per point.
pub const N_FEATURES: usize = 5;

/// Smoothing factors, chosen as `2 / (span + 1)` for spans of 5, 100 and 20 points.
const ALPHA_SHORT: f64 = 2.0 / 6.0;
const ALPHA_LONG: f64 = 2.0 / 101.0;
const ALPHA_SPREAD: f64 = 2.0 / 21.0;

/// Streaming feature state of one metric. Its size is fixed (48 bytes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeatureState {
    n: u64,
    last: f64,
    mean_short: f64,
    mean_long: f64,
    spread: f64,
    var_long: f64,
}

impl FeatureState {
    /// A fresh state that has seen no point.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of points seen so far.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// The last finite value fed, if any (none right after [`Self::break_continuity`]).
    pub fn last(&self) -> Option<f64> {
        (self.n > 0 && !self.last.is_nan()).then_some(self.last)
    }

    /// Starts a new segment: the next value is not compared with the last one or the short
    /// mean (its difference and short deviation are 0, as for a first value), because the
    /// values between them were never fed (a machine standing, `monitor::RunningRule`). The
    /// long mean, the variance and the spread carry on.
    pub fn break_continuity(&mut self) {
        if self.n > 0 {
            self.last = f64::NAN;
        }
    }

    /// Long-run exponentially weighted standard deviation of the value.
    pub fn long_std(&self) -> f64 {
        self.var_long.max(0.0).sqrt()
    }

    /// Feeds one value and returns its feature vector. Non-finite input is ignored (the previous
    /// state is kept and all-zero deviations are returned), because one corrupt sample must not
    /// poison the running means for ever.
    pub fn update(&mut self, x: f64) -> [f64; N_FEATURES] {
        if !x.is_finite() {
            let last = if self.last.is_nan() {
                self.mean_long
            } else {
                self.last
            };
            return [last, 0.0, 0.0, 0.0, self.spread];
        }
        if self.last.is_nan() && self.n > 0 {
            // The first value of a new segment (`break_continuity`).
            self.last = x;
            self.mean_short = x;
        }
        if self.n == 0 {
            self.n = 1;
            self.last = x;
            self.mean_short = x;
            self.mean_long = x;
            return [x, 0.0, 0.0, 0.0, 0.0];
        }
        let diff = x - self.last;
        let dev_short = x - self.mean_short;
        let dev_long = x - self.mean_long;
        self.n += 1;
        self.last = x;
        self.mean_short += ALPHA_SHORT * dev_short;
        self.mean_long += ALPHA_LONG * dev_long;
        // Exponentially weighted variance update (West 1979 style), kept for callers that want
        // a scale estimate of the metric.
        self.var_long = (1.0 - ALPHA_LONG) * (self.var_long + ALPHA_LONG * dev_long * dev_long);
        self.spread += ALPHA_SPREAD * (diff.abs() - self.spread);
        // Values near the limits of f64 can overflow differences and variances to infinity;
        // clamp so downstream models always see finite numbers, and reset a state that has
        // overflowed so it recovers once values are sane again.
        if !(self.mean_short.is_finite()
            && self.mean_long.is_finite()
            && self.var_long.is_finite()
            && self.spread.is_finite())
        {
            *self = Self {
                n: 1,
                last: x,
                mean_short: x,
                mean_long: x,
                ..Self::default()
            };
        }
        [x, diff, dev_short, dev_long, self.spread].map(|v| v.clamp(-f64::MAX, f64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_series_has_zero_deviations() {
        let mut f = FeatureState::new();
        for _ in 0..50 {
            let v = f.update(3.0);
            assert_eq!(v, [3.0, 0.0, 0.0, 0.0, 0.0]);
        }
        assert_eq!(f.count(), 50);
        assert_eq!(std::mem::size_of::<FeatureState>(), 48);
    }

    #[test]
    fn a_new_segment_starts_without_a_jump_and_keeps_the_long_run_state() {
        let mut f = FeatureState::new();
        for i in 0..200 {
            f.update(10.0 + (i % 2) as f64);
        }
        let (long, spread) = (f.long_std(), f.spread);
        f.break_continuity();
        assert_eq!(f.last(), None);
        assert_eq!(f.update(f64::NAN)[0], f.mean_long, "no NaN features");
        let v = f.update(30.0);
        assert_eq!((v[1], v[2]), (0.0, 0.0), "no difference across the break");
        assert!(v[3] > 15.0, "the long mean carries on: {v:?}");
        assert!(f.long_std() > long && f.spread < spread && f.spread > 0.9 * spread);
        assert_eq!(f.update(31.0)[1], 1.0);

        let mut s = ShapeNovelty::new(64, 4, 0, 1);
        for i in 0..20 {
            s.update(i as f64, 1.0);
        }
        s.break_continuity();
        let after: Vec<bool> = (0..5).map(|i| s.update(i as f64, 1.0).is_some()).collect();
        assert_eq!(after, [false, false, false, false, true]);
    }

    #[test]
    fn spike_is_measured_against_the_past() {
        let mut f = FeatureState::new();
        for _ in 0..200 {
            f.update(10.0);
        }
        let v = f.update(20.0);
        assert_eq!(v[1], 10.0);
        assert!((v[2] - 10.0).abs() < 1e-9);
        assert!((v[3] - 10.0).abs() < 1e-9);
        assert!(v[4] > 0.0);
        // The next normal point shows a negative jump and a smaller deviation.
        let w = f.update(10.0);
        assert_eq!(w[1], -10.0);
        assert!(w[2] > 0.0 - 10.0 && w[2] < 0.0);
    }

    #[test]
    fn level_shift_decays_in_short_before_long_mean() {
        let mut f = FeatureState::new();
        for _ in 0..100 {
            f.update(0.0);
        }
        let mut last = [0.0; N_FEATURES];
        for _ in 0..20 {
            last = f.update(5.0);
        }
        assert!(last[2].abs() < 0.01, "short mean caught up: {}", last[2]);
        assert!(last[3] > 2.0, "long mean lags: {}", last[3]);
        assert!(f.long_std() > 0.0);
    }

    #[test]
    fn shape_novelty_flags_new_shapes_only() {
        let mut s = ShapeNovelty::new(200, 8, 0, 1);
        assert_eq!(s.bytes(), 1600);
        let mut last = None;
        // A repeating saw-tooth: after one period every window has an exact match.
        for i in 0..300 {
            last = s.update((i % 20) as f64, 1.0);
        }
        assert!(last.expect("enough data") < 1e-12);
        // A value never seen in that position makes the newest window novel.
        let d = s.update(50.0, 1.0).expect("enough data");
        assert!(d > 5.0, "{d}");
        // Scale divides the distance.
        let mut t = ShapeNovelty::new(200, 8, 0, 1);
        for i in 0..300 {
            t.update((i % 20) as f64, 1.0);
        }
        let d2 = t.update(50.0, 10.0).expect("enough data");
        assert!((d2 * 10.0 - d).abs() < 1e-9);
        assert!(t.update(f64::NAN, 1.0).is_none());
    }

    #[test]
    fn nearest_window_equals_a_plain_scan_to_the_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(5);
        for len in [0, 1, 11, 12, 13, 19, 20, 21, 100, 1013] {
            let hay: Vec<f64> = (0..len).map(|_| rng.gen::<f64>() * 100.0 - 50.0).collect();
            let cur: Vec<f64> = (0..12).map(|_| rng.gen::<f64>() * 100.0 - 50.0).collect();
            let plain = hay
                .windows(12)
                .map(|w| {
                    w.iter()
                        .zip(&cur)
                        .fold(0.0, |d, (v, c)| d + (v - c) * (v - c))
                })
                .fold(f64::INFINITY, |best, d| if d < best { d } else { best });
            assert_eq!(
                nearest_window(&hay, &cur).to_bits(),
                plain.to_bits(),
                "{len}"
            );
        }
        // Overflowing distances stay infinite, never NaN.
        let huge = [f64::MAX, -f64::MAX, f64::MAX];
        assert_eq!(nearest_window(&huge, &[f64::MAX, f64::MAX]), f64::INFINITY);
    }

    #[test]
    fn shape_reservoir_remembers_evicted_shapes() {
        // A shape seen only before the buffer's horizon is still known through the reservoir.
        let mut with = ShapeNovelty::new(60, 5, 200, 7);
        let mut without = ShapeNovelty::new(60, 5, 0, 7);
        let pattern = [0.0, 10.0, 0.0, 10.0, 0.0];
        for s in [&mut with, &mut without] {
            for _ in 0..10 {
                for p in pattern {
                    s.update(p, 1.0);
                }
            }
            for _ in 0..200 {
                s.update(3.0, 1.0);
            }
        }
        let mut dw = None;
        let mut dn = None;
        for p in pattern {
            dw = with.update(p, 1.0);
            dn = without.update(p, 1.0);
        }
        assert!(dw.expect("data") < 1e-9);
        assert!(dn.expect("data") > 1.0);
        assert!(with.bytes() > without.bytes());
    }

    #[test]
    fn extreme_values_stay_finite() {
        let mut f = FeatureState::new();
        for i in 0..100 {
            let x = if i % 2 == 0 { f64::MAX } else { -f64::MAX };
            assert!(f.update(x).iter().all(|v| v.is_finite()));
        }
        assert!(f.long_std().is_finite());
        let mut s = ShapeNovelty::new(60, 5, 4, 1);
        for i in 0..100 {
            let x = if i % 3 == 0 { f64::MAX } else { -f64::MAX };
            assert!(s.update(x, 1.0).is_none_or(|d| d.is_finite()));
        }
    }

    #[test]
    fn non_finite_input_is_ignored() {
        let mut f = FeatureState::new();
        f.update(1.0);
        let before = f.clone();
        f.update(f64::NAN);
        f.update(f64::INFINITY);
        assert_eq!(f, before);
    }
}

/// Shape novelty: the distance from the most recent `m` values to their nearest neighbour
/// among earlier length-`m` subsequences (a "discord" score).
///
/// Candidates are every subsequence of a bounded buffer of recent values plus a fixed-size
/// uniform sample (reservoir sampling) of the subsequences that have left that buffer, so shapes
/// seen long ago stay known at a fixed memory cost. A large distance means the recent shape of
/// the signal is new: this catches contextual anomalies (a missing daily peak, a flattened cycle)
/// that look normal point by point. Distances are divided by `sqrt(m)` and by the caller's scale
/// so they are unitless. Memory is `(capacity + reservoir * m) * 8` bytes; an update costs at
/// most `(capacity + reservoir) * m` multiply-adds, usually far less thanks to early abandoning.
#[derive(Debug, Clone)]
pub struct ShapeNovelty {
    buf: std::collections::VecDeque<f64>,
    capacity: usize,
    m: usize,
    reservoir: Vec<f64>,
    reservoir_len: usize,
    evicted: u64,
    rng: rand_xoshiro::Xoshiro256PlusPlus,
    /// Values still to come before the newest subsequence lies wholly after a break
    /// (`break_continuity`); no distance is reported until then.
    since_break: usize,
}

/// The smallest squared Euclidean distance between `cur` and any window of `cur.len()`
/// consecutive values of `hay` (infinite when there is none). Windows are taken eight at a
/// time, each one's sum built in the same order as a plain loop would (so the result is the
/// same to the bit), with no branch inside: the compiler runs the eight sums side by side in
/// vector registers. An early exit per window once its sum passes the best so far (the usual
/// trick) costs a branch per value and was slower.
fn nearest_window(hay: &[f64], cur: &[f64]) -> f64 {
    const LANES: usize = 8;
    let m = cur.len();
    let mut best = f64::INFINITY;
    if m == 0 || hay.len() < m {
        return best;
    }
    let windows = hay.len() - m + 1;
    let mut start = 0;
    while start + LANES <= windows {
        let mut sums = [0.0f64; LANES];
        for (j, &c) in cur.iter().enumerate() {
            let values = &hay[start + j..start + j + LANES];
            for (sum, &v) in sums.iter_mut().zip(values) {
                let diff = v - c;
                *sum += diff * diff;
            }
        }
        for sum in sums {
            if sum < best {
                best = sum;
            }
        }
        start += LANES;
    }
    for window in hay[start..].windows(m) {
        let mut sum = 0.0;
        for (&v, &c) in window.iter().zip(cur) {
            let diff = v - c;
            sum += diff * diff;
        }
        if sum < best {
            best = sum;
        }
    }
    best
}

impl ShapeNovelty {
    /// A buffer of `capacity` recent values and `reservoir` older subsequences, compared in
    /// subsequences of `m` values; `seed` makes the reservoir reproducible.
    pub fn new(capacity: usize, m: usize, reservoir: usize, seed: u64) -> Self {
        use rand::SeedableRng;
        let m = m.max(2);
        let capacity = capacity.max(3 * m);
        Self {
            buf: std::collections::VecDeque::with_capacity(capacity),
            capacity,
            m,
            reservoir: Vec::new(),
            reservoir_len: reservoir,
            evicted: 0,
            rng: rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed),
            since_break: 0,
        }
    }

    /// Starts a new segment: no distance is reported until `m` values have come after the
    /// break, so no subsequence compared joins values from both sides of it. Earlier
    /// subsequences stay as candidates.
    pub fn break_continuity(&mut self) {
        self.since_break = self.m;
    }

    /// Bytes held at most by the buffer and the reservoir.
    pub fn bytes(&self) -> usize {
        (self.capacity + self.reservoir_len * self.m) * 8
    }

    /// Moves the oldest complete subsequence of the buffer into the reservoir (Algorithm R).
    fn evict_oldest(&mut self) {
        if self.reservoir_len == 0 || self.buf.len() < self.m {
            return;
        }
        use rand::Rng;
        self.evicted += 1;
        let m = self.m;
        if self.reservoir.len() < self.reservoir_len * m {
            self.reservoir.extend(self.buf.iter().take(m));
        } else {
            let j = self.rng.gen_range(0..self.evicted);
            if let Ok(j) = usize::try_from(j) {
                if j < self.reservoir_len {
                    for (dst, src) in self.reservoir[j * m..(j + 1) * m]
                        .iter_mut()
                        .zip(self.buf.iter())
                    {
                        *dst = *src;
                    }
                }
            }
        }
    }

    /// Adds a value and returns the nearest-neighbour distance of the newest subsequence, in
    /// units of `scale`; `None` until there are at least two non-overlapping subsequences.
    pub fn update(&mut self, x: f64, scale: f64) -> Option<f64> {
        if !x.is_finite() {
            return None;
        }
        if self.buf.len() == self.capacity {
            self.evict_oldest();
            self.buf.pop_front();
        }
        self.buf.push_back(x);
        let n = self.buf.len();
        let m = self.m;
        if self.since_break > 0 {
            self.since_break -= 1;
            return None;
        }
        if n < 2 * m {
            return None;
        }
        // One contiguous slice (a rotation of at most `capacity` values when the ring has
        // wrapped), so the scan below runs over plain slices.
        let buf = self.buf.make_contiguous();
        let cur = &buf[n - m..];
        // Buffer candidates end at least `m` points before the newest one so they do not
        // overlap it; the reservoir's come after them.
        let mut best = nearest_window(&buf[..n - m], cur);
        'candidates: for cand in self.reservoir.chunks_exact(m) {
            let mut d = 0.0;
            for (c, v) in cur.iter().zip(cand) {
                let diff = v - c;
                d += diff * diff;
                if d >= best {
                    continue 'candidates;
                }
            }
            best = d;
        }
        let scale = if scale > 0.0 && scale.is_finite() {
            scale
        } else {
            1.0
        };
        let d = (best / m as f64).sqrt() / scale;
        // Overflowing distances (values near f64::MAX) are reported as the largest finite one.
        Some(if d.is_nan() { 0.0 } else { d.min(f64::MAX) })
    }
}
