//! Capacity statements: what a node offers through its relay, signed by the
//! node's key, as brokers publish them in their DHT.
//!
//! The relay proposes the [`Terms`] it can vouch for (itself, its public
//! address, the owner account it resolved, the speed test it measured, the
//! validity window from its clock); the node adds what only it knows (its id,
//! free slots, cores) and signs the whole [`Capacity`]. Any broker can check
//! the signature and the window without trusting the relay that published it.
//!
//! Encoding: `postcard(Capacity) ‖ ed25519 signature (64 bytes)`; the
//! signature covers [`DOMAIN`] followed by the postcard bytes, so nothing else
//! the node key signs (receipts, TLS) can be passed off as a statement.
//!
//! Records are found without a global scan: a node falls in one of [`SHARDS`]
//! shards by its id; its relay is a DHT provider of that shard's key
//! ([`shard_key`]) and stores the statement under the node's key
//! ([`node_key`]). A broker looking for capacity picks a random shard, a random
//! provider, then a random node of that provider.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use serde::{Deserialize, Serialize};

use crate::identity::PeerId;
use crate::ledger::AccountId;

/// Separates capacity signatures from everything else a node key signs.
pub const DOMAIN: &[u8] = b"jusy capacity v1\0";

/// Number of shard keys nodes are spread over.
pub const SHARDS: u8 = 16;

/// Longest encoded statement accepted; real ones are about 200 bytes.
pub const MAX_LEN: usize = 1024;

/// Longest validity window a statement may claim, so a leaked statement of a
/// vanished node cannot be offered for long.
pub const MAX_VALIDITY_MS: u64 = 120_000;

/// Clock difference between brokers tolerated for `issued_ms`.
pub const CLOCK_SKEW_MS: u64 = 30_000;

/// What the relay vouches for and asks the node to sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    /// The relay broker's identity (its libp2p peer id is derived from it).
    pub relay: PeerId,
    /// Host name or address clients connect to for order ports.
    pub relay_host: String,
    /// The relay's QUIC port for nodes.
    pub relay_port: u16,
    /// The account that earns for the node's sessions, if any.
    pub owner: Option<AccountId>,
    /// How long the node's last speed test took, as the relay measured it.
    pub speed_ms: u32,
    /// When the relay issued these terms (Unix milliseconds).
    pub issued_ms: u64,
    /// When the statement stops being valid (Unix milliseconds).
    pub expires_ms: u64,
}

/// A node's statement of what it offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub node_id: PeerId,
    pub free_slots: u16,
    pub cores: u32,
    pub terms: Terms,
}

/// A capacity statement that is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("statement is {0} bytes, more than {MAX_LEN}")]
    TooLong(usize),
    #[error("statement is too short to carry a signature")]
    TooShort,
    #[error("statement does not decode: {0}")]
    Decode(String),
    #[error("node id is not a valid key")]
    BadKey,
    #[error("signature does not verify")]
    BadSignature,
    #[error("statement expired at {expires_ms} (now {now_ms})")]
    Expired { expires_ms: u64, now_ms: u64 },
    #[error("statement issued in the future ({issued_ms}, now {now_ms})")]
    Future { issued_ms: u64, now_ms: u64 },
    #[error("validity window {0} ms is longer than {MAX_VALIDITY_MS} ms")]
    Window(u64),
    #[error("encoding: {0}")]
    Encode(String),
}

/// A capacity statement with the node's signature, in its encoding.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedCapacity {
    capacity: Capacity,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for SignedCapacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedCapacity")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(DOMAIN.len() + body.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(body);
    msg
}

impl SignedCapacity {
    /// Signs `capacity` with the node's key; `capacity.node_id` is set to that key.
    pub fn sign(key: &SigningKey, mut capacity: Capacity) -> Result<Self, CapacityError> {
        capacity.node_id = PeerId::from_signing_key(key);
        let mut bytes =
            postcard::to_stdvec(&capacity).map_err(|e| CapacityError::Encode(e.to_string()))?;
        let signature = key.sign(&signed_message(&bytes));
        bytes.extend_from_slice(&signature.to_bytes());
        if bytes.len() > MAX_LEN {
            return Err(CapacityError::TooLong(bytes.len()));
        }
        Ok(Self { capacity, bytes })
    }

    /// Decodes a statement and checks its signature (not its time window: see
    /// [`SignedCapacity::check_time`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, CapacityError> {
        if bytes.len() > MAX_LEN {
            return Err(CapacityError::TooLong(bytes.len()));
        }
        let split = bytes.len().checked_sub(64).ok_or(CapacityError::TooShort)?;
        let (body, sig) = bytes.split_at(split);
        let (capacity, rest): (Capacity, _) =
            postcard::take_from_bytes(body).map_err(|e| CapacityError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CapacityError::Decode(format!(
                "{} bytes after the statement",
                rest.len()
            )));
        }
        let sig: [u8; 64] = sig.try_into().map_err(|_| CapacityError::TooShort)?;
        let key = capacity
            .node_id
            .verifying_key()
            .map_err(|_| CapacityError::BadKey)?;
        key.verify(&signed_message(body), &Signature::from_bytes(&sig))
            .map_err(|_| CapacityError::BadSignature)?;
        Ok(Self {
            capacity,
            bytes: bytes.to_vec(),
        })
    }

    /// Checks that the statement is valid at `now_ms`.
    pub fn check_time(&self, now_ms: u64) -> Result<(), CapacityError> {
        let t = &self.capacity.terms;
        if t.issued_ms > now_ms.saturating_add(CLOCK_SKEW_MS) {
            return Err(CapacityError::Future {
                issued_ms: t.issued_ms,
                now_ms,
            });
        }
        let window = t.expires_ms.saturating_sub(t.issued_ms);
        if window > MAX_VALIDITY_MS {
            return Err(CapacityError::Window(window));
        }
        if t.expires_ms <= now_ms {
            return Err(CapacityError::Expired {
                expires_ms: t.expires_ms,
                now_ms,
            });
        }
        Ok(())
    }

    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The shard a node falls in: its id's first byte, modulo [`SHARDS`].
pub fn shard_of(node_id: &PeerId) -> u8 {
    node_id.0.first().copied().unwrap_or(0) % SHARDS
}

/// The DHT key whose providers are the relays with a node in `shard`.
pub fn shard_key(shard: u8) -> Vec<u8> {
    format!("/jusy/capacity/shard/{}", shard % SHARDS).into_bytes()
}

/// The DHT key under which a node's signed statement is stored.
pub fn node_key(node_id: &PeerId) -> Vec<u8> {
    format!("/jusy/capacity/node/{node_id}").into_bytes()
}

/// The node id named by a [`node_key`], if `key` is one.
pub fn node_of_key(key: &[u8]) -> Option<PeerId> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix("/jusy/capacity/node/")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn sample(relay: u8) -> Capacity {
        Capacity {
            node_id: PeerId([0; 32]),
            free_slots: 2,
            cores: 4,
            terms: Terms {
                relay: PeerId::from_signing_key(&key(relay)),
                relay_host: "198.18.0.2".into(),
                relay_port: 7443,
                owner: Some(AccountId([9; 32])),
                speed_ms: 812,
                issued_ms: 1_000_000,
                expires_ms: 1_030_000,
            },
        }
    }

    #[test]
    fn exact_bytes() {
        let signed = SignedCapacity::sign(&key(1), sample(2)).expect("sign");
        let hex = hex::encode(signed.bytes());
        // Node id, 2 slots, 4 cores, relay id, host (length 10), port 7443
        // and 812 ms as varints, Some(owner), issued, expires; then the
        // (deterministic) ed25519 signature.
        let body = concat!(
            "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c",
            "0204",
            "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394",
            "0a3139382e31382e302e32",
            "933a",
            "01",
            "0909090909090909090909090909090909090909090909090909090909090909",
            "ac06",
            "c0843d",
            "f0ee3e",
        );
        let sig = concat!(
            "070702de412db788f0a2988dde99eef6b02b3bc2064f7e7dfef91878dbd734ec",
            "761ecbdc23f7a42143cad271ab8b44168d9bec87b57925c05f242edd4bb99c01",
        );
        assert_eq!(hex, format!("{body}{sig}"));
        assert_eq!(signed.bytes().len(), 184);
        let decoded = SignedCapacity::decode(signed.bytes()).expect("decode");
        assert_eq!(decoded, signed);
    }

    #[test]
    fn tampering_is_detected() {
        let signed = SignedCapacity::sign(&key(1), sample(2)).expect("sign");
        let mut bytes = signed.bytes().to_vec();
        // Free slots (just after the node id) raised by the relay.
        if let Some(b) = bytes.get_mut(32) {
            *b = 50;
        }
        assert_eq!(
            SignedCapacity::decode(&bytes),
            Err(CapacityError::BadSignature)
        );
        assert_eq!(
            SignedCapacity::decode(&[1; 10]),
            Err(CapacityError::TooShort)
        );
        assert!(matches!(
            SignedCapacity::decode(&[0; MAX_LEN + 1]),
            Err(CapacityError::TooLong(_))
        ));
    }

    #[test]
    fn time_window() {
        let signed = SignedCapacity::sign(&key(1), sample(2)).expect("sign");
        assert_eq!(signed.check_time(1_000_000), Ok(()));
        assert!(matches!(
            signed.check_time(1_030_000),
            Err(CapacityError::Expired { .. })
        ));
        assert!(matches!(
            signed.check_time(900_000),
            Err(CapacityError::Future { .. })
        ));
        let mut long = sample(2);
        long.terms.expires_ms = long.terms.issued_ms + MAX_VALIDITY_MS + 1;
        let long = SignedCapacity::sign(&key(1), long).expect("sign");
        assert!(matches!(
            long.check_time(1_000_000),
            Err(CapacityError::Window(_))
        ));
    }

    #[test]
    fn keys_and_shards() {
        let id = PeerId::from_signing_key(&key(3));
        assert!(shard_of(&id) < SHARDS);
        assert_eq!(node_of_key(&node_key(&id)), Some(id));
        assert_eq!(node_of_key(&shard_key(1)), None);
        assert_eq!(shard_key(17), shard_key(1));
    }

    proptest! {
        #[test]
        fn round_trip(seed in any::<u8>(), slots in any::<u16>(), cores in any::<u32>(),
                      host in "[a-z0-9.]{0,40}", port in any::<u16>(), speed in any::<u32>(),
                      issued in any::<u64>(), owner in any::<Option<[u8; 32]>>()) {
            let mut c = sample(seed);
            c.free_slots = slots;
            c.cores = cores;
            c.terms.relay_host = host;
            c.terms.relay_port = port;
            c.terms.speed_ms = speed;
            c.terms.issued_ms = issued;
            c.terms.expires_ms = issued.saturating_add(1);
            c.terms.owner = owner.map(AccountId);
            let signed = SignedCapacity::sign(&key(seed), c).expect("sign");
            prop_assert_eq!(SignedCapacity::decode(signed.bytes()), Ok(signed));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = SignedCapacity::decode(&bytes);
        }
    }
}
