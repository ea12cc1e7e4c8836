//! The settlement rules under random event sequences, lies included: receipts
//! claiming impossible CPU time, an early `DONE`, `WALL` before its time,
//! `RAM`/`PROC`/`DISK` without evidence, closes the broker never saw, and
//! sessions that never end. Each sequence runs through the order state
//! machine and the books; the invariants are checked against a plain
//! restatement of the rules:
//!
//! * money is conserved: the price is paid out exactly once, the books balance;
//! * the client never pays more than the plausible proven CPU time is worth,
//!   unless the end was its own on evidence the broker can check;
//! * the owner is never paid beyond their share of the plausible proven CPU;
//! * an end the evidence does not support is the node's fault, never the client's;
//! * every order ends, by the broker's own timers if nothing else.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use jusy_common::identity::PeerId;
use jusy_common::ledger::{Account, AccountId, Books, charge, deposit, settle};
use jusy_common::order::{CPU_HOUR_US, Order, OrderState, Pricing, price_of};
use jusy_common::receipt::Receipt;
use jusy_common::terms::OrderTerms;
use jusy_common::verdict::{Fault, Party, Payout};
use jusy_common::wire::{EndReason, OrderId};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Event {
    Connect,
    Disconnect,
    /// CPU claimed: a share (ppm) of what was possible, which above 1e6 is a lie.
    Receipt {
        cpu_ppm: u64,
        mem: u64,
        procs: u32,
        disk: u64,
        finish: Option<usize>,
    },
    NodeEnd(usize),
    BrokerEnd(bool),
    Tick,
}

fn event() -> impl Strategy<Value = Event> {
    let reason = 0..EndReason::ALL.len();
    prop_oneof![
        2 => Just(Event::Connect),
        2 => Just(Event::Disconnect),
        6 => (
            prop_oneof![0u64..1_100_000, 1_000_000u64..100_000_000],
            0u64..3 << 30,
            0u32..80,
            0u64..8 << 30,
            proptest::option::weighted(0.2, reason.clone()),
        )
            .prop_map(|(cpu_ppm, mem, procs, disk, finish)| Event::Receipt {
                cpu_ppm,
                mem,
                procs,
                disk,
                finish
            }),
        2 => reason.prop_map(Event::NodeEnd),
        1 => any::<bool>().prop_map(Event::BrokerEnd),
        2 => Just(Event::Tick),
    ]
}

fn terms() -> impl Strategy<Value = OrderTerms> {
    (
        1u32..4000,
        30u32..11_000,
        1u32..4096,
        1u32..80,
        prop_oneof![Just(0u32), 1u32..8192],
        1u32..300,
        0u32..10,
    )
        .prop_map(|(cpu, wall, mem, procs, disk, connect, grace)| OrderTerms {
            cpu_budget_secs: cpu,
            wall_secs: wall,
            memory_mib: mem,
            max_processes: procs,
            disk_mib: disk,
            connect_window_secs: connect,
            grace_secs: grace,
        })
}

/// The most CPU time `cores` could give `elapsed_ms` after the first login,
/// restated: 5 % and one CPU-second per core of tolerance.
fn possible_us(cores: u32, elapsed_ms: u64) -> u64 {
    let per_core = u128::from(elapsed_ms) * 1050 + 1_000_000;
    u64::try_from(per_core * u128::from(cores)).unwrap_or(u64::MAX)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn settlement_holds_against_lies(
        terms in terms(),
        cores in 1u32..16,
        price in 0u64..10_000_000_000,
        share in 0u32..=1_000_000,
        steps in proptest::collection::vec((event(), 0u64..400_000), 1..40),
    ) {
        let pricing = Pricing { price_sat: price, owner_share_ppm: share };
        let (client, owner, id) = (AccountId([1; 32]), AccountId([2; 32]), OrderId([3; 12]));
        let mut books = Books::default();
        books.apply(&[deposit(Account::Client(client), price)]).unwrap();
        books.apply(&charge(client, id, price)).unwrap();
        let mut order = Order::new(0, pricing, terms, cores);

        // What the test itself saw.
        let mut now = 0u64;
        let mut first: Option<u64> = None;
        let mut open = 0u32;
        let mut closed_at: Option<u64> = None;
        let mut proven = 0u64;
        let mut lied = false;
        let mut last = Receipt {
            order_id: id,
            node_id: PeerId([4; 32]),
            seq: 0,
            prev: [0; 32],
            cpu_us: 0,
            peak_mem: 0,
            peak_procs: 0,
            peak_disk: 0,
            wall_ms: 0,
            finish: None,
        };
        let mut final_receipt: Option<Receipt> = None;
        let mut claim: Option<(EndReason, Party, u64)> = None;
        let mut settlement = None;

        let steps = steps.into_iter().map(Some).chain([None]);
        for step in steps {
            let (ev, dt) = step.unwrap_or((Event::Tick, u64::MAX / 4));
            now = now.saturating_add(dt);
            if settlement.is_some() {
                break;
            }
            let s = match ev {
                Event::Connect => {
                    if order.handle_connect(now) {
                        first.get_or_insert(now);
                        open += 1;
                        closed_at = None;
                    }
                    None
                }
                Event::Disconnect => {
                    if order.state == OrderState::Connected {
                        open = open.saturating_sub(1);
                        if open == 0 {
                            closed_at = Some(now);
                        }
                    }
                    order.handle_disconnect(now);
                    None
                }
                Event::Receipt { cpu_ppm, mem, procs, disk, finish } => {
                    // The chain's rules (checked by the verifier before an
                    // order sees a receipt): counters never go down, nothing
                    // after the final receipt.
                    if final_receipt.is_none() {
                        let possible = possible_us(cores, first.map_or(0, |f| now - f));
                        let cpu = u64::try_from(u128::from(possible) * u128::from(cpu_ppm) / 1_000_000)
                            .unwrap_or(u64::MAX)
                            .max(last.cpu_us);
                        let r = Receipt {
                            seq: last.seq + 1,
                            cpu_us: cpu,
                            peak_mem: last.peak_mem.max(mem),
                            peak_procs: last.peak_procs.max(procs),
                            peak_disk: last.peak_disk.max(disk),
                            finish: finish.map(|i| EndReason::ALL[i]),
                            ..last
                        };
                        order.handle_receipt(now, &r);
                        lied |= cpu > possible;
                        proven = proven.max(cpu.min(possible).min(CPU_HOUR_US));
                        if r.finish.is_some() {
                            final_receipt = Some(r);
                        }
                        last = r;
                    }
                    None
                }
                Event::NodeEnd(i) => {
                    let reason = EndReason::ALL[i];
                    claim = Some((reason, Party::Node, now));
                    order.handle_end(now, reason, Party::Node)
                }
                Event::BrokerEnd(lost) => {
                    let reason = if lost { EndReason::NodeLost } else { EndReason::Cancelled };
                    claim = Some((reason, Party::Broker, now));
                    order.handle_end(now, reason, Party::Broker)
                }
                Event::Tick => {
                    let before = order.state;
                    let s = order.handle_tick(now);
                    if s.is_some() {
                        // Past the wall limit (and its overrun) the session
                        // is over by the clock; before it, the client left
                        // and the grace (and its overrun) ran out.
                        let wall_passed = first.is_some_and(|f| {
                            now >= f + terms.wall_ms() + jusy_common::verdict::WALL_OVERRUN_MS
                        });
                        let reason = if before == OrderState::Reserved {
                            EndReason::NeverConnected
                        } else if wall_passed {
                            EndReason::WallClock
                        } else {
                            EndReason::ClientClosed
                        };
                        claim = Some((reason, Party::Broker, now));
                    }
                    s
                }
            };
            if let Some(s) = s {
                books.apply(&settle(id, client, Some(owner), s)).unwrap();
                settlement = Some(s);
            }
        }

        // Every order ends, by the broker's timers if nothing else.
        let s = settlement.expect("the order never ended");
        let (reason, by, at) = claim.expect("an end");
        let v = order.verdict.expect("a verdict");
        prop_assert!(order.state.is_final());
        prop_assert_eq!((v.reason, v.by), (reason, by));

        // Money is conserved: the price is paid out exactly, once.
        prop_assert_eq!(s.refund as u128 + s.owner as u128 + s.operator as u128, price as u128);
        books.check().unwrap();
        prop_assert_eq!(books.balance(&Account::Escrow(id)), 0);
        prop_assert_eq!(books.balance(&Account::Client(client)), s.refund);

        // What the proven CPU time is worth is all the owner may get.
        prop_assert_eq!(order.proven_cpu_us, proven);
        let worth = price_of(price, proven);
        let owner_cap = u64::try_from(u128::from(worth) * u128::from(share) / 1_000_000).unwrap();
        prop_assert!(s.owner <= owner_cap, "owner {} > {}", s.owner, owner_cap);

        // The client pays more than that only when the end was its own on
        // evidence the broker checks.
        let paid = price - s.refund;
        let last_final = final_receipt.filter(|r| r.finish == Some(reason));
        let clients_end = match (first, by, reason) {
            (None, _, _) => false,
            (Some(_), Party::Broker, EndReason::WallClock) => true,
            (Some(f), Party::Broker, EndReason::ClientClosed) => {
                open == 0 && closed_at.unwrap_or(at).saturating_sub(f) >= 20_000
            }
            (Some(f), Party::Node, EndReason::ClientClosed) => {
                open == 0 && closed_at.unwrap_or(at).saturating_sub(f) >= 20_000
            }
            (Some(_), Party::Node, EndReason::CpuDone) => {
                proven + 1_000_000 + terms.cpu_budget_us() / 100 >= terms.cpu_budget_us()
            }
            (Some(f), Party::Node, EndReason::WallClock) => at - f + 5_000 >= terms.wall_ms(),
            (Some(_), Party::Node, EndReason::MemoryLimit) => {
                last_final.is_some_and(|r| u128::from(r.peak_mem) >= u128::from(terms.memory_bytes()) * 9 / 10)
            }
            (Some(_), Party::Node, EndReason::ProcessLimit) => {
                last_final.is_some_and(|r| r.peak_procs >= terms.max_processes)
            }
            (Some(_), Party::Node, EndReason::DiskLimit) => last_final.is_some_and(|r| {
                terms.disk_bytes().is_some_and(|d| u128::from(r.peak_disk) >= u128::from(d) * 8 / 10)
            }),
            _ => false,
        };
        if clients_end {
            prop_assert_eq!(v.payout, Payout::Price);
        } else {
            prop_assert!(paid <= worth, "paid {} for proven CPU worth {}: {:?}", paid, worth, v);
        }
        if first.is_none() {
            prop_assert_eq!(s.refund, price, "nobody logged in: all back");
        }

        // Whose fault: a node's unsupported claim or impossible receipt is
        // the node's, and never counts against the client.
        let node_claim_unsupported = by == Party::Node
            && first.is_some()
            && !clients_end
            && !(reason == EndReason::ClientClosed && open == 0);
        if node_claim_unsupported || lied {
            prop_assert!(v.against_node(), "{:?}", v);
        }
        if v.fault == Fault::Client {
            prop_assert!(clients_end && by == Party::Node, "{:?}", v);
            prop_assert!(!node_claim_unsupported);
        }
        prop_assert_eq!(v.lied, lied);
    }
}
