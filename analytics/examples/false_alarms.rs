//! False alarms on healthy machines: feeds simulated healthy 3-metric motors through the
//! detector and counts the anomaly alerts it raises (every one is a false alarm).
//!
//! ```text
//! cargo run -p vigil-analytics --release --example false_alarms -- \
//!     [--seeds 4] [--readings 20000] [--cycle 3000] [--config JSON] [--motor simulator|lagged] \
//!     [--fault bearing-wear|vibration-ramp|overheating|stuck|cooling-loss --fault-at 10000] \
//!     [--list]
//! ```
//!
//! `--list` prints every alert (seed, reading, severity, message) as it is raised.
//!
//! With `--fault`, the fault (the simulator's models, one reading per second) starts at reading
//! `--fault-at`: alerts before it are false alarms, and the first alert after it is reported
//! with its delay, metric, channel and, for a cross-metric alert, the alternatives it names.
//! `vibration-ramp` is a bare ramp of 0.02 per reading on the vibration (bearing wear without
//! its noise and knocks).
//!
//! The motor is the simulator's model (`examples/simulator.rs`): a load that follows a cosine
//! cycle of `--cycle` readings, temperature 52 + 14 load, vibration 1.8 + 1.2 load and current
//! 8 + 10 load, with Gaussian sensor noise of 0.3, 0.08 and 0.2. `--motor lagged` is modelled on
//! the running motor of `tests/analytics_live.rs` (with Gaussian noise): the temperature approaches 50 + 10 load with a time constant of
//! 300 readings, vibration 1.8 + load and current 8 + 10 load (noise 0.4, 0.1, 0.3), so
//! vibration and current move in exact proportion. One detector per seed, default
//! `DetectorConfig` (or `--config` overrides, as in `vigil-eval`), refits run inline. Output:
//! one line per seed with the alerts by channel and severity, then the totals and the rate per
//! metric value.

mod common;

use common::gauss;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use vigil_analytics::detector::{DetectorConfig, DeviceDetector};
use vigil_analytics::telemetry::Reading;

struct Args {
    seeds: u64,
    readings: usize,
    cycle: f64,
    config: DetectorConfig,
    fault: Option<String>,
    fault_at: usize,
    lagged: bool,
    list: bool,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        seeds: 4,
        readings: 20_000,
        cycle: 3000.0,
        config: DetectorConfig::default(),
        fault: None,
        fault_at: 10_000,
        lagged: false,
        list: false,
    };
    let list = common::flags(|flag, value| {
        match flag {
            "--seeds" => args.seeds = value.parse()?,
            "--readings" => args.readings = value.parse()?,
            "--cycle" => args.cycle = value.parse()?,
            "--config" => args.config = serde_json::from_str(&value)?,
            "--fault" => match value.as_str() {
                "bearing-wear" | "vibration-ramp" | "overheating" | "stuck" | "cooling-loss" => {
                    args.fault = Some(value)
                }
                other => return Err(format!("unknown fault {other}").into()),
            },
            "--fault-at" => args.fault_at = value.parse()?,
            "--motor" => match value.as_str() {
                "simulator" => args.lagged = false,
                "lagged" => args.lagged = true,
                other => return Err(format!("unknown motor {other}").into()),
            },
            other => return Err(format!("unknown argument {other}").into()),
        }
        Ok(())
    })?;
    args.list = list;
    Ok(args)
}

#[derive(Default)]
struct Count {
    metric: usize,
    cross: usize,
    by_severity: std::collections::BTreeMap<String, usize>,
    by_metric: std::collections::BTreeMap<String, usize>,
    /// With a fault: (readings after its start, metric, cross-metric?, the metrics a
    /// cross-metric alert names as alternatives) of the first alert.
    detected: Option<(usize, String, bool, Vec<String>)>,
    after_fault: usize,
}

fn run(args: &Args, seed: u64) -> Result<Count, Box<dyn std::error::Error>> {
    let mut det = DeviceDetector::new(args.config.clone())?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut count = Count::default();
    let mut last_temperature = 0.0;
    let mut lagged = 50.0;
    for i in 0..args.readings {
        let phase = 2.0 * std::f64::consts::PI * (i as f64 / args.cycle);
        let load = 0.5 - 0.4 * phase.cos();
        let (mut temperature, mut vibration, current) = if args.lagged {
            lagged += (50.0 + 10.0 * load - lagged) / 300.0;
            (
                lagged + gauss(&mut rng, 0.4),
                1.8 + load + gauss(&mut rng, 0.1),
                8.0 + 10.0 * load + gauss(&mut rng, 0.3),
            )
        } else {
            (
                52.0 + 14.0 * load + gauss(&mut rng, 0.3),
                1.8 + 1.2 * load + gauss(&mut rng, 0.08),
                8.0 + 10.0 * load + gauss(&mut rng, 0.2),
            )
        };
        let faulty = args.fault.as_deref().filter(|_| i >= args.fault_at);
        if let Some(fault) = faulty {
            let s = (i - args.fault_at) as f64;
            match fault {
                "bearing-wear" => {
                    vibration += 0.02 * s + gauss(&mut rng, 0.05 + 0.002 * s).abs();
                    if rng.gen_bool(0.01) {
                        vibration += rng.gen_range(1.0..3.0);
                    }
                    temperature += 0.004 * s;
                }
                "vibration-ramp" => vibration += 0.02 * s,
                "overheating" => temperature += 0.05 * s,
                "stuck" => temperature = last_temperature,
                _ => temperature += 4.0 * load * (s / 120.0).min(1.0),
            }
        }
        last_temperature = temperature;
        let reading = Reading {
            timestamp_ms: i as i64 * 1000,
            device_time: true,
            metrics: vec![
                ("temperature".into(), temperature),
                ("vibration".into(), vibration),
                ("current".into(), current),
            ],
        };
        for o in det.feed(&reading) {
            if let Some(alert) = o.to_alert("motor") {
                if args.list {
                    println!(
                        "  seed {seed} reading {i}: {:?} {}",
                        alert.severity, alert.message
                    );
                }
                if faulty.is_some() {
                    count.after_fault += 1;
                    if count.detected.is_none() {
                        count.detected = Some((
                            i - args.fault_at,
                            alert.metric.clone(),
                            o.cross.is_some(),
                            alert.alternatives.clone(),
                        ));
                    }
                    continue;
                }
                if o.cross.is_some() {
                    count.cross += 1;
                } else {
                    count.metric += 1;
                }
                *count
                    .by_severity
                    .entry(format!("{:?}", alert.severity))
                    .or_default() += 1;
                *count.by_metric.entry(alert.metric).or_default() += 1;
            }
        }
        det.refit_inline()?;
    }
    Ok(count)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let mut total = Count::default();
    for seed in 1..=args.seeds {
        let c = run(&args, seed)?;
        println!(
            "seed {seed}: per-metric alerts {}, cross-metric alerts {}, by severity {:?}, by metric {:?}",
            c.metric, c.cross, c.by_severity, c.by_metric
        );
        if let Some(fault) = &args.fault {
            match &c.detected {
                Some((delay, metric, cross, alternatives)) => println!(
                    "seed {seed}: {fault}: first alert {delay} readings after the start, on {metric} ({}{}); {} alerts after the start",
                    if *cross { "cross-metric" } else { "per-metric" },
                    if alternatives.is_empty() {
                        String::new()
                    } else {
                        format!(", or {}", alternatives.join(" or "))
                    },
                    c.after_fault
                ),
                None => println!("seed {seed}: {fault}: not detected"),
            }
        }
        total.metric += c.metric;
        total.cross += c.cross;
        for (k, v) in c.by_severity {
            *total.by_severity.entry(k).or_default() += v;
        }
        for (k, v) in c.by_metric {
            *total.by_metric.entry(k).or_default() += v;
        }
    }
    let values = args.seeds as f64 * args.readings as f64 * 3.0;
    let alerts = total.metric + total.cross;
    println!(
        "total: {alerts} alerts ({} per-metric, {} cross-metric) over {} seeds x {} readings x 3 metrics; one per {:.0} metric values; by severity {:?}",
        total.metric,
        total.cross,
        args.seeds,
        args.readings,
        if alerts > 0 { values / alerts as f64 } else { f64::INFINITY },
        total.by_severity
    );
    Ok(())
}
