//! Learning the other relays of the mesh, so that attached nodes know where
//! to go when they lose this relay: every few seconds, ask some known brokers
//! where their relay is.

use std::sync::Arc;
use std::time::Duration;

use jusy_common::wire::RelayAddr;
use tokio_util::sync::CancellationToken;

use crate::mesh::{Mesh, MeshRequest, MeshResponse, libp2p_id};
use crate::relay::Relay;

/// Relays told to nodes at most.
const TELL: usize = 8;

/// How often the list is refreshed.
const EVERY: Duration = Duration::from_secs(5);

/// Keeps `relay`'s list of other relays fresh until `stop` is cancelled.
pub async fn learn(mesh: Mesh, relay: Arc<Relay>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Ok(peers) = mesh.peers(TELL * 2).await else {
            return;
        };
        let mut found = Vec::new();
        for peer in peers {
            if found.len() >= TELL {
                break;
            }
            match mesh.request(peer, MeshRequest::Relay).await {
                Ok(MeshResponse::Relay(r)) if libp2p_id(&r.key).ok() == Some(peer) => found.push(r),
                Ok(other) => tracing::debug!(%peer, answer = ?other, "no relay address"),
                Err(e) => tracing::debug!(%peer, error = %e, "no relay address"),
            }
        }
        relay.set_other_relays(found);
    }
}

/// This broker's relay as nodes dial it.
pub fn own(advertised: &crate::relay::Advertise) -> RelayAddr {
    let host = &advertised.host;
    let addr = if host.contains(':') {
        format!("[{host}]:{}", advertised.port)
    } else {
        format!("{host}:{}", advertised.port)
    };
    RelayAddr {
        addr,
        key: advertised.relay,
    }
}
