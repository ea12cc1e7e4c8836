//! Node-owner endpoint: their nodes attached now with their ratings, and their
//! earnings.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::response::{IntoResponse, Response};
use jusy_common::ledger::Account;
use jusy_common::rating::Tally;
use serde_json::json;

use super::{Api, ApiError};
use crate::store::Role;

pub async fn owner(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let (id, _) = api.account(peer, Role::Owner, &hash)?;
    let ledger = &api.orders.ledger;
    let mut served = 0;
    let mut tallies: HashMap<String, Tally> = HashMap::new();
    for (_, rec) in ledger.orders()?.iter().filter(|(_, r)| r.owner == Some(id)) {
        served += 1;
        tallies
            .entry(rec.node_id.clone())
            .or_default()
            .add(rec.order.state);
    }
    let nodes: Vec<_> = api
        .relay
        .nodes()
        .into_iter()
        .filter(|n| n.owner == Some(id))
        .map(|n| {
            let node_id = n.id.to_string();
            let tally = tallies.get(&node_id).copied().unwrap_or_default();
            json!({
                "online": true,
                "free_slots": n.free_slots(),
                "speed_test_ms": n.speed().map(|d| d.as_millis() as u64),
                "sessions_kept": tally.kept,
                "sessions_dropped": tally.dropped,
                "rating_percent": tally.percent(),
                "node_id": node_id,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "status": "OK",
        "account_id": id.to_string(),
        "earnings_sat": ledger.balance(&Account::Owner(id))?,
        "sessions_served": served,
        "nodes": nodes,
    }))
    .into_response())
}
