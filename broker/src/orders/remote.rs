//! Orders placed on other relays of the mesh: find a free node at random
//! through the DHT, ask its relay to reserve a slot and open the order port,
//! charge, and keep the order's ledger here; then apply the events that relay
//! forwards, each sequence number once.

use std::time::Duration;

use jusy_common::capacity::{SHARDS, SignedCapacity};
use jusy_common::ledger::AccountId;
use jusy_common::order::Order;
use jusy_common::wire::OrderId;
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
/// random order, for each a random provider (relay), and a random node of
/// the statements it offers. Never a scan of all nodes.
async fn find_offer(mesh: &Mesh, deadline: Instant) -> Option<(libp2p::PeerId, SignedCapacity)> {
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
                        if let Some(offer) = take_random(&mut offers) {
                            return Some((relay, offer));
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
            let (relay, offer) = find_offer(mesh, deadline)
                .await
                .ok_or(OrderError::NoCapacity)?;
            let node_id = offer.capacity().node_id;
            let order_id = OrderId::from_random(random()?);
            let reservation = Reservation {
                order_id,
                node_id,
                authorized_keys: authorized_keys.clone(),
                connect_window_secs: self.cfg.connect_window_secs,
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
        let record = OrderRecord {
            client,
            owner: r.owner,
            node_id: node_id.to_string(),
            username: r.username.clone(),
            host: r.host.clone(),
            port: r.port,
            created_ms: now_ms(),
            order: Order::new(now_ms(), self.ledger.pricing),
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
            },
        );
        tracing::info!(%order_id, node_id = %node_id.short(), %relay, host = %r.host, port = r.port, "order placed on another relay");
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
        })
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
        {
            let mut live = self.live();
            match live.get_mut(&order_id) {
                None => return MeshResponse::Acknowledged,
                Some(l) if l.relay != Some(from) => {
                    tracing::warn!(%order_id, peer = %from, "order event from a broker that does not serve the order");
                    return MeshResponse::Refused("not this order's relay".into());
                }
                Some(l) if seq < l.next_seq => return MeshResponse::Acknowledged,
                Some(l) => l.next_seq = seq.saturating_add(1),
            }
        }
        let ev = match event {
            OrderEvent::ClientConnected => RelayEvent::ClientConnected { order_id },
            OrderEvent::ClientDisconnected => RelayEvent::ClientDisconnected { order_id },
            OrderEvent::Receipt { node_id, bytes } => RelayEvent::Receipt { node_id, bytes },
            OrderEvent::Ended { reason } => RelayEvent::Ended { order_id, reason },
        };
        blocking(|| self.apply(ev));
        MeshResponse::Acknowledged
    }
}
