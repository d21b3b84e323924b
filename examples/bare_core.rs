//! rumqttd alone, configured exactly like vigil's embedded core (same code:
//! `vigil::core::core_settings` and `spawn_core`) but listening directly with no edge and no auth, so
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
    let settings = vigil::core::core_settings(&config, &[listen], None);
    if let Err(e) = vigil::core::spawn_core(settings, 1) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    eprintln!("bare rumqttd core listening on {listen}");
    // The core runs on its own threads for the life of the process.
    loop {
        std::thread::park();
    }
}
