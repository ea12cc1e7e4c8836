//! The ledger on sled: balances, the double-entry journal, order records and
//! receipts, changed only in serializable transactions that write the entries,
//! the balances and the order together and are flushed before the caller goes
//! on. The rules (what an order's end pays whom) live in `jusy_common::order`;
//! the arithmetic and the invariant in `jusy_common::ledger`.

use std::collections::BTreeMap;

use jusy_common::hold::{Hold, HoldError, HoldState, Resolution};
use jusy_common::ledger::{self as books, Account, AccountId, Books, Entry, Movement};
use jusy_common::order::{Order, Plausibility, Pricing, Settlement};
use jusy_common::receipt::Receipt;
use jusy_common::verdict::{Party, Verdict};
use jusy_common::wire::{EndReason, OrderId};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use crate::store::Store;

/// A ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error(transparent)]
    Money(#[from] books::LedgerError),
    #[error("order {0} exists already")]
    Exists(OrderId),
    #[error("no order {0}")]
    UnknownOrder(OrderId),
    #[error("nothing of order {0} is held: its owner earned nothing from it")]
    NothingHeld(OrderId),
    #[error(transparent)]
    Hold(#[from] HoldError),
}

/// What the broker keeps of an order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderRecord {
    pub client: AccountId,
    pub owner: Option<AccountId>,
    pub node_id: String,
    pub username: String,
    pub host: String,
    pub port: u16,
    pub created_ms: u64,
    pub order: Order,
    /// Bytes through the session's network, as its node counted them.
    #[serde(default)]
    pub traffic: Traffic,
    /// The node's signed acceptance of the order's terms
    /// ([`jusy_common::terms::SignedAcceptance`]), once checked.
    #[serde(default, with = "hex_bytes")]
    pub acceptance: Option<Vec<u8>>,
    /// The owner's earnings from the order while they are held, and any
    /// dispute of them; `None` until it settles, and for an order that
    /// earned its owner nothing.
    #[serde(default)]
    pub hold: Option<Hold>,
}

/// Bytes through a session's network link.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Traffic {
    /// Sent by the session.
    pub sent: u64,
    /// Received by the session.
    pub received: u64,
}

/// Bytes stored as hex text in the order's JSON record.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| hex::decode(t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The trees one transaction works on.
struct Tx<'a> {
    balances: &'a TransactionalTree,
    journal: &'a TransactionalTree,
    orders: &'a TransactionalTree,
    totals: &'a TransactionalTree,
    receipts: &'a TransactionalTree,
    /// Holds by when they end: the end (ms, big-endian) and the order id.
    holds: &'a TransactionalTree,
}

type TxResult<T> = Result<T, ConflictableTransactionError<LedgerError>>;

fn fail<T>(e: impl Into<LedgerError>) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e.into()))
}

fn read_u64(tree: &TransactionalTree, key: &[u8]) -> TxResult<u64> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

impl Tx<'_> {
    /// Applies entries all or nothing, with the arithmetic of [`Books`].
    fn post(&self, entries: &[Entry]) -> TxResult<()> {
        let mut b = Books {
            deposits: read_u64(self.totals, b"deposits")?,
            withdrawals: read_u64(self.totals, b"withdrawals")?,
            ..Books::default()
        };
        let touched: Vec<Account> = entries.iter().flat_map(|e| [e.from, e.to]).collect();
        for account in &touched {
            if let Some(key) = account.key() {
                b.balances.insert(*account, read_u64(self.balances, &key)?);
            }
        }
        if let Err(e) = b.apply(entries) {
            return fail(e);
        }
        for account in &touched {
            if let Some(key) = account.key() {
                match b.balance(account) {
                    0 => self.balances.remove(key)?,
                    v => self.balances.insert(key, &v.to_be_bytes())?,
                };
            }
        }
        self.totals.insert("deposits", &b.deposits.to_be_bytes())?;
        self.totals
            .insert("withdrawals", &b.withdrawals.to_be_bytes())?;
        for e in entries {
            let id = self.journal.generate_id()?;
            let bytes = serde_json::to_vec(e).or_else(fail)?;
            self.journal.insert(&id.to_be_bytes(), bytes)?;
        }
        Ok(())
    }

    fn order(&self, id: OrderId) -> TxResult<OrderRecord> {
        match self.orders.get(id.0)? {
            Some(v) => serde_json::from_slice(&v).or_else(fail),
            None => fail(LedgerError::UnknownOrder(id)),
        }
    }

    fn put_order(&self, id: OrderId, rec: &OrderRecord) -> TxResult<()> {
        let bytes = serde_json::to_vec(rec).or_else(fail)?;
        self.orders.insert(&id.0, bytes)?;
        Ok(())
    }
}

/// Money and orders.
#[derive(Clone, Debug)]
pub struct Ledger {
    db: sled::Db,
    balances: sled::Tree,
    journal: sled::Tree,
    orders: sled::Tree,
    totals: sled::Tree,
    receipts: sled::Tree,
    holds: sled::Tree,
    pub pricing: Pricing,
    /// How long an owner's earnings are held before they can be withdrawn.
    pub hold_ms: u64,
}

/// The key of a hold in the index of holds by their end.
fn hold_key(until_ms: u64, id: OrderId) -> Vec<u8> {
    let mut key = until_ms.to_be_bytes().to_vec();
    key.extend_from_slice(&id.0);
    key
}

/// The result of [`Ledger::audit`].
#[derive(Debug, Serialize)]
pub struct Audit {
    pub ok: bool,
    pub problems: Vec<String>,
    pub deposits: u64,
    pub withdrawals: u64,
    pub held: u128,
    /// Owners' earnings in their hold, and under dispute.
    pub held_earnings: u64,
    pub disputed: u64,
    pub open_disputes: usize,
    pub orders: Vec<OrderAudit>,
}

/// One order as the journal tells it.
#[derive(Debug, Serialize)]
pub struct OrderAudit {
    pub order_id: String,
    pub state: &'static str,
    pub charges: u32,
    pub charged: u64,
    pub refunded: u64,
    pub paid_out: u64,
    /// Of the owner's earnings: released to the owner, and refunded to the
    /// client after a dispute.
    pub released: u64,
    pub dispute_refunded: u64,
}

impl Ledger {
    pub fn open(store: &Store, pricing: Pricing) -> Result<Self, LedgerError> {
        let db = store.db.clone();
        Ok(Self {
            balances: db.open_tree("balances")?,
            journal: db.open_tree("journal")?,
            orders: db.open_tree("orders")?,
            totals: db.open_tree("totals")?,
            receipts: db.open_tree("receipts")?,
            holds: db.open_tree("holds")?,
            db,
            pricing,
            hold_ms: jusy_common::hold::DEFAULT_HOLD_MS,
        })
    }

    /// Runs `f` in one serializable transaction (retried on conflict), then
    /// flushes, so that what it did survives a crash once this returns.
    fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, LedgerError> {
        let trees = (
            &self.balances,
            &self.journal,
            &self.orders,
            &self.totals,
            &self.receipts,
            &self.holds,
        );
        let out = sled::Transactional::transaction(
            &trees,
            |(balances, journal, orders, totals, receipts, holds)| {
                f(&Tx {
                    balances,
                    journal,
                    orders,
                    totals,
                    receipts,
                    holds,
                })
            },
        )
        .map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => LedgerError::Db(e),
        })?;
        self.db.flush()?;
        Ok(out)
    }

    /// Satoshi deposited and withdrawn so far.
    pub fn totals(&self) -> Result<(u64, u64), LedgerError> {
        let total = |key: &str| -> Result<u64, LedgerError> {
            Ok(self
                .totals
                .get(key)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes))
        };
        Ok((total("deposits")?, total("withdrawals")?))
    }

    pub fn balance(&self, account: &Account) -> Result<u64, LedgerError> {
        let Some(key) = account.key() else {
            return Ok(0);
        };
        Ok(self
            .balances
            .get(key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Credits a deposit; returns the new balance.
    pub fn deposit(&self, account: Account, amount: u64) -> Result<u64, LedgerError> {
        self.transact(|tx| tx.post(&[books::deposit(account, amount)]))?;
        tracing::info!(?account, amount, "deposit");
        self.balance(&account)
    }

    /// Charges the client and records the order, in one transaction. Fails with
    /// [`books::LedgerError::Insufficient`] when the client cannot pay.
    pub fn reserve(&self, id: OrderId, rec: &OrderRecord) -> Result<(), LedgerError> {
        let price = rec.order.pricing.price_sat;
        self.transact(|tx| {
            if tx.orders.get(id.0)?.is_some() {
                return fail(LedgerError::Exists(id));
            }
            tx.post(&books::charge(rec.client, id, price))?;
            tx.put_order(id, rec)
        })?;
        tracing::info!(order_id = %id, client = ?rec.client, price, "order charged");
        Ok(())
    }

    /// Changes an order's state with `f`; when `f` settles the order, pays out
    /// its escrow in the same transaction. Returns the settlement, if any.
    pub fn update(
        &self,
        id: OrderId,
        f: impl Fn(&mut Order) -> Option<Settlement>,
    ) -> Result<Option<Settlement>, LedgerError> {
        Ok(self.settle(id, f)?.map(|(s, _)| s))
    }

    /// Changes an order's state with `f` as [`Ledger::update`] does; returns
    /// the settlement and its verdict when `f` settled the order. The
    /// owner's earnings go into the order's hold, which ends
    /// [`Ledger::hold_ms`] from now.
    pub fn settle(
        &self,
        id: OrderId,
        f: impl Fn(&mut Order) -> Option<Settlement>,
    ) -> Result<Option<(Settlement, Verdict)>, LedgerError> {
        let now = crate::store::now_ms();
        let settled = self.transact(|tx| {
            let mut rec = tx.order(id)?;
            let settlement = f(&mut rec.order);
            if let Some(s) = settlement {
                tx.post(&books::settle(id, rec.client, rec.owner, s))?;
                if let Some(owner) = rec.owner.filter(|_| s.owner > 0) {
                    let hold = Hold::new(owner, s.owner, now, self.hold_ms);
                    tx.holds.insert(hold_key(hold.until_ms, id), &[])?;
                    rec.hold = Some(hold);
                }
            }
            tx.put_order(id, &rec)?;
            Ok(settlement
                .zip(rec.order.verdict)
                .map(|(s, v)| (s, v, rec.order)))
        })?;
        if let Some((s, v, o)) = &settled {
            tracing::info!(
                order_id = %id, state = o.state.code(), ended_by = ?v.by, upheld = v.upheld,
                fault = ?v.fault, payout = ?v.payout, quick_close = v.quick_close,
                implausible_receipts = o.implausible, proven_cpu_us = o.proven_cpu_us,
                claimed_cpu_us = o.claimed_cpu_us, refund = s.refund, owner = s.owner,
                operator = s.operator, "order settled"
            );
        }
        Ok(settled.map(|(s, v, _)| (s, v)))
    }

    /// Records an order's network traffic so far. Counters only grow: a
    /// smaller report (out of order, or a node that restarted counting) is
    /// not taken.
    pub fn set_traffic(&self, id: OrderId, traffic: Traffic) -> Result<(), LedgerError> {
        self.transact(|tx| {
            let mut rec = tx.order(id)?;
            rec.traffic = Traffic {
                sent: rec.traffic.sent.max(traffic.sent),
                received: rec.traffic.received.max(traffic.received),
            };
            tx.put_order(id, &rec)
        })
    }

    /// Keeps the node's checked acceptance of an order's terms.
    pub fn accepted(&self, id: OrderId, acceptance: &[u8]) -> Result<(), LedgerError> {
        self.transact(|tx| {
            let mut rec = tx.order(id)?;
            rec.acceptance = Some(acceptance.to_vec());
            tx.put_order(id, &rec)
        })
    }

    /// Stores a verified receipt that arrived at `now_ms` and counts its CPU
    /// time for the order, as far as it was possible.
    pub fn add_receipt(
        &self,
        r: &Receipt,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<Plausibility, LedgerError> {
        let id = r.order_id;
        let mut key = id.0.to_vec();
        key.extend_from_slice(&r.seq.to_be_bytes());
        self.transact(|tx| {
            let mut rec = tx.order(id)?;
            let plausible = rec.order.handle_receipt(now_ms, r);
            tx.receipts.insert(key.as_slice(), bytes)?;
            tx.put_order(id, &rec)?;
            Ok(plausible)
        })
    }

    pub fn order(&self, id: OrderId) -> Result<Option<OrderRecord>, LedgerError> {
        match self.orders.get(id.0)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every order, oldest first.
    pub fn orders(&self) -> Result<Vec<(OrderId, OrderRecord)>, LedgerError> {
        let mut out = Vec::new();
        for item in self.orders.iter() {
            let (k, v) = item?;
            let Ok(id) = <[u8; 12]>::try_from(k.as_ref()) else {
                continue;
            };
            out.push((OrderId(id), serde_json::from_slice::<OrderRecord>(&v)?));
        }
        out.sort_by_key(|(_, r)| r.created_ms);
        Ok(out)
    }

    /// An order's receipts in sequence order.
    pub fn receipts(&self, id: OrderId) -> Result<Vec<Vec<u8>>, LedgerError> {
        self.receipts
            .scan_prefix(id.0)
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// The client disputes the earnings its order `id` paid, at `now_ms`:
    /// they stay held until the operator decides. Another client's order
    /// is [`LedgerError::UnknownOrder`], as a missing one is.
    pub fn dispute(
        &self,
        id: OrderId,
        client: AccountId,
        reason: &str,
        now_ms: u64,
    ) -> Result<Hold, LedgerError> {
        let hold = self.transact(|tx| {
            let mut rec = tx.order(id)?;
            if rec.client != client {
                return fail(LedgerError::UnknownOrder(id));
            }
            let Some(mut hold) = rec.hold.clone() else {
                return fail(LedgerError::NothingHeld(id));
            };
            let entries = hold.dispute(id, now_ms, reason).or_else(fail)?;
            tx.post(&entries)?;
            tx.holds.remove(hold_key(hold.until_ms, id))?;
            rec.hold = Some(hold.clone());
            tx.put_order(id, &rec)?;
            Ok(hold)
        })?;
        tracing::info!(order_id = %id, amount = hold.amount_sat, "earnings disputed by the client");
        Ok(hold)
    }

    /// The operator decides the dispute of order `id` at `now_ms`.
    pub fn resolve(
        &self,
        id: OrderId,
        resolution: Resolution,
        now_ms: u64,
    ) -> Result<Hold, LedgerError> {
        let hold = self.transact(|tx| {
            let mut rec = tx.order(id)?;
            let Some(mut hold) = rec.hold.clone() else {
                return fail(LedgerError::Hold(HoldError::NotDisputed));
            };
            let entries = hold
                .resolve(id, rec.client, now_ms, resolution)
                .or_else(fail)?;
            tx.post(&entries)?;
            rec.hold = Some(hold.clone());
            tx.put_order(id, &rec)?;
            Ok(hold)
        })?;
        tracing::info!(
            order_id = %id, ?resolution, refunded = hold.dispute.as_ref().map_or(0, |d| d.refunded_sat),
            "dispute decided by the operator"
        );
        Ok(hold)
    }

    /// Releases to their owners the earnings whose hold ended by `now_ms`;
    /// returns how many.
    pub fn release_due(&self, now_ms: u64) -> Result<usize, LedgerError> {
        let mut released = 0;
        let end = (now_ms.saturating_add(1)).to_be_bytes();
        for key in self.holds.range(..end.as_slice()).keys() {
            let key = key?;
            let Some(id) = key
                .get(8..)
                .and_then(|b| <[u8; 12]>::try_from(b).ok())
                .map(OrderId)
            else {
                self.holds.remove(&key)?;
                continue;
            };
            let done = self.transact(|tx| {
                tx.holds.remove(key.as_ref())?;
                let mut rec = tx.order(id)?;
                let Some(mut hold) = rec.hold.clone() else {
                    return Ok(None);
                };
                let Some(entries) = hold.release(id, now_ms) else {
                    return Ok(None);
                };
                tx.post(&entries)?;
                rec.hold = Some(hold.clone());
                tx.put_order(id, &rec)?;
                Ok(Some(hold))
            })?;
            if let Some(hold) = done {
                released += 1;
                tracing::info!(order_id = %id, owner = %hold.owner, amount = hold.amount_sat, "held earnings released");
            }
        }
        Ok(released)
    }

    /// When the next hold ends, if any is waiting.
    pub fn next_release_ms(&self) -> Result<Option<u64>, LedgerError> {
        Ok(self.holds.first()?.and_then(|(k, _)| {
            <[u8; 8]>::try_from(k.get(..8)?)
                .ok()
                .map(u64::from_be_bytes)
        }))
    }

    /// Orders whose earnings are disputed and wait for the operator, oldest
    /// dispute first.
    pub fn open_disputes(&self) -> Result<Vec<(OrderId, OrderRecord)>, LedgerError> {
        let mut out: Vec<_> = self
            .orders()?
            .into_iter()
            .filter(|(_, r)| {
                r.hold
                    .as_ref()
                    .is_some_and(|h| h.state == HoldState::Disputed)
            })
            .collect();
        out.sort_by_key(|(_, r)| {
            r.hold
                .as_ref()
                .and_then(|h| h.dispute.as_ref())
                .map(|d| d.opened_ms)
        });
        Ok(out)
    }

    /// An owner's earnings still held and under dispute.
    pub fn owner_held(&self, owner: AccountId) -> Result<(u64, u64), LedgerError> {
        let mut sums = (0u64, 0u64);
        for (_, rec) in self.orders()? {
            if let Some(h) = rec.hold.filter(|h| h.owner == owner) {
                let (held, disputed) = h.held();
                sums.0 = sums.0.saturating_add(held);
                sums.1 = sums.1.saturating_add(disputed);
            }
        }
        Ok(sums)
    }

    /// Settles every order a crash left unfinished: never-connected ones are
    /// refunded in full, connected ones as cancelled by the broker (the client
    /// gets back what receipts do not prove). Their order ports are gone.
    pub fn recover(&self, now_ms: u64) -> Result<usize, LedgerError> {
        let mut settled = 0;
        for (id, rec) in self.orders()? {
            if rec.order.state.is_final() {
                continue;
            }
            let s = self.update(id, |o| {
                o.open = 0;
                o.handle_end(now_ms, EndReason::Cancelled, Party::Broker)
            })?;
            if s.is_some() {
                settled += 1;
            }
        }
        Ok(settled)
    }

    /// Checks the books: the stored balances balance, replaying the journal
    /// gives the same balances, each order was charged exactly once, escrow
    /// holds the price of exactly the unfinished orders, and each finished
    /// order paid out exactly its price.
    pub fn audit(&self) -> Result<Audit, LedgerError> {
        let mut problems = Vec::new();
        let total = |key: &str| -> Result<u64, LedgerError> {
            Ok(self
                .totals
                .get(key)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                .map_or(0, u64::from_be_bytes))
        };
        let (deposits, withdrawals) = (total("deposits")?, total("withdrawals")?);
        let (mut held_earnings, mut disputed_sum, mut open_disputes) = (0u64, 0u64, 0usize);
        let mut replayed = Books::default();
        let mut per_order: BTreeMap<OrderId, (u32, u64, u64, u64)> = BTreeMap::new();
        // Per order: released to the owner, refunded after a dispute.
        let mut after_hold: BTreeMap<OrderId, (u64, u64)> = BTreeMap::new();
        for item in self.journal.iter() {
            let (_, v) = item?;
            let e: Entry = serde_json::from_slice(&v)?;
            if let Err(err) = replayed.apply(std::slice::from_ref(&e)) {
                problems.push(format!("journal entry {e:?} does not apply: {err}"));
            }
            if let Some(order) = e.order {
                let t = per_order.entry(order).or_default();
                match e.movement {
                    Movement::Charge => {
                        t.0 += 1;
                        t.1 += e.amount;
                    }
                    Movement::Refund => t.2 += e.amount,
                    Movement::Earning | Movement::Fee => t.3 += e.amount,
                    Movement::Release => after_hold.entry(order).or_default().0 += e.amount,
                    Movement::DisputeRefund => {
                        after_hold.entry(order).or_default().1 += e.amount;
                    }
                    Movement::Dispute | Movement::Deposit | Movement::Withdrawal => {}
                }
            }
        }
        for (id, rec) in self.orders()? {
            let escrow = self.balance(&Account::Escrow(id))?;
            let (charges, charged, refunded, paid) =
                per_order.get(&id).copied().unwrap_or_default();
            let price = rec.order.pricing.price_sat;
            if charges != 1 || charged != price {
                problems.push(format!(
                    "order {id} charged {charges} times ({charged} sat)"
                ));
            }
            let expected_escrow = if rec.order.state.is_final() { 0 } else { price };
            if escrow != expected_escrow {
                problems.push(format!(
                    "order {id} escrow {escrow}, expected {expected_escrow}"
                ));
            }
            if rec.order.state.is_final() && refunded + paid != price {
                problems.push(format!(
                    "order {id} paid out {} of {price}",
                    refunded + paid
                ));
            }
            let (released, dispute_refunded) = after_hold.get(&id).copied().unwrap_or_default();
            let balances = (
                self.balance(&Account::Held(id))?,
                self.balance(&Account::Disputed(id))?,
            );
            let expected = match &rec.hold {
                Some(h) => {
                    let (held, disputed) = h.held();
                    held_earnings += held;
                    disputed_sum += disputed;
                    open_disputes += usize::from(h.state == HoldState::Disputed);
                    let paid_on = released + dispute_refunded + held + disputed;
                    if paid_on != h.amount_sat {
                        problems.push(format!(
                            "order {id} held {} sat for its owner, and accounts for {paid_on}",
                            h.amount_sat
                        ));
                    }
                    (held, disputed)
                }
                None => (0, 0),
            };
            if balances != expected {
                problems.push(format!(
                    "order {id} holds {balances:?} (held, disputed), expected {expected:?}"
                ));
            }
        }
        let mut held: u128 = 0;
        let mut stored_accounts = 0usize;
        for item in self.balances.iter() {
            let (k, v) = item?;
            let amount = <[u8; 8]>::try_from(v.as_ref()).map_or(0, u64::from_be_bytes);
            held += u128::from(amount);
            stored_accounts += 1;
            let from_replay = replayed
                .balances
                .iter()
                .find(|(a, _)| a.key().as_deref() == Some(k.as_ref()))
                .map_or(0, |(_, v)| *v);
            if amount != from_replay {
                problems.push(format!(
                    "balance {} is {amount}, the journal says {from_replay}",
                    hex::encode(&k)
                ));
            }
        }
        if stored_accounts != replayed.balances.len() {
            problems.push("the journal has balances the store does not".into());
        }
        if i128::try_from(held).ok() != Some(i128::from(deposits) - i128::from(withdrawals)) {
            problems.push(format!(
                "accounts hold {held}, deposits {deposits} minus withdrawals {withdrawals}"
            ));
        }
        if (replayed.deposits, replayed.withdrawals) != (deposits, withdrawals) {
            problems.push("deposit totals differ from the journal".into());
        }
        let orders = self
            .orders()?
            .into_iter()
            .map(|(id, rec)| {
                let (charges, charged, refunded, paid_out) =
                    per_order.get(&id).copied().unwrap_or_default();
                let (released, dispute_refunded) = after_hold.get(&id).copied().unwrap_or_default();
                OrderAudit {
                    order_id: id.to_string(),
                    state: rec.order.state.code(),
                    charges,
                    charged,
                    refunded,
                    paid_out,
                    released,
                    dispute_refunded,
                }
            })
            .collect();
        Ok(Audit {
            ok: problems.is_empty(),
            problems,
            deposits,
            withdrawals,
            held,
            held_earnings,
            disputed: disputed_sum,
            open_disputes,
            orders,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Role;
    use jusy_common::wire::EndReason;

    const PRICING: Pricing = Pricing {
        price_sat: 1_000,
        owner_share_ppm: 800_000,
    };

    fn open(name: &str) -> (std::path::PathBuf, Store, Ledger) {
        let dir = std::env::temp_dir().join(format!("jusy-ledger-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        let ledger = Ledger::open(&store, PRICING).expect("ledger");
        (dir, store, ledger)
    }

    fn record(client: AccountId, owner: Option<AccountId>) -> OrderRecord {
        OrderRecord {
            client,
            owner,
            node_id: "n".into(),
            username: "u".into(),
            host: "h".into(),
            port: 1,
            created_ms: 0,
            order: Order::new(0, PRICING, jusy_common::terms::OrderTerms::default(), 2),
            acceptance: None,
            traffic: Default::default(),
            hold: None,
        }
    }

    #[test]
    fn an_order_is_charged_settled_and_audited() {
        let (dir, store, ledger) = open("settle");
        let (_, client) = store.add_account(Role::Client).expect("client");
        let (_, owner) = store.add_account(Role::Owner).expect("owner");
        ledger
            .deposit(Account::Client(client), 1_500)
            .expect("deposit");
        let id = OrderId([1; 12]);
        ledger
            .reserve(id, &record(client, Some(owner)))
            .expect("reserve");
        assert!(matches!(
            ledger.reserve(id, &record(client, None)),
            Err(LedgerError::Exists(_))
        ));
        assert!(matches!(
            ledger.reserve(OrderId([2; 12]), &record(client, None)),
            Err(LedgerError::Money(books::LedgerError::Insufficient { .. }))
        ));
        ledger
            .update(id, |o| {
                o.handle_connect(1_000);
                None
            })
            .expect("connect");
        ledger
            .add_receipt(
                &Receipt {
                    order_id: id,
                    node_id: jusy_common::identity::PeerId([0; 32]),
                    seq: 0,
                    prev: [0; 32],
                    cpu_us: jusy_common::order::CPU_HOUR_US / 2,
                    peak_mem: 0,
                    peak_procs: 0,
                    peak_disk: 0,
                    wall_ms: 0,
                    finish: None,
                },
                b"r",
                3_600_000,
            )
            .expect("receipt");
        let s = ledger
            .update(id, |o| {
                o.handle_end(3_600_000, EndReason::NodeLost, Party::Broker)
            })
            .expect("end");
        assert_eq!(
            s,
            Some(Settlement {
                refund: 500,
                owner: 400,
                operator: 100
            })
        );
        assert_eq!(ledger.balance(&Account::Client(client)).expect("b"), 1_000);
        assert_eq!(ledger.balance(&Account::Held(id)).expect("b"), 400);
        assert_eq!(ledger.receipts(id).expect("receipts"), vec![b"r".to_vec()]);
        let audit = ledger.audit().expect("audit");
        assert!(audit.ok, "{:?}", audit.problems);
        drop((store, ledger));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Settles order `id` of `client` on a node of `owner` with half the CPU
    /// hour proven: the owner earns 400 of the 1000.
    fn run_half_an_hour(ledger: &Ledger, id: OrderId, client: AccountId, owner: AccountId) {
        ledger
            .reserve(id, &record(client, Some(owner)))
            .expect("reserve");
        ledger
            .update(id, |o| {
                o.handle_connect(1_000);
                None
            })
            .expect("connect");
        let receipt = Receipt {
            order_id: id,
            node_id: jusy_common::identity::PeerId([0; 32]),
            seq: 0,
            prev: [0; 32],
            cpu_us: jusy_common::order::CPU_HOUR_US / 2,
            peak_mem: 0,
            peak_procs: 0,
            peak_disk: 0,
            wall_ms: 0,
            finish: None,
        };
        ledger
            .add_receipt(&receipt, b"r", 3_600_000)
            .expect("receipt");
        ledger
            .update(id, |o| {
                o.handle_end(3_600_000, EndReason::NodeLost, Party::Broker)
            })
            .expect("end");
    }

    #[test]
    fn earnings_are_held_disputed_refunded_and_released() {
        let (dir, store, mut ledger) = open("hold");
        ledger.hold_ms = 60_000;
        let (_, client) = store.add_account(Role::Client).expect("client");
        let (_, other) = store.add_account(Role::Client).expect("client");
        let (_, owner) = store.add_account(Role::Owner).expect("owner");
        ledger
            .deposit(Account::Client(client), 2_000)
            .expect("deposit");
        let (disputed, kept) = (OrderId([1; 12]), OrderId([2; 12]));
        run_half_an_hour(&ledger, disputed, client, owner);
        run_half_an_hour(&ledger, kept, client, owner);
        assert_eq!(ledger.owner_held(owner).expect("held"), (800, 0));
        assert_eq!(ledger.balance(&Account::Owner(owner)).expect("b"), 0);
        let now = crate::store::now_ms();

        // Another client's order is no one's to dispute but its client's.
        assert!(matches!(
            ledger.dispute(disputed, other, "mine", now),
            Err(LedgerError::UnknownOrder(_))
        ));
        ledger
            .dispute(disputed, client, "no shell", now)
            .expect("dispute");
        assert_eq!(ledger.owner_held(owner).expect("held"), (400, 400));
        assert_eq!(ledger.open_disputes().expect("open").len(), 1);

        // The hold ends: the undisputed earnings reach the owner, the
        // disputed ones stay.
        assert_eq!(ledger.release_due(now + 1_000).expect("early"), 0);
        assert_eq!(ledger.release_due(now + 61_000).expect("release"), 1);
        assert_eq!(ledger.balance(&Account::Owner(owner)).expect("b"), 400);
        assert!(matches!(
            ledger.dispute(kept, client, "late", now + 61_000),
            Err(LedgerError::Hold(HoldError::HoldOver))
        ));
        let audit = ledger.audit().expect("audit");
        assert!(audit.ok, "{:?}", audit.problems);
        assert_eq!(
            (audit.held_earnings, audit.disputed, audit.open_disputes),
            (0, 400, 1)
        );

        // The operator refunds part.
        let before = ledger.balance(&Account::Client(client)).expect("b");
        ledger
            .resolve(disputed, Resolution::Refund(150), now + 62_000)
            .expect("resolve");
        assert_eq!(
            ledger.balance(&Account::Client(client)).expect("b"),
            before + 150
        );
        assert_eq!(ledger.balance(&Account::Owner(owner)).expect("b"), 650);
        assert!(matches!(
            ledger.resolve(disputed, Resolution::Reject, now + 63_000),
            Err(LedgerError::Hold(HoldError::NotDisputed))
        ));
        let audit = ledger.audit().expect("audit");
        assert!(audit.ok, "{:?}", audit.problems);
        let row = audit
            .orders
            .iter()
            .find(|o| o.order_id == disputed.to_string())
            .expect("row");
        assert_eq!((row.released, row.dispute_refunded), (250, 150));
        drop((store, ledger));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn recovery_refunds_unconnected_orders_and_settles_connected_ones() {
        let (dir, store, ledger) = open("recover");
        let (_, client) = store.add_account(Role::Client).expect("client");
        ledger
            .deposit(Account::Client(client), 2_000)
            .expect("deposit");
        ledger
            .reserve(OrderId([1; 12]), &record(client, None))
            .expect("reserve");
        ledger
            .reserve(OrderId([2; 12]), &record(client, None))
            .expect("reserve");
        ledger
            .update(OrderId([2; 12]), |o| {
                o.handle_connect(1);
                None
            })
            .expect("connect");
        drop((store, ledger));
        let store = Store::open(&dir).expect("reopen");
        let ledger = Ledger::open(&store, PRICING).expect("ledger");
        assert_eq!(ledger.recover(100_000).expect("recover"), 2);
        // Never connected: all back; connected without receipts: all back too,
        // since nothing was proven and the broker is at fault.
        assert_eq!(ledger.balance(&Account::Client(client)).expect("b"), 2_000);
        let audit = ledger.audit().expect("audit");
        assert!(audit.ok, "{:?}", audit.problems);
        drop((store, ledger));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn concurrent_orders_never_overdraw() {
        let (dir, store, ledger) = open("concurrent");
        let clients: Vec<AccountId> = (0..20)
            .map(|_| {
                let (_, id) = store.add_account(Role::Client).expect("client");
                ledger
                    .deposit(Account::Client(id), 5 * PRICING.price_sat)
                    .expect("deposit");
                id
            })
            .collect();
        let results: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..200u8)
                .map(|i| {
                    let ledger = &ledger;
                    let client = clients[usize::from(i) % 20];
                    s.spawn(move || {
                        ledger
                            .reserve(OrderId([i; 12]), &record(client, None))
                            .is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(false))
                .collect()
        });
        assert_eq!(results.iter().filter(|ok| **ok).count(), 100);
        for c in &clients {
            assert_eq!(ledger.balance(&Account::Client(*c)).expect("b"), 0);
        }
        let audit = ledger.audit().expect("audit");
        assert!(audit.ok, "{:?}", audit.problems);
        drop((store, ledger));
        let _ = std::fs::remove_dir_all(dir);
    }
}
