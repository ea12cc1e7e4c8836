//! Order ports: one TCP listener per order; every accepted connection becomes a
//! new bidirectional QUIC stream to the node, prefixed by the order's stream
//! header. Bytes are copied both ways with backpressure and half-close; the relay
//! never looks inside them (SSH runs end to end between client and node).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use jusy_common::wire::{OrderId, StreamHeader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::quic;
use super::{NodeLink, Relay, RelayEvent};

/// Most bytes taken from one TCP read or one QUIC chunk: enough to keep a fast
/// stream busy.
const CHUNK: usize = 64 * 1024;

/// The client's bytes are read into blocks of this size, each handed to QUIC
/// in pieces without a copy: a piece keeps its block alive until the node
/// acknowledges it, so blocks are not much larger than a read.
const BLOCK: usize = 256 * 1024;

/// Client connections one order port carries at once; one more is closed as
/// soon as it is accepted. Each is a stream to the node and may leave up to
/// [`STREAM_RECEIVE_WINDOW`](super::STREAM_RECEIVE_WINDOW) of the node's
/// output in the relay while its client does not read, so this bounds what
/// one order may make the relay hold. One SSH connection carries any number
/// of sessions (`ControlMaster`), and `scp`, `sftp` and `rsync` take one each.
pub const MAX_CONNECTIONS: usize = 8;

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
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = closed.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on order port");
                continue;
            }
        };
        if conns.len() >= MAX_CONNECTIONS {
            tracing::info!(
                %order_id, %peer, max = MAX_CONNECTIONS,
                "client connection refused: the order has as many open as it may"
            );
            drop(tcp);
            continue;
        }
        let link = link.clone();
        let relay = relay.clone();
        let closed = closed.clone();
        let span = tracing::info_span!("client", %order_id, %peer);
        conns.spawn(
            async move {
                relay.event(RelayEvent::ClientConnected { order_id });
                tokio::select! {
                    res = splice(tcp, &link, order_id) => match res {
                        Ok((up, down)) => tracing::debug!(up, down, "client connection closed"),
                        Err(e) => tracing::debug!(error = %e, "client connection failed"),
                    },
                    _ = closed.cancelled() => {}
                }
                relay.event(RelayEvent::ClientDisconnected { order_id });
            }
            .instrument(span),
        );
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

async fn splice(mut tcp: TcpStream, link: &NodeLink, order_id: OrderId) -> io::Result<(u64, u64)> {
    tcp.set_nodelay(true)?;
    link.follow_path();
    let (mut send, mut recv) = link.conn.open_bi().await.map_err(io::Error::other)?;
    // The header rides in the same packet as the first client bytes.
    send.write_all(&StreamHeader { order_id }.encode()).await?;
    let (mut from_client, mut to_client) = tcp.split();
    let copied = tokio::try_join!(
        up(&mut from_client, &mut send, &link.conn),
        down(&mut recv, &mut to_client)
    );
    if copied.is_err() {
        // Tell the node the stream was cut, rather than ended.
        let _ = send.reset(CLIENT_FAILED.into());
        let _ = recv.stop(CLIENT_FAILED.into());
    }
    link.follow_path();
    copied
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
