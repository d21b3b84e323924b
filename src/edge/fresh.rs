//! New connections that have not sent their first packet yet, as the subscribe fence sees
//! them (see `connection`).
//!
//! A client often subscribes right after its CONNACK, and another client may publish right
//! after that SUBSCRIBE without waiting for the SUBACK (paho's interoperability suite does).
//! mosquitto's single loop reads the two in the order they arrived, so the message reaches
//! the new subscriber. Here each connection runs on its own task, possibly on another thread,
//! and the PUBLISH may be read first. So a PUBLISH also waits at the fence while another new
//! connection has bytes that arrived and are not handled yet: still in its socket (seen
//! through a second handle on that socket, `peek`), or being handled by its task. Bytes that
//! have not arrived when the PUBLISH is read come after it, as they would on mosquitto.
//!
//! A client may also wait a little before its first SUBSCRIBE (paho's `test_subscribe_options`
//! connects two clients, subscribes the first, waits for its SUBACK in half-second steps, then
//! subscribes the second and publishes at once), so a connection stays watched until its first
//! packet is handled or [`WATCH`] (2 s) has passed. At most [`CAPACITY`] connections are
//! watched: a reconnecting fleet holds nobody back, and a silent client costs a PUBLISH read
//! one `peek` while it is watched.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Connections watched at once; more new connections at the same moment are not watched.
pub const CAPACITY: usize = 8;
/// How long after its CONNACK a connection that has sent nothing is watched.
pub const WATCH: Duration = Duration::from_secs(2);

/// The watched connections.
#[derive(Debug)]
pub struct Fresh {
    /// Entries in `entries` (read without the lock on every PUBLISH).
    count: AtomicUsize,
    entries: Mutex<Vec<Arc<Entry>>>,
    next_id: AtomicU64,
    watch: Duration,
}

impl Default for Fresh {
    fn default() -> Self {
        Fresh::watching_for(WATCH)
    }
}

/// One watched connection.
#[derive(Debug)]
pub struct Entry {
    id: u64,
    since: Instant,
    /// A second handle on the connection's socket (same open file, so non-blocking too).
    socket: TcpStream,
    /// Set by the connection's task once it has read bytes, before it handles them.
    busy: AtomicBool,
}

impl Entry {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Called by the connection's own task when it has read bytes from the client.
    pub fn reading(&self) {
        self.busy.store(true, Relaxed);
    }

    /// Whether the connection has bytes that arrived and are not handled yet.
    fn pending(&self) -> bool {
        if self.busy.load(Relaxed) {
            return true;
        }
        let mut byte = [0u8; 1];
        // Err(WouldBlock): nothing there. Ok(0): the client closed, nothing to wait for.
        matches!(self.socket.peek(&mut byte), Ok(n) if n > 0)
    }
}

impl Fresh {
    fn watching_for(watch: Duration) -> Fresh {
        Fresh {
            count: AtomicUsize::new(0),
            entries: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            watch,
        }
    }

    /// Starts watching a connection through the socket handle `socket` gives; `None` when
    /// `CAPACITY` connections are watched already (then `socket` is not called) or it gives
    /// none.
    pub fn watch(&self, socket: impl FnOnce() -> Option<TcpStream>) -> Option<Arc<Entry>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        self.prune(&mut entries);
        if entries.len() >= CAPACITY {
            return None;
        }
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Relaxed),
            since: Instant::now(),
            socket: socket()?,
            busy: AtomicBool::new(false),
        });
        entries.push(entry.clone());
        self.count.store(entries.len(), Relaxed);
        Some(entry)
    }

    /// Stops watching connection `id` (it has handled its first packet, or ended).
    pub fn forget(&self, id: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|e| e.id != id);
        self.count.store(entries.len(), Relaxed);
    }

    /// Whether a watched connection other than `own` has bytes that arrived and are not
    /// handled yet.
    pub fn others_pending(&self, own: Option<u64>) -> bool {
        let count = self.count.load(Relaxed);
        if count == 0 || (count == 1 && own.is_some()) {
            return false;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        self.prune(&mut entries);
        entries.iter().any(|e| Some(e.id) != own && e.pending())
    }

    fn prune(&self, entries: &mut Vec<Arc<Entry>>) {
        entries.retain(|e| e.since.elapsed() < self.watch);
        self.count.store(entries.len(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A connected pair: (the client's end, the server's end, set non-blocking as tokio's are).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("non-blocking");
        (client, server)
    }

    #[test]
    fn a_watched_connection_is_pending_while_its_bytes_are_not_handled() {
        let fresh = Fresh::default();
        let (mut client, server) = pair();
        let e = fresh.watch(|| server.try_clone().ok()).expect("room");
        assert!(!fresh.others_pending(None), "nothing sent yet");
        client.write_all(&[0x82, 0]).expect("send");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !fresh.others_pending(None) {
            assert!(Instant::now() < deadline, "the bytes never showed");
        }
        assert!(
            !fresh.others_pending(Some(e.id())),
            "its own bytes hold nobody"
        );
        // Its task reads them (the socket is empty again) and handles them.
        let mut buf = [0u8; 8];
        e.reading();
        std::io::Read::read(&mut &server, &mut buf).expect("read");
        assert!(fresh.others_pending(None), "read, not handled yet");
        fresh.forget(e.id());
        assert!(!fresh.others_pending(None));
    }

    #[test]
    fn only_a_few_connections_are_watched_and_not_for_long() {
        let watch = Duration::from_millis(50);
        let fresh = Fresh::watching_for(watch);
        let pairs: Vec<_> = (0..CAPACITY + 1).map(|_| pair()).collect();
        let watched: Vec<_> = pairs
            .iter()
            .map(|(_, s)| fresh.watch(|| s.try_clone().ok()))
            .collect();
        assert!(watched[..CAPACITY].iter().all(Option::is_some));
        assert!(watched[CAPACITY].is_none(), "full");
        std::thread::sleep(watch);
        let (_client, server) = pair();
        assert!(
            fresh.watch(|| Some(server)).is_some(),
            "the old ones expired"
        );
        assert_eq!(fresh.count.load(Relaxed), 1);
    }
}
