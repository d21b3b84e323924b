//! MQTT over WebSocket on the web port: rumqttc's WebSocket transport, interop with mosquitto
//! clients on TCP, and the HTTP handshake rules browsers depend on.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet as RPacket, QoS, Transport};

const T: Duration = Duration::from_secs(5);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ws_client(http: SocketAddr, id: &str, path: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, format!("ws://{http}{path}"), http.port());
    opts.set_transport(Transport::Ws);
    opts.set_keep_alive(Duration::from_secs(10));
    AsyncClient::new(opts, 100)
}

async fn next_publish(el: &mut EventLoop) -> rumqttc::Publish {
    tokio::time::timeout(T, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(RPacket::Publish(p))) => return p,
                Ok(_) => {}
                Err(e) => panic!("eventloop error: {e}"),
            }
        }
    })
    .await
    .expect("no PUBLISH in time")
}

async fn wait_suback(el: &mut EventLoop) {
    tokio::time::timeout(T, async {
        loop {
            if let Ok(Event::Incoming(RPacket::SubAck(_))) = el.poll().await {
                return;
            }
        }
    })
    .await
    .expect("no SUBACK");
}

#[test]
fn websocket_client_all_qos_and_interop_with_mosquitto() {
    let v = Vigil::start();
    rt().block_on(async {
        let (client, mut el) = ws_client(v.http, "ws-all-qos", "/mqtt");
        client.subscribe("ws/in/#", QoS::ExactlyOnce).await.unwrap();
        wait_suback(&mut el).await;
        // mosquitto_pub (TCP) -> WebSocket client, every QoS.
        for q in 0..=2u8 {
            let port = v.port();
            tokio::task::spawn_blocking(move || {
                publish(
                    port,
                    &[
                        "-t",
                        &format!("ws/in/{q}"),
                        "-m",
                        &format!("tcp{q}"),
                        "-q",
                        &q.to_string(),
                    ],
                )
            });
            let p = next_publish(&mut el).await;
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                (format!("ws/in/{q}").as_str(), format!("tcp{q}").as_bytes())
            );
            assert_eq!(p.qos as u8, q);
        }
        // WebSocket client -> mosquitto_sub (TCP), every QoS.
        let port = v.port();
        let sub = tokio::task::spawn_blocking(move || {
            let mut s = Sub::start(port, &["-t", "ws/out/#", "-q", "2"]);
            s.expect_messages(3, Duration::from_secs(8))
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .enumerate()
        {
            client
                .publish(format!("ws/out/{i}"), qos, false, format!("ws{i}"))
                .await
                .unwrap();
        }
        let drive = tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    break;
                }
            }
        });
        let got = sub.await.unwrap();
        drive.abort();
        assert_eq!(
            got,
            vec!["ws/out/0|0|0|ws0", "ws/out/1|1|0|ws1", "ws/out/2|2|0|ws2"]
        );
    });
}

#[test]
fn websocket_retained_and_wildcards() {
    let v = Vigil::start();
    publish(
        v.port(),
        &["-t", "device/ws-1/telemetry", "-m", "r1", "-q", "1", "-r"],
    );
    rt().block_on(async {
        let (client, mut el) = ws_client(v.http, "ws-retained", "/mqtt");
        client
            .subscribe("device/+/telemetry", QoS::AtLeastOnce)
            .await
            .unwrap();
        let p = next_publish(&mut el).await;
        assert!(p.retain);
        assert_eq!(&p.payload[..], b"r1");
    });
}

/// Sends a raw upgrade request and returns the response head.
fn upgrade(http: SocketAddr, path: &str, extra: &str) -> String {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&head).to_string()
}

#[test]
fn subprotocol_negotiation_and_routing() {
    let v = Vigil::start();
    let r = upgrade(v.http, "/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    assert!(r.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{r}");
    assert!(
        r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{r}"
    );
    // MQTT.js with protocolVersion 3 offers mqttv3.1: echoed.
    let r = upgrade(v.http, "/mqtt", "Sec-WebSocket-Protocol: mqttv3.1\r\n");
    assert!(r.contains("Sec-WebSocket-Protocol: mqttv3.1\r\n"), "{r}");
    // MQTT.js without a path connects to "/": MQTT when it offers the subprotocol.
    let r = upgrade(v.http, "/", "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(
        r.starts_with("HTTP/1.1 101") && r.contains("Sec-WebSocket-Protocol: mqtt\r\n"),
        "{r}"
    );
    // "/" without an MQTT subprotocol is not MQTT.
    assert!(upgrade(v.http, "/", "").starts_with("HTTP/1.1 404"));
    // "/ws" is the JSON bridge: it upgrades, and echoes only the bridge's own subprotocol.
    let r = upgrade(v.http, "/ws", "Sec-WebSocket-Protocol: mqtt\r\n");
    assert!(
        r.starts_with("HTTP/1.1 101") && !r.contains("Sec-WebSocket-Protocol"),
        "{r}"
    );
    let r = upgrade(v.http, "/ws", "Sec-WebSocket-Protocol: vigil.bridge.v1\r\n");
    assert!(
        r.contains("Sec-WebSocket-Protocol: vigil.bridge.v1\r\n"),
        "{r}"
    );
    assert!(
        upgrade(v.http, "/elsewhere", "Sec-WebSocket-Protocol: mqtt\r\n")
            .starts_with("HTTP/1.1 404")
    );
    // Wrong WebSocket version.
    let r = upgrade(v.http, "/mqtt", "").replace("13", "8");
    assert!(r.starts_with("HTTP/1.1 101") || r.starts_with("HTTP/1.1 426"));
}

#[test]
fn websocket_on_root_path_works_end_to_end() {
    let v = Vigil::start();
    rt().block_on(async {
        // rumqttc offers the `mqtt` subprotocol.
        let (client, mut el) = ws_client(v.http, "ws-root", "/");
        client.subscribe("root/t", QoS::AtLeastOnce).await.unwrap();
        wait_suback(&mut el).await;
        client
            .publish("root/t", QoS::AtLeastOnce, false, "hi")
            .await
            .unwrap();
        assert_eq!(&next_publish(&mut el).await.payload[..], b"hi");
    });
}

#[test]
fn origin_allow_list() {
    let v = Vigil::start_with(|c| {
        c.replace(
            "allowed_origins = []",
            "allowed_origins = [\"https://ok.example\"]",
        )
    });
    let r = upgrade(
        v.http,
        "/mqtt",
        "Sec-WebSocket-Protocol: mqtt\r\nOrigin: https://evil.example\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = upgrade(
        v.http,
        "/mqtt",
        "Sec-WebSocket-Protocol: mqtt\r\nOrigin: https://ok.example\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
}

#[test]
fn websocket_frames_are_bounded_by_the_packet_size() {
    let v = Vigil::start_with(|c| c.replace("max_packet_size = 1048576", "max_packet_size = 4096"));
    rt().block_on(async {
        let (client, mut el) = ws_client(v.http, "ws-big", "/mqtt");
        client
            .publish("big/t", QoS::AtMostOnce, false, vec![b'x'; 64 * 1024])
            .await
            .unwrap();
        let closed = tokio::time::timeout(T, async {
            loop {
                if el.poll().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "oversized WebSocket message did not close the connection"
        );
    });
    assert_broker_serves(v.port(), "ws-big");
}

#[test]
fn http_endpoints() {
    let v = Vigil::start();
    let get = |path: &str| {
        let mut s = TcpStream::connect(v.http).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let h = get("/healthz");
    assert!(h.starts_with("HTTP/1.1 200") && h.contains("\"ok\""), "{h}");
    let _sub = Sub::start(v.port(), &["-t", "m/#"]);
    let m = get("/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("vigil_connections{listener=\"tcp\"} 1"), "{m}");
    assert!(get("/nope").starts_with("HTTP/1.1 404"));
    // HEAD: the same head, no body.
    let mut s = TcpStream::connect(v.http).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("Content-Length: 16\r\n"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\n"), "HEAD response has a body: {out}");
}
