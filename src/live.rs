//! The live analytics task: an internal client of the core that scores every telemetry message
//! and publishes alerts, predictions and error replies back through the core.
//!
//! It connects to the core as `i-analytics` (never through the public edge), subscribes to
//! `device/+/telemetry` at QoS 0 and keeps one `DeviceMonitor` per device. Per message it parses
//! the payload (`vigil_analytics::telemetry`), feeds every reading to the device's monitor and
//! writes what comes out to the core: alerts at QoS 1 (at most [`MAX_UNACKED_ALERTS`] waiting for
//! the core's PUBACK), predictions and error replies at QoS 0. Model refits run on blocking
//! threads, at most `analytics.max_concurrent_refits` at once and one per device, and come back
//! over a channel. Every structure is bounded (see ARCHITECTURE.md, "Queues and bounds"), and
//! nothing is logged per message: the counters in `metrics` say what happened.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vigil_analytics::alert::AlertMessage;
use vigil_analytics::detector::{DetectorError, TrainedModel};
use vigil_analytics::monitor::{
    device_matches, DeviceMonitor, MonitorConfig, MonitorError, STOP_HOLD_MS,
};
use vigil_analytics::rul::RulModel;
use vigil_analytics::silence::{SilenceRule, SilenceWatch};
use vigil_analytics::telemetry::{self, Limits};

use crate::alert_log::AlertLog;
use crate::config::{AnalyticsConfig, ConfigError};
use crate::core::{self, CoreError};
use crate::edge::Edge;
use crate::envelope;
use crate::history::History;
use crate::metrics::Metrics;
use crate::mqtt;

/// The core client id of the task (`i-` ids are reserved for internal components).
pub const CLIENT_ID: &str = "i-analytics";
/// The subscription that feeds the task.
pub const TELEMETRY_FILTER: &str = "device/+/telemetry";
/// Device presence (`{"status":"offline"}`, often a retained last will): a device that says it
/// is going offline is not reported silent.
pub const STATUS_FILTER: &str = "device/+/status";
/// The task also subscribes to its own output and drops what comes back. rumqttd remembers
/// which filters a topic matches only for topics that match at least one, and matches every
/// publish to any other topic against every filter it holds: with a dashboard session per
/// device that is thousands of string comparisons for each prediction nobody subscribed to
/// (measured in BENCHMARKS.md, "JSON WebSocket bridge"). Getting a prediction back costs far
/// less.
const OUTPUT_FILTERS: [&str; 3] = ["device/+/predictions", "device/+/alerts", "device/+/errors"];
/// Operators' acknowledgements of alerts, kept with the alerts in `Edge::alert_log`.
const ALERT_ACK_FILTER: &str = "device/+/alerts/ack";
/// The alert traffic this task keeps in `Edge::alert_log`, whoever publishes it: the edge must
/// route clients' publishes there to the core even when no client subscribes.
pub const ALERT_LOG_FILTERS: [&str; 2] = ["device/+/alerts", ALERT_ACK_FILTER];
/// QoS 1 alerts handed to the core and not yet acknowledged; more wait in the alert queue.
pub const MAX_UNACKED_ALERTS: usize = 100;
/// Alerts waiting for room in the window; beyond this the oldest is dropped (counted).
pub const MAX_QUEUED_ALERTS: usize = 1000;
/// Bytes written for the core but not yet taken by it; above this QoS 0 output is dropped
/// (counted) rather than stopping reading, which could deadlock against the core's own writes.
pub const MAX_OUT_BYTES: usize = 256 * 1024;
/// Longest `reason` text in an error reply; parser messages can quote the payload.
const MAX_REASON_LEN: usize = 200;
/// Time the core has to acknowledge the subscription.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// Room kept free in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("invalid analytics configuration: {0}")]
    Config(#[from] MonitorError),
    #[error(transparent)]
    Model(#[from] ConfigError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("the core refused the telemetry subscription")]
    SubscribeRefused,
    #[error("the core did not acknowledge the telemetry subscription in time")]
    SubackTimeout,
    #[error("core connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the core sent a malformed packet: {0}")]
    Codec(#[from] mqtt::CodecError),
    #[error("the core closed the connection")]
    Closed,
}

/// One message for the core.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub qos: u8,
    pub payload: Vec<u8>,
}

/// Readings of a warming device held until its warm start finishes; older ones are dropped.
const MAX_WARMING_READINGS: usize = 256;
/// Time a warm start may spend fetching history before the device starts cold.
const WARM_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// A monitor rebuilt from history on a blocking thread.
struct Warmed {
    device: String,
    epoch: u64,
    monitor: DeviceMonitor,
    points: usize,
}

/// Work finished off the analytics task.
enum Background {
    Refit(RefitDone),
    Warmed(Box<Warmed>),
}

/// A finished refit coming back from a blocking thread.
struct RefitDone {
    device: String,
    epoch: u64,
    result: Result<TrainedModel, DetectorError>,
}

struct Device {
    monitor: DeviceMonitor,
    /// Position in `Analytics::recency`.
    last_seen: u64,
    /// Distinguishes this monitor from an earlier, evicted one of the same device, so a refit
    /// started for the old one is never installed into the new one.
    epoch: u64,
    refit_running: bool,
    /// While the monitor is being warmed from history: the readings that arrived meanwhile,
    /// scored once it is installed.
    warming: Option<VecDeque<vigil_analytics::telemetry::Reading>>,
    /// When its messages arrived, to notice it going silent.
    silence: SilenceWatch,
}

/// The analytics state: device monitors, their recency order and the refit machinery. It
/// outlives core connections, so a reconnect loses no model.
pub struct Analytics {
    monitor_config: MonitorConfig,
    /// `[[analytics.rul]]`: device pattern, loaded model, alert level; the first match applies.
    rul_models: Vec<(String, Arc<RulModel>, f64)>,
    limits: Limits,
    silence_rule: SilenceRule,
    max_devices: usize,
    devices: HashMap<String, Device>,
    /// Devices by the tick they were last seen at: the first entry is the eviction candidate.
    recency: BTreeMap<u64, String>,
    tick: u64,
    next_epoch: u64,
    metrics: Arc<Metrics>,
    refit_slots: Arc<Semaphore>,
    refit_tx: mpsc::Sender<RefitDone>,
    history: History,
    /// Points replayed into a new monitor (the detector's window, at most the stored history).
    warm_points: usize,
    warm_tx: mpsc::Sender<Warmed>,
    warm_rx: mpsc::Receiver<Warmed>,
    refit_rx: mpsc::Receiver<RefitDone>,
}

impl Analytics {
    /// Checks the monitor settings once, so creating a device's monitor later cannot fail.
    pub fn new(
        config: &AnalyticsConfig,
        metrics: Arc<Metrics>,
        history: History,
        history_points: usize,
    ) -> Result<Analytics, LiveError> {
        let monitor_config = config.monitor_config();
        let warm_points = monitor_config.detector.history.min(history_points);
        // Warm starts wait for a refit slot after fetching; a full channel makes them wait
        // too, never the analytics task.
        let (warm_tx, warm_rx) = mpsc::channel(64);
        DeviceMonitor::new("config-check", monitor_config.clone())?;
        let rul_models = config
            .rul
            .iter()
            .map(|r| Ok((r.devices.clone(), Arc::new(r.load()?), r.alert_below)))
            .collect::<Result<_, ConfigError>>()?;
        let slots = config.max_concurrent_refits.max(1);
        // A refit releases its slot only after its result is sent, so at most `slots` results
        // are ever in flight and this capacity is never the limit.
        let (refit_tx, refit_rx) = mpsc::channel(slots);
        Ok(Analytics {
            monitor_config,
            rul_models,
            limits: Limits::default(),
            silence_rule: SilenceRule {
                factor: config.silence_factor,
                min_ms: telemetry::secs_to_ms(config.silence_min_secs),
            },
            max_devices: config.max_devices.max(1),
            devices: HashMap::new(),
            recency: BTreeMap::new(),
            tick: 0,
            next_epoch: 0,
            metrics,
            refit_slots: Arc::new(Semaphore::new(slots)),
            refit_tx,
            refit_rx,
            history,
            warm_points,
            warm_tx,
            warm_rx,
        })
    }

    /// Devices with a monitor now.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn has_device(&self, id: &str) -> bool {
        self.devices.contains_key(id)
    }

    /// Handles one message from `device/<id>/telemetry` received at `now_ms`, appending what it
    /// produced to `out`. Topics that are not telemetry topics are ignored.
    pub fn handle_telemetry(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
        out: &mut Vec<Outgoing>,
    ) {
        let Some(id) = telemetry::device_id_from_topic(topic) else {
            return;
        };
        let readings = match telemetry::parse(id, payload, now_ms, &self.limits) {
            Ok(readings) => readings,
            Err(e) => {
                self.metrics.analytics.telemetry_error(e.code());
                // A device sending what cannot be parsed is not silent; the error reply says
                // what is wrong.
                if let Some(device) = self.devices.get_mut(id) {
                    device.silence.note(now_ms);
                }
                let reply = serde_json::json!({
                    "type": "ERROR",
                    "device_id": id,
                    "code": e.code(),
                    "reason": truncate(&e.to_string(), MAX_REASON_LEN),
                    "timestamp": now_ms,
                });
                out.push(Outgoing {
                    topic: format!("device/{id}/errors"),
                    qos: 0,
                    payload: reply.to_string().into_bytes(),
                });
                return;
            }
        };
        let metrics = self.metrics.clone();
        Metrics::inc(&metrics.analytics.messages);
        for reading in &readings {
            self.history
                .record(id, reading.timestamp_ms, &reading.metrics);
        }
        let first_ts = readings.first().map_or(now_ms, |r| r.timestamp_ms);
        let Some(device) = self.touch(id, first_ts, out) else {
            return;
        };
        device.silence.note(now_ms);
        if let Some(waiting) = &mut device.warming {
            for reading in readings {
                if waiting.len() >= MAX_WARMING_READINGS {
                    waiting.pop_front();
                    Metrics::inc(&metrics.analytics.warm_dropped);
                }
                waiting.push_back(reading);
            }
            return;
        }
        Self::score(&metrics, id, device, &readings, out);
        self.maybe_refit(id);
    }

    /// A reading of `device/<id>/telemetry` scored by another instance (the device is
    /// connected there now): this instance stops watching the device for silence.
    pub fn note_remote(&mut self, topic: &str) {
        let device = telemetry::device_id_from_topic(topic).and_then(|id| self.devices.get_mut(id));
        if let Some(device) = device {
            device.silence.forget();
        }
    }

    /// Handles a message on `device/<id>/status`: a device that says it is offline (`offline`
    /// or `disconnected`, as the payload itself or its `status` field, in any case) is not
    /// reported silent until it reports again.
    pub fn handle_status(&mut self, topic: &str, payload: &[u8]) {
        let id = telemetry::device_id_from(topic, "status");
        let Some(device) = id.and_then(|id| self.devices.get_mut(id)) else {
            return;
        };
        if says_offline(payload) {
            device.silence.excuse();
        }
    }

    /// Forgets every device's message timing: called when a core connection starts, since
    /// while this task had none it heard nothing from anybody, and that is not the devices'
    /// silence.
    fn forget_silences(&mut self) {
        for device in self.devices.values_mut() {
            device.silence.forget();
        }
    }

    /// Appends an alert to `out` for every device that has just gone silent at `now_ms` (see
    /// `vigil_analytics::silence`). Called about once a second.
    ///
    /// Also publishes the alerts a device's monitor held while its machine may have been
    /// stopping (`DeviceMonitor`) once the device has sent nothing for as long as they are held:
    /// it can no longer show that it stopped.
    pub fn sweep_silent(&mut self, now_ms: i64, out: &mut Vec<Outgoing>) {
        for (id, device) in &mut self.devices {
            let quiet = |l: i64| now_ms.saturating_sub(l) >= STOP_HOLD_MS;
            if device.monitor.holds_alerts() && device.silence.last_ms().map_or(true, quiet) {
                for alert in device.monitor.take_held() {
                    push_alert(&self.metrics, id, &alert, out);
                }
            }
            if self.silence_rule.factor == 0 {
                continue;
            }
            let Some(silence) = device.silence.check(&self.silence_rule, now_ms) else {
                continue;
            };
            if push_alert(&self.metrics, id, &silence.to_alert(id, now_ms), out) {
                Metrics::inc(&self.metrics.analytics.silences);
                tracing::info!(
                    device = %id,
                    silent_ms = silence.silent_ms,
                    usual_ms = silence.usual_ms,
                    "device silent"
                );
            }
        }
    }

    /// Feeds readings to a device's monitor and appends the alerts and predictions to `out`.
    fn score(
        metrics: &Metrics,
        id: &str,
        device: &mut Device,
        readings: &[vigil_analytics::telemetry::Reading],
        out: &mut Vec<Outgoing>,
    ) {
        for reading in readings {
            let result = device.monitor.ingest(reading);
            metrics
                .analytics
                .points
                .fetch_add(result.scored_points() as u64, Relaxed);
            for alert in &result.alerts {
                push_alert(metrics, id, alert, out);
            }
            metrics
                .analytics
                .alerts_withdrawn
                .fetch_add(result.withdrawn as u64, Relaxed);
            if result.rest_learned {
                Metrics::inc(&metrics.analytics.rests_learned);
                tracing::info!(
                    device = id,
                    "learned a rest of the machine: its stops no longer feed the anomaly detector"
                );
            }
            let predictions = result.predictions.iter().map(serde_json::to_vec);
            let rul = result.rul.iter().map(serde_json::to_vec);
            for payload in predictions.chain(rul).filter_map(Result::ok) {
                Metrics::inc(&metrics.analytics.predictions);
                out.push(Outgoing {
                    topic: format!("device/{id}/predictions"),
                    qos: 0,
                    payload,
                });
            }
        }
    }

    /// Starts rebuilding a new device's monitor from its stored history (points before
    /// `before_ms`, the first reading that made it new): fetched, then replayed with its
    /// refits on a blocking thread under a refit slot. The device's readings wait meanwhile.
    fn start_warm(&mut self, id: &str, epoch: u64, monitor: DeviceMonitor, before_ms: i64) {
        let history = self.history.clone();
        let slots = self.refit_slots.clone();
        let tx = self.warm_tx.clone();
        let (device, limit) = (id.to_string(), self.warm_points);
        tokio::spawn(async move {
            let points = tokio::time::timeout(WARM_FETCH_TIMEOUT, history.recent(&device, limit))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let replay = async {
                if points.is_empty() {
                    return Some((monitor, 0));
                }
                let slot = slots.acquire_owned().await.ok()?;
                tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    replay(monitor, &points, before_ms)
                })
                .await
                .ok()
            };
            if let Some((monitor, points)) = replay.await {
                let _ = tx
                    .send(Warmed {
                        device,
                        epoch,
                        monitor,
                        points,
                    })
                    .await;
            }
        });
    }

    /// Installs a warmed monitor and scores the readings that waited for it.
    fn warm_done(&mut self, warmed: Warmed, out: &mut Vec<Outgoing>) {
        let Some(device) = self.devices.get_mut(&warmed.device) else {
            return;
        };
        if device.epoch != warmed.epoch {
            return;
        }
        if warmed.points > 0 {
            Metrics::inc(&self.metrics.analytics.warm_starts);
        }
        device.monitor = warmed.monitor;
        let waiting: Vec<_> = device.warming.take().unwrap_or_default().into();
        Self::score(&self.metrics, &warmed.device, device, &waiting, out);
        self.maybe_refit(&warmed.device);
    }

    /// Waits for the next finished refit or warmed monitor.
    async fn next_background(&mut self) -> Background {
        tokio::select! {
            Some(done) = self.refit_rx.recv() => Background::Refit(done),
            Some(warmed) = self.warm_rx.recv() => Background::Warmed(Box::new(warmed)),
            // Both senders live in `self`, so this is never reached.
            else => std::future::pending().await,
        }
    }

    /// The monitor of `id`, marked as the most recently seen, created (evicting the least
    /// recently seen device if the map is full, its held alerts published to `out`) when
    /// missing.
    fn touch(&mut self, id: &str, first_ts: i64, out: &mut Vec<Outgoing>) -> Option<&mut Device> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(device) = self.devices.get_mut(id) {
            self.recency.remove(&device.last_seen);
            self.recency.insert(tick, id.to_string());
            device.last_seen = tick;
            return self.devices.get_mut(id);
        }
        while self.devices.len() >= self.max_devices {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            if let Some(mut evicted) = self.devices.remove(&oldest) {
                for alert in evicted.monitor.take_held() {
                    push_alert(&self.metrics, &oldest, &alert, out);
                }
            }
            Metrics::inc(&self.metrics.analytics.evictions);
        }
        // The configuration was validated in `new`, so this cannot fail; if it ever did, the
        // message is simply not scored.
        let mut monitor = DeviceMonitor::new(id, self.monitor_config.clone()).ok()?;
        if let Some((_, model, alert_below)) = self
            .rul_models
            .iter()
            .find(|(pattern, _, _)| device_matches(pattern, id))
        {
            monitor.set_rul(model.clone(), *alert_below);
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        // A device new to this instance (first reading, after a restart or an eviction, or
        // moved from another instance) warms up from its stored history when there is any.
        let warm = self.warm_points > 0 && self.history.ready();
        if warm {
            self.start_warm(id, epoch, monitor.clone(), first_ts);
        }
        self.devices.insert(
            id.to_string(),
            Device {
                monitor,
                last_seen: tick,
                epoch,
                refit_running: false,
                warming: warm.then(VecDeque::new),
                silence: SilenceWatch::default(),
            },
        );
        self.recency.insert(tick, id.to_string());
        self.metrics
            .analytics
            .devices
            .store(self.devices.len() as u64, Relaxed);
        self.devices.get_mut(id)
    }

    /// Starts the refit `id` wants, if it has none running and a refit slot is free. A device
    /// that finds no free slot asks again with its next message.
    fn maybe_refit(&mut self, id: &str) {
        let Some(device) = self.devices.get_mut(id) else {
            return;
        };
        if device.refit_running {
            return;
        }
        let Ok(slot) = self.refit_slots.clone().try_acquire_owned() else {
            return;
        };
        let Some(job) = device.monitor.needs_refit() else {
            return;
        };
        device.refit_running = true;
        Metrics::inc(&self.metrics.analytics.refits_running);
        let (device, epoch) = (id.to_string(), device.epoch);
        let tx = self.refit_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = job.run();
            // The receiver is gone only at shutdown, when the model is no longer wanted.
            let _ = tx.blocking_send(RefitDone {
                device,
                epoch,
                result,
            });
            drop(slot);
        });
    }

    /// Installs a finished refit, unless its device was evicted meanwhile.
    fn refit_done(&mut self, done: RefitDone) {
        self.metrics.analytics.refits_running.fetch_sub(1, Relaxed);
        let Some(device) = self.devices.get_mut(&done.device) else {
            return;
        };
        if device.epoch != done.epoch {
            return;
        }
        device.refit_running = false;
        match done.result {
            Ok(model) => {
                device.monitor.install(model);
                Metrics::inc(&self.metrics.analytics.refits);
            }
            Err(_) => Metrics::inc(&self.metrics.analytics.refit_failures),
        }
        // A device with several metrics has one job per metric; start the next one now.
        self.maybe_refit(&done.device);
    }
}

/// Feeds stored points (those before `before_ms`) into a fresh monitor, discarding what it
/// says, then runs the refits it asks for, so it scores like a monitor that saw them live.
/// Returns the monitor and the number of points replayed.
fn replay(
    mut monitor: DeviceMonitor,
    points: &[crate::history::Point],
    before_ms: i64,
) -> (DeviceMonitor, usize) {
    let mut replayed = 0;
    let mut reading = vigil_analytics::telemetry::Reading {
        timestamp_ms: 0,
        device_time: true,
        metrics: Vec::new(),
    };
    for p in points.iter().filter(|p| p.ts_ms < before_ms) {
        reading.timestamp_ms = p.ts_ms;
        reading.metrics.clone_from(&p.values);
        monitor.ingest(&reading);
        replayed += 1;
    }
    // Alerts it holds are history's too (they would come out with the next live reading).
    drop(monitor.take_held());
    // One job per metric that wants a model; a failing job ends the loop.
    for _ in 0..64 {
        let Some(job) = monitor.needs_refit() else {
            break;
        };
        match job.run() {
            Ok(model) => {
                monitor.install(model);
            }
            Err(_) => break,
        }
    }
    (monitor, replayed)
}

/// Alerts on their way to the core: the unacknowledged window and the queue behind it. Kept
/// across reconnects, so an alert the core never acknowledged is sent again.
#[derive(Default)]
struct AlertWindow {
    unacked: VecDeque<(u16, Outgoing)>,
    queued: VecDeque<Outgoing>,
    next_pkid: u16,
}

impl AlertWindow {
    fn enqueue(&mut self, alert: Outgoing, metrics: &Metrics) {
        if self.queued.len() >= MAX_QUEUED_ALERTS {
            self.queued.pop_front();
            Metrics::inc(&metrics.analytics.dropped_alerts);
        }
        self.queued.push_back(alert);
    }

    /// Writes queued alerts while the window has room.
    fn pump(&mut self, out: &mut BytesMut) {
        while self.unacked.len() < MAX_UNACKED_ALERTS {
            let Some(alert) = self.queued.pop_front() else {
                return;
            };
            let pkid = self.fresh_pkid();
            put_message(out, &alert, pkid);
            self.unacked.push_back((pkid, alert));
        }
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

    fn acked(&mut self, pkid: u16) {
        if let Some(i) = self.unacked.iter().position(|(p, _)| *p == pkid) {
            self.unacked.remove(i);
        }
    }

    /// After a lost connection: unacknowledged alerts go back to the front of the queue.
    fn requeue_unacked(&mut self) {
        while let Some((_, alert)) = self.unacked.pop_back() {
            self.queued.push_front(alert);
        }
        while self.queued.len() > MAX_QUEUED_ALERTS {
            self.queued.pop_back();
        }
    }
}

fn put_message(out: &mut BytesMut, m: &Outgoing, pkid: u16) {
    envelope::put_core_publish(
        out,
        false,
        m.qos,
        false,
        m.topic.as_bytes(),
        pkid,
        &envelope::plain_header(m.qos),
        &m.payload,
    );
}

/// Runs the analytics task until `shutdown` is cancelled, reconnecting to the core with backoff
/// if its connection is lost.
/// Values of `AnalyticsMetrics::state` (0 is "disabled").
pub const ANALYTICS_STARTING: u64 = 1;
pub const ANALYTICS_READY: u64 = 2;
pub const ANALYTICS_FAILED: u64 = 3;

/// `history_points` is `history.points_per_device` (0: no history, no warm starts).
pub async fn run(edge: Arc<Edge>, config: AnalyticsConfig, history_points: usize) {
    let metrics = edge.metrics.clone();
    let shutdown = edge.shutdown.clone();
    metrics.analytics.state.store(ANALYTICS_STARTING, Relaxed);
    async move {
        let mut state = match Analytics::new(
            &config,
            metrics.clone(),
            edge.history.clone(),
            history_points,
        ) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(error = %e, "analytics disabled");
                metrics.analytics.state.store(ANALYTICS_FAILED, Relaxed);
                return;
            }
        };
        let mut window = AlertWindow::default();
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            match session(&edge, &mut state, &mut window, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "analytics lost its core connection");
                }
            }
            window.requeue_unacked();
            metrics.analytics.state.store(ANALYTICS_STARTING, Relaxed);
            Metrics::inc(&metrics.analytics.core_reconnects);
            if started.elapsed() >= STABLE_SESSION {
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    .instrument(tracing::info_span!("analytics"))
    .await
}

/// One core connection: subscribe, then score telemetry until shutdown (`Ok`) or a failure.
async fn session(
    edge: &Edge,
    state: &mut Analytics,
    window: &mut AlertWindow,
    shutdown: &CancellationToken,
) -> Result<(), LiveError> {
    let Some(link) = edge
        .core
        .connect_internal(CLIENT_ID, true, shutdown)
        .await?
    else {
        return Ok(());
    };
    let (mut rd, mut wr) = link.stream.into_split();
    let mut read_buf = link.read_buf;
    state.forget_silences();
    let mut out = BytesMut::with_capacity(4096);
    let filters: Vec<(Bytes, u8)> = [TELEMETRY_FILTER, STATUS_FILTER, ALERT_ACK_FILTER]
        .into_iter()
        .chain(OUTPUT_FILTERS)
        .map(|f| (Bytes::from_static(f.as_bytes()), 0))
        .collect();
    mqtt::put_core_subscribe(&mut out, 1, &filters);
    window.pump(&mut out);
    let mut subscribed = false;
    let suback_deadline = Instant::now() + SUBACK_TIMEOUT;
    let mut ping = core::ping_timer();
    let mut silence_sweep = tokio::time::interval(SILENCE_SWEEP);
    silence_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut produced = Vec::new();

    loop {
        if read_buf.capacity() - read_buf.len() < READ_CHUNK / 4 {
            read_buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                core::disconnect(&mut wr).await;
                return Ok(());
            }
            n = rd.read_buf(&mut read_buf) => {
                if n? == 0 {
                    return Err(LiveError::Closed);
                }
                core::ack_promptly(rd.as_ref());
                let mut handled = 0usize;
                while let Some(frame) = mqtt::read_frame(&mut read_buf, usize::MAX)? {
                    // A large read holds hundreds of readings: send what is ready every few of
                    // them instead of after the whole batch, so output latency stays bounded.
                    handled += 1;
                    if handled % FLUSH_EVERY == 0 && !out.is_empty() {
                        flush_ready(&wr, &mut out)?;
                    }
                    match frame.kind() {
                        mqtt::PUBLISH => {
                            let publish = mqtt::parse_core_publish(&frame)?;
                            if publish.qos == 1 {
                                // Subscribed at QoS 0, so this does not happen; answer anyway
                                // so the core never waits on us.
                                mqtt::put_ack(&mut out, mqtt::PUBACK, publish.pkid);
                            }
                            if publish.topic.ends_with(b"/status") {
                                let opened = envelope::open(publish.payload.clone());
                                state.handle_status(publish.topic_str(), &opened.payload);
                                continue;
                            }
                            if !publish.topic.ends_with(b"/telemetry") {
                                // Our own output coming back (see OUTPUT_FILTERS), other
                                // alerts and acknowledgements: alert traffic is logged.
                                if AlertLog::wants(&publish.topic) {
                                    let opened = envelope::open(publish.payload.clone());
                                    if !opened.payload.is_empty()
                                        && !edge.alert_log.record(
                                            publish.topic_str(),
                                            &opened.payload,
                                            now_ms(),
                                        )
                                    {
                                        Metrics::inc(&state.metrics.alert_log_refused);
                                    }
                                }
                                continue;
                            }
                            let opened = envelope::open(publish.payload.clone());
                            if opened.qos.is_none() && opened.payload.is_empty() {
                                // A retained-message clear, not a reading.
                                continue;
                            }
                            if opened.remote {
                                // Scored by the instance the device is connected to.
                                state.note_remote(publish.topic_str());
                                continue;
                            }
                            let started = std::time::Instant::now();
                            state.handle_telemetry(
                                publish.topic_str(),
                                &opened.payload,
                                now_ms(),
                                &mut produced,
                            );
                            state.metrics.analytics.processing.observe(started.elapsed());
                            emit(&mut produced, window, &mut out, &state.metrics);
                        }
                        mqtt::PUBACK => {
                            let (pkid, _) = mqtt::parse_ack(&frame)?;
                            window.acked(pkid);
                        }
                        mqtt::SUBACK => {
                            let (_, codes) = mqtt::parse_core_suback(&frame)?;
                            if codes.is_empty() || codes.iter().any(|c| *c > 2) {
                                return Err(LiveError::SubscribeRefused);
                            }
                            if !subscribed {
                                subscribed = true;
                                state.metrics.analytics.state.store(ANALYTICS_READY, Relaxed);
                                tracing::info!(filter = TELEMETRY_FILTER, "analytics subscribed");
                            }
                        }
                        // PINGRESP and anything else the core may send need no answer.
                        _ => {}
                    }
                }
                window.pump(&mut out);
            }
            n = wr.write_buf(&mut out), if !out.is_empty() => {
                if n? == 0 {
                    return Err(LiveError::Closed);
                }
            }
            background = state.next_background() => {
                let warmed = match background {
                    Background::Refit(done) => {
                        state.refit_done(done);
                        continue;
                    }
                    Background::Warmed(warmed) => warmed,
                };
                state.warm_done(*warmed, &mut produced);
                emit(&mut produced, window, &mut out, &state.metrics);
                window.pump(&mut out);
            }
            _ = ping.tick() => mqtt::put_pingreq(&mut out),
            _ = silence_sweep.tick() => {
                state.sweep_silent(now_ms(), &mut produced);
                emit(&mut produced, window, &mut out, &state.metrics);
                window.pump(&mut out);
            }
            _ = tokio::time::sleep_until(suback_deadline), if !subscribed => {
                return Err(LiveError::SubackTimeout);
            }
        }
    }
}

/// Hands what the analytics produced to the core: alerts (QoS 1) to the alert window, QoS 0
/// predictions and error replies to `out` unless the core is not draining it (then dropped,
/// counted).
fn emit(
    produced: &mut Vec<Outgoing>,
    window: &mut AlertWindow,
    out: &mut BytesMut,
    metrics: &Metrics,
) {
    for m in produced.drain(..) {
        if m.qos > 0 {
            window.enqueue(m, metrics);
        } else if out.len() <= MAX_OUT_BYTES {
            put_message(out, &m, 0);
        } else {
            Metrics::inc(&metrics.analytics.dropped_qos0);
        }
    }
}

/// Queues `alert` for `device/<id>/alerts` at QoS 1 and counts it by severity; whether it
/// could be serialised.
fn push_alert(metrics: &Metrics, id: &str, alert: &AlertMessage, out: &mut Vec<Outgoing>) -> bool {
    let Ok(payload) = serde_json::to_vec(alert) else {
        return false;
    };
    metrics.analytics.alert(alert.severity.as_str());
    out.push(Outgoing {
        topic: format!("device/{id}/alerts"),
        qos: 1,
        payload,
    });
    true
}

/// Whether a `device/<id>/status` payload says the device is offline: `offline` or
/// `disconnected` (any case), bare, as a JSON string, or as the `status` field of a JSON object.
fn says_offline(payload: &[u8]) -> bool {
    const MAX_STATUS_BYTES: usize = 1024;
    if payload.len() > MAX_STATUS_BYTES {
        return false;
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return false;
    };
    let status = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(o)) => match o.get("status") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => return false,
        },
        Ok(serde_json::Value::String(s)) => s,
        _ => text.to_string(),
    };
    let status = status.trim();
    status.eq_ignore_ascii_case("offline") || status.eq_ignore_ascii_case("disconnected")
}

/// How often the devices are checked for silence.
const SILENCE_SWEEP: Duration = Duration::from_secs(1);

/// Readings handled between opportunistic writes of pending output.
const FLUSH_EVERY: usize = 32;

/// Writes as much of `out` as the socket takes without waiting.
fn flush_ready(wr: &tokio::net::tcp::OwnedWriteHalf, out: &mut BytesMut) -> Result<(), LiveError> {
    while !out.is_empty() {
        match wr.try_write(out) {
            Ok(0) => return Err(LiveError::Closed),
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn analytics(edit: impl FnOnce(&mut AnalyticsConfig)) -> (Analytics, Arc<Metrics>) {
        let mut config = Config::default_config().expect("default").analytics;
        config.detector.n_trees = 10;
        edit(&mut config);
        let metrics = Arc::new(Metrics::default());
        let a = Analytics::new(&config, metrics.clone(), History::disabled(), 0).expect("valid");
        (a, metrics)
    }

    fn reading(v: f64) -> Vec<u8> {
        format!("{{\"temperature\":{v}}}").into_bytes()
    }

    #[tokio::test]
    async fn bad_payload_gets_an_error_reply_and_is_counted() {
        let (mut a, metrics) = analytics(|_| {});
        let mut out = Vec::new();
        a.handle_telemetry(
            "device/m-1/telemetry",
            b"{nope",
            1_760_000_000_000,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "device/m-1/errors");
        assert_eq!(out[0].qos, 0);
        let v: serde_json::Value = serde_json::from_slice(&out[0].payload).expect("json");
        assert_eq!(v["type"], "ERROR");
        assert_eq!(v["code"], "not_json");
        assert_eq!(v["device_id"], "m-1");
        assert_eq!(metrics.analytics.telemetry_errors[1].load(Relaxed), 1);
        assert!(
            !a.has_device("m-1"),
            "a rejected message creates no monitor"
        );
        assert!(metrics
            .render()
            .contains("vigil_analytics_telemetry_errors_total{code=\"not_json\"} 1"));

        // The topic's id is the authority.
        out.clear();
        let p = br#"{"device_id":"other","temperature":1}"#;
        a.handle_telemetry("device/m-1/telemetry", p, 1_760_000_000_000, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out[0].payload).expect("json");
        assert_eq!(v["code"], "device_mismatch");

        // Not a telemetry topic: ignored.
        out.clear();
        a.handle_telemetry("device/m-1/alerts", b"x", 0, &mut out);
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn least_recently_seen_device_is_evicted() {
        let (mut a, metrics) = analytics(|c| c.max_devices = 2);
        let mut out = Vec::new();
        for id in ["a", "b", "a", "c"] {
            a.handle_telemetry(
                &format!("device/{id}/telemetry"),
                &reading(1.0),
                0,
                &mut out,
            );
        }
        assert_eq!(a.device_count(), 2);
        assert!(a.has_device("a") && a.has_device("c") && !a.has_device("b"));
        assert_eq!(metrics.analytics.evictions.load(Relaxed), 1);
        assert_eq!(metrics.analytics.devices.load(Relaxed), 2);
        assert_eq!(a.recency.len(), 2);
    }

    #[tokio::test]
    async fn refits_run_off_thread_one_per_device_and_come_back() {
        let (mut a, metrics) = analytics(|c| c.detector.warmup = 32);
        let mut out = Vec::new();
        for i in 0..40 {
            let v = 20.0 + (i % 7) as f64 * 0.1;
            a.handle_telemetry("device/d/telemetry", &reading(v), 0, &mut out);
        }
        assert!(a.devices["d"].refit_running);
        let done = tokio::time::timeout(Duration::from_secs(30), a.next_background())
            .await
            .expect("refit finishes");
        let Background::Refit(done) = done else {
            panic!("a refit was expected");
        };
        a.refit_done(done);
        assert_eq!(metrics.analytics.refits.load(Relaxed), 1);
        assert!(!a.devices["d"].refit_running);
        assert_eq!(metrics.analytics.points.load(Relaxed), 40);
        // The static limit reached the monitor: crossing it raises a threshold alert.
        a.handle_telemetry("device/d/telemetry", &reading(90.0), 0, &mut out);
        let alert = out
            .iter()
            .find(|m| m.topic == "device/d/alerts")
            .expect("alert");
        assert_eq!(alert.qos, 1);
        let v: serde_json::Value = serde_json::from_slice(&alert.payload).expect("json");
        assert_eq!(v["kind"], "threshold");
    }

    #[tokio::test]
    async fn new_device_warms_up_from_history_then_scores_what_waited() {
        let config = Config::default_config().expect("default");
        let history = History::start(
            &config,
            &tokio_util::task::TaskTracker::new(),
            CancellationToken::new(),
        )
        .expect("memory history");
        let mut analytics_config = config.analytics.clone();
        analytics_config.detector.n_trees = 10;
        analytics_config.detector.warmup = 32;
        let new = |metrics: &Arc<Metrics>| {
            Analytics::new(&analytics_config, metrics.clone(), history.clone(), 1000)
                .expect("valid")
        };
        const NOW: i64 = 1_700_000_300_000;
        // The first instance (or process) sees 200 readings of `w`; they are stored.
        let first_metrics = Arc::new(Metrics::default());
        let mut first = new(&first_metrics);
        let mut out = Vec::new();
        for i in 0..200 {
            let v = 20.0 + (i % 7) as f64 * 0.1;
            let payload = format!(
                "{{\"temperature\":{v},\"timestamp\":{}}}",
                1_700_000_000 + i
            );
            first.handle_telemetry("device/w/telemetry", payload.as_bytes(), NOW, &mut out);
        }
        assert_eq!(
            first_metrics.analytics.warm_starts.load(Relaxed),
            0,
            "nothing stored yet"
        );
        // A second one (a restart, or the device moved) rebuilds the model from history.
        let metrics = Arc::new(Metrics::default());
        let mut second = new(&metrics);
        let payload = format!("{{\"temperature\":20.3,\"timestamp\":{}}}", 1_700_000_200);
        second.handle_telemetry("device/w/telemetry", payload.as_bytes(), NOW, &mut out);
        assert!(second.devices["w"].warming.is_some());
        assert_eq!(
            metrics.analytics.points.load(Relaxed),
            0,
            "waits for the warm start"
        );
        let background = tokio::time::timeout(Duration::from_secs(30), second.next_background())
            .await
            .expect("warm start finishes");
        let Background::Warmed(warmed) = background else {
            panic!("a warm start was expected");
        };
        assert_eq!(warmed.points, 200);
        second.warm_done(*warmed, &mut out);
        assert_eq!(metrics.analytics.warm_starts.load(Relaxed), 1);
        assert!(second.devices["w"].warming.is_none());
        assert_eq!(
            metrics.analytics.points.load(Relaxed),
            1,
            "the waiting reading is scored"
        );
        // It needed no refit after the replay: the replay fitted the model.
        assert!(!second.devices["w"].refit_running);
    }

    #[test]
    fn alert_window_bounds_unacked_and_requeues_after_a_reconnect() {
        let metrics = Metrics::default();
        let mut w = AlertWindow::default();
        let alert = Outgoing {
            topic: "device/d/alerts".into(),
            qos: 1,
            payload: b"{}".to_vec(),
        };
        for _ in 0..MAX_UNACKED_ALERTS + 5 {
            w.enqueue(alert.clone(), &metrics);
        }
        let mut out = BytesMut::new();
        w.pump(&mut out);
        assert_eq!(w.unacked.len(), MAX_UNACKED_ALERTS);
        assert_eq!(w.queued.len(), 5);
        let first = w.unacked[0].0;
        w.acked(first);
        w.pump(&mut out);
        assert_eq!((w.unacked.len(), w.queued.len()), (MAX_UNACKED_ALERTS, 4));
        w.requeue_unacked();
        assert_eq!(w.queued.len(), MAX_UNACKED_ALERTS + 4);
        // Every packet written is a well-formed enveloped QoS 1 PUBLISH.
        let frame = mqtt::read_frame(&mut out, usize::MAX)
            .expect("frame")
            .expect("complete");
        let p = mqtt::parse_core_publish(&frame).expect("publish");
        assert_eq!((p.qos, p.topic_str()), (1, "device/d/alerts"));
        assert_eq!(envelope::open(p.payload).qos, Some(1));
    }

    #[test]
    fn offline_statuses() {
        for (payload, offline) in [
            (&br#"{"status":"offline"}"#[..], true),
            (br#"{"status": "Offline ", "at": 1}"#, true),
            (br#""disconnected""#, true),
            (b"OFFLINE", true),
            (br#"{"status":"online"}"#, false),
            (br#"{"state":"offline"}"#, false),
            (b"online", false),
            (b"\xff\xfe", false),
            (b"", false),
        ] {
            assert_eq!(says_offline(payload), offline, "{payload:?}");
        }
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
