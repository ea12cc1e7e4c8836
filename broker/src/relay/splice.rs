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

use super::{NodeLink, Relay, RelayEvent};

/// Per-direction copy buffer: large enough to keep a fast stream busy.
const COPY_BUF: usize = 256 * 1024;

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
    let (mut send, recv) = link.conn.open_bi().await.map_err(io::Error::other)?;
    // The header rides in the same packet as the first client bytes.
    send.write_all(&StreamHeader { order_id }.encode()).await?;
    let mut quic = tokio::io::join(recv, send);
    let copied =
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut quic, COPY_BUF, COPY_BUF).await;
    link.follow_path();
    copied
}
