//! Token-bucket rate limits keyed by caller address or client hash, in
//! memory that stays bounded whatever callers send.
//!
//! Kept instead of a limiter crate (`governor`): keys here are fixed-size
//! (an address or a decoded hash, never caller text), the table has a hard
//! cap rather than only a periodic purge that a flood of distinct keys
//! outruns, and it needs no dependency beyond std.

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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in thousandths.
    milli: u64,
    last: Instant,
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<Key, Bucket>,
    /// Shared by keys that found the table full.
    overflow: Bucket,
    last_sweep: Instant,
}

/// Allows `per_sec` requests per second per key, with bursts of `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u64,
    burst_milli: u64,
    /// How often buckets that have refilled are forgotten: a full bucket is
    /// the same as none, so a key's entry expires at most this long after
    /// it refilled.
    sweep_every: Duration,
    max_keys: usize,
    table: Mutex<Table>,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self::with_capacity(per_sec, burst, MAX_KEYS, Instant::now())
    }

    fn with_capacity(per_sec: u32, burst: u32, max_keys: usize, now: Instant) -> Self {
        let burst_milli = u64::from(burst.max(1)) * 1000;
        let per_sec = u64::from(per_sec.max(1));
        // The time an empty bucket takes to refill, and not less than a second
        // so that sweeps stay rare.
        let refill = Duration::from_millis(burst_milli / per_sec);
        Self {
            per_sec,
            burst_milli,
            sweep_every: refill.max(Duration::from_secs(1)),
            max_keys,
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                overflow: Bucket {
                    milli: burst_milli,
                    last: now,
                },
                last_sweep: now,
            }),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub fn allow(&self, key: Key) -> bool {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: Key, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let (per_sec, burst) = (self.per_sec, self.burst_milli);
        if now.saturating_duration_since(table.last_sweep) >= self.sweep_every {
            table
                .buckets
                .retain(|_, b| refilled(*b, now, per_sec, burst) < burst);
            table.last_sweep = now;
        }
        let fresh = Bucket {
            milli: burst,
            last: now,
        };
        let room = table.buckets.len() < self.max_keys;
        let bucket = match table.buckets.get_mut(&key) {
            Some(b) => b,
            None if room => table.buckets.entry(key).or_insert(fresh),
            None => &mut table.overflow,
        };
        let milli = refilled(*bucket, now, per_sec, burst);
        let allowed = milli >= 1000;
        *bucket = Bucket {
            milli: if allowed { milli - 1000 } else { milli },
            last: now,
        };
        allowed
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

fn refilled(b: Bucket, now: Instant, per_sec: u64, burst_milli: u64) -> u64 {
    let ms = u64::try_from(now.saturating_duration_since(b.last).as_millis()).unwrap_or(u64::MAX);
    b.milli
        .saturating_add(ms.saturating_mul(per_sec))
        .min(burst_milli)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Key {
        Key::addr(s.parse().unwrap())
    }

    #[test]
    fn bursts_then_refills() {
        let t0 = Instant::now();
        let l = RateLimiter::with_capacity(2, 3, MAX_KEYS, t0);
        let a = ip("192.0.2.1");
        assert!((0..3).all(|_| l.allow_at(a, t0)));
        assert!(!l.allow_at(a, t0));
        assert!(l.allow_at(ip("192.0.2.2"), t0), "keys are apart");
        assert!(l.allow_at(a, t0 + Duration::from_millis(500)));
        assert!(!l.allow_at(a, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn entries_expire_once_refilled() {
        let t0 = Instant::now();
        // Refills in 1.5 s; swept every 1.5 s.
        let l = RateLimiter::with_capacity(2, 3, MAX_KEYS, t0);
        for i in 0..100u8 {
            assert!(l.allow_at(ip(&format!("10.0.0.{i}")), t0));
        }
        assert_eq!(l.len(), 100);
        // Not yet refilled: kept, and still limited.
        let t1 = t0 + Duration::from_millis(1499);
        assert!(l.allow_at(ip("10.0.0.1"), t1));
        assert_eq!(l.len(), 100);
        // Refilled by the next sweep: forgotten, all but the one used now.
        let t2 = t0 + Duration::from_secs(4);
        assert!(l.allow_at(ip("10.0.0.200"), t2));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_flood_of_keys_stays_bounded_and_shares_one_bucket() {
        let t0 = Instant::now();
        let l = RateLimiter::with_capacity(1, 2, 1000, t0);
        let old = ip("198.51.100.7");
        assert!(l.allow_at(old, t0));
        let mut allowed = 0;
        for i in 0..100_000u32 {
            let key = Key::Hash(sha2_like(i));
            allowed += usize::from(l.allow_at(key, t0));
        }
        assert_eq!(l.len(), 1000, "the table stops growing at its cap");
        // 999 newcomers had a bucket of their own (burst 2 each, one used);
        // the rest shared one bucket of 2.
        assert_eq!(allowed, 999 + 2);
        // A key already known keeps its own bucket.
        assert!(l.allow_at(old, t0));
        assert!(!l.allow_at(old, t0));
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
