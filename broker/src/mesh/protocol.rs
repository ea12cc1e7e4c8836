//! What brokers ask each other over request-response, and the libp2p
//! behaviour that carries it next to Kademlia, identify and the allowlist.

use std::time::Duration;

use jusy_common::identity::PeerId;
use jusy_common::ledger::AccountId;
use jusy_common::wire::{EndReason, OrderId, RelayAddr};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    StreamProtocol, allow_block_list, connection_limits, identify, kad, request_response,
};
use serde::{Deserialize, Serialize};

/// Kademlia protocol name: a private DHT, apart from any public one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/jusy/kad/1");

/// Request-response protocol name.
pub const MESH_PROTOCOL: StreamProtocol = StreamProtocol::new("/jusy/mesh/1");

/// Identify's protocol version string.
pub const IDENTIFY_VERSION: &str = "/jusy/1";

/// A request from one broker to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshRequest {
    /// The signed statements of the relay's attached nodes in this shard that
    /// have a free slot.
    Offers { shard: u8 },
    /// Reserve a slot on one of the relay's nodes for an order whose ledger
    /// the asking broker keeps, and open the order port.
    Reserve(Reservation),
    /// Where nodes reach the answering broker's relay.
    Relay,
    /// Something happened to an order the asking relay serves for the
    /// answering broker's ledger; sent until acknowledged (at least once).
    Event {
        order_id: OrderId,
        /// 0, 1, 2, … per order; the ledger applies each number once.
        seq: u64,
        event: OrderEvent,
    },
    /// The asking broker, which keeps the order's ledger, cancelled it:
    /// close its port and end its session.
    Cancel { order_id: OrderId },
    /// The operator let these brokers (mesh peer ids) into the mesh: trust
    /// them too, and tell the others.
    Admit { peers: Vec<String> },
    /// Every broker the answering one lets into the mesh.
    Trusted,
}

/// An order placed through another broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub order_id: OrderId,
    pub node_id: PeerId,
    /// OpenSSH public keys allowed to log in.
    pub authorized_keys: Vec<String>,
    /// What the order buys (the ledger's broker decides them).
    pub terms: jusy_common::terms::OrderTerms,
}

/// Where the client of a reserved order connects, and who serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    pub host: String,
    pub port: u16,
    pub username: String,
    /// The node's SSH host key.
    pub host_key: String,
    /// The account that earns for the node's sessions.
    pub owner: Option<AccountId>,
    /// The node's CPU has AES instructions.
    #[serde(default)]
    pub aes: bool,
    /// The node's signed acceptance of the terms, for the ledger to check.
    pub acceptance: Vec<u8>,
    /// The cores the relay believes the node has (its speed test).
    pub cores: u32,
}

/// An order's event, forwarded from its relay to its ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// A client's connection logged in (the node accepted its SSH key); a TCP
    /// connection alone is never forwarded.
    ClientConnected,
    /// A logged-in connection closed.
    ClientDisconnected,
    /// A receipt as the node sent it (checked by the ledger).
    Receipt { node_id: PeerId, bytes: Vec<u8> },
    Ended {
        reason: EndReason,
        /// Whether the node said so (a claim) or the relay knows it.
        by: jusy_common::verdict::Party,
    },
    /// Bytes through the session's network so far.
    Traffic { sent: u64, received: u64 },
}

/// The answer to a [`MeshRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshResponse {
    /// Encoded [`jusy_common::capacity::SignedCapacity`] statements.
    Offers(Vec<Vec<u8>>),
    Reserved(Reserved),
    Relay(RelayAddr),
    /// Mesh peer ids.
    Trusted(Vec<String>),
    /// The event was applied (or already had been).
    Acknowledged,
    Refused(String),
}

/// Largest request accepted from another broker: a reservation's SSH keys
/// (at most 17 lines of a few KB) fit many times over.
pub const MAX_REQUEST_BYTES: u64 = 256 << 10;

/// Largest answer accepted: [`MAX_OFFERS`] statements of at most
/// `capacity::MAX_LEN` bytes, with room to spare.
pub const MAX_RESPONSE_BYTES: u64 = 2 << 20;

/// Statements one `Offers` answer carries at most; the asking broker picks
/// one of them at random anyway.
pub const MAX_OFFERS: usize = 1024;

/// Requests (and answers) in flight on one connection at most.
pub const MAX_STREAMS: usize = 64;

/// Everything a broker speaks on the mesh.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Handshakes under way from one address ([`super::limits`]); asked first.
    pub addresses: super::limits::PendingPerAddress,
    /// Pending and established connections in all and per peer.
    pub limits: connection_limits::Behaviour,
    /// Connections from peers not on the operator's list are denied.
    pub allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub identify: identify::Behaviour,
    pub rpc: request_response::cbor::Behaviour<MeshRequest, MeshResponse>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("allowed", &self.allow.allowed_peers())
            .finish_non_exhaustive()
    }
}

/// How long provider records of a shard live without being republished in
/// production (see [`super::Pace`]).
pub const PROVIDER_TTL: Duration = Duration::from_secs(90);

impl Behaviour {
    pub fn new(
        key: &libp2p::identity::Keypair,
        trusted: &[libp2p::PeerId],
        provider_ttl: Duration,
        pending: super::limits::Pending,
    ) -> Self {
        let local = key.public().to_peer_id();
        let mut allow = allow_block_list::Behaviour::default();
        for peer in trusted {
            allow.allow_peer(*peer);
        }
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            // Every insert is checked (signatures, publisher) before it is stored.
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            // Relays refresh their own records; nobody else re-publishes them,
            // so a record's publisher is always its relay.
            .set_replication_interval(None)
            .set_publication_interval(None)
            .set_record_ttl(None)
            .set_provider_record_ttl(Some(provider_ttl))
            .set_provider_publication_interval(Some(provider_ttl / 3))
            .set_query_timeout(Duration::from_secs(10));
        let store = kad::store::MemoryStore::with_config(
            local,
            kad::store::MemoryStoreConfig {
                max_records: 200_000,
                max_value_bytes: jusy_common::capacity::MAX_LEN,
                max_providers_per_key: 1_024,
                max_provided_keys: usize::from(jusy_common::capacity::SHARDS) * 2,
            },
        );
        let mut kad = kad::Behaviour::with_config(local, store, kad_config);
        kad.set_mode(Some(kad::Mode::Server));
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_VERSION.to_owned(), key.public())
                .with_agent_version(format!("jusy-broker/{}", env!("CARGO_PKG_VERSION"))),
        );
        let codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(MAX_REQUEST_BYTES)
            .set_response_size_maximum(MAX_RESPONSE_BYTES);
        let rpc = request_response::Behaviour::with_codec(
            codec,
            [(MESH_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                // Longer than a relay waits for its node to accept an order (10 s).
                .with_request_timeout(Duration::from_secs(12))
                .with_max_concurrent_streams(MAX_STREAMS),
        );
        Self {
            addresses: super::limits::PendingPerAddress::new(pending.per_address),
            limits: super::limits::connection_limits(pending),
            allow,
            kad,
            identify,
            rpc,
        }
    }
}
