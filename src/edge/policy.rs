//! Edge policies in one place: who may connect, under which identity, what they may do, with
//! which limits. The connection code only asks this module questions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::sync::Semaphore;

use super::acl::{Acl, AclError, Rates, Subject};
use super::jwt::{JwtError, JwtVerifier};
use super::limits::{IpSlot, PerIp};
use super::passwd::{self, PasswdError, PasswordDb};
use crate::config::Config;

pub use super::passwd::DEFAULT_ROLE;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Passwd(#[from] PasswdError),
    #[error("invalid ACL: {0}")]
    Acl(#[from] AclError),
    #[error(transparent)]
    Jwt(#[from] JwtError),
    #[error("user `{user}` has role `{role}`, which [acl.roles] does not define")]
    UnknownRole { user: String, role: String },
}

/// Who a connection is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name (the device id for devices); empty for anonymous local-only clients.
    pub user: String,
    pub role: String,
}

/// What a CONNECT (or a bridge `connect`) presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The common name of a client certificate the TLS layer verified against the configured
    /// client CA: an identity proven by the handshake.
    pub tls_cn: Option<&'a str>,
}

/// Failed logins remembered per address, to slow down guessing.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; the oldest windows are forgotten beyond it.
const MAX_TRACKED_ADDRESSES: usize = 10_000;
/// Password verifications running at once (each takes ~19 MiB and tens of milliseconds).
const CONCURRENT_VERIFICATIONS: usize = 4;

pub struct Policy {
    password_file: Option<PathBuf>,
    passwords: RwLock<Arc<PasswordDb>>,
    jwt: JwtVerifier,
    acl: Acl,
    verifications: Semaphore,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    max_failures_per_minute: u32,
    per_ip: Arc<PerIp>,
    pub max_client_id_len: usize,
    pub max_packet_size: usize,
    pub max_keepalive_secs: u16,
    pub max_topic_length: usize,
    pub max_topic_levels: usize,
    pub max_subscriptions: usize,
}

impl Policy {
    pub fn new(config: &Config) -> Result<Policy, PolicyError> {
        let acl = Acl::new(&config.acl.roles)?;
        let password_file = (!config.auth.password_file.is_empty())
            .then(|| PathBuf::from(&config.auth.password_file));
        let passwords = match &password_file {
            Some(path) => PasswordDb::load(path)?,
            None => PasswordDb::default(),
        };
        let a = &config.auth;
        let jwt = JwtVerifier::load(
            &a.jwt_hs256_secret_file,
            &a.jwt_rs256_public_key_file,
            &a.jwt_es256_public_key_file,
        )?;
        let policy = Policy {
            password_file,
            passwords: RwLock::new(Arc::new(PasswordDb::default())),
            jwt,
            acl,
            verifications: Semaphore::new(CONCURRENT_VERIFICATIONS),
            failures: Mutex::new(HashMap::new()),
            max_failures_per_minute: config.auth.max_failures_per_minute,
            per_ip: Arc::new(PerIp::new(config.limits.max_connections_per_ip)),
            max_client_id_len: config.limits.max_client_id_len,
            max_packet_size: config.limits.max_packet_size,
            max_keepalive_secs: config.limits.max_keepalive_secs,
            max_topic_length: config.limits.max_topic_length,
            max_topic_levels: config.limits.max_topic_levels,
            max_subscriptions: config.limits.max_subscriptions,
        };
        policy.install(passwords)?;
        Ok(policy)
    }

    /// Local-only mode: no credentials, anonymous clients, no ACLs.
    pub fn local_only(&self) -> bool {
        self.password_file.is_none() && !self.jwt.is_configured()
    }

    /// Reads the password file again (SIGHUP). Connections stay; new CONNECTs see the new
    /// file. On error the old file stays in force. Returns the number of users.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let Some(path) = &self.password_file else {
            return Ok(0);
        };
        let db = PasswordDb::load(path)?;
        let users = db.len();
        self.install(db)?;
        Ok(users)
    }

    fn install(&self, db: PasswordDb) -> Result<(), PolicyError> {
        if let Some((user, role)) = db.roles().find(|(_, role)| !self.acl.has_role(role)) {
            return Err(PolicyError::UnknownRole {
                user: user.to_string(),
                role: role.to_string(),
            });
        }
        *self.passwords.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(db);
        Ok(())
    }

    /// Authenticates a client. `Err` carries the reason for the log; the client is told only
    /// "not authorized". Password checks run on the blocking pool, a few at a time, and an
    /// address with too many recent failures is refused without one.
    pub async fn authenticate(
        &self,
        peer: IpAddr,
        creds: Credentials<'_>,
    ) -> Result<Identity, &'static str> {
        if self.local_only() {
            return Ok(Identity {
                user: creds.username.unwrap_or_default().to_string(),
                role: "admin".to_string(),
            });
        }
        if self.recent_failures(peer) >= self.max_failures_per_minute {
            return Err("too many failed logins from this address");
        }
        let result = self.check(creds).await;
        if result.is_err() {
            self.record_failure(peer);
        }
        result
    }

    async fn check(&self, creds: Credentials<'_>) -> Result<Identity, &'static str> {
        let db = self
            .passwords
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(cn) = creds.tls_cn {
            if creds.username.is_some_and(|u| u != cn) {
                return Err("user name differs from the certificate's common name");
            }
            let role = db.get(cn).map_or(DEFAULT_ROLE, |e| e.role.as_str());
            return Ok(Identity {
                user: cn.to_string(),
                role: role.to_string(),
            });
        }
        if let Some(token) = creds
            .password
            .filter(|p| self.jwt.is_configured() && JwtVerifier::looks_like_token(p))
        {
            let t = self.jwt.verify(token)?;
            if creds.username.is_some_and(|u| !u.is_empty() && u != t.user) {
                return Err("user name differs from the token's `sub`");
            }
            let role = t.role.unwrap_or_else(|| DEFAULT_ROLE.to_string());
            if !self.acl.has_role(&role) {
                return Err("token role is not one of [acl.roles]");
            }
            return Ok(Identity { user: t.user, role });
        }
        let (Some(user), Some(password)) = (creds.username, creds.password) else {
            return Err("no credentials");
        };
        let entry = db.get(user);
        // An unknown user costs a verification too, so timing does not reveal which users
        // exist.
        // (The decoy is hashed once, on first use: on the blocking pool too.)
        let hash = entry.map(|e| e.hash.clone());
        let password = password.to_vec();
        let Ok(_permit) = self.verifications.acquire().await else {
            return Err("shutting down");
        };
        let matches = tokio::task::spawn_blocking(move || {
            let hash: &str = match &hash {
                Some(h) => h,
                None => passwd::decoy_hash(),
            };
            passwd::verify(hash, &password)
        })
        .await
        .unwrap_or(false);
        match (entry, matches) {
            (Some(e), true) => Ok(Identity {
                user: user.to_string(),
                role: e.role.clone(),
            }),
            (Some(_), false) => Err("wrong password"),
            (None, _) => Err("unknown user"),
        }
    }

    fn recent_failures(&self, peer: IpAddr) -> u32 {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failures.get(&peer) {
            Some(&(since, n)) if since.elapsed() < FAILURE_WINDOW => n,
            _ => 0,
        }
    }

    fn record_failure(&self, peer: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_ADDRESSES && !failures.contains_key(&peer) {
            failures.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED_ADDRESSES {
                // Under a flood from many addresses, forget them all rather than grow.
                failures.clear();
            }
        }
        let now = Instant::now();
        let slot = failures.entry(peer).or_insert((now, 0));
        if slot.0.elapsed() >= FAILURE_WINDOW {
            *slot = (now, 0);
        }
        slot.1 += 1;
    }

    /// Whether `who` may publish to `topic`. Everything is allowed in local-only mode.
    pub fn may_publish(&self, who: &Identity, client_id: &str, topic: &[u8]) -> bool {
        self.local_only() || self.acl.may_publish(&subject(who, client_id), topic)
    }

    /// Whether `who` may subscribe to `filter`.
    pub fn may_subscribe(&self, who: &Identity, client_id: &str, filter: &[u8]) -> bool {
        self.local_only() || self.acl.may_subscribe(&subject(who, client_id), filter)
    }

    /// The publish rate limits of `who` (none in local-only mode).
    pub fn rates(&self, who: &Identity) -> Rates {
        if self.local_only() {
            return Rates::default();
        }
        self.acl.rates(&who.role)
    }

    /// A connection slot for the address, or `None` when it has `max_connections_per_ip`.
    pub fn ip_slot(&self, ip: IpAddr) -> Option<IpSlot> {
        self.per_ip.acquire(ip)
    }

    /// Whether a topic name or filter is within the length and level limits.
    pub fn topic_within_limits(&self, topic: &[u8]) -> bool {
        topic.len() <= self.max_topic_length
            && topic.iter().filter(|&&b| b == b'/').count() < self.max_topic_levels
    }

    /// Checks a client identifier; `Err` carries the reason for the log.
    pub fn check_client_id(&self, id: &str) -> Result<(), &'static str> {
        if id.len() > self.max_client_id_len {
            return Err("client id too long");
        }
        if id.chars().any(char::is_control) {
            return Err("control character in client id");
        }
        Ok(())
    }

    /// The keep-alive the edge enforces, and whether it differs from the client's request
    /// (then MQTT 5 clients are told with Server Keep Alive).
    pub fn keep_alive(&self, requested: u16) -> (u16, bool) {
        let cap = self.max_keepalive_secs;
        if cap > 0 && (requested == 0 || requested > cap) {
            (cap, true)
        } else {
            (requested, false)
        }
    }
}

fn subject<'a>(who: &'a Identity, client_id: &'a str) -> Subject<'a> {
    Subject {
        user: &who.user,
        client_id,
        role: &who.role,
    }
}

/// A client id generated for a client that sent none (MQTT-3.1.3-6).
pub fn generate_client_id() -> String {
    let mut bytes = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("vigil-{hex}")
}

/// Maps a client's id to the id the core sees. rumqttd poisons its listener when a client id
/// containing `/`, `+`, `#` or `$` connects twice, so every byte outside `[A-Za-z0-9_-]` is
/// escaped as `.XX`; the mapping is injective, and the `c-` prefix keeps client ids apart from
/// vigil's internal ones (`i-`).
pub fn core_client_id(id: &str) -> String {
    let mut out = String::with_capacity(2 + id.len());
    out.push_str("c-");
    for &b in id.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push('.');
            out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
            out.push(char::from_digit((b & 0xF) as u32, 16).unwrap_or('0'));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::snapshot::TestDir;

    #[test]
    fn core_ids_are_safe_and_injective() {
        let ids = ["a/b", "a.2fb", "+", "#", "$SYS", "", "dev-1", "ü", "a b"];
        let mapped: Vec<String> = ids.iter().map(|i| core_client_id(i)).collect();
        for m in &mapped {
            assert!(!m.contains(['/', '+', '#', '$']), "{m}");
        }
        let mut unique = mapped.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), mapped.len());
        assert_eq!(core_client_id("dev-1"), "c-dev-1");
    }

    /// The default config with a password file of `lines` in `dir`.
    fn config_with_passwords(dir: &TestDir, lines: &[(&str, &str, &str)]) -> Config {
        let path = dir.join("passwords");
        for (user, pw, role) in lines {
            passwd::add(&path, user, pw.as_bytes(), role).unwrap();
        }
        let mut config = Config::default_config().unwrap();
        config.auth.password_file = path.to_string_lossy().into_owned();
        config
    }

    fn creds<'a>(user: &'a str, pw: &'a [u8]) -> Credentials<'a> {
        Credentials {
            username: Some(user),
            password: Some(pw),
            tls_cn: None,
        }
    }

    #[tokio::test]
    async fn password_file_users_and_roles() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let open = Policy::new(&Config::default_config().unwrap()).unwrap();
        assert!(open.local_only());
        assert!(open.authenticate(ip, Credentials::default()).await.is_ok());

        let dir = TestDir::new("policy-users-and-roles");
        let p = Policy::new(&config_with_passwords(
            &dir,
            &[("m1", "pw", "device"), ("ui", "view", "viewer")],
        ))
        .unwrap();
        let id = p.authenticate(ip, creds("m1", b"pw")).await.unwrap();
        assert_eq!((id.user.as_str(), id.role.as_str()), ("m1", "device"));
        assert_eq!(
            p.authenticate(ip, creds("ui", b"view")).await.unwrap().role,
            "viewer"
        );
        assert_eq!(
            p.authenticate(ip, creds("m1", b"px")).await,
            Err("wrong password")
        );
        assert_eq!(
            p.authenticate(ip, creds("nobody", b"pw")).await,
            Err("unknown user")
        );
        assert_eq!(
            p.authenticate(ip, Credentials::default()).await,
            Err("no credentials")
        );
        // A verified certificate is an identity of its own; a different user name is not.
        let cert = Credentials {
            tls_cn: Some("m1"),
            ..Credentials::default()
        };
        assert_eq!(p.authenticate(ip, cert).await.unwrap().role, "device");
        let mismatch = Credentials {
            username: Some("ui"),
            tls_cn: Some("m1"),
            ..Credentials::default()
        };
        assert!(p.authenticate(ip, mismatch).await.is_err());
        // ACL decisions follow the role.
        assert!(p.may_publish(&id, "c", b"device/m1/telemetry"));
        assert!(!p.may_publish(&id, "c", b"device/m2/telemetry"));
    }

    #[tokio::test]
    async fn failures_per_address_are_limited() {
        let dir = TestDir::new("policy-failures");
        let mut config = config_with_passwords(&dir, &[("m1", "pw", "device")]);
        config.auth.max_failures_per_minute = 2;
        let p = Policy::new(&config).unwrap();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            assert_eq!(
                p.authenticate(ip, creds("m1", b"no")).await,
                Err("wrong password")
            );
        }
        // Even the right password is refused until the window passes; other addresses are not
        // affected.
        assert!(p.authenticate(ip, creds("m1", b"pw")).await.is_err());
        let other: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(p.authenticate(other, creds("m1", b"pw")).await.is_ok());
    }

    #[test]
    fn unknown_roles_are_refused() {
        let dir = TestDir::new("policy-unknown-role");
        let config = config_with_passwords(&dir, &[("m1", "pw", "ghost")]);
        assert!(matches!(
            Policy::new(&config),
            Err(PolicyError::UnknownRole { .. })
        ));
    }

    #[test]
    fn keep_alive_cap() {
        let mut config = Config::default_config().unwrap();
        config.limits.max_keepalive_secs = 60;
        let p = Policy::new(&config).unwrap();
        assert_eq!(p.keep_alive(30), (30, false));
        assert_eq!(p.keep_alive(0), (60, true));
        assert_eq!(p.keep_alive(600), (60, true));
    }
}
