//! MQTT over TCP: the accept loop.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{warn, Instrument};

use super::{connection, Edge, Listener};
use crate::metrics::Metrics;

/// Accepts until shutdown. Each socket gets its own task; a socket that cannot get a
/// handshake slot is closed at once (counted), so a flood never blocks the accept loop.
pub async fn serve(edge: Arc<Edge>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = edge.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off briefly rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = edge.handshakes.clone().try_acquire_owned() else {
            Metrics::inc(&edge.metrics.refused_handshake_overload);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("conn", %peer, listener = Listener::Tcp.as_str(), client_id = tracing::field::Empty);
        let deadline = Instant::now() + edge.handshake_timeout;
        let conn_edge = edge.clone();
        edge.tracker.spawn(
            async move {
                connection::serve(
                    conn_edge,
                    stream,
                    BytesMut::new(),
                    peer,
                    Listener::Tcp,
                    slot,
                    deadline,
                )
                .await
            }
            .instrument(span),
        );
    }
}
