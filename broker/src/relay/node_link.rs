//! One attached node: its QUIC connection, control stream, ready slots and the
//! orders waiting for its answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jusy_common::frame::{self, Decoder};
use jusy_common::identity::PeerId;
use jusy_common::ledger::AccountId;
use jusy_common::wire::{Assignment, BrokerMsg, NodeMsg, OrderId, PROTOCOL_VERSION, Slot};
use tokio::sync::{mpsc, oneshot};

use super::{AssignError, Relay, RelayEvent, lock};
use crate::store::Role;

type Answer = oneshot::Sender<Result<(), AssignError>>;

/// A node attached to this relay.
#[derive(Debug)]
pub struct NodeLink {
    pub id: PeerId,
    /// Distinguishes reconnections of the same node.
    pub link_id: u64,
    pub host_key: String,
    /// The account that earns for this node's sessions.
    pub owner: Option<AccountId>,
    pub conn: quinn::Connection,
    to_node: mpsc::UnboundedSender<BrokerMsg>,
    slots: Mutex<Vec<Slot>>,
    pending: Mutex<HashMap<OrderId, Answer>>,
}

/// The node's identity from its TLS certificate.
pub fn peer_id(conn: &quinn::Connection) -> Option<PeerId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    jusy_common::tls::peer_id_of(certs.first()?)
}

impl NodeLink {
    pub fn free_slots(&self) -> usize {
        lock(&self.slots).len()
    }

    pub(super) fn take_slot(&self) -> Option<Slot> {
        let mut slots = lock(&self.slots);
        (!slots.is_empty()).then(|| slots.remove(0))
    }

    /// Gives back a slot claimed for an order that was never sent to the node.
    pub fn return_slot(&self, slot: Slot) {
        lock(&self.slots).push(slot);
    }

    pub(super) fn assign(
        &self,
        a: Assignment,
    ) -> Result<oneshot::Receiver<Result<(), AssignError>>, AssignError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(a.order_id, tx);
        self.to_node
            .send(BrokerMsg::Assign(a))
            .map_err(|_| AssignError::Gone)?;
        Ok(rx)
    }

    /// Asks the node to end an order's session.
    pub fn cancel(&self, order_id: OrderId) {
        let _ = self.to_node.send(BrokerMsg::Cancel { order_id });
    }

    pub(super) fn close(&self, why: &str) {
        self.conn.close(2u32.into(), why.as_bytes());
    }

    fn answer(&self, order_id: OrderId, result: Result<(), AssignError>) {
        if let Some(tx) = lock(&self.pending).remove(&order_id) {
            let _ = tx.send(result);
        }
    }
}

/// Why a node's connection ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("control stream closed")]
    Closed,
    #[error("{0}")]
    Protocol(String),
}

async fn read_msg(
    recv: &mut quinn::RecvStream,
    dec: &mut Decoder,
    buf: &mut [u8],
) -> Result<NodeMsg, LinkError> {
    loop {
        if let Some(m) = dec.next_msg()? {
            return Ok(m);
        }
        match recv.read(buf).await? {
            Some(n) => dec.push(buf.get(..n).unwrap_or_default()),
            None => return Err(LinkError::Closed),
        }
    }
}

/// Tells the node why it is refused, and returns that as the link's error.
async fn refuse(send: &mut quinn::SendStream, error: String) -> LinkError {
    if let Ok(frame) = frame::encode(&BrokerMsg::Error {
        error: error.clone(),
    }) {
        let _ = send.write_all(&frame).await;
    }
    let _ = send.finish();
    LinkError::Protocol(error)
}

/// Serves one node connection until it ends.
pub(super) async fn run(relay: Arc<Relay>, conn: quinn::Connection, node_id: PeerId, link_id: u64) {
    match serve(&relay, &conn, node_id, link_id).await {
        Ok(()) => tracing::info!(node_id = %node_id.short(), "node left"),
        Err(e) => tracing::info!(node_id = %node_id.short(), error = %e, "node connection ended"),
    }
    relay.unregister(node_id, link_id);
}

async fn serve(
    relay: &Arc<Relay>,
    conn: &quinn::Connection,
    node_id: PeerId,
    link_id: u64,
) -> Result<(), LinkError> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| LinkError::Protocol("no control stream".into()))??;
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let hello = tokio::time::timeout(
        Duration::from_secs(10),
        read_msg(&mut recv, &mut dec, &mut buf),
    )
    .await
    .map_err(|_| LinkError::Protocol("no hello".into()))??;
    let NodeMsg::Hello {
        protocol,
        host_key,
        cores,
        agent,
        owner,
    } = hello
    else {
        return Err(LinkError::Protocol("first message is not hello".into()));
    };
    if protocol != PROTOCOL_VERSION {
        let error =
            format!("protocol {protocol} not supported; this relay speaks {PROTOCOL_VERSION}");
        return Err(refuse(&mut send, error).await);
    }
    let owner = match owner {
        None => None,
        Some(hash) => match relay.store.account(Role::Owner, &hash) {
            Ok(Some((id, _))) => Some(id),
            Ok(None) => return Err(refuse(&mut send, "unknown owner hash".into()).await),
            Err(e) => return Err(refuse(&mut send, format!("broker storage error: {e}")).await),
        },
    };
    let (to_node, mut outbox) = mpsc::unbounded_channel();
    let link = Arc::new(NodeLink {
        id: node_id,
        link_id,
        host_key,
        owner,
        conn: conn.clone(),
        to_node,
        slots: Mutex::default(),
        pending: Mutex::default(),
    });
    send.write_all(&frame::encode(&BrokerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
    })?)
    .await?;
    relay.register(link.clone());
    tracing::info!(node_id = %node_id, cores, %agent, "node attached");
    loop {
        tokio::select! {
            msg = read_msg(&mut recv, &mut dec, &mut buf) => match msg? {
                NodeMsg::SlotsReady { slots } => {
                    let mut have = lock(&link.slots);
                    for s in slots {
                        if !have.iter().any(|h| h.slot_id == s.slot_id) {
                            have.push(s);
                        }
                    }
                }
                NodeMsg::Accepted { order_id } => link.answer(order_id, Ok(())),
                NodeMsg::Refused { order_id, error } => link.answer(order_id, Err(AssignError::Refused(error))),
                NodeMsg::Ended { order_id, reason } => relay.event(RelayEvent::Ended { order_id, reason }),
                NodeMsg::Receipt { bytes } => relay.event(RelayEvent::Receipt { node_id, bytes }),
                NodeMsg::Hello { .. } => return Err(LinkError::Protocol("second hello".into())),
            },
            Some(out) = outbox.recv() => send.write_all(&frame::encode(&out)?).await?,
            reason = conn.closed() => return match reason {
                quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => Ok(()),
                e => Err(e.into()),
            },
        }
    }
}
