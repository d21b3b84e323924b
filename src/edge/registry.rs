//! Live client ids and the little session state the core does not keep.
//!
//! Its jobs: (1) session takeover is done here, before the core sees the new CONNECT, so an
//! old connection is closed cleanly and a v5 client is told why; (2) the packet ids of QoS 2
//! messages a client published but has not yet released (PUBREL) survive a reconnect, because
//! rumqttd forgets them and would otherwise leave a re-sent PUBREL unanswered or deliver a
//! re-sent PUBLISH twice; and the ids of deliveries the client had not acknowledged, so their
//! re-sending carries DUP as MQTT-3.3.1-1 requires; (3) the v5 timers of sessions that have
//! gone offline: a will waiting out its Will Delay Interval and a session waiting out its
//! Session Expiry Interval, which the edge's reaper (`Edge::reap`) acts on; (4) which core
//! client id a connection uses: a session slot's (`slot_core_id`) for a session the core keeps
//! past the connection, a pooled one (`CoreIds`) otherwise; (5) how many sessions the core
//! keeps, at most `limits.max_persistent_sessions`: a new one beyond that evicts the one
//! offline longest, and with `limits.persistent_session_expiry_secs` one offline that long
//! expires. The maps are bounded: live ids by the connection cap, stored offline state and
//! timers by `max_stored` sessions each, the kept sessions and their slots by
//! `SessionLimits::max` (plus the slots of sessions being removed from the core).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::envelope;
use crate::mqtt::Frame;

/// Longest a new connection waits for the one it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Sessions the reaper takes on at once.
const REAP_BATCH: usize = 32;
/// Packet ids kept per offline session.
pub const MAX_PENDING_QOS2: usize = 1024;
/// Messages kept per offline session across a restart (`OfflineState::queued`).
pub const MAX_QUEUED: usize = 1000;

struct Live {
    generation: u64,
    kick: CancellationToken,
    done: watch::Receiver<()>,
}

#[derive(Default)]
struct Inner {
    next_generation: u64,
    live: HashMap<String, Live>,
    /// Packet-id state of offline persistent sessions that rumqttd does not keep.
    offline: HashMap<String, OfflineState>,
    /// Timers of offline sessions (delayed wills, session expiry).
    timers: HashMap<String, Timers>,
    /// Client ids whose session the core holds past their connections (`keep_session`).
    core_sessions: HashMap<String, Kept>,
    /// The same ids, least recently touched (connected, or gone offline) first.
    kept_order: BTreeMap<Touched, String>,
    next_touch: u64,
    /// Session slots given back (`free_slot`), and the next never used.
    free_slots: Vec<u32>,
    next_slot: u32,
    /// Bumped by every change a saved copy of the kept sessions would show (`changes`).
    changes: u64,
}

/// When a kept session was last connected to or left offline; the counter breaks ties.
type Touched = (Instant, u64);

/// A session the core keeps: its place in `kept_order`, its slot, and (when sessions are
/// saved) what a restart needs to build it again.
struct Kept {
    touched: Touched,
    slot: u32,
    saved: Saved,
}

/// What `[persistence]` saves of a kept session: its subscriptions as the core holds them,
/// with the options the edge applies, and its Session Expiry Interval (seconds; `u32::MAX`
/// never). Filled only when the registry saves sessions (`Registry::saving_sessions`); at
/// most `max_subscriptions` subscriptions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Saved {
    pub subscriptions: Vec<(Bytes, SubOptions)>,
    pub expiry: u32,
}

/// A kept session as `Registry::saved_sessions` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSession {
    pub client_id: String,
    pub expires: Expires,
    pub subscriptions: Vec<(Bytes, SubOptions)>,
    /// An offline session's delayed will, and when it is due (Unix time, milliseconds).
    pub will: Option<(u64, Will)>,
    /// An offline session's QoS 2 publishes routed but not yet released by the client's
    /// PUBREL (`OfflineState::inbound_qos2`).
    pub inbound_qos2: Vec<u16>,
    /// An offline session's deliveries the client had not acknowledged
    /// (`OfflineState::unacked_out`) and the messages queued for it
    /// (`OfflineState::queued`), taken from the core at shutdown.
    pub unacked_out: Vec<Redelivery>,
    pub queued: Vec<Frame>,
    /// Since when an offline session has been offline (Unix time, milliseconds; `None`: it
    /// was connected), for eviction and `limits.persistent_session_expiry_secs`.
    pub offline_since: Option<u64>,
}

/// When a saved session expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    Never,
    /// At this Unix time (seconds): the session was offline, its expiry counting.
    At(u64),
    /// This many seconds after it is restored: it was connected, its expiry not yet counting.
    After(u32),
}

/// The core client id of session slot `slot`. A kept session runs in the core under a slot's
/// id, not under an id derived from its client id: rumqttd keeps a record of every client id
/// it has seen and never forgets one (`CoreIds`), so with slots it holds at most as many
/// records for kept sessions as `SessionLimits::max` (plus the slots being wiped).
pub fn slot_core_id(slot: u32) -> String {
    format!("s-{slot}")
}

/// Bounds on the sessions the core keeps past their connections.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Most sessions kept; a new one beyond this evicts the one offline longest.
    pub max: usize,
    /// How long a session may stay offline before it expires, whatever its own expiry
    /// (`None`: as long as the session asks, for ever for a 3.1.1 persistent session).
    pub expiry: Option<Duration>,
}

/// Why the edge ends an offline session (`Due::ended`, with the session's slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its Session Expiry Interval, or `persistent_session_expiry_secs`, ran out.
    Expired,
    /// A new session needed its place (`SessionLimits::max`).
    Evicted,
}

/// What `keep_session` did. The numbers are the session's slot (`slot_core_id`).
pub enum Keep {
    /// The core may hold an earlier session in this slot (it is resumed or replaced).
    Earlier(u32),
    /// A new session is kept in a slot the core holds nothing for.
    New(u32),
    /// A new session is kept in the slot of the one offline longest, which the caller
    /// removes from the core first (`Edge::settle`).
    Evicting(u32, Box<Due>),
    /// All kept sessions are connected: no new one fits.
    Full,
}

pub struct Registry {
    inner: Mutex<Inner>,
    max_stored: usize,
    sessions: SessionLimits,
    /// Subscriptions kept per session for saving (`saving_sessions`); 0: sessions are not
    /// saved and `Kept::saved` stays empty.
    saved_subscriptions: usize,
    /// Wakes the reaper when a timer is set.
    timer_set: Notify,
}

/// A will as the edge publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: Bytes,
    pub retain: bool,
    pub qos: u8,
    /// End-to-end v5 properties, wire encoded, without the message expiry.
    pub properties: Bytes,
    /// Message Expiry Interval (seconds), counted from publication.
    pub message_expiry: Option<u32>,
    pub payload: Bytes,
}

impl Will {
    /// Writes the will, published now, as a core PUBLISH. If it asks to be retained, `retain`
    /// is given the envelope header and the payload to store (an empty payload clears) and
    /// says whether it did; see `Edge::put_will`. QoS 0 into the core is enough: it routes on
    /// receipt and delivers at each subscription's QoS, and the envelope carries the will's
    /// QoS for the min() rule and its expiry.
    pub fn put_core_publish(&self, out: &mut BytesMut, retain: impl FnOnce(&[u8], &[u8]) -> bool) {
        let private = envelope::Private {
            origin: None,
            expires_at: envelope::expires_at(self.message_expiry),
        };
        let header = envelope::header_with(self.qos, private, &self.properties);
        let retain = self.retain && retain(&header, &self.payload);
        envelope::put_core_publish(
            out,
            false,
            0,
            retain,
            &self.topic,
            0,
            &header,
            &self.payload,
        );
    }
}

/// What an offline session is waiting for.
#[derive(Debug, Default)]
pub struct Timers {
    /// A will to publish at this instant, unless the session reconnects first.
    pub will: Option<(Instant, Will)>,
    /// When the session expires (`None`: never).
    pub session_expires: Option<Instant>,
}

impl Timers {
    fn next(&self) -> Option<Instant> {
        let will = self.will.as_ref().map(|(at, _)| *at);
        match (will, self.session_expires) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Work the reaper found due for one client id, with a claim on the id so that no connection
/// can resume the session meanwhile.
pub struct Due {
    pub client_id: String,
    pub will: Option<Will>,
    /// The session has ended: remove it from the core (its slot); the registry has forgotten
    /// it already. An expired session's slot is given back (`free_slot`) once that is done;
    /// an evicted one's goes on to the new session.
    pub ended: Option<(Ended, u32)>,
    pub claim: Claim,
}

/// What the edge remembers of a persistent session between its connections.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OfflineState {
    /// Inbound QoS 2 ids routed but not yet released by the client's PUBREL.
    pub inbound_qos2: Vec<u16>,
    /// Deliveries the core has not seen acknowledged, in the order it sent them: it re-sends
    /// each (under a new id of its own), and the client must get it under the id it knew.
    pub unacked_out: Vec<Redelivery>,
    /// QoS 2 deliveries whose PUBREL the client still needs: (core id, client id). The core
    /// re-sends these PUBRELs under the ids of the connection that ended.
    pub pubrel_out: Vec<(u16, u16)>,
    /// The session's subscriptions when some have what the core cannot hold (No Local,
    /// Retain As Published, Retain Handling 2, a Subscription Identifier); empty otherwise.
    pub sub_options: Vec<(Bytes, SubOptions)>,
    /// `sub_options` is every subscription of the session: an UNSUBSCRIBE of another filter
    /// gets "no subscription existed".
    pub subscriptions_known: bool,
    /// Deliveries the edge itself holds for the session, in order: what the core had queued
    /// or in flight for it when vigil stopped (`sessions::drain`), saved and restored with
    /// it. Core PUBLISH frames with packet id 0 (the edge's own); those the client had
    /// received but not acknowledged have an `unacked_out` entry with the id it knows. At most
    /// [`MAX_QUEUED`].
    pub queued: Vec<Frame>,
}

/// What the edge keeps of a subscription beside the core: its v5 options byte (QoS in the
/// low two bits) and its Subscription Identifier (0: none).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub options: u8,
    pub id: u32,
}

/// A delivery awaiting re-sending when a persistent session resumes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Redelivery {
    /// The packet id the client knows it by (0: it got it at QoS 0).
    pub client_id: u16,
    /// Digest of topic and payload that recognises the core's re-sending.
    pub fingerprint: u64,
    /// The client acknowledged it (PUBACK, or PUBREC with `client_qos2`) but the core had not
    /// been told yet: the re-sending is acknowledged by the edge, not shown to the client.
    pub acked: bool,
    pub client_qos2: bool,
}

impl OfflineState {
    fn is_empty(&self) -> bool {
        self.inbound_qos2.is_empty()
            && self.unacked_out.is_empty()
            && self.queued.is_empty()
            && self.pubrel_out.is_empty()
            && self.sub_options.is_empty()
    }
}

/// What a queued message counts against `sessions::DRAIN_MAX_BYTES`: its bytes as saved.
pub fn queued_size(frame: &Frame) -> usize {
    frame.body.len() + 5
}

/// Client ids for core connections whose session ends with them: clean-session clients and
/// the edge's own short jobs. rumqttd keeps a record of every client id it has ever seen
/// (about 500-570 bytes each, measured) and never forgets one; clients that pick a new random id
/// per connection (MQTT.js and mosquitto_pub by default) would grow it without bound. With
/// ids from this pool it holds at most as many records as the pool has ids. Ids are handed
/// out first-in first-out, so a returned id is reused only after every other free one, long
/// after the core has let go of it.
pub struct CoreIds {
    free: Mutex<VecDeque<u32>>,
}

/// A pooled core client id, given back when dropped (after its core connection is closed).
pub struct CoreIdLease<'a> {
    ids: &'a CoreIds,
    n: u32,
}

impl CoreIds {
    pub fn new(size: u32) -> CoreIds {
        CoreIds {
            free: Mutex::new((0..size).collect()),
        }
    }

    /// An id, or `None` when all are in use (the caller falls back to an id of its own).
    pub fn lease(&self) -> Option<CoreIdLease<'_>> {
        let n = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()?;
        Some(CoreIdLease { ids: self, n })
    }

    /// The lease of an id taken out earlier with [`CoreIdLease::into_raw`].
    pub fn adopt(&self, n: u32) -> CoreIdLease<'_> {
        CoreIdLease { ids: self, n }
    }
}

impl CoreIdLease<'_> {
    /// The core client id: `k-<n>`, apart from client-derived (`c-`) and internal (`i-`) ids.
    pub fn core_id(&self) -> String {
        format!("k-{}", self.n)
    }

    /// The id, kept out of the pool without a borrow of it until [`CoreIds::adopt`] makes
    /// it a lease again (`warm`, whose waiting connections live beside the pool).
    pub fn into_raw(self) -> u32 {
        let n = self.n;
        std::mem::forget(self);
        n
    }
}

impl Drop for CoreIdLease<'_> {
    fn drop(&mut self) {
        let mut free = self.ids.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push_back(self.n);
    }
}

/// Held by a connection for its whole life; dropping it marks the id free.
pub struct Claim {
    pub generation: u64,
    pub kick: CancellationToken,
    _done: watch::Sender<()>,
}

impl Registry {
    pub fn new(max_stored: usize, sessions: SessionLimits) -> Registry {
        Registry {
            inner: Mutex::new(Inner::default()),
            max_stored,
            sessions,
            saved_subscriptions: 0,
            timer_set: Notify::new(),
        }
    }

    /// Keeps what a restart needs of each kept session (`Saved`), at most `max_subscriptions`
    /// subscriptions each (`[persistence]`).
    pub fn saving_sessions(mut self, max_subscriptions: usize) -> Registry {
        self.saved_subscriptions = max_subscriptions.max(1);
        self
    }

    /// Whether kept sessions are saved (`saving_sessions`).
    fn saves_sessions(&self) -> bool {
        self.saved_subscriptions > 0
    }

    /// A count of the changes to what `saved_sessions` reads: equal counts, same sessions.
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// A kept session has connected: `expiry` is its Session Expiry Interval, and `present`
    /// says whether the core still had its earlier state (if not, no subscription is left).
    pub fn note_session(&self, id: &str, expiry: u32, present: bool) {
        if !self.saves_sessions() {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(kept) = inner.core_sessions.get_mut(id) {
            kept.saved.expiry = expiry;
            if !present {
                kept.saved.subscriptions.clear();
            }
            inner.changes += 1;
        }
    }

    /// A kept session subscribed to these filters (new ones, or new options for old ones).
    pub fn note_subscribed(
        &self,
        id: &str,
        filters: impl IntoIterator<Item = (Bytes, SubOptions)>,
    ) {
        if !self.saves_sessions() {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(kept) = inner.core_sessions.get_mut(id) else {
            return;
        };
        let subs = &mut kept.saved.subscriptions;
        for (filter, sub) in filters {
            if let Some(old) = subs.iter_mut().find(|(f, _)| *f == filter) {
                old.1 = sub;
            } else if subs.len() < self.saved_subscriptions {
                subs.push((filter, sub));
            }
        }
        inner.changes += 1;
    }

    /// A kept session unsubscribed from these filters.
    pub fn note_unsubscribed(&self, id: &str, filters: &[Bytes]) {
        if !self.saves_sessions() {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(kept) = inner.core_sessions.get_mut(id) {
            kept.saved
                .subscriptions
                .retain(|(f, _)| !filters.contains(f));
            inner.changes += 1;
        }
    }

    /// Every kept session with what a restart needs, `now` being the Unix time in
    /// milliseconds. Bytes are shared, not copied; the lock is held while the list is made.
    pub fn saved_sessions(&self, now: u64) -> Vec<SavedSession> {
        let inner = self.lock();
        let instant = Instant::now();
        let unix_ms = |at: Instant| now + at.saturating_duration_since(instant).as_millis() as u64;
        inner
            .core_sessions
            .iter()
            // Expiry 0: the session ends with its connection (v5), nothing to restore.
            .filter(|(_, kept)| kept.saved.expiry != 0)
            .map(|(id, kept)| {
                let timers = inner.timers.get(id);
                let expires = match timers.and_then(|t| t.session_expires) {
                    _ if kept.saved.expiry == u32::MAX => Expires::Never,
                    _ if inner.live.contains_key(id) => Expires::After(kept.saved.expiry),
                    Some(at) => Expires::At(unix_ms(at) / 1000),
                    // Offline without a timer: its timer did not fit (it does not expire).
                    None => Expires::Never,
                };
                let will = timers
                    .and_then(|t| t.will.as_ref())
                    .map(|(at, will)| (unix_ms(*at), will.clone()));
                let offline_since = (!inner.live.contains_key(id)).then(|| {
                    let ago = instant.saturating_duration_since(kept.touched.0);
                    now.saturating_sub(ago.as_millis() as u64)
                });
                let (inbound_qos2, unacked_out, queued) = match inner.offline.get(id) {
                    Some(offline) if !inner.live.contains_key(id) => (
                        offline.inbound_qos2.clone(),
                        offline.unacked_out.clone(),
                        offline.queued.clone(),
                    ),
                    _ => Default::default(),
                };
                SavedSession {
                    client_id: id.clone(),
                    expires,
                    subscriptions: kept.saved.subscriptions.clone(),
                    will,
                    inbound_qos2,
                    unacked_out,
                    queued,
                    offline_since,
                }
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the registry down with it: the data is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_claim(inner: &mut Inner, id: &str, kick: CancellationToken) -> (Claim, Option<Live>) {
        let (tx, rx) = watch::channel(());
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let previous = inner.live.insert(
            id.to_string(),
            Live {
                generation,
                kick: kick.clone(),
                done: rx,
            },
        );
        let claim = Claim {
            generation,
            kick,
            _done: tx,
        };
        (claim, previous)
    }

    /// Claims `id` for a new connection, kicking out and waiting for any connection holding it.
    /// `parent` is the shutdown token, so a kick also fires on shutdown.
    pub async fn claim(&self, id: &str, parent: &CancellationToken) -> Claim {
        let (claim, previous) = Self::new_claim(&mut self.lock(), id, parent.child_token());
        if let Some(old) = previous {
            old.kick.cancel();
            let mut done = old.done;
            // `changed` fails once the old connection drops its sender: that is "done".
            let _ = tokio::time::timeout(TAKEOVER_WAIT, async {
                while done.changed().await.is_ok() {}
            })
            .await;
        }
        claim
    }

    /// Releases `id` if `claim` still owns it. Timers the connection set as it ended start to
    /// count for the reaper now.
    pub fn release(&self, id: &str, claim: &Claim) {
        let mut inner = self.lock();
        if inner.live.get(id).map(|l| l.generation) == Some(claim.generation) {
            inner.live.remove(id);
            let expires = self.sessions.expiry.is_some() && inner.core_sessions.contains_key(id);
            if expires || inner.timers.contains_key(id) {
                drop(inner);
                self.timer_set.notify_one();
            }
        }
    }

    pub fn take_offline(&self, id: &str) -> OfflineState {
        self.lock().offline.remove(id).unwrap_or_default()
    }

    /// Stores the state of a persistent session going offline. Returns false when the store
    /// is full and the state was dropped (counted by the caller).
    pub fn store_offline(&self, id: &str, mut state: OfflineState) -> bool {
        let mut inner = self.lock();
        if state.is_empty() {
            inner.offline.remove(id);
            return true;
        }
        if inner.offline.len() >= self.max_stored && !inner.offline.contains_key(id) {
            return false;
        }
        state.inbound_qos2.truncate(MAX_PENDING_QOS2);
        state.unacked_out.truncate(MAX_PENDING_QOS2);
        state.pubrel_out.truncate(MAX_PENDING_QOS2);
        state.queued.truncate(MAX_QUEUED);
        inner.offline.insert(id.to_string(), state);
        true
    }

    /// Bytes of the messages the edge holds for offline sessions (`OfflineState::queued`).
    pub fn queued_bytes(&self) -> usize {
        let inner = self.lock();
        inner
            .offline
            .values()
            .flat_map(|o| &o.queued)
            .map(queued_size)
            .sum()
    }

    /// The kept sessions no connection holds, with their slots (`sessions::drain`).
    pub fn offline_kept(&self) -> Vec<(String, u32)> {
        let inner = self.lock();
        inner
            .core_sessions
            .iter()
            .filter(|(id, kept)| kept.saved.expiry != 0 && !inner.live.contains_key(*id))
            .map(|(id, kept)| (id.clone(), kept.slot))
            .collect()
    }

    /// Appends `frames` to what the edge holds for the offline session `id`
    /// (`OfflineState::queued`, at most [`MAX_QUEUED`]). Returns how many did not fit.
    pub fn add_queued(&self, id: &str, frames: Vec<Frame>) -> usize {
        let mut inner = self.lock();
        let total = frames.len();
        if !inner.offline.contains_key(id) && inner.offline.len() >= self.max_stored {
            return total;
        }
        let state = inner.offline.entry(id.to_string()).or_default();
        let room = MAX_QUEUED.saturating_sub(state.queued.len());
        state.queued.extend(frames.into_iter().take(room));
        inner.changes += 1;
        total.saturating_sub(room)
    }

    pub fn forget_session(&self, id: &str) {
        self.lock().offline.remove(id);
    }

    /// Records that the core holds (or is about to hold) a session for `id` past its
    /// connection, and in which slot. When `SessionLimits::max` sessions are kept already, the
    /// one offline longest makes room: it is forgotten here and claimed, its slot is the new
    /// session's, and the caller removes it from the core before using the slot. `parent` is
    /// the shutdown token, for that claim.
    pub fn keep_session(&self, id: &str, parent: &CancellationToken) -> Keep {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let now = Instant::now();
        if let Some(slot) = Self::touch(inner, id, now) {
            return Keep::Earlier(slot);
        }
        let (keep, slot) = if inner.core_sessions.len() < self.sessions.max {
            let slot = inner.free_slots.pop().unwrap_or_else(|| {
                inner.next_slot += 1;
                inner.next_slot - 1
            });
            (Keep::New(slot), slot)
        } else {
            let oldest = inner
                .kept_order
                .values()
                .find(|kept| !inner.live.contains_key(*kept))
                .and_then(|id| Some((id.clone(), inner.core_sessions.get(id)?.slot)));
            let Some((oldest, slot)) = oldest else {
                return Keep::Full;
            };
            let due = Self::end_offline(inner, oldest, Ended::Evicted, parent);
            (Keep::Evicting(slot, Box::new(due)), slot)
        };
        let touched = Self::next_touch(inner, now);
        let saved = Saved::default();
        inner.changes += 1;
        inner.core_sessions.insert(
            id.to_string(),
            Kept {
                touched,
                slot,
                saved,
            },
        );
        inner.kept_order.insert(touched, id.to_string());
        keep
    }

    /// Forgets the session the core keeps for `id` (it ended, or a clean session replaces
    /// it) and returns its slot, which the caller wipes in the core and then gives back.
    pub fn end_session(&self, id: &str) -> Option<u32> {
        let mut inner = self.lock();
        let kept = inner.core_sessions.remove(id)?;
        inner.kept_order.remove(&kept.touched);
        inner.changes += 1;
        Some(kept.slot)
    }

    /// Gives back a slot whose session the core no longer holds.
    pub fn free_slot(&self, slot: u32) {
        self.lock().free_slots.push(slot);
    }

    /// A kept session goes offline now: it is evicted or expires counting from now.
    pub fn session_offline(&self, id: &str) {
        self.session_offline_since(id, Instant::now());
    }

    /// A kept session has been offline since `since` (a restored one: since before the
    /// restart), for eviction and `SessionLimits::expiry`.
    pub fn session_offline_since(&self, id: &str, since: Instant) {
        let mut inner = self.lock();
        inner.changes += 1;
        Self::touch(&mut inner, id, since);
    }

    /// How long a session may stay offline whatever it asked for (`SessionLimits::expiry`).
    pub fn offline_limit(&self) -> Option<Duration> {
        self.sessions.expiry
    }

    /// The longest Session Expiry Interval (seconds) a session may have
    /// (`SessionLimits::expiry`; `None`: no limit).
    pub fn max_session_expiry(&self) -> Option<u32> {
        let secs = self.sessions.expiry?.as_secs();
        Some(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    /// The most sessions the core may keep (`SessionLimits::max`).
    pub fn max_kept(&self) -> usize {
        self.sessions.max
    }

    /// Sessions the core keeps past their connections.
    pub fn kept_sessions(&self) -> usize {
        self.lock().core_sessions.len()
    }

    fn next_touch(inner: &mut Inner, now: Instant) -> Touched {
        inner.next_touch += 1;
        (now, inner.next_touch)
    }

    /// Moves a kept session to the end of `kept_order`; returns its slot (`None`: not kept).
    fn touch(inner: &mut Inner, id: &str, now: Instant) -> Option<u32> {
        let touched = Self::next_touch(inner, now);
        let kept = inner.core_sessions.get_mut(id)?;
        inner.kept_order.remove(&kept.touched);
        kept.touched = touched;
        inner.kept_order.insert(touched, id.to_string());
        Some(kept.slot)
    }

    /// Forgets everything about the offline session `id` and claims it for the one ending it;
    /// its delayed will, if any, goes now (a session that ends publishes it, MQTT-3.1.3-9).
    fn end_offline(inner: &mut Inner, id: String, ended: Ended, parent: &CancellationToken) -> Due {
        let slot = inner.core_sessions.remove(&id).map(|kept| {
            inner.kept_order.remove(&kept.touched);
            kept.slot
        });
        inner.changes += 1;
        inner.offline.remove(&id);
        let will = inner
            .timers
            .remove(&id)
            .and_then(|t| t.will)
            .map(|(_, will)| will);
        let (claim, _) = Self::new_claim(inner, &id, parent.child_token());
        Due {
            client_id: id,
            will,
            ended: slot.map(|slot| (ended, slot)),
            claim,
        }
    }

    /// When the offline session touched longest ago expires under `SessionLimits::expiry`.
    fn next_kept_expiry(&self, inner: &Inner) -> Option<Instant> {
        let expiry = self.sessions.expiry?;
        inner
            .kept_order
            .iter()
            .find(|(_, id)| !inner.live.contains_key(*id))
            .map(|((at, _), _)| *at + expiry)
    }

    /// Sets the timers of a session going offline; the reaper sees them once the connection
    /// releases its claim. Returns them back when the store is full (the caller publishes the
    /// will at once and counts it).
    pub fn set_timers(&self, id: &str, timers: Timers) -> Result<(), Box<Timers>> {
        let mut inner = self.lock();
        if inner.timers.len() >= self.max_stored && !inner.timers.contains_key(id) {
            return Err(Box::new(timers));
        }
        inner.timers.insert(id.to_string(), timers);
        inner.changes += 1;
        let live = inner.live.contains_key(id);
        drop(inner);
        if !live {
            self.timer_set.notify_one();
        }
        Ok(())
    }

    /// Takes the timers of a session a new connection has claimed: reconnecting cancels them.
    pub fn take_timers(&self, id: &str) -> Option<Timers> {
        self.lock().timers.remove(id)
    }

    /// The earliest timer of a session that is not connected.
    pub fn next_timer(&self) -> Option<Instant> {
        let inner = self.lock();
        let timers = inner
            .timers
            .iter()
            .filter(|(id, _)| !inner.live.contains_key(*id))
            .filter_map(|(_, t)| t.next())
            .min();
        match (timers, self.next_kept_expiry(&inner)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes what is due at `now` for sessions that are not connected, claiming each id; at
    /// most [`REAP_BATCH`] sessions, so that a client reconnecting meanwhile waits for little
    /// work (its claim waits for the reaper's).
    pub fn take_due(&self, now: Instant, parent: &CancellationToken) -> Vec<Due> {
        let mut inner = self.lock();
        let due_ids: Vec<String> = inner
            .timers
            .iter()
            .filter(|(id, t)| !inner.live.contains_key(*id) && t.next().is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .take(REAP_BATCH)
            .collect();
        let mut out = Vec::with_capacity(due_ids.len());
        for id in due_ids {
            let Some(timers) = inner.timers.get_mut(&id) else {
                continue;
            };
            if timers.session_expires.is_some_and(|at| at <= now) {
                out.push(Self::end_offline(&mut inner, id, Ended::Expired, parent));
                continue;
            }
            let will = match timers.will.take() {
                Some((at, will)) if at <= now => Some(will),
                other => {
                    timers.will = other;
                    None
                }
            };
            if timers.next().is_none() {
                inner.timers.remove(&id);
            }
            let (claim, _) = Self::new_claim(&mut inner, &id, parent.child_token());
            out.push(Due {
                client_id: id,
                will,
                ended: None,
                claim,
            });
        }
        // Sessions offline for longer than `SessionLimits::expiry`, oldest first.
        if let Some(expiry) = self.sessions.expiry {
            let inner = &mut *inner;
            let expired: Vec<String> = inner
                .kept_order
                .iter()
                .take_while(|((at, _), _)| *at + expiry <= now)
                .filter(|(_, id)| !inner.live.contains_key(*id))
                .map(|(_, id)| id.clone())
                .take(REAP_BATCH.saturating_sub(out.len()))
                .collect();
            for id in expired {
                out.push(Self::end_offline(inner, id, Ended::Expired, parent));
            }
        }
        out
    }

    /// Waits until a timer is set.
    pub async fn timer_set(&self) {
        self.timer_set.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_ids_are_reused_first_in_first_out_and_run_out() {
        let ids = CoreIds::new(3);
        let a = ids.lease().unwrap();
        let b = ids.lease().unwrap();
        assert_eq!(
            (a.core_id(), b.core_id()),
            ("k-0".to_string(), "k-1".to_string())
        );
        drop(a);
        let c = ids.lease().unwrap();
        assert_eq!(
            c.core_id(),
            "k-2",
            "a returned id waits behind the other free ones"
        );
        let d = ids.lease().unwrap();
        assert_eq!(d.core_id(), "k-0");
        assert!(ids.lease().is_none(), "all in use");
        drop((b, c, d));
        assert!(ids.lease().is_some());
    }

    #[test]
    fn a_core_id_taken_out_raw_stays_in_use_until_adopted_and_dropped() {
        let ids = CoreIds::new(2);
        let raw = ids.lease().unwrap().into_raw();
        let other = ids.lease().unwrap();
        assert!(ids.lease().is_none(), "the raw id is still in use");
        let again = ids.adopt(raw);
        assert_eq!(again.core_id(), format!("k-{raw}"));
        drop(again);
        assert_eq!(ids.lease().unwrap().core_id(), format!("k-{raw}"));
        drop(other);
    }

    const UNLIMITED: SessionLimits = SessionLimits {
        max: 1000,
        expiry: None,
    };

    /// The slot of a session `keep_session` found new.
    fn new_slot(keep: Keep) -> u32 {
        match keep {
            Keep::New(slot) => slot,
            _ => panic!("expected a new session"),
        }
    }

    fn earlier(keep: Keep) -> Option<u32> {
        match keep {
            Keep::Earlier(slot) => Some(slot),
            _ => None,
        }
    }

    #[test]
    fn core_sessions_are_remembered_until_a_clean_session_takes_them() {
        let reg = Registry::new(10, UNLIMITED);
        let root = CancellationToken::new();
        assert_eq!(reg.end_session("a"), None, "unknown id");
        let a = new_slot(reg.keep_session("a", &root));
        assert_eq!(earlier(reg.keep_session("a", &root)), Some(a), "resumed");
        let b = new_slot(reg.keep_session("b", &root));
        assert_ne!(a, b);
        assert_eq!(reg.kept_sessions(), 2);
        assert_eq!(reg.end_session("a"), Some(a), "a clean session ends it");
        assert_eq!(reg.end_session("a"), None);
        assert_eq!(reg.kept_sessions(), 1);
        // A slot is used again only once given back (after the core let go of it).
        let c = new_slot(reg.keep_session("c", &root));
        assert!(c != a && c != b);
        reg.free_slot(a);
        assert_eq!(new_slot(reg.keep_session("d", &root)), a);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_session_over_the_cap_evicts_the_one_offline_longest() {
        let limits = SessionLimits {
            max: 3,
            expiry: None,
        };
        let reg = Registry::new(10, limits);
        let root = CancellationToken::new();
        let s = Duration::from_secs(1);
        // a and c go offline; b stays connected although it was kept first.
        let b = reg.claim("b", &root).await;
        new_slot(reg.keep_session("b", &root));
        tokio::time::advance(s).await;
        let mut c_slot = None;
        for id in ["a", "c"] {
            let claim = reg.claim(id, &root).await;
            c_slot = Some(new_slot(reg.keep_session(id, &root)));
            reg.store_offline(id, offline_with_qos2());
            reg.set_timers(
                id,
                Timers {
                    will: Some((Instant::now() + 60 * s, will("w"))),
                    session_expires: None,
                },
            )
            .unwrap();
            reg.session_offline(id);
            reg.release(id, &claim);
            tokio::time::advance(s).await;
        }
        // A resumed session is not new: no eviction, and it is touched.
        let claim = reg.claim("a", &root).await;
        assert!(earlier(reg.keep_session("a", &root)).is_some());
        reg.session_offline("a");
        reg.release("a", &claim);
        // d needs a place: c has been offline longest (b is connected, a came back since).
        // It takes c's slot, which the caller wipes first.
        let Keep::Evicting(slot, due) = reg.keep_session("d", &root) else {
            panic!("expected an eviction");
        };
        assert_eq!(due.client_id, "c");
        assert_eq!(due.ended, Some((Ended::Evicted, slot)));
        assert_eq!(c_slot, Some(slot));
        assert!(due.will.is_some(), "an ending session's will goes now");
        assert!(reg.take_offline("c").is_empty());
        assert!(reg.take_timers("c").is_none());
        assert_eq!(reg.kept_sessions(), 3);
        // While the eviction holds c's id, it is not evicted again; a is next.
        let Keep::Evicting(_, due_a) = reg.keep_session("e", &root) else {
            panic!("expected an eviction");
        };
        assert_eq!(due_a.client_id, "a");
        // d and e are not connected in this test, but b is: with d and e claimed, nothing
        // offline is left to make room.
        let _d = reg.claim("d", &root).await;
        let _e = reg.claim("e", &root).await;
        assert!(matches!(reg.keep_session("f", &root), Keep::Full));
        assert_eq!(reg.kept_sessions(), 3);
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_offline_longer_than_the_configured_expiry_expire() {
        let limits = SessionLimits {
            max: 10,
            expiry: Some(Duration::from_secs(10)),
        };
        let reg = Registry::new(10, limits);
        let root = CancellationToken::new();
        let s = Duration::from_secs(1);
        let t0 = Instant::now();
        for id in ["a", "b"] {
            let claim = reg.claim(id, &root).await;
            new_slot(reg.keep_session(id, &root));
            if id == "a" {
                assert_eq!(reg.next_timer(), None, "connected sessions do not expire");
            }
            reg.session_offline(id);
            reg.release(id, &claim);
            tokio::time::advance(3 * s).await;
        }
        assert_eq!(reg.next_timer(), Some(t0 + 10 * s));
        assert!(reg.take_due(t0 + 9 * s, &root).is_empty());
        let due = reg.take_due(t0 + 10 * s, &root);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].client_id, "a");
        assert!(matches!(due[0].ended, Some((Ended::Expired, _))));
        assert_eq!(reg.kept_sessions(), 1);
        // b reconnects before its time: its clock starts again when it leaves.
        let claim = reg.claim("b", &root).await;
        assert!(earlier(reg.keep_session("b", &root)).is_some());
        tokio::time::advance(20 * s).await;
        assert_eq!(reg.next_timer(), None);
        assert!(reg.take_due(Instant::now(), &root).is_empty());
        reg.session_offline("b");
        reg.release("b", &claim);
        assert_eq!(reg.next_timer(), Some(Instant::now() + 10 * s));
    }

    fn offline_with_qos2() -> OfflineState {
        OfflineState {
            inbound_qos2: vec![1],
            ..OfflineState::default()
        }
    }

    #[tokio::test]
    async fn takeover_kicks_and_waits_for_the_old_connection() {
        let reg = std::sync::Arc::new(Registry::new(10, UNLIMITED));
        let root = CancellationToken::new();
        let first = reg.claim("a", &root).await;
        let kick = first.kick.clone();
        let reg2 = reg.clone();
        let root2 = root.clone();
        let second = tokio::spawn(async move { reg2.claim("a", &root2).await });
        kick.cancelled().await;
        reg.release("a", &first);
        drop(first);
        let second = second.await.unwrap();
        assert!(!second.kick.is_cancelled());
        // The first connection's late release must not free the second's claim.
        assert_eq!(reg.lock().live.len(), 1);
    }

    fn will(topic: &'static str) -> Will {
        Will {
            topic: Bytes::from_static(topic.as_bytes()),
            retain: false,
            qos: 0,
            properties: Bytes::new(),
            message_expiry: None,
            payload: Bytes::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_order_and_not_for_connected_sessions() {
        let reg = Registry::new(2, UNLIMITED);
        let root = CancellationToken::new();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let a = new_slot(reg.keep_session("a", &root));
        let b = new_slot(reg.keep_session("b", &root));
        reg.set_timers(
            "a",
            Timers {
                will: Some((t0 + 3 * s, will("w/a"))),
                session_expires: Some(t0 + 5 * s),
            },
        )
        .unwrap();
        reg.set_timers(
            "b",
            Timers {
                will: Some((t0 + 9 * s, will("w/b"))),
                session_expires: Some(t0 + 2 * s),
            },
        )
        .unwrap();
        // The store is bounded.
        assert!(reg.set_timers("c", Timers::default()).is_err());
        assert_eq!(reg.next_timer(), Some(t0 + 2 * s));
        assert!(reg.take_due(t0 + s, &root).is_empty());
        // b's session ends first, and takes its will along although its delay is longer.
        let due = reg.take_due(t0 + 2 * s, &root);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].client_id, "b");
        assert_eq!(due[0].ended, Some((Ended::Expired, b)));
        assert_eq!(
            due[0].will.as_ref().map(|w| &w.topic[..]),
            Some(&b"w/b"[..])
        );
        // The reaper holds the id while it works: a connected session's timers wait.
        assert_eq!(reg.next_timer(), Some(t0 + 3 * s));
        let claim = reg.claim("a", &root).await;
        assert_eq!(reg.next_timer(), None);
        assert!(reg.take_due(t0 + 4 * s, &root).is_empty());
        reg.release("a", &claim);
        let due = reg.take_due(t0 + 4 * s, &root);
        assert_eq!((due.len(), due[0].ended), (1, None));
        assert!(due[0].will.is_some());
        reg.release("a", &due[0].claim);
        let due = reg.take_due(t0 + 5 * s, &root);
        assert_eq!((due.len(), due[0].ended), (1, Some((Ended::Expired, a))));
        assert!(due[0].will.is_none());
        // Reconnecting takes (cancels) the timers.
        reg.set_timers("d", Timers::default()).unwrap();
        assert!(reg.take_timers("d").is_some());
        assert!(reg.take_timers("d").is_none());
    }

    #[test]
    fn offline_store_is_bounded() {
        let reg = Registry::new(1, UNLIMITED);
        let a = OfflineState {
            inbound_qos2: vec![1, 2],
            unacked_out: vec![Redelivery {
                client_id: 9,
                ..Redelivery::default()
            }],
            pubrel_out: vec![(3, 4)],
            sub_options: vec![(
                Bytes::from_static(b"a/#"),
                SubOptions {
                    options: 0x05,
                    id: 7,
                },
            )],
            subscriptions_known: true,
            queued: vec![Frame {
                header: 0x32,
                body: Bytes::from_static(b"\0\x01a\0\0m"),
            }],
        };
        assert!(reg.store_offline("a", a.clone()));
        assert!(!reg.store_offline(
            "b",
            OfflineState {
                inbound_qos2: vec![3],
                ..OfflineState::default()
            }
        ));
        assert_eq!(reg.take_offline("a"), a);
        assert_eq!(reg.take_offline("a"), OfflineState::default());
    }
}
