//! Which relay the node dials: the ones it was given and the ones relays told
//! it about, the round-trip time measured to each, and the choice of the next
//! one when a relay is lost (I/O-free; the uplink drives it).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use jusy_common::identity::PeerId;
use jusy_common::wire::RelayAddr;

/// Relays a node remembers at most; learned ones beyond this are ignored.
pub const MAX_RELAYS: usize = 16;

/// The relays a node knows and where it is in trying them.
#[derive(Debug, Clone)]
pub struct Relays {
    known: Vec<RelayAddr>,
    rtt: HashMap<PeerId, Duration>,
    /// Relays that failed since the node was last registered somewhere.
    tried: HashSet<PeerId>,
    current: usize,
}

impl Relays {
    /// The configured relays, the first one dialled first.
    pub fn new(configured: Vec<RelayAddr>) -> Self {
        let mut r = Self {
            known: Vec::new(),
            rtt: HashMap::new(),
            tried: HashSet::new(),
            current: 0,
        };
        r.learn(configured);
        r
    }

    /// The relay to dial now.
    pub fn current(&self) -> Option<&RelayAddr> {
        self.known.get(self.current)
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Adds relays not known yet (by key).
    pub fn learn(&mut self, relays: Vec<RelayAddr>) {
        for r in relays {
            if self.known.len() >= MAX_RELAYS {
                break;
            }
            if !self.known.iter().any(|k| k.key == r.key) {
                self.known.push(r);
            }
        }
    }

    /// Notes the round-trip time measured to a relay.
    pub fn measured(&mut self, key: PeerId, rtt: Duration) {
        self.rtt.insert(key, rtt);
    }

    /// The node registered with the current relay: every relay may be tried
    /// again after it is lost.
    pub fn registered(&mut self) {
        self.tried.clear();
    }

    /// The current relay failed or was lost: moves to the untried relay with
    /// the lowest measured round-trip time (unmeasured ones after, in the
    /// order they were learned). Returns false when every relay has been
    /// tried since the last registration: a new round starts, from the best
    /// one, and the caller should back off.
    pub fn failed(&mut self) -> bool {
        if let Some(r) = self.known.get(self.current) {
            self.tried.insert(r.key);
        }
        let fresh_round = self.known.iter().all(|r| self.tried.contains(&r.key));
        if fresh_round {
            self.tried.clear();
        }
        let best = self
            .known
            .iter()
            .enumerate()
            .filter(|(_, r)| !self.tried.contains(&r.key))
            .min_by_key(|(i, r)| (self.rtt.get(&r.key).copied().unwrap_or(Duration::MAX), *i))
            .map(|(i, _)| i);
        self.current = best.unwrap_or(0);
        !fresh_round
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(n: u8) -> RelayAddr {
        RelayAddr {
            addr: format!("10.0.0.{n}:7443"),
            key: PeerId::from_signing_key(&ed25519_dalek::SigningKey::from_bytes(&[n; 32])),
        }
    }

    #[test]
    fn moves_to_the_fastest_untried_relay_then_backs_off() {
        let mut r = Relays::new(vec![relay(1)]);
        r.learn(vec![relay(2), relay(3), relay(1)]);
        assert_eq!(r.len(), 3);
        assert_eq!(r.current(), Some(&relay(1)));
        r.measured(relay(3).key, Duration::from_millis(5));
        r.measured(relay(2).key, Duration::from_millis(50));
        r.registered();
        assert!(r.failed());
        assert_eq!(r.current(), Some(&relay(3)));
        assert!(r.failed());
        assert_eq!(r.current(), Some(&relay(2)));
        // All three failed: back off, then start again from the fastest.
        assert!(!r.failed());
        assert_eq!(r.current(), Some(&relay(3)));
        r.registered();
        assert!(r.failed());
        assert_eq!(r.current(), Some(&relay(2)));
    }

    #[test]
    fn a_single_relay_is_retried_with_backoff() {
        let mut r = Relays::new(vec![relay(1)]);
        assert!(!r.failed());
        assert_eq!(r.current(), Some(&relay(1)));
        assert!(!r.failed());
    }

    #[test]
    fn learning_is_bounded() {
        let mut r = Relays::new(Vec::new());
        assert!(r.is_empty());
        r.learn((1..=40).map(relay).collect());
        assert_eq!(r.len(), MAX_RELAYS);
    }
}
