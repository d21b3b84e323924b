//! Process-wide counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics: the hot path pays one relaxed add per event and never allocates or locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Metrics {
    pub tcp_connections: AtomicU64,
    pub ws_connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub refused_over_cap: AtomicU64,
    pub refused_handshake_overload: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub takeovers: AtomicU64,
    pub publish_in: [AtomicU64; 3],
    pub publish_out: [AtomicU64; 3],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub dropped_too_large_for_client: AtomicU64,
    pub dropped_qos2_state: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP vigil_{name} {help}");
            let _ = writeln!(out, "# TYPE vigil_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "vigil_{name}{labels} {value}");
            }
        };
        let g = |c: &AtomicU64| c.load(Relaxed);
        metric(
            "connections",
            "gauge",
            "MQTT clients connected now, by listener.",
            &[
                ("{listener=\"tcp\"}", g(&self.tcp_connections)),
                ("{listener=\"ws\"}", g(&self.ws_connections)),
            ],
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
            ],
        );
        out
    }
}
