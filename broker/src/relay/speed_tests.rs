//! How many speed tests the relay runs, and for whom.
//!
//! A test costs the relay about a second of CPU (it computes the expected
//! digest while the node computes its answer), and anyone can make up node
//! keys and say hello. So a node's first test on this relay is charged to
//! its address (an IPv6 /64 counts as one) and to its key, each with a rate
//! limit ([`PER_ADDRESS`], [`PER_NODE`]); at most `concurrency` digests are
//! computed at once, and a node waits for a turn at most [`TURN_WAIT`]. A node
//! refused either way is told on its control stream when to come back
//! (`BrokerMsg::TryLater`), and its connection ends. A node that passed here
//! keeps its result when it reconnects, until its next test is due, so
//! reconnections cost no test at all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jusy_common::identity::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::limit::{Key, Rate, RateLimiter};

/// First tests one address may cause: 8 at once (the nodes of one home or
/// office starting together), then one every 10 s.
pub const PER_ADDRESS: Rate = Rate::every(Duration::from_secs(10), 8);

/// First tests one node key may cause: 3 at once, then one every 10 minutes
/// (a node that passed is not tested again when it reconnects).
pub const PER_NODE: Rate = Rate::every(Duration::from_secs(600), 3);

/// Longest a node waits for a turn before it is told to come back later.
pub const TURN_WAIT: Duration = Duration::from_secs(30);

/// When an attached node's periodic test finds no free turn, it is tried
/// again this much later (the node stays offered meanwhile).
pub const BUSY_RETRY: Duration = Duration::from_secs(60);

/// Passed results remembered at most (about 64 bytes each).
const REMEMBERED: usize = 65_536;

/// Why a node is told to come back later, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Later {
    /// Its address caused as many tests as it may for now.
    Address(Duration),
    /// Its key did.
    Node(Duration),
    /// No turn came free in [`TURN_WAIT`].
    Busy,
}

impl Later {
    /// How long the node should wait before it dials this relay again.
    pub fn after(self) -> Duration {
        match self {
            Self::Address(d) | Self::Node(d) => d.max(Duration::from_secs(1)),
            Self::Busy => TURN_WAIT,
        }
    }

    /// What the node is told.
    pub fn reason(self) -> String {
        let secs = self.after().as_secs();
        match self {
            Self::Address(_) => {
                format!("too many speed tests from this address; try again in {secs} s")
            }
            Self::Node(_) => format!("too many speed tests for this node; try again in {secs} s"),
            Self::Busy => {
                format!("the relay is busy with other speed tests; try again in {secs} s")
            }
        }
    }
}

/// A passed test: how long the node took, and when it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passed {
    pub took: Duration,
    /// The lanes (cores) that passed.
    pub lanes: u32,
    pub at: Instant,
}

/// The relay's speed-test budget.
#[derive(Debug)]
pub struct SpeedTests {
    per_address: RateLimiter,
    per_node: RateLimiter,
    turns: Arc<Semaphore>,
    concurrency: usize,
    /// How long a passed result holds.
    interval: Duration,
    passed: Mutex<HashMap<PeerId, Passed>>,
}

impl SpeedTests {
    /// At most `concurrency` (at least one) tests computed at once; results
    /// hold for `interval`.
    pub fn new(concurrency: usize, interval: Duration) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            per_address: RateLimiter::with_rate(PER_ADDRESS),
            per_node: RateLimiter::with_rate(PER_NODE),
            turns: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            interval,
            passed: Mutex::default(),
        }
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Charges a node's first test here to its address and key.
    pub fn charge(&self, ip: IpAddr, node: PeerId, now: Instant) -> Result<(), Later> {
        self.per_address
            .take(Key::addr(ip), now)
            .map_err(Later::Address)?;
        self.per_node
            .take(Key::Node(node.0), now)
            .map_err(Later::Node)
    }

    /// Waits for a turn to compute a digest, at most [`TURN_WAIT`]; the turn
    /// is held until the permit is dropped.
    pub async fn turn(&self) -> Result<OwnedSemaphorePermit, Later> {
        match tokio::time::timeout(TURN_WAIT, self.turns.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a wait that ran out is busy.
            Ok(Err(_)) | Err(_) => Err(Later::Busy),
        }
    }

    /// A turn if one is free now.
    pub fn try_turn(&self) -> Option<OwnedSemaphorePermit> {
        self.turns.clone().try_acquire_owned().ok()
    }

    /// Remembers that `node` passed at `now`, taking `took`.
    pub fn passed(&self, node: PeerId, took: Duration, lanes: u32, now: Instant) {
        let mut passed = super::lock(&self.passed);
        if passed.len() >= REMEMBERED && !passed.contains_key(&node) {
            let interval = self.interval;
            passed.retain(|_, p| now.saturating_duration_since(p.at) < interval);
            if passed.len() >= REMEMBERED {
                return;
            }
        }
        passed.insert(
            node,
            Passed {
                took,
                lanes,
                at: now,
            },
        );
    }

    /// The node's result here, if it passed less than the interval ago.
    pub fn recent(&self, node: PeerId, now: Instant) -> Option<Passed> {
        let passed = super::lock(&self.passed);
        passed
            .get(&node)
            .filter(|p| now.saturating_duration_since(p.at) < self.interval)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> PeerId {
        PeerId::from_signing_key(&ed25519_dalek::SigningKey::from_bytes(&[n; 32]))
    }

    #[test]
    fn first_tests_are_charged_to_the_address_and_the_key() {
        let t0 = Instant::now();
        let tests = SpeedTests::new(1, Duration::from_secs(3600));
        let home: IpAddr = "192.0.2.1".parse().unwrap();
        // A stranger making up keys at one address: 8, then one every 10 s.
        for n in 0..8 {
            assert_eq!(tests.charge(home, node(n), t0), Ok(()));
        }
        let later = tests.charge(home, node(8), t0).unwrap_err();
        assert_eq!(later, Later::Address(Duration::from_secs(10)));
        assert!(
            later.reason().contains("try again in 10 s"),
            "{}",
            later.reason()
        );
        assert_eq!(
            tests.charge(home, node(8), t0 + Duration::from_secs(10)),
            Ok(())
        );
        // One key from many addresses: 3, then one every 10 minutes.
        for i in 0..3 {
            let ip: IpAddr = format!("198.51.100.{i}").parse().unwrap();
            assert_eq!(tests.charge(ip, node(50), t0), Ok(()));
        }
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        assert_eq!(
            tests.charge(ip, node(50), t0),
            Err(Later::Node(Duration::from_secs(600)))
        );
    }

    #[test]
    fn a_passed_result_holds_for_the_interval() {
        let t0 = Instant::now();
        let tests = SpeedTests::new(1, Duration::from_secs(60));
        assert_eq!(tests.recent(node(1), t0), None);
        tests.passed(node(1), Duration::from_millis(900), 2, t0);
        let p = tests.recent(node(1), t0 + Duration::from_secs(59));
        assert_eq!(p.map(|p| p.took), Some(Duration::from_millis(900)));
        assert_eq!(tests.recent(node(1), t0 + Duration::from_secs(60)), None);
    }

    #[tokio::test]
    async fn turns_are_capped_and_given_back() {
        let tests = SpeedTests::new(2, Duration::from_secs(60));
        let a = tests.turn().await.expect("a turn");
        let b = tests.try_turn().expect("a second turn");
        assert!(tests.try_turn().is_none(), "two at most");
        drop(a);
        assert!(tests.try_turn().is_some());
        drop(b);
    }
}
