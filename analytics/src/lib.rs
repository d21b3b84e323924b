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
