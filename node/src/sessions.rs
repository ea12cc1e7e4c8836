//! Ready slots and running sessions: claims a slot for an order, drives each
//! session's state machine, serves tunnelled client streams, and tears a session
//! down (processes, user, home) when it ends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jusy_common::session::{Limits, Session};
use jusy_common::wire::{
    Assignment, EndReason, NodeMsg, OrderId, STREAM_HEADER_LEN, Slot, StreamHeader,
};
use russh::keys::PublicKey;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::sandbox::user::SessionUser;
use crate::ssh::channel::ChannelCtx;
use crate::ssh::{self, Access};

/// Settings the session manager needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub ready_slots: usize,
    pub homes: PathBuf,
    pub grace: Duration,
    pub wall: Duration,
    pub sftp_server: PathBuf,
    /// The node runs without root: sessions share the node's user (development only).
    pub dev_mode: bool,
}

/// One order's running session.
#[derive(Debug)]
struct Running {
    order_id: OrderId,
    access: Arc<Access>,
    machine: Mutex<Session>,
    wake: Notify,
    /// Cancelled when the session ends: closes every client connection.
    closed: CancellationToken,
}

/// The node's slots and sessions. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Sessions {
    settings: Settings,
    ssh_config: Arc<russh::server::Config>,
    ready: Mutex<HashMap<u64, SessionUser>>,
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
        ssh_config: Arc<russh::server::Config>,
        events: mpsc::UnboundedSender<NodeMsg>,
    ) -> Arc<Self> {
        Arc::new(Self {
            settings,
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
            .map(|(&slot_id, u)| Slot {
                slot_id,
                username: u.name.clone(),
            })
            .collect();
        slots.sort_by_key(|s| s.slot_id);
        slots
    }

    /// Keeps the configured number of slots prepared until shutdown.
    pub async fn keep_slots_ready(self: Arc<Self>) {
        loop {
            while lock(&self.ready).len() < self.settings.ready_slots
                && !self.shutdown.is_cancelled()
            {
                let user = if self.settings.dev_mode {
                    SessionUser::create_dev(&self.settings.homes).await
                } else {
                    SessionUser::create(&self.settings.homes).await
                };
                match user {
                    Ok(user) => {
                        let slot_id = self.next_slot.fetch_add(1, Ordering::Relaxed);
                        let slot = Slot {
                            slot_id,
                            username: user.name.clone(),
                        };
                        tracing::info!(slot_id, user = %user.name, "slot ready");
                        crate::announce(
                            "slot_ready",
                            serde_json::json!({"slot_id": slot_id, "user": user.name}),
                        );
                        lock(&self.ready).insert(slot_id, user);
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
            tokio::select! {
                _ = self.refill.notified() => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Claims a slot for an order and starts its session.
    pub fn assign(self: &Arc<Self>, a: Assignment) {
        let reply = match self.try_assign(&a) {
            Ok(()) => NodeMsg::Accepted {
                order_id: a.order_id,
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
        let user = lock(&self.ready)
            .remove(&a.slot_id)
            .ok_or_else(|| format!("slot {} is not ready", a.slot_id))?;
        self.refill.notify_one();
        let limits = Limits {
            connect_window: Duration::from_secs(a.connect_window_secs.into()),
            grace: self.settings.grace,
            wall: self.settings.wall,
        };
        let running = Arc::new(Running {
            order_id: a.order_id,
            access: Arc::new(Access {
                ctx: Arc::new(ChannelCtx {
                    user,
                    sftp_server: self.settings.sftp_server.clone(),
                }),
                keys,
            }),
            machine: Mutex::new(Session::new(Instant::now().into_std(), limits)),
            wake: Notify::new(),
            closed: CancellationToken::new(),
        });
        lock(&self.running).insert(a.order_id, running.clone());
        let span = tracing::info_span!("session", order_id = %a.order_id, user = %running.access.ctx.user.name);
        tracing::info!(parent: &span, "order accepted");
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

    /// Runs a session until its state machine says it is over, then tears it down.
    async fn drive(self: Arc<Self>, r: Arc<Running>) {
        let reason = loop {
            let deadline = {
                let mut m = lock(&r.machine);
                if let Some(reason) = m
                    .ended()
                    .or_else(|| m.handle_tick(Instant::now().into_std()))
                {
                    break reason;
                }
                m.deadline()
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = r.wake.notified() => {}
            }
        };
        tracing::info!(reason = reason.code(), "session ended");
        r.closed.cancel();
        if let Err(e) = r.access.ctx.user.remove().await {
            tracing::error!(error = %e, "session teardown failed");
        }
        lock(&self.running).remove(&r.order_id);
        crate::announce(
            "session_ended",
            serde_json::json!({
                "order_id": r.order_id.to_string(),
                "reason": reason.code(),
                "user": r.access.ctx.user.name,
            }),
        );
        let _ = self.events.send(NodeMsg::Ended {
            order_id: r.order_id,
            reason,
        });
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
        if !lock(&r.machine).handle_connect(Instant::now().into_std()) {
            r.wake.notify_one();
            let _ = send.reset(quinn::VarInt::from_u32(2));
            return Err("stream for an ended session".into());
        }
        r.wake.notify_one();
        let _guard = Connected(r.clone());
        let span = tracing::info_span!("conn", order_id = %r.order_id);
        tokio::select! {
            res = ssh::serve(self.ssh_config.clone(), tokio::io::join(recv, send), r.access.clone()).instrument(span) => {
                res.map_err(|e| e.to_string())
            }
            _ = r.closed.cancelled() => Ok(()),
        }
    }

    /// Ends every session with NODE_SHUTDOWN, removes the ready users, and waits
    /// for all teardowns.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let running: Vec<_> = lock(&self.running).values().cloned().collect();
        for r in running {
            lock(&r.machine).handle_end(EndReason::NodeShutdown);
            r.wake.notify_one();
        }
        self.tasks.close();
        self.tasks.wait().await;
        let ready: Vec<_> = lock(&self.ready).drain().map(|(_, u)| u).collect();
        for user in ready {
            if let Err(e) = user.remove().await {
                tracing::error!(error = %e, "removing a ready slot failed");
            }
        }
    }
}

/// Counts one open client connection; dropping it tells the session.
struct Connected(Arc<Running>);

impl Drop for Connected {
    fn drop(&mut self) {
        lock(&self.0.machine).handle_disconnect(Instant::now().into_std());
        self.0.wake.notify_one();
    }
}
