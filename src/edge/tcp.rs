//! MQTT over TCP: each accepted socket goes straight to the MQTT connection handler.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::{accept_loop, connection, Edge, Listener, Origin};

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
