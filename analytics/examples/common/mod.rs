//! What the analytics examples share.

use rand::Rng;
use rand_xoshiro::Xoshiro256PlusPlus;
use std::error::Error;
use vigil_analytics::monitor::MetricLimit;

/// A draw from N(0, `sd`²) (Box-Muller).
pub fn gauss(rng: &mut Xoshiro256PlusPlus, sd: f64) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Walks the command line as `--flag value` pairs, except `--list`, which stands alone: calls
/// `set` with every other flag and its value, and returns whether `--list` was given.
pub fn flags(
    mut set: impl FnMut(&str, String) -> Result<(), Box<dyn Error>>,
) -> Result<bool, Box<dyn Error>> {
    let mut list = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--list" {
            list = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        set(&flag, value)?;
    }
    Ok(list)
}

/// The limits `broker.toml` sets for every device: temperature above 85, vibration above 7.1.
#[allow(dead_code)] // Not every example that includes this module runs a monitor.
pub fn broker_limits() -> Vec<MetricLimit> {
    [("temperature", 85.0), ("vibration", 7.1)]
        .map(|(metric, above)| MetricLimit {
            metric: metric.into(),
            above: Some(above),
            below: None,
        })
        .into()
}
