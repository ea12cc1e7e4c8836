//! The life of an order on the broker and what its end means for money, as a
//! state machine: reserved (charged, held in escrow) → connected → finished or
//! cancelled. "Connected" means logged in: a client connection counts only once
//! its SSH user authenticated (the node reports it, the relay ties the report to
//! one of the order port's TCP connections), so a stranger's TCP connections
//! to the port change nothing here. Receipts prove CPU time only within what
//! the node's cores could have given since that first login
//! ([`crate::plausible`]); an end is settled by its [`Verdict`]
//! ([`crate::verdict`]). Time is passed in as Unix milliseconds so that the
//! state can be stored and resumed after a restart; nothing here reads a clock.

use serde::{Deserialize, Serialize};

use crate::receipt::Receipt;
use crate::terms::OrderTerms;
use crate::verdict::{self, Evidence, Final, Party, Payout, Verdict};
use crate::wire::EndReason;

pub use crate::verdict::CANCEL_WINDOW_MS;

/// One CPU-hour in microseconds: what an order buys.
pub const CPU_HOUR_US: u64 = 3_600_000_000;

/// What an order costs and how its price is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pricing {
    /// Price of one CPU-hour in satoshi.
    pub price_sat: u64,
    /// The node owner's share of what proven CPU time is worth, in parts per million.
    pub owner_share_ppm: u32,
}

/// How an order's escrowed price is paid out. `refund + owner + operator` is
/// always the price.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub refund: u64,
    pub owner: u64,
    pub operator: u64,
}

/// Where an order is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderState {
    /// Charged and held in escrow; no client login yet.
    Reserved,
    /// The client has logged in at least once.
    Connected,
    /// Ended and paid out by the rules of its reason.
    Finished(EndReason),
    /// Ended as cancelled: never connected (all back), or closed within 20 s
    /// (the proven CPU time paid, the rest back).
    Cancelled(EndReason),
}

impl OrderState {
    pub fn is_final(self) -> bool {
        matches!(self, OrderState::Finished(_) | OrderState::Cancelled(_))
    }

    /// `RESERVED`, `CONNECTED`, or the end reason's code.
    pub fn code(self) -> &'static str {
        match self {
            OrderState::Reserved => "RESERVED",
            OrderState::Connected => "CONNECTED",
            OrderState::Finished(r) | OrderState::Cancelled(r) => r.code(),
        }
    }
}

/// What a receipt's CPU time made of the plausible bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plausibility {
    Plausible,
    /// It claimed more than `bound_us`, all the node's cores could have
    /// given since the first login: the excess is not proven.
    Implausible {
        claimed_us: u64,
        bound_us: u64,
    },
}

fn one() -> u32 {
    1
}

/// One order's money-relevant history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub pricing: Pricing,
    /// What was sold; orders stored before terms existed had the defaults.
    #[serde(default)]
    pub terms: OrderTerms,
    /// The cores the node is believed to have (reported, held to its speed
    /// test): what bounds the CPU time its receipts can prove.
    #[serde(default = "one")]
    pub cores: u32,
    pub state: OrderState,
    pub reserved_ms: u64,
    pub first_connect_ms: Option<u64>,
    pub last_disconnect_ms: Option<u64>,
    /// Logged-in client connections open now.
    pub open: u32,
    /// CPU time proven by verified receipts within the plausible bound,
    /// capped at one CPU-hour.
    pub proven_cpu_us: u64,
    /// The most CPU time a receipt claimed.
    #[serde(default)]
    pub claimed_cpu_us: u64,
    /// Receipts that claimed more CPU time than was possible.
    #[serde(default)]
    pub implausible: u32,
    /// The final receipt's evidence, once it came.
    #[serde(default)]
    pub last: Option<Final>,
    pub settlement: Option<Settlement>,
    /// How the end was judged.
    #[serde(default)]
    pub verdict: Option<Verdict>,
}

/// Splits `price` for `proven` CPU microseconds.
pub fn split(pricing: Pricing, proven_us: u64, refund_unproven: bool) -> Settlement {
    let price = pricing.price_sat;
    let used = price_of(price, proven_us);
    let share = u128::from(pricing.owner_share_ppm.min(1_000_000));
    let owner = u64::try_from(u128::from(used) * share / 1_000_000).unwrap_or(used);
    let refund = if refund_unproven { price - used } else { 0 };
    Settlement {
        refund,
        owner,
        operator: price - refund - owner,
    }
}

/// What `proven_us` of CPU time costs at `price` the CPU-hour (at most the price).
pub fn price_of(price: u64, proven_us: u64) -> u64 {
    let proven = u128::from(proven_us.min(CPU_HOUR_US));
    // u128: price × proven fits easily; the quotient is ≤ price, so it fits u64.
    u64::try_from(u128::from(price) * proven / u128::from(CPU_HOUR_US)).unwrap_or(price)
}

impl Order {
    pub fn new(now_ms: u64, pricing: Pricing, terms: OrderTerms, cores: u32) -> Self {
        Self {
            pricing,
            terms,
            cores: cores.max(1),
            state: OrderState::Reserved,
            reserved_ms: now_ms,
            first_connect_ms: None,
            last_disconnect_ms: None,
            open: 0,
            proven_cpu_us: 0,
            claimed_cpu_us: 0,
            implausible: 0,
            last: None,
            settlement: None,
            verdict: None,
        }
    }

    /// A client connection logged in; false if the order is over.
    pub fn handle_connect(&mut self, now_ms: u64) -> bool {
        match self.state {
            OrderState::Reserved => {
                self.state = OrderState::Connected;
                self.first_connect_ms = Some(now_ms);
            }
            OrderState::Connected => {}
            OrderState::Finished(_) | OrderState::Cancelled(_) => return false,
        }
        self.open = self.open.saturating_add(1);
        true
    }

    /// A logged-in client connection closed.
    pub fn handle_disconnect(&mut self, now_ms: u64) {
        if self.state == OrderState::Connected {
            self.open = self.open.saturating_sub(1);
            self.last_disconnect_ms = Some(now_ms);
        }
    }

    /// The most CPU time the node can have given by `now_ms`.
    pub fn cpu_bound_us(&self, now_ms: u64) -> u64 {
        let elapsed = self
            .first_connect_ms
            .map_or(0, |first| now_ms.saturating_sub(first));
        crate::plausible::cpu_bound_us(self.cores, elapsed)
    }

    /// A verified receipt arrived at `now_ms`: its CPU time counts as far as
    /// it was possible; a final receipt's evidence is kept for the end.
    pub fn handle_receipt(&mut self, now_ms: u64, r: &Receipt) -> Plausibility {
        if self.state.is_final() {
            return Plausibility::Plausible;
        }
        let bound = self.cpu_bound_us(now_ms);
        self.claimed_cpu_us = self.claimed_cpu_us.max(r.cpu_us);
        self.proven_cpu_us = self.proven_cpu_us.max(r.cpu_us.min(bound).min(CPU_HOUR_US));
        if r.finish.is_some() {
            self.last = Some(Final {
                reason: r.finish,
                peak_mem: r.peak_mem,
                peak_procs: r.peak_procs,
                peak_disk: r.peak_disk,
            });
        }
        if r.cpu_us > bound {
            self.implausible = self.implausible.saturating_add(1);
            return Plausibility::Implausible {
                claimed_us: r.cpu_us,
                bound_us: bound,
            };
        }
        Plausibility::Plausible
    }

    /// When the broker's own timers end the order if nothing else does: the
    /// connect window (and a little slack for the node to say so first)
    /// before a login, the wall limit (and more slack) after one.
    pub fn deadline_ms(&self) -> Option<u64> {
        match (self.state, self.first_connect_ms) {
            (OrderState::Reserved, _) => Some(
                self.reserved_ms
                    .saturating_add(self.terms.connect_window_ms())
                    .saturating_add(verdict::CONNECT_SLACK_MS),
            ),
            (OrderState::Connected, Some(first)) => {
                let wall = self.wall_deadline_ms(first);
                Some(self.grace_deadline_ms().map_or(wall, |g| g.min(wall)))
            }
            _ => None,
        }
    }

    fn wall_deadline_ms(&self, first: u64) -> u64 {
        first
            .saturating_add(self.terms.wall_ms())
            .saturating_add(verdict::WALL_OVERRUN_MS)
    }

    /// When the broker ends a session whose client left and whose node did
    /// not end it after the grace time: `None` while a logged-in connection
    /// is open.
    fn grace_deadline_ms(&self) -> Option<u64> {
        let left = self.last_disconnect_ms.filter(|_| self.open == 0)?;
        Some(
            left.saturating_add(self.terms.grace_ms())
                .saturating_add(verdict::GRACE_OVERRUN_MS),
        )
    }

    /// The broker's timers: an order nobody logged in to within its connect
    /// window is cancelled with a full refund, a session past its wall
    /// limit is ended as `WALL`, and one whose client left more than the
    /// grace time ago as `CLIENT_CLOSED`, whatever the node says or does not
    /// say.
    pub fn handle_tick(&mut self, now_ms: u64) -> Option<Settlement> {
        if self.deadline_ms().is_none_or(|d| now_ms < d) {
            return None;
        }
        let wall_passed = self
            .first_connect_ms
            .is_some_and(|first| now_ms >= self.wall_deadline_ms(first));
        let reason = match self.state {
            OrderState::Reserved => EndReason::NeverConnected,
            _ if wall_passed => EndReason::WallClock,
            _ => EndReason::ClientClosed,
        };
        self.handle_end(now_ms, reason, Party::Broker)
    }

    /// The session ended for `reason`, as `by` says; returns how to pay out
    /// the escrow, once.
    pub fn handle_end(&mut self, now_ms: u64, reason: EndReason, by: Party) -> Option<Settlement> {
        if self.state.is_final() {
            return None;
        }
        let evidence = Evidence {
            now_ms,
            first_login_ms: self.first_connect_ms,
            closed_ms: self.last_disconnect_ms.filter(|_| self.open == 0),
            open: self.open,
            proven_cpu_us: self.proven_cpu_us,
            implausible: self.implausible,
            last: self.last,
        };
        let v = verdict::judge(&self.terms, reason, by, &evidence);
        let settlement = match v.payout {
            Payout::Refund => self.full_refund(),
            Payout::Proven => split(self.pricing, self.proven_cpu_us, true),
            Payout::Price => split(self.pricing, self.proven_cpu_us, false),
        };
        self.state = if v.cancelled() {
            OrderState::Cancelled(reason)
        } else {
            OrderState::Finished(reason)
        };
        self.open = 0;
        self.settlement = Some(settlement);
        self.verdict = Some(v);
        Some(settlement)
    }

    fn full_refund(&self) -> Settlement {
        Settlement {
            refund: self.pricing.price_sat,
            owner: 0,
            operator: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PeerId;
    use crate::wire::OrderId;
    use proptest::prelude::*;

    const P: Pricing = Pricing {
        price_sat: 36_000,
        owner_share_ppm: 800_000,
    };

    fn order() -> Order {
        Order::new(0, P, OrderTerms::default(), 4)
    }

    fn receipt(cpu_us: u64, finish: Option<EndReason>) -> Receipt {
        Receipt {
            order_id: OrderId([1; 12]),
            node_id: PeerId([2; 32]),
            seq: 0,
            prev: [0; 32],
            cpu_us,
            peak_mem: 0,
            peak_procs: 0,
            peak_disk: 0,
            wall_ms: 0,
            finish,
        }
    }

    #[test]
    fn never_connected_is_refunded_by_the_brokers_own_timer() {
        let mut o = order();
        assert_eq!(o.deadline_ms(), Some(122_000));
        assert_eq!(o.handle_tick(121_999), None);
        let s = o.handle_tick(122_000);
        assert_eq!(
            s,
            Some(Settlement {
                refund: 36_000,
                owner: 0,
                operator: 0
            })
        );
        assert_eq!(o.state, OrderState::Cancelled(EndReason::NeverConnected));
        assert_eq!(o.verdict.map(|v| v.by), Some(Party::Broker));
        assert_eq!(
            o.handle_end(130_000, EndReason::NodeLost, Party::Broker),
            None,
            "settles once"
        );
        assert_eq!(o.deadline_ms(), None);
    }

    #[test]
    fn a_session_past_its_wall_limit_is_ended_by_the_broker() {
        let mut o = order();
        o.handle_connect(1_000);
        o.handle_receipt(600_000, &receipt(CPU_HOUR_US / 4, None));
        let deadline = 1_000 + 3 * 3_600_000 + verdict::WALL_OVERRUN_MS;
        assert_eq!(o.deadline_ms(), Some(deadline));
        assert_eq!(o.handle_tick(deadline - 1), None);
        let s = o.handle_tick(deadline).unwrap_or_default();
        // The client had all its time; the owner is paid what is proven.
        assert_eq!((s.refund, s.owner), (0, 7_200));
        assert_eq!(o.state, OrderState::Finished(EndReason::WallClock));
        assert!(o.verdict.is_some_and(|v| v.against_node()));
    }

    #[test]
    fn a_session_that_never_saw_a_login_is_refunded_whatever_its_end() {
        // TCP connections that never authenticate reach no order: the node
        // may still report any reason, the client gets all back.
        for reason in [EndReason::ClientClosed, EndReason::NeverConnected] {
            let mut o = order();
            let s = o
                .handle_end(30_000, reason, Party::Node)
                .unwrap_or_default();
            assert_eq!(s.refund, 36_000, "{reason:?}");
            assert_eq!(o.state, OrderState::Cancelled(reason));
        }
    }

    #[test]
    fn closing_within_20_s_pays_only_the_proven_cpu() {
        let mut o = order();
        assert!(o.handle_connect(1_000));
        // 4 cores busy for 15 s: 60 CPU-seconds, a sixtieth of the hour.
        o.handle_receipt(16_000, &receipt(60_000_000, None));
        o.handle_disconnect(16_000);
        o.handle_receipt(17_500, &receipt(60_000_000, Some(EndReason::ClientClosed)));
        let s = o.handle_end(18_000, EndReason::ClientClosed, Party::Node);
        assert_eq!(
            s,
            Some(Settlement {
                refund: 35_400,
                owner: 480,
                operator: 120
            })
        );
        assert_eq!(o.state, OrderState::Cancelled(EndReason::ClientClosed));
        assert!(o.verdict.is_some_and(|v| v.quick_close));
    }

    #[test]
    fn a_normal_finish_pays_the_owner_pro_rata() {
        let mut o = order();
        o.handle_connect(1_000);
        o.handle_receipt(600_000, &receipt(CPU_HOUR_US / 4, None));
        o.handle_disconnect(600_000);
        let s = o.handle_end(605_000, EndReason::ClientClosed, Party::Node);
        // A quarter of 36 000 is 9 000; 80 % of it is the owner's.
        assert_eq!(
            s,
            Some(Settlement {
                refund: 0,
                owner: 7_200,
                operator: 28_800
            })
        );
    }

    #[test]
    fn receipts_prove_no_more_than_the_cores_could_give() {
        let mut o = order();
        o.handle_connect(1_000);
        // 4 cores for 10 s: at most 4 × (10.5 + 1) = 46 CPU-seconds.
        let bound = o.cpu_bound_us(11_000);
        assert_eq!(bound, 46_000_000);
        assert_eq!(
            o.handle_receipt(11_000, &receipt(100_000_000, None)),
            Plausibility::Implausible {
                claimed_us: 100_000_000,
                bound_us: bound
            }
        );
        assert_eq!(o.proven_cpu_us, bound);
        assert_eq!(o.claimed_cpu_us, 100_000_000);
        assert_eq!(o.implausible, 1);
        // Time makes the same claim possible later.
        assert_eq!(
            o.handle_receipt(30_000, &receipt(100_000_000, None)),
            Plausibility::Plausible
        );
        assert_eq!(o.proven_cpu_us, 100_000_000);
        o.handle_disconnect(100_000);
        o.handle_end(105_000, EndReason::ClientClosed, Party::Node);
        assert!(o.verdict.is_some_and(|v| v.upheld && v.against_node()));
    }

    #[test]
    fn node_faults_refund_the_unproven_rest() {
        for (reason, refund) in [
            (EndReason::NodeLost, 27_000),
            (EndReason::NodeShutdown, 27_000),
            (EndReason::NodeFailed, 27_000),
            // Claims without evidence are the node's fault too.
            (EndReason::MemoryLimit, 27_000),
            (EndReason::ProcessLimit, 27_000),
            (EndReason::DiskLimit, 27_000),
            (EndReason::CpuDone, 27_000),
            (EndReason::WallClock, 27_000),
        ] {
            let mut o = order();
            o.handle_connect(1_000);
            o.handle_receipt(1_000_000, &receipt(CPU_HOUR_US / 4, None));
            let s = o
                .handle_end(1_000_000, reason, Party::Node)
                .unwrap_or_default();
            assert_eq!(s.refund, refund, "{reason:?}");
            assert_eq!(s.owner, 7_200, "{reason:?}");
            assert_eq!(s.refund + s.owner + s.operator, 36_000);
            assert!(o.verdict.is_some_and(|v| v.against_node()), "{reason:?}");
        }
    }

    #[test]
    fn proven_limits_and_done_refund_nothing() {
        let mut o = order();
        o.handle_connect(0);
        let mut fin = receipt(2 * CPU_HOUR_US, Some(EndReason::CpuDone));
        o.handle_receipt(4_000_000, &receipt(5, None));
        o.handle_receipt(4_000_000, &fin);
        assert_eq!(o.proven_cpu_us, CPU_HOUR_US, "capped at one hour");
        let s = o
            .handle_end(4_000_000, EndReason::CpuDone, Party::Node)
            .unwrap_or_default();
        assert_eq!(
            s,
            Settlement {
                refund: 0,
                owner: 28_800,
                operator: 7_200
            }
        );
        let mut o = order();
        o.handle_connect(0);
        fin.cpu_us = 1_000_000;
        fin.finish = Some(EndReason::MemoryLimit);
        fin.peak_mem = 2047 << 20;
        o.handle_receipt(60_000, &fin);
        let s = o
            .handle_end(60_000, EndReason::MemoryLimit, Party::Node)
            .unwrap_or_default();
        assert_eq!(s.refund, 0);
        assert_eq!(o.verdict.and_then(|v| v.client_broke_limits()), Some(true));
    }

    proptest! {
        #[test]
        fn settlements_always_add_up(
            price in 0u64..=u64::MAX / 2,
            share in 0u32..=1_200_000,
            proven in any::<u64>(),
            refund in any::<bool>(),
        ) {
            let s = split(Pricing { price_sat: price, owner_share_ppm: share }, proven, refund);
            prop_assert_eq!(s.refund.checked_add(s.owner).and_then(|x| x.checked_add(s.operator)), Some(price));
        }
    }
}
