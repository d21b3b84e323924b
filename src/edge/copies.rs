//! Which of a client's overlapping subscriptions each copy of a message is for.
//!
//! When a topic matches several filters of one client, the core (rumqttd) sends the client one
//! copy per filter, each at that filter's QoS, and does not say which filter a copy is for.
//! MQTT 5 wants each of those copies to carry the Subscription Identifier of its own
//! subscription (MQTT-3.3.4-5) and to follow that subscription's options (No Local, Retain As
//! Published), as mosquitto does. The edge therefore hands the matching subscriptions out one
//! per copy: the first copy of a message takes one and leaves the others in [`Copies`], keyed by
//! a digest of the message; the later copies take the rest.
//!
//! rumqttd sends each copy at its filter's QoS (the edge then caps it at the publish's), so a
//! copy's QoS picks among them: a subscription granted exactly that QoS first, else one granted
//! more. Copies at the same QoS are identical but for what is decided here, so which one takes
//! which subscription cannot be told apart from outside.
//! Two identical messages in a row share a key; each copy still takes one subscription, so the
//! client gets the same packets as if the keys differed.
//!
//! A copy the core never sends (it dropped it for a lagging subscriber) leaves its entry behind:
//! entries are few ([`MAX_PENDING`]) and the oldest goes first.

use std::collections::VecDeque;

use super::registry::SubOptions;

/// Messages whose remaining copies a connection remembers.
const MAX_PENDING: usize = 16;

/// The subscriptions the copies still to come of recent messages are for.
#[derive(Debug, Default)]
pub struct Copies {
    pending: VecDeque<Pending>,
}

#[derive(Debug)]
struct Pending {
    key: u64,
    left: Vec<SubOptions>,
}

impl Copies {
    /// The subscription one copy, delivered by the core at `qos`, is for. `matching` (at least
    /// two) are the subscriptions of the message's topic; they are used when no copy of the
    /// message identified by `key` came before.
    pub fn assign(&mut self, key: u64, qos: u8, matching: &[SubOptions]) -> SubOptions {
        if let Some(i) = self.pending.iter().position(|p| p.key == key) {
            let entry = &mut self.pending[i];
            let sub = entry.left.swap_remove(pick(&entry.left, qos));
            if entry.left.is_empty() {
                self.pending.remove(i);
            }
            return sub;
        }
        let taken = pick(matching, qos);
        let left: Vec<SubOptions> = matching
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != taken)
            .map(|(_, s)| *s)
            .collect();
        if !left.is_empty() {
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front();
            }
            self.pending.push_back(Pending { key, left });
        }
        matching[taken]
    }
}

/// The subscription (an index into `subs`, which is not empty) a copy at `qos` comes from.
fn pick(subs: &[SubOptions], qos: u8) -> usize {
    let granted = |s: &SubOptions| s.options & 0x03;
    subs.iter()
        .position(|s| granted(s) == qos)
        .or_else(|| subs.iter().position(|s| granted(s) > qos))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(qos: u8, id: u32) -> SubOptions {
        SubOptions { options: qos, id }
    }

    #[test]
    fn each_copy_takes_one_subscription() {
        let mut c = Copies::default();
        let subs = [sub(1, 10), sub(1, 20), sub(1, 30)];
        let mut ids: Vec<u32> = (0..3).map(|_| c.assign(7, 1, &subs).id).collect();
        ids.sort();
        assert_eq!(ids, vec![10, 20, 30]);
        assert!(c.pending.is_empty(), "all copies came: nothing kept");
        // The next message with the same key starts afresh.
        assert_eq!(c.assign(7, 1, &subs).id, 10);
    }

    #[test]
    fn a_copys_qos_tells_which_subscription_it_is_for() {
        let subs = [sub(0, 1), sub(2, 2)];
        // A QoS 2 publish: the copies come at QoS 0 and QoS 2, in either order.
        for order in [[2, 0], [0, 2]] {
            let mut c = Copies::default();
            for qos in order {
                let expected = if qos == 0 { 1 } else { 2 };
                assert_eq!(c.assign(3, qos, &subs).id, expected, "{order:?}");
            }
        }
        // Should a copy come capped below its subscription's QoS, it takes one granted more.
        let mut c = Copies::default();
        assert_eq!(c.assign(4, 1, &subs).id, 2);
        assert_eq!(c.assign(4, 0, &subs).id, 1);
    }

    #[test]
    fn different_messages_do_not_share_subscriptions() {
        let mut c = Copies::default();
        let subs = [sub(1, 1), sub(1, 2)];
        let first = [c.assign(1, 1, &subs).id, c.assign(2, 1, &subs).id];
        let second = [c.assign(1, 1, &subs).id, c.assign(2, 1, &subs).id];
        assert_eq!(first, [1, 1]);
        assert_eq!(second, [2, 2]);
    }

    #[test]
    fn copies_that_never_come_are_forgotten() {
        let mut c = Copies::default();
        let subs = [sub(1, 1), sub(1, 2)];
        for key in 0..(MAX_PENDING as u64 * 3) {
            c.assign(key, 1, &subs);
        }
        assert_eq!(c.pending.len(), MAX_PENDING);
        assert_eq!(
            c.pending[0].key,
            MAX_PENDING as u64 * 2,
            "the oldest went first"
        );
    }
}
