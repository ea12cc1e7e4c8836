//! Messages on the control stream between a node and its relay broker, and the
//! header that opens every tunnelled client stream.
//!
//! The control stream is the first bidirectional QUIC stream the node opens; it
//! carries only these messages, framed by [`crate::frame`]. Client bytes travel on
//! their own streams and are never inspected, so no payload can be mistaken for a
//! control message.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Version of the control protocol; a peer with another version is refused in `Hello`.
pub const PROTOCOL_VERSION: u16 = 2;

/// ALPN of node ↔ relay QUIC connections.
pub const ALPN: &[u8] = b"jusy/1";

/// Identifier of an order: 12 random bytes, shown as 24 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OrderId(pub [u8; 12]);

impl OrderId {
    pub fn from_random(bytes: [u8; 12]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrderId({self})")
    }
}

/// Text that is not an order id.
#[derive(Debug, thiserror::Error)]
#[error("an order id is 24 hex characters")]
pub struct BadOrderId;

impl FromStr for OrderId {
    type Err = BadOrderId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 12];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadOrderId)?;
        Ok(Self(out))
    }
}

/// Why a session ended: machine-readable, stable across versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The client's last logged-in connection closed (after the grace period).
    ClientClosed,
    /// The client never logged in within the connect window.
    NeverConnected,
    /// The 3-hour wall-clock limit was reached.
    WallClock,
    /// The broker cancelled the order.
    Cancelled,
    /// The node is shutting down.
    NodeShutdown,
    /// The node lost its relay (reported by the broker, never by the node).
    NodeLost,
    /// The node could not prepare or run the session.
    NodeFailed,
    /// The CPU budget (one CPU-hour) is used up.
    CpuDone,
    /// The session exceeded its memory limit.
    MemoryLimit,
    /// The session exceeded its process limit.
    ProcessLimit,
    /// The session exceeded its disk limit.
    DiskLimit,
}

impl EndReason {
    /// The code shown to users and stored with the order.
    pub fn code(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "CLIENT_CLOSED",
            EndReason::NeverConnected => "NEVER_CONNECTED",
            EndReason::WallClock => "WALL",
            EndReason::Cancelled => "CANCELLED",
            EndReason::NodeShutdown => "NODE_SHUTDOWN",
            EndReason::NodeLost => "NODE_LOST",
            EndReason::NodeFailed => "NODE_FAILED",
            EndReason::CpuDone => "DONE",
            EndReason::MemoryLimit => "RAM",
            EndReason::ProcessLimit => "PROC",
            EndReason::DiskLimit => "DISK",
        }
    }

    /// Every reason, in the order of their stable numbers (1, 2, …).
    pub const ALL: [EndReason; 11] = [
        EndReason::ClientClosed,
        EndReason::NeverConnected,
        EndReason::WallClock,
        EndReason::Cancelled,
        EndReason::NodeShutdown,
        EndReason::NodeLost,
        EndReason::NodeFailed,
        EndReason::CpuDone,
        EndReason::MemoryLimit,
        EndReason::ProcessLimit,
        EndReason::DiskLimit,
    ];

    /// The stable number of the reason in receipts (never 0, which means "not final").
    pub fn number(self) -> u8 {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .and_then(|i| u8::try_from(i + 1).ok())
            .unwrap_or(u8::MAX)
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.get(usize::from(n).checked_sub(1)?).copied()
    }

    /// Parses a code as [`EndReason::code`] writes it.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.code() == code)
    }
}

/// A session prepared ahead of orders: a user that exists and waits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Unique per node for its lifetime.
    pub slot_id: u64,
    /// Login name of the prepared Linux user.
    pub username: String,
}

/// An order handed to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub order_id: OrderId,
    pub slot_id: u64,
    /// OpenSSH public keys (`ssh-ed25519 AAAA…`) allowed to log in.
    pub authorized_keys: Vec<String>,
    /// What the order bought: the node enforces exactly these, or refuses.
    pub terms: crate::terms::OrderTerms,
}

/// The OpenSSH cipher preference clients of a node with AES instructions are
/// asked to use (`ssh -c …`): AES-GCM costs such a node about half the CPU
/// per byte of ChaCha20-Poly1305, which OpenSSH would otherwise pick first.
/// The node offers every cipher, so a client is never refused for its choice.
pub const SSH_CIPHERS_AES: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com";

/// Node → broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// First message on the control stream.
    Hello {
        protocol: u16,
        /// The node's SSH host public key in OpenSSH form.
        host_key: String,
        cores: u32,
        /// Free-form node software version.
        agent: String,
        /// The owner's secret hash, whose account earns for this node's
        /// sessions; `None` for a node that earns nothing.
        owner: Option<String>,
        /// Whether the node's CPU has AES instructions: its clients are then
        /// asked to prefer AES-GCM ([`SSH_CIPHERS_AES`]).
        aes: bool,
    },
    /// These slots are ready to be claimed.
    SlotsReady { slots: Vec<Slot> },
    /// The node took the order on its terms; clients may log in now.
    Accepted {
        order_id: OrderId,
        /// A [`crate::terms::SignedAcceptance`] of the assignment's terms.
        acceptance: Vec<u8>,
    },
    /// The node could not take the order (the slot is gone, a term it
    /// cannot meet, …).
    Refused { order_id: OrderId, error: String },
    /// The session of an order is over; its user and data are gone.
    Ended {
        order_id: OrderId,
        reason: EndReason,
    },
    /// A signed usage receipt in its canonical encoding (see [`crate::receipt`]).
    Receipt { bytes: Vec<u8> },
    /// The answer to [`BrokerMsg::SpeedTest`]: the workload's digest for
    /// each lane, in lane order.
    SpeedResult { digests: Vec<[u8; 32]> },
    /// The answer to [`BrokerMsg::SignCapacity`]: a
    /// [`crate::capacity::SignedCapacity`] in its encoding.
    Capacity { bytes: Vec<u8> },
    /// The client on one tunnelled stream authenticated as the order's user.
    /// Only such a login counts as the client's connection: a TCP connection
    /// that never authenticates changes nothing about the order.
    LoggedIn {
        order_id: OrderId,
        /// The QUIC stream id of the client's stream (which the relay opened),
        /// so the relay can tell which of the order port's TCP connections
        /// logged in.
        stream: u64,
    },
    /// Bytes through a session's network link so far (sent with each receipt
    /// and once more when the session is over): what the session sent out of
    /// its namespace and what it received.
    Traffic {
        order_id: OrderId,
        sent: u64,
        received: u64,
    },
}

/// Broker → node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerMsg {
    /// Answer to `Hello`: the node is registered.
    Welcome { protocol: u16 },
    /// Claim a slot for an order.
    Assign(Assignment),
    /// End an order's session now.
    Cancel { order_id: OrderId },
    /// A fatal problem; the broker closes the connection after sending it.
    Error { error: String },
    /// Run the speed test ([`crate::speed::run`]) on `lanes` seeds derived
    /// from this one ([`crate::speed::lane_seed`]), all at once, one core
    /// each, and answer with [`NodeMsg::SpeedResult`]; the broker times the
    /// answer and checks one lane the node cannot guess.
    SpeedTest {
        seed: [u8; 32],
        rounds: u32,
        lanes: u32,
    },
    /// Sign a capacity statement on these terms (with this node's free slots
    /// and cores) and answer with [`NodeMsg::Capacity`]; the relay publishes
    /// it to the other brokers.
    SignCapacity { terms: crate::capacity::Terms },
    /// Other relays of the mesh the node may move to when it loses this one.
    Relays { relays: Vec<RelayAddr> },
    /// The relay cannot take the node now (its speed tests are over their
    /// bounds); the broker closes the connection after sending it, and the
    /// node dials this relay again no sooner than `after_secs` (another
    /// relay it knows may be tried meanwhile).
    TryLater { reason: String, after_secs: u32 },
}

/// A relay a node can dial: its QUIC address and the key it pins.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelayAddr {
    /// `host:port`.
    pub addr: String,
    pub key: crate::identity::PeerId,
}

/// Text that is not `host:port=key`.
#[derive(Debug, thiserror::Error)]
#[error("a relay is `host:port=<broker key>`")]
pub struct BadRelayAddr;

impl FromStr for RelayAddr {
    type Err = BadRelayAddr;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, key) = s.trim().rsplit_once('=').ok_or(BadRelayAddr)?;
        if addr.is_empty() || !addr.contains(':') {
            return Err(BadRelayAddr);
        }
        Ok(Self {
            addr: addr.to_owned(),
            key: key.parse().map_err(|_| BadRelayAddr)?,
        })
    }
}

impl fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.addr, self.key)
    }
}

/// Magic and version at the start of every tunnelled client stream.
pub const STREAM_MAGIC: [u8; 4] = *b"JSY1";

/// Length of [`StreamHeader`] on the wire.
pub const STREAM_HEADER_LEN: usize = 16;

/// Written by the relay at the start of each client stream: which order it is for.
/// The client's bytes follow it directly, in the same packet, so no round trip is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub order_id: OrderId,
}

/// Bytes that are not a stream header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("stream does not start with a jusy stream header")]
pub struct BadStreamHeader;

impl StreamHeader {
    pub fn encode(&self) -> [u8; STREAM_HEADER_LEN] {
        let mut out = [0u8; STREAM_HEADER_LEN];
        let (magic, id) = out.split_at_mut(4);
        magic.copy_from_slice(&STREAM_MAGIC);
        id.copy_from_slice(&self.order_id.0);
        out
    }

    pub fn decode(bytes: &[u8; STREAM_HEADER_LEN]) -> Result<Self, BadStreamHeader> {
        let (magic, id) = bytes.split_at(4);
        if magic != STREAM_MAGIC {
            return Err(BadStreamHeader);
        }
        let id: [u8; 12] = id.try_into().map_err(|_| BadStreamHeader)?;
        Ok(Self {
            order_id: OrderId(id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_header_exact_bytes() {
        let h = StreamHeader {
            order_id: OrderId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
        };
        let bytes = h.encode();
        assert_eq!(
            bytes,
            [
                b'J', b'S', b'Y', b'1', 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
            ]
        );
        assert_eq!(StreamHeader::decode(&bytes), Ok(h));
        let mut bad = bytes;
        bad[3] = b'2';
        assert_eq!(StreamHeader::decode(&bad), Err(BadStreamHeader));
    }

    #[test]
    fn end_reason_numbers_and_codes_are_stable() {
        assert_eq!(EndReason::ClientClosed.number(), 1);
        assert_eq!(EndReason::DiskLimit.number(), 11);
        for r in EndReason::ALL {
            assert_eq!(EndReason::from_number(r.number()), Some(r));
            assert_eq!(EndReason::from_code(r.code()), Some(r));
        }
        assert_eq!(EndReason::from_number(0), None);
        assert_eq!(EndReason::from_number(12), None);
    }

    #[test]
    fn relay_addr_text() {
        let key = crate::identity::PeerId::from_signing_key(
            &ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
        );
        let r = RelayAddr {
            addr: "relay.example:7443".into(),
            key,
        };
        assert_eq!(r.to_string().parse::<RelayAddr>().ok(), Some(r));
        assert!("relay.example:7443".parse::<RelayAddr>().is_err());
        assert!(format!("relay.example={key}").parse::<RelayAddr>().is_err());
    }

    #[test]
    fn order_id_text() {
        let id = OrderId([0xab; 12]);
        assert_eq!(id.to_string(), "abababababababababababab");
        assert_eq!(id.to_string().parse::<OrderId>().ok(), Some(id));
        assert!("xyz".parse::<OrderId>().is_err());
    }
}
