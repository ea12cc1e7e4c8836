//! Token-bucket rate limits keyed by caller address or identity, in memory
//! that stays bounded whatever callers send: the API's requests, the relay's
//! QUIC handshakes and its nodes' speed tests.
//!
//! Kept instead of a limiter crate (`governor`): keys here are fixed-size
//! (an address, a decoded hash or a node's key, never caller text), the table
//! has a hard cap rather than only a periodic purge that a flood of distinct
//! keys outruns, and it needs no dependency beyond std.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most, about 64 bytes each: keys that arrive while the
/// table is full share one bucket until expired ones are swept.
pub const MAX_KEYS: usize = 65_536;

/// Whom a request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// A client address; an IPv6 address counts by its /64, which one
    /// subscriber usually holds whole.
    Addr(IpAddr),
    /// A client or owner hash, decoded (so its letter case does not matter).
    Hash([u8; 32]),
    /// A node's identity key.
    Node([u8; 32]),
}

impl Key {
    pub fn addr(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self::Addr(IpAddr::V6(prefix.into()))
            }
            v4 => Self::Addr(v4),
        }
    }

    /// The key of a hash of 64 hex characters; `None` for anything else.
    pub fn hash(hash: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hash, &mut bytes).ok()?;
        Some(Self::Hash(bytes))
    }
}

/// How fast a bucket refills: one token every `every`, at most `burst` held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    every: Duration,
    burst: u32,
}

impl Rate {
    /// `per_sec` tokens a second (at least one), bursts of `burst`.
    pub fn per_sec(per_sec: u32, burst: u32) -> Self {
        Self::every(Duration::from_secs(1) / per_sec.max(1), burst)
    }

    /// One token every `every` (at least a nanosecond), bursts of `burst`
    /// (at least one).
    pub const fn every(every: Duration, burst: u32) -> Self {
        Self {
            every: if every.is_zero() {
                Duration::from_nanos(1)
            } else {
                every
            },
            burst: if burst == 0 { 1 } else { burst },
        }
    }

    fn burst_milli(self) -> u64 {
        u64::from(self.burst) * 1000
    }

    /// How long an empty bucket takes to fill.
    pub fn refill(self) -> Duration {
        self.every.saturating_mul(self.burst)
    }
}

/// Tokens (in thousandths) and when they were last counted.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    milli: u64,
    last: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            milli: rate.burst_milli(),
            last: now,
        }
    }

    /// The bucket as it is at `now`. Time that did not yet earn a whole
    /// thousandth of a token stays to be counted, so slow rates refill
    /// however often the bucket is looked at.
    fn at(self, rate: Rate, now: Instant) -> Self {
        let burst = rate.burst_milli();
        let every = rate.every.as_nanos();
        let gained = now.saturating_duration_since(self.last).as_nanos() * 1000 / every;
        let milli = u128::from(self.milli).saturating_add(gained);
        if milli >= u128::from(burst) {
            return Self::full(rate, now);
        }
        let counted = u64::try_from(gained * every / 1000).unwrap_or(u64::MAX);
        Self {
            milli: u64::try_from(milli).unwrap_or(burst),
            last: self.last + Duration::from_nanos(counted),
        }
    }

    /// Takes one token at `now`; otherwise says how long until one is there.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        *self = self.at(rate, now);
        if self.milli >= 1000 {
            self.milli -= 1000;
            return Ok(());
        }
        let missing = u32::try_from(1000 - self.milli).unwrap_or(1000);
        Err((rate.every * missing / 1000).saturating_sub(now.saturating_duration_since(self.last)))
    }

    fn is_full(self, rate: Rate, now: Instant) -> bool {
        self.at(rate, now).milli >= rate.burst_milli()
    }
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<Key, Bucket>,
    /// Shared by keys that found the table full.
    overflow: Bucket,
    last_sweep: Instant,
}

/// Allows each key `rate`'s tokens.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    /// How often buckets that have refilled are forgotten: a full bucket is
    /// the same as none, so a key's entry expires at most this long after
    /// it refilled.
    sweep_every: Duration,
    max_keys: usize,
    table: Mutex<Table>,
}

impl RateLimiter {
    /// Allows `per_sec` requests per second per key, with bursts of `burst`.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self::with_rate(Rate::per_sec(per_sec, burst))
    }

    pub fn with_rate(rate: Rate) -> Self {
        Self::with_capacity(rate, MAX_KEYS, Instant::now())
    }

    fn with_capacity(rate: Rate, max_keys: usize, now: Instant) -> Self {
        Self {
            rate,
            // Not less than a second, so that sweeps stay rare.
            sweep_every: rate.refill().max(Duration::from_secs(1)),
            max_keys,
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                overflow: Bucket::full(rate, now),
                last_sweep: now,
            }),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub fn allow(&self, key: Key) -> bool {
        self.take(key, Instant::now()).is_ok()
    }

    /// Takes one token for `key` at `now`; when its bucket is empty, says how
    /// long until it has one.
    pub fn take(&self, key: Key, now: Instant) -> Result<(), Duration> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let rate = self.rate;
        if now.saturating_duration_since(table.last_sweep) >= self.sweep_every {
            table.buckets.retain(|_, b| !b.is_full(rate, now));
            table.last_sweep = now;
        }
        let room = table.buckets.len() < self.max_keys;
        let bucket = match table.buckets.get_mut(&key) {
            Some(b) => b,
            None if room => table.buckets.entry(key).or_insert(Bucket::full(rate, now)),
            None => &mut table.overflow,
        };
        bucket.take(rate, now)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Key {
        Key::addr(s.parse().unwrap())
    }

    fn ok(l: &RateLimiter, key: Key, now: Instant) -> bool {
        l.take(key, now).is_ok()
    }

    #[test]
    fn bursts_then_refills() {
        let t0 = Instant::now();
        let l = RateLimiter::with_capacity(Rate::per_sec(2, 3), MAX_KEYS, t0);
        let a = ip("192.0.2.1");
        assert!((0..3).all(|_| ok(&l, a, t0)));
        assert!(!ok(&l, a, t0));
        assert!(ok(&l, ip("192.0.2.2"), t0), "keys are apart");
        assert!(ok(&l, a, t0 + Duration::from_millis(500)));
        assert!(!ok(&l, a, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn entries_expire_once_refilled() {
        let t0 = Instant::now();
        // Refills in 1.5 s; swept every 1.5 s.
        let l = RateLimiter::with_capacity(Rate::per_sec(2, 3), MAX_KEYS, t0);
        for i in 0..100u8 {
            assert!(ok(&l, ip(&format!("10.0.0.{i}")), t0));
        }
        assert_eq!(l.len(), 100);
        // Not yet refilled: kept, and still limited.
        let t1 = t0 + Duration::from_millis(1499);
        assert!(ok(&l, ip("10.0.0.1"), t1));
        assert_eq!(l.len(), 100);
        // Refilled by the next sweep: forgotten, all but the one used now.
        let t2 = t0 + Duration::from_secs(4);
        assert!(ok(&l, ip("10.0.0.200"), t2));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_flood_of_keys_stays_bounded_and_shares_one_bucket() {
        let t0 = Instant::now();
        let l = RateLimiter::with_capacity(Rate::per_sec(1, 2), 1000, t0);
        let old = ip("198.51.100.7");
        assert!(ok(&l, old, t0));
        let mut allowed = 0;
        for i in 0..100_000u32 {
            let key = Key::Hash(sha2_like(i));
            allowed += usize::from(ok(&l, key, t0));
        }
        assert_eq!(l.len(), 1000, "the table stops growing at its cap");
        // 999 newcomers had a bucket of their own (burst 2 each, one used);
        // the rest shared one bucket of 2.
        assert_eq!(allowed, 999 + 2);
        // A key already known keeps its own bucket.
        assert!(ok(&l, old, t0));
        assert!(!ok(&l, old, t0));
    }

    #[test]
    fn slow_rates_refill_however_often_they_are_asked() {
        let t0 = Instant::now();
        // One every 10 s, bursts of 2.
        let rate = Rate::every(Duration::from_secs(10), 2);
        let l = RateLimiter::with_capacity(rate, MAX_KEYS, t0);
        let a = ip("192.0.2.9");
        assert!(ok(&l, a, t0) && ok(&l, a, t0));
        assert_eq!(l.take(a, t0), Err(Duration::from_secs(10)));
        // Asked every 3 ms: each look earns less than a thousandth of a
        // token, and still the token comes after 10 s.
        let mut t = t0;
        let mut refused = 0;
        while l.take(a, t).is_err() {
            refused += 1;
            t += Duration::from_millis(3);
        }
        assert_eq!(refused, 3334, "a token after 10 s (at {:?})", t - t0);
        assert_eq!(
            l.take(a, t + Duration::from_secs(4)),
            Err(Duration::from_secs(6) - (t - t0 - Duration::from_secs(10))),
            "the wait counts from when the last token came"
        );
    }

    fn sha2_like(i: u32) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_le_bytes());
        b
    }

    #[test]
    fn keys_are_normalised() {
        // One IPv6 /64 is one key; an IPv4-mapped address is its IPv4 one.
        assert_eq!(ip("2001:db8::1"), ip("2001:db8::ffff:2"));
        assert_ne!(ip("2001:db8::1"), ip("2001:db8:0:1::1"));
        assert_eq!(ip("::ffff:192.0.2.1"), ip("192.0.2.1"));
        let lower = "ab".repeat(32);
        assert_eq!(Key::hash(&lower), Key::hash(&lower.to_uppercase()));
        assert!(Key::hash("nothex").is_none());
        assert!(Key::hash(&"a".repeat(60_000)).is_none());
    }
}
