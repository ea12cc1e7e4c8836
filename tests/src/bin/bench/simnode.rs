//! Simulated nodes: QUIC clients that do a real node's handshake (pinned relay
//! key, own ed25519 identity), hello and slots, and then either stay idle (relay
//! capacity), accept every order and serve the raw-tunnel workload on its
//! streams instead of SSH (tunnel latency and throughput without a shell), or
//! accept every order and end it soon after, offering its slot again (the API's
//! order rate, without running out of slots).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use jusy_common::frame::{self, Decoder};
use jusy_common::identity::PeerId;
use jusy_common::wire::{
    ALPN, BrokerMsg, EndReason, NodeMsg, PROTOCOL_VERSION, STREAM_HEADER_LEN, Slot, StreamHeader,
};
use quinn::crypto::rustls::QuicClientConfig;

/// One attached simulated node; dropping it closes nothing (hold `conn`).
#[derive(Debug)]
pub struct SimNode {
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Decoder,
    /// Signs its acceptances of orders.
    key: ed25519_dalek::SigningKey,
}

/// A client endpoint for simulated nodes (many connections share one socket).
pub fn endpoint() -> anyhow::Result<quinn::Endpoint> {
    Ok(jusy_node::client_endpoint(
        "127.0.0.1:0".parse()?,
        jusy_node::QUIC_MTU,
    )?)
}

/// Connects as a fresh node and registers with `slots` ready slots.
pub async fn attach(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    broker: PeerId,
    slots: u64,
) -> anyhow::Result<SimNode> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    let key = jusy_common::identity::signing_key_from_seed(&seed).context("node key")?;
    let tls = jusy_common::tls::client_config(&key, broker, ALPN)?;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(jusy_node::transport_config(jusy_node::QUIC_MTU)));
    let conn = endpoint.connect_with(config, relay, "jusy")?.await?;
    let (mut send, recv) = conn.open_bi().await?;
    let hello = NodeMsg::Hello {
        protocol: PROTOCOL_VERSION,
        host_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchBenchBenchBenchBenchBenchBenchBench"
            .into(),
        cores: 1,
        agent: "jusy-bench-simnode".into(),
        owner: None,
        aes: false,
    };
    send.write_all(&frame::encode(&hello)?).await?;
    let slots = (1..=slots)
        .map(|slot_id| Slot {
            slot_id,
            username: format!("sim{slot_id}"),
        })
        .collect();
    send.write_all(&frame::encode(&NodeMsg::SlotsReady { slots })?)
        .await?;
    let mut node = SimNode {
        conn,
        send,
        recv,
        decoder: Decoder::default(),
        key,
    };
    match node.read_msg().await? {
        BrokerMsg::Welcome { .. } => Ok(node),
        other => bail!("relay answered hello with {other:?}"),
    }
}

/// The next message on the control stream. Cancel-safe: bytes read are in
/// `decoder` before the next await.
async fn read_msg(
    recv: &mut quinn::RecvStream,
    decoder: &mut Decoder,
) -> anyhow::Result<BrokerMsg> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = decoder.next_msg()? {
            return Ok(m);
        }
        match recv.read(&mut buf).await? {
            Some(n) => decoder.push(buf.get(..n).unwrap_or_default()),
            None => bail!("relay closed the control stream"),
        }
    }
}

impl SimNode {
    async fn read_msg(&mut self) -> anyhow::Result<BrokerMsg> {
        read_msg(&mut self.recv, &mut self.decoder).await
    }

    /// Accepts every order and serves the raw workload on every stream, until
    /// the connection ends.
    pub async fn serve_workload(mut self) -> anyhow::Result<()> {
        let conn = self.conn.clone();
        tokio::spawn(async move {
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut header = [0u8; STREAM_HEADER_LEN];
                    if recv.read_exact(&mut header).await.is_ok()
                        && StreamHeader::decode(&header).is_ok()
                    {
                        let _ = crate::service::serve(tokio::io::join(recv, send)).await;
                    }
                });
            }
        });
        loop {
            if let BrokerMsg::Assign(a) = self.read_msg().await? {
                let acceptance =
                    jusy_common::terms::SignedAcceptance::sign(&self.key, a.order_id, a.terms);
                let accepted = NodeMsg::Accepted {
                    order_id: a.order_id,
                    acceptance: acceptance.bytes().to_vec(),
                };
                self.send.write_all(&frame::encode(&accepted)?).await?;
            }
        }
    }

    /// Accepts every order, and `hold` later ends it as never connected and
    /// offers its slot again, until the connection ends. (Ending an order in
    /// the instant it is accepted would race the broker's own bookkeeping of
    /// it, which a real node's sessions never do.)
    pub async fn accept_and_end(self, hold: Duration) -> anyhow::Result<()> {
        let Self {
            mut send,
            mut recv,
            mut decoder,
            key,
            ..
        } = self;
        // Every order is held as long, so the earliest to end is the first.
        let mut held: VecDeque<(tokio::time::Instant, jusy_common::wire::OrderId, u64)> =
            VecDeque::new();
        loop {
            let due = held.front().map(|(at, _, _)| *at);
            tokio::select! {
                msg = read_msg(&mut recv, &mut decoder) => {
                    if let BrokerMsg::Assign(a) = msg? {
                        let acceptance =
                            jusy_common::terms::SignedAcceptance::sign(&key, a.order_id, a.terms);
                        let accepted = NodeMsg::Accepted {
                            order_id: a.order_id,
                            acceptance: acceptance.bytes().to_vec(),
                        };
                        send.write_all(&frame::encode(&accepted)?).await?;
                        held.push_back((tokio::time::Instant::now() + hold, a.order_id, a.slot_id));
                    }
                }
                () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    let Some((_, order_id, slot_id)) = held.pop_front() else { continue };
                    let ended = NodeMsg::Ended { order_id, reason: EndReason::NeverConnected };
                    let again = NodeMsg::SlotsReady {
                        slots: vec![Slot { slot_id, username: format!("sim{slot_id}") }],
                    };
                    send.write_all(&frame::encode(&ended)?).await?;
                    send.write_all(&frame::encode(&again)?).await?;
                }
            }
        }
    }
}
