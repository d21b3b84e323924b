//! Limits the edge enforces per client: publish rates (token buckets) and connections per
//! address; and two over all clients: the distinct topic filters and topic names given to
//! the core. (The third, the retained messages' bytes, is the store's own: `retained`.)

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::time::Instant;

use super::acl::Rates;

/// A token bucket holding one second's worth of tokens.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket { rate, tokens: rate }
    }

    fn refill(&mut self, elapsed_secs: f64) {
        self.tokens = (self.tokens + elapsed_secs * self.rate).min(self.rate);
    }
}

/// A connection's publish rate limit: messages and bytes per second, one second of burst.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rates: Rates) -> RateLimiter {
        RateLimiter {
            messages: (rates.messages_per_sec > 0)
                .then(|| Bucket::new(rates.messages_per_sec as f64)),
            bytes: (rates.bytes_per_sec > 0).then(|| Bucket::new(rates.bytes_per_sec as f64)),
            last: Instant::now(),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.messages.is_none() && self.bytes.is_none()
    }

    /// Takes one message of `bytes` if both buckets have room; `false` when over the limit
    /// (nothing is taken then).
    pub fn allow(&mut self, bytes: usize, now: Instant) -> bool {
        if self.is_unlimited() {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        for b in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            b.refill(elapsed);
        }
        let msg_ok = self.messages.as_ref().map_or(true, |b| b.tokens >= 1.0);
        // A message larger than a second's budget still passes when the bucket is full, or it
        // could never be sent at all.
        let bytes_ok = self
            .bytes
            .as_ref()
            .map_or(true, |b| b.tokens >= (bytes as f64).min(b.rate));
        if !(msg_ok && bytes_ok) {
            return false;
        }
        if let Some(b) = &mut self.messages {
            b.tokens -= 1.0;
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
        true
    }
}

/// Connections per IP address. Entries exist only while an address has a connection, so the
/// map is bounded by the connection cap.
#[derive(Debug, Default)]
pub struct PerIp {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Held for the life of a connection; releases its address's slot on drop.
pub struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub fn new(max: usize) -> PerIp {
        PerIp {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `ip`, or `None` when the address is at its limit.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The distinct topic filters, or topic names, clients have given the core since start,
/// up to a cap. rumqttd never frees what it keeps per name:
/// - per filter, a log that goes on collecting the messages of the filter's topics, up to the
///   core's segment bound, whether anyone is still subscribed or not
///   (`limits.max_distinct_filters`);
/// - per topic name published that matches some filter ever subscribed, the list of those
///   filters (`limits.max_distinct_topics`).
///
/// So the number of distinct names is what bounds that memory; this set, at most that many
/// names of at most `limits.max_topic_length` bytes, is the price of knowing it.
#[derive(Debug)]
pub struct CoreNames {
    max: usize,
    seen: Mutex<HashSet<Bytes>>,
}

impl CoreNames {
    pub fn new(max: usize) -> CoreNames {
        CoreNames {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Whether `name` may go to the core: it has been there before, or there is room for one
    /// more (then it is counted from now on). The second value is the count after the call.
    pub fn admit(&self, name: &Bytes) -> (bool, usize) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(name) {
            return (true, seen.len());
        }
        if seen.len() >= self.max {
            return (false, seen.len());
        }
        // A copy: `name` is a slice of a client's read buffer, and keeping the slice would keep
        // the whole buffer (the packet's payload and its neighbours') for the process's life.
        seen.insert(Bytes::copy_from_slice(name));
        (true, seen.len())
    }

    /// Whether a client has given the core `name` since start.
    pub fn contains(&self, name: &[u8]) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn core_names_admit_known_names_and_new_ones_up_to_the_cap() {
        let filters = CoreNames::new(2);
        let a = Bytes::from_static(b"a/#");
        let b = Bytes::from_static(b"b/+");
        assert_eq!(filters.admit(&a), (true, 1));
        assert_eq!(
            filters.admit(&a),
            (true, 1),
            "seen before: not counted again"
        );
        assert_eq!(filters.admit(&b), (true, 2));
        assert_eq!(filters.admit(&Bytes::from_static(b"c")), (false, 2));
        assert_eq!(
            filters.admit(&b),
            (true, 2),
            "known filters stay allowed at the cap"
        );
        assert!(filters.contains(b"a/#") && !filters.contains(b"c"));
    }

    #[test]
    fn core_names_keep_a_copy_not_the_clients_buffer() {
        let names = CoreNames::new(10);
        let packet = Bytes::from(vec![b'x'; 4096]);
        let name = packet.slice(0..8);
        assert!(names.admit(&name).0);
        let seen = names.seen.lock().unwrap();
        let kept = seen.get(&name[..]).unwrap();
        assert!(!std::ptr::eq(kept.as_ptr(), name.as_ptr()));
    }

    #[test]
    fn messages_per_second_with_one_second_of_burst() {
        let mut r = RateLimiter::new(Rates {
            messages_per_sec: 10,
            bytes_per_sec: 0,
        });
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| r.allow(10, t0)).count(), 10);
        // Half a second refills five.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| r.allow(10, t1)).count(), 5);
        // Never more than one second's worth, however long the pause.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| r.allow(10, t2)).count(), 10);
    }

    #[test]
    fn bytes_per_second_and_oversized_messages() {
        let mut r = RateLimiter::new(Rates {
            messages_per_sec: 0,
            bytes_per_sec: 1000,
        });
        let t0 = Instant::now();
        assert!(r.allow(600, t0));
        assert!(!r.allow(600, t0));
        assert!(r.allow(400, t0));
        // A message over the whole budget passes only with a full bucket.
        let t1 = t0 + Duration::from_secs(1);
        assert!(r.allow(5000, t1));
        assert!(!r.allow(1, t1));
        assert!(RateLimiter::new(Rates::default()).allow(usize::MAX, t1));
    }

    #[test]
    fn per_ip_slots_are_released() {
        let p = Arc::new(PerIp::new(2));
        let ip: IpAddr = "10.1.1.1".parse().unwrap();
        let a = p.acquire(ip).unwrap();
        let _b = p.acquire(ip).unwrap();
        assert!(p.acquire(ip).is_none());
        assert!(p.acquire("10.1.1.2".parse().unwrap()).is_some());
        drop(a);
        assert!(p.acquire(ip).is_some());
        drop(_b);
        assert!(p.counts.lock().unwrap().len() <= 1);
    }
}
