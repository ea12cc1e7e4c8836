//! The ledger on sled: balances, the double-entry journal, order records and
//! receipts, changed only in serializable transactions that write the entries,
//! the balances and the order together and are flushed before the caller goes
//! on. The rules (what an order's end pays whom) live in `jusy_common::order`;
//! the arithmetic and the invariant in `jusy_common::ledger`.

use std::collections::BTreeMap;

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
    pub pricing: Pricing,
}

/// The result of [`Ledger::audit`].
#[derive(Debug, Serialize)]
pub struct Audit {
    pub ok: bool,
    pub problems: Vec<String>,
    pub deposits: u64,
    pub withdrawals: u64,
    pub held: u128,
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
            db,
            pricing,
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
        );
        let out = sled::Transactional::transaction(
            &trees,
            |(balances, journal, orders, totals, receipts)| {
                f(&Tx {
                    balances,
                    journal,
                    orders,
                    totals,
                    receipts,
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
    /// the settlement and its verdict when `f` settled the order.
    pub fn settle(
        &self,
        id: OrderId,
        f: impl Fn(&mut Order) -> Option<Settlement>,
    ) -> Result<Option<(Settlement, Verdict)>, LedgerError> {
        let settled = self.transact(|tx| {
            let mut rec = tx.order(id)?;
            let settlement = f(&mut rec.order);
            if let Some(s) = settlement {
                tx.post(&books::settle(id, rec.client, rec.owner, s))?;
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
        let mut replayed = Books::default();
        let mut per_order: BTreeMap<OrderId, (u32, u64, u64, u64)> = BTreeMap::new();
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
                    _ => t.3 += e.amount,
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
                OrderAudit {
                    order_id: id.to_string(),
                    state: rec.order.state.code(),
                    charges,
                    charged,
                    refunded,
                    paid_out,
                }
            })
            .collect();
        Ok(Audit {
            ok: problems.is_empty(),
            problems,
            deposits,
            withdrawals,
            held,
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
        assert_eq!(ledger.balance(&Account::Owner(owner)).expect("b"), 400);
        assert_eq!(ledger.receipts(id).expect("receipts"), vec![b"r".to_vec()]);
        let audit = ledger.audit().expect("audit");
        assert!(audit.ok, "{:?}", audit.problems);
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
