//! Telemetry history per device: the readings behind model warm-ups after a restart (or when a
//! device moves to another instance), dashboard chart back-fill and `vigil export`.
//!
//! # Design
//!
//! [`History`] is a cheap-clone handle over one of three backends, chosen by [`History::start`]:
//!
//! - **disabled** (`history.points_per_device = 0`): recording does nothing, reads are empty;
//! - **memory** (no `[redis]`): a bounded ring per device in this process, saved to
//!   `<history.data_dir>/history.snapshot` every `snapshot_interval_secs` and at shutdown, and
//!   loaded from it at start;
//! - **Redis** (`[redis] url` set): one stream per device, shared by every instance, so a device
//!   that moves to another instance takes its history with it.
//!
//! [`History::record`] is called on the analytics hot path, so it never waits. In memory it
//! takes a short `std` mutex; for Redis it hands the point to one writer task through a bounded
//! queue with `try_send`, and when the queue is full (Redis slow or down) the point is dropped
//! and counted, as every slow consumer in vigil is. Nothing is logged per point. Non-finite
//! values are not measurements and are not recorded; a reading without a finite value records
//! nothing. [`Point::values`] come back sorted by metric name, in both backends.
//!
//! # Memory layout and bounds
//!
//! A device's metric names are interned: the device keeps up to [`MAX_METRICS`] (64) names and
//! a point refers to them by bit in a `u64` mask, so a point is a 16-byte stamp
//! (`ts_ms: i64`, `mask: u64`) in one ring plus one `f64` per value in a second ring, in
//! metric-id order. Values of further metric names are not recorded and are counted in
//! [`HistoryMetrics::values_refused`]. Both rings grow by doubling up to their bound
//! (`points_per_device` stamps, `points_per_device * 64` values), and the values ring is trimmed
//! to fit when the device first reaches `points_per_device` points; from then on a device whose
//! readings keep the same metrics allocates nothing per point. Devices form an LRU list threaded
//! through a slab (O(1) per write); beyond `max_devices` the least recently written device is
//! dropped and counted in [`HistoryMetrics::devices_evicted`].
//!
//! - per point: 16 bytes + 8 bytes per value;
//! - per device: `points_per_device * (16 + 8 * metrics)` + names (at most 64 * about 100 bytes)
//!   + about 300 bytes of bookkeeping and two copies of the device id;
//! - defaults (1000 points, 2000 devices), typical device with 4 metrics: about 49 KB per
//!   device, about 100 MB in all;
//! - defaults, worst case (64 metrics in every reading): 16 KB + 512 KB + 6 KB = about 534 KB per
//!   device, about 1.07 GB in all.
//!
//! In Redis mode the process holds the writer queue: at most 16384 points of about 150 bytes
//! (device id, timestamp, the `v` JSON), 2.5 MB typically, about 100 MB if every point carried
//! 64 metrics with 64-byte names.
//!
//! # Snapshot file (memory mode)
//!
//! Text, versioned, one device per line:
//!
//! ```text
//! vigil-history 1
//! {"device":"m-1","metrics":["temp","rpm"],"points":[[1700000000000,[71.5,1480.0]],[1700000001000,[null,1490.0]]]}
//! ```
//!
//! Devices are written from least to most recently written, so loading them in file order
//! rebuilds the LRU order (and a smaller `max_devices` keeps the most recent). `points` are
//! oldest first; each holds the value of `metrics[i]` at index `i`, `null` where the reading
//! lacked it, trailing `null`s omitted. The file is written to `history.snapshot.tmp`, synced
//! and renamed over the old one, so a crash leaves either snapshot whole. Each device is copied
//! out under the mutex on its own (a few `memcpy`s) and formatted and written on a blocking
//! thread without it. A snapshot that cannot be read or parsed is logged and ignored: the store
//! starts empty rather than not at all.
//!
//! # Redis layout
//!
//! Key `{<key_prefix>}:hist:{device}` (the hash tag keeps every vigil key in one slot of a Redis
//! Cluster, see `redis_link`), a stream whose entries have the fields `t` (the reading's
//! timestamp in ms) and `v` (the values as a compact JSON object, `{"rpm":1480.0}`), written
//! with `XADD key MAXLEN ~ points_per_device * t .. v ..`; the `~` lets Redis trim whole stream
//! nodes, so a stream may hold up to about one node (100 entries by default) more. At most
//! [`MAX_METRICS`] values per point are written.
//!
//! One writer task owns the connection (a `RedisConn`: a connection manager, or a cluster
//! connection, with 2 s connect and response timeouts). It sends up to 256 points per pipeline round trip; each `XADD` is answered on its
//! own, so one refused entry (say, a key of the wrong type) loses only its point. The writer
//! owns the retry policy: the manager makes no retries of its own; after a failed round trip
//! the writer drops the manager and connects anew with backoff (100 ms doubling to 10 s) until
//! shutdown, and it pings Redis after 5 s without writes so that [`History::ready`] follows
//! Redis even when no telemetry flows. While it is disconnected it does not read its queue, so
//! new points are dropped once the queue is full. [`History::recent`] uses a clone of the
//! writer's manager (clones share one multiplexed connection), so it fails at once while the
//! writer has no connection and within 2 s otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redis::streams::{StreamId, StreamRangeReply};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, RedisConfig};
use crate::redis_link::{self, RedisConn};
use redis::aio::ConnectionLike;

/// Metric names kept per device in memory (one bit each in a point's mask), and values written
/// per point to Redis.
pub const MAX_METRICS: usize = 64;

/// The snapshot's file name inside `history.data_dir`.
pub const SNAPSHOT_FILE: &str = "history.snapshot";

/// The snapshot's first line; the number is the format version.
const SNAPSHOT_HEADER: &str = "vigil-history 1";

/// Where a snapshot is written before it is renamed over [`SNAPSHOT_FILE`].
const SNAPSHOT_TMP: &str = "history.snapshot.tmp";

/// Points waiting for the Redis writer; beyond this, new points are dropped.
const QUEUE_CAPACITY: usize = 16_384;

/// Points per pipeline round trip to Redis.
const BATCH: usize = 256;

/// Bound of a connection attempt, of one round trip and of [`History::recent`].
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// `vigil export` reads whole streams, which may take longer than a live read.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The writer pings Redis after this long without writing, to keep `ready` true to Redis.
const IDLE_PING: Duration = Duration::from_secs(5);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How long the Redis writer may spend writing its queue out at shutdown.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// How often the writer may warn about entries Redis refused (these could come in every batch).
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// One reading of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub ts_ms: i64,
    /// Metric values, sorted by metric name.
    pub values: Vec<(String, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("Redis is not connected")]
    NotConnected,
    #[error("Redis did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("history.data_dir is empty and [redis] is off: there is no stored history")]
    NoDataDir,
    #[error("no history snapshot at {}", .0.display())]
    NoSnapshot(PathBuf),
    #[error("history snapshot {}: {source}", .path.display())]
    SnapshotIo { path: PathBuf, source: io::Error },
    #[error("corrupt history snapshot {}, line {line}: {reason}", .path.display())]
    SnapshotCorrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("no history for device `{0}`")]
    NoHistory(String),
    #[error("cannot write the CSV: {0}")]
    Output(io::Error),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct HistoryMetrics {
    /// Points stored: written into a memory ring, or acknowledged by Redis.
    pub points_recorded: AtomicU64,
    /// Points lost on the way to Redis: the writer queue was full (Redis slow or down) or
    /// closed (shutdown), the round trip failed, or Redis refused the entry.
    pub points_dropped: AtomicU64,
    /// Values not stored because their device already had [`MAX_METRICS`] metric names
    /// (memory) or their reading more than [`MAX_METRICS`] values (Redis).
    pub values_refused: AtomicU64,
    /// Devices whose history was dropped to make room for another (memory, `max_devices`).
    pub devices_evicted: AtomicU64,
    /// Snapshot files written (memory mode).
    pub snapshot_writes: AtomicU64,
    /// Snapshot files that could not be written (memory mode); each is logged.
    pub snapshot_failures: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The telemetry history store; clones share it.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Arc<HistoryMetrics>,
    backend: Backend,
}

enum Backend {
    Disabled,
    Memory(Arc<MemoryStore>),
    Redis(RedisHandle),
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match &self.inner.backend {
            Backend::Disabled => "disabled",
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
        };
        f.debug_struct("History")
            .field("backend", &backend)
            .finish_non_exhaustive()
    }
}

impl History {
    /// Starts the store `config` describes: disabled when `history.points_per_device` is 0,
    /// in Redis when `[redis]` is on, in memory otherwise.
    ///
    /// Memory mode keeps at most `history.max_devices` devices (the least recently written is
    /// dropped, counted) and loads `<data_dir>/history.snapshot` if there is one, on the calling
    /// thread (this is meant for startup); an unreadable or corrupt snapshot is logged and
    /// ignored. With a `data_dir` it writes a snapshot every `snapshot_interval_secs` in which
    /// points were recorded, and a last one when `shutdown` is cancelled.
    ///
    /// Redis mode connects in the background, retrying with backoff until `shutdown`, so a
    /// Redis that is down at start is not an error; only an invalid URL is.
    ///
    /// Background tasks are spawned on `tracker` and end when `shutdown` is cancelled. Must be
    /// called inside a tokio runtime.
    pub fn start(
        config: &Config,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<History, HistoryError> {
        let settings = &config.history;
        if settings.points_per_device == 0 {
            return Ok(History::disabled());
        }
        let metrics = Arc::new(HistoryMetrics::default());
        let backend = if config.redis.enabled() {
            // A URL that cannot work is an error now, not a reason to retry forever.
            for url in config.redis.url.split(',') {
                redis::Client::open(url.trim())?;
            }
            let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
            let link = Arc::new(RedisLink::default());
            let writer = Writer {
                redis: config.redis.clone(),
                queue: receiver,
                link: link.clone(),
                metrics: metrics.clone(),
                prefix: config.redis.key_prefix.clone(),
                maxlen: settings.points_per_device,
                shutdown,
                last_refusal_warning: None,
            };
            tracker.spawn(writer.run().instrument(tracing::info_span!("history")));
            Backend::Redis(RedisHandle {
                queue,
                link,
                prefix: config.redis.key_prefix.clone(),
            })
        } else {
            let store = Arc::new(MemoryStore::new(
                settings.points_per_device,
                settings.max_devices,
            ));
            if !settings.data_dir.is_empty() {
                let dir = PathBuf::from(&settings.data_dir);
                store.load_snapshot(&dir.join(SNAPSHOT_FILE));
                let every = Duration::from_secs(settings.snapshot_interval_secs.max(1));
                let task = run_snapshots(store.clone(), metrics.clone(), dir, every, shutdown);
                tracker.spawn(task.instrument(tracing::info_span!("history")));
            }
            Backend::Memory(store)
        };
        Ok(History {
            inner: Arc::new(Inner { metrics, backend }),
        })
    }

    /// A store that records nothing: `record` does nothing, `recent` is empty, `ready` is true.
    pub fn disabled() -> History {
        History {
            inner: Arc::new(Inner {
                metrics: Arc::default(),
                backend: Backend::Disabled,
            }),
        }
    }

    /// Records one reading of `device`. Never waits: in memory it takes a short mutex; for
    /// Redis it queues the point for the writer task, or drops it (counted) if the queue is
    /// full. Non-finite values are skipped.
    pub fn record(&self, device: &str, ts_ms: i64, values: &[(String, f64)]) {
        // A reading with nothing to store must not make room for a new device either.
        if !values.iter().any(|(_, v)| v.is_finite()) {
            return;
        }
        let metrics = &self.inner.metrics;
        match &self.inner.backend {
            Backend::Disabled => {}
            Backend::Memory(store) => store.record(device, ts_ms, values, metrics),
            Backend::Redis(redis) => redis.record(device, ts_ms, values, metrics),
        }
    }

    /// Up to `limit` most recent points of `device`, oldest first; empty for an unknown
    /// device. In Redis mode an unreachable or slow Redis (2 s) is an error.
    pub async fn recent(&self, device: &str, limit: usize) -> Result<Vec<Point>, HistoryError> {
        match &self.inner.backend {
            Backend::Disabled => Ok(Vec::new()),
            Backend::Memory(store) => Ok(store.recent(device, limit)),
            Backend::Redis(redis) => redis.recent(device, limit).await,
        }
    }

    /// Redis mode: whether the writer's connection is up (its last round trip succeeded).
    /// Memory mode and disabled: true.
    pub fn ready(&self) -> bool {
        match &self.inner.backend {
            Backend::Redis(redis) => redis.link.ready.load(Ordering::Relaxed),
            Backend::Disabled | Backend::Memory(_) => true,
        }
    }

    pub fn metrics(&self) -> &HistoryMetrics {
        &self.inner.metrics
    }
}

// ---------------------------------------------------------------------------------------------
// Memory backend

/// Marks the end of the LRU list.
const NIL: usize = usize::MAX;

struct MemoryStore {
    /// Points kept per device (at least 1).
    capacity: usize,
    /// Devices kept (at least 1).
    max_devices: usize,
    rings: Mutex<Rings>,
}

/// Every device's ring, in a slab threaded by a most-recently-written list.
struct Rings {
    slots: Vec<Slot>,
    index: HashMap<Box<str>, usize>,
    /// Ends of the LRU list (`NIL` when empty).
    newest: usize,
    oldest: usize,
}

struct Slot {
    ring: DeviceRing,
    newer: usize,
    older: usize,
}

/// One device's history.
struct DeviceRing {
    device: Box<str>,
    /// Interned metric names; a name's index is its bit in [`Stamp::mask`].
    metrics: Vec<Box<str>>,
    stamps: VecDeque<Stamp>,
    /// The values of every point in `stamps`, in order, each point's by metric id.
    values: VecDeque<f64>,
    /// Whether `values` was trimmed to fit when the ring first filled.
    trimmed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Stamp {
    ts_ms: i64,
    /// Bit `i` set: the point has a value for `metrics[i]`.
    mask: u64,
}

impl MemoryStore {
    fn new(capacity: usize, max_devices: usize) -> MemoryStore {
        MemoryStore {
            capacity: capacity.max(1),
            max_devices: max_devices.max(1),
            rings: Mutex::new(Rings::new()),
        }
    }

    /// The rings. Nothing done under the lock is expected to panic; if something did, the
    /// rings would still be usable, so a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, Rings> {
        self.rings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, device: &str, ts_ms: i64, values: &[(String, f64)], metrics: &HistoryMetrics) {
        let mut staged = [0.0; MAX_METRICS];
        let mut mask = 0u64;
        let mut refused = 0;
        let evicted = {
            let mut rings = self.lock();
            let (slot, evicted) = rings.touch(device, self.max_devices);
            let ring = &mut rings.slots[slot].ring;
            for (position, (name, value)) in values.iter().enumerate() {
                if !value.is_finite() {
                    continue;
                }
                match ring.intern(name, position) {
                    Some(id) => {
                        staged[id] = *value;
                        mask |= 1 << id;
                    }
                    None => refused += 1,
                }
            }
            if mask != 0 {
                ring.push(Stamp { ts_ms, mask }, &staged, self.capacity);
            }
            evicted
        };
        add(&metrics.points_recorded, u64::from(mask != 0));
        add(&metrics.values_refused, refused);
        add(&metrics.devices_evicted, u64::from(evicted));
    }

    fn recent(&self, device: &str, limit: usize) -> Vec<Point> {
        // Copy under the lock, build the `Point`s (one String per value) without it.
        let copy = self.lock().get(device).map(|ring| ring.copy_recent(limit));
        copy.map(|c| c.points()).unwrap_or_default()
    }

    /// Replaces the (empty) rings with the snapshot at `path`, if there is one. Problems are
    /// logged: a history is a convenience, never a reason not to start.
    fn load_snapshot(&self, path: &Path) {
        match read_snapshot_rings(path, self.capacity, self.max_devices) {
            Ok(Some(rings)) => {
                tracing::info!(path = %path.display(), devices = rings.index.len(), "history snapshot loaded");
                *self.lock() = rings;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "history snapshot ignored; starting empty"),
        }
    }

    /// Writes the snapshot into `dir` (temporary file, sync, rename); returns the devices
    /// written. Blocking: run it on a blocking thread.
    fn write_snapshot(&self, dir: &Path) -> io::Result<usize> {
        fs::create_dir_all(dir)?;
        let tmp = dir.join(SNAPSHOT_TMP);
        let result = self
            .write_snapshot_to(&tmp)
            .and_then(|devices| fs::rename(&tmp, dir.join(SNAPSHOT_FILE)).map(|()| devices));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_snapshot_to(&self, path: &Path) -> io::Result<usize> {
        let mut out = BufWriter::new(File::create(path)?);
        writeln!(out, "{SNAPSHOT_HEADER}")?;
        let order = self.lock().oldest_first();
        let mut devices = 0;
        for slot in order {
            // One device at a time: writers wait for a copy of one ring, never for the disk.
            // A slot reused meanwhile yields its new device; a device could then appear twice,
            // and loading keeps the later line.
            let copy = match self.lock().slots.get(slot) {
                Some(s) => s.ring.copy_recent(usize::MAX),
                None => continue,
            };
            if copy.stamps.is_empty() {
                continue;
            }
            serde_json::to_writer(&mut out, &copy.snapshot_line())?;
            out.write_all(b"\n")?;
            devices += 1;
        }
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(devices)
    }
}

impl Rings {
    fn new() -> Rings {
        Rings {
            slots: Vec::new(),
            index: HashMap::new(),
            newest: NIL,
            oldest: NIL,
        }
    }

    fn get(&self, device: &str) -> Option<&DeviceRing> {
        self.index.get(device).map(|&slot| &self.slots[slot].ring)
    }

    /// The slot of `device`, made the most recently written. A new device gets a new slot
    /// or, with `max_devices` slots in use, the least recently written device's (then `true`:
    /// that device was evicted).
    fn touch(&mut self, device: &str, max_devices: usize) -> (usize, bool) {
        if let Some(&slot) = self.index.get(device) {
            if self.newest != slot {
                self.unlink(slot);
                self.link_newest(slot);
            }
            return (slot, false);
        }
        let ring = DeviceRing::new(device);
        let (slot, evicted) = if self.slots.len() < max_devices {
            self.slots.push(Slot {
                ring,
                newer: NIL,
                older: NIL,
            });
            (self.slots.len() - 1, false)
        } else {
            let slot = self.oldest;
            self.unlink(slot);
            let old = std::mem::replace(&mut self.slots[slot].ring, ring);
            self.index.remove(&old.device);
            (slot, true)
        };
        self.index.insert(device.into(), slot);
        self.link_newest(slot);
        (slot, evicted)
    }

    fn unlink(&mut self, slot: usize) {
        let Slot { newer, older, .. } = self.slots[slot];
        match newer {
            NIL => self.newest = older,
            n => self.slots[n].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o].newer = newer,
        }
    }

    fn link_newest(&mut self, slot: usize) {
        self.slots[slot].newer = NIL;
        self.slots[slot].older = self.newest;
        match self.newest {
            NIL => self.oldest = slot,
            n => self.slots[n].newer = slot,
        }
        self.newest = slot;
    }

    /// Slots from the least to the most recently written.
    fn oldest_first(&self) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.slots.len());
        let mut slot = self.oldest;
        while slot != NIL {
            order.push(slot);
            slot = self.slots[slot].newer;
        }
        order
    }
}

impl DeviceRing {
    fn new(device: &str) -> DeviceRing {
        DeviceRing {
            device: device.into(),
            metrics: Vec::new(),
            stamps: VecDeque::new(),
            values: VecDeque::new(),
            trimmed: false,
        }
    }

    /// The id of metric `name`, interned if new and there is room. `position` is the value's
    /// place in its reading: devices usually send their metrics in the same order, so that id
    /// is tried first. Otherwise a linear scan, cheaper than hashing for at most 64 names.
    fn intern(&mut self, name: &str, position: usize) -> Option<usize> {
        if self.metrics.get(position).is_some_and(|m| **m == *name) {
            return Some(position);
        }
        if let Some(id) = self.metrics.iter().position(|m| **m == *name) {
            return Some(id);
        }
        if self.metrics.len() == MAX_METRICS {
            return None;
        }
        self.metrics.push(name.into());
        Some(self.metrics.len() - 1)
    }

    /// Appends a point whose values are `staged[id]` for every id in `stamp.mask`, dropping
    /// the oldest point if the ring holds `capacity` already.
    fn push(&mut self, stamp: Stamp, staged: &[f64; MAX_METRICS], capacity: usize) {
        if self.stamps.len() >= capacity {
            if let Some(oldest) = self.stamps.pop_front() {
                self.values.drain(..oldest.mask.count_ones() as usize);
            }
        }
        reserve_bounded(&mut self.stamps, 1, capacity);
        reserve_bounded(
            &mut self.values,
            stamp.mask.count_ones() as usize,
            capacity.saturating_mul(MAX_METRICS),
        );
        self.stamps.push_back(stamp);
        self.values.extend(ids(stamp.mask).map(|id| staged[id]));
        if !self.trimmed && self.stamps.len() == capacity {
            // Doubling may have left the values ring up to twice too large; a device that
            // keeps sending the same metrics needs exactly this much from now on.
            self.values.shrink_to_fit();
            self.trimmed = true;
        }
    }

    /// The last `limit` points, copied.
    fn copy_recent(&self, limit: usize) -> RingCopy {
        let skip = self.stamps.len().saturating_sub(limit);
        let stamps: Vec<Stamp> = self.stamps.range(skip..).copied().collect();
        let count: usize = stamps.iter().map(|s| s.mask.count_ones() as usize).sum();
        let values = self
            .values
            .range(self.values.len() - count..)
            .copied()
            .collect();
        RingCopy {
            device: self.device.to_string(),
            metrics: self.metrics.clone(),
            stamps,
            values,
        }
    }

    /// A device line of a snapshot, checked, keeping its last `capacity` points.
    fn from_snapshot(line: SnapshotDevice, capacity: usize) -> Result<DeviceRing, String> {
        if line.metrics.len() > MAX_METRICS {
            return Err(format!(
                "device `{}` has more than {MAX_METRICS} metrics",
                line.device
            ));
        }
        let distinct: HashSet<&str> = line.metrics.iter().map(String::as_str).collect();
        if distinct.len() != line.metrics.len() {
            return Err(format!("device `{}` lists a metric twice", line.device));
        }
        let mut ring = DeviceRing::new(&line.device);
        ring.metrics = line
            .metrics
            .into_iter()
            .map(String::into_boxed_str)
            .collect();
        let skip = line.points.len().saturating_sub(capacity);
        for (ts_ms, values) in line.points.into_iter().skip(skip) {
            if values.len() > ring.metrics.len() {
                return Err(format!(
                    "a point of device `{}` has more values than metrics",
                    ring.device
                ));
            }
            let mut staged = [0.0; MAX_METRICS];
            let mut mask = 0u64;
            for (id, value) in values.into_iter().enumerate() {
                if let Some(value) = value.filter(|v| v.is_finite()) {
                    staged[id] = value;
                    mask |= 1 << id;
                }
            }
            if mask != 0 {
                ring.push(Stamp { ts_ms, mask }, &staged, capacity);
            }
        }
        Ok(ring)
    }
}

/// The ids set in `mask`, ascending.
fn ids(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let id = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            id
        })
    })
}

/// Makes room for `extra` more items, doubling as `VecDeque` does but never past `limit`, so a
/// full ring carries no slack.
fn reserve_bounded<T>(ring: &mut VecDeque<T>, extra: usize, limit: usize) {
    let needed = ring.len() + extra;
    if needed > ring.capacity() {
        let target = (ring.capacity() * 2)
            .max(8)
            .clamp(needed, limit.max(needed));
        ring.reserve_exact(target - ring.len());
    }
}

/// A device's points copied out of the lock.
struct RingCopy {
    device: String,
    metrics: Vec<Box<str>>,
    stamps: Vec<Stamp>,
    values: Vec<f64>,
}

impl RingCopy {
    fn points(&self) -> Vec<Point> {
        let mut by_name: Vec<usize> = (0..self.metrics.len()).collect();
        by_name.sort_by(|&a, &b| self.metrics[a].cmp(&self.metrics[b]));
        let mut offset = 0;
        self.stamps
            .iter()
            .map(|stamp| {
                let values = by_name
                    .iter()
                    .filter(|&&id| stamp.mask & (1 << id) != 0)
                    .map(|&id| {
                        // The point's values are in id order: this one follows those of the
                        // lower ids it has.
                        let rank = (stamp.mask & ((1 << id) - 1)).count_ones() as usize;
                        (self.metrics[id].to_string(), self.values[offset + rank])
                    })
                    .collect();
                offset += stamp.mask.count_ones() as usize;
                Point {
                    ts_ms: stamp.ts_ms,
                    values,
                }
            })
            .collect()
    }

    fn snapshot_line(&self) -> SnapshotDevice {
        let mut offset = 0;
        let points = self
            .stamps
            .iter()
            .map(|stamp| {
                let width = (u64::BITS - stamp.mask.leading_zeros()) as usize;
                let mut values = vec![None; width];
                for id in ids(stamp.mask) {
                    values[id] = Some(self.values[offset]);
                    offset += 1;
                }
                (stamp.ts_ms, values)
            })
            .collect();
        SnapshotDevice {
            device: self.device.clone(),
            metrics: self.metrics.iter().map(|m| m.to_string()).collect(),
            points,
        }
    }
}

/// One line of the snapshot file after the header (see the module documentation).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotDevice {
    device: String,
    metrics: Vec<String>,
    /// `[ts_ms, [value of metrics[0] or null, ...]]`, oldest first.
    points: Vec<(i64, Vec<Option<f64>>)>,
}

/// Writes a snapshot whenever `every` has passed with points recorded, and once more at
/// shutdown.
async fn run_snapshots(
    store: Arc<MemoryStore>,
    metrics: Arc<HistoryMetrics>,
    dir: PathBuf,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `points_recorded` when the last snapshot was taken. Nothing recorded since the start
    // means the file on disk, if any, is still the truth.
    let mut saved = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        snapshot(&store, &metrics, &dir, &mut saved).await;
    }
    snapshot(&store, &metrics, &dir, &mut saved).await;
}

async fn snapshot(store: &Arc<MemoryStore>, metrics: &HistoryMetrics, dir: &Path, saved: &mut u64) {
    let recorded = metrics.points_recorded.load(Ordering::Relaxed);
    if recorded == *saved {
        return;
    }
    let (task_store, task_dir) = (store.clone(), dir.to_path_buf());
    let written = tokio::task::spawn_blocking(move || task_store.write_snapshot(&task_dir)).await;
    let path = dir.join(SNAPSHOT_FILE);
    match written {
        Ok(Ok(devices)) => {
            add(&metrics.snapshot_writes, 1);
            *saved = recorded;
            tracing::debug!(path = %path.display(), devices, "history snapshot written");
        }
        Ok(Err(e)) => {
            add(&metrics.snapshot_failures, 1);
            tracing::warn!(path = %path.display(), error = %e, "cannot write the history snapshot");
        }
        Err(e) => {
            add(&metrics.snapshot_failures, 1);
            tracing::warn!(path = %path.display(), error = %e, "history snapshot task failed");
        }
    }
}

/// Opens the snapshot at `path`; `None` if there is none.
fn open_snapshot(path: &Path) -> Result<Option<File>, HistoryError> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HistoryError::SnapshotIo {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a snapshot, checking its header and handing each device line to `each`.
fn read_snapshot(
    file: File,
    path: &Path,
    mut each: impl FnMut(SnapshotDevice) -> Result<(), String>,
) -> Result<(), HistoryError> {
    let corrupt = |line: usize, reason: String| HistoryError::SnapshotCorrupt {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut header_seen = false;
    for (index, text) in BufReader::new(file).lines().enumerate() {
        let line = index + 1;
        let text = text.map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => corrupt(line, "not UTF-8".into()),
            _ => HistoryError::SnapshotIo {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        if !header_seen {
            if text != SNAPSHOT_HEADER {
                let shown: String = text.chars().take(40).collect();
                return Err(corrupt(
                    line,
                    format!("expected `{SNAPSHOT_HEADER}`, found `{shown}`"),
                ));
            }
            header_seen = true;
            continue;
        }
        let device: SnapshotDevice =
            serde_json::from_str(&text).map_err(|e| corrupt(line, e.to_string()))?;
        each(device).map_err(|reason| corrupt(line, reason))?;
    }
    if !header_seen {
        return Err(corrupt(1, "empty file".into()));
    }
    Ok(())
}

/// The rings a snapshot describes, or `None` if there is no snapshot.
fn read_snapshot_rings(
    path: &Path,
    capacity: usize,
    max_devices: usize,
) -> Result<Option<Rings>, HistoryError> {
    let Some(file) = open_snapshot(path)? else {
        return Ok(None);
    };
    let mut rings = Rings::new();
    read_snapshot(file, path, |line| {
        let ring = DeviceRing::from_snapshot(line, capacity)?;
        let (slot, _) = rings.touch(&ring.device, max_devices);
        rings.slots[slot].ring = ring;
        Ok(())
    })?;
    Ok(Some(rings))
}

/// The last `limit` points of `device` in the snapshot at `path` (empty if it is not there).
fn snapshot_points(
    path: &Path,
    device: &str,
    limit: Option<usize>,
) -> Result<Vec<Point>, HistoryError> {
    let file = open_snapshot(path)?.ok_or_else(|| HistoryError::NoSnapshot(path.to_path_buf()))?;
    let mut found = None;
    read_snapshot(file, path, |line| {
        // The whole file is checked even once the device is found, so a damaged file is
        // reported rather than half used; a repeated device's later line wins, as at load.
        let ring = DeviceRing::from_snapshot(line, limit.unwrap_or(usize::MAX))?;
        if *ring.device == *device {
            found = Some(ring);
        }
        Ok(())
    })?;
    Ok(found.map_or_else(Vec::new, |ring| ring.copy_recent(usize::MAX).points()))
}

// ---------------------------------------------------------------------------------------------
// Redis backend

struct RedisHandle {
    queue: mpsc::Sender<Queued>,
    link: Arc<RedisLink>,
    prefix: String,
}

/// What the writer shares with the handles: whether it is connected, and its connection.
#[derive(Default)]
struct RedisLink {
    ready: AtomicBool,
    /// The writer's connection while it is up, for `recent` to clone.
    connection: Mutex<Option<RedisConn>>,
}

/// A point on its way to Redis, already in its stored form.
struct Queued {
    device: Box<str>,
    ts_ms: i64,
    /// The `v` field: the values as a JSON object.
    values: String,
}

impl RedisLink {
    fn slot(&self) -> MutexGuard<'_, Option<RedisConn>> {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn up(&self, connection: RedisConn) {
        *self.slot() = Some(connection);
        self.ready.store(true, Ordering::Relaxed);
    }

    fn down(&self) {
        self.ready.store(false, Ordering::Relaxed);
        *self.slot() = None;
    }
}

fn stream_key(prefix: &str, device: &str) -> String {
    redis_link::key(prefix, &format!("hist:{device}"))
}

/// The finite values of a reading, at most [`MAX_METRICS`], as a JSON object.
struct ValuesJson<'a>(&'a [(String, f64)]);

impl Serialize for ValuesJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .filter(|(_, v)| v.is_finite())
                .take(MAX_METRICS)
                .map(|(name, value)| (name, value)),
        )
    }
}

impl RedisHandle {
    fn record(&self, device: &str, ts_ms: i64, values: &[(String, f64)], metrics: &HistoryMetrics) {
        let finite = values.iter().filter(|(_, v)| v.is_finite()).count();
        add(
            &metrics.values_refused,
            finite.saturating_sub(MAX_METRICS) as u64,
        );
        // Serializing string keys and finite numbers cannot fail; if it did, the point is lost.
        let Ok(json) = serde_json::to_string(&ValuesJson(values)) else {
            add(&metrics.points_dropped, 1);
            return;
        };
        let queued = Queued {
            device: device.into(),
            ts_ms,
            values: json,
        };
        if self.queue.try_send(queued).is_err() {
            add(&metrics.points_dropped, 1);
        }
    }

    async fn recent(&self, device: &str, limit: usize) -> Result<Vec<Point>, HistoryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut connection = self.link.slot().clone().ok_or(HistoryError::NotConnected)?;
        let key = stream_key(&self.prefix, device);
        fetch(&mut connection, &key, Some(limit), REDIS_TIMEOUT).await
    }
}

async fn ping(connection: &mut RedisConn) -> redis::RedisResult<()> {
    redis::cmd("PING").query_async(connection).await
}

/// The last `limit` entries (all without a limit) of stream `key`, oldest first. Entries
/// without a valid `t` and `v` (not written by vigil) are skipped and logged.
async fn fetch(
    connection: &mut RedisConn,
    key: &str,
    limit: Option<usize>,
    timeout: Duration,
) -> Result<Vec<Point>, HistoryError> {
    let mut command = redis::cmd("XREVRANGE");
    command.arg(key).arg("+").arg("-");
    if let Some(limit) = limit {
        command.arg("COUNT").arg(limit);
    }
    let reply: StreamRangeReply = tokio::time::timeout(timeout, command.query_async(connection))
        .await
        .map_err(|_| HistoryError::Timeout(timeout))??;
    let total = reply.ids.len();
    let points: Vec<Point> = reply.ids.iter().rev().filter_map(parse_entry).collect();
    if points.len() < total {
        tracing::warn!(
            key,
            skipped = total - points.len(),
            "history stream entries without a valid `t` and `v` skipped"
        );
    }
    Ok(points)
}

fn parse_entry(entry: &StreamId) -> Option<Point> {
    let ts_ms = entry.get::<i64>("t")?;
    let json = entry.get::<String>("v")?;
    // A map sorts the names, as `Point` promises.
    let values: BTreeMap<String, f64> = serde_json::from_str(&json).ok()?;
    Some(Point {
        ts_ms,
        values: values.into_iter().collect(),
    })
}

/// The one owner of the Redis connection used for writing.
struct Writer {
    redis: RedisConfig,
    queue: mpsc::Receiver<Queued>,
    link: Arc<RedisLink>,
    metrics: Arc<HistoryMetrics>,
    prefix: String,
    /// `MAXLEN ~` of every stream.
    maxlen: usize,
    shutdown: CancellationToken,
    last_refusal_warning: Option<Instant>,
}

/// Why the writer stopped writing on a connection.
enum Outcome {
    /// A round trip failed: reconnect.
    Lost(redis::RedisError),
    /// Shutdown, or every handle is gone.
    Stop,
}

impl Writer {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(mut connection) = self.connect().await {
            self.link.up(connection.clone());
            tracing::info!("history connected to Redis");
            let outcome = self.serve(&mut connection, &mut batch).await;
            self.link.down();
            match outcome {
                Outcome::Lost(e) => {
                    tracing::warn!(error = %e, "history lost its Redis connection; reconnecting")
                }
                Outcome::Stop => {
                    self.flush(&mut connection, &mut batch).await;
                    return;
                }
            }
        }
        // Shutdown while disconnected: what is still queued is lost.
        self.queue.close();
        let mut lost = 0;
        while self.queue.try_recv().is_ok() {
            lost += 1;
        }
        add(&self.metrics.points_dropped, lost);
    }

    /// Connects, retrying with backoff; `None` at shutdown.
    async fn connect(&self) -> Option<RedisConn> {
        let mut backoff = BACKOFF_MIN;
        let mut attempts = 0u32;
        loop {
            let attempt = async {
                // The writer owns the retry policy: one attempt per call.
                let mut connection = redis_link::connect(&self.redis, REDIS_TIMEOUT).await?;
                // Connected means a command came back, not just an open socket.
                ping(&mut connection).await?;
                Ok::<_, redis::RedisError>(connection)
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                result = attempt => match result {
                    Ok(connection) => return Some(connection),
                    Err(e) if attempts == 0 => tracing::warn!(error = %e, "history cannot reach Redis; retrying in the background"),
                    Err(e) => tracing::debug!(error = %e, attempts, "history still cannot reach Redis"),
                },
            }
            attempts += 1;
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Writes queued points in batches until a round trip fails or it is time to stop.
    async fn serve(&mut self, connection: &mut RedisConn, batch: &mut Vec<Queued>) -> Outcome {
        loop {
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Outcome::Stop,
                received = self.queue.recv_many(batch, BATCH) => received,
                _ = tokio::time::sleep(IDLE_PING) => {
                    if let Err(e) = ping(connection).await {
                        return Outcome::Lost(e);
                    }
                    continue;
                }
            };
            if received == 0 {
                return Outcome::Stop;
            }
            let result = self.write(connection, batch).await;
            batch.clear();
            if let Err(e) = result {
                return Outcome::Lost(e);
            }
        }
    }

    /// At shutdown: writes what is queued, for at most [`SHUTDOWN_FLUSH`]; the rest is lost.
    async fn flush(&mut self, connection: &mut RedisConn, batch: &mut Vec<Queued>) {
        self.queue.close();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_FLUSH;
        loop {
            batch.clear();
            while batch.len() < BATCH {
                match self.queue.try_recv() {
                    Ok(point) => batch.push(point),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            let written = tokio::time::timeout_at(deadline, self.write(connection, batch)).await;
            match written {
                Ok(Ok(())) => continue,
                // `write` counted this batch.
                Ok(Err(_)) => {}
                Err(_) => add(&self.metrics.points_dropped, batch.len() as u64),
            }
            let mut rest = 0;
            while self.queue.try_recv().is_ok() {
                rest += 1;
            }
            add(&self.metrics.points_dropped, rest);
            batch.clear();
            return;
        }
    }

    /// One pipeline round trip for `batch`. An error means the round trip failed (all of the
    /// batch is counted as dropped); entries Redis refused one by one are counted and logged
    /// here.
    async fn write(
        &mut self,
        connection: &mut RedisConn,
        batch: &[Queued],
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for point in batch {
            pipe.cmd("XADD")
                .arg(stream_key(&self.prefix, &point.device))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*")
                .arg("t")
                .arg(point.ts_ms)
                .arg("v")
                .arg(&point.values);
        }
        // The raw replies, so that a refused entry costs only its own point.
        let replies = match connection.req_packed_commands(&pipe, 0, batch.len()).await {
            Ok(replies) => replies,
            Err(e) => {
                add(&self.metrics.points_dropped, batch.len() as u64);
                return Err(e);
            }
        };
        let mut refusal = None;
        let mut written = 0;
        for reply in replies.iter().take(batch.len()) {
            match reply {
                redis::Value::ServerError(e) => refusal = Some(e),
                _ => written += 1,
            }
        }
        add(&self.metrics.points_recorded, written);
        add(&self.metrics.points_dropped, batch.len() as u64 - written);
        if let Some(e) = refusal {
            let quiet = self
                .last_refusal_warning
                .is_some_and(|at| at.elapsed() < REFUSAL_WARNING_EVERY);
            if !quiet {
                self.last_refusal_warning = Some(Instant::now());
                tracing::warn!(error = ?e, "Redis refused history entries (counted as dropped; warned at most once a minute)");
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// CSV export

/// Writes `device`'s stored history as CSV to `out`, for `vigil export`; no running instance
/// is needed. The history comes from Redis when `[redis]` is on, else from the snapshot in
/// `history.data_dir` (as of the last snapshot; an error if there is no data dir or no
/// snapshot). `limit` keeps the most recent points only.
///
/// The header is `timestamp_ms` and the sorted metric names; each row is one point, oldest
/// first, with an empty cell where the point lacks a metric. Names containing `,`, `"` or a
/// line break are quoted as RFC 4180 says; lines end with `\n`. Returns the rows written. A
/// device without stored points is [`HistoryError::NoHistory`].
///
/// Reading the snapshot and writing `out` block the calling thread: this is for the command
/// line, not for a server task.
pub async fn export_csv(
    config: &Config,
    device: &str,
    limit: Option<usize>,
    out: &mut dyn Write,
) -> Result<usize, HistoryError> {
    let points = if config.redis.enabled() {
        let connect = redis_link::connect(&config.redis, EXPORT_TIMEOUT);
        let mut connection = tokio::time::timeout(EXPORT_TIMEOUT, connect)
            .await
            .map_err(|_| HistoryError::Timeout(EXPORT_TIMEOUT))??;
        let key = stream_key(&config.redis.key_prefix, device);
        fetch(&mut connection, &key, limit, EXPORT_TIMEOUT).await?
    } else {
        if config.history.data_dir.is_empty() {
            return Err(HistoryError::NoDataDir);
        }
        let path = Path::new(&config.history.data_dir).join(SNAPSHOT_FILE);
        snapshot_points(&path, device, limit)?
    };
    if points.is_empty() {
        return Err(HistoryError::NoHistory(device.to_string()));
    }
    write_csv(&points, out).map_err(HistoryError::Output)
}

fn write_csv(points: &[Point], out: &mut dyn Write) -> io::Result<usize> {
    let names: BTreeSet<&str> = points
        .iter()
        .flat_map(|p| p.values.iter().map(|(name, _)| name.as_str()))
        .collect();
    let names: Vec<&str> = names.into_iter().collect();
    let mut out = BufWriter::new(out);
    out.write_all(b"timestamp_ms")?;
    for name in &names {
        out.write_all(b",")?;
        write_csv_field(&mut out, name)?;
    }
    out.write_all(b"\n")?;
    let mut row: Vec<Option<f64>> = vec![None; names.len()];
    for point in points {
        row.fill(None);
        for (name, value) in &point.values {
            if let Ok(column) = names.binary_search(&name.as_str()) {
                row[column] = Some(*value);
            }
        }
        write!(out, "{}", point.ts_ms)?;
        for cell in &row {
            match cell {
                Some(value) => write!(out, ",{value}")?,
                None => out.write_all(b",")?,
            }
        }
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(points.len())
}

fn write_csv_field(out: &mut impl Write, field: &str) -> io::Result<()> {
    if field.contains([',', '"', '\n', '\r']) {
        write!(out, "\"{}\"", field.replace('"', "\"\""))
    } else {
        out.write_all(field.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::snapshot::TestDir;

    fn test_config(points_per_device: usize, max_devices: usize, data_dir: &Path) -> Config {
        let mut config = Config::default_config().expect("default config");
        config.history.points_per_device = points_per_device;
        config.history.max_devices = max_devices;
        config.history.data_dir = data_dir.to_string_lossy().into_owned();
        config
    }

    fn values(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    fn point(ts_ms: i64, pairs: &[(&str, f64)]) -> Point {
        Point {
            ts_ms,
            values: values(pairs),
        }
    }

    fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// A memory-mode store without snapshots (so without tasks).
    fn memory(points_per_device: usize, max_devices: usize) -> History {
        let config = test_config(points_per_device, max_devices, Path::new(""));
        History::start(&config, &TaskTracker::new(), CancellationToken::new()).expect("start")
    }

    async fn stop(tracker: &TaskTracker, shutdown: &CancellationToken) {
        shutdown.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("history tasks end at shutdown");
    }

    async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
        let started = Instant::now();
        while !check() {
            assert!(started.elapsed() < within, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn ring_keeps_the_most_recent_points_oldest_first() {
        let history = memory(5, 10);
        for ts in 0..12 {
            history.record("m-1", ts, &values(&[("t", ts as f64)]));
        }
        let all = history.recent("m-1", 100).await.expect("memory");
        let stamps: Vec<i64> = all.iter().map(|p| p.ts_ms).collect();
        assert_eq!(stamps, [7, 8, 9, 10, 11]);
        assert_eq!(all[0], point(7, &[("t", 7.0)]));
        let last = history.recent("m-1", 2).await.expect("memory");
        assert_eq!(last, [point(10, &[("t", 10.0)]), point(11, &[("t", 11.0)])]);
        assert!(history.recent("m-1", 0).await.expect("memory").is_empty());
        assert!(history
            .recent("unknown", 5)
            .await
            .expect("memory")
            .is_empty());
        assert_eq!(count(&history.metrics().points_recorded), 12);
    }

    #[tokio::test]
    async fn ring_with_varying_metrics_stays_consistent_across_wrap() {
        let history = memory(3, 10);
        let mut expected = Vec::new();
        for ts in 0..10 {
            // 1, 2 or 3 values per point, so the values ring wraps unevenly.
            let p = match ts % 3 {
                0 => point(ts, &[("a", ts as f64)]),
                1 => point(ts, &[("a", 1.5), ("b", -(ts as f64))]),
                _ => point(ts, &[("a", 0.0), ("b", 2.0), ("c", ts as f64 * 10.0)]),
            };
            history.record("m-1", p.ts_ms, &p.values);
            expected.push(p);
        }
        let got = history.recent("m-1", 10).await.expect("memory");
        assert_eq!(got, expected[7..]);
    }

    #[tokio::test]
    async fn least_recently_written_device_is_evicted() {
        let history = memory(10, 3);
        for device in ["a", "b", "c"] {
            history.record(device, 1, &values(&[("x", 1.0)]));
        }
        history.record("a", 2, &values(&[("x", 2.0)]));
        history.record("d", 3, &values(&[("x", 3.0)]));
        assert!(history.recent("b", 10).await.expect("memory").is_empty());
        for device in ["a", "c", "d"] {
            assert!(!history.recent(device, 10).await.expect("memory").is_empty());
        }
        assert_eq!(count(&history.metrics().devices_evicted), 1);
        // Reading is not writing: c stays the least recently written and goes next.
        history.recent("c", 10).await.expect("memory");
        history.record("e", 4, &values(&[("x", 4.0)]));
        assert!(history.recent("c", 10).await.expect("memory").is_empty());
        assert_eq!(history.recent("a", 10).await.expect("memory").len(), 2);
        assert_eq!(count(&history.metrics().devices_evicted), 2);
    }

    #[tokio::test]
    async fn metric_names_are_interned_and_capped() {
        let history = memory(10, 10);
        // Order varies between readings; values come back sorted by name.
        history.record("m-1", 1, &values(&[("b", 1.0), ("a", 2.0)]));
        history.record("m-1", 2, &values(&[("a", 3.0), ("b", 4.0)]));
        assert_eq!(
            history.recent("m-1", 10).await.expect("memory"),
            [
                point(1, &[("a", 2.0), ("b", 1.0)]),
                point(2, &[("a", 3.0), ("b", 4.0)])
            ]
        );

        let many: Vec<(String, f64)> = (0..70).map(|i| (format!("m{i:02}"), i as f64)).collect();
        history.record("m-2", 1, &many);
        let stored = history.recent("m-2", 1).await.expect("memory");
        assert_eq!(stored[0].values, many[..MAX_METRICS]);
        assert_eq!(count(&history.metrics().values_refused), 6);
        // A known name still records; a new one is refused.
        history.record("m-2", 2, &values(&[("m00", 9.0), ("new", 1.0)]));
        let stored = history.recent("m-2", 1).await.expect("memory");
        assert_eq!(stored, [point(2, &[("m00", 9.0)])]);
        assert_eq!(count(&history.metrics().values_refused), 7);

        // Non-finite values are skipped; a reading of nothing but them records nothing.
        history.record("m-3", 1, &values(&[("x", f64::NAN), ("y", 1.0)]));
        history.record("m-3", 2, &values(&[("x", f64::INFINITY)]));
        let stored = history.recent("m-3", 10).await.expect("memory");
        assert_eq!(stored, [point(1, &[("y", 1.0)])]);
    }

    #[test]
    fn interning_reuses_ids_and_rings_hold_no_slack_when_full() {
        let mut ring = DeviceRing::new("m-1");
        assert_eq!(ring.intern("a", 0), Some(0));
        assert_eq!(ring.intern("b", 1), Some(1));
        assert_eq!(ring.intern("b", 0), Some(1));
        assert_eq!(ring.intern("a", 5), Some(0));
        let staged = [1.0; MAX_METRICS];
        for ts in 0..1000 {
            ring.push(
                Stamp {
                    ts_ms: ts,
                    mask: 0b11,
                },
                &staged,
                300,
            );
        }
        assert_eq!(ring.stamps.len(), 300);
        assert_eq!(ring.values.len(), 600);
        assert!(ring.stamps.capacity() < 320, "{}", ring.stamps.capacity());
        assert!(ring.values.capacity() < 640, "{}", ring.values.capacity());
    }

    #[tokio::test]
    async fn disabled_store_records_nothing() {
        let dir = TestDir::new("history-disabled");
        let history = History::start(
            &test_config(0, 10, &dir.0),
            &TaskTracker::new(),
            CancellationToken::new(),
        )
        .expect("start");
        history.record("m-1", 1, &values(&[("x", 1.0)]));
        assert!(history
            .recent("m-1", 10)
            .await
            .expect("disabled")
            .is_empty());
        assert!(history.ready());
        assert_eq!(count(&history.metrics().points_recorded), 0);
        assert!(!dir.0.join(SNAPSHOT_FILE).exists());
    }

    #[tokio::test]
    async fn snapshot_round_trip() {
        let dir = TestDir::new("history-snapshot");
        let config = test_config(10, 100, &dir.0);
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let history = History::start(&config, &tracker, shutdown.clone()).expect("start");
        for ts in 0..15 {
            let mut reading = vec![("temperature".to_string(), 20.0 + ts as f64 / 3.0)];
            if ts % 2 == 0 {
                reading.push(("rpm".into(), 1000.0 * ts as f64));
            }
            history.record("m-1", ts, &reading);
        }
        history.record("m-2", 100, &values(&[("x", 1e300), ("y", -0.1)]));
        let before = history.recent("m-1", 100).await.expect("memory");
        assert_eq!(before.len(), 10);
        stop(&tracker, &shutdown).await;
        assert_eq!(count(&history.metrics().snapshot_writes), 1);
        assert_eq!(count(&history.metrics().snapshot_failures), 0);
        let text = fs::read_to_string(dir.0.join(SNAPSHOT_FILE)).expect("snapshot written");
        assert!(
            text.starts_with("vigil-history 1\n{\"device\":\"m-1\""),
            "{text}"
        );
        assert!(!dir.0.join(SNAPSHOT_TMP).exists());

        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let restored = History::start(&config, &tracker, shutdown.clone()).expect("start");
        assert_eq!(restored.recent("m-1", 100).await.expect("memory"), before);
        assert_eq!(
            restored.recent("m-2", 100).await.expect("memory"),
            [point(100, &[("x", 1e300), ("y", -0.1)])]
        );
        stop(&tracker, &shutdown).await;
        // Nothing recorded since the load: the file is left as it was.
        assert_eq!(count(&restored.metrics().snapshot_writes), 0);

        // The file keeps the LRU order: with room for one device, the most recent stays, and
        // with fewer points per device, the most recent points.
        let mut small = config.clone();
        small.history.max_devices = 1;
        small.history.points_per_device = 2;
        let shrunk =
            History::start(&small, &TaskTracker::new(), CancellationToken::new()).expect("start");
        assert!(shrunk.recent("m-1", 100).await.expect("memory").is_empty());
        assert_eq!(shrunk.recent("m-2", 100).await.expect("memory").len(), 1);
        let mut small = config.clone();
        small.history.points_per_device = 2;
        let shrunk =
            History::start(&small, &TaskTracker::new(), CancellationToken::new()).expect("start");
        assert_eq!(
            shrunk.recent("m-1", 100).await.expect("memory"),
            before[8..]
        );
    }

    #[tokio::test]
    async fn snapshots_are_written_periodically() {
        let dir = TestDir::new("history-periodic");
        let mut config = test_config(10, 100, &dir.0);
        config.history.snapshot_interval_secs = 1;
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let history = History::start(&config, &tracker, shutdown.clone()).expect("start");
        history.record("m-1", 1, &values(&[("x", 1.0)]));
        let metrics = history.clone();
        eventually("a periodic snapshot", Duration::from_secs(10), || {
            count(&metrics.metrics().snapshot_writes) == 1
        })
        .await;
        assert!(dir.0.join(SNAPSHOT_FILE).exists());
        stop(&tracker, &shutdown).await;
        // Nothing new since: no second write at shutdown.
        assert_eq!(count(&history.metrics().snapshot_writes), 1);
    }

    #[tokio::test]
    async fn corrupt_snapshot_is_ignored() {
        let dir = TestDir::new("history-corrupt");
        let config = test_config(10, 100, &dir.0);
        let good = "{\"device\":\"m-1\",\"metrics\":[\"x\"],\"points\":[[1,[1.0]]]}";
        let files = [
            String::new(),
            "vigil-history 99\n".to_string(),
            format!("vigil-history 1\n{good}\n{{not json\n"),
            "vigil-history 1\n{\"device\":\"m-1\",\"metrics\":[\"x\"],\"points\":[[1,[1.0,2.0]]]}\n"
                .to_string(),
            "vigil-history 1\n{\"device\":\"m-1\",\"metrics\":[\"x\",\"x\"],\"points\":[]}\n"
                .to_string(),
        ];
        for text in files {
            fs::write(dir.0.join(SNAPSHOT_FILE), &text).expect("write");
            let history = History::start(&config, &TaskTracker::new(), CancellationToken::new())
                .expect("a corrupt snapshot does not stop the start");
            assert!(
                history.recent("m-1", 10).await.expect("memory").is_empty(),
                "{text}"
            );
            let mut out = Vec::new();
            let result = export_csv(&config, "m-1", None, &mut out).await;
            assert!(
                matches!(result, Err(HistoryError::SnapshotCorrupt { .. })),
                "{result:?}"
            );
        }
        // Invalid UTF-8 too.
        fs::write(dir.0.join(SNAPSHOT_FILE), b"vigil-history 1\n\xff\xfe\n").expect("write");
        let history =
            History::start(&config, &TaskTracker::new(), CancellationToken::new()).expect("start");
        assert!(history.recent("m-1", 10).await.expect("memory").is_empty());
        // The good line alone loads.
        fs::write(
            dir.0.join(SNAPSHOT_FILE),
            format!("vigil-history 1\n{good}\n"),
        )
        .expect("write");
        let history =
            History::start(&config, &TaskTracker::new(), CancellationToken::new()).expect("start");
        assert_eq!(
            history.recent("m-1", 10).await.expect("memory"),
            [point(1, &[("x", 1.0)])]
        );
    }

    #[test]
    fn csv_has_the_union_of_metrics_empty_cells_and_quoting() {
        let points = [
            point(1, &[("b", 2.5), ("z\"q", 1.0)]),
            point(2, &[("a,1", -3.0)]),
            point(3, &[("a,1", 4.0), ("b", 0.1), ("line\nbreak", 7.0)]),
        ];
        let mut out = Vec::new();
        assert_eq!(write_csv(&points, &mut out).expect("csv"), 3);
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "timestamp_ms,\"a,1\",b,\"line\nbreak\",\"z\"\"q\"\n\
             1,,2.5,,1\n\
             2,-3,,,\n\
             3,4,0.1,7,\n"
        );
    }

    #[tokio::test]
    async fn export_reads_the_snapshot() {
        let dir = TestDir::new("history-export");
        let config = test_config(100, 100, &dir.0);
        let mut out = Vec::new();
        let result = export_csv(&config, "m-1", None, &mut out).await;
        assert!(
            matches!(result, Err(HistoryError::NoSnapshot(_))),
            "{result:?}"
        );
        let no_dir = test_config(100, 100, Path::new(""));
        let result = export_csv(&no_dir, "m-1", None, &mut out).await;
        assert!(matches!(result, Err(HistoryError::NoDataDir)), "{result:?}");

        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let history = History::start(&config, &tracker, shutdown.clone()).expect("start");
        for ts in 0..5 {
            history.record("m-1", ts, &values(&[("x", ts as f64), ("y", 0.5)]));
        }
        history.record("m-1", 5, &values(&[("z", 1.0)]));
        stop(&tracker, &shutdown).await;

        let mut out = Vec::new();
        let rows = export_csv(&config, "m-1", None, &mut out)
            .await
            .expect("export");
        assert_eq!(rows, 6);
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "timestamp_ms,x,y,z");
        assert_eq!(lines[1], "0,0,0.5,");
        assert_eq!(lines[6], "5,,,1");

        let mut out = Vec::new();
        let rows = export_csv(&config, "m-1", Some(2), &mut out)
            .await
            .expect("export");
        assert_eq!(rows, 2);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "timestamp_ms,x,y,z\n4,4,0.5,\n5,,,1\n"
        );

        let result = export_csv(&config, "m-9", None, &mut out).await;
        assert!(
            matches!(result, Err(HistoryError::NoHistory(_))),
            "{result:?}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Redis

    const REDIS_SERVER: &str = "/usr/bin/redis-server";

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    /// A throwaway redis-server, killed on drop.
    struct RedisServer {
        child: Option<std::process::Child>,
    }

    impl RedisServer {
        async fn start(port: u16, dir: &Path) -> RedisServer {
            let child = std::process::Command::new(REDIS_SERVER)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {REDIS_SERVER} (these tests need redis-server): {e}")
                });
            let mut server = RedisServer { child: Some(child) };
            let started = Instant::now();
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                if let Some(child) = server.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("redis-server on port {port} exited: {status}");
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "redis-server did not listen on port {port}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server
        }

        fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn redis_config(port: u16, points_per_device: usize) -> Config {
        let mut config = test_config(points_per_device, 10, Path::new(""));
        config.redis.url = format!("redis://127.0.0.1:{port}");
        config.redis.key_prefix = "vt".into();
        config
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_backend_writes_reads_exports_and_survives_an_outage() {
        let dir = TestDir::new("history-redis");
        let port = free_port();
        let mut server = RedisServer::start(port, &dir.0).await;
        let config = redis_config(port, 100);
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let history = History::start(&config, &tracker, shutdown.clone()).expect("start");
        let metrics = || history.metrics();
        eventually("the writer to connect", Duration::from_secs(10), || {
            history.ready()
        })
        .await;

        // Written in order, read back in order.
        let expected: Vec<Point> = (0..50)
            .map(|i| match i % 5 {
                0 => point(1000 + i, &[("temp", i as f64 / 4.0)]),
                _ => point(1000 + i, &[("rpm", 10.0 * i as f64), ("temp", -1.5)]),
            })
            .collect();
        for p in &expected {
            history.record("dev-a", p.ts_ms, &p.values);
        }
        eventually("50 points written", Duration::from_secs(10), || {
            count(&metrics().points_recorded) == 50
        })
        .await;
        assert_eq!(
            history.recent("dev-a", 1000).await.expect("recent"),
            expected
        );
        assert_eq!(
            history.recent("dev-a", 10).await.expect("recent"),
            expected[40..]
        );
        assert!(history
            .recent("dev-none", 10)
            .await
            .expect("recent")
            .is_empty());

        // MAXLEN ~ 100 bounds the stream to about 100 plus one stream node.
        for i in 0..1000 {
            history.record("dev-b", i, &values(&[("x", i as f64)]));
        }
        eventually("1050 points written", Duration::from_secs(10), || {
            count(&metrics().points_recorded) == 1050
        })
        .await;
        let mut probe = redis::Client::open(config.redis.url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("probe connection");
        let len: usize = redis::cmd("XLEN")
            .arg("{vt}:hist:dev-b")
            .query_async(&mut probe)
            .await
            .expect("XLEN");
        assert!((100..=300).contains(&len), "stream length {len}");
        let last = history.recent("dev-b", 1).await.expect("recent");
        assert_eq!(last, [point(999, &[("x", 999.0)])]);

        let mut out = Vec::new();
        let rows = export_csv(&config, "dev-a", None, &mut out)
            .await
            .expect("export");
        assert_eq!(rows, 50);
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 51);
        assert_eq!(lines[0], "timestamp_ms,rpm,temp");
        assert_eq!(lines[1], "1000,,0");
        assert_eq!(lines[2], "1001,10,-1.5");
        let mut out = Vec::new();
        assert_eq!(
            export_csv(&config, "dev-a", Some(3), &mut out)
                .await
                .expect("export"),
            3
        );
        assert_eq!(metrics().points_dropped.load(Ordering::Relaxed), 0);

        // Outage. A read on the dead connection fails fast, before the writer even notices.
        server.kill();
        let started = Instant::now();
        let result = history.recent("dev-a", 10).await;
        assert!(result.is_err(), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        // Recording neither blocks nor grows without bound; drops are counted.
        let started = Instant::now();
        for i in 0..20_000 {
            history.record("dev-c", i, &values(&[("x", 1.0)]));
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "recording took {took:?}");
        let least = (20_000 - QUEUE_CAPACITY - 2 * BATCH) as u64;
        eventually("drops to be counted", Duration::from_secs(10), || {
            count(&metrics().points_dropped) >= least
        })
        .await;
        eventually("ready to turn false", Duration::from_secs(10), || {
            !history.ready()
        })
        .await;
        let started = Instant::now();
        let result = history.recent("dev-a", 10).await;
        assert!(result.is_err(), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(3));

        // Down long enough for a few retries, then back up on the same port: the writer
        // reconnects and writes what it still holds.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _server = RedisServer::start(port, &dir.0).await;
        eventually("the writer to reconnect", Duration::from_secs(15), || {
            history.ready()
        })
        .await;
        let before = count(&metrics().points_recorded);
        history.record("dev-a", 5000, &values(&[("temp", 1.0)]));
        eventually("queued points written", Duration::from_secs(10), || {
            count(&metrics().points_recorded) > before
        })
        .await;
        let recent = history
            .recent("dev-c", 3)
            .await
            .expect("recent after reconnect");
        assert_eq!(recent.len(), 3);
        stop(&tracker, &shutdown).await;
        assert!(!history.ready());
    }

    #[tokio::test]
    async fn redis_down_at_start_is_not_an_error() {
        let port = free_port();
        let config = redis_config(port, 100);
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let history = History::start(&config, &tracker, shutdown.clone()).expect("start");
        assert!(!history.ready());
        history.record("dev-a", 1, &values(&[("x", 1.0)]));
        let started = Instant::now();
        let result = history.recent("dev-a", 10).await;
        assert!(
            matches!(result, Err(HistoryError::NotConnected)),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        stop(&tracker, &shutdown).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        // The queued point was never written: it is counted as dropped at shutdown.
        assert_eq!(count(&history.metrics().points_dropped), 1);

        let mut bad = config.clone();
        bad.redis.url = "not a url".into();
        let result = History::start(&bad, &TaskTracker::new(), CancellationToken::new());
        assert!(matches!(result, Err(HistoryError::Redis(_))), "{result:?}");
    }
}
