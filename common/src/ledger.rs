//! Double-entry bookkeeping of satoshi: accounts, journal entries, balances
//! with checked arithmetic, and the invariant that money is neither made nor
//! lost. The broker persists entries and balances together; this module decides
//! what they are and checks them, without I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::order::Settlement;
use crate::wire::OrderId;

/// A client's or owner's account: the keyed digest of their secret hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccountId(pub [u8; 32]);

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AccountId({})",
            hex::encode(self.0.get(..4).unwrap_or_default())
        )
    }
}

impl std::str::FromStr for AccountId {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Self(out))
    }
}

/// Where money can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Account {
    Client(AccountId),
    Owner(AccountId),
    Operator,
    /// An order's price between charge and settlement.
    Escrow(OrderId),
    /// An owner's earnings from an order during its hold period
    /// ([`crate::hold`]).
    Held(OrderId),
    /// An owner's earnings from an order its client disputes, until the
    /// operator decides.
    Disputed(OrderId),
    /// Outside the system: deposits come from it, withdrawals go to it. It has
    /// no balance; the totals moved are counted instead.
    World,
}

impl Account {
    /// Key of the account's balance in storage; `None` for [`Account::World`].
    pub fn key(&self) -> Option<Vec<u8>> {
        let (tag, body): (u8, &[u8]) = match self {
            Account::Client(id) => (b'c', &id.0),
            Account::Owner(id) => (b'o', &id.0),
            Account::Operator => (b'p', &[]),
            Account::Escrow(order) => (b'e', &order.0),
            Account::Held(order) => (b'h', &order.0),
            Account::Disputed(order) => (b'd', &order.0),
            Account::World => return None,
        };
        let mut key = vec![tag];
        key.extend_from_slice(body);
        Some(key)
    }
}

/// Why money moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Movement {
    Deposit,
    Withdrawal,
    /// A client pays an order's price into escrow.
    Charge,
    /// Escrow goes back to the client.
    Refund,
    /// Escrow goes to the node's owner for proven CPU time: into the
    /// order's hold.
    Earning,
    /// Escrow goes to the operator.
    Fee,
    /// Held earnings go to the owner's account: the hold ended, or the
    /// operator decided a dispute.
    Release,
    /// The client disputes held earnings.
    Dispute,
    /// The operator refunds disputed earnings to the client.
    DisputeRefund,
}

/// One movement of money.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub from: Account,
    pub to: Account,
    pub amount: u64,
    pub order: Option<OrderId>,
    pub movement: Movement,
}

/// An entry that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient funds in {account:?}: has {balance}, needs {amount}")]
    Insufficient {
        account: Account,
        balance: u64,
        amount: u64,
    },
    #[error("balance of {0:?} would overflow")]
    Overflow(Account),
    #[error("books do not balance: accounts hold {held}, deposits minus withdrawals is {net}")]
    Unbalanced { held: u128, net: i128 },
}

/// The entries that charge an order's price.
pub fn charge(client: AccountId, order: OrderId, price: u64) -> Vec<Entry> {
    vec![Entry {
        from: Account::Client(client),
        to: Account::Escrow(order),
        amount: price,
        order: Some(order),
        movement: Movement::Charge,
    }]
}

/// The entries that pay out an order's escrow: the owner's part into the
/// order's hold ([`crate::hold`]); an order without an owner's account pays
/// the owner's part to the operator.
pub fn settle(
    order: OrderId,
    client: AccountId,
    owner: Option<AccountId>,
    s: Settlement,
) -> Vec<Entry> {
    let escrow = Account::Escrow(order);
    let (owner_account, owner_movement) = match owner {
        Some(_) => (Account::Held(order), Movement::Earning),
        None => (Account::Operator, Movement::Fee),
    };
    [
        (Account::Client(client), s.refund, Movement::Refund),
        (owner_account, s.owner, owner_movement),
        (Account::Operator, s.operator, Movement::Fee),
    ]
    .into_iter()
    .filter(|(_, amount, _)| *amount > 0)
    .map(|(to, amount, movement)| Entry {
        from: escrow,
        to,
        amount,
        order: Some(order),
        movement,
    })
    .collect()
}

/// The entry of a deposit.
pub fn deposit(to: Account, amount: u64) -> Entry {
    Entry {
        from: Account::World,
        to,
        amount,
        order: None,
        movement: Movement::Deposit,
    }
}

/// Balances and the totals that crossed the system's edge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Books {
    pub balances: BTreeMap<Account, u64>,
    pub deposits: u64,
    pub withdrawals: u64,
}

impl Books {
    pub fn balance(&self, account: &Account) -> u64 {
        self.balances.get(account).copied().unwrap_or(0)
    }

    /// Applies entries all or nothing.
    pub fn apply(&mut self, entries: &[Entry]) -> Result<(), LedgerError> {
        let mut next = self.clone();
        for e in entries {
            next.apply_one(e)?;
        }
        *self = next;
        Ok(())
    }

    fn apply_one(&mut self, e: &Entry) -> Result<(), LedgerError> {
        match e.from {
            Account::World => {
                self.deposits = self
                    .deposits
                    .checked_add(e.amount)
                    .ok_or(LedgerError::Overflow(e.from))?;
            }
            from => {
                let balance = self.balance(&from);
                let left = balance
                    .checked_sub(e.amount)
                    .ok_or(LedgerError::Insufficient {
                        account: from,
                        balance,
                        amount: e.amount,
                    })?;
                self.set(from, left);
            }
        }
        match e.to {
            Account::World => {
                self.withdrawals = self
                    .withdrawals
                    .checked_add(e.amount)
                    .ok_or(LedgerError::Overflow(e.to))?;
            }
            to => {
                let sum = self
                    .balance(&to)
                    .checked_add(e.amount)
                    .ok_or(LedgerError::Overflow(to))?;
                self.set(to, sum);
            }
        }
        Ok(())
    }

    fn set(&mut self, account: Account, amount: u64) {
        if amount == 0 {
            self.balances.remove(&account);
        } else {
            self.balances.insert(account, amount);
        }
    }

    /// Σ balances (escrow included) = Σ deposits − Σ withdrawals.
    pub fn check(&self) -> Result<(), LedgerError> {
        let held: u128 = self.balances.values().map(|&v| u128::from(v)).sum();
        let net = i128::from(self.deposits) - i128::from(self.withdrawals);
        if i128::try_from(held).ok() == Some(net) {
            Ok(())
        } else {
            Err(LedgerError::Unbalanced { held, net })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hold::{Hold, HoldState, Resolution};
    use crate::order::{Order, OrderState, Pricing};
    use crate::verdict::{Party, Payout};
    use crate::wire::EndReason;
    use proptest::prelude::*;

    const HOLD_MS: u64 = 100_000;

    const P: Pricing = Pricing {
        price_sat: 10_000,
        owner_share_ppm: 700_000,
    };

    #[test]
    fn charge_and_settle_balance() {
        let client = AccountId([1; 32]);
        let owner = AccountId([2; 32]);
        let order = OrderId([3; 12]);
        let mut b = Books::default();
        b.apply(&[deposit(Account::Client(client), 15_000)])
            .unwrap();
        b.apply(&charge(client, order, 10_000)).unwrap();
        assert_eq!(b.balance(&Account::Escrow(order)), 10_000);
        let s = Settlement {
            refund: 2_000,
            owner: 5_000,
            operator: 3_000,
        };
        b.apply(&settle(order, client, Some(owner), s)).unwrap();
        assert_eq!(b.balance(&Account::Client(client)), 7_000);
        assert_eq!(b.balance(&Account::Held(order)), 5_000);
        assert_eq!(b.balance(&Account::Operator), 3_000);
        assert_eq!(b.balance(&Account::Escrow(order)), 0);
        b.check().unwrap();
    }

    #[test]
    fn overdraft_is_refused_and_changes_nothing() {
        let client = AccountId([1; 32]);
        let mut b = Books::default();
        b.apply(&[deposit(Account::Client(client), 5)]).unwrap();
        let before = b.clone();
        let err = b.apply(&charge(client, OrderId([0; 12]), 6));
        assert!(matches!(err, Err(LedgerError::Insufficient { .. })));
        assert_eq!(b, before);
    }

    /// One step of the broker's life, for the property test.
    #[derive(Clone, Debug)]
    enum Step {
        Deposit {
            client: usize,
            amount: u64,
        },
        Order {
            client: usize,
        },
        Connect {
            order: usize,
            at: u64,
        },
        Disconnect {
            order: usize,
            at: u64,
        },
        Receipt {
            order: usize,
            at: u64,
            cpu_us: u64,
        },
        End {
            order: usize,
            at: u64,
            reason: usize,
        },
        Tick {
            order: usize,
            at: u64,
        },
        /// The broker dies: open connections are forgotten and every order that
        /// is not final is settled on restart, as the broker's recovery does.
        Crash {
            at: u64,
        },
        /// The order's client disputes its held earnings.
        Dispute {
            order: usize,
            at: u64,
            reasoned: bool,
        },
        /// The operator refunds part of a dispute, or rejects it.
        Resolve {
            order: usize,
            at: u64,
            refund: Option<u64>,
        },
        /// The broker releases every hold that has ended.
        Release {
            at: u64,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3usize, 0..40_000u64).prop_map(|(client, amount)| Step::Deposit { client, amount }),
            (0..3usize).prop_map(|client| Step::Order { client }),
            (0..8usize, 0..400_000u64).prop_map(|(order, at)| Step::Connect { order, at }),
            (0..8usize, 0..400_000u64).prop_map(|(order, at)| Step::Disconnect { order, at }),
            (0..8usize, 0..400_000u64, 0..2 * crate::order::CPU_HOUR_US)
                .prop_map(|(order, at, cpu_us)| Step::Receipt { order, at, cpu_us }),
            (0..8usize, 0..400_000u64, 0..EndReason::ALL.len())
                .prop_map(|(order, at, reason)| Step::End { order, at, reason }),
            (0..8usize, 0..400_000u64).prop_map(|(order, at)| Step::Tick { order, at }),
            (0..400_000u64).prop_map(|at| Step::Crash { at }),
            (0..8usize, 0..600_000u64, any::<bool>()).prop_map(|(order, at, reasoned)| {
                Step::Dispute {
                    order,
                    at,
                    reasoned,
                }
            }),
            (0..8usize, 0..600_000u64, proptest::option::of(0..10_000u64))
                .prop_map(|(order, at, refund)| Step::Resolve { order, at, refund }),
            (0..600_000u64).prop_map(|at| Step::Release { at }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn money_is_never_made_or_lost(steps in proptest::collection::vec(step(), 1..40)) {
            let clients = [AccountId([1; 32]), AccountId([2; 32]), AccountId([3; 32])];
            let owner = AccountId([9; 32]);
            let mut books = Books::default();
            let mut orders: Vec<(OrderId, usize, Order)> = Vec::new();
            // Each settled order's hold, by its index.
            let mut holds: BTreeMap<usize, Hold> = BTreeMap::new();
            let mut charged = 0u64;
            for s in steps {
                let mut clock = 0;
                match s {
                    Step::Deposit { client, amount } => {
                        books.apply(&[deposit(Account::Client(clients[client]), amount)]).unwrap();
                    }
                    Step::Order { client } => {
                        let id = OrderId([orders.len() as u8; 12]);
                        // An unaffordable order is refused and changes nothing.
                        if books.apply(&charge(clients[client], id, P.price_sat)).is_ok() {
                            charged += 1;
                            orders.push((id, client, Order::new(0, P, crate::terms::OrderTerms::default(), 2)));
                        }
                    }
                    Step::Connect { order, at } => {
                        if let Some((_, _, o)) = orders.get_mut(order) { o.handle_connect(at); }
                    }
                    Step::Disconnect { order, at } => {
                        if let Some((_, _, o)) = orders.get_mut(order) { o.handle_disconnect(at); }
                    }
                    Step::Receipt { order, at, cpu_us } => {
                        let r = crate::receipt::Receipt {
                            order_id: OrderId([0; 12]),
                            node_id: crate::identity::PeerId([0; 32]),
                            seq: 0,
                            prev: [0; 32],
                            cpu_us,
                            peak_mem: 0,
                            peak_procs: 0,
                            peak_disk: 0,
                            wall_ms: 0,
                            finish: None,
                        };
                        if let Some((_, _, o)) = orders.get_mut(order) { o.handle_receipt(at, &r); }
                    }
                    Step::End { order, at, reason } => {
                        clock = at;
                        if let Some((id, c, o)) = orders.get_mut(order)
                            && let Some(s) = o.handle_end(at, EndReason::ALL[reason], Party::Node)
                        {
                            books.apply(&settle(*id, clients[*c], Some(owner), s)).unwrap();
                        }
                    }
                    Step::Tick { order, at } => {
                        clock = at;
                        if let Some((id, c, o)) = orders.get_mut(order)
                            && let Some(s) = o.handle_tick(at)
                        {
                            books.apply(&settle(*id, clients[*c], Some(owner), s)).unwrap();
                        }
                    }
                    Step::Crash { at } => {
                        clock = at;
                        for (id, c, o) in orders.iter_mut() {
                            o.open = 0;
                            if let Some(s) = o.handle_end(at, EndReason::Cancelled, Party::Broker) {
                                books.apply(&settle(*id, clients[*c], Some(owner), s)).unwrap();
                            }
                        }
                    }
                    Step::Dispute { order, at, reasoned } => {
                        let reason = if reasoned { "no shell" } else { "" };
                        if let (Some((id, _, _)), Some(h)) = (orders.get(order), holds.get_mut(&order))
                            && let Ok(entries) = h.dispute(*id, at, reason)
                        {
                            prop_assert!(reasoned && at < h.until_ms);
                            books.apply(&entries).unwrap();
                        }
                    }
                    Step::Resolve { order, at, refund } => {
                        let decision = refund.map_or(Resolution::Reject, Resolution::Refund);
                        if let (Some((id, c, _)), Some(h)) = (orders.get(order), holds.get_mut(&order))
                            && let Ok(entries) = h.resolve(*id, clients[*c], at, decision)
                        {
                            books.apply(&entries).unwrap();
                        }
                    }
                    Step::Release { at } => {
                        for (i, h) in &mut holds {
                            if let Some(entries) = h.release(orders[*i].0, at) {
                                books.apply(&entries).unwrap();
                            }
                        }
                    }
                }
                // What the owner earned is held from the moment of settlement.
                for (i, (_, _, o)) in orders.iter().enumerate() {
                    if let Some(s) = o.settlement.filter(|s| s.owner > 0) {
                        holds.entry(i).or_insert_with(|| Hold::new(owner, s.owner, clock, HOLD_MS));
                    }
                }
                books.check().unwrap();
                // Held and disputed earnings sit in their accounts; the owner
                // has exactly what was released, never what is disputed.
                let mut released = 0;
                for (i, h) in &holds {
                    let id = orders[*i].0;
                    prop_assert_eq!(
                        (books.balance(&Account::Held(id)), books.balance(&Account::Disputed(id))),
                        h.held()
                    );
                    let refunded = h.dispute.as_ref().map_or(0, |d| d.refunded_sat);
                    prop_assert!(refunded <= h.amount_sat);
                    if h.state == HoldState::Released {
                        released += h.amount_sat - refunded;
                    }
                }
                prop_assert_eq!(books.balance(&Account::Owner(owner)), released);
                for (id, _, o) in &orders {
                    // Escrow holds the price exactly until the order is final.
                    let escrow = books.balance(&Account::Escrow(*id));
                    prop_assert_eq!(escrow, if o.state.is_final() { 0 } else { P.price_sat });
                    if let (OrderState::Cancelled(_), Some(s), Some(v)) = (o.state, o.settlement, o.verdict)
                        && v.payout == Payout::Refund
                    {
                        prop_assert_eq!(s.refund, P.price_sat);
                    }
                }
            }
            prop_assert_eq!(orders.len() as u64, charged);
        }
    }
}
