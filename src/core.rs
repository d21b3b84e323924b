//! The routing core: an embedded rumqttd on loopback, reachable only by vigil's own components.
//!
//! rumqttd cannot face the public (see ARCHITECTURE.md), so it listens on 127.0.0.1 on a port
//! chosen at start and accepts only a credential generated per process. Every edge connection
//! and every internal component reaches it through [`Core::connect`], always as MQTT 3.1.1.
//! rumqttd has no stop API and reports success even when its bind failed, so [`Core::start`]
//! proves the core is really serving before returning; its probe sends the credential only to a
//! port this process listens on, never to another process that took the port first.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::mqtt::{self, CoreConnect};

/// Keep-alive the edge announces to the core. The edge pings the core itself, so a client's
/// own keep-alive (including 0, which rumqttd refuses) never reaches rumqttd.
pub const CORE_KEEP_ALIVE_SECS: u16 = 60;
/// How often an otherwise idle core connection is pinged.
pub const CORE_PING_INTERVAL: Duration = Duration::from_secs(20);
/// Connections the core accepts beyond the edge's cap, for vigil's internal clients.
const INTERNAL_CONNECTIONS: usize = 64;
/// Extra room in the core's packet limit for the envelope and translated properties.
const ENVELOPE_SLACK: usize = 1024;
/// Ports a core listener tries, the first included, when the one it was given is taken.
const BIND_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("no free loopback port for the core: {0}")]
    NoPort(std::io::Error),
    #[error("cannot start the core's thread: {0}")]
    Thread(std::io::Error),
    #[error("the core did not start serving on {addr} within {secs} s")]
    NotReady { addr: SocketAddr, secs: u64 },
    #[error("cannot reach the core: {0}")]
    Io(#[from] std::io::Error),
    #[error("the core did not answer CONNECT in time")]
    ConnackTimeout,
    #[error("the core closed the connection during CONNECT")]
    Closed,
    #[error("the core sent a malformed packet: {0}")]
    Codec(#[from] mqtt::CodecError),
    #[error("the core refused an internal connection (CONNACK code {0})")]
    Refused(u8),
}

/// A handle to the running core. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Core {
    /// The core's listeners; connections take them in turn (`next`).
    addrs: Vec<SocketAddr>,
    next: AtomicUsize,
    username: String,
    password: String,
}

/// The core's answer to a CONNECT: the open stream, bytes already read past the CONNACK, and
/// the CONNACK's content.
pub struct CoreLink {
    pub stream: TcpStream,
    pub read_buf: BytesMut,
    pub session_present: bool,
    pub code: u8,
}

impl Core {
    /// Starts rumqttd on its own threads and waits until it accepts our credential.
    pub async fn start(config: &Config) -> Result<Core, CoreError> {
        let threads = config.core.listeners.max(1);
        let ports = threads * config.core.accept_loops.max(1);
        let addrs = free_loopback_ports(ports).map_err(CoreError::NoPort)?;
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let password: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let username = "vigil-internal".to_string();

        let mut settings = core_settings(config, &addrs, Some((&username, &password)));
        settings.move_when_taken = true;
        let serving = spawn_core(settings, threads)?;

        let mut core = Core {
            addrs,
            next: AtomicUsize::new(0),
            username,
            password,
        };
        for i in 0..core.addrs.len() {
            core.wait_ready(&serving, i, Duration::from_secs(10))
                .await?;
        }
        core.addrs = serving.all();
        tracing::info!(
            core = %core.addrs[0],
            threads,
            ports = core.addrs.len(),
            "core ready (loopback only, per-process credential)"
        );
        Ok(core)
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Waits until listener `i` accepts our credential, on whichever port it ended up on.
    async fn wait_ready(
        &self,
        serving: &ListenAddrs,
        i: usize,
        limit: Duration,
    ) -> Result<(), CoreError> {
        let deadline = Instant::now() + limit;
        let mut id = format!("vigil-probe-{i}");
        loop {
            let addr = serving.get(i);
            // A port another process took may accept and never answer: stop waiting for it as
            // soon as the listener has moved.
            let moved = async {
                while serving.get(i) == addr {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            // Our credential goes only to a listener of this process: a port another process
            // took before rumqttd bound it must never see it.
            let probe = async {
                while listening_here(addr) == Some(false) {
                    if Instant::now() >= deadline {
                        return Err(CoreError::NotReady {
                            addr,
                            secs: limit.as_secs(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.connect_to(addr, &id, true).await
            };
            let probe = tokio::select! {
                probe = probe => Some(probe),
                () = moved => None,
            };
            match probe {
                Some(Ok(link)) if link.code == 0 => {
                    // An orderly close, not DISCONNECT (see `Edge::wipe_core_session`).
                    let mut stream = link.stream;
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
                _ if Instant::now() >= deadline => {
                    return Err(CoreError::NotReady {
                        addr,
                        secs: limit.as_secs(),
                    })
                }
                // A refused or failed probe may have left state for its client id in rumqttd;
                // never reuse an id whose connection did not complete.
                _ => {
                    id.push('x');
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Opens a core connection for `client_id` (already mapped to a core-safe id) and waits for
    /// its CONNACK. It never carries a will: the edge publishes wills itself (ARCHITECTURE.md).
    ///
    /// Connections take the core's ports in turn. A port that refuses the TCP connection or
    /// closes it during CONNECT is passed over for the next one, so one broken listener (a
    /// rumqttd listener whose connection task panicked rejects every later connection) does
    /// not refuse a share of the clients.
    pub async fn connect(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<CoreLink, CoreError> {
        let first = self.next.fetch_add(1, Relaxed);
        let mut tries = 0;
        loop {
            let addr = self.addrs[(first + tries) % self.addrs.len()];
            tries += 1;
            match self.connect_to(addr, client_id, clean_session).await {
                Err(e @ (CoreError::Io(_) | CoreError::Closed)) if tries < self.addrs.len() => {
                    tracing::warn!(core = %addr, error = %e, "core port failed, trying the next");
                }
                result => return result,
            }
        }
    }

    async fn connect_to(
        &self,
        addr: SocketAddr,
        client_id: &str,
        clean_session: bool,
    ) -> Result<CoreLink, CoreError> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut out = BytesMut::with_capacity(128);
        mqtt::put_core_connect(
            &mut out,
            &CoreConnect {
                client_id,
                clean_session,
                keep_alive: CORE_KEEP_ALIVE_SECS,
                username: &self.username,
                password: &self.password,
                will: None,
            },
        );
        stream.write_all(&out).await?;
        let mut read_buf = BytesMut::with_capacity(512);
        let frame = timeout(Duration::from_secs(5), async {
            loop {
                if let Some(frame) = mqtt::read_frame(&mut read_buf, usize::MAX)? {
                    return Ok::<_, CoreError>(frame);
                }
                if stream.read_buf(&mut read_buf).await? == 0 {
                    return Err(CoreError::Closed);
                }
            }
        })
        .await
        .map_err(|_| CoreError::ConnackTimeout)??;
        if frame.kind() != mqtt::CONNACK {
            return Err(mqtt::CodecError::Protocol("core answered CONNECT without CONNACK").into());
        }
        let (session_present, code) = mqtt::parse_core_connack(&frame)?;
        Ok(CoreLink {
            stream,
            read_buf,
            session_present,
            code,
        })
    }

    /// Connects one of vigil's internal clients (analytics, cluster, the edge's short-lived
    /// links for delayed wills and retained fetches), unless `shutdown` comes
    /// first (`Ok(None)`). A refused CONNECT is an error.
    pub async fn connect_internal(
        &self,
        client_id: &str,
        clean_session: bool,
        shutdown: &CancellationToken,
    ) -> Result<Option<CoreLink>, CoreError> {
        let link = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            link = self.connect(client_id, clean_session) => link?,
        };
        if link.code != mqtt::rc::ACCEPTED {
            return Err(CoreError::Refused(link.code));
        }
        Ok(Some(link))
    }

    /// A core connection with a wrong password, for tests proving the core refuses strangers.
    #[doc(hidden)]
    pub fn credential_for_tests(&self) -> (&str, &str) {
        (&self.username, &self.password)
    }
}

/// Acknowledges what was just read from a core connection at once instead of after the
/// delayed-ACK timer. rumqttd does not set TCP_NODELAY on the sockets it accepts, so Nagle holds
/// its next small write until our ACK arrives, and with sparse traffic (a message every few tens
/// of milliseconds per connection) Linux delays that ACK by up to 40 ms: a stall on such
/// deliveries (BENCHMARKS.md). Linux clears TCP_QUICKACK on its own, hence after every read.
/// Used on every core connection: the edge relays, the analytics task and the cluster links.
pub fn ack_promptly(stream: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stream;
}

/// The timer an internal client pings the core with (first tick one interval from now).
pub fn ping_timer() -> Interval {
    let mut ping =
        tokio::time::interval_at(Instant::now() + CORE_PING_INTERVAL, CORE_PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping
}

/// An internal client's goodbye at shutdown: DISCONNECT, best effort within a second.
pub async fn disconnect(wr: &mut OwnedWriteHalf) {
    let mut out = BytesMut::with_capacity(2);
    mqtt::put_disconnect(&mut out, mqtt::Version::V311, 0);
    let _ = timeout(Duration::from_secs(1), wr.write_all(&out)).await;
}

/// Whether a socket of this process listens on `addr` (TCP), read from `/proc/net/tcp{,6}` and
/// `/proc/self/fd`; `None` where those cannot be read (not Linux). Run only by the readiness
/// probe, before the core's credential is sent to `addr`.
fn listening_here(addr: SocketAddr) -> Option<bool> {
    let table = match addr {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let table = std::fs::read_to_string(table).ok()?;
    let inodes = listening_inodes(&table, addr);
    if inodes.is_empty() {
        return Some(false);
    }
    let fds = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .is_some_and(|inode| inodes.iter().any(|i| i == inode))
        })
    }))
}

/// The inodes of the sockets a `/proc/net/tcp` (or `tcp6`) table lists as listening on `addr`.
/// Addresses there are the hexadecimal of the address's bytes as a native-endian integer (per
/// 32-bit word for IPv6), ports plain hexadecimal.
fn listening_inodes(table: &str, addr: SocketAddr) -> Vec<String> {
    const LISTEN: &str = "0A";
    let ip_hex: String = match addr {
        SocketAddr::V4(a) => format!("{:08X}", u32::from_ne_bytes(a.ip().octets())),
        SocketAddr::V6(a) => a
            .ip()
            .octets()
            .chunks_exact(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect(),
    };
    let local = format!("{ip_hex}:{:04X}", addr.port());
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, tx:rx, tr:when, retrnsmt, uid, timeout, inode
            let ok = fields.len() > 9 && fields[1] == local && fields[3] == LISTEN;
            ok.then(|| fields[9].to_string())
        })
        .collect()
}

fn free_loopback_ports(count: usize) -> std::io::Result<Vec<SocketAddr>> {
    // rumqttd binds by itself and cannot report a port chosen by the OS, so take them now (all
    // held at once, so they differ) and hand them over. Another process may take one in
    // between: the listener then moves to another (`spawn_core`, `move_when_taken`).
    let listeners = (0..count)
        .map(|_| StdListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners.iter().map(|l| l.local_addr()).collect()
}

/// What rumqttd runs as the core: its router's settings and one listener per port.
pub struct CoreSettings {
    router: rumqttd::RouterConfig,
    listeners: Vec<rumqttd::ServerSettings>,
    /// A listener whose port is taken when it binds moves to another free loopback port (up to
    /// `BIND_ATTEMPTS` ports) instead of stopping: for ports vigil picked itself.
    move_when_taken: bool,
}

/// The address each core listener serves on, by listener index: where it was told to listen,
/// or the port it moved to (`CoreSettings::move_when_taken`).
#[derive(Debug, Clone)]
pub struct ListenAddrs(Arc<Mutex<Vec<SocketAddr>>>);

impl ListenAddrs {
    pub fn get(&self, i: usize) -> SocketAddr {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)[i]
    }

    pub fn all(&self) -> Vec<SocketAddr> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, i: usize, addr: SocketAddr) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)[i] = addr;
    }
}

/// The rumqttd settings of the core, listening on `addrs` and accepting only `credential`
/// (user, password). `None` accepts anyone: only the benchmark baseline `examples/bare_core.rs`
/// does that, so that it measures exactly the core vigil runs.
pub fn core_settings(
    config: &Config,
    addrs: &[SocketAddr],
    credential: Option<(&str, &str)>,
) -> CoreSettings {
    let router = rumqttd::RouterConfig {
        max_connections: config.limits.max_connections
            + INTERNAL_CONNECTIONS
            + config.core.warm_connections,
        max_outgoing_packet_count: config.core.max_outgoing_packet_count,
        max_segment_size: config.core.max_segment_size,
        max_segment_count: config.core.max_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: config.limits.max_packet_size + ENVELOPE_SLACK,
        max_inflight_count: 100,
        auth: credential
            .map(|(user, password)| HashMap::from([(user.to_string(), password.to_string())])),
        external_auth: None,
        dynamic_filters: true,
    };
    let listeners = addrs
        .iter()
        .enumerate()
        .map(|(i, &listen)| rumqttd::ServerSettings {
            name: format!("vigil-core-{i}"),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        })
        .collect();
    CoreSettings {
        router,
        listeners,
        move_when_taken: false,
    }
}

/// Starts rumqttd: its router on a thread of its own, and its listeners spread over `threads`
/// network threads (listener `i` on thread `i % threads`), each thread running the accept loops
/// of its listeners and every connection they accept.
///
/// rumqttd's own `Broker::start` gives each listener a thread, and its accept loop sleeps one
/// timer tick after every connection (about 1.1 ms, even for a delay of 0), so one listener
/// accepts at most about 900 connections per second. Several accept loops on one thread
/// multiply that without adding threads: `[core] accept_loops` (BENCHMARKS.md, "Core accept
/// loops"). The threads run for the life of the process: rumqttd has no stop API, and a
/// listener's loop ends only if it cannot bind, which `Core::start`'s readiness probe reports.
/// Returns where each listener serves (see `move_when_taken`).
pub fn spawn_core(settings: CoreSettings, threads: usize) -> Result<ListenAddrs, CoreError> {
    let threads = threads.clamp(1, settings.listeners.len().max(1));
    let serving = ListenAddrs(Arc::new(Mutex::new(
        settings.listeners.iter().map(|l| l.listen).collect(),
    )));
    let attempts = if settings.move_when_taken {
        BIND_ATTEMPTS
    } else {
        1
    };
    let router_tx = rumqttd::Router::new(0, settings.router).spawn();
    let mut groups: Vec<Vec<(usize, rumqttd::ServerSettings)>> =
        (0..threads).map(|_| Vec::new()).collect();
    for (i, listener) in settings.listeners.into_iter().enumerate() {
        groups[i % threads].push((i, listener));
    }
    for (t, group) in groups.into_iter().enumerate() {
        let router_tx = router_tx.clone();
        let serving = serving.clone();
        let run = move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "no runtime for a core network thread");
                    return;
                }
            };
            // A LocalSet: the accept loops need not be `Send`, and they stay on this thread, as
            // the connection tasks they spawn do (a current-thread runtime).
            let loops = tokio::task::LocalSet::new();
            for (i, mut listener) in group {
                let router_tx = router_tx.clone();
                let serving = serving.clone();
                loops.spawn_local(async move {
                    for attempt in 1..=attempts {
                        let mut server = rumqttd::Server::new(
                            listener.clone(),
                            router_tx.clone(),
                            rumqttd::protocol::v4::V4,
                        );
                        // `start` returns only if it cannot bind: its accept loop never ends.
                        let Err(e) = server.start(rumqttd::LinkType::Remote).await else {
                            return;
                        };
                        let next = (attempt < attempts)
                            .then(|| free_loopback_ports(1).ok())
                            .flatten()
                            .and_then(|a| a.first().copied());
                        let Some(next) = next else {
                            tracing::error!(error = ?e, addr = %listener.listen, "a core listener stopped");
                            return;
                        };
                        // Another process took the port after `free_loopback_ports` let it go.
                        tracing::warn!(error = ?e, from = %listener.listen, to = %next,
                            "a core listener's port was taken; it moves to another");
                        listener.listen = next;
                        serving.set(i, next);
                    }
                });
            }
            runtime.block_on(loops);
        };
        std::thread::Builder::new()
            .name(format!("vigil-core-{t}"))
            .spawn(run)
            .map_err(CoreError::Thread)?;
    }
    Ok(serving)
}

// ---------------------------------------------------------------------------------------------
// Messages the core drops for subscribers that lag.
//
// rumqttd keeps one log per topic filter, `[core] max_segment_size × (max_segment_count + 1)`
// bytes, and acknowledges a publish once it is in the log. A subscriber that falls further
// behind than the log is moved past the segments dropped under it, whatever the QoS: the same
// policy as mosquitto's `max_queued_messages` (a bounded queue per slow subscriber, overflow
// dropped so that producers are never held back), with a byte bound per filter instead of a
// message bound per client. rumqttd reports such a jump only as a log event with both cursors,
// so the layer below reads the number of skipped messages from that event, and
// [`report_lag_drops`] turns the counts into a warning of our own (rumqttd's own log is off).

static LAG_DROPPED: AtomicU64 = AtomicU64::new(0);
static LAG_JUMPS: AtomicU64 = AtomicU64::new(0);
static LAG_LAST_FILTER: Mutex<String> = Mutex::new(String::new());

/// (cursor jumps, messages skipped) since the process started. Zero unless the process
/// installed [`LagDropCounter`] (the `vigil` binary does).
pub fn lag_drops() -> (u64, u64) {
    (LAG_JUMPS.load(Relaxed), LAG_DROPPED.load(Relaxed))
}

/// A `tracing` layer that counts the messages rumqttd's router skips for lagging subscribers.
/// [`LagDropCounter::layer`] comes with its own filter, which lets exactly rumqttd's router
/// warnings through, whatever the log filter.
pub struct LagDropCounter;

impl LagDropCounter {
    pub fn layer<S>() -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer;
        // Only that one kind of event: enabling the target's spans as well would make the
        // router build a span for every event it handles.
        // The level hint matters for speed: without it the process-wide maximum level is TRACE,
        // so every `trace!` and `debug!` (and every `log` record, from tungstenite) is built and
        // handed to the filters at run time instead of being skipped by a static level check.
        let only = tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_event()
                && *meta.level() == tracing::Level::WARN
                && meta.target() == ROUTING_TARGET
        })
        .with_max_level_hint(tracing::level_filters::LevelFilter::WARN);
        LagDropCounter.with_filter(only)
    }
}

const ROUTING_TARGET: &str = "rumqttd::router::routing";

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LagDropCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() != ROUTING_TARGET {
            return;
        }
        let mut jump = CursorJump::default();
        event.record(&mut jump);
        if let Some(skipped) = jump.skipped() {
            LAG_JUMPS.fetch_add(1, Relaxed);
            LAG_DROPPED.fetch_add(skipped, Relaxed);
            if let (Some(filter), Ok(mut last)) = (jump.filter, LAG_LAST_FILTER.lock()) {
                *last = filter;
            }
        }
    }
}

/// The fields of rumqttd's "Read cursor start jumped from (segment, offset) to (segment,
/// offset) on FILTER" event. Offsets count messages from the start of the filter's log.
#[derive(Default)]
struct CursorJump {
    from: Option<u64>,
    to: Option<u64>,
    filter: Option<String>,
}

impl CursorJump {
    fn skipped(&self) -> Option<u64> {
        Some(self.to?.saturating_sub(self.from?))
    }
}

impl tracing::field::Visit for CursorJump {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "request_cursor" => self.from = cursor_offset(&format!("{value:?}")),
            "start_cursor" => self.to = cursor_offset(&format!("{value:?}")),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "error" && value.starts_with("Read cursor start jumped") {
            self.filter = value.rsplit_once(" on ").map(|(_, f)| f.to_string());
        }
    }
}

/// The offset of a rumqttd cursor printed as `(segment, offset)`.
fn cursor_offset(printed: &str) -> Option<u64> {
    let (_, offset) = printed
        .trim_matches(|c| c == '(' || c == ')')
        .split_once(',')?;
    offset.trim().parse().ok()
}

/// Warns, at most every 10 s, when the core has dropped messages for lagging subscribers
/// since the last warning. Runs until `shutdown`.
pub async fn report_lag_drops(log_bytes: usize, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reported = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (_, dropped) = lag_drops();
        if dropped > reported {
            let filter = LAG_LAST_FILTER
                .lock()
                .map(|f| f.clone())
                .unwrap_or_default();
            tracing::warn!(
                messages = dropped - reported,
                last_filter = %filter,
                log_bytes,
                "the core dropped messages for subscribers that fell more than a topic filter's \
                 log behind (QoS 1/2 included; raise [core] max_segment_size/max_segment_count \
                 for more room)"
            );
            reported = dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_counts_as_ours_only_while_this_process_listens_on_it() {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Only the listening socket counts, not the ones connected to `addr` (ours too).
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        if listening_here(addr).is_none() {
            return; // no /proc here
        }
        assert_eq!(listening_here(addr), Some(true));
        drop(listener);
        assert_eq!(listening_here(addr), Some(false));
        // Another process's listener: the table lists it, but no descriptor of ours is it.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when \
                     retrnsmt   uid  timeout inode\n   \
                     0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  \
                     1000        0 4242 1 0000000000000000 100 0 0 10 0\n";
        let port_8080 = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
        if cfg!(target_endian = "little") {
            assert_eq!(listening_inodes(table, port_8080), vec!["4242".to_string()]);
        }
        let elsewhere = SocketAddr::from((Ipv4Addr::LOCALHOST, 8081));
        assert!(listening_inodes(table, elsewhere).is_empty());
    }

    #[tokio::test]
    async fn the_core_serves_on_every_port_and_a_dead_one_is_passed_over() {
        let mut config = Config::default_config().expect("built-in config");
        config.core.listeners = 2;
        config.core.accept_loops = 3;
        let core = Core::start(&config).await.expect("the core starts");
        assert_eq!(core.addrs.len(), 6);
        // Nothing listens on `dead` any more: connecting there is refused.
        let dead = free_loopback_ports(1).expect("a free port")[0];
        let with_dead = Core {
            addrs: vec![dead, core.addrs[0], dead, core.addrs[5]],
            next: AtomicUsize::new(0),
            username: core.username.clone(),
            password: core.password.clone(),
        };
        for i in 0..8 {
            let link = with_dead
                .connect(&format!("t-{i}"), true)
                .await
                .expect("a live port answers");
            assert_eq!(link.code, 0);
        }
        let only_dead = Core {
            addrs: vec![dead],
            next: AtomicUsize::new(0),
            username: core.username.clone(),
            password: core.password.clone(),
        };
        assert!(matches!(
            only_dead.connect("t-dead", true).await,
            Err(CoreError::Io(_))
        ));
    }

    #[tokio::test]
    async fn a_listener_whose_port_is_taken_moves_to_another() {
        let config = Config::default_config().expect("built-in config");
        // Another process holds the first port when the core binds.
        let taken = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a port");
        let held = taken.local_addr().expect("its address");
        let free = free_loopback_ports(1).expect("a free port")[0];
        let mut settings = core_settings(&config, &[held, free], Some(("u", "p")));
        settings.move_when_taken = true;
        let serving = spawn_core(settings, 1).expect("the core starts");
        let core = Core {
            addrs: vec![held, free],
            next: AtomicUsize::new(0),
            username: "u".into(),
            password: "p".into(),
        };
        for i in 0..2 {
            core.wait_ready(&serving, i, Duration::from_secs(10))
                .await
                .expect("each listener serves");
        }
        let moved = serving.get(0);
        assert_ne!(moved, held);
        assert_eq!(serving.all(), [moved, free]);
        drop(taken);
    }

    /// Not a test on its own: `the_probe_sends_the_credential_to_no_other_process` runs it in a
    /// child process, where it holds the port in `VIGIL_THIEF_PORT` and appends whatever its
    /// connections send to the file in `VIGIL_THIEF_LOG` (created once it listens).
    #[test]
    #[ignore = "run as a child process by another test"]
    fn port_thief() {
        use std::io::{Read, Write};
        let (Ok(port), Ok(log)) = (
            std::env::var("VIGIL_THIEF_PORT"),
            std::env::var("VIGIL_THIEF_LOG"),
        ) else {
            return;
        };
        let port: u16 = port.parse().expect("a port");
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port is free");
        let log = Arc::new(Mutex::new(std::fs::File::create(log).expect("log file")));
        for conn in listener.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    let _ = log.write_all(&buf[..n]);
                }
            });
        }
    }

    #[tokio::test]
    async fn the_probe_sends_the_credential_to_no_other_process() {
        let dir = crate::edge::snapshot::TestDir::new("core-thief");
        let log = dir.join("received");
        let port = free_loopback_ports(1).expect("a free port")[0];
        let exe = std::env::current_exe().expect("the test binary");
        struct KillOnDrop(std::process::Child);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let thief = std::process::Command::new(exe)
            .args(["--exact", "core::tests::port_thief", "--ignored"])
            .env("VIGIL_THIEF_PORT", port.port().to_string())
            .env("VIGIL_THIEF_LOG", &log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the thief starts");
        let thief = KillOnDrop(thief);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.exists() {
            assert!(Instant::now() < deadline, "the thief did not listen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let config = Config::default_config().expect("built-in config");
        let mut settings = core_settings(&config, &[port], Some(("u", "the-core-secret")));
        settings.move_when_taken = true;
        let serving = spawn_core(settings, 1).expect("the core starts");
        let core = Core {
            addrs: vec![port],
            next: AtomicUsize::new(0),
            username: "u".into(),
            password: "the-core-secret".into(),
        };
        let ready = core.wait_ready(&serving, 0, Duration::from_secs(10)).await;
        // A listener that stays on the thief's port (none here) is reported as not ready in
        // time, without a word to the thief.
        let stays = ListenAddrs(Arc::new(Mutex::new(vec![port])));
        let not_ready = core.wait_ready(&stays, 0, Duration::from_millis(300)).await;
        drop(thief);
        ready.expect("the listener moved and serves");
        assert_ne!(serving.get(0), port);
        assert!(
            matches!(not_ready, Err(CoreError::NotReady { .. })),
            "{not_ready:?}"
        );
        let received = std::fs::read(&log).expect("the thief's log");
        let secret = b"the-core-secret";
        assert!(
            !received.windows(secret.len()).any(|w| w == secret),
            "another process received the core's credential"
        );
    }

    #[test]
    fn reads_rumqttd_cursors() {
        assert_eq!(cursor_offset("(3, 12345)"), Some(12345));
        assert_eq!(cursor_offset("(0,0)"), Some(0));
        assert_eq!(cursor_offset("garbage"), None);
        let jump = CursorJump {
            from: Some(100),
            to: Some(4196),
            filter: None,
        };
        assert_eq!(jump.skipped(), Some(4096));
        assert_eq!(CursorJump::default().skipped(), None);
    }
}
