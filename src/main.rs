//! The `vigil` command line: run the broker, or print or check a configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vigil::config::{Config, DEFAULT_TOML};

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "MQTT broker for IoT fleets with a hardened edge"
)]
struct Cli {
    /// Configuration file (default: the built-in broker.toml; see `vigil print-config`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Address for MQTT over TCP, overriding `mqtt.listen` (port 0 picks a free port).
    #[arg(long, global = true)]
    mqtt_listen: Option<SocketAddr>,
    /// Address for the web port, overriding `http.listen` (port 0 picks a free port).
    #[arg(long, global = true)]
    http_listen: Option<SocketAddr>,
    /// Address for MQTT over TLS, overriding `tls.mqtt_listen` (needs `[tls]` certificates).
    #[arg(long, global = true)]
    mqtts_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Run,
    /// Print the built-in default configuration, with its comments.
    PrintConfig,
    /// Check a configuration file and exit: 0 when valid, 1 with the reason when not.
    CheckConfig { file: PathBuf },
    /// Run the broker with a simulated fleet connected to it, to watch the dashboard,
    /// alerts and forecasts live (faults are injected within the first minute).
    Demo {
        /// Simulated devices (`demo-0` ...).
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// Readings per second per device.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
    },
    /// Print a short live summary of a running vigil (its /readyz and /metrics).
    Status {
        /// The web port of the instance (default: `http.listen` of the configuration, with
        /// 0.0.0.0 read as 127.0.0.1).
        #[arg(long)]
        addr: Option<String>,
    },
    /// Write a device's stored telemetry history as CSV (`timestamp_ms` and one column per
    /// metric), for offline training. Reads Redis when `[redis]` is configured, otherwise the
    /// snapshot file in `history.data_dir` (written every `snapshot_interval_secs` and at
    /// shutdown); no running instance is needed.
    Export {
        /// The device id (as in `device/<id>/telemetry`).
        #[arg(long)]
        device: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Only the most recent N readings.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Train a remaining-useful-life model and save it for `[[analytics.rul]]`. The input is
    /// run-to-failure histories: CSV files as `vigil export` writes them, one per machine run
    /// until it failed (its last reading is the failure; one reading is one operating cycle),
    /// or NASA C-MAPSS text with `--cmapss`.
    TrainRul {
        /// The training files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Where to write the model (JSON).
        #[arg(long, short)]
        output: PathBuf,
        /// The files are C-MAPSS text (`unit cycle setting1..3 s1..s21` per row, many machines
        /// per file); the model then reads the telemetry metrics `setting1`..`setting3` and
        /// `s1`..`s21`.
        #[arg(long)]
        cmapss: bool,
        /// Training settings as JSON, e.g. '{"cap":150}' (keys of vigil-analytics' RulConfig:
        /// cap, short_window, long_window, rounds, learning_rate, max_depth, min_leaf,
        /// row_subsample, seed).
        #[arg(long)]
        settings: Option<String>,
    },
    /// Manage a password file (`[auth] password_file`), as mosquitto_passwd does. A running
    /// vigil reads it again on SIGHUP.
    Passwd {
        #[command(subcommand)]
        action: PasswdAction,
    },
}

#[derive(Subcommand)]
enum PasswdAction {
    /// Add a user, or change its password and role (the file is created if missing).
    Add {
        file: PathBuf,
        user: String,
        /// The password (for scripts); without it, it is asked for twice on the terminal.
        #[arg(long)]
        password: Option<String>,
        /// The user's role, one of `[acl.roles]`.
        #[arg(long, default_value = "device")]
        role: String,
    },
    /// Remove a user.
    Remove { file: PathBuf, user: String },
    /// List the users and their roles.
    List { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::PrintConfig) => {
            print!("{DEFAULT_TOML}");
            return ExitCode::SUCCESS;
        }
        Some(Command::CheckConfig { ref file }) => {
            return match Config::from_file(file) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Passwd { ref action }) => {
            return match passwd(action) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Status { ref addr }) => {
            return match status(&cli, addr.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Export {
            ref device,
            ref output,
            limit,
        }) => {
            return match export(&cli, device, output.as_deref(), limit) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::TrainRul {
            ref files,
            ref output,
            cmapss,
            ref settings,
        }) => {
            return match train_rul(files, output, cmapss, settings.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Run) | Some(Command::Demo { .. }) | None => {}
    }
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `vigil export`: a device's history as CSV.
fn export(
    cli: &Cli,
    device: &str,
    output: Option<&std::path::Path>,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default_config()?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let rows = match output {
        Some(path) => {
            // Written next to the target and renamed, so a failed export leaves no half file.
            let tmp = path.with_extension("csv.partial");
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let rows =
                runtime.block_on(vigil::history::export_csv(&config, device, limit, &mut out));
            let rows = match rows.map_err(anyhow::Error::from).and_then(|rows| {
                out.flush()?;
                Ok(rows)
            }) {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            rows
        }
        None => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let rows =
                runtime.block_on(vigil::history::export_csv(&config, device, limit, &mut out))?;
            out.flush()?;
            rows
        }
    };
    eprintln!("exported {rows} readings of `{device}`");
    Ok(())
}

/// `vigil train-rul`: trains a remaining-useful-life model and writes it as JSON.
fn train_rul(
    files: &[PathBuf],
    output: &std::path::Path,
    cmapss: bool,
    settings: Option<&str>,
) -> anyhow::Result<()> {
    use vigil_analytics::rul::{self, RulConfig, RulModel};
    let config: RulConfig = match settings {
        Some(json) => serde_json::from_str(json).context("--settings")?,
        None => RulConfig::default(),
    };
    let mut texts = Vec::with_capacity(files.len());
    for path in files {
        texts.push(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
    }
    let (rows, names) = if cmapss {
        // Machines of different files are different machines, whatever their numbers.
        let mut rows = Vec::new();
        let mut offset = 0u32;
        for (text, path) in texts.iter().zip(files) {
            let mut part =
                rul::parse_cmapss(text).with_context(|| format!("{}", path.display()))?;
            let most = part.iter().map(|r| r.unit).max().unwrap_or(0);
            part.iter_mut()
                .for_each(|r| r.unit = r.unit.saturating_add(offset));
            offset = offset.saturating_add(most);
            rows.extend(part);
        }
        (rows, None)
    } else {
        let runs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (names, rows) = rul::parse_runs_csv(&runs)?;
        (rows, Some(names))
    };
    let mut model = RulModel::train(&rows, &config)?;
    if let Some(names) = names {
        model = model.with_names(names, Vec::new())?;
    }
    let json = model.to_json()?;
    // Written next to the target and renamed, so a failed write leaves no half file.
    let tmp = output.with_extension("json.partial");
    std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, output).with_context(|| format!("cannot write {}", output.display()))?;
    let used: Vec<&str> = model.used_metrics().collect();
    eprintln!(
        "trained on {} machines ({} readings); the model reads {}; wrote {}",
        rul::engine_count(&rows),
        rows.len(),
        used.join(", "),
        output.display()
    );
    Ok(())
}

fn passwd(action: &PasswdAction) -> anyhow::Result<()> {
    use vigil::edge::passwd;
    match action {
        PasswdAction::Add {
            file,
            user,
            password,
            role,
        } => {
            passwd::check_user(user)?;
            passwd::check_role(role)?;
            let password = match password {
                Some(p) => p.clone(),
                None => {
                    let first = rpassword::prompt_password("Password: ")
                        .context("cannot read the password")?;
                    let again = rpassword::prompt_password("Reenter password: ")
                        .context("cannot read the password")?;
                    anyhow::ensure!(first == again, "the passwords do not match");
                    first
                }
            };
            let replaced = passwd::add(file, user, password.as_bytes(), role)?;
            let verb = if replaced { "updated" } else { "added" };
            eprintln!("{verb} user `{user}` (role `{role}`) in {}", file.display());
        }
        PasswdAction::Remove { file, user } => {
            passwd::remove(file, user)?;
            eprintln!("removed user `{user}` from {}", file.display());
        }
        PasswdAction::List { file } => {
            for (user, role) in passwd::list(file)? {
                println!("{user}\t{role}");
            }
        }
    }
    Ok(())
}

/// `vigil status`: fetches /readyz and /metrics over plain HTTP and prints a summary.
fn status(cli: &Cli, addr: Option<&str>) -> anyhow::Result<()> {
    let addr = match addr {
        Some(a) => a
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string(),
        None => {
            let config = match &cli.config {
                Some(path) => Config::from_file(path)?,
                None => Config::default_config()?,
            };
            let mut a = cli.http_listen.unwrap_or(config.http.listen);
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a.to_string()
        }
    };
    let ready = http_get(&addr, "/readyz")?;
    let metrics = http_get(&addr, "/metrics")?;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    println!("vigil at {addr}: {}", ready.trim());
    println!(
        "connections: tcp {} tls {} ws {} bridge {} (accepted since start: {})",
        value("vigil_connections{listener=\"tcp\"}"),
        value("vigil_connections{listener=\"tls\"}"),
        value("vigil_connections{listener=\"ws\"}"),
        value("vigil_connections{listener=\"bridge\"}"),
        value("vigil_connections_total"),
    );
    println!(
        "messages: in {} out {}; bytes: in {} out {}",
        sum("vigil_messages_in_total"),
        sum("vigil_messages_out_total"),
        value("vigil_bytes_total{direction=\"in\"}"),
        value("vigil_bytes_total{direction=\"out\"}"),
    );
    println!(
        "refused: auth {} per-ip {} over-cap {}; acl denied {}; rate limited {}; disconnected {}",
        value("vigil_connections_refused_total{reason=\"auth\"}"),
        value("vigil_connections_refused_total{reason=\"per_ip\"}"),
        value("vigil_connections_refused_total{reason=\"over_cap\"}"),
        sum("vigil_acl_denied_total"),
        value("vigil_rate_limited_total"),
        sum("vigil_disconnects_total"),
    );
    println!(
        "retained: {} messages, {} bytes; saved {} (failed {})",
        value("vigil_retained_messages"),
        value("vigil_retained_bytes"),
        value("vigil_retained_saves_total{outcome=\"ok\"}"),
        value("vigil_retained_saves_total{outcome=\"failed\"}"),
    );
    println!(
        "persistent sessions: {} kept; restored at start {} (not restored {}); saved {} (failed {})",
        value("vigil_persistent_sessions"),
        value("vigil_sessions_restored_total{outcome=\"restored\"}"),
        value("vigil_sessions_restored_total{outcome=\"not_restored\"}"),
        value("vigil_session_saves_total{outcome=\"ok\"}"),
        value("vigil_session_saves_total{outcome=\"failed\"}"),
    );
    println!(
        "analytics: devices {} points {} alerts {} refits {}",
        value("vigil_analytics_devices"),
        value("vigil_analytics_points_total"),
        sum("vigil_analytics_alerts_total"),
        value("vigil_analytics_refits_total{result=\"ok\"}"),
    );
    if ready.contains("\"redis\":\"ok\"") || ready.contains("\"redis\":\"down\"") {
        println!(
            "cluster: redis {} exported {} imported {} outbox {} dropped {}",
            if value("vigil_cluster_redis_up") == 1.0 {
                "up"
            } else {
                "down"
            },
            value("vigil_cluster_messages_total{direction=\"exported\"}"),
            value("vigil_cluster_messages_total{direction=\"imported\"}"),
            value("vigil_cluster_outbox_messages"),
            sum("vigil_cluster_dropped_total"),
        );
    }
    Ok(())
}

/// A plain HTTP/1.1 GET; returns the body.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .with_context(|| format!("cannot reach vigil's web port at {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("no HTTP answer from {addr} (is the web port HTTPS?)"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer from {addr}"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || (path == "/readyz" && head.starts_with("HTTP/1.1 503")),
        "{path}: {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_string())
}

fn init_tracing() {
    // rumqttd logs an ERROR for every ordinary client disconnect; it is kept quiet unless
    // RUST_LOG asks for it.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        // Counts what the core drops for lagging subscribers, whatever the log filter.
        .with(vigil::core::LagDropCounter::layer())
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default_config()?,
    };
    if let Some(addr) = cli.mqtt_listen {
        config.mqtt.listen = addr;
    }
    if let Some(addr) = cli.http_listen {
        config.http.listen = addr;
    }
    if let Some(addr) = cli.mqtts_listen {
        config.tls.mqtt_listen = addr.to_string();
    }
    let demo = match cli.command {
        Some(Command::Demo { devices, rate }) => {
            anyhow::ensure!(
                (1..=10_000).contains(&devices) && rate > 0.0 && rate <= 100.0,
                "demo: --devices must be 1..=10000 and --rate in (0, 100]"
            );
            vigil::demo::configure(&mut config);
            Some((devices, rate))
        }
        _ => None,
    };
    // Client connections run on the edge's connection threads ([runtime] connection_threads);
    // this runtime has the accept loops, the analytics task, the cluster links and history.
    // rumqttd runs its router and listener on threads of its own: leave them a core.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1).max(1))
        .unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listeners = vigil::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        if let Some((devices, rate)) = demo {
            let mut mqtt = listeners.mqtt_addr()?;
            let mut http = listeners.http_addr()?;
            for a in [&mut mqtt, &mut http] {
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
            }
            eprintln!(
                "vigil demo: {devices} simulated devices at {rate} readings/s. Dashboard: http://{http}/  \
                 MQTT: mqtt://{mqtt} (try: mosquitto_sub -p {} -t 'device/+/alerts' -v). Ctrl-C stops.",
                mqtt.port()
            );
            tokio::spawn(vigil::demo::run_fleet(mqtt, devices, rate, shutdown.clone()));
        }
        vigil::run(config, listeners, shutdown).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    // rumqttd's threads have no stop API; returning from main ends them with the process.
    Ok(())
}

async fn signal_shutdown(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    token.cancel();
}
