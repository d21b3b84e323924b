//! Hostile clients against the real binary: malformed and oversized packets, slowloris at
//! every stage, floods, takeover attempts, MQTT 5 property abuse, hostile JSON. After each
//! attack a well-behaved client still gets service and vigil's open file descriptors (every
//! socket, edge and core side) return to their baseline: nothing leaks.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(5);

fn open_fds(v: &Vigil) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", v.pid()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until vigil's descriptors are back to `baseline` (a little slack for a core
/// connection rumqttd has not reaped yet), then proves a normal client is served.
fn assert_recovered(v: &Vigil, baseline: usize, what: &str) {
    assert_recovered_as(v, baseline, what, &[]);
}

/// The same, for a broker with credentials: `login` is passed to mosquitto_sub/pub.
fn assert_recovered_as(v: &Vigil, baseline: usize, what: &str, login: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = open_fds(v);
        if now <= baseline + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} descriptors open, baseline {baseline}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let topic = format!("device/{what}");
    let topic = topic.replace(' ', "-");
    let mut sub_args = vec!["-t", topic.as_str(), "-q", "1"];
    sub_args.extend_from_slice(login);
    let mut sub = Sub::start(v.port(), &sub_args);
    let mut pub_args = vec!["-t", topic.as_str(), "-m", "alive", "-q", "1"];
    pub_args.extend_from_slice(login);
    publish(v.port(), &pub_args);
    assert_eq!(
        sub.expect_messages(1, T),
        vec![format!("{topic}|1|0|alive")],
        "{what}: broker no longer serves"
    );
}

fn start() -> Vigil {
    Vigil::start_with(|c| {
        c.replacen(
            "handshake_timeout_ms = 10000",
            "handshake_timeout_ms = 1000",
            1,
        )
        .replacen("enabled = true", "enabled = false", 1)
    })
}

fn baseline(v: &Vigil) -> usize {
    // Let start-up connections settle.
    assert_broker_serves(v.port(), "baseline");
    std::thread::sleep(Duration::from_millis(300));
    open_fds(v)
}

#[test]
fn malformed_packets_close_only_their_sender() {
    let v = start();
    let base = baseline(&v);
    let mut bystander = Raw::connected(v.mqtt, &ConnectOpts::v311("bystander"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "remaining length over 4 bytes",
            vec![0x30, 0x80, 0x80, 0x80, 0x80, 0x01],
        ),
        ("PUBLISH with QoS 3", packet(0x36, &[0, 1, b'a', 0, 1])),
        (
            "PUBLISH QoS 1 packet id 0",
            packet(0x32, &[0, 1, b'a', 0, 0]),
        ),
        ("empty topic", packet(0x30, &[0, 0, b'x'])),
        ("topic length past the packet", packet(0x30, &[0, 9, b'a'])),
        ("NUL in topic", packet(0x30, &[0, 3, b'a', 0, b'b'])),
        ("invalid UTF-8 topic", packet(0x30, &[0, 2, 0xFF, 0xFE])),
        (
            "wildcard topic",
            publish_packet("a/#", b"x", 0, false, 0, false),
        ),
        ("SUBSCRIBE without filters", packet(0x82, &[0, 1])),
        (
            "SUBSCRIBE reserved option bits",
            packet(0x82, &[0, 1, 0, 1, b'a', 0xC0]),
        ),
        ("UNSUBSCRIBE bad flags", packet(0xA0, &[0, 1, 0, 1, b'a'])),
        ("PINGREQ with a body", packet(0xC0, &[1])),
        ("packet type 15 from a 3.1.1 client", packet(0xF0, &[])),
        ("server-only packet CONNACK", packet(0x20, &[0, 0])),
    ];
    for (name, bytes) in &cases {
        let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("malformed"));
        c.send_lossy(bytes);
        assert!(c.closed_within(T), "{name}: connection not closed");
    }
    // Truncated packets: the client vanishes mid-packet.
    for cut in [1usize, 2, 5] {
        let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("truncated"));
        let p = publish_packet("t/x", &[7u8; 100], 1, false, 1, false);
        c.send_lossy(&p[..cut]);
        drop(c);
    }
    // Oversized, announced and actually sent.
    let mut c = Raw::connected(v.mqtt, &ConnectOpts::v311("huge"));
    c.send_lossy(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]);
    assert!(c.closed_within(T), "announced 256 MB");
    // Garbage instead of CONNECT.
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x10, 0x02, 0, 0],
        &[0xFF; 64],
    ] {
        let mut c = Raw::open(v.mqtt);
        c.send_lossy(garbage);
        assert!(c.closed_within(T), "garbage CONNECT {garbage:?}");
    }
    bystander.send(&[0xC0, 0]);
    assert_eq!(bystander.recv_timeout(T).map(|p| p.kind()), Some(13));
    drop(bystander);
    assert_recovered(&v, base, "malformed packets");
}

#[test]
fn slowloris_at_every_stage_is_cut_off() {
    let v = start();
    let base = baseline(&v);
    let started = Instant::now();
    // 1. TCP connected, nothing sent. 2. Half a CONNECT. 3. A CONNECT dribbled byte by byte,
    // slower than the handshake timeout allows. 4. Half a WebSocket upgrade head. 5. A
    // WebSocket upgraded but no CONNECT.
    let mut idle = TcpStream::connect(v.mqtt).unwrap();
    let mut half = TcpStream::connect(v.mqtt).unwrap();
    let connect = connect_packet(&ConnectOpts::v311("slow"));
    half.write_all(&connect[..connect.len() / 2]).unwrap();
    let dribble = std::thread::spawn({
        let addr = v.mqtt;
        let connect = connect.clone();
        move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for b in &connect {
                if s.write_all(&[*b]).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // Completed in time would be a failure: the deadline is 1 s.
            false
        }
    });
    let mut ws_head = TcpStream::connect(v.http).unwrap();
    ws_head
        .write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .unwrap();
    let mut ws_idle = TcpStream::connect(v.http).unwrap();
    ws_idle
        .write_all(
            b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Protocol: mqtt\r\n\r\n",
        )
        .unwrap();
    // Meanwhile the broker serves others.
    assert_broker_serves(v.port(), "during slowloris");
    for (name, s) in [
        ("idle TCP", &mut idle),
        ("half CONNECT", &mut half),
        ("half upgrade head", &mut ws_head),
        ("upgraded, no CONNECT", &mut ws_idle),
    ] {
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the 101 answer, or a close frame
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{name}: held open for {:?}",
            started.elapsed()
        );
    }
    assert!(dribble.join().unwrap(), "dribbled CONNECT was not cut off");
    assert_recovered(&v, base, "slowloris");
}

#[test]
fn connection_flood_and_takeover_attempts() {
    let v = Vigil::start_with_users(
        &[("m1", "pw-m1", "device"), ("root", "pw-root", "admin")],
        |c| c.replacen("enabled = true", "enabled = false", 1),
    );
    let login = ["-u", "root", "-P", "pw-root"];
    assert_recovered_as(&v, usize::MAX / 2, "warm-up", &login);
    std::thread::sleep(Duration::from_millis(300));
    let base = open_fds(&v);
    // A flood of sockets that connect and say nothing, and of clients that connect properly.
    let idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(v.mqtt).ok())
        .collect();
    let o = ConnectOpts {
        user: Some("m1"),
        password: Some(b"pw-m1"),
        ..ConnectOpts::v311("m1")
    };
    let legit = Raw::connected(v.mqtt, &o);
    // Takeover attempts with the victim's client id and wrong or no credentials: refused
    // before the id is claimed, so the victim stays connected.
    for attempt in 0..5 {
        let bad = ConnectOpts {
            user: Some("m1"),
            password: Some(b"guess"),
            ..ConnectOpts::v311("m1")
        };
        let bad = if attempt % 2 == 0 {
            bad
        } else {
            ConnectOpts::v311("m1")
        };
        let (_, ack) = Raw::connect(v.mqtt, &bad);
        assert_eq!(ack.body, vec![0, 5]);
    }
    let mut legit = legit;
    legit.send(&[0xC0, 0]);
    assert_eq!(
        legit.recv_timeout(T).map(|p| p.kind()),
        Some(13),
        "the victim was kicked"
    );
    drop(idle);
    drop(legit);
    assert_recovered_as(&v, base, "flood", &login);
}

#[test]
fn mqtt5_property_abuse() {
    let v = start();
    let base = baseline(&v);
    let v5 = ConnectOpts {
        v5: true,
        ..ConnectOpts::v311("props")
    };
    // PUBLISH properties: length past the packet, an unknown id, a duplicate single-valued
    // property, a topic alias past the announced maximum (10), a subscription identifier from
    // a client.
    let topic = string(b"p/x");
    let with_props = |props: &[u8]| {
        let mut body = topic.clone();
        body.extend_from_slice(props);
        body.push(b'x');
        packet(0x30, &body)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("properties past the packet", with_props(&[0x7F])),
        ("unknown property", with_props(&[2, 0x7E, 0])),
        (
            "duplicate payload format",
            with_props(&[4, 0x01, 1, 0x01, 1]),
        ),
        ("topic alias", with_props(&[3, 0x23, 0, 11])),
        ("subscription identifier", with_props(&[2, 0x0B, 1])),
    ];
    for (name, bytes) in &cases {
        let mut c = Raw::connected(v.mqtt, &v5);
        c.send_lossy(bytes);
        let answer = c.recv_timeout(T);
        if let Some(p) = &answer {
            assert_eq!(p.kind(), 14, "{name}: expected DISCONNECT, got {p:?}");
            assert!(p.body[0] >= 0x80, "{name}: reason {:#x}", p.body[0]);
        }
        assert!(c.closed_within(T), "{name}: not closed");
    }
    // 1,000 user properties in one publish are fine within the packet size, and reach a v5
    // subscriber intact; a 3.1.1 subscriber gets the message without them.
    let mut sub = Sub::start(v.port(), &["-t", "p/many", "-q", "0"]);
    let mut props = Vec::new();
    for i in 0..1000 {
        props.push(0x26);
        props.extend(string(format!("k{i}").as_bytes()));
        props.extend(string(b"v"));
    }
    let mut body = string(b"p/many");
    // The properties length is a variable byte integer, like a remaining length.
    body.extend(remaining_length(props.len()));
    body.extend(props);
    body.extend_from_slice(b"many");
    let mut c = Raw::connected(v.mqtt, &v5);
    c.send(&packet(0x30, &body));
    assert_eq!(sub.expect_messages(1, T), vec!["p/many|0|0|many"]);
    drop(c);
    sub.kill();
    assert_recovered(&v, base, "property abuse");
}

#[test]
fn hostile_json_on_the_bridge() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let v = start();
    let base = baseline(&v);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("ws://{}/ws", v.http);
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.send(Message::Text(r#"{"op":"connect"}"#.into()))
            .await
            .unwrap();
        let connack = ws.next().await.unwrap().unwrap();
        assert!(connack.to_text().unwrap().contains("\"ok\":true"));
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let deep_obj = format!(
            r#"{{"op":"publish","topic":"j/x","qos":1,"id":1,"payload":{}1{}}}"#,
            "{\"a\":".repeat(50_000),
            "}".repeat(50_000)
        );
        let many_keys = format!(
            "{{{}\"op\":\"ping\"}}",
            (0..50_000)
                .map(|i| format!("\"k{i}\":0,"))
                .collect::<String>()
        );
        for (name, frame) in [
            ("deeply nested array", deep),
            ("deeply nested payload", deep_obj),
            ("50,000 unknown keys", many_keys),
            ("not JSON", "\u{0}\u{1}garbage".to_string()),
            ("JSON string, not object", "\"op\"".to_string()),
            (
                "huge number",
                format!("{{\"op\":\"ping\",\"ref\":1{}}}", "0".repeat(10_000)),
            ),
        ] {
            ws.send(Message::Text(frame.into())).await.unwrap();
            let answer = tokio::time::timeout(T, ws.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no answer"))
                .unwrap_or_else(|| panic!("{name}: closed"))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let text = answer.to_text().unwrap_or_default().to_string();
            assert!(
                text.contains("\"op\":\"error\"")
                    || text.contains("\"op\":\"pong\"")
                    || text.contains("\"op\":\"puback\""),
                "{name}: {text}"
            );
        }
        // The session survived all of it.
        ws.send(Message::Text(r#"{"op":"ping","ref":"alive"}"#.into()))
            .await
            .unwrap();
        let pong = ws.next().await.unwrap().unwrap();
        assert!(pong.to_text().unwrap().contains("alive"));
        // A message over the limit closes with 1009, and the next session is fine.
        let huge = "x".repeat(3 * 1024 * 1024);
        let _ = ws.send(Message::Text(huge.into())).await;
        let mut closed_1009 = false;
        while let Ok(Some(m)) = tokio::time::timeout(T, ws.next()).await {
            if let Ok(Message::Close(Some(f))) = m {
                closed_1009 = u16::from(f.code) == 1009;
                break;
            }
            if m.is_err() {
                break;
            }
        }
        assert!(closed_1009, "oversized message did not close with 1009");
    });
    assert_recovered(&v, base, "hostile JSON");
}
