//! rumqttd alone, configured exactly like vigil's embedded core but listening directly (no
//! edge, no auth), so benchmarks can measure what the edge hop costs.
//!
//! ```text
//! cargo run --release --example bare_core -- 127.0.0.1:18840
//! ```
//! Benchmark use only: this is the configuration rumqttd must never be exposed with.

use std::collections::HashMap;

fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18840".into());
    let listen = listen.parse().expect("listen address");
    let config = vigil::config::Config::default_config().expect("built-in config");
    let router = rumqttd::RouterConfig {
        max_connections: config.limits.max_connections + 64,
        max_outgoing_packet_count: config.core.max_outgoing_packet_count,
        max_segment_size: config.core.max_segment_size,
        max_segment_count: config.core.max_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let server = rumqttd::ServerSettings {
        name: "bare-core".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: config.limits.max_packet_size + 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let mut broker = rumqttd::Broker::new(rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("bare".to_string(), server)])),
        ..Default::default()
    });
    eprintln!("bare rumqttd core listening on {listen}");
    if let Err(e) = broker.start() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
