//! The order book: turns a client's request into a charge, a claimed slot, a
//! per-order key pair and an open order port; follows the order's connections,
//! receipts and end, and settles it in the ledger.
//!
//! When the local relay has no free slot, the order is placed on another
//! relay of the mesh and its ledger stays here ([`remote`]).
//!
//! Crash safety: the charge and the order record are committed and flushed
//! before the credentials leave; every later change of the order is a ledger
//! transaction; on start-up [`Ledger::recover`] settles what a crash left open.

mod remote;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use jusy_common::identity::PeerId;
use jusy_common::ledger::{self as books, Account, AccountId};
use jusy_common::order::{Order, Plausibility, Settlement};
use jusy_common::rating::{ClientTally, Tally};
use jusy_common::receipt::{Accepted, ChainVerifier, SignedReceipt};
use jusy_common::terms::{OrderTerms, SignedAcceptance};
use jusy_common::verdict::{Party, Verdict};
use jusy_common::wire::{Assignment, EndReason, OrderId, Slot};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::ledger::{Ledger, LedgerError, OrderRecord, Traffic};
use crate::mesh::Mesh;
use crate::relay::{AssignError, NodeLink, Relay, RelayEvent, splice};
use crate::remote::Served;
use crate::store::{AccountRecord, Role, Store, StoreError, now_ms};

/// How often the broker's own order timers are looked at.
const TIMER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Credentials for one order, as the documented client flow expects them.
#[derive(Debug, Serialize)]
pub struct Credentials {
    pub status: &'static str,
    pub username: String,
    pub order_id: String,
    pub host: String,
    pub port: u16,
    /// Unencrypted OpenSSH private key made for this order only.
    pub privkey: String,
    /// The node's SSH host key (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    /// A ready `known_hosts` line for `host`:`port`.
    pub known_hosts: String,
    pub node_id: String,
    /// What was charged, in satoshi.
    pub price_sat: u64,
    /// What the order buys, as the node signed it.
    pub terms: OrderTerms,
    /// The OpenSSH cipher preference to use with this node (`ssh -c …`),
    /// when it has one: AES-GCM where the node has AES instructions.
    pub ssh_ciphers: Option<&'static str>,
}

/// The cipher preference for a node's clients.
fn ssh_ciphers(aes: bool) -> Option<&'static str> {
    aes.then_some(jusy_common::wire::SSH_CIPHERS_AES)
}

/// Nodes an order is offered to before it fails (each refusal is refunded).
const ASSIGN_ATTEMPTS: usize = 3;

/// Why an order could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("unknown client hash")]
    UnknownClient,
    #[error("insufficient funds: balance {balance} sat, an order costs {price} sat")]
    Insufficient { balance: u64, price: u64 },
    #[error("no free capacity, try again shortly")]
    NoCapacity,
    #[error("node could not take the order: {0}")]
    Node(#[from] AssignError),
    #[error("no order port available: {0}")]
    Port(std::io::Error),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("ledger: {0}")]
    Ledger(LedgerError),
    #[error("key generation failed")]
    Key,
    #[error(
        "this client's recent sessions broke their node's limits too often (rating {rating} %, \
         orders need {min} %); sessions older than {days} days stop counting"
    )]
    LowRating { rating: u8, min: u8, days: u64 },
    #[error(
        "this client has {max} orders nobody has logged in to yet, the most allowed: log in to \
         one of them, or wait until one is cancelled and refunded (an order nobody logs in to \
         within {window_secs} s is)"
    )]
    Unconnected { max: u32, window_secs: u32 },
}

/// Drops the ends before `since` (milliseconds) from `ends`, oldest first,
/// and counts the rest.
fn recent(ends: &mut ClientEnds, since: u64) -> ClientTally {
    while ends.front().is_some_and(|&(at, _)| at < since) {
        ends.pop_front();
    }
    let mut tally = ClientTally::default();
    for &(_, broke) in ends.iter() {
        tally.add(broke);
    }
    tally
}

/// How long a client's sessions count in its rating: a client refused for
/// breaking limits may order again once the sessions that did are this old.
pub const CLIENT_RATING_DAYS: u64 = 7;

const CLIENT_RATING_MS: u64 = CLIENT_RATING_DAYS * 24 * 3600 * 1000;

/// A client's sessions within [`CLIENT_RATING_DAYS`]: when each ended (or,
/// for orders read back at start, was made) and whether it broke limits.
type ClientEnds = VecDeque<(u64, bool)>;

impl From<LedgerError> for OrderError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Money(books::LedgerError::Insufficient {
                balance, amount, ..
            }) => OrderError::Insufficient {
                balance,
                price: amount,
            },
            e => OrderError::Ledger(e),
        }
    }
}

#[derive(Debug)]
struct Live {
    node: PeerId,
    /// The node's connection to the local relay; 0 for an order on another relay.
    link_id: u64,
    /// The other relay serving the order, if it is not the local one.
    relay: Option<libp2p::PeerId>,
    /// The next sequence number of that relay's events.
    next_seq: u64,
    closed: CancellationToken,
    receipts: ChainVerifier,
    client: AccountId,
    /// Whether the client has logged in to it: until then it counts
    /// against the client's `max_unconnected_orders`.
    connected: bool,
}

/// Orders in flight.
#[derive(Debug)]
pub struct Orders {
    cfg: Config,
    store: Store,
    pub ledger: Ledger,
    relay: Arc<Relay>,
    /// Where orders go when the local relay has no free slot.
    mesh: Option<Mesh>,
    /// Orders the local relay serves for other brokers' ledgers.
    served: Option<Arc<Served>>,
    live: Mutex<HashMap<OrderId, Live>>,
    /// How each node's sessions ended, for its rating: nodes that drop
    /// sessions are offered less often.
    ratings: Mutex<HashMap<PeerId, Tally>>,
    /// The same counts by owner, over all its nodes: a new key of a known
    /// owner starts from the owner's rating.
    owner_ratings: Mutex<HashMap<AccountId, Tally>>,
    /// Which owner each node earns for, as far as this broker has seen.
    node_owners: Mutex<HashMap<PeerId, AccountId>>,
    /// How each client's recent sessions ended, for its rating: clients that
    /// keep breaking limits are refused orders.
    clients: Mutex<HashMap<AccountId, ClientEnds>>,
    /// Orders each client is making right now, not yet live: they count
    /// against its `max_unconnected_orders` too, so that parallel requests
    /// cannot pass the cap together.
    placing: Mutex<HashMap<AccountId, u32>>,
    ports: TaskTracker,
}

/// An order being made, counted in [`Orders::placing`] until dropped (by
/// then it is live, or failed).
struct Placing<'a> {
    orders: &'a Orders,
    client: AccountId,
}

impl Drop for Placing<'_> {
    fn drop(&mut self) {
        let mut placing = self.orders.placing();
        if let Some(n) = placing.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                placing.remove(&self.client);
            }
        }
    }
}

fn random<const N: usize>() -> Result<[u8; N], OrderError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| OrderError::Key)?;
    Ok(b)
}

/// A fresh ed25519 key pair for one order: the unencrypted OpenSSH private
/// key the client gets, and the public key the node accepts.
pub(crate) fn order_key() -> Result<(String, String), OrderError> {
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&random::<32>()?));
    let privkey = key
        .to_openssh(LineEnding::LF)
        .map_err(|_| OrderError::Key)?
        .to_string();
    let pubkey = key.public_key().to_openssh().map_err(|_| OrderError::Key)?;
    Ok((privkey, pubkey))
}

/// `host:port` as OpenSSH writes it in known_hosts.
pub fn known_hosts_host(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Runs blocking ledger work (sled transactions end in an fsync) without
/// stalling other tasks on this worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl Orders {
    pub fn new(
        cfg: Config,
        store: Store,
        ledger: Ledger,
        relay: Arc<Relay>,
        mesh: Option<(Mesh, Arc<Served>)>,
    ) -> Arc<Self> {
        let (mesh, served) = mesh.unzip();
        let mut ratings: HashMap<PeerId, Tally> = HashMap::new();
        let mut owner_ratings: HashMap<AccountId, Tally> = HashMap::new();
        let mut node_owners: HashMap<PeerId, AccountId> = HashMap::new();
        let mut clients: HashMap<AccountId, ClientEnds> = HashMap::new();
        let since = now_ms().saturating_sub(CLIENT_RATING_MS);
        match ledger.orders() {
            Ok(all) => {
                for (_, rec) in all {
                    if let Ok(node) = rec.node_id.parse::<PeerId>() {
                        // A dispute the operator refunded counts as a fault.
                        let refunded = rec
                            .hold
                            .as_ref()
                            .and_then(|h| h.dispute.as_ref())
                            .is_some_and(|d| d.refunded_sat > 0);
                        let tally = ratings.entry(node).or_default();
                        tally.add_order(&rec.order);
                        if refunded {
                            tally.add_end(EndReason::NodeFailed);
                        }
                        if let Some(owner) = rec.owner {
                            let tally = owner_ratings.entry(owner).or_default();
                            tally.add_order(&rec.order);
                            if refunded {
                                tally.add_end(EndReason::NodeFailed);
                            }
                            node_owners.insert(node, owner);
                        }
                    }
                    let ended = jusy_common::rating::order_broke_limits(&rec.order);
                    let at = rec.order.last_disconnect_ms.unwrap_or(rec.created_ms);
                    if let Some(broke) = ended.filter(|_| at >= since) {
                        clients
                            .entry(rec.client)
                            .or_default()
                            .push_back((at, broke));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "ratings start afresh: orders unreadable"),
        }
        // Orders are read in id order, not time order.
        for ends in clients.values_mut() {
            ends.make_contiguous().sort_unstable();
        }
        Arc::new(Self {
            cfg,
            store,
            ledger,
            relay,
            mesh,
            served,
            live: Mutex::default(),
            ratings: Mutex::new(ratings),
            owner_ratings: Mutex::new(owner_ratings),
            node_owners: Mutex::new(node_owners),
            clients: Mutex::new(clients),
            placing: Mutex::default(),
            ports: TaskTracker::new(),
        })
    }

    /// Counts a judged end of a session of `node` in its rating.
    fn rate(&self, node: PeerId, verdict: &Verdict) {
        let mut ratings = self.ratings.lock().unwrap_or_else(|p| p.into_inner());
        ratings.entry(node).or_default().add_verdict(verdict);
        drop(ratings);
        if let Some(owner) = self.owner_of(&node) {
            let mut owners = self.owner_ratings.lock().unwrap_or_else(|p| p.into_inner());
            owners.entry(owner).or_default().add_verdict(verdict);
        }
    }

    /// The owner `node` earns for, if this broker has seen it.
    fn owner_of(&self, node: &PeerId) -> Option<AccountId> {
        let owners = self.node_owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.get(node).copied()
    }

    /// Remembers whom `node` earns for (from its hello or its offer).
    pub(super) fn learn_owner(&self, node: PeerId, owner: Option<AccountId>) {
        if let Some(owner) = owner {
            let mut owners = self.node_owners.lock().unwrap_or_else(|p| p.into_inner());
            owners.insert(node, owner);
        }
    }

    /// A node's rating in percent, starting from its owner's rating rather
    /// than 90 % (see [`Tally::percent_under`]).
    pub fn rating_with_owner(&self, node: &PeerId, owner: Option<AccountId>) -> u8 {
        let own = self.tally(node);
        let Some(owner) = owner.or_else(|| self.owner_of(node)) else {
            return own.percent();
        };
        let all = {
            let owners = self.owner_ratings.lock().unwrap_or_else(|p| p.into_inner());
            owners.get(&owner).copied().unwrap_or_default()
        };
        // The node's own sessions count once: in its own tally.
        let counted_here = if self.owner_of(node) == Some(owner) {
            own
        } else {
            Tally::default()
        };
        own.percent_under(&all.minus(counted_here))
    }

    /// Counts a fault of `node` (a refused or falsely signed assignment, a
    /// dispute the operator refunded) in its rating.
    pub(crate) fn rate_fault(&self, node: PeerId) {
        let mut ratings = self.ratings.lock().unwrap_or_else(|p| p.into_inner());
        ratings
            .entry(node)
            .or_default()
            .add_end(EndReason::NodeFailed);
        drop(ratings);
        if let Some(owner) = self.owner_of(&node) {
            let mut owners = self.owner_ratings.lock().unwrap_or_else(|p| p.into_inner());
            owners
                .entry(owner)
                .or_default()
                .add_end(EndReason::NodeFailed);
        }
    }

    /// How a node's sessions ended so far: the one count every page, API
    /// answer and order pick rates the node by.
    pub fn tally(&self, node: &PeerId) -> Tally {
        let ratings = self.ratings.lock().unwrap_or_else(|p| p.into_inner());
        ratings.get(node).copied().unwrap_or_default()
    }

    /// Counts a judged end of a session of `client` in its rating.
    fn rate_client(&self, client: AccountId, verdict: &Verdict) {
        if let Some(broke) = verdict.client_broke_limits() {
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            clients
                .entry(client)
                .or_default()
                .push_back((now_ms(), broke));
        }
    }

    /// The lowest client rating (percent) that may order.
    pub fn min_client_rating(&self) -> u8 {
        self.cfg.min_client_rating
    }

    /// Orders a client may hold that nobody has logged in to yet.
    pub fn max_unconnected_orders(&self) -> u32 {
        self.cfg.max_unconnected_orders
    }

    /// How a client's sessions of the last [`CLIENT_RATING_DAYS`] ended.
    pub fn client_tally(&self, client: &AccountId) -> ClientTally {
        let since = now_ms().saturating_sub(CLIENT_RATING_MS);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ends) = clients.get_mut(client) else {
            return ClientTally::default();
        };
        let tally = recent(ends, since);
        if ends.is_empty() {
            clients.remove(client);
        }
        tally
    }

    /// A node's rating in percent (see [`Tally::percent`]), starting from
    /// its owner's when the broker knows the owner.
    pub fn rating(&self, node: &PeerId) -> u8 {
        self.rating_with_owner(node, None)
    }

    /// The brokers' mesh, when this broker is in one.
    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_ref()
    }

    /// Orders the local relay serves for other brokers, when in a mesh.
    pub fn served(&self) -> Option<Arc<Served>> {
        self.served.clone()
    }

    /// Live orders nobody has logged in to yet, and those logged in to.
    pub fn live_counts(&self) -> (usize, usize) {
        let live = self.live();
        let connected = live.values().filter(|l| l.connected).count();
        (live.len() - connected, connected)
    }

    fn live(&self) -> MutexGuard<'_, HashMap<OrderId, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn placing(&self) -> MutexGuard<'_, HashMap<AccountId, u32>> {
        self.placing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an order `client` is about to make, unless it already has
    /// `max_unconnected_orders` that nobody has logged in to (live or being
    /// made). Logged-in and ended orders do not count.
    fn admit(&self, client: AccountId) -> Result<Placing<'_>, OrderError> {
        let max = self.cfg.max_unconnected_orders;
        // Locked in this order only: live, then placing.
        let live = self.live();
        let mut placing = self.placing();
        let waiting = live
            .values()
            .filter(|l| l.client == client && !l.connected)
            .count();
        let making = placing.get(&client).copied().unwrap_or(0);
        if u64::try_from(waiting).unwrap_or(u64::MAX) + u64::from(making) >= u64::from(max) {
            return Err(OrderError::Unconnected {
                max,
                window_secs: self.cfg.connect_window_secs,
            });
        }
        *placing.entry(client).or_default() += 1;
        Ok(Placing {
            orders: self,
            client,
        })
    }

    /// Makes an order for the client with this hash.
    pub async fn create(&self, client_hash: &str) -> Result<Credentials, OrderError> {
        let (client, account) = self
            .store
            .account(Role::Client, client_hash)?
            .ok_or(OrderError::UnknownClient)?;
        let min = self.cfg.min_client_rating;
        let rating = self.client_tally(&client).percent();
        if rating < min {
            return Err(OrderError::LowRating {
                rating,
                min,
                days: CLIENT_RATING_DAYS,
            });
        }
        let price = self.ledger.pricing.price_sat;
        // A cheap early answer; the charge itself is checked in its transaction.
        let balance = self.ledger.balance(&Account::Client(client))?;
        if balance < price {
            return Err(OrderError::Insufficient { balance, price });
        }
        // Held until the order is live (or failed), so that it counts
        // throughout.
        let _placing = self.admit(client)?;
        // A node that refuses (it cannot meet the terms, its slot is gone)
        // costs the client nothing: the next is tried.
        let mut refused: Vec<PeerId> = Vec::new();
        let mut last = None;
        for _ in 0..ASSIGN_ATTEMPTS {
            let claimed = self.relay.claim_slot(|link| {
                if refused.contains(&link.id) {
                    None
                } else {
                    Some(u64::from(self.rating_with_owner(&link.id, link.owner)))
                }
            });
            let Some((link, slot)) = claimed else {
                break;
            };
            match self
                .place(client, account.clone(), link.clone(), slot)
                .await
            {
                Err(OrderError::Node(e)) => {
                    tracing::warn!(node_id = %link.id.short(), error = %e, "node did not take the order; trying another");
                    refused.push(link.id);
                    last = Some(OrderError::Node(e));
                }
                other => return other,
            }
        }
        match last {
            // Tried local nodes and all refused: another relay's may take it.
            Some(e) if self.mesh.is_none() => Err(e),
            _ => self.place_remote(client, account).await,
        }
    }

    async fn place(
        &self,
        client: AccountId,
        account: AccountRecord,
        link: Arc<NodeLink>,
        slot: Slot,
    ) -> Result<Credentials, OrderError> {
        self.learn_owner(link.id, link.owner);
        let listener = match splice::bind(self.cfg.order_bind, self.cfg.order_ports).await {
            Ok(l) => l,
            Err(e) => {
                link.return_slot(slot);
                return Err(OrderError::Port(e));
            }
        };
        let port = listener.local_addr().map_err(OrderError::Port)?.port();
        let (privkey, pubkey) = order_key()?;
        let order_id = OrderId::from_random(random()?);
        let host = self.cfg.public_host.clone();
        let terms = self.cfg.terms();
        let cores = link.proven_cores(self.relay.speed_test.rounds > 0);
        let record = OrderRecord {
            client,
            owner: link.owner,
            node_id: link.id.to_string(),
            username: slot.username.clone(),
            host: host.clone(),
            port,
            created_ms: now_ms(),
            order: Order::new(now_ms(), self.ledger.pricing, terms, cores),
            acceptance: None,
            hold: None,
            traffic: Default::default(),
        };
        if let Err(e) = blocking(|| self.ledger.reserve(order_id, &record)) {
            link.return_slot(slot);
            return Err(e.into());
        }
        let mut authorized_keys = vec![pubkey];
        authorized_keys.extend(account.ssh_keys);
        let assignment = Assignment {
            order_id,
            slot_id: slot.slot_id,
            authorized_keys,
            terms,
        };
        let accepted = self
            .relay
            .assign(&link, assignment)
            .await
            .and_then(|bytes| Ok(SignedAcceptance::check(&bytes, order_id, link.id, &terms)?));
        let acceptance = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Never reached the client: a full refund. A node that took
                // the order on other terms than it was sold is told to end it.
                if matches!(e, AssignError::Acceptance(_)) {
                    link.cancel(order_id);
                }
                blocking(|| {
                    self.ledger.update(order_id, |o| {
                        o.handle_end(now_ms(), EndReason::NodeFailed, Party::Broker)
                    })
                })?;
                self.rate_fault(link.id);
                return Err(e.into());
            }
        };
        blocking(|| self.ledger.accepted(order_id, acceptance.bytes()))?;
        let closed = CancellationToken::new();
        self.live().insert(
            order_id,
            Live {
                node: link.id,
                link_id: link.link_id,
                relay: None,
                next_seq: 0,
                closed: closed.clone(),
                receipts: ChainVerifier::new(order_id, link.id),
                client,
                connected: false,
            },
        );
        tracing::info!(%order_id, node_id = %link.id.short(), port, user = %slot.username, "order placed");
        self.relay
            .serve_port(&self.ports, listener, link.clone(), order_id, closed);
        crate::metrics::METRICS.orders_created.inc();
        Ok(Credentials {
            status: "OK",
            username: slot.username,
            order_id: order_id.to_string(),
            known_hosts: format!("{} {}", known_hosts_host(&host, port), link.host_key),
            host,
            port,
            privkey,
            host_key: link.host_key.clone(),
            node_id: link.id.to_string(),
            price_sat: record.order.pricing.price_sat,
            ssh_ciphers: ssh_ciphers(link.aes),
            terms,
        })
    }

    /// Applies relay events until the channel closes.
    pub async fn follow(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<RelayEvent>) {
        while let Some(ev) = events.recv().await {
            // Events of orders served for another broker go to its ledger.
            let ev = match &self.served {
                Some(served) => served.route(ev),
                None => Some(ev),
            };
            if let Some(ev) = ev {
                blocking(|| self.apply(ev));
            }
        }
    }

    /// Whether `node` runs the live order `order_id`: only that node may end
    /// it or report on it; another's `what` is refused and logged.
    fn runs(&self, node: PeerId, order_id: OrderId, what: &str) -> bool {
        let runs = self.live().get(&order_id).is_some_and(|l| l.node == node);
        if !runs {
            tracing::warn!(%order_id, node_id = %node.short(), "{what} refused: not an order this node runs");
        }
        runs
    }

    fn apply(&self, ev: RelayEvent) {
        let now = now_ms();
        let result = match ev {
            RelayEvent::Ended {
                node_id,
                order_id,
                reason,
                by,
            } => {
                if self.runs(node_id, order_id, "end") {
                    self.end(order_id, reason, by).map(|_| ())
                } else {
                    Ok(())
                }
            }
            RelayEvent::Traffic {
                node_id,
                order_id,
                sent,
                received,
            } => {
                if self.runs(node_id, order_id, "traffic") {
                    self.ledger
                        .set_traffic(order_id, Traffic { sent, received })
                } else {
                    Ok(())
                }
            }
            RelayEvent::Receipt { node_id, bytes } => self.receipt(node_id, &bytes),
            RelayEvent::ClientConnected { order_id } => {
                if let Some(live) = self.live().get_mut(&order_id) {
                    live.connected = true;
                }
                self.ledger
                    .update(order_id, |o| {
                        o.handle_connect(now);
                        None
                    })
                    .map(|_| ())
            }
            RelayEvent::ClientDisconnected { order_id } => self
                .ledger
                .update(order_id, |o| {
                    o.handle_disconnect(now);
                    None
                })
                .map(|_| ()),
            RelayEvent::NodeGone { node_id, link_id } => {
                let lost: Vec<OrderId> = self
                    .live()
                    .iter()
                    .filter(|(_, l)| l.node == node_id && l.link_id == link_id)
                    .map(|(id, _)| *id)
                    .collect();
                lost.into_iter()
                    .try_for_each(|id| self.end(id, EndReason::NodeLost, Party::Broker).map(|_| ()))
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "ledger update failed");
        }
    }

    /// Checks a receipt against its order's chain and stores it; bad ones are
    /// logged with the reason and dropped.
    fn receipt(&self, node_id: PeerId, bytes: &[u8]) -> Result<(), LedgerError> {
        let signed = match SignedReceipt::decode(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(node_id = %node_id.short(), error = %e, "receipt rejected");
                return Ok(());
            }
        };
        let r = *signed.receipt();
        let accepted = {
            let mut live = self.live();
            let Some(order) = live.get_mut(&r.order_id).filter(|l| l.node == node_id) else {
                tracing::warn!(order_id = %r.order_id, node_id = %node_id.short(), "receipt rejected: not an order this node runs");
                return Ok(());
            };
            order.receipts.accept(&signed)
        };
        match accepted {
            Ok(Accepted::New) => {
                let plausible = self.ledger.add_receipt(&r, signed.bytes(), now_ms())?;
                tracing::info!(
                    order_id = %r.order_id, seq = r.seq, cpu_us = r.cpu_us, peak_mem = r.peak_mem,
                    peak_procs = r.peak_procs, peak_disk = r.peak_disk,
                    finish = r.finish.map(EndReason::code), "receipt"
                );
                if let Plausibility::Implausible {
                    claimed_us,
                    bound_us,
                } = plausible
                {
                    // Counted against the node when the order ends (its verdict).
                    tracing::warn!(
                        order_id = %r.order_id, node_id = %node_id.short(), seq = r.seq,
                        claimed_us, bound_us,
                        "receipt claims more CPU time than the node's cores could give since the first login: the excess is not proven"
                    );
                }
            }
            Ok(Accepted::Duplicate) => {
                tracing::debug!(order_id = %r.order_id, seq = r.seq, "duplicate receipt")
            }
            Err(e) => tracing::warn!(order_id = %r.order_id, error = %e, "receipt rejected"),
        }
        Ok(())
    }

    /// Ends an order for `reason`, as `by` says: closes its port and
    /// settles it by its verdict.
    fn end(
        &self,
        order_id: OrderId,
        reason: EndReason,
        by: Party,
    ) -> Result<Option<Settlement>, LedgerError> {
        self.settle(order_id, reason.code(), |o| {
            o.handle_end(now_ms(), reason, by)
        })
    }

    /// Ends an order whose connect window or wall limit the broker's own
    /// clock saw pass ([`Order::handle_tick`]): its port closes, it is
    /// settled as the broker judged, and its node is told to end the
    /// session; returns the relay to tell when another relay serves it.
    fn expire(&self, order_id: OrderId, now: u64) -> Result<Option<libp2p::PeerId>, LedgerError> {
        let live = self
            .live()
            .get(&order_id)
            .map(|l| (l.node, l.link_id, l.relay));
        let settled = self.settle(order_id, "TIMER", |o| o.handle_tick(now))?;
        let Some((node, link_id, relay)) = live.filter(|_| settled.is_some()) else {
            return Ok(None);
        };
        tracing::warn!(%order_id, node_id = %node.short(), "the broker's timer ended the order: its node did not");
        if relay.is_none()
            && let Some(link) = self
                .relay
                .nodes()
                .into_iter()
                .find(|n| n.id == node && n.link_id == link_id)
        {
            link.cancel(order_id);
        }
        Ok(relay)
    }

    /// Settles an order with `f` in the ledger; once it is settled, closes its
    /// port, forgets it and rates its node and client by the verdict.
    fn settle(
        &self,
        order_id: OrderId,
        what: &str,
        f: impl Fn(&mut Order) -> Option<Settlement>,
    ) -> Result<Option<Settlement>, LedgerError> {
        let settled = match self.ledger.settle(order_id, f) {
            Err(LedgerError::UnknownOrder(_)) => {
                tracing::warn!(%order_id, end = what, "end of an unknown order ignored");
                return Ok(None);
            }
            other => other?,
        };
        let Some((settlement, verdict)) = settled else {
            return Ok(None);
        };
        crate::metrics::METRICS.settled(verdict.reason.code());
        if let Some(live) = self.live().remove(&order_id) {
            live.closed.cancel();
            self.rate(live.node, &verdict);
            self.rate_client(live.client, &verdict);
        }
        Ok(Some(settlement))
    }

    /// Until `stop`: once a second, ends the live orders the broker's own
    /// timers say are over (see [`Order::deadline_ms`]), whatever their
    /// nodes say or do not say.
    pub async fn watch_timers(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TIMER_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = now_ms();
            let ids: Vec<OrderId> = self.live().keys().copied().collect();
            let mut remote = Vec::new();
            for order_id in ids {
                let due = blocking(|| self.ledger.order(order_id)).map(|rec| {
                    rec.and_then(|r| r.order.deadline_ms())
                        .is_some_and(|d| d <= now)
                });
                let result = match due {
                    Ok(true) => blocking(|| self.expire(order_id, now)),
                    Ok(false) => Ok(None),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(Some(relay)) => remote.push((order_id, relay)),
                    Ok(None) => {}
                    Err(e) => tracing::error!(%order_id, error = %e, "ledger update failed"),
                }
            }
            self.cancel_remote(remote).await;
            let due =
                blocking(|| self.ledger.next_release_ms()).map(|n| n.is_some_and(|t| t <= now));
            match due {
                Ok(true) => {
                    if let Err(e) = blocking(|| self.ledger.release_due(now)) {
                        tracing::error!(error = %e, "releasing held earnings failed");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "reading held earnings failed"),
            }
        }
    }

    /// Ends every live order as cancelled by the broker (shutdown): settles
    /// it, tells its node, and closes its port.
    pub async fn cancel_all(&self) {
        let live: Vec<(OrderId, PeerId, Option<libp2p::PeerId>)> = self
            .live()
            .iter()
            .map(|(id, l)| (*id, l.node, l.relay))
            .collect();
        let remote: Vec<(OrderId, libp2p::PeerId)> = live
            .iter()
            .filter_map(|(id, _, relay)| relay.map(|r| (*id, r)))
            .collect();
        self.cancel_remote(remote).await;
        for (order_id, node, _) in live {
            if let Some(link) = self.relay.nodes().into_iter().find(|n| n.id == node) {
                link.cancel(order_id);
            }
            if let Err(e) = blocking(|| self.end(order_id, EndReason::Cancelled, Party::Broker)) {
                tracing::error!(%order_id, error = %e, "settling at shutdown failed; recovery settles it at the next start");
            }
        }
        self.ports.close();
        self.ports.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_rating_counts_only_its_recent_sessions() {
        let mut ends: ClientEnds = [(100, true), (200, true), (300, false)].into();
        assert_eq!(
            recent(&mut ends, 0),
            ClientTally {
                clean: 1,
                broke_limits: 2
            }
        );
        // The first end ages out; the others stay, for the next look.
        assert_eq!(
            recent(&mut ends, 150),
            ClientTally {
                clean: 1,
                broke_limits: 1
            }
        );
        assert_eq!(ends.len(), 2);
        assert_eq!(recent(&mut ends, 301), ClientTally::default());
        assert!(ends.is_empty());
    }

    #[test]
    fn known_hosts_brackets_non_default_ports() {
        assert_eq!(known_hosts_host("h", 22), "h");
        assert_eq!(known_hosts_host("h", 2222), "[h]:2222");
    }
}
