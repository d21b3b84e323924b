//! A machine's rest, learned from its own readings: the automatic running condition of a device
//! that has no `[[analytics.running]]` rule.
//!
//! A machine that stops (end of a shift, a batch done) sends readings that the anomaly detector
//! has not seen for hours: vibration and current drop to zero or to sensor noise at once. Without
//! a running condition each stop and each start is an anomaly alert on about every metric. This
//! module watches for the thing a stop looks like in telemetry and learns it the first time:
//!
//! * a metric is **still** while its readings stay within a band a fifth of its usual spread
//!   wide (`STILL_SHARE`), its usual spread being an exponentially weighted standard deviation
//!   of its readings (`USUAL_READINGS`), frozen when the stretch begins;
//! * a still stretch is a **rest** of that metric when it has lasted `after_secs`, its level
//!   lies at least `DEPARTURE` usual spreads from the metric's usual mean (so a set point that
//!   is reported unchanged while the machine runs is not a rest: it sits on its own mean), and
//!   the metric was moving when it came to rest (its stretch before lasted under `MOVING_MS`:
//!   two set points changed together for a new recipe are not a stop);
//! * two or more metrics that came to rest within `TOGETHER_MS` of each other are the
//!   **machine's** rest: their levels and bands are remembered (at most `MAX_RESTS` of them).
//!
//! From then on the machine stands while every metric of a remembered rest is within that rest's
//! band (by its last reading) or at least two usual spreads from its usual mean towards it
//! (`HEADING`: a machine takes a few seconds to spin down or up), and it runs otherwise; the monitor gates the detector on that as
//! it does for a configured rule, with `settle_secs` after each start. A single metric at rest
//! is never a stop: a current that drops to zero while the vibration goes on is an incident.
//! Being on the way counts as standing for at most `TOGETHER_MS`: metrics that stay there
//! longer without reaching the rest are a machine running on at a lower level (a lost load),
//! and the detector carries on from where it was (`RestGate::ran_on`: no settling, no fresh
//! start), so it judges the new level. Before the metrics are two spreads down, a spin-down
//! can still raise an anomaly alert; the monitor holds those (`monitor::STOP_HOLD_MS`) and
//! withdraws them if the machine comes to rest (`RestGate::resting`).
//!
//! A still stretch is judged against the usual mean and spread of two to four minutes
//! before it began (`Track::older`), from before the spin-down: a two-minute spin-down
//! widens the running spread by half, enough to hide a stop at 0 of a current running at
//! 13 ± 2.8 A, and such a machine first seen running never learned its rest.
//!
//! A machine first seen **standing** (vigil installed or restarted at night) gives none of
//! that to learn from: its rest is all the monitor has seen, so it is the usual level, and the
//! first start would be an anomaly on every metric. So until the machine is first seen to
//! start, a rest is learned, or a week has passed since the device's first reading
//! (`FIRST_START_WATCH_MS`), the gate also watches for a start from standing:
//!
//! * a metric is **at zero** when its usual mean lies within `DEPARTURE` usual spreads of 0 (a
//!   stopped motor's vibration, current, speed: exactly 0, or sensor noise around it), over
//!   more than `CALM_FROM` readings, and it **departs** when a reading lies `START_RATIO` times
//!   that band away from 0; nothing departs before the device has been seen for `after_secs`;
//! * at least two metrics at zero depart at once, and at least half the metrics were at zero
//!   (a running machine whose alarm flag and error count jump together is not starting).
//!
//! That is the machine's first start: the detector starts over (it learned only the rest) and
//! the metrics at zero, with their bands, are remembered as a **candidate** rest. When they
//! are all back in those bands and each lies `DEPARTURE` usual spreads from its usual (running)
//! level, the candidate becomes a rest at once, so the first stop is not an incident either.
//! The detector starts over there too, as after a rest learned the usual way: keeping the
//! first run's learning found a bearing wear two days later only by its limit on one seed more
//! of 16 (`shift_stop --wear-at 58`, analytics/README). While one metric at zero has departed
//! and no second yet, the detector is not fed, for at most `TOGETHER_MS`: a machine spinning
//! up moves its metrics a few seconds apart.
//!
//! Bounds: one `Track` per metric (at most the detector's `max_metrics`), at most `MAX_RESTS`
//! rests and one candidate of at most as many members.

use serde::{Deserialize, Serialize};

use crate::telemetry::{secs_to_ms, Reading};

/// A still stretch's band: this share of the metric's usual spread.
const STILL_SHARE: f64 = 0.2;
/// A rest's level lies at least this many usual spreads from the usual mean.
const DEPARTURE: f64 = 4.0;
/// Metrics that came to rest within this many ms of each other stopped together.
const TOGETHER_MS: i64 = 120_000;
/// A metric whose still stretches last under this many ms is moving.
const MOVING_MS: i64 = 60_000;
/// Readings the usual mean and spread weigh (an exponential weight of 1 / this).
const USUAL_READINGS: f64 = 600.0;
/// Readings within this many spreads of the mean keep the usual mean and spread up to date ...
const CALM: f64 = 3.0;
/// ... and so do a metric's first readings, whatever they are.
const CALM_FROM: u64 = 30;
/// A metric this many usual spreads from its usual mean towards its rest level is heading there
/// (a rest lies at least `DEPARTURE` of them away).
const HEADING: f64 = 2.0;
/// Weight of the last reading in a metric's short mean (`Track::fast`, about 10 readings).
const FAST_WEIGHT: f64 = 0.1;
/// A metric this many usual spreads below its short mean, towards a rest, is falling there
/// (a spin-down that began at a load peak is above the usual level at first).
const FALLING: f64 = 0.25;
/// Rests remembered per device (a machine may have an off state and a stand-by state).
pub const MAX_RESTS: usize = 4;
/// A metric at zero departs when a reading lies this many times its band away from 0.
const START_RATIO: f64 = 3.0;
/// How long after its first reading a device is watched for its first start: a week, which
/// covers a plant's weekend or holiday shutdown. A machine standing longer is reported when it
/// starts, as before; a device first seen running is not watched for ever.
const FIRST_START_WATCH_MS: i64 = 7 * 86_400_000;

/// How a device's rest is learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestConfig {
    /// Seconds two or more metrics must stay still together, away from their usual levels,
    /// before that is taken as the machine's rest (0: never learn, the device always runs).
    pub after_secs: u64,
    /// Seconds after a start (of the readings' time) before the detector is fed again. Short
    /// on purpose: a fault already growing when the machine starts is then part of what the
    /// new segment judges, not of the level it starts from (`shift_stop --wear-at 53`: 16 of
    /// 16 wears found at 60 s, 2 of 16 at 300 s).
    pub settle_secs: u64,
}

impl Default for RestConfig {
    fn default() -> Self {
        Self {
            after_secs: 600,
            settle_secs: 60,
        }
    }
}

/// One metric's usual level and its current still stretch.
#[derive(Debug, Clone)]
struct Track {
    name: String,
    last: f64,
    /// Exponentially weighted mean and variance of the readings while the machine runs.
    mean: f64,
    var: f64,
    readings: u64,
    /// The usual mean and spread: `mean` and the square root of `var` as of the last reading
    /// within `CALM` spreads of the mean, so a spin-down lasting a minute or two does not widen
    /// the spread it is judged by.
    calm_mean: f64,
    calm_std: f64,
    /// The usual mean and spread as of the last two turns of `TOGETHER_MS` (`old` taken at
    /// `old_ms`, `older` one turn before it): a still stretch is judged by the older one, from
    /// before the machine began to spin down. A slow spin-down (two minutes) stays within
    /// `CALM` spreads of the drifting mean and widens the usual spread by half; judged by that
    /// spread, a current running at 13 ± 2.8 A that stopped at 0 was not away from its usual
    /// level, and the rest was never learned.
    old: (f64, f64),
    older: (f64, f64),
    old_ms: i64,
    /// A short exponentially weighted mean of the readings (`FAST_WEIGHT`).
    fast: f64,
    /// The current still stretch: its range, when it began, and the usual mean and spread
    /// from before it began (`older`).
    lo: f64,
    hi: f64,
    start_ms: i64,
    ref_mean: f64,
    ref_std: f64,
    /// Whether the stretch before this one lasted under `MOVING_MS`: the metric was moving
    /// when it came to rest, as a running machine's readings do and a set point does not.
    moving: bool,
}

impl Track {
    fn new(name: &str, value: f64, ts: i64) -> Self {
        Self {
            name: name.to_string(),
            last: value,
            mean: value,
            var: 0.0,
            readings: 1,
            calm_mean: value,
            calm_std: 0.0,
            old: (value, 0.0),
            older: (value, 0.0),
            old_ms: ts,
            fast: value,
            lo: value,
            hi: value,
            start_ms: ts,
            ref_mean: value,
            ref_std: 0.0,
            moving: false,
        }
    }

    fn push(&mut self, value: f64, ts: i64, standing: bool) {
        self.last = value;
        self.fast += FAST_WEIGHT * (value - self.fast);
        if ts.saturating_sub(self.old_ms) >= TOGETHER_MS || ts < self.old_ms {
            self.older = self.old;
            self.old = (self.calm_mean, self.calm_std);
            self.old_ms = ts;
        }
        let (lo, hi) = (self.lo.min(value), self.hi.max(value));
        if hi - lo > STILL_SHARE * self.ref_std || ts < self.start_ms {
            self.moving = ts.saturating_sub(self.start_ms) < MOVING_MS;
            self.lo = value;
            self.hi = value;
            self.start_ms = ts;
            (self.ref_mean, self.ref_std) = self.older;
        } else {
            self.lo = lo;
            self.hi = hi;
        }
        // A known rest is not the usual level: after a night at rest the morning's readings
        // would all look like departures.
        if standing {
            return;
        }
        self.readings += 1;
        let w = (1.0 / self.readings as f64).max(1.0 / USUAL_READINGS);
        let d = value - self.mean;
        let calm = d.abs() <= CALM * self.var.sqrt() || self.readings <= CALM_FROM;
        self.mean += w * d;
        self.var = (1.0 - w) * (self.var + w * d * d);
        if calm {
            self.calm_mean = self.mean;
            self.calm_std = self.var.sqrt();
        }
    }

    fn centre(&self) -> f64 {
        (self.lo + self.hi) / 2.0
    }

    /// How far the last reading lies from `from` towards `rest`, the level of a rest, in the
    /// direction from the usual mean to that level (negative: the other way).
    fn towards(&self, from: f64, rest: f64) -> f64 {
        (from - self.last) * (self.calm_mean - rest).signum()
    }

    /// The band around 0 a metric at zero has kept to: its usual mean's distance from 0 plus
    /// `DEPARTURE` usual spreads; `None` unless the metric is at zero (its usual mean lies
    /// within that many spreads of 0, over at least `CALM_FROM` readings).
    fn zero_band(&self) -> Option<f64> {
        let band = self.calm_mean.abs() + DEPARTURE * self.calm_std;
        (self.readings > CALM_FROM && self.calm_mean.abs() <= DEPARTURE * self.calm_std)
            .then_some(band)
    }

    /// Whether the still stretch is a rest of this metric at `ts`.
    fn at_rest(&self, ts: i64, after_ms: i64) -> bool {
        let away = (self.centre() - self.ref_mean).abs() >= DEPARTURE * self.ref_std;
        self.moving && self.ref_std > 0.0 && away && ts - self.start_ms >= after_ms
    }

    /// The still stretch as a rest level of this metric, the `track`-th.
    fn member(&self, track: usize) -> Member {
        Member {
            track,
            centre: self.centre(),
            half: (self.hi - self.lo).max(STILL_SHARE * self.ref_std),
        }
    }
}

/// A metric's level in a rest.
#[derive(Debug, Clone, PartialEq)]
struct Member {
    /// Index into `RestGate::tracks` (tracks are only ever added).
    track: usize,
    centre: f64,
    half: f64,
}

/// Whether a machine that started at `since_ms` (`None`: not since it was first seen) has
/// settled at `ts` after `settle_secs`. A reading from before the start (a clock set back)
/// counts as settled.
pub(crate) fn settled(since_ms: Option<i64>, ts: i64, settle_secs: u64) -> bool {
    since_ms.map_or(true, |since| {
        ts < since || ts - since >= secs_to_ms(settle_secs)
    })
}

/// Where a machine's metrics lie against its rests (`RestGate::position`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    Away,
    Heading,
    AtRest,
}

/// What a reading says about the first start of a machine first seen standing.
enum FirstStart {
    /// Not a start.
    No,
    /// One metric at zero departed: the others may follow.
    Maybe,
    /// At least two departed: the machine started.
    Now,
}

/// A device's learned rests and whether its machine runs.
#[derive(Debug, Clone)]
pub struct RestGate {
    config: RestConfig,
    max_metrics: usize,
    tracks: Vec<Track>,
    rests: Vec<Vec<Member>>,
    /// Rests learned in all (a fifth one replaces the oldest).
    learned: u64,
    standing: bool,
    /// When the machine last started (the first reading after a rest).
    since_ms: Option<i64>,
    /// The first reading's time.
    first_seen_ms: Option<i64>,
    /// Whether the gate still watches for the first start of a machine first seen standing:
    /// until it comes or a rest is learned.
    watching_start: bool,
    /// Since when one metric at zero has departed alone (`FirstStart::Maybe`).
    pending_ms: Option<i64>,
    /// The metrics at zero before the first start, a rest once they return there (empty:
    /// none).
    candidate: Vec<Member>,
    /// Times the detector was to start over (`restarts`).
    restarts: u64,
    /// Since when the metrics of a rest have been on their way to or from it (`HEADING`), and
    /// whether that has lasted longer than `TOGETHER_MS`.
    heading_ms: Option<i64>,
    stalled: bool,
    /// Whether the last reading found the machine at a rest; whether the current standing
    /// stretch reached one; whether the last reading ended one that did not (`ran_on`).
    resting: bool,
    stopped: bool,
    ran_on: bool,
}

impl RestGate {
    /// A gate that tracks at most `max_metrics` metrics.
    pub fn new(config: RestConfig, max_metrics: usize) -> Self {
        Self {
            config,
            max_metrics,
            tracks: Vec::new(),
            rests: Vec::new(),
            learned: 0,
            standing: false,
            since_ms: None,
            first_seen_ms: None,
            watching_start: true,
            pending_ms: None,
            candidate: Vec::new(),
            restarts: 0,
            heading_ms: None,
            stalled: false,
            resting: false,
            stopped: false,
            ran_on: false,
        }
    }

    /// Rests remembered now.
    pub fn rests(&self) -> usize {
        self.rests.len()
    }

    /// Rests learned in all, the forgotten ones too.
    pub fn learned(&self) -> u64 {
        self.learned
    }

    /// Times the anomaly detector was to start over: when a rest is learned (after it was fed
    /// `after_secs` of it, or a candidate's at the first stop) and at the first start of a
    /// machine first seen standing (it learned only the rest).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Upper bound of the gate's memory, names aside.
    pub fn bytes(max_metrics: usize) -> usize {
        max_metrics
            * (std::mem::size_of::<Track>() + (MAX_RESTS + 1) * std::mem::size_of::<Member>())
    }

    /// Updates the state with `reading`; whether the detector is to be fed with it.
    pub fn admits(&mut self, reading: &Reading) -> bool {
        let ts = reading.timestamp_ms;
        (self.resting, self.ran_on) = (false, false);
        for (name, value) in &reading.metrics {
            match self.tracks.iter().position(|t| &t.name == name) {
                Some(i) => self.tracks[i].push(*value, ts, self.standing),
                None if self.tracks.len() < self.max_metrics => {
                    self.tracks.push(Track::new(name, *value, ts))
                }
                None => {}
            }
        }
        let first_seen = *self.first_seen_ms.get_or_insert(ts);
        if self.watching_start {
            match self.first_start(first_seen, ts) {
                FirstStart::Now => {
                    self.watching_start = false;
                    self.pending_ms = None;
                    self.since_ms = Some(ts);
                    self.restarts += 1;
                }
                // One metric departed: the others may follow within TOGETHER_MS (a machine
                // spinning up). Until then the detector is not fed; after that it is.
                FirstStart::Maybe => {
                    let since = *self.pending_ms.get_or_insert(ts);
                    if ts >= since && ts - since <= TOGETHER_MS {
                        return false;
                    }
                }
                FirstStart::No => self.pending_ms = None,
            }
        }
        let position = self.position();
        let heading = self.heading(position, ts);
        let at_rest = matches!(position, Position::AtRest)
            || (!heading && (self.confirm_candidate() || self.learn(ts)));
        self.resting = at_rest;
        if heading || at_rest {
            self.stopped |= at_rest;
            self.standing = true;
            return false;
        }
        if self.standing {
            self.standing = false;
            // A start: after a stop, or a moment after one (metrics near the edge of the way
            // up go in and out of it). A machine that was on its way down and went on running
            // at a lower level did not stop: its readings go on from where they were.
            if self.stopped || !settled(self.since_ms, ts, self.config.settle_secs) {
                self.since_ms = Some(ts);
            } else {
                self.ran_on = true;
            }
            self.stopped = false;
        }
        settled(self.since_ms, ts, self.config.settle_secs)
    }

    /// Whether the machine is at one of its rests by the last reading (or the reading taught
    /// it one): it stopped.
    pub fn resting(&self) -> bool {
        self.resting
    }

    /// Whether the last reading ended a stretch in which the machine's metrics were on their
    /// way down to a rest (`HEADING`) for longer than `TOGETHER_MS` and it ran on without
    /// reaching it: not a start, so the detector is to carry on as if it had been fed all
    /// along.
    pub fn ran_on(&self) -> bool {
        self.ran_on
    }

    /// Whether `metric` belongs to one of the machine's rests and, by the last reading, it and
    /// every other metric of that rest lie on that rest's side of their usual running levels or
    /// are falling towards it (`FALLING`): the machine may be spinning down, so an anomaly of
    /// `metric` now may be its stop. The candidate rest of a machine first seen standing counts
    /// too (its first stop is confirmed only once every metric is back at zero); nothing does
    /// while the machine is stalled on the way (`heading`).
    pub fn heading_to_rest(&self, metric: &str) -> bool {
        if self.stalled {
            return false;
        }
        let candidate = (!self.candidate.is_empty()).then_some(&self.candidate);
        self.rests.iter().chain(candidate).any(|rest| {
            let named = |m: &Member| self.tracks.get(m.track).is_some_and(|t| t.name == metric);
            rest.iter().any(named)
                && rest.iter().all(|m| {
                    self.tracks.get(m.track).is_some_and(|t| {
                        t.towards(t.calm_mean, m.centre) > 0.0
                            || t.towards(t.fast, m.centre) >= FALLING * t.calm_std
                    })
                })
        })
    }

    /// Where the last readings lie against the remembered rests: every metric of one of them
    /// at its level, or each at its level or at least `HEADING` usual spreads from its usual
    /// mean towards it (a machine spinning down or up), or neither.
    fn position(&self) -> Position {
        let mut position = Position::Away;
        for rest in &self.rests {
            let (mut at_level, mut on_the_way) = (true, true);
            for m in rest {
                let Some(t) = self.tracks.get(m.track) else {
                    (at_level, on_the_way) = (false, false);
                    break;
                };
                let here = (t.last - m.centre).abs() <= m.half;
                at_level &= here;
                on_the_way &= here || t.towards(t.calm_mean, m.centre) >= HEADING * t.calm_std;
            }
            if at_level {
                return Position::AtRest;
            }
            if on_the_way {
                position = Position::Heading;
            }
        }
        position
    }

    /// Whether the machine counts as standing at `ts` because its metrics are on their way to
    /// or from a rest (`Position::Heading`): for at most `TOGETHER_MS`, as long as a spin-down
    /// or spin-up takes. Longer, the machine runs at a new level (a lost load, say), which the
    /// detector is to judge: it is `stalled` until the metrics leave the way.
    fn heading(&mut self, position: Position, ts: i64) -> bool {
        if !matches!(position, Position::Heading) {
            self.heading_ms = None;
            self.stalled = false;
            return false;
        }
        if self.stalled {
            return false;
        }
        let since = *self.heading_ms.get_or_insert(ts);
        self.stalled = ts.saturating_sub(since) > TOGETHER_MS;
        !self.stalled
    }

    /// Whether this reading is the first start of a machine first seen standing (module
    /// docs); if so, the metrics that departed from zero become the candidate rest.
    fn first_start(&mut self, first_seen: i64, ts: i64) -> FirstStart {
        let seen = ts.saturating_sub(first_seen);
        if seen > FIRST_START_WATCH_MS {
            self.watching_start = false;
            return FirstStart::No;
        }
        if self.config.after_secs == 0 || seen < secs_to_ms(self.config.after_secs) {
            return FirstStart::No;
        }
        let departed = |t: &Track| {
            t.zero_band()
                .is_some_and(|b| t.last.abs() > START_RATIO * b)
        };
        // One pass over the tracks on every reading while the start is watched for.
        let (mut at_zero, mut departures) = (0, 0);
        for t in &self.tracks {
            if let Some(band) = t.zero_band() {
                at_zero += 1;
                departures += usize::from(t.last.abs() > START_RATIO * band);
            }
        }
        if at_zero < 2 || 2 * at_zero < self.tracks.len() {
            return FirstStart::No;
        }
        match departures {
            0 => return FirstStart::No,
            1 => return FirstStart::Maybe,
            _ => {}
        }
        self.candidate = self
            .tracks
            .iter()
            .enumerate()
            .filter(|(_, t)| departed(t))
            .map(|(i, t)| Member {
                track: i,
                centre: t.calm_mean,
                half: DEPARTURE * t.calm_std,
            })
            .collect();
        FirstStart::Now
    }

    /// Makes the candidate rest a rest when every member is back in its band and lies
    /// `DEPARTURE` usual spreads from its usual (running) level; whether it did.
    fn confirm_candidate(&mut self) -> bool {
        if self.candidate.is_empty() {
            return false;
        }
        let back = self.candidate.iter().all(|m| {
            self.tracks.get(m.track).is_some_and(|t| {
                (t.last - m.centre).abs() <= m.half
                    && t.calm_std > 0.0
                    && (m.centre - t.calm_mean).abs() >= DEPARTURE * t.calm_std
            })
        });
        if !back {
            return false;
        }
        let members = std::mem::take(&mut self.candidate);
        self.remember(members);
        // As after a rest learned below (module docs).
        self.restarts += 1;
        true
    }

    /// Adds a rest, forgetting the oldest beyond `MAX_RESTS`; the first start is watched for
    /// no longer.
    fn remember(&mut self, members: Vec<Member>) {
        if self.rests.len() >= MAX_RESTS {
            self.rests.remove(0);
        }
        self.rests.push(members);
        self.learned += 1;
        self.watching_start = false;
    }

    /// Remembers the metrics at rest now as a rest of the machine, if at least two of them came
    /// to rest together; whether it did.
    fn learn(&mut self, ts: i64) -> bool {
        if self.config.after_secs == 0 {
            return false;
        }
        let after_ms = secs_to_ms(self.config.after_secs);
        // The metrics that came to rest within TOGETHER_MS of the last one to do so. Nothing
        // is allocated unless they are a rest: this runs on every reading of a running machine.
        let Some(latest) = self
            .tracks
            .iter()
            .filter(|t| t.at_rest(ts, after_ms))
            .map(|t| t.start_ms)
            .max()
        else {
            return false;
        };
        let together = |t: &Track| t.at_rest(ts, after_ms) && latest - t.start_ms <= TOGETHER_MS;
        if self.tracks.iter().filter(|t| together(t)).count() < 2 {
            return false;
        }
        let members = self
            .tracks
            .iter()
            .enumerate()
            .filter(|(_, t)| together(t))
            .map(|(i, t)| t.member(i))
            .collect();
        self.remember(members);
        // The detector was fed this rest for `after_secs` as if the machine ran.
        self.restarts += 1;
        self.candidate.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(t: i64, metrics: &[(&str, f64)]) -> Reading {
        Reading {
            timestamp_ms: 1_790_000_000_000 + t * 1000,
            device_time: true,
            metrics: metrics.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        }
    }

    /// A running machine: vibration and current wobble with the load, `setpoint` never moves.
    fn running(t: i64) -> [(&'static str, f64); 3] {
        let load = 0.5 + 0.4 * (t as f64 / 300.0).sin();
        [
            ("vibration", 1.8 + 1.2 * load),
            ("current", 8.0 + 10.0 * load),
            ("setpoint", 1500.0),
        ]
    }

    fn standing(noise: f64) -> [(&'static str, f64); 3] {
        [
            ("vibration", noise),
            ("current", 2.0 * noise),
            ("setpoint", 1500.0),
        ]
    }

    #[test]
    fn a_stop_is_learned_once_and_later_stops_and_starts_are_gated() {
        let config = RestConfig {
            after_secs: 600,
            settle_secs: 60,
        };
        let mut gate = RestGate::new(config, 8);
        let mut t = 0;
        for _ in 0..3600 {
            assert!(gate.admits(&reading(t, &running(t))), "running at {t}");
            t += 1;
        }
        // The first stop is fed to the detector until it has lasted 600 s.
        let stop = t;
        let mut learned_at = None;
        for i in 0..3600 {
            let noise = 0.01 * ((i * 7919 % 13) as f64 / 13.0);
            if !gate.admits(&reading(t, &standing(noise))) && learned_at.is_none() {
                learned_at = Some(t - stop);
            }
            t += 1;
        }
        assert_eq!(learned_at, Some(600));
        assert_eq!(gate.rests(), 1);
        // A start: the first 60 s settle, then the machine runs.
        let start = t;
        for _ in 0..3600 {
            assert_eq!(gate.admits(&reading(t, &running(t))), t - start >= 60);
            t += 1;
        }
        // The next stop stands from its first reading on, and nothing new is learned.
        for _ in 0..1200 {
            assert!(!gate.admits(&reading(t, &standing(0.0))));
            t += 1;
        }
        assert_eq!(gate.rests(), 1);
    }

    #[test]
    fn one_metric_at_rest_or_a_steady_set_point_is_no_stop() {
        let mut gate = RestGate::new(RestConfig::default(), 8);
        for t in 0..3600 {
            assert!(gate.admits(&reading(t, &running(t))));
        }
        // The current drops to zero while the vibration goes on: an incident, not a stop.
        for t in 3600..9000 {
            let [v, _, s] = running(t);
            assert!(gate.admits(&reading(t, &[v, ("current", 0.0), s])));
        }
        assert_eq!(gate.rests(), 0);
    }

    #[test]
    fn set_points_changed_together_are_no_stop() {
        let mut gate = RestGate::new(RestConfig::default(), 8);
        // Two set points, changed together every two hours, and a metric that follows them.
        for t in 0..6 * 7200 {
            let recipe = [(1500.0, 60.0), (1200.0, 45.0), (1800.0, 70.0)][(t / 7200 % 3) as usize];
            let [(_, v), ..] = running(t);
            let metrics = [("speed", recipe.0), ("target", recipe.1), ("vibration", v)];
            assert!(gate.admits(&reading(t, &metrics)), "at {t}");
        }
        assert_eq!(gate.rests(), 0);
    }

    #[test]
    fn a_machine_first_seen_standing_starts_and_stops_without_an_incident() {
        for noise in [0.0, 0.01] {
            let mut gate = RestGate::new(RestConfig::default(), 8);
            let mut t = 0;
            // Standing is all the gate knows: it is the usual level, fed to the detector.
            for i in 0..3600 {
                let n = noise * ((i * 7919 % 13) as f64 / 6.5 - 1.0);
                assert!(gate.admits(&reading(t, &standing(n))), "standing at {t}");
                t += 1;
            }
            assert_eq!(gate.restarts(), 0);
            // The first start: the detector starts over, then the machine settles and runs.
            let start = t;
            for _ in 0..7200 {
                assert_eq!(
                    gate.admits(&reading(t, &running(t))),
                    t - start >= 60,
                    "{noise}"
                );
                assert_eq!((gate.restarts(), gate.rests()), (1, 0), "{noise}");
                t += 1;
            }
            // The first stop is a rest at once (and the detector starts over, as for a rest
            // learned after `after_secs`).
            assert!(!gate.admits(&reading(t, &standing(0.0))), "{noise}");
            assert_eq!((gate.restarts(), gate.rests()), (2, 1), "{noise}");
        }
    }

    #[test]
    fn counters_at_zero_that_jump_together_are_no_start() {
        // A running machine whose alarm flag and error count jump together: an incident.
        let mut gate = RestGate::new(RestConfig::default(), 8);
        for t in 0..7200 {
            let [v, c, s] = running(t);
            let fault = if t >= 3600 { 1.0 } else { 0.0 };
            gate.admits(&reading(
                t,
                &[v, c, s, ("alarm", fault), ("errors", 3.0 * fault)],
            ));
        }
        assert_eq!((gate.restarts(), gate.rests()), (0, 0));
        // A device of two counters, 0 most of the time: a joint jump may look like a start
        // (the detector would start over once; here the door has opened alone before, so its
        // band is too wide by then), but 0 is their usual level, never a rest.
        // The first openings are held back from the detector (at most TOGETHER_MS each) in
        // case the other counter follows, until the door's usual spread has grown to make an
        // opening no departure: here the first three.
        let mut gate = RestGate::new(RestConfig::default(), 8);
        let mut held = 0;
        for t in 0..86_400 {
            let door = if t % 900 >= 800 { 1.0 } else { 0.0 };
            let errors = if t % 3600 >= 3590 { 2.0 } else { 0.0 };
            if !gate.admits(&reading(t, &[("door", door), ("errors", errors)])) {
                held += 1;
            }
        }
        assert!(gate.restarts() <= 1);
        assert_eq!(gate.rests(), 0);
        assert!(held <= 3 * 121, "{held}");
    }

    #[test]
    fn the_first_start_is_watched_for_a_week() {
        for (days, restarts) in [(6, 1), (8, 0)] {
            let mut gate = RestGate::new(RestConfig::default(), 8);
            let mut t = 0;
            while t < days * 86_400 {
                gate.admits(&reading(t, &standing(0.0)));
                t += 10;
            }
            gate.admits(&reading(t, &running(t)));
            assert_eq!(gate.restarts(), restarts, "standing {days} days");
        }
    }

    #[test]
    fn a_machine_that_slows_down_over_two_minutes_learns_its_rest() {
        // Running at a load cycle (current 9-17 A) for 3,000 s, then spinning down to 0 over
        // 120 s. Judged by the spread the spin-down widened, 0 A was not away from the usual
        // level, and nothing was learned.
        let mut gate = RestGate::new(RestConfig::default(), 8);
        let mut noise = crate::testing::uniform_noise(3);
        for i in 0..4000i64 {
            let spin = ((3000 - i) as f64 / 120.0).clamp(0.0, 1.0);
            let load = 0.5 - 0.4 * (i as f64 * std::f64::consts::TAU / 600.0).cos();
            let (v, c) = (
                1.8 + load + 0.1 * noise(),
                8.0 + 10.0 * load + 0.3 * noise(),
            );
            let metrics = [
                ("temperature", 40.0 + noise()),
                ("vibration", spin * v),
                ("current", spin * c),
            ];
            gate.admits(&reading(i, &metrics));
        }
        assert_eq!(gate.rests(), 1);
    }

    #[test]
    fn learning_can_be_turned_off_and_tracks_are_bounded() {
        let off = RestConfig {
            after_secs: 0,
            settle_secs: 0,
        };
        let mut gate = RestGate::new(off, 2);
        for t in 0..3600 {
            gate.admits(&reading(t, &running(t)));
        }
        for t in 3600..9000 {
            assert!(gate.admits(&reading(t, &standing(0.0))));
        }
        assert_eq!((gate.rests(), gate.tracks.len()), (0, 2));
    }
}
