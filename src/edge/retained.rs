//! The retained messages, kept by the edge rather than by the core.
//!
//! rumqttd sends a new subscription at most one router pass of retained messages (100 at
//! QoS 1/2, `core.max_outgoing_packet_count` at QoS 0) and silently drops the rest, so a
//! dashboard subscribing to `device/+/status` over 300 devices saw a third of them. The edge
//! therefore stores every retained message itself, sends the core only plain publishes, and
//! delivers the matching ones once the core has granted a subscription (the relay's
//! `send_retained`, in `connection`).
//!
//! A message is kept as the core would have held it: the envelope header (which records that
//! the publisher set RETAIN, its QoS, expiry and properties) followed by the payload. The store
//! is bounded by `limits.max_retained_bytes`; a message counts its topic, its stored payload and
//! [`RETAINED_ENTRY_OVERHEAD`].
//!
//! With `[persistence] dir`, the store is saved to [`FILE`] there (`save`, by `autosave` and
//! at shutdown) and read back at start (`load`), so retained messages survive a restart.
//! The file is a `snapshot` file whose records are (topic, stored payload): the envelope is
//! included, so expiry instants and properties come back as they were.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::snapshot::{self, SnapshotError};
use crate::metrics::Metrics;
use crate::{envelope, mqtt};

/// The file the retained messages are saved to, in `[persistence] dir`.
pub const FILE: &str = "retained.bin";
/// The first line of [`FILE`]; the number is the format (and envelope) version.
pub const FILE_HEADER: &[u8] = b"vigil retained messages 1\n";
/// Messages copied out of the store at a time while saving (the store is locked meanwhile).
const SAVE_CHUNK: usize = 4096;

/// What each retained message counts beyond its topic and stored payload: about what this map
/// spends per entry, so the cap also bounds the number of entries.
pub const RETAINED_ENTRY_OVERHEAD: usize = 64;

/// The retained messages by topic, up to a total size (`limits.max_retained_bytes`).
#[derive(Debug)]
pub struct RetainedStore {
    max: usize,
    state: Mutex<State>,
    /// Expired messages the full-store sweep removed and nobody has counted yet
    /// (`take_swept`).
    swept: AtomicU64,
}

/// The store's size after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Bytes counted against the cap.
    pub bytes: usize,
    pub messages: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Topic → envelope header and payload. Ordered, so a filter whose first levels are plain
    /// names is matched against the topics under that prefix only.
    messages: BTreeMap<Bytes, Entry>,
    total: usize,
    /// The number of the last message stored (`Entry::seq`).
    seq: u64,
    /// Counts changes, so a save can tell whether there is anything new.
    changes: u64,
    /// When the store, full, last looked for expired messages to make room (`set`).
    last_sweep: Option<std::time::Instant>,
}

/// A stored message: envelope header and payload, and when it was stored, as a count of the
/// messages stored since start (a subscriber's replay leaves out those stored after its
/// SUBACK: it gets them live).
#[derive(Debug)]
struct Entry {
    stored: Bytes,
    seq: u64,
}

/// One retained message, as handed to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    pub topic: Bytes,
    /// Envelope header and payload, as a core delivery carries them.
    pub payload: Bytes,
}

impl State {
    fn totals(&self) -> Totals {
        Totals {
            bytes: self.total,
            messages: self.messages.len(),
        }
    }

    fn remove(&mut self, topic: &[u8]) {
        if let Some(entry) = self.messages.remove(topic) {
            self.total -= size(topic, entry.stored.len());
            self.changes += 1;
        }
    }

    /// Removes the messages expired at `now` (Unix milliseconds); returns how many.
    fn purge_expired(&mut self, now: u64) -> usize {
        let before = self.messages.len();
        let mut freed = 0;
        self.messages.retain(|topic, entry| {
            let keep = !expired(&entry.stored, now);
            if !keep {
                freed += size(topic, entry.stored.len());
            }
            keep
        });
        self.total -= freed;
        let purged = before - self.messages.len();
        self.changes += purged as u64;
        purged
    }
}

/// How often, at most, a full store looks for expired messages to make room.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

fn size(topic: &[u8], stored: usize) -> usize {
    topic.len() + stored + RETAINED_ENTRY_OVERHEAD
}

impl RetainedStore {
    pub fn new(max: usize) -> RetainedStore {
        RetainedStore {
            max,
            state: Mutex::new(State::default()),
            swept: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `topic`'s retained message, the concatenation of `parts` (envelope header and
    /// payload), replacing the one before; no bytes at all clear it instead. Refused (returns
    /// false, the one before is kept) when it would take the store past its cap, unless it
    /// is no larger than the one it replaces. Also returns the store's totals after the call.
    pub fn set(&self, topic: &[u8], parts: &[&[u8]]) -> (bool, Totals) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut state = self.lock();
        if len == 0 {
            state.remove(topic);
            return (true, state.totals());
        }
        let new = size(topic, len);
        // The size of the message `new` replaces, and whether `new` fits in its place.
        let replaced = |state: &State| {
            state
                .messages
                .get(topic)
                .map_or(0, |m| size(topic, m.stored.len()))
        };
        let fits = |state: &State, old: usize| new <= old || state.total - old + new <= self.max;
        let mut old = replaced(&state);
        if !fits(&state, old) {
            // Expired messages are removed as they are met (`page`); a full store also looks
            // for them all, at most once a second, before it refuses.
            let now = std::time::Instant::now();
            if state.last_sweep.is_some_and(|at| now - at < SWEEP_EVERY) {
                return (false, state.totals());
            }
            state.last_sweep = Some(now);
            let purged = state.purge_expired(envelope::unix_millis());
            self.swept.fetch_add(purged as u64, Relaxed);
            old = replaced(&state);
            if !fits(&state, old) {
                return (false, state.totals());
            }
        }
        state.total = state.total - old + new;
        state.changes += 1;
        let mut stored = BytesMut::with_capacity(len);
        for part in parts {
            stored.extend_from_slice(part);
        }
        state.seq += 1;
        let entry = Entry {
            stored: stored.freeze(),
            seq: state.seq,
        };
        match state.messages.get_mut(topic) {
            Some(slot) => *slot = entry,
            // A copy: `topic` may be a slice of a client's read buffer.
            None => {
                state.messages.insert(Bytes::copy_from_slice(topic), entry);
            }
        }
        (true, state.totals())
    }

    /// The expired messages the full-store sweep removed since the last call.
    pub fn take_swept(&self) -> u64 {
        self.swept.swap(0, Relaxed)
    }

    /// Up to `max` of the retained messages `filter` matches, in topic order, after the topic
    /// `after` (from the first when `None`). A shared subscription's filter matches like the
    /// filter inside it. A subscriber reads them page by page, so it holds a position, not a
    /// copy of the store; a message stored or replaced behind that position reaches it as a
    /// live publish instead, and so does one stored after the subscriber's SUBACK: a page
    /// leaves out the messages stored after number `upto` (`last_stored` when the SUBACK was
    /// read), which the subscription receives from the core. A page walks the topics that
    /// share the filter's leading plain levels (all of them for a filter that starts with a
    /// wildcard) from `after` on, at most [`PAGE_SCAN`] of them, under the store's lock,
    /// copying nothing but reference counts; so a page may be short, or empty, and still not
    /// be the last.
    pub fn page(&self, filter: &[u8], after: Option<&[u8]>, max: usize, upto: u64) -> Page {
        let mut page = Page::default();
        let Some(inner) = mqtt::unshared(filter) else {
            return page;
        };
        let prefix = plain_prefix(inner);
        let from = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let now = envelope::unix_millis();
        let mut expired_topics = Vec::new();
        let mut state = self.lock();
        let range = state.messages.range::<[u8], _>((from, Bound::Unbounded));
        for (scanned, (topic, entry)) in range.enumerate() {
            if !topic.starts_with(prefix) {
                break;
            }
            if page.messages.len() == max {
                page.next = page.messages.last().map(|m| m.topic.clone());
                break;
            }
            if scanned == PAGE_SCAN {
                // Go on after the last topic looked at.
                page.next = Some(previous(&state.messages, topic));
                break;
            }
            if entry.seq > upto || !mqtt::filter_matches(filter, topic) {
                continue;
            }
            if expired(&entry.stored, now) {
                expired_topics.push(topic.clone());
                continue;
            }
            page.messages.push(Retained {
                topic: topic.clone(),
                payload: entry.stored.clone(),
            });
        }
        page.expired = expired_topics.len();
        for topic in expired_topics {
            state.remove(&topic);
        }
        page
    }
}

impl RetainedStore {
    /// Changes since start (stores, replacements and clears).
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// The number of the last message stored: a page asked for `upto` it leaves out those
    /// stored later (`page`).
    pub fn last_stored(&self) -> u64 {
        self.lock().seq
    }

    /// The store's size.
    pub fn totals(&self) -> Totals {
        self.lock().totals()
    }

    /// Up to `max` messages after the topic `after` (from the first when `None`), whatever
    /// their topics.
    fn chunk(&self, after: Option<&[u8]>, max: usize) -> Vec<(Bytes, Bytes)> {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let state = self.lock();
        state
            .messages
            .range::<[u8], _>((from, Bound::Unbounded))
            .take(max)
            .map(|(t, e)| (t.clone(), e.stored.clone()))
            .collect()
    }

    /// Writes every message not expired to [`FILE`] in `dir` (see `snapshot`) and returns
    /// how many. Copies out of the store a chunk at a time, so publishers wait for the lock
    /// no longer than a chunk takes; a message changed meanwhile is saved in one version or
    /// the other. Blocking: run it off the async threads.
    pub fn save(&self, dir: &Path) -> Result<usize, SnapshotError> {
        let mut out = snapshot::Writer::create(dir, FILE, FILE_HEADER)?;
        let mut after: Option<Bytes> = None;
        let now = envelope::unix_millis();
        loop {
            let chunk = self.chunk(after.as_deref(), SAVE_CHUNK);
            for (topic, payload) in &chunk {
                if !expired(payload, now) {
                    out.record(&[topic, payload])?;
                }
            }
            match chunk.last() {
                Some((topic, _)) if chunk.len() == SAVE_CHUNK => after = Some(topic.clone()),
                _ => break,
            }
        }
        Ok(out.finish()? as usize)
    }

    /// Reads [`FILE`] in `dir` into the store; returns the messages stored and those that did
    /// not fit under the cap (`Ok((0, 0))` when there is no file); those expired meanwhile
    /// are left out. A damaged file stores nothing.
    pub fn load(&self, dir: &Path) -> Result<(usize, usize), SnapshotError> {
        let (mut loaded, mut refused) = (0, 0);
        let now = envelope::unix_millis();
        snapshot::read(dir, FILE, FILE_HEADER, 2, |record| {
            let (topic, payload) = (record[0], record[1]);
            // The writer never writes these; a digest that matches says nobody else did.
            if topic.is_empty() || payload.is_empty() || expired(payload, now) {
                return;
            }
            match self.set(topic, &[payload]).0 {
                true => loaded += 1,
                false => refused += 1,
            }
        })?;
        Ok((loaded, refused))
    }
}

impl snapshot::Persisted for RetainedStore {
    const WHAT: &'static str = "retained messages";

    fn changes(&self) -> u64 {
        RetainedStore::changes(self)
    }

    fn save(&self, dir: &Path) -> Result<usize, SnapshotError> {
        RetainedStore::save(self, dir)
    }

    fn counters(metrics: &Metrics) -> (&AtomicU64, &AtomicU64) {
        (&metrics.retained_saves, &metrics.retained_save_failures)
    }
}

/// Whether a stored payload's message has expired at `now` (Unix milliseconds).
fn expired(payload: &[u8], now: u64) -> bool {
    envelope::expires_at_of(payload).is_some_and(|at| at <= now)
}

/// Topics a page looks at, at most, while it holds the store's lock.
pub const PAGE_SCAN: usize = 4096;

/// What [`RetainedStore::page`] read.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<Retained>,
    /// Where the next page starts (after this topic); `None`: this was the last.
    pub next: Option<Bytes>,
    /// Matching messages found expired, and removed from the store.
    pub expired: usize,
}

/// The topic stored just before `topic` (which is stored), or an empty one when it is the
/// first: the next page then starts at `topic`.
fn previous(messages: &BTreeMap<Bytes, Entry>, topic: &Bytes) -> Bytes {
    messages
        .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(&topic[..])))
        .next_back()
        .map_or_else(Bytes::new, |(t, _)| t.clone())
}

/// The leading levels of `filter` that hold no wildcard, without the `/` after them: every
/// topic the filter matches starts with them (`a/#` also matches `a`).
fn plain_prefix(filter: &[u8]) -> &[u8] {
    let mut end = 0;
    for (i, &b) in filter.iter().enumerate() {
        match b {
            b'+' | b'#' => break,
            b'/' => end = i,
            _ => {}
        }
    }
    if !filter.contains(&b'+') && !filter.contains(&b'#') {
        // No wildcard at all: the topic is the filter.
        return filter;
    }
    &filter[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(r: &RetainedStore, filter: &str) -> Vec<String> {
        let page = r.page(filter.as_bytes(), None, usize::MAX, u64::MAX);
        assert!(page.next.is_none());
        page.messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.topic).into_owned())
            .collect()
    }

    #[test]
    fn retained_bytes_are_counted_per_topic_up_to_the_cap() {
        let o = RETAINED_ENTRY_OVERHEAD;
        let r = RetainedStore::new(2 * (1 + 100 + o));
        let p100 = [7u8; 99];
        let set = |topic: &[u8], parts: &[&[u8]]| {
            let (kept, totals) = r.set(topic, parts);
            (kept, totals.bytes)
        };
        assert_eq!(set(b"a", &[b"h", &p100]), (true, 1 + 100 + o));
        assert_eq!(set(b"b", &[b"h", &p100]), (true, 2 * (1 + 100 + o)));
        assert!(!r.set(b"c", &[b"h", b"x"]).0, "a new topic over the cap");
        assert!(!r.set(b"a", &[b"h", &[7u8; 100]]).0, "a larger replacement");
        assert_eq!(
            set(b"a", &[b"h", &[7u8; 39]]),
            (true, (1 + 40 + o) + (1 + 100 + o)),
            "a smaller replacement frees the difference"
        );
        assert_eq!(set(b"a", &[]), (true, 1 + 100 + o), "a clear");
        assert_eq!(set(b"never", &[]), (true, 1 + 100 + o));
        let (kept, totals) = r.set(b"c", &[b"h", &p100]);
        assert!(kept, "room again");
        assert_eq!(totals.messages, 2);
    }

    #[test]
    fn a_refused_message_keeps_the_one_before() {
        let r = RetainedStore::new(200);
        assert!(r.set(b"t", &[b"h", b"old"]).0);
        assert!(!r.set(b"t", &[b"h", &[1u8; 300]]).0);
        let m = r.page(b"t", None, 10, u64::MAX).messages;
        assert_eq!(m[0].payload, Bytes::from_static(b"hold"));
    }

    #[test]
    fn the_store_keeps_a_copy_not_the_clients_buffer() {
        let r = RetainedStore::new(1 << 20);
        let packet = Bytes::from(vec![b'x'; 4096]);
        r.set(&packet[..8], &[b"h", &packet[8..16]]);
        let m = r.page(b"#", None, 10, u64::MAX).messages;
        assert!(!std::ptr::eq(m[0].topic.as_ptr(), packet.as_ptr()));
        assert_eq!(m[0].payload.len(), 9);
    }

    #[test]
    fn matching_follows_the_filter_rules() {
        let r = RetainedStore::new(1 << 20);
        for t in [
            "a", "a/b", "a/b/c", "a/c", "ab/c", "b/b", "/x", "$SYS/x", "a/", "dev/1/s", "dev/2/s",
            "dev/2/t",
        ] {
            r.set(t.as_bytes(), &[b"h", b"v"]);
        }
        let m = |f: &str| all(&r, f);
        assert_eq!(m("a/b"), ["a/b"]);
        assert_eq!(m("a/+"), ["a/", "a/b", "a/c"]);
        assert_eq!(m("a/#"), ["a", "a/", "a/b", "a/b/c", "a/c"]);
        assert_eq!(m("+/b"), ["a/b", "b/b"]);
        assert_eq!(m("dev/+/s"), ["dev/1/s", "dev/2/s"]);
        assert_eq!(m("+/+"), ["/x", "a/", "a/b", "a/c", "ab/c", "b/b"]);
        assert_eq!(m("#").len(), 11, "a wildcard never matches a $ topic");
        assert_eq!(m("$SYS/#"), ["$SYS/x"]);
        assert_eq!(m("$share/g/dev/+/s"), ["dev/1/s", "dev/2/s"]);
        assert!(m("$share/g").is_empty(), "a malformed shared filter");
        assert!(m("zzz").is_empty());
    }

    /// Reads every page of `filter`, `max` at a time; returns the topics and the pages read.
    fn read_all(r: &RetainedStore, filter: &[u8], max: usize) -> (Vec<Bytes>, usize) {
        let (mut topics, mut pages, mut after) = (Vec::new(), 0, None::<Bytes>);
        loop {
            let page = r.page(filter, after.as_deref(), max, u64::MAX);
            pages += 1;
            topics.extend(page.messages.into_iter().map(|m| m.topic));
            match page.next {
                Some(next) => after = Some(next),
                None => return (topics, pages),
            }
        }
    }

    #[test]
    fn pages_continue_after_the_last_topic_read() {
        let r = RetainedStore::new(1 << 20);
        for i in 0..10 {
            r.set(format!("t/{i}").as_bytes(), &[b"h", b"v"]);
        }
        r.set(b"s/1", &[b"h", b"v"]);
        r.set(b"u/1", &[b"h", b"v"]);
        let first = r.page(b"t/+", None, 4, u64::MAX);
        assert_eq!(first.messages.len(), 4);
        // Stored behind the position: not in a later page (it goes out live).
        r.set(b"t/0a", &[b"h", b"v"]);
        let (rest, pages) = read_all(&r, b"t/+", 4);
        assert_eq!((rest.len(), pages), (11, 3), "read again from the start");
        let second = r.page(b"t/+", first.next.as_deref(), 4, u64::MAX);
        let third = r.page(b"t/+", second.next.as_deref(), 4, u64::MAX);
        assert_eq!(third.messages.len(), 2);
        assert!(third.next.is_none());
        let seen: Vec<_> = [first.messages, second.messages, third.messages].concat();
        assert_eq!(seen.len(), 10);
        assert!(seen.windows(2).all(|w| w[0].topic < w[1].topic));
        assert!(!seen.iter().any(|m| &m.topic[..] == b"t/0a"));
        assert_eq!(r.page(b"t/3", None, 4, u64::MAX).messages.len(), 1);
        assert!(r
            .page(b"t/3", Some(b"t/3"), 4, u64::MAX)
            .messages
            .is_empty());
    }

    #[test]
    fn a_page_looks_at_a_bounded_number_of_topics() {
        let r = RetainedStore::new(1 << 30);
        let n = 3 * PAGE_SCAN + 10;
        for i in 0..n {
            r.set(format!("a/{i:06}/x").as_bytes(), &[b"h", b"v"]);
        }
        r.set(b"a/999999/y", &[b"h", b"v"]);
        r.set(b"a/000000/y", &[b"h", b"v"]);
        let first = r.page(b"+/+/y", None, 64, u64::MAX);
        assert_eq!(
            first.messages.len(),
            1,
            "only a/000000/y within the first scan"
        );
        assert!(first.next.is_some());
        let (topics, pages) = read_all(&r, b"+/+/y", 64);
        assert_eq!(topics, [&b"a/000000/y"[..], b"a/999999/y"]);
        assert_eq!(pages, 4);
        // A scan that matched nothing goes on where it stopped.
        let (topics, _) = read_all(&r, b"a/+/y", 1);
        assert_eq!(topics.len(), 2);
    }

    use std::fs;

    use crate::edge::snapshot::TestDir;

    #[test]
    fn saved_messages_load_back_as_they_were() {
        let dir = TestDir::new("retained-round-trip");
        let r = RetainedStore::new(1 << 20);
        for i in 0..(SAVE_CHUNK + 10) {
            r.set(
                format!("t/{i}").as_bytes(),
                &[b"h", format!("v{i}").as_bytes()],
            );
        }
        r.set(b"\x01odd/\xe2\x82\xac", &[&[0xE0, 0, 0xFF][..]]);
        assert_eq!(r.save(&dir).unwrap(), SAVE_CHUNK + 11);
        let back = RetainedStore::new(1 << 20);
        assert_eq!(back.load(&dir).unwrap(), (SAVE_CHUNK + 11, 0));
        assert_eq!(back.totals(), r.totals());
        let all = |s: &RetainedStore| s.chunk(None, usize::MAX);
        assert_eq!(all(&back), all(&r));
        // Loading respects the cap.
        let small = RetainedStore::new(10 * (RETAINED_ENTRY_OVERHEAD + 10));
        let (loaded, refused) = small.load(&dir).unwrap();
        assert_eq!(loaded + refused, SAVE_CHUNK + 11);
        assert!(loaded < 11 && refused > 0);
    }

    #[test]
    fn no_file_loads_nothing_and_a_damaged_one_nothing_at_all() {
        let dir = TestDir::new("retained-damaged");
        let r = RetainedStore::new(1 << 20);
        assert_eq!(r.load(&dir).unwrap(), (0, 0));
        r.set(b"a", &[b"h", b"1"]);
        r.set(b"b", &[b"h", b"2"]);
        r.save(&dir).unwrap();
        let mut bytes = fs::read(dir.join(FILE)).unwrap();
        bytes[FILE_HEADER.len() + 5] ^= 1;
        fs::write(dir.join(FILE), &bytes).unwrap();
        let fresh = RetainedStore::new(1 << 20);
        assert!(matches!(
            fresh.load(&dir),
            Err(SnapshotError::Corrupt { .. })
        ));
        assert_eq!(fresh.totals().messages, 0);
    }

    /// A stored payload (envelope and data) whose message expires at `at` (Unix ms).
    fn expiring(at: u64) -> Vec<u8> {
        let private = envelope::Private {
            origin: None,
            expires_at: Some(at),
        };
        let mut stored = envelope::header_with(1, private, &[]).to_vec();
        stored.extend_from_slice(b"data");
        stored
    }

    #[test]
    fn a_page_leaves_out_what_was_stored_after_its_mark() {
        let r = RetainedStore::new(1 << 20);
        assert!(r.set(b"t/1", &[b"a"]).0);
        let mark = r.last_stored();
        assert!(r.set(b"t/2", &[b"b"]).0);
        assert!(r.set(b"t/0", &[b"c"]).0);
        let topics = |upto| {
            r.page(b"t/+", None, 10, upto)
                .messages
                .into_iter()
                .map(|m| m.topic)
                .collect::<Vec<_>>()
        };
        assert_eq!(topics(mark), vec![Bytes::from_static(b"t/1")]);
        assert_eq!(topics(u64::MAX).len(), 3);
        // Replaced after the mark: left out too (the new one arrives live).
        assert!(r.set(b"t/1", &[b"d"]).0);
        assert!(topics(mark).is_empty());
    }

    #[test]
    fn expired_messages_are_not_read_and_make_room_when_the_store_is_full() {
        let now = envelope::unix_millis();
        let (past, future) = (expiring(now - 1), expiring(now + 3_600_000));
        let one = size(b"t/0", past.len());
        let r = RetainedStore::new(3 * one);
        for (i, stored) in [&past, &future, &past].iter().enumerate() {
            assert!(r.set(format!("t/{i}").as_bytes(), &[stored]).0);
        }
        let page = r.page(b"t/+", None, 10, u64::MAX);
        assert_eq!(page.messages.len(), 1);
        assert_eq!(&page.messages[0].topic[..], b"t/1");
        assert_eq!(page.expired, 2);
        assert_eq!(r.totals().messages, 1, "removed as they were met");
        // Full of expired messages: a new one makes room by removing them.
        let r = RetainedStore::new(2 * one);
        assert!(r.set(b"t/0", &[&past]).0);
        assert!(r.set(b"t/1", &[&past]).0);
        assert!(r.set(b"t/2", &[&future]).0);
        assert_eq!(r.totals().messages, 1);
        assert_eq!(r.take_swept(), 2, "counted once");
        assert_eq!(r.take_swept(), 0);
        // Not more than once a second: full of live ones, a refusal is quick.
        assert!(r.set(b"t/3", &[&future]).0);
        assert!(!r.set(b"t/4", &[&future]).0);
    }

    #[test]
    fn plain_prefixes() {
        assert_eq!(plain_prefix(b"a/b/+/c"), b"a/b");
        assert_eq!(plain_prefix(b"a/b/#"), b"a/b");
        assert_eq!(plain_prefix(b"#"), b"");
        assert_eq!(plain_prefix(b"+/a"), b"");
        assert_eq!(plain_prefix(b"a/b"), b"a/b");
    }
}
