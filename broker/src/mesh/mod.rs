//! The brokers' mesh: a libp2p swarm over QUIC among brokers the operator
//! trusts (an allowlist of peer ids; anyone else's connection is denied),
//! with a Kademlia DHT in server mode that holds the nodes' signed capacity
//! statements, identify, and request-response for offers, reservations and
//! order events.
//!
//! A broker's libp2p identity is derived from its ed25519 broker key, so its
//! mesh peer id and its `broker_key` name the same key.

mod driver;
pub mod limits;
pub mod protocol;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use jusy_common::capacity::{self, SignedCapacity};
use jusy_common::identity::PeerId;
use libp2p::futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, identity};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::relay::CapacityUpdate;
use driver::{Command, Driver};
pub use protocol::{MeshRequest, MeshResponse, OrderEvent, Reservation, Reserved};

/// The mesh could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh identity: {0}")]
    Identity(String),
    #[error("not a broker key or mesh peer id: {0}")]
    BadPeer(String),
    #[error("mesh listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("join address {0} must end in /p2p/<peer id>")]
    JoinWithoutPeer(Multiaddr),
    #[error("the mesh has stopped")]
    Stopped,
    #[error("request to {peer}: {reason}")]
    Request {
        peer: libp2p::PeerId,
        reason: String,
    },
}

/// How this broker takes part in the mesh.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    /// UDP address of the mesh's QUIC listener.
    pub listen: SocketAddr,
    /// The address other brokers reach this one at, when it differs from `listen`.
    pub public_ip: Option<IpAddr>,
    /// Brokers to connect to at start (each trusted implicitly).
    pub join: Vec<Multiaddr>,
    /// Brokers allowed to connect, publish records and ask for slots.
    pub trust: Vec<libp2p::PeerId>,
    /// The mesh's background traffic: [`Pace::PRODUCTION`].
    pub pace: Pace,
    /// Inbound connections setting up at once: [`limits::Pending::PRODUCTION`].
    pub pending: limits::Pending,
}

/// How often the mesh does its periodic work. Production brokers use
/// [`Pace::PRODUCTION`]; a simulation of many brokers on one machine slows
/// it down, since that machine carries every broker's share of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// How often an idle connection to another broker is probed; one silent
    /// for four times this is lost.
    pub keep_alive: std::time::Duration,
    /// How long a relay's provider record for a shard lives unless renewed
    /// (every third of it); a relay that died stops being found after this.
    pub provider_ttl: std::time::Duration,
}

impl Pace {
    /// A broker that dies is noticed within seconds (orders stop waiting for
    /// it and go elsewhere) and stops being found as a provider within 90 s.
    pub const PRODUCTION: Pace = Pace {
        keep_alive: std::time::Duration::from_secs(1),
        provider_ttl: protocol::PROVIDER_TTL,
    };
}

/// A request another broker sent; answer it through `reply`.
#[derive(Debug)]
pub struct Inbound {
    pub from: libp2p::PeerId,
    pub request: MeshRequest,
    pub reply: oneshot::Sender<MeshResponse>,
}

/// A running mesh: a handle to the task that owns the swarm.
#[derive(Debug, Clone)]
pub struct Mesh {
    commands: mpsc::UnboundedSender<Command>,
    /// This broker's mesh peer id.
    pub peer_id: libp2p::PeerId,
    /// The address to give to `--join` of another broker.
    pub addr: Multiaddr,
    /// The brokers this one joined through.
    join: Vec<Multiaddr>,
}

/// The mesh peer id of a broker key.
pub fn libp2p_id(key: &PeerId) -> Result<libp2p::PeerId, MeshError> {
    let pk = identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .map_err(|e| MeshError::BadPeer(e.to_string()))?;
    Ok(identity::PublicKey::from(pk).to_peer_id())
}

/// Parses a trusted peer: a broker key (64 hex characters, as in the ready
/// line's `broker_key`) or a libp2p peer id.
pub fn parse_peer(text: &str) -> Result<libp2p::PeerId, MeshError> {
    let text = text.trim();
    if text.len() == 64 {
        let key: PeerId = text
            .parse()
            .map_err(|e: jusy_common::identity::KeyError| MeshError::BadPeer(e.to_string()))?;
        return libp2p_id(&key);
    }
    text.parse()
        .map_err(|_| MeshError::BadPeer(text.to_owned()))
}

/// The peer id a join address ends in.
pub fn peer_of(addr: &Multiaddr) -> Result<libp2p::PeerId, MeshError> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Ok(peer),
        _ => Err(MeshError::JoinWithoutPeer(addr.clone())),
    }
}

fn quic_addr(ip: IpAddr, port: u16) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::from(ip))
        .with(Protocol::Udp(port))
        .with(Protocol::QuicV1)
}

fn udp_port(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Udp(port) => Some(port),
        _ => None,
    })
}

impl Mesh {
    /// Binds the mesh listener, dials the join addresses and starts the task
    /// that owns the swarm (returned; it ends when `stop` is cancelled).
    /// `capacity` carries the local relay's statements to publish; requests
    /// of other brokers arrive on `inbound`.
    pub async fn start(
        key: &ed25519_dalek::SigningKey,
        settings: MeshSettings,
        capacity: mpsc::UnboundedReceiver<CapacityUpdate>,
        inbound: mpsc::UnboundedSender<Inbound>,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), MeshError> {
        let keypair = identity::Keypair::ed25519_from_bytes(key.to_bytes())
            .map_err(|e| MeshError::Identity(e.to_string()))?;
        let peer_id = keypair.public().to_peer_id();
        let mut trusted = settings.trust.clone();
        for addr in &settings.join {
            trusted.push(peer_of(addr)?);
        }
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_quic_config(|mut c| {
                let keep_alive = settings
                    .pace
                    .keep_alive
                    .max(std::time::Duration::from_millis(100));
                c.max_idle_timeout = u32::try_from(keep_alive.as_millis() * 4).unwrap_or(u32::MAX);
                c.keep_alive_interval = keep_alive;
                c
            })
            .with_behaviour(|key| {
                protocol::Behaviour::new(
                    key,
                    &trusted,
                    settings.pace.provider_ttl,
                    settings.pending,
                )
            })
            .map_err(|e| MeshError::Identity(e.to_string()))?
            .with_swarm_config(|c| {
                c.with_idle_connection_timeout(std::time::Duration::from_secs(300))
            })
            .build();
        let listen_err = |reason: String| MeshError::Listen {
            addr: settings.listen,
            reason,
        };
        swarm
            .listen_on(quic_addr(settings.listen.ip(), settings.listen.port()))
            .map_err(|e| listen_err(e.to_string()))?;
        let port = loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    break udp_port(&address).ok_or_else(|| listen_err(address.to_string()))?;
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(listen_err(error.to_string()));
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(listen_err(format!("{reason:?}")));
                }
                _ => {}
            }
        };
        let ip = settings.public_ip.unwrap_or(settings.listen.ip());
        let addr = quic_addr(ip, port);
        if !ip.is_unspecified() {
            swarm.add_external_address(addr.clone());
        }
        for join in &settings.join {
            let peer = peer_of(join)?;
            let mut transport_addr = join.clone();
            transport_addr.pop();
            swarm.behaviour_mut().kad.add_address(&peer, transport_addr);
        }
        let (commands, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            swarm,
            commands: rx,
            respond: commands.clone(),
            capacity,
            inbound,
            requests: HashMap::new(),
            providers: HashMap::new(),
            records: HashMap::new(),
            published: HashMap::new(),
            down: HashMap::new(),
            redials: HashMap::new(),
            queued: std::collections::VecDeque::new(),
            putting: HashMap::new(),
            provider_ttl: settings.pace.provider_ttl,
            tasks: JoinSet::new(),
            refusals: limits::Refusals::default(),
        };
        let task = tokio::spawn(driver.run(stop));
        for join in &settings.join {
            let _ = commands.send(Command::Dial { addr: join.clone() });
        }
        let mesh = Self {
            commands,
            peer_id,
            addr: addr.with(Protocol::P2p(peer_id)),
            join: settings.join,
        };
        Ok((mesh, task))
    }

    fn send(&self, cmd: Command) -> Result<(), MeshError> {
        self.commands.send(cmd).map_err(|_| MeshError::Stopped)
    }

    /// Sends a request to another broker and waits for its answer.
    pub async fn request(
        &self,
        peer: libp2p::PeerId,
        request: MeshRequest,
    ) -> Result<MeshResponse, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Request {
            peer,
            request,
            reply,
        })?;
        answer.await.map_err(|_| MeshError::Stopped)?
    }

    /// Relays that advertise nodes in `shard` (some, not necessarily all).
    pub async fn providers(&self, shard: u8) -> Result<Vec<libp2p::PeerId>, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Providers { shard, reply })?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// Dials the brokers this one joined through again (when it knows no
    /// other, e.g. they refused it before it was admitted).
    pub fn rejoin(&self) -> Result<(), MeshError> {
        for addr in &self.join {
            self.send(Command::Dial { addr: addr.clone() })?;
        }
        Ok(())
    }

    /// Lets brokers into the mesh from now on; returns those that were not
    /// trusted before.
    pub async fn admit(
        &self,
        peers: Vec<libp2p::PeerId>,
    ) -> Result<Vec<libp2p::PeerId>, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Admit { peers, reply })?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// Every broker this one lets into the mesh.
    pub async fn trusted(&self) -> Result<Vec<libp2p::PeerId>, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Trusted { reply })?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// Some brokers this one knows (connected or in its routing table).
    pub async fn peers(&self, max: usize) -> Result<Vec<libp2p::PeerId>, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Peers { max, reply })?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// How many of this relay's statements are waiting to be published or
    /// being published now.
    pub async fn publishing(&self) -> Result<usize, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Publishing { reply })?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// Whether this broker keeps a copy of the node's statement itself (as
    /// one of the brokers closest to its key, or as its relay).
    pub async fn holds(&self, node_id: PeerId) -> Result<bool, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Holds { node_id, reply })?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// A node's current statement from the DHT, if one is stored and valid.
    pub async fn record(&self, node_id: PeerId) -> Result<Option<SignedCapacity>, MeshError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Record { node_id, reply })?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// Asks a relay for its free nodes in `shard`; keeps the statements that
    /// verify, are current at `now_ms`, and name that relay.
    pub async fn offers(
        &self,
        relay: libp2p::PeerId,
        shard: u8,
        now_ms: u64,
    ) -> Result<Vec<SignedCapacity>, MeshError> {
        let answer = self.request(relay, MeshRequest::Offers { shard }).await?;
        let MeshResponse::Offers(list) = answer else {
            return Err(MeshError::Request {
                peer: relay,
                reason: format!("unexpected answer {answer:?}"),
            });
        };
        Ok(list
            .iter()
            .filter_map(|b| SignedCapacity::decode(b).ok())
            .filter(|s| {
                s.check_time(now_ms).is_ok()
                    && s.capacity().free_slots > 0
                    && capacity::shard_of(&s.capacity().node_id) == shard
                    && libp2p_id(&s.capacity().terms.relay).ok() == Some(relay)
            })
            .collect())
    }
}
