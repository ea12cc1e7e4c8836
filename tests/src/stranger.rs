//! A stranger on the internet against the broker's UDP ports: QUIC
//! handshakes left half-open, connections to the relay that never say a
//! node's hello, and made-up nodes that say hello to be speed-tested. Each
//! reports what the broker did with it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use jusy_common::frame::{self, Decoder};
use jusy_common::identity::PeerId;
use jusy_common::wire::{ALPN, BrokerMsg, NodeMsg, PROTOCOL_VERSION};
use quinn::crypto::rustls::QuicClientConfig;
use quinn_proto::{ConnectionError, ConnectionHandle, DatagramEvent, Event, TransportErrorCode};

/// What the server did with one half-open handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfOpen {
    /// Nothing yet.
    Silent,
    /// It asked for a Retry (address validation), keeping no state.
    Retry,
    /// It refused at once (`CONNECTION_REFUSED`).
    Refused,
    /// It closed the connection, `after` the Initial was sent.
    Closed { after: Duration },
    /// It answered with its half of the handshake and waits for ours.
    Held,
}

struct Attempt {
    conn: quinn_proto::Connection,
    sent: Instant,
    fate: HalfOpen,
}

/// QUIC Initials sent from one address to one server, none ever followed up,
/// and what came back for each.
pub struct HalfOpenFlood {
    socket: UdpSocket,
    to: SocketAddr,
    client: quinn_proto::ClientConfig,
    endpoint: quinn_proto::Endpoint,
    attempts: HashMap<ConnectionHandle, Attempt>,
}

impl std::fmt::Debug for HalfOpenFlood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfOpenFlood")
            .field("to", &self.to)
            .field("attempts", &self.attempts.len())
            .finish_non_exhaustive()
    }
}

impl HalfOpenFlood {
    /// A flood from `from` (any loopback address is this machine's) to `to`,
    /// speaking `client`'s TLS.
    pub fn new(from: IpAddr, to: SocketAddr, client: rustls::ClientConfig) -> anyhow::Result<Self> {
        // Large kernel buffers, as the answers to a burst are read after it.
        let socket = jusy_node::quic_socket(SocketAddr::new(from, 0))?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let client =
            quinn_proto::ClientConfig::new(Arc::new(QuicClientConfig::try_from(Arc::new(client))?));
        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            true,
            None,
        );
        Ok(Self {
            socket,
            to,
            client,
            endpoint,
            attempts: HashMap::new(),
        })
    }

    /// Sends `n` more Initials, each a new connection.
    pub fn send(&mut self, n: usize) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        for _ in 0..n {
            let now = Instant::now();
            let (ch, mut conn) = self
                .endpoint
                .connect(now, self.client.clone(), self.to, "jusy")
                .context("connect")?;
            buf.clear();
            let t = conn
                .poll_transmit(now, 1, &mut buf)
                .context("no Initial to send")?;
            self.socket
                .send_to(buf.get(..t.size).context("transmit")?, self.to)?;
            self.attempts.insert(
                ch,
                Attempt {
                    conn,
                    sent: now,
                    fate: HalfOpen::Silent,
                },
            );
        }
        Ok(())
    }

    /// Reads the server's answers for `period`.
    pub fn watch(&mut self, period: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + period;
        let mut buf = vec![0u8; 65536];
        let mut response = Vec::new();
        while Instant::now() < deadline {
            let (n, from) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let data = buf.get(..n).context("datagram")?;
            // A long header of type 3 (QUIC v1): a Retry.
            let retry = data.first().is_some_and(|b| b & 0xf0 == 0xf0);
            let now = Instant::now();
            response.clear();
            let event =
                self.endpoint
                    .handle(now, from, None, None, BytesMut::from(data), &mut response);
            let Some(DatagramEvent::ConnectionEvent(ch, event)) = event else {
                continue;
            };
            let Some(a) = self.attempts.get_mut(&ch) else {
                continue;
            };
            a.conn.handle_event(event);
            if retry && a.fate == HalfOpen::Silent {
                a.fate = HalfOpen::Retry;
            }
            while let Some(ev) = a.conn.poll() {
                match ev {
                    Event::HandshakeDataReady if a.fate == HalfOpen::Silent => {
                        a.fate = HalfOpen::Held;
                    }
                    Event::ConnectionLost { reason } => {
                        a.fate = match reason {
                            ConnectionError::ConnectionClosed(c)
                                if c.error_code == TransportErrorCode::CONNECTION_REFUSED =>
                            {
                                HalfOpen::Refused
                            }
                            _ => HalfOpen::Closed {
                                after: now.duration_since(a.sent),
                            },
                        };
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// How many attempts met each fate.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for a in self.attempts.values() {
            match a.fate {
                HalfOpen::Silent => t.silent += 1,
                HalfOpen::Retry => t.retry += 1,
                HalfOpen::Refused => t.refused += 1,
                HalfOpen::Closed { .. } => t.closed += 1,
                HalfOpen::Held => t.held += 1,
            }
        }
        t
    }

    /// The fates of closed attempts: how long after its Initial each was closed.
    pub fn closed_after(&self) -> Vec<Duration> {
        self.attempts
            .values()
            .filter_map(|a| match a.fate {
                HalfOpen::Closed { after } => Some(after),
                _ => None,
            })
            .collect()
    }
}

/// Half-open handshakes by fate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub silent: usize,
    pub retry: usize,
    pub refused: usize,
    pub closed: usize,
    pub held: usize,
}

/// A made-up node key.
pub fn node_key() -> anyhow::Result<ed25519_dalek::SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// TLS as a node with a made-up key speaks it to the relay whose key is
/// `broker` (hex).
pub fn node_tls(broker: &str) -> anyhow::Result<rustls::ClientConfig> {
    let broker: PeerId = broker.parse().context("broker key")?;
    Ok(jusy_common::tls::client_config(&node_key()?, broker, ALPN)?)
}

/// TLS as a libp2p peer speaks it (ALPN `libp2p`), taking any server
/// certificate: enough to start a handshake with a broker's mesh port.
pub fn libp2p_tls() -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"libp2p".to_vec()];
    Ok(config)
}

/// Takes any server's certificate: a stranger does not care whom it floods.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC endpoint at `from` for connections to a relay.
pub fn endpoint(from: IpAddr) -> anyhow::Result<quinn::Endpoint> {
    Ok(jusy_node::client_endpoint(
        SocketAddr::new(from, 0),
        jusy_node::QUIC_MTU,
    )?)
}

/// A QUIC connection to the relay at `relay` as a made-up node, kept alive
/// as a node's is; it says nothing unless told to.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    broker: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let tls = node_tls(broker).map_err(|_| quinn::ConnectionError::LocallyClosed)?;
    let quic =
        QuicClientConfig::try_from(tls).map_err(|_| quinn::ConnectionError::LocallyClosed)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(jusy_node::transport_config(jusy_node::QUIC_MTU)));
    let connecting = endpoint
        .connect_with(config, relay, "jusy")
        .map_err(|_| quinn::ConnectionError::LocallyClosed)?;
    connecting.await
}

/// Whether a connection attempt's error is the relay's refusal.
pub fn refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == TransportErrorCode::CONNECTION_REFUSED)
}

/// What the relay answers a made-up node's hello with, after its welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A speed test: the relay computes its digest now.
    SpeedTest,
    /// Come back later, with why and when.
    TryLater { reason: String, after_secs: u32 },
    /// Anything else (an error, the connection's end).
    Other(String),
}

/// Says a node's hello on `conn` and waits (at most `wait`) for what the
/// relay asks after its welcome.
pub async fn hello(conn: &quinn::Connection, wait: Duration) -> anyhow::Result<Answer> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = NodeMsg::Hello {
        protocol: PROTOCOL_VERSION,
        host_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIStrangerStrangerStrangerStrangerStrangr"
            .into(),
        cores: 1,
        agent: "a stranger".into(),
        owner: None,
        aes: false,
    };
    send.write_all(&frame::encode(&hello)?).await?;
    let read = async {
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 4096];
        loop {
            while let Some(msg) = decoder.next_msg::<BrokerMsg>()? {
                match msg {
                    BrokerMsg::Welcome { .. } => {}
                    BrokerMsg::SpeedTest { .. } => return Ok(Answer::SpeedTest),
                    BrokerMsg::TryLater { reason, after_secs } => {
                        return Ok(Answer::TryLater { reason, after_secs });
                    }
                    other => return Ok(Answer::Other(format!("{other:?}"))),
                }
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.push(buf.get(..n).unwrap_or_default()),
                Ok(None) => return Ok(Answer::Other("control stream ended".into())),
                Err(e) => return Ok(Answer::Other(e.to_string())),
            }
        }
    };
    tokio::time::timeout(wait, read)
        .await
        .context("no answer to the hello")?
}
