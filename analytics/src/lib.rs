//! Pure-computation analytics for vigil: telemetry parsing, anomaly detection, forecasting and
//! remaining-useful-life estimation.
//!
//! Nothing in this crate does I/O, spawns threads or prints: the broker decides where each piece
//! runs. The usual flow in the live service is `telemetry::parse` → `monitor::DeviceMonitor::ingest`
//! → publish the returned `alert::AlertMessage`s and `alert::PredictionMessage`s, and run the
//! `detector::RefitJob`s that `DeviceMonitor::needs_refit` hands out on a worker.
pub mod alert;
pub mod detector;
pub mod early;
pub mod features;
pub mod forecast;
pub mod iforest;
pub mod joint;
pub mod monitor;
pub mod nab;
pub mod rest;
pub mod rul;
pub mod silence;
pub mod stuck;
pub mod telemetry;

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Uniform noise in [-0.5, 0.5) from a xorshift generator seeded with `seed`: the same
    /// sequence on every run and platform.
    pub(crate) fn uniform_noise(mut seed: u64) -> impl FnMut() -> f64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 10_000) as f64 / 10_000.0 - 0.5
        }
    }
}
