//! Node-owner endpoint: their nodes attached now with their ratings, and their
//! earnings: released (`earnings_sat`, theirs to withdraw), still in their
//! hold, and disputed by clients.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use jusy_common::ledger::Account;
use serde_json::json;

use super::client_addr::ClientIp;
use super::{Api, ApiError};
use crate::store::Role;

pub async fn owner(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let (id, _) = api.account(peer, Role::Owner, &hash)?;
    let nodes: Vec<_> = api
        .relay
        .nodes()
        .into_iter()
        .filter(|n| n.owner == Some(id))
        .map(|n| {
            let tally = api.orders.tally(&n.id);
            json!({
                "node_id": n.id.to_string(),
                "online": true,
                "free_slots": n.free_slots(),
                "speed_test_ms": n.speed().map(|d| d.as_millis() as u64),
                "sessions_kept": tally.kept,
                "sessions_dropped": tally.dropped,
                "rating_percent": api.orders.rating_with_owner(&n.id, n.owner),
            })
        })
        .collect();
    let ledger = &api.orders.ledger;
    let served = ledger
        .orders()?
        .iter()
        .filter(|(_, r)| r.owner == Some(id))
        .count();
    let (held, disputed) = tokio::task::block_in_place(|| ledger.owner_held(id))?;
    Ok(axum::Json(json!({
        "status": "OK",
        "account_id": id.to_string(),
        "earnings_sat": ledger.balance(&Account::Owner(id))?,
        "held_sat": held,
        "disputed_sat": disputed,
        "sessions_served": served,
        "nodes": nodes,
    }))
    .into_response())
}
