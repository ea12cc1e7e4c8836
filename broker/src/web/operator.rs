//! The operator's page (logged in with the operator token): the relays, the
//! attached nodes with their ratings, the books' audit and totals, every
//! order, and crediting a deposit.

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::StatusCode;
use axum::http::header::HeaderMap;
use axum::response::Response;
use jusy_common::ledger::{Account, AccountId};
use serde::Deserialize;

use super::session::{Session, Who};
use super::view::{OrderRow, sat, short};
use super::{Nav, Web, WebError, bad_form, render};
use crate::store::Role;

/// Orders listed, newest first.
const LISTED: usize = 100;

#[derive(Debug)]
struct NodeRow {
    id: String,
    owner: String,
    free_slots: usize,
    rating: u8,
}

/// A relay of the mesh: this broker's own, then the others nodes are told.
#[derive(Debug)]
struct RelayRow {
    addr: String,
    key: String,
    short_key: String,
    this: bool,
}

#[derive(Template)]
#[template(path = "operator.html")]
struct Dashboard {
    nav: Option<Nav>,
    csrf: String,
    relays: Vec<RelayRow>,
    nodes: Vec<NodeRow>,
    free_slots: usize,
    audit_ok: bool,
    problems: Vec<String>,
    deposits: String,
    withdrawals: String,
    held: String,
    order_count: usize,
    orders: Vec<OrderRow>,
    /// The outcome of a deposit just made, or why it was refused.
    notice: Option<String>,
    error: Option<String>,
}

fn operator(web: &Web, headers: &HeaderMap) -> Result<Session, WebError> {
    let session = web.sessions.find(headers).ok_or(WebError::Login)?;
    if session.who == Who::Operator {
        Ok(session)
    } else {
        Err(WebError::Login)
    }
}

fn render_dashboard(
    web: &Web,
    session: &Session,
    status: StatusCode,
    notice: Option<String>,
    error: Option<String>,
) -> Result<Response, WebError> {
    let ledger = &web.api.orders.ledger;
    let audit = tokio::task::block_in_place(|| ledger.audit())?;
    let all = ledger.orders()?;
    let orders = all
        .iter()
        .rev()
        .take(LISTED)
        .map(|(id, rec)| OrderRow::new(*id, rec, &[]))
        .collect();
    let (_, free_slots) = web.api.relay.capacity();
    let nodes = web
        .api
        .relay
        .nodes()
        .iter()
        .map(|n| NodeRow {
            id: short(&n.id.to_string()),
            owner: n
                .owner
                .map_or_else(|| "none".to_owned(), |o| short(&o.to_string())),
            free_slots: n.free_slots(),
            rating: web.api.orders.rating(&n.id),
        })
        .collect();
    let row = |addr: String, key: String, this: bool| RelayRow {
        addr,
        short_key: short(&key),
        key,
        this,
    };
    let this = row(web.relay.clone(), web.broker_key.clone(), true);
    let others = web
        .api
        .relay
        .other_relays()
        .into_iter()
        .map(|r| row(r.addr, r.key.to_string(), false));
    let relays = std::iter::once(this).chain(others).collect();
    let page = Dashboard {
        nav: Some(Nav::of(session)),
        csrf: session.csrf.clone(),
        relays,
        nodes,
        free_slots,
        audit_ok: audit.ok,
        problems: audit.problems,
        deposits: sat(audit.deposits),
        withdrawals: sat(audit.withdrawals),
        held: sat(u64::try_from(audit.held).unwrap_or(u64::MAX)),
        order_count: all.len(),
        orders,
        notice,
        error,
    };
    Ok(render(status, &page))
}

pub async fn dashboard(State(web): State<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    let session = operator(&web, &headers)?;
    render_dashboard(&web, &session, StatusCode::OK, None, None)
}

#[derive(Debug, Deserialize)]
pub struct DepositForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    account_id: String,
    role: Role,
    #[serde(default)]
    amount_sat: String,
}

pub async fn deposit(
    State(web): State<Web>,
    headers: HeaderMap,
    form: Result<Form<DepositForm>, FormRejection>,
) -> Result<Response, WebError> {
    let Form(form) = form.map_err(bad_form)?;
    let session = operator(&web, &headers)?;
    if !session.csrf_ok(&form.csrf) {
        return Err(WebError::Csrf);
    }
    let refuse = |msg: &str| {
        render_dashboard(
            &web,
            &session,
            StatusCode::BAD_REQUEST,
            None,
            Some(msg.into()),
        )
    };
    let Ok(id) = form.account_id.trim().parse::<AccountId>() else {
        return refuse("An account id is 64 hex characters (shown on the client's page).");
    };
    let amount = match form.amount_sat.trim().parse::<u64>() {
        Ok(a) if a > 0 => a,
        _ => return refuse("The amount is a whole, positive number of satoshi."),
    };
    if web.api.store.account_by_id(form.role, &id)?.is_none() {
        return refuse("No account of that kind has this id.");
    }
    let account = match form.role {
        Role::Client => Account::Client(id),
        Role::Owner => Account::Owner(id),
    };
    let balance =
        match tokio::task::block_in_place(|| web.api.orders.ledger.deposit(account, amount)) {
            Ok(b) => b,
            Err(crate::ledger::LedgerError::Money(e)) => return refuse(&e.to_string()),
            Err(e) => return Err(e.into()),
        };
    tracing::info!(account = %id, amount, "deposit credited on the operator page");
    let notice = format!(
        "Credited {} to {}; its balance is now {}.",
        sat(amount),
        short(&id.to_string()),
        sat(balance)
    );
    render_dashboard(&web, &session, StatusCode::OK, Some(notice), None)
}
