//! Which topic names some subscription may match: a publish to any other topic is answered
//! by the edge and never reaches the core (`connection::answer_unrouted`), and an MQTT 5
//! publisher's PUBACK says "no matching subscribers" (0x10) as mosquitto's does.
//!
//! The index holds every filter a client has been granted since start (the filters
//! `limits.max_distinct_filters` counts, so it is bounded by that cap) and the subscriptions
//! of vigil's own tasks that consume messages (the analytics task's telemetry and status
//! filters and the alert filters it keeps the alert log from, the cluster exporter's `#`). Filters are never removed: the core keeps a session's
//! subscriptions while it is offline and the edge does not learn when they end, so the index
//! answers "no subscriber" only when that is certain, which is what MQTT allows
//! ("If the Server knows that there are no matching subscribers, it MAY use 0x10").
//! Connections cache the answer for their last topic (`generation` tells when it may have
//! changed), so the index is read only when a client publishes to another topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::RwLock;

use crate::mqtt;

/// One topic level of the filters.
#[derive(Default)]
struct Node {
    children: HashMap<Box<[u8]>, Node>,
    /// Filters with `+` at this level.
    plus: Option<Box<Node>>,
    /// A filter ends at this level.
    end: bool,
    /// A filter ends at this level with `/#` (at the root: the filter `#`).
    hash: bool,
}

#[derive(Default)]
pub struct FilterIndex {
    root: RwLock<Node>,
    /// Bumped whenever a filter is added: a cached "no subscriber" older than this is stale.
    generation: AtomicU64,
}

impl FilterIndex {
    pub fn new() -> FilterIndex {
        FilterIndex::default()
    }

    /// Adds a filter (valid, as granted; a shared subscription counts as its filter).
    pub fn insert(&self, filter: &[u8]) {
        let Some(filter) = mqtt::unshared(filter) else {
            return;
        };
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let mut node = &mut *root;
        let mut added = false;
        for level in filter.split(|&b| b == b'/') {
            if level == b"#" {
                added = !node.hash;
                node.hash = true;
                break;
            }
            node = if level == b"+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        if !filter.ends_with(b"#") {
            added = !node.end;
            node.end = true;
        }
        if added {
            // Sequentially consistent, with the fence a retained publish makes before it
            // looks (`connection::forward_publish`): either that publish sees this filter, or
            // the subscriber's retained replay, read after this, sees the stored message.
            self.generation.fetch_add(1, SeqCst);
        }
    }

    /// Whether some filter in the index matches the topic name `topic`.
    pub fn matches(&self, topic: &[u8]) -> bool {
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        walk(&root, Some(topic), topic.first() == Some(&b'$'))
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(SeqCst)
    }
}

/// Whether a filter below `node` matches the levels `rest` (`None`: none left). At the first
/// level of a `$` topic, wildcards do not match (MQTT-4.7.2-1).
fn walk(node: &Node, rest: Option<&[u8]>, dollar: bool) -> bool {
    if node.hash && !dollar {
        return true;
    }
    let Some(rest) = rest else {
        return node.end;
    };
    let (level, next) = match rest.iter().position(|&b| b == b'/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if let Some(child) = node.children.get(level) {
        if walk(child, next, false) {
            return true;
        }
    }
    match &node.plus {
        Some(plus) if !dollar => walk(plus, next, false),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(filters: &[&str]) -> FilterIndex {
        let index = FilterIndex::new();
        for f in filters {
            index.insert(f.as_bytes());
        }
        index
    }

    #[test]
    fn matches_as_mqtt_defines_wildcards() {
        for &(filter, topic, expected) in mqtt::FILTER_CASES {
            let index = index(&[filter]);
            assert_eq!(
                index.matches(topic.as_bytes()),
                expected,
                "{filter} ~ {topic}"
            );
        }
        assert!(!index(&[]).matches(b"a"));
    }

    #[test]
    fn the_generation_moves_only_when_a_filter_is_new() {
        let index = index(&["a/+", "b/#"]);
        let g = index.generation();
        index.insert(b"a/+");
        index.insert(b"b/#");
        assert_eq!(index.generation(), g);
        index.insert(b"a");
        assert_eq!(index.generation(), g + 1);
        index.insert(b"b");
        assert_eq!(index.generation(), g + 2, "b differs from b/#");
        assert!(index.matches(b"a/x") && index.matches(b"a") && index.matches(b"b/c/d"));
        assert!(!index.matches(b"c"));
    }
}
