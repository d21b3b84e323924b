//! The JSON bridge: browsers speak the JSON protocol of docs/bridge-protocol.md over a
//! WebSocket at `/ws`, and each session becomes an MQTT 5 client of the edge.
//!
//! A bridge session is two tasks joined by an in-memory pipe:
//!
//! ```text
//! browser ⇄ WebSocket ⇄ [translator: this module] ⇄ duplex pipe ⇄ [edge relay] ⇄ core
//! ```
//!
//! The translator turns JSON frames into MQTT 5 packets and back; everything else, from
//! authentication and client-id takeover to persistent sessions, QoS 2 state across reconnects
//! and wills, is the edge relay's (`edge::connection`), exactly as for an MQTT client. So a
//! browser gets precisely the semantics an MQTT client gets, from the same code.
//!
//! Like the relay, the translator is one task with one event loop (`poll_io`): no channels,
//! no locks. Its own state is what JSON adds or must check: which ids await which
//! acknowledgement (so a wrong ack is an `error` frame, not a protocol violation that would
//! end the MQTT session), pending subscribe/unsubscribe requests and their `ref`s, and the
//! outgoing frame queue with its QoS 0 drop policy.

pub mod frames;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::io::poll_read_buf;
use tracing::{debug, info, Instrument};

use crate::edge::policy::Identity;
use crate::edge::{connection, Edge, Listener, Origin};
use crate::metrics::Metrics;
use crate::mqtt::{self, reason, Frame};
use frames::{ConnectReq, FrameError, PublishReq, Request};

/// Protocol version reported in `connack`.
pub const PROTOCOL_VERSION: u32 = 1;
/// The WebSocket subprotocol naming this protocol.
pub const SUBPROTOCOL: &str = "vigil.bridge.v1";
/// QoS 1/2 deliveries awaiting the browser's acknowledgement (MQTT 5 Receive Maximum).
const RECEIVE_MAXIMUM: u16 = 100;
/// Bytes the pipe between translator and relay holds in each direction.
const PIPE_CAPACITY: usize = 64 * 1024;
/// MQTT bytes buffered for the relay before the translator stops reading the browser.
const PIPE_HIGH_WATERMARK: usize = 256 * 1024;
/// Browser publishes handed to the relay and not yet acknowledged by it; past this the
/// translator stops reading the browser (the relay acknowledges a QoS 1 publish as it hands it
/// to the core while few are in flight, otherwise when the core has it; its own window is
/// 1000).
const MAX_PUBLISHES_AT_RELAY: usize = 500;
/// QoS 2 publishes of the browser whose exchange is not complete (the relay allows 1024).
const MAX_QOS2_OPEN: usize = 1000;
/// Subscribe/unsubscribe requests awaiting the relay's answer.
const MAX_PENDING_CONTROL: usize = 256;
/// `history` requests of one session being answered at once; more get `too_many_requests`.
const MAX_HISTORY_REQUESTS: usize = 4;
/// How long the relay may take to answer the CONNECT (it may be waiting for a takeover).
const CONNACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing session may take to flush its last frames and close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("no connect frame in time")]
    HandshakeTimeout,
    #[error("the socket closed before connect")]
    ClosedBeforeConnect,
}

/// Credentials presented at the WebSocket handshake (`?token=` or `Authorization: Bearer`).
#[derive(Debug, Default, Clone)]
pub struct Handshake {
    pub token: Option<String>,
    /// The verified client-certificate common name of a TLS connection.
    pub tls_cn: Option<String>,
}

/// Serves one bridge WebSocket from its first frame to its close.
pub async fn serve<S>(
    edge: Arc<Edge>,
    mut ws: WebSocketStream<S>,
    peer: SocketAddr,
    handshake: Handshake,
    slot: OwnedSemaphorePermit,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let max_payload = edge.max_packet_size;
    let connect = match tokio::time::timeout_at(deadline, first_frame(&mut ws, max_payload)).await {
        Err(_) => {
            Metrics::inc(&edge.metrics.handshake_timeouts);
            debug!("closed: no connect frame in time");
            close_with(
                &mut ws,
                CloseCode::Policy,
                "not_connected: no connect frame in time",
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "closed before connect");
            return;
        }
        Ok(Ok(Err(reason))) => {
            Metrics::inc(&edge.metrics.protocol_errors);
            close_with(&mut ws, CloseCode::Policy, &reason).await;
            return;
        }
        Ok(Ok(Ok(Err(e)))) => {
            refuse(&mut ws, e.code, &e.message).await;
            return;
        }
        Ok(Ok(Ok(Ok(c)))) => c,
    };
    let Ok(session_permit) = edge.bridge.sessions.clone().try_acquire_owned() else {
        Metrics::inc(&edge.metrics.refused_over_cap);
        info!("bridge refused: session cap reached");
        refuse(&mut ws, "server_busy", "too many bridge sessions").await;
        return;
    };

    let mut out = BytesMut::with_capacity(256);
    if let Err(e) = put_connect(&mut out, &connect, &handshake) {
        refuse(&mut ws, e.code, &e.message).await;
        return;
    }
    let (mut pipe, relay_end) = tokio::io::duplex(PIPE_CAPACITY);
    let identity = Arc::new(std::sync::OnceLock::new());
    let relay = connection::serve(
        edge.clone(),
        relay_end,
        BytesMut::new(),
        Origin {
            peer,
            listener: Listener::Bridge,
            tls_cn: handshake.tls_cn.clone(),
            identity: Some(identity.clone()),
        },
        slot,
        deadline,
    );
    edge.tracker
        .spawn(relay.instrument(tracing::Span::current()));

    let mut pipe_in = BytesMut::with_capacity(1024);
    let connack = tokio::time::timeout(CONNACK_TIMEOUT, async {
        pipe.write_all(&out).await?;
        read_packet(&mut pipe, &mut pipe_in, edge.max_packet_size + 16).await
    })
    .await;
    let connack = match connack {
        Ok(Ok(Some(frame))) if frame.kind() == mqtt::CONNACK => parse_connack(&frame),
        _ => None,
    };
    let Some(connack) = connack else {
        refuse(&mut ws, "server_unavailable", "the broker did not answer").await;
        return;
    };
    if connack.code != 0 {
        let (code, message) = match connack.code {
            reason::BAD_USER_NAME_OR_PASSWORD | reason::NOT_AUTHORIZED => {
                ("not_authorized", "not authorized")
            }
            reason::CLIENT_ID_NOT_VALID => ("client_id_rejected", "client id not accepted"),
            reason::SERVER_BUSY => ("server_busy", "the broker is at its connection limit"),
            _ => ("server_unavailable", "the broker is unavailable"),
        };
        refuse(&mut ws, code, message).await;
        return;
    }
    let client_id = connack
        .assigned_client_id
        .clone()
        .or(connect.client_id.clone())
        .unwrap_or_default();
    // The relay has recorded the client id in the connection span this session shares.
    let keep_alive = connack.server_keep_alive.unwrap_or(connect.keep_alive);
    let mut greeting = String::with_capacity(192);
    greeting.push_str("{\"op\":\"connack\",\"ok\":true,\"protocol\":");
    greeting.push_str(&PROTOCOL_VERSION.to_string());
    greeting.push_str(if connack.session_present {
        ",\"session_present\":true"
    } else {
        ",\"session_present\":false"
    });
    greeting.push_str(",\"client_id\":");
    frames::push_str(&mut greeting, &client_id);
    greeting.push_str(&format!(
        ",\"keep_alive\":{keep_alive},\"receive_maximum\":{RECEIVE_MAXIMUM},\"max_message_size\":{}}}",
        edge.max_packet_size
    ));
    debug!(
        session_present = connack.session_present,
        "bridge connected"
    );

    let now = Instant::now();
    let (history_tx, history_rx) = mpsc::channel(MAX_HISTORY_REQUESTS);
    let mut session = Session {
        edge: &edge,
        ws,
        pipe,
        pipe_in,
        pipe_out: BytesMut::new(),
        ws_out: VecDeque::new(),
        ws_out_bytes: 0,
        unflushed: false,
        last_progress: now,
        stall_timeout: edge.write_stall_timeout,
        max_payload,
        browser_pubs: HashMap::new(),
        publishes_at_relay: 0,
        qos2_open: 0,
        deliveries: HashMap::new(),
        pending_subs: HashMap::new(),
        pending_unsubs: HashMap::new(),
        subscriptions: HashSet::new(),
        next_control_id: 1,
        prefer_pipe: false,
        disconnecting: false,
        closing: None,
        identity,
        client_id,
        history_in_flight: 0,
        history_tx,
        history_rx,
    };
    session.queue(greeting);
    let end = session.run().await;
    session.finish(end).await;
    drop(session_permit);
}

/// Reads until the first text frame and parses it. The outer `Err` is a transport failure,
/// the middle one a protocol violation (the close reason), the inner one a refused connect.
async fn first_frame<S>(
    ws: &mut WebSocketStream<S>,
    max_payload: usize,
) -> Result<Result<Result<ConnectReq, FrameError>, String>, BridgeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let Some(msg) = ws.next().await else {
            return Err(BridgeError::ClosedBeforeConnect);
        };
        match msg? {
            Message::Text(text) => {
                let parsed = frames::parse(text.as_str(), max_payload);
                return Ok(match parsed.request {
                    Ok(Request::Connect(c)) => Ok(Ok(c)),
                    Err(e) if is_connect(text.as_str()) => Ok(Err(e)),
                    _ => Err("not_connected: the first frame must be connect".to_string()),
                });
            }
            Message::Binary(_) => {
                return Ok(Err(
                    "not_connected: the first frame must be a connect text frame".to_string(),
                ))
            }
            Message::Close(_) => return Err(BridgeError::ClosedBeforeConnect),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// Whether a frame that failed to parse was meant as a `connect` (so it gets a `connack`).
fn is_connect(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Op<'a> {
        #[serde(borrow)]
        op: Option<std::borrow::Cow<'a, str>>,
    }
    matches!(serde_json::from_str::<Op<'_>>(text), Ok(Op { op: Some(op) }) if op == "connect")
}

/// Answers a refused connect and closes.
async fn refuse<S>(ws: &mut WebSocketStream<S>, code: &str, message: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut frame = String::from("{\"op\":\"connack\",\"ok\":false,\"code\":");
    frames::push_str(&mut frame, code);
    frame.push_str(",\"message\":");
    frames::push_str(&mut frame, message);
    frame.push('}');
    let _ = tokio::time::timeout(CLOSE_WAIT, ws.send(Message::Text(frame.into()))).await;
    close_with(ws, CloseCode::Policy, &format!("{code}: {message}")).await;
}

/// Sends a close frame (reason cut to the 123 bytes a close frame allows) and waits briefly.
async fn close_with<S>(ws: &mut WebSocketStream<S>, code: CloseCode, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..cut]),
    };
    let deadline = Instant::now() + CLOSE_WAIT;
    if tokio::time::timeout_at(deadline, ws.close(Some(frame)))
        .await
        .is_err()
    {
        return;
    }
    // Read what the client still sends (its close frame, the rest of an oversized message)
    // until it closes: closing a socket with unread data resets it, and the client could
    // lose the close frame.
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    while let Ok(Ok(1..)) = tokio::time::timeout_at(deadline, ws.get_mut().read(&mut sink)).await {}
}

/// Reads one MQTT packet from the pipe (`None` at end of stream).
async fn read_packet(
    pipe: &mut DuplexStream,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<Option<Frame>> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(frame) = mqtt::read_frame(buf, max).map_err(std::io::Error::other)? {
            return Ok(Some(frame));
        }
        buf.reserve(1024);
        if pipe.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Writes the MQTT 5 CONNECT a bridge `connect` stands for.
fn put_connect(
    out: &mut BytesMut,
    c: &ConnectReq,
    handshake: &Handshake,
) -> Result<(), FrameError> {
    let too_long = |what: &str| FrameError::new("bad_frame", format!("{what} too long"));
    let client_id = c.client_id.as_deref().unwrap_or("");
    let password = c
        .password
        .as_deref()
        .or(c.token.as_deref())
        .or(handshake.token.as_deref());
    // Clean Start; without it the session outlives the connection (Session Expiry below).
    let mut flags = if c.clean { 0x02 } else { 0 };
    let mut body = BytesMut::with_capacity(64);
    body.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', 5]);
    let flags_at = body.len();
    body.put_u8(0);
    body.put_u16(c.keep_alive);
    // Properties: Session Expiry (persistent sessions never expire on their own, as with
    // 3.1.1 clean session 0) and our Receive Maximum.
    let mut props = BytesMut::with_capacity(8);
    if !c.clean {
        props.put_u8(mqtt::prop::SESSION_EXPIRY);
        props.put_u32(u32::MAX);
    }
    props.put_u8(mqtt::prop::RECEIVE_MAXIMUM);
    props.put_u16(RECEIVE_MAXIMUM);
    mqtt::put_varint(&mut body, props.len());
    body.put_slice(&props);
    put_str(&mut body, client_id.as_bytes()).ok_or_else(|| too_long("client_id"))?;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos << 3) | if w.retain { 0x20 } else { 0 };
        body.put_u8(0); // no will properties
        put_str(&mut body, w.topic.as_bytes()).ok_or_else(|| too_long("will topic"))?;
        put_str(&mut body, &w.payload).ok_or_else(|| too_long("will payload"))?;
    }
    if let Some(user) = &c.username {
        flags |= 0x80;
        put_str(&mut body, user.as_bytes()).ok_or_else(|| too_long("username"))?;
    }
    if let Some(password) = password {
        flags |= 0x40;
        put_str(&mut body, password.as_bytes()).ok_or_else(|| too_long("password"))?;
    }
    body[flags_at] = flags;
    out.put_u8(mqtt::CONNECT << 4);
    mqtt::put_varint(out, body.len());
    out.put_slice(&body);
    Ok(())
}

fn put_str(out: &mut BytesMut, b: &[u8]) -> Option<()> {
    let len = u16::try_from(b.len()).ok()?;
    out.put_u16(len);
    out.put_slice(b);
    Some(())
}

struct Connack {
    session_present: bool,
    code: u8,
    assigned_client_id: Option<String>,
    server_keep_alive: Option<u16>,
}

fn parse_connack(frame: &Frame) -> Option<Connack> {
    let body = &frame.body;
    let mut connack = Connack {
        session_present: body.first()? & 1 != 0,
        code: *body.get(1)?,
        assigned_client_id: None,
        server_keep_alive: None,
    };
    let mut rest = body.slice(2..);
    let len = get_varint(&mut rest)?;
    let props = rest.get(..len).map(|p| rest.slice_ref(p))?;
    mqtt::for_each_property(&props, |id, value| {
        match id {
            mqtt::prop::ASSIGNED_CLIENT_ID => {
                connack.assigned_client_id =
                    Some(String::from_utf8_lossy(value.get(2..).unwrap_or_default()).into_owned())
            }
            mqtt::prop::SERVER_KEEP_ALIVE if value.len() == 2 => {
                connack.server_keep_alive = Some(u16::from_be_bytes([value[0], value[1]]))
            }
            _ => {}
        }
        Ok(())
    })
    .ok()?;
    Some(connack)
}

fn get_varint(buf: &mut Bytes) -> Option<usize> {
    let mut n = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = *buf.first()?;
        buf.advance(1);
        n |= ((byte & 0x7F) as usize) << shift;
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// Where a browser publish stands (keyed by the browser's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrowserPub {
    /// QoS 1 at the relay, awaiting its PUBACK.
    Qos1,
    /// QoS 2 at the relay, awaiting its PUBREC.
    Qos2,
    /// `pubrec` sent to the browser, awaiting its `pubrel`.
    Received,
    /// `pubrel` forwarded, awaiting the relay's PUBCOMP.
    Released,
}

/// Where a delivery to the browser stands (keyed by the server's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    AwaitPuback,
    AwaitPubrec,
    /// The browser's `pubrec` is forwarded; the relay's PUBREL will follow.
    Received,
    /// `pubrel` sent to the browser, awaiting its `pubcomp`.
    AwaitPubcomp,
}

/// A subscribe awaiting the relay's SUBACK: the request's `ref` and, per filter, either the
/// error already known or `None` for a code the SUBACK supplies.
struct PendingSub {
    reference: Option<String>,
    filters: Vec<(String, Option<&'static str>)>,
}

struct PendingUnsub {
    reference: Option<String>,
    filters: Vec<String>,
}

/// Why the event loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The browser's socket closed or failed: the relay sees the pipe close (will published).
    BrowserGone,
    /// The relay ended the session; `Some(reason)` when it said why (MQTT 5 DISCONNECT).
    RelayClosed(Option<u8>),
    /// The browser sent `disconnect` and the relay has closed.
    Disconnected,
    SlowConsumer,
    ProtocolViolation(&'static str),
    /// A WebSocket message or frame over the size limit.
    TooLarge,
}

enum Event {
    Browser(Message),
    /// The answer to a `history` request, ready to queue.
    History(String),
    Relay,
    Timer,
    End(End),
}

struct Session<'e, S> {
    edge: &'e Edge,
    ws: WebSocketStream<S>,
    pipe: DuplexStream,
    pipe_in: BytesMut,
    pipe_out: BytesMut,
    /// Frames not yet handed to the WebSocket, and their size.
    ws_out: VecDeque<Utf8Bytes>,
    ws_out_bytes: usize,
    /// Frames handed to the WebSocket but not yet flushed to the socket.
    unflushed: bool,
    /// Last time the WebSocket accepted or flushed output (the slow-consumer clock).
    last_progress: Instant,
    stall_timeout: Duration,
    max_payload: usize,
    browser_pubs: HashMap<u16, BrowserPub>,
    publishes_at_relay: usize,
    qos2_open: usize,
    deliveries: HashMap<u16, Delivery>,
    pending_subs: HashMap<u16, PendingSub>,
    pending_unsubs: HashMap<u16, PendingUnsub>,
    /// Filters this connection subscribed (the `max_subscriptions` count).
    subscriptions: HashSet<String>,
    next_control_id: u16,
    prefer_pipe: bool,
    /// `disconnect` received: the MQTT DISCONNECT is on its way and the relay will close.
    disconnecting: bool,
    /// The relay's DISCONNECT reason, once received.
    closing: Option<u8>,
    /// The identity the relay authenticated (for requests outside MQTT) and the client id.
    identity: Arc<std::sync::OnceLock<Identity>>,
    client_id: String,
    /// `history` requests being answered, and where their answers arrive.
    history_in_flight: usize,
    history_tx: mpsc::Sender<String>,
    history_rx: mpsc::Receiver<String>,
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn run(&mut self) -> End {
        let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(self.stall_timeout));
        // Packets that arrived together with the CONNACK are already in `pipe_in`.
        if let Err(end) = self.on_relay() {
            return end;
        }
        loop {
            let event = poll_fn(|cx| self.poll_io(cx, timer.as_mut())).await;
            let step = match event {
                Event::Browser(msg) => self.on_browser(msg),
                Event::Relay => self.on_relay(),
                Event::History(frame) => {
                    self.history_in_flight -= 1;
                    self.queue(frame);
                    Ok(())
                }
                Event::Timer => {
                    if self.stalled() && Instant::now() >= self.last_progress + self.stall_timeout {
                        return End::SlowConsumer;
                    }
                    Ok(())
                }
                Event::End(end) => return end,
            };
            if let Err(end) = step {
                return end;
            }
            let next = if self.stalled() {
                self.last_progress + self.stall_timeout
            } else {
                Instant::now() + self.stall_timeout
            };
            if next != timer.deadline() {
                timer.as_mut().reset(next);
            }
        }
    }

    fn stalled(&self) -> bool {
        !self.ws_out.is_empty() || self.unflushed
    }

    fn poll_io(&mut self, cx: &mut Context<'_>, timer: Pin<&mut Sleep>) -> Poll<Event> {
        while !self.pipe_out.is_empty() {
            match Pin::new(&mut self.pipe).poll_write(cx, &self.pipe_out) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Event::End(self.relay_end()))
                }
                Poll::Ready(Ok(n)) => self.pipe_out.advance(n),
                Poll::Pending => break,
            }
        }
        let mut sent = false;
        while !self.ws_out.is_empty() {
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let Some(frame) = self.ws_out.pop_front() else {
                        break;
                    };
                    self.ws_out_bytes -= frame.len();
                    if Pin::new(&mut self.ws)
                        .start_send(Message::Text(frame))
                        .is_err()
                    {
                        return Poll::Ready(Event::End(End::BrowserGone));
                    }
                    sent = true;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Event::End(End::BrowserGone)),
                Poll::Pending => break,
            }
        }
        // Progress for the slow-consumer clock is the WebSocket taking a frame or finishing a
        // flush; a flush that stays pending is not progress.
        let mut progress = sent;
        if sent || self.unflushed {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    progress = true;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Event::End(End::BrowserGone)),
                Poll::Pending => self.unflushed = true,
            }
        }
        if progress {
            self.last_progress = Instant::now();
        }

        // The outgoing queue may exceed `max_queued_bytes` only by QoS 1/2 messages (at most
        // the Receive Maximum) and answers; past twice the bound both reads pause.
        let out_room = self.ws_out_bytes < 2 * self.edge.bridge.max_queued_bytes + (1 << 20);
        let read_pipe = out_room;
        let read_browser = out_room
            && !self.disconnecting
            && self.pipe_out.len() < PIPE_HIGH_WATERMARK
            && self.publishes_at_relay < MAX_PUBLISHES_AT_RELAY
            && self.pending_subs.len() + self.pending_unsubs.len() < MAX_PENDING_CONTROL;
        self.prefer_pipe = !self.prefer_pipe;
        for pipe_side in [self.prefer_pipe, !self.prefer_pipe] {
            if pipe_side && read_pipe {
                if self.pipe_in.capacity() - self.pipe_in.len() < 4096 {
                    self.pipe_in.reserve(16 * 1024);
                }
                match poll_read_buf(Pin::new(&mut self.pipe), cx, &mut self.pipe_in) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Event::End(self.relay_end()))
                    }
                    Poll::Ready(Ok(_)) => return Poll::Ready(Event::Relay),
                    Poll::Pending => {}
                }
            } else if !pipe_side && read_browser {
                match Pin::new(&mut self.ws).poll_next(cx) {
                    Poll::Ready(Some(Ok(msg))) => return Poll::Ready(Event::Browser(msg)),
                    Poll::Ready(Some(Err(WsError::Capacity(e)))) => {
                        debug!(error = %e, "WebSocket message too large");
                        return Poll::Ready(Event::End(End::TooLarge));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        debug!(error = %e, "WebSocket read failed");
                        return Poll::Ready(Event::End(End::BrowserGone));
                    }
                    Poll::Ready(None) => return Poll::Ready(Event::End(End::BrowserGone)),
                    Poll::Pending => {}
                }
            }
        }
        if self.history_in_flight > 0 && out_room {
            if let Poll::Ready(Some(frame)) = self.history_rx.poll_recv(cx) {
                return Poll::Ready(Event::History(frame));
            }
        }
        if timer.poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        Poll::Pending
    }

    fn relay_end(&self) -> End {
        if self.disconnecting {
            End::Disconnected
        } else {
            End::RelayClosed(self.closing)
        }
    }

    /// Queues a frame for the browser.
    fn queue(&mut self, frame: String) {
        Metrics::inc(&self.edge.metrics.bridge_frames_out);
        self.ws_out_bytes += frame.len();
        self.ws_out.push_back(Utf8Bytes::from(frame));
    }

    fn queue_error(&mut self, e: &FrameError, reference: Option<&str>) {
        Metrics::inc(&self.edge.metrics.bridge_errors);
        self.queue(frames::error(e.code, &e.message, reference));
    }

    // -----------------------------------------------------------------------------------------
    // Browser to relay.

    fn on_browser(&mut self, msg: Message) -> Result<(), End> {
        let before = self.pipe_out.len();
        match msg {
            Message::Text(text) => {
                Metrics::inc(&self.edge.metrics.bridge_frames_in);
                let parsed = frames::parse(text.as_str(), self.max_payload);
                let reference = parsed.reference.map(|r| r.get().to_owned());
                match (parsed.request, parsed.refused_publish) {
                    (Ok(request), _) => self.on_request(request, reference)?,
                    (Err(e), Some((qos, id))) => {
                        Metrics::inc(&self.edge.metrics.bridge_errors);
                        let op = if qos == 1 { "puback" } else { "pubrec" };
                        self.queue(frames::ack(op, id, Some((e.code, &e.message))));
                    }
                    (Err(e), None) => self.queue_error(&e, reference.as_deref()),
                }
            }
            Message::Binary(_) => self.queue_error(
                &FrameError::new("binary_frame", "the bridge speaks JSON text frames"),
                None,
            ),
            Message::Close(_) => return Err(End::BrowserGone),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        // Whatever the browser sends keeps its MQTT session alive, even a frame that produced
        // no packet: the relay enforces the keep-alive on what it reads.
        if self.pipe_out.len() == before && !self.disconnecting {
            mqtt::put_pingreq(&mut self.pipe_out);
        }
        Ok(())
    }

    fn on_request(&mut self, request: Request, reference: Option<String>) -> Result<(), End> {
        let reference = reference.as_deref();
        match request {
            Request::Connect(_) => self.queue_error(
                &FrameError::new("already_connected", "this session is already connected"),
                reference,
            ),
            Request::Disconnect => {
                mqtt::put_disconnect(&mut self.pipe_out, mqtt::Version::V5, reason::SUCCESS);
                self.disconnecting = true;
            }
            Request::Ping => {
                let mut pong = String::from("{\"op\":\"pong\"");
                frames::push_ref(&mut pong, reference);
                pong.push('}');
                self.queue(pong);
            }
            Request::Publish(p) => self.on_publish(p, reference),
            Request::Subscribe(filters) => self.on_subscribe(filters, reference),
            Request::Unsubscribe(filters) => self.on_unsubscribe(filters, reference),
            Request::PubAck(id) => self.on_delivery_ack(id, Delivery::AwaitPuback, reference),
            Request::PubRec(id) => self.on_delivery_ack(id, Delivery::AwaitPubrec, reference),
            Request::PubComp(id) => self.on_delivery_ack(id, Delivery::AwaitPubcomp, reference),
            Request::History { device, limit } => self.on_history(device, limit, reference),
            Request::RecentAlerts { limit } => self.on_recent_alerts(limit, reference),
            Request::PubRel(id) => match self.browser_pubs.get(&id).copied() {
                Some(BrowserPub::Received) | None => {
                    // Unknown ids go to the relay too: the exchange may have begun on an
                    // earlier WebSocket of this session, and the relay knows.
                    if self.browser_pubs.insert(id, BrowserPub::Released).is_none() {
                        self.qos2_open += 1;
                    }
                    mqtt::put_ack(&mut self.pipe_out, mqtt::PUBREL, id);
                }
                Some(BrowserPub::Released) => {}
                Some(BrowserPub::Qos1 | BrowserPub::Qos2) => self.queue_error(
                    &FrameError::new("unknown_id", "pubrel before pubrec"),
                    reference,
                ),
            },
        }
        Ok(())
    }

    /// Answers a `history` request off the event loop (Redis may take a round trip), under the
    /// same rule as subscribing to the device's telemetry.
    fn on_history(&mut self, device: String, limit: usize, reference: Option<&str>) {
        let topic = format!("device/{device}/telemetry");
        let allowed = self.identity.get().is_some_and(|who| {
            self.edge
                .policy
                .may_subscribe(who, &self.client_id, topic.as_bytes())
        });
        if !allowed {
            Metrics::inc(&self.edge.metrics.acl_denied_subscribe);
            let e = FrameError::new(
                "not_authorized",
                "not allowed to read this device's telemetry",
            );
            return self.queue_error(&e, reference);
        }
        if self.history_in_flight >= MAX_HISTORY_REQUESTS {
            let e = FrameError::new("too_many_requests", "too many history requests at once");
            return self.queue_error(&e, reference);
        }
        self.history_in_flight += 1;
        let history = self.edge.history.clone();
        let tx = self.history_tx.clone();
        let reference = reference.map(str::to_owned);
        tokio::spawn(async move {
            let frame = match history.recent(&device, limit).await {
                Ok(points) => frames::history_answer(&device, &points, reference.as_deref()),
                Err(e) => {
                    debug!(error = %e, "history request failed");
                    frames::error(
                        "history_unavailable",
                        "the history store is not reachable now; try again",
                        reference.as_deref(),
                    )
                }
            };
            // The session may have ended meanwhile; then nobody wants the answer.
            let _ = tx.send(frame).await;
        });
    }

    /// Answers a `recent_alerts` request from the alert log: the messages whose topic this
    /// session may subscribe to, so an answer shows nothing a subscription would not.
    fn on_recent_alerts(&mut self, limit: usize, reference: Option<&str>) {
        let Some(who) = self.identity.get() else {
            let e = FrameError::new("not_authorized", "not allowed to read alerts");
            return self.queue_error(&e, reference);
        };
        let entries = self.edge.alert_log.recent(limit, |topic| {
            self.edge
                .policy
                .may_subscribe(who, &self.client_id, topic.as_bytes())
        });
        self.queue(frames::recent_alerts_answer(&entries, reference));
    }

    fn on_publish(&mut self, p: PublishReq, reference: Option<&str>) {
        let wire =
            mqtt::publish_wire_len(mqtt::Version::V5, p.qos, p.topic.len(), 0, p.payload.len());
        if wire > self.edge.max_packet_size {
            let e = FrameError::new("payload_too_large", "message over the maximum size");
            return self.refuse_publish(&p, &e, reference);
        }
        if p.qos > 0 {
            match (self.browser_pubs.get(&p.id).copied(), p.qos) {
                (None, 1) => {
                    self.browser_pubs.insert(p.id, BrowserPub::Qos1);
                    self.publishes_at_relay += 1;
                }
                (None, _) => {
                    if self.qos2_open >= MAX_QOS2_OPEN {
                        let e = FrameError::new(
                            "too_many_inflight",
                            "too many QoS 2 publishes awaiting pubrel",
                        );
                        return self.refuse_publish(&p, &e, reference);
                    }
                    self.browser_pubs.insert(p.id, BrowserPub::Qos2);
                    self.publishes_at_relay += 1;
                    self.qos2_open += 1;
                }
                // A re-send while the broker has not answered yet: its answer will come.
                (Some(BrowserPub::Qos1), 1) | (Some(BrowserPub::Qos2), 2) => return,
                // A re-send after a lost `pubrec`: acknowledge again, never deliver twice.
                (Some(BrowserPub::Received), 2) => {
                    self.queue(frames::ack("pubrec", p.id, None));
                    return;
                }
                _ => {
                    let e = FrameError::new("bad_id", "this id is in use by another exchange");
                    return self.queue_error(&e, reference);
                }
            }
        }
        mqtt::put_publish(
            &mut self.pipe_out,
            mqtt::Version::V5,
            p.dup && p.qos > 0,
            p.qos,
            p.retain,
            p.topic.as_bytes(),
            p.id,
            &[],
            &[&p.payload],
        );
    }

    /// A publish the bridge refuses before it reaches the broker: answered on its own path.
    fn refuse_publish(&mut self, p: &PublishReq, e: &FrameError, reference: Option<&str>) {
        match p.qos {
            0 => self.queue_error(e, reference),
            1 => self.queue(frames::ack("puback", p.id, Some((e.code, &e.message)))),
            _ => self.queue(frames::ack("pubrec", p.id, Some((e.code, &e.message)))),
        }
    }

    fn on_delivery_ack(&mut self, id: u16, expected: Delivery, reference: Option<&str>) {
        if self.deliveries.get(&id) != Some(&expected) {
            let e = FrameError::new("unknown_id", "no message with this id awaits this ack");
            return self.queue_error(&e, reference);
        }
        match expected {
            Delivery::AwaitPuback => {
                self.deliveries.remove(&id);
                mqtt::put_ack(&mut self.pipe_out, mqtt::PUBACK, id);
            }
            Delivery::AwaitPubrec => {
                self.deliveries.insert(id, Delivery::Received);
                mqtt::put_ack(&mut self.pipe_out, mqtt::PUBREC, id);
            }
            _ => {
                self.deliveries.remove(&id);
                mqtt::put_ack(&mut self.pipe_out, mqtt::PUBCOMP, id);
            }
        }
    }

    /// A packet id for SUBSCRIBE/UNSUBSCRIBE not used by a pending request or the browser.
    fn control_id(&mut self) -> u16 {
        loop {
            let id = self.next_control_id;
            self.next_control_id = self.next_control_id.checked_add(1).unwrap_or(1);
            if !self.pending_subs.contains_key(&id)
                && !self.pending_unsubs.contains_key(&id)
                && !self.browser_pubs.contains_key(&id)
            {
                return id;
            }
        }
    }

    fn on_subscribe(&mut self, filters: Vec<frames::FilterReq>, reference: Option<&str>) {
        let mut results = Vec::with_capacity(filters.len());
        let mut to_relay: Vec<(String, u8)> = Vec::new();
        let limit = self.edge.bridge.max_subscriptions;
        let mut adding = 0;
        for f in filters {
            let error = match &f.qos {
                Err(e) => Some(e.code),
                Ok(_) if self.subscriptions.contains(&f.filter) => None,
                Ok(_) if self.subscriptions.len() + adding >= limit => {
                    Some("too_many_subscriptions")
                }
                Ok(_) => {
                    adding += 1;
                    None
                }
            };
            if let (None, Ok(qos)) = (error, &f.qos) {
                to_relay.push((f.filter.clone(), *qos));
            }
            results.push((f.filter, error));
        }
        let pending = PendingSub {
            reference: reference.map(str::to_owned),
            filters: results,
        };
        if to_relay.is_empty() {
            let frame = suback_frame(&pending, &[]);
            return self.queue(frame);
        }
        let id = self.control_id();
        put_subscribe(&mut self.pipe_out, id, &to_relay);
        self.pending_subs.insert(id, pending);
    }

    fn on_unsubscribe(
        &mut self,
        filters: Vec<Result<String, FrameError>>,
        reference: Option<&str>,
    ) {
        let mut valid = Vec::with_capacity(filters.len());
        for f in filters {
            match f {
                Ok(f) => valid.push(f),
                Err(e) => return self.queue_error(&e, reference),
            }
        }
        let id = self.control_id();
        put_unsubscribe(&mut self.pipe_out, id, &valid);
        self.pending_unsubs.insert(
            id,
            PendingUnsub {
                reference: reference.map(str::to_owned),
                filters: valid,
            },
        );
    }

    // -----------------------------------------------------------------------------------------
    // Relay to browser.

    fn on_relay(&mut self) -> Result<(), End> {
        let max = self.edge.max_packet_size + 16;
        loop {
            let frame = match mqtt::read_frame(&mut self.pipe_in, max) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(_) => return Err(End::ProtocolViolation("bad packet from the broker")),
            };
            self.on_relay_packet(frame)?;
        }
    }

    fn on_relay_packet(&mut self, frame: Frame) -> Result<(), End> {
        let bad = |_| End::ProtocolViolation("bad packet from the broker");
        match frame.kind() {
            mqtt::PUBLISH => {
                let p = mqtt::parse_publish(&frame, mqtt::Version::V5).map_err(bad)?;
                if p.qos == 0 && self.ws_out_bytes >= self.edge.bridge.max_queued_bytes {
                    Metrics::inc(&self.edge.metrics.bridge_dropped_qos0);
                    return Ok(());
                }
                match p.qos {
                    1 => {
                        self.deliveries.insert(p.pkid, Delivery::AwaitPuback);
                    }
                    2 => {
                        self.deliveries.insert(p.pkid, Delivery::AwaitPubrec);
                    }
                    _ => {}
                }
                let frame =
                    frames::message(p.topic_str(), p.qos, p.pkid, p.retain, p.dup, &p.payload);
                self.queue(frame);
            }
            mqtt::PUBACK | mqtt::PUBREC => {
                let (id, code) = mqtt::parse_ack(&frame).map_err(bad)?;
                let Some(state) = self.browser_pubs.get(&id).copied() else {
                    return Ok(());
                };
                if !matches!(state, BrowserPub::Qos1 | BrowserPub::Qos2) {
                    return Ok(());
                }
                self.publishes_at_relay = self.publishes_at_relay.saturating_sub(1);
                let op = if frame.kind() == mqtt::PUBACK {
                    "puback"
                } else {
                    "pubrec"
                };
                let refused = (code >= 0x80).then(|| reason_code(code));
                if frame.kind() == mqtt::PUBACK || refused.is_some() {
                    self.browser_pubs.remove(&id);
                    if state == BrowserPub::Qos2 {
                        self.qos2_open -= 1;
                    }
                } else {
                    self.browser_pubs.insert(id, BrowserPub::Received);
                }
                if frame.kind() == mqtt::PUBACK && code == mqtt::reason::NO_MATCHING_SUBSCRIBERS {
                    self.queue(frames::puback_no_subscribers(id));
                } else {
                    self.queue(frames::ack(op, id, refused));
                }
            }
            mqtt::PUBCOMP => {
                let (id, _) = mqtt::parse_ack(&frame).map_err(bad)?;
                if self.browser_pubs.remove(&id).is_some() {
                    self.qos2_open -= 1;
                }
                self.queue(frames::ack("pubcomp", id, None));
            }
            mqtt::PUBREL => {
                let (id, _) = mqtt::parse_ack(&frame).map_err(bad)?;
                self.deliveries.insert(id, Delivery::AwaitPubcomp);
                self.queue(frames::ack("pubrel", id, None));
            }
            mqtt::SUBACK => {
                let (id, codes) = parse_v5_ack_codes(&frame)
                    .ok_or(End::ProtocolViolation("bad SUBACK from the broker"))?;
                if let Some(pending) = self.pending_subs.remove(&id) {
                    let mut codes_iter = codes.iter().copied();
                    for (filter, error) in &pending.filters {
                        if error.is_none() {
                            if let Some(code) = codes_iter.next() {
                                if code < 0x80 {
                                    self.subscriptions.insert(filter.clone());
                                }
                            }
                        }
                    }
                    let frame = suback_frame(&pending, &codes);
                    self.queue(frame);
                }
            }
            mqtt::UNSUBACK => {
                let (id, _) = parse_v5_ack_codes(&frame)
                    .ok_or(End::ProtocolViolation("bad UNSUBACK from the broker"))?;
                if let Some(pending) = self.pending_unsubs.remove(&id) {
                    let mut out = String::from("{\"op\":\"unsuback\"");
                    frames::push_ref(&mut out, pending.reference.as_deref());
                    out.push_str(",\"filters\":[");
                    for (i, f) in pending.filters.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        frames::push_str(&mut out, f);
                        self.subscriptions.remove(f);
                    }
                    out.push_str("]}");
                    self.queue(out);
                }
            }
            mqtt::PINGRESP => {}
            mqtt::DISCONNECT => {
                self.closing = Some(frame.body.first().copied().unwrap_or(0));
            }
            _ => return Err(End::ProtocolViolation("unexpected packet from the broker")),
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Closing.

    async fn finish(mut self, end: End) {
        debug!(?end, "bridge session ended");
        let (code, reason): (CloseCode, String) = match end {
            End::BrowserGone => {
                // Hand the relay what the browser sent last (acks above all), then close the
                // pipe: the relay publishes the will.
                let out = std::mem::take(&mut self.pipe_out);
                let _ = tokio::time::timeout(CLOSE_WAIT, self.pipe.write_all(&out)).await;
                return;
            }
            End::Disconnected => (CloseCode::Normal, "disconnected".into()),
            End::SlowConsumer => {
                // Counted with every slow-consumer disconnect, and on its own for the bridge.
                Metrics::inc(&self.edge.metrics.slow_consumers);
                Metrics::inc(&self.edge.metrics.bridge_slow_consumers);
                info!("bridge session closed: slow consumer");
                (
                    CloseCode::Policy,
                    "slow_consumer: messages were not read in time".into(),
                )
            }
            End::ProtocolViolation(why) => (CloseCode::Protocol, format!("protocol_error: {why}")),
            End::TooLarge => (
                CloseCode::Size,
                "message_too_large: over the WebSocket message size limit".into(),
            ),
            End::RelayClosed(code) => close_reason(code),
        };
        // Closing the pipe first ends the MQTT side at once (a slow consumer's will fires now,
        // not after the close handshake).
        drop(self.pipe);
        let frames = std::mem::take(&mut self.ws_out);
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if end != End::SlowConsumer {
                for frame in frames {
                    ws.feed(Message::Text(frame)).await?;
                }
            }
            ws.flush().await
        })
        .await;
        close_with(ws, code, &reason).await;
    }
}

/// The close code and reason for the relay's DISCONNECT reason (or its silent close).
fn close_reason(code: Option<u8>) -> (CloseCode, String) {
    let (close, text) = match code {
        Some(reason::SESSION_TAKEN_OVER) => (
            CloseCode::Policy,
            "session_taken_over: another connection took this client id",
        ),
        Some(reason::KEEP_ALIVE_TIMEOUT) => (
            CloseCode::Policy,
            "keep_alive_timeout: nothing received within 1.5 x keep_alive",
        ),
        Some(reason::SERVER_SHUTTING_DOWN) => {
            (CloseCode::Away, "server_shutting_down: vigil is stopping")
        }
        Some(reason::IMPLEMENTATION_SPECIFIC) => (
            CloseCode::Policy,
            "slow_consumer: messages were not read in time",
        ),
        Some(reason::MESSAGE_RATE_TOO_HIGH) => (
            CloseCode::Policy,
            "rate_limited: publishing faster than this user's role allows",
        ),
        Some(reason::UNSPECIFIED) | None => (
            CloseCode::Error,
            "server_error: the broker ended the session",
        ),
        Some(_) => (
            CloseCode::Protocol,
            "protocol_error: the broker ended the session",
        ),
    };
    (close, text.to_string())
}

/// The protocol's code and message for an MQTT 5 failure reason.
fn reason_code(code: u8) -> (&'static str, &'static str) {
    match code {
        reason::NOT_AUTHORIZED => ("not_authorized", "not authorized"),
        reason::TOPIC_NAME_INVALID => ("bad_topic", "topic name not accepted"),
        reason::PACKET_TOO_LARGE => ("payload_too_large", "message over the maximum size"),
        reason::QUOTA_EXCEEDED => ("quota_exceeded", "subscription limit reached"),
        reason::TOPIC_FILTER_INVALID => {
            ("bad_filter", "topic filter over the length or level limit")
        }
        _ => ("failed", "the broker refused the message"),
    }
}

fn suback_frame(pending: &PendingSub, codes: &[u8]) -> String {
    let mut out = String::from("{\"op\":\"suback\"");
    frames::push_ref(&mut out, pending.reference.as_deref());
    out.push_str(",\"results\":[");
    let mut codes = codes.iter().copied();
    for (i, (filter, error)) in pending.filters.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"filter\":");
        frames::push_str(&mut out, filter);
        let error = match error {
            Some(e) => Some(*e),
            None => match codes.next() {
                Some(q @ 0..=2) => {
                    out.push_str(",\"qos\":");
                    out.push((b'0' + q) as char);
                    None
                }
                Some(reason::NOT_AUTHORIZED) => Some("not_authorized"),
                Some(reason::TOPIC_NAME_INVALID | reason::TOPIC_FILTER_INVALID) => {
                    Some("bad_filter")
                }
                Some(reason::QUOTA_EXCEEDED) => Some("too_many_subscriptions"),
                _ => Some("failed"),
            },
        };
        if let Some(e) = error {
            out.push_str(",\"error\":");
            frames::push_str(&mut out, e);
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// A v5 SUBACK or UNSUBACK: packet id and reason codes (the properties skipped).
fn parse_v5_ack_codes(frame: &Frame) -> Option<(u16, Bytes)> {
    let mut body = frame.body.clone();
    if body.len() < 3 {
        return None;
    }
    let id = body.get_u16();
    let props = get_varint(&mut body)?;
    if body.len() < props {
        return None;
    }
    body.advance(props);
    Some((id, body))
}

fn put_subscribe(out: &mut BytesMut, id: u16, filters: &[(String, u8)]) {
    let len = 2 + 1 + filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
    out.put_u8((mqtt::SUBSCRIBE << 4) | 0x02);
    mqtt::put_varint(out, len);
    out.put_u16(id);
    out.put_u8(0);
    for (filter, qos) in filters {
        out.put_u16(filter.len() as u16);
        out.put_slice(filter.as_bytes());
        out.put_u8(*qos);
    }
}

fn put_unsubscribe(out: &mut BytesMut, id: u16, filters: &[String]) {
    let len = 2 + 1 + filters.iter().map(|f| 2 + f.len()).sum::<usize>();
    out.put_u8((mqtt::UNSUBSCRIBE << 4) | 0x02);
    mqtt::put_varint(out, len);
    out.put_u16(id);
    out.put_u8(0);
    for filter in filters {
        out.put_u16(filter.len() as u16);
        out.put_slice(filter.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packet_round_trips_through_the_edge_parser() {
        let c = ConnectReq {
            client_id: Some("ui-1".into()),
            clean: false,
            keep_alive: 30,
            username: Some("u".into()),
            password: None,
            token: Some("t0k".into()),
            will: Some(PublishReq {
                topic: "ui/ui-1/state".into(),
                payload: b"offline".to_vec(),
                qos: 1,
                retain: true,
                ..Default::default()
            }),
        };
        let mut out = BytesMut::new();
        put_connect(&mut out, &c, &Handshake::default()).unwrap();
        let frame = mqtt::read_frame(&mut out, 1 << 20).unwrap().unwrap();
        let parsed = mqtt::parse_connect(&frame).unwrap();
        assert_eq!(parsed.client_id, "ui-1");
        assert!(!parsed.clean_start);
        assert_eq!(parsed.session_expiry, u32::MAX);
        assert_eq!(parsed.keep_alive, 30);
        assert_eq!(parsed.receive_maximum, RECEIVE_MAXIMUM);
        assert_eq!(parsed.username.as_deref(), Some("u"));
        assert_eq!(parsed.password.as_deref(), Some(&b"t0k"[..]));
        let will = parsed.will.unwrap();
        assert_eq!((will.qos, will.retain), (1, true));
        assert_eq!(&will.payload[..], b"offline");
    }

    #[test]
    fn subscribe_packets_parse_as_v5() {
        let mut out = BytesMut::new();
        put_subscribe(&mut out, 7, &[("a/+".into(), 1), ("b/#".into(), 2)]);
        let frame = mqtt::read_frame(&mut out, 1 << 20).unwrap().unwrap();
        let s = mqtt::parse_subscribe(&frame, mqtt::Version::V5).unwrap();
        assert_eq!(s.pkid, 7);
        assert_eq!(s.filters.len(), 2);
        let mut out = BytesMut::new();
        put_unsubscribe(&mut out, 8, &["a/+".into()]);
        let frame = mqtt::read_frame(&mut out, 1 << 20).unwrap().unwrap();
        let u = mqtt::parse_unsubscribe(&frame, mqtt::Version::V5).unwrap();
        assert_eq!(u.pkid, 8);
    }

    #[test]
    fn suback_merges_known_errors_with_broker_codes() {
        let pending = PendingSub {
            reference: Some("3".into()),
            filters: vec![
                ("a".into(), None),
                ("b/#/c".into(), Some("bad_filter")),
                ("c".into(), None),
            ],
        };
        let v: serde_json::Value =
            serde_json::from_str(&suback_frame(&pending, &[1, reason::NOT_AUTHORIZED])).unwrap();
        assert_eq!(v["ref"], 3);
        assert_eq!(v["results"][0]["qos"], 1);
        assert_eq!(v["results"][1]["error"], "bad_filter");
        assert_eq!(v["results"][2]["error"], "not_authorized");
    }

    #[test]
    fn v5_connack_properties_are_read() {
        let mut out = BytesMut::new();
        let props = mqtt::ConnackProperties {
            assigned_client_id: Some("gen-1".into()),
            server_keep_alive: Some(45),
            receive_maximum: 100,
            maximum_packet_size: 1024,
            topic_alias_maximum: 10,
            session_expiry: None,
        };
        mqtt::put_connack(&mut out, mqtt::Version::V5, true, 0, Some(&props));
        let frame = mqtt::read_frame(&mut out, 1 << 20).unwrap().unwrap();
        let c = parse_connack(&frame).unwrap();
        assert!(c.session_present);
        assert_eq!(c.assigned_client_id.as_deref(), Some("gen-1"));
        assert_eq!(c.server_keep_alive, Some(45));
    }
}
