//! Signing a session's usage receipts: the node's identity key signs the next
//! receipt of the order's hash chain (format in `jusy_common::receipt`), which
//! goes to the relay on the control stream and out as a `receipt` event.

use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use jusy_common::receipt::ChainBuilder;
use jusy_common::session::Session;
use jusy_common::wire::{EndReason, NodeMsg, OrderId};
use tokio::sync::mpsc;

/// One order's receipt chain on the node.
#[derive(Debug)]
pub struct Receipts {
    order_id: OrderId,
    key: Arc<SigningKey>,
    chain: ChainBuilder,
    events: mpsc::UnboundedSender<NodeMsg>,
}

impl Receipts {
    pub fn new(
        order_id: OrderId,
        key: Arc<SigningKey>,
        events: mpsc::UnboundedSender<NodeMsg>,
    ) -> Self {
        Self {
            order_id,
            chain: ChainBuilder::new(order_id, &key),
            key,
            events,
        }
    }

    /// Signs and sends the next receipt with the session's counters as of `now`;
    /// `finish` makes it the last one. The uplink queues it while the relay is
    /// away and sends it after reconnecting.
    pub fn emit(&mut self, session: &Session, now: Instant, finish: Option<EndReason>) {
        let wall_ms = u64::try_from(session.wall(now).as_millis()).unwrap_or(u64::MAX);
        let Some(signed) = self
            .chain
            .next(&self.key, session.counted(), wall_ms, finish)
        else {
            return;
        };
        let r = signed.receipt();
        tracing::info!(
            order_id = %self.order_id,
            seq = r.seq,
            cpu_us = r.cpu_us,
            peak_mem = r.peak_mem,
            peak_procs = r.peak_procs,
            peak_disk = r.peak_disk,
            wall_ms = r.wall_ms,
            finish = finish.map(EndReason::code),
            "receipt"
        );
        crate::announce(
            "receipt",
            serde_json::json!({
                "order_id": self.order_id.to_string(),
                "seq": r.seq,
                "cpu_us": r.cpu_us,
                "peak_mem": r.peak_mem,
                "peak_procs": r.peak_procs,
                "peak_disk": r.peak_disk,
                "finish": finish.map(EndReason::code),
                "bytes": hex::encode(signed.bytes()),
            }),
        );
        crate::metrics::METRICS.receipts.inc();
        let _ = self.events.send(NodeMsg::Receipt {
            bytes: signed.bytes().to_vec(),
        });
    }
}
