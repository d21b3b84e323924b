//! Persistent sessions across restarts (`[persistence] dir`).
//!
//! The core holds a persistent session's subscriptions and queues its messages while the
//! client is away, but only in memory. With `[persistence] dir` the registry keeps, for each
//! kept session, its subscriptions (with the options the edge applies) and its Session Expiry
//! Interval (`registry::Saved`); they are saved to [`FILE`] (`Registry::save`, by
//! `snapshot::autosave` and at shutdown) and, at the next start, before any listener accepts
//! a client, `restore` builds every session again in the core: a core connection under a new
//! session slot and its SUBSCRIBEs, closed once they are granted (the session stays). A client
//! that comes back finds its session (CONNACK session present) and gets what was published
//! to its filters since the restart.
//!
//! An offline session's delayed will is kept with it and published when it is due, counting
//! the time vigil was down; a session whose expiry ran out meanwhile is not restored, and its
//! will, if it had one, is published once the other sessions are back. So are the packet ids
//! of the QoS 2 publishes an offline client had not yet released, so that its PUBREL, or a
//! re-sent PUBLISH, after the restart is answered as before it.
//!
//! So are the messages the core had queued for an offline session, and those in flight to
//! it that its client had not acknowledged: at shutdown, once every connection has ended,
//! `drain` opens each offline session's core connection, takes what the core sends it
//! (acknowledging each so the core sends the next) and hands it to the registry
//! (`OfflineState::queued`), at most [`registry::MAX_QUEUED`] per session and
//! [`DRAIN_MAX_BYTES`] in all, within `[persistence] drain_secs`. When the client comes
//! back, the edge delivers them before anything the core has for it (`connection`), a
//! delivery it had not acknowledged under the packet id it knows, with DUP set. Not kept:
//! QoS 2 deliveries the client had received (PUBREC) but not completed, whose PUBREL it
//! waits for; and anything after a crash (the autosave does not drain the core).
//!
//! The file is a `snapshot` file; each record is (client id, expiry, subscriptions, will,
//! unreleased QoS 2 ids, offline since, unacknowledged deliveries, queued messages),
//! numbers big-endian: the expiry is a kind byte (0 never, 1 at a Unix
//! time in seconds, 2 so many seconds after the restore, for a session that was connected)
//! and 8 bytes; the subscriptions are, per filter, its length (2 bytes), the filter, the
//! options byte and the Subscription Identifier (4 bytes); the will is empty or: when it is
//! due (Unix time in milliseconds, 8 bytes), QoS, retain, whether it has a Message Expiry
//! Interval, that interval (4 bytes), the topic's length (2 bytes), the topic, the
//! properties' length (4 bytes), the properties and the payload; the ids are 2 bytes each;
//! "offline since" is empty for a session that was connected, else a Unix time in
//! milliseconds (8 bytes), so that eviction order and `limits.persistent_session_expiry_secs`
//! count the time vigil was down; an unacknowledged delivery is the packet id the client
//! knows (2 bytes), the digest that recognises it (8 bytes) and whether the client had
//! acknowledged it (1 byte: bit 0 acknowledged, bit 1 by PUBREC); a queued message is its
//! PUBLISH header byte, the length of the rest (4 bytes) and the rest as the core sent it,
//! with packet id 0. Version 1 files (the first six fields) are still read.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::registry::{
    self, Expires, Keep, OfflineState, Redelivery, Registry, SavedSession, SubOptions, Will,
};
use super::snapshot::{self, SnapshotError};
use super::Edge;
use crate::core::CoreError;
use crate::metrics::Metrics;
use crate::mqtt::{self, Frame};

/// The file the persistent sessions are saved to, in `[persistence] dir`.
pub const FILE: &str = "sessions.bin";
/// The first line of [`FILE`]; the number is the format version.
pub const FILE_HEADER: &[u8] = b"vigil persistent sessions 2\n";
/// The first line of a version 1 file, which had no unacknowledged or queued messages.
const FILE_HEADER_V1: &[u8] = b"vigil persistent sessions 1\n";
/// Bytes of messages `drain` keeps over all sessions.
pub const DRAIN_MAX_BYTES: usize = 64 << 20;
/// Sessions drained at the same time.
const DRAINING_AT_ONCE: usize = 256;
/// A session is drained once the core has sent nothing for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(20);
/// Filters per SUBSCRIBE when a session is built again in the core.
const SUBSCRIBE_BATCH: usize = 32;
/// Sessions restored at the same time.
const RESTORING_AT_ONCE: usize = 16;
/// Tries to build one session in the core before giving up on it.
const ATTEMPTS: usize = 3;
/// Longest the core may take to answer a restored session's SUBSCRIBEs.
const CORE_ANSWER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("core connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] mqtt::CodecError),
    #[error("the core refused the session's connection (code {0})")]
    Refused(u8),
    #[error("the core did not answer the session's SUBSCRIBEs in time")]
    Timeout,
}

impl snapshot::Persisted for Registry {
    const WHAT: &'static str = "persistent sessions";

    fn changes(&self) -> u64 {
        Registry::changes(self)
    }

    fn save(&self, dir: &Path) -> Result<usize, SnapshotError> {
        let sessions = self.saved_sessions(crate::envelope::unix_millis());
        let mut out = snapshot::Writer::create(dir, FILE, FILE_HEADER)?;
        let (mut subs, mut will, mut ids) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
        let (mut unacked, mut queued) = (BytesMut::new(), BytesMut::new());
        for s in &sessions {
            let (kind, value) = match s.expires {
                Expires::Never => (0u8, 0u64),
                Expires::At(at) => (1, at),
                Expires::After(secs) => (2, u64::from(secs)),
            };
            let mut expires = [0u8; 9];
            expires[0] = kind;
            expires[1..].copy_from_slice(&value.to_be_bytes());
            subs.clear();
            for (filter, sub) in &s.subscriptions {
                // A filter is at most 65,535 bytes (MQTT's string length).
                subs.put_u16(filter.len() as u16);
                subs.put_slice(filter);
                subs.put_u8(sub.options);
                subs.put_u32(sub.id);
            }
            will.clear();
            if let Some((at, w)) = &s.will {
                will.put_u64(*at);
                will.put_u8(w.qos);
                will.put_u8(u8::from(w.retain));
                will.put_u8(u8::from(w.message_expiry.is_some()));
                will.put_u32(w.message_expiry.unwrap_or(0));
                will.put_u16(w.topic.len() as u16);
                will.put_slice(&w.topic);
                will.put_u32(w.properties.len() as u32);
                will.put_slice(&w.properties);
                will.put_slice(&w.payload);
            }
            ids.clear();
            s.inbound_qos2.iter().for_each(|&id| ids.put_u16(id));
            let since = s.offline_since.map(u64::to_be_bytes);
            let since: &[u8] = since.as_ref().map_or(&[], |b| &b[..]);
            unacked.clear();
            for r in &s.unacked_out {
                unacked.put_u16(r.client_id);
                unacked.put_u64(r.fingerprint);
                unacked.put_u8(u8::from(r.acked) | u8::from(r.client_qos2) << 1);
            }
            queued.clear();
            for f in &s.queued {
                queued.put_u8(f.header);
                // A frame is at most the core's packet size, far below 4 GB.
                queued.put_u32(f.body.len() as u32);
                queued.put_slice(&f.body);
            }
            out.record(&[
                s.client_id.as_bytes(),
                &expires,
                &subs,
                &will,
                &ids,
                since,
                &unacked,
                &queued,
            ])?;
        }
        Ok(out.finish()? as usize)
    }

    fn counters(metrics: &Metrics) -> (&AtomicU64, &AtomicU64) {
        (&metrics.session_saves, &metrics.session_save_failures)
    }
}

/// Reads the sessions saved in `dir` (none when there is no file). A record that does not
/// decode is left out (the digest matched, so only a writer bug could make one).
pub fn load(dir: &Path) -> Result<Vec<SavedSession>, SnapshotError> {
    let mut sessions = Vec::new();
    let mut each = |record: &[&[u8]]| {
        if let Some(session) = decode(record) {
            sessions.push(session);
        }
    };
    match snapshot::read(dir, FILE, FILE_HEADER, 8, &mut each) {
        Err(SnapshotError::Corrupt {
            reason: "unknown header",
            ..
        }) => {
            snapshot::read(dir, FILE, FILE_HEADER_V1, 6, &mut each)?;
        }
        other => {
            other?;
        }
    }
    Ok(sessions)
}

fn decode(record: &[&[u8]]) -> Option<SavedSession> {
    let client_id = std::str::from_utf8(record[0]).ok()?.to_string();
    let (&kind, value) = record[1].split_first()?;
    let value = u64::from_be_bytes(value.try_into().ok()?);
    let expires = match kind {
        0 => Expires::Never,
        1 => Expires::At(value),
        2 => Expires::After(u32::try_from(value).ok()?),
        _ => return None,
    };
    let mut subs = record[2];
    let mut subscriptions = Vec::new();
    while subs.has_remaining() {
        if subs.remaining() < 2 {
            return None;
        }
        let len = subs.get_u16() as usize;
        if subs.remaining() < len + 5 {
            return None;
        }
        let filter = Bytes::copy_from_slice(&subs[..len]);
        subs.advance(len);
        let options = subs.get_u8();
        let id = subs.get_u32();
        subscriptions.push((filter, SubOptions { options, id }));
    }
    Some(SavedSession {
        client_id,
        expires,
        subscriptions,
        will: decode_will(record[3])?,
        inbound_qos2: decode_ids(record[4])?,
        offline_since: match record[5] {
            [] => None,
            since => Some(u64::from_be_bytes(since.try_into().ok()?)),
        },
        unacked_out: match record.get(6) {
            Some(data) => decode_unacked(data)?,
            None => Vec::new(),
        },
        queued: match record.get(7) {
            Some(data) => decode_queued(data)?,
            None => Vec::new(),
        },
    })
}

/// The seventh field: unacknowledged deliveries, 11 bytes each.
fn decode_unacked(data: &[u8]) -> Option<Vec<Redelivery>> {
    if data.len() % 11 != 0 || data.len() / 11 > registry::MAX_PENDING_QOS2 {
        return None;
    }
    Some(
        data.chunks_exact(11)
            .map(|mut r| {
                let client_id = r.get_u16();
                let fingerprint = r.get_u64();
                let flags = r.get_u8();
                Redelivery {
                    client_id,
                    fingerprint,
                    acked: flags & 1 != 0,
                    client_qos2: flags & 2 != 0,
                }
            })
            .collect(),
    )
}

/// The eighth field: queued core PUBLISH frames (packet id 0).
fn decode_queued(mut data: &[u8]) -> Option<Vec<Frame>> {
    let mut frames = Vec::new();
    while data.has_remaining() {
        if data.remaining() < 5 || frames.len() == registry::MAX_QUEUED {
            return None;
        }
        let header = data.get_u8();
        let len = data.get_u32() as usize;
        if header >> 4 != mqtt::PUBLISH || data.remaining() < len {
            return None;
        }
        frames.push(Frame {
            header,
            body: Bytes::copy_from_slice(&data[..len]),
        });
        data.advance(len);
    }
    Some(frames)
}

/// The fifth field: packet ids, 2 bytes each.
fn decode_ids(data: &[u8]) -> Option<Vec<u16>> {
    if data.len() % 2 != 0 || data.len() / 2 > registry::MAX_PENDING_QOS2 {
        return None;
    }
    Some(
        data.chunks_exact(2)
            .map(|id| u16::from_be_bytes([id[0], id[1]]))
            .collect(),
    )
}

/// The fourth field: empty, or a delayed will and when it is due. `None`: it does not decode.
fn decode_will(mut data: &[u8]) -> Option<Option<(u64, Will)>> {
    if data.is_empty() {
        return Some(None);
    }
    if data.remaining() < 8 + 3 + 4 + 2 {
        return None;
    }
    let at = data.get_u64();
    let (qos, retain, has_expiry) = (data.get_u8(), data.get_u8(), data.get_u8());
    let message_expiry = data.get_u32();
    let topic_len = data.get_u16() as usize;
    if qos > 2 || data.remaining() < topic_len + 4 {
        return None;
    }
    let topic = Bytes::copy_from_slice(&data[..topic_len]);
    data.advance(topic_len);
    let properties_len = data.get_u32() as usize;
    if data.remaining() < properties_len {
        return None;
    }
    let properties = Bytes::copy_from_slice(&data[..properties_len]);
    data.advance(properties_len);
    let will = Will {
        topic,
        retain: retain == 1,
        qos,
        properties,
        message_expiry: (has_expiry == 1).then_some(message_expiry),
        payload: Bytes::copy_from_slice(data),
    };
    Some(Some((at, will)))
}

/// What `restore` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub restored: usize,
    /// Expired while vigil was down.
    pub expired: usize,
    /// Beyond `limits.max_persistent_sessions`.
    pub over_cap: usize,
    /// The core could not take them.
    pub failed: usize,
    /// Subscriptions left out: `limits.max_distinct_filters` was reached (or a `$` filter,
    /// which no saved session should have).
    pub filters_refused: usize,
    /// Messages the restored sessions brought along (`OfflineState::queued`).
    pub messages: usize,
}

/// How one saved session fared; a session that ended gives back its delayed will, which
/// `restore` publishes once every session that may be subscribed to it is back.
enum Outcome {
    Restored {
        filters_refused: usize,
        messages: usize,
    },
    Expired(Option<Will>),
    OverCap(Option<Will>),
    Failed(Option<Will>),
}

/// Builds the saved `sessions` again in the core and the registry; call it before clients
/// can connect. At most `limits.max_persistent_sessions` sessions are restored.
pub async fn restore(edge: &Arc<Edge>, sessions: Vec<SavedSession>) -> Restored {
    let mut result = Restored::default();
    let room = edge
        .registry
        .max_kept()
        .saturating_sub(edge.registry.kept_sessions());
    let mut sessions = sessions;
    // The wills of the sessions that end here.
    let mut wills = Vec::new();
    if sessions.len() > room {
        result.over_cap = sessions.len() - room;
        wills.extend(sessions.drain(room..).filter_map(|s| Some(s.will?.1)));
    }
    let mut tasks = JoinSet::new();
    let mut sessions = sessions.into_iter();
    loop {
        while tasks.len() < RESTORING_AT_ONCE && !edge.shutdown.is_cancelled() {
            let Some(session) = sessions.next() else {
                break;
            };
            let edge = edge.clone();
            tasks.spawn(async move { restore_one(&edge, session).await });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        match done {
            Ok(Outcome::Restored {
                filters_refused,
                messages,
            }) => {
                result.restored += 1;
                result.filters_refused += filters_refused;
                result.messages += messages;
            }
            Ok(Outcome::Expired(will)) => {
                result.expired += 1;
                wills.extend(will);
            }
            Ok(Outcome::OverCap(will)) => {
                result.over_cap += 1;
                wills.extend(will);
            }
            Ok(Outcome::Failed(will)) => {
                result.failed += 1;
                wills.extend(will);
            }
            Err(_) => result.failed += 1,
        }
    }
    for will in &wills {
        edge.publish_will(will).await;
    }
    edge.note_kept_sessions();
    result
}

async fn restore_one(edge: &Edge, session: SavedSession) -> Outcome {
    // Read per session: a restore of many sessions takes a while.
    let now_ms = crate::envelope::unix_millis();
    let now = now_ms / 1000;
    // Seconds left before the session expires (`None`: never).
    let left = match session.expires {
        Expires::Never => None,
        Expires::After(secs) if secs > 0 => Some(secs),
        Expires::At(at) if at > now => Some(u32::try_from(at - now).unwrap_or(u32::MAX - 1)),
        // The session ended while vigil was down: so did the wait of its will, which never
        // outlasts the session (MQTT-3.1.3-9).
        Expires::After(_) | Expires::At(_) => {
            return Outcome::Expired(session.will.map(|(_, will)| will))
        }
    };
    // Offline for longer than `limits.persistent_session_expiry_secs` allows, downtime
    // included: it ended while vigil was down too.
    let offline_for = session
        .offline_since
        .map(|since| Duration::from_millis(now_ms.saturating_sub(since)));
    if let (Some(offline_for), Some(limit)) = (offline_for, edge.registry.offline_limit()) {
        if offline_for >= limit {
            return Outcome::Expired(session.will.map(|(_, will)| will));
        }
    }
    let id = session.client_id;
    let slot = match edge.registry.keep_session(&id, &edge.shutdown) {
        Keep::New(slot) => slot,
        // An id saved twice: the first one stands.
        Keep::Earlier(_) => return Outcome::Failed(None),
        Keep::Evicting(slot, due) => {
            // Not within the cap `restore` keeps; as at run time, the session offline
            // longest would make room.
            edge.settle(*due).await;
            slot
        }
        Keep::Full => return Outcome::OverCap(session.will.map(|(_, will)| will)),
    };
    let mut subscriptions = session.subscriptions;
    let before = subscriptions.len();
    subscriptions
        .retain(|(filter, _)| filter.first() != Some(&b'$') || filter.starts_with(b"$share/"));
    subscriptions.retain(|(filter, _)| edge.admit_filter(filter));
    let filters_refused = before - subscriptions.len();
    let core_id = registry::slot_core_id(slot);
    let mut attempt = 0;
    while let Err(e) = subscribe_in_core(edge, &core_id, &subscriptions).await {
        attempt += 1;
        if attempt == ATTEMPTS || edge.shutdown.is_cancelled() {
            tracing::warn!(client_id = %id, error = %e, "persistent session not restored");
            edge.registry.end_session(&id);
            edge.wipe_core_session(&core_id).await;
            edge.registry.free_slot(slot);
            return Outcome::Failed(session.will.map(|(_, will)| will));
        }
        tracing::debug!(client_id = %id, error = %e, attempt, "restoring a session again");
        tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
    }
    for (filter, _) in &subscriptions {
        edge.subscribed.insert(filter);
    }
    edge.registry
        .note_session(&id, left.unwrap_or(u32::MAX), true);
    edge.registry
        .note_subscribed(&id, subscriptions.iter().cloned());
    if subscriptions
        .iter()
        .any(|(_, sub)| sub.options & super::connection::NO_LOCAL != 0)
    {
        // From now on publishes carry their origin, as after a live No Local SUBSCRIBE.
        edge.no_local_in_use.store(true, Relaxed);
    }
    // As when a connection ends: the subscriptions only when some have options the edge
    // applies, and the QoS 2 ids the client has yet to release.
    let options = subscriptions
        .iter()
        .any(|&(_, sub)| super::connection::needs_edge(sub));
    let messages = session.queued.len();
    let offline = OfflineState {
        inbound_qos2: session.inbound_qos2,
        unacked_out: session.unacked_out,
        queued: session.queued,
        sub_options: if options { subscriptions } else { Vec::new() },
        subscriptions_known: options,
        ..OfflineState::default()
    };
    if !edge.registry.store_offline(&id, offline) {
        Metrics::inc(&edge.metrics.dropped_qos2_state);
    }
    // Eviction and `limits.persistent_session_expiry_secs` count from when it went offline
    // (from now if that lies before this machine's clock for `Instant`s starts).
    let instant = tokio::time::Instant::now();
    let since = offline_for.and_then(|ago| instant.checked_sub(ago));
    edge.registry
        .session_offline_since(&id, since.unwrap_or(instant));
    if left.is_some() || session.will.is_some() {
        // A will already due goes as soon as the reaper runs.
        let due = |at: u64| instant + Duration::from_millis(at.saturating_sub(now_ms));
        let timers = registry::Timers {
            will: session.will.map(|(at, will)| (due(at), will)),
            session_expires: left.map(|secs| instant + Duration::from_secs(secs.into())),
        };
        if let Err(timers) = edge.registry.set_timers(&id, timers) {
            Metrics::inc(&edge.metrics.dropped_session_timers);
            if let Some((_, will)) = timers.will {
                edge.publish_will(&will).await;
            }
        }
    }
    Outcome::Restored {
        filters_refused,
        messages,
    }
}

/// What `drain` took from the core at shutdown.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Offline sessions looked at.
    pub sessions: usize,
    /// Messages kept for them.
    pub messages: usize,
    /// Messages that did not fit ([`registry::MAX_QUEUED`] per session, [`DRAIN_MAX_BYTES`]
    /// in all): lost.
    pub dropped: usize,
    /// Sessions whose core connection failed, or that the time ran out on (what the core
    /// holds for them is lost; what was taken before is kept).
    pub not_drained: usize,
}

/// Takes from the core what it holds for every offline persistent session (queued messages,
/// and deliveries the client had not acknowledged) into the registry, so that saving the
/// sessions saves them too, within `limit`. Call it at shutdown, once no connection is left.
pub async fn drain(edge: &Arc<Edge>, limit: Duration) -> Drained {
    let sessions = edge.registry.offline_kept();
    let mut result = Drained {
        sessions: sessions.len(),
        ..Drained::default()
    };
    let deadline = tokio::time::Instant::now() + limit;
    // What restored sessions still hold from an earlier restart counts too.
    let held = edge.registry.queued_bytes();
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(
        DRAIN_MAX_BYTES.saturating_sub(held),
    ));
    let mut tasks = JoinSet::new();
    let mut sessions = sessions.into_iter();
    loop {
        while tasks.len() < DRAINING_AT_ONCE {
            let Some((id, slot)) = sessions.next() else {
                break;
            };
            let (edge, budget) = (edge.clone(), budget.clone());
            tasks.spawn(async move {
                let core_id = registry::slot_core_id(slot);
                let taken = drain_one(&edge, &core_id, &budget, deadline).await;
                (id, taken)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let Ok((id, taken)) = done else {
            result.not_drained += 1;
            continue;
        };
        match taken {
            Ok(taken) => {
                result.not_drained += usize::from(taken.cut);
                result.dropped += taken.dropped;
                if !taken.frames.is_empty() {
                    let n = taken.frames.len();
                    let lost = edge.registry.add_queued(&id, taken.frames);
                    result.messages += n - lost;
                    result.dropped += lost;
                }
            }
            Err(e) => {
                tracing::warn!(client_id = %id, error = %e, "queued messages of an offline session not kept");
                result.not_drained += 1;
            }
        }
    }
    result
}

/// What `drain_one` took from the core for one session.
#[derive(Debug, Default)]
struct Taken {
    frames: Vec<Frame>,
    dropped: usize,
    /// The deadline ended it before the core had sent everything.
    cut: bool,
}

/// Opens the core session `core_id` (kept past its connection) and takes the messages the core
/// sends it, acknowledging each, until the core has answered a PINGREQ and then sent nothing
/// for [`DRAIN_QUIET`], or `deadline` passes; the messages come back as the edge's own frames
/// (packet id 0, DUP clear). Those beyond [`registry::MAX_QUEUED`] or the shared `budget` of
/// bytes are counted, not kept. An error after the connection is up ends the drain with what
/// was taken, since what was acknowledged is no longer in the core.
async fn drain_one(
    edge: &Edge,
    core_id: &str,
    budget: &std::sync::atomic::AtomicUsize,
    deadline: tokio::time::Instant,
) -> Result<Taken, RestoreError> {
    let link = tokio::time::timeout_at(deadline, edge.core.connect(core_id, false))
        .await
        .map_err(|_| RestoreError::Timeout)??;
    if link.code != mqtt::rc::ACCEPTED {
        return Err(RestoreError::Refused(link.code));
    }
    let (mut stream, mut read_buf) = (link.stream, link.read_buf);
    let mut taken = Taken::default();
    // The core answers a PINGREQ when it next serves the connection, after what it sent it
    // first: until the PINGRESP, silence only means the core has not got to it yet.
    let mut out = BytesMut::new();
    mqtt::put_pingreq(&mut out);
    let mut answered = false;
    'read: loop {
        loop {
            let frame = match mqtt::read_frame(&mut read_buf, usize::MAX) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(core_id, error = %e, "core sent a malformed packet while draining");
                    break 'read;
                }
            };
            match frame.kind() {
                mqtt::PUBLISH => {
                    let Some((own, pkid)) = own_frame(&frame) else {
                        break 'read;
                    };
                    match (frame.flags() >> 1) & 0x03 {
                        0 => {}
                        1 => mqtt::put_ack(&mut out, mqtt::PUBACK, pkid),
                        _ => mqtt::put_ack(&mut out, mqtt::PUBREC, pkid),
                    }
                    let size = registry::queued_size(&own);
                    let fits = taken.frames.len() < registry::MAX_QUEUED
                        && budget
                            .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(size))
                            .is_ok();
                    if fits {
                        taken.frames.push(own);
                    } else {
                        taken.dropped += 1;
                    }
                }
                mqtt::PINGRESP => answered = true,
                // A QoS 2 delivery the client had received: completing it is all that is left.
                mqtt::PUBREL => {
                    if let Ok((pkid, _)) = mqtt::parse_ack(&frame) {
                        mqtt::put_ack(&mut out, mqtt::PUBCOMP, pkid);
                    }
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        let quiet = match answered {
            true => (tokio::time::Instant::now() + DRAIN_QUIET).min(deadline),
            false => deadline,
        };
        match tokio::time::timeout_at(quiet, stream.read_buf(&mut read_buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => break,
            Err(_) => {
                taken.cut = tokio::time::Instant::now() >= deadline;
                break;
            }
        }
    }
    // As in `subscribe_in_core`: no DISCONNECT.
    super::close_core_link(stream, &out).await;
    Ok(taken)
}

/// A core PUBLISH as the edge's own delivery: packet id 0 and DUP clear; with the core's
/// packet id (0 at QoS 0). `None`: it does not parse.
fn own_frame(frame: &Frame) -> Option<(Frame, u16)> {
    let qos = (frame.flags() >> 1) & 0x03;
    let header = frame.header & !0x08;
    if qos == 0 {
        return Some((
            Frame {
                header,
                body: frame.body.clone(),
            },
            0,
        ));
    }
    let body = &frame.body;
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let at = 2 + topic_len;
    let pkid = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
    let mut own = BytesMut::from(&body[..]);
    own[at] = 0;
    own[at + 1] = 0;
    Some((
        Frame {
            header,
            body: own.freeze(),
        },
        pkid,
    ))
}

/// Opens the core session `core_id` (kept past its connection), subscribes it to
/// `subscriptions` at their QoS, waits for the SUBACKs and closes the connection.
async fn subscribe_in_core(
    edge: &Edge,
    core_id: &str,
    subscriptions: &[(Bytes, SubOptions)],
) -> Result<(), RestoreError> {
    let link = edge.core.connect(core_id, false).await?;
    if link.code != mqtt::rc::ACCEPTED {
        return Err(RestoreError::Refused(link.code));
    }
    let (mut stream, mut read_buf) = (link.stream, link.read_buf);
    let mut out = BytesMut::new();
    let mut batch = Vec::with_capacity(SUBSCRIBE_BATCH);
    let mut owed = 0usize;
    for (n, chunk) in subscriptions.chunks(SUBSCRIBE_BATCH).enumerate() {
        batch.clear();
        batch.extend(chunk.iter().map(|(f, sub)| (f.clone(), sub.options & 0x03)));
        // Packet ids from 1; a session has far fewer than 65,535 batches.
        mqtt::put_core_subscribe(&mut out, (n % 0xFFFF + 1) as u16, &batch);
        owed += 1;
    }
    stream.write_all(&out).await?;
    tokio::time::timeout(CORE_ANSWER, async {
        while owed > 0 {
            while let Some(frame) = mqtt::read_frame(&mut read_buf, usize::MAX)? {
                // Deliveries to the session may come first: the core re-sends them later.
                if frame.kind() == mqtt::SUBACK {
                    owed -= 1;
                }
            }
            if owed > 0 && stream.read_buf(&mut read_buf).await? == 0 {
                return Err(RestoreError::Core(CoreError::Closed));
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| RestoreError::Timeout)??;
    // No DISCONNECT: rumqttd would raise two disconnect events, the second one for whichever
    // connection has the id by then (ARCHITECTURE.md, "the core never sees a DISCONNECT").
    super::close_core_link(stream, &[]).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_sessions_read_back_as_they_were() {
        let dir = snapshot::TestDir::new("sessions-round-trip");
        let registry = Arc::new(
            Registry::new(
                10,
                registry::SessionLimits {
                    max: 10,
                    expiry: None,
                },
            )
            .saving_sessions(2),
        );
        let parent = tokio_util::sync::CancellationToken::new();
        let sub = |options, id| SubOptions { options, id };
        for (id, expiry) in [("dev-1", u32::MAX), ("dev-\u{e9}", 60), ("empty", 5)] {
            assert!(matches!(registry.keep_session(id, &parent), Keep::New(_)));
            registry.note_session(id, expiry, false);
        }
        let filters = [
            (Bytes::from_static(b"cmd/#"), sub(1, 0)),
            (Bytes::from_static(b"$share/g/a/+"), sub(0x2E, 7)),
            (Bytes::from_static(b"over/the/cap"), sub(2, 0)),
        ];
        registry.note_subscribed("dev-1", filters.iter().cloned());
        registry.note_subscribed("dev-\u{e9}", [(filters[0].0.clone(), sub(2, 0))]);
        registry.note_subscribed("dev-\u{e9}", [(filters[0].0.clone(), sub(0, 9))]);
        registry.note_unsubscribed("empty", &[filters[0].0.clone()]);
        // "empty" goes offline with a timer; the others are offline without one or "live".
        registry.session_offline("empty");
        let at = tokio::time::Instant::now() + Duration::from_secs(100);
        let will = Will {
            topic: Bytes::from_static(b"status/empty"),
            retain: true,
            qos: 1,
            properties: Bytes::from_static(&[0x01, 1]),
            message_expiry: Some(30),
            payload: Bytes::from_static(b"offline"),
        };
        let timers = registry::Timers {
            will: Some((at - Duration::from_secs(40), will.clone())),
            session_expires: Some(at),
        };
        registry.set_timers("empty", timers).unwrap();
        let queued = vec![
            Frame {
                header: 0x32,
                body: Bytes::from_static(b"\0\x05cmd/a\0\0one"),
            },
            Frame {
                header: 0x30,
                body: Bytes::from_static(b"\0\x05cmd/b"),
            },
        ];
        let unacked = vec![Redelivery {
            client_id: 3,
            fingerprint: u64::MAX - 1,
            acked: false,
            client_qos2: true,
        }];
        let unreleased = OfflineState {
            inbound_qos2: vec![7, 9],
            unacked_out: unacked.clone(),
            queued: queued[..1].to_vec(),
            ..OfflineState::default()
        };
        assert!(registry.store_offline("empty", unreleased));
        assert_eq!(registry.add_queued("empty", queued[1..].to_vec()), 0);

        let before = registry.changes();
        assert_eq!(snapshot::Persisted::save(&*registry, &dir).unwrap(), 3);
        assert_eq!(registry.changes(), before, "saving changes nothing");
        let mut back = load(&dir).unwrap();
        back.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let mut expected = registry.saved_sessions(crate::envelope::unix_millis());
        expected.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        assert_eq!(back.len(), 3);
        assert_eq!(back[0].subscriptions, filters[..2], "at most 2 kept");
        assert_eq!(back[0].expires, Expires::Never);
        assert_eq!(back[1].subscriptions, [(filters[0].0.clone(), sub(0, 9))]);
        // Not claimed by a connection: counted as offline, without a timer of its own.
        assert_eq!(back[1].expires, Expires::Never);
        assert!(back[2].subscriptions.is_empty());
        assert!(matches!(back[2].expires, Expires::At(_)));
        assert_eq!(back[2].will.as_ref().map(|(_, w)| w), Some(&will));
        assert!(back[0].will.is_none() && back[1].will.is_none());
        assert_eq!(back[2].inbound_qos2, [7, 9]);
        assert_eq!(back[2].unacked_out, unacked);
        assert_eq!(back[2].queued, queued);
        assert!(back[0].queued.is_empty() && back[0].unacked_out.is_empty());
        // "empty" went offline (now); the others were never claimed, so they count as offline
        // since they were kept.
        assert!(back.iter().all(|s| s.offline_since.is_some()));
        assert!(back[0].inbound_qos2.is_empty());
        // The same as read from the registry, up to the clock moving on in between.
        let at_ms = |s: &SavedSession| s.will.as_ref().map(|(at, _)| *at);
        assert!(at_ms(&expected[2]).unwrap() - at_ms(&back[2]).unwrap() < 1000);
        for s in back.iter_mut().chain(expected.iter_mut()) {
            s.will.iter_mut().for_each(|(at, _)| *at = 0);
            s.offline_since = s.offline_since.map(|_| 0);
            if let Expires::At(at) = &mut s.expires {
                *at = 0;
            }
        }
        assert_eq!(back, expected);
    }

    #[test]
    fn version_1_files_are_still_read() {
        let dir = snapshot::TestDir::new("sessions-v1");
        let mut out = snapshot::Writer::create(&dir, FILE, FILE_HEADER_V1).unwrap();
        let mut expires = [0u8; 9];
        expires[0] = 1;
        expires[1..].copy_from_slice(&4_000_000_000u64.to_be_bytes());
        let subs = [&[0, 5][..], b"cmd/#", &[1], &[0, 0, 0, 0]].concat();
        out.record(&[b"dev", &expires, &subs, &[], &[0, 7], &[]])
            .unwrap();
        out.finish().unwrap();
        let back = load(&dir).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].client_id, "dev");
        assert_eq!(back[0].expires, Expires::At(4_000_000_000));
        assert_eq!(back[0].inbound_qos2, [7]);
        assert_eq!(back[0].subscriptions.len(), 1);
        assert!(back[0].queued.is_empty() && back[0].unacked_out.is_empty());
    }

    #[test]
    fn a_drained_publish_becomes_the_edges_own() {
        let core = Frame {
            header: 0x3B, // PUBLISH, DUP, QoS 1, RETAIN
            body: Bytes::from_static(b"\0\x03a/b\x12\x34hi"),
        };
        let (own, pkid) = own_frame(&core).unwrap();
        assert_eq!(pkid, 0x1234);
        assert_eq!(own.header, 0x33);
        assert_eq!(&own.body[..], b"\0\x03a/b\0\0hi");
        let qos0 = Frame {
            header: 0x30,
            body: Bytes::from_static(b"\0\x01ax"),
        };
        assert_eq!(own_frame(&qos0), Some((qos0.clone(), 0)));
        let short = Frame {
            header: 0x32,
            body: Bytes::from_static(b"\0\x05ab"),
        };
        assert_eq!(own_frame(&short), None);
    }

    #[test]
    fn records_that_do_not_decode_are_left_out() {
        assert!(decode(&[b"id", &[3, 0, 0, 0, 0, 0, 0, 0, 0], b"", b"", b"", b""]).is_none());
        assert!(decode(&[b"id", &[0, 0, 0, 0, 0, 0, 0, 0], b"", b"", b"", b""]).is_none());
        assert!(decode(&[b"id", &[0; 9], &[0, 5, b'a'], b"", b"", b""]).is_none());
        assert!(decode(&[b"\xff", &[0; 9], b"", b"", b"", b""]).is_none());
        assert!(
            decode(&[b"id", &[0; 9], b"", &[0; 12], b"", b""]).is_none(),
            "short will"
        );
        assert!(
            decode(&[b"id", &[0; 9], b"", b"", &[0; 3], b""]).is_none(),
            "odd ids"
        );
        let mut bad_qos = vec![0; 8];
        bad_qos.extend([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(decode(&[b"id", &[0; 9], b"", &bad_qos, b"", b""]).is_none());
        assert!(
            decode(&[b"id", &[0; 9], b"", b"", b"", &[0; 7]]).is_none(),
            "short time"
        );
        let ok = decode(&[
            b"id",
            &[2, 0, 0, 0, 0, 0, 0, 0, 9],
            &[0, 1, b'a', 1, 0, 0, 0, 2],
            b"",
            &[0, 7, 1, 0],
            &[0, 0, 0, 0, 0, 0, 0, 5],
        ]);
        assert_eq!(
            ok,
            Some(SavedSession {
                client_id: "id".into(),
                expires: Expires::After(9),
                subscriptions: vec![(Bytes::from_static(b"a"), SubOptions { options: 1, id: 2 })],
                will: None,
                inbound_qos2: vec![7, 256],
                offline_since: Some(5),
                unacked_out: Vec::new(),
                queued: Vec::new(),
            })
        );
        let base: [&[u8]; 6] = [b"id", &[0; 9], b"", b"", b"", b""];
        let with = |unacked: &[u8], queued: &[u8]| {
            let mut record = base.to_vec();
            record.extend([unacked, queued]);
            decode(&record)
        };
        assert!(with(&[0; 10], b"").is_none(), "short delivery");
        assert!(with(b"", &[0x32, 0, 0, 0, 9, 0]).is_none(), "short frame");
        assert!(with(b"", &[0x82, 0, 0, 0, 0]).is_none(), "not a PUBLISH");
        let ok = with(
            &[0, 4, 0, 0, 0, 0, 0, 0, 0, 9, 3],
            &[0x30, 0, 0, 0, 3, 0, 1, b'a'],
        )
        .expect("decodes");
        assert_eq!(
            ok.unacked_out,
            [Redelivery {
                client_id: 4,
                fingerprint: 9,
                acked: true,
                client_qos2: true
            }]
        );
        assert_eq!(
            ok.queued,
            [Frame {
                header: 0x30,
                body: Bytes::from_static(&[0, 1, b'a'])
            }]
        );
    }
}
