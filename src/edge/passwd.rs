//! The password file: per-device credentials with salted, slow hashes.
//!
//! One entry per line, `user:hash` or `user:hash:role`; `hash` is an argon2id PHC string
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`), `role` names an `[acl.roles]` entry and is
//! `device` when absent. Blank lines and lines starting with `#` are ignored. `vigil passwd`
//! edits the file the way mosquitto_passwd does: add (or change) and remove one user, list
//! users; writes are atomic (a temporary file renamed over the old one) and mode 0600.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write password file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("password file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("invalid user name `{0}`: 1 to 256 characters, no `:` and no control characters")]
    BadUser(String),
    #[error("invalid role `{0}`: 1 to 64 characters of [A-Za-z0-9_-]")]
    BadRole(String),
    #[error("the password must not be empty")]
    EmptyPassword,
    #[error("no user `{0}` in the password file")]
    UnknownUser(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The role of an entry without one.
pub const DEFAULT_ROLE: &str = "device";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub hash: String,
    pub role: String,
}

/// A loaded password file.
#[derive(Debug, Default)]
pub struct PasswordDb {
    entries: HashMap<String, Entry>,
}

impl PasswordDb {
    pub fn load(path: &Path) -> Result<PasswordDb, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let bad = |reason: String| PasswdError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let Some((user, entry)) = parse_line(line).map_err(bad)? else {
                continue;
            };
            if entries.insert(user.clone(), entry).is_some() {
                return Err(bad(format!("user `{user}` appears twice")));
            }
        }
        Ok(PasswordDb { entries })
    }

    pub fn get(&self, user: &str) -> Option<&Entry> {
        self.entries.get(user)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every user with its role.
    pub fn roles(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|(user, e)| (user.as_str(), e.role.as_str()))
    }
}

/// `Ok(None)` for a blank or comment line.
fn parse_line(line: &str) -> Result<Option<(String, Entry)>, String> {
    let line = line.trim_end_matches('\r');
    if line.trim().is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut parts = line.split(':');
    let (Some(user), Some(hash)) = (parts.next(), parts.next()) else {
        return Err("expected `user:hash` or `user:hash:role`".into());
    };
    let role = parts.next().unwrap_or(DEFAULT_ROLE);
    if parts.next().is_some() {
        return Err("too many `:` fields".into());
    }
    check_user(user).map_err(|e| e.to_string())?;
    check_role(role).map_err(|e| e.to_string())?;
    PasswordHash::new(hash).map_err(|e| format!("not a password hash: {e}"))?;
    Ok(Some((
        user.to_string(),
        Entry {
            hash: hash.to_string(),
            role: role.to_string(),
        },
    )))
}

pub fn check_user(user: &str) -> Result<(), PasswdError> {
    if user.is_empty()
        || user.chars().count() > 256
        || user.contains(':')
        || user.chars().any(char::is_control)
    {
        return Err(PasswdError::BadUser(user.to_string()));
    }
    Ok(())
}

pub fn check_role(role: &str) -> Result<(), PasswdError> {
    if role.is_empty()
        || role.len() > 64
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(PasswdError::BadRole(role.to_string()));
    }
    Ok(())
}

/// An argon2id hash of `password` with a fresh random salt (OWASP's parameters: 19 MiB,
/// 2 passes, 1 lane).
pub fn hash_password(password: &[u8]) -> Result<String, PasswdError> {
    if password.is_empty() {
        return Err(PasswdError::EmptyPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswdError::Hash(e.to_string()))
}

/// Whether `password` matches `hash`. Slow on purpose: call it off the async threads.
pub fn verify(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A valid hash of a password nobody has, verified for unknown users so that a failed login
/// takes as long whether or not the user exists.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let mut random = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        hash_password(&random).unwrap_or_default()
    })
}

/// Adds `user` (or changes its password and role). Returns whether it replaced an entry.
/// Comments, other entries and their order are kept.
pub fn add(path: &Path, user: &str, password: &[u8], role: &str) -> Result<bool, PasswdError> {
    check_user(user)?;
    check_role(role)?;
    let hash = hash_password(password)?;
    let line = if role == DEFAULT_ROLE {
        format!("{user}:{hash}")
    } else {
        format!("{user}:{hash}:{role}")
    };
    let mut lines = read_lines(path, true)?;
    let mut replaced = false;
    for l in lines.iter_mut() {
        if line_user(l) == Some(user) {
            *l = line.clone();
            replaced = true;
        }
    }
    if !replaced {
        lines.push(line);
    }
    write_lines(path, &lines)?;
    Ok(replaced)
}

pub fn remove(path: &Path, user: &str) -> Result<(), PasswdError> {
    let mut lines = read_lines(path, false)?;
    let before = lines.len();
    lines.retain(|l| line_user(l) != Some(user));
    if lines.len() == before {
        return Err(PasswdError::UnknownUser(user.to_string()));
    }
    write_lines(path, &lines)
}

/// Users and roles, in file order.
pub fn list(path: &Path) -> Result<Vec<(String, String)>, PasswdError> {
    let lines = read_lines(path, false)?;
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match parse_line(line) {
            Ok(Some((user, entry))) => out.push((user, entry.role)),
            Ok(None) => {}
            Err(reason) => {
                return Err(PasswdError::Line {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason,
                })
            }
        }
    }
    Ok(out)
}

fn line_user(line: &str) -> Option<&str> {
    if line.starts_with('#') {
        return None;
    }
    line.split_once(':').map(|(user, _)| user)
}

fn read_lines(path: &Path, missing_ok: bool) -> Result<Vec<String>, PasswdError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::to_string).collect()),
        Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(PasswdError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes through a temporary file in the same directory, renamed over `path`.
fn write_lines(path: &Path, lines: &[String]) -> Result<(), PasswdError> {
    let err = |source| PasswdError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(err)?;
    let mut text = lines.join("\n");
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::snapshot::TestDir;

    #[test]
    fn add_verify_list_remove() {
        let dir = TestDir::new("passwd-add");
        let path = dir.join("pw");
        assert!(!add(&path, "m1", b"s3cret", DEFAULT_ROLE).unwrap());
        assert!(!add(&path, "ui", b"view", "viewer").unwrap());
        let db = PasswordDb::load(&path).unwrap();
        assert_eq!(db.len(), 2);
        let m1 = db.get("m1").unwrap();
        assert_eq!(m1.role, "device");
        assert!(verify(&m1.hash, b"s3cret"));
        assert!(!verify(&m1.hash, b"wrong"));
        assert_eq!(db.get("ui").unwrap().role, "viewer");
        // Changing a password keeps one entry per user.
        assert!(add(&path, "m1", b"new", DEFAULT_ROLE).unwrap());
        let db = PasswordDb::load(&path).unwrap();
        assert!(verify(&db.get("m1").unwrap().hash, b"new"));
        assert_eq!(
            list(&path).unwrap(),
            vec![
                ("m1".into(), "device".into()),
                ("ui".into(), "viewer".into())
            ]
        );
        remove(&path, "m1").unwrap();
        assert!(matches!(
            remove(&path, "m1"),
            Err(PasswdError::UnknownUser(_))
        ));
        assert_eq!(PasswordDb::load(&path).unwrap().len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_lines_name_the_line() {
        let dir = TestDir::new("passwd-bad-lines");
        let path = dir.join("bad");
        std::fs::write(&path, "# comment\n\nu:not-a-hash\n").unwrap();
        match PasswordDb::load(&path) {
            Err(PasswdError::Line { line: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
        let hash = hash_password(b"x").unwrap();
        std::fs::write(&path, format!("u:{hash}\nu:{hash}\n")).unwrap();
        assert!(matches!(
            PasswordDb::load(&path),
            Err(PasswdError::Line { line: 2, .. })
        ));
        std::fs::write(&path, format!("u:{hash}:bad role\n")).unwrap();
        assert!(PasswordDb::load(&path).is_err());
        assert!(matches!(check_user("a:b"), Err(PasswdError::BadUser(_))));
        assert!(matches!(
            hash_password(b""),
            Err(PasswdError::EmptyPassword)
        ));
    }

    #[test]
    fn decoy_never_verifies() {
        assert!(!verify(decoy_hash(), b""));
        assert!(!verify(decoy_hash(), b"password"));
        assert!(!verify("garbage", b"x"));
    }
}
