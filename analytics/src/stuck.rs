//! The stuck-sensor check: a metric that normally changes from one reading to the next starts
//! reporting the same value over and over.
//!
//! A frozen sensor (a dead analogue input that holds its last sample, a gateway re-sending a
//! cached value) reports a perfectly ordinary value, so the learned channels see nothing while
//! the machine runs at a steady load: the value, its level and its relation to the other
//! metrics all look usual. What gives it away is that a noisy measurement never repeats itself
//! exactly for long.
//!
//! The check counts the readings in a row that repeat the previous value exactly (a run), and
//! judges a run as stuck once it is at least `min_run` readings long *and* `factor` times the
//! longest run the metric has had in its memory. It judges only metrics that change: at least
//! `min_changes` value changes seen, and at most `max_repeat_share` of the remembered readings
//! repeating their predecessor. A counter that rests at 0, a set point, a status code or a
//! coarsely quantised steady signal repeats itself often and is never judged; a flat line is
//! never judged. One run is reported at most once, and not at all when another alert on the
//! metric already fell inside it (the same incident).
//!
//! The memory is two epochs, each at least `epoch_readings` readings and, when readings carry
//! time stamps, at least `EPOCH_MS` long: runs that ended within the current and the previous
//! epoch count, so a long pause (a machine resting at one value overnight) raises the bar for a
//! day or two and is then forgotten; a run still going on when an epoch ends is counted in it
//! as far as it got. O(1) per reading, 88 bytes of state.

/// One day: the shortest time an epoch of the memory spans when readings carry time stamps.
pub const EPOCH_MS: i64 = 86_400_000;

/// When a run counts as too long (for the stuck-sensor check: a run of identical values); see
/// the module documentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunRule {
    /// Fewest readings in a run that can be too long (identical readings in a row).
    pub min_run: u32,
    /// How many times the longest remembered run a run must reach.
    pub factor: u32,
    /// Runs that must have started (value changes) before any is judged.
    pub min_changes: u32,
    /// Largest share of remembered readings that may extend a run (repeat their predecessor).
    pub max_repeat_share: f64,
    /// Fewest readings in one epoch of the memory.
    pub epoch_readings: u32,
}

/// What one epoch of the memory remembers.
#[derive(Debug, Clone, Copy, Default)]
struct Epoch {
    /// The longest run that ended in the epoch.
    longest: u32,
    /// Readings in the epoch.
    readings: u32,
    /// Readings in the epoch's ended runs that repeated their predecessor.
    repeats: u32,
    /// Time stamp of the epoch's first reading.
    start_ms: Option<i64>,
}

/// Runs of readings that bring no news (the same value again, or no value of a metric at all)
/// and when one is too long; the part [`StuckCheck`] and the missing-metric check share. A
/// reading either starts a new run (`fresh`) or extends the current one.
#[derive(Debug, Clone, Default)]
pub struct RunWatch {
    run: u32,
    /// Repeats of the current run already counted in an epoch (see `advance_epoch`).
    credited: u32,
    /// Fresh readings after the first.
    changes: u32,
    /// The current run was reported, or another alert fell inside it.
    reported: bool,
    /// The current run is too long (reported or not).
    long: bool,
    /// The current epoch, then the previous one.
    epochs: [Epoch; 2],
}

impl RunWatch {
    /// Records one reading (time stamp `at_ms`, if known) that starts a new run if `fresh`,
    /// else extends the current one. Returns the run's length on the reading where the run
    /// becomes too long under `rule`, unless the run was already reported
    /// ([`RunWatch::cover`]); `None` on every other reading.
    pub fn step(&mut self, rule: &RunRule, fresh: bool, at_ms: Option<i64>) -> Option<u32> {
        if !fresh {
            self.run = self.run.saturating_add(1);
        } else {
            if self.run > 0 {
                self.changes = self.changes.saturating_add(1);
                self.credit_run();
            }
            self.run = 1;
            self.credited = 0;
            self.reported = false;
            self.long = false;
        }
        self.advance_epoch(rule, at_ms);
        if self.long || self.run < rule.min_run || self.changes < rule.min_changes {
            return None;
        }
        let [now, before] = &self.epochs;
        let longest = now.longest.max(before.longest);
        let readings = f64::from(now.readings) + f64::from(before.readings);
        let repeats = f64::from(now.repeats) + f64::from(before.repeats);
        if repeats > rule.max_repeat_share * readings {
            return None;
        }
        if self.run < longest.saturating_mul(rule.factor) {
            return None;
        }
        self.long = true;
        if self.reported {
            return None;
        }
        self.reported = true;
        Some(self.run)
    }

    /// Whether the current run is too long (from the reading where it became so, whether that
    /// raised an alert or the run was already reported).
    pub fn is_long(&self) -> bool {
        self.long
    }

    /// Readings in the current run, the one that started it included.
    pub fn run(&self) -> u32 {
        self.run
    }

    /// Another alert fell on the current reading: the current run, if it turns out too long,
    /// is part of an incident already reported.
    pub fn cover(&mut self) {
        self.reported = true;
    }

    /// Whether the current run counts as reported (see [`RunWatch::cover`]); with
    /// [`RunWatch::set_reported`] this lets a caller undo a `cover` for an alert it withheld.
    pub fn is_reported(&self) -> bool {
        self.reported
    }

    /// Restores the state [`RunWatch::is_reported`] returned.
    pub fn set_reported(&mut self, reported: bool) {
        self.reported = reported;
    }

    /// Counts the current run (so far) in the current epoch.
    fn credit_run(&mut self) {
        let now = &mut self.epochs[0];
        now.longest = now.longest.max(self.run);
        let repeats = self.run.saturating_sub(1);
        now.repeats = now.repeats.saturating_add(repeats - self.credited);
        self.credited = repeats;
    }

    /// Counts the reading in the current epoch and starts a new one when it is long enough.
    /// A run still going on at that moment is counted in the epoch that ends, as far as it
    /// got: otherwise a pause longer than two epochs (a machine resting at one value over a
    /// long weekend) would drop out of the memory while it lasts and end up judged stuck.
    fn advance_epoch(&mut self, rule: &RunRule, at_ms: Option<i64>) {
        let now = &mut self.epochs[0];
        if now.start_ms.is_none() {
            now.start_ms = at_ms;
        }
        now.readings = now.readings.saturating_add(1);
        let long_enough = match (now.start_ms, at_ms) {
            (Some(start), Some(t)) => t.saturating_sub(start) >= EPOCH_MS,
            _ => true,
        };
        if now.readings >= rule.epoch_readings && long_enough {
            self.credit_run();
            self.epochs[1] = self.epochs[0];
            self.epochs[0] = Epoch {
                start_ms: at_ms,
                ..Epoch::default()
            };
        }
    }
}

/// The stuck-sensor state of one metric: runs of one value.
#[derive(Debug, Clone)]
pub struct StuckCheck {
    last: f64,
    runs: RunWatch,
}

impl Default for StuckCheck {
    fn default() -> Self {
        Self {
            last: f64::NAN,
            runs: RunWatch::default(),
        }
    }
}

impl StuckCheck {
    /// Records `value` (time stamp `at_ms`, if known). Returns the run's length on the reading
    /// where the run becomes stuck under `rule`, unless the run was already reported
    /// ([`StuckCheck::cover`]); `None` on every other reading. Non-finite values are ignored.
    pub fn update(&mut self, rule: &RunRule, value: f64, at_ms: Option<i64>) -> Option<u32> {
        if !value.is_finite() {
            return None;
        }
        let fresh = value != self.last;
        self.last = value;
        self.runs.step(rule, fresh, at_ms)
    }

    /// Whether the current run is stuck (from the reading where it became stuck, whether that
    /// raised an alert or the run was already reported).
    pub fn is_frozen(&self) -> bool {
        self.runs.is_long()
    }

    /// Readings in a row, up to the last one, that carried the last value.
    pub fn run(&self) -> u32 {
        self.runs.run()
    }

    /// Another alert on the metric fell on the current reading: the current run, if it turns
    /// out stuck, is part of an incident already reported.
    pub fn cover(&mut self) {
        self.runs.cover();
    }

    /// See [`RunWatch::is_reported`].
    pub fn is_reported(&self) -> bool {
        self.runs.is_reported()
    }

    /// See [`RunWatch::set_reported`].
    pub fn set_reported(&mut self, reported: bool) {
        self.runs.set_reported(reported);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> RunRule {
        RunRule {
            min_run: 30,
            factor: 4,
            min_changes: 100,
            max_repeat_share: 0.05,
            epoch_readings: 1000,
        }
    }

    /// A noisy signal: never the same value twice in a row.
    fn noisy(i: u32) -> f64 {
        50.0 + f64::from((i * 7919) % 101) / 10.0 + f64::from(i % 2) * 0.01
    }

    #[test]
    fn a_noisy_metric_that_freezes_is_reported_once() {
        let mut s = StuckCheck::default();
        let r = rule();
        for i in 0..2000 {
            assert_eq!(s.update(&r, noisy(i), None), None, "reading {i}");
        }
        let frozen = noisy(1999);
        let mut hits = Vec::new();
        for i in 0..500 {
            if let Some(run) = s.update(&r, frozen, None) {
                hits.push((i, run));
            }
        }
        // The frozen value's first reading was the last noisy one: run 30 on the 29th repeat.
        assert_eq!(hits, vec![(28, 30)]);
        // It thaws. The 501 repeats are remembered for one or two epochs (1000 readings
        // each): meanwhile the metric repeats itself too often to be judged, then a second
        // freeze is reported like the first.
        for i in 0..500 {
            s.update(&r, noisy(i), None);
        }
        assert!((0..1000).all(|_| s.update(&r, 1.5, None).is_none()));
        for i in 0..2600 {
            s.update(&r, noisy(i), None);
        }
        let again = (0..1000)
            .filter_map(|_| s.update(&r, 2.5, None))
            .collect::<Vec<_>>();
        assert_eq!(again, vec![30]);
    }

    #[test]
    fn state_size() {
        assert_eq!(std::mem::size_of::<StuckCheck>(), 88);
    }

    #[test]
    fn metrics_that_repeat_themselves_are_not_judged() {
        let r = rule();
        // A set point: held for 200 readings at a time.
        let mut s = StuckCheck::default();
        let alerts = (0..100_000)
            .filter_map(|i| s.update(&r, f64::from(i / 200 % 7), None))
            .count();
        assert_eq!(alerts, 0);
        // A flat line, and a counter resting at 0 between short bursts.
        let mut flat = StuckCheck::default();
        assert!((0..10_000).all(|_| flat.update(&r, 45.0, None).is_none()));
        let mut counter = StuckCheck::default();
        let alerts = (0..100_000u32)
            .filter_map(|i| {
                let v = if i % 50 < 5 {
                    f64::from(i % 7) + 1.0
                } else {
                    0.0
                };
                counter.update(&r, v, None)
            })
            .count();
        assert_eq!(alerts, 0);
        // Too few changes yet, and non-finite values.
        let mut young = StuckCheck::default();
        for i in 0..50 {
            young.update(&r, noisy(i), None);
        }
        assert!((0..1000).all(|_| young.update(&r, 1.0, None).is_none()));
        assert_eq!(young.update(&r, f64::NAN, None), None);
    }

    #[test]
    fn a_covered_run_is_not_reported_and_long_pauses_are_remembered_for_a_while() {
        let r = rule();
        let mut s = StuckCheck::default();
        for i in 0..2000 {
            s.update(&r, noisy(i), None);
        }
        s.update(&r, 7.0, None);
        s.cover();
        assert!((0..1000).all(|_| s.update(&r, 7.0, None).is_none()));
        // That pause (1001 readings) is remembered for the next one or two epochs.
        for i in 0..1500 {
            s.update(&r, noisy(i), None);
        }
        assert!((0..1000).all(|_| s.update(&r, 8.0, None).is_none()));
        // With time stamps an epoch lasts at least a day: one reading a minute for 3 days of
        // noise, the pause at the start forgotten only after two whole days.
        let mut t = StuckCheck::default();
        let minute = 60_000;
        let mut at = 0;
        let mut feed = |t: &mut StuckCheck, v: f64| {
            at += minute;
            t.update(&r, v, Some(at))
        };
        for i in 0..2000 {
            feed(&mut t, noisy(i));
        }
        for _ in 0..300 {
            feed(&mut t, 3.0);
        }
        for i in 0..1440 {
            feed(&mut t, noisy(i));
        }
        // Still remembered a day later: a 100-reading run is not judged.
        assert!((0..100).all(|_| feed(&mut t, 4.0).is_none()));
        for i in 0..2 * 1440 {
            feed(&mut t, noisy(i));
        }
        let run = (0..100).find_map(|_| feed(&mut t, 5.0));
        assert_eq!(run, Some(30));
    }
}
