//! Device fleet simulator: N motors publishing realistic JSON telemetry to vigil (or any MQTT
//! broker), with a daily load cycle, sensor noise and an injectable fault, to watch the live
//! analytics raise alerts and predictions.
//!
//! ```text
//! cargo run --example simulator -- --devices 5 --rate 1 --port 1883 \
//!     [--fault bearing-wear|overheating|stuck|dropout|silent|cooling-loss --fault-device 0 --fault-after-secs 600]
//! mosquitto_sub -p 1883 -t 'device/+/alerts' -t 'device/+/predictions' -v
//! ```
//!
//! Each device `sim-<i>` publishes `{"device_id","temperature","vibration","current","timestamp"}`
//! on `device/sim-<i>/telemetry` at QoS 0, announces `{"status":"online"}` retained on
//! `device/sim-<i>/status` and leaves `{"status":"offline"}` there as its will. The detector needs
//! a warm-up of a few hundred readings per device before it scores (about 13 minutes at the
//! default `--rate 1`); raise `--rate` to get there sooner.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fault {
    /// Vibration grows steadily with sharper spikes, temperature creeps up.
    BearingWear,
    /// Temperature ramps up towards (and past) the 85 degree limit.
    Overheating,
    /// The temperature sensor freezes at its last value.
    Stuck,
    /// The device mostly stops reporting and sends incomplete readings.
    Dropout,
    /// The device stays connected but stops reporting altogether (a hung firmware loop).
    Silent,
    /// The cooling weakens: the temperature rises further with load than it used to (up to
    /// 4 degrees more at full load, reached over 2 minutes), while every value stays in its
    /// usual range. Only the cross-metric channel sees it.
    CoolingLoss,
}

#[derive(Debug, Parser)]
#[command(about = "Simulated motors publishing telemetry over MQTT")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 5)]
    devices: usize,
    /// Readings per second per device.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Device ids are `<prefix><index>`.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Length of the simulated day in seconds (shorten it to see the daily cycle quickly).
    #[arg(long, default_value_t = 86_400.0)]
    day_secs: f64,
    /// Fault to inject.
    #[arg(long, value_enum)]
    fault: Option<Fault>,
    /// Index of the device that develops the fault.
    #[arg(long, default_value_t = 0)]
    fault_device: usize,
    /// Seconds of normal operation before the fault starts.
    #[arg(long, default_value_t = 600.0)]
    fault_after_secs: f64,
    /// Stop after this many seconds (runs until Ctrl-C when absent).
    #[arg(long)]
    duration_secs: Option<f64>,
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// Seed of the noise, for reproducible runs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One motor's physical state.
struct Motor {
    rng: StdRng,
    /// Last temperature reported, for the stuck sensor.
    last_temperature: f64,
    /// Per-device offsets so the fleet is not identical.
    temp_offset: f64,
    vib_offset: f64,
}

impl Motor {
    fn new(seed: u64) -> Motor {
        let mut rng = StdRng::seed_from_u64(seed);
        Motor {
            temp_offset: rng.gen_range(-3.0..3.0),
            vib_offset: rng.gen_range(-0.3..0.3),
            last_temperature: 60.0,
            rng,
        }
    }

    fn gauss(&mut self, sd: f64) -> f64 {
        // Box-Muller: two uniforms give one standard normal value.
        let u1: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.gen();
        sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// The reading at simulated time `t` seconds; `fault` is the active fault and for how
    /// long it has been active. `None` means the device stays silent this time.
    fn reading(
        &mut self,
        t: f64,
        day_secs: f64,
        fault: Option<(Fault, f64)>,
    ) -> Option<Vec<(&'static str, f64)>> {
        // Load follows the working day: low at night, high in the afternoon.
        let phase = 2.0 * std::f64::consts::PI * (t / day_secs);
        let load = 0.5 - 0.4 * phase.cos();
        let mut temperature = 52.0 + self.temp_offset + 14.0 * load + self.gauss(0.3);
        let mut vibration = 1.8 + self.vib_offset + 1.2 * load + self.gauss(0.08);
        let current = 8.0 + 10.0 * load + self.gauss(0.2);
        match fault {
            Some((Fault::BearingWear, s)) => {
                vibration += 0.02 * s + self.gauss(0.05 + 0.002 * s).abs();
                if self.rng.gen_bool(0.05) {
                    vibration += self.rng.gen_range(1.0..3.0);
                }
                temperature += 0.004 * s;
            }
            Some((Fault::Overheating, s)) => temperature += 0.05 * s,
            Some((Fault::Stuck, _)) => temperature = self.last_temperature,
            Some((Fault::CoolingLoss, s)) => temperature += 4.0 * load * (s / 120.0).min(1.0),
            Some((Fault::Silent, _)) => return None,
            Some((Fault::Dropout, _)) => {
                if self.rng.gen_bool(0.8) {
                    return None;
                }
                self.last_temperature = temperature;
                return Some(vec![("temperature", temperature)]);
            }
            None => {}
        }
        self.last_temperature = temperature;
        Some(vec![
            ("temperature", temperature),
            ("vibration", vibration.max(0.0)),
            ("current", current.max(0.0)),
        ])
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn payload(id: &str, metrics: &[(&str, f64)], ts: i64) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("device_id".into(), id.into());
    for (name, value) in metrics {
        let rounded = (value * 1000.0).round() / 1000.0;
        obj.insert((*name).into(), rounded.into());
    }
    obj.insert("timestamp".into(), ts.into());
    serde_json::Value::Object(obj).to_string()
}

async fn run_device(args: std::sync::Arc<Args>, index: usize) {
    let id = format!("{}{index}", args.prefix);
    let status = format!("device/{id}/status");
    let mut opts = MqttOptions::new(&id, &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_last_will(LastWill::new(
        &status,
        r#"{"status":"offline"}"#,
        QoS::AtLeastOnce,
        true,
    ));
    if let (Some(u), Some(p)) = (&args.username, &args.password) {
        opts.set_credentials(u, p);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let tag = id.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = eventloop.poll().await {
                eprintln!("{tag}: {e}; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let _ = client
        .publish(&status, QoS::AtLeastOnce, true, r#"{"status":"online"}"#)
        .await;

    let topic = format!("device/{id}/telemetry");
    let mut motor = Motor::new(args.seed.wrapping_mul(1000).wrapping_add(index as u64));
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    let start = tokio::time::Instant::now();
    // The simulated clock starts at a random time of day per device.
    let t0 = motor.rng.gen_range(0.0..args.day_secs);
    loop {
        tick.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        if args.duration_secs.is_some_and(|d| elapsed >= d) {
            return;
        }
        let fault = match args.fault {
            Some(f) if index == args.fault_device && elapsed >= args.fault_after_secs => {
                Some((f, elapsed - args.fault_after_secs))
            }
            _ => None,
        };
        let Some(metrics) = motor.reading(t0 + elapsed, args.day_secs, fault) else {
            continue;
        };
        let body = payload(&id, &metrics, now_ms());
        if client
            .publish(&topic, QoS::AtMostOnce, false, body)
            .await
            .is_err()
        {
            return;
        }
    }
}

#[tokio::main]
async fn main() {
    let args = std::sync::Arc::new(Args::parse());
    if args.rate <= 0.0 || !args.rate.is_finite() || args.day_secs <= 0.0 {
        eprintln!("--rate and --day-secs must be positive");
        std::process::exit(2);
    }
    println!(
        "{} devices ({}0..) -> {}:{} at {} readings/s each{}",
        args.devices,
        args.prefix,
        args.host,
        args.port,
        args.rate,
        match args.fault {
            Some(f) => format!(
                "; fault {f:?} on device {} after {} s",
                args.fault_device, args.fault_after_secs
            ),
            None => String::new(),
        }
    );
    let mut tasks = Vec::new();
    for i in 0..args.devices {
        tasks.push(tokio::spawn(run_device(args.clone(), i)));
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { for t in tasks { let _ = t.await; } } => {}
    }
}
