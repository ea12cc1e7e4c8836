//! An order's terms — what the broker sells and the node must enforce — and
//! the node's signed acceptance of them.
//!
//! The broker decides the terms of every order (its configuration); the
//! assignment carries them to the node, whose own settings are only the most
//! it is willing to offer. A node that takes the order signs the terms it
//! will enforce ([`SignedAcceptance`]), and the broker checks that they are
//! the order's before the client gets its credentials: a node cannot change
//! what was sold.

use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use serde::{Deserialize, Serialize};

use crate::identity::PeerId;
use crate::wire::OrderId;

/// What one order buys and how it is bounded. Every field is enforced by the
/// node and checked again by the broker where it can (its own clocks, the
/// evidence in receipts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrderTerms {
    /// CPU seconds across all the session's processes, then `DONE`.
    pub cpu_budget_secs: u32,
    /// Wall-clock seconds from the first login, then `WALL`.
    pub wall_secs: u32,
    /// Memory without swap, in MiB; an OOM kill ends the session with `RAM`.
    pub memory_mib: u32,
    /// Processes at once; a refused fork ends the session with `PROC`.
    pub max_processes: u32,
    /// Disk for the session's home, in MiB; full ends it with `DISK`. 0: the
    /// node keeps homes on its own disk, without a limit of their own.
    pub disk_mib: u32,
    /// Seconds the client has for its first login.
    pub connect_window_secs: u32,
    /// Seconds the session outlives its last logged-in connection.
    pub grace_secs: u32,
}

impl Default for OrderTerms {
    /// The service's published limits: one CPU-hour, 3 h wall clock, 2 GiB,
    /// 50 processes, 5 GiB of disk, 2 minutes to log in, 5 s of grace.
    fn default() -> Self {
        Self {
            cpu_budget_secs: 3600,
            wall_secs: 3 * 3600,
            memory_mib: 2048,
            max_processes: 50,
            disk_mib: 5120,
            connect_window_secs: 120,
            grace_secs: 5,
        }
    }
}

/// Length of [`OrderTerms::encode`].
pub const TERMS_LEN: usize = 7 * 4;

/// A term a node cannot meet, with what it asked and what the node offers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot meet the order's {term}: asked {asked}, this node offers at most {offered}")]
pub struct Unmet {
    pub term: &'static str,
    pub asked: u32,
    pub offered: u32,
}

impl OrderTerms {
    /// The canonical bytes (big-endian, in field order) that a node signs.
    pub fn encode(&self) -> [u8; TERMS_LEN] {
        let mut out = [0u8; TERMS_LEN];
        for (slot, v) in out.chunks_exact_mut(4).zip(self.fields()) {
            slot.copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8; TERMS_LEN]) -> Self {
        let mut v = [0u32; 7];
        for (word, chunk) in v.iter_mut().zip(bytes.chunks_exact(4)) {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            *word = u32::from_be_bytes(b);
        }
        let [
            cpu_budget_secs,
            wall_secs,
            memory_mib,
            max_processes,
            disk_mib,
            connect_window_secs,
            grace_secs,
        ] = v;
        Self {
            cpu_budget_secs,
            wall_secs,
            memory_mib,
            max_processes,
            disk_mib,
            connect_window_secs,
            grace_secs,
        }
    }

    fn fields(&self) -> [u32; 7] {
        [
            self.cpu_budget_secs,
            self.wall_secs,
            self.memory_mib,
            self.max_processes,
            self.disk_mib,
            self.connect_window_secs,
            self.grace_secs,
        ]
    }

    /// Whether a node offering at most `offer` can enforce exactly these
    /// terms; the first term it cannot meet otherwise. A node whose homes
    /// have no disk of their own cannot enforce a disk limit, and one whose
    /// homes do cannot sell a session without one.
    pub fn within(&self, offer: &OrderTerms) -> Result<(), Unmet> {
        let names = [
            "CPU budget (s)",
            "wall limit (s)",
            "memory (MiB)",
            "processes",
            "disk (MiB)",
            "connect window (s)",
            "grace (s)",
        ];
        for ((term, asked), offered) in names.into_iter().zip(self.fields()).zip(offer.fields()) {
            let disk_kind_differs = term == "disk (MiB)" && (asked == 0) != (offered == 0);
            if asked > offered || disk_kind_differs {
                return Err(Unmet {
                    term,
                    asked,
                    offered,
                });
            }
        }
        Ok(())
    }

    pub fn cpu_budget(&self) -> Duration {
        Duration::from_secs(self.cpu_budget_secs.into())
    }

    pub fn wall(&self) -> Duration {
        Duration::from_secs(self.wall_secs.into())
    }

    pub fn connect_window(&self) -> Duration {
        Duration::from_secs(self.connect_window_secs.into())
    }

    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_secs.into())
    }

    pub fn cpu_budget_us(&self) -> u64 {
        u64::from(self.cpu_budget_secs) * 1_000_000
    }

    pub fn wall_ms(&self) -> u64 {
        u64::from(self.wall_secs) * 1000
    }

    pub fn grace_ms(&self) -> u64 {
        u64::from(self.grace_secs) * 1000
    }

    pub fn connect_window_ms(&self) -> u64 {
        u64::from(self.connect_window_secs) * 1000
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// The disk limit in bytes; `None` without a disk of its own.
    pub fn disk_bytes(&self) -> Option<u64> {
        (self.disk_mib > 0).then(|| u64::from(self.disk_mib) << 20)
    }
}

/// Magic and version of an acceptance; also separates its signature's
/// domain from receipts and capacity statements.
pub const ACCEPTANCE_MAGIC: [u8; 5] = *b"JSYA\x01";

/// Length of the signed part of an acceptance.
const ACCEPTANCE_BODY_LEN: usize = 5 + 12 + 32 + TERMS_LEN;

/// Length of an encoded acceptance: body then the ed25519 signature.
pub const ACCEPTANCE_LEN: usize = ACCEPTANCE_BODY_LEN + 64;

/// A node's signed statement that it took `order_id` on `terms`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignedAcceptance {
    bytes: [u8; ACCEPTANCE_LEN],
    pub order_id: OrderId,
    pub node_id: PeerId,
    pub terms: OrderTerms,
}

impl std::fmt::Debug for SignedAcceptance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedAcceptance")
            .field("order_id", &self.order_id)
            .field("node_id", &self.node_id)
            .field("terms", &self.terms)
            .finish_non_exhaustive()
    }
}

/// Why an acceptance is not the one the order needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptanceError {
    #[error("an acceptance is {ACCEPTANCE_LEN} bytes, got {0}")]
    Length(usize),
    #[error("not an acceptance (bad magic or version)")]
    Magic,
    #[error("node key is not a valid ed25519 key")]
    NodeKey,
    #[error("signature does not verify")]
    Signature,
    #[error("acceptance is for another order")]
    Order,
    #[error("acceptance is signed by another node")]
    Node,
    #[error("the node signed other terms than the order's: {signed:?}")]
    Terms { signed: OrderTerms },
}

fn body(order_id: OrderId, node_id: PeerId, terms: &OrderTerms) -> [u8; ACCEPTANCE_BODY_LEN] {
    let mut out = [0u8; ACCEPTANCE_BODY_LEN];
    let parts: [&[u8]; 4] = [&ACCEPTANCE_MAGIC, &order_id.0, &node_id.0, &terms.encode()];
    let mut at = 0;
    for part in parts {
        if let Some(slot) = out.get_mut(at..at + part.len()) {
            slot.copy_from_slice(part);
        }
        at += part.len();
    }
    out
}

impl SignedAcceptance {
    pub fn sign(key: &SigningKey, order_id: OrderId, terms: OrderTerms) -> Self {
        let node_id = PeerId::from_signing_key(key);
        let body = body(order_id, node_id, &terms);
        let mut bytes = [0u8; ACCEPTANCE_LEN];
        let (b, s) = bytes.split_at_mut(ACCEPTANCE_BODY_LEN);
        b.copy_from_slice(&body);
        s.copy_from_slice(&key.sign(&body).to_bytes());
        Self {
            bytes,
            order_id,
            node_id,
            terms,
        }
    }

    /// Parses an acceptance and checks its signature against the node it names.
    pub fn decode(bytes: &[u8]) -> Result<Self, AcceptanceError> {
        let bytes: [u8; ACCEPTANCE_LEN] = bytes
            .try_into()
            .map_err(|_| AcceptanceError::Length(bytes.len()))?;
        let (b, sig) = bytes.split_at(ACCEPTANCE_BODY_LEN);
        let (magic, rest) = b.split_at(5);
        if magic != ACCEPTANCE_MAGIC {
            return Err(AcceptanceError::Magic);
        }
        let (order, rest) = rest.split_at(12);
        let (node, terms) = rest.split_at(32);
        let order_id = OrderId(order.try_into().map_err(|_| AcceptanceError::Magic)?);
        let node_id = PeerId(node.try_into().map_err(|_| AcceptanceError::Magic)?);
        let terms = OrderTerms::decode(terms.try_into().map_err(|_| AcceptanceError::Magic)?);
        let sig = Signature::from_slice(sig).map_err(|_| AcceptanceError::Signature)?;
        node_id
            .verifying_key()
            .map_err(|_| AcceptanceError::NodeKey)?
            .verify(b, &sig)
            .map_err(|_| AcceptanceError::Signature)?;
        Ok(Self {
            bytes,
            order_id,
            node_id,
            terms,
        })
    }

    /// Decodes and checks that `node` accepted `order_id` on exactly `terms`.
    pub fn check(
        bytes: &[u8],
        order_id: OrderId,
        node: PeerId,
        terms: &OrderTerms,
    ) -> Result<Self, AcceptanceError> {
        let a = Self::decode(bytes)?;
        if a.order_id != order_id {
            return Err(AcceptanceError::Order);
        }
        if a.node_id != node {
            return Err(AcceptanceError::Node);
        }
        if a.terms != *terms {
            return Err(AcceptanceError::Terms { signed: a.terms });
        }
        Ok(a)
    }

    pub fn bytes(&self) -> &[u8; ACCEPTANCE_LEN] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42u8; 32])
    }

    #[test]
    fn exact_bytes_of_the_terms() {
        assert_eq!(
            hex::encode(OrderTerms::default().encode()),
            "00000e10\
             00002a30\
             00000800\
             00000032\
             00001400\
             00000078\
             00000005"
        );
    }

    #[test]
    fn a_node_meets_terms_within_its_offer_only() {
        let offer = OrderTerms::default();
        assert_eq!(offer.within(&offer), Ok(()));
        let small = OrderTerms {
            cpu_budget_secs: 20,
            memory_mib: 512,
            disk_mib: 64,
            ..offer
        };
        assert_eq!(small.within(&offer), Ok(()));
        let greedy = OrderTerms {
            memory_mib: 4096,
            ..offer
        };
        assert_eq!(
            greedy.within(&offer),
            Err(Unmet {
                term: "memory (MiB)",
                asked: 4096,
                offered: 2048
            })
        );
        // No disk of its own cannot be sold as a disk limit, nor the reverse.
        let no_disk = OrderTerms {
            disk_mib: 0,
            ..offer
        };
        assert!(offer.within(&no_disk).is_err());
        assert!(no_disk.within(&offer).is_err());
        assert_eq!(no_disk.within(&no_disk), Ok(()));
    }

    #[test]
    fn an_acceptance_is_checked_against_the_order() {
        let k = key();
        let node = PeerId::from_signing_key(&k);
        let terms = OrderTerms::default();
        let a = SignedAcceptance::sign(&k, OrderId([1; 12]), terms);
        let bytes = a.bytes().to_vec();
        assert_eq!(
            SignedAcceptance::check(&bytes, OrderId([1; 12]), node, &terms),
            Ok(a)
        );
        assert_eq!(
            SignedAcceptance::check(&bytes, OrderId([2; 12]), node, &terms),
            Err(AcceptanceError::Order)
        );
        let other = PeerId::from_signing_key(&SigningKey::from_bytes(&[1; 32]));
        assert_eq!(
            SignedAcceptance::check(&bytes, OrderId([1; 12]), other, &terms),
            Err(AcceptanceError::Node)
        );
        let sold = OrderTerms {
            wall_secs: 60,
            ..terms
        };
        assert!(matches!(
            SignedAcceptance::check(&bytes, OrderId([1; 12]), node, &sold),
            Err(AcceptanceError::Terms { .. })
        ));
        for bit in 0..ACCEPTANCE_LEN * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                SignedAcceptance::check(&b, OrderId([1; 12]), node, &terms).is_err(),
                "bit {bit} flipped was accepted"
            );
        }
    }

    proptest! {
        #[test]
        fn acceptances_round_trip_and_decode_never_panics(
            v in proptest::array::uniform7(any::<u32>()),
            junk in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let [cpu_budget_secs, wall_secs, memory_mib, max_processes, disk_mib, connect_window_secs, grace_secs] = v;
            let terms = OrderTerms { cpu_budget_secs, wall_secs, memory_mib, max_processes, disk_mib, connect_window_secs, grace_secs };
            let a = SignedAcceptance::sign(&key(), OrderId([3; 12]), terms);
            prop_assert_eq!(SignedAcceptance::decode(a.bytes()), Ok(a));
            let _ = SignedAcceptance::decode(&junk);
        }
    }
}
