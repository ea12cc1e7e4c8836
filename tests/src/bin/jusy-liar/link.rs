//! The liar's one QUIC connection to its relay: the node's handshake (its
//! identity's certificate, the pinned relay key), hello and slots, an honest
//! speed test, and then the control loop, client streams and the lie.
//!
//! Every message to the relay goes through one channel to the control loop,
//! which alone writes the control stream, so messages keep the order in
//! which they were made.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use jusy_common::frame::{self, Decoder};
use jusy_common::identity::PeerId;
use jusy_common::receipt::{ChainBuilder, Counted};
use jusy_common::terms::{OrderTerms, SignedAcceptance};
use jusy_common::wire::{
    ALPN, Assignment, BrokerMsg, EndReason, NodeMsg, OrderId, PROTOCOL_VERSION, STREAM_HEADER_LEN,
    Slot, StreamHeader,
};
use jusy_node::announce;
use jusy_node::uplink::speed_lanes;
use quinn::crypto::rustls::QuicClientConfig;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::lie::Lie;

/// How long after the first login the liar makes its claim.
const CLAIM_AFTER: Duration = Duration::from_secs(1);

/// The first line the liar writes on every client stream it serves.
const BANNER: &[u8] = b"jusy-liar\n";

/// What the liar was told to be.
#[derive(Debug)]
pub struct Setup {
    pub relay: SocketAddr,
    pub relay_key: PeerId,
    pub identity: SigningKey,
    pub host_key: String,
    pub owner: Option<String>,
    pub cores: u32,
    pub slots: u64,
    pub lie: Lie,
    pub victim: Option<OrderId>,
}

/// One order the liar took.
#[derive(Debug)]
struct Taken {
    terms: OrderTerms,
    chain: ChainBuilder,
    first_login: Option<Instant>,
    /// Logged-in streams open now.
    open: u32,
    /// The counters of the last receipt: the next never shows less.
    last: Counted,
    ended: bool,
}

/// The liar's state, shared by the control loop and the stream tasks.
#[derive(Debug)]
struct Liar {
    lie: Lie,
    key: SigningKey,
    orders: Mutex<HashMap<OrderId, Taken>>,
    out: mpsc::UnboundedSender<NodeMsg>,
}

/// Connects, registers and serves until the relay or the connection ends,
/// or until SIGTERM.
pub async fn run(setup: Setup) -> anyhow::Result<()> {
    let max_datagram = jusy_node::mtu_towards(setup.relay, jusy_node::QUIC_MTU);
    let bind: SocketAddr = if setup.relay.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let endpoint = jusy_node::client_endpoint(bind, jusy_node::QUIC_MTU)?;
    let tls = jusy_common::tls::client_config(&setup.identity, setup.relay_key, ALPN)?;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(jusy_node::transport_config(max_datagram)));
    let conn = endpoint
        .connect_with(config, setup.relay, "jusy")?
        .await
        .context("QUIC handshake with the relay")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = NodeMsg::Hello {
        protocol: PROTOCOL_VERSION,
        host_key: setup.host_key.clone(),
        cores: setup.cores,
        agent: format!(
            "jusy-liar/{} ({})",
            env!("CARGO_PKG_VERSION"),
            setup.lie.name()
        ),
        owner: setup.owner.clone(),
        aes: false,
    };
    send.write_all(&frame::encode(&hello)?).await?;
    let slots = (1..=setup.slots).map(slot).collect();
    send.write_all(&frame::encode(&NodeMsg::SlotsReady { slots })?)
        .await?;
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    match read_msg(&mut recv, &mut decoder, &mut buf).await? {
        BrokerMsg::Welcome { .. } => {}
        other => bail!("the relay answered hello with {other:?}"),
    }
    let node_id = PeerId::from_signing_key(&setup.identity);
    announce(
        "registered",
        json!({"broker": setup.relay.to_string(), "node_id": node_id.to_string(), "lie": setup.lie.name()}),
    );

    let (out, mut outbox) = mpsc::unbounded_channel();
    let liar = Arc::new(Liar {
        lie: setup.lie,
        key: setup.identity.clone(),
        orders: Mutex::default(),
        out,
    });
    let mut next_slot = setup.slots + 1;
    let mut speed_test: Option<tokio::task::JoinHandle<Vec<[u8; 32]>>> = None;
    let mut answered = false;
    let mut stop = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            // Closed at once, so the relay offers its slots no more.
            _ = stop.recv() => {
                conn.close(0u32.into(), b"liar stopping");
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                return Ok(());
            }
            incoming = conn.accept_bi() => {
                let (s, r) = incoming?;
                tokio::spawn(liar.clone().serve_stream(s, r));
            }
            msg = read_msg(&mut recv, &mut decoder, &mut buf) => match msg? {
                BrokerMsg::Assign(a) => {
                    liar.accept(a);
                    // A real node prepares another slot; the liar has one at once.
                    let slots = vec![slot(next_slot)];
                    next_slot += 1;
                    liar.send(NodeMsg::SlotsReady { slots });
                }
                BrokerMsg::Cancel { order_id } => liar.cancelled(order_id),
                BrokerMsg::SpeedTest { seed, rounds, lanes } => {
                    announce("speed_test", json!({"rounds": rounds, "lanes": lanes}));
                    // Honestly, as `jusy-node` runs it: the liar must be attached to lie.
                    speed_test = Some(tokio::task::spawn_blocking(move || speed_lanes(&seed, rounds, lanes)));
                }
                BrokerMsg::Error { error } => bail!("the relay refused us: {error}"),
                BrokerMsg::TryLater { reason, after_secs } => {
                    bail!("the relay asks us to come back in {after_secs} s: {reason}")
                }
                BrokerMsg::Welcome { .. } | BrokerMsg::SignCapacity { .. } | BrokerMsg::Relays { .. } => {}
            },
            digests = async { speed_test.as_mut()?.await.ok() }, if speed_test.is_some() => {
                speed_test = None;
                if let Some(digests) = digests {
                    send.write_all(&frame::encode(&NodeMsg::SpeedResult { digests })?).await?;
                    // The relay judges the answer before it reads on, so what
                    // follows comes from a node it has attached.
                    if !answered && let Some(victim) = setup.victim {
                        liar.end_others(victim);
                    }
                    answered = true;
                }
            }
            Some(msg) = outbox.recv() => send.write_all(&frame::encode(&msg)?).await?,
        }
    }
}

impl Liar {
    fn orders(&self) -> MutexGuard<'_, HashMap<OrderId, Taken>> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msg: NodeMsg) {
        // The control loop holds the receiver until the process ends.
        let _ = self.out.send(msg);
    }

    /// Takes an order: signs the terms the lie says and sends its acceptance.
    fn accept(&self, a: Assignment) {
        let signed = self.lie.signs(a.terms);
        let acceptance = SignedAcceptance::sign(&self.key, a.order_id, signed);
        self.orders().insert(
            a.order_id,
            Taken {
                terms: a.terms,
                chain: ChainBuilder::new(a.order_id, &self.key),
                first_login: None,
                open: 0,
                last: Counted::default(),
                ended: false,
            },
        );
        self.send(NodeMsg::Accepted {
            order_id: a.order_id,
            acceptance: acceptance.bytes().to_vec(),
        });
        announce(
            "accepted",
            json!({"order_id": a.order_id.to_string(), "sold": a.terms, "signed": signed}),
        );
        if signed != a.terms {
            self.told(a.order_id, json!({"signed": signed, "sold": a.terms}));
        }
    }

    /// Says on stdout which lie it just sent.
    fn told(&self, order_id: OrderId, what: serde_json::Value) {
        announce(
            "lie",
            json!({"lie": self.lie.name(), "order_id": order_id.to_string(), "what": what}),
        );
    }

    /// Serves one client stream: the banner, then `LOGIN` lines, each
    /// reported to the relay as the client's login on this stream.
    async fn serve_stream(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let mut header = [0u8; STREAM_HEADER_LEN];
        let read =
            tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut header)).await;
        let Some(order_id) = read
            .ok()
            .and_then(Result::ok)
            .and_then(|()| StreamHeader::decode(&header).ok())
            .map(|h| h.order_id)
            .filter(|id| self.orders().contains_key(id))
        else {
            let _ = send.reset(1u32.into());
            return;
        };
        let stream = u64::from(send.id());
        if send.write_all(BANNER).await.is_err() {
            return;
        }
        let mut lines = BufReader::new(recv).lines();
        let mut logged_in = false;
        while let Ok(Some(line)) = lines.next_line().await {
            let answer: &[u8] = if line.trim() == "LOGIN" && !logged_in {
                logged_in = true;
                self.clone().log_in(order_id, stream);
                b"logged-in\n"
            } else {
                b"?\n"
            };
            if send.write_all(answer).await.is_err() {
                break;
            }
        }
        if logged_in {
            self.log_out(order_id);
        }
    }

    /// A client "logged in" on `stream`: the relay is told, and the first
    /// login starts the lie's clock.
    fn log_in(self: Arc<Self>, order_id: OrderId, stream: u64) {
        let first = {
            let mut orders = self.orders();
            let Some(o) = orders.get_mut(&order_id) else {
                return;
            };
            o.open += 1;
            let first = o.first_login.is_none();
            if first {
                o.first_login = Some(Instant::now());
            }
            first
        };
        self.send(NodeMsg::LoggedIn { order_id, stream });
        announce(
            "logged_in",
            json!({"order_id": order_id.to_string(), "stream": stream}),
        );
        if first {
            tokio::spawn(async move {
                tokio::time::sleep(CLAIM_AFTER).await;
                self.claim(order_id);
            });
        }
    }

    /// Signs what the lie claims after the first login, and ends the session
    /// with it when the claim is an end.
    fn claim(&self, order_id: OrderId) {
        let Some(claim) = self.lie.claim() else {
            return;
        };
        if self.orders().get(&order_id).is_none_or(|o| o.ended) {
            return;
        }
        self.receipt(order_id, claim.counted, claim.finish);
        if let Some(reason) = claim.finish {
            self.ended(order_id, reason);
        }
        self.told(
            order_id,
            json!({"cpu_us": claim.counted.cpu_us, "peak_mem": claim.counted.peak_mem,
                   "peak_procs": claim.counted.peak_procs, "peak_disk": claim.counted.peak_disk,
                   "finish": claim.finish.map(EndReason::code)}),
        );
    }

    /// A logged-in stream closed: once none is left for the order's grace
    /// time, the session ends as the client's close (unless the lie is to
    /// never end one).
    fn log_out(self: Arc<Self>, order_id: OrderId) {
        let grace = {
            let mut orders = self.orders();
            let Some(o) = orders.get_mut(&order_id) else {
                return;
            };
            o.open = o.open.saturating_sub(1);
            (o.open == 0 && !o.ended).then(|| o.terms.grace())
        };
        let Some(grace) = grace.filter(|_| self.lie.ends_sessions()) else {
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let still_closed = self
                .orders()
                .get(&order_id)
                .is_some_and(|o| o.open == 0 && !o.ended);
            if still_closed {
                self.end(order_id, EndReason::ClientClosed);
            }
        });
    }

    /// The broker cancelled an order: ended like a real node's session,
    /// unless the lie is to never end one.
    fn cancelled(&self, order_id: OrderId) {
        let ignored = !self.lie.ends_sessions();
        announce(
            "cancel",
            json!({"order_id": order_id.to_string(), "ignored": ignored}),
        );
        if !ignored && self.orders().get(&order_id).is_some_and(|o| !o.ended) {
            self.end(order_id, EndReason::Cancelled);
        }
    }

    /// Ends a session for `reason` with a final receipt of its last counters.
    fn end(&self, order_id: OrderId, reason: EndReason) {
        let last = self.orders().get(&order_id).map(|o| o.last);
        if let Some(last) = last {
            self.receipt(order_id, last, Some(reason));
            self.ended(order_id, reason);
        }
    }

    /// Tells the relay that the session of `order_id` is over.
    fn ended(&self, order_id: OrderId, reason: EndReason) {
        if let Some(o) = self.orders().get_mut(&order_id) {
            o.ended = true;
        }
        self.send(NodeMsg::Ended { order_id, reason });
        announce(
            "ended",
            json!({"order_id": order_id.to_string(), "reason": reason.code()}),
        );
    }

    /// Signs and sends the next receipt of an order's chain.
    fn receipt(&self, order_id: OrderId, counted: Counted, finish: Option<EndReason>) {
        let signed = {
            let mut orders = self.orders();
            let Some(o) = orders.get_mut(&order_id) else {
                return;
            };
            let wall_ms = o.first_login.map_or(0, |t| {
                u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
            });
            o.last = counted;
            o.chain.next(&self.key, counted, wall_ms, finish)
        };
        if let Some(signed) = signed {
            self.send_receipt(&signed);
        }
    }

    fn send_receipt(&self, signed: &jusy_common::receipt::SignedReceipt) {
        let r = signed.receipt();
        self.send(NodeMsg::Receipt {
            bytes: signed.bytes().to_vec(),
        });
        announce(
            "receipt",
            json!({"order_id": r.order_id.to_string(), "seq": r.seq, "cpu_us": r.cpu_us,
                   "peak_mem": r.peak_mem, "peak_procs": r.peak_procs, "peak_disk": r.peak_disk,
                   "finish": r.finish.map(EndReason::code)}),
        );
    }

    /// Signs a final receipt claiming a CPU-hour for another node's order,
    /// and ends that order as if its client had closed.
    fn end_others(&self, victim: OrderId) {
        let claimed = Lie::victim_claim();
        let mut chain = ChainBuilder::new(victim, &self.key);
        if let Some(signed) = chain.next(&self.key, claimed, 1000, Some(EndReason::ClientClosed)) {
            self.send_receipt(&signed);
        }
        self.send(NodeMsg::Ended {
            order_id: victim,
            reason: EndReason::ClientClosed,
        });
        announce(
            "ended",
            json!({"order_id": victim.to_string(), "reason": EndReason::ClientClosed.code()}),
        );
        self.told(
            victim,
            json!({"cpu_us": claimed.cpu_us, "finish": EndReason::ClientClosed.code()}),
        );
    }
}

/// The ready slot numbered `n`.
fn slot(n: u64) -> Slot {
    Slot {
        slot_id: n,
        username: format!("liar{n}"),
    }
}

async fn read_msg(
    recv: &mut quinn::RecvStream,
    decoder: &mut Decoder,
    buf: &mut [u8],
) -> anyhow::Result<BrokerMsg> {
    loop {
        if let Some(msg) = decoder.next_msg()? {
            return Ok(msg);
        }
        match recv.read(buf).await? {
            Some(n) => decoder.push(buf.get(..n).unwrap_or_default()),
            None => bail!("the relay closed the control stream"),
        }
    }
}
