//! The HTTP API: `GET /order/<client hash>` as the original service documented
//! it, order status, client SSH keys, and a health endpoint. Every error is JSON
//! `{"status":"ERROR","error":…}` with a fitting HTTP status.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::json;

use crate::orders::{OrderError, Orders};
use crate::relay::Relay;
use crate::store::{Store, valid_hash};

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct Api {
    pub orders: Arc<Orders>,
    pub relay: Arc<Relay>,
    pub store: Store,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            axum::Json(json!({"status": "ERROR", "error": self.1})),
        )
            .into_response()
    }
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        let status = match &e {
            OrderError::UnknownClient => StatusCode::UNAUTHORIZED,
            OrderError::NoCapacity | OrderError::Node(_) | OrderError::Port(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            OrderError::Store(_) | OrderError::Key => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "order failed");
        }
        ApiError(status, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "storage error");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "storage error".into())
    }
}

fn check_hash(hash: &str) -> Result<(), ApiError> {
    if valid_hash(hash) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a client hash is 64 hex characters".into(),
        ))
    }
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/order/{hash}", get(order))
        .route("/order/{hash}/{order_id}", get(order_status))
        .route("/account/{hash}/keys", put(set_keys))
        .route("/health", get(health))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(api)
}

async fn order(State(api): State<Api>, Path(hash): Path<String>) -> Result<Response, ApiError> {
    check_hash(&hash)?;
    let creds = api.orders.create(&hash).await?;
    Ok(axum::Json(creds).into_response())
}

async fn order_status(
    State(api): State<Api>,
    Path((hash, order_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_hash(&hash)?;
    if api.store.client(&hash)?.is_none() {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "unknown client hash".into(),
        ));
    }
    // Another client's order answers exactly like a missing one.
    let rec = api
        .orders
        .get(&hash, &order_id)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "no such order".into()))?;
    Ok(axum::Json(json!({
        "status": "OK",
        "order_id": order_id,
        "state": rec.state,
        "username": rec.username,
        "port": rec.port,
        "node_id": rec.node_id,
    }))
    .into_response())
}

/// Replaces the client's own SSH public keys (one per line; empty body clears them).
async fn set_keys(
    State(api): State<Api>,
    Path(hash): Path<String>,
    body: String,
) -> Result<Response, ApiError> {
    check_hash(&hash)?;
    let mut keys = Vec::new();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let key = russh::keys::PublicKey::from_openssh(line).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("not an OpenSSH public key: {e}"),
            )
        })?;
        keys.push(
            key.to_openssh()
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?,
        );
    }
    if !api.store.set_client_keys(&hash, keys.clone())? {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "unknown client hash".into(),
        ));
    }
    Ok(axum::Json(json!({"status": "OK", "keys": keys})).into_response())
}

async fn health(State(api): State<Api>) -> Response {
    let (nodes, free_slots) = api.relay.capacity();
    axum::Json(json!({"status": "OK", "nodes": nodes, "free_slots": free_slots})).into_response()
}
