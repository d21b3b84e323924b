//! One client connection: reads the CONNECT, applies the edge's policies, opens the client's
//! own connection to the core and then relays packets both ways, translating and policing.
//!
//! The relay is one task with one event loop over both sockets (no channels, no locks): reads
//! from either side are parsed into packets, each packet appends to the other side's output
//! buffer, and the buffers are written as large as they have grown, so a burst costs few
//! system calls. Reading from a side stops while the opposite output buffer is over its high
//! watermark; that is the back-pressure that keeps a slow client's messages queued in the core
//! instead of in vigil's memory, and a client whose output has not drained for
//! `write_stall_timeout` is disconnected as a slow consumer.
//!
//! What the relay does beyond copying (each a rumqttd defect or gap made unreachable):
//! - The core is always spoken to in MQTT 3.1.1; v5 clients are translated and their
//!   end-to-end properties travel in the payload envelope (see `envelope`).
//! - Delivery QoS is min(publish QoS, subscription QoS): the core delivers at the subscription's
//!   QoS, so when the publisher used less, the edge acknowledges the core itself.
//! - Acknowledgements reach the core in the order it sent the messages, whatever order the
//!   client acknowledges in, because rumqttd disconnects on an out-of-order ack.
//! - PINGREQ is answered here and the core is pinged on the edge's own schedule, so
//!   keep-alive 0 works and a client's keep-alive is enforced here.
//! - Inbound QoS 2 is the edge's, because rumqttd routes QoS 2 only at PUBREL and forgets that
//!   state when a client reconnects: the edge answers PUBREC at once, holds the message until
//!   the client's PUBREL (as mosquitto does), then gives it to the core at QoS 1, which routes
//!   it on receipt; PUBCOMP goes out then (early, as below) or at the core's PUBACK. The
//!   packet ids survive reconnects (see `registry`), and a message never released is routed
//!   when the connection ends.
//! - MQTT 5 features the core cannot hold: the client's Receive Maximum (without holding back
//!   acknowledgements, see `held`), the subscription options No Local, Retain As Published and
//!   Retain Handling (`apply_options`), Subscription Identifiers, Message Expiry (an instant
//!   in the envelope), and the timers of Session Expiry and Will Delay that the registry keeps
//!   once the connection ends.
//! - The subscribe fence: every connection has its own core connection, so a PUBLISH could
//!   overtake another client's SUBSCRIBE sent just before it and miss the new subscriber,
//!   where a single-threaded broker (mosquitto) would deliver it; or overtake an UNSUBSCRIBE
//!   and reach a client that has just left the topic. While other connections' SUBSCRIBEs or
//!   UNSUBSCRIBEs are in flight to the core, a client's PUBLISH waits for their answers, at
//!   most [`FENCE_MAX_WAIT`] and once per read (`deferred`).
//! - Early acknowledgements: a client's QoS 1 PUBLISH is acknowledged (and a released QoS 2
//!   one completed with PUBCOMP) as soon as the edge has handed it to the core (queued on the
//!   core connection, which is written before the connection closes), not after the core's
//!   PUBACK, so a client that waits for each acknowledgement pays one hop instead of three.
//!   Only while few of its publishes are on their way ([`EARLY_ACK_WINDOW`]): a client that
//!   pipelines is acknowledged by the core, as before, because those acknowledgements pace it
//!   to what the core's router keeps up with;
//!   acknowledging all of them early let such a publisher outrun its subscribers until the
//!   core's log overran and dropped QoS 1 messages (ARCHITECTURE.md). Toward the core the
//!   edge numbers publishes itself (`next_core_id`), because a client may reuse an
//!   acknowledged packet id before the core has acknowledged it. The reverse fence keeps
//!   what early acknowledgements could otherwise show: a SUBSCRIBE waits, like a PUBLISH at
//!   the subscribe fence, while publishes other connections were acknowledged for have not
//!   reached the core, so a retained message acknowledged before a SUBSCRIBE is sent is
//!   delivered on it.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::fence;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;
use tracing::{debug, info, warn};

use super::copies::Copies;
use super::fresh;
use super::limits::RateLimiter;
use super::policy::{self, Credentials, Identity};
use super::registry::{
    slot_core_id, Claim, Keep, OfflineState, Redelivery, SubOptions, Timers, Will, MAX_PENDING_QOS2,
};
use super::retained::Retained;
use super::{ClientStream, Edge, Listener, Origin};
use crate::core::{CoreError, CORE_PING_INTERVAL};
use crate::envelope;
use crate::metrics::Metrics;
use crate::mqtt::{self, rc, reason, CodecError, Frame, Version};

/// How long a client's PUBLISH waits at most for other connections' SUBSCRIBEs and
/// UNSUBSCRIBEs in flight to the core (the subscribe fence), or a SUBSCRIBE for
/// early-acknowledged publishes (the publish fence), and how often it looks whether they have
/// been answered.
const FENCE_MAX_WAIT: Duration = Duration::from_millis(5);
const FENCE_TICK: Duration = Duration::from_millis(1);

/// Longest a connection ended for a protocol error or its rate waits for the client to close
/// after the DISCONNECT (see `close`).
const LINGER: Duration = Duration::from_secs(1);
/// Output buffered for one side before the relay stops reading from the other side.
const HIGH_WATERMARK: usize = 256 * 1024;
/// Receive Maximum announced to v5 clients: the QoS 2 publishes a connection may have open
/// (PUBCOMP not yet sent), the bound of the state the edge keeps for them. The next one ends
/// the connection with 0x93, as MQTT 5 section 4.9 describes and mosquitto does at its own
/// inflight maximum; a 3.1.1 client, told nothing, is closed at the same count. QoS 1
/// publishes are not counted: the edge may acknowledge a pipelined burst late, and clients
/// that ignore the Receive Maximum (MQTT.js 5 keeps no send quota) work on mosquitto, which
/// acknowledges them on receipt.
const RECEIVE_MAXIMUM: u16 = MAX_PENDING_QOS2 as u16;
/// Bytes of inbound QoS 2 messages a connection holds between PUBLISH and PUBREL (one message
/// is always held, whatever its size). Past it a QoS 2 message goes to the core on arrival,
/// and the client's PUBREL only ends its flow: bounded memory, nothing refused.
const HELD_QOS2_MAX_BYTES: usize = 256 * 1024;
/// Client publishes the edge hands to the core before the core has acknowledged them; past it
/// the edge stops reading from the client (a 3.1.1 client has no receive maximum to obey).
const CORE_WINDOW: usize = 1000;
/// A client QoS 1 publish is acknowledged on its way to the core while fewer than this many of
/// the client's publishes await the core's acknowledgement, none of them acknowledged late;
/// a released QoS 2 publish is completed (PUBCOMP) on its way while fewer than this many do.
const EARLY_ACK_WINDOW: usize = 4;
/// Topic aliases a v5 client may use in its PUBLISHes (announced in CONNACK; mosquitto's
/// default too). Each keeps a copy of its topic, so at most this many topics per connection.
const CLIENT_TOPIC_ALIASES: u16 = 10;
/// rumqttd's fixed window of unacknowledged deliveries per connection.
const CORE_INFLIGHT: usize = 100;
/// Unacknowledged core deliveries tolerated before the core is considered broken.
const MAX_CORE_INFLIGHT: usize = 4096;
/// SUBSCRIBE/UNSUBSCRIBE requests a client may have outstanding at the core.
const MAX_PENDING_CONTROL: usize = 1024;
/// Longest a graceful close waits for the core to finish reading our DISCONNECT.
const CORE_CLOSE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("timed out waiting for CONNECT")]
    HandshakeTimeout,
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("core: {0}")]
    Core(#[from] CoreError),
}

/// Serves one client from its first byte to its last. `slot` is the handshake slot, held until
/// the CONNECT has arrived; then the client takes a connection-cap permit, or is refused with a
/// proper CONNACK when the edge is full.
pub async fn serve<S>(
    edge: Arc<Edge>,
    mut stream: S,
    mut read_buf: BytesMut,
    origin: Origin,
    slot: OwnedSemaphorePermit,
    handshake_deadline: Instant,
) where
    S: ClientStream,
{
    let frame = match read_connect(&edge, &mut stream, &mut read_buf, handshake_deadline).await {
        Ok(frame) => frame,
        Err(ConnError::HandshakeTimeout) => {
            Metrics::inc(&edge.metrics.handshake_timeouts);
            debug!("closed: no CONNECT in time");
            return;
        }
        Err(e) => {
            Metrics::inc(&edge.metrics.protocol_errors);
            // Not MQTT, or a first packet over the size limit: there is no version to answer
            // in, so the socket is simply closed.
            debug!(error = %e, "closed before CONNECT");
            return;
        }
    };
    let version = mqtt::connect_version(&frame.body);
    // The handshake slot is kept through a refusal, so refusals stay bounded too.
    let Ok(permit) = edge.connections.clone().try_acquire_owned() else {
        Metrics::inc(&edge.metrics.refused_over_cap);
        info!("refused: connection cap reached");
        if let Some(v) = version {
            let code = match v {
                Version::V311 => rc::SERVER_UNAVAILABLE,
                Version::V5 => reason::SERVER_BUSY,
            };
            refuse(&mut stream, v, code).await;
        }
        return;
    };
    drop(slot);
    let connect = match mqtt::parse_connect(&frame) {
        Ok(c) => c,
        Err(e) => {
            Metrics::inc(&edge.metrics.protocol_errors);
            info!(error = %e, "refused: bad CONNECT");
            match (&e, version) {
                // A level past 5 is a client newer than MQTT 5: the v5 form and 0x84, which
                // MQTT 5 (3.1.2.2) suggests. Below, 3.1.1's answer (MQTT-3.1.2-2), as mosquitto
                // gives every unknown level.
                (CodecError::UnsupportedProtocol { level, .. }, _) if *level > 5 => {
                    refuse(&mut stream, Version::V5, e.reason_code()).await
                }
                (CodecError::UnsupportedProtocol { .. }, _) => {
                    refuse(&mut stream, Version::V311, rc::UNACCEPTABLE_PROTOCOL).await
                }
                (_, Some(Version::V5)) => refuse(&mut stream, Version::V5, e.reason_code()).await,
                _ => {}
            }
            return;
        }
    };
    let Origin {
        peer,
        listener,
        tls_cn,
        identity: identity_out,
    } = origin;
    let Some(_ip_slot) = edge.policy.ip_slot(peer.ip()) else {
        Metrics::inc(&edge.metrics.refused_per_ip);
        info!("refused: too many connections from this address");
        let code = match connect.version {
            Version::V311 => rc::SERVER_UNAVAILABLE,
            Version::V5 => reason::CONNECTION_RATE_EXCEEDED,
        };
        refuse(&mut stream, connect.version, code).await;
        return;
    };
    let counter = match listener {
        Listener::Tcp => &edge.metrics.tcp_connections,
        Listener::Tls => &edge.metrics.tls_connections,
        Listener::WebSocket => &edge.metrics.ws_connections,
        Listener::Bridge => &edge.metrics.bridge_sessions,
    };
    counter.fetch_add(1, Relaxed);
    Metrics::inc(&edge.metrics.connections_total);
    let result = Session::run(
        &edge,
        stream,
        read_buf,
        connect,
        peer,
        tls_cn.as_deref(),
        identity_out.as_deref(),
    )
    .await;
    counter.fetch_sub(1, Relaxed);
    drop(permit);
    if let Err(e) = result {
        debug!(error = %e, "connection ended");
    }
}

async fn read_connect<S>(
    edge: &Edge,
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<Frame, ConnError>
where
    S: AsyncRead + Unpin,
{
    let max = edge.policy.max_packet_size;
    tokio::time::timeout_at(deadline, async {
        loop {
            if let Some(frame) = mqtt::read_frame(buf, max)? {
                if frame.kind() != mqtt::CONNECT {
                    return Err(ConnError::NotConnect);
                }
                return Ok(frame);
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(4096);
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    })
    .await
    .map_err(|_| ConnError::HandshakeTimeout)?
}

/// Sends a refusing CONNACK and closes.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, version: Version, code: u8) {
    let mut out = BytesMut::with_capacity(16);
    mqtt::put_connack(&mut out, version, false, code, None);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Why the relay loop ended; decides what the core and the client are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent DISCONNECT: the will is discarded.
    ClientDisconnect,
    /// The client sent v5 DISCONNECT 0x04: close so that the will is published.
    ClientDisconnectWithWill,
    /// The client's socket closed or failed: the will is published.
    ClientGone,
    KeepAliveTimeout,
    SlowConsumer,
    ProtocolError(u8),
    /// A second CONNECT (MQTT-3.1.0-2): a protocol error, closed without a DISCONNECT, as
    /// mosquitto does. Only test tools send one, and paho's interoperability client reads the
    /// socket from two threads then: one takes the DISCONNECT's first byte, the other the
    /// rest, and the first waits forever for the rest (its `test_basic` hung in 5 of 12
    /// runs). The close itself tells the client; the count is `protocol_errors`.
    SecondConnect,
    /// A v5 client over its role's publish rate: DISCONNECT 0x96.
    RateLimited,
    TakenOver,
    Shutdown,
    CoreGone,
}

/// What a PINGREQ the edge sent the core is for. rumqttd answers pings in order with its other
/// acknowledgements, so a PINGRESP proves that everything sent before the PINGREQ has been
/// processed.
#[derive(Debug, Clone)]
enum PingFor {
    /// Keep-alive, or making the core flush pending acknowledgements.
    Nothing,
    /// A resumed session: the core has re-sent every PUBREL of the earlier connection by the
    /// time it answers.
    Resume,
    /// The client's UNSUBSCRIBE: answer it with one UNSUBACK. `fenced`: it went to the core
    /// and holds other connections' publishes at the subscribe fence until this answer.
    Unsubscribe {
        pkid: u16,
        codes: Vec<u8>,
        fenced: bool,
    },
}

/// A PUBACK, with its reason code when that is not success (v5 only sets one).
fn put_puback(out: &mut BytesMut, pkid: u16, reason: u8) {
    match reason {
        reason::SUCCESS => mqtt::put_ack(out, mqtt::PUBACK, pkid),
        code => mqtt::put_ack_reason(out, mqtt::PUBACK, pkid, code),
    }
}

/// `$` filters other than shared subscriptions: rumqttd refuses them (by dropping the
/// connection), and nothing routes a `$` topic anyway.
fn is_dollar_filter(filter: &[u8]) -> bool {
    filter.first() == Some(&b'$') && !filter.starts_with(b"$share/")
}

/// Subscription option bits the core cannot hold: No Local, Retain As Published.
pub(crate) const NO_LOCAL: u8 = 0x04;
const RETAIN_AS_PUBLISHED: u8 = 0x08;
/// The edge's mark (a bit reserved in MQTT) on a subscription restored from the registry with
/// a resumed session, not yet subscribed on this connection.
const RESTORED: u8 = 0x80;
/// Retained messages read from the store at a time (`RetainedStore::page`).
const RETAINED_PAGE: usize = 64;
/// Subscriptions a connection may have waiting for their retained messages; a SUBSCRIBE's
/// filters past that get none, counted in `vigil_retained_not_sent_total`.
const MAX_RETAINED_CURSORS: usize = 1024;
/// QoS 1/2 deliveries held for or unacknowledged by the client past which retained messages
/// wait for acknowledgements: leaves room below [`MAX_CORE_INFLIGHT`] for the core's whole
/// window.
const RETAINED_HELD: usize = MAX_CORE_INFLIGHT - 2 * CORE_INFLIGHT;
/// Retain Handling 2: no retained messages when subscribing.
fn no_retained_on_subscribe(options: u8) -> bool {
    (options >> 4) & 0x03 == 2
}

/// Whether the edge must look at a subscription when delivering (see
/// `Session::apply_options`): it has options beyond QoS or a Subscription Identifier.
/// Retain Handling 1 needs nothing: the edge decides at the SUBSCRIBE whether a subscription
/// that did not exist gets retained messages (`retained_due`).
pub(crate) fn needs_edge(sub: SubOptions) -> bool {
    sub.options & (NO_LOCAL | RETAIN_AS_PUBLISHED) != 0
        || no_retained_on_subscribe(sub.options)
        || sub.id != 0
}

/// A client publish handed to the core and not yet acknowledged by it.
#[derive(Debug, Clone, Copy)]
struct Forwarded {
    /// The edge's packet id toward the core.
    core_id: u16,
    /// The client's packet id and QoS (2: the core's PUBACK lets the edge send PUBCOMP, see
    /// `InboundQos2`).
    client_id: u16,
    qos: u8,
    /// QoS 1 acknowledged to the client already (otherwise the core's PUBACK becomes the
    /// client's).
    early: bool,
    /// The v5 reason code of the client's PUBACK: 0, or 0x10 when nothing subscribed to a
    /// matching filter (`filters`).
    reason: u8,
    sent: Instant,
}

/// Where a client's publish went (`forward_publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routed {
    /// To the core; a QoS 1 or 2 publish is `core_fwd`'s last entry until the core acknowledges it.
    Core,
    /// Nowhere: no subscription can match its topic, so the edge answered it (and stored it,
    /// if retained) without the core (`answer_unrouted`).
    Nowhere,
}

/// An inbound QoS 2 message between the client's PUBLISH and the edge's PUBCOMP. The edge
/// answers the PUBLISH with PUBREC at once and holds the message until the client's PUBREL,
/// then hands it to the core (MQTT 5 section 4.3.3, method A, as mosquitto does), so nothing
/// reaches a subscriber before the publisher has released it. PUBCOMP follows once the core
/// has acknowledged the message and the client has released it.
#[derive(Debug)]
struct InboundQos2 {
    pkid: u16,
    /// The message until the client's PUBREL; `None` once handed to the core (or, when more
    /// than [`HELD_QOS2_MAX_BYTES`] are held, handed to it at once, or refused).
    held: Option<HeldPublish>,
    /// The core acknowledged it (or never will see it: refused).
    routed: bool,
    /// The client's PUBREL arrived.
    released: bool,
}

/// A client's QoS 2 PUBLISH as it will go to the core, with copies of its parts (a slice
/// would keep the whole read buffer, see `owned`).
#[derive(Debug)]
struct HeldPublish {
    topic: Bytes,
    /// The envelope header (`envelope::header_with`), made when the PUBLISH arrived.
    header: Bytes,
    payload: Bytes,
    retain: bool,
}

impl HeldPublish {
    fn size(&self) -> usize {
        self.topic.len() + self.header.len() + self.payload.len()
    }
}

/// A delivery from the core awaiting acknowledgement (to the core, in order).
#[derive(Debug, Clone, Copy)]
struct CoreAck {
    /// The core's packet id.
    pkid: u16,
    /// The packet id the client sees (0 when it got the message at QoS 0). The edge numbers
    /// deliveries itself: rumqttd restarts its numbering on every connection, re-sends a
    /// resumed session's unacknowledged messages under new ids without DUP, and reuses ids
    /// whose QoS 2 exchange is still awaiting PUBCOMP (MQTT-2.2.1-3, MQTT-4.4.0-1).
    client_id: u16,
    /// PUBACK for a QoS 1 delivery, PUBREC for QoS 2.
    kind: u8,
    ready: bool,
    /// The client received it at QoS 2, so the core's PUBREL goes on to the client.
    client_qos2: bool,
    /// Topic and payload digest, kept for persistent sessions to recognise a re-send.
    fingerprint: u64,
}

struct Session<S> {
    version: Version,
    client: S,
    core: TcpStream,
    client_in: BytesMut,
    core_in: BytesMut,
    client_out: BytesMut,
    core_out: BytesMut,
    client_max_packet: usize,
    /// The client's Receive Maximum (v5; 3.1.1 clients have none).
    client_receive_max: u16,
    keep_alive: Option<Duration>,
    last_client_read: Instant,
    last_core_write: Instant,
    last_client_drain: Instant,
    stall_timeout: Duration,
    /// QoS 1/2 deliveries from the core, in the order the core sent them.
    core_acks: std::collections::VecDeque<CoreAck>,
    /// PUBRELs from the core awaiting PUBCOMP (core id, client id, ready), in the order the
    /// core sent them. Core id 0: a PUBREL the edge sent on its own, never acknowledged to
    /// the core.
    core_pubrels: std::collections::VecDeque<(u16, u16, bool)>,
    /// Deliveries acknowledged to the core with PUBREC whose PUBREL must reach the client:
    /// (core id, client id).
    pubrel_to_client: Vec<(u16, u16)>,
    /// The same for an earlier connection of this session: the core re-sends these PUBRELs
    /// (under that connection's core ids) right after the CONNACK.
    pubrel_to_client_earlier: Vec<(u16, u16)>,
    /// QoS 2 deliveries the client got at QoS 0 or 1, whose PUBREL the edge answers itself.
    local_pubrel: Vec<u16>,
    /// Client publishes handed to the core and not yet acknowledged by it, in the order sent.
    core_fwd: std::collections::VecDeque<Forwarded>,
    /// The edge's next packet id for a publish to the core (see `alloc_core_id`).
    next_core_id: u16,
    /// Inbound QoS 2 flows of this connection, from the PUBLISH to the edge's PUBCOMP.
    inbound_qos2: Vec<InboundQos2>,
    /// Bytes of the messages held in `inbound_qos2` (at most [`HELD_QOS2_MAX_BYTES`] beyond one).
    held_qos2_bytes: usize,
    /// Inbound QoS 2 ids forwarded on an earlier connection of this session.
    inbound_qos2_earlier: Vec<u16>,
    /// Deliveries the core had not seen acknowledged when the previous connection ended: the
    /// core's re-sending of them keeps the client id and is marked DUP.
    redeliveries: Vec<Redelivery>,
    /// Next client packet id to try for a delivery.
    next_client_id: u16,
    /// New client ids must be checked against the ids in flight: after a wrap-around, or
    /// from the start when an earlier connection of the session left ids in flight.
    check_client_ids: bool,
    /// The session outlives the connection: deliveries carry a fingerprint.
    persistent: bool,
    /// This connection resumed a stored session.
    resumed: bool,
    /// SUBSCRIBEs the edge sent on its own (see UNSUBSCRIBE): their SUBACKs are not the
    /// client's.
    internal_subacks: Vec<u16>,
    /// Who the client is, for the ACL, and its client id (`%c`).
    identity: Identity,
    client_id: String,
    /// The last topic the ACL allowed this client to publish to: devices publish to the same
    /// few topics, so most checks are one comparison.
    last_allowed_topic: Option<Bytes>,
    /// Whether some filter may match `last_allowed_topic`, as of a `FilterIndex`
    /// generation (v5 QoS 1 publishes only, for PUBACK 0x10).
    last_topic_subscribed: Option<(u64, bool)>,
    /// The role's publish rate limit.
    rate: RateLimiter,
    /// Messages dropped for the rate limit since the last log line about it.
    rate_dropped: u64,
    rate_logged: Option<Instant>,
    /// The session's subscriptions (the `max_subscriptions` count), with their options byte
    /// and Subscription Identifier; a resumed session starts with those of its earlier
    /// connection (marked `RESTORED`) when some of them needed the edge (`needs_edge`).
    subscriptions: std::collections::HashMap<Bytes, SubOptions>,
    /// Some subscription needs the edge at delivery (`needs_edge`).
    options_in_use: bool,
    /// `subscriptions` holds every subscription of the session: false when a resumed
    /// session's earlier subscriptions were not kept (none needed the edge, or the offline
    /// store was full).
    subscriptions_known: bool,
    /// The client has unsubscribed a shared subscription. rumqttd goes on delivering one
    /// that was waiting for data (it looks the waiter up under the whole `$share/...`
    /// filter, which it filed under the filter proper), so from then on the edge drops
    /// deliveries that no subscription of the session matches.
    shared_unsubscribed: bool,
    /// The Subscription Identifier properties of the delivery being written (reused).
    sub_id_props: BytesMut,
    /// The subscriptions matching the delivery being written, when the edge looks (reused).
    matching: Vec<SubOptions>,
    /// Which subscription each of the core's copies of a message is for (see `copies`).
    copies: Copies,
    /// Topic aliases for the deliveries to a v5 client that accepts them.
    aliases: TopicAliases,
    /// The topics the client's own Topic Aliases stand for (alias 1 first; empty: not set).
    client_aliases: Vec<Bytes>,
    /// This connection's SUBSCRIBEs and UNSUBSCRIBEs handed to the core and not yet answered.
    own_subscribes: InFlight,
    /// This connection's publishes acknowledged to the client and not yet by the core.
    own_early_acks: InFlight,
    /// A client PUBLISH or SUBSCRIBE held at a fence, and until when at most; reading from the
    /// client stops meanwhile, so the client's packets keep their order.
    deferred: Option<(Frame, Instant)>,
    /// This connection, watched by the subscribe fence until its first packet is handled.
    fresh: Option<Watched>,
    /// Digest of the client id, the origin this client's publishes carry for No Local.
    origin: u64,
    /// Session Expiry Interval (seconds; `u32::MAX` never): v5 CONNECT's, changed by a
    /// DISCONNECT; for 3.1.1, never for a persistent session and 0 otherwise.
    session_expiry: u32,
    /// Why each PINGREQ the edge sent the core is outstanding, in order (see `PingFor`).
    core_pings: std::collections::VecDeque<PingFor>,
    /// SUBSCRIBEs whose `$` filters the edge answered itself: packet id and, per filter, the
    /// edge's code or `None` for a code the core's SUBACK supplies.
    pending_subacks: Vec<(u16, Vec<Option<u8>>)>,
    prefer_core: bool,
    /// The client's will, published by the edge when the connection ends without DISCONNECT,
    /// at once or after its Will Delay Interval (see `run_claimed`).
    will: Option<Will>,
    will_delay: u32,
    /// QoS 1/2 deliveries read from the core while the client's Receive Maximum was full, in
    /// the order the core sent them. Holding them here rather than pausing core reads lets
    /// the acknowledgements of the client's own publishes (queued behind them on the core
    /// connection) through. Bounded by the core's inflight window ([`CORE_INFLIGHT`]), and
    /// checked against [`MAX_CORE_INFLIGHT`]. A session restored after a restart starts with
    /// what the core held for it then (`OfflineState::queued`, the first `restored` frames),
    /// so the core's deliveries wait behind them.
    held: std::collections::VecDeque<Frame>,
    /// How many frames at the front of `held` are restored ones (packet id 0, the edge's own).
    restored: usize,
    /// A restored frame is being delivered: it may be a delivery the client has seen under an
    /// id of its own (`redeliveries`), unlike the edge's other deliveries with packet id 0.
    delivering_restored: bool,
    /// Restored QoS 1/2 deliveries, with the client id and digest they went out with: those
    /// the client has not acknowledged when it goes are kept for its next connection
    /// (`offline_queue`). At most `registry::MAX_QUEUED`.
    restored_out: Vec<(u16, u64, Frame)>,
    /// SUBSCRIBEs in the core whose filters are owed their retained messages once the core
    /// grants them: packet id and, per filter, its place among the filters sent to the core
    /// and the filter.
    retained_due: Vec<(u16, Vec<(usize, Bytes)>)>,
    /// Subscriptions whose retained messages are being sent, in the order of their SUBACKs
    /// (see `send_retained`). While there are any, the core is not read (its deliveries would
    /// overtake them), unless QoS 1/2 ones wait for the client's acknowledgements.
    retained_out: std::collections::VecDeque<RetainedCursor>,
    /// Read sizes for the next reads from each side (see `next_step`).
    client_step: usize,
    core_step: usize,
}

impl<S> Session<S>
where
    S: ClientStream,
{
    async fn run(
        edge: &Arc<Edge>,
        mut client: S,
        client_in: BytesMut,
        connect: mqtt::Connect,
        peer: SocketAddr,
        tls_cn: Option<&str>,
        identity_out: Option<&std::sync::OnceLock<Identity>>,
    ) -> Result<(), ConnError> {
        let version = connect.version;
        let span = tracing::Span::current();

        // Identity.
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if version == Version::V311 && !connect.clean_start {
                info!("refused: empty client id with a persistent session");
                refuse(&mut client, version, rc::IDENTIFIER_REJECTED).await;
                return Ok(());
            }
            let id = policy::generate_client_id();
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        span.record("client_id", client_id.as_str());
        if let Err(why) = edge.policy.check_client_id(&client_id) {
            info!(reason = why, "refused: client id");
            let code = match version {
                Version::V311 => rc::IDENTIFIER_REJECTED,
                Version::V5 => reason::CLIENT_ID_NOT_VALID,
            };
            refuse(&mut client, version, code).await;
            return Ok(());
        }
        if connect.auth_method {
            refuse(&mut client, version, reason::BAD_AUTH_METHOD).await;
            return Ok(());
        }
        let creds = Credentials {
            username: connect.username.as_deref(),
            password: connect.password.as_deref(),
            tls_cn,
        };
        let not_authorized = match version {
            Version::V311 => rc::NOT_AUTHORIZED,
            Version::V5 => reason::NOT_AUTHORIZED,
        };
        let identity = match edge.policy.authenticate(peer.ip(), creds).await {
            Ok(identity) => identity,
            Err(why) => {
                Metrics::inc(&edge.metrics.auth_failures);
                warn!(reason = why, %peer, user = connect.username.as_deref().unwrap_or(""), "authentication failed");
                // As mosquitto answers a failed login: 3.1.1 "not authorized" (5), v5 "bad
                // user name or password" (0x86), whichever part was wrong.
                let code = match version {
                    Version::V311 => rc::NOT_AUTHORIZED,
                    Version::V5 => reason::BAD_USER_NAME_OR_PASSWORD,
                };
                refuse(&mut client, version, code).await;
                return Ok(());
            }
        };
        if let Some(w) = &connect.will {
            if !edge.policy.may_publish(&identity, &client_id, &w.topic) {
                Metrics::inc(&edge.metrics.acl_denied_publish);
                warn!(user = %identity.user, role = %identity.role, topic = %String::from_utf8_lossy(&w.topic), "refused: will topic not allowed");
                refuse(&mut client, version, not_authorized).await;
                return Ok(());
            }
            if !edge.admit_topic(&w.topic) {
                let code = match version {
                    Version::V311 => rc::SERVER_UNAVAILABLE,
                    Version::V5 => reason::QUOTA_EXCEEDED,
                };
                refuse(&mut client, version, code).await;
                return Ok(());
            }
        }
        if let Some(out) = identity_out {
            let _ = out.set(identity.clone());
        }
        let (keep_alive, keep_alive_changed) = edge.policy.keep_alive(connect.keep_alive);

        // Session persistence: 3.1.1 clean session, or v5 clean start + session expiry.
        let persistent = match version {
            Version::V311 => !connect.clean_start,
            Version::V5 => connect.session_expiry > 0,
        };
        let resume = !connect.clean_start;

        let claim = edge.registry.claim(&client_id, &edge.shutdown).await;
        let result = Self::run_claimed(
            edge,
            client,
            client_in,
            connect,
            &client_id,
            identity,
            assigned,
            keep_alive,
            keep_alive_changed,
            persistent,
            resume,
            &claim,
        )
        .await;
        edge.registry.release(&client_id, &claim);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_claimed(
        edge: &Arc<Edge>,
        mut client: S,
        client_in: BytesMut,
        connect: mqtt::Connect,
        client_id: &str,
        identity: Identity,
        assigned: Option<String>,
        keep_alive: u16,
        keep_alive_changed: bool,
        persistent: bool,
        resume: bool,
        claim: &Claim,
    ) -> Result<(), ConnError> {
        let version = connect.version;
        // A session kept past this connection runs in the core under its slot's id
        // (`registry::slot_core_id`) and counts against `limits.max_persistent_sessions`; one
        // that ends with it runs under a pooled id (`registry::CoreIds`). A clean session that
        // finds an earlier kept one removes it from the core first, as MQTT requires.
        let core_clean = !(persistent || resume);
        let slot = if core_clean {
            if let Some(slot) = edge.registry.end_session(client_id) {
                edge.wipe_core_session(&slot_core_id(slot)).await;
                edge.registry.free_slot(slot);
            }
            None
        } else {
            let (slot, earlier) = match edge.registry.keep_session(client_id, &edge.shutdown) {
                Keep::Earlier(slot) => (slot, true),
                Keep::New(slot) => (slot, false),
                Keep::Evicting(slot, due) => {
                    info!(evicted = %due.client_id, "persistent session cap reached: the session offline longest makes room");
                    edge.settle(*due).await;
                    (slot, false)
                }
                Keep::Full => {
                    Metrics::inc(&edge.metrics.persistent_session_refusals);
                    warn!("refused: persistent session cap reached, all of them connected");
                    let code = match version {
                        Version::V311 => rc::SERVER_UNAVAILABLE,
                        Version::V5 => reason::QUOTA_EXCEEDED,
                    };
                    refuse(&mut client, version, code).await;
                    return Ok(());
                }
            };
            // v5 semantics rumqttd's 3.1.1 session flag cannot express directly: a fresh start
            // of a session that must outlive this connection wipes the old one first.
            if earlier && !resume {
                edge.wipe_core_session(&slot_core_id(slot)).await;
            }
            Some(slot)
        };
        edge.note_kept_sessions();
        if !resume {
            edge.registry.forget_session(client_id);
        }
        // A session that ends with this connection takes a core connection opened ahead of
        // time when one waits (`warm`).
        let (lease, warm) = match slot {
            Some(_) => (None, None),
            None => match edge.take_warm() {
                Some((link, lease)) => (Some(lease), Some(link)),
                None => (edge.lease_core_id(), None),
            },
        };
        let core_id = match (slot, &lease) {
            (Some(slot), _) => slot_core_id(slot),
            (None, Some(lease)) => lease.core_id(),
            (None, None) => policy::core_client_id(client_id),
        };
        // A session that had gone offline: reconnecting stops its timers. Its delayed will is
        // published now if this connection ends the session (clean start), and never otherwise
        // (MQTT-3.1.3-9).
        if let Some(timers) = edge.registry.take_timers(client_id) {
            if let (false, Some((_, will))) = (resume, timers.will) {
                edge.publish_will(&will).await;
            }
        }
        // The edge publishes the will itself (see `close`): the core never holds one.
        let will_delay = connect.will.as_ref().map_or(0, |w| w.delay);
        let will = connect.will.as_ref().map(|w| Will {
            topic: owned(&w.topic),
            retain: w.retain,
            qos: w.qos,
            properties: owned(&w.properties),
            message_expiry: w.message_expiry,
            payload: owned(&w.payload),
        });
        let link = match warm {
            Some(link) => Ok(link),
            None => edge.core.connect(&core_id, core_clean).await,
        };
        let link = match link {
            Ok(link) if link.code == 0 => link,
            Ok(link) => {
                warn!(code = link.code, "core refused the connection");
                let code = match version {
                    Version::V311 => rc::SERVER_UNAVAILABLE,
                    Version::V5 => reason::SERVER_UNAVAILABLE,
                };
                refuse(&mut client, version, code).await;
                return Ok(());
            }
            Err(e) => {
                warn!(error = %e, "cannot open the client's core connection");
                let code = match version {
                    Version::V311 => rc::SERVER_UNAVAILABLE,
                    Version::V5 => reason::SERVER_UNAVAILABLE,
                };
                refuse(&mut client, version, code).await;
                return Err(e.into());
            }
        };

        let session_present = resume && link.session_present;
        let mut client_out = BytesMut::with_capacity(256);
        // `limits.persistent_session_expiry_secs` caps what a v5 client asks for, and the
        // CONNACK tells it (MQTT 5 section 3.2.2.3.2).
        let expiry_lowered = match edge.registry.max_session_expiry() {
            Some(max) if version == Version::V5 && connect.session_expiry > max => Some(max),
            _ => None,
        };
        let props = mqtt::ConnackProperties {
            assigned_client_id: assigned,
            server_keep_alive: keep_alive_changed.then_some(keep_alive),
            receive_maximum: RECEIVE_MAXIMUM,
            maximum_packet_size: edge.policy.max_packet_size as u32,
            topic_alias_maximum: CLIENT_TOPIC_ALIASES,
            session_expiry: expiry_lowered,
        };
        mqtt::put_connack(&mut client_out, version, session_present, 0, Some(&props));
        debug!(persistent, session_present, keep_alive, "connected");

        let offline = if resume {
            edge.registry.take_offline(client_id)
        } else {
            OfflineState::default()
        };
        let ids_in_flight = !offline.unacked_out.is_empty() || !offline.pubrel_out.is_empty();
        let session_expiry = match version {
            Version::V5 => expiry_lowered.unwrap_or(connect.session_expiry),
            Version::V311 if persistent => u32::MAX,
            Version::V311 => 0,
        };
        if slot.is_some() {
            edge.registry
                .note_session(client_id, session_expiry, session_present);
        }
        let options_in_use = offline.sub_options.iter().any(|&(_, sub)| needs_edge(sub));
        let subscriptions_known = !resume || offline.subscriptions_known;
        let now = Instant::now();
        let mut session = Session {
            version,
            client,
            core: link.stream,
            client_in,
            core_in: link.read_buf,
            client_out,
            core_out: BytesMut::new(),
            client_receive_max: connect.receive_maximum,
            client_max_packet: connect
                .max_packet_size
                .map(|m| m as usize)
                .unwrap_or(usize::MAX),
            keep_alive: (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500)),
            last_client_read: now,
            last_core_write: now,
            last_client_drain: now,
            stall_timeout: edge.write_stall_timeout,
            core_acks: Default::default(),
            core_pubrels: Default::default(),
            pubrel_to_client: Vec::new(),
            pubrel_to_client_earlier: offline.pubrel_out,
            local_pubrel: Vec::new(),
            core_fwd: Default::default(),
            next_core_id: 1,
            inbound_qos2: Vec::new(),
            held_qos2_bytes: 0,
            inbound_qos2_earlier: offline.inbound_qos2,
            check_client_ids: ids_in_flight,
            redeliveries: offline.unacked_out,
            next_client_id: 1,
            persistent,
            resumed: session_present,
            internal_subacks: Vec::new(),
            rate: RateLimiter::new(edge.policy.rates(&identity)),
            rate_dropped: 0,
            rate_logged: None,
            subscriptions: offline
                .sub_options
                .into_iter()
                .map(|(filter, sub)| {
                    let options = sub.options | RESTORED;
                    (filter, SubOptions { options, ..sub })
                })
                .collect(),
            options_in_use,
            subscriptions_known,
            shared_unsubscribed: false,
            sub_id_props: BytesMut::new(),
            matching: Vec::new(),
            copies: Copies::default(),
            client_aliases: Vec::new(),
            aliases: TopicAliases::new(match version {
                Version::V5 => connect.topic_alias_max.min(edge.topic_aliases),
                Version::V311 => 0,
            }),
            own_subscribes: InFlight::new(edge, |e| &e.subscribes_in_flight),
            own_early_acks: InFlight::new(edge, |e| &e.early_acks_in_flight),
            fresh: None,
            deferred: None,
            origin: envelope::origin_of(client_id),
            session_expiry,
            identity,
            client_id: client_id.to_string(),
            last_allowed_topic: None,
            last_topic_subscribed: None,
            core_pings: Default::default(),
            pending_subacks: Vec::new(),
            prefer_core: false,
            will,
            will_delay,
            restored: offline.queued.len(),
            held: offline.queued.into(),
            delivering_restored: false,
            restored_out: Vec::new(),
            retained_due: Vec::new(),
            retained_out: Default::default(),
            client_step: READ_STEP_MIN,
            core_step: READ_STEP_MIN,
        };
        // Until its first packet is handled, bytes this client has sent hold others' PUBLISHes
        // at the subscribe fence (`fresh`).
        session.fresh = edge
            .fresh
            .watch(|| session.client.socket_handle())
            .map(|entry| Watched {
                edge: edge.clone(),
                entry,
            });
        if session_present {
            // rumqttd re-sends a resumed session's unacknowledged PUBRELs only together with
            // the next acknowledgement it writes (MQTT-4.4.0-1 wants them at once): a PINGREQ
            // makes it write one.
            session.ping_core(PingFor::Resume);
        }
        let end = session.relay(edge, claim).await;
        debug!(?end, "relay ended");
        match end {
            End::KeepAliveTimeout => Metrics::inc(&edge.metrics.keepalive_timeouts),
            End::SlowConsumer => Metrics::inc(&edge.metrics.slow_consumers),
            End::ProtocolError(_) | End::SecondConnect => {
                Metrics::inc(&edge.metrics.protocol_errors)
            }
            End::RateLimited => Metrics::inc(&edge.metrics.rate_limited_disconnects),
            End::TakenOver => Metrics::inc(&edge.metrics.takeovers),
            End::CoreGone => Metrics::inc(&edge.metrics.core_closed),
            _ => {}
        }
        // QoS 2 messages still held go to the core now, and with those handed to it already
        // count as routed (`close` flushes what is still buffered, and the core routes a QoS 1
        // publish on receipt): a re-send after a reconnect is acknowledged, not delivered again.
        session.route_held_qos2(edge);
        let (queued, restored_unacked) = session.offline_queue();
        let mut unacked_out = session.offline_redeliveries();
        unacked_out.extend(restored_unacked);
        let mut offline = OfflineState {
            queued,
            inbound_qos2: session.inbound_qos2.iter().map(|f| f.pkid).collect(),
            unacked_out,
            pubrel_out: std::mem::take(&mut session.pubrel_to_client),
            // All of them when some need the edge: which filters a topic matches decides.
            // Only then: the offline store is bounded, and a session's QoS 2 and redelivery
            // state matters more than exact UNSUBACK codes after a resume.
            sub_options: match session.persistent && session.options_in_use {
                true => session
                    .subscriptions
                    .iter()
                    .map(|(filter, &sub)| {
                        let options = sub.options & !RESTORED;
                        (filter.clone(), SubOptions { options, ..sub })
                    })
                    .collect(),
                false => Vec::new(),
            },
            subscriptions_known: session.persistent
                && session.options_in_use
                && session.subscriptions_known,
        };
        offline
            .pubrel_out
            .append(&mut session.pubrel_to_client_earlier);
        offline
            .inbound_qos2
            .append(&mut session.inbound_qos2_earlier);
        // PUBRELs still with the client are re-sent by the core too (its PUBCOMP is missing).
        offline.pubrel_out.extend(
            session
                .core_pubrels
                .iter()
                .filter(|&&(core, _, ready)| core != 0 && !ready)
                .map(|&(core, client, _)| (core, client)),
        );
        let (session_expiry, will_delay) = (session.session_expiry, session.will_delay);
        let delayed_will = session.close(edge, end).await;
        if delayed_will.is_none() && (session_expiry == 0 || session_expiry == u32::MAX) {
            // No timers for this session: none left by a connection this one took over after
            // the takeover wait ran out may act on it later.
            edge.registry.take_timers(client_id);
        }
        if session_expiry == 0 {
            // The session ends with this connection (v5 expiry 0, perhaps set by DISCONNECT).
            if persistent || resume {
                edge.wipe_core_session(&core_id).await;
                edge.registry.forget_session(client_id);
                if let Some(slot) = edge.registry.end_session(client_id) {
                    edge.registry.free_slot(slot);
                }
                edge.note_kept_sessions();
            }
            return Ok(());
        }
        // Eviction and `limits.persistent_session_expiry_secs` count from now.
        edge.registry.session_offline(client_id);
        if persistent && !edge.registry.store_offline(client_id, offline) {
            Metrics::inc(&edge.metrics.dropped_qos2_state);
        }
        if delayed_will.is_some() || session_expiry != u32::MAX {
            let now = Instant::now();
            let after = |secs: u32| now + Duration::from_secs(secs as u64);
            let timers = Timers {
                will: delayed_will.map(|w| (after(will_delay.min(session_expiry)), w)),
                session_expires: (session_expiry != u32::MAX).then(|| after(session_expiry)),
            };
            if let Err(timers) = edge.registry.set_timers(client_id, timers) {
                Metrics::inc(&edge.metrics.dropped_session_timers);
                warn!("session timer store full: the will goes now and the session stays");
                if let Some((_, will)) = timers.will {
                    edge.publish_will(&will).await;
                }
            }
        }
        Ok(())
    }

    /// The relay loop. Returns why it ended.
    async fn relay(&mut self, edge: &Edge, claim: &Claim) -> End {
        let kick = claim.kick.clone();
        let mut kicked = std::pin::pin!(kick.cancelled_owned());
        let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(self.next_deadline()));
        let max_packet = edge.policy.max_packet_size;
        // Bytes that arrived with the CONNECT (a client pipelining packets behind it) or with
        // the core's CONNACK (a resumed session's redeliveries) are handled before any new read.
        if !self.client_in.is_empty() {
            if let Err(end) = self.on_client_data(edge, max_packet) {
                return end;
            }
        }
        if !self.core_in.is_empty() {
            if let Err(end) = self.on_core_data(edge) {
                return end;
            }
        }
        // What a restored session brought from before a restart goes first.
        if self.restored > 0 {
            if let Err(end) = self.release_held(edge) {
                return end;
            }
        }
        loop {
            let event = poll_fn(|cx| self.poll_io(cx, timer.as_mut(), kicked.as_mut())).await;
            let step = match event {
                Event::ClientData => self.on_client_data(edge, max_packet).and_then(|()| {
                    // Acknowledgements may have made room for deliveries held back.
                    if self.held.is_empty() {
                        Ok(())
                    } else {
                        self.release_held(edge)
                    }
                }),
                Event::CoreData => self.on_core_data(edge),
                Event::RetainedRoom => self.send_retained(edge),
                Event::Timer => {
                    let now = Instant::now();
                    if let Some(ka) = self.keep_alive {
                        if now >= self.last_client_read + ka {
                            return End::KeepAliveTimeout;
                        }
                    }
                    if !self.client_out.is_empty()
                        && now >= self.last_client_drain + self.stall_timeout
                    {
                        return End::SlowConsumer;
                    }
                    if now >= self.last_core_write + CORE_PING_INTERVAL {
                        self.ping_core(PingFor::Nothing);
                        self.last_core_write = now;
                    }
                    let lifted = self.lift_fence(edge, max_packet);
                    timer.as_mut().reset(self.next_deadline());
                    lifted
                }
                Event::Kicked => {
                    return if edge.shutdown.is_cancelled() {
                        End::Shutdown
                    } else {
                        End::TakenOver
                    }
                }
                Event::End(end) => return end,
            };
            if let Err(end) = step {
                return end;
            }
            // Output waiting for the client arms the slow-consumer deadline at once, instead of
            // at the next timer event (up to the core ping interval later); a PUBLISH held at
            // the subscribe fence, the fence's next look.
            let soon = match (&self.deferred, self.client_out.is_empty()) {
                (Some(_), _) => Some(Instant::now() + FENCE_TICK),
                (None, false) => Some(self.last_client_drain + self.stall_timeout),
                (None, true) => None,
            };
            if let Some(soon) = soon.filter(|&t| t < timer.deadline()) {
                timer.as_mut().reset(soon);
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut deadline = self.last_core_write + CORE_PING_INTERVAL;
        if let Some(ka) = self.keep_alive {
            deadline = deadline.min(self.last_client_read + ka);
        }
        if !self.client_out.is_empty() {
            deadline = deadline.min(self.last_client_drain + self.stall_timeout);
        }
        if self.deferred.is_some() {
            deadline = deadline.min(Instant::now() + FENCE_TICK);
        }
        deadline
    }

    /// Writes what can be written, then waits for the next thing that needs handling.
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        timer: Pin<&mut Sleep>,
        kicked: Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
    ) -> Poll<Event> {
        while !self.core_out.is_empty() {
            match Pin::new(&mut self.core).poll_write(cx, &self.core_out) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Event::End(End::CoreGone))
                }
                Poll::Ready(Ok(n)) => {
                    self.core_out.advance(n);
                    self.last_core_write = Instant::now();
                }
                Poll::Pending => break,
            }
        }
        let mut wrote_client = false;
        while !self.client_out.is_empty() {
            match Pin::new(&mut self.client).poll_write(cx, &self.client_out) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Event::End(End::ClientGone))
                }
                Poll::Ready(Ok(n)) => {
                    self.client_out.advance(n);
                    wrote_client = true;
                }
                Poll::Pending => break,
            }
        }
        if wrote_client {
            self.last_client_drain = Instant::now();
            if let Poll::Ready(Err(_)) = Pin::new(&mut self.client).poll_flush(cx) {
                return Poll::Ready(Event::End(End::ClientGone));
            }
        }
        if self.client_out.is_empty() {
            self.last_client_drain = Instant::now().max(self.last_client_drain);
            release_if_idle(&mut self.client_out);
        }
        release_if_idle(&mut self.core_out);

        let read_client = self.core_out.len() < HIGH_WATERMARK
            && self.core_fwd.len() < CORE_WINDOW
            && self.deferred.is_none();
        let read_core = self.client_out.len() < HIGH_WATERMARK
            && (self.retained_out.is_empty() || self.retained_waits_for_acks());
        // Alternate which side is read first so neither can starve the other.
        self.prefer_core = !self.prefer_core;
        for side in [self.prefer_core, !self.prefer_core] {
            if side && read_core {
                reserve(&mut self.core_in, self.core_step);
                match poll_read_buf(Pin::new(&mut self.core), cx, &mut self.core_in) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Event::End(End::CoreGone))
                    }
                    Poll::Ready(Ok(n)) => {
                        crate::core::ack_promptly(&self.core);
                        self.core_step = next_step(self.core_step, n);
                        return Poll::Ready(Event::CoreData);
                    }
                    Poll::Pending => {}
                }
            } else if !side && read_client {
                reserve(&mut self.client_in, self.client_step);
                match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.client_in) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Event::End(End::ClientGone))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.client_step = next_step(self.client_step, n);
                        return Poll::Ready(Event::ClientData);
                    }
                    Poll::Pending => {}
                }
            }
        }
        if timer.poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        if kicked.poll(cx).is_ready() {
            return Poll::Ready(Event::Kicked);
        }
        // Last, so a long run of retained messages starves neither side nor the timers.
        if self.retained_room() {
            return Poll::Ready(Event::RetainedRoom);
        }
        Poll::Pending
    }

    /// Sends the core a PINGREQ, remembering what its PINGRESP will mean.
    fn ping_core(&mut self, why: PingFor) {
        mqtt::put_pingreq(&mut self.core_out);
        self.core_pings.push_back(why);
    }

    /// Whether the client can take another QoS 1/2 delivery under its v5 Receive Maximum
    /// (MQTT-3.3.4-9). Only deliveries awaiting its PUBACK or PUBREC count: the PUBREL phase
    /// waits on the core, and pausing core reads then would deadlock.
    fn client_has_room(&self) -> bool {
        let max = self.client_receive_max as usize;
        // A QoS 2 delivery keeps its place until the client's PUBCOMP (MQTT-4.9.0-2): after
        // its PUBREC it waits for the core's PUBREL (`pubrel_to_client`), then for the
        // client's PUBCOMP (`core_pubrels`, those with a client id and not yet ready).
        let releasing = self.pubrel_to_client.len() + self.core_pubrels.len();
        if max >= CORE_INFLIGHT + releasing {
            return true;
        }
        let releasing = self.pubrel_to_client.len()
            + self
                .core_pubrels
                .iter()
                .filter(|&&(_, client, ready)| client != 0 && !ready)
                .count();
        self.core_acks.iter().filter(|a| !a.ready).count() + releasing < max
    }

    // -----------------------------------------------------------------------------------------
    // Client to core.

    fn on_client_data(&mut self, edge: &Edge, max_packet: usize) -> Result<(), End> {
        if let Some(watched) = &self.fresh {
            watched.entry.reading();
        }
        self.last_client_read = Instant::now();
        self.client_frames(edge, max_packet, true)
    }

    /// Handles the whole packets in `client_in`. `may_wait`: a PUBLISH or SUBSCRIBE may stop
    /// at a fence (see the module documentation).
    fn client_frames(&mut self, edge: &Edge, max_packet: usize, may_wait: bool) -> Result<(), End> {
        let (mut unanswered, mut answered) = (false, false);
        loop {
            let frame = match mqtt::read_frame(&mut self.client_in, max_packet) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(self.violation(&e)),
            };
            edge.metrics
                .bytes_in
                .fetch_add(frame.wire_len() as u64, Relaxed);
            if may_wait && self.must_wait(edge, frame.kind()) {
                Metrics::inc(if frame.kind() != mqtt::SUBSCRIBE {
                    &edge.metrics.fence_waits
                } else {
                    &edge.metrics.subscribe_fence_waits
                });
                self.deferred = Some((frame, Instant::now() + FENCE_MAX_WAIT));
                break;
            }
            unanswered |= (frame.kind() == mqtt::PUBLISH && frame.flags() & 0b0110 == 0)
                || frame.kind() == mqtt::PUBCOMP;
            answered |= gets_an_answer(&frame);
            self.on_client_packet(edge, frame)?;
            // After the packet: a SUBSCRIBE is counted in flight by now.
            self.fresh = None;
        }
        // A QoS 0 publish and a PUBCOMP are acknowledged by TCP alone, and a client with Nagle
        // on (libmosquitto, rumqttc) holds its next small packet until that ACK arrives: send it
        // now, unless an answer or data for the client is about to carry it. Without it, a
        // subscriber taking QoS 2 deliveries in bursts waited up to 40 ms (Linux's delayed ACK)
        // after each PUBCOMP: 2,700 instead of 87,000 messages/s (BENCHMARKS.md). Quick ACKs on
        // every read cost 10-17% of QoS 1 throughput when measured, so only these cases get
        // them.
        if unanswered && !answered && self.client_out.is_empty() {
            self.client.ack_promptly();
        }
        release_if_idle(&mut self.client_in);
        Ok(())
    }

    /// Whether a packet of this kind must wait at a fence: a PUBLISH while other connections'
    /// SUBSCRIBEs or UNSUBSCRIBEs are in flight to the core, or while a new connection has
    /// sent its first packet and not had it handled (`fresh`); a SUBSCRIBE while publishes
    /// other connections were acknowledged for are.
    fn must_wait(&self, edge: &Edge, kind: u8) -> bool {
        let subscribing = || {
            self.own_subscribes.others_in_flight()
                || edge
                    .fresh
                    .others_pending(self.fresh.as_ref().map(|w| w.entry.id()))
        };
        match kind {
            mqtt::PUBLISH => subscribing(),
            // A PUBREL may send a held QoS 2 message to the core.
            mqtt::PUBREL => self.held_qos2_bytes > 0 && subscribing(),
            mqtt::SUBSCRIBE => self.own_early_acks.others_in_flight(),
            _ => false,
        }
    }

    /// Handles the packet held at a fence, and the packets read behind it, once what it waited
    /// for has reached the core or it has waited long enough. The packets behind it arrived
    /// with it: they do not wait again.
    fn lift_fence(&mut self, edge: &Edge, max_packet: usize) -> Result<(), End> {
        match &self.deferred {
            Some((frame, until))
                if self.must_wait(edge, frame.kind()) && Instant::now() < *until =>
            {
                return Ok(())
            }
            None => return Ok(()),
            Some(_) => {}
        }
        if let Some((frame, _)) = self.deferred.take() {
            self.on_client_packet(edge, frame)?;
            self.fresh = None;
        }
        self.client_frames(edge, max_packet, false)?;
        // Acknowledgements among those packets may have made room for deliveries held back.
        if self.held.is_empty() {
            Ok(())
        } else {
            self.release_held(edge)
        }
    }

    /// The topic a client PUBLISH with Topic Alias `alias` is for: `topic` when it has one,
    /// which the alias then stands for on this connection, else the one the alias stands for.
    fn resolve_alias(&mut self, alias: u16, topic: Bytes) -> Result<Bytes, End> {
        if alias == 0 || alias > CLIENT_TOPIC_ALIASES {
            // MQTT-3.3.2-8, MQTT-3.3.2-9.
            debug!(alias, "topic alias out of range");
            return Err(End::ProtocolError(reason::TOPIC_ALIAS_INVALID));
        }
        let slot = alias as usize - 1;
        if self.client_aliases.len() <= slot {
            self.client_aliases.resize(slot + 1, Bytes::new());
        }
        if topic.is_empty() {
            return match &self.client_aliases[slot] {
                known if known.is_empty() => {
                    debug!(alias, "topic alias used before it was set");
                    Err(End::ProtocolError(reason::PROTOCOL_ERROR))
                }
                known => Ok(known.clone()),
            };
        }
        self.client_aliases[slot] = owned(&topic);
        Ok(topic)
    }

    fn violation(&self, e: &CodecError) -> End {
        debug!(error = %e, "protocol violation");
        End::ProtocolError(e.reason_code())
    }

    fn on_client_packet(&mut self, edge: &Edge, frame: Frame) -> Result<(), End> {
        match frame.kind() {
            mqtt::PUBLISH => {
                let mut p =
                    mqtt::parse_publish(&frame, self.version).map_err(|e| self.violation(&e))?;
                if let Some(alias) = p.topic_alias {
                    p.topic = self.resolve_alias(alias, p.topic)?;
                }
                Metrics::inc(&edge.metrics.publish_in[p.qos as usize]);
                if let Err(code) = self.check_publish(edge, &p.topic) {
                    return self.refuse_publish(p.qos, p.pkid, code);
                }
                if !self.rate.is_unlimited()
                    && !self
                        .rate
                        .allow(p.topic.len() + p.payload.len(), Instant::now())
                {
                    return self.over_rate(edge, p.qos, p.pkid);
                }
                let private = envelope::Private {
                    origin: edge.no_local_in_use.load(Relaxed).then_some(self.origin),
                    expires_at: envelope::expires_at(p.message_expiry),
                };
                let plain;
                let with_properties;
                let header: &[u8] = if p.properties.is_empty() && private.is_empty() {
                    plain = envelope::plain_header(p.qos);
                    &plain
                } else {
                    with_properties = envelope::header_with(p.qos, private, &p.properties);
                    &with_properties
                };
                if p.qos == 2 {
                    if self.inbound_qos2.iter().any(|f| f.pkid == p.pkid)
                        || self.inbound_qos2_earlier.contains(&p.pkid)
                    {
                        // A re-sent QoS 2 PUBLISH the edge already has: acknowledge it, never
                        // deliver it twice.
                        mqtt::put_ack(&mut self.client_out, mqtt::PUBREC, p.pkid);
                        return Ok(());
                    }
                    if self.inbound_qos2.len() >= MAX_PENDING_QOS2 {
                        debug!(
                            open = self.inbound_qos2.len(),
                            "QoS 2 publish over the Receive Maximum"
                        );
                        return Err(End::ProtocolError(reason::RECEIVE_MAXIMUM_EXCEEDED));
                    }
                    mqtt::put_ack(&mut self.client_out, mqtt::PUBREC, p.pkid);
                    let size = p.topic.len() + header.len() + p.payload.len();
                    let hold = self.held_qos2_bytes == 0
                        || self.held_qos2_bytes + size <= HELD_QOS2_MAX_BYTES;
                    let held = hold.then(|| HeldPublish {
                        topic: owned(&p.topic),
                        header: Bytes::copy_from_slice(header),
                        payload: owned(&p.payload),
                        retain: p.retain,
                    });
                    if hold {
                        self.held_qos2_bytes += size;
                    } else {
                        Metrics::inc(&edge.metrics.qos2_routed_unreleased);
                    }
                    self.inbound_qos2.push(InboundQos2 {
                        pkid: p.pkid,
                        routed: false,
                        released: false,
                        held,
                    });
                    if hold {
                        return Ok(());
                    }
                }
                let routed = self
                    .forward_publish(edge, p.qos, p.pkid, p.retain, &p.topic, header, &p.payload)?;
                if p.qos == 2 && routed == Routed::Nowhere {
                    // Unheld and answered: its PUBREL ends the flow.
                    if let Some(flow) = self.inbound_qos2.last_mut() {
                        flow.routed = true;
                    }
                }
            }
            mqtt::PUBACK | mqtt::PUBREC => {
                let (pkid, code) = mqtt::parse_ack(&frame).map_err(|e| self.violation(&e))?;
                let kind = frame.kind();
                if let Some(entry) = self
                    .core_acks
                    .iter_mut()
                    .find(|a| a.client_id == pkid && !a.ready)
                {
                    entry.ready = true;
                    // A v5 PUBREC with a failure code ends the flow: no PUBREL will follow.
                    entry.client_qos2 = kind == mqtt::PUBREC && code < 0x80;
                }
                self.flush_core_acks();
            }
            mqtt::PUBREL => {
                let (pkid, _) = mqtt::parse_ack(&frame).map_err(|e| self.violation(&e))?;
                if let Some(i) = self.inbound_qos2.iter().position(|f| f.pkid == pkid) {
                    // A PUBREL sent again before the PUBCOMP changes nothing.
                    if !self.inbound_qos2[i].released {
                        self.release_qos2(edge, i)?;
                    }
                    return Ok(());
                }
                // An earlier connection of the session handed the message to the core when it
                // ended; releasing it only ends the flow.
                let known =
                    if let Some(i) = self.inbound_qos2_earlier.iter().position(|&id| id == pkid) {
                        self.inbound_qos2_earlier.swap_remove(i);
                        true
                    } else {
                        false
                    };
                if known || self.version == Version::V311 {
                    mqtt::put_ack(&mut self.client_out, mqtt::PUBCOMP, pkid);
                } else {
                    mqtt::put_ack_reason(
                        &mut self.client_out,
                        mqtt::PUBCOMP,
                        pkid,
                        reason::PACKET_ID_NOT_FOUND,
                    );
                }
            }
            mqtt::PUBCOMP => {
                let (pkid, _) = mqtt::parse_ack(&frame).map_err(|e| self.violation(&e))?;
                if let Some(entry) = self
                    .core_pubrels
                    .iter_mut()
                    .find(|(_, client, ready)| *client == pkid && !ready)
                {
                    entry.2 = true;
                }
                self.flush_core_pubcomps();
            }
            mqtt::SUBSCRIBE => {
                let s =
                    mqtt::parse_subscribe(&frame, self.version).map_err(|e| self.violation(&e))?;
                if s.filters
                    .iter()
                    .any(|(f, options)| options & NO_LOCAL != 0 && f.starts_with(b"$share/"))
                {
                    // MQTT-3.8.3-4.
                    return Err(
                        self.violation(&CodecError::Protocol("No Local on a shared subscription"))
                    );
                }
                // Filters the edge answers itself, merging its codes with the core's SUBACK:
                // those the ACL refuses, and `$` filters (other than `$share/`), which rumqttd
                // answers by dropping the connection. No `$` topic is ever routed, so the edge
                // grants those, as a broker without `$SYS` topics does.
                // Which filters get retained messages, decided before the subscriptions
                // change: every new or replaced one (MQTT-3.8.4-3), unless v5 Retain Handling
                // says only new ones (1) or none (2); never a shared one (MQTT 5, 4.8.2) nor
                // a `$` one (no `$` topic is stored).
                let wants_retained: Vec<bool> = s
                    .filters
                    .iter()
                    .map(|(f, options)| {
                        !f.starts_with(b"$")
                            && match (options >> 4) & 0x03 {
                                0 => true,
                                1 => !self.subscriptions.contains_key(f),
                                _ => false,
                            }
                    })
                    .collect();
                let codes: Vec<Option<u8>> = s
                    .filters
                    .iter()
                    .map(|(f, options)| {
                        let sub = SubOptions {
                            options: *options,
                            id: s.subscription_id.unwrap_or(0),
                        };
                        self.edge_suback_code(edge, f, sub)
                    })
                    .collect();
                if self.persistent {
                    // Lazy: nothing is built unless the registry saves sessions.
                    let granted = s.filters.iter().zip(&codes).filter(|(_, c)| c.is_none());
                    let saved = granted.filter_map(|((f, _), _)| {
                        let (filter, sub) = self.subscriptions.get_key_value(f)?;
                        Some((filter.clone(), *sub))
                    });
                    edge.registry.note_subscribed(&self.client_id, saved);
                }
                // Each with its place among the filters the core answers.
                let mut due = Vec::new();
                let mut at = 0;
                for (((filter, _), code), wants) in s.filters.iter().zip(&codes).zip(wants_retained)
                {
                    if code.is_none() {
                        if wants {
                            due.push((at, filter.clone()));
                        }
                        at += 1;
                    }
                }
                if !due.is_empty() {
                    if self.retained_due.len() >= MAX_PENDING_CONTROL {
                        return Err(End::ProtocolError(reason::RECEIVE_MAXIMUM_EXCEEDED));
                    }
                    self.retained_due.push((s.pkid, due));
                }
                if codes.iter().all(Option::is_none) {
                    mqtt::put_core_subscribe(&mut self.core_out, s.pkid, &s.filters);
                    self.own_subscribes.sent();
                    return Ok(());
                }
                let to_core: Vec<(Bytes, u8)> = s
                    .filters
                    .into_iter()
                    .zip(&codes)
                    .filter(|(_, code)| code.is_none())
                    .map(|(f, _)| f)
                    .collect();
                if to_core.is_empty() {
                    let codes: Vec<u8> = codes.into_iter().flatten().collect();
                    mqtt::put_suback(&mut self.client_out, self.version, s.pkid, &codes);
                } else {
                    if self.pending_subacks.len() >= MAX_PENDING_CONTROL {
                        return Err(End::ProtocolError(reason::RECEIVE_MAXIMUM_EXCEEDED));
                    }
                    mqtt::put_core_subscribe(&mut self.core_out, s.pkid, &to_core);
                    self.own_subscribes.sent();
                    self.pending_subacks.push((s.pkid, codes));
                }
            }
            mqtt::UNSUBSCRIBE => {
                let u = mqtt::parse_unsubscribe(&frame, self.version)
                    .map_err(|e| self.violation(&e))?;
                // rumqttd answers UNSUBSCRIBE with one UNSUBACK per filter that was subscribed
                // and none otherwise (MQTT-3.10.4-5 wants exactly one). The edge answers
                // itself, once the core has processed the request: the core answers the
                // PINGREQ sent right after it only then.
                if self.core_pings.len() >= MAX_PENDING_CONTROL {
                    return Err(End::ProtocolError(reason::RECEIVE_MAXIMUM_EXCEEDED));
                }
                // v5: "no subscription existed" (0x11) for a filter the session did not have.
                let codes: Vec<u8> = u
                    .filters
                    .iter()
                    .map(|f| match self.subscriptions.remove(f) {
                        None if self.subscriptions_known => reason::NO_SUBSCRIPTION_EXISTED,
                        _ => reason::SUCCESS,
                    })
                    .collect();
                if self.persistent {
                    edge.registry.note_unsubscribed(&self.client_id, &u.filters);
                }
                self.shared_unsubscribed |= u.filters.iter().any(|f| f.starts_with(b"$share/"));
                if self.options_in_use {
                    self.options_in_use = self.subscriptions.values().any(|&sub| needs_edge(sub));
                }
                let to_core: Vec<Bytes> = u
                    .filters
                    .into_iter()
                    .filter(|f| !is_dollar_filter(f))
                    .collect();
                let fenced = !to_core.is_empty();
                if fenced {
                    if self.resumed {
                        // rumqttd restores a resumed session's subscriptions without indexing
                        // them under the new connection, so an UNSUBSCRIBE alone leaves them in
                        // place. Subscribing again first indexes them (an existing
                        // subscription keeps its QoS and sends no retained messages); the
                        // core handles both packets in one pass, so a filter that was not
                        // subscribed is gone again before anything is routed to it. Only
                        // filters some client has subscribed to can be in the session, and
                        // only those are sent: the core would keep a log for any other.
                        let again: Vec<(Bytes, u8)> = to_core
                            .iter()
                            .filter(|f| edge.core_filters.contains(f))
                            .map(|f| (f.clone(), 0))
                            .collect();
                        if !again.is_empty() {
                            mqtt::put_core_subscribe(&mut self.core_out, u.pkid, &again);
                            self.internal_subacks.push(u.pkid);
                        }
                    }
                    mqtt::put_core_unsubscribe(&mut self.core_out, u.pkid, &to_core);
                    self.own_subscribes.sent();
                }
                self.ping_core(PingFor::Unsubscribe {
                    pkid: u.pkid,
                    codes,
                    fenced,
                });
            }
            mqtt::PINGREQ => {
                if frame.flags() != 0 || !frame.body.is_empty() {
                    return Err(self.violation(&CodecError::Malformed("bad PINGREQ")));
                }
                mqtt::put_pingresp(&mut self.client_out);
            }
            mqtt::DISCONNECT => {
                let d =
                    mqtt::parse_disconnect(&frame, self.version).map_err(|e| self.violation(&e))?;
                if let Some(expiry) = d.session_expiry {
                    if self.session_expiry == 0 && expiry > 0 {
                        // MQTT-3.14.2-2: a session that was to end cannot be extended here.
                        return Err(self.violation(&CodecError::Protocol(
                            "DISCONNECT sets a session expiry after CONNECT set none",
                        )));
                    }
                    let max = edge.registry.max_session_expiry().unwrap_or(u32::MAX);
                    self.session_expiry = expiry.min(max);
                }
                return Err(if d.code == reason::DISCONNECT_WITH_WILL {
                    End::ClientDisconnectWithWill
                } else {
                    End::ClientDisconnect
                });
            }
            mqtt::CONNECT => {
                debug!("protocol violation: second CONNECT");
                return Err(End::SecondConnect);
            }
            _ => {
                return Err(self.violation(&CodecError::Protocol(
                    "packet type not allowed from a client",
                )));
            }
        }
        Ok(())
    }

    /// The topic limits' and the ACL's answer for a PUBLISH topic (`Err` with the v5 reason
    /// code), remembering the last topic allowed.
    fn check_publish(&mut self, edge: &Edge, topic: &Bytes) -> Result<(), u8> {
        if self.last_allowed_topic.as_ref() == Some(topic) {
            return Ok(());
        }
        if !edge.policy.topic_within_limits(topic) {
            Metrics::inc(&edge.metrics.topic_limit_refusals);
            debug!(
                len = topic.len(),
                "publish refused: topic over the length or level limit"
            );
            return Err(reason::TOPIC_NAME_INVALID);
        }
        if !edge
            .policy
            .may_publish(&self.identity, &self.client_id, topic)
        {
            Metrics::inc(&edge.metrics.acl_denied_publish);
            debug!(topic = %String::from_utf8_lossy(topic), "publish refused by the ACL");
            return Err(reason::NOT_AUTHORIZED);
        }
        if topic.first() == Some(&b'$') {
            // rumqttd routes no `$` topic, not even to a filter that names it: refused rather
            // than acknowledged and lost (v5 0x90; 3.1.1 acknowledged and dropped, counted).
            Metrics::inc(&edge.metrics.dollar_topic_refusals);
            debug!(topic = %String::from_utf8_lossy(topic), "publish to a $ topic refused");
            return Err(reason::TOPIC_NAME_INVALID);
        }
        if !edge.admit_topic(topic) {
            return Err(reason::QUOTA_EXCEEDED);
        }
        self.last_allowed_topic = Some(owned(topic));
        self.last_topic_subscribed = None;
        Ok(())
    }

    /// A PUBLISH over the role's rate: a v5 client is disconnected (0x96), a 3.1.1 client's
    /// message is dropped (and acknowledged, see `refuse_publish`). Logged at most every 10 s
    /// per connection, with the count.
    fn over_rate(&mut self, edge: &Edge, qos: u8, pkid: u16) -> Result<(), End> {
        Metrics::inc(&edge.metrics.rate_limited);
        self.rate_dropped += 1;
        let now = Instant::now();
        let due = self
            .rate_logged
            .map_or(true, |t| now.duration_since(t) >= Duration::from_secs(10));
        if due {
            warn!(
                user = %self.identity.user,
                role = %self.identity.role,
                dropped = self.rate_dropped,
                "publish rate limit exceeded"
            );
            self.rate_logged = Some(now);
            self.rate_dropped = 0;
        }
        match self.version {
            Version::V5 => Err(End::RateLimited),
            Version::V311 => self.refuse_publish(qos, pkid, reason::MESSAGE_RATE_TOO_HIGH),
        }
    }

    /// A PUBLISH the edge refused: dropped. A v5 client is told with `code` on its
    /// acknowledgement; a 3.1.1 client, which has no way to be told, is acknowledged as if it
    /// had been accepted (as mosquitto does), its QoS 2 flow completed by the edge.
    fn refuse_publish(&mut self, qos: u8, pkid: u16, code: u8) -> Result<(), End> {
        let kind = match qos {
            0 => return Ok(()),
            1 => mqtt::PUBACK,
            _ => mqtt::PUBREC,
        };
        match self.version {
            Version::V5 => mqtt::put_ack_reason(&mut self.client_out, kind, pkid, code),
            Version::V311 => {
                if qos == 2 && !self.inbound_qos2.iter().any(|f| f.pkid == pkid) {
                    if self.inbound_qos2.len() >= MAX_PENDING_QOS2 {
                        return Err(End::ProtocolError(reason::RECEIVE_MAXIMUM_EXCEEDED));
                    }
                    // Nothing for the core: the PUBREL ends the flow.
                    self.inbound_qos2.push(InboundQos2 {
                        pkid,
                        held: None,
                        routed: true,
                        released: false,
                    });
                }
                mqtt::put_ack(&mut self.client_out, kind, pkid);
            }
        }
        Ok(())
    }

    /// The SUBACK code the edge gives a filter itself, or `None` when the core decides.
    fn edge_suback_code(&mut self, edge: &Edge, filter: &Bytes, sub: SubOptions) -> Option<u8> {
        let v5_or = |code: u8| match self.version {
            Version::V311 => 0x80,
            Version::V5 => code,
        };
        if mqtt::is_malformed_shared(filter) {
            debug!(filter = %String::from_utf8_lossy(filter), "malformed shared subscription");
            return Some(v5_or(reason::TOPIC_FILTER_INVALID));
        }
        if !edge.policy.topic_within_limits(filter) {
            Metrics::inc(&edge.metrics.topic_limit_refusals);
            return Some(v5_or(reason::TOPIC_FILTER_INVALID));
        }
        if !self.subscriptions.contains_key(filter)
            && self.subscriptions.len() >= edge.policy.max_subscriptions
        {
            Metrics::inc(&edge.metrics.subscription_limit_refusals);
            debug!("subscription refused: max_subscriptions reached");
            return Some(v5_or(reason::QUOTA_EXCEEDED));
        }
        if !edge
            .policy
            .may_subscribe(&self.identity, &self.client_id, filter)
        {
            Metrics::inc(&edge.metrics.acl_denied_subscribe);
            debug!(filter = %String::from_utf8_lossy(filter), "subscription refused by the ACL");
            return Some(match self.version {
                Version::V311 => 0x80,
                Version::V5 => reason::NOT_AUTHORIZED,
            });
        }
        if !is_dollar_filter(filter) {
            if !edge.admit_filter(filter) {
                return Some(v5_or(reason::QUOTA_EXCEEDED));
            }
            edge.subscribed.insert(filter);
        }
        // Copies of a client's names, here and in everything kept past the packet: a slice
        // would keep the whole read buffer it came in (see `owned`).
        self.subscriptions.insert(owned(filter), sub);
        if needs_edge(sub) {
            self.options_in_use = true;
            if sub.options & NO_LOCAL != 0 {
                edge.no_local_in_use.store(true, Relaxed);
            }
        }
        is_dollar_filter(filter).then_some(sub.options & 0x03)
    }

    /// Whether a subscription may match `topic`, the topic `check_publish` allowed last; the
    /// answer is kept until another topic comes or (if it was no) a filter is added. Read
    /// for every publish, so a device publishing to one topic pays one atomic load.
    fn topic_may_have_subscribers(&mut self, edge: &Edge, topic: &[u8]) -> bool {
        let generation = edge.subscribed.generation();
        let same_topic = self.last_allowed_topic.as_deref() == Some(topic);
        match self.last_topic_subscribed {
            Some((g, known)) if same_topic && (known || g == generation) => known,
            _ => {
                let known = edge.subscribed.matches(topic);
                if same_topic {
                    self.last_topic_subscribed = Some((generation, known));
                }
                known
            }
        }
    }

    /// Hands a client's QoS `qos` publish to the core, or answers it here when no subscription
    /// can match its topic (`Routed::Nowhere`). QoS 1 and 2 reach the core as QoS 1
    /// (the envelope `header` keeps the real QoS for subscribers): rumqttd routes QoS 1 on
    /// receipt but QoS 2 only at PUBREL, and forgets QoS 2 state across reconnects, so the
    /// edge owns QoS 2 (`InboundQos2`). A QoS 1 publish is acknowledged now, on its way to the
    /// core, unless the client is pipelining (see the module documentation); otherwise the
    /// core's PUBACK becomes the client's.
    #[allow(clippy::too_many_arguments)]
    fn forward_publish(
        &mut self,
        edge: &Edge,
        qos: u8,
        pkid: u16,
        retain: bool,
        topic: &[u8],
        header: &[u8],
        payload: &[u8],
    ) -> Result<Routed, End> {
        // Into the store first: before the core routes it, so a subscription the core grants
        // before the message arrives there gets it live and any other from the store; and
        // before the edge looks for subscribers, so one added after that look finds it in the
        // store (the fence pairs with the one `FilterIndex::insert` implies).
        let retain = retain && edge.retain(topic, header, payload);
        if retain {
            fence(SeqCst);
        }
        let subscribed = self.topic_may_have_subscribers(edge, topic);
        if !subscribed && self.answer_unrouted(edge, qos, pkid) {
            return Ok(Routed::Nowhere);
        }
        let core_qos = qos.min(1);
        let mut core_id = 0;
        if core_qos == 1 {
            core_id = self.alloc_core_id()?;
            // PUBACKs go out in the order of the PUBLISHes (MQTT-4.6.0-2): not early while a
            // late one is owed.
            let early =
                qos == 1 && self.core_fwd.len() < EARLY_ACK_WINDOW && !self.late_ack_owed(1);
            // As mosquitto: a v5 QoS 1 PUBACK says when no subscription matches (a QoS 2
            // PUBREC is sent before the message is routed, so it cannot).
            let reason = match qos == 1 && self.version == Version::V5 && !subscribed {
                true => reason::NO_MATCHING_SUBSCRIBERS,
                false => reason::SUCCESS,
            };
            if early {
                put_puback(&mut self.client_out, pkid, reason);
                self.own_early_acks.sent();
                Metrics::inc(&edge.metrics.edge_acks);
            }
            self.core_fwd.push_back(Forwarded {
                core_id,
                client_id: pkid,
                qos,
                early,
                reason,
                sent: Instant::now(),
            });
        }
        // DUP is per hop (MQTT-3.3.1-3): the client's re-send is a first send here.
        envelope::put_core_publish(
            &mut self.core_out,
            false,
            core_qos,
            retain,
            topic,
            core_id,
            header,
            payload,
        );
        Ok(Routed::Core)
    }

    /// Answers a publish no subscription can match instead of handing it to the core: QoS 0
    /// ends here, QoS 1 gets its PUBACK (v5: 0x10, no matching subscribers), and QoS 2 counts
    /// as routed (its PUBCOMP is the caller's). The core would only have scanned every filter it
    /// ever held for it (rumqttd remembers only the topics some filter matched, and never
    /// forgets a filter), on the one thread that routes every message: 250 us of router time
    /// per publish after 5,000 clients had subscribed once (BENCHMARKS.md). Not while
    /// earlier publishes of the connection are owed a late acknowledgement, which this one
    /// must not overtake: those go to the core as before. Whether it did.
    fn answer_unrouted(&mut self, edge: &Edge, qos: u8, pkid: u16) -> bool {
        if qos > 0 && self.late_ack_owed(qos) {
            return false;
        }
        if qos == 1 {
            let reason = match self.version {
                Version::V5 => reason::NO_MATCHING_SUBSCRIBERS,
                Version::V311 => reason::SUCCESS,
            };
            put_puback(&mut self.client_out, pkid, reason);
        }
        Metrics::inc(&edge.metrics.publishes_unrouted);
        true
    }

    /// Whether an acknowledgement for a QoS `qos` publish sent now would overtake one the core
    /// still owes an earlier publish: acknowledgements go out in the order of their publishes
    /// (MQTT-4.6.0-2), PUBACKs and PUBCOMPs each in their own order.
    fn late_ack_owed(&self, qos: u8) -> bool {
        !self
            .core_fwd
            .iter()
            .all(|f| f.early || (qos == 1 && f.qos == 2))
    }

    /// The client released inbound QoS 2 message `i`: the held message goes to the core
    /// (PUBCOMP once the core acknowledges it), or, when the core has it already, the flow
    /// ends here.
    fn release_qos2(&mut self, edge: &Edge, i: usize) -> Result<(), End> {
        self.inbound_qos2[i].released = true;
        // Completed on its way to the core, like an early PUBACK: while few publishes await
        // the core and none is owed a late acknowledgement, so a client that pipelines is
        // paced by the core (completing its flows early let it outrun its subscribers until
        // the core's log dropped messages).
        let early = self.core_fwd.len() < EARLY_ACK_WINDOW && !self.late_ack_owed(2);
        let complete = match self.send_held_qos2(edge, i)? {
            Some(Routed::Core) => match self.core_fwd.back_mut() {
                Some(f) if early => {
                    f.early = true;
                    self.own_early_acks.sent();
                    Metrics::inc(&edge.metrics.edge_acks);
                    true
                }
                // PUBCOMP when the core acknowledges it (`qos2_routed`).
                _ => false,
            },
            // No subscriber: the flow ends here (`answer_unrouted` kept the order).
            Some(Routed::Nowhere) => true,
            // Handed over on arrival: complete once the core has acknowledged it.
            None => self.inbound_qos2[i].routed,
        };
        if complete {
            let pkid = self.inbound_qos2.swap_remove(i).pkid;
            mqtt::put_ack(&mut self.client_out, mqtt::PUBCOMP, pkid);
        }
        Ok(())
    }

    /// Hands inbound QoS 2 message `i` to the core (or answers it, `answer_unrouted`) if the
    /// edge still holds it: where it went, `None` when it was not held.
    fn send_held_qos2(&mut self, edge: &Edge, i: usize) -> Result<Option<Routed>, End> {
        let flow = &mut self.inbound_qos2[i];
        let pkid = flow.pkid;
        let Some(m) = flow.held.take() else {
            return Ok(None);
        };
        self.held_qos2_bytes -= m.size();
        let routed =
            self.forward_publish(edge, 2, pkid, m.retain, &m.topic, &m.header, &m.payload)?;
        Ok(Some(routed))
    }

    /// The core acknowledged inbound QoS 2 message `pkid`: PUBCOMP if the client has released
    /// it.
    fn qos2_routed(&mut self, pkid: u16) {
        let Some(i) = self
            .inbound_qos2
            .iter()
            .position(|f| f.pkid == pkid && f.held.is_none() && !f.routed)
        else {
            return;
        };
        if self.inbound_qos2[i].released {
            self.inbound_qos2.swap_remove(i);
            mqtt::put_ack(&mut self.client_out, mqtt::PUBCOMP, pkid);
        } else {
            self.inbound_qos2[i].routed = true;
        }
    }

    /// Hands every held QoS 2 message to the core, at the end of the connection: the client
    /// has its PUBREC, so the message is the edge's to deliver, and its PUBREL, re-sent on a
    /// new connection of the session, is answered from the packet id kept offline.
    fn route_held_qos2(&mut self, edge: &Edge) {
        for i in 0..self.inbound_qos2.len() {
            if self.send_held_qos2(edge, i).is_err() {
                return;
            }
        }
    }

    /// The packet id for the next publish to the core. Ids are handed out in order and the
    /// core acknowledges in order, so the ids in flight run from the oldest one's up to this
    /// one and the first the counter could meet again is the oldest's. Meeting it means the
    /// core left one publish unacknowledged while acknowledging 65,534 later ones: broken.
    fn alloc_core_id(&mut self) -> Result<u16, End> {
        let id = self.next_core_id;
        if self.core_fwd.front().is_some_and(|f| f.core_id == id) {
            warn!(id, "the core left a publish unacknowledged");
            return Err(End::CoreGone);
        }
        self.next_core_id = id.checked_add(1).unwrap_or(1);
        Ok(id)
    }

    /// A packet id for a new QoS 1/2 delivery: not used by a delivery or PUBREL in flight on
    /// this connection, nor kept for one of an earlier connection of the session.
    fn alloc_client_id(&mut self) -> u16 {
        loop {
            let id = self.next_client_id;
            self.next_client_id = match id.checked_add(1) {
                Some(next) => next,
                None => {
                    self.check_client_ids = true;
                    1
                }
            };
            let kept = self.redeliveries.iter().any(|r| r.client_id == id)
                || self.pubrel_to_client_earlier.iter().any(|&(_, c)| c == id);
            // Ids are handed out in order, so one of this connection's can come round again
            // only after a wrap.
            let in_flight = self.check_client_ids
                && (self.core_acks.iter().any(|a| a.client_id == id)
                    || self.core_pubrels.iter().any(|&(_, c, _)| c == id)
                    || self.pubrel_to_client.iter().any(|&(_, c)| c == id));
            if !kept && !in_flight {
                return id;
            }
        }
    }

    /// What a persistent session keeps of its deliveries when the connection ends: every one
    /// the core has not seen acknowledged, which the core re-sends.
    fn offline_redeliveries(&mut self) -> Vec<Redelivery> {
        let mut out: Vec<Redelivery> = self
            .core_acks
            .iter()
            // The edge's own deliveries are not re-sent by the core.
            .filter(|a| a.pkid != 0)
            .map(|a| Redelivery {
                client_id: a.client_id,
                fingerprint: a.fingerprint,
                acked: a.ready,
                client_qos2: a.client_qos2,
            })
            .collect();
        // Re-sends the core has not made yet stay expected.
        out.append(&mut self.redeliveries);
        out
    }

    fn flush_core_acks(&mut self) {
        while let Some(front) = self.core_acks.front() {
            if !front.ready {
                break;
            }
            if front.pkid == 0 {
                // The edge's own delivery (a re-sent retained message): the core knows nothing
                // of it, and the edge releases a QoS 2 one itself.
                if front.kind == mqtt::PUBREC && front.client_qos2 {
                    mqtt::put_ack(&mut self.client_out, mqtt::PUBREL, front.client_id);
                    self.core_pubrels.push_back((0, front.client_id, false));
                }
                self.core_acks.pop_front();
                continue;
            }
            mqtt::put_ack(&mut self.core_out, front.kind, front.pkid);
            if front.kind == mqtt::PUBREC {
                if front.client_qos2 {
                    self.pubrel_to_client.push((front.pkid, front.client_id));
                } else {
                    self.local_pubrel.push(front.pkid);
                }
            }
            self.core_acks.pop_front();
        }
    }

    fn flush_core_pubcomps(&mut self) {
        while let Some(&(pkid, _, ready)) = self.core_pubrels.front() {
            if !ready {
                break;
            }
            if pkid != 0 {
                mqtt::put_ack(&mut self.core_out, mqtt::PUBCOMP, pkid);
            }
            self.core_pubrels.pop_front();
        }
    }

    // -----------------------------------------------------------------------------------------
    // Core to client.

    fn on_core_data(&mut self, edge: &Edge) -> Result<(), End> {
        loop {
            let frame = match mqtt::read_frame(&mut self.core_in, usize::MAX) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "core sent a malformed packet");
                    return Err(End::CoreGone);
                }
            };
            // A QoS 1/2 delivery the client has no room for (see `client_has_room`) waits, with
            // every QoS 1/2 delivery after it, until its acknowledgements make room; the
            // packets behind it (acknowledgements of the client's own publishes, SUBACKs, QoS 0
            // deliveries, which MQTT orders only among themselves) go on.
            let qos_delivery = frame.kind() == mqtt::PUBLISH && frame.flags() & 0b0110 != 0;
            if qos_delivery && self.must_hold() {
                if self.held.len() - self.restored + self.core_acks.len() >= MAX_CORE_INFLIGHT {
                    warn!("core exceeded the inflight window");
                    return Err(End::CoreGone);
                }
                self.held.push_back(frame);
                continue;
            }
            self.on_core_packet(edge, frame)?;
        }
        release_if_idle(&mut self.core_in);
        Ok(())
    }

    /// Applies what the core cannot hold of the subscription this copy of a message is for
    /// (see `needs_edge`). `from_subscribe`: a retained message sent because of a subscription
    /// (`send_retained`), which is for the subscription whose retained messages are being sent
    /// (the first of `retained_out`). `qos`: the copy's QoS from the core. Returns whether to
    /// deliver, and the RETAIN flag to deliver with; appends the subscription's Subscription
    /// Identifier property to `ids`.
    ///
    /// With overlapping subscriptions the core sends one copy per matching filter without
    /// saying which: [`Copies`] hands the subscriptions out one per copy (MQTT-3.3.4-5).
    fn apply_options(
        &mut self,
        topic: &[u8],
        opened: &envelope::Opened,
        from_subscribe: bool,
        qos: u8,
        ids: &mut BytesMut,
    ) -> (bool, bool) {
        let mut matching = std::mem::take(&mut self.matching);
        matching.clear();
        let sending_for = match from_subscribe {
            true => self
                .retained_out
                .front()
                .and_then(|c| self.subscriptions.get(&c.filter)),
            false => None,
        };
        match sending_for {
            Some(sub) => matching.push(*sub),
            None => {
                for (filter, sub) in &self.subscriptions {
                    if mqtt::filter_matches(filter, topic) {
                        matching.push(*sub);
                    }
                }
            }
        }
        let sub = match matching.len() {
            0 => None,
            1 => Some(matching[0]),
            _ => {
                let key = fingerprint(topic, &opened.payload) ^ u64::from(from_subscribe);
                Some(self.copies.assign(key, qos, &matching))
            }
        };
        self.matching = matching;
        let Some(sub) = sub else {
            return (true, from_subscribe);
        };
        if sub.id != 0 {
            ids.extend_from_slice(&[mqtt::prop::SUBSCRIPTION_ID]);
            mqtt::put_varint(ids, sub.id as usize);
        }
        if sub.options & NO_LOCAL != 0 && opened.private.origin == Some(self.origin) {
            // MQTT-3.8.3-3: never back to the client that published it.
            return (false, false);
        }
        if from_subscribe {
            return (!no_retained_on_subscribe(sub.options), true);
        }
        (
            true,
            sub.options & RETAIN_AS_PUBLISHED != 0 && opened.retained,
        )
    }

    /// The core granted the SUBSCRIBE `pkid` with `codes`: its filters owed retained
    /// messages (`retained_due`) get them, after the SUBACK, at the QoS granted.
    fn start_retained(&mut self, edge: &Edge, pkid: u16, codes: &[u8]) {
        let Some(i) = self.retained_due.iter().position(|(id, _)| *id == pkid) else {
            return;
        };
        let (_, due) = self.retained_due.swap_remove(i);
        // The subscription is in place in the core: what is stored from now on reaches it
        // live, so the replay stops at what is stored now (else a message published right
        // after the SUBACK would come twice, as retained and live).
        let upto = edge.retained.last_stored();
        for (at, filter) in due {
            let Some(&qos) = codes.get(at).filter(|&&c| c < 0x80) else {
                continue;
            };
            if self.retained_out.len() >= MAX_RETAINED_CURSORS {
                Metrics::inc(&edge.metrics.retained_not_sent);
                debug!("retained messages not sent: too many subscriptions waiting for theirs");
                continue;
            }
            self.retained_out.push_back(RetainedCursor {
                // A copy: `filter` is a slice of the SUBSCRIBE's read buffer.
                filter: Bytes::copy_from_slice(&filter),
                qos: qos.min(2),
                upto,
                after: None,
                page: Default::default(),
                done: false,
            });
        }
    }

    /// Whether the retained messages waiting (`retained_out`) can go now: the client's output
    /// has room and, for a QoS 1/2 subscription, the deliveries awaiting acknowledgement
    /// leave room too.
    fn retained_room(&self) -> bool {
        !self.retained_out.is_empty()
            && self.client_out.len() < HIGH_WATERMARK
            && !self.retained_waits_for_acks()
    }

    /// Whether the first subscription's retained messages, QoS 1/2 ones, wait for the client
    /// to acknowledge earlier deliveries: it has no room (its Receive Maximum), deliveries wait
    /// in `held`, or [`RETAINED_HELD`] are unacknowledged. They wait in the store, never as
    /// copies in `held`, so a client that does not acknowledge costs no memory. The core is
    /// read meanwhile, so the acknowledgements of the client's own publishes are not held up.
    fn retained_waits_for_acks(&self) -> bool {
        self.retained_out.front().is_some_and(|c| {
            c.qos > 0
                && (self.must_hold() || self.held.len() + self.core_acks.len() >= RETAINED_HELD)
        })
    }

    /// Sends retained messages, page by page from the store (`RetainedStore::page`), until
    /// the client's output is full, a QoS 1/2 subscription must wait for acknowledgements, or
    /// none are left. Each goes the way of a core delivery with packet id 0 (the edge's own,
    /// never acknowledged to the core, see `flush_core_acks`) and RETAIN set, so expiry, the
    /// min() QoS rule and the subscription's options apply as to any delivery.
    fn send_retained(&mut self, edge: &Edge) -> Result<(), End> {
        while self.retained_room() {
            let Some(cursor) = self.retained_out.front_mut() else {
                break;
            };
            let Some(message) = cursor.page.pop_front() else {
                if cursor.done {
                    self.retained_out.pop_front();
                } else {
                    let page = edge.retained.page(
                        &cursor.filter,
                        cursor.after.as_deref(),
                        RETAINED_PAGE,
                        cursor.upto,
                    );
                    if page.expired > 0 {
                        // Removed from the store as they were met.
                        let dropped = &edge.metrics.dropped_expired;
                        dropped.fetch_add(page.expired as u64, Relaxed);
                        edge.note_retained(edge.retained.totals());
                    }
                    cursor.done = page.next.is_none();
                    cursor.after = page.next;
                    cursor.page = page.messages.into();
                }
                continue;
            };
            // The client has room for it (`retained_room`).
            let frame = retained_frame(&message, cursor.qos);
            self.on_core_packet(edge, frame)?;
        }
        Ok(())
    }

    /// Whether a QoS 1/2 delivery must wait in `held`: the client has no room for it, or
    /// deliveries before it are waiting (they keep their order).
    fn must_hold(&self) -> bool {
        !self.held.is_empty() || !self.client_has_room()
    }

    /// Delivers held deliveries (see `held`) while the client has room for them.
    fn release_held(&mut self, edge: &Edge) -> Result<(), End> {
        while !self.held.is_empty() && self.client_has_room() {
            let Some(frame) = self.held.pop_front() else {
                break;
            };
            if self.restored == 0 {
                self.on_core_packet(edge, frame)?;
                continue;
            }
            self.restored -= 1;
            self.delivering_restored = true;
            let acks = self.core_acks.len();
            let step = self.on_core_packet(edge, frame.clone());
            self.delivering_restored = false;
            step?;
            // A QoS 1/2 delivery now awaiting the client's acknowledgement.
            if let Some(a) = self.core_acks.back().filter(|a| a.pkid == 0 && !a.ready) {
                if self.core_acks.len() > acks {
                    self.restored_out.push((a.client_id, a.fingerprint, frame));
                }
            }
        }
        Ok(())
    }

    /// What the edge keeps for the session's next connection of what it restored: the
    /// restored deliveries the client has not acknowledged, then those not yet sent; and for
    /// the former, the client ids they went out with (sent again under them, with DUP).
    fn offline_queue(&mut self) -> (Vec<Frame>, Vec<Redelivery>) {
        let mut queued = Vec::new();
        let mut unacked = Vec::new();
        for (client_id, fingerprint, frame) in std::mem::take(&mut self.restored_out) {
            let pending = self.core_acks.iter().any(|a| {
                a.pkid == 0 && !a.ready && a.client_id == client_id && a.fingerprint == fingerprint
            });
            if pending {
                unacked.push(Redelivery {
                    client_id,
                    fingerprint,
                    acked: false,
                    client_qos2: false,
                });
                queued.push(frame);
            }
        }
        queued.extend(self.held.drain(..self.restored));
        self.restored = 0;
        (queued, unacked)
    }

    fn on_core_packet(&mut self, edge: &Edge, frame: Frame) -> Result<(), End> {
        match frame.kind() {
            mqtt::PUBLISH => {
                let p = mqtt::parse_core_publish(&frame).map_err(|_| End::CoreGone)?;
                let opened = envelope::open(p.payload);
                // What the core cannot decide: expiry, and subscription options beyond QoS.
                let mut deliver = true;
                let mut retain = p.retain;
                let mut expiry_left = None;
                if let Some(at) = opened.private.expires_at {
                    let now = envelope::unix_millis();
                    if at <= now {
                        deliver = false;
                        Metrics::inc(&edge.metrics.dropped_expired);
                    } else {
                        expiry_left = Some((at - now).div_ceil(1000).min(u32::MAX as u64) as u32);
                    }
                }
                let mut ids = std::mem::take(&mut self.sub_id_props);
                ids.clear();
                if deliver && self.options_in_use {
                    (deliver, retain) =
                        self.apply_options(&p.topic, &opened, p.retain, p.qos, &mut ids);
                }
                if deliver && self.shared_unsubscribed && self.subscriptions_known {
                    deliver = self
                        .subscriptions
                        .keys()
                        .any(|f| mqtt::filter_matches(f, &p.topic));
                }
                // A message not delivered is taken as delivered at QoS 0: the edge
                // acknowledges it to the core itself.
                let qos = match opened.qos {
                    _ if !deliver => 0,
                    Some(q) => q.min(p.qos),
                    None => p.qos,
                };
                let mut dup = p.dup;
                let mut client_id = 0;
                if p.qos > 0 {
                    if self.core_acks.len() >= MAX_CORE_INFLIGHT {
                        warn!("core exceeded the inflight window");
                        return Err(End::CoreGone);
                    }
                    let fingerprint = if self.persistent {
                        fingerprint(&p.topic, &opened.payload)
                    } else {
                        0
                    };
                    // The edge's own deliveries (packet id 0) are never the core's re-sends, but
                    // a restored one may be a delivery the client has seen.
                    let own = p.pkid == 0 && !self.delivering_restored;
                    let earlier = match self.redeliveries.is_empty() || own {
                        true => None,
                        false => self
                            .redeliveries
                            .iter()
                            .position(|r| r.fingerprint == fingerprint)
                            .map(|i| self.redeliveries.remove(i)),
                    };
                    let mut entry = CoreAck {
                        pkid: p.pkid,
                        client_id: 0,
                        kind: if p.qos == 1 {
                            mqtt::PUBACK
                        } else {
                            mqtt::PUBREC
                        },
                        ready: qos == 0,
                        client_qos2: false,
                        fingerprint,
                    };
                    match earlier {
                        // Acknowledged by the client already, not yet by the edge to the core:
                        // acknowledge it now; the client never sees it twice.
                        Some(r) if r.acked => {
                            entry.client_id = r.client_id;
                            entry.ready = true;
                            entry.client_qos2 = r.client_qos2;
                            self.core_acks.push_back(entry);
                            self.flush_core_acks();
                            self.sub_id_props = ids;
                            return Ok(());
                        }
                        Some(r) => {
                            entry.client_id = r.client_id;
                            dup = true;
                        }
                        None if qos > 0 => entry.client_id = self.alloc_client_id(),
                        None => {}
                    }
                    client_id = entry.client_id;
                    self.core_acks.push_back(entry);
                }
                let alias = match deliver {
                    true => self.aliases.lookup(&p.topic),
                    false => Alias::None,
                };
                let with_more;
                let props: &[u8] = match (self.version, expiry_left, alias) {
                    (Version::V5, None, Alias::None) if ids.is_empty() => &opened.properties,
                    (Version::V5, left, alias) => {
                        // MQTT-3.3.2-6: what is left of the interval; MQTT-3.3.4-3: the
                        // identifiers of the matching subscriptions.
                        let mut p = Vec::with_capacity(8 + ids.len() + opened.properties.len());
                        if let Some(left) = left {
                            p.push(mqtt::prop::MESSAGE_EXPIRY);
                            p.extend_from_slice(&left.to_be_bytes());
                        }
                        if let Alias::Known(a) | Alias::New(a) = alias {
                            p.push(mqtt::prop::TOPIC_ALIAS);
                            p.extend_from_slice(&a.to_be_bytes());
                        }
                        p.extend_from_slice(&ids);
                        p.extend_from_slice(&opened.properties);
                        with_more = p;
                        &with_more
                    }
                    (Version::V311, _, _) => &[],
                };
                self.sub_id_props = ids;
                // MQTT-3.3.2-12: a known alias stands for the topic, which is left empty. Not at
                // QoS 2: MQTT.js (5.16) stores a QoS 2 message with the topic as received and
                // hands it over at PUBREL with an empty topic; the full topic with the alias
                // (which sets the same mapping again) works everywhere.
                let topic: &[u8] = match alias {
                    Alias::Known(_) if qos < 2 => &[],
                    _ => &p.topic,
                };
                let size = mqtt::publish_wire_len(
                    self.version,
                    qos,
                    topic.len(),
                    props.len(),
                    opened.payload.len(),
                );
                if !deliver {
                } else if size > self.client_max_packet {
                    // MQTT-3.1.2-25: never send a packet larger than the client accepts.
                    Metrics::inc(&edge.metrics.dropped_too_large_for_client);
                    if let Some(entry) = self.core_acks.back_mut() {
                        if entry.pkid == p.pkid {
                            entry.ready = true;
                        }
                    }
                } else {
                    // Assigned only now that the client is sure to get the packet that tells
                    // it the alias (deliveries reach the client in the order written here).
                    if let Alias::New(a) = alias {
                        self.aliases.assign(&p.topic, a);
                    }
                    mqtt::put_publish(
                        &mut self.client_out,
                        self.version,
                        dup && qos > 0,
                        qos,
                        retain,
                        topic,
                        client_id,
                        props,
                        &[&opened.payload],
                    );
                    Metrics::inc(&edge.metrics.publish_out[qos as usize]);
                    edge.metrics.bytes_out.fetch_add(size as u64, Relaxed);
                }
                if qos == 0 && p.qos > 0 {
                    self.flush_core_acks();
                }
            }
            mqtt::PUBACK => {
                // The core acknowledging one of the client's publishes (in the order received,
                // so the first is almost always the one).
                let (pkid, _) = mqtt::parse_ack(&frame).map_err(|_| End::CoreGone)?;
                match self.core_fwd.iter().position(|f| f.core_id == pkid) {
                    Some(i) => {
                        let Some(f) = self.core_fwd.remove(i) else {
                            return Ok(());
                        };
                        edge.metrics.core_ack.observe(f.sent.elapsed());
                        if f.early {
                            self.own_early_acks.answered();
                        } else if f.qos == 2 {
                            self.qos2_routed(f.client_id);
                        } else {
                            put_puback(&mut self.client_out, f.client_id, f.reason);
                        }
                    }
                    None => warn!(pkid, "core acknowledged an unknown publish"),
                }
            }
            mqtt::PUBREC | mqtt::PUBCOMP => {
                // The edge never publishes to the core at QoS 2.
                warn!(
                    kind = frame.kind(),
                    "unexpected QoS 2 acknowledgement from the core"
                );
                return Err(End::CoreGone);
            }
            mqtt::PUBREL => {
                let (pkid, _) = mqtt::parse_ack(&frame).map_err(|_| End::CoreGone)?;
                if self.core_pubrels.len() >= MAX_CORE_INFLIGHT {
                    return Err(End::CoreGone);
                }
                if let Some(i) = self.local_pubrel.iter().position(|&id| id == pkid) {
                    // The client got this message at QoS 0 or 1: the edge completes the flow.
                    self.local_pubrel.swap_remove(i);
                    self.core_pubrels.push_back((pkid, 0, true));
                    self.flush_core_pubcomps();
                } else {
                    // The core re-sends the PUBRELs of an earlier connection first (under
                    // that connection's ids), then those of this one.
                    let earlier = self
                        .pubrel_to_client_earlier
                        .iter()
                        .position(|&(core, _)| core == pkid);
                    let now = self
                        .pubrel_to_client
                        .iter()
                        .position(|&(core, _)| core == pkid);
                    let client = if let Some(i) = earlier {
                        self.pubrel_to_client_earlier.swap_remove(i).1
                    } else if let Some(i) = now {
                        self.pubrel_to_client.swap_remove(i).1
                    } else if self
                        .core_pubrels
                        .iter()
                        .any(|&(core, _, ready)| core == pkid && !ready)
                    {
                        // Already with the client, awaiting its PUBCOMP.
                        return Ok(());
                    } else {
                        // No client id is known for it (the session's offline state was
                        // dropped): the edge completes the flow itself.
                        self.core_pubrels.push_back((pkid, 0, true));
                        self.flush_core_pubcomps();
                        return Ok(());
                    };
                    mqtt::put_ack(&mut self.client_out, mqtt::PUBREL, client);
                    self.core_pubrels.push_back((pkid, client, false));
                }
            }
            mqtt::SUBACK => {
                let (pkid, codes) = mqtt::parse_core_suback(&frame).map_err(|_| End::CoreGone)?;
                if let Some(i) = self.internal_subacks.iter().position(|&id| id == pkid) {
                    self.internal_subacks.swap_remove(i);
                    return Ok(());
                }
                self.own_subscribes.answered();
                match self.pending_subacks.iter().position(|(id, _)| *id == pkid) {
                    Some(i) => {
                        let (_, mine) = self.pending_subacks.swap_remove(i);
                        let mut from_core = codes.iter().copied();
                        let merged: Vec<u8> = mine
                            .into_iter()
                            .map(|c| {
                                c.or_else(|| from_core.next())
                                    .unwrap_or(reason::UNSPECIFIED)
                            })
                            .collect();
                        mqtt::put_suback(&mut self.client_out, self.version, pkid, &merged);
                    }
                    None => mqtt::put_suback(&mut self.client_out, self.version, pkid, &codes),
                }
                self.start_retained(edge, pkid, &codes);
            }
            // The edge answers UNSUBSCRIBE itself (see `on_client_packet`).
            mqtt::UNSUBACK => {}
            mqtt::PINGRESP => {
                match self.core_pings.pop_front() {
                    Some(PingFor::Unsubscribe {
                        pkid,
                        codes,
                        fenced,
                    }) => {
                        if fenced {
                            self.own_subscribes.answered();
                        }
                        mqtt::put_unsuback(&mut self.client_out, self.version, pkid, &codes);
                    }
                    Some(PingFor::Resume) => {
                        // PUBRELs the core did not re-send: it had completed them. Their ids
                        // are free again.
                        self.pubrel_to_client_earlier.clear();
                    }
                    Some(PingFor::Nothing) | None => {}
                }
            }
            mqtt::DISCONNECT => return Err(End::CoreGone),
            _ => {
                warn!(kind = frame.kind(), "unexpected packet from the core");
                return Err(End::CoreGone);
            }
        }
        Ok(())
    }

    /// Ends the connection: tells the client why (v5), publishes the will when MQTT says it
    /// fires, and closes the core connection. Returns the will when it fires but must wait
    /// for its Will Delay Interval (the caller sets the timer).
    async fn close(mut self, edge: &Edge, end: End) -> Option<Will> {
        let client_reason = match end {
            End::KeepAliveTimeout => Some(reason::KEEP_ALIVE_TIMEOUT),
            End::SlowConsumer => Some(reason::IMPLEMENTATION_SPECIFIC),
            End::ProtocolError(code) => Some(code),
            End::RateLimited => Some(reason::MESSAGE_RATE_TOO_HIGH),
            End::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            End::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            End::CoreGone => Some(reason::UNSPECIFIED),
            End::ClientDisconnect
            | End::ClientDisconnectWithWill
            | End::ClientGone
            | End::SecondConnect => None,
        };
        let client_alive = !matches!(
            end,
            End::ClientGone
                | End::ClientDisconnect
                | End::ClientDisconnectWithWill
                | End::SlowConsumer
        );
        if client_alive {
            if let (Version::V5, Some(code)) = (self.version, client_reason) {
                mqtt::put_disconnect(&mut self.client_out, Version::V5, code);
            }
            let out = std::mem::take(&mut self.client_out);
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = self.client.write_all(&out).await;
                let _ = self.client.flush().await;
            })
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.shutdown()).await;

        // The will: discarded by a clean DISCONNECT (and by a broker shutdown), published in
        // every other case (MQTT-3.1.2-8, MQTT-3.14.4-3), including a v5 DISCONNECT 0x04 and a
        // session takeover. The edge publishes it on the client's own core connection right
        // before closing it, rather than leaving it to rumqttd: only a DISCONNECT packet can
        // discard a will held by the core, and rumqttd raises two disconnect events for a
        // connection that sends one; when a new connection has meanwhile taken over the freed
        // connection slot, the late event drops it. So the core never sees a DISCONNECT from
        // the edge, and every close is an orderly socket shutdown.
        let mut out = std::mem::take(&mut self.core_out);
        let fire_will = !matches!(end, End::ClientDisconnect | End::Shutdown);
        let mut delayed = None;
        match self.will.take() {
            Some(w) if fire_will && self.will_delay > 0 && self.session_expiry > 0 => {
                delayed = Some(w);
            }
            Some(w) if fire_will => {
                edge.put_will(&w, &mut out);
                debug!("will published");
            }
            _ => {}
        }
        if end == End::CoreGone {
            // Nothing can be delivered over a connection the core closed.
            return delayed;
        }
        let mut core = self.core;
        let _ = tokio::time::timeout(CORE_CLOSE_WAIT, async {
            core.write_all(&out).await?;
            core.shutdown().await?;
            let mut sink = [0u8; 1024];
            while core.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
        if matches!(end, End::ProtocolError(_) | End::RateLimited) {
            // Last, with the will out and the core connection closed: a client ended for what
            // it sent is likely still sending (paho's flow control test answers every PUBREC
            // before it reads the DISCONNECT). Closing with its data unread would reset the
            // connection, and a reset can destroy the DISCONNECT in the client's receive
            // buffer before it is read, or fail the client's next write. So read and discard
            // until the client closes too, for a moment at most.
            let _ = tokio::time::timeout(LINGER, async {
                let mut sink = [0u8; 4096];
                while matches!(self.client.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        delayed
    }
}

/// Topic aliases for the deliveries to one v5 client that accepts them (its CONNECT's Topic
/// Alias Maximum), when `limits.topic_aliases` allows any. The first distinct topics
/// delivered, up to the smaller of the two, each get an alias (and a copy of the topic kept), sent with the full topic the first time and with
/// an empty topic after; later topics go without one. An alias is never given to another
/// topic, so nothing the client has learnt ever becomes wrong, and there is no eviction to
/// get out of order.
#[derive(Debug, Default)]
struct TopicAliases {
    max: u16,
    assigned: std::collections::HashMap<Bytes, u16>,
}

/// What a delivery's topic gets from `TopicAliases`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Alias {
    None,
    /// The topic's alias, already known to the client: the topic is left out.
    Known(u16),
    /// The alias the topic would get, sent with the full topic (`TopicAliases::assign` once
    /// the packet is certain to go out).
    New(u16),
}

impl TopicAliases {
    fn new(max: u16) -> TopicAliases {
        TopicAliases {
            max,
            assigned: Default::default(),
        }
    }

    fn lookup(&self, topic: &[u8]) -> Alias {
        if self.max == 0 {
            return Alias::None;
        }
        match self.assigned.get(topic) {
            Some(&a) => Alias::Known(a),
            None if self.assigned.len() < usize::from(self.max) => {
                Alias::New(self.assigned.len() as u16 + 1)
            }
            None => Alias::None,
        }
    }

    fn assign(&mut self, topic: &[u8], alias: u16) {
        self.assigned.insert(Bytes::copy_from_slice(topic), alias);
    }
}

/// A connection's share of one of the edge's fence counters (`Edge::subscribes_in_flight`,
/// `Edge::early_acks_in_flight`), given back when it is dropped: what the core never answered
/// then no longer holds other clients back.
struct InFlight {
    edge: Arc<Edge>,
    counter: fn(&Edge) -> &AtomicUsize,
    mine: usize,
}

impl InFlight {
    fn new(edge: &Arc<Edge>, counter: fn(&Edge) -> &AtomicUsize) -> InFlight {
        InFlight {
            edge: edge.clone(),
            counter,
            mine: 0,
        }
    }

    fn sent(&mut self) {
        self.mine += 1;
        (self.counter)(&self.edge).fetch_add(1, Relaxed);
    }

    fn answered(&mut self) {
        if self.mine > 0 {
            self.mine -= 1;
            (self.counter)(&self.edge).fetch_sub(1, Relaxed);
        }
    }

    /// Whether other connections have some in flight.
    fn others_in_flight(&self) -> bool {
        (self.counter)(&self.edge).load(Relaxed) > self.mine
    }
}

/// A connection watched by the subscribe fence until its first packet is handled (`fresh`);
/// dropping it stops the watch.
struct Watched {
    edge: Arc<Edge>,
    entry: Arc<fresh::Entry>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.edge.fresh.forget(self.entry.id());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        (self.counter)(&self.edge).fetch_sub(self.mine, Relaxed);
    }
}

enum Event {
    ClientData,
    /// Retained messages are waiting to be sent and there is room for them (`send_retained`).
    RetainedRoom,
    CoreData,
    Timer,
    Kicked,
    End(End),
}

/// A subscription whose retained messages are being sent (`Session::send_retained`).
struct RetainedCursor {
    filter: Bytes,
    /// The QoS the core granted.
    qos: u8,
    /// The store's `last_stored` when the SUBACK was read: later messages come live.
    upto: u64,
    /// Where the next page starts (after this topic; `RetainedStore::page`).
    after: Option<Bytes>,
    /// Read from the store, not yet sent.
    page: std::collections::VecDeque<Retained>,
    /// The store has no more after `page`.
    done: bool,
}

/// A retained message as the core would deliver it for a new subscription: RETAIN set, the
/// topic escaped as the core's are, packet id 0 at QoS 1/2 (the edge's own delivery).
fn retained_frame(message: &Retained, qos: u8) -> Frame {
    let topic = mqtt::core_topic(&message.topic);
    let mut body = BytesMut::with_capacity(2 + topic.len() + 2 + message.payload.len());
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(&topic);
    if qos > 0 {
        body.extend_from_slice(&[0, 0]);
    }
    body.extend_from_slice(&message.payload);
    Frame {
        header: (mqtt::PUBLISH << 4) | (qos << 1) | 0x01,
        body: body.freeze(),
    }
}

/// Smallest and largest read buffer growth step. Idle connections keep the small one; a busy
/// connection's step doubles while reads fill it, so bursts need few system calls.
const READ_STEP_MIN: usize = 2 * 1024;
const READ_STEP_MAX: usize = 64 * 1024;
/// Buffers are given back after a burst once they are empty and larger than this.
const RETAIN_CAPACITY: usize = 16 * 1024;

/// A digest of a delivery's topic and payload, to recognise the core's
/// re-sending of a message after a persistent session resumes. Not cryptographic: it only has
/// to tell apart the few deliveries one session had in flight.
fn fingerprint(topic: &[u8], payload: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = (topic.len() as u64) << 32 ^ payload.len() as u64;
    for part in [topic, payload] {
        let mut chunks = part.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    }
    h
}

/// Makes room for the next read, sized by how much the last reads brought (`step`).
fn reserve(buf: &mut BytesMut, step: usize) {
    if buf.capacity() - buf.len() < step / 2 {
        buf.reserve(step);
    }
}

/// Adapts a read step to the bytes a read returned.
fn next_step(step: usize, read: usize) -> usize {
    if read >= step / 2 {
        (step * 2).min(READ_STEP_MAX)
    } else {
        (step / 2).max(READ_STEP_MIN)
    }
}

/// Whether the client gets a packet back for `frame` (an acknowledgement, SUBACK, UNSUBACK,
/// PINGRESP or PUBCOMP), which carries the TCP acknowledgement with it.
fn gets_an_answer(frame: &Frame) -> bool {
    match frame.kind() {
        mqtt::PUBLISH => frame.flags() & 0b0110 != 0,
        mqtt::SUBSCRIBE | mqtt::UNSUBSCRIBE | mqtt::PINGREQ | mqtt::PUBREL | mqtt::PUBREC => true,
        _ => false,
    }
}

/// A copy of `part` of a packet, for what is kept after the packet has been handled (a
/// subscription, a will, the last topic allowed). A slice would share the read buffer's
/// allocation and keep all of it, every packet read with it included, for as long as the
/// slice lives: 10 KB per topic name in a measured case, where the name was 12 bytes.
fn owned(part: &Bytes) -> Bytes {
    Bytes::copy_from_slice(part)
}

/// Frees a large buffer once it is empty, so an idle connection holds little memory.
fn release_if_idle(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > RETAIN_CAPACITY {
        *buf = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_aliases_are_given_once_and_never_reassigned() {
        let mut a = TopicAliases::new(2);
        assert_eq!(a.lookup(b"x"), Alias::New(1));
        assert_eq!(a.lookup(b"x"), Alias::New(1), "not assigned until sent");
        a.assign(b"x", 1);
        assert_eq!(a.lookup(b"x"), Alias::Known(1));
        a.assign(b"y", 2);
        assert_eq!(
            a.lookup(b"z"),
            Alias::None,
            "the client's maximum is reached"
        );
        assert_eq!(a.lookup(b"y"), Alias::Known(2));
        assert_eq!(TopicAliases::new(0).lookup(b"x"), Alias::None);
    }
}
