//! The relay's data plane: one thread that owns the QUIC endpoint nodes dial,
//! every node connection, the order ports' listeners and their splices.
//!
//! A byte from a client crosses, on the relay, a TCP read, a QUIC stream write,
//! the connection's packet building and encryption, and a UDP send; the reply
//! takes the same steps back. On a work-stealing pool each step may wake a task
//! on another worker: a futex wake-up and cold caches per hop. Kept on one
//! thread, the hops are plain function calls, which is what keystroke latency
//! and single-stream throughput are made of. The HTTP API, the ledger and the
//! mesh stay on the broker's worker pool, so a slow request never delays a
//! packet.
//!
//! The price: the relay's traffic shares one core. One core carries several
//! Gbit/s of encrypted QUIC (see BENCHMARKS.md), far more than the home
//! uplinks behind the nodes of one relay.
//!
//! Busy polling: after a client's keystroke-sized bytes go to a node whose
//! answers come back within `busy_poll` (its QUIC round trip is shorter), the
//! thread keeps polling its sockets for `busy_poll` instead of sleeping in the
//! kernel, so the answer, or the client's next bytes, are picked up without
//! the wake-up of a sleeping thread (on a virtual machine, an idle vCPU's exit
//! to the host). A node across the internet answers long after any window, so
//! its traffic never starts one; larger transfers (either way) end a window and
//! hold polling off for a while, as a bulk transfer does not wait on single
//! packets and on a small machine the polling would take the core the SSH
//! endpoints need. Idle nodes' keep-alives never start it. Zero turns it off.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long the data plane's end waits for blocking work it started (a node's
/// speed test) before leaving it behind.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The data plane's thread and its runtime. Dropping it stops the runtime,
/// which drops every task still on it, and joins the thread.
#[derive(Debug)]
pub struct DataPlane {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    busy_polls: Arc<BusyPolls>,
}

/// What the busy poller did, counted since the data plane started.
#[derive(Debug, Default)]
pub struct BusyPolls {
    /// Windows of busy polling that ended (their time ran out, or a larger
    /// transfer came).
    pub windows: AtomicU64,
    /// Interactive traffic that came soon after a larger transfer and so
    /// started no window.
    pub held: AtomicU64,
}

/// Default [`DataPlane::start`] busy-poll window.
pub const BUSY_POLL: Duration = Duration::from_micros(200);

/// Longest busy-poll window a relay accepts.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(1);

/// Largest read or chunk that counts as interactive traffic (a login's
/// exchange, keystrokes, their echo, a line or a screenful of output).
pub const INTERACTIVE: usize = 4096;

/// How long after a larger transfer the data plane does not busy poll.
const BULK_HOLD: Duration = Duration::from_millis(10);

thread_local! {
    /// The busy-poll window of the data plane on this thread (zero: none).
    static WINDOW: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// Interactive client traffic since the busy poller last looked.
    static TRAFFIC: Cell<bool> = const { Cell::new(false) };
    /// When the last larger transfer passed.
    static BULK_AT: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The busy poller, while it sleeps for want of client traffic.
    static POLLER: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// Notes `bytes` from a client on their way to a node whose answers take
/// `node_rtt` (asked only for keystroke-sized traffic). On the data plane's
/// thread, such traffic (re)starts its busy-poll window if an answer can come
/// back within it, and a larger transfer ends the window; elsewhere this does
/// nothing.
pub fn to_node(bytes: usize, node_rtt: impl FnOnce() -> Duration) {
    let window = WINDOW.with(Cell::get);
    if window.is_zero() {
        return;
    }
    if bytes > INTERACTIVE {
        bulk();
    } else if node_rtt() < window {
        TRAFFIC.with(|t| t.set(true));
        if let Some(poller) = POLLER.with(Cell::take) {
            poller.wake();
        }
    }
}

/// Notes `bytes` from a node on their way to a client: a larger transfer ends
/// the busy-poll window.
pub fn to_client(bytes: usize) {
    if bytes > INTERACTIVE && !WINDOW.with(Cell::get).is_zero() {
        bulk();
    }
}

fn bulk() {
    BULK_AT.with(|b| b.set(Some(Instant::now())));
}

/// Interactive traffic since the last call (and clears it).
fn take_traffic() -> bool {
    TRAFFIC.with(|t| t.replace(false))
}

/// Whether a larger transfer passed since `since`.
fn bulk_since(since: Instant) -> bool {
    BULK_AT.with(Cell::get).is_some_and(|at| at >= since)
}

/// Keeps the runtime polling its sockets for `window` after interactive
/// traffic, unless a larger transfer passed less than `hold` before. Each turn
/// yields, and a current-thread runtime with a yielded task and nothing else to
/// run polls its sockets and timers without blocking, runs what became ready,
/// and comes back here.
async fn busy_poll(window: Duration, hold: Duration, counts: Arc<BusyPolls>) {
    WINDOW.with(|w| w.set(window));
    loop {
        std::future::poll_fn(|cx| {
            if take_traffic() {
                Poll::Ready(())
            } else {
                POLLER.with(|p| p.set(Some(cx.waker().clone())));
                Poll::Pending
            }
        })
        .await;
        let start = Instant::now();
        if start.checked_sub(hold).is_some_and(bulk_since) {
            counts.held.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut until = start + window;
        loop {
            tokio::task::yield_now().await;
            let now = Instant::now();
            if bulk_since(start) {
                break;
            }
            if take_traffic() {
                until = now + window;
            } else if now >= until {
                break;
            }
        }
        counts.windows.fetch_add(1, Ordering::Relaxed);
    }
}

impl DataPlane {
    /// Starts the thread and its single-threaded runtime, busy polling for
    /// `busy_poll` after client traffic (zero: never).
    pub fn start(busy_poll: Duration) -> std::io::Result<Self> {
        // Sockets and timers only: no process or signal driver to visit on
        // every wake-up.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .thread_name("jusy-relay")
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let busy_polls = Arc::new(BusyPolls::default());
        let counts = busy_polls.clone();
        let thread = std::thread::Builder::new()
            .name("jusy-relay".into())
            .spawn(move || {
                if !busy_poll.is_zero() {
                    let window = busy_poll.min(MAX_BUSY_POLL);
                    runtime.spawn(self::busy_poll(window, BULK_HOLD, counts));
                }
                // A dropped sender stops the runtime as well as a sent stop.
                let _ = runtime.block_on(stopped);
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
            busy_polls,
        })
    }

    /// The runtime the data plane's tasks and sockets belong to.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// What the busy poller did so far.
    pub fn busy_polls(&self) -> &BusyPolls {
        &self.busy_polls
    }

    /// Runs `task` on the data plane.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread only waits for its stop and then for its runtime's
            // end, bounded by SHUTDOWN_GRACE.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_data_plane_thread_and_end_with_it() {
        let plane = DataPlane::start(Duration::ZERO).expect("data plane");
        let (tx, rx) = std::sync::mpsc::channel();
        plane.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx.recv().expect("task ran");
        assert_eq!(name.as_deref(), Some("jusy-relay"));

        // A task still waiting when the plane is dropped is dropped with it.
        let (held_tx, held_rx) = oneshot::channel::<()>();
        let waiting = plane.spawn(async move {
            let _ = held_rx.await;
        });
        drop(plane);
        assert!(held_tx.is_closed(), "the waiting task was not dropped");
        drop(waiting);
    }

    /// Waits (bounded) until `done` holds.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::yield_now();
        }
    }

    #[test]
    fn interactive_traffic_starts_a_window_and_tasks_run_through_it() {
        let plane = DataPlane::start(MAX_BUSY_POLL).expect("data plane");
        let counts = plane.busy_polls();
        let (tx, rx) = std::sync::mpsc::channel();
        plane.spawn(async move {
            // Timers and sockets keep working while the plane busy polls:
            // every round trip below restarts the window.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let client = tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut tcp = tokio::net::TcpStream::connect(addr).await?;
                let mut b = [0u8; 1];
                for _ in 0..100 {
                    tcp.write_all(b"k").await?;
                    tcp.read_exact(&mut b).await?;
                }
                std::io::Result::Ok(())
            });
            let (mut tcp, _) = listener.accept().await?;
            let mut b = [0u8; 1];
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while tcp.read(&mut b).await? == 1 {
                to_node(1, || Duration::ZERO);
                tokio::time::sleep(Duration::from_micros(50)).await;
                tcp.write_all(&b).await?;
                to_client(1);
            }
            client.await??;
            let _ = tx.send(());
            std::io::Result::Ok(())
        });
        rx.recv().expect("echoes while busy polling");
        // The window ends once the traffic stops, and the poller sleeps.
        wait_until("the end of a window", || {
            counts.windows.load(Ordering::Relaxed) >= 1
        });
        assert_eq!(counts.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn no_window_for_slow_nodes_or_after_a_bulk_transfer_or_elsewhere() {
        // Off a data plane's thread the calls do nothing.
        to_node(1, || Duration::ZERO);
        to_client(64 * 1024);

        let counts = Arc::new(BusyPolls::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (window, hold) = (MAX_BUSY_POLL, Duration::from_secs(3600));
            let poller = tokio::spawn(busy_poll(window, hold, counts.clone()));
            tokio::task::yield_now().await;
            // A node whose answer cannot come back within the window.
            to_node(64, || window);
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            // Bulk downloads hold polling off as uploads do.
            to_client(64 * 1024);
            to_node(64, || Duration::ZERO);
            let looked = async {
                while counts.held.load(Ordering::Relaxed) == 0 {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(30), looked)
                .await
                .expect("the poller never looked at the traffic");
            poller.abort();
        });
        assert_eq!(counts.windows.load(Ordering::Relaxed), 0);
        assert_eq!(counts.held.load(Ordering::Relaxed), 1);
    }
}
