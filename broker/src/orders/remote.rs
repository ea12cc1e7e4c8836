//! Orders placed on other relays of the mesh: find a free node at random (in
//! proportion to its rating) through the DHT, ask its relay to reserve a slot
//! and open the order port, charge, and keep the order's ledger here; then
//! apply the events that relay forwards, each sequence number once.

use std::time::Duration;

use jusy_common::capacity::{SHARDS, SignedCapacity};
use jusy_common::identity::PeerId;
use jusy_common::ledger::AccountId;
use jusy_common::order::Order;
use jusy_common::terms::SignedAcceptance;
use jusy_common::verdict::Party;
use jusy_common::wire::{EndReason, OrderId};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::{Credentials, Live, OrderError, Orders, blocking, known_hosts_host, random};
use crate::ledger::OrderRecord;
use crate::mesh::{Mesh, MeshResponse, OrderEvent, Reservation, Reserved};
use crate::relay::RelayEvent;
use crate::store::{AccountRecord, now_ms};

/// Relays asked in turn before an order is refused for want of capacity.
const ATTEMPTS: usize = 3;

/// How long one lookup of a shard's providers, or one relay's offers, may
/// take: a broker that has just died must not hold an order up.
const STEP: Duration = Duration::from_secs(2);

/// How long placing an order on another relay may take in all before it is
/// refused for want of capacity (the client asks again).
const PLACE: Duration = Duration::from_secs(10);

/// How long a relay may take to confirm a cancellation at shutdown.
const CANCEL: Duration = Duration::from_secs(3);

/// How often relays serving live orders are asked whether they are there.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// A relay silent this long is lost, and its orders with it.
const RELAY_LOST: Duration = Duration::from_secs(20);

/// How long a relay may take to reserve a slot and open the order port.
const RESERVE: Duration = Duration::from_secs(5);

/// Removes and returns a random element.
fn take_random<T>(v: &mut Vec<T>) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    let r = random::<8>().map_or(0, u64::from_le_bytes);
    let i = usize::try_from(r % v.len() as u64).unwrap_or(0);
    Some(v.swap_remove(i))
}

/// A free node somewhere else in the mesh, chosen at random: shards in a
/// random order, for each a random provider (relay), and one of the nodes it
/// offers, at random in proportion to `rating`. Never a scan of all nodes.
async fn find_offer(
    mesh: &Mesh,
    deadline: Instant,
    rating: impl Fn(&PeerId) -> u64,
) -> Option<(libp2p::PeerId, SignedCapacity)> {
    let search = async {
        let mut shards: Vec<u8> = (0..SHARDS).collect();
        while let Some(shard) = take_random(&mut shards) {
            let mut relays = match timeout(STEP, mesh.providers(shard)).await {
                Ok(Ok(relays)) => relays,
                Ok(Err(_)) => return None,
                Err(_) => {
                    tracing::debug!(shard, "provider lookup timed out");
                    continue;
                }
            };
            relays.retain(|p| *p != mesh.peer_id);
            for _ in 0..2 {
                let Some(relay) = take_random(&mut relays) else {
                    break;
                };
                match timeout(STEP, mesh.offers(relay, shard, now_ms())).await {
                    Ok(Ok(mut offers)) => {
                        let weights: Vec<u64> = offers
                            .iter()
                            .map(|o| rating(&o.capacity().node_id))
                            .collect();
                        let roll = random::<8>().map_or(0, u64::from_le_bytes);
                        if let Some(i) = jusy_common::rating::pick_weighted(&weights, roll) {
                            return Some((relay, offers.swap_remove(i)));
                        }
                    }
                    Ok(Err(e)) => tracing::info!(%relay, error = %e, "relay gave no offers"),
                    Err(_) => tracing::info!(%relay, "relay gave no offers in time"),
                }
            }
        }
        None
    };
    timeout_at(deadline, search).await.ok().flatten()
}

impl Orders {
    /// Places an order on a node of another relay; the charge and the order
    /// record are flushed here before the credentials leave.
    pub(super) async fn place_remote(
        &self,
        client: AccountId,
        account: AccountRecord,
    ) -> Result<Credentials, OrderError> {
        let mesh = self.mesh.as_ref().ok_or(OrderError::NoCapacity)?;
        let (privkey, pubkey) = super::order_key()?;
        let mut authorized_keys = vec![pubkey];
        authorized_keys.extend(account.ssh_keys);
        let deadline = Instant::now() + PLACE;
        for _ in 0..ATTEMPTS {
            let (relay, offer) = find_offer(mesh, deadline, |node| u64::from(self.rating(node)))
                .await
                .ok_or(OrderError::NoCapacity)?;
            let node_id = offer.capacity().node_id;
            let order_id = OrderId::from_random(random()?);
            let terms = self.cfg.terms();
            let reservation = Reservation {
                order_id,
                node_id,
                authorized_keys: authorized_keys.clone(),
                terms,
            };
            let reserve = mesh.request(relay, crate::mesh::MeshRequest::Reserve(reservation));
            let until = deadline.max(Instant::now() + RESERVE / 2);
            let reserved = match timeout_at(until.min(Instant::now() + RESERVE), reserve).await {
                Ok(Ok(MeshResponse::Reserved(r))) => r,
                Ok(Ok(other)) => {
                    tracing::info!(%relay, node_id = %node_id.short(), answer = ?other, "remote reservation refused");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::info!(%relay, error = %e, "remote reservation failed");
                    continue;
                }
                Err(_) => {
                    // Should the relay have reserved after all, nobody
                    // connects and its session ends as never connected.
                    tracing::info!(%relay, %order_id, "remote reservation not answered in time");
                    continue;
                }
            };
            if let Err(e) = SignedAcceptance::check(&reserved.acceptance, order_id, node_id, &terms)
            {
                tracing::warn!(%relay, node_id = %node_id.short(), error = %e, "remote node's acceptance does not hold; its session is cancelled");
                self.rate_fault(node_id);
                self.cancel_remote(vec![(order_id, relay)]).await;
                continue;
            }
            // The node's own signed statement bounds what its relay may say.
            let reserved = Reserved {
                cores: reserved.cores.min(offer.capacity().cores),
                ..reserved
            };
            return self.charge_remote(relay, order_id, node_id, reserved, client, privkey);
        }
        Err(OrderError::NoCapacity)
    }

    /// Charges a reserved remote order and makes it live here. Should the
    /// charge fail, the client never gets the port, and the relay's session
    /// ends as never connected.
    fn charge_remote(
        &self,
        relay: libp2p::PeerId,
        order_id: OrderId,
        node_id: jusy_common::identity::PeerId,
        r: Reserved,
        client: AccountId,
        privkey: String,
    ) -> Result<Credentials, OrderError> {
        let terms = self.cfg.terms();
        self.learn_owner(node_id, r.owner);
        let record = OrderRecord {
            client,
            owner: r.owner,
            node_id: node_id.to_string(),
            username: r.username.clone(),
            host: r.host.clone(),
            port: r.port,
            created_ms: now_ms(),
            order: Order::new(now_ms(), self.ledger.pricing, terms, r.cores),
            acceptance: Some(r.acceptance.clone()),
            traffic: Default::default(),
            hold: None,
        };
        blocking(|| self.ledger.reserve(order_id, &record))?;
        self.live().insert(
            order_id,
            Live {
                node: node_id,
                link_id: 0,
                relay: Some(relay),
                next_seq: 0,
                closed: CancellationToken::new(),
                receipts: jusy_common::receipt::ChainVerifier::new(order_id, node_id),
                client,
                connected: false,
            },
        );
        tracing::info!(%order_id, node_id = %node_id.short(), %relay, host = %r.host, port = r.port, "order placed on another relay");
        crate::metrics::METRICS.orders_created.inc();
        Ok(Credentials {
            status: "OK",
            username: r.username,
            order_id: order_id.to_string(),
            known_hosts: format!("{} {}", known_hosts_host(&r.host, r.port), r.host_key),
            host: r.host,
            port: r.port,
            privkey,
            host_key: r.host_key,
            node_id: node_id.to_string(),
            price_sat: record.order.pricing.price_sat,
            ssh_ciphers: super::ssh_ciphers(r.aes),
            terms,
        })
    }

    /// Tells the relays serving these orders to close their ports and end
    /// their sessions (this ledger is about to settle them); a relay that
    /// does not answer within a few seconds is left to its connect window
    /// and its own shutdown.
    pub(super) async fn cancel_remote(&self, orders: Vec<(OrderId, libp2p::PeerId)>) {
        let Some(mesh) = self.mesh.as_ref() else {
            return;
        };
        let mut asks = tokio::task::JoinSet::new();
        for (order_id, relay) in orders {
            let mesh = mesh.clone();
            asks.spawn(async move {
                let ask = mesh.request(relay, crate::mesh::MeshRequest::Cancel { order_id });
                match timeout(CANCEL, ask).await {
                    Ok(Ok(MeshResponse::Acknowledged)) => {}
                    Ok(Ok(other)) => tracing::warn!(%order_id, %relay, answer = ?other, "relay did not cancel the order"),
                    Ok(Err(e)) => tracing::warn!(%order_id, %relay, error = %e, "relay not told to cancel the order"),
                    Err(_) => tracing::warn!(%order_id, %relay, "relay did not answer the cancellation in time"),
                }
            });
        }
        while asks.join_next().await.is_some() {}
    }

    /// Until `stop`: asks every few seconds each relay that serves live
    /// orders of this ledger whether it is there; the orders of a relay
    /// that has not answered for [`RELAY_LOST`] end as NODE_LOST (their
    /// clients' connections went through it, so they are gone too).
    pub async fn watch_relays(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let Some(mesh) = self.mesh.clone() else {
            return;
        };
        let mut heard: std::collections::HashMap<libp2p::PeerId, Instant> =
            std::collections::HashMap::new();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let relays: std::collections::HashSet<libp2p::PeerId> =
                self.live().values().filter_map(|l| l.relay).collect();
            heard.retain(|r, _| relays.contains(r));
            let mut asks = tokio::task::JoinSet::new();
            for relay in relays {
                let mesh = mesh.clone();
                asks.spawn(async move {
                    let ask = mesh.request(relay, crate::mesh::MeshRequest::Relay);
                    (relay, matches!(timeout(WATCH_EVERY, ask).await, Ok(Ok(_))))
                });
            }
            while let Some(Ok((relay, answered))) = asks.join_next().await {
                let last = *heard.entry(relay).or_insert_with(Instant::now);
                if answered {
                    heard.insert(relay, Instant::now());
                } else if last.elapsed() >= RELAY_LOST {
                    tracing::warn!(%relay, silent = ?last.elapsed(), "relay lost; its orders end as NODE_LOST");
                    let lost: Vec<OrderId> = self
                        .live()
                        .iter()
                        .filter(|(_, l)| l.relay == Some(relay))
                        .map(|(id, _)| *id)
                        .collect();
                    for order_id in lost {
                        if let Err(e) =
                            blocking(|| self.end(order_id, EndReason::NodeLost, Party::Broker))
                        {
                            tracing::error!(%order_id, error = %e, "ledger update failed");
                        }
                    }
                    heard.remove(&relay);
                }
            }
        }
    }

    /// Applies an event a relay forwarded for one of this ledger's orders.
    /// Repeats (sequence numbers already applied) and events of orders no
    /// longer live are acknowledged without effect; ends are idempotent.
    pub fn apply_remote(
        &self,
        from: libp2p::PeerId,
        order_id: OrderId,
        seq: u64,
        event: OrderEvent,
    ) -> MeshResponse {
        let node_id = {
            let mut live = self.live();
            match live.get_mut(&order_id) {
                None => return MeshResponse::Acknowledged,
                Some(l) if l.relay != Some(from) => {
                    tracing::warn!(%order_id, peer = %from, "order event from a broker that does not serve the order");
                    return MeshResponse::Refused("not this order's relay".into());
                }
                Some(l) if seq < l.next_seq => return MeshResponse::Acknowledged,
                Some(l) => {
                    l.next_seq = seq.saturating_add(1);
                    l.node
                }
            }
        };
        let ev = match event {
            OrderEvent::ClientConnected => RelayEvent::ClientConnected { order_id },
            OrderEvent::ClientDisconnected => RelayEvent::ClientDisconnected { order_id },
            OrderEvent::Receipt { node_id, bytes } => RelayEvent::Receipt { node_id, bytes },
            OrderEvent::Ended { reason, by } => RelayEvent::Ended {
                node_id,
                order_id,
                reason,
                by,
            },
            OrderEvent::Traffic { sent, received } => RelayEvent::Traffic {
                node_id,
                order_id,
                sent,
                received,
            },
        };
        blocking(|| self.apply(ev));
        MeshResponse::Acknowledged
    }
}
