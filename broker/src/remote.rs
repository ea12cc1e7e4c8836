//! What this broker answers other brokers on the mesh: the signed statements
//! of its attached nodes that have a free slot.

use std::sync::Arc;

use jusy_common::capacity;
use tokio::sync::mpsc;

use crate::mesh::{Inbound, MeshRequest, MeshResponse};
use crate::relay::Relay;

/// Answers requests until the mesh stops.
pub async fn serve(mut inbound: mpsc::UnboundedReceiver<Inbound>, relay: Arc<Relay>) {
    while let Some(Inbound {
        from,
        request,
        reply,
    }) = inbound.recv().await
    {
        let response = match request {
            MeshRequest::Offers { shard } => MeshResponse::Offers(offers(&relay, shard)),
            other => {
                tracing::warn!(peer = %from, request = ?other, "mesh request not served by this broker");
                MeshResponse::Refused("not served by this broker".into())
            }
        };
        let _ = reply.send(response);
    }
}

/// Statements of attached nodes in `shard` that have a free slot now.
fn offers(relay: &Relay, shard: u8) -> Vec<Vec<u8>> {
    relay
        .nodes()
        .iter()
        .filter(|n| n.free_slots() > 0)
        .filter_map(|n| n.capacity())
        .filter(|c| capacity::shard_of(&c.capacity().node_id) == shard)
        .map(|c| c.bytes().to_vec())
        .collect()
}
