//! Which QUIC connection attempts the relay takes on, decided before any
//! handshake work is done for them.
//!
//! Any stranger can send a node's first packet, and make up a node key too.
//! A connection is **unidentified** from its first packet until the node's
//! hello is welcomed (the QUIC handshake with its key, the control stream,
//! the hello); such connections are capped apart from attached nodes, per
//! address (an IPv6 /64 counts as one) and in all, and each has
//! [`Limits::hello_timeout`] to become a node. New handshakes are rate
//! limited per address and in all, so that strangers cannot spend the data
//! plane's core on handshakes. When the cap in all is reached, a new attempt
//! closes the oldest unidentified one rather than being refused: a flood of
//! strangers from many addresses must then outpace a real node's handshake
//! (a few round trips) to keep it out, instead of only keeping the table full.
//!
//! Under load (a quarter of the cap in use), or when its address already has
//! a connection being set up, an attempt from an address that has not proved
//! it receives packets there is asked for a QUIC Retry first. The Retry costs
//! the relay no state, so forged source addresses hold no place and spend no
//! other address's share; a real node answers it within one round trip.
//!
//! [`Admission`] holds no sockets and reads no clock: `Relay::serve` asks it
//! about each attempt with the time, and each admitted connection holds an
//! [`Unidentified`] place until it is a node or gone.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::limit::{Bucket, Key, Rate, RateLimiter};

/// Application close code for a connection that did not become a node:
/// no hello in time, or pushed out by newer attempts.
pub const UNIDENTIFIED: u32 = 3;

/// How often refusals are logged at most; the log says how many there were.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The relay's bounds on connections not identified yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a connection has from its first packet to its hello.
    pub hello_timeout: Duration,
    /// Unidentified connections at most, from all addresses.
    pub max: usize,
    /// Unidentified connections at most from one address.
    pub max_per_address: usize,
    /// New handshakes one address may start: bursts of `max_per_address`.
    pub per_address: Rate,
    /// New handshakes from all addresses.
    pub all: Rate,
}

/// Why an attempt is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address has as many unidentified connections as it may.
    AddressFull,
    /// Its address starts handshakes faster than it may.
    AddressRate,
    /// Handshakes from all addresses come faster than the relay takes them.
    Rate,
}

/// What to do with a connection attempt.
#[derive(Debug)]
pub enum Verdict {
    /// Take it on as unidentified connection `id`; `pushed_out` is cancelled
    /// if newer attempts push it out before its hello.
    Accept {
        id: u64,
        pushed_out: CancellationToken,
    },
    /// Ask the client to prove its address first (QUIC Retry).
    Retry,
    /// Turn it away (QUIC `CONNECTION_REFUSED`).
    Refuse(Refusal),
}

/// Attempts turned away since the last report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub retried: u64,
    pub address_full: u64,
    pub address_rate: u64,
    pub rate: u64,
    pub pushed_out: u64,
}

impl Refused {
    fn any(&self) -> bool {
        *self != Self::default()
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    addr: Key,
    pushed_out: CancellationToken,
}

/// The unidentified connections and the handshake budgets.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    next_id: u64,
    /// Oldest first.
    waiting: VecDeque<Entry>,
    per_address: HashMap<Key, usize>,
    address_rate: RateLimiter,
    rate: Bucket,
    refused: Refused,
    reported: Instant,
}

impl Admission {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            next_id: 0,
            waiting: VecDeque::new(),
            per_address: HashMap::new(),
            address_rate: RateLimiter::with_rate(limits.per_address),
            rate: Bucket::full(limits.all, now),
            refused: Refused::default(),
            reported: now,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Decides about an attempt from `ip` at `now`; `validated` says whether
    /// the client proved it receives packets at its address (a Retry token).
    pub fn admit(&mut self, ip: IpAddr, validated: bool, now: Instant) -> Verdict {
        let addr = Key::addr(ip);
        let here = self.per_address.get(&addr).copied().unwrap_or(0);
        let loaded = self.waiting.len() >= (self.limits.max / 4).max(1);
        if !validated && (loaded || here > 0) {
            self.refused.retried += 1;
            return Verdict::Retry;
        }
        // Caps before rates: a refused attempt spends no token.
        let refusal = if here >= self.limits.max_per_address {
            Some(Refusal::AddressFull)
        } else if self.address_rate.take(addr, now).is_err() {
            Some(Refusal::AddressRate)
        } else if self.rate.take(self.limits.all, now).is_err() {
            Some(Refusal::Rate)
        } else {
            None
        };
        if let Some(why) = refusal {
            match why {
                Refusal::AddressFull => self.refused.address_full += 1,
                Refusal::AddressRate => self.refused.address_rate += 1,
                Refusal::Rate => self.refused.rate += 1,
            }
            return Verdict::Refuse(why);
        }
        if self.waiting.len() >= self.limits.max
            && let Some(oldest) = self.waiting.pop_front()
        {
            self.forget(oldest.addr);
            oldest.pushed_out.cancel();
            self.refused.pushed_out += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        let pushed_out = CancellationToken::new();
        self.waiting.push_back(Entry {
            id,
            addr,
            pushed_out: pushed_out.clone(),
        });
        *self.per_address.entry(addr).or_default() += 1;
        Verdict::Accept { id, pushed_out }
    }

    /// Connection `id` became a node or ended; an id pushed out already is
    /// gone.
    pub fn leave(&mut self, id: u64) {
        if let Some(at) = self.waiting.iter().position(|e| e.id == id)
            && let Some(entry) = self.waiting.remove(at)
        {
            self.forget(entry.addr);
        }
    }

    fn forget(&mut self, addr: Key) {
        if let Some(n) = self.per_address.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&addr);
            }
        }
    }

    /// Unidentified connections now, in all and from `ip`.
    #[cfg(test)]
    fn unidentified(&self, ip: IpAddr) -> (usize, usize) {
        let here = self.per_address.get(&Key::addr(ip)).copied();
        (self.waiting.len(), here.unwrap_or(0))
    }

    /// What was turned away since the last report, at most once per
    /// [`REPORT_EVERY`] and only when something was.
    pub fn report(&mut self, now: Instant) -> Option<Refused> {
        if !self.refused.any() || now.saturating_duration_since(self.reported) < REPORT_EVERY {
            return None;
        }
        self.reported = now;
        Some(std::mem::take(&mut self.refused))
    }
}

/// An admitted connection's place among the unidentified ones; dropping it
/// (when the node is welcomed, or the connection ends) gives the place up.
#[derive(Debug)]
pub struct Unidentified {
    admission: Arc<Mutex<Admission>>,
    id: u64,
    /// When the connection must have said hello.
    pub deadline: tokio::time::Instant,
    /// Cancelled when newer attempts push it out.
    pub pushed_out: CancellationToken,
}

impl Unidentified {
    pub fn new(
        admission: Arc<Mutex<Admission>>,
        id: u64,
        deadline: tokio::time::Instant,
        pushed_out: CancellationToken,
    ) -> Self {
        Self {
            admission,
            id,
            deadline,
            pushed_out,
        }
    }
}

impl Drop for Unidentified {
    fn drop(&mut self) {
        super::lock(&self.admission).leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            hello_timeout: Duration::from_secs(10),
            max: 8,
            max_per_address: 3,
            per_address: Rate::per_sec(1, 3),
            all: Rate::per_sec(100, 100),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    fn accepted(v: Verdict) -> (u64, CancellationToken) {
        match v {
            Verdict::Accept { id, pushed_out } => (id, pushed_out),
            other => panic!("not accepted: {other:?}"),
        }
    }

    #[test]
    fn an_address_gets_its_share_and_no_more() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits(), t0);
        let ids: Vec<u64> = (0..3)
            .map(|_| accepted(a.admit(ip("192.0.2.1"), true, t0)).0)
            .collect();
        assert!(matches!(
            a.admit(ip("192.0.2.1"), true, t0),
            Verdict::Refuse(Refusal::AddressFull)
        ));
        // Another address is not held to this one's share.
        accepted(a.admit(ip("192.0.2.2"), true, t0));
        // A place given up is free again, but the burst is spent: one more a
        // second.
        a.leave(ids[0]);
        assert!(matches!(
            a.admit(ip("192.0.2.1"), true, t0),
            Verdict::Refuse(Refusal::AddressRate)
        ));
        accepted(a.admit(ip("192.0.2.1"), true, t0 + Duration::from_secs(1)));
        assert_eq!(a.unidentified(ip("192.0.2.1")), (4, 3));
        // An IPv6 /64 is one address.
        accepted(a.admit(ip("2001:db8::1"), true, t0));
        assert_eq!(a.unidentified(ip("2001:db8::ffff")), (5, 1));
    }

    #[test]
    fn forged_addresses_are_asked_to_prove_themselves_under_load_or_twice() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits(), t0);
        // A first attempt goes straight in: no round trip added.
        accepted(a.admit(ip("192.0.2.1"), false, t0));
        // A second one from the same address proves it first, so forged
        // attempts cannot use up a real node's share.
        assert!(matches!(
            a.admit(ip("192.0.2.1"), false, t0),
            Verdict::Retry
        ));
        accepted(a.admit(ip("192.0.2.1"), true, t0));
        // A quarter of the cap in use: every unproved address is asked.
        assert!(matches!(
            a.admit(ip("192.0.2.3"), false, t0),
            Verdict::Retry
        ));
        accepted(a.admit(ip("192.0.2.3"), true, t0));
        let refused = a.report(t0 + REPORT_EVERY).expect("a report");
        assert_eq!(refused.retried, 2);
        assert_eq!(a.report(t0 + REPORT_EVERY * 2), None, "nothing new");
    }

    #[test]
    fn a_full_table_pushes_out_its_oldest() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits(), t0);
        let mut first = Vec::new();
        for i in 0..8 {
            first.push(accepted(a.admit(ip(&format!("198.51.100.{i}")), true, t0)));
        }
        let (_, newest) = accepted(a.admit(ip("203.0.113.1"), true, t0));
        assert!(first[0].1.is_cancelled(), "the oldest is pushed out");
        assert!(first[1..].iter().all(|(_, t)| !t.is_cancelled()));
        assert!(!newest.is_cancelled());
        assert_eq!(a.unidentified(ip("198.51.100.0")), (8, 0));
        // Its place was given back already; leaving again changes nothing.
        a.leave(first[0].0);
        assert_eq!(a.unidentified(ip("203.0.113.1")), (8, 1));
        a.leave(first[1].0);
        assert_eq!(a.unidentified(ip("198.51.100.1")), (7, 0));
    }

    #[test]
    fn handshakes_in_all_are_rate_limited() {
        let t0 = Instant::now();
        let mut l = limits();
        l.all = Rate::per_sec(2, 2);
        let mut a = Admission::new(l, t0);
        let mut ids = Vec::new();
        for i in 0..2 {
            ids.push(accepted(a.admit(ip(&format!("198.51.100.{i}")), true, t0)).0);
        }
        assert!(matches!(
            a.admit(ip("198.51.100.9"), true, t0),
            Verdict::Refuse(Refusal::Rate)
        ));
        accepted(a.admit(ip("198.51.100.9"), true, t0 + Duration::from_millis(500)));
        for id in ids {
            a.leave(id);
        }
        assert_eq!(a.unidentified(ip("198.51.100.9")), (1, 1));
    }
}
