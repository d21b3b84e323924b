//! The edge: vigil's public face. It owns every public socket, polices every client and
//! gives each one its own connection to the core.
//!
//! - `tcp` and `web` accept sockets (MQTT over TCP or TLS; HTTP(S), MQTT over WebSocket) and
//!   spawn one task per connection, bounded by a handshake pool and the connection cap.
//! - `tls` loads certificates, runs TLS handshakes and names verified client certificates.
//! - `connection` runs one client: CONNECT, policies, then the relay to the core.
//! - `policy` holds the rules (authentication, client ids, limits) in one place.
//! - `registry` holds live client ids (takeover) and QoS 2 state rumqttd forgets.

pub mod acl;
pub mod connection;
mod copies;
pub mod filters;
pub mod fresh;
pub mod jwt;
pub mod limits;
pub mod passwd;
pub mod policy;
pub mod registry;
pub mod retained;
pub mod sessions;
pub mod snapshot;
pub mod tcp;
pub mod threads;
pub mod tls;
pub mod warm;
pub mod web;
pub mod ws_io;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::alert_log::AlertLog;
use crate::config::Config;
use crate::core::Core;
use crate::history::History;
use crate::metrics::Metrics;
use bytes::Bytes;

/// A client's byte stream as the relay sees it: TCP, TLS over TCP, MQTT over WebSocket, or the
/// bridge's in-process pipe.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Acknowledges what was just read at once, not on the delayed-ACK timer. Many MQTT
    /// clients leave Nagle on (libmosquitto, so `mosquitto_pub`, and rumqttc by default): with
    /// a packet already in flight they hold the next small one until our ACK arrives, which
    /// Linux may delay by up to 40 ms. Nothing to do for an in-process pipe.
    fn ack_promptly(&self) {}

    /// A second handle on the client's TCP socket, through which another task can see whether
    /// the client has sent bytes not read yet (`fresh`). `None` for the in-process pipe.
    fn socket_handle(&self) -> Option<std::net::TcpStream> {
        None
    }
}

impl ClientStream for TcpStream {
    fn ack_promptly(&self) {
        crate::core::ack_promptly(self);
    }

    fn socket_handle(&self) -> Option<std::net::TcpStream> {
        use std::os::fd::AsFd;
        let fd = self.as_fd().try_clone_to_owned().ok()?;
        Some(std::net::TcpStream::from(fd))
    }
}

impl<S: ClientStream> ClientStream for tokio_rustls::server::TlsStream<S> {
    fn ack_promptly(&self) {
        self.get_ref().0.ack_promptly();
    }

    fn socket_handle(&self) -> Option<std::net::TcpStream> {
        self.get_ref().0.socket_handle()
    }
}

impl ClientStream for tokio::io::DuplexStream {}

/// Accepts sockets until shutdown and runs `handle` for each in its own tracked task, inside a
/// `conn` span, on the next connection thread ([`threads`]). A socket that cannot get a
/// handshake slot is closed at once (counted), so a flood never blocks the accept loop; accept
/// errors (usually EMFILE) back off briefly.
pub async fn accept_loop<F, Fut>(edge: Arc<Edge>, listener: TcpListener, kind: Listener, handle: F)
where
    F: Fn(Arc<Edge>, TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = edge.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, listener = kind.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = edge.handshakes.clone().try_acquire_owned() else {
            Metrics::inc(&edge.metrics.refused_handshake_overload);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("conn", %peer, listener = kind.as_str(), client_id = tracing::field::Empty);
        let Some(runtime) = edge.threads.pick() else {
            edge.tracker
                .spawn(handle(edge.clone(), stream, peer, slot).instrument(span));
            continue;
        };
        // The socket moves to the chosen thread's reactor: out of this one here, into that one
        // on the thread itself.
        let socket = match stream.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot hand the socket to a connection thread");
                continue;
            }
        };
        let task = {
            let (edge, handle) = (edge.clone(), handle.clone());
            async move {
                match TcpStream::from_std(socket) {
                    Ok(stream) => handle(edge, stream, peer, slot).await,
                    Err(e) => tracing::warn!(error = %e, "cannot register the socket"),
                }
            }
        };
        edge.tracker.spawn_on(task.instrument(span), runtime);
    }
}

/// Where a connection comes from: its address, listener, and the client-certificate name a
/// TLS handshake verified.
#[derive(Debug, Clone)]
pub struct Origin {
    pub peer: SocketAddr,
    pub listener: Listener,
    pub tls_cn: Option<String>,
    /// Where the relay reports the identity it authenticated, for whoever started it (the
    /// bridge answers requests outside MQTT, such as `history`, under that identity).
    pub identity: Option<Arc<std::sync::OnceLock<policy::Identity>>>,
}

impl Origin {
    pub fn new(peer: SocketAddr, listener: Listener) -> Origin {
        Origin {
            peer,
            listener,
            tls_cn: None,
            identity: None,
        }
    }
}

/// Which public listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Tcp,
    /// MQTT over TLS (`tls.mqtt_listen`).
    Tls,
    WebSocket,
    /// The JSON bridge: a session's MQTT side, inside the process.
    Bridge,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Tcp => "tcp",
            Listener::Tls => "tls",
            Listener::WebSocket => "ws",
            Listener::Bridge => "bridge",
        }
    }
}

/// State shared by every connection: the policies, the core, the bounds and the counters.
pub struct Edge {
    pub policy: policy::Policy,
    pub core: Core,
    pub registry: Arc<registry::Registry>,
    pub metrics: Arc<Metrics>,
    /// Cancelled once at shutdown; every connection's kick token is a child of it.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connected MQTT clients (the configured cap).
    pub connections: Arc<Semaphore>,
    /// Sockets still in their HTTP/WebSocket handshake or waiting for CONNECT. Bounded
    /// separately so idle sockets cannot use up the connection cap.
    pub handshakes: Arc<Semaphore>,
    pub handshake_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub allowed_origins: Vec<String>,
    pub max_packet_size: usize,
    /// Topic aliases per connection for v5 deliveries (`limits.topic_aliases`).
    pub topic_aliases: u16,
    pub bridge: BridgeLimits,
    /// Telemetry history per device (analytics warm starts, the bridge's `history` request).
    pub history: History,
    /// The most recent alert traffic, recorded by the analytics task, read by the bridge's
    /// `recent_alerts` request.
    pub alert_log: Arc<AlertLog>,
    /// The threads that serve accepted sockets (`[runtime] connection_threads`).
    pub threads: threads::ConnectionThreads,
    /// Some client has subscribed with No Local since start: from then on, publishes carry
    /// their origin in the envelope (see `envelope`), which costs 10 bytes per message.
    pub no_local_in_use: AtomicBool,
    /// Clients' SUBSCRIBEs and UNSUBSCRIBEs handed to the core and not yet answered, on all
    /// connections (the subscribe fence, see `connection`).
    pub subscribes_in_flight: AtomicUsize,
    /// Client publishes the edge has acknowledged and the core has not yet (the publish
    /// fence, see `connection`).
    pub early_acks_in_flight: AtomicUsize,
    /// New connections that have not handled their first packet yet (the subscribe fence,
    /// see `fresh`).
    pub fresh: fresh::Fresh,
    /// Distinct filters and topic names clients have given the core
    /// (`limits.max_distinct_filters`, `limits.max_distinct_topics`).
    pub core_filters: limits::CoreNames,
    pub core_topics: limits::CoreNames,
    /// The filters that may have subscribers, for PUBACK 0x10 (`filters`).
    pub subscribed: filters::FilterIndex,
    /// The retained messages, by topic (`limits.max_retained_bytes`); the edge keeps them,
    /// not the core (`retained`).
    pub retained: Arc<retained::RetainedStore>,
    /// Core client ids for sessions that end with their connection (`registry::CoreIds`).
    pub core_ids: registry::CoreIds,
    /// Clean core connections opened ahead of time for such sessions (`warm`).
    pub warm: warm::WarmLinks,
    /// Numbers the short-lived core connections of delayed wills when `core_ids` has none
    /// free.
    next_internal: AtomicU64,
    /// False while saved persistent sessions are being restored (`sessions::restore`): the
    /// web port then answers HTTP but holds back WebSocket clients, and `/readyz` says so.
    admitting: tokio::sync::watch::Sender<bool>,
}

/// `CoreNames::admit` with its gauge and its refusal counter.
fn admit(
    names: &limits::CoreNames,
    name: &Bytes,
    count: &AtomicU64,
    refusals: &AtomicU64,
    why: &'static str,
) -> bool {
    let (admitted, n) = names.admit(name);
    count.store(n as u64, Relaxed);
    if !admitted {
        refused(refusals, name, why);
    }
    admitted
}

/// Counts a refusal by an all-clients limit: a warning the first time, then debug lines (the
/// counter tells how often).
fn refused(refusals: &AtomicU64, name: &[u8], why: &'static str) {
    let name = String::from_utf8_lossy(name);
    if refusals.fetch_add(1, Relaxed) == 0 {
        tracing::warn!(%name, "{why}");
    } else {
        tracing::debug!(%name, "{why}");
    }
}

/// Bounds of the JSON bridge (`[bridge]`).
pub struct BridgeLimits {
    pub sessions: Arc<Semaphore>,
    pub max_subscriptions: usize,
    pub max_queued_bytes: usize,
}

impl Edge {
    pub fn new(
        config: &Config,
        core: Core,
        metrics: Arc<Metrics>,
        history: History,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        threads: threads::ConnectionThreads,
    ) -> Result<Edge, policy::PolicyError> {
        let cap = config.limits.max_connections;
        let mut registry = registry::Registry::new(
            cap,
            registry::SessionLimits {
                max: config.limits.max_persistent_sessions,
                expiry: config.limits.persistent_session_expiry(),
            },
        );
        if config.persistence.sessions_dir().is_some() {
            registry = registry.saving_sessions(config.limits.max_subscriptions);
        }
        Ok(Edge {
            policy: policy::Policy::new(config)?,
            core,
            registry: Arc::new(registry),
            metrics,
            shutdown,
            tracker,
            connections: Arc::new(Semaphore::new(cap)),
            handshakes: Arc::new(Semaphore::new(cap.max(64))),
            handshake_timeout: config.limits.handshake_timeout(),
            write_stall_timeout: config.limits.write_stall_timeout(),
            allowed_origins: config.http.allowed_origins.clone(),
            max_packet_size: config.limits.max_packet_size,
            topic_aliases: config.limits.topic_aliases,
            bridge: BridgeLimits {
                sessions: Arc::new(Semaphore::new(config.bridge.max_sessions)),
                max_subscriptions: config.bridge.max_subscriptions,
                max_queued_bytes: config.bridge.max_queued_bytes,
            },
            history,
            alert_log: Arc::new(AlertLog::default()),
            threads,
            no_local_in_use: AtomicBool::new(false),
            subscribes_in_flight: AtomicUsize::new(0),
            early_acks_in_flight: AtomicUsize::new(0),
            fresh: fresh::Fresh::default(),
            core_filters: limits::CoreNames::new(config.limits.max_distinct_filters),
            core_topics: limits::CoreNames::new(config.limits.max_distinct_topics),
            subscribed: filters::FilterIndex::new(),
            retained: Arc::new(retained::RetainedStore::new(
                config.limits.max_retained_bytes,
            )),
            // Twice the connection cap, so that a returned id waits behind at least as many
            // free ones as there can be connections, plus room for the edge's short jobs.
            core_ids: registry::CoreIds::new(
                u32::try_from(cap.saturating_mul(2).saturating_add(1024)).unwrap_or(u32::MAX),
            ),
            warm: warm::WarmLinks::new(config.core.warm_connections),
            next_internal: AtomicU64::new(0),
            admitting: tokio::sync::watch::Sender::new(true),
        })
    }

    /// Holds clients back (`admitting`) until [`Edge::admit_clients`].
    pub fn hold_clients(&self) {
        self.admitting.send_replace(false);
    }

    /// Lets clients in: the saved sessions are back.
    pub fn admit_clients(&self) {
        self.admitting.send_replace(true);
    }

    /// Whether clients are let in (`hold_clients`).
    pub fn admits_clients(&self) -> bool {
        *self.admitting.borrow()
    }

    /// Waits until clients are let in.
    pub async fn clients_admitted(&self) {
        let mut admitting = self.admitting.subscribe();
        // The sender lives as long as the edge: an error cannot happen while it is borrowed.
        let _ = admitting.wait_for(|&admitted| admitted).await;
    }

    /// Whether a client may give the core this topic filter (`limits.max_distinct_filters`);
    /// a refusal is counted, and warned about the first time.
    pub fn admit_filter(&self, filter: &Bytes) -> bool {
        admit(
            &self.core_filters,
            filter,
            &self.metrics.core_filters,
            &self.metrics.filter_limit_refusals,
            "subscription refused: limits.max_distinct_filters reached",
        )
    }

    /// Whether a client may publish to this topic name, or name it as its will topic
    /// (`limits.max_distinct_topics`); a refusal is counted, and warned about the first time.
    pub fn admit_topic(&self, topic: &Bytes) -> bool {
        admit(
            &self.core_topics,
            topic,
            &self.metrics.core_topics,
            &self.metrics.topic_name_limit_refusals,
            "refused: limits.max_distinct_topics reached",
        )
    }

    /// Stores `topic`'s retained message (`header`, the envelope, then `payload`), or clears
    /// it when `payload` is empty (`retained::RetainedStore`). Returns whether the publish is
    /// retained: false when `limits.max_retained_bytes` leaves no room, and the message then
    /// goes only to the current subscribers, the one stored before kept. MQTT has no way to
    /// tell the publisher (EMQX's retainer behaves the same when full); it is counted, and
    /// warned about the first time.
    pub fn retain(&self, topic: &[u8], header: &[u8], payload: &[u8]) -> bool {
        let (kept, total) = match (payload.is_empty(), header.split_first()) {
            (false, Some((&first, rest))) => {
                // Marked as the core's copy would be, for Retain As Published.
                let first = [crate::envelope::mark_retained(first)];
                self.retained.set(topic, &[&first, rest, payload])
            }
            (false, None) => self.retained.set(topic, &[payload]),
            (true, _) => self.retained.set(topic, &[]),
        };
        self.note_retained(total);
        let swept = self.retained.take_swept();
        if swept > 0 {
            // Expired while retained: dropped like an expired delivery.
            self.metrics.dropped_expired.fetch_add(swept, Relaxed);
        }
        if !kept {
            refused(
                &self.metrics.retained_limit_refusals,
                topic,
                "retained message not stored: limits.max_retained_bytes reached",
            );
        }
        kept
    }

    /// Updates the gauges of the retained store's size.
    pub fn note_retained(&self, totals: retained::Totals) {
        let m = &self.metrics;
        m.retained_bytes.store(totals.bytes as u64, Relaxed);
        m.retained_messages.store(totals.messages as u64, Relaxed);
    }

    /// A pooled core client id (`registry::CoreIds`); `None`, counted, when all are in use
    /// (the caller then uses an id of its own, which the core remembers for good).
    pub fn lease_core_id(&self) -> Option<registry::CoreIdLease<'_>> {
        let lease = self.core_ids.lease();
        if lease.is_none() {
            Metrics::inc(&self.metrics.core_id_pool_empty);
        }
        lease
    }

    /// A clean core connection opened ahead of time (`warm`) and the lease of its id,
    /// counted; `None` when none waits.
    pub fn take_warm(&self) -> Option<(crate::core::CoreLink, registry::CoreIdLease<'_>)> {
        let taken = self.warm.take(&self.core_ids);
        if taken.is_some() {
            Metrics::inc(&self.metrics.core_warm_taken);
        }
        taken
    }

    /// A clean core connection for one short job, under a pooled id (or `i-<what>-<n>` when
    /// the pool is empty), with the lease to hold until the connection is closed; `None` when
    /// the core cannot be reached, refuses, or shutdown has begun.
    async fn short_lived_link(
        &self,
        what: &str,
    ) -> Option<(crate::core::CoreLink, Option<registry::CoreIdLease<'_>>)> {
        let lease = self.lease_core_id();
        let id = match &lease {
            Some(lease) => lease.core_id(),
            None => format!("i-{what}-{}", self.next_internal.fetch_add(1, Relaxed)),
        };
        let link = self
            .core
            .connect_internal(&id, true, &self.shutdown)
            .await
            .ok()
            .flatten()?;
        Some((link, lease))
    }

    /// Publishes a will into the core on a short-lived connection of its own (a delayed will,
    /// whose client's connection is gone).
    pub async fn publish_will(&self, will: &registry::Will) {
        let Some((link, _lease)) = self.short_lived_link("will").await else {
            tracing::warn!("cannot reach the core to publish a delayed will");
            return;
        };
        let mut out = bytes::BytesMut::new();
        self.put_will(will, &mut out);
        close_core_link(link.stream, &out).await;
    }

    /// Writes a will for the core, retained (`Edge::retain`) if it asks to be and there is
    /// room.
    pub fn put_will(&self, will: &registry::Will, out: &mut bytes::BytesMut) {
        will.put_core_publish(out, |header, payload| {
            self.retain(&will.topic, header, payload)
        });
    }

    /// Acts on the timers of offline sessions (`registry::Timers`) until shutdown: publishes
    /// wills whose delay has passed and removes expired sessions from the core and the
    /// registry. One task; it sleeps until the earliest timer or until a new one is set.
    pub async fn reap(self: Arc<Self>) {
        loop {
            let next = self.registry.next_timer();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.registry.timer_set() => continue,
                _ = sleep => {}
            }
            for due in self
                .registry
                .take_due(tokio::time::Instant::now(), &self.shutdown)
            {
                self.settle(due).await;
            }
        }
    }

    /// Does what `due` asks for an offline session: publishes its will and, if the session
    /// ended (expired, or evicted to make room for a new one), removes it from the core.
    /// Then lets the id go.
    pub async fn settle(&self, due: registry::Due) {
        if let Some(will) = &due.will {
            self.publish_will(will).await;
            tracing::debug!(client_id = %due.client_id, "delayed will published");
        }
        if let Some((ended, slot)) = due.ended {
            self.wipe_core_session(&registry::slot_core_id(slot)).await;
            let counter = match ended {
                registry::Ended::Expired => {
                    self.registry.free_slot(slot);
                    &self.metrics.sessions_expired
                }
                registry::Ended::Evicted => &self.metrics.sessions_evicted,
            };
            Metrics::inc(counter);
            self.note_kept_sessions();
            tracing::debug!(client_id = %due.client_id, ?ended, "offline session ended");
        }
        self.registry.release(&due.client_id, &due.claim);
    }

    /// Updates the gauge of sessions the core keeps past their connections.
    pub fn note_kept_sessions(&self) {
        let n = self.registry.kept_sessions() as u64;
        self.metrics.kept_sessions.store(n, Relaxed);
    }

    /// Removes a session from the core: a clean-session connection replaces it and, closing,
    /// takes it along. The close is an orderly socket shutdown, never DISCONNECT (see
    /// ARCHITECTURE.md: rumqttd's double disconnect event could drop the connection that
    /// follows, which here is the client's own).
    pub async fn wipe_core_session(&self, core_id: &str) {
        if let Ok(link) = self.core.connect(core_id, true).await {
            close_core_link(link.stream, &[]).await;
        }
    }
}

/// Writes `last` to a core connection, then closes it with an orderly shutdown and waits
/// (at most a second) until the core has read everything.
async fn close_core_link(mut stream: TcpStream, last: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(last).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 256];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
