//! Edge policies in one place: who may connect, under which identity, with which limits.
//!
//! The security work extends this module (password files, tokens, ACLs, rate limits); the
//! connection code only asks it questions.

use std::collections::BTreeMap;

use rand::RngCore;

use crate::config::Config;

/// Outcome of checking a CONNECT's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Allowed,
    /// No credentials, or wrong ones. The client is told only "not authorized".
    Denied(&'static str),
}

#[derive(Debug, Clone)]
pub struct Policy {
    users: BTreeMap<String, String>,
    pub max_client_id_len: usize,
    pub max_packet_size: usize,
    pub max_keepalive_secs: u16,
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy {
            users: config.auth.users.clone(),
            max_client_id_len: config.limits.max_client_id_len,
            max_packet_size: config.limits.max_packet_size,
            max_keepalive_secs: config.limits.max_keepalive_secs,
        }
    }

    /// Anonymous clients are accepted only when no credentials are configured (local-only
    /// mode, where every listener is bound to loopback).
    pub fn authenticate(&self, username: Option<&str>, password: Option<&[u8]>) -> AuthOutcome {
        if self.users.is_empty() {
            return AuthOutcome::Allowed;
        }
        let (Some(user), Some(password)) = (username, password) else {
            return AuthOutcome::Denied("no credentials");
        };
        match self.users.get(user) {
            Some(expected) if constant_time_eq(expected.as_bytes(), password) => {
                AuthOutcome::Allowed
            }
            Some(_) => AuthOutcome::Denied("wrong password"),
            None => AuthOutcome::Denied("unknown user"),
        }
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

    #[test]
    fn auth_local_only_and_with_users() {
        let mut config = Config::default_config().unwrap();
        let open = Policy::new(&config);
        assert_eq!(open.authenticate(None, None), AuthOutcome::Allowed);
        config.auth.users.insert("dev".into(), "pw".into());
        let p = Policy::new(&config);
        assert_eq!(
            p.authenticate(Some("dev"), Some(b"pw")),
            AuthOutcome::Allowed
        );
        assert!(matches!(
            p.authenticate(Some("dev"), Some(b"px")),
            AuthOutcome::Denied(_)
        ));
        assert!(matches!(p.authenticate(None, None), AuthOutcome::Denied(_)));
        assert!(matches!(
            p.authenticate(Some("x"), Some(b"pw")),
            AuthOutcome::Denied(_)
        ));
    }

    #[test]
    fn keep_alive_cap() {
        let mut config = Config::default_config().unwrap();
        config.limits.max_keepalive_secs = 60;
        let p = Policy::new(&config);
        assert_eq!(p.keep_alive(30), (30, false));
        assert_eq!(p.keep_alive(0), (60, true));
        assert_eq!(p.keep_alive(600), (60, true));
    }
}
