//! Ratings from how sessions ended, with no one voting by hand. A node that
//! drops sessions (lost, failed, shut down under a client) is rated down and
//! picked for orders less often in proportion; a client whose sessions keep
//! breaking their node's limits is rated down and, below the broker's
//! threshold, refused orders. I/O-free, so every page and broker that counts
//! the same orders shows the same rating.

use crate::order::{Order, OrderState};
use crate::verdict::{Fault, Payout, Verdict};
use crate::wire::EndReason;

/// How many of a node's sessions it kept to their end and how many it
/// dropped. Sessions that never started (the client did not connect) and
/// orders the broker cancelled say nothing about the node and are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub kept: u32,
    pub dropped: u32,
}

/// A new node is trusted as if it had kept this many of this many sessions,
/// so that one early loss does not sink it and a few good sessions do not
/// make a bad node look perfect.
const PRIOR_KEPT: u64 = 9;
const PRIOR_TOTAL: u64 = 10;

impl Tally {
    /// Counts one order of the node, by its state.
    pub fn add(&mut self, state: OrderState) {
        if let OrderState::Finished(reason) | OrderState::Cancelled(reason) = state {
            self.add_end(reason);
        }
    }

    /// Counts one order of the node: by its verdict, or, for orders settled
    /// before ends were judged, by its state.
    pub fn add_order(&mut self, order: &Order) {
        match &order.verdict {
            Some(v) => self.add_verdict(v),
            None => self.add(order.state),
        }
    }

    /// Counts one judged end: against the node when it was the node's fault
    /// (a dropped session, an end or CPU time the evidence does not
    /// support); not at all when nothing was bought or the broker ended it.
    pub fn add_verdict(&mut self, v: &Verdict) {
        if v.against_node() {
            self.dropped = self.dropped.saturating_add(1);
        } else if v.fault != Fault::Broker && v.payout != Payout::Refund {
            self.kept = self.kept.saturating_add(1);
        }
    }

    /// Counts one session of the node that ended for `reason`.
    pub fn add_end(&mut self, reason: EndReason) {
        match reason {
            EndReason::NodeLost | EndReason::NodeFailed | EndReason::NodeShutdown => {
                self.dropped = self.dropped.saturating_add(1);
            }
            EndReason::NeverConnected | EndReason::Cancelled => {}
            EndReason::ClientClosed
            | EndReason::WallClock
            | EndReason::CpuDone
            | EndReason::MemoryLimit
            | EndReason::ProcessLimit
            | EndReason::DiskLimit => self.kept = self.kept.saturating_add(1),
        }
    }

    /// The rating in percent, 0 to 100: the share of sessions kept, pulled
    /// towards 90 % while the node has served few.
    pub fn percent(&self) -> u8 {
        smoothed_percent(self.kept, self.dropped)
    }

    /// Both counts together (the nodes of one owner).
    #[must_use]
    pub fn plus(self, other: Tally) -> Tally {
        Tally {
            kept: self.kept.saturating_add(other.kept),
            dropped: self.dropped.saturating_add(other.dropped),
        }
    }

    /// These counts without `part`'s (an owner's without one node's).
    #[must_use]
    pub fn minus(self, part: Tally) -> Tally {
        Tally {
            kept: self.kept.saturating_sub(part.kept),
            dropped: self.dropped.saturating_sub(part.dropped),
        }
    }

    /// The rating of a node whose owner's other nodes counted `owner`: the
    /// owner's rating takes the place of the 90 % prior, so a new key of a
    /// known owner starts where its owner stands (a bad owner cannot shed
    /// its record by making a new key), and the node's own sessions move it
    /// from there.
    pub fn percent_under(&self, owner: &Tally) -> u8 {
        let prior = u64::from(owner.percent());
        let own = u64::from(self.kept) + u64::from(self.dropped);
        let good = u64::from(self.kept) * 100 + prior * PRIOR_TOTAL;
        let total = (own + PRIOR_TOTAL) * 100;
        // good ≤ total, so the quotient is at most 100.
        u8::try_from(good * 100 / total).unwrap_or(100)
    }
}

/// `good` of `good + bad` in percent, with [`PRIOR_KEPT`] of [`PRIOR_TOTAL`]
/// added to both, so that few counts pull towards 90 %.
fn smoothed_percent(good: u32, bad: u32) -> u8 {
    let good = u64::from(good) + PRIOR_KEPT;
    let total = good + u64::from(bad) + (PRIOR_TOTAL - PRIOR_KEPT);
    // good ≤ total, so the quotient is at most 100.
    u8::try_from(good * 100 / total).unwrap_or(100)
}

/// How a client's sessions ended: how many broke a limit of their node
/// (memory, processes, disk) and how many ended otherwise (the client
/// closed, the wall-clock or CPU budget ran out). A client that keeps
/// breaking limits is rated down and, below the broker's
/// `min_client_rating`, refused new orders. Sessions that never started, and
/// those a node or broker ended, say nothing about the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientTally {
    pub clean: u32,
    pub broke_limits: u32,
}

/// Whether a session that ended for `reason` broke its node's limits:
/// `None` for ends that say nothing about the client.
pub fn broke_limits(reason: EndReason) -> Option<bool> {
    match reason {
        EndReason::MemoryLimit | EndReason::ProcessLimit | EndReason::DiskLimit => Some(true),
        EndReason::ClientClosed | EndReason::WallClock | EndReason::CpuDone => Some(false),
        EndReason::NeverConnected
        | EndReason::Cancelled
        | EndReason::NodeLost
        | EndReason::NodeFailed
        | EndReason::NodeShutdown => None,
    }
}

/// Whether an order's session broke its node's limits (see
/// [`broke_limits`]), by its verdict when it has one: a limit the evidence
/// does not show is not the client's.
pub fn order_broke_limits(order: &Order) -> Option<bool> {
    match (&order.verdict, order.state) {
        (Some(v), _) => v.client_broke_limits(),
        (None, OrderState::Finished(r) | OrderState::Cancelled(r)) => broke_limits(r),
        (None, _) => None,
    }
}

impl ClientTally {
    /// Counts one session of the client that ended for `reason`.
    pub fn add_end(&mut self, reason: EndReason) {
        if let Some(broke) = broke_limits(reason) {
            self.add(broke);
        }
    }

    /// Counts one session that broke limits or did not.
    pub fn add(&mut self, broke: bool) {
        if broke {
            self.broke_limits = self.broke_limits.saturating_add(1);
        } else {
            self.clean = self.clean.saturating_add(1);
        }
    }

    /// The rating in percent, 0 to 100: the share of sessions that kept to
    /// their node's limits, pulled towards 90 % while the client has had
    /// few (as [`Tally::percent`]), so that one runaway build does not
    /// count as abuse.
    pub fn percent(&self) -> u8 {
        smoothed_percent(self.clean, self.broke_limits)
    }
}

/// Picks an index from `weights` at random, each in proportion to its
/// weight (a weight of 0 counts as 1, so no candidate is ruled out for
/// good); `roll` is a random number. `None` for no candidates.
pub fn pick_weighted(weights: &[u64], roll: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| (*w).max(1)).sum();
    let mut left = roll.checked_rem(total)?;
    for (i, w) in weights.iter().enumerate() {
        let w = (*w).max(1);
        if left < w {
            return Some(i);
        }
        left -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_starts_from_its_owners_rating() {
        let fresh = Tally::default();
        // No owner history: the usual 90 %.
        assert_eq!(fresh.percent_under(&Tally::default()), fresh.percent());
        assert_eq!(fresh.percent(), 90);
        // An owner whose nodes dropped most sessions: a new key starts low.
        let bad = Tally {
            kept: 2,
            dropped: 30,
        };
        assert_eq!(fresh.percent_under(&bad), bad.percent());
        assert!(bad.percent() < 30, "{}", bad.percent());
        // A good owner's new key starts high; its own sessions move it.
        let good = Tally {
            kept: 200,
            dropped: 0,
        };
        assert!(fresh.percent_under(&good) > 95);
        let flaky = Tally {
            kept: 5,
            dropped: 20,
        };
        assert!(
            flaky.percent_under(&good) < 50,
            "{}",
            flaky.percent_under(&good)
        );
        // Sums and differences.
        assert_eq!(bad.plus(good).minus(good), bad);
        assert_eq!(fresh.minus(bad), fresh);
    }

    fn tally(states: &[OrderState]) -> Tally {
        let mut t = Tally::default();
        for s in states {
            t.add(*s);
        }
        t
    }

    #[test]
    fn picks_follow_the_weights() {
        assert_eq!(pick_weighted(&[], 7), None);
        assert_eq!(pick_weighted(&[90], 12345), Some(0));
        // Rolls 0..90 land on the first, 90..135 on the second.
        let picks: Vec<_> = (0..135)
            .filter_map(|r| pick_weighted(&[90, 45], r))
            .collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 90);
        assert_eq!(picks.iter().filter(|i| **i == 1).count(), 45);
        // A node rated 0 is still tried now and then.
        assert_eq!(pick_weighted(&[0, 0], 1), Some(1));
    }

    #[test]
    fn a_new_node_starts_at_ninety() {
        assert_eq!(Tally::default().percent(), 90);
    }

    #[test]
    fn dropped_sessions_pull_the_rating_down_and_kept_ones_up() {
        let lost = OrderState::Finished(EndReason::NodeLost);
        let done = OrderState::Finished(EndReason::CpuDone);
        let bad = tally(&[lost; 10]);
        assert_eq!(
            bad,
            Tally {
                kept: 0,
                dropped: 10
            }
        );
        assert_eq!(bad.percent(), 45);
        let good = tally(&[done; 90]);
        assert_eq!(good.percent(), 99);
        assert!(tally(&[lost]).percent() < Tally::default().percent());
    }

    #[test]
    fn ends_that_say_nothing_about_the_node_are_not_counted() {
        let t = tally(&[
            OrderState::Reserved,
            OrderState::Connected,
            OrderState::Cancelled(EndReason::NeverConnected),
            OrderState::Cancelled(EndReason::Cancelled),
        ]);
        assert_eq!(t, Tally::default());
        // A client closing early is cancelled (refunded) but the node kept it.
        let early = tally(&[OrderState::Cancelled(EndReason::ClientClosed)]);
        assert_eq!(early.kept, 1);
    }

    #[test]
    fn clients_that_keep_breaking_limits_are_rated_down() {
        let mut t = ClientTally::default();
        assert_eq!(t.percent(), 90, "a new client");
        t.add_end(EndReason::ProcessLimit);
        assert_eq!(t.percent(), 81, "one runaway session");
        for r in [EndReason::MemoryLimit, EndReason::DiskLimit] {
            t.add_end(r);
        }
        for _ in 0..6 {
            t.add_end(EndReason::ProcessLimit);
        }
        assert_eq!(t.broke_limits, 9);
        assert_eq!(t.percent(), 47, "nine of nine sessions broke limits");
        for r in [
            EndReason::ClientClosed,
            EndReason::WallClock,
            EndReason::CpuDone,
        ] {
            t.add_end(r);
        }
        assert_eq!(t.clean, 3);
        assert_eq!(t.percent(), 54, "clean sessions pull it back up");
    }

    #[test]
    fn ends_that_say_nothing_about_the_client_are_not_counted() {
        let mut t = ClientTally::default();
        for r in [
            EndReason::NeverConnected,
            EndReason::Cancelled,
            EndReason::NodeLost,
            EndReason::NodeFailed,
            EndReason::NodeShutdown,
        ] {
            t.add_end(r);
            assert_eq!(broke_limits(r), None);
        }
        assert_eq!(t, ClientTally::default());
    }

    #[test]
    fn limits_broken_by_the_client_are_not_the_nodes_fault() {
        let t = tally(&[
            OrderState::Finished(EndReason::MemoryLimit),
            OrderState::Finished(EndReason::ProcessLimit),
            OrderState::Finished(EndReason::DiskLimit),
            OrderState::Finished(EndReason::WallClock),
        ]);
        assert_eq!(
            t,
            Tally {
                kept: 4,
                dropped: 0
            }
        );
    }
}
