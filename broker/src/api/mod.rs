//! The HTTP API: ordering as the original service documented it, order and
//! account views for clients and node owners, and operator endpoints. Every
//! answer is JSON; every error is `{"status":"ERROR","error":…}` with a fitting
//! HTTP status, and no error shows internals.
//!
//! * [`client`] — `/order/…` and `/account/…`.
//! * [`owner`] — `/owner/…`.
//! * [`admin`] — `/admin/…`, behind the operator's bearer token.
//! * [`client_addr`] — the client's address, behind trusted proxies too.
//! * [`serve`] — the listener: connection caps, timeouts, accept back-off.

pub mod admin;
pub mod client;
pub mod client_addr;
pub mod owner;
pub mod serve;

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::ledger::LedgerError;
use crate::limit::{Key, RateLimiter};
use crate::orders::{OrderError, Orders};
use crate::relay::Relay;
use crate::store::{AccountRecord, Role, Store, StoreError};
use jusy_common::ledger::AccountId;

/// Largest request body accepted (SSH key lists, deposits).
const MAX_BODY: usize = 64 * 1024;

/// How much of an oversized body is read (and dropped) before the refusal, so
/// that a client already sending it sees the 413 instead of a reset
/// connection; larger bodies are refused without reading.
const DRAIN_CAP: usize = 1 << 20;

/// How long an oversized body may take to drain.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct Api {
    pub orders: Arc<Orders>,
    pub relay: Arc<Relay>,
    pub store: Store,
    limiter: Arc<RateLimiter>,
    operator_token: Option<String>,
}

impl Api {
    pub fn new(
        orders: Arc<Orders>,
        relay: Arc<Relay>,
        store: Store,
        cfg: &crate::config::Config,
    ) -> Self {
        Self {
            orders,
            relay,
            store,
            limiter: Arc::new(RateLimiter::new(
                cfg.rate_limit_per_sec,
                cfg.rate_limit_burst,
            )),
            operator_token: cfg.operator_token.clone(),
        }
    }

    /// Charges one request to the client's address.
    fn limit(&self, client: IpAddr) -> Result<(), ApiError> {
        if self.limiter.allow(Key::addr(client)) {
            Ok(())
        } else {
            Err(too_many())
        }
    }

    /// Charges one request to the client's address, refuses text that is
    /// not a hash (before it is used as a key, so a flood of long or random
    /// text costs no memory), and charges the hash. The web page's "Order
    /// now" is charged here too, like `GET /order/…`.
    pub(crate) fn limit_hash(&self, client: IpAddr, hash: &str) -> Result<(), ApiError> {
        self.limit(client)?;
        let key = Key::hash(hash).ok_or_else(bad_hash)?;
        if self.limiter.allow(key) {
            Ok(())
        } else {
            Err(too_many())
        }
    }

    /// The account a request's secret hash opens, after charging the request
    /// to the rate limits: 400 for text that is not a hash, 401 for a hash
    /// that opens nothing.
    fn account(
        &self,
        client: IpAddr,
        role: Role,
        hash: &str,
    ) -> Result<(AccountId, AccountRecord), ApiError> {
        self.limit_hash(client, hash)?;
        let unknown = match role {
            Role::Client => "unknown client hash",
            Role::Owner => "unknown owner hash",
        };
        self.store
            .account(role, hash)?
            .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, unknown.into()))
    }
}

fn too_many() -> ApiError {
    crate::metrics::METRICS.limited("api");
    ApiError(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests, slow down".into(),
    )
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            axum::Json(json!({"status": "ERROR", "error": self.1})),
        )
            .into_response()
    }
}

fn internal(what: &str, e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what}");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("{what}, try again later"),
    )
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        let status = match &e {
            OrderError::UnknownClient => StatusCode::UNAUTHORIZED,
            OrderError::Insufficient { .. } => StatusCode::PAYMENT_REQUIRED,
            OrderError::LowRating { .. } => StatusCode::FORBIDDEN,
            OrderError::Unconnected { .. } => StatusCode::CONFLICT,
            OrderError::NoCapacity | OrderError::Node(_) | OrderError::Port(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            OrderError::Store(_) | OrderError::Ledger(_) | OrderError::Key => {
                return internal("order failed", &e);
            }
        };
        ApiError(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        internal("storage error", &e)
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        internal("ledger error", &e)
    }
}

fn bad_hash() -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "a hash is 64 hex characters".into(),
    )
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/order/{hash}", get(client::order))
        .route("/order/{hash}/{order_id}", get(client::order_status))
        .route("/order/{hash}/{order_id}/dispute", post(client::dispute))
        .route("/account/{hash}", get(client::account))
        .route(
            "/account/{hash}/keys",
            axum::routing::put(client::set_keys).delete(client::clear_keys),
        )
        .route("/owner/{hash}", get(owner::owner))
        .route("/admin/clients", post(admin::add_client))
        .route("/admin/owners", post(admin::add_owner))
        .route("/admin/deposits", post(admin::deposit))
        .route("/admin/orders", get(admin::orders))
        .route("/admin/audit", get(admin::audit))
        .route("/admin/disputes", get(admin::disputes))
        .route("/admin/disputes/{order_id}", post(admin::resolve))
        .route("/admin/mesh", get(admin::mesh))
        .route("/admin/mesh/trust", post(admin::admit))
        .route("/health", get(health))
        .fallback(fallback)
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here".into(),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            MAX_BODY,
            refuse_oversized,
        ))
        .with_state(api)
}

/// Refuses a request whose body is larger than `max` before any handler reads
/// it. A declared length says so at once: a client waiting for `100 Continue`
/// never sends the body; one already sending it has up to [`DRAIN_CAP`] read
/// and dropped, so that it reads the refusal rather than a reset. A body
/// without a length (chunked) is read here, up to `max`: one that turns out
/// larger is drained the same way and refused the same way, and the handler
/// gets the one that fits, already read.
pub async fn refuse_oversized(
    State(max): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::header::{CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {max} bytes"),
        )
        .into_response()
    };
    let Some(declared) = declared else {
        if !req.headers().contains_key(TRANSFER_ENCODING) {
            return next.run(req).await;
        }
        let (parts, body) = req.into_parts();
        return match read_capped(body, max).await {
            Ok(body) => {
                let req = axum::extract::Request::from_parts(parts, body.into());
                next.run(req).await
            }
            Err(Capped::TooLarge(read, rest)) => {
                let drain = axum::body::to_bytes(rest, DRAIN_CAP.saturating_sub(read));
                let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
                too_large()
            }
            Err(Capped::Broken) => ApiError(
                StatusCode::BAD_REQUEST,
                "the request body could not be read".into(),
            )
            .into_response(),
        };
    };
    if declared <= max as u64 {
        return next.run(req).await;
    }
    let waits = req
        .headers()
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !waits && declared <= DRAIN_CAP as u64 {
        let drain = axum::body::to_bytes(req.into_body(), DRAIN_CAP);
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
    too_large()
}

/// Why a body without a length was not read whole.
enum Capped {
    /// It goes on past the cap: how much was read, and the rest of it.
    TooLarge(usize, axum::body::Body),
    /// The client broke it off or sent malformed chunks.
    Broken,
}

/// Reads `body` whole if it holds at most `max` bytes.
async fn read_capped(mut body: axum::body::Body, max: usize) -> Result<bytes::Bytes, Capped> {
    use axum::body::HttpBody;
    let mut read = bytes::BytesMut::new();
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => return Ok(read.freeze()),
            Some(Err(_)) => return Err(Capped::Broken),
            Some(Ok(frame)) => {
                // Trailers carry nothing a handler reads.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if read.len() + data.len() > max {
                    return Err(Capped::TooLarge(read.len() + data.len(), body));
                }
                read.extend_from_slice(&data);
            }
        }
    }
}

/// An unknown path: a browser gets the 404 page, anything else JSON.
async fn fallback(headers: axum::http::HeaderMap) -> Response {
    if crate::web::wants_html(&headers) {
        return crate::web::not_found();
    }
    ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()).into_response()
}

async fn health(State(api): State<Api>) -> Response {
    let (nodes, free_slots) = api.relay.capacity();
    axum::Json(json!({"status": "OK", "nodes": nodes, "free_slots": free_slots})).into_response()
}
