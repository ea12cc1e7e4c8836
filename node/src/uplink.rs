//! The node's only network connection: it dials a relay broker over QUIC, keeps
//! the control stream, accepts tunnelled client streams, and when the relay
//! goes away moves to another relay it knows ([`crate::relays`]), or
//! reconnects with jittered exponential backoff once it has tried them all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jusy_common::capacity::{Capacity, SignedCapacity, Terms};
use jusy_common::frame::{self, Decoder};
use jusy_common::identity::PeerId;
use jusy_common::wire::{ALPN, BrokerMsg, EndReason, NodeMsg, PROTOCOL_VERSION, RelayAddr};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::relays::Relays;
use crate::sessions::Sessions;

/// Why one connection to the relay ended.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("resolving {0}: no address")]
    Resolve(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("no answer to the QUIC handshake from {addr}")]
    HandshakeTimeout { addr: SocketAddr },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("control stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("control stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("control stream: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("relay closed the control stream")]
    ControlClosed,
    #[error("relay refused us: {0}")]
    Refused(String),
    #[error("relay asked us to come back in {after:?}: {reason}")]
    Later { reason: String, after: Duration },
    #[error("relay did not answer hello in time")]
    HelloTimeout,
}

/// After this many unanswered QUIC handshakes in a row the node says that UDP is
/// probably blocked. A relay that is down looks the same from here, but a home
/// firewall that drops UDP is the common cause, and one the owner can fix.
const BLOCKED_AFTER: u32 = 2;

/// Identity material the uplink presents.
#[derive(Debug)]
pub struct Uplink {
    /// The relays given in the configuration, the first dialled first.
    pub relays: Vec<RelayAddr>,
    pub identity: ed25519_dalek::SigningKey,
    pub host_key: String,
    /// The owner's hash, sent in the hello.
    pub owner: Option<String>,
    pub sessions: Arc<Sessions>,
    /// Largest QUIC datagram tried (`quic_max_mtu`).
    pub max_mtu: u16,
}

impl Uplink {
    /// Connects, serves, and reconnects until `stop` is cancelled; then flushes
    /// pending messages (session ends) and closes.
    pub async fn run(self, mut events: mpsc::UnboundedReceiver<NodeMsg>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let mut unanswered = 0u32;
        // A message whose write failed when the connection broke: sent first
        // after reconnecting, so no receipt goes missing from its chain.
        let mut unsent = None;
        let mut relays = Relays::new(self.relays.clone());
        while let Some(target) = relays.current().cloned() {
            let mut registered = false;
            // When the relay asked to be dialled again.
            let mut come_back = None;
            match self
                .connect_and_serve(
                    &target,
                    &mut relays,
                    &mut events,
                    &mut unsent,
                    &stop,
                    &mut registered,
                )
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, broker = %target.addr, "relay connection lost");
                    if let UplinkError::Refused(why) = &e {
                        crate::announce(
                            "refused",
                            serde_json::json!({"broker": target.addr, "error": why}),
                        );
                    }
                    if let UplinkError::Later { reason, after } = &e {
                        crate::announce(
                            "later",
                            serde_json::json!({
                                "broker": target.addr,
                                "reason": reason,
                                "after_secs": after.as_secs(),
                            }),
                        );
                        come_back = Some(*after);
                    }
                    if matches!(e, UplinkError::HandshakeTimeout { .. }) {
                        unanswered += 1;
                        if unanswered == BLOCKED_AFTER {
                            self.report_blocked(&target, unanswered);
                        }
                    } else {
                        unanswered = 0;
                    }
                }
            }
            // A relay that registered us was reachable and willing: try it (or
            // another) again soon. Only failures to get that far back off
            // further and further, once every known relay has failed.
            if registered {
                relays.registered();
                backoff = Duration::from_millis(200);
            }
            let wait = if relays.failed() {
                jitter(Duration::from_millis(200))
            } else {
                let wait = jitter(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(15));
                // Back to the relay that asked for time (no other one is
                // left to try): no sooner than it said.
                come_back.map_or(wait, |after| wait.max(not_before(after)))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn connect_and_serve(
        &self,
        target: &RelayAddr,
        relays: &mut Relays,
        events: &mut mpsc::UnboundedReceiver<NodeMsg>,
        unsent: &mut Option<NodeMsg>,
        stop: &CancellationToken,
        registered: &mut bool,
    ) -> Result<(), UplinkError> {
        let addr = resolve(&target.addr).await?;
        let max_datagram = crate::mtu_towards(addr, self.max_mtu);
        let endpoint = self.endpoint(addr, target.key, max_datagram)?;
        let connecting = endpoint.connect(addr, "jusy")?;
        // A stop while the relay does not answer must not wait out the
        // handshake timeout.
        let conn = tokio::select! {
            c = connecting => c.map_err(|e| match e {
                quinn::ConnectionError::TimedOut => UplinkError::HandshakeTimeout { addr },
                e => e.into(),
            })?,
            _ = stop.cancelled() => return Ok(()),
        };
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = NodeMsg::Hello {
            protocol: PROTOCOL_VERSION,
            host_key: self.host_key.clone(),
            cores: cores(),
            agent: format!("jusy-node/{}", env!("CARGO_PKG_VERSION")),
            owner: self.owner.clone(),
            aes: jusy_common::tls::aes_in_hardware(),
        };
        send.write_all(&frame::encode(&hello)?).await?;
        let slots = NodeMsg::SlotsReady {
            slots: self.sessions.ready_slots(),
        };
        send.write_all(&frame::encode(&slots)?).await?;
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 16 * 1024];
        let welcome = tokio::time::timeout(
            Duration::from_secs(10),
            read_msg(&mut recv, &mut decoder, &mut buf),
        )
        .await
        .map_err(|_| UplinkError::HelloTimeout)??;
        match welcome {
            BrokerMsg::Welcome { .. } => {}
            BrokerMsg::Error { error } => return Err(UplinkError::Refused(error)),
            BrokerMsg::TryLater { reason, after_secs } => return Err(later(reason, after_secs)),
            other => return Err(UplinkError::Refused(format!("unexpected {other:?}"))),
        }
        *registered = true;
        relays.measured(target.key, conn.rtt());
        let node_id = PeerId::from_signing_key(&self.identity);
        tracing::info!(broker = %target.addr, %node_id, rtt_ms = conn.rtt().as_millis() as u64, max_datagram, "registered with relay");
        crate::announce(
            "registered",
            serde_json::json!({
                "broker": target.addr,
                "node_id": node_id.to_string(),
                "max_datagram": max_datagram,
            }),
        );
        if let Some(ev) = unsent.take() {
            send_or_keep(&mut send, ev, unsent).await?;
        }
        // The speed test runs on a blocking thread so the control loop (and
        // the sessions' streams) keep going meanwhile.
        let mut speed_test: Option<tokio::task::JoinHandle<Vec<[u8; 32]>>> = None;
        loop {
            tokio::select! {
                incoming = conn.accept_bi() => {
                    let (s, r) = incoming?;
                    self.sessions.serve_stream(s, r);
                }
                msg = read_msg(&mut recv, &mut decoder, &mut buf) => match msg? {
                    BrokerMsg::Assign(a) => self.sessions.assign(a),
                    BrokerMsg::Cancel { order_id } => self.sessions.cancel(order_id, EndReason::Cancelled),
                    BrokerMsg::Error { error } => return Err(UplinkError::Refused(error)),
                    BrokerMsg::TryLater { reason, after_secs } => {
                        // Welcomed, but not offered: not a registration
                        // that lets every relay be tried again at once.
                        *registered = false;
                        return Err(later(reason, after_secs));
                    }
                    BrokerMsg::Welcome { .. } => {}
                    BrokerMsg::Relays { relays: learned } => {
                        let before = relays.len();
                        relays.learn(learned);
                        if relays.len() > before {
                            crate::announce("relays", serde_json::json!({"known": relays.len()}));
                        }
                    }
                    BrokerMsg::SignCapacity { terms } => {
                        if let Some(bytes) = self.sign_capacity(target, terms) {
                            send_or_keep(&mut send, NodeMsg::Capacity { bytes }, unsent).await?;
                        }
                    }
                    BrokerMsg::SpeedTest { seed, rounds, lanes } => {
                        tracing::info!(rounds, lanes, "running the speed test");
                        speed_test = Some(tokio::task::spawn_blocking(move || speed_lanes(&seed, rounds, lanes)));
                    }
                },
                digests = async { speed_test.as_mut()?.await.ok() }, if speed_test.is_some() => {
                    speed_test = None;
                    if let Some(digests) = digests {
                        send_or_keep(&mut send, NodeMsg::SpeedResult { digests }, unsent).await?;
                    }
                }
                Some(ev) = events.recv() => send_or_keep(&mut send, ev, unsent).await?,
                _ = stop.cancelled() => {
                    while let Ok(ev) = events.try_recv() {
                        send.write_all(&frame::encode(&ev)?).await?;
                    }
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                    conn.close(0u32.into(), b"node shutting down");
                    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                    return Ok(());
                }
            }
        }
    }

    /// Signs a capacity statement on the relay's terms with this node's free
    /// slots. Terms naming another relay than the one this node pinned are
    /// refused: a relay cannot advertise the node as reachable elsewhere.
    fn sign_capacity(&self, target: &RelayAddr, terms: Terms) -> Option<Vec<u8>> {
        if terms.relay != target.key {
            tracing::warn!(relay = %terms.relay, "refusing to sign capacity terms for another relay");
            return None;
        }
        let capacity = Capacity {
            node_id: PeerId::from_signing_key(&self.identity),
            free_slots: u16::try_from(self.sessions.ready_slots().len()).unwrap_or(u16::MAX),
            cores: cores(),
            terms,
        };
        match SignedCapacity::sign(&self.identity, capacity) {
            Ok(signed) => Some(signed.bytes().to_vec()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot sign capacity statement");
                None
            }
        }
    }

    /// Tells the owner, once per streak, that QUIC cannot get out: an error
    /// line for people and an `uplink_blocked` event for tools.
    fn report_blocked(&self, target: &RelayAddr, attempts: u32) {
        let hint = "no answer to QUIC over UDP: a firewall or router on the way \
                    probably drops outgoing UDP; allow UDP to the relay's port";
        tracing::error!(broker = %target.addr, attempts, "{hint}");
        crate::announce(
            "uplink_blocked",
            serde_json::json!({
                "broker": target.addr,
                "transport": "QUIC/UDP",
                "attempts": attempts,
                "hint": hint,
            }),
        );
    }

    /// A client endpoint for the relay at `addr`, trying datagrams up to
    /// `max_datagram` bytes.
    fn endpoint(
        &self,
        addr: SocketAddr,
        key: PeerId,
        max_datagram: u16,
    ) -> Result<quinn::Endpoint, UplinkError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| UplinkError::Resolve("[::]".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| UplinkError::Resolve("0.0.0.0".into()))?
        };
        let mut endpoint =
            crate::client_endpoint(bind, self.max_mtu).map_err(UplinkError::Endpoint)?;
        let tls = jusy_common::tls::client_config(&self.identity, key, ALPN)
            .map_err(|e| UplinkError::Tls(e.to_string()))?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| UplinkError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport_config(max_datagram)));
        endpoint.set_default_client_config(config);
        Ok(endpoint)
    }
}

/// Writes `ev`, or keeps it in `unsent` when the connection broke.
async fn send_or_keep(
    send: &mut quinn::SendStream,
    ev: NodeMsg,
    unsent: &mut Option<NodeMsg>,
) -> Result<(), UplinkError> {
    let bytes = frame::encode(&ev)?;
    if let Err(e) = send.write_all(&bytes).await {
        *unsent = Some(ev);
        return Err(e.into());
    }
    Ok(())
}

async fn read_msg(
    recv: &mut quinn::RecvStream,
    decoder: &mut Decoder,
    buf: &mut [u8],
) -> Result<BrokerMsg, UplinkError> {
    loop {
        if let Some(msg) = decoder.next_msg()? {
            return Ok(msg);
        }
        match recv.read(buf).await? {
            Some(n) => decoder.push(buf.get(..n).unwrap_or_default()),
            None => return Err(UplinkError::ControlClosed),
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, UplinkError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|_| UplinkError::Resolve(addr.to_owned()))?
        .next()
        .ok_or_else(|| UplinkError::Resolve(addr.to_owned()))
}

/// Runs the speed test's lanes at once, one thread each (at most
/// [`jusy_common::speed::MAX_LANES`]), and returns their digests in lane order.
pub fn speed_lanes(seed: &[u8; 32], rounds: u32, lanes: u32) -> Vec<[u8; 32]> {
    let lanes = lanes.min(jusy_common::speed::MAX_LANES);
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..lanes)
            .map(|lane| {
                let seed = jusy_common::speed::lane_seed(seed, lane);
                s.spawn(move || jusy_common::speed::run(&seed, rounds))
            })
            .collect();
        // A lane that panicked answers zeros, which the relay refuses.
        runs.into_iter()
            .map(|run| run.join().unwrap_or([0; 32]))
            .collect()
    })
}

/// CPU cores this node offers, as told to the relay.
fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// Longest wait a relay may ask for: a relay that asks for more is dialled
/// again after this anyway.
const MAX_COME_BACK: Duration = Duration::from_secs(3600);

fn later(reason: String, after_secs: u32) -> UplinkError {
    UplinkError::Later {
        reason,
        after: Duration::from_secs(after_secs.into()).min(MAX_COME_BACK),
    }
}

/// A little more than `after` (an eighth to three eighths more), so that
/// nodes told the same time do not come back together, and none sooner.
fn not_before(after: Duration) -> Duration {
    after + jitter(after / 4)
}

/// `base` ± 50 %, so that nodes cut off together do not reconnect together.
fn jitter(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        0x8000
    };
    base.mul_f64(0.5 + f64::from(r) / f64::from(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_that_asks_for_time_gets_it() {
        for _ in 0..100 {
            let d = not_before(Duration::from_secs(8));
            assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11));
        }
        let UplinkError::Later { after, .. } = later("busy".into(), u32::MAX) else {
            panic!("not a later");
        };
        assert_eq!(after, MAX_COME_BACK);
    }

    #[test]
    fn jitter_stays_within_half() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(2));
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(3));
        }
    }
}
