//! Letting a broker into a running mesh: the operator admits its peer id on
//! any broker (`POST /admin/mesh/trust`); that broker trusts it from then on,
//! keeps it in its database, and tells the brokers it knows, which do the
//! same. A new broker learns the whole list from the broker it joins, so it
//! starts with one command.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::mesh::{Mesh, MeshError, MeshRequest, MeshResponse};
use crate::store::Store;

/// How often a broker compares its list with another broker's once it has
/// one; more often until the first answer.
const EVERY: Duration = Duration::from_secs(30);
const FIRST: Duration = Duration::from_secs(1);

/// Brokers told of an admission at most.
const TELL: usize = 64;

/// Why an admission failed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("storing the admitted brokers: {0}")]
    Store(String),
}

/// Trusts `peers` from now on, keeps the new ones in the database and tells
/// the brokers this one knows. Returns the newly admitted.
pub async fn admit(
    mesh: &Mesh,
    store: &Store,
    peers: Vec<libp2p::PeerId>,
) -> Result<Vec<libp2p::PeerId>, TrustError> {
    let peers: Vec<libp2p::PeerId> = peers.into_iter().filter(|p| *p != mesh.peer_id).collect();
    let new = mesh.admit(peers).await?;
    if new.is_empty() {
        return Ok(new);
    }
    let text: Vec<String> = new.iter().map(ToString::to_string).collect();
    let keep = store.clone();
    let kept = text.clone();
    tokio::task::spawn_blocking(move || keep.admit_brokers(&kept))
        .await
        .map_err(|e| TrustError::Store(e.to_string()))?
        .map_err(|e| TrustError::Store(e.to_string()))?;
    tracing::info!(peers = ?text, "brokers admitted to the mesh");
    for peer in mesh.peers(TELL).await? {
        if new.contains(&peer) {
            continue;
        }
        let (mesh, peers) = (mesh.clone(), text.clone());
        tokio::spawn(async move {
            match mesh.request(peer, MeshRequest::Admit { peers }).await {
                Ok(MeshResponse::Acknowledged) => {}
                Ok(other) => tracing::debug!(%peer, answer = ?other, "admission not taken"),
                Err(e) => tracing::debug!(%peer, error = %e, "admission not told"),
            }
        });
    }
    Ok(new)
}

/// Parses mesh peer ids as brokers send them; drops what does not parse.
pub fn parse_all(peers: &[String]) -> Vec<libp2p::PeerId> {
    peers.iter().filter_map(|p| p.parse().ok()).collect()
}

/// Until `stop`: asks a known broker for its list and admits what is
/// missing here, so a broker that joined (or missed an admission while it
/// was down) catches up.
pub async fn keep(mesh: Mesh, store: Store, stop: CancellationToken) {
    let mut wait = FIRST;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        let Ok(peers) = mesh.peers(8).await else {
            return;
        };
        let mut answered = false;
        for peer in peers {
            let Ok(MeshResponse::Trusted(list)) = mesh.request(peer, MeshRequest::Trusted).await
            else {
                continue;
            };
            if let Err(e) = admit(&mesh, &store, parse_all(&list)).await {
                tracing::warn!(error = %e, "brokers not admitted");
            }
            answered = true;
            wait = EVERY;
            break;
        }
        if !answered {
            // Nobody answers: refused before the operator admitted this
            // broker, maybe; try the brokers it joined through again.
            let _ = mesh.rejoin();
            wait = (wait * 2).min(EVERY);
        }
    }
}
