//! Token-bucket rate limits keyed by caller address or hash, in memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept before full ones are forgotten, bounding memory under a flood
/// of distinct keys.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in thousandths.
    milli: u64,
    last: Instant,
}

/// Allows `per_sec` requests per second per key, with bursts of `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u64,
    burst_milli: u64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: u64::from(per_sec),
            burst_milli: u64::from(burst) * 1000,
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    fn allow_at(&self, key: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let (per_sec, burst) = (self.per_sec, self.burst_milli);
            buckets.retain(|_, b| refilled(*b, now, per_sec, burst) < burst);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            milli: self.burst_milli,
            last: now,
        });
        let milli = refilled(*bucket, now, self.per_sec, self.burst_milli);
        let allowed = milli >= 1000;
        *bucket = Bucket {
            milli: if allowed { milli - 1000 } else { milli },
            last: now,
        };
        allowed
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
    use std::time::Duration;

    #[test]
    fn bursts_then_refills() {
        let l = RateLimiter::new(2, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow_at("a", t0)));
        assert!(!l.allow_at("a", t0));
        assert!(l.allow_at("b", t0), "keys are apart");
        assert!(l.allow_at("a", t0 + Duration::from_millis(500)));
        assert!(!l.allow_at("a", t0 + Duration::from_millis(500)));
    }
}
