//! The silence watch: a device that stops reporting.
//!
//! A device whose firmware hangs, whose sensor bus dies or whose network drops without a clean
//! disconnect sends nothing at all, so nothing reaches the detector. The watch remembers when
//! the device's last messages arrived (the receiving server's clock, not the device's) and calls
//! the device silent when nothing has arrived for `factor` times its usual interval between
//! messages (the median of its last `GAPS` intervals), and at least `min_ms`, and for longer
//! than its routine quiet spells: at most `ROUTINE_GAPS - 1` of its intervals of the last day
//! (12 to 24 hours) may have been as long, to within a factor of two. A device that reports by
//! exception (only when a value changes) is quiet for long spells whenever its process is
//! steady; the median alone called each of them a silence. A device is only judged once `GAPS`
//! intervals are known, and each silence is reported once: the watch re-arms when the device
//! reports again. A device that said it is going offline is excused ([`SilenceWatch::excuse`])
//! until then. O(1) per message; a check costs a median of 16 numbers and a sum of 64 counts,
//! and only once the device has been quiet for `min_ms`. 224 bytes per device.

use crate::alert::{AlertKind, AlertMessage, Severity};

/// Message intervals the usual interval is the median of.
pub const GAPS: usize = 16;

/// Interval lengths are counted by powers of two of milliseconds: bucket `b` holds the intervals
/// from 2^b to 2^(b+1) ms (the last one, every longer interval).
const BUCKETS: usize = 32;

/// The interval counts cover the current window of this length and the previous one.
const WINDOW_MS: i64 = 12 * 3_600_000;

/// A quiet spell is the device's routine, not a silence, while this many of its intervals of
/// the last day fell in the spell's bucket or a longer one.
pub const ROUTINE_GAPS: u32 = 3;

/// The bucket of an interval of `ms` milliseconds.
fn bucket(ms: i64) -> usize {
    let ms = u64::try_from(ms.max(1)).unwrap_or(1);
    (ms.ilog2() as usize).min(BUCKETS - 1)
}

/// The `metric` of a silence alert: the device's telemetry as a whole.
pub const SILENCE_METRIC: &str = "telemetry";

/// The operator action a silence alert suggests.
pub const SILENCE_ACTION: &str = "check the device, its power and its network connection";

/// When a device counts as silent; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SilenceRule {
    /// How many usual intervals without a message make a device silent (0: never).
    pub factor: u32,
    /// The shortest silence reported, in milliseconds.
    pub min_ms: i64,
}

/// A silence found by [`SilenceWatch::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    /// Milliseconds since the device's last message.
    pub silent_ms: i64,
    /// The device's usual interval between messages, in milliseconds.
    pub usual_ms: i64,
}

impl Silence {
    /// The alert to publish on `device/<id>/alerts` for this silence, found at `now_ms`.
    pub fn to_alert(&self, device_id: &str, now_ms: i64) -> AlertMessage {
        let secs = self.silent_ms as f64 / 1000.0;
        let usual = self.usual_ms as f64 / 1000.0;
        let mut alert = AlertMessage::new(
            device_id,
            Severity::Medium,
            AlertKind::Anomaly,
            SILENCE_METRIC,
            secs,
            1.0,
            format!(
                "no telemetry for {secs:.0} s; the device usually reports every {usual} s \
                 (device, power or network down?)"
            ),
            now_ms,
        );
        alert.action = SILENCE_ACTION.to_string();
        alert
    }
}

/// When one device's messages arrived.
#[derive(Debug, Clone, Default)]
pub struct SilenceWatch {
    last_ms: Option<i64>,
    /// The last intervals between messages, in milliseconds (a ring).
    gaps: [u32; GAPS],
    filled: u8,
    next: u8,
    reported: bool,
    /// Intervals per bucket: this window's (`[0]`) and the previous one's.
    spells: [[u16; BUCKETS]; 2],
    /// When this window began.
    window_ms: i64,
}

impl SilenceWatch {
    /// A message of the device arrived at `now_ms`.
    pub fn note(&mut self, now_ms: i64) {
        if let Some(last) = self.last_ms {
            let gap = now_ms.saturating_sub(last).clamp(0, i64::from(u32::MAX));
            // Clamped into u32's range just above.
            self.gaps[usize::from(self.next)] = u32::try_from(gap).unwrap_or(u32::MAX);
            self.next = (self.next + 1) % GAPS as u8;
            self.filled = (self.filled + 1).min(GAPS as u8);
            if now_ms.saturating_sub(self.window_ms) >= WINDOW_MS {
                self.spells[1] = match now_ms.saturating_sub(self.window_ms) < 2 * WINDOW_MS {
                    true => self.spells[0],
                    false => [0; BUCKETS],
                };
                self.spells[0] = [0; BUCKETS];
                self.window_ms = now_ms;
            }
            let counted = &mut self.spells[0][bucket(gap)];
            *counted = counted.saturating_add(1);
        }
        self.last_ms = Some(self.last_ms.map_or(now_ms, |l| l.max(now_ms)));
        self.reported = false;
    }

    /// When the device's last message arrived (`None`: none since the watch was made or
    /// forgotten).
    pub fn last_ms(&self) -> Option<i64> {
        self.last_ms
    }

    /// The device said it is going offline (its `status`): the silence that follows is not
    /// reported. Its next message re-arms the watch.
    pub fn excuse(&mut self) {
        self.reported = true;
    }

    /// Forgets the device's timing (it now reports through another instance): it is not
    /// judged until it has sent `GAPS` more intervals here.
    pub fn forget(&mut self) {
        *self = Self::default();
    }

    /// The device's usual interval between messages, once `GAPS` are known (at least 1 ms).
    pub fn usual_ms(&self) -> Option<i64> {
        if usize::from(self.filled) < GAPS {
            return None;
        }
        let mut gaps = self.gaps;
        let (_, median, _) = gaps.select_nth_unstable(GAPS / 2);
        Some(i64::from(*median).max(1))
    }

    /// The silence to report at `now_ms` under `rule`, if the device has just become silent;
    /// `None` otherwise, and for the rest of a silence already reported.
    pub fn check(&mut self, rule: &SilenceRule, now_ms: i64) -> Option<Silence> {
        if rule.factor == 0 || self.reported {
            return None;
        }
        let silent_ms = now_ms.saturating_sub(self.last_ms?);
        if silent_ms < rule.min_ms {
            return None;
        }
        let usual_ms = self.usual_ms()?;
        if silent_ms < usual_ms.saturating_mul(i64::from(rule.factor)) {
            return None;
        }
        let as_long: u32 = self
            .spells
            .iter()
            .flat_map(|w| &w[bucket(silent_ms)..])
            .map(|&c| u32::from(c))
            .sum();
        if as_long >= ROUTINE_GAPS {
            return None;
        }
        self.reported = true;
        Some(Silence {
            silent_ms,
            usual_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: SilenceRule = SilenceRule {
        factor: 10,
        min_ms: 60_000,
    };

    #[test]
    fn a_device_that_stops_is_reported_once_per_silence() {
        let mut w = SilenceWatch::default();
        // Every 200 ms; not judged before 16 intervals are known.
        for i in 0..16 {
            w.note(i * 200);
            assert_eq!(w.check(&RULE, i * 200 + 100_000), None, "message {i}");
        }
        w.note(16 * 200);
        assert_eq!(w.usual_ms(), Some(200));
        // Quiet for less than the minimum: not yet.
        assert_eq!(w.check(&RULE, 16 * 200 + 59_999), None);
        let found = w.check(&RULE, 16 * 200 + 60_000);
        assert_eq!(
            found,
            Some(Silence {
                silent_ms: 60_000,
                usual_ms: 200
            })
        );
        assert_eq!(w.check(&RULE, 16 * 200 + 120_000), None, "reported once");
        let alert = found.map(|s| s.to_alert("m1", 63_200));
        assert!(alert.is_some_and(|a| a.metric == "telemetry"
            && a.value == 60.0
            && a.message
                .starts_with("no telemetry for 60 s; the device usually reports every 0.2 s")));
        // It comes back and stops again: a second silence.
        w.note(200_000);
        assert_eq!(w.check(&RULE, 259_999), None);
        assert!(w.check(&RULE, 260_000).is_some());
    }

    #[test]
    fn a_slow_device_gets_factor_times_its_interval_and_off_means_off() {
        let mut w = SilenceWatch::default();
        let five_min = 300_000;
        for i in 0..=16 {
            w.note(i * five_min);
        }
        let last = 16 * five_min;
        assert_eq!(w.check(&RULE, last + 10 * five_min - 1), None);
        assert!(w.check(&RULE, last + 10 * five_min).is_some());
        let mut off = SilenceWatch::default();
        for i in 0..=16 {
            off.note(i * 1000);
        }
        let never = SilenceRule { factor: 0, ..RULE };
        assert_eq!(off.check(&never, i64::MAX), None);
        off.forget();
        assert_eq!(off.check(&RULE, i64::MAX), None);
        // A device that announced it is going offline is not reported, until it reports again.
        let mut said = SilenceWatch::default();
        for i in 0..=16 {
            said.note(i * 1000);
        }
        said.excuse();
        assert_eq!(said.check(&RULE, 1_000_000), None);
        said.note(1_000_000);
        assert!(said.check(&RULE, 2_000_000).is_some());
        assert_eq!(std::mem::size_of::<SilenceWatch>(), 224);
    }

    #[test]
    fn quiet_spells_a_device_has_every_day_are_not_silences_a_longer_one_is() {
        // Reports by exception: a burst of 20 messages 2 s apart when its value changes, then
        // 20 minutes without any, all day long.
        let mut w = SilenceWatch::default();
        let spell = 20 * 60_000;
        let mut t = 0;
        let mut reported = Vec::new();
        for cycle in 0..72 {
            for _ in 0..20 {
                w.note(t);
                t += 2000;
            }
            t -= 2000;
            // Checked every second of the spell, as the live task does.
            if (1..=spell / 1000).any(|s| w.check(&RULE, t + s * 1000).is_some()) {
                reported.push(cycle);
            }
            t += spell;
        }
        // The median interval is 2 s: without the day's spells every one was a silence.
        assert_eq!(reported, vec![0, 1, 2], "cycles with a silence reported");
        // An outage: reported once it is longer than the spells by more than their bucket.
        w.note(t);
        let found = (1..=4 * 3600)
            .find(|&s| w.check(&RULE, t + s * 1000).is_some())
            .map(|s| s * 1000);
        assert!(
            found.is_some_and(|ms| ms > spell && ms <= 4 * spell),
            "{found:?}"
        );
    }
}
