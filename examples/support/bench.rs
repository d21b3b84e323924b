//! What the benchmark programs share (`#[path]`-included): their command-line options and a
//! blocking MQTT 3.1.1 client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use vigil::mqtt::{self, Frame, Version};

/// A blocking MQTT 3.1.1 connection that reads whole packets (`vigil::mqtt` frames them).
pub struct Conn {
    s: TcpStream,
    buf: BytesMut,
    /// What the `mqtt::put_*` calls wrote, until `flush`.
    pub out: BytesMut,
}

impl Conn {
    /// A clean session.
    pub fn open(port: u16, id: &str) -> Conn {
        Conn::open_session(port, id, true).0
    }

    /// Connects with `clean` as the Clean Session flag; returns the connection and the
    /// CONNACK's session-present flag.
    pub fn open_session(port: u16, id: &str, clean: bool) -> (Conn, bool) {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut c = Conn {
            s,
            buf: BytesMut::new(),
            out: BytesMut::new(),
        };
        // CONNECT: keep-alive 60 s, no credentials.
        c.out.put_u8(mqtt::CONNECT << 4);
        mqtt::put_varint(&mut c.out, 10 + 2 + id.len());
        c.out.put_u16(4);
        c.out.put_slice(b"MQTT");
        c.out.put_slice(&[4, if clean { 0x02 } else { 0 }, 0, 60]);
        c.out.put_u16(id.len() as u16);
        c.out.put_slice(id.as_bytes());
        c.flush();
        let connack = c.next(Duration::from_secs(5)).expect("CONNACK");
        let answer = mqtt::parse_core_connack(&connack);
        assert!(
            connack.kind() == mqtt::CONNACK && matches!(answer, Ok((_, 0))),
            "refused"
        );
        let present = matches!(answer, Ok((true, _)));
        (c, present)
    }

    pub fn flush(&mut self) {
        self.s.write_all(&self.out).expect("write");
        self.out.clear();
    }

    /// The next packet, or `None` when nothing came within `wait`.
    pub fn next(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            if let Some(frame) = mqtt::read_frame(&mut self.buf, usize::MAX).expect("a packet") {
                return Some(frame);
            }
            self.s.set_read_timeout(Some(wait)).expect("timeout");
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Publishes one QoS 1 message with `payload` to each of `topics`, up to 100 of them
    /// unacknowledged, and returns once every PUBACK is in; panics when none comes for `wait`.
    pub fn publish_all(&mut self, topics: &[String], payload: &[u8], retain: bool, wait: Duration) {
        let (mut sent, mut acked) = (0usize, 0usize);
        while acked < topics.len() {
            while sent < topics.len() && sent - acked < 100 {
                let pkid = (sent % 60_000 + 1) as u16;
                mqtt::put_publish(
                    &mut self.out,
                    Version::V311,
                    false,
                    1,
                    retain,
                    topics[sent].as_bytes(),
                    pkid,
                    &[],
                    &[payload],
                );
                sent += 1;
            }
            self.flush();
            match self.next(wait) {
                Some(frame) if frame.kind() == mqtt::PUBACK => acked += 1,
                Some(_) => {}
                None => panic!("no PUBACK within {wait:?} ({acked} of {})", topics.len()),
            }
        }
    }
}

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}
