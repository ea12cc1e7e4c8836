//! The lifecycle of one order's session on a node, as a state machine.
//!
//! The driver feeds it login events, clock ticks and the kernel's usage
//! counters (`now` is always passed in) and acts on the [`EndReason`] it returns;
//! [`Session::deadline`] says when the next tick is due.
//!
//! Only a connection whose SSH user authenticated counts: a stream that is
//! open but not logged in keeps neither the connect window nor the grace
//! period from running out, so holding TCP connections to an order port
//! cannot make a client pay for a session it never had.

use std::time::{Duration, Instant};

use crate::receipt::Counted;
use crate::terms::OrderTerms;
use crate::wire::EndReason;

/// Time and disk limits of a session (memory and processes the kernel
/// enforces in the session's cgroup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time from assignment to the first client login.
    pub connect_window: Duration,
    /// Time after the last logged-in connection closes before the session ends, so that
    /// sequential `ssh`/`scp` commands without a master connection still work.
    pub grace: Duration,
    /// Wall-clock limit from the first login.
    pub wall: Duration,
    /// CPU time the session may use across all its processes.
    pub cpu_budget: Duration,
    /// Bytes the session may use on its disk; `None` without a disk of its own.
    pub disk: Option<u64>,
}

impl Limits {
    /// The limits an order's terms set.
    pub fn of(terms: &OrderTerms) -> Self {
        Self {
            connect_window: terms.connect_window(),
            grace: terms.grace(),
            wall: terms.wall(),
            cpu_budget: terms.cpu_budget(),
            disk: terms.disk_bytes(),
        }
    }
}

/// What the kernel counted for a session since it was prepared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of all the session's processes, exited ones included.
    pub cpu_us: u64,
    /// Highest memory use, in bytes.
    pub peak_mem: u64,
    /// Most processes at once (the kernel's peak where it keeps one).
    pub peak_procs: u32,
    /// Bytes used on the session's disk now.
    pub disk_used: u64,
    /// Processes killed for exceeding the memory limit.
    pub oom_kills: u64,
    /// Forks refused at the process limit.
    pub forks_refused: u64,
    /// The session's disk is full.
    pub disk_full: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self::of(&OrderTerms::default())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Assigned, waiting for the first login.
    Waiting {
        since: Instant,
    },
    /// At least one logged-in connection is open.
    Connected {
        open: u32,
    },
    /// All logged-in connections closed at `since`; ends after the grace period.
    Idle {
        since: Instant,
    },
    Ended(EndReason),
}

/// One order's session.
#[derive(Clone, Debug)]
pub struct Session {
    limits: Limits,
    state: State,
    started: Instant,
    first_connect: Option<Instant>,
    /// The highest counters seen; they only go up, as receipts require.
    cpu_us: u64,
    peak_mem: u64,
    peak_procs: u32,
    peak_disk: u64,
}

impl Session {
    pub fn new(now: Instant, limits: Limits) -> Self {
        Self {
            limits,
            state: State::Waiting { since: now },
            started: now,
            first_connect: None,
            cpu_us: 0,
            peak_mem: 0,
            peak_procs: 0,
            peak_disk: 0,
        }
    }

    /// Whether a new client stream may start its login: false when the session
    /// is over (the stream must be refused). Changes nothing else.
    pub fn admits(&mut self, now: Instant) -> bool {
        if let Some(reason) = self.handle_tick(now) {
            self.state = State::Ended(reason);
        }
        !matches!(self.state, State::Ended(_))
    }

    /// A client connection logged in (its SSH user authenticated).
    /// Returns false when the session is over and the connection must be closed.
    pub fn handle_login(&mut self, now: Instant) -> bool {
        if !self.admits(now) {
            return false;
        }
        self.state = match self.state {
            State::Waiting { .. } | State::Idle { .. } => State::Connected { open: 1 },
            State::Connected { open } => State::Connected {
                open: open.saturating_add(1),
            },
            State::Ended(_) => return false,
        };
        self.first_connect.get_or_insert(now);
        true
    }

    /// A logged-in client connection closed.
    pub fn handle_logout(&mut self, now: Instant) {
        if let State::Connected { open } = self.state {
            self.state = if open <= 1 {
                State::Idle { since: now }
            } else {
                State::Connected { open: open - 1 }
            };
        }
    }

    /// Advances time; returns the reason when the session ends now.
    pub fn handle_tick(&mut self, now: Instant) -> Option<EndReason> {
        let reason = match self.state {
            State::Ended(_) => return None,
            _ if self.wall_exceeded(now) => EndReason::WallClock,
            State::Waiting { since }
                if now.saturating_duration_since(since) >= self.limits.connect_window =>
            {
                EndReason::NeverConnected
            }
            State::Idle { since } if now.saturating_duration_since(since) >= self.limits.grace => {
                EndReason::ClientClosed
            }
            _ => return None,
        };
        self.state = State::Ended(reason);
        Some(reason)
    }

    /// Takes the kernel's latest counters; returns the reason when a limit ends
    /// the session now. Hitting the memory, process or disk limit is reported
    /// before a used-up CPU budget: it is what the session did wrong. The
    /// disk is full when the file system says so or the session used its
    /// limit (a node whose images are larger than the order's terms).
    pub fn handle_usage(&mut self, now: Instant, usage: Usage) -> Option<EndReason> {
        self.cpu_us = self.cpu_us.max(usage.cpu_us);
        self.peak_mem = self.peak_mem.max(usage.peak_mem);
        self.peak_procs = self.peak_procs.max(usage.peak_procs);
        self.peak_disk = self.peak_disk.max(usage.disk_used);
        let disk_full = usage.disk_full
            || self
                .limits
                .disk
                .is_some_and(|limit| usage.disk_used >= limit);
        if matches!(self.state, State::Ended(_)) {
            return None;
        }
        let budget_us = u64::try_from(self.limits.cpu_budget.as_micros()).unwrap_or(u64::MAX);
        let reason = if usage.oom_kills > 0 {
            EndReason::MemoryLimit
        } else if usage.forks_refused > 0 {
            EndReason::ProcessLimit
        } else if disk_full {
            EndReason::DiskLimit
        } else if self.cpu_us >= budget_us {
            EndReason::CpuDone
        } else {
            return self.handle_tick(now);
        };
        self.state = State::Ended(reason);
        Some(reason)
    }

    /// CPU time used so far, in microseconds (never decreasing).
    pub fn cpu_us(&self) -> u64 {
        self.cpu_us
    }

    /// Highest memory use so far, in bytes.
    pub fn peak_mem(&self) -> u64 {
        self.peak_mem
    }

    /// Every counter a receipt states, highest so far.
    pub fn counted(&self) -> Counted {
        Counted {
            cpu_us: self.cpu_us,
            peak_mem: self.peak_mem,
            peak_procs: self.peak_procs,
            peak_disk: self.peak_disk,
        }
    }

    /// Wall time since the session was assigned.
    pub fn wall(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// CPU time left before the budget is used up.
    pub fn cpu_left(&self) -> Duration {
        self.limits
            .cpu_budget
            .saturating_sub(Duration::from_micros(self.cpu_us))
    }

    /// Ends the session from outside (cancel, shutdown); returns the reason if it
    /// was not over yet.
    pub fn handle_end(&mut self, reason: EndReason) -> Option<EndReason> {
        if matches!(self.state, State::Ended(_)) {
            return None;
        }
        self.state = State::Ended(reason);
        Some(reason)
    }

    /// When the driver must call [`Session::handle_tick`] next, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        let wall = self.first_connect.map(|t| t + self.limits.wall);
        let own = match self.state {
            State::Waiting { since } => Some(since + self.limits.connect_window),
            State::Idle { since } => Some(since + self.limits.grace),
            State::Connected { .. } => None,
            State::Ended(_) => return None,
        };
        match (own, wall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn ended(&self) -> Option<EndReason> {
        match self.state {
            State::Ended(r) => Some(r),
            _ => None,
        }
    }

    pub fn open_connections(&self) -> u32 {
        match self.state {
            State::Connected { open } => open,
            _ => 0,
        }
    }

    fn wall_exceeded(&self, now: Instant) -> bool {
        self.first_connect
            .is_some_and(|t| now.saturating_duration_since(t) >= self.limits.wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            connect_window: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            wall: Duration::from_secs(100),
            cpu_budget: Duration::from_secs(20),
            disk: Some(1000),
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn never_connected_ends_after_window() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        assert_eq!(s.deadline(), Some(secs(t0, 10)));
        assert_eq!(s.handle_tick(secs(t0, 9)), None);
        assert_eq!(s.handle_tick(secs(t0, 10)), Some(EndReason::NeverConnected));
        assert!(!s.handle_login(secs(t0, 11)));
    }

    #[test]
    fn streams_that_never_log_in_change_nothing() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        // Streams arrive and are admitted, but the window still runs out.
        for t in 1..10 {
            assert!(s.admits(secs(t0, t)));
        }
        assert_eq!(s.open_connections(), 0);
        assert_eq!(s.deadline(), Some(secs(t0, 10)));
        assert!(!s.admits(secs(t0, 10)));
        assert_eq!(s.ended(), Some(EndReason::NeverConnected));

        // After a login ends, streams without one do not hold the grace open.
        let mut s = Session::new(t0, limits());
        assert!(s.handle_login(secs(t0, 1)));
        s.handle_logout(secs(t0, 2));
        assert!(s.admits(secs(t0, 3)));
        assert!(s.admits(secs(t0, 6)));
        assert_eq!(s.deadline(), Some(secs(t0, 7)));
        assert!(!s.admits(secs(t0, 7)));
        assert_eq!(s.ended(), Some(EndReason::ClientClosed));
    }

    #[test]
    fn grace_lets_sequential_connections_continue() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        assert!(s.handle_login(secs(t0, 1)));
        s.handle_logout(secs(t0, 2));
        assert_eq!(s.handle_tick(secs(t0, 6)), None);
        assert!(s.handle_login(secs(t0, 6)));
        assert!(s.handle_login(secs(t0, 6)));
        assert_eq!(s.open_connections(), 2);
        s.handle_logout(secs(t0, 7));
        assert_eq!(s.handle_tick(secs(t0, 20)), None);
        s.handle_logout(secs(t0, 20));
        assert_eq!(s.deadline(), Some(secs(t0, 25)));
        assert_eq!(s.handle_tick(secs(t0, 25)), Some(EndReason::ClientClosed));
        assert_eq!(s.ended(), Some(EndReason::ClientClosed));
    }

    #[test]
    fn wall_clock_ends_a_busy_session() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        assert!(s.handle_login(secs(t0, 1)));
        assert_eq!(s.deadline(), Some(secs(t0, 101)));
        assert_eq!(s.handle_tick(secs(t0, 101)), Some(EndReason::WallClock));
        assert_eq!(s.handle_tick(secs(t0, 102)), None);
    }

    #[test]
    fn external_end_happens_once() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        assert_eq!(
            s.handle_end(EndReason::Cancelled),
            Some(EndReason::Cancelled)
        );
        assert_eq!(s.handle_end(EndReason::NodeShutdown), None);
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn cpu_budget_ends_with_done_and_counters_never_go_down() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        assert!(s.handle_login(secs(t0, 1)));
        let used = |cpu_s: u64| Usage {
            cpu_us: cpu_s * 1_000_000,
            peak_mem: 1000,
            ..Usage::default()
        };
        assert_eq!(s.handle_usage(secs(t0, 2), used(19)), None);
        assert_eq!(s.cpu_left(), Duration::from_secs(1));
        // A stale, lower reading does not move the counter back.
        assert_eq!(s.handle_usage(secs(t0, 3), used(5)), None);
        assert_eq!(s.cpu_us(), 19_000_000);
        assert_eq!(
            s.handle_usage(secs(t0, 4), used(20)),
            Some(EndReason::CpuDone)
        );
        assert_eq!(s.ended(), Some(EndReason::CpuDone));
        // Counting continues after the end (for the final receipt), the reason does not change.
        assert_eq!(s.handle_usage(secs(t0, 5), used(21)), None);
        assert_eq!(s.cpu_us(), 21_000_000);
        assert_eq!(s.wall(secs(t0, 5)), Duration::from_secs(5));
    }

    #[test]
    fn kernel_limit_events_end_with_their_codes() {
        let t0 = Instant::now();
        let cases = [
            (
                Usage {
                    oom_kills: 1,
                    forks_refused: 3,
                    ..Usage::default()
                },
                EndReason::MemoryLimit,
            ),
            (
                Usage {
                    forks_refused: 1,
                    ..Usage::default()
                },
                EndReason::ProcessLimit,
            ),
            (
                Usage {
                    disk_full: true,
                    cpu_us: u64::MAX,
                    ..Usage::default()
                },
                EndReason::DiskLimit,
            ),
        ];
        for (usage, reason) in cases {
            let mut s = Session::new(t0, limits());
            assert!(s.handle_login(secs(t0, 1)));
            assert_eq!(s.handle_usage(secs(t0, 2), usage), Some(reason));
        }
    }

    #[test]
    fn using_the_terms_disk_ends_with_disk_and_peaks_are_kept() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        assert!(s.handle_login(secs(t0, 1)));
        let used = |disk_used, peak_procs| Usage {
            disk_used,
            peak_procs,
            ..Usage::default()
        };
        assert_eq!(s.handle_usage(secs(t0, 2), used(999, 7)), None);
        assert_eq!(s.handle_usage(secs(t0, 3), used(10, 3)), None);
        assert_eq!(s.counted().peak_disk, 999);
        assert_eq!(s.counted().peak_procs, 7);
        assert_eq!(
            s.handle_usage(secs(t0, 4), used(1000, 3)),
            Some(EndReason::DiskLimit)
        );
    }

    #[test]
    fn usage_also_advances_the_clock() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, limits());
        assert!(s.handle_login(secs(t0, 1)));
        assert_eq!(
            s.handle_usage(secs(t0, 101), Usage::default()),
            Some(EndReason::WallClock)
        );
    }
}
