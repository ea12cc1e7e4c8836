//! The order book: turns a client's request into a claimed slot, a per-order
//! key pair and an open order port; closes the port and records the reason when
//! the session ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jusy_common::identity::PeerId;
use jusy_common::receipt::{ChainVerifier, SignedReceipt};
use jusy_common::wire::{Assignment, EndReason, OrderId};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::relay::{AssignError, Relay, RelayEvent, splice};
use crate::store::{OrderRecord, Store, StoreError};

/// Credentials for one order, as the documented client flow expects them.
#[derive(Debug, Serialize)]
pub struct Credentials {
    pub status: &'static str,
    pub username: String,
    pub order_id: String,
    pub host: String,
    pub port: u16,
    /// Unencrypted OpenSSH private key made for this order only.
    pub privkey: String,
    /// The node's SSH host key (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    /// A ready `known_hosts` line for `host`:`port`.
    pub known_hosts: String,
    pub node_id: String,
}

/// Why an order could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("unknown client hash")]
    UnknownClient,
    #[error("no free capacity, try again shortly")]
    NoCapacity,
    #[error("node could not take the order: {0}")]
    Node(#[from] AssignError),
    #[error("no order port available: {0}")]
    Port(std::io::Error),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("key generation failed")]
    Key,
}

#[derive(Debug)]
struct Live {
    node: PeerId,
    link_id: u64,
    closed: CancellationToken,
    receipts: ChainVerifier,
}

/// Orders in flight.
#[derive(Debug)]
pub struct Orders {
    cfg: Config,
    store: Store,
    relay: Arc<Relay>,
    live: Mutex<HashMap<OrderId, Live>>,
    ports: TaskTracker,
}

fn random<const N: usize>() -> Result<[u8; N], OrderError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| OrderError::Key)?;
    Ok(b)
}

/// `host:port` as OpenSSH writes it in known_hosts.
pub fn known_hosts_host(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

impl Orders {
    pub fn new(cfg: Config, store: Store, relay: Arc<Relay>) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            store,
            relay,
            live: Mutex::default(),
            ports: TaskTracker::new(),
        })
    }

    /// Makes an order for the client with this hash.
    pub async fn create(&self, client_hash: &str) -> Result<Credentials, OrderError> {
        let client = self
            .store
            .client(client_hash)?
            .ok_or(OrderError::UnknownClient)?;
        let (link, slot) = self.relay.claim_slot().ok_or(OrderError::NoCapacity)?;
        let listener = splice::bind(self.cfg.order_bind, self.cfg.order_ports)
            .await
            .map_err(OrderError::Port)?;
        let port = listener.local_addr().map_err(OrderError::Port)?.port();
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&random::<32>()?));
        let privkey = key
            .to_openssh(LineEnding::LF)
            .map_err(|_| OrderError::Key)?
            .to_string();
        let pubkey = key.public_key().to_openssh().map_err(|_| OrderError::Key)?;
        let order_id = OrderId::from_random(random()?);
        let mut authorized_keys = vec![pubkey];
        authorized_keys.extend(client.ssh_keys);
        let assignment = Assignment {
            order_id,
            slot_id: slot.slot_id,
            authorized_keys,
            connect_window_secs: self.cfg.connect_window_secs,
        };
        self.relay.assign(&link, assignment).await?;
        let record = OrderRecord {
            client: Store::client_digest(client_hash),
            node_id: link.id.to_string(),
            username: slot.username.clone(),
            port,
            state: "RUNNING".into(),
        };
        if let Err(e) = self.store.put_order(&order_id.to_string(), &record) {
            link.cancel(order_id);
            return Err(e.into());
        }
        let closed = CancellationToken::new();
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            order_id,
            Live {
                node: link.id,
                link_id: link.link_id,
                closed: closed.clone(),
                receipts: ChainVerifier::new(order_id, link.id),
            },
        );
        tracing::info!(%order_id, node_id = %link.id.short(), port, user = %slot.username, "order placed");
        self.ports
            .spawn(splice::serve(listener, link.clone(), order_id, closed));
        let host = self.cfg.public_host.clone();
        Ok(Credentials {
            status: "OK",
            username: slot.username,
            order_id: order_id.to_string(),
            known_hosts: format!("{} {}", known_hosts_host(&host, port), link.host_key),
            host,
            port,
            privkey,
            host_key: link.host_key.clone(),
            node_id: link.id.to_string(),
        })
    }

    /// The record of an order, if it belongs to this client.
    pub fn get(
        &self,
        client_hash: &str,
        order_id: &str,
    ) -> Result<Option<OrderRecord>, StoreError> {
        Ok(self
            .store
            .order(order_id)?
            .filter(|r| r.client == Store::client_digest(client_hash)))
    }

    /// Applies relay events until the channel closes.
    pub async fn follow(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<RelayEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                RelayEvent::Ended { order_id, reason } => self.end(order_id, reason),
                RelayEvent::Receipt { node_id, bytes } => self.receipt(node_id, &bytes),
                RelayEvent::NodeGone { node_id, link_id } => {
                    let lost: Vec<OrderId> = self
                        .live
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .filter(|(_, l)| l.node == node_id && l.link_id == link_id)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in lost {
                        self.end(id, EndReason::NodeLost);
                    }
                }
            }
        }
    }

    /// Checks a receipt against its order's chain; bad ones are logged and dropped.
    fn receipt(&self, node_id: PeerId, bytes: &[u8]) {
        let signed = match SignedReceipt::decode(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(node_id = %node_id.short(), error = %e, "receipt rejected");
                return;
            }
        };
        let r = *signed.receipt();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let Some(order) = live.get_mut(&r.order_id).filter(|l| l.node == node_id) else {
            tracing::warn!(order_id = %r.order_id, node_id = %node_id.short(), "receipt for an order this node does not run");
            return;
        };
        match order.receipts.accept(&signed) {
            Ok(accepted) => tracing::info!(
                order_id = %r.order_id, seq = r.seq, cpu_us = r.cpu_us, peak_mem = r.peak_mem,
                finish = r.finish.map(EndReason::code), ?accepted, "receipt"
            ),
            Err(e) => tracing::warn!(order_id = %r.order_id, error = %e, "receipt rejected"),
        }
    }

    fn end(&self, order_id: OrderId, reason: EndReason) {
        let Some(live) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&order_id)
        else {
            return;
        };
        live.closed.cancel();
        let id = order_id.to_string();
        match self.store.order(&id) {
            Ok(Some(mut rec)) => {
                rec.state = reason.code().to_owned();
                if let Err(e) = self.store.put_order(&id, &rec) {
                    tracing::error!(%order_id, error = %e, "cannot record order end");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(%order_id, error = %e, "cannot read order"),
        }
        tracing::info!(%order_id, reason = reason.code(), "order ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_brackets_non_default_ports() {
        assert_eq!(known_hosts_host("h", 22), "h");
        assert_eq!(known_hosts_host("h", 2222), "[h]:2222");
    }
}
