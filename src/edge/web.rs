//! The web port: one listener for MQTT over WebSocket, the JSON bridge (reserved) and plain
//! HTTP endpoints.
//!
//! The HTTP request head is read and parsed here (bounded size, under the handshake timeout)
//! rather than inside a WebSocket library, so that an idle or slow socket costs one task and
//! one handshake slot and never delays anyone else, and so that routing is ours:
//! - WebSocket upgrade on `/mqtt`, or on `/` offering the `mqtt`/`mqttv3.1` subprotocol: MQTT.
//!   The chosen subprotocol is echoed, as browsers require.
//! - WebSocket upgrade on `/ws`: the JSON bridge (`bridge`), echoing the `vigil.bridge.v1`
//!   subprotocol when offered.
//! - `GET /healthz` (the process is up), `GET /readyz` (it can serve: JSON checks, 503 when
//!   not, also while saved sessions are restored, when WebSocket upgrades wait), `GET /metrics`, and the dashboard: `GET /` and `GET /assets/...`
//!   ([`crate::dashboard`], embedded in the binary).
//!
//! With `tls.https` the port speaks TLS only: the same routes over HTTPS and WSS, and the
//! common name of a verified client certificate goes to the MQTT origin or the bridge.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use super::ws_io::WsIo;
use super::{accept_loop, connection, tls, ClientStream, Edge, Listener, Origin};
use crate::bridge;
use crate::dashboard;
use crate::metrics::Metrics;

/// Largest HTTP request head accepted.
const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
/// tungstenite's read buffer per WebSocket, allocated when the connection opens.
const WS_READ_BUFFER: usize = 8 * 1024;
/// Frames are written to the socket once this much is buffered, and on every flush.
const WS_WRITE_BUFFER: usize = 16 * 1024;
/// Subprotocols that mean MQTT, in order of preference.
const MQTT_SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Accepts until shutdown (see [`accept_loop`]); each socket's HTTP head decides its fate.
/// With an acceptor, every socket first completes a TLS handshake (HTTPS, WSS).
pub async fn serve(edge: Arc<Edge>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    accept_loop(
        edge,
        listener,
        Listener::WebSocket,
        move |edge, stream, peer, slot| {
            let tls = tls.clone();
            async move {
                let deadline = Instant::now() + edge.handshake_timeout;
                match tls {
                    None => handle(edge, stream, peer, None, slot, deadline).await,
                    Some(acceptor) => {
                        if let Ok((stream, tls_cn)) =
                            tls::accept(&edge, &acceptor, stream, deadline).await
                        {
                            handle(edge, stream, peer, tls_cn, slot, deadline).await
                        }
                    }
                }
            }
        },
    )
    .await
}

/// What the web port's streams are: plain TCP, or TLS over it.
trait WebStream: ClientStream + 'static {}
impl<S: ClientStream + 'static> WebStream for S {}

/// A parsed request head: what routing needs, owned.
struct Head {
    method: String,
    path: String,
    upgrade_websocket: bool,
    key: Option<String>,
    version_13: bool,
    origin: Option<String>,
    protocols: Vec<String>,
    /// A bearer token from `?token=` or `Authorization: Bearer` (the bridge's credentials).
    token: Option<String>,
}

/// Serves one connection from its HTTP head on. `tls_cn` is the common name of a verified
/// client certificate (TLS only); `deadline` bounds the whole handshake, TLS included.
async fn handle(
    edge: Arc<Edge>,
    mut stream: impl WebStream,
    peer: SocketAddr,
    tls_cn: Option<String>,
    slot: OwnedSemaphorePermit,
    deadline: Instant,
) {
    let mut buf = BytesMut::with_capacity(1024);
    let head_len = match tokio::time::timeout_at(deadline, read_head(&mut stream, &mut buf)).await {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => {
            respond(
                &mut stream,
                431,
                "text/plain",
                "request head too large\n",
                &[],
            )
            .await;
            return;
        }
        Ok(Err(_)) => return,
        Err(_) => {
            Metrics::inc(&edge.metrics.handshake_timeouts);
            debug!("closed: HTTP head not received in time");
            return;
        }
    };
    let head = match parse_head(&buf[..head_len]) {
        Some(h) => h,
        None => {
            respond(&mut stream, 400, "text/plain", "malformed request\n", &[]).await;
            return;
        }
    };
    if head.upgrade_websocket {
        upgrade(
            edge,
            stream,
            buf.split_off(head_len),
            head,
            peer,
            tls_cn,
            slot,
            deadline,
        )
        .await;
        return;
    }
    drop(slot);
    if head.method != "GET" && head.method != "HEAD" {
        respond(
            &mut stream,
            405,
            "text/plain",
            "method not allowed\n",
            &[("Allow", "GET")],
        )
        .await;
        return;
    }
    let mut metrics;
    let ready;
    let mut is_dashboard = false;
    let (status, content_type, body) = match head.path.as_str() {
        "/healthz" => (200, "application/json", "{\"status\":\"ok\"}\n"),
        "/readyz" => {
            let (ok, text) = readiness(&edge).await;
            ready = text;
            (
                if ok { 200 } else { 503 },
                "application/json",
                ready.as_str(),
            )
        }
        "/metrics" => {
            // Gauges of state the edge holds itself are read now.
            edge.metrics.core_warm_ready.store(
                edge.warm.ready() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            metrics = edge.metrics.render();
            crate::metrics::render_history(
                &mut metrics,
                edge.history.metrics(),
                edge.history.ready(),
            );
            (200, "text/plain; version=0.0.4", metrics.as_str())
        }
        path => match dashboard::asset(path) {
            Some((content_type, body)) => {
                // The dashboard: its own assets only, plus WebSockets to any host (the bridge).
                // Cache-Control is `no-store` on every response (see `write_response`), so a
                // new binary's assets are never mixed with an old page.
                is_dashboard = true;
                (200, content_type, body)
            }
            None => (404, "text/plain", "not found\n"),
        },
    };
    if head.method == "HEAD" {
        respond_head_only(&mut stream, status, content_type, body).await;
    } else {
        let extra: &[(&str, &str)] = if is_dashboard {
            &[(
                "Content-Security-Policy",
                dashboard::CONTENT_SECURITY_POLICY,
            )]
        } else {
            &[]
        };
        respond(&mut stream, status, content_type, body, extra).await;
    }
}

/// Longest the core may take to answer the readiness probe's CONNECT.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `/readyz`: whether the core routes (a CONNECT answered), the analytics task is
/// subscribed (when enabled) and the saved persistent sessions are back. Redis is not part of vigil yet: reported as not configured.
async fn readiness(edge: &Edge) -> (bool, String) {
    let core = match tokio::time::timeout(READY_PROBE_TIMEOUT, edge.core.connect("i-readyz", true))
        .await
    {
        Ok(Ok(link)) if link.code == 0 => {
            let mut stream = link.stream;
            let _ = stream.shutdown().await;
            "ok"
        }
        Ok(Ok(_)) => "refused",
        Ok(Err(_)) => "unreachable",
        Err(_) => "timeout",
    };
    let analytics = match edge
        .metrics
        .analytics
        .state
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        0 => "disabled",
        crate::live::ANALYTICS_READY => "ok",
        crate::live::ANALYTICS_FAILED => "failed",
        _ => "starting",
    };
    let redis = match edge
        .metrics
        .cluster
        .state
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        0 => "not_configured",
        crate::cluster::REDIS_UP => "ok",
        _ => "down",
    };
    let sessions = if edge.admits_clients() {
        "ok"
    } else {
        "restoring"
    };
    // Without Redis an instance still serves its own clients: degraded, not unready, so a load
    // balancer keeps sending it traffic.
    let ok = core == "ok" && matches!(analytics, "ok" | "disabled") && sessions == "ok";
    let status = match (ok, redis) {
        (false, _) => "not_ready",
        (true, "down") => "degraded",
        (true, _) => "ready",
    };
    (
        ok,
        format!(
            "{{\"status\":\"{status}\",\"checks\":{{\"core\":\"{core}\",\"analytics\":\"{analytics}\",\"redis\":\"{redis}\",\"sessions\":\"{sessions}\"}}}}\n"
        ),
    )
}

#[allow(clippy::too_many_arguments)]
async fn upgrade(
    edge: Arc<Edge>,
    mut stream: impl WebStream,
    leftover: BytesMut,
    head: Head,
    peer: SocketAddr,
    tls_cn: Option<String>,
    slot: OwnedSemaphorePermit,
    deadline: Instant,
) {
    if head.method != "GET" || head.key.is_none() {
        respond(
            &mut stream,
            400,
            "text/plain",
            "bad WebSocket upgrade\n",
            &[],
        )
        .await;
        return;
    }
    if !head.version_13 {
        respond(
            &mut stream,
            426,
            "text/plain",
            "WebSocket version 13 required\n",
            &[("Sec-WebSocket-Version", "13")],
        )
        .await;
        return;
    }
    if !edge.allowed_origins.is_empty() {
        if let Some(origin) = &head.origin {
            if !edge.allowed_origins.iter().any(|o| o == origin) {
                warn!(origin = %origin, "WebSocket origin not allowed");
                respond(&mut stream, 403, "text/plain", "origin not allowed\n", &[]).await;
                return;
            }
        }
    }
    let chosen = MQTT_SUBPROTOCOLS
        .iter()
        .find(|p| {
            head.protocols
                .iter()
                .any(|offered| offered.eq_ignore_ascii_case(p))
        })
        .copied();
    let is_bridge = head.path == "/ws";
    let chosen = if is_bridge {
        head.protocols
            .iter()
            .any(|p| p == bridge::SUBPROTOCOL)
            .then_some(bridge::SUBPROTOCOL)
    } else {
        chosen
    };
    let is_mqtt = match head.path.as_str() {
        "/mqtt" => true,
        "/" => chosen.is_some(),
        _ => false,
    };
    if !is_mqtt && !is_bridge {
        respond(
            &mut stream,
            404,
            "text/plain",
            "no WebSocket service here; MQTT is at /mqtt\n",
            &[],
        )
        .await;
        return;
    }
    // While saved sessions are being restored the client waits (within its handshake
    // deadline), so that none resumes a session half built; otherwise this returns at once.
    if tokio::time::timeout_at(deadline, edge.clients_admitted())
        .await
        .is_err()
    {
        respond(
            &mut stream,
            503,
            "text/plain",
            "restoring persistent sessions, try again\n",
            &[("Retry-After", "1")],
        )
        .await;
        return;
    }
    let accept = derive_accept_key(head.key.as_deref().unwrap_or_default().as_bytes());
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = chosen {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    // An MQTT-over-WebSocket message carries at most one MQTT packet plus a little framing. A
    // bridge message carries one packet's payload as JSON: base64 grows it by a third, so twice
    // the packet size leaves room to answer an oversized payload with `payload_too_large`
    // instead of closing the connection.
    let message_limit = if is_bridge {
        2 * edge.max_packet_size + 4096
    } else {
        edge.max_packet_size + 16
    };
    // Small eager buffers: tungstenite's 128 KiB defaults would cost 256 KiB per idle browser.
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_frame_size(Some(message_limit))
        .max_message_size(Some(message_limit));
    let ws =
        WebSocketStream::from_partially_read(stream, leftover.to_vec(), Role::Server, Some(config))
            .await;
    if is_bridge {
        let handshake = bridge::Handshake {
            token: head.token,
            tls_cn,
        };
        bridge::serve(edge, ws, peer, handshake, slot, deadline).await;
        return;
    }
    connection::serve(
        edge,
        WsIo::new(ws),
        BytesMut::new(),
        Origin {
            tls_cn,
            ..Origin::new(peer, Listener::WebSocket)
        },
        slot,
        deadline,
    )
    .await;
}

/// Reads until the end of the request head. `Ok(None)` when it exceeds [`MAX_HEAD`].
async fn read_head(
    stream: &mut impl WebStream,
    buf: &mut BytesMut,
) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(pos + 4));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn parse_head(bytes: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let method = req.method?.to_string();
    let (path, query) = req.path?.split_once('?').unwrap_or((req.path?, ""));
    let path = path.to_string();
    let token = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .and_then(percent_decode);
    let mut head = Head {
        method,
        path,
        upgrade_websocket: false,
        key: None,
        version_13: false,
        origin: None,
        protocols: Vec::new(),
        token,
    };
    let mut connection_upgrade = false;
    let mut upgrade_ws = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).ok()?.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.version_13 = value == "13";
        } else if name.eq_ignore_ascii_case("authorization") {
            let bearer = value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_string());
            if bearer.is_some() {
                head.token = bearer;
            }
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            head.protocols.extend(
                value
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty()),
            );
        }
    }
    head.upgrade_websocket = upgrade_ws && connection_upgrade;
    Some(head)
}

/// Decodes `%XX` escapes and `+` of a query value; `None` when it is not valid UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A HEAD response: the head GET would send (Content-Length included), without the body.
async fn respond_head_only(
    stream: &mut impl WebStream,
    status: u16,
    content_type: &str,
    body: &str,
) {
    write_response(stream, status, content_type, body, &[], false).await
}

async fn respond(
    stream: &mut impl WebStream,
    status: u16,
    content_type: &str,
    body: &str,
    extra: &[(&str, &str)],
) {
    write_response(stream, status, content_type, body, extra, true).await
}

async fn write_response(
    stream: &mut impl WebStream,
    status: u16,
    content_type: &str,
    body: &str,
    extra: &[(&str, &str)],
    with_body: bool,
) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        body.len()
    );
    for (k, v) in extra {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    if with_body {
        out.push_str(body);
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(out.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upgrade_with_protocol_list() {
        let req = b"GET /mqtt?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";
        let h = parse_head(req).unwrap();
        assert!(h.upgrade_websocket);
        assert_eq!(h.path, "/mqtt");
        assert_eq!(h.protocols, vec!["mqttv3.1", "mqtt"]);
        assert!(h.version_13);
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let h = parse_head(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert!(!h.upgrade_websocket);
        assert!(parse_head(b"\x00\x01garbage\r\n\r\n").is_none());
    }
}
