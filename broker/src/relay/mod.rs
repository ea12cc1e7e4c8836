//! The relay: accepts QUIC connections from nodes, keeps a registry of attached
//! nodes and their ready slots, hands orders to nodes, and splices order ports
//! into QUIC streams.

pub mod admission;
pub mod advertise;
pub mod data_plane;
pub mod node_link;
pub mod quic;
pub mod send_window;
pub mod speed_tests;
pub mod splice;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jusy_common::identity::PeerId;
use jusy_common::wire::{ALPN, Assignment, EndReason, OrderId, RelayAddr, Slot};
use quinn::crypto::rustls::QuicServerConfig;
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use admission::Admission;
pub use advertise::{Advertise, CapacityUpdate};
pub use data_plane::DataPlane;
pub use node_link::NodeLink;

/// What the relay tells the order book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// An order's session is over: the node reported it (a claim the
    /// ledger checks), or the relay serving it knows (its node is gone, its
    /// ledger cancelled it).
    Ended {
        node_id: PeerId,
        order_id: OrderId,
        reason: EndReason,
        by: jusy_common::verdict::Party,
    },
    /// A node sent a usage receipt (not verified yet).
    Receipt { node_id: PeerId, bytes: Vec<u8> },
    /// A client's connection to an order port logged in: the node reported
    /// that its SSH user authenticated. Only this counts as the client
    /// connecting; a TCP connection alone is no one's.
    ClientConnected { order_id: OrderId },
    /// A logged-in client connection to an order port closed.
    ClientDisconnected { order_id: OrderId },
    /// Bytes through an order's session network so far, as its node counts
    /// them.
    Traffic {
        node_id: PeerId,
        order_id: OrderId,
        sent: u64,
        received: u64,
    },
    /// A node's connection is gone; its sessions are lost.
    NodeGone { node_id: PeerId, link_id: u64 },
}

/// Starting the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("binding QUIC endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("starting the relay's data-plane thread: {0}")]
    DataPlane(std::io::Error),
}

/// Handing an order to a node failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssignError {
    #[error("node refused the order: {0}")]
    Refused(String),
    #[error("node's acceptance does not hold: {0}")]
    Acceptance(#[from] jusy_common::terms::AcceptanceError),
    #[error("node did not answer in time")]
    Timeout,
    #[error("node connection is gone")]
    Gone,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Random connection ids that carry no per-process signature: quinn's default
/// ids are checked against a key that changes with every start, so packets of a
/// previous life's connections would be dropped instead of answered with the
/// stateless reset that makes nodes reconnect at once.
#[derive(Debug)]
struct PlainCids;

impl quinn::ConnectionIdGenerator for PlainCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 8];
        // Without OS randomness nothing else works either; a weak id only
        // costs a spurious reset.
        let _ = getrandom::fill(&mut id);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// How nodes are speed-tested before they are offered, and again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeedTest {
    pub rounds: u32,
    pub limit: Duration,
    pub interval: Duration,
    /// Digests the relay computes at once at most ([`speed_tests`]).
    pub concurrency: usize,
}

/// Attached nodes.
#[derive(Debug)]
pub struct Relay {
    pub(crate) speed_test: SpeedTest,
    /// The speed tests' rates, turns and remembered results.
    pub(crate) speed_tests: speed_tests::SpeedTests,
    /// Connections not identified yet, and the handshake budgets.
    admission: Arc<Mutex<Admission>>,
    /// How attached nodes are advertised to other brokers, if at all.
    pub(crate) advertise: Option<Advertise>,
    /// Looks up the owner accounts nodes name in their hello.
    store: crate::store::Store,
    nodes: Mutex<HashMap<PeerId, Arc<NodeLink>>>,
    events: mpsc::UnboundedSender<RelayEvent>,
    next_link: std::sync::atomic::AtomicU64,
    tasks: TaskTracker,
    /// Other relays of the mesh, told to attached nodes for failover.
    others: tokio::sync::watch::Sender<Vec<RelayAddr>>,
    /// The runtime of the data plane ([`DataPlane`]): node connections, order
    /// ports ([`Relay::serve_port`]) and splices.
    data: tokio::runtime::Handle,
}

/// The relay's QUIC server configuration for each largest datagram tried
/// towards a node ([`jusy_node::mtu_towards`]): node connections whose route
/// carries less than `quic_max_mtu` get a configuration that probes only that
/// far. The few sizes met (one per interface MTU) are built once.
#[derive(Debug)]
pub struct PathConfigs {
    base: quinn::ServerConfig,
    /// The endpoint's own largest datagram: `quic_max_mtu`, held to its range.
    max_mtu: u16,
    built: Vec<(u16, Arc<quinn::ServerConfig>)>,
}

impl PathConfigs {
    /// Sizes kept; a relay with more interface MTUs builds the rest per connection.
    const KEPT: usize = 8;

    /// The largest datagram tried towards a node at `peer`, and its
    /// configuration, or `None` for the endpoint's own (all of `quic_max_mtu`).
    fn towards(&mut self, peer: SocketAddr) -> (u16, Option<Arc<quinn::ServerConfig>>) {
        let mtu = jusy_node::mtu_towards(peer, self.max_mtu);
        (mtu, self.trying(mtu))
    }

    /// The configuration that tries datagrams up to `mtu` bytes.
    fn trying(&mut self, mtu: u16) -> Option<Arc<quinn::ServerConfig>> {
        if mtu == self.max_mtu {
            return None;
        }
        if let Some((_, config)) = self.built.iter().find(|(m, _)| *m == mtu) {
            return Some(config.clone());
        }
        let mut config = self.base.clone();
        config.transport_config(Arc::new(transport_config(mtu)));
        let config = Arc::new(config);
        if self.built.len() < Self::KEPT {
            self.built.push((mtu, config.clone()));
        }
        Some(config)
    }
}

/// How much of one stream's data from its node the relay takes before its
/// client reads it: a node's download to its client goes at up to this much
/// per round trip (4 MiB: 1.1 Gbit/s at 30 ms, more than home uplinks carry).
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;

/// QUIC transport for node connections: keep-alives both ways and a short idle
/// timeout, so a dead node is noticed within seconds.
pub fn transport_config(max_mtu: u16) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(8)).ok());
    t.max_concurrent_bidi_streams(4u32.into());
    // Nodes open no unidirectional streams and send no datagrams; quinn keeps
    // per-connection state for every stream a peer may open.
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    // What the relay holds of a node's output that its client does not read:
    // at most one stream window per stream. No window for the connection as a
    // whole: with one, a few stalled streams would use it up and hold every
    // other session on the node, and the node's control stream, to a
    // standstill. The streams a node may have are bounded instead (at most
    // `splice::MAX_CONNECTIONS` logged-in and `splice::MAX_UNAUTHENTICATED`
    // other client connections per order, and 4 of the node's own).
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window(quinn::VarInt::MAX);
    // What the relay buffers towards the node; uploads retune it to the
    // path's bandwidth-delay product (`send_window`).
    t.send_window(send_window::MIN);
    t.mtu_discovery_config(Some(jusy_node::mtu_discovery(max_mtu)));
    t
}

/// Connection attempts waiting for the accept loop at most; more are refused
/// by quinn itself.
const MAX_INCOMING: usize = 1024;

/// Longest the relay's end waits for its node connections to drain.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

impl Relay {
    pub fn new(
        events: mpsc::UnboundedSender<RelayEvent>,
        store: crate::store::Store,
        speed_test: SpeedTest,
        admission: admission::Limits,
        advertise: Option<Advertise>,
        data: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new(Self {
            speed_test,
            speed_tests: speed_tests::SpeedTests::new(speed_test.concurrency, speed_test.interval),
            admission: Arc::new(Mutex::new(Admission::new(
                admission,
                std::time::Instant::now(),
            ))),
            advertise,
            store,
            nodes: Mutex::default(),
            events,
            next_link: 1.into(),
            tasks: TaskTracker::new(),
            others: tokio::sync::watch::channel(Vec::new()).0,
            data,
        })
    }

    /// Serves an order port on the data plane, tracked by `tasks`: its
    /// listener moves to the data plane's reactor, and its accept loop and
    /// splices run there.
    pub fn serve_port(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        listener: tokio::net::TcpListener,
        link: Arc<NodeLink>,
        order_id: OrderId,
        closed: CancellationToken,
    ) {
        let relay = self.clone();
        tasks.spawn_on(
            async move {
                // Registered again from here, readiness comes from this thread.
                match listener.into_std().and_then(tokio::net::TcpListener::from_std) {
                    Ok(listener) => splice::serve(listener, relay, link, order_id, closed).await,
                    Err(e) => tracing::error!(%order_id, error = %e, "order port lost moving to the data plane"),
                }
            },
            &self.data,
        );
    }

    /// Binds the QUIC endpoint nodes dial.
    ///
    /// The stateless-reset key is derived from the broker's identity, so a
    /// restarted broker answers packets of its previous life's connections with
    /// resets the nodes recognise: they reconnect at once instead of waiting for
    /// their idle timeout. Datagrams towards nodes are tried up to `max_mtu`.
    /// The endpoint, its socket and its connections belong to `data` (the
    /// [`DataPlane`]).
    pub fn bind(
        identity: &ed25519_dalek::SigningKey,
        addr: SocketAddr,
        max_mtu: u16,
        data: &tokio::runtime::Handle,
    ) -> Result<(quic::Endpoint, PathConfigs), RelayError> {
        let tls = jusy_common::tls::server_config(identity, ALPN)
            .map_err(|e| RelayError::Tls(e.to_string()))?;
        let quic = QuicServerConfig::try_from(tls).map_err(|e| RelayError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport_config(max_mtu)));
        // Attempts wait here only until the accept loop (on the same thread)
        // decides about them; what they may buffer meanwhile is small, as
        // nodes send no 0-RTT data.
        config
            .max_incoming(MAX_INCOMING)
            .incoming_buffer_size(64 << 10)
            .incoming_buffer_size_total(4 << 20);
        let derive = |purpose: &[u8]| {
            let mut h = sha2::Sha256::new();
            h.update(purpose);
            h.update(identity.to_bytes());
            <[u8; 32]>::from(h.finalize())
        };
        let reset_key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derive(b"jusy relay reset key\0"));
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(|| Box::new(PlainCids));
        jusy_node::tune_endpoint(&mut endpoint_config, max_mtu);
        let bind = |source| RelayError::Bind { addr, source };
        let socket = jusy_node::quic_socket(addr).map_err(bind)?;
        let paths = PathConfigs {
            base: config.clone(),
            max_mtu: jusy_node::held_mtu(max_mtu),
            built: Vec::new(),
        };
        // The socket and the endpoint's driver belong to the runtime the
        // endpoint is made in.
        let _data = data.enter();
        let endpoint =
            quic::Endpoint::new(endpoint_config, Arc::new(config), socket).map_err(bind)?;
        Ok((endpoint, paths))
    }

    /// Accepts node connections until `stop` is cancelled: each attempt is
    /// admitted, asked for a Retry or refused ([`admission`]) before any
    /// handshake work, and an admitted one has until its deadline to become
    /// a node.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quic::Endpoint,
        mut paths: PathConfigs,
        stop: CancellationToken,
    ) {
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = stop.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let remote = incoming.remote_address();
            let now = std::time::Instant::now();
            let (verdict, refused, hello_timeout) = {
                let mut admission = lock(&self.admission);
                let verdict =
                    admission.admit(remote.ip(), incoming.remote_address_validated(), now);
                (
                    verdict,
                    admission.report(now),
                    admission.limits().hello_timeout,
                )
            };
            if let Some(r) = refused {
                tracing::info!(
                    retried = r.retried,
                    address_full = r.address_full,
                    address_rate = r.address_rate,
                    rate = r.rate,
                    pushed_out = r.pushed_out,
                    "QUIC connection attempts turned away over the relay's bounds",
                );
            }
            let place = match verdict {
                admission::Verdict::Retry => {
                    incoming.retry();
                    continue;
                }
                // Counted in the report above, not logged one by one.
                admission::Verdict::Refuse(_) => {
                    incoming.refuse();
                    continue;
                }
                admission::Verdict::Accept { id, pushed_out } => admission::Unidentified::new(
                    self.admission.clone(),
                    id,
                    tokio::time::Instant::now() + hello_timeout,
                    pushed_out,
                ),
            };
            let (max_datagram, config) = paths.towards(remote);
            let connecting = incoming.accept(config);
            let this = self.clone();
            self.tasks.spawn(async move {
                let connecting = match connecting {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!(%remote, error = %e, "node connection refused");
                        return;
                    }
                };
                // Dropped unfinished, the handshake ends with a close.
                let conn = tokio::select! {
                    c = tokio::time::timeout_at(place.deadline, connecting) => match c {
                        Ok(Ok(conn)) => conn,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "node handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "node handshake not finished in time; closed");
                            return;
                        }
                    },
                    () = place.pushed_out.cancelled() => {
                        tracing::info!(%remote, "node handshake pushed out by newer attempts");
                        return;
                    }
                };
                this.attach(conn, max_datagram, place).await;
            });
        }
        endpoint.close(0u32.into(), b"broker stopping");
        self.tasks.close();
        self.tasks.wait().await;
        // Each node gets the close (and can move to another relay at once
        // instead of waiting out its idle timeout) while its connection
        // drains; a path that lost the close's packets does not hold the
        // broker's end for long.
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    }

    /// Serves a node connection that tries datagrams up to `max_datagram`,
    /// holding `place` among the unidentified connections until its hello.
    async fn attach(
        self: Arc<Self>,
        conn: quic::Connection,
        max_datagram: u16,
        place: admission::Unidentified,
    ) {
        let Some(node_id) = node_link::peer_id(&conn) else {
            conn.close(1u32.into(), b"no node identity");
            return;
        };
        let link_id = self
            .next_link
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let accepted = node_link::Accepted {
            conn,
            node_id,
            link_id,
            max_datagram,
        };
        node_link::run(self, accepted, place).await;
    }

    fn register(&self, link: Arc<NodeLink>) {
        if let Some(old) = lock(&self.nodes).insert(link.id, link) {
            old.close("replaced by a newer connection of the same node");
        }
    }

    fn unregister(&self, node_id: PeerId, link_id: u64) {
        let mut nodes = lock(&self.nodes);
        let removed = nodes.get(&node_id).is_some_and(|l| l.link_id == link_id);
        if removed {
            nodes.remove(&node_id);
        }
        drop(nodes);
        if let Some(a) = self.advertise.as_ref().filter(|_| removed) {
            let _ = a.updates.send(CapacityUpdate::Withdrawn(node_id));
        }
        let _ = self.events.send(RelayEvent::NodeGone { node_id, link_id });
    }

    pub(crate) fn event(&self, ev: RelayEvent) {
        let _ = self.events.send(ev);
    }

    /// Takes a ready slot from a node chosen at random among those that have
    /// one, each in proportion to its `weight` (its rating); nodes weighed
    /// `None` are left out.
    pub fn claim_slot(
        &self,
        weight: impl Fn(&NodeLink) -> Option<u64>,
    ) -> Option<(Arc<NodeLink>, Slot)> {
        let nodes = lock(&self.nodes);
        let (with_slots, weights): (Vec<_>, Vec<u64>) = nodes
            .values()
            .filter(|n| n.free_slots() > 0)
            .filter_map(|n| Some((n, weight(n)?)))
            .unzip();
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        let pick = jusy_common::rating::pick_weighted(&weights, u64::from_le_bytes(r))?;
        let link = (*with_slots.get(pick)?).clone();
        drop(nodes);
        let slot = link.take_slot()?;
        Some((link, slot))
    }

    /// Sets the other relays of the mesh; attached nodes are told when the
    /// list changes.
    pub fn set_other_relays(&self, mut relays: Vec<RelayAddr>) {
        relays.sort_by_key(|r| r.key);
        self.others.send_if_modified(|old| {
            let changed = *old != relays;
            *old = relays;
            changed
        });
    }

    /// The other relays of the mesh, as attached nodes are told them.
    pub fn other_relays(&self) -> Vec<RelayAddr> {
        self.others.borrow().clone()
    }

    /// Every attached node.
    pub fn nodes(&self) -> Vec<Arc<NodeLink>> {
        lock(&self.nodes).values().cloned().collect()
    }

    /// Number of attached nodes and their free slots.
    pub fn capacity(&self) -> (usize, usize) {
        let nodes = lock(&self.nodes);
        (nodes.len(), nodes.values().map(|n| n.free_slots()).sum())
    }

    /// Sends an assignment and waits for the node's answer: its signed
    /// acceptance, for the caller to check against the order.
    pub async fn assign(&self, link: &NodeLink, a: Assignment) -> Result<Vec<u8>, AssignError> {
        let answer = link.assign(a)?;
        match tokio::time::timeout(Duration::from_secs(10), answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(AssignError::Gone),
            Err(_) => Err(AssignError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(max_mtu: u16) -> PathConfigs {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let tls = jusy_common::tls::server_config(&key, ALPN).expect("tls");
        let quic = QuicServerConfig::try_from(tls).expect("quic");
        PathConfigs {
            base: quinn::ServerConfig::with_crypto(Arc::new(quic)),
            max_mtu,
            built: Vec::new(),
        }
    }

    #[test]
    fn a_node_on_loopback_gets_the_endpoint_configuration() {
        let mut p = paths(jusy_node::QUIC_MTU);
        let lo: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let (mtu, config) = p.towards(lo);
        assert_eq!(mtu, jusy_node::QUIC_MTU);
        assert!(config.is_none());
        assert!(p.built.is_empty());
    }

    #[test]
    fn smaller_paths_get_one_configuration_per_size() {
        let mut p = paths(jusy_node::QUIC_MTU);
        let a = p
            .trying(1472)
            .expect("a smaller size has its own configuration");
        let b = p.trying(1472).expect("again");
        assert!(Arc::ptr_eq(&a, &b), "built once");
        assert!(p.trying(jusy_node::QUIC_MTU).is_none());
        for mtu in 1200..1300 {
            assert!(p.trying(mtu).is_some());
        }
        assert_eq!(
            p.built.len(),
            PathConfigs::KEPT,
            "the kept sizes are bounded"
        );
    }
}
