//! The most recent alert traffic seen on the core (`device/+/alerts` and
//! `device/+/alerts/ack`), kept so that a dashboard opened now can show what happened before it
//! connected (the bridge's `recent_alerts` request, docs/bridge-protocol.md).
//!
//! Alerts are not retained MQTT messages on purpose: a consumer that acts on alerts must not act
//! again on an old one each time it subscribes. This log is the read-only look back instead.
//!
//! The analytics task records what its core subscription delivers, so the log holds vigil's own
//! alerts, alerts devices publish about themselves, alerts from other instances of a cluster
//! (imported into this core) and acknowledgements, in the order the core delivered them.
//! Without the analytics task (`analytics.enabled = false`) it stays empty.
//!
//! With `[persistence] dir`, the log is saved there as [`FILE`] (the layout of `edge::snapshot`:
//! one record of topic, payload and receive time per message) every `autosave_interval_secs`
//! when it changed and at shutdown, and read back at start, so a restart keeps it (up to the
//! last save after a crash). Without it, a restart starts it empty.
//!
//! Bounds: at most [`MAX_ENTRIES`] messages and [`MAX_BYTES`] of payload and topic together; the
//! oldest go first. A message over [`MAX_ENTRY_BYTES`] is not kept (it was delivered live as
//! usual) and is counted in `vigil_alert_log_refused_total`.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use bytes::Bytes;

use crate::edge::snapshot::{self, SnapshotError};
use crate::metrics::Metrics;

/// Messages kept at most.
pub const MAX_ENTRIES: usize = 1000;
/// Bytes of topics and payloads kept at most.
pub const MAX_BYTES: usize = 1024 * 1024;
/// Largest topic plus payload kept; vigil's alerts are about 400 bytes.
pub const MAX_ENTRY_BYTES: usize = 8 * 1024;
/// The log's file in `[persistence] dir`.
pub const FILE: &str = "alerts.bin";
/// The file's first line; the number is the format version.
const FILE_HEADER: &[u8] = b"vigil alert log 1\n";

/// One message of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub topic: String,
    pub payload: Bytes,
    /// When this process received it (Unix ms).
    pub received_ms: i64,
}

impl Entry {
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct AlertLog {
    inner: Mutex<Inner>,
    /// Messages recorded since start: moves whenever a save would write something new.
    changes: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl AlertLog {
    /// Whether `topic` is alert traffic this log keeps: `device/<id>/alerts` or
    /// `device/<id>/alerts/ack`.
    pub fn wants(topic: &[u8]) -> bool {
        topic.starts_with(b"device/")
            && (topic.ends_with(b"/alerts") || topic.ends_with(b"/alerts/ack"))
    }

    /// Keeps a copy of a message, dropping the oldest ones beyond the bounds. Returns false
    /// when the message is empty (a retained-message clear) or over [`MAX_ENTRY_BYTES`]: not
    /// kept. The payload is copied, never kept as a slice: that would keep alive the whole read
    /// buffer it came in, and the byte bound would not hold.
    pub fn record(&self, topic: &str, payload: &[u8], received_ms: i64) -> bool {
        let size = topic.len() + payload.len();
        if payload.is_empty() || size > MAX_ENTRY_BYTES {
            return false;
        }
        let entry = Entry {
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(payload),
            received_ms,
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while inner.entries.len() >= MAX_ENTRIES || inner.bytes + size > MAX_BYTES {
            match inner.entries.pop_front() {
                Some(old) => inner.bytes -= old.size(),
                None => break,
            }
        }
        inner.bytes += size;
        inner.entries.push_back(entry);
        self.changes.fetch_add(1, Relaxed);
        true
    }

    /// The newest `limit` messages whose topic `keep` accepts, oldest first.
    pub fn recent(&self, limit: usize, mut keep: impl FnMut(&str) -> bool) -> Vec<Entry> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Entry> = inner
            .entries
            .iter()
            .rev()
            .filter(|e| keep(&e.topic))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Writes every message to [`FILE`] in `dir` (see `edge::snapshot`) and returns how many.
    /// The messages are copied out first (their payloads are shared, not copied), so the lock
    /// is held only for that. Blocking: run it off the async threads.
    pub fn save(&self, dir: &Path) -> Result<usize, SnapshotError> {
        let entries: Vec<Entry> = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.entries.iter().cloned().collect()
        };
        let mut out = snapshot::Writer::create(dir, FILE, FILE_HEADER)?;
        for e in &entries {
            out.record(&[e.topic.as_bytes(), &e.payload, &e.received_ms.to_be_bytes()])?;
        }
        Ok(out.finish()? as usize)
    }

    /// Reads [`FILE`] in `dir` into the log (after what it holds, within the same bounds) and
    /// returns the messages kept (0 when there is no file). A damaged file adds nothing; a
    /// record that is not alert traffic is skipped.
    pub fn load(&self, dir: &Path) -> Result<usize, SnapshotError> {
        let mut kept = 0;
        snapshot::read(dir, FILE, FILE_HEADER, 3, |record| {
            let (Ok(topic), Ok(ms)) = (
                std::str::from_utf8(record[0]),
                <[u8; 8]>::try_from(record[2]),
            ) else {
                return;
            };
            if Self::wants(topic.as_bytes())
                && self.record(topic, record[1], i64::from_be_bytes(ms))
            {
                kept += 1;
            }
        })?;
        Ok(kept)
    }

    /// Messages and bytes held now.
    #[cfg(test)]
    fn len_and_bytes(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.entries.len(), inner.bytes)
    }
}

impl snapshot::Persisted for AlertLog {
    const WHAT: &'static str = "alert log";

    fn changes(&self) -> u64 {
        self.changes.load(Relaxed)
    }

    fn save(&self, dir: &Path) -> Result<usize, SnapshotError> {
        AlertLog::save(self, dir)
    }

    fn counters(metrics: &Metrics) -> (&AtomicU64, &AtomicU64) {
        (&metrics.alert_log_saves, &metrics.alert_log_save_failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.topic.as_str()).collect()
    }

    #[test]
    fn keeps_the_newest_in_order_and_filters() {
        let log = AlertLog::default();
        for (i, t) in ["device/a/alerts", "device/b/alerts", "device/a/alerts/ack"]
            .iter()
            .enumerate()
        {
            assert!(log.record(t, b"{}", i as i64));
        }
        assert_eq!(
            topics(&log.recent(10, |_| true)),
            ["device/a/alerts", "device/b/alerts", "device/a/alerts/ack"]
        );
        assert_eq!(
            topics(&log.recent(1, |_| true)),
            ["device/a/alerts/ack"],
            "the newest"
        );
        assert_eq!(
            topics(&log.recent(10, |t| t.starts_with("device/a/"))),
            ["device/a/alerts", "device/a/alerts/ack"]
        );
        assert!(AlertLog::wants(b"device/a/alerts"));
        assert!(AlertLog::wants(b"device/a/alerts/ack"));
        assert!(!AlertLog::wants(b"device/a/telemetry"));
        assert!(!AlertLog::wants(b"plant/a/alerts"));
    }

    #[test]
    fn a_saved_log_is_read_back_in_order_and_a_damaged_file_adds_nothing() {
        use crate::edge::snapshot::{Persisted, TestDir};
        let dir = TestDir::new("alert_log");
        let log = AlertLog::default();
        assert_eq!(log.load(&dir).expect("no file"), 0);
        let before = Persisted::changes(&log);
        log.record("device/a/alerts", br#"{"severity":"LOW"}"#, 11);
        log.record("device/a/alerts/ack", b"\x00\xffbinary", 12);
        assert_eq!(Persisted::changes(&log), before + 2);
        assert_eq!(log.save(&dir).expect("save"), 2);

        let back = AlertLog::default();
        assert_eq!(back.load(&dir).expect("load"), 2);
        assert_eq!(back.recent(10, |_| true), log.recent(10, |_| true));

        let path = dir.join(FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 20;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let damaged = AlertLog::default();
        assert!(matches!(
            damaged.load(&dir),
            Err(SnapshotError::Corrupt { .. })
        ));
        assert!(damaged.recent(10, |_| true).is_empty());
    }

    #[test]
    fn stays_within_its_bounds() {
        let log = AlertLog::default();
        for i in 0..MAX_ENTRIES + 10 {
            log.record("device/a/alerts", format!("{i}").as_bytes(), 0);
        }
        let (n, _) = log.len_and_bytes();
        assert_eq!(n, MAX_ENTRIES);
        assert_eq!(
            log.recent(1, |_| true)[0].payload,
            format!("{}", MAX_ENTRIES + 9)
        );

        let log = AlertLog::default();
        let big = vec![b'x'; MAX_ENTRY_BYTES - "device/a/alerts".len()];
        for _ in 0..MAX_BYTES / MAX_ENTRY_BYTES + 5 {
            assert!(log.record("device/a/alerts", &big, 0));
        }
        let (n, bytes) = log.len_and_bytes();
        assert!(bytes <= MAX_BYTES, "{bytes}");
        assert_eq!(n, MAX_BYTES / MAX_ENTRY_BYTES);

        assert!(!log.record("device/a/alerts", &[b'x'; MAX_ENTRY_BYTES], 0));
        assert!(!log.record("device/a/alerts", b"", 0));
    }
}
