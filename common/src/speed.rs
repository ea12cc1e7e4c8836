//! The node speed test: a deterministic single-core workload from a random seed.
//! The broker sends the seed, the node runs [`run`] and returns the digest and
//! its time; the broker runs the same function to know the right digest and
//! [`judge`]s the answer.
//!
//! The test also bounds the cores the broker believes a node has: the node
//! runs one lane per core it reports ([`lanes`]), all at once, each on a seed
//! of its own ([`lane_seed`]), and must answer every digest within the same
//! limit. The broker computes one lane, picked at random before the answer
//! comes, so a node that skips lanes is caught, and one that runs more lanes
//! than it has cores is too slow. The cores that passed bound what its
//! receipts can prove (`crate::plausible`).
//!
//! The work is a xoshiro256** generator driving a chain of dependent reads and
//! writes in a 4 MiB table (each index depends on the previous result, so the
//! core cannot overlap them), then SHA-256 over the table. It exercises integer
//! arithmetic and cache latency, which is what a shell session's user mostly
//! waits on, and cannot be split across cores.

use std::time::Duration;

use sha2::{Digest, Sha256};

/// Table words (u64): 4 MiB, larger than the L2 of the reference core, smaller
/// than its 6 MiB L3.
const TABLE_WORDS: usize = 1 << 19;

/// Rounds that take about one second on the reference core (AMD Phenom II X6
/// 1090T, 3.2 GHz). See [`REFERENCE_TIME`] for how this was chosen.
pub const ROUNDS: u32 = 40_000_000;

/// How long [`ROUNDS`] take on the reference core. Each round is bound by one
/// L3 hit (the index depends on the previous round): measured at about 22 ns a
/// round (0.9 s for [`ROUNDS`]) on a virtualised 2020s Xeon core, release build.
/// The Phenom II's L3 latency at 3.2 GHz is in the same range, so the reference
/// is estimated at about 1 s. This is an estimate, not a measurement on a real
/// Phenom II: adjust `ROUNDS` when one is at hand.
pub const REFERENCE_TIME: Duration = Duration::from_secs(1);

/// Runs the workload for `seed`; the same seed and rounds give the same digest
/// on every machine.
pub fn run(seed: &[u8; 32], rounds: u32) -> [u8; 32] {
    let mut rng = Xoshiro::new(seed);
    let mut table = vec![0u64; TABLE_WORDS];
    for w in &mut table {
        *w = rng.next();
    }
    let mut acc = 0u64;
    for _ in 0..rounds {
        let r = rng.next();
        let i = ((r ^ acc) as usize) & (TABLE_WORDS - 1);
        if let Some(w) = table.get_mut(i) {
            *w = w.rotate_left(13) ^ r;
            acc = acc.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ *w;
        }
    }
    let mut h = Sha256::new();
    h.update(acc.to_le_bytes());
    for w in &table {
        h.update(w.to_le_bytes());
    }
    h.finalize().into()
}

/// Most lanes a speed test runs: a bound on the node's memory for the test
/// (4 MiB each) and on the cores one node is believed to have.
pub const MAX_LANES: u32 = 64;

/// How many lanes a node that reports `cores` is tested with.
pub fn lanes(cores: u32) -> u32 {
    cores.clamp(1, MAX_LANES)
}

/// The seed of lane `lane` of a test seeded with `seed`; lane 0 is the seed
/// itself, so a one-lane test is the single-core test.
pub fn lane_seed(seed: &[u8; 32], lane: u32) -> [u8; 32] {
    if lane == 0 {
        return *seed;
    }
    let mut h = Sha256::new();
    h.update(b"jusy speed lane\0");
    h.update(seed);
    h.update(lane.to_be_bytes());
    h.finalize().into()
}

/// Why a node's answer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpeedError {
    #[error("wrong digest: the node computed something else")]
    Digest,
    #[error("too slow: {took:?} for the test, at most {limit:?} allowed")]
    Slow { took: Duration, limit: Duration },
    #[error("{got} lanes answered, {asked} asked")]
    Lanes { asked: u32, got: usize },
}

/// Checks a node's answer: the digest must be `expected` and the time the
/// broker measured (which the node cannot shorten by lying) within `limit`.
pub fn judge(
    expected: &[u8; 32],
    got: &[u8; 32],
    took: Duration,
    limit: Duration,
) -> Result<(), SpeedError> {
    if expected != got {
        return Err(SpeedError::Digest);
    }
    if took > limit {
        return Err(SpeedError::Slow { took, limit });
    }
    Ok(())
}

/// Checks a node's answer to a test of `asked` lanes: as many digests,
/// lane `spot`'s equal to `expected` (the broker's own run of it), all
/// within `limit`.
pub fn judge_lanes(
    expected: &[u8; 32],
    spot: u32,
    asked: u32,
    got: &[[u8; 32]],
    took: Duration,
    limit: Duration,
) -> Result<(), SpeedError> {
    if got.len() != asked as usize {
        return Err(SpeedError::Lanes {
            asked,
            got: got.len(),
        });
    }
    let answer = got.get(spot as usize).ok_or(SpeedError::Digest)?;
    judge(expected, answer, took, limit)
}

/// xoshiro256** (Blackman and Vigna), seeded from 32 bytes little-endian.
struct Xoshiro([u64; 4]);

impl Xoshiro {
    fn new(seed: &[u8; 32]) -> Self {
        let mut s = [0u64; 4];
        for (word, chunk) in s.iter_mut().zip(seed.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *word = u64::from_le_bytes(b);
        }
        // The all-zero state would stay zero forever.
        if s == [0; 4] {
            s = [1, 2, 3, 4];
        }
        Self(s)
    }

    fn next(&mut self) -> u64 {
        let [s0, s1, s2, s3] = &mut self.0;
        let out = s1.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = *s1 << 17;
        *s2 ^= *s0;
        *s3 ^= *s1;
        *s1 ^= *s2;
        *s0 ^= *s3;
        *s2 ^= t;
        *s3 = s3.rotate_left(45);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_matches_the_reference_output() {
        // First outputs of the reference C implementation for state {1, 2, 3, 4}.
        let mut rng = Xoshiro::new(&[0; 32]);
        assert_eq!(rng.next(), 11520);
        assert_eq!(rng.next(), 0);
        assert_eq!(rng.next(), 1_509_978_240);
        assert_eq!(rng.next(), 1_215_971_899_390_074_240);
    }

    #[test]
    fn digest_is_deterministic_and_depends_on_seed_and_rounds() {
        let a = run(&[7; 32], 1000);
        assert_eq!(a, run(&[7; 32], 1000));
        assert_ne!(a, run(&[8; 32], 1000));
        assert_ne!(a, run(&[7; 32], 1001));
        // A snapshot, so a change of the workload is a deliberate one.
        assert_eq!(
            hex::encode(run(&[0; 32], 10)),
            "f836c0222377effc1fcec89500ed28c598b85d7d0886bb260c761155fa95f4e5"
        );
    }

    #[test]
    fn lanes_have_their_own_seeds_and_one_is_checked() {
        let seed = [7; 32];
        assert_eq!(lane_seed(&seed, 0), seed);
        assert_ne!(lane_seed(&seed, 1), seed);
        assert_ne!(lane_seed(&seed, 1), lane_seed(&seed, 2));
        assert_eq!(lanes(0), 1);
        assert_eq!(lanes(8), 8);
        assert_eq!(lanes(1000), MAX_LANES);
        let digests: Vec<[u8; 32]> = (0..4).map(|l| run(&lane_seed(&seed, l), 100)).collect();
        let t = Duration::from_secs(1);
        let limit = Duration::from_secs(2);
        for spot in 0..4 {
            let expected = run(&lane_seed(&seed, spot), 100);
            assert_eq!(judge_lanes(&expected, spot, 4, &digests, t, limit), Ok(()));
        }
        // A lane skipped (answered with another's digest) is caught when it is the one checked.
        let mut lazy = digests.clone();
        lazy[3] = lazy[0];
        let expected = run(&lane_seed(&seed, 3), 100);
        assert_eq!(
            judge_lanes(&expected, 3, 4, &lazy, t, limit),
            Err(SpeedError::Digest)
        );
        assert!(matches!(
            judge_lanes(&expected, 3, 4, &digests[..3], t, limit),
            Err(SpeedError::Lanes { .. })
        ));
    }

    #[test]
    fn judge_wants_the_right_digest_in_time() {
        let limit = Duration::from_secs(2);
        let d = [1; 32];
        assert_eq!(judge(&d, &d, Duration::from_secs(1), limit), Ok(()));
        assert_eq!(
            judge(&d, &[2; 32], Duration::from_secs(1), limit),
            Err(SpeedError::Digest)
        );
        assert!(matches!(
            judge(&d, &d, Duration::from_secs(3), limit),
            Err(SpeedError::Slow { .. })
        ));
    }
}
