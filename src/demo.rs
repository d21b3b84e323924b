//! `vigil demo`: the broker with a simulated fleet of motors connected to it over MQTT, so the
//! whole system (edge, core, analytics, bridge and dashboard) can be seen working at once.
//!
//! Each device `demo-<i>` is an ordinary MQTT 3.1.1 client of the edge on the bound MQTT
//! address: it announces `{"status":"online"}` retained on `device/<id>/status`, leaves
//! `{"status":"offline"}` there as its will, and publishes telemetry (temperature, vibration,
//! current) at QoS 0 several times a second. Two faults are injected on a schedule so that
//! alerts appear within the first minute: `demo-3` overheats (threshold and forecast alerts on
//! temperature) and `demo-7`'s current jumps to an erratic new level (an anomaly alert: the
//! jump comes after the detector's first model, fitted on normal readings). The analytics
//! detector is configured to warm up in seconds rather than the production minutes, and to
//! alert more readily than in production.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::mqtt::{self, CoreConnect, CoreWill, Version};

/// Seconds after start when `demo-3` starts to overheat.
const OVERHEAT_AFTER: f64 = 10.0;
/// Seconds after start when `demo-7`'s current jumps: late enough that its detector has a
/// settled score history by then, also in a debug build. At 30 s the CLI test
/// `demo_fleet_raises_alerts_within_a_minute` missed the anomaly in 2 of 5 debug-build runs;
/// at 40 s in none of 6.
const JUMP_AFTER: f64 = 40.0;

/// The demo's changes to a configuration: a detector that warms up in seconds.
pub fn configure(config: &mut Config) {
    let d = &mut config.analytics.detector;
    d.warmup = 64;
    d.window = d.window.max(64);
    d.refit_every = 128;
    d.min_history = 64;
    d.history = 256;
    // A demo should show its injected anomaly promptly: no extra margin while the score
    // history fills (the one-in-100,000 bar itself stays). The price of seconds-long warm-ups:
    // in a 75 s run of 50 devices, 2 healthy motors also raised an anomaly alert.
    d.young_margin = 0.0;
    config.analytics.enabled = true;
}

/// Runs `devices` simulated motors against `mqtt` at `rate` readings per second each, until
/// `shutdown`.
pub async fn run_fleet(mqtt: SocketAddr, devices: usize, rate: f64, shutdown: CancellationToken) {
    let mut tasks = Vec::with_capacity(devices);
    for i in 0..devices {
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            // A device that loses its connection (broker restart, shutdown) retries.
            while !shutdown.is_cancelled() {
                if let Err(e) = device(mqtt, i, rate, &shutdown).await {
                    tracing::debug!(device = i, error = %e, "demo device disconnected");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn device(
    mqtt: SocketAddr,
    index: usize,
    rate: f64,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let id = format!("demo-{index}");
    let status = format!("device/{id}/status");
    let topic = format!("device/{id}/telemetry");
    let mut stream = TcpStream::connect(mqtt).await?;
    stream.set_nodelay(true)?;
    let mut out = BytesMut::with_capacity(512);
    let offline: &[u8] = br#"{"status":"offline"}"#;
    mqtt::put_core_connect(
        &mut out,
        &CoreConnect {
            client_id: &id,
            clean_session: true,
            keep_alive: 60,
            username: "",
            password: "",
            will: Some(CoreWill {
                topic: status.as_bytes(),
                qos: 1,
                retain: true,
                payload: &[offline],
            }),
        },
    );
    mqtt::put_publish(
        &mut out,
        Version::V311,
        false,
        0,
        true,
        status.as_bytes(),
        0,
        &[],
        &[br#"{"status":"online"}"#],
    );
    stream.write_all(&out).await?;
    out.clear();
    let (mut rd, mut wr) = stream.into_split();
    // CONNACK, PINGRESP: read and dropped; the end of the stream ends the device.
    let reader = async move {
        let mut sink = [0u8; 256];
        while rd.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let mut motor = Motor::new(index as u64);
    let writer = async {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
        let start = Instant::now();
        let mut last_ping = Instant::now();
        let mut payload = String::with_capacity(160);
        loop {
            tick.tick().await;
            let t = start.elapsed().as_secs_f64();
            motor.reading(index, t, &id, &mut payload);
            mqtt::put_publish(
                &mut out,
                Version::V311,
                false,
                0,
                false,
                topic.as_bytes(),
                0,
                &[],
                &[payload.as_bytes()],
            );
            if last_ping.elapsed() >= Duration::from_secs(30) {
                mqtt::put_pingreq(&mut out);
                last_ping = Instant::now();
            }
            wr.write_all(&out).await?;
            out.clear();
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = reader => r,
        r = writer => r,
    }
}

/// One motor's state: per-device offsets and a noise source.
struct Motor {
    rng: StdRng,
    temp_offset: f64,
    vib_offset: f64,
    phase: f64,
}

impl Motor {
    fn new(seed: u64) -> Motor {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(7919).wrapping_add(1));
        Motor {
            temp_offset: rng.gen_range(-3.0..3.0),
            vib_offset: rng.gen_range(-0.3..0.3),
            phase: rng.gen_range(0.0..std::f64::consts::TAU),
            rng,
        }
    }

    fn gauss(&mut self, sd: f64) -> f64 {
        let u1: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.gen();
        sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Writes the JSON reading at `t` seconds into `out`.
    fn reading(&mut self, index: usize, t: f64, id: &str, out: &mut String) {
        // A slow load cycle (an hour), different per device: gentle enough that no healthy
        // motor's temperature trend heads for the limit.
        let load = 0.5 - 0.3 * (self.phase + std::f64::consts::TAU * t / 3600.0).cos();
        let mut temperature = 55.0 + self.temp_offset + 6.0 * load + self.gauss(0.3);
        let vibration = 1.8 + self.vib_offset + 1.0 * load + self.gauss(0.08);
        let mut current = 9.0 + 8.0 * load + self.gauss(0.2);
        if index == 3 && t > OVERHEAT_AFTER {
            temperature += 0.9 * (t - OVERHEAT_AFTER);
        }
        if index == 7 && t > JUMP_AFTER {
            current += 12.0 + self.gauss(3.0);
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        out.clear();
        use std::fmt::Write;
        let _ = write!(
            out,
            r#"{{"device_id":"{id}","temperature":{temperature:.2},"vibration":{:.3},"current":{current:.2},"timestamp":{ts}}}"#,
            vibration.max(0.0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_telemetry_and_faults_show() {
        let mut m = Motor::new(3);
        let mut out = String::new();
        m.reading(3, 1.0, "demo-3", &mut out);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["device_id"], "demo-3");
        let early = v["temperature"].as_f64().unwrap();
        m.reading(3, OVERHEAT_AFTER + 40.0, "demo-3", &mut out);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v["temperature"].as_f64().unwrap() > early + 25.0);
        let mut c = Config::default_config().unwrap();
        configure(&mut c);
        assert!(c.analytics.detector.validate().is_ok());
    }
}
