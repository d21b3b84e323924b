//! rumqttd alone, configured exactly like vigil's embedded core (same code:
//! `vigil::core::rumqttd_config`) but listening directly with no edge and no auth, so
//! benchmarks can measure what the edge hop costs.
//!
//! ```text
//! cargo run --release --example bare_core -- 127.0.0.1:18840
//! ```
//! Benchmark use only: this is the configuration rumqttd must never be exposed with.

fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18840".into());
    let listen = listen.parse().expect("listen address");
    let config = vigil::config::Config::default_config().expect("built-in config");
    let mut broker = rumqttd::Broker::new(vigil::core::rumqttd_config(&config, &[listen], None));
    eprintln!("bare rumqttd core listening on {listen}");
    if let Err(e) = broker.start() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
