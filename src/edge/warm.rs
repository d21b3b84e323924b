//! Core connections opened ahead of time.
//!
//! Every client needs its own core connection before it gets its CONNACK, and opening one
//! (loopback TCP connect, rumqttd's accept, its connection task and router registration, the
//! core's CONNECT and CONNACK) took 150-240 us of a CONNACK's 270-330 us (BENCHMARKS.md,
//! "Where a connection's time goes"). A session that ends with its connection runs under a
//! pooled core client id (`registry::CoreIds`) and starts empty, so any clean core
//! connection under such an id will do: this pool keeps up to `[core] warm_connections` of
//! them open, and such a client takes one instead of waiting for a new one. Sessions kept
//! past their connection (slot ids, `registry::slot_core_id`) still connect as before.
//!
//! One task (`keep_warm`) refills the pool after every take and pings the connections that
//! have waited a ping interval (`core::CORE_PING_INTERVAL`), so the core never drops one for
//! its keep-alive; a connection found closed when taken is discarded and the client falls
//! back to a new connection. A burst of clients empties the pool and the rest connect as
//! before: the pool saves the wait for clients that come one at a time, not the CPU a
//! connection costs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{timeout, MissedTickBehavior};

use super::registry::{CoreIdLease, CoreIds};
use super::Edge;
use crate::core::{CoreLink, CORE_PING_INTERVAL};
use crate::metrics::Metrics;
use crate::mqtt;

/// How long a waiting connection's ping may take before the connection is dropped.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause between a take and the refill it starts.
const REFILL_DELAY: Duration = Duration::from_millis(2);
/// The pause after the core failed to open a connection before the next try.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The pool: at most `want` open, clean core connections, each under a pooled id taken out of
/// `CoreIds` for as long as it waits here.
pub struct WarmLinks {
    links: Mutex<VecDeque<Warm>>,
    want: usize,
    /// Told after every take, so the refill starts at once.
    taken: Notify,
}

struct Warm {
    link: CoreLink,
    /// The pooled id the connection runs under (`CoreIdLease::into_raw`).
    id: u32,
    /// When the core last answered on it (its CONNACK or a PINGRESP).
    checked: Instant,
}

impl WarmLinks {
    /// A pool of `want` connections (`[core] warm_connections`; 0 = none).
    pub fn new(want: usize) -> WarmLinks {
        WarmLinks {
            links: Mutex::new(VecDeque::with_capacity(want)),
            want,
            taken: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Warm>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections waiting in the pool.
    pub fn ready(&self) -> usize {
        self.lock().len()
    }

    /// An open core connection and the lease of the pooled id it runs under, if one waits.
    /// The one that waited least is taken; one the core has closed is discarded.
    pub fn take<'a>(&self, ids: &'a CoreIds) -> Option<(CoreLink, CoreIdLease<'a>)> {
        if self.want == 0 {
            return None;
        }
        loop {
            let warm = self.lock().pop_back()?;
            self.taken.notify_one();
            let lease = ids.adopt(warm.id);
            let mut link = warm.link;
            if is_open(&link.stream) {
                // The socket was opened on the pool task's runtime; the taker's connection
                // thread runs its own (`threads`), and a socket left with the other one's I/O
                // driver would have every core read cross threads to wake the connection.
                if let Ok(stream) = link.stream.into_std().and_then(TcpStream::from_std) {
                    link.stream = stream;
                    return Some((link, lease));
                }
            }
            // Closed (or not movable) before its id is given back (`CoreIdLease`'s rule).
        }
    }

    fn put(&self, warm: Warm) -> Result<(), Warm> {
        let mut links = self.lock();
        if links.len() >= self.want {
            return Err(warm);
        }
        links.push_back(warm);
        Ok(())
    }

    /// Takes out the connections the core has not answered on for a ping interval.
    fn take_due(&self, now: Instant) -> Vec<Warm> {
        let mut links = self.lock();
        let mut due = Vec::new();
        let mut i = 0;
        while i < links.len() {
            if now.duration_since(links[i].checked) >= CORE_PING_INTERVAL {
                if let Some(w) = links.remove(i) {
                    due.push(w);
                }
            } else {
                i += 1;
            }
        }
        due
    }

    fn drain(&self) -> Vec<Warm> {
        self.lock().drain(..).collect()
    }
}

/// Whether the core still has `stream` open: a look at the socket without reading (an end
/// of stream or an error means closed; bytes waiting or nothing yet mean open).
fn is_open(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(stream).peek(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

/// Keeps `edge.warm` full and its connections alive until shutdown, then closes them. Runs
/// as one task for the process's life (tracked, so shutdown waits for it).
pub async fn keep_warm(edge: Arc<Edge>) {
    let pool = &edge.warm;
    if pool.want == 0 {
        return;
    }
    let shutdown = edge.shutdown.clone();
    let mut ping = tokio::time::interval(CORE_PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        // Refill. A failure (the core refuses or cannot be reached) pauses before the next
        // try, and only the first of a run is logged as a warning.
        while pool.ready() < pool.want && !shutdown.is_cancelled() {
            let Some(lease) = edge.core_ids.lease() else {
                // Every pooled id in use: clients connecting now use ids of their own anyway.
                break;
            };
            let core_id = lease.core_id();
            let opened = tokio::select! {
                _ = shutdown.cancelled() => break,
                link = edge.core.connect(&core_id, true) => link,
            };
            match opened {
                Ok(link) if link.code == mqtt::rc::ACCEPTED => {
                    failing = false;
                    let warm = Warm {
                        link,
                        id: lease.into_raw(),
                        checked: Instant::now(),
                    };
                    if let Err(extra) = pool.put(warm) {
                        discard(&edge.core_ids, extra).await;
                    }
                }
                other => {
                    match other {
                        Ok(link) if !failing => {
                            tracing::warn!(code = link.code, "core refused a warm connection")
                        }
                        Err(e) if !failing => {
                            tracing::warn!(error = %e, "cannot open a warm core connection")
                        }
                        _ => {}
                    }
                    failing = true;
                    drop(lease);
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = pool.taken.notified() => {
                // The client that took one is busy with the core right now (its SUBSCRIBE,
                // its first PUBLISH): opening the next connection at once would make it wait
                // behind the core's work for that connection.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(REFILL_DELAY) => {}
                }
            }
            _ = ping.tick() => {
                for mut warm in pool.take_due(Instant::now()) {
                    if ping_once(&mut warm.link).await {
                        warm.checked = Instant::now();
                        if let Err(extra) = pool.put(warm) {
                            discard(&edge.core_ids, extra).await;
                        }
                    } else {
                        Metrics::inc(&edge.metrics.core_warm_lost);
                        discard(&edge.core_ids, warm).await;
                    }
                }
            }
        }
    }
    for warm in pool.drain() {
        discard(&edge.core_ids, warm).await;
    }
}

/// Closes a warm connection in order, then gives its id back.
async fn discard(ids: &CoreIds, warm: Warm) {
    let lease = ids.adopt(warm.id);
    super::close_core_link(warm.link.stream, &[]).await;
    drop(lease);
}

/// Sends a PINGREQ and waits for the PINGRESP; false if the connection failed or the core
/// sent something else (a clean connection without subscriptions gets nothing else).
async fn ping_once(link: &mut CoreLink) -> bool {
    let mut out = BytesMut::with_capacity(2);
    mqtt::put_pingreq(&mut out);
    let answered = timeout(PING_TIMEOUT, async {
        link.stream.write_all(&out).await.ok()?;
        loop {
            match mqtt::read_frame(&mut link.read_buf, usize::MAX) {
                Ok(Some(frame)) => return Some(frame.kind() == mqtt::PINGRESP),
                Ok(None) => {}
                Err(_) => return Some(false),
            }
            if link.stream.read_buf(&mut link.read_buf).await.ok()? == 0 {
                return Some(false);
            }
        }
    })
    .await;
    matches!(answered, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_connection_is_seen_as_closed_without_reading() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        assert!(is_open(&client), "open and quiet");
        server.write_all(b"x").await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(is_open(&client), "open with a byte waiting");
        // The byte is still there: `is_open` only looked.
        let mut client = client;
        let mut buf = [0u8; 1];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"x");
        drop(server);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!is_open(&client), "closed by the other end");
    }
}
