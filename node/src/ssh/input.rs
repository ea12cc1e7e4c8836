//! Client input on its way to a session program: a queue per channel that never
//! makes the SSH connection wait, and the connection's backlog, which sets the
//! receive window the client is granted.
//!
//! Why not a bounded queue: russh grants the client more window as soon as it
//! reads a packet, not when the program has taken the data, so the window does
//! not bound what a client may send. The only other brake is to stop reading
//! the connection, and that deadlocks as soon as the program's input waits on
//! its output (`cat`): the output needs the client's window adjustments, which
//! arrive on the same connection behind the input nobody reads any more. So
//! every channel queues all it is sent, and the window is what keeps the queues
//! short: russh asks [`Backlog::window`] for the next window it grants, and
//! once the connection's channels hold [`LIMIT`] bytes the answer is a tiny
//! [`TRICKLE`]. The client then runs out of window and sends a few bytes per
//! refill — each packet is a chance for russh to ask again, which is how the
//! full window comes back once the programs have caught up — while the
//! connection keeps being read. The client answers each refill at once, so the
//! connection pauses briefly after each trickle packet ([`Backlog::pause`]):
//! a few round trips a second instead of a busy exchange between node, relay
//! and client for as long as a program leaves its input unread.
//!
//! One window for all channels, as russh keeps one target per connection: a
//! backlog on one channel slows the client's input on the others too, but
//! nothing stops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// The receive window granted while the backlog is short (russh's default).
pub const WINDOW: u32 = 2 * 1024 * 1024;

/// Queued bytes on one connection above which the client gets only [`TRICKLE`].
/// A few windows: the programs keep being fed during the round trip it takes
/// the client to see the full window again. Beyond it a connection holds at
/// most about two windows per channel more (granted before the limit was
/// reached), then a trickle.
pub const LIMIT: usize = 4 * WINDOW as usize;

/// The smallest window russh still refills: it sends an adjustment once the
/// client's remaining window is below half the target, so a target of 1 would
/// never refill, and 2 refills (by 2 bytes) whenever the client has used it up.
pub const TRICKLE: u32 = 2;

/// How long the connection pauses after a trickle packet.
pub const PACE: Duration = Duration::from_millis(20);

/// Small packets (a trickle, keystrokes) are appended to the last queued chunk
/// up to this size, so that a queue of tiny packets costs its bytes, not a
/// chunk each.
const CHUNK: usize = 32 * 1024;

/// Input queued on one SSH connection, across its channels.
#[derive(Debug, Default)]
pub struct Backlog {
    queued: AtomicUsize,
}

impl Backlog {
    /// The receive window to grant the client next.
    pub fn window(&self) -> u32 {
        if self.queued.load(Ordering::Relaxed) < LIMIT {
            WINDOW
        } else {
            TRICKLE
        }
    }

    /// How long to pause the connection after receiving a data packet of
    /// `len` bytes: [`PACE`] for a trickle packet while the backlog is at its
    /// limit, else not at all.
    pub fn pause(&self, len: usize) -> Option<Duration> {
        (self.window() == TRICKLE && len <= TRICKLE as usize).then_some(PACE)
    }

    fn add(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A new channel's input queue, counted in `backlog`: the channel pushes into
/// [`Input`], and a task of its own feeds the program with [`Feed::write_to`].
pub fn queue(backlog: Arc<Backlog>) -> (Input, Feed) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        more: Notify::new(),
        backlog,
    });
    (Input(shared.clone()), Feed(shared))
}

/// The channel's side of the queue; nothing on it waits.
#[derive(Debug)]
pub struct Input(Arc<Shared>);

impl Input {
    /// Queues what the client sent. Dropped once the client has sent EOF or
    /// the program no longer takes input (as sshd does).
    pub fn push(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut state = self.0.lock();
        if state.ended || state.broken {
            return;
        }
        match state.chunks.back_mut() {
            Some(last) if last.len() + data.len() <= CHUNK => last.extend_from_slice(data),
            _ => state.chunks.push_back(data.to_vec()),
        }
        state.queued += data.len();
        self.0.backlog.add(data.len());
        drop(state);
        self.0.more.notify_one();
    }

    /// The client's EOF: the program's input is closed once the queue is fed.
    pub fn end(&self) {
        self.0.lock().ended = true;
        self.0.more.notify_one();
    }
}

/// The program's side of the queue.
#[derive(Debug)]
pub struct Feed(Arc<Shared>);

impl Feed {
    /// Writes the queue to `to` in order until the client's EOF (then drops
    /// `to`, closing a pipe) or a write error (then drops what is queued and
    /// what comes later).
    pub async fn write_to(self, mut to: impl AsyncWrite + Unpin) {
        while let Some(chunk) = self.next().await {
            if to.write_all(&chunk).await.is_err() {
                let mut state = self.0.lock();
                state.broken = true;
                let dropped = std::mem::take(&mut state.queued);
                state.chunks.clear();
                self.0.backlog.release(dropped);
                return;
            }
        }
    }

    /// The next chunk, or `None` after the client's EOF once all is fed.
    async fn next(&self) -> Option<Vec<u8>> {
        loop {
            {
                let mut state = self.0.lock();
                if let Some(chunk) = state.chunks.pop_front() {
                    state.queued -= chunk.len();
                    self.0.backlog.release(chunk.len());
                    return Some(chunk);
                }
                if state.ended {
                    return None;
                }
            }
            // A push between the unlock and here leaves a permit: no lost wakeup.
            self.0.more.notified().await;
        }
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    more: Notify,
    backlog: Arc<Backlog>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Shared {
    /// A channel that ends with input still queued gives it back to the backlog.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.backlog.release(state.queued);
    }
}

#[derive(Debug, Default)]
struct State {
    chunks: VecDeque<Vec<u8>>,
    queued: usize,
    ended: bool,
    broken: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(backlog: &Backlog) -> usize {
        backlog.queued.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn feeds_in_order_then_closes_at_eof() {
        let backlog = Arc::new(Backlog::default());
        let (input, feed) = queue(backlog.clone());
        input.push(b"hello ");
        input.push(&[]);
        input.push(b"world");
        input.end();
        input.push(b"after eof");
        let (mut program, to) = tokio::io::duplex(4);
        let fed = tokio::spawn(feed.write_to(to));
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut program, &mut got)
            .await
            .unwrap_or_default();
        assert_eq!(got, b"hello world");
        assert!(fed.await.is_ok());
        assert_eq!(queued(&backlog), 0);
    }

    #[tokio::test]
    async fn the_window_shrinks_to_a_trickle_at_the_limit_and_comes_back() {
        let backlog = Arc::new(Backlog::default());
        let (input, feed) = queue(backlog.clone());
        let packet = vec![7u8; CHUNK];
        for _ in 0..LIMIT / CHUNK - 1 {
            input.push(&packet);
        }
        assert_eq!(backlog.window(), WINDOW);
        assert_eq!(backlog.pause(2), None);
        input.push(&packet);
        assert_eq!(backlog.window(), TRICKLE);
        assert_eq!(backlog.pause(2), Some(PACE));
        assert_eq!(
            backlog.pause(CHUNK),
            None,
            "what was granted before comes at once"
        );
        input.end();
        let mut program = Vec::new();
        feed.write_to(&mut program).await;
        assert_eq!(program.len(), LIMIT);
        assert_eq!(backlog.window(), WINDOW);
        assert_eq!(backlog.pause(2), None);
    }

    #[tokio::test]
    async fn the_backlog_is_shared_by_a_connections_channels() {
        let backlog = Arc::new(Backlog::default());
        let (first, _first_feed) = queue(backlog.clone());
        let (second, _second_feed) = queue(backlog.clone());
        first.push(&vec![0u8; LIMIT / 2]);
        assert_eq!(backlog.window(), WINDOW);
        second.push(&vec![0u8; LIMIT / 2]);
        assert_eq!(backlog.window(), TRICKLE);
    }

    #[tokio::test]
    async fn a_program_that_stops_reading_drops_its_input() {
        let backlog = Arc::new(Backlog::default());
        let (input, feed) = queue(backlog.clone());
        let (program, to) = tokio::io::duplex(4);
        drop(program);
        input.push(&vec![1u8; LIMIT]);
        feed.write_to(to).await;
        assert_eq!(queued(&backlog), 0);
        input.push(b"more");
        assert_eq!(queued(&backlog), 0);
    }

    #[test]
    fn an_ended_channel_gives_back_its_queue() {
        let backlog = Arc::new(Backlog::default());
        let (input, feed) = queue(backlog.clone());
        input.push(&vec![1u8; LIMIT]);
        assert_eq!(backlog.window(), TRICKLE);
        drop((input, feed));
        assert_eq!(queued(&backlog), 0);
        assert_eq!(backlog.window(), WINDOW);
    }

    #[test]
    fn a_trickle_costs_its_bytes_not_a_chunk_per_packet() {
        let backlog = Arc::new(Backlog::default());
        let (input, _feed) = queue(backlog.clone());
        for _ in 0..10_000 {
            input.push(&[0u8; 2]);
        }
        assert_eq!(queued(&backlog), 20_000);
        assert_eq!(input.0.lock().chunks.len(), 1);
    }
}
