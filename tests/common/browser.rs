//! A browser for tests: a JSON-bridge session (tokio-tungstenite) that acknowledges what it
//! receives. `tests/bridge.rs` has its own, stricter client for the protocol's details.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(15);

pub struct Browser {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Browser {
    /// Connects with a persistent session and subscribes to `filter`.
    pub async fn connect(http: SocketAddr, client_id: &str, filter: &str, qos: u8) -> Browser {
        let mut b = Browser::login(
            http,
            json!({"op": "connect", "client_id": client_id, "clean": false}),
        )
        .await;
        b.send(json!({"op": "subscribe", "ref": 1, "filters": [{"filter": filter, "qos": qos}]}))
            .await;
        let suback = b.recv(T).await.expect("suback");
        assert_eq!(suback["op"], "suback", "{suback}");
        b
    }

    /// Opens `/ws` and sends `connect`; panics unless the connack is positive.
    pub async fn login(http: SocketAddr, connect: Value) -> Browser {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
            .await
            .expect("bridge WebSocket");
        let mut b = Browser { ws };
        b.send(connect).await;
        let connack = b.recv(T).await.expect("connack");
        assert_eq!(connack["ok"], true, "{connack}");
        b
    }

    /// Sends `frame` and returns the first answer whose `op` is `op` or `error`.
    pub async fn ask(&mut self, frame: Value, op: &str) -> Value {
        self.send(frame).await;
        loop {
            let f = self.recv(T).await.expect("an answer");
            if f["op"] == op || f["op"] == "error" {
                return f;
            }
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send frame");
    }

    pub async fn recv(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(serde_json::from_str(&t).expect("JSON frame"))
                }
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// Receives messages until `quiet` passes without one, acknowledging each (and releasing
    /// the browser's own QoS 2 publishes on `pubrec`); returns `(topic, qos, payload text)` in
    /// arrival order, QoS 2 de-duplicated by id as the protocol says (ids between `message`
    /// and `pubcomp`).
    pub async fn collect(
        &mut self,
        quiet: Duration,
        deadline: Instant,
    ) -> Vec<(String, u64, String)> {
        let mut got = Vec::new();
        let mut open_q2: HashSet<u64> = HashSet::new();
        while Instant::now() < deadline {
            let Some(f) = self.recv(quiet).await else {
                break;
            };
            match f["op"].as_str() {
                Some("message") => {
                    let qos = f["qos"].as_u64().unwrap_or(0);
                    let id = f["id"].as_u64().unwrap_or(0);
                    let text = match &f["payload"] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let topic = f["topic"].as_str().unwrap_or_default().to_string();
                    match qos {
                        1 => {
                            got.push((topic, qos, text));
                            self.send(json!({"op": "puback", "id": id})).await;
                        }
                        2 => {
                            if open_q2.insert(id) {
                                got.push((topic, qos, text));
                            }
                            self.send(json!({"op": "pubrec", "id": id})).await;
                        }
                        _ => got.push((topic, qos, text)),
                    }
                }
                // The browser's own QoS 2 publishes are delivered once it releases them.
                Some("pubrec") => {
                    let id = f["id"].as_u64().unwrap_or(0);
                    self.send(json!({"op": "pubrel", "id": id})).await;
                }
                Some("pubrel") => {
                    let id = f["id"].as_u64().unwrap_or(0);
                    open_q2.remove(&id);
                    self.send(json!({"op": "pubcomp", "id": id})).await;
                }
                _ => {}
            }
        }
        got
    }
}
