//! Simulated nodes: QUIC clients that do a real node's handshake (pinned relay
//! key, own ed25519 identity), hello and slots, and then either stay idle (relay
//! capacity) or accept every order and serve the raw-tunnel workload on its
//! streams instead of SSH (tunnel latency and throughput without a shell).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use jusy_common::frame::{self, Decoder};
use jusy_common::identity::PeerId;
use jusy_common::wire::{
    ALPN, BrokerMsg, NodeMsg, PROTOCOL_VERSION, STREAM_HEADER_LEN, Slot, StreamHeader,
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

impl SimNode {
    async fn read_msg(&mut self) -> anyhow::Result<BrokerMsg> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.decoder.next_msg()? {
                return Ok(m);
            }
            match self.recv.read(&mut buf).await? {
                Some(n) => self.decoder.push(buf.get(..n).unwrap_or_default()),
                None => bail!("relay closed the control stream"),
            }
        }
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
}
