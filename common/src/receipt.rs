//! Usage receipts: what a node signs to prove the CPU time a session used.
//!
//! A receipt has one canonical encoding ([`RECEIPT_LEN`] bytes, big-endian, fixed
//! layout) that is signed, sent, stored and hashed as is, so the node, the
//! ledger and a client all check the same bytes. Receipts of one order form a
//! hash chain: each names the SHA-256 of the previous receipt's full encoding
//! (signature included), starting from all zeros, with sequence numbers
//! 0, 1, 2, … and counters that never go down. The last one carries the finish
//! code. [`ChainVerifier`] checks all of it without I/O.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use sha2::{Digest, Sha256};

use crate::identity::PeerId;
use crate::wire::{EndReason, OrderId};

/// Magic and version at the start of every receipt; they also separate the
/// signature's domain from anything else the node key signs.
pub const RECEIPT_MAGIC: [u8; 5] = *b"JSYR\x02";

/// Length of the signed part of a receipt.
pub const BODY_LEN: usize = 5 + 12 + 32 + 4 + 32 + 8 + 8 + 4 + 8 + 8 + 1;

/// Length of a whole encoded receipt: body then the ed25519 signature.
pub const RECEIPT_LEN: usize = BODY_LEN + 64;

/// What a node states about one session at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub order_id: OrderId,
    pub node_id: PeerId,
    /// 0 for the first receipt of an order, then +1 each.
    pub seq: u32,
    /// SHA-256 of the previous receipt's encoding; zeros for `seq` 0.
    pub prev: [u8; 32],
    /// CPU time used by all the session's processes so far, in microseconds.
    pub cpu_us: u64,
    /// Highest memory use of the session so far, in bytes: the evidence of
    /// a `RAM` end.
    pub peak_mem: u64,
    /// Most processes (and threads) the session had at once, its init
    /// included: the evidence of a `PROC` end.
    pub peak_procs: u32,
    /// Most bytes used on the session's disk: the evidence of a `DISK` end.
    pub peak_disk: u64,
    /// Wall time since the session started, in milliseconds.
    pub wall_ms: u64,
    /// Set on the last receipt of the session.
    pub finish: Option<EndReason>,
}

/// A receipt with the node's signature, in its canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignedReceipt {
    bytes: [u8; RECEIPT_LEN],
    receipt: Receipt,
}

impl std::fmt::Debug for SignedReceipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedReceipt")
            .field("receipt", &self.receipt)
            .finish_non_exhaustive()
    }
}

/// Why a receipt is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("a receipt is {RECEIPT_LEN} bytes, got {0}")]
    Length(usize),
    #[error("not a receipt (bad magic or version)")]
    Magic,
    #[error("unknown finish code {0}")]
    FinishCode(u8),
    #[error("node key is not a valid ed25519 key")]
    NodeKey,
    #[error("signature does not verify")]
    Signature,
    #[error("receipt is for order {got}, expected {expected}")]
    Order { expected: OrderId, got: OrderId },
    #[error("receipt is signed by node {got:?}, expected {expected:?}")]
    Node { expected: PeerId, got: PeerId },
    #[error("receipt {got} out of order; next is {expected}")]
    Sequence { expected: u32, got: u32 },
    #[error("receipt {seq} does not chain to the previous receipt")]
    Chain { seq: u32 },
    #[error("receipt {seq} differs from the receipt already accepted with that number")]
    Conflict { seq: u32 },
    #[error("receipt {seq} counts less than the previous one")]
    Backwards { seq: u32 },
    #[error("receipt {seq} comes after the final receipt")]
    AfterFinal { seq: u32 },
}

impl Receipt {
    /// The canonical bytes that are signed.
    pub fn body(&self) -> [u8; BODY_LEN] {
        let mut out = [0u8; BODY_LEN];
        let parts: [&[u8]; 11] = [
            &RECEIPT_MAGIC,
            &self.order_id.0,
            &self.node_id.0,
            &self.seq.to_be_bytes(),
            &self.prev,
            &self.cpu_us.to_be_bytes(),
            &self.peak_mem.to_be_bytes(),
            &self.peak_procs.to_be_bytes(),
            &self.peak_disk.to_be_bytes(),
            &self.wall_ms.to_be_bytes(),
            &[self.finish.map_or(0, EndReason::number)],
        ];
        let mut at = 0;
        for part in parts {
            if let Some(slot) = out.get_mut(at..at + part.len()) {
                slot.copy_from_slice(part);
            }
            at += part.len();
        }
        out
    }

    /// Signs the receipt with the node's key (whose id must be `node_id`).
    pub fn sign(self, key: &SigningKey) -> SignedReceipt {
        let body = self.body();
        let sig = key.sign(&body).to_bytes();
        let mut bytes = [0u8; RECEIPT_LEN];
        let (b, s) = bytes.split_at_mut(BODY_LEN);
        b.copy_from_slice(&body);
        s.copy_from_slice(&sig);
        SignedReceipt {
            bytes,
            receipt: self,
        }
    }
}

/// Reads fixed-size fields from the front of a byte slice.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some((head, rest)) = self.0.split_at_checked(N) {
            out.copy_from_slice(head);
            self.0 = rest;
        }
        out
    }
}

impl SignedReceipt {
    /// Parses a receipt and checks its signature against the node id it names.
    /// Chain rules are [`ChainVerifier`]'s job.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReceiptError> {
        let bytes: [u8; RECEIPT_LEN] = bytes
            .try_into()
            .map_err(|_| ReceiptError::Length(bytes.len()))?;
        let mut f = Fields(&bytes);
        if f.take::<5>() != RECEIPT_MAGIC {
            return Err(ReceiptError::Magic);
        }
        let order_id = OrderId(f.take());
        let node_id = PeerId(f.take());
        let seq = u32::from_be_bytes(f.take());
        let prev = f.take();
        let cpu_us = u64::from_be_bytes(f.take());
        let peak_mem = u64::from_be_bytes(f.take());
        let peak_procs = u32::from_be_bytes(f.take());
        let peak_disk = u64::from_be_bytes(f.take());
        let wall_ms = u64::from_be_bytes(f.take());
        let [code] = f.take::<1>();
        let finish = match code {
            0 => None,
            n => Some(EndReason::from_number(n).ok_or(ReceiptError::FinishCode(n))?),
        };
        let sig = Signature::from_bytes(&f.take());
        let receipt = Receipt {
            order_id,
            node_id,
            seq,
            prev,
            cpu_us,
            peak_mem,
            peak_procs,
            peak_disk,
            wall_ms,
            finish,
        };
        let key = node_id.verifying_key().map_err(|_| ReceiptError::NodeKey)?;
        key.verify(&receipt.body(), &sig)
            .map_err(|_| ReceiptError::Signature)?;
        Ok(Self { bytes, receipt })
    }

    pub fn receipt(&self) -> &Receipt {
        &self.receipt
    }

    pub fn bytes(&self) -> &[u8; RECEIPT_LEN] {
        &self.bytes
    }

    /// SHA-256 of the whole encoding: what the next receipt's `prev` names.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.bytes).into()
    }
}

/// The counters a receipt states, all highest-so-far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub cpu_us: u64,
    pub peak_mem: u64,
    pub peak_procs: u32,
    pub peak_disk: u64,
}

/// Builds an order's receipt chain on the node.
#[derive(Debug)]
pub struct ChainBuilder {
    order_id: OrderId,
    node_id: PeerId,
    next_seq: u32,
    prev: [u8; 32],
    finished: bool,
}

impl ChainBuilder {
    pub fn new(order_id: OrderId, key: &SigningKey) -> Self {
        Self {
            order_id,
            node_id: PeerId::from_signing_key(key),
            next_seq: 0,
            prev: [0; 32],
            finished: false,
        }
    }

    /// Signs the next receipt of the chain with `usage`'s counters; `None`
    /// once the final one was made.
    pub fn next(
        &mut self,
        key: &SigningKey,
        usage: Counted,
        wall_ms: u64,
        finish: Option<EndReason>,
    ) -> Option<SignedReceipt> {
        if self.finished {
            return None;
        }
        let signed = Receipt {
            order_id: self.order_id,
            node_id: self.node_id,
            seq: self.next_seq,
            prev: self.prev,
            cpu_us: usage.cpu_us,
            peak_mem: usage.peak_mem,
            peak_procs: usage.peak_procs,
            peak_disk: usage.peak_disk,
            wall_ms,
            finish,
        }
        .sign(key);
        self.next_seq += 1;
        self.prev = signed.hash();
        self.finished = finish.is_some();
        Some(signed)
    }
}

/// What [`ChainVerifier::accept`] made of a valid receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The next receipt of the chain.
    New,
    /// Exactly a receipt already accepted (a resend): nothing changes.
    Duplicate,
}

/// Checks an order's receipts as they arrive: signature, order, node, sequence,
/// chain and monotonic counters. Duplicates are accepted idempotently.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    order_id: OrderId,
    node_id: PeerId,
    /// Hashes of accepted receipts, by sequence number.
    hashes: Vec<[u8; 32]>,
    last: Option<Receipt>,
}

impl ChainVerifier {
    pub fn new(order_id: OrderId, node_id: PeerId) -> Self {
        Self {
            order_id,
            node_id,
            hashes: Vec::new(),
            last: None,
        }
    }

    /// The newest accepted receipt.
    pub fn last(&self) -> Option<&Receipt> {
        self.last.as_ref()
    }

    /// Checks a decoded (signature-checked) receipt as the next of the chain.
    pub fn accept(&mut self, signed: &SignedReceipt) -> Result<Accepted, ReceiptError> {
        let r = *signed.receipt();
        if r.order_id != self.order_id {
            return Err(ReceiptError::Order {
                expected: self.order_id,
                got: r.order_id,
            });
        }
        if r.node_id != self.node_id {
            return Err(ReceiptError::Node {
                expected: self.node_id,
                got: r.node_id,
            });
        }
        let next = u32::try_from(self.hashes.len()).unwrap_or(u32::MAX);
        if r.seq < next {
            let seen = self.hashes.get(r.seq as usize);
            return if seen == Some(&signed.hash()) {
                Ok(Accepted::Duplicate)
            } else {
                Err(ReceiptError::Conflict { seq: r.seq })
            };
        }
        if let Some(last) = &self.last
            && last.finish.is_some()
        {
            return Err(ReceiptError::AfterFinal { seq: r.seq });
        }
        if r.seq != next {
            return Err(ReceiptError::Sequence {
                expected: next,
                got: r.seq,
            });
        }
        if r.prev != self.hashes.last().copied().unwrap_or([0; 32]) {
            return Err(ReceiptError::Chain { seq: r.seq });
        }
        if let Some(last) = &self.last
            && (r.cpu_us < last.cpu_us
                || r.peak_mem < last.peak_mem
                || r.peak_procs < last.peak_procs
                || r.peak_disk < last.peak_disk
                || r.wall_ms < last.wall_ms)
        {
            return Err(ReceiptError::Backwards { seq: r.seq });
        }
        self.hashes.push(signed.hash());
        self.last = Some(r);
        Ok(Accepted::New)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42u8; 32])
    }

    fn chain(n: usize, finish: bool) -> Vec<SignedReceipt> {
        let k = key();
        let mut b = ChainBuilder::new(OrderId([7; 12]), &k);
        (0..n)
            .filter_map(|i| {
                let i = i as u64;
                let last = finish && i + 1 == n as u64;
                b.next(
                    &k,
                    Counted {
                        cpu_us: i * 1_000_000,
                        peak_mem: 4096 * i,
                        peak_procs: i as u32,
                        peak_disk: 8192 * i,
                    },
                    i * 10_000,
                    last.then_some(EndReason::ClientClosed),
                )
            })
            .collect()
    }

    #[test]
    fn exact_bytes_of_a_receipt() {
        let r = Receipt {
            order_id: OrderId([1; 12]),
            node_id: PeerId::from_signing_key(&key()),
            seq: 2,
            prev: [3; 32],
            cpu_us: 5_000_000,
            peak_mem: 1 << 20,
            peak_procs: 50,
            peak_disk: 1 << 30,
            wall_ms: 20_000,
            finish: Some(EndReason::CpuDone),
        };
        let s = r.sign(&key());
        let hex = hex::encode(s.bytes());
        // Test vector: any change to the layout or signing breaks it on purpose.
        assert_eq!(
            hex.get(..BODY_LEN * 2),
            Some(
                "4a53595202\
                 010101010101010101010101\
                 197f6b23e16c8532c6abc838facd5ea789be0c76b2920334039bfa8b3d368d61\
                 00000002\
                 0303030303030303030303030303030303030303030303030303030303030303\
                 00000000004c4b40\
                 0000000000100000\
                 00000032\
                 0000000040000000\
                 0000000000004e20\
                 08"
            )
        );
        // ed25519 signatures are deterministic, so the signature is a vector too.
        assert_eq!(
            hex.get(BODY_LEN * 2..),
            Some(
                "7c393f982f2f4e6a0aa3183e2f6f1968ed311e24dd73590acebf35ed638a600b\
                 fb4e24ffb0f9c7523d7b5c7e4afa02ee26b0e689ad49b6583bdf3949a5735609"
            )
        );
        assert_eq!(s.bytes().len(), RECEIPT_LEN);
        assert_eq!(SignedReceipt::decode(s.bytes()), Ok(s));
    }

    #[test]
    fn a_chain_verifies_and_duplicates_are_idempotent() {
        let c = chain(5, true);
        let mut v = ChainVerifier::new(OrderId([7; 12]), PeerId::from_signing_key(&key()));
        for r in &c {
            assert_eq!(v.accept(r), Ok(Accepted::New));
        }
        assert_eq!(v.accept(&c[2]), Ok(Accepted::Duplicate));
        assert_eq!(v.last().map(|r| r.cpu_us), Some(4_000_000));
    }

    #[test]
    fn flipped_bits_are_rejected() {
        let c = chain(1, false);
        let mut v = ChainVerifier::new(OrderId([7; 12]), PeerId::from_signing_key(&key()));
        for bit in 0..RECEIPT_LEN * 8 {
            let mut bytes = *c[0].bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let accepted = SignedReceipt::decode(&bytes).and_then(|r| v.accept(&r));
            assert!(accepted.is_err(), "bit {bit} flipped was accepted");
        }
    }

    #[test]
    fn reordered_replayed_and_foreign_receipts_are_rejected() {
        let c = chain(4, true);
        let node = PeerId::from_signing_key(&key());
        let mut v = ChainVerifier::new(OrderId([7; 12]), node);
        assert!(matches!(
            v.accept(&c[1]),
            Err(ReceiptError::Sequence {
                expected: 0,
                got: 1
            })
        ));
        v.accept(&c[0]).unwrap();
        assert!(matches!(
            v.accept(&c[2]),
            Err(ReceiptError::Sequence { .. })
        ));

        // Another order's receipt (a replay across orders).
        let mut other = ChainVerifier::new(OrderId([8; 12]), node);
        assert!(matches!(
            other.accept(&c[0]),
            Err(ReceiptError::Order { .. })
        ));
        // Another node's key.
        let mut stranger = ChainVerifier::new(
            OrderId([7; 12]),
            PeerId::from_signing_key(&SigningKey::from_bytes(&[1; 32])),
        );
        assert!(matches!(
            stranger.accept(&c[0]),
            Err(ReceiptError::Node { .. })
        ));

        // A second, different receipt 1 (a fork) does not chain or conflicts.
        let k = key();
        let forged = Receipt {
            seq: 1,
            prev: [0; 32],
            ..*c[1].receipt()
        }
        .sign(&k);
        assert!(matches!(
            v.accept(&forged),
            Err(ReceiptError::Chain { seq: 1 })
        ));
        v.accept(&c[1]).unwrap();
        let fork = Receipt {
            cpu_us: 99,
            ..*c[1].receipt()
        }
        .sign(&k);
        assert!(matches!(
            v.accept(&fork),
            Err(ReceiptError::Conflict { seq: 1 })
        ));

        // Counters may not go down.
        let back = Receipt {
            seq: 2,
            prev: c[1].hash(),
            cpu_us: 0,
            ..*c[2].receipt()
        }
        .sign(&k);
        assert!(matches!(
            v.accept(&back),
            Err(ReceiptError::Backwards { seq: 2 })
        ));
        v.accept(&c[2]).unwrap();
        v.accept(&c[3]).unwrap();
        let after = Receipt {
            seq: 4,
            prev: c[3].hash(),
            finish: None,
            ..*c[3].receipt()
        }
        .sign(&k);
        assert!(matches!(
            v.accept(&after),
            Err(ReceiptError::AfterFinal { seq: 4 })
        ));
    }

    #[test]
    fn builder_stops_after_the_final_receipt() {
        let k = key();
        let mut b = ChainBuilder::new(OrderId([7; 12]), &k);
        let c = Counted {
            cpu_us: 1,
            ..Counted::default()
        };
        assert!(b.next(&k, c, 1, Some(EndReason::WallClock)).is_some());
        assert!(b.next(&k, c, 2, None).is_none());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = SignedReceipt::decode(&bytes);
        }

        #[test]
        fn signed_receipts_round_trip(cpu in any::<u64>(), mem in any::<u64>(), procs in any::<u32>(), disk in any::<u64>(), wall in any::<u64>(), seq in any::<u32>(), code in 0u8..12) {
            let r = Receipt {
                order_id: OrderId([9; 12]),
                node_id: PeerId::from_signing_key(&key()),
                seq,
                prev: [seq as u8; 32],
                cpu_us: cpu,
                peak_mem: mem,
                peak_procs: procs,
                peak_disk: disk,
                wall_ms: wall,
                finish: EndReason::from_number(code),
            };
            let s = r.sign(&key());
            prop_assert_eq!(SignedReceipt::decode(s.bytes()), Ok(s));
        }
    }
}
