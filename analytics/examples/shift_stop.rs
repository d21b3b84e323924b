//! False alarms on a healthy machine that runs one shift a day: feeds a simulated 3-metric motor
//! that runs from 06:00 to 22:00 and stands still at night through `DeviceMonitor` (the live
//! service's path, default settings, limits as in `broker.toml`: temperature 85, vibration 7.1),
//! one reading a second, and counts its anomaly alerts by when they come (within 30 minutes
//! after a start, within 30 minutes after a stop, otherwise while running or standing) and its
//! forecast alerts, and the anomaly alerts the monitor held while the machine slowed down and
//! withdrew when it came to rest. The machine is healthy, so every alert is a false alarm.
//!
//! ```text
//! cargo run -p vigil-analytics --release --example shift_stop -- [--days 4] [--seeds 3] \
//!     [--standing zero|noise] [--gate SECONDS] [--cut SECONDS] [--extrapolation X] \
//!     [--ramp SECONDS] [--rest-after SECONDS] [--rest-settle SECONDS] [--wear-at HOURS] [--list]
//! ```
//!
//! While running, the load follows a cosine cycle of 3,000 s (as in `false_alarms`); the
//! temperature approaches 52 + 14 load (25 standing) with a time constant of 600 s, plus sensor
//! noise of 0.3; vibration 1.8 + 1.2 load and current 8 + 10 load with noise of 0.08 and 0.2.
//! Standing, vibration and current are exactly 0 (`--standing zero`, a device that reports 0
//! when off) or sensor noise around 0 (`noise`). `--gate S` gives the monitor a running
//! condition (`MonitorConfig::running`: current above 1, `settle_secs` S): the detector is not
//! fed while the machine stands or in its first S seconds after a start, and starts a new
//! segment when it is fed again. `--cut S` instead withholds those readings from the monitor
//! altogether, with no new segment (the device simply stops sending). `--extrapolation X` sets
//! `MonitorConfig::forecast_max_extrapolation` (0: off). `--ramp S`: vibration and current
//! spin up from 0 over the first S seconds of a run and down to 0 over its last S (0: at once).
//! `--rest-after S` sets `RestConfig::after_secs`, how long the machine must stand before its
//! rest is learned (0: not learned; the monitor learns it by default), and `--rest-settle S`
//! `RestConfig::settle_secs`. `--wear-at H`: from H hours after the first reading the bearing
//! wears, the vibration rising by 0.001 for every second the machine has run since (3.6 an
//! hour); alerts from then on are not counted as false alarms, and the first is reported.
//! `--list` prints every alert.

mod common;

use common::gauss;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use vigil_analytics::alert::AlertKind;
use vigil_analytics::monitor::{DeviceMonitor, MonitorConfig, RunningRule};
use vigil_analytics::rest::RestConfig;
use vigil_analytics::telemetry::Reading;

const DAY: i64 = 86_400;
const START: i64 = 6 * 3600;
const STOP: i64 = 22 * 3600;
/// Alerts this soon after a start or a stop are counted as caused by it.
const AFTER: i64 = 1800;

struct Args {
    days: i64,
    seeds: u64,
    zero: bool,
    gate: Option<u64>,
    cut: Option<i64>,
    extrapolation: Option<f64>,
    ramp: i64,
    rest_after: Option<u64>,
    rest_settle: Option<u64>,
    wear_at: Option<i64>,
    list: bool,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        days: 4,
        seeds: 3,
        zero: true,
        gate: None,
        cut: None,
        extrapolation: None,
        ramp: 0,
        rest_after: None,
        rest_settle: None,
        wear_at: None,
        list: false,
    };
    let list = common::flags(|flag, value| {
        match flag {
            "--days" => args.days = value.parse()?,
            "--seeds" => args.seeds = value.parse()?,
            "--standing" => match value.as_str() {
                "zero" => args.zero = true,
                "noise" => args.zero = false,
                other => return Err(format!("--standing zero|noise, not {other}").into()),
            },
            "--gate" => args.gate = Some(value.parse()?),
            "--cut" => args.cut = Some(value.parse()?),
            "--extrapolation" => args.extrapolation = Some(value.parse()?),
            "--ramp" => args.ramp = value.parse()?,
            "--rest-after" => args.rest_after = Some(value.parse()?),
            "--rest-settle" => args.rest_settle = Some(value.parse()?),
            "--wear-at" => args.wear_at = Some(value.parse::<i64>()? * 3600),
            other => return Err(format!("unknown argument {other}").into()),
        }
        Ok(())
    })?;
    args.list = list;
    Ok(args)
}

fn config(args: &Args) -> MonitorConfig {
    let defaults = MonitorConfig::default();
    MonitorConfig {
        running: args
            .gate
            .map(|settle_secs| RunningRule {
                devices: "*".into(),
                metric: "current".into(),
                above: Some(1.0),
                below: None,
                settle_secs,
            })
            .into_iter()
            .collect(),
        limits: common::broker_limits(),
        forecast_max_extrapolation: args
            .extrapolation
            .unwrap_or(defaults.forecast_max_extrapolation),
        rest: RestConfig {
            after_secs: args.rest_after.unwrap_or(defaults.rest.after_secs),
            settle_secs: args.rest_settle.unwrap_or(defaults.rest.settle_secs),
        },
        ..defaults
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // Anomaly alerts after a start, after a stop, running, standing; then forecast alerts, and
    // anomaly alerts held and withdrawn because the machine came to rest.
    let mut totals = [0usize; 6];
    for seed in 1..=args.seeds {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut m = DeviceMonitor::new("m", config(&args))?;
        let t0 = 1_790_000_000_000i64;
        let mut temperature = 25.0;
        let mut counts = [0usize; 6];
        // Seconds run since the wear began, and when its first alert came.
        let mut worn = 0.0;
        let mut found: Option<i64> = None;
        for i in 0..args.days * DAY {
            let clock = i % DAY;
            let running = (START..STOP).contains(&clock);
            let load = match running {
                true => 0.5 - 0.4 * (i as f64 * std::f64::consts::TAU / 3000.0).cos(),
                false => 0.0,
            };
            let target = if running { 52.0 + 14.0 * load } else { 25.0 };
            temperature += (target - temperature) / 600.0;
            let t = temperature + gauss(&mut rng, 0.3);
            // Spinning up and down: the running levels scale from and to 0 over `--ramp`.
            let spin = match args.ramp {
                0 => 1.0,
                r => ((clock - START).min(STOP - clock) as f64 / r as f64).min(1.0),
            };
            let wearing = args.wear_at.is_some_and(|w| i >= w);
            if wearing && running {
                worn += 1.0;
            }
            let (v, c) = match (running, args.zero) {
                (true, _) => (
                    spin * (1.8 + 1.2 * load) + 0.001 * worn + gauss(&mut rng, 0.08),
                    spin * (8.0 + 10.0 * load) + gauss(&mut rng, 0.2),
                ),
                (false, true) => (0.0, 0.0),
                (false, false) => (gauss(&mut rng, 0.01).abs(), gauss(&mut rng, 0.02).abs()),
            };
            if args.cut.is_some_and(|g| !running || clock < START + g) {
                continue;
            }
            let out = m.ingest(&Reading {
                timestamp_ms: t0 + i * 1000,
                device_time: true,
                metrics: vec![
                    ("temperature".into(), (t * 100.0).round() / 100.0),
                    ("vibration".into(), (v * 1000.0).round() / 1000.0),
                    ("current".into(), (c * 100.0).round() / 100.0),
                ],
            });
            counts[5] += out.withdrawn;
            for a in &out.alerts {
                if wearing {
                    found = found.or(Some(i));
                    if args.list {
                        println!(
                            "  seed {seed} wear + {} s: {}",
                            i - args.wear_at.unwrap_or(0),
                            a.message
                        );
                    }
                    continue;
                }
                let class = if a.kind != AlertKind::Anomaly {
                    4
                } else if (START..START + AFTER).contains(&clock) {
                    0
                } else if (STOP..STOP + AFTER).contains(&clock) {
                    1
                } else if running {
                    2
                } else {
                    3
                };
                counts[class] += 1;
                if args.list {
                    println!(
                        "  seed {seed} day {} {:02}:{:02}:{:02} {:?} {:?}: {}",
                        i / DAY,
                        clock / 3600,
                        clock % 3600 / 60,
                        clock % 60,
                        a.kind,
                        a.severity,
                        a.message
                    );
                }
            }
            while let Some(job) = m.needs_refit() {
                if let Ok(model) = job.run() {
                    m.install(model);
                }
            }
        }
        println!(
            "seed {seed}: anomaly alerts after a start {}, after a stop {}, running {}, standing {}; forecast alerts {}; withdrawn at a stop {}",
            counts[0], counts[1], counts[2], counts[3], counts[4], counts[5]
        );
        if let Some(w) = args.wear_at {
            match found {
                Some(i) => println!("seed {seed}: wear: first alert {} s after it began", i - w),
                None => println!("seed {seed}: wear: no alert"),
            }
        }
        for (t, c) in totals.iter_mut().zip(counts) {
            *t += c;
        }
    }
    let days = args.days as f64 * args.seeds as f64;
    println!(
        "total over {days} machine-days: anomaly alerts after a start {}, after a stop {}, running {}, standing {} ({:.1} per machine-day); forecast alerts {} ({:.1} per machine-day); withdrawn at a stop {}",
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[..4].iter().sum::<usize>() as f64 / days,
        totals[4],
        totals[4] as f64 / days,
        totals[5]
    );
    Ok(())
}
