//! Prints the documented per-metric and per-device memory bounds of the default configuration.
//!
//! Run with `cargo run -p vigil-analytics --release --example memory_bound`.

use vigil_analytics::detector::DetectorConfig;
use vigil_analytics::monitor::{DeviceMonitor, MonitorConfig};

fn main() -> Result<(), vigil_analytics::monitor::MonitorError> {
    let cfg = DetectorConfig::default();
    println!("bytes_per_metric (bound): {}", cfg.bytes_per_metric());
    println!(
        "bytes_joint (bound, cross-metric channel): {}",
        cfg.bytes_joint()
    );
    println!(
        "bytes_per_device (bound, {} metrics): {}",
        cfg.max_metrics,
        cfg.bytes_per_device()
    );
    let monitor = DeviceMonitor::new("device", MonitorConfig::default())?;
    println!("DeviceMonitor bound: {}", monitor.memory_bound_bytes());
    Ok(())
}
