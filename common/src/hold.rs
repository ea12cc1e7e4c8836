//! An owner's earnings from one order, held after settlement so that the
//! client can dispute them, and how a dispute is resolved.
//!
//! When an order settles, the owner's part goes from the order's escrow to
//! [`Account::Held`] for the hold period. Then, one of:
//!
//! * nobody disputes it: at the end of the hold it is released to the
//!   owner's account ([`Movement::Release`]), where it can be withdrawn;
//! * the client disputes it within the hold, with a reason: it moves to
//!   [`Account::Disputed`] ([`Movement::Dispute`]) and stays there, past the
//!   hold's end, until the operator decides:
//!   * a refund of some or all of it to the client
//!     ([`Movement::DisputeRefund`]), the rest released to the owner;
//!   * a rejection: all of it released to the owner at once.
//!
//! Every step is a journal entry, so the books balance at every point. The
//! operator's fee is not held: a dispute can take back at most what the
//! owner earned.

use serde::{Deserialize, Serialize};

use crate::ledger::{Account, AccountId, Entry, Movement};
use crate::wire::OrderId;

/// The hold period unless the broker is configured otherwise: a day.
pub const DEFAULT_HOLD_MS: u64 = 24 * 60 * 60 * 1000;

/// The longest reason a client may give, in characters.
pub const MAX_REASON_CHARS: usize = 1000;

/// Where held earnings stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    /// Held until the hold ends; the client may dispute.
    Held,
    /// Disputed by the client; the operator decides.
    Disputed,
    /// Released to the owner, in full or after a partial refund.
    Released,
    /// Refunded to the client in full.
    Refunded,
}

/// A client's dispute and the operator's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispute {
    /// The client's words.
    pub reason: String,
    pub opened_ms: u64,
    /// When the operator decided; `None` while open.
    pub resolved_ms: Option<u64>,
    /// What the operator refunded to the client.
    pub refunded_sat: u64,
    /// Whether the operator rejected it (nothing refunded).
    pub rejected: bool,
}

/// An owner's earnings from one order while they are held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub owner: AccountId,
    /// What the owner earned from the order.
    pub amount_sat: u64,
    /// When the hold ends, unless a dispute keeps it.
    pub until_ms: u64,
    pub state: HoldState,
    pub dispute: Option<Dispute>,
    /// When the earnings (or what was left of them) reached the owner.
    pub released_ms: Option<u64>,
}

/// The operator's decision on a dispute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Refund this much to the client; the rest goes to the owner.
    Refund(u64),
    /// Release it all to the owner.
    Reject,
}

/// A dispute or decision that cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error("the hold ended; the owner's earnings from this order are final")]
    HoldOver,
    #[error("this order is disputed already")]
    AlreadyDisputed,
    #[error(
        "a dispute needs a reason of 1 to {MAX_REASON_CHARS} characters, without control characters"
    )]
    BadReason,
    #[error("this order has no open dispute")]
    NotDisputed,
    #[error("a refund of {asked} sat is more than the {held} sat held")]
    TooMuch { asked: u64, held: u64 },
}

/// The reason as stored: trimmed, checked for length and control characters
/// (line breaks and tabs are allowed).
pub fn check_reason(reason: &str) -> Result<String, HoldError> {
    let reason = reason.trim();
    let chars = reason.chars().count();
    let clean = reason
        .chars()
        .all(|c| !c.is_control() || c == '\n' || c == '\t');
    if chars == 0 || chars > MAX_REASON_CHARS || !clean {
        return Err(HoldError::BadReason);
    }
    Ok(reason.to_owned())
}

fn entry(from: Account, to: Account, amount: u64, order: OrderId, movement: Movement) -> Entry {
    Entry {
        from,
        to,
        amount,
        order: Some(order),
        movement,
    }
}

impl Hold {
    /// Earnings of `amount_sat` settled at `now_ms`, held for `hold_ms`.
    pub fn new(owner: AccountId, amount_sat: u64, now_ms: u64, hold_ms: u64) -> Self {
        Self {
            owner,
            amount_sat,
            until_ms: now_ms.saturating_add(hold_ms),
            state: HoldState::Held,
            dispute: None,
            released_ms: None,
        }
    }

    /// Whether the client may still dispute at `now_ms`.
    pub fn disputable(&self, now_ms: u64) -> bool {
        self.state == HoldState::Held && now_ms < self.until_ms
    }

    /// Whether the earnings are due to the owner at `now_ms`.
    pub fn due(&self, now_ms: u64) -> bool {
        self.state == HoldState::Held && now_ms >= self.until_ms
    }

    /// What sits in [`Account::Held`] and [`Account::Disputed`] for this
    /// order while the hold stands.
    pub fn held(&self) -> (u64, u64) {
        match self.state {
            HoldState::Held => (self.amount_sat, 0),
            HoldState::Disputed => (0, self.amount_sat),
            HoldState::Released | HoldState::Refunded => (0, 0),
        }
    }

    /// The client disputes the earnings at `now_ms`: the entry that moves
    /// them out of reach of the hold's end.
    pub fn dispute(
        &mut self,
        order: OrderId,
        now_ms: u64,
        reason: &str,
    ) -> Result<Vec<Entry>, HoldError> {
        match self.state {
            HoldState::Held if now_ms < self.until_ms => {}
            HoldState::Held | HoldState::Released | HoldState::Refunded => {
                return Err(if self.dispute.is_some() {
                    HoldError::AlreadyDisputed
                } else {
                    HoldError::HoldOver
                });
            }
            HoldState::Disputed => return Err(HoldError::AlreadyDisputed),
        }
        let reason = check_reason(reason)?;
        self.state = HoldState::Disputed;
        self.dispute = Some(Dispute {
            reason,
            opened_ms: now_ms,
            resolved_ms: None,
            refunded_sat: 0,
            rejected: false,
        });
        Ok(vec![entry(
            Account::Held(order),
            Account::Disputed(order),
            self.amount_sat,
            order,
            Movement::Dispute,
        )])
    }

    /// Releases undisputed earnings whose hold has ended; `None` while they
    /// are not due.
    pub fn release(&mut self, order: OrderId, now_ms: u64) -> Option<Vec<Entry>> {
        if !self.due(now_ms) {
            return None;
        }
        self.state = HoldState::Released;
        self.released_ms = Some(now_ms);
        Some(vec![entry(
            Account::Held(order),
            Account::Owner(self.owner),
            self.amount_sat,
            order,
            Movement::Release,
        )])
    }

    /// The operator decides an open dispute at `now_ms`; `client` is the
    /// order's client.
    pub fn resolve(
        &mut self,
        order: OrderId,
        client: AccountId,
        now_ms: u64,
        resolution: Resolution,
    ) -> Result<Vec<Entry>, HoldError> {
        let Some(dispute) = self
            .dispute
            .as_mut()
            .filter(|_| self.state == HoldState::Disputed)
        else {
            return Err(HoldError::NotDisputed);
        };
        let refund = match resolution {
            Resolution::Refund(asked) if asked > self.amount_sat => {
                return Err(HoldError::TooMuch {
                    asked,
                    held: self.amount_sat,
                });
            }
            Resolution::Refund(asked) => asked,
            Resolution::Reject => 0,
        };
        let rest = self.amount_sat - refund;
        dispute.resolved_ms = Some(now_ms);
        dispute.refunded_sat = refund;
        dispute.rejected = resolution == Resolution::Reject;
        let from = Account::Disputed(order);
        let mut entries = Vec::new();
        if refund > 0 {
            entries.push(entry(
                from,
                Account::Client(client),
                refund,
                order,
                Movement::DisputeRefund,
            ));
        }
        if rest > 0 {
            entries.push(entry(
                from,
                Account::Owner(self.owner),
                rest,
                order,
                Movement::Release,
            ));
            self.released_ms = Some(now_ms);
        }
        self.state = if rest == 0 && refund > 0 {
            HoldState::Refunded
        } else {
            HoldState::Released
        };
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Books, deposit};

    const ORDER: OrderId = OrderId([7; 12]);
    const OWNER: AccountId = AccountId([2; 32]);
    const CLIENT: AccountId = AccountId([1; 32]);

    /// Books where the order's earnings of 700 sit in its hold.
    fn books() -> Books {
        let mut b = Books::default();
        b.apply(&[deposit(Account::Held(ORDER), 700)]).unwrap();
        b
    }

    #[test]
    fn undisputed_earnings_reach_the_owner_when_the_hold_ends() {
        let mut b = books();
        let mut h = Hold::new(OWNER, 700, 1_000, 10_000);
        assert!(h.disputable(10_999));
        assert_eq!(h.release(ORDER, 10_999), None);
        let entries = h.release(ORDER, 11_000).unwrap();
        b.apply(&entries).unwrap();
        assert_eq!(b.balance(&Account::Owner(OWNER)), 700);
        assert_eq!(b.balance(&Account::Held(ORDER)), 0);
        assert_eq!(h.state, HoldState::Released);
        assert_eq!(h.release(ORDER, 20_000), None, "released twice");
        assert_eq!(h.dispute(ORDER, 11_000, "late"), Err(HoldError::HoldOver));
        b.check().unwrap();
    }

    #[test]
    fn a_dispute_keeps_the_earnings_past_the_hold_until_the_operator_decides() {
        let mut b = books();
        let mut h = Hold::new(OWNER, 700, 0, 10_000);
        assert_eq!(h.dispute(ORDER, 5, "  "), Err(HoldError::BadReason));
        assert_eq!(h.dispute(ORDER, 5, "a\u{0}b"), Err(HoldError::BadReason));
        let long = "x".repeat(MAX_REASON_CHARS + 1);
        assert_eq!(h.dispute(ORDER, 5, &long), Err(HoldError::BadReason));
        b.apply(&h.dispute(ORDER, 5, " never got a shell\n ").unwrap())
            .unwrap();
        assert_eq!(h.dispute.as_ref().unwrap().reason, "never got a shell");
        assert_eq!(
            h.dispute(ORDER, 6, "again"),
            Err(HoldError::AlreadyDisputed)
        );
        assert_eq!(h.release(ORDER, 50_000), None, "released while disputed");
        assert_eq!(b.balance(&Account::Disputed(ORDER)), 700);
        assert_eq!(
            h.resolve(ORDER, CLIENT, 60_000, Resolution::Refund(701)),
            Err(HoldError::TooMuch {
                asked: 701,
                held: 700
            })
        );
        b.apply(
            &h.resolve(ORDER, CLIENT, 60_000, Resolution::Refund(300))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(b.balance(&Account::Client(CLIENT)), 300);
        assert_eq!(b.balance(&Account::Owner(OWNER)), 400);
        assert_eq!(b.balance(&Account::Disputed(ORDER)), 0);
        assert_eq!(h.state, HoldState::Released);
        assert_eq!(
            h.resolve(ORDER, CLIENT, 60_001, Resolution::Reject),
            Err(HoldError::NotDisputed)
        );
        assert_eq!(
            h.dispute(ORDER, 60_002, "again"),
            Err(HoldError::AlreadyDisputed)
        );
        b.check().unwrap();
    }

    #[test]
    fn a_full_refund_and_a_rejection() {
        let mut b = books();
        let mut h = Hold::new(OWNER, 700, 0, 10_000);
        b.apply(&h.dispute(ORDER, 1, "broken").unwrap()).unwrap();
        b.apply(
            &h.resolve(ORDER, CLIENT, 2, Resolution::Refund(700))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(h.state, HoldState::Refunded);
        assert_eq!(b.balance(&Account::Client(CLIENT)), 700);
        assert_eq!(h.released_ms, None);

        let mut b = books();
        let mut h = Hold::new(OWNER, 700, 0, 10_000);
        b.apply(&h.dispute(ORDER, 1, "broken").unwrap()).unwrap();
        b.apply(&h.resolve(ORDER, CLIENT, 2, Resolution::Reject).unwrap())
            .unwrap();
        assert_eq!(h.state, HoldState::Released);
        assert!(h.dispute.as_ref().unwrap().rejected);
        assert_eq!(b.balance(&Account::Owner(OWNER)), 700);
        b.check().unwrap();
    }
}
