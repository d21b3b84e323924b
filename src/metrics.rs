//! Process-wide counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics: the hot path pays one relaxed add per event and never allocates or locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    pub tcp_connections: AtomicU64,
    /// MQTT over TLS (`tls.mqtt_listen`).
    pub tls_connections: AtomicU64,
    pub ws_connections: AtomicU64,
    /// JSON bridge sessions connected now (`bridge`).
    pub bridge_sessions: AtomicU64,
    pub connections_total: AtomicU64,
    pub refused_over_cap: AtomicU64,
    pub refused_handshake_overload: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub auth_failures: AtomicU64,
    /// PUBLISH packets and subscription filters refused by the ACL (will topics count as
    /// publishes).
    pub acl_denied_publish: AtomicU64,
    pub acl_denied_subscribe: AtomicU64,
    /// Limits: connections refused per address, publishes over a role's rate (and v5 clients
    /// disconnected for it), topics over the length/level limits, subscriptions over the cap.
    pub refused_per_ip: AtomicU64,
    pub rate_limited: AtomicU64,
    pub rate_limited_disconnects: AtomicU64,
    pub topic_limit_refusals: AtomicU64,
    /// Client publishes to `$` topics, which the core routes to no one.
    pub dollar_topic_refusals: AtomicU64,
    pub subscription_limit_refusals: AtomicU64,
    /// SUBSCRIBE filters refused because `limits.max_distinct_filters` filters are in the
    /// core, and how many are (`edge::limits::CoreFilters`).
    pub filter_limit_refusals: AtomicU64,
    pub core_filters: AtomicU64,
    /// The same for topic names published (`limits.max_distinct_topics`): publishes and
    /// CONNECTs with a will refused, and names in the core.
    pub topic_name_limit_refusals: AtomicU64,
    pub core_topics: AtomicU64,
    /// Retained messages not stored because of `limits.max_retained_bytes` (delivered
    /// without RETAIN), the bytes the stored ones count, and how many there are
    /// (`edge::retained::RetainedStore`).
    pub retained_limit_refusals: AtomicU64,
    pub retained_bytes: AtomicU64,
    pub retained_messages: AtomicU64,
    /// Subscriptions that got none of their retained messages because their connection had
    /// too many subscriptions waiting for theirs.
    pub retained_not_sent: AtomicU64,
    /// Saves of the retained messages to `[persistence] dir`, and those that failed.
    pub retained_saves: AtomicU64,
    pub retained_save_failures: AtomicU64,
    /// Saves of the persistent sessions to `[persistence] dir`, and those that failed.
    pub session_saves: AtomicU64,
    pub session_save_failures: AtomicU64,
    /// Persistent sessions restored from `[persistence] dir` at start, by outcome.
    pub sessions_restored: AtomicU64,
    pub sessions_not_restored: AtomicU64,
    /// Core connections that found the pool of core client ids empty (`registry::CoreIds`)
    /// and used an id of their own.
    pub core_id_pool_empty: AtomicU64,
    /// Alert messages over `alert_log::MAX_ENTRY_BYTES`, delivered but not kept for
    /// `recent_alerts`.
    pub alert_log_refused: AtomicU64,
    /// Saves of the alert log to `[persistence] dir`, and those that failed.
    pub alert_log_saves: AtomicU64,
    pub alert_log_save_failures: AtomicU64,
    /// Clean core connections waiting in the pool opened ahead of time (`edge::warm`), as
    /// the pool held when `/metrics` was last read.
    pub core_warm_ready: AtomicU64,
    /// Clients that took one instead of opening a core connection.
    pub core_warm_taken: AtomicU64,
    /// Waiting ones that stopped answering pings and were replaced.
    pub core_warm_lost: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub takeovers: AtomicU64,
    pub core_closed: AtomicU64,
    pub publish_in: [AtomicU64; 3],
    pub publish_out: [AtomicU64; 3],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub dropped_too_large_for_client: AtomicU64,
    pub dropped_qos2_state: AtomicU64,
    /// Deliveries not made because the message expired (v5 Message Expiry Interval).
    pub dropped_expired: AtomicU64,
    /// Offline session timers not kept because the store was full (the will went at once,
    /// the session does not expire).
    pub dropped_session_timers: AtomicU64,
    /// Sessions removed when their Session Expiry Interval (or
    /// `limits.persistent_session_expiry_secs`) ran out.
    pub sessions_expired: AtomicU64,
    /// Offline sessions removed to make room for a new one (`limits.max_persistent_sessions`),
    /// CONNECTs refused because every kept session was connected, and the sessions kept.
    pub sessions_evicted: AtomicU64,
    pub persistent_session_refusals: AtomicU64,
    pub kept_sessions: AtomicU64,
    /// Client publishes that waited for other connections' SUBSCRIBEs and UNSUBSCRIBEs to
    /// reach the core (the subscribe fence, see `edge::connection`).
    pub fence_waits: AtomicU64,
    /// Client SUBSCRIBEs that waited for publishes other connections had been acknowledged
    /// for to reach the core (the publish fence).
    pub subscribe_fence_waits: AtomicU64,
    /// Client QoS 1 publishes acknowledged (and released QoS 2 ones completed) by the edge on
    /// handing them to the core.
    pub edge_acks: AtomicU64,
    /// Client QoS 2 publishes handed to the core before their PUBREL, because the connection
    /// already held `HELD_QOS2_MAX_BYTES` of unreleased ones.
    pub qos2_routed_unreleased: AtomicU64,
    /// Client publishes no subscription could match, answered by the edge and not handed to
    /// the core (see `edge::filters`).
    pub publishes_unrouted: AtomicU64,
    /// JSON bridge frames received and sent, error frames sent, QoS 0 messages dropped for a
    /// full session buffer, and sessions closed as slow consumers.
    pub bridge_frames_in: AtomicU64,
    pub bridge_frames_out: AtomicU64,
    pub bridge_errors: AtomicU64,
    pub bridge_dropped_qos0: AtomicU64,
    pub bridge_slow_consumers: AtomicU64,
    /// Time from handing a client's QoS 1/2 publish to the core until the core acknowledged it:
    /// the broker path (edge -> core routing -> edge), without the client's network.
    pub core_ack: Histogram,
    /// Live analytics (`live`).
    pub analytics: AnalyticsMetrics,
    /// Scale-out over Redis (`cluster`).
    pub cluster: ClusterMetrics,
}

/// Counters of the cluster exporter and importer (all zero without `[redis]`).
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// 0: no Redis configured; 1: configured, not connected; 2: connected.
    pub state: AtomicU64,
    /// Messages written to the shared stream (confirmed by Redis).
    pub exported: AtomicU64,
    /// Messages from other instances published into this instance's core.
    pub imported: AtomicU64,
    /// Messages waiting in the outbox for Redis now.
    pub outbox: AtomicU64,
    /// QoS 0 messages dropped because the outbox was full.
    pub dropped_qos0: AtomicU64,
    /// Stream entries skipped as already delivered (re-reads after a reconnect, re-sent
    /// batches).
    pub duplicates_skipped: AtomicU64,
    /// Failed Redis round trips (each followed by a retry).
    pub redis_errors: AtomicU64,
    /// Retained messages loaded from Redis at start.
    pub retained_loaded: AtomicU64,
}

/// Stable codes of rejected telemetry (`TelemetryError::code`), in the order of
/// [`AnalyticsMetrics::telemetry_errors`]; anything else is counted as `other`.
pub const TELEMETRY_ERROR_CODES: [&str; 13] = [
    "payload_too_large",
    "not_json",
    "too_deep",
    "not_object",
    "no_metrics",
    "non_finite",
    "bad_timestamp",
    "device_mismatch",
    "batch_too_large",
    "too_many_metrics",
    "bad_metric_name",
    "bad_batch",
    "other",
];

/// Alert severities in the order of [`AnalyticsMetrics::alerts`].
pub const SEVERITIES: [&str; 4] = ["LOW", "MEDIUM", "HIGH", "CRITICAL"];

/// Counters of the live analytics task.
/// Upper bounds (seconds) of the latency histogram buckets; the last bucket is `+Inf`.
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25,
];

/// A Prometheus histogram with fixed buckets, lock-free: one atomic add per bucket hit.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative; rendered cumulatively). The last is `+Inf`.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP vigil_{name} {help}");
        let _ = writeln!(out, "# TYPE vigil_{name} histogram");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            match LATENCY_BUCKETS.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "vigil_{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "vigil_{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "vigil_{name}_sum {sum}");
        let _ = writeln!(out, "vigil_{name}_count {cumulative}");
    }
}

#[derive(Debug, Default)]
pub struct AnalyticsMetrics {
    /// 0: analytics disabled; 1: enabled, not subscribed (starting or reconnecting);
    /// 2: subscribed to telemetry (ready). For `/readyz`.
    pub state: AtomicU64,
    /// Devices with a monitor in memory now.
    pub devices: AtomicU64,
    /// Time to parse and score one telemetry message (all its readings) on the analytics task.
    pub processing: Histogram,
    /// Telemetry messages that parsed.
    pub messages: AtomicU64,
    /// Metric values scored (one reading of three metrics is three points).
    pub points: AtomicU64,
    pub telemetry_errors: [AtomicU64; TELEMETRY_ERROR_CODES.len()],
    pub alerts: [AtomicU64; SEVERITIES.len()],
    pub predictions: AtomicU64,
    /// Refits running now on blocking threads (at most `analytics.max_concurrent_refits`).
    pub refits_running: AtomicU64,
    pub refits: AtomicU64,
    pub refit_failures: AtomicU64,
    pub evictions: AtomicU64,
    /// Devices found silent (no message for `analytics.silence_factor` usual intervals).
    pub silences: AtomicU64,
    /// Rests of machines learned (`vigil_analytics::rest`): their stops are no longer fed to
    /// the anomaly detector.
    pub rests_learned: AtomicU64,
    /// Anomaly alerts held while a machine slowed down and withdrawn when it came to rest
    /// (`vigil_analytics::monitor`): its stop, not an incident.
    pub alerts_withdrawn: AtomicU64,
    /// Monitors rebuilt from stored history (a device new to this process or instance).
    pub warm_starts: AtomicU64,
    /// Readings dropped while their device was warming (more than 256 waiting).
    pub warm_dropped: AtomicU64,
    /// Alerts dropped because too many were waiting for the core's acknowledgements.
    pub dropped_alerts: AtomicU64,
    /// Predictions and error replies dropped because the core was not draining our output.
    pub dropped_qos0: AtomicU64,
    pub core_reconnects: AtomicU64,
}

impl AnalyticsMetrics {
    /// Counts one rejected telemetry message under its stable code.
    pub fn telemetry_error(&self, code: &str) {
        let last = TELEMETRY_ERROR_CODES.len() - 1;
        let i = TELEMETRY_ERROR_CODES[..last]
            .iter()
            .position(|c| *c == code)
            .unwrap_or(last);
        self.telemetry_errors[i].fetch_add(1, Relaxed);
    }

    /// Counts one published alert under its wire severity (`"LOW"` ... `"CRITICAL"`).
    pub fn alert(&self, severity: &str) {
        if let Some(i) = SEVERITIES.iter().position(|s| *s == severity) {
            self.alerts[i].fetch_add(1, Relaxed);
        }
    }
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            family(&mut out, name, kind, help, samples)
        };
        let g = |c: &AtomicU64| c.load(Relaxed);
        metric(
            "connections",
            "gauge",
            "MQTT clients connected now, by listener.",
            &[
                ("{listener=\"tcp\"}", g(&self.tcp_connections)),
                ("{listener=\"tls\"}", g(&self.tls_connections)),
                ("{listener=\"ws\"}", g(&self.ws_connections)),
                ("{listener=\"bridge\"}", g(&self.bridge_sessions)),
            ],
        );
        metric(
            "bridge_sessions",
            "gauge",
            "JSON bridge sessions connected now.",
            &[("", g(&self.bridge_sessions))],
        );
        metric(
            "bridge_frames_total",
            "counter",
            "JSON bridge frames, by direction.",
            &[
                ("{direction=\"in\"}", g(&self.bridge_frames_in)),
                ("{direction=\"out\"}", g(&self.bridge_frames_out)),
            ],
        );
        metric(
            "bridge_errors_total",
            "counter",
            "JSON bridge error frames sent (bad frames from clients).",
            &[("", g(&self.bridge_errors))],
        );
        metric(
            "bridge_dropped_qos0_total",
            "counter",
            "QoS 0 messages dropped because a bridge session's buffer was full.",
            &[("", g(&self.bridge_dropped_qos0))],
        );
        let (jumps, dropped) = crate::core::lag_drops();
        metric(
            "core_lag_dropped_total",
            "counter",
            "Messages the core skipped for subscribers more than a topic filter's log behind \
             ([core] max_segment_size x (max_segment_count + 1)), QoS 1/2 included.",
            &[("", dropped)],
        );
        metric(
            "core_lag_jumps_total",
            "counter",
            "Times the core moved a lagging subscriber past dropped log segments.",
            &[("", jumps)],
        );
        metric(
            "bridge_slow_consumers_total",
            "counter",
            "Bridge sessions closed because the browser did not read.",
            &[("", g(&self.bridge_slow_consumers))],
        );
        metric(
            "connections_total",
            "counter",
            "MQTT clients accepted since start.",
            &[("", g(&self.connections_total))],
        );
        metric(
            "connections_refused_total",
            "counter",
            "Connections refused, by reason.",
            &[
                ("{reason=\"over_cap\"}", g(&self.refused_over_cap)),
                (
                    "{reason=\"handshake_overload\"}",
                    g(&self.refused_handshake_overload),
                ),
                (
                    "{reason=\"handshake_timeout\"}",
                    g(&self.handshake_timeouts),
                ),
                ("{reason=\"auth\"}", g(&self.auth_failures)),
                ("{reason=\"per_ip\"}", g(&self.refused_per_ip)),
            ],
        );
        metric(
            "rate_limited_total",
            "counter",
            "Publishes over the role's rate limit (dropped, or the v5 client disconnected).",
            &[("", g(&self.rate_limited))],
        );
        metric(
            "limit_refusals_total",
            "counter",
            "Requests refused by a limit, by limit.",
            &[
                ("{limit=\"topic\"}", g(&self.topic_limit_refusals)),
                ("{limit=\"dollar_topic\"}", g(&self.dollar_topic_refusals)),
                (
                    "{limit=\"subscriptions\"}",
                    g(&self.subscription_limit_refusals),
                ),
                ("{limit=\"filters\"}", g(&self.filter_limit_refusals)),
                ("{limit=\"topics\"}", g(&self.topic_name_limit_refusals)),
                (
                    "{limit=\"persistent_sessions\"}",
                    g(&self.persistent_session_refusals),
                ),
                (
                    "{limit=\"retained_bytes\"}",
                    g(&self.retained_limit_refusals),
                ),
            ],
        );
        metric(
            "core_filters",
            "gauge",
            "Distinct topic filters clients have subscribed to since start; the core keeps a \
             log for each (limits.max_distinct_filters).",
            &[("", g(&self.core_filters))],
        );
        metric(
            "core_topics",
            "gauge",
            "Distinct topic names clients have published to since start; the core keeps the \
             filters each matches (limits.max_distinct_topics).",
            &[("", g(&self.core_topics))],
        );
        metric(
            "core_id_pool_empty_total",
            "counter",
            "Core connections that found every pooled core client id in use and took one of \
             their own, which the core remembers for good (about 570 bytes each).",
            &[("", g(&self.core_id_pool_empty))],
        );
        metric(
            "alert_log_refused_total",
            "counter",
            "Alert messages too large to keep for the bridge's recent_alerts request (delivered \
             live as usual).",
            &[("", g(&self.alert_log_refused))],
        );
        metric(
            "alert_log_saves_total",
            "counter",
            "Saves of the alert log (recent_alerts) to [persistence] dir, by outcome.",
            &[
                ("{outcome=\"ok\"}", g(&self.alert_log_saves)),
                ("{outcome=\"failed\"}", g(&self.alert_log_save_failures)),
            ],
        );
        metric(
            "core_warm_connections",
            "gauge",
            "Clean core connections opened ahead of time and waiting for a client whose \
             session ends with its connection ([core] warm_connections).",
            &[("", g(&self.core_warm_ready))],
        );
        metric(
            "core_warm_taken_total",
            "counter",
            "Clients that took a core connection opened ahead of time instead of waiting for \
             a new one.",
            &[("", g(&self.core_warm_taken))],
        );
        metric(
            "core_warm_lost_total",
            "counter",
            "Core connections opened ahead of time that stopped answering pings while \
             waiting and were replaced.",
            &[("", g(&self.core_warm_lost))],
        );
        metric(
            "retained_bytes",
            "gauge",
            "Bytes of the retained messages stored: topic, stored payload and 64 per message \
             (limits.max_retained_bytes).",
            &[("", g(&self.retained_bytes))],
        );
        metric(
            "retained_messages",
            "gauge",
            "Retained messages stored.",
            &[("", g(&self.retained_messages))],
        );
        metric(
            "retained_not_sent_total",
            "counter",
            "Subscriptions that got none of their retained messages: their connection already \
             had 1,024 subscriptions waiting for theirs.",
            &[("", g(&self.retained_not_sent))],
        );
        metric(
            "retained_saves_total",
            "counter",
            "Saves of the retained messages to [persistence] dir, by outcome.",
            &[
                ("{outcome=\"ok\"}", g(&self.retained_saves)),
                ("{outcome=\"failed\"}", g(&self.retained_save_failures)),
            ],
        );
        metric(
            "session_saves_total",
            "counter",
            "Saves of the persistent sessions to [persistence] dir, by outcome.",
            &[
                ("{outcome=\"ok\"}", g(&self.session_saves)),
                ("{outcome=\"failed\"}", g(&self.session_save_failures)),
            ],
        );
        metric(
            "sessions_restored_total",
            "counter",
            "Saved persistent sessions at start: restored, or not (expired meanwhile, over limits.max_persistent_sessions, or refused by the core).",
            &[
                ("{outcome=\"restored\"}", g(&self.sessions_restored)),
                ("{outcome=\"not_restored\"}", g(&self.sessions_not_restored)),
            ],
        );
        metric(
            "acl_denied_total",
            "counter",
            "Requests refused by the topic ACL, by kind.",
            &[
                ("{kind=\"publish\"}", g(&self.acl_denied_publish)),
                ("{kind=\"subscribe\"}", g(&self.acl_denied_subscribe)),
            ],
        );
        metric(
            "disconnects_total",
            "counter",
            "Clients disconnected by the broker, by reason.",
            &[
                ("{reason=\"protocol_error\"}", g(&self.protocol_errors)),
                (
                    "{reason=\"keepalive_timeout\"}",
                    g(&self.keepalive_timeouts),
                ),
                ("{reason=\"slow_consumer\"}", g(&self.slow_consumers)),
                ("{reason=\"session_taken_over\"}", g(&self.takeovers)),
                ("{reason=\"core_closed\"}", g(&self.core_closed)),
                (
                    "{reason=\"rate_limited\"}",
                    g(&self.rate_limited_disconnects),
                ),
            ],
        );
        let by_qos = |a: &[AtomicU64; 3]| [g(&a[0]), g(&a[1]), g(&a[2])];
        let i = by_qos(&self.publish_in);
        let o = by_qos(&self.publish_out);
        metric(
            "messages_in_total",
            "counter",
            "PUBLISH packets received from clients, by QoS.",
            &[
                ("{qos=\"0\"}", i[0]),
                ("{qos=\"1\"}", i[1]),
                ("{qos=\"2\"}", i[2]),
            ],
        );
        metric(
            "messages_out_total",
            "counter",
            "PUBLISH packets delivered to clients, by QoS.",
            &[
                ("{qos=\"0\"}", o[0]),
                ("{qos=\"1\"}", o[1]),
                ("{qos=\"2\"}", o[2]),
            ],
        );
        metric(
            "bytes_total",
            "counter",
            "Bytes read from and written to clients.",
            &[
                ("{direction=\"in\"}", g(&self.bytes_in)),
                ("{direction=\"out\"}", g(&self.bytes_out)),
            ],
        );
        metric(
            "dropped_total",
            "counter",
            "Messages or state dropped, by reason.",
            &[
                (
                    "{reason=\"too_large_for_client\"}",
                    g(&self.dropped_too_large_for_client),
                ),
                (
                    "{reason=\"qos2_state_store_full\"}",
                    g(&self.dropped_qos2_state),
                ),
                ("{reason=\"expired\"}", g(&self.dropped_expired)),
                (
                    "{reason=\"session_timer_store_full\"}",
                    g(&self.dropped_session_timers),
                ),
            ],
        );
        metric(
            "sessions_expired_total",
            "counter",
            "Offline sessions removed when their Session Expiry Interval (or \
             limits.persistent_session_expiry_secs) ran out.",
            &[("", g(&self.sessions_expired))],
        );
        metric(
            "sessions_evicted_total",
            "counter",
            "Offline sessions removed, the one offline longest first, to make room for a new \
             one (limits.max_persistent_sessions).",
            &[("", g(&self.sessions_evicted))],
        );
        metric(
            "persistent_sessions",
            "gauge",
            "Sessions the broker keeps beyond their connection (3.1.1 clean session false, v5 \
             Session Expiry above 0), connected or not.",
            &[("", g(&self.kept_sessions))],
        );
        metric(
            "publish_fence_waits_total",
            "counter",
            "Client publishes that waited (at most 5 ms) for other clients' SUBSCRIBEs and \
             UNSUBSCRIBEs in flight to the core, so a subscription sent first is in place (or \
             gone) first.",
            &[("", g(&self.fence_waits))],
        );
        metric(
            "subscribe_fence_waits_total",
            "counter",
            "Client SUBSCRIBEs that waited (at most 5 ms) for publishes other clients were \
             already acknowledged for to reach the core, so a retained message acknowledged \
             first is in place first.",
            &[("", g(&self.subscribe_fence_waits))],
        );
        metric(
            "publish_edge_acks_total",
            "counter",
            "Client QoS 1 publishes the edge acknowledged, and released QoS 2 publishes it completed \
             (PUBCOMP), when handing them to the core.",
            &[("", g(&self.edge_acks))],
        );
        metric(
            "publish_qos2_routed_unreleased_total",
            "counter",
            "Client QoS 2 publishes routed before their PUBREL: the connection held its limit of unreleased ones.",
            &[("", g(&self.qos2_routed_unreleased))],
        );
        metric(
            "publish_unrouted_total",
            "counter",
            "Client publishes to topics no subscription matched: acknowledged (and retained) by the edge, not handed to the core.",
            &[("", g(&self.publishes_unrouted))],
        );
        let a = &self.analytics;
        metric(
            "analytics_devices",
            "gauge",
            "Devices with an analytics model in memory now.",
            &[("", g(&a.devices))],
        );
        metric(
            "analytics_messages_total",
            "counter",
            "Telemetry messages parsed by the analytics task.",
            &[("", g(&a.messages))],
        );
        metric(
            "analytics_points_total",
            "counter",
            "Metric values scored by the anomaly detector.",
            &[("", g(&a.points))],
        );
        let labels: Vec<(String, u64)> = TELEMETRY_ERROR_CODES
            .iter()
            .zip(&a.telemetry_errors)
            .map(|(code, c)| (format!("{{code=\"{code}\"}}"), g(c)))
            .collect();
        let samples: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "analytics_telemetry_errors_total",
            "counter",
            "Telemetry messages rejected, by code (answered on device/<id>/errors).",
            &samples,
        );
        let labels: Vec<(String, u64)> = SEVERITIES
            .iter()
            .zip(&a.alerts)
            .map(|(sev, c)| (format!("{{severity=\"{sev}\"}}"), g(c)))
            .collect();
        let samples: Vec<(&str, u64)> = labels.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "analytics_alerts_total",
            "counter",
            "Alerts raised for device/<id>/alerts, by severity (undelivered ones also count in dropped_total).",
            &samples,
        );
        metric(
            "analytics_predictions_total",
            "counter",
            "Predictions published on device/<id>/predictions.",
            &[("", g(&a.predictions))],
        );
        metric(
            "analytics_refits_total",
            "counter",
            "Anomaly model refits, by result.",
            &[
                ("{result=\"ok\"}", g(&a.refits)),
                ("{result=\"failed\"}", g(&a.refit_failures)),
            ],
        );
        metric(
            "analytics_refits_running",
            "gauge",
            "Anomaly model refits running now.",
            &[("", g(&a.refits_running))],
        );
        metric(
            "analytics_evictions_total",
            "counter",
            "Device models evicted to stay within analytics.max_devices.",
            &[("", g(&a.evictions))],
        );
        metric(
            "analytics_silences_total",
            "counter",
            "Devices found silent: no telemetry for analytics.silence_factor usual intervals (and analytics.silence_min_secs).",
            &[("", g(&a.silences))],
        );
        metric(
            "analytics_rests_learned_total",
            "counter",
            "Machine rests learned (two or more metrics still together, away from their usual levels, for analytics.rest_after_secs): the device's later stops do not feed the anomaly detector.",
            &[("", g(&a.rests_learned))],
        );
        metric(
            "analytics_alerts_withdrawn_total",
            "counter",
            "Anomaly alerts held for up to 2 minutes while a machine's metrics fell towards its learned rest, and withdrawn because it came to rest: a stop, not an incident.",
            &[("", g(&a.alerts_withdrawn))],
        );
        metric(
            "analytics_dropped_total",
            "counter",
            "Analytics output dropped, by reason.",
            &[
                ("{reason=\"alert_window_full\"}", g(&a.dropped_alerts)),
                ("{reason=\"core_not_draining\"}", g(&a.dropped_qos0)),
                ("{reason=\"warming\"}", g(&a.warm_dropped)),
            ],
        );
        metric(
            "analytics_warm_starts_total",
            "counter",
            "Device models rebuilt from stored history instead of learning from zero.",
            &[("", g(&a.warm_starts))],
        );
        metric(
            "analytics_core_reconnects_total",
            "counter",
            "Times the analytics task reconnected to the core.",
            &[("", g(&a.core_reconnects))],
        );
        a.processing.render(
            &mut out,
            "analytics_processing_seconds",
            "Time to parse and score one telemetry message on the analytics task.",
        );
        self.core_ack.render(
            &mut out,
            "publish_core_ack_seconds",
            "Time from handing a QoS 1/2 publish to the routing core until it acknowledged it (the broker path, without the client's network).",
        );
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            family(&mut out, name, kind, help, samples)
        };
        let c = &self.cluster;
        metric(
            "cluster_redis_up",
            "gauge",
            "1 when Redis is configured and reachable, 0 otherwise.",
            &[("", u64::from(g(&c.state) == 2))],
        );
        metric(
            "cluster_messages_total",
            "counter",
            "Messages exchanged with other instances through Redis, by direction.",
            &[
                ("{direction=\"exported\"}", g(&c.exported)),
                ("{direction=\"imported\"}", g(&c.imported)),
            ],
        );
        metric(
            "cluster_outbox_messages",
            "gauge",
            "Messages waiting for Redis.",
            &[("", g(&c.outbox))],
        );
        metric(
            "cluster_dropped_total",
            "counter",
            "Messages not exported, by reason.",
            &[("{reason=\"outbox_full_qos0\"}", g(&c.dropped_qos0))],
        );
        metric(
            "cluster_duplicates_skipped_total",
            "counter",
            "Stream entries skipped because they were already delivered.",
            &[("", g(&c.duplicates_skipped))],
        );
        metric(
            "cluster_redis_errors_total",
            "counter",
            "Failed Redis round trips (each is retried).",
            &[("", g(&c.redis_errors))],
        );
        metric(
            "cluster_retained_loaded_total",
            "counter",
            "Retained messages loaded from Redis.",
            &[("", g(&c.retained_loaded))],
        );
        out
    }
}

/// Writes one metric family: HELP, TYPE and a sample per label set.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP vigil_{name} {help}");
    let _ = writeln!(out, "# TYPE vigil_{name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "vigil_{name}{labels} {value}");
    }
}

/// Appends the history store's counters (`crate::history`) to a rendered page.
pub fn render_history(out: &mut String, h: &crate::history::HistoryMetrics, ready: bool) {
    let g = |c: &AtomicU64| c.load(Relaxed);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        family(out, name, kind, help, samples)
    };
    metric(
        "history_up",
        "gauge",
        "1 when the history store can be written (always in memory mode).",
        &[("", u64::from(ready))],
    );
    metric(
        "history_points_total",
        "counter",
        "Telemetry readings stored, and lost on the way (queue full, Redis errors).",
        &[
            ("{result=\"stored\"}", g(&h.points_recorded)),
            ("{result=\"dropped\"}", g(&h.points_dropped)),
        ],
    );
    metric(
        "history_values_refused_total",
        "counter",
        "Metric values not stored: their device had too many metric names.",
        &[("", g(&h.values_refused))],
    );
    metric(
        "history_devices_evicted_total",
        "counter",
        "Device histories dropped to stay within history.max_devices (memory mode).",
        &[("", g(&h.devices_evicted))],
    );
    metric(
        "history_snapshots_total",
        "counter",
        "Snapshot files written, and failed (memory mode).",
        &[
            ("{result=\"ok\"}", g(&h.snapshot_writes)),
            ("{result=\"failed\"}", g(&h.snapshot_failures)),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(2));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "test");
        assert!(out.contains("# TYPE vigil_x_seconds histogram"), "{out}");
        assert!(
            out.contains("vigil_x_seconds_bucket{le=\"0.00005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("vigil_x_seconds_bucket{le=\"0.001\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("vigil_x_seconds_bucket{le=\"0.25\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("vigil_x_seconds_bucket{le=\"+Inf\"} 3"),
            "{out}"
        );
        assert!(out.contains("vigil_x_seconds_count 3"), "{out}");
        assert!(out.contains("vigil_x_seconds_sum 2.00073"), "{out}");
    }
}
