//! One attached node: its QUIC connection, control stream, ready slots and the
//! orders waiting for its answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jusy_common::capacity::{SignedCapacity, Terms};
use jusy_common::frame::{self, Decoder};
use jusy_common::identity::PeerId;
use jusy_common::ledger::AccountId;
use jusy_common::verdict::Party;
use jusy_common::wire::{Assignment, BrokerMsg, NodeMsg, OrderId, PROTOCOL_VERSION, Slot};
use tokio::sync::oneshot;

use super::admission::{self, Unidentified};
use super::advertise::{self, CapacityUpdate};
use super::quic::{self, StreamError};
use super::speed_tests::{self, Later};
use super::{AssignError, Relay, RelayEvent, lock};
use crate::store::Role;

/// The node's answer to an assignment: its signed acceptance, unchecked.
type Answer = oneshot::Sender<Result<Vec<u8>, AssignError>>;

/// A node attached to this relay.
#[derive(Debug)]
pub struct NodeLink {
    pub id: PeerId,
    /// Distinguishes reconnections of the same node.
    pub link_id: u64,
    pub host_key: String,
    /// The account that earns for this node's sessions.
    pub owner: Option<AccountId>,
    /// The node's CPU has AES instructions (its clients should prefer
    /// AES-GCM).
    pub aes: bool,
    pub conn: quic::Connection,
    /// Messages for the node, written by its control loop; `None` once the
    /// loop ended. A queue and a [`Notify`](tokio::sync::Notify) rather than
    /// a channel: an unbounded channel takes about 800 bytes per node up
    /// front, even when idle.
    outbox: Mutex<Option<Vec<BrokerMsg>>>,
    queued: tokio::sync::Notify,
    slots: Mutex<Vec<Slot>>,
    pending: Mutex<HashMap<OrderId, Answer>>,
    /// The cores the node reports in its hello.
    pub cores: u32,
    /// How long the last passed speed test took, as the broker measured it,
    /// and how many lanes (cores) it ran at once.
    speed: Mutex<Option<(Duration, u32)>>,
    /// The node's latest signed capacity statement, when advertised.
    capacity: Mutex<Option<SignedCapacity>>,
    /// The address the node's packets came from when last looked at.
    path: Mutex<std::net::SocketAddr>,
    /// Client streams waiting for their login, by QUIC stream id.
    logins: Mutex<HashMap<u64, (OrderId, oneshot::Sender<()>)>>,
}

/// A client stream's wait for the node to report its login; dropping it
/// forgets the stream.
#[derive(Debug)]
pub struct LoginWait<'a> {
    link: &'a NodeLink,
    stream: u64,
    /// Fires when the node reports the login.
    pub logged_in: oneshot::Receiver<()>,
}

impl Drop for LoginWait<'_> {
    fn drop(&mut self) {
        lock(&self.link.logins).remove(&self.stream);
    }
}

/// The node's identity from its TLS certificate.
pub fn peer_id(conn: &quic::Connection) -> Option<PeerId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    jusy_common::tls::peer_id_of(certs.first()?)
}

impl NodeLink {
    /// How long the node's last passed speed test took.
    pub fn speed(&self) -> Option<Duration> {
        lock(&self.speed).map(|(took, _)| took)
    }

    /// The cores the node is believed to have: what it reports, held to
    /// what its last speed test supported (taken at its word when the
    /// operator turned the test off). Its receipts prove no more CPU time
    /// than these could give.
    pub fn proven_cores(&self, tested: bool) -> u32 {
        let lanes = lock(&self.speed).map(|(_, lanes)| lanes);
        jusy_common::plausible::cores(self.cores, if tested { lanes.or(Some(1)) } else { None })
    }

    /// The node's latest signed capacity statement, if it is advertised.
    pub fn capacity(&self) -> Option<SignedCapacity> {
        lock(&self.capacity).clone()
    }

    /// Notes where the node's packets come from now. A home router that
    /// renumbers or forgets its mapping moves the node to a new address and
    /// port; QUIC follows it without a new handshake (connection migration),
    /// which is said here because nothing else would show it.
    pub fn follow_path(&self) {
        let now = self.conn.remote_address();
        let before = std::mem::replace(&mut *lock(&self.path), now);
        if before != now {
            tracing::info!(node_id = %self.id, from = %before, to = %now, "node's connection migrated to a new address");
        }
    }

    /// Waits for the login of the client on `stream`, a stream the relay
    /// opened for `order_id`.
    pub fn expect_login(&self, stream: u64, order_id: OrderId) -> LoginWait<'_> {
        let (tx, logged_in) = oneshot::channel();
        lock(&self.logins).insert(stream, (order_id, tx));
        LoginWait {
            link: self,
            stream,
            logged_in,
        }
    }

    /// The node says the client on `stream` logged in to `order_id`. A stream
    /// that is not waiting, or is another order's, is ignored: the node can
    /// only speak of client connections the relay holds for that order.
    fn logged_in(&self, order_id: OrderId, stream: u64) {
        let mut logins = lock(&self.logins);
        match logins.remove(&stream) {
            Some((of, tx)) if of == order_id => {
                let _ = tx.send(());
            }
            Some(other) => {
                logins.insert(stream, other);
                tracing::warn!(node_id = %self.id.short(), %order_id, stream, "node reported a login for another order's stream");
            }
            None => tracing::debug!(%order_id, stream, "login for a stream that is gone"),
        }
    }

    pub fn free_slots(&self) -> usize {
        lock(&self.slots).len()
    }

    pub(crate) fn take_slot(&self) -> Option<Slot> {
        let mut slots = lock(&self.slots);
        (!slots.is_empty()).then(|| slots.remove(0))
    }

    /// Gives back a slot claimed for an order that was never sent to the node.
    pub fn return_slot(&self, slot: Slot) {
        lock(&self.slots).push(slot);
    }

    pub(super) fn assign(
        &self,
        a: Assignment,
    ) -> Result<oneshot::Receiver<Result<Vec<u8>, AssignError>>, AssignError> {
        let (tx, rx) = oneshot::channel();
        let order_id = a.order_id;
        lock(&self.pending).insert(order_id, tx);
        if let Err(e) = self.send(BrokerMsg::Assign(a)) {
            lock(&self.pending).remove(&order_id);
            return Err(e);
        }
        Ok(rx)
    }

    /// Asks the node to end an order's session.
    pub fn cancel(&self, order_id: OrderId) {
        let _ = self.send(BrokerMsg::Cancel { order_id });
    }

    /// Queues `msg` for the node's control loop.
    fn send(&self, msg: BrokerMsg) -> Result<(), AssignError> {
        lock(&self.outbox)
            .as_mut()
            .ok_or(AssignError::Gone)?
            .push(msg);
        self.queued.notify_one();
        Ok(())
    }

    /// What was queued since the last call (nothing after [`Self::end_outbox`]).
    fn take_outbox(&self) -> Vec<BrokerMsg> {
        lock(&self.outbox)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The control loop ended: later messages fail with [`AssignError::Gone`].
    fn end_outbox(&self) {
        *lock(&self.outbox) = None;
    }

    pub(super) fn close(&self, why: &str) {
        self.conn.close(2u32.into(), why.as_bytes());
    }

    fn answer(&self, order_id: OrderId, result: Result<Vec<u8>, AssignError>) {
        if let Some(tx) = lock(&self.pending).remove(&order_id) {
            let _ = tx.send(result);
        }
    }
}

/// Why a node's connection ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connection: {0}")]
    Connection(#[from] quinn_proto::ConnectionError),
    #[error("control stream: {0}")]
    Stream(#[from] StreamError),
    #[error("bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("control stream closed")]
    Closed,
    #[error("{0}")]
    Protocol(String),
}

/// Reads the next control message. Chunks come straight from QUIC's receive
/// buffers, so an idle link holds no read buffer of its own.
async fn read_msg(recv: &mut quic::RecvStream, dec: &mut Decoder) -> Result<NodeMsg, LinkError> {
    loop {
        if let Some(m) = dec.next_msg()? {
            return Ok(m);
        }
        match recv.read_chunk(usize::MAX, true).await? {
            Some(chunk) => dec.push(&chunk.bytes),
            None => return Err(LinkError::Closed),
        }
    }
}

/// One speed test in flight: the broker computes the expected digest of one
/// lane, picked at random, on a blocking thread while the node computes all.
struct SpeedCheck {
    expected: tokio::task::JoinHandle<[u8; 32]>,
    spot: u32,
    lanes: u32,
    sent: tokio::time::Instant,
    deadline: tokio::time::Instant,
    limit: Duration,
}

impl SpeedCheck {
    /// Sends the node a seed and computes the expected digest of one lane
    /// meanwhile, holding `turn` until it is computed (even if the node goes
    /// away).
    async fn start(
        send: &mut quic::SendStream,
        test: super::SpeedTest,
        cores: u32,
        turn: tokio::sync::OwnedSemaphorePermit,
        node_id: PeerId,
    ) -> Result<Self, LinkError> {
        let mut seed = [0u8; 36];
        getrandom::fill(&mut seed)
            .map_err(|e| LinkError::Protocol(format!("no randomness: {e}")))?;
        let (seed, spot) = seed.split_at(32);
        let seed: [u8; 32] = seed.try_into().unwrap_or([0; 32]);
        let lanes = jusy_common::speed::lanes(cores);
        let spot = u32::from_le_bytes(spot.try_into().unwrap_or([0; 4])) % lanes;
        let rounds = test.rounds;
        tracing::info!(node_id = %node_id.short(), rounds, lanes, "speed test started");
        let expected = tokio::task::spawn_blocking(move || {
            let digest =
                jusy_common::speed::run(&jusy_common::speed::lane_seed(&seed, spot), rounds);
            tracing::debug!(node_id = %node_id.short(), "speed test's digest computed");
            drop(turn);
            digest
        });
        send.write_all(&frame::encode(&BrokerMsg::SpeedTest {
            seed,
            rounds,
            lanes,
        })?)
        .await?;
        let sent = tokio::time::Instant::now();
        Ok(Self {
            expected,
            spot,
            lanes,
            sent,
            // A node that is far too slow is not waited for much longer than
            // the limit; the answer is judged against the limit itself.
            deadline: sent + test.limit * 3 + Duration::from_secs(5),
            limit: test.limit,
        })
    }

    /// Judges the node's digests; returns the time the broker measured and
    /// the lanes (cores) that passed.
    async fn judge(self, digests: &[[u8; 32]]) -> Result<(Duration, u32), String> {
        let took = self.sent.elapsed();
        let expected = self
            .expected
            .await
            .map_err(|e| format!("computing the expected digest: {e}"))?;
        jusy_common::speed::judge_lanes(&expected, self.spot, self.lanes, digests, took, self.limit)
            .map(|()| (took, self.lanes))
            .map_err(|e| format!("{e} ({} lanes at once, one per core reported)", self.lanes))
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How long a refused node is given to acknowledge the reason.
const REFUSAL_DELIVERY: Duration = Duration::from_secs(2);

/// Tells the node why it is refused, and returns that as the link's error.
async fn refuse(send: &mut quic::SendStream, error: String) -> LinkError {
    end_with(
        send,
        &BrokerMsg::Error {
            error: error.clone(),
        },
    )
    .await;
    LinkError::Protocol(error)
}

/// Tells the node to come back later, and returns that as the link's error.
async fn try_later(send: &mut quic::SendStream, later: Later) -> LinkError {
    let reason = later.reason();
    let after_secs = u32::try_from(later.after().as_secs()).unwrap_or(u32::MAX);
    end_with(
        send,
        &BrokerMsg::TryLater {
            reason: reason.clone(),
            after_secs,
        },
    )
    .await;
    LinkError::Protocol(reason)
}

/// Sends the control stream's last message. The connection closes when the
/// link ends, and a close discards stream data not yet delivered: this
/// waits (a while) until the node has it.
async fn end_with(send: &mut quic::SendStream, msg: &BrokerMsg) {
    if let Ok(frame) = frame::encode(msg) {
        let _ = send.write_all(&frame).await;
    }
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(REFUSAL_DELIVERY, send.stopped()).await;
    }
}

/// A node connection as the relay accepted it.
#[derive(Debug)]
pub(super) struct Accepted {
    pub conn: quic::Connection,
    pub node_id: PeerId,
    /// Distinguishes reconnections of the same node.
    pub link_id: u64,
    /// The largest datagram tried towards the node.
    pub max_datagram: u16,
}

/// Serves one node connection until it ends; `place` is given up once the
/// node is welcomed.
pub(super) async fn run(relay: Arc<Relay>, a: Accepted, place: Unidentified) {
    match serve(&relay, &a, place).await {
        Ok(()) => tracing::info!(node_id = %a.node_id.short(), "node left"),
        Err(e) => tracing::info!(node_id = %a.node_id.short(), error = %e, "node connection ended"),
    }
    relay.unregister(a.node_id, a.link_id);
}

/// Ends a link's outbox when its control loop ends, however it ends.
struct OutboxEnd<'a>(&'a NodeLink);

impl Drop for OutboxEnd<'_> {
    fn drop(&mut self) {
        self.0.end_outbox();
    }
}

/// A node's control stream once it said hello and was welcomed.
struct Greeted {
    send: quic::SendStream,
    recv: quic::RecvStream,
    dec: Decoder,
    link: Arc<NodeLink>,
}

async fn serve(relay: &Arc<Relay>, a: &Accepted, place: Unidentified) -> Result<(), LinkError> {
    let (conn, node_id) = (&a.conn, a.node_id);
    // Boxed: the greeting's futures would otherwise take room in every
    // node's task for the link's whole life.
    let greeting = Box::pin(greet(relay, a));
    let unidentified = |why: &str| {
        conn.close(admission::UNIDENTIFIED.into(), why.as_bytes());
        LinkError::Protocol(why.to_owned())
    };
    let greeted = tokio::select! {
        g = tokio::time::timeout_at(place.deadline, greeting) => {
            g.map_err(|_| unidentified("no hello in time"))?
        }
        () = place.pushed_out.cancelled() => {
            return Err(unidentified("pushed out by newer connections before its hello"));
        }
    };
    // Welcomed: a node now, no longer held to the strangers' caps.
    drop(place);
    let Greeted {
        mut send,
        mut recv,
        mut dec,
        link,
    } = greeted?;
    let _ended = OutboxEnd(&link);
    // The node is offered (registered) only once it passed the speed test.
    let mut registered = false;
    let mut check = None;
    let mut next_check = tokio::time::Instant::now() + relay.speed_test.interval;
    // Advertised nodes are asked for a fresh statement every `every`, from
    // the moment they are registered.
    let mut next_advert: Option<tokio::time::Instant> = None;
    if relay.speed_test.rounds == 0 {
        // The operator turned the test off (trusted nodes, benchmarks).
        offer(relay, &link, &mut registered, &mut next_advert);
        tracing::info!(node_id = %node_id, "node attached without a speed test");
    } else if let Some(passed) = relay.speed_tests.recent(node_id, std::time::Instant::now()) {
        *lock(&link.speed) = Some((passed.took, passed.lanes));
        next_check = tokio::time::Instant::from_std(passed.at) + relay.speed_test.interval;
        offer(relay, &link, &mut registered, &mut next_advert);
        tracing::info!(node_id = %node_id, took_ms = passed.took.as_millis() as u64, "node attached again; its speed test here still holds");
    } else {
        // Boxed like the greeting: only a new node waits here.
        check = Some(Box::pin(first_test(relay, &mut send, conn, node_id, link.cores)).await?);
    }
    let mut asked: Option<Terms> = None;
    let mut others = relay.others.subscribe();
    others.mark_changed();
    loop {
        // One timer for the three deadlines: every node holds this loop.
        let answer_due = check.as_ref().map(|c| c.deadline);
        let check_due = (check.is_none() && relay.speed_test.rounds > 0).then_some(next_check);
        let wake = [answer_due, next_advert, check_due]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            _ = sleep_until_some(wake) => {
                let now = tokio::time::Instant::now();
                let passed = |due: Option<tokio::time::Instant>| due.is_some_and(|d| d <= now);
                if passed(answer_due) {
                    return Err(refuse(&mut send, "speed test not answered in time".into()).await);
                }
                if passed(next_advert) {
                    next_advert = None;
                    if let Some(a) = &relay.advertise {
                        let terms = a.terms(link.owner, link.speed(), crate::store::now_ms());
                        send.write_all(&frame::encode(&BrokerMsg::SignCapacity { terms: terms.clone() })?).await?;
                        asked = Some(terms);
                        next_advert = Some(tokio::time::Instant::now() + a.every);
                    }
                }
                if passed(check_due) {
                    // An attached node stays offered while the relay is busy.
                    match relay.speed_tests.try_turn() {
                        Some(turn) => {
                            check = Some(SpeedCheck::start(&mut send, relay.speed_test, link.cores, turn, node_id).await?);
                        }
                        None => next_check = now + speed_tests::BUSY_RETRY,
                    }
                }
            }
            Ok(()) = others.changed(), if registered => {
                let relays = others.borrow_and_update().clone();
                if !relays.is_empty() {
                    send.write_all(&frame::encode(&BrokerMsg::Relays { relays })?).await?;
                }
            }
            msg = read_msg(&mut recv, &mut dec) => match msg.inspect(|_| link.follow_path())? {
                NodeMsg::SlotsReady { slots } => {
                    let mut have = lock(&link.slots);
                    for s in slots {
                        if !have.iter().any(|h| h.slot_id == s.slot_id) {
                            have.push(s);
                        }
                    }
                }
                NodeMsg::Accepted { order_id, acceptance } => link.answer(order_id, Ok(acceptance)),
                NodeMsg::Refused { order_id, error } => link.answer(order_id, Err(AssignError::Refused(error))),
                NodeMsg::Ended { order_id, reason } => relay.event(RelayEvent::Ended { node_id, order_id, reason, by: Party::Node }),
                NodeMsg::Traffic { order_id, sent, received } => relay.event(RelayEvent::Traffic { node_id, order_id, sent, received }),
                NodeMsg::Receipt { bytes } => relay.event(RelayEvent::Receipt { node_id, bytes }),
                NodeMsg::SpeedResult { digests } => {
                    let Some(c) = check.take() else {
                        return Err(LinkError::Protocol("speed result without a test".into()));
                    };
                    match c.judge(&digests).await {
                        Ok((took, lanes)) => {
                            *lock(&link.speed) = Some((took, lanes));
                            relay.speed_tests.passed(node_id, took, lanes, std::time::Instant::now());
                            tracing::info!(node_id = %node_id.short(), took_ms = took.as_millis() as u64, lanes, "speed test passed");
                            if !registered {
                                offer(relay, &link, &mut registered, &mut next_advert);
                                tracing::info!(node_id = %node_id, "node attached");
                            }
                            next_check = tokio::time::Instant::now() + relay.speed_test.interval;
                        }
                        Err(e) => {
                            tracing::warn!(node_id = %node_id.short(), error = %e, "speed test failed");
                            return Err(refuse(&mut send, format!("speed test failed: {e}")).await);
                        }
                    }
                }
                NodeMsg::Capacity { bytes } => match advertise::check(node_id, asked.as_ref(), &bytes) {
                    Ok(signed) => {
                        *lock(&link.capacity) = Some(signed.clone());
                        if let Some(a) = &relay.advertise {
                            let _ = a.updates.send(CapacityUpdate::Published(signed));
                        }
                    }
                    Err(e) => tracing::warn!(node_id = %node_id.short(), error = %e, "capacity statement rejected"),
                },
                NodeMsg::LoggedIn { order_id, stream } => link.logged_in(order_id, stream),
                NodeMsg::Hello { .. } => return Err(LinkError::Protocol("second hello".into())),
            },
            () = link.queued.notified() => {
                for out in link.take_outbox() {
                    send.write_all(&frame::encode(&out)?).await?;
                }
            }
            reason = conn.closed() => return match reason {
                quinn_proto::ConnectionError::ApplicationClosed(_) | quinn_proto::ConnectionError::LocallyClosed => Ok(()),
                e => Err(e.into()),
            },
        }
    }
}

/// Offers an attached node to orders and, when nodes are advertised, asks
/// for its first capacity statement at once.
fn offer(
    relay: &Arc<Relay>,
    link: &Arc<NodeLink>,
    registered: &mut bool,
    next_advert: &mut Option<tokio::time::Instant>,
) {
    *registered = true;
    relay.register(link.clone());
    if relay.advertise.is_some() {
        *next_advert = Some(tokio::time::Instant::now());
    }
}

/// A new node's first speed test here: charged to its address and key
/// ([`speed_tests`]), then run in its turn. A node over the bounds is told
/// to come back later.
async fn first_test(
    relay: &Relay,
    send: &mut quic::SendStream,
    conn: &quic::Connection,
    node_id: PeerId,
    cores: u32,
) -> Result<SpeedCheck, LinkError> {
    let now = std::time::Instant::now();
    let turn = match relay
        .speed_tests
        .charge(conn.remote_address().ip(), node_id, now)
    {
        Ok(()) => tokio::select! {
            turn = relay.speed_tests.turn() => turn,
            reason = conn.closed() => return Err(reason.into()),
        },
        Err(later) => Err(later),
    };
    match turn {
        Ok(turn) => SpeedCheck::start(send, relay.speed_test, cores, turn, node_id).await,
        Err(later) => {
            tracing::info!(node_id = %node_id.short(), remote = %conn.remote_address(), ?later, "speed test refused; node told to try later");
            Err(try_later(send, later).await)
        }
    }
}

/// Takes the node's control stream, its hello, and welcomes it; the caller
/// bounds how long that may take.
async fn greet(relay: &Arc<Relay>, a: &Accepted) -> Result<Greeted, LinkError> {
    let (conn, node_id) = (&a.conn, a.node_id);
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut dec = Decoder::default();
    let hello = read_msg(&mut recv, &mut dec).await?;
    let NodeMsg::Hello {
        protocol,
        host_key,
        cores,
        agent,
        owner,
        aes,
    } = hello
    else {
        return Err(LinkError::Protocol("first message is not hello".into()));
    };
    if protocol != PROTOCOL_VERSION {
        let error =
            format!("protocol {protocol} not supported; this relay speaks {PROTOCOL_VERSION}");
        return Err(refuse(&mut send, error).await);
    }
    let owner = match owner {
        None => None,
        Some(hash) => match relay.store.account(Role::Owner, &hash) {
            Ok(Some((id, _))) => Some(id),
            Ok(None) => return Err(refuse(&mut send, "unknown owner hash".into()).await),
            Err(e) => return Err(refuse(&mut send, format!("broker storage error: {e}")).await),
        },
    };
    let link = Arc::new(NodeLink {
        id: node_id,
        link_id: a.link_id,
        host_key,
        owner,
        aes,
        conn: conn.clone(),
        outbox: Mutex::new(Some(Vec::new())),
        queued: tokio::sync::Notify::new(),
        slots: Mutex::default(),
        pending: Mutex::default(),
        speed: Mutex::default(),
        capacity: Mutex::default(),
        cores,
        path: Mutex::new(conn.remote_address()),
        logins: Mutex::default(),
    });
    send.write_all(&frame::encode(&BrokerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
    })?)
    .await?;
    tracing::info!(node_id = %node_id, remote = %conn.remote_address(), max_datagram = a.max_datagram, cores, %agent, "node connected; speed test");
    Ok(Greeted {
        send,
        recv,
        dec,
        link,
    })
}
