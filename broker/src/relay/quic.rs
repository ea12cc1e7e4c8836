//! The relay's QUIC server: quinn's protocol state machines (`quinn-proto`)
//! driven by one task on the data plane, which owns the UDP socket, every
//! node connection and their timers.
//!
//! quinn's own driver gives every connection a task, a channel from the
//! endpoint's task (its first block alone is 32 events, about 6.7 KB) and a
//! transmit buffer that keeps the size of the connection's largest datagram.
//! A relay holds thousands of mostly idle node connections on one thread, so
//! here a datagram goes from the socket straight into its connection, the
//! packets it causes are built in one buffer shared by all connections, and
//! one timer sleeps until the earliest connection deadline. A connection
//! costs its protocol state and little more (see `docs/performance.md`), and
//! a packet crosses one task fewer on its way to a client.
//!
//! Application tasks ([`Connection`], [`SendStream`], [`RecvStream`]) change
//! a connection's state under the endpoint's lock and mark it for the driver,
//! which sends what the change allows and wakes whoever waits on its events.
//! The lock is only contended by the broker's own threads closing a link.

use std::collections::{BTreeSet, VecDeque};
use std::future::{Future, poll_fn};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    self as proto, ConnectionError, ConnectionHandle, DatagramEvent, Dir, Event, StreamEvent,
    StreamId, VarInt,
};
use quinn_udp::{BATCH_SIZE, RecvMeta, UdpSocketState};
use tokio::io::unix::AsyncFd;

/// Datagrams (GSO segments counted one by one) one connection sends before
/// the driver turns to other connections and tasks, as quinn's driver does.
const TRANSMITS_PER_TURN: usize = 20;

/// Largest number of datagrams handed to the kernel in one GSO send.
const GSO_SEGMENTS: usize = 10;

/// How long the driver reads the socket before letting the tasks it woke
/// run: a burst of datagrams is not left waiting behind all the others.
const RECV_TURN: Duration = Duration::from_micros(50);

/// Why a stream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("connection lost: {0}")]
    ConnectionLost(ConnectionError),
    #[error("stopped by peer: code {0}")]
    Stopped(VarInt),
    #[error("reset by peer: code {0}")]
    Reset(VarInt),
    #[error("stream already closed")]
    ClosedStream,
}

impl From<StreamError> for io::Error {
    fn from(e: StreamError) -> Self {
        let kind = match e {
            StreamError::ConnectionLost(_) => io::ErrorKind::ConnectionAborted,
            StreamError::Stopped(_) | StreamError::Reset(_) => io::ErrorKind::ConnectionReset,
            StreamError::ClosedStream => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Puts `waker` in `list` under `id`, replacing the one it had.
fn wait_on(list: &mut Vec<(StreamId, Waker)>, id: StreamId, waker: &Waker) {
    match list.iter_mut().find(|(i, _)| *i == id) {
        Some((_, w)) => w.clone_from(waker),
        None => list.push((id, waker.clone())),
    }
}

fn wake_stream(list: &mut Vec<(StreamId, Waker)>, id: StreamId) {
    if let Some(at) = list.iter().position(|(i, _)| *i == id) {
        list.swap_remove(at).1.wake();
    }
}

fn forget_stream(list: &mut Vec<(StreamId, Waker)>, id: StreamId) {
    list.retain(|(i, _)| *i != id);
}

/// Adds `waker` to `list` unless it is there already.
fn wait_all(list: &mut Vec<Waker>, waker: &Waker) {
    if !list.iter().any(|w| w.will_wake(waker)) {
        list.push(waker.clone());
    }
}

fn wake_all(list: &mut Vec<Waker>) {
    for w in list.drain(..) {
        w.wake();
    }
}

fn wake_all_streams(list: &mut Vec<(StreamId, Waker)>) {
    for (_, w) in list.drain(..) {
        w.wake();
    }
}

/// One connection as the driver keeps it. Only the protocol state is large;
/// the waiting lists stay empty (unallocated) while a node idles.
struct Conn {
    inner: proto::Connection,
    /// Tells this connection from a later one given the same handle.
    serial: u64,
    /// In [`State::dirty`].
    dirty: bool,
    /// Its entry in [`State::timers`].
    timer: Option<Instant>,
    connected: bool,
    /// Why it ended, once it did.
    error: Option<ConnectionError>,
    handshake: Option<Waker>,
    readers: Vec<(StreamId, Waker)>,
    writers: Vec<(StreamId, Waker)>,
    stopped: Vec<(StreamId, Waker)>,
    incoming_bi: Vec<Waker>,
    available_bi: Vec<Waker>,
    closed: Vec<Waker>,
}

impl Conn {
    fn new(inner: proto::Connection, serial: u64) -> Box<Self> {
        Box::new(Self {
            inner,
            serial,
            dirty: false,
            timer: None,
            connected: false,
            error: None,
            handshake: None,
            readers: Vec::new(),
            writers: Vec::new(),
            stopped: Vec::new(),
            incoming_bi: Vec::new(),
            available_bi: Vec::new(),
            closed: Vec::new(),
        })
    }

    /// The connection ended: everyone waiting learns why.
    fn terminate(&mut self, reason: ConnectionError) {
        if self.error.is_none() {
            self.error = Some(reason);
        }
        if let Some(w) = self.handshake.take() {
            w.wake();
        }
        wake_all_streams(&mut self.readers);
        wake_all_streams(&mut self.writers);
        wake_all_streams(&mut self.stopped);
        wake_all(&mut self.incoming_bi);
        wake_all(&mut self.available_bi);
        wake_all(&mut self.closed);
    }

    fn close(&mut self, now: Instant, code: VarInt, reason: &[u8]) {
        if !self.inner.is_closed() {
            self.inner.close(now, code, Bytes::copy_from_slice(reason));
        }
        self.terminate(ConnectionError::LocallyClosed);
    }

    /// Wakes the tasks waiting on what the connection reports.
    fn app_events(&mut self) {
        while let Some(event) = self.inner.poll() {
            match event {
                Event::Connected => {
                    self.connected = true;
                    if let Some(w) = self.handshake.take() {
                        w.wake();
                    }
                }
                Event::ConnectionLost { reason } => self.terminate(reason),
                Event::Stream(StreamEvent::Readable { id }) => wake_stream(&mut self.readers, id),
                Event::Stream(StreamEvent::Writable { id }) => wake_stream(&mut self.writers, id),
                Event::Stream(StreamEvent::Finished { id }) => wake_stream(&mut self.stopped, id),
                Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    wake_stream(&mut self.stopped, id);
                    wake_stream(&mut self.writers, id);
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    wake_all(&mut self.incoming_bi);
                }
                Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                    wake_all(&mut self.available_bi);
                }
                Event::Stream(_)
                | Event::HandshakeDataReady
                | Event::DatagramReceived
                | Event::DatagramsUnblocked => {}
            }
        }
    }
}

/// A datagram the socket had no room for, sent before anything else.
struct Blocked {
    transmit: proto::Transmit,
    contents: Vec<u8>,
}

struct State {
    endpoint: proto::Endpoint,
    /// By handle; boxed, so the table costs a pointer per connection.
    conns: Vec<Option<Box<Conn>>>,
    live: usize,
    next_serial: u64,
    /// Connections with something to do, in the order they got it.
    dirty: VecDeque<ConnectionHandle>,
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    incoming: VecDeque<proto::Incoming>,
    acceptors: Vec<Waker>,
    /// The driver's waker.
    driver: Option<Waker>,
    /// The driver is running: what is touched now is driven before it sleeps.
    driving: bool,
    /// Closed: new connections are refused and `accept` ends.
    closed: bool,
    /// The [`Endpoint`] was dropped.
    abandoned: bool,
    /// Waiting for the last connection to be gone ([`Endpoint::wait_idle`]).
    idle: Vec<Waker>,
    /// Packets of every connection are built here, one transmit at a time.
    send_buf: Vec<u8>,
    blocked: Option<Blocked>,
}

impl State {
    fn conn(&mut self, ch: ConnectionHandle) -> Option<&mut Conn> {
        self.conns.get_mut(ch.0)?.as_deref_mut()
    }

    /// The connection a handle was made for: quinn reuses a drained
    /// connection's handle for the next one.
    fn conn_at(&mut self, ch: ConnectionHandle, serial: u64) -> Option<&mut Conn> {
        self.conn(ch).filter(|c| c.serial == serial)
    }

    fn wake_driver(&mut self) {
        if let Some(w) = self.driver.as_ref().filter(|_| !self.driving) {
            w.wake_by_ref();
        }
    }

    /// Gives the connection a turn in the driver.
    fn touch(&mut self, ch: ConnectionHandle) {
        if let Some(c) = self.conn(ch).filter(|c| !c.dirty) {
            c.dirty = true;
            self.dirty.push_back(ch);
        }
        self.wake_driver();
    }

    /// Takes a new connection in; returns its serial.
    fn insert(&mut self, ch: ConnectionHandle, conn: proto::Connection) -> u64 {
        if self.conns.len() <= ch.0 {
            self.conns.resize_with(ch.0 + 1, || None);
        }
        self.next_serial += 1;
        let serial = self.next_serial;
        if let Some(slot) = self.conns.get_mut(ch.0) {
            *slot = Some(Conn::new(conn, serial));
            self.live += 1;
        }
        self.touch(ch);
        serial
    }
}

struct Inner {
    state: Mutex<State>,
    /// Readiness is cleared by hand after a short read (below), which
    /// tokio's `UdpSocket` does not offer.
    socket: AsyncFd<std::net::UdpSocket>,
    udp: UdpSocketState,
}

impl Inner {
    /// Sends a stateless response (reset, close, version negotiation) if the
    /// socket has room; a peer that misses it asks again.
    fn respond(&self, t: &proto::Transmit, buf: &[u8]) {
        let _ = self.send_now(&udp_transmit(t, buf));
    }

    /// Sends `t` if the socket has room now. A `WouldBlock` leaves tokio's
    /// write readiness as it was: [`Self::send_when_ready`] finds out.
    fn send_now(&self, t: &quinn_udp::Transmit<'_>) -> io::Result<()> {
        self.udp.send(self.socket.get_ref().into(), t)
    }

    /// Sends `t` once the socket has room; `Pending` (with a wake-up
    /// registered) while it has none.
    fn send_when_ready(&self, cx: &mut Context<'_>, t: &quinn_udp::Transmit<'_>) -> Poll<()> {
        loop {
            let mut guard = match self.socket.poll_write_ready(cx) {
                Poll::Pending => return Poll::Pending,
                // A socket that cannot be polled drops the datagram, as a
                // failed send would.
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(guard)) => guard,
            };
            // Not writable after all: readiness is cleared and the next poll
            // registers the wake-up.
            if let Ok(_sent_or_lost) = guard.try_io(|s| self.udp.send(s.get_ref().into(), t)) {
                return Poll::Ready(());
            }
        }
    }
}

/// What quinn-udp sends for `t`, whose bytes start `buf`.
fn udp_transmit<'a>(t: &proto::Transmit, buf: &'a [u8]) -> quinn_udp::Transmit<'a> {
    quinn_udp::Transmit {
        destination: t.destination,
        ecn: t.ecn.map(|e| match e {
            proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
            proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
            proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
        }),
        contents: buf.get(..t.size).unwrap_or(buf),
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    }
}

fn proto_ecn(ecn: quinn_udp::EcnCodepoint) -> proto::EcnCodepoint {
    match ecn {
        quinn_udp::EcnCodepoint::Ect0 => proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => proto::EcnCodepoint::Ce,
    }
}

/// The QUIC endpoint nodes dial. Once it is dropped, the driver ends when
/// its connections are gone.
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let mut st = lock(&self.inner.state);
        st.abandoned = true;
        st.wake_driver();
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Serves `server` on `socket`. Must be called on the runtime the
    /// connections are to live on: the socket and the driver task go there.
    pub fn new(
        config: proto::EndpointConfig,
        server: Arc<proto::ServerConfig>,
        socket: std::net::UdpSocket,
    ) -> io::Result<Self> {
        let udp = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the socket, whose fd stays open and the
        // same until the AsyncFd is dropped.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)?;
        let max_payload = config.get_max_udp_payload_size().min(64 * 1024) as usize;
        let recv_buf = vec![0u8; max_payload * udp.gro_segments() * BATCH_SIZE];
        let endpoint =
            proto::Endpoint::new(Arc::new(config), Some(server), !udp.may_fragment(), None);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                endpoint,
                conns: Vec::new(),
                live: 0,
                next_serial: 0,
                dirty: VecDeque::new(),
                timers: BTreeSet::new(),
                incoming: VecDeque::new(),
                acceptors: Vec::new(),
                driver: None,
                driving: false,
                closed: false,
                abandoned: false,
                idle: Vec::new(),
                send_buf: Vec::new(),
                blocked: None,
            }),
            socket,
            udp,
        });
        tokio::spawn(Driver {
            inner: inner.clone(),
            recv_buf: recv_buf.into_boxed_slice(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            sleep_at: None,
        });
        Ok(Self { inner })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.socket.get_ref().local_addr()
    }

    /// The next connection attempt; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Incoming> {
        poll_fn(|cx| {
            let mut st = lock(&self.inner.state);
            if let Some(incoming) = st.incoming.pop_front() {
                return Poll::Ready(Some(Incoming {
                    inner: Some(incoming),
                    endpoint: self.inner.clone(),
                }));
            }
            if st.closed {
                return Poll::Ready(None);
            }
            wait_all(&mut st.acceptors, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Resolves once no connection is left, drained ones included: their
    /// last packets are sent.
    pub async fn wait_idle(&self) {
        poll_fn(|cx| {
            let mut st = lock(&self.inner.state);
            if st.live == 0 {
                return Poll::Ready(());
            }
            wait_all(&mut st.idle, cx.waker());
            Poll::Pending
        })
        .await;
    }

    /// Closes every connection with `code` and `reason` and refuses new ones.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        let now = Instant::now();
        let mut st = lock(&self.inner.state);
        st.closed = true;
        wake_all(&mut st.acceptors);
        // Attempts nobody took yet are turned away like later ones.
        let mut response = Vec::new();
        while let Some(incoming) = st.incoming.pop_front() {
            let t = st.endpoint.refuse(incoming, &mut response);
            self.inner.respond(&t, &response);
            response.clear();
        }
        let mut all = Vec::new();
        for (i, c) in st.conns.iter_mut().enumerate() {
            if let Some(c) = c {
                c.close(now, code, reason);
                all.push(ConnectionHandle(i));
            }
        }
        for ch in all {
            st.touch(ch);
        }
        st.wake_driver();
    }
}

/// A connection attempt not answered yet.
pub struct Incoming {
    inner: Option<proto::Incoming>,
    endpoint: Arc<Inner>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("remote", &self.remote_address())
            .finish_non_exhaustive()
    }
}

impl Incoming {
    pub fn remote_address(&self) -> SocketAddr {
        self.inner
            .as_ref()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |i| i.remote_address())
    }

    /// Whether the client proved that it receives packets at its address
    /// (it came back with the token of a Retry).
    pub fn remote_address_validated(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(proto::Incoming::remote_address_validated)
    }

    /// Turns the attempt away: the client is told `CONNECTION_REFUSED`.
    pub fn refuse(mut self) {
        if let Some(incoming) = self.inner.take() {
            let mut buf = Vec::new();
            let t = lock(&self.endpoint.state)
                .endpoint
                .refuse(incoming, &mut buf);
            self.endpoint.respond(&t, &buf);
        }
    }

    /// Asks the client to come back with a token that proves its address
    /// (a QUIC Retry, which keeps no state here); an attempt that came with
    /// one already is refused instead.
    pub fn retry(mut self) {
        if let Some(incoming) = self.inner.take() {
            let mut buf = Vec::new();
            let mut st = lock(&self.endpoint.state);
            let t = match st.endpoint.retry(incoming, &mut buf) {
                Ok(t) => t,
                Err(e) => {
                    buf.clear();
                    st.endpoint.refuse(e.into_incoming(), &mut buf)
                }
            };
            drop(st);
            self.endpoint.respond(&t, &buf);
        }
    }

    /// Accepts the attempt, with `config` instead of the endpoint's own if
    /// given; the handshake goes on in the returned [`Connecting`].
    pub fn accept(
        mut self,
        config: Option<Arc<proto::ServerConfig>>,
    ) -> Result<Connecting, ConnectionError> {
        let Some(incoming) = self.inner.take() else {
            return Err(ConnectionError::LocallyClosed);
        };
        let mut buf = Vec::new();
        let mut st = lock(&self.endpoint.state);
        match st
            .endpoint
            .accept(incoming, Instant::now(), &mut buf, config)
        {
            Ok((ch, conn)) => {
                let serial = st.insert(ch, conn);
                Ok(Connecting {
                    conn: Some(Connection::new(self.endpoint.clone(), ch, serial)),
                })
            }
            Err(e) => {
                drop(st);
                if let Some(t) = &e.response {
                    self.endpoint.respond(t, &buf);
                }
                Err(e.cause)
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(incoming) = self.inner.take() {
            lock(&self.endpoint.state).endpoint.ignore(incoming);
        }
    }
}

/// A connection whose handshake is under way.
#[derive(Debug)]
pub struct Connecting {
    conn: Option<Connection>,
}

impl Future for Connecting {
    type Output = Result<Connection, ConnectionError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(conn) = self.conn.as_ref() else {
            return Poll::Ready(Err(ConnectionError::LocallyClosed));
        };
        {
            let mut st = lock(&conn.r.ep.state);
            let Some(c) = st.conn_at(conn.r.ch, conn.r.serial) else {
                return Poll::Ready(Err(ConnectionError::LocallyClosed));
            };
            if !c.connected {
                if let Some(e) = &c.error {
                    return Poll::Ready(Err(e.clone()));
                }
                c.handshake = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        Poll::Ready(self.conn.take().ok_or(ConnectionError::LocallyClosed))
    }
}

/// A handle to a node connection. When the last handle and the last of its
/// streams are gone, the connection is closed (code 0), as quinn does.
#[derive(Clone)]
pub struct Connection {
    r: Arc<ConnRef>,
}

struct ConnRef {
    ep: Arc<Inner>,
    ch: ConnectionHandle,
    serial: u64,
}

impl Drop for ConnRef {
    fn drop(&mut self) {
        let mut st = lock(&self.ep.state);
        if let Some(c) = st
            .conn_at(self.ch, self.serial)
            .filter(|c| !c.inner.is_closed())
        {
            c.close(Instant::now(), 0u32.into(), b"");
            st.touch(self.ch);
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("handle", &self.r.ch.0)
            .finish_non_exhaustive()
    }
}

impl Connection {
    fn new(ep: Arc<Inner>, ch: ConnectionHandle, serial: u64) -> Self {
        Self {
            r: Arc::new(ConnRef { ep, ch, serial }),
        }
    }

    /// Runs `f` on the connection under the endpoint's lock, then gives the
    /// connection a turn in the driver if `f` says it changed something.
    fn with<R>(&self, f: impl FnOnce(&mut Conn) -> (R, bool)) -> Option<R> {
        let mut st = lock(&self.r.ep.state);
        let (r, changed) = f(st.conn_at(self.r.ch, self.r.serial)?);
        if changed {
            st.touch(self.r.ch);
        }
        Some(r)
    }

    /// Polls `f` until it is ready, giving the connection a turn in the
    /// driver whenever `f` says it changed something; a connection already
    /// removed reads as locally closed.
    async fn until<R>(
        &self,
        mut f: impl FnMut(&mut Conn, &Waker) -> (Poll<R>, bool),
    ) -> Result<R, ConnectionError> {
        poll_fn(|cx| {
            let mut st = lock(&self.r.ep.state);
            let Some(c) = st.conn_at(self.r.ch, self.r.serial) else {
                return Poll::Ready(Err(ConnectionError::LocallyClosed));
            };
            let (r, changed) = f(c, cx.waker());
            if changed {
                st.touch(self.r.ch);
            }
            r.map(Ok)
        })
        .await
    }

    /// Opens a bidirectional stream, waiting for the peer's stream limit.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let id = self
            .until(|c, w| {
                if let Some(e) = &c.error {
                    return (Poll::Ready(Err(e.clone())), false);
                }
                match c.inner.streams().open(Dir::Bi) {
                    Some(id) => (Poll::Ready(Ok(id)), false),
                    None => {
                        wait_all(&mut c.available_bi, w);
                        (Poll::Pending, false)
                    }
                }
            })
            .await??;
        Ok(self.streams(id))
    }

    /// The next bidirectional stream the peer opens.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let id = self
            .until(|c, w| {
                if let Some(id) = c.inner.streams().accept(Dir::Bi) {
                    // Accepting may raise the peer's stream limit.
                    return (Poll::Ready(Ok(id)), true);
                }
                if let Some(e) = &c.error {
                    return (Poll::Ready(Err(e.clone())), false);
                }
                wait_all(&mut c.incoming_bi, w);
                (Poll::Pending, false)
            })
            .await??;
        Ok(self.streams(id))
    }

    fn streams(&self, id: StreamId) -> (SendStream, RecvStream) {
        (
            SendStream {
                conn: self.clone(),
                id,
            },
            RecvStream {
                conn: self.clone(),
                id,
                done: false,
            },
        )
    }

    /// Resolves when the connection ends, with why.
    pub async fn closed(&self) -> ConnectionError {
        self.until(|c, w| match &c.error {
            Some(e) => (Poll::Ready(e.clone()), false),
            None => {
                wait_all(&mut c.closed, w);
                (Poll::Pending, false)
            }
        })
        .await
        .unwrap_or_else(|e| e)
    }

    /// Closes the connection: the peer is told `code` and `reason`.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.with(|c| {
            c.close(Instant::now(), code, reason);
            ((), true)
        });
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.with(|c| (c.inner.remote_address(), false))
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn rtt(&self) -> Duration {
        self.with(|c| (c.inner.rtt(), false)).unwrap_or_default()
    }

    /// The connection's counters: UDP bytes and datagrams, the path's RTT
    /// and losses.
    pub fn stats(&self) -> quinn_proto::ConnectionStats {
        self.with(|c| (c.inner.stats(), false)).unwrap_or_default()
    }

    /// UDP bytes sent on the connection so far.
    pub fn sent_bytes(&self) -> u64 {
        self.with(|c| (c.inner.stats().udp_tx.bytes, false))
            .unwrap_or_default()
    }

    pub fn set_send_window(&self, window: u64) {
        self.with(|c| {
            c.inner.set_send_window(window);
            ((), true)
        });
    }

    /// The peer's certificate chain, once the handshake is done.
    pub fn peer_identity(&self) -> Option<Box<dyn std::any::Any>> {
        self.with(|c| (c.inner.crypto_session().peer_identity(), false))
            .flatten()
    }
}

/// The sending half of a stream. Dropping it finishes the stream.
#[derive(Debug)]
pub struct SendStream {
    conn: Connection,
    id: StreamId,
}

impl SendStream {
    /// The stream's QUIC id, which its peer sees as well.
    pub fn id(&self) -> u64 {
        u64::from(self.id)
    }

    /// Writes what of `f`'s data the stream takes now, waiting while it takes
    /// nothing.
    async fn write_with<R>(
        &mut self,
        mut f: impl FnMut(&mut proto::SendStream<'_>) -> Result<R, proto::WriteError>,
    ) -> Result<R, StreamError> {
        let id = self.id;
        self.conn
            .until(|c, w| {
                if let Some(e) = &c.error {
                    return (
                        Poll::Ready(Err(StreamError::ConnectionLost(e.clone()))),
                        false,
                    );
                }
                match f(&mut c.inner.send_stream(id)) {
                    Ok(r) => (Poll::Ready(Ok(r)), true),
                    Err(proto::WriteError::Blocked) => {
                        wait_on(&mut c.writers, id, w);
                        (Poll::Pending, false)
                    }
                    Err(proto::WriteError::Stopped(code)) => {
                        (Poll::Ready(Err(StreamError::Stopped(code))), false)
                    }
                    Err(proto::WriteError::ClosedStream) => {
                        (Poll::Ready(Err(StreamError::ClosedStream)), false)
                    }
                }
            })
            .await
            .map_err(StreamError::ConnectionLost)?
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> Result<(), StreamError> {
        while !buf.is_empty() {
            let n = self.write_with(|s| s.write(buf)).await?;
            buf = buf.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// Writes all of `chunk` without copying it: QUIC keeps the bytes until
    /// the peer acknowledges them.
    pub async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), StreamError> {
        let mut chunks = [chunk];
        while !chunks[0].is_empty() {
            self.write_with(|s| s.write_chunks(&mut chunks)).await?;
        }
        Ok(())
    }

    /// Ends the stream after what was written.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        let id = self.id;
        self.conn
            .with(|c| match c.inner.send_stream(id).finish() {
                Ok(()) => (Ok(()), true),
                // The peer stopped reading: nothing to end.
                Err(proto::FinishError::Stopped(_)) => (Ok(()), false),
                Err(proto::FinishError::ClosedStream) => (Err(StreamError::ClosedStream), false),
            })
            .unwrap_or(Err(StreamError::ClosedStream))
    }

    /// Abandons the stream: the peer reads `code` instead of the rest.
    pub fn reset(&mut self, code: VarInt) -> Result<(), StreamError> {
        let id = self.id;
        self.conn
            .with(|c| match c.inner.send_stream(id).reset(code) {
                Ok(()) => (Ok(()), true),
                Err(_) => (Err(StreamError::ClosedStream), false),
            })
            .unwrap_or(Err(StreamError::ClosedStream))
    }

    /// Resolves when the peer has everything up to the finish (`None`) or
    /// stopped reading (`Some(code)`).
    pub async fn stopped(&mut self) -> Result<Option<VarInt>, StreamError> {
        let id = self.id;
        self.conn
            .until(|c, w| match c.inner.send_stream(id).stopped() {
                Err(_) => (Poll::Ready(Ok(None)), false),
                Ok(Some(code)) => (Poll::Ready(Ok(Some(code))), false),
                Ok(None) => {
                    if let Some(e) = &c.error {
                        return (
                            Poll::Ready(Err(StreamError::ConnectionLost(e.clone()))),
                            false,
                        );
                    }
                    wait_on(&mut c.stopped, id, w);
                    (Poll::Pending, false)
                }
            })
            .await
            .map_err(StreamError::ConnectionLost)?
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        let id = self.id;
        self.conn.with(|c| {
            forget_stream(&mut c.writers, id);
            forget_stream(&mut c.stopped, id);
            if c.error.is_some() {
                return ((), false);
            }
            let mut s = c.inner.send_stream(id);
            let changed = match s.finish() {
                Ok(()) => true,
                Err(proto::FinishError::Stopped(code)) => s.reset(code).is_ok(),
                Err(proto::FinishError::ClosedStream) => false,
            };
            ((), changed)
        });
    }
}

/// The receiving half of a stream. Dropping it before the end stops the
/// stream (code 0).
#[derive(Debug)]
pub struct RecvStream {
    conn: Connection,
    id: StreamId,
    /// The end (or a reset) was read.
    done: bool,
}

impl RecvStream {
    /// The next chunk of at most `max` bytes, as QUIC received it; `None` at
    /// the stream's end.
    pub async fn read_chunk(
        &mut self,
        max: usize,
        ordered: bool,
    ) -> Result<Option<proto::Chunk>, StreamError> {
        if self.done {
            return Ok(None);
        }
        let id = self.id;
        let read = self
            .conn
            .until(|c, w| {
                let mut recv = c.inner.recv_stream(id);
                let mut chunks = match recv.read(ordered) {
                    Ok(chunks) => chunks,
                    Err(_) => return (Poll::Ready(Err(StreamError::ClosedStream)), false),
                };
                let got = chunks.next(max);
                // Reading may give the peer credit to send more.
                let credit = chunks.finalize().should_transmit();
                let r = match got {
                    Ok(chunk) => Poll::Ready(Ok(chunk)),
                    Err(proto::ReadError::Reset(code)) => {
                        Poll::Ready(Err(StreamError::Reset(code)))
                    }
                    Err(proto::ReadError::Blocked) => match &c.error {
                        Some(e) => Poll::Ready(Err(StreamError::ConnectionLost(e.clone()))),
                        None => {
                            wait_on(&mut c.readers, id, w);
                            Poll::Pending
                        }
                    },
                };
                (r, credit)
            })
            .await
            .map_err(StreamError::ConnectionLost)?;
        match &read {
            Ok(None) | Err(StreamError::Reset(_)) => self.done = true,
            _ => {}
        }
        read
    }

    /// Tells the peer to stop sending, with `code`.
    pub fn stop(&mut self, code: VarInt) -> Result<(), StreamError> {
        let id = self.id;
        self.done = true;
        self.conn
            .with(|c| match c.inner.recv_stream(id).stop(code) {
                Ok(()) => (Ok(()), true),
                Err(_) => (Err(StreamError::ClosedStream), false),
            })
            .unwrap_or(Err(StreamError::ClosedStream))
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let (id, done) = (self.id, self.done);
        self.conn.with(|c| {
            forget_stream(&mut c.readers, id);
            if done || c.error.is_some() {
                return ((), false);
            }
            ((), c.inner.recv_stream(id).stop(0u32.into()).is_ok())
        });
    }
}

/// Passes events between a connection and the endpoint: connection ids, and
/// the end of a drained connection.
fn endpoint_events(endpoint: &mut proto::Endpoint, c: &mut Conn, ch: ConnectionHandle) {
    while let Some(event) = c.inner.poll_endpoint_events() {
        if let Some(back) = endpoint.handle_event(ch, event) {
            c.inner.handle_event(back);
        }
    }
}

/// The task that owns the socket and moves every connection along.
struct Driver {
    inner: Arc<Inner>,
    recv_buf: Box<[u8]>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    sleep_at: Option<Instant>,
}

impl Driver {
    /// Reads datagrams into their connections until the socket is empty or
    /// the turn is over; returns whether there may be more.
    fn recv(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let inner = &*self.inner;
        let started = Instant::now();
        let mut metas = [RecvMeta::default(); BATCH_SIZE];
        loop {
            let mut guard = match inner.socket.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "relay socket not readable");
                    return false;
                }
                Poll::Ready(Ok(guard)) => guard,
            };
            let stride = self.recv_buf.len() / BATCH_SIZE;
            let mut bufs = self.recv_buf.chunks_mut(stride);
            // The buffer is BATCH_SIZE strides long: every slot gets one.
            let mut iovs: [IoSliceMut<'_>; BATCH_SIZE] =
                std::array::from_fn(|_| IoSliceMut::new(bufs.next().unwrap_or_default()));
            let got = guard.try_io(|s| inner.udp.recv(s.get_ref().into(), &mut iovs, &mut metas));
            let n = match got {
                // Nothing there: readiness is cleared, the next poll waits.
                Err(_would_block) => continue,
                Ok(Ok(n)) => n,
                // ICMP errors reported on an unconnected socket mean nothing to
                // QUIC, and may be forged.
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "relay socket read failed");
                    return false;
                }
            };
            if n < BATCH_SIZE {
                // Fewer datagrams than asked for: the socket was empty. Saying
                // so spares the read that would only learn it; a datagram that
                // came since has its own readiness event queued in epoll.
                guard.clear_ready();
            }
            drop(guard);
            let mut st = lock(&inner.state);
            let mut response = Vec::new();
            for (meta, buf) in metas.iter().zip(iovs.iter()).take(n) {
                let mut data = BytesMut::from(buf.get(..meta.len).unwrap_or_default());
                while !data.is_empty() {
                    let datagram = data.split_to(meta.stride.min(data.len()));
                    let ecn = meta.ecn.map(proto_ecn);
                    match st.endpoint.handle(
                        now,
                        meta.addr,
                        meta.dst_ip,
                        ecn,
                        datagram,
                        &mut response,
                    ) {
                        Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                            if let Some(c) = st.conn(ch) {
                                c.inner.handle_event(event);
                                st.touch(ch);
                            }
                        }
                        Some(DatagramEvent::NewConnection(incoming)) => {
                            if st.closed {
                                let t = st.endpoint.refuse(incoming, &mut response);
                                inner.respond(&t, &response);
                            } else {
                                st.incoming.push_back(incoming);
                                wake_all(&mut st.acceptors);
                            }
                        }
                        Some(DatagramEvent::Response(t)) => inner.respond(&t, &response),
                        None => {}
                    }
                    response.clear();
                }
            }
            drop(st);
            if started.elapsed() >= RECV_TURN {
                return true;
            }
        }
    }

    /// Gives each connection with something to do its turn: endpoint
    /// events, timers, packets out, events to the tasks waiting on it.
    /// Returns whether some connection has more to send.
    fn drive(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let inner = &*self.inner;
        let mut guard = lock(&inner.state);
        let st = &mut *guard;
        // Deadlines that passed.
        while let Some(&(at, ch)) = st.timers.first() {
            if at > now {
                break;
            }
            st.timers.pop_first();
            if let Some(c) = st.conn(ch) {
                c.timer = None;
                c.inner.handle_timeout(now);
                st.touch(ch);
            }
        }
        let max_segments = inner.udp.max_gso_segments().min(GSO_SEGMENTS);
        let mut more = false;
        let turns = st.dirty.len();
        for _ in 0..turns {
            let Some(ch) = st.dirty.pop_front() else {
                break;
            };
            let Some(c) = st.conns.get_mut(ch.0).and_then(Option::as_deref_mut) else {
                continue;
            };
            c.dirty = false;
            endpoint_events(&mut st.endpoint, c, ch);
            // Packets out, until there are none or the turn is over.
            let mut sent = 0;
            let mut blocked = false;
            loop {
                // A datagram the socket refused goes first.
                if let Some(b) = &st.blocked {
                    if inner
                        .send_when_ready(cx, &udp_transmit(&b.transmit, &b.contents))
                        .is_pending()
                    {
                        blocked = true;
                        break;
                    }
                    st.send_buf = st.blocked.take().map(|b| b.contents).unwrap_or_default();
                }
                if sent >= TRANSMITS_PER_TURN {
                    break;
                }
                st.send_buf.clear();
                let Some(t) = c.inner.poll_transmit(now, max_segments, &mut st.send_buf) else {
                    break;
                };
                sent += t.segment_size.map_or(1, |s| t.size.div_ceil(s));
                match inner.send_now(&udp_transmit(&t, &st.send_buf)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        st.blocked = Some(Blocked {
                            transmit: t,
                            contents: std::mem::take(&mut st.send_buf),
                        });
                    }
                    // Other errors are logged by quinn-udp and count as loss.
                    _ => {}
                }
            }
            c.app_events();
            // Its next deadline.
            let next = c.inner.poll_timeout();
            if next != c.timer {
                if let Some(old) = c.timer.take() {
                    st.timers.remove(&(old, ch));
                }
                if let Some(at) = next {
                    st.timers.insert((at, ch));
                }
                c.timer = next;
            }
            if c.inner.is_drained() {
                endpoint_events(&mut st.endpoint, c, ch);
                if let Some(at) = c.timer {
                    st.timers.remove(&(at, ch));
                }
                if let Some(mut gone) = st.conns.get_mut(ch.0).and_then(Option::take) {
                    gone.terminate(ConnectionError::LocallyClosed);
                }
                st.live -= 1;
                if st.live == 0 {
                    wake_all(&mut st.idle);
                }
                continue;
            }
            if blocked || sent >= TRANSMITS_PER_TURN {
                c.dirty = true;
                st.dirty.push_back(ch);
                if blocked {
                    // The socket's readiness wakes the driver again; the other
                    // connections wait their turn.
                    break;
                }
                more = true;
            }
        }
        more
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        // What is touched while the driver runs is driven in this same poll
        // or seen below: no need to wake it.
        lock(&self.inner.state).driving = true;
        let mut more = self.recv(cx, now);
        more |= self.drive(cx, now);
        let next = {
            let mut st = lock(&self.inner.state);
            st.driving = false;
            if !st.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.driver = Some(cx.waker().clone());
            }
            if st.abandoned && st.live == 0 {
                return Poll::Ready(());
            }
            if !st.dirty.is_empty() && st.blocked.is_none() {
                more = true;
            }
            st.timers.first().map(|&(at, _)| at)
        };
        if let Some(at) = next {
            if self.sleep_at != Some(at) {
                self.sleep_at = Some(at);
                self.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(at));
            }
            if self.sleep.as_mut().poll(cx).is_ready() {
                self.sleep_at = None;
                more = true;
            }
        }
        if more {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jusy_common::identity::PeerId;
    use jusy_common::wire::ALPN;

    struct Pair {
        relay: Endpoint,
        node: quinn::Endpoint,
        node_config: quinn::ClientConfig,
        node_id: PeerId,
    }

    fn pair() -> Pair {
        let broker = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let node = ed25519_dalek::SigningKey::from_bytes(&[4u8; 32]);
        let tls = jusy_common::tls::server_config(&broker, ALPN).expect("server tls");
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic");
        let mut server = proto::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(Arc::new(super::super::transport_config(1472)));
        let mut config = proto::EndpointConfig::default();
        jusy_node::tune_endpoint(&mut config, 1472);
        let socket = jusy_node::quic_socket("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let relay = Endpoint::new(config, Arc::new(server), socket).expect("endpoint");
        let tls = jusy_common::tls::client_config(&node, PeerId::from_signing_key(&broker), ALPN)
            .expect("client tls");
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
        let mut node_config = quinn::ClientConfig::new(Arc::new(quic));
        node_config.transport_config(Arc::new(jusy_node::transport_config(1472)));
        let node_ep =
            jusy_node::client_endpoint("127.0.0.1:0".parse().expect("addr"), 1472).expect("node");
        Pair {
            relay,
            node: node_ep,
            node_config,
            node_id: PeerId::from_signing_key(&node),
        }
    }

    impl Pair {
        /// A node connection, seen from both ends.
        async fn connect(&self) -> (Connection, quinn::Connection) {
            let addr = self.relay.local_addr().expect("addr");
            let dial = self
                .node
                .connect_with(self.node_config.clone(), addr, "jusy")
                .expect("connect");
            let accept = async {
                let incoming = self.relay.accept().await.expect("incoming");
                assert_eq!(
                    incoming.remote_address(),
                    self.node.local_addr().expect("addr")
                );
                incoming
                    .accept(None)
                    .expect("accept")
                    .await
                    .expect("handshake")
            };
            let (relay_side, node_side) = tokio::join!(accept, dial);
            (relay_side, node_side.expect("node handshake"))
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Reads a relay stream to its end.
    async fn read_all(recv: &mut RecvStream) -> Result<Vec<u8>, StreamError> {
        let mut got = Vec::new();
        while let Some(chunk) = recv.read_chunk(64 * 1024, true).await? {
            got.extend_from_slice(&chunk.bytes);
        }
        Ok(got)
    }

    #[tokio::test]
    async fn streams_carry_bytes_both_ways_past_every_window() {
        let p = pair();
        let (relay, node) = p.connect().await;
        assert_eq!(super::super::node_link::peer_id(&relay), Some(p.node_id));
        // The node opens its control stream; the relay takes it.
        let (mut ctl_send, _ctl_recv) = node.open_bi().await.expect("open");
        ctl_send.write_all(b"hello").await.expect("write");
        let (_send, mut recv) = relay.accept_bi().await.expect("accept");
        let hello = recv
            .read_chunk(5, true)
            .await
            .expect("read")
            .expect("chunk");
        assert_eq!(&hello.bytes[..], b"hello");

        // 12 MiB out and back: more than the relay's first send window
        // (2 MiB) and the node's stream window (8 MiB).
        let data = pattern(12 << 20);
        let (mut send, mut recv) = relay.open_bi().await.expect("open");
        let echo = async {
            let (mut s, mut r) = node.accept_bi().await.expect("accept");
            while let Some(chunk) = r.read_chunk(64 * 1024, true).await.expect("node read") {
                s.write_chunk(chunk.bytes).await.expect("node write");
            }
            s.finish().expect("finish");
            s.stopped().await.expect("acknowledged");
        };
        let out = async {
            for piece in data.chunks(256 * 1024) {
                send.write_chunk(Bytes::copy_from_slice(piece))
                    .await
                    .expect("write");
            }
            send.finish().expect("finish");
            send.stopped().await.expect("delivered")
        };
        let (back, delivered, ()) = tokio::join!(read_all(&mut recv), out, echo);
        assert_eq!(delivered, None, "finished, not stopped");
        let back = back.expect("read back");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "bytes came back changed");
        assert_eq!(
            recv.read_chunk(1, true).await,
            Ok(None),
            "the end stays the end"
        );
    }

    #[tokio::test]
    async fn streams_whose_clients_do_not_read_hold_up_no_other() {
        let body = async {
            let p = pair();
            let (relay, node) = p.connect().await;
            // An order's every client connection stops reading, and one more's
            // on another order: their node fills each stream's window, more
            // in all than a fixed window for the whole connection (32 MiB)
            // would have held.
            let window = super::super::STREAM_RECEIVE_WINDOW as usize;
            let output = pattern(window);
            let mut stalled = Vec::new();
            for _ in 0..=super::super::splice::MAX_CONNECTIONS {
                let (mut send, recv) = relay.open_bi().await.expect("open");
                send.write_all(b"s").await.expect("write");
                let (mut s, mut r) = node.accept_bi().await.expect("accept");
                r.read_chunk(1, true).await.expect("read").expect("chunk");
                // Taken only once the relay has granted the whole window.
                s.write_all(&output).await.expect("the node's output");
                stalled.push((send, recv, s, r));
            }
            // Another session's output still flows, and so does the node's
            // control stream.
            let (mut send, mut recv) = relay.open_bi().await.expect("open");
            send.write_all(b"t").await.expect("write");
            let (mut s, mut r) = node.accept_bi().await.expect("accept");
            r.read_chunk(1, true).await.expect("read").expect("chunk");
            let data = pattern(3 * window);
            let out = async {
                s.write_all(&data).await.expect("write");
                s.finish().expect("finish");
            };
            let (got, ()) = tokio::join!(read_all(&mut recv), out);
            assert!(got.expect("read") == data, "the session's output changed");
            let (mut ctl, _ctl_recv) = node.open_bi().await.expect("open");
            ctl.write_all(b"receipt").await.expect("write");
            let (_send, mut recv) = relay.accept_bi().await.expect("accept");
            let got = recv
                .read_chunk(7, true)
                .await
                .expect("read")
                .expect("chunk");
            assert_eq!(&got.bytes[..], b"receipt");
            drop(stalled);
        };
        // A stream held up would wait forever: fail instead.
        tokio::time::timeout(Duration::from_secs(60), body)
            .await
            .expect("a stream was held up by the unread ones");
    }

    #[tokio::test]
    async fn resets_and_stops_reach_the_other_side() {
        let p = pair();
        let (relay, node) = p.connect().await;

        // The relay gives a stream up: the node reads the code.
        let (mut send, _recv) = relay.open_bi().await.expect("open");
        send.write_all(b"partial").await.expect("write");
        let (_s, mut r) = node.accept_bi().await.expect("accept");
        // The stream reaches the node with its first bytes.
        let first = r.read_chunk(7, true).await.expect("read").expect("chunk");
        assert_eq!(&first.bytes[..], b"partial");
        send.reset(7u32.into()).expect("reset");
        let err = r.read_chunk(1, true).await.expect_err("reset");
        assert_eq!(err, quinn::ReadError::Reset(7u32.into()));

        // The node stops reading: the relay's writes fail with its code.
        let (mut send, _recv) = relay.open_bi().await.expect("open");
        send.write_all(b"x").await.expect("write");
        let (_s, mut r) = node.accept_bi().await.expect("accept");
        r.stop(9u32.into()).expect("stop");
        assert_eq!(send.stopped().await, Ok(Some(9u32.into())));
        let big = Bytes::from(pattern(1 << 20));
        assert_eq!(
            send.write_chunk(big).await,
            Err(StreamError::Stopped(9u32.into()))
        );

        // The node resets its side: the relay reads the code.
        let (mut s, _r) = node.open_bi().await.expect("open");
        s.write_all(b"y").await.expect("write");
        let (_send, mut recv) = relay.accept_bi().await.expect("accept");
        s.reset(5u32.into()).expect("reset");
        let seen = loop {
            match recv.read_chunk(16, true).await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert_eq!(seen, Err(StreamError::Reset(5u32.into())));
    }

    #[tokio::test]
    async fn a_close_or_the_last_handle_ends_the_connection_at_both_ends() {
        let p = pair();
        let (relay, node) = p.connect().await;
        relay.close(2u32.into(), b"replaced");
        match node.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, 2u32.into());
                assert_eq!(&c.reason[..], b"replaced");
            }
            e => panic!("node saw {e}"),
        }
        assert_eq!(relay.closed().await, ConnectionError::LocallyClosed);
        let open = relay.open_bi().await;
        assert!(matches!(open, Err(ConnectionError::LocallyClosed)));

        // Dropping every handle (streams included) closes with code 0.
        let (relay, node) = p.connect().await;
        let (send, recv) = relay.open_bi().await.expect("open");
        drop(relay);
        drop((send, recv));
        match node.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, 0u32.into());
            }
            e => panic!("node saw {e}"),
        }

        // A node that closes is seen by the relay.
        let (relay, node) = p.connect().await;
        node.close(3u32.into(), b"leaving");
        match relay.closed().await {
            ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, 3u32.into()),
            e => panic!("relay saw {e}"),
        }
    }

    #[tokio::test]
    async fn a_handle_reaches_only_the_connection_it_was_made_for() {
        let p = pair();
        let (first, node) = p.connect().await;
        let stale = first.clone();
        first.close(1u32.into(), b"done");
        drop(first);
        let _ = node.closed().await;
        // The first connection drains and gives its handle back.
        p.relay.wait_idle().await;
        let (second, node2) = p.connect().await;
        assert_eq!(second.r.ch, stale.r.ch, "quinn reuses the handle");
        // What the stale handle does never reaches the new connection.
        stale.close(9u32.into(), b"stale");
        assert!(stale.open_bi().await.is_err());
        drop(stale);
        let (mut send, _recv) = second.open_bi().await.expect("the new one is open");
        send.write_all(b"still here").await.expect("write");
        let (_s, mut r) = node2.accept_bi().await.expect("accept");
        let got = r.read_chunk(64, true).await.expect("read").expect("chunk");
        assert_eq!(&got.bytes[..], b"still here");
    }

    #[tokio::test]
    async fn a_closed_endpoint_ends_accept_and_every_connection() {
        let p = pair();
        let (relay, node) = p.connect().await;
        p.relay.close(0u32.into(), b"broker stopping");
        assert!(p.relay.accept().await.is_none());
        assert_eq!(relay.closed().await, ConnectionError::LocallyClosed);
        assert!(matches!(
            node.closed().await,
            quinn::ConnectionError::ApplicationClosed(_)
        ));
        // The closed connection drains and is gone.
        p.relay.wait_idle().await;
        // New nodes are turned away.
        let addr = p.relay.local_addr().expect("addr");
        let dial = p
            .node
            .connect_with(p.node_config.clone(), addr, "jusy")
            .expect("connect");
        assert!(dial.await.is_err());
    }
}
