//! MQTT over TCP, and over TLS: each accepted socket goes to the MQTT connection handler,
//! after a TLS handshake on the TLS listener.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::{accept_loop, connection, tls, Edge, Listener, Origin};

/// Accepts until shutdown (see [`accept_loop`]).
pub async fn serve(edge: Arc<Edge>, listener: TcpListener) {
    accept_loop(
        edge,
        listener,
        Listener::Tcp,
        |edge, stream, peer, slot| async move {
            let deadline = Instant::now() + edge.handshake_timeout;
            connection::serve(
                edge,
                stream,
                BytesMut::new(),
                Origin::new(peer, Listener::Tcp),
                slot,
                deadline,
            )
            .await
        },
    )
    .await
}

/// Accepts MQTT over TLS until shutdown. The TLS handshake and the CONNECT share one
/// handshake deadline; a verified client certificate's common name goes into the origin.
pub async fn serve_tls(edge: Arc<Edge>, listener: TcpListener, acceptor: TlsAcceptor) {
    accept_loop(
        edge,
        listener,
        Listener::Tls,
        move |edge, stream, peer, slot| {
            let acceptor = acceptor.clone();
            async move {
                let deadline = Instant::now() + edge.handshake_timeout;
                let Ok((stream, tls_cn)) = tls::accept(&edge, &acceptor, stream, deadline).await
                else {
                    return;
                };
                let origin = Origin {
                    tls_cn,
                    ..Origin::new(peer, Listener::Tls)
                };
                connection::serve(edge, stream, BytesMut::new(), origin, slot, deadline).await
            }
        },
    )
    .await
}
