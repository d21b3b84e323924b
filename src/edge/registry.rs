//! Live client ids and the little session state the core does not keep.
//!
//! Two jobs: (1) session takeover is done here, before the core sees the new CONNECT, so an
//! old connection is closed cleanly and a v5 client is told why; (2) the packet ids of QoS 2
//! messages a client published but has not yet released (PUBREL) survive a reconnect, because
//! rumqttd forgets them and would otherwise leave a re-sent PUBREL unanswered or deliver a
//! re-sent PUBLISH twice; and the ids of deliveries the client had not acknowledged, so their
//! re-sending carries DUP as MQTT-3.3.1-1 requires. Both maps are bounded: live ids by the connection cap, stored
//! offline state by `max_stored` sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Longest a new connection waits for the one it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
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
}

pub struct Registry {
    inner: Mutex<Inner>,
    max_stored: usize,
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
        self.inbound_qos2.is_empty() && self.unacked_out.is_empty() && self.pubrel_out.is_empty()
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the registry down with it: the data is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `id` for a new connection, kicking out and waiting for any connection holding it.
    /// `parent` is the shutdown token, so a kick also fires on shutdown.
    pub async fn claim(&self, id: &str, parent: &CancellationToken) -> Claim {
        let (tx, rx) = watch::channel(());
        let kick = parent.child_token();
        let previous = {
            let mut inner = self.lock();
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
            (generation, previous)
        };
        let (generation, previous) = previous;
        if let Some(old) = previous {
            old.kick.cancel();
            let mut done = old.done;
            // `changed` fails once the old connection drops its sender: that is "done".
            let _ = tokio::time::timeout(TAKEOVER_WAIT, async {
                while done.changed().await.is_ok() {}
            })
            .await;
        }
        Claim {
            generation,
            kick,
            _done: tx,
        }
    }

    /// Releases `id` if `claim` still owns it.
    pub fn release(&self, id: &str, claim: &Claim) {
        let mut inner = self.lock();
        if inner.live.get(id).map(|l| l.generation) == Some(claim.generation) {
            inner.live.remove(id);
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
