//! vigil: an MQTT broker for device fleets with a hardened edge in front of an embedded
//! rumqttd core.
//!
//! Map of the crate (see ARCHITECTURE.md for the why):
//! - [`config`]: `broker.toml`, parsed strictly and validated.
//! - [`core`]: the embedded rumqttd router, on loopback behind a per-process credential.
//! - [`edge`]: every public socket; per-connection tasks that police clients and relay to the
//!   core.
//! - [`mqtt`]: the MQTT wire format, the only place that knows byte layouts.
//! - [`envelope`]: the header vigil puts on payloads inside the core.
//! - [`metrics`]: counters rendered at `/metrics`.
//! - [`live`]: the analytics task, an internal core client scoring device telemetry.
//! - [`cluster`]: scale-out over Redis, two internal core clients exporting and importing.
//! - [`history`]: telemetry history per device, in memory (with a snapshot file) or in Redis.
//! - [`alert_log`]: the most recent alerts and acknowledgements, for dashboards opened later.
//!
//! [`run`] takes already bound listeners and a cancellation token, so tests bind port 0.

pub mod alert_log;
pub mod bridge;
pub mod cluster;
pub mod config;
pub mod core;
pub mod dashboard;
pub mod demo;
pub mod edge;
pub mod envelope;
pub mod history;
pub mod live;
pub mod metrics;
pub mod mqtt;
pub mod redis_link;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How long shutdown waits for connections to close before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} (`{key}`): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Core(#[from] core::CoreError),
    #[error(transparent)]
    Policy(#[from] edge::policy::PolicyError),
    #[error(transparent)]
    Tls(#[from] edge::tls::TlsError),
    #[error(transparent)]
    History(#[from] history::HistoryError),
    #[error(transparent)]
    Threads(#[from] edge::threads::ThreadsError),
    #[error("cannot create the persistence directory {dir}: {source}")]
    Persistence {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read a file of [persistence] dir: {0}")]
    Snapshot(edge::snapshot::SnapshotError),
}

/// The public listeners, bound.
pub struct Listeners {
    pub mqtt: TcpListener,
    pub http: TcpListener,
    /// MQTT over TLS, when `tls.mqtt_listen` is set.
    pub mqtts: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses. In local-only mode (no credentials configured) every
    /// listener is moved to loopback, as mosquitto 2.0 does, and a warning says so.
    pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
        let local_only = config.auth.local_only();
        let mqtt = bind_one("mqtt.listen", config.mqtt.listen, local_only).await?;
        let http = bind_one("http.listen", config.http.listen, local_only).await?;
        let mqtts = match config.tls.mqtt_listen_addr() {
            Some(addr) => Some(bind_one("tls.mqtt_listen", addr, local_only).await?),
            None => None,
        };
        Ok(Listeners { mqtt, http, mqtts })
    }

    pub fn mqtt_addr(&self) -> std::io::Result<SocketAddr> {
        self.mqtt.local_addr()
    }

    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }
}

async fn bind_one(
    key: &'static str,
    mut addr: SocketAddr,
    local_only: bool,
) -> Result<TcpListener, RunError> {
    if local_only && !addr.ip().is_loopback() {
        let loopback = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        tracing::warn!(
            configured = %addr,
            "no credentials configured ([auth] password_file is empty): local-only mode, `{key}` binds to {loopback}, anonymous clients are allowed and ACLs are not enforced"
        );
        addr.set_ip(loopback);
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { key, addr, source })
}

/// Runs vigil until `shutdown` is cancelled, then closes every connection (within
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // Certificates first: a bad file is reported before anything starts.
    let certificates = if listeners.mqtts.is_some() || config.tls.https {
        Some(edge::tls::Certificates::load(&config.tls)?)
    } else {
        None
    };
    let web_tls = match &certificates {
        Some(c) if config.tls.https => Some(c.acceptor(edge::tls::HTTP_ALPN)?),
        _ => None,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let core = core::Core::start(&config).await?;
    let tracker = tokio_util::task::TaskTracker::new();
    let history = history::History::start(&config, &tracker, shutdown.clone())?;
    let edge = Arc::new(edge::Edge::new(
        &config,
        core,
        metrics,
        history,
        tracker,
        shutdown.clone(),
        edge::threads::ConnectionThreads::start(config.runtime.connection_threads())?,
    )?);
    if let Some(dir) = config.persistence.sessions_dir() {
        create_persistence_dir(dir)?;
        load_alert_log(&edge, dir)?;
        spawn_autosave(&edge, edge.alert_log.clone(), dir, &config, &shutdown);
    }
    let retained_dir = config.persistence.retained_dir(&config.redis);
    if retained_dir.is_none() && !config.persistence.dir.is_empty() {
        tracing::warn!("[persistence] dir keeps only the persistent sessions with [redis]: the shared retained hash keeps the retained messages");
    }
    if let Some(dir) = retained_dir {
        load_retained(&edge, dir)?;
        spawn_autosave(&edge, edge.retained.clone(), dir, &config, &shutdown);
    }
    let sessions_dir = config.persistence.sessions_dir();
    // The web port first: health checks and metrics answer while the saved sessions are
    // restored; its WebSocket clients wait for them, as MQTT clients wait for the listener.
    let http_addr = listeners.http.local_addr().ok();
    if sessions_dir.is_some() {
        edge.hold_clients();
    }
    if config.analytics.enabled {
        // Started after the restore: `/readyz` says "starting" meanwhile, not "disabled".
        edge.metrics.analytics.state.store(
            live::ANALYTICS_STARTING,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let web_task = tokio::spawn(edge::web::serve(edge.clone(), listeners.http, web_tls));
    if let Some(dir) = sessions_dir {
        let restored = restore_sessions(&edge, dir).await;
        edge.admit_clients();
        restored?;
        spawn_autosave(&edge, edge.registry.clone(), dir, &config, &shutdown);
    }
    tokio::spawn(reload_on_hangup(edge.clone()));
    edge.tracker.spawn(edge.clone().reap());
    edge.tracker.spawn(edge::warm::keep_warm(edge.clone()));
    tokio::spawn(core::report_lag_drops(
        config.core.max_segment_size * (config.core.max_segment_count + 1),
        shutdown.clone(),
    ));
    if config.redis.enabled() {
        // The exporter takes every message to the other instances and their subscribers.
        edge.subscribed.insert(b"#");
        cluster::start(&edge, &config.redis);
    }
    if config.analytics.enabled {
        edge.subscribed.insert(live::TELEMETRY_FILTER.as_bytes());
        edge.subscribed.insert(live::STATUS_FILTER.as_bytes());
        for filter in live::ALERT_LOG_FILTERS {
            edge.subscribed.insert(filter.as_bytes());
        }
        // Tracked with the connections, so shutdown waits for it too.
        edge.tracker.spawn(live::run(
            edge.clone(),
            config.analytics.clone(),
            config.history.points_per_device,
        ));
    }

    let mqtt_addr = listeners.mqtt.local_addr().ok();
    let mqtts_addr = listeners.mqtts.as_ref().map(|l| l.local_addr().ok());
    let tcp_task = tokio::spawn(edge::tcp::serve(edge.clone(), listeners.mqtt));
    let tls_task = match (listeners.mqtts, &certificates) {
        (Some(listener), Some(c)) => {
            let acceptor = c.acceptor(edge::tls::MQTT_ALPN)?;
            Some(tokio::spawn(edge::tcp::serve_tls(
                edge.clone(),
                listener,
                acceptor,
            )))
        }
        _ => None,
    };
    tracing::info!(
        mqtt = %fmt_addr(mqtt_addr),
        http = %fmt_addr(http_addr),
        mqtts = %mqtts_addr.map_or_else(|| "off".to_string(), fmt_addr),
        https = config.tls.https,
        "vigil listening"
    );

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let _ = tcp_task.await;
    let _ = web_task.await;
    if let Some(task) = tls_task {
        let _ = task.await;
    }
    edge.tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, edge.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = edge.tracker.len(),
            "connections still open at the shutdown deadline"
        );
    }
    edge.threads.stop();
    if let Some(dir) = retained_dir {
        // Last, when no connection can store another one.
        edge::snapshot::save_now(&edge.retained, &edge.metrics, dir).await;
    }
    if let Some(dir) = sessions_dir {
        // The analytics task has ended: nothing records another alert.
        edge::snapshot::save_now(&edge.alert_log, &edge.metrics, dir).await;
        // Every connection has ended: its session is offline and its expiry counting. What
        // the core holds for the offline sessions is taken into the registry to be saved too.
        let started = std::time::Instant::now();
        let limit = Duration::from_secs(config.persistence.drain_secs);
        let d = match limit.is_zero() {
            true => edge::sessions::Drained::default(),
            false => edge::sessions::drain(&edge, limit).await,
        };
        if d.messages + d.dropped + d.not_drained > 0 {
            tracing::info!(
                sessions = d.sessions,
                ms = started.elapsed().as_millis() as u64,
                messages = d.messages,
                dropped = d.dropped,
                not_drained = d.not_drained,
                "queued messages of offline sessions kept for the restart"
            );
        }
        edge::snapshot::save_now(&edge.registry, &edge.metrics, dir).await;
    }
    Ok(())
}

/// Builds the persistent sessions saved in `dir` again (`[persistence]`), before any client
/// can connect. A damaged file is set aside (`sessions.bin.damaged`) and vigil starts
/// without it, saying so.
async fn restore_sessions(edge: &Arc<edge::Edge>, dir: &std::path::Path) -> Result<(), RunError> {
    let Some(saved) = unless_damaged(
        edge::sessions::load(dir),
        dir,
        edge::sessions::FILE,
        "persistent sessions not restored: starting without them",
    )?
    else {
        return Ok(());
    };
    if saved.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let r = edge::sessions::restore(edge, saved).await;
    let not_restored = r.expired + r.over_cap + r.failed;
    edge.metrics
        .sessions_restored
        .store(r.restored as u64, std::sync::atomic::Ordering::Relaxed);
    edge.metrics
        .sessions_not_restored
        .store(not_restored as u64, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        restored = r.restored,
        expired = r.expired,
        over_cap = r.over_cap,
        failed = r.failed,
        filters_refused = r.filters_refused,
        messages = r.messages,
        ms = started.elapsed().as_millis() as u64,
        "persistent sessions restored"
    );
    if r.over_cap > 0 {
        tracing::warn!(
            over_cap = r.over_cap,
            "saved persistent sessions beyond limits.max_persistent_sessions were not restored"
        );
    }
    Ok(())
}

/// Reads the retained messages saved in `dir` (`[persistence]`). A damaged file is set aside
/// (`retained.bin.damaged`) and vigil starts without it, saying so, rather than not at all.
fn load_retained(edge: &edge::Edge, dir: &std::path::Path) -> Result<(), RunError> {
    if let Some((loaded, refused)) = unless_damaged(
        edge.retained.load(dir),
        dir,
        edge::retained::FILE,
        "retained messages not loaded: starting without them",
    )? {
        if refused > 0 {
            tracing::warn!(
                refused,
                "saved retained messages beyond limits.max_retained_bytes were not loaded"
            );
        }
        tracing::info!(loaded, dir = %dir.display(), "retained messages loaded");
    }
    edge.note_retained(edge.retained.totals());
    Ok(())
}

/// Saves `target` in `dir` every `[persistence] autosave_interval_secs` when it changed, until
/// `shutdown` (`edge::snapshot::autosave`); the last save is `run`'s.
fn spawn_autosave<T: edge::snapshot::Persisted>(
    edge: &edge::Edge,
    target: Arc<T>,
    dir: &std::path::Path,
    config: &Config,
    shutdown: &CancellationToken,
) {
    tokio::spawn(edge::snapshot::autosave(
        target,
        edge.metrics.clone(),
        dir.to_path_buf(),
        Duration::from_secs(config.persistence.autosave_interval_secs),
        shutdown.clone(),
    ));
}

/// Reads the alert log saved in `dir` (`[persistence]`); a damaged file is set aside
/// (`alerts.bin.damaged`) and the log starts empty, saying so.
fn load_alert_log(edge: &edge::Edge, dir: &std::path::Path) -> Result<(), RunError> {
    let loaded = unless_damaged(
        edge.alert_log.load(dir),
        dir,
        alert_log::FILE,
        "alert log not loaded: starting without it",
    )?;
    if let Some(loaded) = loaded.filter(|&n| n > 0) {
        tracing::info!(loaded, dir = %dir.display(), "alert log loaded");
    }
    Ok(())
}

/// What reading `file` in `dir` (`[persistence]`) gave, unless the file is damaged: then it
/// is set aside (`FILE.damaged`), `starting_without` is logged as an error and vigil starts
/// without it (`None`). Any other error stops the start.
fn unless_damaged<T>(
    read: Result<T, edge::snapshot::SnapshotError>,
    dir: &std::path::Path,
    file: &str,
    starting_without: &str,
) -> Result<Option<T>, RunError> {
    match read {
        Ok(value) => Ok(Some(value)),
        Err(e @ edge::snapshot::SnapshotError::Corrupt { .. }) => {
            let moved = edge::snapshot::set_aside(dir, file);
            tracing::error!(error = %e, set_aside = moved, "{starting_without}");
            Ok(None)
        }
        Err(e) => Err(RunError::Snapshot(e)),
    }
}

/// Creates `[persistence] dir` if it is missing, once, before any file is read.
fn create_persistence_dir(dir: &std::path::Path) -> Result<(), RunError> {
    std::fs::create_dir_all(dir).map_err(|source| RunError::Persistence {
        dir: dir.to_path_buf(),
        source,
    })
}

/// SIGHUP reloads the password file; connections stay up. A file that does not load is
/// reported and the previous one stays in force.
async fn reload_on_hangup(edge: Arc<edge::Edge>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: the password file will not be reloaded");
            return;
        };
        while hangups.recv().await.is_some() {
            match edge.policy.reload() {
                Ok(users) => tracing::info!(users, "password file reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "password file not reloaded; the previous one stays in force")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = edge;
}

fn fmt_addr(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| "?".into())
}
