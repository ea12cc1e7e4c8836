//! The HTTP listener: accepts connections within a global cap and a cap per
//! client address, serves HTTP/1.1 on each with a header-read and an idle
//! timeout, and backs off when accepting fails.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::client_addr::{ClientIp, Proxies};
use crate::limit::Key;

/// Largest request head (request line and headers) read. Above hyper's 8 KiB
/// minimum so that an over-long path still reaches the handlers and gets its
/// JSON refusal (and is charged to its address); small enough that
/// `max_connections` heads stay a bounded amount of memory.
const MAX_HEAD: usize = 96 * 1024;

/// Longest pause after a failed accept; the first is [`FIRST_BACKOFF`].
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

/// How long connections may take to finish their requests once the broker
/// stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// File descriptors kept for everything but API connections (order ports
/// and their clients' connections, the database, QUIC): a quarter of the
/// process's, at least this many, and never less than half.
const FD_RESERVE: u64 = 4096;

/// The listener's limits (see the `http_*` fields of
/// [`crate::config::Config`]).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_per_address: usize,
}

impl Limits {
    /// These limits with `max_connections` lowered to what the file
    /// descriptors the process may open leave after the reserve for
    /// everything else (see [`FD_RESERVE`]), so that a flood of connections
    /// to the API never leaves order ports without any.
    pub fn within_fd_limit(self, open_files: u64) -> Self {
        let reserve = (open_files / 4).max(FD_RESERVE).min(open_files / 2);
        let share = usize::try_from(open_files - reserve).unwrap_or(usize::MAX);
        Self {
            max_connections: self.max_connections.min(share),
            ..self
        }
    }
}

/// Open connections, in total and per client address.
#[derive(Debug)]
struct Connections {
    limits: Limits,
    proxies: Arc<Proxies>,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Never more entries than open connections.
    per_address: HashMap<Key, usize>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
struct Slot {
    conns: Arc<Connections>,
    /// `None` for a trusted proxy, whose connections carry many clients and
    /// count only towards the total.
    key: Option<Key>,
}

impl Connections {
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let key = (!self.proxies.trusts(peer)).then(|| Key::addr(peer));
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.limits.max_connections {
            return None;
        }
        if let Some(key) = key {
            let n = open.per_address.entry(key).or_insert(0);
            if *n >= self.limits.max_per_address {
                return None;
            }
            *n += 1;
        }
        open.total += 1;
        Some(Slot {
            conns: self.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.conns.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(key) = self.key
            && let Some(n) = open.per_address.get_mut(&key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_address.remove(&key);
            }
        }
    }
}

/// Something that happens often under attack, logged at most once a
/// second with how often it happened since.
#[derive(Debug, Default)]
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    /// Counts one; returns the count to log when a line is due.
    fn tick(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self
            .last
            .is_some_and(|l| now.saturating_duration_since(l) < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then lets open
/// requests finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    proxies: Arc<Proxies>,
    limits: Limits,
    stop: CancellationToken,
) {
    let conns = Arc::new(Connections {
        limits,
        proxies: proxies.clone(),
        open: Mutex::default(),
    });
    let mut tasks = JoinSet::new();
    let (mut refused, mut failed) = (Throttled::default(), Throttled::default());
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = FIRST_BACKOFF;
                accepted
            }
            Err(e) => {
                // Out of file descriptors (or memory) the same error comes
                // back at once: pause instead of spinning, and say so rarely.
                if let Some(n) = failed.tick(Instant::now()) {
                    tracing::warn!(error = %e, failures = n, ?backoff, "cannot accept API connections");
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let Some(slot) = conns.admit(peer.ip()) else {
            // Closed at once: the refused connection costs nothing more.
            drop(stream);
            if let Some(n) = refused.tick(Instant::now()) {
                tracing::warn!(refused = n, %peer, "API connections over the limit closed");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = connection(
            stream,
            peer,
            app.clone(),
            proxies.clone(),
            limits,
            stop.clone(),
        );
        tasks.spawn(async move {
            conn.await;
            drop(slot);
        });
    }
    let finished = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, finished)
        .await
        .is_err()
    {
        tracing::warn!("API connections cut at shutdown");
    }
}

/// Serves one connection: hyper closes it when a request's head is not in
/// within `header_timeout` of the connection's start or of the previous
/// response (so an idle keep-alive connection lasts that long too); when no
/// byte moves either way for `idle_timeout` (a stalled body, a client that
/// stops reading) it takes no more requests, and when no byte moves for as
/// long again it is cut.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    proxies: Arc<Proxies>,
    limits: Limits,
    stop: CancellationToken,
) {
    let start = Instant::now();
    let moved = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched {
        inner: stream,
        start,
        moved: moved.clone(),
    });
    let service = app.map_request(move |mut req: axum::extract::Request<_>| {
        let ip = proxies.client_ip(peer.ip(), req.headers());
        req.extensions_mut().insert(ClientIp(ip));
        req
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let active = || start + Duration::from_millis(moved.load(Ordering::Relaxed));
    let mut stopping = false;
    let mut idle_since: Option<Instant> = None;
    loop {
        let since = idle_since.map_or(active(), |s| s.max(active()));
        tokio::select! {
            _ = conn.as_mut() => return,
            () = stop.cancelled(), if !stopping => {
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
            () = tokio::time::sleep_until((since + limits.idle_timeout).into()) => {
                if active() > since {
                    continue;
                }
                if idle_since.is_some() {
                    return;
                }
                conn.as_mut().graceful_shutdown();
                idle_since = Some(Instant::now());
            }
        }
    }
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A connection's socket that notes when bytes last moved, in milliseconds
/// since the connection started.
struct Watched {
    inner: TcpStream,
    start: Instant,
    moved: Arc<AtomicU64>,
}

impl Watched {
    fn note(&self, n: usize) {
        if n > 0 {
            self.moved.store(elapsed_ms(self.start), Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(buf.filled().len().saturating_sub(before));
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.note(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_connections: total,
            max_per_address: per,
        }
    }

    #[test]
    fn connections_are_capped_in_total_and_per_address() {
        let proxies = Proxies {
            trusted: vec!["10.0.0.1".parse().unwrap()],
            ..Proxies::default()
        };
        let conns = Arc::new(Connections {
            limits: limits(5, 2),
            proxies: Arc::new(proxies),
            open: Mutex::default(),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let a1 = conns.admit(a).unwrap();
        let _a2 = conns.admit(a).unwrap();
        assert!(conns.admit(a).is_none(), "a third from one address");
        let _b1 = conns.admit(b).unwrap();
        // A trusted proxy is held only to the total.
        let _p1 = conns.admit(proxy).unwrap();
        let _p2 = conns.admit(proxy).unwrap();
        assert!(conns.admit(proxy).is_none(), "the total is reached");
        drop(a1);
        assert!(
            conns.admit(a).is_some(),
            "a closed connection frees its place"
        );
        drop(_p1);
        drop(_p2);
        drop(_a2);
        drop(_b1);
        assert_eq!(conns.open.lock().unwrap().total, 0);
        assert!(
            conns.open.lock().unwrap().per_address.is_empty(),
            "no entry outlives its connections"
        );
    }

    #[test]
    fn the_fd_limit_caps_connections() {
        assert_eq!(
            limits(10_000, 64).within_fd_limit(1024).max_connections,
            512
        );
        assert_eq!(limits(100, 64).within_fd_limit(1024).max_connections, 100);
        // At least 4096 are kept for the rest, then a quarter.
        let api = |open| limits(1 << 30, 64).within_fd_limit(open).max_connections;
        assert_eq!(api(8192), 4096);
        assert_eq!(api(20_000), 15_000);
        assert_eq!(api(1 << 20), 3 << 18);
    }

    #[test]
    fn frequent_events_are_logged_once_a_second() {
        let mut t = Throttled::default();
        let t0 = Instant::now();
        assert_eq!(t.tick(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(t.tick(t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(t.tick(t0 + Duration::from_secs(1)), Some(1000));
    }
}
