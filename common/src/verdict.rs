//! Whose end it was: a claimed end reason held against the evidence the
//! broker can check — its own clock and the logins it saw, the CPU time
//! receipts prove within what was physically possible, and the evidence a
//! final receipt carries.
//!
//! The node's word alone decides nothing. An end the evidence upholds is
//! settled by its rules; one it does not is the node's fault: the client
//! gets back what is not proven, its rating is untouched, and the node's
//! rating takes the fault. The broker's own ends (its timers, a lost node, a
//! cancellation) are its own evidence. A [`Verdict`] says who claimed the
//! end, whether it stood, whose fault it was and how the price is paid out,
//! so that holds, disputes and ratings that follow owners can build on it.

use serde::{Deserialize, Serialize};

use crate::terms::OrderTerms;
use crate::wire::EndReason;

/// An order that ends within this long of its first login is cancelled:
/// the client pays only the CPU time its receipts prove, at the hourly rate.
pub const CANCEL_WINDOW_MS: u64 = 20_000;

/// How much before the wall limit the broker's clock may stand when a node
/// says `WALL` (the node counts from its own view of the first login).
pub const WALL_SLACK_MS: u64 = 5_000;

/// How long after the wall limit the broker waits for the node's `WALL`
/// before it ends the session itself.
pub const WALL_OVERRUN_MS: u64 = 10_000;

/// How long after the grace time that followed the client's last logged-in
/// connection the broker waits for the node's `CLIENT_CLOSED` before it
/// ends the session itself.
pub const GRACE_OVERRUN_MS: u64 = 10_000;

/// How long after the connect window the broker waits for the node's
/// `NEVER_CONNECTED` before it cancels the order itself.
pub const CONNECT_SLACK_MS: u64 = 2_000;

/// Proven CPU time may fall this short of the budget for `DONE` to stand:
/// one CPU-second plus 1 % (the node samples its counters now and then).
pub fn done_tolerance_us(budget_us: u64) -> u64 {
    1_000_000 + budget_us / 100
}

/// A `RAM` end stands when peak memory reached this share of the limit
/// (parts per million).
pub const MEMORY_EVIDENCE_PPM: u64 = 900_000;

/// A `DISK` end stands when the disk's peak use reached this share of the
/// limit (parts per million): the file system's own metadata takes the rest.
pub const DISK_EVIDENCE_PPM: u64 = 800_000;

/// Who says the session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Party {
    /// The node, in its `Ended` message: a claim to check.
    Node,
    /// The broker, on its own evidence (its timers, a lost connection, a
    /// cancellation, recovery after a crash).
    Broker,
}

/// Whose fault an end was, for the ratings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// Nobody's: the client left, used its budget or wall time, or never came.
    Nobody,
    /// The client broke a limit, and the evidence shows it.
    Client,
    /// The node: it dropped the session, or claimed an end (or CPU time) the
    /// evidence does not support.
    Node,
    /// The broker cancelled.
    Broker,
}

/// How the escrowed price is paid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payout {
    /// Everything back to the client.
    Refund,
    /// The client pays what receipts prove, at the hourly rate, and gets
    /// the rest back.
    Proven,
    /// The client used what it bought: nothing back.
    Price,
}

/// The evidence of limits a final receipt carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Final {
    pub reason: Option<EndReason>,
    pub peak_mem: u64,
    pub peak_procs: u32,
    pub peak_disk: u64,
}

/// What the broker knows when an order ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evidence {
    pub now_ms: u64,
    /// When the broker heard of the first login.
    pub first_login_ms: Option<u64>,
    /// When the last logged-in connection closed, while none is open.
    pub closed_ms: Option<u64>,
    /// Logged-in connections the broker still sees open.
    pub open: u32,
    /// CPU time receipts prove, within the plausible bound.
    pub proven_cpu_us: u64,
    /// Receipts that claimed more CPU time than was possible.
    pub implausible: u32,
    /// The final receipt's evidence, if it came.
    pub last: Option<Final>,
}

/// The judgement of one order's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The end as claimed.
    pub reason: EndReason,
    pub by: Party,
    /// Whether the evidence supports the claim.
    pub upheld: bool,
    pub fault: Fault,
    pub payout: Payout,
    /// The node signed receipts claiming impossible CPU time: a fault of the
    /// node whatever the end.
    pub lied: bool,
    /// Ended within [`CANCEL_WINDOW_MS`] of the first login by the client:
    /// cancelled, paying only the proven CPU time.
    pub quick_close: bool,
}

impl Verdict {
    /// Whether the node's rating counts this end against it.
    pub fn against_node(&self) -> bool {
        self.lied || self.fault == Fault::Node
    }

    /// Whether the end says something about the client, and what: `Some(true)`
    /// when it broke a limit, `Some(false)` when it kept to them, `None` when
    /// the end was not the client's doing (never started, node or broker).
    pub fn client_broke_limits(&self) -> Option<bool> {
        match self.fault {
            Fault::Client => Some(true),
            Fault::Nobody if self.payout == Payout::Price || self.quick_close => Some(false),
            Fault::Nobody | Fault::Node | Fault::Broker => None,
        }
    }

    /// Whether the order counts as cancelled (a full refund or a quick close)
    /// rather than finished.
    pub fn cancelled(&self) -> bool {
        self.payout == Payout::Refund || self.quick_close
    }
}

/// Holds `reason`, claimed by `by`, against the evidence under `terms`.
pub fn judge(terms: &OrderTerms, reason: EndReason, by: Party, ev: &Evidence) -> Verdict {
    let lied = ev.implausible > 0;
    let verdict = |upheld, fault, payout| Verdict {
        reason,
        by,
        upheld,
        fault,
        payout,
        lied,
        quick_close: false,
    };
    let Some(first) = ev.first_login_ms else {
        // Nobody logged in: nothing was bought. The claim still tells about
        // the node: it cannot have dropped, nor seen used up or broken, a
        // session nobody used.
        let (upheld, fault) = match (reason, by) {
            (EndReason::NodeLost | EndReason::NodeFailed | EndReason::NodeShutdown, _) => {
                (true, Fault::Node)
            }
            (EndReason::Cancelled, Party::Broker) => (true, Fault::Broker),
            (EndReason::NeverConnected | EndReason::ClientClosed, _) => (true, Fault::Nobody),
            (_, Party::Node) => (false, Fault::Node),
            (_, Party::Broker) => (true, Fault::Nobody),
        };
        return verdict(upheld, fault, Payout::Refund);
    };
    let node_fault = verdict(false, Fault::Node, Payout::Proven);
    // The client left: a quick close pays the proven CPU, a later one the
    // price.
    let closed_by_client = |fault| {
        let closed = ev.closed_ms.unwrap_or(ev.now_ms);
        if closed.saturating_sub(first) < CANCEL_WINDOW_MS {
            Verdict {
                quick_close: true,
                ..verdict(true, fault, Payout::Proven)
            }
        } else {
            verdict(true, fault, Payout::Price)
        }
    };
    match (by, reason) {
        (Party::Broker, EndReason::WallClock) => {
            // The broker's own wall timer: the client had all its time, the
            // node failed to end the session.
            verdict(true, Fault::Node, Payout::Price)
        }
        (_, EndReason::NodeLost | EndReason::NodeFailed | EndReason::NodeShutdown) => {
            verdict(true, Fault::Node, Payout::Proven)
        }
        (Party::Broker, EndReason::ClientClosed) if ev.open == 0 => {
            // The broker's own grace timer: the client left, the node did not
            // end the session. The close rule holds as if the node had said
            // so; the silence is the node's fault.
            closed_by_client(Fault::Node)
        }
        (Party::Broker, _) => verdict(true, Fault::Broker, Payout::Proven),
        (Party::Node, EndReason::ClientClosed) if ev.open == 0 => closed_by_client(Fault::Nobody),
        (Party::Node, EndReason::CpuDone) => {
            let budget = terms.cpu_budget_us();
            if ev.proven_cpu_us.saturating_add(done_tolerance_us(budget)) >= budget {
                verdict(true, Fault::Nobody, Payout::Price)
            } else {
                node_fault
            }
        }
        (Party::Node, EndReason::WallClock) => {
            let wall = ev.now_ms.saturating_sub(first);
            if wall.saturating_add(WALL_SLACK_MS) >= terms.wall_ms() {
                verdict(true, Fault::Nobody, Payout::Price)
            } else {
                node_fault
            }
        }
        (Party::Node, EndReason::MemoryLimit | EndReason::ProcessLimit | EndReason::DiskLimit) => {
            if limit_shown(terms, reason, ev.last) {
                verdict(true, Fault::Client, Payout::Price)
            } else {
                node_fault
            }
        }
        // A close while the broker still sees the client logged in, a
        // never-connected or cancelled claim after a login the broker saw.
        (
            Party::Node,
            EndReason::ClientClosed | EndReason::NeverConnected | EndReason::Cancelled,
        ) => node_fault,
    }
}

fn share(limit: u64, ppm: u64) -> u64 {
    u64::try_from(u128::from(limit) * u128::from(ppm) / 1_000_000).unwrap_or(u64::MAX)
}

/// Whether the final receipt ends for `reason` and carries its evidence.
fn limit_shown(terms: &OrderTerms, reason: EndReason, last: Option<Final>) -> bool {
    let Some(last) = last.filter(|l| l.reason == Some(reason)) else {
        return false;
    };
    match reason {
        EndReason::MemoryLimit => last.peak_mem >= share(terms.memory_bytes(), MEMORY_EVIDENCE_PPM),
        // The kernel counts the session's init too: at the limit, the
        // session's own processes are `max_processes`.
        EndReason::ProcessLimit => last.peak_procs >= terms.max_processes,
        EndReason::DiskLimit => terms
            .disk_bytes()
            .is_some_and(|limit| last.peak_disk >= share(limit, DISK_EVIDENCE_PPM)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms() -> OrderTerms {
        OrderTerms {
            cpu_budget_secs: 100,
            wall_secs: 1000,
            memory_mib: 100,
            max_processes: 10,
            disk_mib: 100,
            ..OrderTerms::default()
        }
    }

    fn connected(now_ms: u64) -> Evidence {
        Evidence {
            now_ms,
            first_login_ms: Some(0),
            closed_ms: Some(now_ms),
            open: 0,
            proven_cpu_us: 0,
            implausible: 0,
            last: None,
        }
    }

    fn by_node(reason: EndReason, ev: &Evidence) -> Verdict {
        judge(&terms(), reason, Party::Node, ev)
    }

    #[test]
    fn done_needs_the_budget_proven() {
        let mut ev = connected(200_000);
        ev.proven_cpu_us = 50_000_000;
        let early = by_node(EndReason::CpuDone, &ev);
        assert_eq!(
            (early.upheld, early.fault, early.payout),
            (false, Fault::Node, Payout::Proven)
        );
        ev.proven_cpu_us = 98_000_000;
        let done = by_node(EndReason::CpuDone, &ev);
        assert_eq!(
            (done.upheld, done.fault, done.payout),
            (true, Fault::Nobody, Payout::Price)
        );
        assert_eq!(done.client_broke_limits(), Some(false));
    }

    #[test]
    fn wall_needs_the_brokers_clock_past_the_limit() {
        let early = by_node(EndReason::WallClock, &connected(900_000));
        assert!(!early.upheld && early.against_node());
        let on_time = by_node(EndReason::WallClock, &connected(996_000));
        assert!(on_time.upheld && !on_time.against_node());
        // The broker's own timer: the node overran, the client had its time.
        let overrun = judge(
            &terms(),
            EndReason::WallClock,
            Party::Broker,
            &connected(1_010_000),
        );
        assert_eq!(
            (overrun.payout, overrun.fault),
            (Payout::Price, Fault::Node)
        );
    }

    #[test]
    fn limits_need_the_final_receipts_evidence() {
        let ev = |last| Evidence {
            last: Some(last),
            ..connected(60_000)
        };
        let fin = |reason, peak_mem, peak_procs, peak_disk| Final {
            reason: Some(reason),
            peak_mem,
            peak_procs,
            peak_disk,
        };
        let mib = 1 << 20;
        for (reason, shown, not_shown) in [
            (
                EndReason::MemoryLimit,
                fin(EndReason::MemoryLimit, 95 * mib, 0, 0),
                fin(EndReason::MemoryLimit, 10 * mib, 0, 0),
            ),
            (
                EndReason::ProcessLimit,
                fin(EndReason::ProcessLimit, 0, 11, 0),
                fin(EndReason::ProcessLimit, 0, 3, 0),
            ),
            (
                EndReason::DiskLimit,
                fin(EndReason::DiskLimit, 0, 0, 90 * mib),
                fin(EndReason::DiskLimit, 0, 0, 10 * mib),
            ),
        ] {
            let v = by_node(reason, &ev(shown));
            assert_eq!(
                (v.upheld, v.fault, v.payout),
                (true, Fault::Client, Payout::Price),
                "{reason:?}"
            );
            assert_eq!(v.client_broke_limits(), Some(true));
            let v = by_node(reason, &ev(not_shown));
            assert_eq!(
                (v.upheld, v.fault, v.payout),
                (false, Fault::Node, Payout::Proven),
                "{reason:?}"
            );
            assert_eq!(
                v.client_broke_limits(),
                None,
                "the client's rating is untouched"
            );
            // Evidence of another end proves nothing.
            let other = Final {
                reason: Some(EndReason::ClientClosed),
                ..shown
            };
            assert!(!by_node(reason, &ev(other)).upheld, "{reason:?}");
            assert!(
                !by_node(reason, &connected(60_000)).upheld,
                "no final receipt: {reason:?}"
            );
        }
    }

    #[test]
    fn a_quick_close_pays_the_proven_cpu_only() {
        let v = by_node(EndReason::ClientClosed, &connected(19_999));
        assert!(v.quick_close && v.cancelled());
        assert_eq!(v.payout, Payout::Proven);
        let v = by_node(EndReason::ClientClosed, &connected(20_000));
        assert!(!v.quick_close && !v.cancelled());
        assert_eq!(v.payout, Payout::Price);
        // A close the broker does not see is the node's word alone.
        let open = Evidence {
            open: 1,
            closed_ms: None,
            ..connected(60_000)
        };
        assert!(by_node(EndReason::ClientClosed, &open).against_node());
    }

    #[test]
    fn without_a_login_everything_goes_back() {
        let ev = Evidence {
            first_login_ms: None,
            closed_ms: None,
            ..connected(130_000)
        };
        for reason in EndReason::ALL {
            for by in [Party::Node, Party::Broker] {
                let v = judge(&terms(), reason, by, &ev);
                assert_eq!(v.payout, Payout::Refund, "{reason:?} by {by:?}");
                assert_eq!(v.client_broke_limits(), None);
            }
        }
        assert!(
            by_node(EndReason::CpuDone, &ev).against_node(),
            "DONE with nothing run"
        );
        assert!(!by_node(EndReason::NeverConnected, &ev).against_node());
    }

    #[test]
    fn node_and_broker_ends() {
        let ev = connected(60_000);
        for reason in [
            EndReason::NodeLost,
            EndReason::NodeFailed,
            EndReason::NodeShutdown,
        ] {
            let v = by_node(reason, &ev);
            assert_eq!((v.fault, v.payout), (Fault::Node, Payout::Proven));
        }
        let v = judge(&terms(), EndReason::Cancelled, Party::Broker, &ev);
        assert_eq!((v.fault, v.payout), (Fault::Broker, Payout::Proven));
        assert!(!v.against_node());
        assert!(
            by_node(EndReason::Cancelled, &ev).against_node(),
            "the broker did not cancel"
        );
        let lied = Evidence {
            implausible: 1,
            ..ev
        };
        let v = by_node(EndReason::ClientClosed, &lied);
        assert!(v.upheld && v.against_node());
    }
}
