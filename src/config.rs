//! Typed configuration: `broker.toml` parsed strictly, then validated.
//!
//! The commented default lives in `broker.toml` at the repository root and is embedded in the
//! binary. Parsing rejects unknown keys (a typo must never silently fall back to a default, as
//! rumqttd's loader does) and validation rejects values that would make the broker misbehave.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vigil_analytics::detector::DetectorConfig;
use vigil_analytics::monitor::{
    DeviceLimits, DeviceMonitor, MetricLimit, MonitorConfig, RunningRule,
};
use vigil_analytics::rest::RestConfig;
use vigil_analytics::rul::RulModel;

/// The commented default configuration, exactly as shipped in `broker.toml`.
pub const DEFAULT_TOML: &str = include_str!("../broker.toml");

/// The largest remaining length MQTT can encode (four length bytes).
pub const MQTT_MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Sets `key = value` in `[section]` of a broker.toml text, replacing the key's line or adding
/// it (and the section) when missing; comments and everything else stay as they are. For tools
/// and tests that derive a configuration from the commented default; `value` is TOML.
pub fn set_value(text: &str, section: &str, key: &str, value: &str) -> String {
    let header = format!("[{section}]");
    let line = format!("{key} = {value}");
    let mut out: Vec<&str> = Vec::new();
    let mut in_section = false;
    let mut done = false;
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            if in_section && !done {
                out.push(&line);
                done = true;
            }
            in_section = t == header;
        } else if in_section && !done {
            let is_key = t
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='));
            if is_key {
                out.push(&line);
                done = true;
                continue;
            }
        }
        out.push(l);
    }
    if !done {
        if !in_section {
            out.push("");
            out.push(&header);
        }
        out.push(&line);
    }
    out.join("\n") + "\n"
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub acl: AclConfig,
    pub bridge: BridgeConfig,
    pub core: CoreConfig,
    pub analytics: AnalyticsConfig,
    pub tls: TlsConfig,
    /// Optional: absent in configs written before scale-out existed.
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub history: HistoryConfig,
    #[serde(default)]
    pub persistence: PersistenceConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// What survives a restart (`[persistence]`). Optional: absent in configs written before it
/// existed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// Directory of the retained-message file (`edge::retained::FILE`) and of the
    /// persistent-session file (`edge::sessions::FILE`), each written every
    /// `autosave_interval_secs` when something changed and at shutdown, and read at start;
    /// empty = both live in memory only. With `[redis]`, whose retained hash plays that
    /// part, only the sessions are saved here.
    pub dir: String,
    pub autosave_interval_secs: u64,
    /// Longest the shutdown spends taking the messages queued for offline sessions from the
    /// core to save them (`edge::sessions::drain`); 0: they are not kept.
    pub drain_secs: u64,
}

impl Default for PersistenceConfig {
    fn default() -> PersistenceConfig {
        PersistenceConfig {
            dir: String::new(),
            autosave_interval_secs: 60,
            drain_secs: 3,
        }
    }
}

impl PersistenceConfig {
    /// The directory, when retained messages are to be saved (set, and no Redis).
    pub fn retained_dir(&self, redis: &RedisConfig) -> Option<&Path> {
        self.sessions_dir().filter(|_| !redis.enabled())
    }

    /// The directory, when persistent sessions are to be saved (set).
    pub fn sessions_dir(&self) -> Option<&Path> {
        (!self.dir.is_empty()).then(|| Path::new(&self.dir))
    }
}

/// Threads (`[runtime]`). Optional: absent in configs written before it existed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads serving client connections, each connection on one of them for its whole
    /// life; 0 = one per core.
    pub connection_threads: usize,
}

impl RuntimeConfig {
    /// The number of connection threads to start.
    pub fn connection_threads(&self) -> usize {
        match self.connection_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Scale-out over Redis (`cluster`). Off when `url` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; empty = one self-sufficient instance. With
    /// `cluster`, a comma-separated list of seed nodes of a Redis Cluster.
    pub url: String,
    /// `url` names Redis Cluster nodes.
    pub cluster: bool,
    /// This instance's name in the cluster; empty = a random name per process.
    pub instance_id: String,
    /// Key prefix of everything vigil stores, so several clusters can share one Redis.
    pub key_prefix: String,
    /// Approximate bound of the shared message stream (`XADD MAXLEN ~`).
    pub stream_maxlen: usize,
    /// Messages waiting for Redis (e.g. during an outage) before QoS 0 ones are dropped and
    /// QoS 1/2 ones are held in the core.
    pub outbox_max_messages: usize,
    /// Bytes of payload in the outbox, same rule.
    pub outbox_max_bytes: usize,
}

impl Default for RedisConfig {
    fn default() -> RedisConfig {
        RedisConfig {
            url: String::new(),
            cluster: false,
            instance_id: String::new(),
            key_prefix: "vigil".into(),
            stream_maxlen: 1_000_000,
            outbox_max_messages: 200_000,
            outbox_max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl RedisConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Telemetry history per device (`history`): in Redis when `[redis]` is on, else in memory
/// with a snapshot file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Readings kept per device (a ring in memory, `MAXLEN ~` in Redis); 0 = no history.
    pub points_per_device: usize,
    /// Devices with a history in memory; the least recently written one is dropped beyond it.
    pub max_devices: usize,
    /// Directory of the snapshot file (`history.snapshot`) without Redis; empty = none.
    pub data_dir: String,
    /// Seconds between snapshots (one is also written at shutdown).
    pub snapshot_interval_secs: u64,
}

impl Default for HistoryConfig {
    fn default() -> HistoryConfig {
        HistoryConfig {
            points_per_device: 1000,
            max_devices: 2000,
            data_dir: String::new(),
            snapshot_interval_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub allowed_origins: Vec<String>,
}

/// Edge policies that every listener shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_connections: usize,
    pub max_packet_size: usize,
    pub handshake_timeout_ms: u64,
    pub max_client_id_len: usize,
    pub write_stall_timeout_ms: u64,
    pub max_keepalive_secs: u16,
    pub max_connections_per_ip: usize,
    pub max_topic_length: usize,
    pub max_topic_levels: usize,
    pub max_subscriptions: usize,
    /// Distinct topic filters clients may have subscribed to since start, over all
    /// connections (`edge::limits::CoreNames`). Optional: absent in older configs.
    #[serde(default = "default_max_distinct_filters")]
    pub max_distinct_filters: usize,
    /// Distinct topic names clients may have published to since start (including will
    /// topics). Optional: absent in older configs.
    #[serde(default = "default_max_distinct_topics")]
    pub max_distinct_topics: usize,
    /// Bytes of retained messages vigil may hold (`edge::retained::RetainedStore`).
    /// Optional: absent in older configs.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: usize,
    /// Topic aliases given to the deliveries of an MQTT 5 client that accepts them, per
    /// connection; 0 = none (mosquitto's behaviour). Optional: absent in older configs.
    #[serde(default)]
    pub topic_aliases: u16,
    /// Sessions kept beyond their connection, connected or not (`edge::registry`).
    /// Optional: absent in older configs.
    #[serde(default = "default_max_persistent_sessions")]
    pub max_persistent_sessions: usize,
    /// Longest an offline session is kept, whatever it asked for; 0 = as long as it asked.
    /// Optional: absent in older configs.
    #[serde(default)]
    pub persistent_session_expiry_secs: u64,
}

fn default_max_persistent_sessions() -> usize {
    100_000
}

fn default_max_distinct_filters() -> usize {
    20_000
}

fn default_max_distinct_topics() -> usize {
    1_000_000
}

fn default_max_retained_bytes() -> usize {
    256 * 1024 * 1024
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// `persistent_session_expiry_secs`, `None` when 0 (no limit).
    pub fn persistent_session_expiry(&self) -> Option<Duration> {
        (self.persistent_session_expiry_secs > 0)
            .then(|| Duration::from_secs(self.persistent_session_expiry_secs))
    }

    pub fn write_stall_timeout(&self) -> Duration {
        Duration::from_millis(self.write_stall_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The password file (`vigil passwd`); empty for none.
    pub password_file: String,
    /// Failed logins from one address within a minute before it is refused outright.
    pub max_failures_per_minute: u32,
    /// JWT verification keys (`edge::jwt`); empty for none.
    pub jwt_hs256_secret_file: String,
    pub jwt_rs256_public_key_file: String,
    pub jwt_es256_public_key_file: String,
}

impl AuthConfig {
    /// Local-only mode: no credentials configured, anonymous clients on loopback only.
    pub fn local_only(&self) -> bool {
        self.password_file.is_empty()
            && self.jwt_hs256_secret_file.is_empty()
            && self.jwt_rs256_public_key_file.is_empty()
            && self.jwt_es256_public_key_file.is_empty()
    }
}

/// Topic rules per role (`edge::acl`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    pub roles: BTreeMap<String, crate::edge::acl::RoleRules>,
}

/// The JSON WebSocket bridge at `/ws` (docs/bridge-protocol.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Bridge sessions at once (each also counts against `limits.max_connections`).
    pub max_sessions: usize,
    /// Topic filters one bridge connection may hold.
    pub max_subscriptions: usize,
    /// Outgoing frames buffered per session; QoS 0 messages over it are dropped.
    pub max_queued_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreConfig {
    pub max_segment_size: usize,
    pub max_segment_count: usize,
    pub max_outgoing_packet_count: u64,
    /// Network threads of the core, each running `accept_loops` loopback listeners and the
    /// connections they accept; core connections take the listeners in turn. Optional (1):
    /// absent in older configs.
    #[serde(default = "one")]
    pub listeners: usize,
    /// Loopback ports per listener thread, each with its own accept loop: rumqttd's accept
    /// loop takes about 1.1 ms per connection, so this multiplies how fast the core accepts.
    /// Optional (16): absent in older configs.
    #[serde(default = "sixteen")]
    pub accept_loops: usize,
    /// Clean core connections kept open ahead of time for clients whose session ends with
    /// their connection (`edge::warm`); 0 = none. Optional (8): absent in older configs.
    #[serde(default = "eight")]
    pub warm_connections: usize,
}

fn eight() -> usize {
    8
}

fn sixteen() -> usize {
    16
}

fn one() -> usize {
    1
}

fn ten() -> u32 {
    10
}

fn sixty() -> u64 {
    60
}

fn thousand() -> u64 {
    1000
}

fn rest_after() -> u64 {
    RestConfig::default().after_secs
}

fn rest_settle() -> u64 {
    RestConfig::default().settle_secs
}

/// The live analytics task (`live`): which devices it tracks and how hard it may work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsConfig {
    pub enabled: bool,
    /// Devices with a monitor in memory; the least recently seen one is evicted beyond this.
    pub max_devices: usize,
    /// Model refits running at once on blocking threads.
    pub max_concurrent_refits: usize,
    /// A prediction is published every this many trend points of a metric.
    pub prediction_every: usize,
    /// The anomaly detector scores a metric's reading only when it comes at least 90% of this
    /// many ms (of the device's time stamps) after the metric's last scored one (0: every
    /// reading); limits, trends and history see every reading.
    #[serde(default)]
    pub score_min_interval_ms: u64,
    /// A metric's readings less than this many ms apart (of the device's time stamps) are
    /// averaged into one trend point (0: every reading is a point).
    #[serde(default = "thousand")]
    pub trend_min_interval_ms: u64,
    /// Safety limits per metric name.
    pub limits: BTreeMap<String, LimitSpec>,
    /// Limits for the devices whose id matches a pattern (`[[analytics.device_limits]]`);
    /// per metric, the first matching entry that names it replaces `limits`.
    #[serde(default)]
    pub device_limits: Vec<DeviceLimitSpec>,
    /// Remaining-useful-life models for the devices whose id matches a pattern
    /// (`[[analytics.rul]]`); the first matching entry applies.
    #[serde(default)]
    pub rul: Vec<RulSpec>,
    /// Running conditions of machines that stop and start (`[[analytics.running]]`): while a
    /// device's machine stands, and for `settle_secs` after it starts, its readings do not feed
    /// the anomaly detector; the first matching entry applies.
    #[serde(default)]
    pub running: Vec<RunningRule>,
    /// A device no running condition names learns its machine's rest: two or more metrics still
    /// together, away from their usual levels, for this many seconds (0: never). While it
    /// stands again, and for `rest_settle_secs` after it starts, its readings do not feed the
    /// anomaly detector.
    #[serde(default = "rest_after")]
    pub rest_after_secs: u64,
    #[serde(default = "rest_settle")]
    pub rest_settle_secs: u64,
    /// A device whose messages stop for this many of its usual intervals (and at least
    /// `silence_min_secs`) gets one alert per silence (0: off).
    #[serde(default = "ten")]
    pub silence_factor: u32,
    #[serde(default = "sixty")]
    pub silence_min_secs: u64,
    /// Overrides of the streaming detector's settings; missing keys keep the crate's defaults.
    #[serde(default)]
    pub detector: DetectorConfig,
}

/// A device id pattern of `[[analytics.device_limits]]` or `[[analytics.rul]]`.
fn check_pattern(key: &'static str, pattern: &str) -> Result<(), ConfigError> {
    check(
        key,
        !pattern.is_empty()
            && pattern.len() <= 256
            && !pattern.chars().any(|c| c.is_control() || "/+#".contains(c)),
        "a device id pattern of 1 to 256 bytes, without control characters, `/`, `+` or `#` (`*` any run of characters, `?` one)",
    )
}

/// Each limit needs a metric name and a finite `above` and/or `below`, `below` under `above`.
fn check_limits(
    key: &'static str,
    limits: &BTreeMap<String, LimitSpec>,
) -> Result<(), ConfigError> {
    for (metric, spec) in limits {
        let (above, below) = spec.bounds();
        let finite = [above, below].iter().flatten().all(|v| v.is_finite());
        let ordered = match (above, below) {
            (Some(a), Some(b)) => b < a,
            (None, None) => false,
            _ => true,
        };
        check(
            key,
            !metric.is_empty() && finite && ordered,
            "each limit needs a metric name and a finite `above` and/or `below` (below < above)",
        )?;
    }
    Ok(())
}

/// One `[[analytics.device_limits]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceLimitSpec {
    /// Device id pattern: `*` any run of characters, `?` one character.
    pub devices: String,
    pub limits: BTreeMap<String, LimitSpec>,
}

/// One `[[analytics.rul]]` entry: a saved remaining-useful-life model for some devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulSpec {
    /// Device id pattern: `*` any run of characters, `?` one character.
    pub devices: String,
    /// The model file (`vigil train-rul`), read at start.
    pub model: PathBuf,
    /// One forecast alert when the estimate falls to this many cycles (0: none).
    #[serde(default)]
    pub alert_below: f64,
}

impl RulSpec {
    /// Reads and checks the model file.
    pub fn load(&self) -> Result<RulModel, ConfigError> {
        let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid {
            key: "analytics.rul.model",
            reason: format!("{}: {e}", self.model.display()),
        };
        let text = std::fs::read_to_string(&self.model).map_err(|e| invalid(&e))?;
        RulModel::from_json(&text).map_err(|e| invalid(&e))
    }
}

/// A metric's safety limit: a bare number is an upper limit, a table may give either side.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "toml::Value")]
pub enum LimitSpec {
    Above(f64),
    Range(LimitRange),
}

#[derive(Debug, Clone)]
pub struct LimitRange {
    pub above: Option<f64>,
    pub below: Option<f64>,
}

impl TryFrom<toml::Value> for LimitSpec {
    type Error = String;

    /// Read by hand rather than as an untagged enum, so a mistake gets a message that names it.
    /// The likely one: `motor.temperature = 85` unquoted, which TOML reads as a table `motor`
    /// holding `temperature`, where the metric `motor.temperature` (read from inside an object,
    /// docs/topics.md) was meant.
    fn try_from(value: toml::Value) -> Result<Self, String> {
        let number = |v: &toml::Value| match v {
            toml::Value::Integer(i) => Some(*i as f64),
            toml::Value::Float(f) => Some(*f),
            _ => None,
        };
        if let Some(x) = number(&value) {
            return Ok(LimitSpec::Above(x));
        }
        let toml::Value::Table(table) = value else {
            return Err(format!(
                "a limit is a number or a table such as {{ above = 20, below = 2 }}, not {value}"
            ));
        };
        let mut range = LimitRange {
            above: None,
            below: None,
        };
        for (key, v) in &table {
            let slot = match key.as_str() {
                "above" => &mut range.above,
                "below" => &mut range.below,
                other => {
                    return Err(format!(
                        "unknown key {other:?} in a limit (expected above or below); a dotted \
                         metric name must be quoted as a whole, e.g. \"<object>.{other}\" = 85"
                    ))
                }
            };
            *slot = Some(number(v).ok_or_else(|| format!("{key} must be a number, not {v}"))?);
        }
        Ok(LimitSpec::Range(range))
    }
}

impl LimitSpec {
    fn bounds(&self) -> (Option<f64>, Option<f64>) {
        match self {
            LimitSpec::Above(v) => (Some(*v), None),
            LimitSpec::Range(r) => (r.above, r.below),
        }
    }
}

impl AnalyticsConfig {
    /// The per-device monitor settings these options describe.
    pub fn monitor_config(&self) -> MonitorConfig {
        let limits = |specs: &BTreeMap<String, LimitSpec>| {
            specs
                .iter()
                .map(|(metric, spec)| {
                    let (above, below) = spec.bounds();
                    MetricLimit {
                        metric: metric.clone(),
                        above,
                        below,
                    }
                })
                .collect()
        };
        MonitorConfig {
            detector: self.detector.clone(),
            limits: limits(&self.limits),
            device_limits: self
                .device_limits
                .iter()
                .map(|d| DeviceLimits {
                    devices: d.devices.clone(),
                    limits: limits(&d.limits),
                })
                .collect(),
            prediction_every: self.prediction_every,
            running: self.running.clone(),
            rest: RestConfig {
                after_secs: self.rest_after_secs,
                settle_secs: self.rest_settle_secs,
            },
            score_min_spacing_ms: i64::try_from(self.score_min_interval_ms).unwrap_or(i64::MAX),
            trend_min_spacing_ms: i64::try_from(self.trend_min_interval_ms).unwrap_or(i64::MAX),
            ..MonitorConfig::default()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check(
            "analytics.max_devices",
            (1..=1_000_000).contains(&self.max_devices),
            "must be between 1 and 1000000",
        )?;
        check(
            "analytics.max_concurrent_refits",
            (1..=64).contains(&self.max_concurrent_refits),
            "must be between 1 and 64",
        )?;
        for (key, secs) in [
            ("analytics.rest_after_secs", self.rest_after_secs),
            ("analytics.rest_settle_secs", self.rest_settle_secs),
        ] {
            check(key, secs <= 86_400, "must be at most 86400 (a day)")?;
        }
        check(
            "analytics.silence_min_secs",
            (1..=30 * 86_400).contains(&self.silence_min_secs),
            "must be between 1 and 2592000 (30 days)",
        )?;
        check(
            "analytics.prediction_every",
            self.prediction_every >= 1,
            "must be at least 1",
        )?;
        for (key, ms) in [
            (
                "analytics.score_min_interval_ms",
                self.score_min_interval_ms,
            ),
            (
                "analytics.trend_min_interval_ms",
                self.trend_min_interval_ms,
            ),
        ] {
            check(key, ms <= 86_400_000, "must be at most 86400000 (a day)")?;
        }
        check_limits("analytics.limits", &self.limits)?;
        for d in &self.device_limits {
            check_pattern("analytics.device_limits.devices", &d.devices)?;
            check_limits("analytics.device_limits.limits", &d.limits)?;
        }
        for r in &self.running {
            check_pattern("analytics.running.devices", &r.devices)?;
            r.validate().map_err(|e| ConfigError::Invalid {
                key: "analytics.running",
                reason: e.to_string(),
            })?;
        }
        for r in &self.rul {
            check_pattern("analytics.rul.devices", &r.devices)?;
            check(
                "analytics.rul.alert_below",
                r.alert_below.is_finite() && r.alert_below >= 0.0,
                "must be a number of cycles, 0 or more (0: no alert)",
            )?;
            r.load()?;
        }
        // The monitor validates its own settings (the detector's above all); building one now
        // turns a bad value into a config error instead of a task that cannot start.
        DeviceMonitor::new("config-check", self.monitor_config()).map_err(|e| {
            ConfigError::Invalid {
                key: "analytics.detector",
                reason: e.to_string(),
            }
        })?;
        Ok(())
    }
}

impl Config {
    /// The embedded default.
    pub fn default_config() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_TOML, "built-in default")
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: format!(" in {origin}"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        if r.enabled() {
            check(
                "redis.url",
                crate::redis_link::check_url(&r.url, r.cluster),
                "must be a redis:// URL, or with `cluster = true` a comma-separated list of them (TLS to Redis, rediss://, is not built in)",
            )?;
        }
        check(
            "redis.instance_id",
            r.instance_id.len() <= 64
                && r.instance_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "at most 64 characters of [A-Za-z0-9_.-]",
        )?;
        check(
            "redis.key_prefix",
            !r.key_prefix.is_empty() && r.key_prefix.len() <= 64,
            "must be 1 to 64 characters",
        )?;
        check(
            "redis.stream_maxlen",
            r.stream_maxlen >= 1000,
            "must be at least 1000",
        )?;
        check(
            "redis.outbox_max_messages",
            r.outbox_max_messages >= 100,
            "must be at least 100",
        )?;
        check(
            "redis.outbox_max_bytes",
            r.outbox_max_bytes >= self.limits.max_packet_size,
            "must be at least limits.max_packet_size",
        )?;
        let h = &self.history;
        check(
            "history.points_per_device",
            h.points_per_device <= 1_000_000,
            "must be at most 1000000",
        )?;
        check(
            "history.max_devices",
            (1..=1_000_000).contains(&h.max_devices),
            "must be between 1 and 1000000",
        )?;
        check(
            "history.snapshot_interval_secs",
            h.snapshot_interval_secs >= 1,
            "must be at least 1",
        )?;
        check(
            "persistence.autosave_interval_secs",
            self.persistence.autosave_interval_secs >= 1,
            "must be at least 1",
        )?;
        check(
            "persistence.drain_secs",
            self.persistence.drain_secs <= 3600,
            "must be at most 3600",
        )?;
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_redis()?;
        let l = &self.limits;
        check(
            "limits.max_connections",
            l.max_connections >= 1 && l.max_connections <= 1_000_000,
            "must be between 1 and 1000000",
        )?;
        check(
            "limits.max_packet_size",
            l.max_packet_size >= 64 && l.max_packet_size <= MQTT_MAX_REMAINING_LENGTH,
            "must be between 64 and 268435455 bytes",
        )?;
        check(
            "limits.handshake_timeout_ms",
            l.handshake_timeout_ms >= 100 && l.handshake_timeout_ms <= 600_000,
            "must be between 100 and 600000",
        )?;
        check(
            "limits.max_client_id_len",
            l.max_client_id_len >= 23 && l.max_client_id_len <= 65_535,
            "must be between 23 (the MQTT 3.1.1 minimum) and 65535",
        )?;
        check(
            "limits.write_stall_timeout_ms",
            l.write_stall_timeout_ms >= 100,
            "must be at least 100",
        )?;
        check(
            "limits.max_connections_per_ip",
            l.max_connections_per_ip >= 1,
            "must be at least 1",
        )?;
        check(
            "limits.max_topic_length",
            // One byte below MQTT's limit: the core may need one more (`mqtt::CORE_ESCAPE`).
            (1..=65_534).contains(&l.max_topic_length),
            "must be between 1 and 65534",
        )?;
        check(
            "limits.max_topic_levels",
            l.max_topic_levels >= 1,
            "must be at least 1",
        )?;
        check(
            "limits.max_subscriptions",
            l.max_subscriptions >= 1,
            "must be at least 1",
        )?;
        check(
            "limits.max_distinct_filters",
            (1..=10_000_000).contains(&l.max_distinct_filters),
            "must be between 1 and 10000000",
        )?;
        check(
            "limits.max_distinct_topics",
            (1..=100_000_000).contains(&l.max_distinct_topics),
            "must be between 1 and 100000000",
        )?;
        check(
            "limits.max_persistent_sessions",
            (1..=10_000_000).contains(&l.max_persistent_sessions),
            "must be between 1 and 10000000",
        )?;
        check(
            "limits.persistent_session_expiry_secs",
            l.persistent_session_expiry_secs <= u32::MAX as u64,
            "must be between 0 and 4294967295",
        )?;
        check(
            "limits.topic_aliases",
            l.topic_aliases <= 1024,
            "must be between 0 and 1024",
        )?;
        check(
            "limits.max_retained_bytes",
            (1024..=1 << 40).contains(&l.max_retained_bytes),
            "must be between 1024 and 1099511627776",
        )?;
        crate::edge::acl::Acl::new(&self.acl.roles).map_err(|e| ConfigError::Invalid {
            key: "acl.roles",
            reason: e.to_string(),
        })?;
        check(
            "auth.max_failures_per_minute",
            self.auth.max_failures_per_minute >= 1,
            "must be at least 1",
        )?;
        check(
            "acl.roles",
            self.acl
                .roles
                .contains_key(crate::edge::policy::DEFAULT_ROLE),
            "a `device` role is required (the role of password-file users without one)",
        )?;
        for origin in &self.http.allowed_origins {
            check(
                "http.allowed_origins",
                origin.starts_with("http://") || origin.starts_with("https://"),
                "each origin must start with http:// or https://",
            )?;
        }
        let b = &self.bridge;
        check(
            "bridge.max_sessions",
            (1..=1_000_000).contains(&b.max_sessions),
            "must be between 1 and 1000000",
        )?;
        check(
            "bridge.max_subscriptions",
            (1..=100_000).contains(&b.max_subscriptions),
            "must be between 1 and 100000",
        )?;
        check(
            "bridge.max_queued_bytes",
            (4096..=1 << 30).contains(&b.max_queued_bytes),
            "must be between 4096 and 1073741824",
        )?;
        let c = &self.core;
        check(
            "core.max_segment_size",
            c.max_segment_size >= 64 * 1024 && c.max_segment_size >= l.max_packet_size,
            "must be at least 65536 and at least limits.max_packet_size",
        )?;
        check(
            "core.max_segment_count",
            (1..=1000).contains(&c.max_segment_count),
            "must be between 1 and 1000",
        )?;
        check(
            "core.max_outgoing_packet_count",
            (1..=100_000).contains(&c.max_outgoing_packet_count),
            "must be between 1 and 100000",
        )?;
        check(
            "core.listeners",
            (1..=64).contains(&c.listeners),
            "must be between 1 and 64",
        )?;
        check(
            "core.accept_loops",
            (1..=64).contains(&c.accept_loops),
            "must be between 1 and 64",
        )?;
        check(
            "core.warm_connections",
            c.warm_connections <= 1024,
            "must be between 0 (none) and 1024",
        )?;
        check(
            "runtime.connection_threads",
            self.runtime.connection_threads <= 256,
            "must be between 0 (one per core) and 256",
        )?;
        self.analytics.validate()?;
        self.tls.validate_tls()?;
        Ok(())
    }
}

fn check(key: &'static str, ok: bool, reason: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        })
    }
}

/// TLS for MQTT (`mqtt_listen`) and for the web port (`https`), served by `edge::tls`. The
/// files are read at start, not here, so `check-config` needs no access to private keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the MQTT-over-TLS listener; empty for none.
    pub mqtt_listen: String,
    /// The web port speaks TLS (HTTPS, WSS) instead of plain HTTP.
    pub https: bool,
    /// Certificate chain, server certificate first (PEM).
    pub cert_file: String,
    /// The server certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// CA certificates that sign client certificates (PEM); needs `client_certs` on.
    pub client_ca_file: String,
    pub client_certs: ClientCerts,
}

/// Whether clients authenticate with a certificate, whose common name is then their user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCerts {
    /// No certificate is asked for.
    Off,
    /// A certificate is asked for; a client without one authenticates as usual.
    Optional,
    /// The TLS handshake fails without a certificate signed by `client_ca_file`.
    Required,
}

impl TlsConfig {
    /// The MQTT/TLS listener's address, when one is configured.
    pub fn mqtt_listen_addr(&self) -> Option<SocketAddr> {
        self.mqtt_listen.parse().ok()
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        check(
            "tls.mqtt_listen",
            self.mqtt_listen.is_empty() || self.mqtt_listen_addr().is_some(),
            "must be empty (no MQTT/TLS listener) or an address such as \"0.0.0.0:8883\"",
        )?;
        let serving = !self.mqtt_listen.is_empty() || self.https;
        for (key, file) in [
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        ] {
            check(
                key,
                !serving || !file.is_empty(),
                "a file is required when tls.mqtt_listen or tls.https is set",
            )?;
        }
        check(
            "tls.client_ca_file",
            (self.client_certs == ClientCerts::Off) == self.client_ca_file.is_empty(),
            "required exactly when tls.client_certs is \"optional\" or \"required\"",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_value_replaces_adds_and_keeps_the_rest() {
        let text = "# top\n[a]\nx = 1\n# note\ny = 2\n[b]\nx = 3\n";
        assert_eq!(
            set_value(text, "a", "x", "10"),
            "# top\n[a]\nx = 10\n# note\ny = 2\n[b]\nx = 3\n"
        );
        // A key missing from its section goes at the section's end; `xx` is not `x`.
        assert_eq!(
            set_value("[a]\nxx = 1\n[b]\n", "a", "x", "2"),
            "[a]\nxx = 1\nx = 2\n[b]\n"
        );
        assert_eq!(
            set_value("[a]\n", "c", "k", "\"v\""),
            "[a]\n\n[c]\nk = \"v\"\n"
        );
        let default = set_value(DEFAULT_TOML, "redis", "url", "\"redis://127.0.0.1:1\"");
        assert!(Config::parse(&default, "test").is_ok());
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::default_config().expect("default config parses");
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.http.listen.port(), 8080);
        assert!(c.auth.local_only());
    }

    #[test]
    fn device_limits_by_pattern() {
        let text = format!(
            "{DEFAULT_TOML}\n[[analytics.device_limits]]\ndevices = \"MOTOR-*\"\n\
             limits = {{ temperature = 95.0, current = {{ above = 20, below = 2 }} }}\n"
        );
        let c = Config::parse(&text, "test").expect("parses");
        let limits = c.analytics.monitor_config().limits_of("MOTOR-3");
        let of = |m: &str| {
            limits
                .iter()
                .find(|l| l.metric == m)
                .map(|l| (l.above, l.below))
        };
        assert_eq!(of("temperature"), Some((Some(95.0), None)));
        assert_eq!(of("current"), Some((Some(20.0), Some(2.0))));
        assert_eq!(
            of("vibration"),
            Some((Some(7.1), None)),
            "the general one stays"
        );
        let pump = c.analytics.monitor_config().limits_of("PUMP-3");
        assert_eq!(pump.len(), 2);
        for bad in [
            "devices = \"\"\nlimits = { t = 1.0 }",
            "devices = \"a/b\"\nlimits = { t = 1.0 }",
            "devices = \"a*\"\nlimits = { t = { above = 1, below = 2 } }",
        ] {
            let text = format!("{DEFAULT_TOML}\n[[analytics.device_limits]]\n{bad}\n");
            let err = Config::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains("analytics.device_limits"), "{err}");
        }
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let text = DEFAULT_TOML.replace("max_connections =", "max_conections =");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let text = format!("{DEFAULT_TOML}\n[mqt]\nlisten = \"0.0.0.0:1\"\n");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("mqt"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let text = DEFAULT_TOML.replace("max_packet_size = 1048576", "max_packet_size = 3");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("limits.max_packet_size"), "{err}");

        let text = DEFAULT_TOML.replace("\"0.0.0.0:1883\"", "\"nowhere:1883\"");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");

        let text = DEFAULT_TOML.replace("drain_secs = 3", "drain_secs = 100000");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("persistence.drain_secs"), "{err}");
    }

    #[test]
    fn runtime_section_is_optional_and_bounded() {
        let c = Config::default_config().expect("default config parses");
        assert_eq!(c.runtime.connection_threads, 0);
        assert!(c.runtime.connection_threads() >= 1);

        let (head, tail) = DEFAULT_TOML
            .split_once("[runtime]")
            .expect("the default has a [runtime] section");
        let rest = tail.split_once("\n[").map_or("", |(_, r)| r);
        let without = format!("{head}[{rest}");
        let c = Config::parse(&without, "test").expect("a config without [runtime] parses");
        assert_eq!(c.runtime.connection_threads, 0);

        let three = DEFAULT_TOML.replace("connection_threads = 0", "connection_threads = 3");
        let c = Config::parse(&three, "test").expect("3 threads parse");
        assert_eq!(c.runtime.connection_threads(), 3);

        let many = DEFAULT_TOML.replace("connection_threads = 0", "connection_threads = 1000");
        let err = Config::parse(&many, "test").unwrap_err().to_string();
        assert!(err.contains("runtime.connection_threads"), "{err}");
    }

    #[test]
    fn core_thread_and_connection_settings_have_defaults_and_bounds() {
        type Get = fn(&Config) -> usize;
        let keys: [(&str, usize, Get, [&str; 2]); 3] = [
            ("listeners", 1, |c| c.core.listeners, ["0", "65"]),
            ("accept_loops", 16, |c| c.core.accept_loops, ["0", "65"]),
            (
                "warm_connections",
                8,
                |c| c.core.warm_connections,
                ["1025", "100000"],
            ),
        ];
        for (key, default, get, bads) in keys {
            assert_eq!(get(&Config::default_config().expect("default")), default);
            let line = format!("{key} = {default}");
            assert!(DEFAULT_TOML.contains(&format!("\n{line}\n")), "{line}");
            let absent = DEFAULT_TOML.replace(&format!("\n{line}\n"), "\n");
            let c = Config::parse(&absent, "test").expect("a config without it parses");
            assert_eq!(get(&c), default, "{key} absent");
            for bad in bads {
                let text = DEFAULT_TOML.replace(&line, &format!("{key} = {bad}"));
                let err = Config::parse(&text, "test").unwrap_err().to_string();
                assert!(err.contains(&format!("core.{key}")), "{err}");
            }
        }
    }

    #[test]
    fn missing_key_is_an_error() {
        let text = DEFAULT_TOML.replace("max_client_id_len = 256", "");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("max_client_id_len"), "{err}");
    }

    #[test]
    fn analytics_section_maps_to_the_monitor_and_rejects_typos() {
        let c = Config::default_config().expect("default config parses");
        assert!(c.analytics.enabled);
        let m = c.analytics.monitor_config();
        let t = m.limits.iter().find(|l| l.metric == "temperature");
        assert_eq!(t.and_then(|l| l.above), Some(85.0));

        let text = DEFAULT_TOML.replace("max_devices =", "max_device =");
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("max_device"), "{err}");

        let text = DEFAULT_TOML.replace(
            "[analytics.detector]\n",
            "[analytics.detector]\nwarmpu = 64\n",
        );
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("warmpu"), "{err}");

        let text = DEFAULT_TOML.replace(
            "[analytics.detector]\n",
            "[analytics.detector]\nwarmup = 3\n",
        );
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("analytics.detector"), "{err}");

        let text = DEFAULT_TOML.replace(
            "limits = { temperature = 85.0, vibration = 7.1 }",
            "limits = { pressure = { below = 2.0, above = 1.0 } }",
        );
        let err = Config::parse(&text, "test").unwrap_err().to_string();
        assert!(err.contains("analytics.limits"), "{err}");

        let text = DEFAULT_TOML.replace(
            "limits = { temperature = 85.0, vibration = 7.1 }",
            "limits = { pressure = { below = 1.0 } }",
        );
        let c = Config::parse(&text, "test").expect("lower limit");
        assert_eq!(c.analytics.monitor_config().limits[0].below, Some(1.0));
    }

    #[test]
    fn trends_follow_time_by_default_scoring_every_reading_and_both_are_bounded() {
        let c = Config::default_config().expect("default config parses");
        let m = c.analytics.monitor_config();
        assert_eq!((m.trend_min_spacing_ms, m.score_min_spacing_ms), (1000, 0));
        let on = DEFAULT_TOML
            .replace(
                "trend_min_interval_ms = 1000\n",
                "trend_min_interval_ms = 0\n",
            )
            .replace(
                "score_min_interval_ms = 0\n",
                "score_min_interval_ms = 2000\n",
            );
        let m = Config::parse(&on, "test")
            .expect("fast-device settings")
            .analytics
            .monitor_config();
        assert_eq!((m.trend_min_spacing_ms, m.score_min_spacing_ms), (0, 2000));
        // A configuration written before the trend setting existed gets its default.
        let older = DEFAULT_TOML.replace("trend_min_interval_ms = 1000\n", "");
        let m = Config::parse(&older, "test")
            .expect("without the trend setting")
            .analytics
            .monitor_config();
        assert_eq!(m.trend_min_spacing_ms, 1000);
        let too_long = DEFAULT_TOML.replace(
            "score_min_interval_ms = 0",
            "score_min_interval_ms = 86400001",
        );
        let err = Config::parse(&too_long, "test").unwrap_err().to_string();
        assert!(err.contains("analytics.score_min_interval_ms"), "{err}");
    }

    #[test]
    fn rest_learning_is_read_and_bounded() {
        let c = Config::default_config().expect("default config parses");
        assert_eq!(c.analytics.monitor_config().rest, RestConfig::default());
        let off = DEFAULT_TOML.replace("rest_after_secs = 600\n", "rest_after_secs = 0\n");
        let m = Config::parse(&off, "test")
            .expect("off")
            .analytics
            .monitor_config();
        assert_eq!(m.rest.after_secs, 0);
        let older = DEFAULT_TOML.replace("rest_settle_secs = 60\n", "");
        let m = Config::parse(&older, "test")
            .expect("older")
            .analytics
            .monitor_config();
        assert_eq!(m.rest.settle_secs, RestConfig::default().settle_secs);
        let long = DEFAULT_TOML.replace("rest_settle_secs = 60\n", "rest_settle_secs = 86401\n");
        let err = Config::parse(&long, "test").unwrap_err().to_string();
        assert!(err.contains("analytics.rest_settle_secs"), "{err}");
    }

    #[test]
    fn running_conditions_are_read_and_a_bad_one_is_named() {
        let with = |entry: &str| format!("{DEFAULT_TOML}\n[[analytics.running]]\n{entry}\n");
        let c = Config::parse(
            &with("devices = \"MOTOR-*\"\nmetric = \"current\"\nabove = 1.0\nsettle_secs = 600"),
            "test",
        )
        .expect("a running condition");
        let m = c.analytics.monitor_config();
        assert_eq!(m.running.len(), 1);
        assert_eq!(
            (
                m.running[0].above,
                m.running[0].below,
                m.running[0].settle_secs
            ),
            (Some(1.0), None, 600)
        );
        for (entry, key) in [
            (
                "devices = \"M*\"\nmetric = \"current\"",
                "analytics.running",
            ),
            (
                "devices = \"M*\"\nmetric = \"\"\nabove = 1",
                "analytics.running",
            ),
            (
                "devices = \"M*\"\nmetric = \"c\"\nabove = 1\nsettle_secs = 86401",
                "analytics.running",
            ),
            (
                "devices = \"\"\nmetric = \"c\"\nabove = 1",
                "analytics.running.devices",
            ),
        ] {
            let err = Config::parse(&with(entry), "test").unwrap_err().to_string();
            assert!(err.contains(key), "{entry}: {err}");
        }
        let err = Config::parse(
            &with("devices = \"M*\"\nmetric = \"c\"\nabove = 1\nsettle = 5"),
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("settle"), "{err}");
    }

    #[test]
    fn limits_for_dotted_metric_names_are_quoted_and_a_mistake_is_explained() {
        let with = |limits: &str| {
            DEFAULT_TOML.replace(
                "limits = { temperature = 85.0, vibration = 7.1 }",
                &format!("limits = {limits}"),
            )
        };
        let c = Config::parse(
            &with(r#"{ "motor.temperature" = 85, rpm = { above = 3600, below = 300.5 } }"#),
            "test",
        )
        .expect("quoted dotted name, integers and floats");
        let m = c.analytics.monitor_config();
        let bounds: Vec<_> = m
            .limits
            .iter()
            .map(|l| (l.metric.as_str(), l.above, l.below))
            .collect();
        assert_eq!(
            bounds,
            [
                ("motor.temperature", Some(85.0), None),
                ("rpm", Some(3600.0), Some(300.5))
            ]
        );
        let err = Config::parse(&with("{ motor.temperature = 85 }"), "test")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"unknown key "temperature""#) && err.contains("must be quoted"),
            "{err}"
        );
        let err = Config::parse(&with(r#"{ rpm = { above = "high" } }"#), "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("above must be a number"), "{err}");
        let err = Config::parse(&with(r#"{ rpm = "high" }"#), "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a limit is a number or a table"), "{err}");
    }
}
