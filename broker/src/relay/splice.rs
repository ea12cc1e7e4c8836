//! Order ports: one TCP listener per order; every accepted connection becomes a
//! new bidirectional QUIC stream to the node, prefixed by the order's stream
//! header. Bytes are copied both ways with backpressure and half-close; the relay
//! never looks inside them (SSH runs end to end between client and node).
//!
//! A connection counts as the client's (for the order's money) only from when
//! the node reports that its SSH user authenticated on its stream; before
//! that it is capped apart, and pushed out by newer ones.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jusy_common::wire::{OrderId, StreamHeader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::quic;
use super::{NodeLink, Relay, RelayEvent, lock};

/// Most bytes taken from one TCP read or one QUIC chunk: enough to keep a fast
/// stream busy.
const CHUNK: usize = 64 * 1024;

/// The client's bytes are read into blocks of this size, each handed to QUIC
/// in pieces without a copy: a piece keeps its block alive until the node
/// acknowledges it, so blocks are not much larger than a read.
const BLOCK: usize = 256 * 1024;

/// Logged-in client connections one order port carries at once; one more is
/// refused (closed as soon as it is accepted, or as soon as it logs in). Each
/// is a stream to the node and may leave up to
/// [`STREAM_RECEIVE_WINDOW`](super::STREAM_RECEIVE_WINDOW) of the node's
/// output in the relay while its client does not read, so this bounds what
/// one order may make the relay hold. One SSH connection carries any number
/// of sessions (`ControlMaster`), and `scp`, `sftp` and `rsync` take one each.
pub const MAX_CONNECTIONS: usize = 8;

/// Client connections one order port carries at once that have not logged in
/// (yet). They are capped apart from the logged-in ones, and when they are
/// this many, a new connection closes the oldest of them rather than being
/// refused: a stranger holding idle connections to the port (it is easy to
/// find by scanning) can then never keep the client from logging in; the
/// node closes each after its login grace time anyway. Before its login, a
/// connection gets no more from the node than the SSH key exchange.
pub const MAX_UNAUTHENTICATED: usize = 8;

/// How long a client's connection stays open after its node ended the
/// stream, for the client to end its side cleanly (a reset instead could cut
/// off what the client has not read yet).
const LINGER: Duration = Duration::from_secs(5);

/// How long the accept loop waits after a failed accept (out of file
/// descriptors, say) before it tries again, rather than spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Most one failing accept loop logs: once per this long.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

/// QUIC error code for a stream given up because the client's connection
/// failed (not a clean close).
const CLIENT_FAILED: u32 = 1;

/// Binds an order port: from `range` if given (random start, then upward), else
/// any free port.
pub async fn bind(ip: IpAddr, range: Option<(u16, u16)>) -> io::Result<TcpListener> {
    let Some((lo, hi)) = range else {
        return TcpListener::bind(SocketAddr::new(ip, 0)).await;
    };
    let span = u32::from(hi - lo) + 1;
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let start = u32::from_le_bytes(r) % span;
    for i in 0..span {
        let port = lo + ((start + i) % span) as u16;
        match TcpListener::bind(SocketAddr::new(ip, port)).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port in {lo}-{hi}"),
    ))
}

/// Accepts client connections on an order port until `closed` is cancelled.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    link: Arc<NodeLink>,
    order_id: OrderId,
    closed: CancellationToken,
) {
    let conns = TaskTracker::new();
    let port = Arc::new(Port {
        relay,
        order_id,
        state: Mutex::default(),
    });
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = closed.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                failures.note(&e, order_id);
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    _ = closed.cancelled() => break,
                }
            }
        };
        let Some(waiting) = port.admit(peer) else {
            drop(tcp);
            continue;
        };
        let link = link.clone();
        let closed = closed.clone();
        let span = tracing::info_span!("client", %order_id, %peer);
        conns.spawn(
            async move {
                tokio::select! {
                    res = splice(tcp, &link, &waiting) => match res {
                        Ok((up, down)) => tracing::debug!(up, down, "client connection closed"),
                        Err(e) => tracing::debug!(error = %e, "client connection failed"),
                    },
                    _ = waiting.evicted.cancelled() => {
                        tracing::info!("client connection closed without a login: newer ones came");
                    }
                    _ = closed.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// Failed accepts of one order port, logged at most once per [`ACCEPT_LOG_EVERY`].
#[derive(Debug, Default)]
struct AcceptFailures {
    logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn note(&mut self, e: &io::Error, order_id: OrderId) {
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < ACCEPT_LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(error = %e, %order_id, more = self.unlogged, "accept failed on order port; backing off");
        self.logged = Some(now);
        self.unlogged = 0;
    }
}

/// One order port's client connections.
#[derive(Debug)]
struct Port {
    relay: Arc<Relay>,
    order_id: OrderId,
    state: Mutex<PortState>,
}

#[derive(Debug, Default)]
struct PortState {
    next_id: u64,
    /// Connections that have not logged in, oldest first, with what closes each.
    waiting: VecDeque<(u64, CancellationToken)>,
    logged_in: usize,
}

impl PortState {
    /// Takes a new connection in as waiting for its login (its id, and what
    /// closes it), closing the oldest waiting one if they are
    /// [`MAX_UNAUTHENTICATED`] already; `None` when the port carries all the
    /// logged-in connections it may.
    fn admit(&mut self) -> Option<(u64, CancellationToken)> {
        if self.logged_in >= MAX_CONNECTIONS {
            return None;
        }
        if self.waiting.len() >= MAX_UNAUTHENTICATED
            && let Some((_, oldest)) = self.waiting.pop_front()
        {
            oldest.cancel();
        }
        let id = self.next_id;
        self.next_id += 1;
        let evicted = CancellationToken::new();
        self.waiting.push_back((id, evicted.clone()));
        Some((id, evicted))
    }

    /// Connection `id` logged in: true if it now counts, false if it was
    /// pushed out meanwhile or the port has all the logins it may.
    fn log_in(&mut self, id: u64) -> bool {
        let Some(at) = self.waiting.iter().position(|(w, _)| *w == id) else {
            return false;
        };
        self.waiting.remove(at);
        if self.logged_in >= MAX_CONNECTIONS {
            return false;
        }
        self.logged_in += 1;
        true
    }

    /// Connection `id` ended before its login.
    fn leave(&mut self, id: u64) {
        self.waiting.retain(|(w, _)| *w != id);
    }

    /// A logged-in connection ended.
    fn log_out(&mut self) {
        self.logged_in = self.logged_in.saturating_sub(1);
    }
}

impl Port {
    /// Takes a new connection in (see [`PortState::admit`]).
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Waiting> {
        let Some((id, evicted)) = lock(&self.state).admit() else {
            tracing::info!(
                order_id = %self.order_id, %peer, max = MAX_CONNECTIONS,
                "client connection refused: the order has as many logged in as it may"
            );
            return None;
        };
        Some(Waiting {
            port: self.clone(),
            id,
            evicted,
        })
    }
}

/// A connection's place on its port; dropping it gives the place up.
#[derive(Debug)]
struct Waiting {
    port: Arc<Port>,
    id: u64,
    /// Cancelled when newer connections push this one out before its login.
    evicted: CancellationToken,
}

impl Waiting {
    /// The node reported this connection's login: it now counts as the
    /// client's, unless it was pushed out meanwhile or the port carries all
    /// the logged-in connections it may.
    fn log_in(&self) -> Option<Counted<'_>> {
        let port = &self.port;
        if !lock(&port.state).log_in(self.id) {
            tracing::info!(
                max = MAX_CONNECTIONS,
                "login not counted: pushed out, or the order has as many logged in as it may"
            );
            return None;
        }
        port.relay.event(RelayEvent::ClientConnected {
            order_id: port.order_id,
        });
        Some(Counted(port))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.port.state).leave(self.id);
    }
}

/// One logged-in connection of a port; dropping it tells the order book.
#[derive(Debug)]
struct Counted<'a>(&'a Port);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let port = self.0;
        lock(&port.state).log_out();
        port.relay.event(RelayEvent::ClientDisconnected {
            order_id: port.order_id,
        });
    }
}

async fn splice(mut tcp: TcpStream, link: &NodeLink, waiting: &Waiting) -> io::Result<(u64, u64)> {
    let order_id = waiting.port.order_id;
    tcp.set_nodelay(true)?;
    link.follow_path();
    let (mut send, mut recv) = link.conn.open_bi().await.map_err(io::Error::other)?;
    // Registered before the node can see the stream, so its report cannot
    // come first.
    let mut login = link.expect_login(send.id(), order_id);
    // The header rides in the same packet as the first client bytes.
    send.write_all(&StreamHeader { order_id }.encode()).await?;
    let (mut from_client, mut to_client) = tcp.split();
    let copied = {
        let copy = both_ways(
            up(&mut from_client, &mut send, &link.conn),
            down(&mut recv, &mut to_client),
        );
        tokio::pin!(copy);
        // Held while the connection runs: it counts from its login to its end.
        let _counted;
        tokio::select! {
            res = &mut copy => res,
            Ok(()) = &mut login.logged_in => match waiting.log_in() {
                Some(counted) => {
                    _counted = counted;
                    copy.await
                }
                None => Err(io::Error::other("login not counted: no room, or pushed out")),
            },
        }
    };
    if copied.is_err() {
        // Tell the node the stream was cut, rather than ended.
        let _ = send.reset(CLIENT_FAILED.into());
        let _ = recv.stop(CLIENT_FAILED.into());
    }
    link.follow_path();
    copied
}

/// Copies both ways until both ends are done, or one fails. Once the node has
/// ended its side, the SSH server is gone and reads nothing more: the client
/// gets [`LINGER`] to end its own side, then its connection is closed. Without
/// this, a client that sends nothing (or a stranger's idle connection the node
/// closed after its login grace time) would hold the TCP connection forever.
async fn both_ways(
    up: impl std::future::Future<Output = io::Result<u64>>,
    down: impl std::future::Future<Output = io::Result<u64>>,
) -> io::Result<(u64, u64)> {
    tokio::pin!(up, down);
    tokio::select! {
        u = &mut up => Ok((u?, down.await?)),
        d = &mut down => {
            let d = d?;
            let u = tokio::time::timeout(LINGER, up).await.unwrap_or(Ok(0))?;
            Ok((u, d))
        }
    }
}

/// Client → node: each read lands in a shared block and goes to QUIC as is
/// (no copy into QUIC's send buffer); the client's FIN becomes the stream's.
/// While it uploads, the connection's send window follows the path
/// ([`send_window`](super::send_window)).
async fn up(
    tcp: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut quic::SendStream,
    conn: &quic::Connection,
) -> io::Result<u64> {
    use tokio::io::AsyncReadExt;
    let mut block = bytes::BytesMut::new();
    let mut total = 0;
    let mut window = super::send_window::Tuner::default();
    loop {
        window.tick(conn);
        // Empty here (its bytes went to QUIC): what is left is free room.
        if block.capacity() < CHUNK {
            block = bytes::BytesMut::with_capacity(BLOCK);
        }
        let n = tcp.read_buf(&mut block).await?;
        if n == 0 {
            let _ = send.finish();
            return Ok(total);
        }
        total += n as u64;
        super::data_plane::to_node(n, || conn.rtt());
        send.write_chunk(block.split().freeze())
            .await
            .map_err(io::Error::other)?;
        if n <= super::data_plane::INTERACTIVE {
            quick_ack(tcp.as_ref());
        }
    }
}

/// Acknowledges the client's next bytes at once rather than after Linux's
/// delayed-ACK timer (40 ms or more). OpenSSH's client turns Nagle's algorithm
/// off only for sessions with a terminal, so `ssh host cmd`, `scp` and
/// `rsync` hold each small packet until the one before is acknowledged: a
/// login that sends two messages in a row would wait for that timer. The
/// kernel leaves quick-ACK mode on its own, so this is asked after every
/// small read; bulk uploads keep delayed ACKs.
fn quick_ack(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
}

/// Node → client: QUIC's received chunks are written to the client as they
/// are; the stream's end becomes the client's FIN.
async fn down(
    recv: &mut quic::RecvStream,
    tcp: &mut tokio::net::tcp::WriteHalf<'_>,
) -> io::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let mut total = 0;
    while let Some(chunk) = recv
        .read_chunk(CHUNK, true)
        .await
        .map_err(io::Error::other)?
    {
        total += chunk.bytes.len() as u64;
        super::data_plane::to_client(chunk.bytes.len());
        tcp.write_all(&chunk.bytes).await?;
    }
    tcp.shutdown().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_connections_push_out_the_oldest_and_never_block_a_login() {
        let mut port = PortState::default();
        let first: Vec<_> = (0..MAX_UNAUTHENTICATED)
            .map(|_| port.admit().expect("room"))
            .collect();
        assert!(first.iter().all(|(_, t)| !t.is_cancelled()));
        // One more pushes out the oldest only.
        let (client, _) = port.admit().expect("never refused for waiting ones");
        assert!(first[0].1.is_cancelled());
        assert!(first[1..].iter().all(|(_, t)| !t.is_cancelled()));
        assert!(
            !port.log_in(first[0].0),
            "a pushed-out connection never counts"
        );
        assert!(port.log_in(client));
        assert_eq!(
            (port.logged_in, port.waiting.len()),
            (1, MAX_UNAUTHENTICATED - 1)
        );
        port.leave(first[1].0);
        assert_eq!(port.waiting.len(), MAX_UNAUTHENTICATED - 2);
        port.log_out();
        assert_eq!(port.logged_in, 0);
    }

    #[test]
    fn logins_are_capped_apart() {
        let mut port = PortState::default();
        for _ in 0..MAX_CONNECTIONS {
            let (id, _) = port.admit().expect("room");
            assert!(port.log_in(id));
        }
        assert!(port.admit().is_none(), "refused with all logins taken");
        port.log_out();
        let (a, _) = port.admit().expect("room again");
        let (b, _) = port.admit().expect("waiting ones are not logins");
        assert!(port.log_in(a));
        assert!(!port.log_in(b), "one login too many does not count");
        assert_eq!((port.logged_in, port.waiting.len()), (MAX_CONNECTIONS, 0));
    }
}
