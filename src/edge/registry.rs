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
//! client id a connection uses: its own for a session the core keeps, a pooled one
//! (`CoreIds`) otherwise. The maps are bounded: live ids by the connection cap, stored offline
//! state and timers by `max_stored` sessions each; the ids whose session the core may hold
//! (`core_session`) number as many as the core's own persistent sessions.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::envelope;

/// Longest a new connection waits for the one it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// Sessions the reaper takes on at once.
const REAP_BATCH: usize = 32;
/// Packet ids kept per offline session.
pub const MAX_PENDING_QOS2: usize = 1024;

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
    /// Client ids whose session the core may hold under their own core id (`core_session`).
    core_sessions: HashSet<String>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    max_stored: usize,
    /// Wakes the reaper when a timer is set.
    timer_set: Notify,
}

/// A will as the edge publishes it.
#[derive(Debug, Clone)]
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
    /// Writes the will, published now, as a core PUBLISH. It is retained if it asks to be and
    /// `may_store` agrees, given the bytes the core would store (envelope and payload; 0 for
    /// the clear an empty payload is); see `Edge::put_will`. QoS 0 into the core is enough:
    /// it routes on receipt and delivers at each subscription's QoS, and the envelope carries
    /// the will's QoS for the min() rule and its expiry.
    pub fn put_core_publish(&self, out: &mut BytesMut, may_store: impl FnOnce(usize) -> bool) {
        let private = envelope::Private {
            origin: None,
            expires_at: envelope::expires_at(self.message_expiry),
        };
        let header = envelope::header_with(self.qos, private, &self.properties);
        let stored = match self.payload.len() {
            0 => 0,
            n => header.len() + n,
        };
        let retain = self.retain && may_store(stored);
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
    /// The session has expired: remove it from the core.
    pub expired: bool,
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
            && self.pubrel_out.is_empty()
            && self.sub_options.is_empty()
    }
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
}

impl CoreIdLease<'_> {
    /// The core client id: `k-<n>`, apart from client-derived (`c-`) and internal (`i-`) ids.
    pub fn core_id(&self) -> String {
        format!("k-{}", self.n)
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
    pub fn new(max_stored: usize) -> Registry {
        Registry {
            inner: Mutex::new(Inner::default()),
            max_stored,
            timer_set: Notify::new(),
        }
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
            if inner.timers.contains_key(id) {
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
        inner.offline.insert(id.to_string(), state);
        true
    }

    pub fn forget_session(&self, id: &str) {
        self.lock().offline.remove(id);
    }

    /// Whether the core may hold a session under `id`'s own core id, which a connection with
    /// a persistent or resumed session uses (`policy::core_client_id`); `kept` records what
    /// is true from now on. A clean session that finds one connects under that id, so the
    /// core discards it; any other clean session takes a pooled id (`CoreIds`). Grows, like
    /// the core's own store of persistent sessions, with the client ids that ever had one,
    /// and shrinks as they end or expire.
    pub fn core_session(&self, id: &str, kept: bool) -> bool {
        let mut inner = self.lock();
        if kept {
            !inner.core_sessions.insert(id.to_string())
        } else {
            inner.core_sessions.remove(id)
        }
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
        inner
            .timers
            .iter()
            .filter(|(id, _)| !inner.live.contains_key(*id))
            .filter_map(|(_, t)| t.next())
            .min()
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
            let expired = timers.session_expires.is_some_and(|at| at <= now);
            // A session that ends publishes its will, whatever its delay (MQTT-3.1.3-9).
            let will = match timers.will.take() {
                Some((at, will)) if at <= now || expired => Some(will),
                other => {
                    timers.will = other;
                    None
                }
            };
            if expired || timers.next().is_none() {
                inner.timers.remove(&id);
            }
            if expired {
                inner.offline.remove(&id);
            }
            let (claim, _) = Self::new_claim(&mut inner, &id, parent.child_token());
            out.push(Due {
                client_id: id,
                will,
                expired,
                claim,
            });
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
    fn core_sessions_are_remembered_until_a_clean_session_takes_them() {
        let reg = Registry::new(10);
        assert!(!reg.core_session("a", false), "unknown id");
        assert!(!reg.core_session("a", true), "first persistent connection");
        assert!(reg.core_session("a", true), "resumed");
        assert!(
            reg.core_session("a", false),
            "a clean session finds it and ends it"
        );
        assert!(!reg.core_session("a", false));
    }

    #[tokio::test]
    async fn takeover_kicks_and_waits_for_the_old_connection() {
        let reg = std::sync::Arc::new(Registry::new(10));
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
        let reg = Registry::new(2);
        let root = CancellationToken::new();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
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
        assert!(due[0].expired);
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
        assert_eq!((due.len(), due[0].expired), (1, false));
        assert!(due[0].will.is_some());
        reg.release("a", &due[0].claim);
        let due = reg.take_due(t0 + 5 * s, &root);
        assert_eq!((due.len(), due[0].expired), (1, true));
        assert!(due[0].will.is_none());
        // Reconnecting takes (cancels) the timers.
        reg.set_timers("d", Timers::default()).unwrap();
        assert!(reg.take_timers("d").is_some());
        assert!(reg.take_timers("d").is_none());
    }

    #[test]
    fn offline_store_is_bounded() {
        let reg = Registry::new(1);
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
