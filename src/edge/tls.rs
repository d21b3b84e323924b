//! TLS for the public listeners: `[tls]` loaded into rustls acceptors, handshakes run under
//! the handshake timeout, and the name of a verified client certificate.
//!
//! rustls with the ring provider: it builds with a C compiler alone. A client certificate is
//! only ever named after rustls has verified its chain against `tls.client_ca_file`; its
//! common name (CN) becomes the connection's `Origin::tls_cn`, which the policy treats as the
//! authenticated user name.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::Edge;
use crate::config::{ClientCerts, TlsConfig};
use crate::metrics::Metrics;

/// ALPN for the web port: HTTP/1.1 only (the WebSocket upgrade needs it). A client that
/// offers only h2 fails the handshake rather than talk HTTP/1.1 to a peer expecting h2.
pub const HTTP_ALPN: &[&[u8]] = &[b"http/1.1"];
/// ALPN for MQTT: none asked for; a client offering `mqtt` (or anything) still connects.
pub const MQTT_ALPN: &[&[u8]] = &[];

/// The longest common name accepted as a user name (the password file's limit).
const MAX_CN_CHARS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{key}` file {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("`{key}` file {path}: {reason}")]
    Pem {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("`{key}` is empty: a file is required when TLS is on")]
    NoFile { key: &'static str },
    #[error("`tls.cert_file` {cert} with `tls.key_file` {key}: {source}")]
    Server {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error("`tls.client_ca_file` {path}: {reason}")]
    ClientCa { path: String, reason: String },
    #[error("TLS handshake not completed in time")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("client certificate has no usable common name")]
    NoCommonName,
}

/// The server's certificate chain and key, and the client-certificate verifier, as
/// configured: loaded once at start, then turned into one acceptor per listener.
pub struct Certificates {
    provider: Arc<CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: String,
    key_path: String,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl Certificates {
    /// Reads and checks the files `[tls]` names. Every error names the key and the file.
    pub fn load(config: &TlsConfig) -> Result<Certificates, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_pem = read("tls.cert_file", &config.cert_file)?;
        let chain = certificates("tls.cert_file", &config.cert_file, &cert_pem)?;
        let key_pem = read("tls.key_file", &config.key_file)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            key: "tls.key_file",
            path: config.key_file.clone(),
            reason: format!("no usable private key ({e})"),
        })?;
        let client_verifier = match config.client_certs {
            ClientCerts::Off => None,
            mode => {
                let path = &config.client_ca_file;
                let pem = read("tls.client_ca_file", path)?;
                let mut roots = RootCertStore::empty();
                for ca in certificates("tls.client_ca_file", path, &pem)? {
                    roots.add(ca).map_err(|e| TlsError::ClientCa {
                        path: path.clone(),
                        reason: format!("not a usable CA certificate ({e})"),
                    })?;
                }
                let builder =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let builder = if mode == ClientCerts::Optional {
                    builder.allow_unauthenticated()
                } else {
                    builder
                };
                Some(builder.build().map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?)
            }
        };
        let certs = Certificates {
            provider,
            chain,
            key,
            cert_path: config.cert_file.clone(),
            key_path: config.key_file.clone(),
            client_verifier,
        };
        // Building one acceptor now proves the key matches the certificate.
        certs.acceptor(MQTT_ALPN)?;
        Ok(certs)
    }

    /// An acceptor offering `alpn` (empty: no ALPN).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
        let server_error = |source| TlsError::Server {
            cert: self.cert_path.clone(),
            key: self.key_path.clone(),
            source,
        };
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(server_error)?;
        let builder = match &self.client_verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(server_error)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, TlsError> {
    if path.is_empty() {
        return Err(TlsError::NoFile { key });
    }
    std::fs::read(Path::new(path)).map_err(|source| TlsError::Read {
        key,
        path: path.to_string(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(
    key: &'static str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        key,
        path: path.to_string(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("bad PEM ({e})")))?;
    if chain.is_empty() {
        return Err(pem_error("no CERTIFICATE block".into()));
    }
    Ok(chain)
}

/// Runs the TLS handshake on an accepted socket, by `deadline` (a timeout is counted like the
/// other handshake timeouts). Returns the stream and the common name of the client
/// certificate, present only when rustls verified one against the client CA.
pub async fn accept(
    edge: &Edge,
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    deadline: Instant,
) -> Result<(TlsStream<TcpStream>, Option<String>), TlsError> {
    // Pinned here, so that on a timeout the socket it owns is closed only after the timeout is
    // counted: a client that sees the close may read the metrics at once.
    let accept = acceptor.accept(stream);
    tokio::pin!(accept);
    let stream = match tokio::time::timeout_at(deadline, &mut accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(error = %e, "closed: TLS handshake failed");
            return Err(TlsError::Handshake(e));
        }
        Err(_) => {
            Metrics::inc(&edge.metrics.handshake_timeouts);
            debug!("closed: TLS handshake not completed in time");
            return Err(TlsError::Timeout);
        }
    };
    // With no client verifier configured rustls never records peer certificates, so a
    // certificate seen here has been verified against `tls.client_ca_file`.
    let cn = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => match common_name(leaf).filter(|cn| usable_name(cn)) {
            Some(cn) => Some(cn),
            None => {
                debug!("closed: client certificate has no usable common name");
                return Err(TlsError::NoCommonName);
            }
        },
        _ => None,
    };
    Ok((stream, cn))
}

/// A name the policy can take as a user name: the rules of the password file.
fn usable_name(cn: &str) -> bool {
    !cn.is_empty()
        && cn.chars().count() <= MAX_CN_CHARS
        && !cn.contains(':')
        && !cn.chars().any(char::is_control)
}

/// The subject's common name of a DER certificate; `None` when it has none, more than one,
/// or one in an encoding other than UTF8String, PrintableString, IA5String or BMPString.
///
/// A small bounds-checked DER walk (Certificate -> tbsCertificate -> subject) rather than an
/// X.509 library: this is the one field vigil reads, from a certificate rustls has verified.
pub fn common_name(cert: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let (certificate, _) = der(cert, SEQUENCE)?;
    let (tbs, _) = der(certificate, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xA0) {
        rest = der(rest, 0xA0)?.1; // [0] EXPLICIT version
    }
    rest = der(rest, 0x02)?.1; // serialNumber
    rest = der(rest, SEQUENCE)?.1; // signature
    rest = der(rest, SEQUENCE)?.1; // issuer
    rest = der(rest, SEQUENCE)?.1; // validity
    let (mut subject, _) = der(rest, SEQUENCE)?;
    let mut found = None;
    while !subject.is_empty() {
        let (mut rdn, after) = der(subject, SET)?;
        subject = after;
        while !rdn.is_empty() {
            let (attribute, after) = der(rdn, SEQUENCE)?;
            rdn = after;
            let (oid, value) = der(attribute, 0x06)?;
            if oid != OID_CN {
                continue;
            }
            if found.is_some() {
                return None;
            }
            let tag = *value.first()?;
            let (text, _) = der(value, tag)?;
            found = Some(match tag {
                0x0C | 0x13 | 0x16 => String::from_utf8(text.to_vec()).ok()?,
                0x1E => {
                    if text.len() % 2 != 0 {
                        return None;
                    }
                    let units = text
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]));
                    char::decode_utf16(units)
                        .collect::<Result<String, _>>()
                        .ok()?
                }
                _ => return None,
            });
        }
    }
    found
}

/// One DER element with a one-byte `tag` at the start of `input`: its content and the bytes
/// after it.
fn der(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = input.get(2..2 + n)?;
        let len = bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((input.get(header..end)?, input.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair};

    fn cert_with(dn: &[(DnType, DnValue)]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), v.clone());
        }
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn reads_the_common_name_in_each_string_type() {
        for value in [
            DnValue::Utf8String("m1".into()),
            DnValue::PrintableString("m1".try_into().expect("printable")),
            DnValue::Ia5String("m1".try_into().expect("ia5")),
            DnValue::BmpString("m1".try_into().expect("bmp")),
        ] {
            let der = cert_with(&[
                (DnType::OrganizationName, DnValue::Utf8String("acme".into())),
                (DnType::CommonName, value),
            ]);
            assert_eq!(common_name(&der).as_deref(), Some("m1"));
        }
        let der = cert_with(&[(DnType::CommonName, DnValue::Utf8String("Motor β".into()))]);
        assert_eq!(common_name(&der).as_deref(), Some("Motor β"));
    }

    #[test]
    fn no_common_name_or_garbage_is_none() {
        let der = cert_with(&[(DnType::OrganizationName, DnValue::Utf8String("acme".into()))]);
        assert_eq!(common_name(&der), None);
        let good = cert_with(&[(DnType::CommonName, DnValue::Utf8String("m1".into()))]);
        for cut in 0..good.len() {
            // Truncated certificates never panic; the outer length no longer fits.
            assert_eq!(common_name(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(common_name(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        assert_eq!(common_name(&[]), None);
    }

    #[test]
    fn tls_settings_are_checked_by_key() {
        use crate::config::{Config, DEFAULT_TOML};
        let config = Config::default_config().expect("default config");
        assert_eq!(config.tls.mqtt_listen_addr(), None);
        assert!(!config.tls.https);
        let parse = |edits: &[(&str, &str)]| {
            let text = edits
                .iter()
                .fold(DEFAULT_TOML.to_string(), |t, (a, b)| t.replacen(a, b, 1));
            Config::parse(&text, "test").map_err(|e| e.to_string())
        };
        let files = [
            ("\ncert_file = \"\"", "\ncert_file = \"c.pem\""),
            ("\nkey_file = \"\"", "\nkey_file = \"k.pem\""),
        ];
        // Anchored at the start of a line: other sections have keys ending the same way.
        let on = ("\nmqtt_listen = \"\"", "\nmqtt_listen = \"127.0.0.1:8883\"");
        let err = parse(&[on]).expect_err("no certificate");
        assert!(err.contains("tls.cert_file"), "{err}");
        let err = parse(&[("\nhttps = false", "\nhttps = true"), files[0]]).expect_err("no key");
        assert!(err.contains("tls.key_file"), "{err}");
        let c = parse(&[on, files[0], files[1]]).expect("valid");
        assert_eq!(c.tls.mqtt_listen_addr(), "127.0.0.1:8883".parse().ok());
        let err = parse(&[("\nmqtt_listen = \"\"", "\nmqtt_listen = \"8883\"")]).expect_err("bad");
        assert!(err.contains("tls.mqtt_listen"), "{err}");
        let optional = ("\nclient_certs = \"off\"", "\nclient_certs = \"optional\"");
        let err = parse(&[optional]).expect_err("no client CA");
        assert!(err.contains("tls.client_ca_file"), "{err}");
        let ca = ("\nclient_ca_file = \"\"", "\nclient_ca_file = \"ca.pem\"");
        let err = parse(&[ca]).expect_err("CA without client certificates");
        assert!(err.contains("tls.client_ca_file"), "{err}");
        assert!(parse(&[ca, optional]).is_ok());
        let err = parse(&[("\nclient_certs = \"off\"", "\nclient_certs = \"maybe\"")])
            .expect_err("unknown mode");
        assert!(err.contains("maybe"), "{err}");
    }

    #[test]
    fn user_names_follow_the_password_file_rules() {
        assert!(usable_name("m1"));
        assert!(!usable_name(""));
        assert!(!usable_name("a:b"));
        assert!(!usable_name("a\nb"));
        assert!(!usable_name(&"x".repeat(257)));
    }
}
