//! Ready slots and running sessions: claims a slot for an order, drives each
//! session's state machine with the clock and the kernel's usage counters, signs
//! its receipts, serves tunnelled client streams, and tears a session down
//! (processes, cgroup, disk, user, rules) when it ends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use jusy_common::session::{Limits, Session, Usage};
use jusy_common::terms::{OrderTerms, SignedAcceptance};
use jusy_common::wire::{
    Assignment, EndReason, NodeMsg, OrderId, STREAM_HEADER_LEN, Slot, StreamHeader,
};
use russh::keys::PublicKey;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::receipts::Receipts;
use crate::sandbox::space::Room;
use crate::sandbox::{Host, Sandbox};
use crate::ssh::channel::{ChannelCaps, ChannelCtx};
use crate::ssh::{self, Access};

/// How often the kernel's counters are read while a session runs: limit events
/// and the CPU budget are noticed within this time.
const SAMPLE: Duration = Duration::from_millis(200);

/// How often a data file system too full for every slot is measured again.
const DISK_RECHECK: Duration = Duration::from_secs(10);

/// Settings the session manager needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub ready_slots: usize,
    /// Bytes kept free on the data file system beyond every session disk at
    /// its full size.
    pub disk_reserve: u64,
    /// The most this node offers an order; each order's own terms, within
    /// this, are what its session gets.
    pub offer: OrderTerms,
    /// How long a client stream may stay open without its user authenticating.
    pub login_grace: Duration,
    /// Time between two receipts of a running session.
    pub receipt_every: Duration,
    pub sftp_server: PathBuf,
    pub channel_caps: ChannelCaps,
}

/// One order's running session.
#[derive(Debug)]
struct Running {
    order_id: OrderId,
    access: Arc<Access>,
    machine: Mutex<Session>,
    receipts: Mutex<Receipts>,
    wake: Notify,
    /// Cancelled when the session ends: closes every client connection.
    closed: CancellationToken,
}

/// The node's slots and sessions. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Sessions {
    settings: Settings,
    host: Host,
    identity: Arc<SigningKey>,
    ssh_config: Arc<russh::server::Config>,
    ready: Mutex<HashMap<u64, Sandbox>>,
    running: Mutex<HashMap<OrderId, Arc<Running>>>,
    next_slot: AtomicU64,
    refill: Notify,
    events: mpsc::UnboundedSender<NodeMsg>,
    /// Owns every session driver and connection task.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves plain data behind;
    // keep serving rather than poisoning the whole node.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sessions {
    pub fn new(
        settings: Settings,
        host: Host,
        identity: Arc<SigningKey>,
        ssh_config: Arc<russh::server::Config>,
        events: mpsc::UnboundedSender<NodeMsg>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
            host,
            identity,
            ssh_config,
            ready: Mutex::default(),
            running: Mutex::default(),
            next_slot: AtomicU64::new(1),
            refill: Notify::new(),
            events,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    /// Every ready slot, for a (re)connecting uplink to announce.
    pub fn ready_slots(&self) -> Vec<Slot> {
        let mut slots: Vec<Slot> = lock(&self.ready)
            .iter()
            .map(|(&slot_id, s)| Slot {
                slot_id,
                username: s.user.name.clone(),
            })
            .collect();
        slots.sort_by_key(|s| s.slot_id);
        slots
    }

    /// Keeps the configured number of slots prepared until shutdown, or as
    /// many as the data file system has room for.
    pub async fn keep_slots_ready(self: Arc<Self>) {
        let wanted = self.settings.ready_slots;
        // What the disk allowed when last said: all that was asked, until
        // measured otherwise.
        let mut allowed = wanted;
        loop {
            while !self.shutdown.is_cancelled() {
                let ready = lock(&self.ready).len();
                let (now, room) = self.slots_disk_allows(ready);
                if now != allowed {
                    say_disk_room(now, wanted, room);
                    allowed = now;
                }
                if ready >= allowed {
                    break;
                }
                self.prepare_slot().await;
            }
            // Sessions ending free their disks and wake this loop; other
            // programs on the file system do not, so a short disk is measured
            // again now and then.
            tokio::select! {
                _ = self.refill.notified() => {}
                _ = tokio::time::sleep(DISK_RECHECK), if allowed < wanted => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// How many ready slots the data file system allows with `ready`
    /// prepared, and what it measured. All that were asked for where
    /// sessions have no disk of their own or the file system cannot be
    /// measured (logged).
    fn slots_disk_allows(&self, ready: usize) -> (usize, Option<Room>) {
        let wanted = self.settings.ready_slots;
        match self.host.disk_room(self.settings.disk_reserve) {
            Some(Ok(room)) => (room.slots(ready, wanted), Some(room)),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot measure the free space for session disks");
                (wanted, None)
            }
            None => (wanted, None),
        }
    }

    /// Prepares one slot and offers it; on failure waits a little, so a
    /// broken machine is not hammered.
    async fn prepare_slot(&self) {
        match self.host.prepare().await {
            Ok(sandbox) => {
                let name = sandbox.user.name.clone();
                let slot_id = self.next_slot.fetch_add(1, Ordering::Relaxed);
                let slot = Slot {
                    slot_id,
                    username: name.clone(),
                };
                tracing::info!(slot_id, user = %name, "slot ready");
                crate::announce(
                    "slot_ready",
                    serde_json::json!({"slot_id": slot_id, "user": name}),
                );
                lock(&self.ready).insert(slot_id, sandbox);
                let _ = self.events.send(NodeMsg::SlotsReady { slots: vec![slot] });
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot prepare a session slot; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = self.shutdown.cancelled() => {}
                }
            }
        }
    }

    /// Claims a slot for an order and starts its session on the order's
    /// terms, which the node signs; refuses terms beyond its offer.
    pub fn assign(self: &Arc<Self>, a: Assignment) {
        let reply = match self.try_assign(&a) {
            Ok(()) => NodeMsg::Accepted {
                order_id: a.order_id,
                acceptance: SignedAcceptance::sign(&self.identity, a.order_id, a.terms)
                    .bytes()
                    .to_vec(),
            },
            Err(error) => {
                tracing::warn!(order_id = %a.order_id, %error, "order refused");
                NodeMsg::Refused {
                    order_id: a.order_id,
                    error,
                }
            }
        };
        let _ = self.events.send(reply);
    }

    fn try_assign(self: &Arc<Self>, a: &Assignment) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("node is shutting down".into());
        }
        if lock(&self.running).contains_key(&a.order_id) {
            return Err("order already assigned".into());
        }
        let keys = a
            .authorized_keys
            .iter()
            .map(|k| PublicKey::from_openssh(k).map_err(|e| format!("bad public key: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err("no authorized key".into());
        }
        // Checked before the slot is taken: a slot refused for its terms
        // stays ready.
        a.terms
            .within(&self.settings.offer)
            .map_err(|e| e.to_string())?;
        let sandbox = lock(&self.ready)
            .remove(&a.slot_id)
            .ok_or_else(|| format!("slot {} is not ready", a.slot_id))?;
        self.refill.notify_one();
        if let Err(e) = sandbox.apply_terms(&a.terms) {
            let this = self.clone();
            self.tasks
                .spawn(async move { this.host.teardown(&sandbox).await });
            return Err(format!("cannot set the session's limits: {e}"));
        }
        let limits = Limits::of(&a.terms);
        let running = Arc::new(Running {
            order_id: a.order_id,
            access: Arc::new(Access {
                ctx: Arc::new(ChannelCtx {
                    sandbox,
                    sftp_server: self.settings.sftp_server.clone(),
                    backlog: Arc::default(),
                    caps: self.settings.channel_caps,
                    open: Arc::default(),
                }),
                keys,
            }),
            machine: Mutex::new(Session::new(Instant::now().into_std(), limits)),
            receipts: Mutex::new(Receipts::new(
                a.order_id,
                self.identity.clone(),
                self.events.clone(),
            )),
            wake: Notify::new(),
            closed: CancellationToken::new(),
        });
        lock(&self.running).insert(a.order_id, running.clone());
        crate::metrics::METRICS.sessions.inc();
        let span = tracing::info_span!("session", order_id = %a.order_id, user = %running.access.ctx.sandbox.user.name);
        tracing::info!(parent: &span, terms = ?a.terms, "order accepted");
        self.tasks
            .spawn(self.clone().drive(running).instrument(span));
        Ok(())
    }

    /// Ends an order's session from outside (the broker cancelled it).
    pub fn cancel(&self, order_id: OrderId, reason: EndReason) {
        if let Some(r) = lock(&self.running).get(&order_id) {
            lock(&r.machine).handle_end(reason);
            r.wake.notify_one();
        }
    }

    /// Tells the relay how many bytes the session's network carried so far.
    async fn report_traffic(&self, r: &Running) {
        if let Some(t) = r.access.ctx.sandbox.traffic().await {
            let _ = self.events.send(NodeMsg::Traffic {
                order_id: r.order_id,
                sent: t.sent,
                received: t.received,
            });
        }
    }

    /// Runs a session until its state machine says it is over, then tears it down.
    async fn drive(self: Arc<Self>, r: Arc<Running>) {
        let sandbox = &r.access.ctx.sandbox;
        let mut next_sample = Instant::now();
        let mut next_receipt = Instant::now() + self.settings.receipt_every;
        let reason = loop {
            let now = Instant::now();
            if now >= next_sample {
                self.sample(&r);
                next_sample = now + self.sample_period(&r);
            }
            if now >= next_receipt {
                lock(&r.receipts).emit(&lock(&r.machine), now.into_std(), None);
                self.report_traffic(&r).await;
                next_receipt = now + self.settings.receipt_every;
            }
            let deadline = {
                let mut m = lock(&r.machine);
                if let Some(reason) = m.ended().or_else(|| m.handle_tick(now.into_std())) {
                    break reason;
                }
                m.deadline()
            };
            let wake_at = deadline
                .map(Instant::from_std)
                .unwrap_or(next_sample)
                .min(next_sample)
                .min(next_receipt);
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = r.wake.notified() => {}
            }
        };
        tracing::info!(reason = reason.code(), "session ended");
        r.closed.cancel();
        // Stop every process first, so the final counters are final.
        if let Some(cg) = &sandbox.cgroup
            && let Err(e) = cg.kill().await
        {
            tracing::error!(error = %e, "killing a session's processes failed");
        }
        self.sample(&r);
        lock(&r.receipts).emit(&lock(&r.machine), Instant::now().into_std(), Some(reason));
        self.report_traffic(&r).await;
        self.host.teardown(sandbox).await;
        lock(&self.running).remove(&r.order_id);
        crate::metrics::METRICS.ended(reason, lock(&r.machine).cpu_us());
        // Its disk is gone: a short data file system may have room again.
        self.refill.notify_one();
        crate::announce(
            "session_ended",
            serde_json::json!({
                "order_id": r.order_id.to_string(),
                "reason": reason.code(),
                "user": sandbox.user.name,
                "cpu_us": lock(&r.machine).cpu_us(),
            }),
        );
        let _ = self.events.send(NodeMsg::Ended {
            order_id: r.order_id,
            reason,
        });
    }

    /// Feeds the kernel's counters to the session's state machine.
    fn sample(&self, r: &Running) {
        let sandbox = &r.access.ctx.sandbox;
        let counters = match sandbox.counters() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a session's counters");
                return;
            }
        };
        let disk = sandbox.disk_usage().unwrap_or_default();
        let usage = Usage {
            cpu_us: counters.cpu_us,
            peak_mem: counters.peak_mem,
            peak_procs: counters.peak_procs,
            disk_used: disk.used,
            oom_kills: counters.oom_kills,
            forks_refused: counters.forks_refused,
            disk_full: disk.full,
        };
        if let Some(reason) = lock(&r.machine).handle_usage(Instant::now().into_std(), usage) {
            tracing::info!(reason = reason.code(), ?usage, "session limit reached");
        }
    }

    /// Samples sooner when the CPU budget could run out before the next regular
    /// sample, so a session overshoots its budget by little.
    fn sample_period(&self, r: &Running) -> Duration {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let left = lock(&r.machine).cpu_left() / u32::try_from(cores).unwrap_or(1);
        left.clamp(Duration::from_millis(10), SAMPLE)
    }

    /// Serves one tunnelled client stream: reads the header, then runs SSH on it.
    pub fn serve_stream(self: &Arc<Self>, send: quinn::SendStream, recv: quinn::RecvStream) {
        let this = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = this.serve_stream_inner(send, recv).await {
                tracing::debug!(error = %e, "client stream closed");
            }
        });
    }

    async fn serve_stream_inner(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), String> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut header))
            .await
            .map_err(|_| "no stream header in time".to_owned())?
            .map_err(|e| format!("reading stream header: {e}"))?;
        let header = StreamHeader::decode(&header).map_err(|e| e.to_string())?;
        let running = lock(&self.running).get(&header.order_id).cloned();
        let Some(r) = running else {
            let _ = send.reset(quinn::VarInt::from_u32(1));
            return Err(format!("stream for unknown order {}", header.order_id));
        };
        if !lock(&r.machine).admits(Instant::now().into_std()) {
            r.wake.notify_one();
            let _ = send.reset(quinn::VarInt::from_u32(2));
            return Err("stream for an ended session".into());
        }
        let stream = u64::from(send.id());
        let span = tracing::info_span!("conn", order_id = %r.order_id, stream);
        let (login_tx, login_rx) = oneshot::channel();
        let serve = ssh::serve(
            self.ssh_config.clone(),
            tokio::io::join(recv, send),
            r.access.clone(),
            login_tx,
        )
        .instrument(span.clone());
        tokio::pin!(serve);
        // Until its user authenticates, the stream is nobody's connection: it
        // counts for nothing and is closed after the login grace time, as
        // sshd's LoginGraceTime does, so idle connections cannot pile up.
        let logged_in = tokio::select! {
            res = &mut serve => return res.map_err(|e| e.to_string()),
            _ = r.closed.cancelled() => return Ok(()),
            login = tokio::time::timeout(self.settings.login_grace, login_rx) => login,
        };
        let _guard = match logged_in {
            Ok(Ok(())) => {
                if !lock(&r.machine).handle_login(Instant::now().into_std()) {
                    r.wake.notify_one();
                    return Err("login to an ended session".into());
                }
                r.wake.notify_one();
                tracing::info!(parent: &span, "client logged in");
                let _ = self.events.send(NodeMsg::LoggedIn {
                    order_id: r.order_id,
                    stream,
                });
                Some(Connected(r.clone()))
            }
            // The connection ended without a login: what is left of it is its close.
            Ok(Err(_)) => None,
            Err(_) => {
                tracing::info!(parent: &span, grace = ?self.settings.login_grace, "no login in time; stream closed");
                return Err("no login within the login grace time".into());
            }
        };
        tokio::select! {
            res = serve => res.map_err(|e| e.to_string()),
            _ = r.closed.cancelled() => Ok(()),
        }
    }

    /// Stops preparing slots and accepting orders (the first step of shutdown).
    pub fn stop_preparing(&self) {
        self.shutdown.cancel();
    }

    /// Ends every session with NODE_SHUTDOWN, removes the ready slots and the
    /// node-wide rules, and waits for all teardowns.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let running: Vec<_> = lock(&self.running).values().cloned().collect();
        for r in running {
            lock(&r.machine).handle_end(EndReason::NodeShutdown);
            r.wake.notify_one();
        }
        self.tasks.close();
        self.tasks.wait().await;
        let ready: Vec<_> = lock(&self.ready).drain().map(|(_, s)| s).collect();
        for sandbox in ready {
            self.host.teardown(&sandbox).await;
        }
        self.host.stop().await;
    }
}

/// Counts one logged-in client connection; dropping it tells the session.
struct Connected(Arc<Running>);

impl Drop for Connected {
    fn drop(&mut self) {
        lock(&self.0.machine).handle_logout(Instant::now().into_std());
        self.0.wake.notify_one();
    }
}

/// Says that the disk now allows `allowed` of the `wanted` ready slots: a
/// warning and a `disk_short` event line while it is short, one info line
/// when it has room for all again.
fn say_disk_room(allowed: usize, wanted: usize, room: Option<Room>) {
    let mib = |bytes: u64| bytes >> 20;
    let Some(room) = room.filter(|_| allowed < wanted) else {
        tracing::info!(
            ready_slots = wanted,
            "the disk has room for every ready slot again"
        );
        return;
    };
    tracing::warn!(
        slots = allowed,
        ready_slots = wanted,
        free_mib = mib(room.free),
        growth_mib = mib(room.growth),
        reserve_mib = mib(room.reserve),
        disk_mib = mib(room.image),
        "the data file system has room for fewer session disks than ready_slots asks: \
         keeping fewer slots ready (free space less what existing images may still grow by \
         and disk_reserve_mib, divided by disk_mib)"
    );
    crate::announce(
        "disk_short",
        serde_json::json!({
            "slots": allowed,
            "ready_slots": wanted,
            "free_mib": mib(room.free),
            "growth_mib": mib(room.growth),
            "reserve_mib": mib(room.reserve),
            "disk_mib": mib(room.image),
        }),
    );
}
