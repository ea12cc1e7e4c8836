//! The client's pages: balance and how to top up, their own SSH keys,
//! "Order now" with a ready-to-paste `ssh` command, the order's key to
//! download, and the order history with receipts and a CPU chart.

use askama::Template;
use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use jusy_common::ledger::{Account, AccountId};
use serde::Deserialize;

use super::session::{MadeOrder, Session, Who};
use super::view::{Chart, HEIGHT, OrderRow, WIDTH, cpu, duration_words, sat};
use super::{Nav, Web, WebError, bad_form, render};
use crate::api::ApiError;
use crate::api::client::validate_key;
use crate::api::client_addr::ClientIp;
use crate::orders::OrderError;

/// Keys a client may register, as the API allows.
const MAX_KEYS: usize = 16;
/// Orders shown in the history and the chart.
const HISTORY: usize = 30;

/// The logged-in client, or a redirect to the log-in page.
fn client(web: &Web, headers: &HeaderMap) -> Result<(Session, String, AccountId), WebError> {
    let session = web.sessions.find(headers).ok_or(WebError::Login)?;
    match &session.who {
        Who::Client { hash, id } => {
            let (hash, id) = (hash.clone(), *id);
            Ok((session, hash, id))
        }
        _ => Err(WebError::Login),
    }
}

#[derive(Template)]
#[template(path = "client.html")]
struct Dashboard {
    nav: Option<Nav>,
    csrf: String,
    account_id: String,
    balance: String,
    price: String,
    can_order: bool,
    /// The client's rating (percent), what orders need, and its sessions of
    /// the rating's days: all, and those that broke limits.
    rating: u8,
    min_rating: u8,
    rated_sessions: u32,
    broke_limits: u32,
    /// Orders that may wait for a first log-in at once.
    max_unconnected: u32,
    keys: Vec<String>,
    orders: Vec<OrderRow>,
    chart: Chart,
    width: u32,
    height: u32,
    error: Option<String>,
    key_text: String,
    /// How long owners' earnings are held, in words.
    hold: String,
}

/// Renders the dashboard, with `error` shown above the form that failed.
fn render_dashboard(
    web: &Web,
    session: &Session,
    id: AccountId,
    status: StatusCode,
    error: Option<String>,
    key_text: String,
) -> Result<Response, WebError> {
    let ledger = &web.api.orders.ledger;
    let record = web
        .api
        .store
        .account_by_id(crate::store::Role::Client, &id)?
        .ok_or(WebError::Login)?;
    let balance = ledger.balance(&Account::Client(id))?;
    let tally = web.api.orders.client_tally(&id);
    let min_rating = web.api.orders.min_client_rating();
    let mut orders = Vec::new();
    for (oid, rec) in ledger
        .orders()?
        .into_iter()
        .filter(|(_, r)| r.client == id)
        .rev()
        .take(HISTORY)
    {
        orders.push(OrderRow::new(oid, &rec, &ledger.receipts(oid)?));
    }
    let bars: Vec<(String, u64)> = orders
        .iter()
        .rev()
        .map(|o| (format!("{} {}: {}", o.created, o.short_id, o.cpu), o.cpu_us))
        .collect();
    let page = Dashboard {
        nav: Some(Nav::of(session)),
        csrf: session.csrf.clone(),
        account_id: id.to_string(),
        balance: sat(balance),
        price: sat(ledger.pricing.price_sat),
        can_order: balance >= ledger.pricing.price_sat && tally.percent() >= min_rating,
        rating: tally.percent(),
        min_rating,
        rated_sessions: tally.clean.saturating_add(tally.broke_limits),
        broke_limits: tally.broke_limits,
        max_unconnected: web.api.orders.max_unconnected_orders(),
        keys: record.ssh_keys,
        chart: Chart::bars(&bars, cpu),
        width: WIDTH,
        height: HEIGHT,
        orders,
        error,
        key_text,
        hold: duration_words(ledger.hold_ms),
    };
    Ok(render(status, &page))
}

pub async fn dashboard(State(web): State<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    let (session, _, id) = client(&web, &headers)?;
    render_dashboard(&web, &session, id, StatusCode::OK, None, String::new())
}

#[derive(Debug, Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
}

pub async fn add_key(
    State(web): State<Web>,
    headers: HeaderMap,
    form: Result<Form<KeyForm>, FormRejection>,
) -> Result<Response, WebError> {
    let Form(form) = form.map_err(bad_form)?;
    let (session, _, id) = client(&web, &headers)?;
    if !session.csrf_ok(&form.csrf) {
        return Err(WebError::Csrf);
    }
    let refuse = |msg: String| {
        render_dashboard(
            &web,
            &session,
            id,
            StatusCode::BAD_REQUEST,
            Some(msg),
            form.key.clone(),
        )
    };
    let mut keys = web
        .api
        .store
        .account_by_id(crate::store::Role::Client, &id)?
        .map(|r| r.ssh_keys)
        .unwrap_or_default();
    let mut added = 0;
    for line in form
        .key
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match validate_key(line) {
            Ok(key) if !keys.contains(&key) => {
                keys.push(key);
                added += 1;
            }
            Ok(_) => {}
            Err(e) => return refuse(format!("This key was not added: {e}.")),
        }
    }
    if added == 0 && keys.is_empty() {
        return refuse("Paste an OpenSSH public key (ssh-ed25519 AAAA…).".into());
    }
    if keys.len() > MAX_KEYS {
        return refuse(format!("At most {MAX_KEYS} keys; remove one first."));
    }
    web.api.store.set_client_keys(&id, keys)?;
    Ok(Redirect::to("/client#keys").into_response())
}

#[derive(Debug, Deserialize)]
pub struct RemoveKeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
}

pub async fn remove_key(
    State(web): State<Web>,
    headers: HeaderMap,
    form: Result<Form<RemoveKeyForm>, FormRejection>,
) -> Result<Response, WebError> {
    let Form(form) = form.map_err(bad_form)?;
    let (session, _, id) = client(&web, &headers)?;
    if !session.csrf_ok(&form.csrf) {
        return Err(WebError::Csrf);
    }
    let store = &web.api.store;
    let mut keys = store
        .account_by_id(crate::store::Role::Client, &id)?
        .map(|r| r.ssh_keys)
        .unwrap_or_default();
    keys.retain(|k| *k != form.key);
    store.set_client_keys(&id, keys)?;
    Ok(Redirect::to("/client#keys").into_response())
}

#[derive(Debug, Deserialize)]
pub struct DisputeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// Disputes what one of the client's orders paid its node's owner, while
/// it is held; the refusal (hold ended, disputed already, no reason) is
/// shown above the orders.
pub async fn dispute(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
    form: Result<Form<DisputeForm>, FormRejection>,
) -> Result<Response, WebError> {
    let Form(form) = form.map_err(bad_form)?;
    let (session, _, id) = client(&web, &headers)?;
    if !session.csrf_ok(&form.csrf) {
        return Err(WebError::Csrf);
    }
    let order: jusy_common::wire::OrderId = order_id.parse().map_err(|_| WebError::NotFound)?;
    let ledger = &web.api.orders.ledger;
    match tokio::task::block_in_place(|| {
        ledger.dispute(order, id, &form.reason, crate::store::now_ms())
    }) {
        Ok(_) => Ok(Redirect::to("/client#history").into_response()),
        Err(crate::ledger::LedgerError::UnknownOrder(_)) => Err(WebError::NotFound),
        Err(e) => match crate::api::client::hold_error(e) {
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, _) => Err(WebError::Internal),
            ApiError(status, msg) => render_dashboard(
                &web,
                &session,
                id,
                status,
                Some(format!("The order was not disputed: {msg}.")),
                String::new(),
            ),
        },
    }
}

#[derive(Debug, Deserialize)]
pub struct OrderForm {
    #[serde(default)]
    csrf: String,
}

/// "Order now": the same order, limits and answers as `GET /order/<hash>`,
/// shown on the page.
pub async fn order_now(
    State(web): State<Web>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    form: Result<Form<OrderForm>, FormRejection>,
) -> Result<Response, WebError> {
    let Form(form) = form.map_err(bad_form)?;
    let (session, hash, id) = client(&web, &headers)?;
    if !session.csrf_ok(&form.csrf) {
        return Err(WebError::Csrf);
    }
    let refused = |status, msg: String| {
        let msg = format!("No order was made (nothing was charged): {msg}.");
        render_dashboard(&web, &session, id, status, Some(msg), String::new())
    };
    if let Err(ApiError(status, msg)) = web.api.limit_hash(peer, &hash) {
        return refused(status, msg);
    }
    let creds = match web.api.orders.create(&hash).await {
        Ok(c) => c,
        Err(OrderError::UnknownClient) => return Err(WebError::Login),
        // The API's status and words for it; internals are logged there and
        // never shown.
        Err(e) => {
            return match ApiError::from(e) {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, _) => Err(WebError::Internal),
                ApiError(status, msg) => refused(status, msg),
            };
        }
    };
    let order_id = creds.order_id.clone();
    web.sessions.add_order(
        &session.token,
        MadeOrder {
            order_id: creds.order_id,
            username: creds.username,
            host: creds.host,
            port: creds.port,
            privkey: creds.privkey,
            known_hosts: creds.known_hosts,
            ssh_ciphers: creds.ssh_ciphers,
            terms: creds.terms,
        },
    );
    Ok(Redirect::to(&format!("/client/orders/{order_id}")).into_response())
}

#[derive(Template)]
#[template(path = "order.html")]
struct OrderPage {
    nav: Option<Nav>,
    order: MadeOrder,
    key_file: String,
    known_hosts_file: String,
    command: String,
}

/// File names the page tells the client to save the key and host key under.
fn files(order_id: &str) -> (String, String) {
    let short: String = order_id.chars().take(8).collect();
    (
        format!("jusy-{short}.key"),
        format!("jusy-{short}.known_hosts"),
    )
}

/// An order made in this session: the `ssh` command, its files.
pub async fn made_order(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<Response, WebError> {
    let (session, _, _) = client(&web, &headers)?;
    let order = session.order(&order_id).ok_or(WebError::NotFound)?.clone();
    let (key_file, known_hosts_file) = files(&order.order_id);
    let ciphers = order
        .ssh_ciphers
        .map(|c| format!(" -c {c}"))
        .unwrap_or_default();
    let command = format!(
        "ssh -i {key_file} -o UserKnownHostsFile={known_hosts_file}{ciphers} -p {} {}@{}",
        order.port, order.username, order.host
    );
    let page = OrderPage {
        nav: Some(Nav::of(&session)),
        order,
        key_file,
        known_hosts_file,
        command,
    };
    Ok(render(StatusCode::OK, &page))
}

/// The order's private key as a file download.
pub async fn download_key(
    State(web): State<Web>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<Response, WebError> {
    let (session, _, _) = client(&web, &headers)?;
    let order = session.order(&order_id).ok_or(WebError::NotFound)?;
    let (key_file, _) = files(&order.order_id);
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{key_file}\""))
        .map_err(|_| WebError::NotFound)?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        order.privkey.clone(),
    )
        .into_response())
}
