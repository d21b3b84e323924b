//! False alarms on the fields real devices send besides their process values: feeds healthy
//! signals of a dozen kinds through `DeviceMonitor` (the live service's path, default settings,
//! limits as in `broker.toml`: temperature 85, vibration 7.1), one reading a second, and counts
//! every alert each raises. Nothing is wrong with any of them, so every alert is a false alarm.
//!
//! ```text
//! cargo run -p vigil-analytics --release --example signal_zoo -- [--days 2] [--seeds 2] \
//!     [--only NAME] [--together 0|1] [--list]
//! ```
//!
//! The signals (all healthy):
//! - `energy_kwh`: an energy meter, rising 0.0012 kWh a second (4.3 kW), reported to 0.01.
//! - `parts`: a parts counter, +1 for each part made (one every 20-40 s).
//! - `uptime_s`: seconds since boot, +1 a reading.
//! - `seq`: a message sequence number that wraps at 65,536.
//! - `rssi`: radio signal strength in whole dBm, wandering around -67 with ±3 of jitter.
//! - `battery`: percent, whole numbers, falling 1 % every 50 minutes to 5 %, then recharged to 100.
//! - `temp_int`: a temperature reported in whole degrees: 50 + a daily swing of ±3 + noise 0.3.
//! - `pressure`: 4 bar with heavy-tailed noise (Student's t, 3 degrees of freedom, scale 0.02).
//! - `room_temp` and `heater`: a thermostat: the room warms 0.01 degrees a second while the
//!   heater (5 A, else 0) is on and cools 0.004 a second while it is off, between 20 and 22.
//! - `ambient`: an outdoor temperature wandering slowly (a mean-reverting walk, time constant 6 h,
//!   spread 2) around 12.
//! - `errors`: an error counter per interval: 0, with a burst of 1-3 about once an hour.
//! - `setpoint`: a configured value echoed in every message, 60.0, never changing.
//! - `door`: 0 or 1, opened for 10-120 s about every 15 minutes.
//! - `oven_rbe`: an oven at 180 degrees, a daily swing of ±10 and a controller error wandering
//!   by about 1 degree, in whole degrees. On a device of its own (`--together 0`) it reports by
//!   exception: only when the value changes, so its readings come seconds or many minutes apart.
//!
//! `--together 1` (the default) sends them all in one device's messages; `--together 0` gives
//! each signal a device of its own (the thermostat's two as one). `--only NAME` keeps one signal
//! (and, for the thermostat, its partner). Output: alerts per signal and kind, per seed and in
//! total, and how many came after each seed's first day.

mod common;

use common::gauss;
use rand::Rng;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use std::collections::BTreeMap;
use vigil_analytics::monitor::{DeviceMonitor, MonitorConfig};
use vigil_analytics::telemetry::Reading;

const DAY: i64 = 86_400;

const SIGNALS: [&str; 15] = [
    "energy_kwh",
    "parts",
    "uptime_s",
    "seq",
    "rssi",
    "battery",
    "temp_int",
    "pressure",
    "room_temp",
    "heater",
    "ambient",
    "errors",
    "setpoint",
    "door",
    "oven_rbe",
];

/// The device a signal belongs to when each has its own (`--together 0`).
fn group(name: &str) -> &str {
    match name {
        "heater" => "room_temp",
        other => other,
    }
}

struct Args {
    days: i64,
    seeds: u64,
    only: Option<String>,
    together: bool,
    list: bool,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        days: 2,
        seeds: 2,
        only: None,
        together: true,
        list: false,
    };
    let list = common::flags(|flag, value| {
        match flag {
            "--days" => args.days = value.parse()?,
            "--seeds" => args.seeds = value.parse()?,
            "--only" => args.only = Some(value),
            "--together" => args.together = value != "0",
            other => return Err(format!("unknown flag {other}").into()),
        }
        Ok(())
    })?;
    args.list = list;
    Ok(args)
}

/// Every signal's state, advanced one second at a time.
struct Plant {
    rng: Xoshiro256PlusPlus,
    energy: f64,
    parts: f64,
    next_part: i64,
    rssi: f64,
    battery: f64,
    room: f64,
    heating: bool,
    ambient: f64,
    oven: f64,
    /// The oven's own noise, so adding it left the other signals' draws as they were.
    oven_rng: Xoshiro256PlusPlus,
    next_burst: i64,
    door_open_until: i64,
    next_door: i64,
}

impl Plant {
    fn new(seed: u64) -> Self {
        Plant {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            energy: 1234.56,
            parts: 0.0,
            next_part: 30,
            rssi: -67.0,
            battery: 100.0,
            room: 21.0,
            heating: true,
            ambient: 12.0,
            oven: 0.0,
            oven_rng: Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x0be),
            next_burst: 3600,
            door_open_until: 0,
            next_door: 900,
        }
    }

    /// The readings at second `i`, in `SIGNALS` order.
    fn step(&mut self, i: i64) -> [f64; 15] {
        let rng = &mut self.rng;
        self.energy += 0.0012;
        if i >= self.next_part {
            self.parts += 1.0;
            self.next_part = i + rng.gen_range(20..=40);
        }
        self.rssi += 0.02 * (-67.0 - self.rssi) + gauss(rng, 0.3);
        if i % 3000 == 0 && i > 0 {
            self.battery = if self.battery <= 5.0 {
                100.0
            } else {
                self.battery - 1.0
            };
        }
        let daily = (i as f64 * std::f64::consts::TAU / DAY as f64).sin();
        let temp_int = (50.0 + 3.0 * daily + gauss(rng, 0.3)).round();
        // Student's t with 3 degrees of freedom: a normal over the root of a chi-square / 3.
        let chi: f64 = (0..3).map(|_| gauss(rng, 1.0).powi(2)).sum::<f64>() / 3.0;
        let pressure = 4.0 + 0.02 * gauss(rng, 1.0) / chi.sqrt().max(1e-3);
        self.room += if self.heating { 0.01 } else { -0.004 } + gauss(rng, 0.002);
        if self.room >= 22.0 {
            self.heating = false;
        } else if self.room <= 20.0 {
            self.heating = true;
        }
        let heater = if self.heating {
            5.0 + gauss(rng, 0.05)
        } else {
            0.0
        };
        // A mean-reverting walk: time constant 6 h, stationary spread 2.
        let tau = 6.0 * 3600.0;
        self.ambient += (12.0 - self.ambient) / tau + gauss(rng, 2.0 * (2.0 / tau).sqrt());
        // The oven's controller error: a mean-reverting walk, time constant 10 minutes, spread 1.
        self.oven += -self.oven / 600.0 + gauss(&mut self.oven_rng, (2.0f64 / 600.0).sqrt());
        let errors = if i >= self.next_burst {
            self.next_burst = i + rng.gen_range(1800..=5400);
            rng.gen_range(1..=3) as f64
        } else {
            0.0
        };
        if i >= self.next_door {
            self.door_open_until = i + rng.gen_range(10..=120);
            self.next_door = i + rng.gen_range(300..=1500);
        }
        let door = if i < self.door_open_until { 1.0 } else { 0.0 };
        [
            (self.energy * 100.0).round() / 100.0,
            self.parts,
            i as f64,
            (i % 65_536) as f64,
            self.rssi.round(),
            self.battery,
            temp_int,
            (pressure * 1000.0).round() / 1000.0,
            (self.room * 100.0).round() / 100.0,
            (heater * 100.0).round() / 100.0,
            (self.ambient * 100.0).round() / 100.0,
            errors,
            60.0,
            door,
            (180.0 + 10.0 * daily + self.oven).round(),
        ]
    }
}

fn config() -> MonitorConfig {
    MonitorConfig {
        limits: common::broker_limits(),
        ..MonitorConfig::default()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let keep: Vec<usize> = (0..SIGNALS.len())
        .filter(|&k| {
            args.only
                .as_deref()
                .map_or(true, |o| group(SIGNALS[k]) == group(o))
        })
        .collect();
    if keep.is_empty() {
        return Err(format!("--only: no signal named that; they are {SIGNALS:?}").into());
    }
    // Devices: one with every kept signal, or one per group.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &k in &keep {
        let at = match args.together {
            true => (!groups.is_empty()).then_some(0),
            false => groups
                .iter()
                .position(|g| group(SIGNALS[g[0]]) == group(SIGNALS[k])),
        };
        match at {
            Some(g) => groups[g].push(k),
            None => groups.push(vec![k]),
        }
    }
    let mut totals: BTreeMap<(String, String), usize> = BTreeMap::new();
    // Alerts after each seed's first day, once the detectors have seen a day of everything.
    let mut later = 0;
    for seed in 1..=args.seeds {
        let mut plant = Plant::new(seed);
        let mut monitors = groups
            .iter()
            .map(|g| DeviceMonitor::new(group(SIGNALS[g[0]]), config()))
            .collect::<Result<Vec<_>, _>>()?;
        let t0 = 1_790_000_000_000i64;
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut last_sent = [None; SIGNALS.len()];
        for i in 0..args.days * DAY {
            let values = plant.step(i);
            for (g, m) in groups.iter().zip(monitors.iter_mut()) {
                // Report by exception: `oven_rbe` alone sends only a changed value.
                if !args.together && SIGNALS[g[0]] == "oven_rbe" {
                    let k = g[0];
                    if last_sent[k] == Some(values[k]) {
                        continue;
                    }
                    last_sent[k] = Some(values[k]);
                }
                let out = m.ingest(&Reading {
                    timestamp_ms: t0 + i * 1000,
                    device_time: true,
                    metrics: g.iter().map(|&k| (SIGNALS[k].into(), values[k])).collect(),
                });
                for a in &out.alerts {
                    if i >= DAY {
                        later += 1;
                    }
                    *counts
                        .entry((a.metric.clone(), format!("{:?}", a.kind).to_lowercase()))
                        .or_default() += 1;
                    if args.list {
                        println!(
                            "  seed {seed} day {} {:02}:{:02}:{:02} {} {:?} {:?}: {}",
                            i / DAY,
                            i % DAY / 3600,
                            i % 3600 / 60,
                            i % 60,
                            a.metric,
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
        }
        let n: usize = counts.values().sum();
        println!("seed {seed}: {n} alerts {counts:?}");
        for (k, c) in counts {
            *totals.entry(k).or_default() += c;
        }
    }
    let n: usize = totals.values().sum();
    println!(
        "total over {} device-days ({} signals, {}): {n} alerts",
        args.days as u64 * args.seeds,
        keep.len(),
        if args.together {
            "one device"
        } else {
            "a device each"
        }
    );
    println!(
        "  after each seed's first day: {later} alerts ({:.2} per signal-day)",
        later as f64 / (keep.len() as f64 * ((args.days - 1).max(1) as u64 * args.seeds) as f64)
    );
    for ((metric, kind), c) in &totals {
        println!("  {metric} {kind}: {c}");
    }
    Ok(())
}
