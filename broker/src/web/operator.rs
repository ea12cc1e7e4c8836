//! The operator's page (logged in with the operator token): the relays, the
//! attached nodes with their ratings, the books' audit and totals, open
//! disputes to decide, every order, and crediting a deposit.

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
use super::view::{OrderRow, sat, short, utc};
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

/// A dispute waiting for the operator.
#[derive(Debug)]
struct DisputeRow {
    id: String,
    short_id: String,
    client: String,
    owner: String,
    node: String,
    opened: String,
    /// Held, in satoshi, as the refund field's default.
    amount_sat: u64,
    amount: String,
    reason: String,
    /// The order as the client saw it: how it ended, CPU proven.
    ended: String,
    cpu: String,
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
    held_earnings: String,
    disputed: String,
    disputes: Vec<DisputeRow>,
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
    let disputes = tokio::task::block_in_place(|| ledger.open_disputes())?
        .into_iter()
        .filter_map(|(id, rec)| {
            let hold = rec.hold.clone()?;
            let dispute = hold.dispute?;
            let row = OrderRow::new(id, &rec, &[]);
            Some(DisputeRow {
                id: id.to_string(),
                short_id: short(&id.to_string()),
                client: short(&rec.client.to_string()),
                owner: short(&hold.owner.to_string()),
                node: short(&rec.node_id),
                opened: utc(dispute.opened_ms),
                amount_sat: hold.amount_sat,
                amount: sat(hold.amount_sat),
                reason: dispute.reason,
                ended: format!("{} {}", row.state, row.reason),
                cpu: row.cpu,
            })
        })
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
        held_earnings: sat(audit.held_earnings),
        disputed: sat(audit.disputed),
        disputes,
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

#[derive(Debug, Deserialize)]
pub struct DecisionForm {
    #[serde(default)]
    csrf: String,
    /// `refund` or `reject`.
    #[serde(default)]
    action: String,
    /// The refund; all that is held when empty.
    #[serde(default)]
    amount_sat: String,
}

/// Decides a dispute: a refund out of the held earnings, or a rejection.
pub async fn decide(
    State(web): State<Web>,
    headers: HeaderMap,
    axum::extract::Path(order_id): axum::extract::Path<String>,
    form: Result<Form<DecisionForm>, FormRejection>,
) -> Result<Response, WebError> {
    use crate::api::admin::Decision;
    let Form(form) = form.map_err(bad_form)?;
    let session = operator(&web, &headers)?;
    if !session.csrf_ok(&form.csrf) {
        return Err(WebError::Csrf);
    }
    let refuse = |status, msg: String| render_dashboard(&web, &session, status, None, Some(msg));
    let id: jusy_common::wire::OrderId = order_id.parse().map_err(|_| WebError::NotFound)?;
    let decision = match form.action.as_str() {
        "reject" => Decision::Reject,
        "refund" => match form.amount_sat.trim() {
            "" => Decision::Refund { amount_sat: None },
            text => match text.parse::<u64>() {
                Ok(a) => Decision::Refund {
                    amount_sat: Some(a),
                },
                Err(_) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "The refund is a whole number of satoshi.".into(),
                    );
                }
            },
        },
        _ => return refuse(StatusCode::BAD_REQUEST, "Choose refund or reject.".into()),
    };
    match tokio::task::block_in_place(|| crate::api::admin::decide(&web.api.orders, id, decision)) {
        Ok(hold) => {
            let refunded = hold.dispute.as_ref().map_or(0, |d| d.refunded_sat);
            let notice = format!(
                "Dispute of order {} decided: {} refunded to the client, {} released to the owner.",
                short(&id.to_string()),
                sat(refunded),
                sat(hold.amount_sat - refunded)
            );
            render_dashboard(&web, &session, StatusCode::OK, Some(notice), None)
        }
        Err(e) => match crate::api::client::hold_error(e) {
            crate::api::ApiError(StatusCode::INTERNAL_SERVER_ERROR, _) => Err(WebError::Internal),
            crate::api::ApiError(status, msg) => {
                refuse(status, format!("The dispute was not decided: {msg}."))
            }
        },
    }
}
