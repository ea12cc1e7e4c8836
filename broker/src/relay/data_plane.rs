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

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

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
}

impl DataPlane {
    /// Starts the thread and its single-threaded runtime.
    pub fn start() -> std::io::Result<Self> {
        // Sockets and timers only: no process or signal driver to visit on
        // every wake-up.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .thread_name("jusy-relay")
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("jusy-relay".into())
            .spawn(move || {
                // A dropped sender stops the runtime as well as a sent stop.
                let _ = runtime.block_on(stopped);
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The runtime the data plane's tasks and sockets belong to.
    pub fn handle(&self) -> &Handle {
        &self.handle
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
        let plane = DataPlane::start().expect("data plane");
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
}
