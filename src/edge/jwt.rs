//! JWT bearer tokens as credentials: HS256 with a shared secret, RS256 and ES256 with public
//! keys, each from a file named in `[auth]`. A token's `sub` is the user (the device id), its
//! optional `role` picks the ACL role (`device` when absent), and `exp`, when present, is
//! honoured with 30 s of leeway; `nbf` too.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("cannot read `{key}` file {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("`{key}`: {path} is not a usable key: {reason}")]
    BadKey {
        key: &'static str,
        path: String,
        reason: String,
    },
}

/// Seconds of clock difference tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    role: Option<String>,
}

/// The verified content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub user: String,
    pub role: Option<String>,
}

#[derive(Default)]
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    es256: Option<DecodingKey>,
}

impl JwtVerifier {
    /// Loads the configured keys; empty paths are skipped.
    pub fn load(
        hs256_secret: &str,
        rs256_public: &str,
        es256_public: &str,
    ) -> Result<Self, JwtError> {
        let read = |key: &'static str, path: &str| -> Result<Option<Vec<u8>>, JwtError> {
            if path.is_empty() {
                return Ok(None);
            }
            std::fs::read(Path::new(path))
                .map(Some)
                .map_err(|source| JwtError::Read {
                    key,
                    path: path.to_string(),
                    source,
                })
        };
        let bad = |key: &'static str, path: &str, reason: String| JwtError::BadKey {
            key,
            path: path.to_string(),
            reason,
        };
        let hs256 = match read("auth.jwt_hs256_secret_file", hs256_secret)? {
            Some(secret) => {
                let secret = trim_ascii(&secret);
                if secret.len() < 32 {
                    return Err(bad(
                        "auth.jwt_hs256_secret_file",
                        hs256_secret,
                        "an HS256 secret must have at least 32 bytes".into(),
                    ));
                }
                Some(DecodingKey::from_secret(secret))
            }
            None => None,
        };
        let rs256 = match read("auth.jwt_rs256_public_key_file", rs256_public)? {
            Some(pem) => Some(DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                bad(
                    "auth.jwt_rs256_public_key_file",
                    rs256_public,
                    e.to_string(),
                )
            })?),
            None => None,
        };
        let es256 = match read("auth.jwt_es256_public_key_file", es256_public)? {
            Some(pem) => Some(DecodingKey::from_ec_pem(&pem).map_err(|e| {
                bad(
                    "auth.jwt_es256_public_key_file",
                    es256_public,
                    e.to_string(),
                )
            })?),
            None => None,
        };
        Ok(JwtVerifier {
            hs256,
            rs256,
            es256,
        })
    }

    pub fn is_configured(&self) -> bool {
        self.hs256.is_some() || self.rs256.is_some() || self.es256.is_some()
    }

    /// Whether a password looks like a JWT (three base64url parts), so it is verified as one.
    pub fn looks_like_token(password: &[u8]) -> bool {
        password.starts_with(b"eyJ") && password.iter().filter(|&&b| b == b'.').count() == 2
    }

    /// Verifies a token; `Err` carries the reason for the log.
    pub fn verify(&self, token: &[u8]) -> Result<TokenIdentity, &'static str> {
        let token = std::str::from_utf8(token).map_err(|_| "token is not UTF-8")?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            Algorithm::ES256 => self.es256.as_ref(),
            _ => None,
        }
        .ok_or("token algorithm not accepted")?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        // `exp` is honoured when present; tokens without one do not expire.
        validation.required_spec_claims.clear();
        validation.required_spec_claims.insert("sub".to_string());
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "token expired",
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => "token not yet valid",
            jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad token signature",
            _ => "invalid token",
        })?;
        if data.claims.sub.is_empty() {
            return Err("token has an empty `sub`");
        }
        Ok(TokenIdentity {
            user: data.claims.sub,
            role: data.claims.role,
        })
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::snapshot::TestDir;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> JwtVerifier {
        JwtVerifier {
            hs256: Some(DecodingKey::from_secret(SECRET)),
            ..JwtVerifier::default()
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens_with_role_and_expiry() {
        let v = verifier();
        let t = token(
            serde_json::json!({"sub": "m1", "role": "viewer", "exp": now() + 600}),
            SECRET,
        );
        assert!(JwtVerifier::looks_like_token(t.as_bytes()));
        assert_eq!(
            v.verify(t.as_bytes()),
            Ok(TokenIdentity {
                user: "m1".into(),
                role: Some("viewer".into())
            })
        );
        let no_exp = token(serde_json::json!({"sub": "m2"}), SECRET);
        assert_eq!(v.verify(no_exp.as_bytes()).unwrap().role, None);
        let expired = token(serde_json::json!({"sub": "m1", "exp": now() - 120}), SECRET);
        assert_eq!(v.verify(expired.as_bytes()), Err("token expired"));
        let forged = token(
            serde_json::json!({"sub": "m1"}),
            b"another secret of thirty-two bytes",
        );
        assert_eq!(v.verify(forged.as_bytes()), Err("bad token signature"));
        let no_sub = token(serde_json::json!({"role": "admin"}), SECRET);
        assert!(v.verify(no_sub.as_bytes()).is_err());
        assert!(v.verify(b"eyJ.not.a-token").is_err());
        assert!(!JwtVerifier::looks_like_token(b"s3cret"));
    }

    #[test]
    fn es256_with_a_public_key_file() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let dir = TestDir::new("jwt-es256");
        let public = dir.join("es256.pub.pem");
        std::fs::write(&public, key.public_key_pem()).unwrap();
        let v = JwtVerifier::load("", "", public.to_str().unwrap()).unwrap();
        let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let claims = serde_json::json!({"sub": "plc-7", "role": "operator", "exp": now() + 60});
        let t = encode(&Header::new(Algorithm::ES256), &claims, &signing).unwrap();
        assert_eq!(v.verify(t.as_bytes()).unwrap().user, "plc-7");
        // An HS256 token is refused when only ES256 is configured (no algorithm confusion).
        let hs = token(serde_json::json!({"sub": "plc-7"}), SECRET);
        assert_eq!(v.verify(hs.as_bytes()), Err("token algorithm not accepted"));
        // Bad key files are errors naming the key.
        std::fs::write(&public, "not a key").unwrap();
        match JwtVerifier::load("", "", public.to_str().unwrap()) {
            Err(JwtError::BadKey { key, .. }) => assert_eq!(key, "auth.jwt_es256_public_key_file"),
            other => panic!("{:?}", other.err()),
        }
        let short = dir.join("short.secret");
        std::fs::write(&short, "too short").unwrap();
        assert!(JwtVerifier::load(short.to_str().unwrap(), "", "").is_err());
    }

    #[test]
    fn rs256_with_a_public_key_file() {
        // rcgen (ring) cannot make RSA keys; openssl is on every Debian machine.
        let dir = TestDir::new("jwt-rs256");
        let private = dir.join("rsa.pem");
        let public = dir.join("rsa.pub.pem");
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(ok, "openssl {args:?}");
        };
        run(&["genrsa", "-out", private.to_str().unwrap(), "2048"]);
        run(&[
            "rsa",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        let v = JwtVerifier::load("", public.to_str().unwrap(), "").unwrap();
        let signing = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
        let claims = serde_json::json!({"sub": "m3", "exp": now() + 60});
        let t = encode(&Header::new(Algorithm::RS256), &claims, &signing).unwrap();
        assert_eq!(v.verify(t.as_bytes()).unwrap().user, "m3");
        let expired = serde_json::json!({"sub": "m3", "exp": now() - 600});
        let t = encode(&Header::new(Algorithm::RS256), &expired, &signing).unwrap();
        assert_eq!(v.verify(t.as_bytes()), Err("token expired"));
    }

    #[test]
    fn algorithms_without_a_key_are_refused() {
        let v = JwtVerifier::default();
        let t = token(serde_json::json!({"sub": "m1"}), SECRET);
        assert_eq!(v.verify(t.as_bytes()), Err("token algorithm not accepted"));
    }
}
