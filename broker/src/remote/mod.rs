//! What this broker answers other brokers on the mesh: the signed statements
//! of its attached nodes that have a free slot, reservations on them
//! ([`served`]), where its relay is, and the events of orders whose ledger
//! is here; and learning where the other relays are ([`relays`]).

pub mod relays;
pub mod served;
pub mod trust;

pub use served::Served;

use std::sync::Arc;

use jusy_common::capacity;
use tokio::sync::mpsc;

use crate::mesh::{Inbound, Mesh, MeshRequest, MeshResponse};
use crate::orders::Orders;
use crate::relay::Relay;
use crate::store::Store;
use tokio::task::JoinSet;

/// Answers requests until the mesh stops; each in its own task, since a
/// reservation waits for a node.
pub async fn serve(
    mut inbound: mpsc::UnboundedReceiver<Inbound>,
    relay: Arc<Relay>,
    served: Arc<Served>,
    orders: Arc<Orders>,
    mesh: Mesh,
    store: Store,
) {
    let mut tasks = JoinSet::new();
    loop {
        let next = tokio::select! {
            next = inbound.recv() => next,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let Some(Inbound {
            from,
            request,
            reply,
        }) = next
        else {
            break;
        };
        let (relay, served, orders) = (relay.clone(), served.clone(), orders.clone());
        let (mesh, store) = (mesh.clone(), store.clone());
        tasks.spawn(async move {
            let response = match request {
                MeshRequest::Offers { shard } => MeshResponse::Offers(offers(&relay, shard)),
                MeshRequest::Reserve(r) => served.reserve(from, r).await,
                MeshRequest::Relay => match &relay.advertise {
                    Some(a) => MeshResponse::Relay(relays::own(a)),
                    None => MeshResponse::Refused("no relay here".into()),
                },
                MeshRequest::Event {
                    order_id,
                    seq,
                    event,
                } => orders.apply_remote(from, order_id, seq, event),
                MeshRequest::Cancel { order_id } => served.cancel(from, order_id),
                MeshRequest::Admit { peers } => {
                    match trust::admit(&mesh, &store, trust::parse_all(&peers)).await {
                        Ok(_) => MeshResponse::Acknowledged,
                        Err(e) => MeshResponse::Refused(e.to_string()),
                    }
                }
                MeshRequest::Trusted => match mesh.trusted().await {
                    Ok(peers) => {
                        MeshResponse::Trusted(peers.iter().map(ToString::to_string).collect())
                    }
                    Err(e) => MeshResponse::Refused(e.to_string()),
                },
            };
            let _ = reply.send(response);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Statements of attached nodes in `shard` that have a free slot now (at
/// most `MAX_OFFERS` of them).
fn offers(relay: &Relay, shard: u8) -> Vec<Vec<u8>> {
    relay
        .nodes()
        .iter()
        .filter(|n| n.free_slots() > 0)
        .filter_map(|n| n.capacity())
        .filter(|c| capacity::shard_of(&c.capacity().node_id) == shard)
        .map(|c| c.bytes().to_vec())
        .take(crate::mesh::protocol::MAX_OFFERS)
        .collect()
}
