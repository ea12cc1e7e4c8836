//! The node owner's page: the command that runs a node for them, their nodes
//! (online now or seen in orders) with sessions served, rating and earnings,
//! and a chart of earnings over time.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::HeaderMap;
use axum::response::Response;
use jusy_common::hold::HoldState;
use jusy_common::ledger::Account;
use jusy_common::rating::Tally;

use super::session::Who;
use super::view::{Chart, HEIGHT, WIDTH, sat, short, utc};
use super::{Nav, Web, WebError, render};

/// One of the owner's nodes.
#[derive(Debug, Default)]
struct NodeRow {
    id: String,
    short_id: String,
    online: bool,
    free_slots: usize,
    /// The last passed speed test, as the relay timed it ("–" when offline).
    speed: String,
    sessions: usize,
    /// How its sessions ended, for its rating.
    tally: Tally,
    /// Its rating in percent, from its owner's where it has served few.
    rating: u8,
    earned: u64,
    earned_text: String,
}

/// One settled session that paid the owner.
#[derive(Debug)]
struct Payout {
    when: String,
    node: String,
    amount: String,
    /// Where the earnings stand: held, disputed, released or refunded.
    status: String,
}

#[derive(Template)]
#[template(path = "owner.html")]
struct Dashboard {
    nav: Option<Nav>,
    account_id: String,
    command: String,
    relay: String,
    broker_key: String,
    share: u32,
    earnings: String,
    held: String,
    disputed: String,
    hold: String,
    sessions: usize,
    nodes: Vec<NodeRow>,
    payouts: Vec<Payout>,
    chart: Chart,
    width: u32,
    height: u32,
}

pub async fn dashboard(State(web): State<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    let session = web.sessions.find(&headers).ok_or(WebError::Login)?;
    let Who::Owner { hash, id } = &session.who else {
        return Err(WebError::Login);
    };
    let mut nodes: BTreeMap<String, NodeRow> = BTreeMap::new();
    for link in web.api.relay.nodes() {
        if link.owner == Some(*id) {
            let row = nodes.entry(link.id.to_string()).or_default();
            row.online = true;
            row.free_slots = link.free_slots();
            row.speed = link
                .speed()
                .map_or_else(|| "–".to_owned(), |d| format!("{} ms", d.as_millis()));
        }
    }
    let ledger = &web.api.orders.ledger;
    let mut payouts = Vec::new();
    let mut paid = Vec::new();
    let mut sessions = 0;
    let (mut held, mut disputed) = (0u64, 0u64);
    for (_, rec) in ledger
        .orders()?
        .iter()
        .filter(|(_, r)| r.owner == Some(*id))
    {
        sessions += 1;
        let row = nodes.entry(rec.node_id.clone()).or_default();
        row.sessions += 1;
        let earned = rec.order.settlement.map_or(0, |s| s.owner);
        row.earned = row.earned.saturating_add(earned);
        let status = rec.hold.as_ref().map_or_else(String::new, |h| {
            let (h_held, h_disputed) = h.held();
            held = held.saturating_add(h_held);
            disputed = disputed.saturating_add(h_disputed);
            let refunded = h.dispute.as_ref().map_or(0, |d| d.refunded_sat);
            match h.state {
                HoldState::Held => format!("held until {} UTC", utc(h.until_ms)),
                HoldState::Disputed => "disputed: the operator decides".to_owned(),
                HoldState::Released if refunded > 0 => {
                    format!("yours, after {} refunded to the client", sat(refunded))
                }
                HoldState::Released => "yours".to_owned(),
                HoldState::Refunded => "refunded to the client".to_owned(),
            }
        });
        if earned > 0 {
            paid.push(earned);
            payouts.push(Payout {
                when: utc(rec.created_ms),
                node: short(&rec.node_id),
                amount: sat(earned),
                status,
            });
        }
    }
    let nodes = nodes
        .into_iter()
        .map(|(node_id, row)| NodeRow {
            short_id: short(&node_id),
            earned_text: sat(row.earned),
            tally: node_id
                .parse()
                .map(|node| web.api.orders.tally(&node))
                .unwrap_or_default(),
            rating: node_id
                .parse()
                .map(|node| web.api.orders.rating_with_owner(&node, Some(*id)))
                .unwrap_or_default(),
            id: node_id,
            ..row
        })
        .collect();
    payouts.reverse();
    // The hash goes in the environment, not on the command line, which every
    // process on the node (sessions included) can read; the node refuses it there.
    let command = format!(
        "{}={hash} jusy-node --broker {} --broker-key {}",
        jusy_node::config::OWNER_ENV,
        web.relay,
        web.broker_key
    );
    let page = Dashboard {
        nav: Some(Nav::of(&session)),
        account_id: id.to_string(),
        command,
        relay: web.relay.clone(),
        broker_key: web.broker_key.clone(),
        share: web.owner_share_ppm / 10_000,
        earnings: sat(ledger.balance(&Account::Owner(*id))?),
        held: sat(held),
        disputed: sat(disputed),
        hold: super::view::duration_words(ledger.hold_ms),
        sessions,
        nodes,
        payouts,
        chart: Chart::cumulative(&paid, sat),
        width: WIDTH,
        height: HEIGHT,
    };
    Ok(render(StatusCode::OK, &page))
}
