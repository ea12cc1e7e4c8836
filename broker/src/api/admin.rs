//! Operator endpoints, behind `Authorization: Bearer <operator_token>`:
//! creating accounts, crediting deposits, listing orders, auditing the books,
//! and letting brokers into the mesh.

use std::net::IpAddr;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jusy_common::ledger::{Account, AccountId};
use serde::Deserialize;
use serde_json::json;

use super::client::{hold_error, order_json};
use super::client_addr::ClientIp;
use super::{Api, ApiError};
use crate::store::Role;

/// Checks the bearer token in constant time (`subtle`: no early exit on the
/// first differing byte).
fn authorize(api: &Api, peer: IpAddr, headers: &HeaderMap) -> Result<(), ApiError> {
    api.limit(peer)?;
    let denied = || ApiError(StatusCode::UNAUTHORIZED, "operator token required".into());
    let expected = api.operator_token.as_deref().ok_or_else(denied)?;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(denied)?;
    if crate::web::session::same_secret(given, expected) {
        Ok(())
    } else {
        Err(denied())
    }
}

fn created(role: Role, hash: String, id: AccountId) -> Response {
    let key = match role {
        Role::Client => "client_hash",
        Role::Owner => "owner_hash",
    };
    (
        StatusCode::CREATED,
        axum::Json(json!({"status": "OK", key: hash, "account_id": id.to_string()})),
    )
        .into_response()
}

pub async fn add_client(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let (hash, id) = api.store.add_account(Role::Client)?;
    Ok(created(Role::Client, hash, id))
}

pub async fn add_owner(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let (hash, id) = api.store.add_account(Role::Owner)?;
    Ok(created(Role::Owner, hash, id))
}

/// A deposit credited by the operator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deposit {
    pub account_id: String,
    pub role: Role,
    pub amount_sat: u64,
}

pub async fn deposit(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    body: Result<axum::Json<Deposit>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let axum::Json(d) = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let bad = |m: &str| ApiError(StatusCode::BAD_REQUEST, m.into());
    let id: AccountId = d
        .account_id
        .parse()
        .map_err(|_| bad("account_id is 64 hex characters"))?;
    if d.amount_sat == 0 {
        return Err(bad("amount_sat must be positive"));
    }
    if api.store.account_by_id(d.role, &id)?.is_none() {
        return Err(ApiError(StatusCode::NOT_FOUND, "no such account".into()));
    }
    let account = match d.role {
        Role::Client => Account::Client(id),
        Role::Owner => Account::Owner(id),
    };
    let balance = tokio::task::block_in_place(|| api.orders.ledger.deposit(account, d.amount_sat))
        .map_err(|e| match e {
            crate::ledger::LedgerError::Money(m) => ApiError(StatusCode::CONFLICT, m.to_string()),
            e => e.into(),
        })?;
    Ok(axum::Json(json!({"status": "OK", "balance_sat": balance})).into_response())
}

pub async fn orders(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let ledger = &api.orders.ledger;
    let list: Vec<_> = ledger
        .orders()?
        .iter()
        .map(|(id, rec)| order_json(*id, rec, &[]))
        .collect();
    Ok(axum::Json(json!({"status": "OK", "orders": list})).into_response())
}

pub async fn audit(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let audit = tokio::task::block_in_place(|| api.orders.ledger.audit())?;
    Ok(axum::Json(json!({"status": "OK", "audit": audit})).into_response())
}

/// Open disputes, oldest first, with their orders.
pub async fn disputes(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let ledger = &api.orders.ledger;
    let list: Vec<_> = tokio::task::block_in_place(|| ledger.open_disputes())?
        .iter()
        .map(|(id, rec)| {
            let mut o = order_json(*id, rec, &[]);
            if let Some(fields) = o.as_object_mut() {
                fields.insert("client_id".into(), json!(rec.client.to_string()));
                fields.insert("owner_id".into(), json!(rec.owner.map(|o| o.to_string())));
            }
            o
        })
        .collect();
    Ok(axum::Json(json!({"status": "OK", "disputes": list})).into_response())
}

/// The operator's decision on a dispute.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "action")]
pub enum Decision {
    /// Refund `amount_sat` (all that is held when absent) to the client.
    Refund {
        amount_sat: Option<u64>,
    },
    Reject,
}

/// `POST /admin/disputes/<order_id>` with `{"action":"refund"}` (optionally
/// `"amount_sat"`) or `{"action":"reject"}`.
pub async fn resolve(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    axum::extract::Path(order_id): axum::extract::Path<String>,
    body: Result<axum::Json<Decision>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let id: jusy_common::wire::OrderId = order_id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "malformed order id: 24 hexadecimal characters".into(),
        )
    })?;
    let axum::Json(decision) = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let hold =
        tokio::task::block_in_place(|| decide(&api.orders, id, decision)).map_err(hold_error)?;
    Ok(axum::Json(json!({
        "status": "OK",
        "order_id": id.to_string(),
        "hold": super::client::hold_json(&hold, crate::store::now_ms()),
    }))
    .into_response())
}

/// Applies the operator's decision (the API's and the operator page's). A
/// refund upholds the client's complaint: it counts against the node's
/// rating (and its owner's) as a failed session does.
pub fn decide(
    orders: &crate::orders::Orders,
    id: jusy_common::wire::OrderId,
    decision: Decision,
) -> Result<jusy_common::hold::Hold, crate::ledger::LedgerError> {
    use jusy_common::hold::Resolution;
    let ledger = &orders.ledger;
    let resolution = match decision {
        Decision::Reject => Resolution::Reject,
        Decision::Refund { amount_sat } => {
            let held = ledger
                .order(id)?
                .and_then(|r| r.hold)
                .map_or(0, |h| h.amount_sat);
            Resolution::Refund(amount_sat.unwrap_or(held))
        }
    };
    let hold = ledger.resolve(id, resolution, crate::store::now_ms())?;
    if hold.dispute.as_ref().is_some_and(|d| d.refunded_sat > 0)
        && let Some(node) = ledger.order(id)?.and_then(|r| r.node_id.parse().ok())
    {
        orders.rate_fault(node);
    }
    Ok(hold)
}

fn mesh_of(api: &Api) -> Result<&crate::mesh::Mesh, ApiError> {
    api.orders
        .mesh()
        .ok_or_else(|| ApiError(StatusCode::CONFLICT, "this broker is not in a mesh".into()))
}

fn mesh_failed(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// This broker's place in the mesh and the brokers it lets in.
pub async fn mesh(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let mesh = mesh_of(&api)?;
    let trusted: Vec<String> = mesh
        .trusted()
        .await
        .map_err(mesh_failed)?
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok(axum::Json(json!({
        "status": "OK",
        "mesh_peer_id": mesh.peer_id.to_string(),
        "mesh": mesh.addr.to_string(),
        "trusted": trusted,
    }))
    .into_response())
}

/// A broker to let into the mesh: its broker key or mesh peer id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admit {
    pub peer: String,
}

/// Lets a broker into the mesh: this broker and every broker it knows trust
/// it from now on (and after restarts).
pub async fn admit(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    body: Result<axum::Json<Admit>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&api, peer, &headers)?;
    let axum::Json(a) = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let mesh = mesh_of(&api)?;
    let broker = crate::mesh::parse_peer(&a.peer)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if broker == mesh.peer_id {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "that is this broker".into(),
        ));
    }
    let new = crate::remote::trust::admit(mesh, &api.store, vec![broker])
        .await
        .map_err(mesh_failed)?;
    Ok(axum::Json(json!({
        "status": "OK",
        "mesh_peer_id": broker.to_string(),
        "admitted": !new.is_empty(),
    }))
    .into_response())
}
