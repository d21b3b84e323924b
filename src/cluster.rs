//! Scale-out: several vigil instances sharing traffic through one Redis.
//!
//! With `[redis] url` set, every instance runs two internal core clients:
//!
//! - the **exporter** (`i-cluster-out`) subscribes to `#` on its own core at QoS 1 and appends
//!   every message a local client published to one shared Redis stream (`{<prefix>}:bus`, `XADD
//!   MAXLEN ~`), and keeps the last retained message per topic in a hash
//!   (`{<prefix>}:retained`);
//! - the **importer** (`i-cluster-in`) reads that stream through a consumer group of its own
//!   (`XREADGROUP`), publishes every message another instance exported into its core with the
//!   envelope's *remote* mark, and acknowledges the entry (`XACK`) once its core has.
//!
//! Why this design (ARCHITECTURE.md has the invariants):
//!
//! - **No loops.** Imported messages carry the remote mark; the exporter never exports them and
//!   the analytics task never scores them. A retained-message clear has no envelope to carry the
//!   mark, so the importer notes the topics it clears and the exporter skips exactly those.
//! - **Nothing accepted is lost on the way.** A message stays in the exporter's outbox until
//!   Redis confirmed the `XADD`; during an outage the outbox holds up to
//!   `redis.outbox_max_messages`/`outbox_max_bytes`, beyond which QoS 0 messages are dropped
//!   (counted) and QoS 1/2 ones stay unacknowledged in the core. A stream entry stays pending in
//!   the importer's group until this instance's core acknowledged it, and pending entries are
//!   read again after every reconnect. What Redis itself keeps across a crash is Redis's
//!   persistence setting (`appendonly yes`; see docs/cluster.md).
//! - **Once each.** Every exported entry carries its origin (instance and process) and a
//!   sequence number. A re-sent batch or a re-read pending entry has a sequence number the
//!   importer has already passed for that origin, and is skipped.
//!
//! Both tasks reconnect to Redis and to the core with backoff and never stop serving local
//! clients; `/readyz` reports `degraded` while Redis is away.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rand::RngCore;
use redis::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::RedisConfig;
use crate::core::{self, Core, CoreError};
use crate::edge::Edge;
use crate::envelope;
use crate::metrics::{ClusterMetrics, Metrics};
use crate::mqtt;
use crate::redis_link::{self, RedisConn};

/// Core client ids of the two tasks (`i-` ids are reserved for internal components).
pub const EXPORT_CLIENT_ID: &str = "i-cluster-out";
pub const IMPORT_CLIENT_ID: &str = "i-cluster-in";
/// Entries per `XADD` pipeline and per `XREADGROUP`.
const BATCH: usize = 256;
/// Imported QoS 1/2 messages handed to the core and not yet acknowledged by it.
const MAX_UNACKED_IMPORTS: usize = 1024;
/// Origins (instance processes) whose last sequence number the importer remembers.
const MAX_ORIGINS: usize = 1024;
/// Topics of retained-message clears the importer wrote and the exporter has not seen yet.
const MAX_IMPORTED_CLEARS: usize = 65_536;
/// How long one `XREADGROUP` waits for new entries.
const READ_BLOCK_MS: u64 = 1000;
/// Redis round trips taking longer than this fail (and are retried).
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Values of `ClusterMetrics::state`.
pub const REDIS_DOWN: u64 = 1;
pub const REDIS_UP: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the core refused the cluster subscription")]
    SubscribeRefused,
    #[error("core connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the core sent a malformed packet: {0}")]
    Codec(#[from] mqtt::CodecError),
    #[error("the core closed the connection")]
    Closed,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Reply(&'static str),
}

/// Names of everything this instance uses in Redis.
#[derive(Debug, Clone)]
struct Keys {
    bus: String,
    retained: String,
    /// This instance's consumer group.
    group: String,
    /// `<instance>/<process nonce>`: who exported an entry.
    origin: String,
    instance: String,
}

impl Keys {
    fn new(config: &RedisConfig) -> Keys {
        let mut nonce = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut nonce);
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let instance = if config.instance_id.is_empty() {
            format!("v-{}", hex(&nonce[..4]))
        } else {
            config.instance_id.clone()
        };
        let p = &config.key_prefix;
        Keys {
            bus: redis_link::key(p, "bus"),
            retained: redis_link::key(p, "retained"),
            group: format!("{p}:group:{instance}"),
            origin: format!("{instance}/{}", hex(&nonce)),
            instance,
        }
    }

    /// Whether `origin` is this instance (in this or an earlier process): its messages were
    /// delivered locally when they were published.
    fn is_mine(&self, origin: &[u8]) -> bool {
        origin.len() > self.instance.len()
            && origin.starts_with(self.instance.as_bytes())
            && origin[self.instance.len()] == b'/'
    }
}

/// State the two tasks share.
struct Shared {
    keys: Keys,
    config: RedisConfig,
    metrics: Arc<Metrics>,
    exporter_up: AtomicBool,
    importer_up: AtomicBool,
    /// Topics whose retained message the importer cleared (a bare empty payload the exporter
    /// must not send back), with how many such clears are outstanding.
    imported_clears: Mutex<HashMap<Bytes, u32>>,
}

impl Shared {
    fn cm(&self) -> &ClusterMetrics {
        &self.metrics.cluster
    }

    fn set_up(&self, flag: &AtomicBool, up: bool) {
        flag.store(up, Relaxed);
        let both = self.exporter_up.load(Relaxed) && self.importer_up.load(Relaxed);
        self.cm()
            .state
            .store(if both { REDIS_UP } else { REDIS_DOWN }, Relaxed);
    }

    fn note_imported_clear(&self, topic: &Bytes) -> bool {
        let Ok(mut clears) = self.imported_clears.lock() else {
            return false;
        };
        if clears.len() >= MAX_IMPORTED_CLEARS && !clears.contains_key(topic) {
            return false;
        }
        *clears.entry(topic.clone()).or_insert(0) += 1;
        true
    }

    fn take_imported_clear(&self, topic: &[u8]) -> bool {
        let Ok(mut clears) = self.imported_clears.lock() else {
            return false;
        };
        match clears.get_mut(topic) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                clears.remove(topic);
                true
            }
            None => false,
        }
    }
}

/// Starts the exporter and importer (tracked with the connections, so shutdown waits for them).
/// The instance name is logged; both tasks connect to Redis in the background.
pub fn start(edge: &Arc<Edge>, config: &RedisConfig) {
    let shared = Arc::new(Shared {
        keys: Keys::new(config),
        config: config.clone(),
        metrics: edge.metrics.clone(),
        exporter_up: AtomicBool::new(false),
        importer_up: AtomicBool::new(false),
        imported_clears: Mutex::new(HashMap::new()),
    });
    shared.cm().state.store(REDIS_DOWN, Relaxed);
    tracing::info!(
        instance = %shared.keys.instance,
        stream = %shared.keys.bus,
        "cluster mode: sharing traffic through redis"
    );
    let outbox = Arc::new(Outbox::new(config));
    edge.tracker.spawn(
        exporter_core(edge.clone(), shared.clone(), outbox.clone())
            .instrument(tracing::info_span!("cluster_export")),
    );
    edge.tracker.spawn(
        exporter_redis(edge.clone(), shared.clone(), outbox)
            .instrument(tracing::info_span!("cluster_export_redis")),
    );
    edge.tracker
        .spawn(importer(edge.clone(), shared).instrument(tracing::info_span!("cluster_import")));
}

/// Connects to Redis, retrying with backoff until it works or shutdown (`None`).
async fn connect_redis(
    config: &RedisConfig,
    response_timeout: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    metrics: &ClusterMetrics,
) -> Option<RedisConn> {
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = redis_link::connect(config, response_timeout);
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = attempt => r,
        };
        match result {
            Ok(cm) => return Some(cm),
            Err(e) => {
                Metrics::inc(&metrics.redis_errors);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach redis");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

// ---------------------------------------------------------------------------------------------
// Exporter: core -> outbox -> Redis.

/// A message to export.
#[derive(Debug, Clone)]
struct OutMessage {
    topic: Bytes,
    retain: bool,
    /// The payload as stored in the core (envelope included), or empty for a retained clear.
    raw: Bytes,
}

/// One message on its way to the stream, numbered.
#[derive(Debug, Clone)]
struct OutEntry {
    seq: u64,
    message: OutMessage,
}

/// Messages accepted from the core, waiting for Redis to confirm them.
struct Outbox {
    inner: Mutex<OutboxInner>,
    /// Signalled when entries are added (wakes the Redis writer).
    filled: Notify,
    /// Signalled when entries are confirmed (wakes the core side holding messages back).
    drained: Notify,
    max_messages: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct OutboxInner {
    entries: VecDeque<OutEntry>,
    bytes: usize,
    next_seq: u64,
}

impl Outbox {
    fn new(config: &RedisConfig) -> Outbox {
        Outbox {
            inner: Mutex::new(OutboxInner::default()),
            filled: Notify::new(),
            drained: Notify::new(),
            max_messages: config.outbox_max_messages,
            max_bytes: config.outbox_max_bytes,
        }
    }

    /// Appends a message if there is room; `false` when full.
    fn push(&self, message: OutMessage, metrics: &ClusterMetrics) -> bool {
        self.try_push(message, metrics).is_ok()
    }

    /// Appends a message if there is room, else hands it back.
    fn try_push(&self, message: OutMessage, metrics: &ClusterMetrics) -> Result<(), OutMessage> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err(message);
        };
        let size = message.topic.len() + message.raw.len();
        if inner.entries.len() >= self.max_messages
            || (inner.bytes + size > self.max_bytes && !inner.entries.is_empty())
        {
            return Err(message);
        }
        inner.next_seq += 1;
        let seq = inner.next_seq;
        inner.bytes += size;
        inner.entries.push_back(OutEntry { seq, message });
        metrics.outbox.store(inner.entries.len() as u64, Relaxed);
        drop(inner);
        self.filled.notify_one();
        Ok(())
    }

    /// Copies of the oldest entries, at most `n` (cheap: `Bytes` are shared).
    fn front(&self, n: usize) -> Vec<OutEntry> {
        match self.inner.lock() {
            Ok(inner) => inner.entries.iter().take(n).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Removes the entries up to sequence number `last`, which Redis confirmed.
    fn confirm(&self, last: u64, metrics: &ClusterMetrics) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        while inner.entries.front().is_some_and(|e| e.seq <= last) {
            if let Some(e) = inner.entries.pop_front() {
                inner.bytes -= e.message.topic.len() + e.message.raw.len();
                Metrics::inc(&metrics.exported);
            }
        }
        metrics.outbox.store(inner.entries.len() as u64, Relaxed);
        drop(inner);
        self.drained.notify_one();
    }
}

/// The core side of the exporter: one persistent core session subscribed to `#`.
async fn exporter_core(edge: Arc<Edge>, shared: Arc<Shared>, outbox: Arc<Outbox>) {
    let shutdown = edge.shutdown.clone();
    let mut backoff = BACKOFF_MIN;
    loop {
        match export_session(&edge.core, &shared, &outbox, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cluster exporter lost its core connection")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn export_session(
    core: &Core,
    shared: &Shared,
    outbox: &Outbox,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), ClusterError> {
    // A persistent session, the same for the life of the process (the core is per process):
    // after a reconnect the core re-sends what was unacknowledged and keeps the subscription.
    let Some(link) = core
        .connect_internal(EXPORT_CLIENT_ID, false, shutdown)
        .await?
    else {
        return Ok(());
    };
    let (mut rd, mut wr) = link.stream.into_split();
    let mut read_buf = link.read_buf;
    let mut out = BytesMut::with_capacity(4096);
    if !link.session_present {
        mqtt::put_core_subscribe(&mut out, 1, &[(Bytes::from_static(b"#"), 1)]);
    }
    // QoS 1 messages not acknowledged yet because the outbox was full, in the order the core
    // sent them (the core's window of 100 then holds the rest). The core wants acknowledgements
    // in order, so a message not to be exported that arrives behind them waits too (`None`).
    let mut held: VecDeque<(u16, Option<OutMessage>)> = VecDeque::new();
    let mut ping = core::ping_timer();
    let cm = shared.cm();
    loop {
        if read_buf.capacity() - read_buf.len() < 16 * 1024 {
            read_buf.reserve(64 * 1024);
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                core::disconnect(&mut wr).await;
                return Ok(());
            }
            n = rd.read_buf(&mut read_buf) => {
                if n? == 0 {
                    return Err(ClusterError::Closed);
                }
                core::ack_promptly(rd.as_ref());
                while let Some(frame) = mqtt::read_frame(&mut read_buf, usize::MAX)? {
                    match frame.kind() {
                        mqtt::PUBLISH => {
                            let mut p = mqtt::parse_core_publish(&frame)?;
                            // The core clears RETAIN on forwarded messages; the envelope keeps it.
                            p.retain = p.payload.is_empty() || envelope::published_retained(&p.payload);
                            let export = if p.payload.is_empty() {
                                // A retained clear: exported unless the importer wrote it.
                                !shared.take_imported_clear(&p.topic)
                            } else {
                                !envelope::is_remote(&p.payload)
                            };
                            // The core delivers at the subscription's QoS (1): the envelope
                            // tells what the publisher used. QoS 0 messages may be dropped when
                            // the outbox is full; QoS 1/2 ones and retained clears may not.
                            let droppable = envelope::open_qos(&p.payload) == Some(0);
                            let message = export.then_some(OutMessage {
                                topic: p.topic,
                                retain: p.retain,
                                raw: p.payload,
                            });
                            let ack = match message {
                                Some(m) if droppable => {
                                    if !outbox.push(m, cm) {
                                        Metrics::inc(&cm.dropped_qos0);
                                    }
                                    None
                                }
                                Some(m) if held.is_empty() => outbox.try_push(m, cm).err(),
                                other => other,
                            };
                            // Acknowledgements go to the core in the order it sent the messages.
                            if p.qos > 0 {
                                if held.is_empty() && ack.is_none() {
                                    mqtt::put_ack(&mut out, mqtt::PUBACK, p.pkid);
                                } else {
                                    held.push_back((p.pkid, ack));
                                }
                            } else if let Some(m) = ack {
                                // Delivered at QoS 0 (no acknowledgement owed): nothing to hold it
                                // back with, so it is dropped like any QoS 0 message.
                                drop(m);
                                Metrics::inc(&cm.dropped_qos0);
                            }
                        }
                        mqtt::SUBACK => {
                            let (_, codes) = mqtt::parse_core_suback(&frame)?;
                            if !matches!(codes.first(), Some(0..=2)) {
                                return Err(ClusterError::SubscribeRefused);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ = outbox.drained.notified(), if !held.is_empty() => {
                while let Some((pkid, message)) = held.pop_front() {
                    if let Some(message) = message {
                        if let Err(message) = outbox.try_push(message, cm) {
                            held.push_front((pkid, Some(message)));
                            break;
                        }
                    }
                    mqtt::put_ack(&mut out, mqtt::PUBACK, pkid);
                }
            }
            n = wr.write_buf(&mut out), if !out.is_empty() => {
                if n? == 0 {
                    return Err(ClusterError::Closed);
                }
            }
            _ = ping.tick() => mqtt::put_pingreq(&mut out),
        }
    }
}

/// The Redis side of the exporter: writes the outbox to the stream in order, in batches, and
/// confirms entries only after Redis answered.
async fn exporter_redis(edge: Arc<Edge>, shared: Arc<Shared>, outbox: Arc<Outbox>) {
    let shutdown = edge.shutdown.clone();
    let cm = shared.cm();
    let Some(mut conn) = connect_redis(&shared.config, REDIS_TIMEOUT, &shutdown, cm).await else {
        return;
    };
    shared.set_up(&shared.exporter_up, true);
    tracing::info!("cluster exporter connected to redis");
    let mut backoff = BACKOFF_MIN;
    loop {
        let batch = outbox.front(BATCH);
        if batch.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = outbox.filled.notified() => continue,
            }
        }
        let mut pipe = redis::pipe();
        for e in &batch {
            let m = &e.message;
            pipe.cmd("XADD")
                .arg(&shared.keys.bus)
                .arg("MAXLEN")
                .arg("~")
                .arg(shared.config.stream_maxlen)
                .arg("*")
                .arg("o")
                .arg(&shared.keys.origin)
                .arg("s")
                .arg(e.seq)
                .arg("t")
                .arg(&m.topic[..])
                .arg("r")
                .arg(u8::from(m.retain))
                .arg("m")
                .arg(&m.raw[..])
                .ignore();
            if m.retain {
                if m.raw.is_empty() {
                    pipe.cmd("HDEL")
                        .arg(&shared.keys.retained)
                        .arg(&m.topic[..])
                        .ignore();
                } else {
                    pipe.cmd("HSET")
                        .arg(&shared.keys.retained)
                        .arg(&m.topic[..])
                        .arg(&m.raw[..])
                        .ignore();
                }
            }
        }
        let result = tokio::select! {
            // Shutdown waits for nothing: what is still in the outbox is lost with the process,
            // like the core's own queues.
            _ = shutdown.cancelled() => return,
            r = pipe.query_async::<()>(&mut conn) => r,
        };
        match result {
            Ok(()) => {
                if let Some(last) = batch.last() {
                    outbox.confirm(last.seq, cm);
                }
                if !shared.exporter_up.load(Relaxed) {
                    tracing::info!("cluster exporter: redis is back");
                    shared.set_up(&shared.exporter_up, true);
                }
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                Metrics::inc(&cm.redis_errors);
                if shared.exporter_up.load(Relaxed) {
                    tracing::warn!(error = %e, "cluster exporter: redis write failed; messages wait in the outbox");
                    shared.set_up(&shared.exporter_up, false);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Importer: Redis -> core.

/// One stream entry, as the importer needs it.
#[derive(Debug, Default, PartialEq)]
struct Entry {
    id: Bytes,
    origin: Bytes,
    seq: u64,
    topic: Bytes,
    retain: bool,
    raw: Bytes,
}

/// What the importer's Redis round trip brought back.
enum Fetched {
    /// Entries read (pending ones when re-reading after a reconnect).
    Entries(Vec<Entry>),
    /// A page of the retained hash and the cursor of the next one (0: done).
    Retained(Vec<(Bytes, Bytes)>, u64),
    /// The group exists (or was created).
    GroupReady,
}

/// One `HSCAN` reply: the next cursor and (field, value) pairs.
type HscanPage = (u64, Vec<(Vec<u8>, Vec<u8>)>);

/// Where the importer stands with Redis.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Create the consumer group (at the stream's end when new, unless `from_start`).
    Group { from_start: bool },
    /// Load the retained hash page by page (only at the first start).
    Retained { cursor: u64 },
    /// Re-read entries delivered to us but not acknowledged.
    Pending,
    /// Read new entries.
    Live,
}

async fn importer(edge: Arc<Edge>, shared: Arc<Shared>) {
    let shutdown = edge.shutdown.clone();
    let cm = shared.cm();
    let Some(conn) = connect_redis(
        &shared.config,
        REDIS_TIMEOUT + Duration::from_millis(READ_BLOCK_MS),
        &shutdown,
        cm,
    )
    .await
    else {
        return;
    };
    let mut state = Importer {
        conn,
        phase: Phase::Group { from_start: false },
        last_seq: HashMap::new(),
        to_ack: Vec::new(),
        unacked: VecDeque::new(),
        next_pkid: 0,
        backoff: BACKOFF_MIN,
        pending_after: Bytes::from_static(b"0"),
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        match import_session(&edge, &shared, &mut state, &shutdown).await {
            Ok(()) => {
                if shared.config.instance_id.is_empty() {
                    forget_group(&shared.keys, &mut state.conn).await;
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cluster importer lost its core connection")
            }
        }
        // Messages the core had not acknowledged are read again from the pending list.
        state.unacked.clear();
        if matches!(state.phase, Phase::Live | Phase::Pending) {
            state.enter_pending();
        }
        // Their sequence numbers were passed already: forget them so they are imported again.
        state.last_seq.clear();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// At shutdown of an instance with a random name: its consumer group would never be used
/// again, so it is removed (best effort) instead of accumulating in Redis.
async fn forget_group(keys: &Keys, conn: &mut RedisConn) {
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("DESTROY").arg(&keys.bus).arg(&keys.group);
    let destroy = cmd.query_async::<()>(conn);
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), destroy).await {
        tracing::debug!(error = %e, "could not remove this instance's consumer group");
    }
}

struct Importer {
    conn: RedisConn,
    phase: Phase,
    /// Highest sequence number imported per origin (`MAX_ORIGINS` at most).
    last_seq: HashMap<Bytes, u64>,
    /// Entry ids to acknowledge with the next round trip.
    to_ack: Vec<Bytes>,
    /// Core packet id and stream entry id of imported QoS 1/2 messages the core has not
    /// acknowledged yet, in the order written.
    unacked: VecDeque<(u16, Option<Bytes>)>,
    next_pkid: u16,
    backoff: Duration,
    /// The pending-list read continues after this entry id (`0`: from the start).
    pending_after: Bytes,
}

impl Importer {
    fn enter_pending(&mut self) {
        self.phase = Phase::Pending;
        self.pending_after = Bytes::from_static(b"0");
    }

    fn fresh_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let pkid = self.next_pkid;
            if !self.unacked.iter().any(|(p, _)| *p == pkid) {
                return pkid;
            }
        }
    }

    /// The next Redis round trip, or `None` when there is nothing to do until the core
    /// acknowledges something.
    fn next_op(
        &mut self,
        shared: &Shared,
    ) -> Option<BoxFuture<'static, redis::RedisResult<Fetched>>> {
        let mut conn = self.conn.clone();
        let keys = shared.keys.clone();
        let acks = std::mem::take(&mut self.to_ack);
        let room = self.unacked.len() + BATCH <= MAX_UNACKED_IMPORTS;
        match self.phase {
            Phase::Group { from_start } => Some(
                async move {
                    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&keys.bus)
                        .arg(&keys.group)
                        .arg(if from_start { "0" } else { "$" })
                        .arg("MKSTREAM")
                        .query_async(&mut conn)
                        .await;
                    match created {
                        Err(e) if e.code() != Some("BUSYGROUP") => Err(e),
                        _ => Ok(Fetched::GroupReady),
                    }
                }
                .boxed(),
            ),
            Phase::Retained { cursor } if room => Some(
                async move {
                    let (next, items): HscanPage = redis::cmd("HSCAN")
                        .arg(&keys.retained)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(BATCH)
                        .query_async(&mut conn)
                        .await?;
                    let items = items
                        .into_iter()
                        .map(|(t, m)| (Bytes::from(t), Bytes::from(m)))
                        .collect();
                    Ok(Fetched::Retained(items, next))
                }
                .boxed(),
            ),
            Phase::Pending | Phase::Live if room || !acks.is_empty() => {
                let pending = (self.phase == Phase::Pending).then(|| self.pending_after.clone());
                Some(
                    async move {
                        let mut pipe = redis::pipe();
                        if !acks.is_empty() {
                            let ack = pipe.cmd("XACK").arg(&keys.bus).arg(&keys.group);
                            for id in &acks {
                                ack.arg(&id[..]);
                            }
                            ack.ignore();
                        }
                        if !room {
                            pipe.query_async::<()>(&mut conn).await?;
                            return Ok(Fetched::Entries(Vec::new()));
                        }
                        let read = pipe
                            .cmd("XREADGROUP")
                            .arg("GROUP")
                            .arg(&keys.group)
                            .arg(&keys.origin)
                            .arg("COUNT")
                            .arg(BATCH);
                        if pending.is_none() {
                            read.arg("BLOCK").arg(READ_BLOCK_MS);
                        }
                        read.arg("STREAMS").arg(&keys.bus);
                        match &pending {
                            Some(after) => read.arg(&after[..]),
                            None => read.arg(">"),
                        };
                        let (reply,): (Value,) = pipe.query_async(&mut conn).await?;
                        parse_read_reply(reply)
                            .map(Fetched::Entries)
                            .map_err(|what| {
                                redis::RedisError::from((redis::ErrorKind::TypeError, what))
                            })
                    }
                    .boxed(),
                )
            }
            _ => {
                self.to_ack = acks;
                None
            }
        }
    }
}

async fn import_session(
    edge: &Edge,
    shared: &Shared,
    state: &mut Importer,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), ClusterError> {
    let Some(link) = edge
        .core
        .connect_internal(IMPORT_CLIENT_ID, true, shutdown)
        .await?
    else {
        return Ok(());
    };
    let (mut rd, mut wr) = link.stream.into_split();
    let mut read_buf = link.read_buf;
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut ping = core::ping_timer();
    let cm = shared.cm();
    let mut op: Option<BoxFuture<'static, redis::RedisResult<Fetched>>> = None;
    let mut retry_at: Option<Instant> = None;
    loop {
        if op.is_none() && retry_at.is_none() {
            op = state.next_op(shared);
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                core::disconnect(&mut wr).await;
                return Ok(());
            }
            result = async {
                match op.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if op.is_some() => {
                op = None;
                match result {
                    Ok(fetched) => {
                        if !shared.importer_up.load(Relaxed) {
                            tracing::info!("cluster importer connected to redis");
                            shared.set_up(&shared.importer_up, true);
                        }
                        state.backoff = BACKOFF_MIN;
                        handle_fetched(fetched, edge, shared, state, &mut out);
                    }
                    Err(e) => {
                        Metrics::inc(&cm.redis_errors);
                        if e.code() == Some("NOGROUP") {
                            // Redis lost the stream (restarted without persistence): whatever
                            // is in the new stream is new to us.
                            state.phase = Phase::Group { from_start: true };
                        } else if matches!(state.phase, Phase::Live | Phase::Pending) {
                            state.enter_pending();
                        }
                        if shared.importer_up.load(Relaxed) {
                            tracing::warn!(error = %e, "cluster importer: redis read failed; retrying");
                            shared.set_up(&shared.importer_up, false);
                        }
                        retry_at = Some(Instant::now() + state.backoff);
                        state.backoff = (state.backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)).await }, if retry_at.is_some() => {
                retry_at = None;
            }
            n = rd.read_buf(&mut read_buf) => {
                if n? == 0 {
                    return Err(ClusterError::Closed);
                }
                core::ack_promptly(rd.as_ref());
                while let Some(frame) = mqtt::read_frame(&mut read_buf, usize::MAX)? {
                    if frame.kind() == mqtt::PUBACK {
                        let (pkid, _) = mqtt::parse_ack(&frame)?;
                        if let Some(i) = state.unacked.iter().position(|(p, _)| *p == pkid) {
                            if let Some((_, Some(id))) = state.unacked.remove(i) {
                                state.to_ack.push(id);
                            }
                        }
                    }
                }
            }
            n = wr.write_buf(&mut out), if !out.is_empty() => {
                if n? == 0 {
                    return Err(ClusterError::Closed);
                }
            }
            _ = ping.tick() => mqtt::put_pingreq(&mut out),
        }
    }
}

/// Applies what Redis returned. Retained messages are stored in this instance only as far as
/// its `limits.max_retained_bytes` allows (`Edge::retain`); the others are delivered without
/// RETAIN.
fn handle_fetched(
    fetched: Fetched,
    edge: &Edge,
    shared: &Shared,
    state: &mut Importer,
    out: &mut BytesMut,
) {
    let cm = shared.cm();
    match fetched {
        Fetched::GroupReady => {
            state.phase = match state.phase {
                // A group created at the start of the stream follows a Redis that lost its
                // data; the retained hash went with it.
                Phase::Group { from_start: false } if cm.retained_loaded.load(Relaxed) == 0 => {
                    Phase::Retained { cursor: 0 }
                }
                _ => Phase::Pending,
            };
            state.pending_after = Bytes::from_static(b"0");
        }
        Fetched::Retained(items, next) => {
            for (topic, raw) in items {
                // A stored message that does not fit is not worth delivering now: nobody is
                // subscribed yet at the first start.
                if !importable(&topic, &raw) || !edge.retain(&topic, &raw[..1], &raw[1..]) {
                    continue;
                }
                if publish_imported(out, state, &topic, true, &raw, None).is_some() {
                    Metrics::inc(&cm.retained_loaded);
                }
            }
            if next == 0 {
                state.enter_pending();
            } else {
                state.phase = Phase::Retained { cursor: next };
            }
        }
        Fetched::Entries(entries) => {
            if state.phase == Phase::Pending {
                match entries.last() {
                    Some(last) => state.pending_after = last.id.clone(),
                    None => state.phase = Phase::Live,
                }
            }
            for e in entries {
                if shared.keys.is_mine(&e.origin) {
                    state.to_ack.push(e.id);
                    continue;
                }
                if !fresh(&mut state.last_seq, &e.origin, e.seq) {
                    Metrics::inc(&cm.duplicates_skipped);
                    state.to_ack.push(e.id);
                    continue;
                }
                if e.raw.is_empty() {
                    // A retained clear: applied bare (the one payload without an envelope),
                    // and remembered so the exporter does not send it back.
                    if e.retain && !e.topic.is_empty() && shared.note_imported_clear(&e.topic) {
                        edge.retain(&e.topic, &[], &[]);
                        envelope::put_core_publish(out, false, 0, true, &e.topic, 0, &[], &[]);
                        Metrics::inc(&cm.imported);
                    }
                    state.to_ack.push(e.id);
                    continue;
                }
                let id = e.id;
                let retain = e.retain
                    && importable(&e.topic, &e.raw)
                    && edge.retain(&e.topic, &e.raw[..1], &e.raw[1..]);
                match publish_imported(out, state, &e.topic, retain, &e.raw, Some(id.clone())) {
                    Some(1) => {}
                    Some(_) => state.to_ack.push(id),
                    // Not written by a vigil exporter (no envelope): never delivered, since
                    // without the remote mark it could travel in a loop.
                    None => {
                        state.to_ack.push(id);
                        continue;
                    }
                }
                Metrics::inc(&cm.imported);
            }
        }
    }
}

/// Whether `seq` from `origin` is new, recording it if so.
fn fresh(last_seq: &mut HashMap<Bytes, u64>, origin: &Bytes, seq: u64) -> bool {
    match last_seq.get_mut(origin) {
        Some(last) if seq <= *last => false,
        Some(last) => {
            *last = seq;
            true
        }
        None => {
            if last_seq.len() >= MAX_ORIGINS {
                // Origins are instance processes; forgetting one risks a duplicate only if
                // that process's entries are re-read, never a loss.
                if let Some(k) = last_seq.keys().next().cloned() {
                    last_seq.remove(&k);
                }
            }
            last_seq.insert(origin.clone(), seq);
            true
        }
    }
}

/// Whether a stream entry is a message a vigil exporter wrote (an enveloped payload on a
/// topic), which `publish_imported` writes to the core.
fn importable(topic: &[u8], raw: &[u8]) -> bool {
    !topic.is_empty() && envelope::remote_first_byte(raw).is_some()
}

/// Writes an imported message to the core with the remote mark: at QoS 1 when the publisher
/// used QoS 1 or 2 (the envelope keeps the original), else QoS 0. Returns the QoS used, or
/// `None` (nothing written) when `raw` is not an enveloped payload or `topic` is empty.
fn publish_imported(
    out: &mut BytesMut,
    state: &mut Importer,
    topic: &[u8],
    retain: bool,
    raw: &Bytes,
    id: Option<Bytes>,
) -> Option<u8> {
    let first = envelope::remote_first_byte(raw)?;
    if !importable(topic, raw) {
        return None;
    }
    let qos = u8::from(first & 0x03 > 0);
    let pkid = if qos > 0 {
        let pkid = state.fresh_pkid();
        state.unacked.push_back((pkid, id));
        pkid
    } else {
        0
    };
    envelope::put_core_publish(out, false, qos, retain, topic, pkid, &[first], &raw[1..]);
    Some(qos)
}

/// Parses an `XREADGROUP` reply: `nil` (nothing new) or `[[stream, [[id, [field, value,
/// ...]], ...]]]`. Entries without the fields an exporter writes are returned with defaults
/// and then ignored as empty.
fn parse_read_reply(reply: Value) -> Result<Vec<Entry>, &'static str> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams,
        Value::Map(map) => map
            .into_iter()
            .flat_map(|(k, v)| [k, v])
            .collect::<Vec<_>>()
            .chunks(2)
            .map(|c| Value::Array(c.to_vec()))
            .collect(),
        _ => return Err("XREADGROUP reply is not an array"),
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            return Err("XREADGROUP stream is not an array");
        };
        let Some(Value::Array(entries)) = parts.pop() else {
            return Err("XREADGROUP stream has no entries");
        };
        for entry in entries {
            let Value::Array(mut pair) = entry else {
                return Err("stream entry is not an array");
            };
            let fields = pair.pop();
            let Some(Value::BulkString(id)) = pair.pop() else {
                return Err("stream entry has no id");
            };
            let mut e = Entry {
                id: Bytes::from(id),
                ..Entry::default()
            };
            // A pending entry that was trimmed away comes back with nil fields.
            if let Some(Value::Array(fields)) = fields {
                let mut it = fields.into_iter();
                while let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) =
                    (it.next(), it.next())
                {
                    match k.as_slice() {
                        b"o" => e.origin = Bytes::from(v),
                        b"s" => {
                            e.seq = std::str::from_utf8(&v)
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0)
                        }
                        b"t" => e.topic = Bytes::from(v),
                        b"r" => e.retain = v == b"1",
                        b"m" => e.raw = Bytes::from(v),
                        _ => {}
                    }
                }
            }
            out.push(e);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn read_reply_parses_entries_and_tolerates_trimmed_ones() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"vigil:bus"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![
                        bulk(b"o"),
                        bulk(b"a/01"),
                        bulk(b"s"),
                        bulk(b"7"),
                        bulk(b"t"),
                        bulk(b"x/y"),
                        bulk(b"r"),
                        bulk(b"1"),
                        bulk(b"m"),
                        bulk(b"\xe1hi"),
                    ]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(reply).expect("parses");
        assert_eq!(entries.len(), 2);
        assert_eq!(&entries[0].origin[..], b"a/01");
        assert_eq!(entries[0].seq, 7);
        assert_eq!(&entries[0].topic[..], b"x/y");
        assert!(entries[0].retain);
        assert_eq!(&entries[0].raw[..], b"\xe1hi");
        assert_eq!(&entries[1].id[..], b"2-0");
        assert!(entries[1].raw.is_empty());
        assert!(parse_read_reply(Value::Nil).expect("nil").is_empty());
        assert!(parse_read_reply(Value::Int(3)).is_err());
    }

    #[test]
    fn sequence_numbers_skip_replays_per_origin() {
        let mut last = HashMap::new();
        let a = Bytes::from_static(b"a/1");
        let b = Bytes::from_static(b"b/1");
        assert!(fresh(&mut last, &a, 1));
        assert!(fresh(&mut last, &a, 2));
        assert!(fresh(&mut last, &b, 1));
        // A batch re-sent after a lost reply.
        assert!(!fresh(&mut last, &a, 1));
        assert!(!fresh(&mut last, &a, 2));
        assert!(fresh(&mut last, &a, 3));
    }

    #[test]
    fn own_origin_is_recognised_across_processes() {
        let keys = Keys::new(&RedisConfig {
            instance_id: "node-1".into(),
            ..RedisConfig::default()
        });
        assert!(keys.is_mine(keys.origin.as_bytes()));
        assert!(keys.is_mine(b"node-1/0011"));
        assert!(!keys.is_mine(b"node-10/0011"));
        assert!(!keys.is_mine(b"node-1"));
        assert!(!keys.is_mine(b"node-2/0011"));
    }

    #[test]
    fn outbox_bounds_and_confirms_in_order() {
        let metrics = ClusterMetrics::default();
        let outbox = Outbox::new(&RedisConfig {
            outbox_max_messages: 3,
            ..RedisConfig::default()
        });
        let message = |raw: &[u8]| OutMessage {
            topic: Bytes::from_static(b"t"),
            retain: false,
            raw: Bytes::copy_from_slice(raw),
        };
        for i in 0..3u8 {
            assert!(outbox.push(message(&[i]), &metrics));
        }
        let refused = outbox.try_push(message(b"x"), &metrics);
        assert!(
            matches!(refused, Err(m) if &m.raw[..] == b"x"),
            "handed back when full"
        );
        let front = outbox.front(2);
        assert_eq!(front.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        outbox.confirm(2, &metrics);
        assert_eq!(metrics.exported.load(Relaxed), 2);
        assert_eq!(metrics.outbox.load(Relaxed), 1);
        assert!(outbox.push(message(b""), &metrics));
        assert_eq!(
            outbox.front(10).iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4]
        );
    }
}
