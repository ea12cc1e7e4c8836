//! Client endpoints: ordering (`GET /order/<hash>`, exactly as the original
//! service documented it), an order's state with its receipts and amounts, a
//! dispute of what the order paid its node's owner, the account, and the
//! client's own SSH keys.

use axum::extract::rejection::{JsonRejection, StringRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jusy_common::hold::Hold;
use jusy_common::ledger::Account;
use jusy_common::order::OrderState;
use jusy_common::wire::OrderId;
use russh::keys::ssh_key::public::KeyData;
use serde_json::json;

use super::client_addr::ClientIp;
use super::{Api, ApiError};
use crate::ledger::{LedgerError, OrderRecord};
use crate::store::{Role, now_ms};

/// Most SSH keys a client may register.
const MAX_KEYS: usize = 16;
/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

pub async fn order(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    api.limit_hash(peer, &hash)?;
    let creds = api.orders.create(&hash).await?;
    Ok(axum::Json(creds).into_response())
}

/// An order as its client sees it.
pub fn order_json(id: OrderId, rec: &OrderRecord, receipts: &[Vec<u8>]) -> serde_json::Value {
    let o = &rec.order;
    let (finished, cancelled, reason) = match o.state {
        OrderState::Finished(r) => (true, false, Some(r.code())),
        OrderState::Cancelled(r) => (true, true, Some(r.code())),
        OrderState::Reserved | OrderState::Connected => (false, false, None),
    };
    json!({
        "status": "OK",
        "order_id": id.to_string(),
        "state": o.state.code(),
        "finished": finished,
        "cancelled": cancelled,
        "reason": reason,
        "username": rec.username,
        "host": rec.host,
        "port": rec.port,
        "node_id": rec.node_id,
        "created_ms": rec.created_ms,
        "first_connect_ms": o.first_connect_ms,
        "price_sat": o.pricing.price_sat,
        "terms": o.terms,
        "acceptance": rec.acceptance.as_ref().map(hex::encode),
        "cores": o.cores,
        "proven_cpu_us": o.proven_cpu_us,
        "claimed_cpu_us": o.claimed_cpu_us,
        "implausible_receipts": o.implausible,
        "settlement": o.settlement,
        "net_sent_bytes": rec.traffic.sent,
        "net_received_bytes": rec.traffic.received,
        "verdict": o.verdict,
        "hold": rec.hold.as_ref().map(|h| hold_json(h, now_ms())),
        "receipts": receipts.iter().map(hex::encode).collect::<Vec<_>>(),
    })
}

/// The owner's earnings from an order while held, and any dispute of them
/// (without the owner's account id).
pub fn hold_json(h: &Hold, now: u64) -> serde_json::Value {
    json!({
        "state": h.state,
        "amount_sat": h.amount_sat,
        "until_ms": h.until_ms,
        "disputable": h.disputable(now),
        "released_ms": h.released_ms,
        "dispute": h.dispute,
    })
}

/// The status and words of a dispute or decision that failed.
pub fn hold_error(e: LedgerError) -> ApiError {
    use jusy_common::hold::HoldError;
    let status = match &e {
        LedgerError::UnknownOrder(_) => {
            return ApiError(StatusCode::NOT_FOUND, "no such order".into());
        }
        LedgerError::Hold(HoldError::BadReason | HoldError::TooMuch { .. }) => {
            StatusCode::BAD_REQUEST
        }
        LedgerError::NothingHeld(_) | LedgerError::Hold(_) => StatusCode::CONFLICT,
        _ => return e.into(),
    };
    ApiError(status, e.to_string())
}

fn parse_order_id(order_id: &str) -> Result<OrderId, ApiError> {
    order_id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "malformed order id: 24 hexadecimal characters".into(),
        )
    })
}

/// The body of a dispute.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisputeBody {
    pub reason: String,
}

/// `POST /order/<hash>/<order_id>/dispute` with `{"reason": …}`: the client
/// disputes what its order paid the node's owner, while those earnings are
/// held. 409 when nothing is held, the hold has ended, or the order is
/// disputed already.
pub async fn dispute(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    Path((hash, order_id)): Path<(String, String)>,
    body: Result<axum::Json<DisputeBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (client, _) = api.account(peer, Role::Client, &hash)?;
    let id = parse_order_id(&order_id)?;
    let axum::Json(body) = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let hold = tokio::task::block_in_place(|| {
        api.orders
            .ledger
            .dispute(id, client, &body.reason, now_ms())
    })
    .map_err(hold_error)?;
    Ok(axum::Json(json!({
        "status": "OK",
        "order_id": id.to_string(),
        "hold": hold_json(&hold, now_ms()),
    }))
    .into_response())
}

pub async fn order_status(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    Path((hash, order_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (client, _) = api.account(peer, Role::Client, &hash)?;
    let not_found = || ApiError(StatusCode::NOT_FOUND, "no such order".into());
    let id = parse_order_id(&order_id)?;
    // Another client's order answers exactly like a missing one.
    let rec = api
        .orders
        .ledger
        .order(id)?
        .filter(|r| r.client == client)
        .ok_or_else(not_found)?;
    let receipts = api.orders.ledger.receipts(id)?;
    Ok(axum::Json(order_json(id, &rec, &receipts)).into_response())
}

pub async fn account(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let (id, record) = api.account(peer, Role::Client, &hash)?;
    let ledger = &api.orders.ledger;
    let orders: Vec<_> = ledger
        .orders()?
        .into_iter()
        .filter(|(_, r)| r.client == id)
        .rev()
        .take(20)
        .map(|(oid, r)| {
            json!({
                "order_id": oid.to_string(),
                "state": r.order.state.code(),
                "created_ms": r.created_ms,
                "proven_cpu_us": r.order.proven_cpu_us,
                "settlement": r.order.settlement,
            })
        })
        .collect();
    let rating = api.orders.client_tally(&id);
    Ok(axum::Json(json!({
        "status": "OK",
        "account_id": id.to_string(),
        "balance_sat": ledger.balance(&Account::Client(id))?,
        "price_sat": ledger.pricing.price_sat,
        "rating_percent": rating.percent(),
        "sessions_clean": rating.clean,
        "sessions_broke_limits": rating.broke_limits,
        "ssh_keys": record.ssh_keys,
        "orders": orders,
    }))
    .into_response())
}

/// Checks one OpenSSH public key line and returns it in canonical form.
pub fn validate_key(line: &str) -> Result<String, String> {
    let key = russh::keys::PublicKey::from_openssh(line)
        .map_err(|e| format!("not an OpenSSH public key: {e}"))?;
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) => {}
        KeyData::Rsa(rsa) => {
            let n = rsa.n().as_positive_bytes().unwrap_or_default();
            let bits = n
                .first()
                .map_or(0, |b| (n.len() - 1) * 8 + (8 - b.leading_zeros() as usize));
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed"
                ));
            }
        }
        other => {
            return Err(format!(
                "{} keys are not accepted; use ed25519, ecdsa or rsa",
                other.algorithm()
            ));
        }
    }
    key.to_openssh().map_err(|e| e.to_string())
}

/// Replaces the client's own SSH public keys (one per line).
pub async fn set_keys(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    Path(hash): Path<String>,
    body: Result<String, StringRejection>,
) -> Result<Response, ApiError> {
    let (id, _) = api.account(peer, Role::Client, &hash)?;
    let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let mut keys = Vec::new();
    for line in body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let key = validate_key(line).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    if keys.len() > MAX_KEYS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_KEYS} keys"),
        ));
    }
    api.store.set_client_keys(&id, keys.clone())?;
    Ok(axum::Json(json!({"status": "OK", "ssh_keys": keys})).into_response())
}

/// Removes all of the client's own SSH public keys.
pub async fn clear_keys(
    State(api): State<Api>,
    ClientIp(peer): ClientIp,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let (id, _) = api.account(peer, Role::Client, &hash)?;
    api.store.set_client_keys(&id, Vec::new())?;
    Ok(axum::Json(json!({"status": "OK", "ssh_keys": []})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPPrN1XOn9607vMwg1FUoLwL1i/+3TtvR4loDRGehsQ4 me@host";
        assert!(validate_key(ed).is_ok());
        assert!(validate_key("ssh-ed25519 garbage").is_err());
        assert!(validate_key("hello").is_err());
        // A 1024-bit RSA key.
        let weak = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDKqcmzqUE6pmZrOY1NNzDZKSkWrI3yIbNXotpL0q4mKLGpAyNN/BkhNvs28ovAMMH6ZpZm79kdNJrfQHrlJ+UzOnBtNvYS6URMHdrHS5C1ud1bqKe0p/JoxOFmxEEJg1Hgq5+/WqT/xjCjIbuu0x6LdYMnBeBLefzd0Pnkx9n+Ew==";
        assert!(matches!(validate_key(weak), Err(e) if e.contains("1024 bits")));
    }
}
