//! Orders this relay serves for another broker's ledger: it reserves a slot
//! on an attached node, opens the order port, and forwards the order's
//! connections, receipts and end to that ledger — at least once and in
//! order (each event carries a sequence number the ledger deduplicates by).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jusy_common::identity::PeerId;
use jusy_common::receipt::SignedReceipt;
use jusy_common::verdict::Party;
use jusy_common::wire::{Assignment, EndReason, OrderId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mesh::{Mesh, MeshRequest, MeshResponse, OrderEvent, Reservation, Reserved};
use crate::relay::{Relay, RelayEvent, splice};

/// Longest connect window a remote ledger may ask for.
const MAX_CONNECT_WINDOW_SECS: u32 = 600;

/// How long an event is retried before it is given up (the ledger settles
/// what it never heard of when it recovers).
const GIVE_UP: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct ServedOrder {
    /// The broker that keeps the order's ledger.
    ledger: libp2p::PeerId,
    node: PeerId,
    link_id: u64,
    closed: CancellationToken,
    events: mpsc::UnboundedSender<OrderEvent>,
}

/// The orders this relay serves for other brokers.
#[derive(Debug)]
pub struct Served {
    relay: Arc<Relay>,
    mesh: Mesh,
    order_bind: IpAddr,
    order_ports: Option<(u16, u16)>,
    public_host: String,
    orders: Mutex<HashMap<OrderId, ServedOrder>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Served {
    pub fn new(relay: Arc<Relay>, mesh: Mesh, cfg: &crate::config::Config) -> Arc<Self> {
        Arc::new(Self {
            relay,
            mesh,
            order_bind: cfg.order_bind,
            order_ports: cfg.order_ports,
            public_host: cfg.public_host.clone(),
            orders: Mutex::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    fn orders(&self) -> MutexGuard<'_, HashMap<OrderId, ServedOrder>> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a slot of `r.node_id` for the ledger of broker `ledger`.
    pub async fn reserve(&self, ledger: libp2p::PeerId, r: Reservation) -> MeshResponse {
        let refuse = |why: &str| MeshResponse::Refused(why.to_owned());
        if self.orders().contains_key(&r.order_id) {
            return refuse("order id already in use");
        }
        if r.terms.connect_window_secs > MAX_CONNECT_WINDOW_SECS {
            return refuse("connect window too long");
        }
        let Some(link) = self.relay.nodes().into_iter().find(|n| n.id == r.node_id) else {
            return refuse("node is not attached to this relay");
        };
        let Some(slot) = link.take_slot() else {
            return refuse("node has no free slot");
        };
        let listener = match splice::bind(self.order_bind, self.order_ports).await {
            Ok(l) => l,
            Err(e) => {
                link.return_slot(slot);
                return refuse(&format!("no order port: {e}"));
            }
        };
        let Ok(port) = listener.local_addr().map(|a| a.port()) else {
            link.return_slot(slot);
            return refuse("no order port");
        };
        let closed = CancellationToken::new();
        let (events, queue) = mpsc::unbounded_channel();
        // Registered before the node is asked, so that no event of the
        // order can arrive before its route exists.
        self.orders().insert(
            r.order_id,
            ServedOrder {
                ledger,
                node: link.id,
                link_id: link.link_id,
                closed: closed.clone(),
                events,
            },
        );
        let assignment = Assignment {
            order_id: r.order_id,
            slot_id: slot.slot_id,
            authorized_keys: r.authorized_keys,
            terms: r.terms,
        };
        let acceptance = match self.relay.assign(&link, assignment).await {
            Ok(a) => a,
            Err(e) => {
                self.orders().remove(&r.order_id);
                return refuse(&e.to_string());
            }
        };
        tracing::info!(order_id = %r.order_id, node_id = %link.id.short(), port, %ledger, "order placed for another broker");
        self.tasks.spawn(forward(
            self.mesh.clone(),
            ledger,
            r.order_id,
            queue,
            self.stop.clone(),
        ));
        self.relay
            .serve_port(&self.tasks, listener, link.clone(), r.order_id, closed);
        MeshResponse::Reserved(Reserved {
            host: self.public_host.clone(),
            port,
            username: slot.username,
            host_key: link.host_key.clone(),
            owner: link.owner,
            aes: link.aes,
            acceptance,
            cores: link.proven_cores(self.relay.speed_test.rounds > 0),
        })
    }

    /// Takes the events of orders served here (queueing them for their
    /// ledger) and gives back the others for the local order book.
    pub fn route(&self, ev: RelayEvent) -> Option<RelayEvent> {
        let mut orders = self.orders();
        let push = |o: &ServedOrder, e: OrderEvent| {
            let _ = o.events.send(e);
        };
        match &ev {
            RelayEvent::ClientConnected { order_id } => {
                let o = orders.get(order_id)?;
                push(o, OrderEvent::ClientConnected);
            }
            RelayEvent::ClientDisconnected { order_id } => {
                let o = orders.get(order_id)?;
                push(o, OrderEvent::ClientDisconnected);
            }
            RelayEvent::Receipt { node_id, bytes } => {
                let order_id = SignedReceipt::decode(bytes).ok()?.receipt().order_id;
                let o = orders.get(&order_id).filter(|o| o.node == *node_id)?;
                push(
                    o,
                    OrderEvent::Receipt {
                        node_id: *node_id,
                        bytes: bytes.clone(),
                    },
                );
            }
            RelayEvent::Traffic {
                node_id,
                order_id,
                sent,
                received,
            } => {
                let o = orders.get(order_id).filter(|o| o.node == *node_id)?;
                push(
                    o,
                    OrderEvent::Traffic {
                        sent: *sent,
                        received: *received,
                    },
                );
            }
            RelayEvent::Ended {
                node_id,
                order_id,
                reason,
                by,
            } => {
                // Only the node running an order may end it.
                orders.get(order_id).filter(|o| o.node == *node_id)?;
                let o = orders.remove(order_id)?;
                o.closed.cancel();
                push(
                    &o,
                    OrderEvent::Ended {
                        reason: *reason,
                        by: *by,
                    },
                );
            }
            RelayEvent::NodeGone { node_id, link_id } => {
                let lost: Vec<OrderId> = orders
                    .iter()
                    .filter(|(_, o)| o.node == *node_id && o.link_id == *link_id)
                    .map(|(id, _)| *id)
                    .collect();
                for id in lost {
                    if let Some(o) = orders.remove(&id) {
                        o.closed.cancel();
                        push(
                            &o,
                            OrderEvent::Ended {
                                reason: EndReason::NodeLost,
                                by: Party::Broker,
                            },
                        );
                    }
                }
                // Local orders of the node are lost as well.
                return Some(ev);
            }
        }
        None
    }

    /// The order's ledger cancelled it (that broker is shutting down): its
    /// port closes and its node ends the session.
    pub fn cancel(&self, ledger: libp2p::PeerId, order_id: OrderId) -> MeshResponse {
        let o = {
            let mut orders = self.orders();
            match orders.get(&order_id) {
                None => return MeshResponse::Acknowledged,
                Some(o) if o.ledger != ledger => {
                    return MeshResponse::Refused("not this broker's order".into());
                }
                Some(_) => orders.remove(&order_id),
            }
        };
        if let Some(o) = o {
            self.end_here(order_id, &o);
            let _ = o.events.send(OrderEvent::Ended {
                reason: EndReason::Cancelled,
                by: Party::Broker,
            });
            tracing::info!(%order_id, "order cancelled by its ledger");
        }
        MeshResponse::Acknowledged
    }

    /// Closes a served order's port and tells its node to end the session.
    fn end_here(&self, order_id: OrderId, o: &ServedOrder) {
        o.closed.cancel();
        if let Some(link) = self
            .relay
            .nodes()
            .into_iter()
            .find(|n| n.id == o.node && n.link_id == o.link_id)
        {
            link.cancel(order_id);
        }
    }

    /// Shutdown: every served order is ended as cancelled by the broker,
    /// and its ledger is given a few seconds to hear of it.
    pub async fn shutdown(&self) {
        let orders: Vec<(OrderId, ServedOrder)> = self.orders().drain().collect();
        for (order_id, o) in orders {
            self.end_here(order_id, &o);
            let _ = o.events.send(OrderEvent::Ended {
                reason: EndReason::Cancelled,
                by: Party::Broker,
            });
        }
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some order events did not reach their ledger before shutdown");
        }
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// Sends an order's events to its ledger one by one, each until it is
/// acknowledged; ends after the order's end.
async fn forward(
    mesh: Mesh,
    ledger: libp2p::PeerId,
    order_id: OrderId,
    mut queue: mpsc::UnboundedReceiver<OrderEvent>,
    stop: CancellationToken,
) {
    let mut seq = 0u64;
    while let Some(event) = queue.recv().await {
        let ended = matches!(event, OrderEvent::Ended { .. });
        let deadline = tokio::time::Instant::now() + GIVE_UP;
        let mut backoff = Duration::from_millis(200);
        loop {
            let request = MeshRequest::Event {
                order_id,
                seq,
                event: event.clone(),
            };
            match mesh.request(ledger, request).await {
                Ok(MeshResponse::Acknowledged) => break,
                Ok(other) => {
                    tracing::warn!(%order_id, seq, answer = ?other, "ledger refused an order event");
                    break;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(%order_id, seq, error = %e, "order event not delivered yet; retrying");
                }
                Err(e) => {
                    tracing::error!(%order_id, seq, error = %e, "order event given up");
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        seq += 1;
        if ended {
            return;
        }
    }
}
