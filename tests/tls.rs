//! TLS: MQTT over TLS with mosquitto's clients, client certificates as identities, and HTTPS
//! and WSS on the web port. A CA and its certificates are generated for each test (rcgen).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const T: Duration = Duration::from_secs(5);

/// A certificate and its key, as files (for mosquitto) and DER (for rustls).
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    fn cert(&self) -> &str {
        self.cert.to_str().expect("utf-8 path")
    }

    fn key(&self) -> &str {
        self.key.to_str().expect("utf-8 path")
    }
}

/// The test PKI: a CA, a server certificate for localhost/127.0.0.1, a client certificate
/// with CN `m1`, and a second CA with its own `m1` (a forgery the broker must refuse).
struct Pki {
    dir: TempDir,
    ca_der: CertificateDer<'static>,
    server: Leaf,
    m1: Leaf,
    rogue_m1: Leaf,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new();
        let (params, ca_key) = ca_params("vigil test CA");
        let (other_params, other_key) = ca_params("someone else's CA");
        let ca = CertifiedIssuer::self_signed(params, ca_key).expect("CA");
        let other_ca = CertifiedIssuer::self_signed(other_params, other_key).expect("other CA");
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.0.join("other-ca.pem"), other_ca.pem()).expect("write");
        let server = leaf(
            &dir,
            "server",
            &ca,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let m1 = leaf(
            &dir,
            "m1",
            &ca,
            "m1",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let rogue_m1 = leaf(
            &dir,
            "rogue-m1",
            &other_ca,
            "m1",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca_der: ca.der().clone(),
            dir,
            server,
            m1,
            rogue_m1,
        }
    }

    fn ca(&self) -> String {
        self.path("ca.pem")
    }

    fn other_ca(&self) -> String {
        self.path("other-ca.pem")
    }

    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).to_string_lossy().into_owned()
    }

    /// `config` with TLS on: the MQTT/TLS listener on a free loopback port, `https` for the
    /// web port, and `client_certs` ("off", "optional", "required").
    fn configure(&self, config: String, https: bool, client_certs: &str) -> String {
        let ca = if client_certs == "off" {
            String::new()
        } else {
            self.ca()
        };
        // Keys are matched at the start of a line: other sections have keys ending alike
        // (`jwt_..._key_file`).
        let set = |config: String, key: &str, default: &str, value: String| {
            let from = format!("\n{key} = {default}\n");
            assert!(
                config.contains(&from),
                "no `{key} = {default}` in the config"
            );
            config.replacen(&from, &format!("\n{key} = {value}\n"), 1)
        };
        let config = set(config, "mqtt_listen", "\"\"", "\"127.0.0.1:0\"".into());
        let config = set(config, "https", "false", https.to_string());
        let config = set(
            config,
            "cert_file",
            "\"\"",
            format!("{:?}", self.server.cert()),
        );
        let config = set(
            config,
            "key_file",
            "\"\"",
            format!("{:?}", self.server.key()),
        );
        let config = set(config, "client_ca_file", "\"\"", format!("{ca:?}"));
        set(
            config,
            "client_certs",
            "\"off\"",
            format!("{client_certs:?}"),
        )
    }
}

fn ca_params(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params, KeyPair::generate().expect("key"))
}

fn leaf(
    dir: &TempDir,
    file: &str,
    issuer: &CertifiedIssuer<'_, KeyPair>,
    cn: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Leaf {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    let cert_path = dir.0.join(format!("{file}.pem"));
    let key_path = dir.0.join(format!("{file}.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    Leaf {
        cert: cert_path,
        key: key_path,
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}

/// The MQTT/TLS address from the `vigil listening` line.
fn mqtts(v: &Vigil) -> SocketAddr {
    let log = v.log();
    let line = log
        .lines()
        .find(|l| l.contains("vigil listening"))
        .expect("listening line");
    let start = line.find("mqtts=").expect("mqtts= in the listening line") + "mqtts=".len();
    line[start..]
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no MQTT/TLS address in {line}"))
}

fn metric_line(v: &Vigil, prefix: &str) -> String {
    let text = http_get(v.http, "/metrics");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{text}"))
        .to_string()
}

#[test]
fn mosquitto_clients_over_tls_interoperate_with_tcp() {
    let pki = Pki::new();
    let v = Vigil::start_with(|c| pki.configure(c, false, "off"));
    let tls = mqtts(&v).port();
    let ca = pki.ca();

    let mut sub = Sub::start(tls, &["--cafile", &ca, "-t", "tls/#", "-q", "1"]);
    assert!(
        metric_line(&v, "vigil_connections{listener=\"tls\"}").ends_with(" 1"),
        "the TLS subscriber is counted"
    );
    publish(
        tls,
        &["--cafile", &ca, "-t", "tls/a", "-m", "over-tls", "-q", "1"],
    );
    publish(v.port(), &["-t", "tls/b", "-m", "over-tcp", "-q", "2"]);
    let got = sub.expect_messages(2, T);
    assert_eq!(got, vec!["tls/a|1|0|over-tls", "tls/b|1|0|over-tcp"]);

    // And the other way round: a TCP subscriber sees a TLS publisher.
    let mut tcp_sub = Sub::start(v.port(), &["-t", "tls/c", "-q", "1"]);
    publish(tls, &["--cafile", &ca, "-t", "tls/c", "-m", "x", "-q", "1"]);
    assert_eq!(tcp_sub.expect_messages(1, T), vec!["tls/c|1|0|x"]);
}

#[test]
fn failed_handshakes_close_only_their_socket() {
    let pki = Pki::new();
    let v = Vigil::start_with(|c| {
        pki.configure(c, false, "off").replacen(
            "handshake_timeout_ms = 10000",
            "handshake_timeout_ms = 500",
            1,
        )
    });
    let tls = mqtts(&v);

    // A client that does not trust the broker's CA.
    let out = try_publish(
        tls.port(),
        &["--cafile", &pki.other_ca(), "-t", "t", "-m", "x"],
    );
    assert!(!out.status.success(), "a client without the CA connected");
    // A client speaking plain MQTT to the TLS port.
    let out = try_publish(tls.port(), &["-t", "t", "-m", "x"]);
    assert!(!out.status.success(), "plain MQTT passed the TLS port");
    // A socket that never starts its handshake is closed at the handshake timeout.
    let mut idle = Raw::open(tls);
    assert!(
        idle.closed_within(Duration::from_secs(3)),
        "idle socket kept"
    );
    let timeouts = http_get(v.http, "/metrics");
    assert!(
        timeouts
            .lines()
            .any(|l| l.contains("reason=\"handshake_timeout\"") && !l.ends_with(" 0")),
        "TLS handshake timeout not counted:\n{timeouts}"
    );

    // The broker still serves, over TLS and over TCP.
    let ca = pki.ca();
    let mut sub = Sub::start(tls.port(), &["--cafile", &ca, "-t", "still/#", "-q", "1"]);
    publish(
        tls.port(),
        &["--cafile", &ca, "-t", "still/up", "-m", "yes"],
    );
    assert_eq!(sub.expect_messages(1, T), vec!["still/up|0|0|yes"]);
    assert_broker_serves(v.port(), "after-tls-failures");
}

#[test]
fn required_client_certificate_is_the_device_identity() {
    let pki = Pki::new();
    let v = Vigil::start_with_users(
        &[
            ("m1", "m1-password", "device"),
            ("boss", "boss-pw", "admin"),
        ],
        |c| pki.configure(c, false, "required"),
    );
    let tls = mqtts(&v).port();
    let ca = pki.ca();
    let m1 = [
        "--cafile",
        &ca,
        "--cert",
        pki.m1.cert(),
        "--key",
        pki.m1.key(),
    ];

    let mut admin = Sub::start(
        v.port(),
        &[
            "-u",
            "boss",
            "-P",
            "boss-pw",
            "-t",
            "device/+/telemetry",
            "-q",
            "1",
        ],
    );
    // m1's certificate does not let it speak for m2 ...
    let _ = try_publish(
        tls,
        &[
            &m1[..],
            &["-t", "device/m2/telemetry", "-m", "spoof", "-q", "1"],
        ]
        .concat(),
    );
    // ... but it is m1: no password needed, and the device ACL applies.
    publish(
        tls,
        &[
            &m1[..],
            &["-t", "device/m1/telemetry", "-m", "real", "-q", "1"],
        ]
        .concat(),
    );
    assert_eq!(
        admin.expect_messages(1, T),
        vec!["device/m1/telemetry|1|0|real"]
    );
    assert_eq!(
        admin.drain(Duration::from_millis(500)),
        vec!["device/m1/telemetry|1|0|real"],
        "the publish to device/m2 was delivered"
    );

    // A CONNECT user name must be the certificate's name.
    let out = try_publish(
        tls,
        &[
            &m1[..],
            &["-u", "m1", "-t", "device/m1/telemetry", "-m", "a"],
        ]
        .concat(),
    );
    assert!(out.status.success(), "user name equal to the CN refused");
    let out = try_publish(
        tls,
        &[
            &m1[..],
            &[
                "-u",
                "boss",
                "-P",
                "boss-pw",
                "-t",
                "device/m1/telemetry",
                "-m",
                "b",
            ],
        ]
        .concat(),
    );
    assert!(!out.status.success(), "m1's certificate logged in as boss");

    // Without a certificate, even with a valid password, the handshake fails; a certificate
    // with the right name from another CA too.
    let out = try_publish(
        tls,
        &[
            "--cafile", &ca, "-u", "boss", "-P", "boss-pw", "-t", "x", "-m", "c",
        ],
    );
    assert!(!out.status.success(), "no client certificate was accepted");
    let rogue = [
        "--cafile",
        &ca,
        "--cert",
        pki.rogue_m1.cert(),
        "--key",
        pki.rogue_m1.key(),
    ];
    let out = try_publish(
        tls,
        &[&rogue[..], &["-t", "device/m1/telemetry", "-m", "d"]].concat(),
    );
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted"
    );
    assert_eq!(
        admin.drain(Duration::from_millis(300)),
        vec!["device/m1/telemetry|1|0|real", "device/m1/telemetry|0|0|a"],
    );
}

// ---------------------------------------------------------------------------------------------
// HTTPS and WSS on the web port.

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A TLS connection to `addr` trusting the test CA, with `client` as client certificate.
async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    client: Option<&Leaf>,
) -> TlsStream<tokio::net::TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

async fn wss(
    pki: &Pki,
    v: &Vigil,
    path: &str,
    protocol: &str,
    client: Option<&Leaf>,
) -> WebSocketStream<TlsStream<tokio::net::TcpStream>> {
    let stream = tls_connect(pki, v.http, client).await;
    let mut request = format!("wss://localhost:{}{path}", v.http.port())
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        protocol.parse().expect("header value"),
    );
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("WebSocket upgrade over TLS");
    ws
}

async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(T, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(m)) => return m,
                other => panic!("WebSocket ended: {other:?}"),
            }
        }
    })
    .await
    .expect("no message in time")
}

/// The MQTT packet of a binary WebSocket message.
fn mqtt_packet(m: Message) -> Packet {
    let data = m.into_data();
    let mut pos = 1;
    while data.get(pos).is_some_and(|b| b & 0x80 != 0) {
        pos += 1;
    }
    Packet {
        header: data[0],
        body: data[pos + 1..].to_vec(),
    }
}

#[test]
fn https_and_wss_serve_health_mqtt_and_the_bridge_with_client_certificates() {
    let pki = Pki::new();
    let v = Vigil::start_with_users(
        &[
            ("m1", "m1-password", "device"),
            ("boss", "boss-pw", "admin"),
        ],
        |c| pki.configure(c, true, "optional"),
    );
    // Plain HTTP gets no answer from a TLS port.
    assert!(!http_get(v.http, "/healthz").contains("200 OK"));

    rt().block_on(async {
        let mut https = tls_connect(&pki, v.http, None).await;
        https
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(T, https.read_to_end(&mut reply)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.ends_with("{\"status\":\"ok\"}\n"), "{reply}");

        // MQTT over WSS, authenticated by m1's certificate alone.
        let mut ws = wss(&pki, &v, "/mqtt", "mqtt", Some(&pki.m1)).await;
        ws.send(Message::binary(connect_packet(&ConnectOpts::v311(
            "wss-m1",
        ))))
        .await
        .expect("send CONNECT");
        let ack = mqtt_packet(next_message(&mut ws).await);
        assert_eq!((ack.kind(), ack.body[1]), (2, 0), "CONNACK {ack:?}");
        ws.send(Message::binary(subscribe_packet(
            1,
            &[("device/m1/commands", 1)],
        )))
        .await
        .expect("send SUBSCRIBE");
        let suback = mqtt_packet(next_message(&mut ws).await);
        assert_eq!((suback.kind(), suback.body[2]), (9, 1), "SUBACK {suback:?}");
        publish(
            v.port(),
            &[
                "-u",
                "boss",
                "-P",
                "boss-pw",
                "-t",
                "device/m1/commands",
                "-m",
                "reset",
            ],
        );
        let delivery = mqtt_packet(next_message(&mut ws).await);
        let (topic, _, _, _, _, payload) = parse_publish(&delivery);
        assert_eq!(
            (topic.as_str(), payload.as_slice()),
            ("device/m1/commands", &b"reset"[..])
        );

        // Without a certificate or credentials: not authorized.
        let mut anon = wss(&pki, &v, "/mqtt", "mqtt", None).await;
        anon.send(Message::binary(connect_packet(&ConnectOpts::v311(
            "wss-anon",
        ))))
        .await
        .expect("send CONNECT");
        let ack = mqtt_packet(next_message(&mut anon).await);
        assert_eq!((ack.kind(), ack.body[1]), (2, 5), "CONNACK {ack:?}");

        // The JSON bridge over WSS: the certificate is the session's identity.
        let mut bridge = wss(&pki, &v, "/ws", "vigil.bridge.v1", Some(&pki.m1)).await;
        bridge
            .send(Message::text(r#"{"op":"connect","client_id":"ui-m1"}"#))
            .await
            .expect("send connect");
        let connack = next_message(&mut bridge).await.into_text().expect("text");
        assert!(connack.contains("\"op\":\"connack\""), "{connack}");
        assert!(connack.contains("\"ok\":true"), "{connack}");

        let mut anon = wss(&pki, &v, "/ws", "vigil.bridge.v1", None).await;
        anon.send(Message::text(r#"{"op":"connect","client_id":"ui-anon"}"#))
            .await
            .expect("send connect");
        let connack = next_message(&mut anon).await.into_text().expect("text");
        assert!(connack.contains("\"ok\":false"), "{connack}");
    });
}

#[test]
fn unusable_tls_files_stop_vigil_naming_key_and_file() {
    let pki = Pki::new();
    let dir = TempDir::new();
    let config = dir.0.join("broker.toml");
    let check = |text: String, key: &str, file: &str| {
        std::fs::write(&config, text).expect("write");
        let out = std::process::Command::new(vigil_bin())
            .arg("--config")
            .arg(&config)
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .output()
            .expect("run vigil");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "vigil started: {err}");
        assert!(
            err.contains(key) && err.contains(file),
            "{key} {file}: {err}"
        );
    };
    let good = pki.configure(DEFAULT_CONFIG.to_string(), false, "required");
    check(
        good.replace(pki.server.key(), "/nonexistent/server.key"),
        "tls.key_file",
        "/nonexistent/server.key",
    );
    // A certificate file given as the key, and a key given as the CA file.
    check(
        good.replace(pki.server.key(), pki.server.cert()),
        "tls.key_file",
        pki.server.cert(),
    );
    check(
        good.replace(&pki.ca(), pki.m1.key()),
        "tls.client_ca_file",
        pki.m1.key(),
    );
    // The key of another certificate.
    check(
        good.replace(pki.server.key(), pki.m1.key()),
        "tls.key_file",
        pki.m1.key(),
    );
    // Inconsistent settings are refused by check-config already.
    let text = DEFAULT_CONFIG.replacen("\nhttps = false", "\nhttps = true", 1);
    std::fs::write(&config, text).expect("write");
    let out = std::process::Command::new(vigil_bin())
        .arg("check-config")
        .arg(&config)
        .output()
        .expect("run vigil");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.cert_file"));
}
