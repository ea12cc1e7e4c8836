//! The life of an order on the broker and what its end means for money, as a
//! state machine: reserved (charged, held in escrow) → connected → finished or
//! cancelled. "Connected" means logged in: a client connection counts only once
//! its SSH user authenticated (the node reports it, the relay ties the report to
//! one of the order port's TCP connections), so a stranger's TCP connections
//! to the port change nothing here. Time is passed in as Unix milliseconds so that the state can be
//! stored and resumed after a restart; nothing here reads a clock.

use serde::{Deserialize, Serialize};

use crate::wire::EndReason;

/// One CPU-hour in microseconds: what an order buys.
pub const CPU_HOUR_US: u64 = 3_600_000_000;

/// An order that ends within this long of its first login is cancelled
/// and refunded in full.
pub const CANCEL_WINDOW_MS: u64 = 20_000;

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
    /// Ended with a full refund (never connected, or closed within 20 s).
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

/// One order's money-relevant history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub pricing: Pricing,
    pub state: OrderState,
    pub reserved_ms: u64,
    pub first_connect_ms: Option<u64>,
    pub last_disconnect_ms: Option<u64>,
    /// Logged-in client connections open now.
    pub open: u32,
    /// CPU time proven by verified receipts, capped at one CPU-hour.
    pub proven_cpu_us: u64,
    pub settlement: Option<Settlement>,
}

/// Who caused an end, which decides the refund.
fn refunds_unproven(reason: EndReason) -> bool {
    match reason {
        // The node or the broker failed the client: the unused part goes back.
        EndReason::NodeLost
        | EndReason::NodeShutdown
        | EndReason::NodeFailed
        | EndReason::Cancelled => true,
        // The client used what it bought, left, or broke a limit.
        EndReason::ClientClosed
        | EndReason::NeverConnected
        | EndReason::WallClock
        | EndReason::CpuDone
        | EndReason::MemoryLimit
        | EndReason::ProcessLimit
        | EndReason::DiskLimit => false,
    }
}

/// Splits `price` for `proven` CPU microseconds.
pub fn split(pricing: Pricing, proven_us: u64, refund_unproven: bool) -> Settlement {
    let price = pricing.price_sat;
    let proven = u128::from(proven_us.min(CPU_HOUR_US));
    // u128: price × proven fits easily; the quotients are ≤ price, so they fit u64.
    let used = u64::try_from(u128::from(price) * proven / u128::from(CPU_HOUR_US)).unwrap_or(price);
    let share = u128::from(pricing.owner_share_ppm.min(1_000_000));
    let owner = u64::try_from(u128::from(used) * share / 1_000_000).unwrap_or(used);
    let refund = if refund_unproven { price - used } else { 0 };
    Settlement {
        refund,
        owner,
        operator: price - refund - owner,
    }
}

impl Order {
    pub fn new(now_ms: u64, pricing: Pricing) -> Self {
        Self {
            pricing,
            state: OrderState::Reserved,
            reserved_ms: now_ms,
            first_connect_ms: None,
            last_disconnect_ms: None,
            open: 0,
            proven_cpu_us: 0,
            settlement: None,
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

    /// A verified receipt counted `cpu_us` so far.
    pub fn handle_receipt(&mut self, cpu_us: u64) {
        if !self.state.is_final() {
            self.proven_cpu_us = self.proven_cpu_us.max(cpu_us.min(CPU_HOUR_US));
        }
    }

    /// Cancels an order nobody logged in to within `connect_window_ms`.
    pub fn handle_tick(&mut self, now_ms: u64, connect_window_ms: u64) -> Option<Settlement> {
        let expired = now_ms.saturating_sub(self.reserved_ms) >= connect_window_ms;
        if self.state == OrderState::Reserved && expired {
            return self.handle_end(now_ms, EndReason::NeverConnected);
        }
        None
    }

    /// The session ended for `reason`; returns how to pay out the escrow, once.
    pub fn handle_end(&mut self, now_ms: u64, reason: EndReason) -> Option<Settlement> {
        let quick_close = |first: u64| {
            let closed = self
                .last_disconnect_ms
                .filter(|_| self.open == 0)
                .unwrap_or(now_ms);
            reason == EndReason::ClientClosed && closed.saturating_sub(first) < CANCEL_WINDOW_MS
        };
        let (state, settlement) = match (self.state, self.first_connect_ms) {
            (OrderState::Finished(_) | OrderState::Cancelled(_), _) => return None,
            (OrderState::Reserved, _) | (_, None) => {
                (OrderState::Cancelled(reason), self.full_refund())
            }
            (OrderState::Connected, Some(first)) if quick_close(first) => {
                (OrderState::Cancelled(reason), self.full_refund())
            }
            (OrderState::Connected, Some(_)) => (
                OrderState::Finished(reason),
                split(self.pricing, self.proven_cpu_us, refunds_unproven(reason)),
            ),
        };
        self.state = state;
        self.open = 0;
        self.settlement = Some(settlement);
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
    use proptest::prelude::*;

    const P: Pricing = Pricing {
        price_sat: 36_000,
        owner_share_ppm: 800_000,
    };

    #[test]
    fn never_connected_is_refunded() {
        let mut o = Order::new(0, P);
        assert_eq!(o.handle_tick(119_999, 120_000), None);
        let s = o.handle_tick(120_000, 120_000);
        assert_eq!(
            s,
            Some(Settlement {
                refund: 36_000,
                owner: 0,
                operator: 0
            })
        );
        assert_eq!(o.state, OrderState::Cancelled(EndReason::NeverConnected));
        assert_eq!(
            o.handle_end(130_000, EndReason::NodeLost),
            None,
            "settles once"
        );
    }

    #[test]
    fn a_session_that_never_saw_a_login_is_refunded_whatever_its_end() {
        // TCP connections that never authenticate reach no order: the node
        // may still report any reason, the client gets all back.
        for reason in [EndReason::ClientClosed, EndReason::NeverConnected] {
            let mut o = Order::new(0, P);
            let s = o.handle_end(30_000, reason).unwrap_or_default();
            assert_eq!(s.refund, 36_000, "{reason:?}");
            assert_eq!(o.state, OrderState::Cancelled(reason));
        }
    }

    #[test]
    fn closing_within_20_s_is_refunded() {
        let mut o = Order::new(0, P);
        assert!(o.handle_connect(1_000));
        o.handle_receipt(5_000_000);
        o.handle_disconnect(20_999);
        let s = o.handle_end(25_999, EndReason::ClientClosed);
        assert_eq!(s.map(|s| s.refund), Some(36_000));
        assert!(matches!(
            o.state,
            OrderState::Cancelled(EndReason::ClientClosed)
        ));
    }

    #[test]
    fn a_normal_finish_pays_the_owner_pro_rata() {
        let mut o = Order::new(0, P);
        o.handle_connect(1_000);
        o.handle_receipt(CPU_HOUR_US / 4);
        o.handle_disconnect(600_000);
        let s = o.handle_end(605_000, EndReason::ClientClosed);
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
    fn node_faults_refund_the_unproven_rest_and_limits_refund_nothing() {
        for (reason, refund) in [
            (EndReason::NodeLost, 27_000),
            (EndReason::NodeShutdown, 27_000),
            (EndReason::NodeFailed, 27_000),
            (EndReason::MemoryLimit, 0),
            (EndReason::ProcessLimit, 0),
            (EndReason::DiskLimit, 0),
            (EndReason::CpuDone, 0),
            (EndReason::WallClock, 0),
        ] {
            let mut o = Order::new(0, P);
            o.handle_connect(1_000);
            o.handle_receipt(CPU_HOUR_US / 4);
            let s = o.handle_end(100_000, reason).unwrap_or_default();
            assert_eq!(s.refund, refund, "{reason:?}");
            assert_eq!(s.owner, 7_200, "{reason:?}");
            assert_eq!(s.refund + s.owner + s.operator, 36_000);
        }
    }

    #[test]
    fn proven_cpu_is_capped_at_one_hour_and_never_goes_down() {
        let mut o = Order::new(0, P);
        o.handle_connect(0);
        o.handle_receipt(2 * CPU_HOUR_US);
        o.handle_receipt(5);
        assert_eq!(o.proven_cpu_us, CPU_HOUR_US);
        let s = o
            .handle_end(4_000_000, EndReason::CpuDone)
            .unwrap_or_default();
        assert_eq!(
            s,
            Settlement {
                refund: 0,
                owner: 28_800,
                operator: 7_200
            }
        );
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
