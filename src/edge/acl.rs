//! Topic access control: which topics an authenticated identity may publish to and which
//! filters it may subscribe to, by role, with the identity substituted into the patterns.
//!
//! A rule is an MQTT topic filter in which `%u` stands for the authenticated user name and `%c`
//! for the client id, each as one whole topic level (`device/%u/telemetry`). The semantics:
//!
//! - PUBLISH to topic `t` is allowed when some publish rule, as a filter, matches `t`.
//! - SUBSCRIBE to filter `f` is allowed when some subscribe rule *covers* `f`: every topic `f`
//!   can match is matched by the rule. `device/+/alerts` covers `device/pump-1/alerts` and
//!   `device/+/alerts`, but not `device/#`.
//! - A rule that starts with a wildcard never matches or covers a topic that starts with `$`
//!   (as in MQTT matching), so `$` topics need rules of their own.
//! - An identity that is empty or contains `/`, `+`, `#` or NUL cannot be substituted: rules
//!   naming it match nothing (no identity can widen a rule into a wildcard).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::mqtt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("role `{role}`: `{rule}` is not a valid topic filter: {reason}")]
    BadRule {
        role: String,
        rule: String,
        reason: String,
    },
    #[error("role `{role}`: `%u`/`%c` must be a whole topic level in `{rule}`")]
    BadSubstitution { role: String, rule: String },
}

/// The rules of one role, as configured.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoleRules {
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Publish rate limits (0: none).
    #[serde(default)]
    pub max_messages_per_sec: u32,
    #[serde(default)]
    pub max_bytes_per_sec: u64,
}

/// One level of a compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    User,
    ClientId,
    Plus,
    Hash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule(Vec<Level>);

#[derive(Debug, Clone, Default)]
struct CompiledRole {
    publish: Vec<Rule>,
    subscribe: Vec<Rule>,
    rates: Rates,
}

/// A role's publish rate limits; 0 means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub messages_per_sec: u32,
    pub bytes_per_sec: u64,
}

/// All roles' rules, checked once at start.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    roles: BTreeMap<String, CompiledRole>,
}

/// Who is asking: the authenticated user name, the client id and the role.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub user: &'a str,
    pub client_id: &'a str,
    pub role: &'a str,
}

impl Acl {
    pub fn new(roles: &BTreeMap<String, RoleRules>) -> Result<Acl, AclError> {
        let mut compiled = BTreeMap::new();
        for (role, rules) in roles {
            let compile_all = |list: &[String]| -> Result<Vec<Rule>, AclError> {
                list.iter().map(|r| compile(role, r)).collect()
            };
            compiled.insert(
                role.clone(),
                CompiledRole {
                    publish: compile_all(&rules.publish)?,
                    subscribe: compile_all(&rules.subscribe)?,
                    rates: Rates {
                        messages_per_sec: rules.max_messages_per_sec,
                        bytes_per_sec: rules.max_bytes_per_sec,
                    },
                },
            );
        }
        Ok(Acl { roles: compiled })
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// The role's publish rate limits (none for an unknown role, which may not publish).
    pub fn rates(&self, role: &str) -> Rates {
        self.roles.get(role).map(|r| r.rates).unwrap_or_default()
    }

    /// Whether `who` may publish to `topic` (a valid topic name).
    pub fn may_publish(&self, who: &Subject<'_>, topic: &[u8]) -> bool {
        let Some(role) = self.roles.get(who.role) else {
            return false;
        };
        let Ok(topic) = std::str::from_utf8(topic) else {
            return false;
        };
        role.publish
            .iter()
            .any(|rule| covers(&rule.0, topic, who, false))
    }

    /// Whether `who` may subscribe to `filter` (a valid topic filter, not a shared one).
    pub fn may_subscribe(&self, who: &Subject<'_>, filter: &[u8]) -> bool {
        let Some(role) = self.roles.get(who.role) else {
            return false;
        };
        let Ok(filter) = std::str::from_utf8(filter) else {
            return false;
        };
        // A shared subscription is checked on the filter it shares.
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((_, f)) => f,
                None => return false,
            },
            None => filter,
        };
        role.subscribe
            .iter()
            .any(|rule| covers(&rule.0, filter, who, true))
    }
}

fn compile(role: &str, rule: &str) -> Result<Rule, AclError> {
    let probe = rule.replace("%u", "x").replace("%c", "x");
    mqtt::validate_topic_filter(probe.as_bytes()).map_err(|e| AclError::BadRule {
        role: role.to_string(),
        rule: rule.to_string(),
        reason: e.to_string(),
    })?;
    let levels = rule
        .split('/')
        .map(|level| match level {
            "%u" => Ok(Level::User),
            "%c" => Ok(Level::ClientId),
            "+" => Ok(Level::Plus),
            "#" => Ok(Level::Hash),
            l if l.contains("%u") || l.contains("%c") => Err(AclError::BadSubstitution {
                role: role.to_string(),
                rule: rule.to_string(),
            }),
            l => Ok(Level::Literal(l.to_string())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule(levels))
}

/// An identity usable as one topic level.
fn level_safe(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| matches!(b, b'/' | b'+' | b'#' | 0))
}

/// Whether `rule` matches every topic that `target` can match. With `target_is_filter`
/// false, `target` is a topic name and this is plain MQTT matching.
fn covers(rule: &[Level], target: &str, who: &Subject<'_>, target_is_filter: bool) -> bool {
    let mut levels = target.split('/');
    for (i, r) in rule.iter().enumerate() {
        let t = levels.next();
        // MQTT-4.7.2-1: wildcards at the first level do not match `$` topics.
        if i == 0 && matches!(r, Level::Plus | Level::Hash) && target.starts_with('$') {
            return false;
        }
        match (r, t) {
            (Level::Hash, _) => return true,
            (_, None) => return false,
            (_, Some("#")) if target_is_filter => return false,
            (Level::Plus, Some(_)) => {}
            (_, Some("+")) if target_is_filter => return false,
            (Level::Literal(l), Some(t)) => {
                if l != t {
                    return false;
                }
            }
            (Level::User, Some(t)) => {
                if !level_safe(who.user) || who.user != t {
                    return false;
                }
            }
            (Level::ClientId, Some(t)) => {
                if !level_safe(who.client_id) || who.client_id != t {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> Acl {
        let mut roles = BTreeMap::new();
        roles.insert(
            "device".to_string(),
            RoleRules {
                publish: vec!["device/%u/telemetry".into(), "device/%u/status".into()],
                subscribe: vec!["device/%u/commands".into()],
                ..RoleRules::default()
            },
        );
        roles.insert(
            "viewer".to_string(),
            RoleRules {
                publish: vec![],
                subscribe: vec!["device/+/telemetry".into(), "device/+/alerts".into()],
                ..RoleRules::default()
            },
        );
        roles.insert(
            "admin".to_string(),
            RoleRules {
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
                ..RoleRules::default()
            },
        );
        roles.insert(
            "per-client".to_string(),
            RoleRules {
                publish: vec!["clients/%c/#".into()],
                subscribe: vec![],
                ..RoleRules::default()
            },
        );
        Acl::new(&roles).unwrap()
    }

    fn who<'a>(user: &'a str, role: &'a str) -> Subject<'a> {
        Subject {
            user,
            client_id: "cid",
            role,
        }
    }

    #[test]
    fn device_speaks_only_for_itself() {
        let a = acl();
        let d = who("m1", "device");
        assert!(a.may_publish(&d, b"device/m1/telemetry"));
        assert!(a.may_publish(&d, b"device/m1/status"));
        assert!(!a.may_publish(&d, b"device/m2/telemetry"));
        assert!(!a.may_publish(&d, b"device/m1/commands"));
        assert!(!a.may_publish(&d, b"device/m1/telemetry/x"));
        assert!(a.may_subscribe(&d, b"device/m1/commands"));
        assert!(!a.may_subscribe(&d, b"device/+/commands"));
        assert!(!a.may_subscribe(&d, b"device/#"));
        assert!(!a.may_subscribe(&d, b"#"));
    }

    #[test]
    fn wildcard_filters_must_be_covered() {
        let a = acl();
        let v = who("ui", "viewer");
        assert!(a.may_subscribe(&v, b"device/+/telemetry"));
        assert!(a.may_subscribe(&v, b"device/x/alerts"));
        assert!(!a.may_subscribe(&v, b"device/#"));
        assert!(!a.may_subscribe(&v, b"device/+/+"));
        assert!(!a.may_subscribe(&v, b"device/x/commands"));
        assert!(!a.may_publish(&v, b"device/x/telemetry"));
        assert!(a.may_subscribe(&v, b"$share/g/device/+/alerts"));
        assert!(!a.may_subscribe(&v, b"$share/g/device/#"));
    }

    #[test]
    fn dollar_topics_need_their_own_rules() {
        let a = acl();
        let admin = who("root", "admin");
        assert!(a.may_publish(&admin, b"anything/at/all"));
        assert!(a.may_subscribe(&admin, b"#"));
        assert!(!a.may_subscribe(&admin, b"$SYS/#"));
        assert!(!a.may_publish(&admin, b"$SYS/x"));
    }

    #[test]
    fn identities_cannot_become_wildcards() {
        let a = acl();
        for evil in ["+", "#", "a/b", ""] {
            let d = who(evil, "device");
            assert!(!a.may_publish(&d, format!("device/{evil}/telemetry").as_bytes()));
            assert!(!a.may_subscribe(&d, format!("device/{evil}/commands").as_bytes()));
        }
        assert!(!a.may_publish(&who("m1", "device"), b"device/+/telemetry"));
    }

    #[test]
    fn client_id_substitution_and_unknown_roles() {
        let a = acl();
        assert!(a.may_publish(&who("u", "per-client"), b"clients/cid/a/b"));
        assert!(!a.may_publish(&who("u", "per-client"), b"clients/other/a"));
        assert!(!a.may_publish(&who("u", "nobody"), b"device/u/telemetry"));
    }

    #[test]
    fn bad_rules_are_refused_at_start() {
        let mut roles = BTreeMap::new();
        roles.insert(
            "r".to_string(),
            RoleRules {
                publish: vec!["a/#/b".into()],
                ..RoleRules::default()
            },
        );
        assert!(matches!(Acl::new(&roles), Err(AclError::BadRule { .. })));
        roles.insert(
            "r".to_string(),
            RoleRules {
                publish: vec!["dev-%u/x".into()],
                ..RoleRules::default()
            },
        );
        assert!(matches!(
            Acl::new(&roles),
            Err(AclError::BadSubstitution { .. })
        ));
    }
}
