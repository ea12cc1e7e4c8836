//! The lies `jusy-liar` tells, as data: which terms it signs, what it claims
//! one second after a client's first login, and whether it ends sessions at
//! all. No I/O here; `link.rs` sends what these say.

use jusy_common::receipt::Counted;
use jusy_common::terms::OrderTerms;
use jusy_common::wire::EndReason;

/// One CPU-second, in the receipts' microseconds.
const CPU_SECOND_US: u64 = 1_000_000;

/// What the lying receipts show besides CPU time: a small, quiet session
/// (64 MiB of memory, 3 processes, 1 MiB of disk), far from every limit.
const QUIET: Counted = Counted {
    cpu_us: CPU_SECOND_US,
    peak_mem: 64 << 20,
    peak_procs: 3,
    peak_disk: 1 << 20,
};

/// A lie, chosen with `--lie`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lie {
    /// Ends with `DONE` one second after the first login, on a final receipt
    /// of one CPU-second.
    EarlyDone,
    /// Receipt 0, one second after the first login, claims a whole CPU-hour;
    /// the session then ends as a real node's would.
    ImpossibleReceipt,
    /// Ends with `RAM` one second after the first login, its final receipt
    /// showing 64 MiB of memory.
    RamWithoutEvidence,
    /// Ends with `PROC`, its final receipt showing 3 processes.
    ProcWithoutEvidence,
    /// Ends with `DISK`, its final receipt showing 1 MiB of disk.
    DiskWithoutEvidence,
    /// Signs a receipt of one CPU-second after the first login, then never
    /// ends the session: not when the client leaves, not when the broker
    /// cancels it.
    NeverEnds,
    /// Signs its acceptance of other terms than the order's: half the CPU
    /// budget and half the memory.
    IgnoresTerms,
    /// As soon as its speed test is answered, signs a receipt for another
    /// node's order (`--victim`) claiming a CPU-hour, and ends that order.
    EndsOthers,
}

/// What the liar signs one second after an order's first login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub counted: Counted,
    /// Set when the receipt is the final one and the session is declared
    /// over with this reason.
    pub finish: Option<EndReason>,
}

impl Lie {
    /// The name given to `--lie`.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// The terms the liar signs for an order sold on `terms`.
    pub fn signs(self, terms: OrderTerms) -> OrderTerms {
        match self {
            Lie::IgnoresTerms => OrderTerms {
                cpu_budget_secs: (terms.cpu_budget_secs / 2).max(1),
                memory_mib: (terms.memory_mib / 2).max(1),
                ..terms
            },
            _ => terms,
        }
    }

    /// What it claims one second after an order's first login, if anything.
    pub fn claim(self) -> Option<Claim> {
        let ends = |reason| {
            Some(Claim {
                counted: QUIET,
                finish: Some(reason),
            })
        };
        match self {
            Lie::EarlyDone => ends(EndReason::CpuDone),
            Lie::RamWithoutEvidence => ends(EndReason::MemoryLimit),
            Lie::ProcWithoutEvidence => ends(EndReason::ProcessLimit),
            Lie::DiskWithoutEvidence => ends(EndReason::DiskLimit),
            Lie::ImpossibleReceipt => Some(Claim {
                counted: Counted {
                    cpu_us: 3600 * CPU_SECOND_US,
                    ..QUIET
                },
                finish: None,
            }),
            Lie::NeverEnds => Some(Claim {
                counted: QUIET,
                finish: None,
            }),
            Lie::IgnoresTerms | Lie::EndsOthers => None,
        }
    }

    /// Whether it ends a session when its client leaves or the broker
    /// cancels it, as a real node does.
    pub fn ends_sessions(self) -> bool {
        self != Lie::NeverEnds
    }

    /// What it claims about another node's order.
    pub fn victim_claim() -> Counted {
        Counted {
            cpu_us: 3600 * CPU_SECOND_US,
            ..QUIET
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ignores_terms_signs_other_terms() {
        let sold = OrderTerms::default();
        let signed = Lie::IgnoresTerms.signs(sold);
        assert_ne!(signed, sold);
        assert_eq!(signed.cpu_budget_secs, sold.cpu_budget_secs / 2);
        assert_eq!(signed.wall_secs, sold.wall_secs);
        for lie in [Lie::EarlyDone, Lie::NeverEnds, Lie::EndsOthers] {
            assert_eq!(lie.signs(sold), sold, "{lie:?}");
        }
    }

    #[test]
    fn limit_ends_come_without_their_evidence() {
        let sold = OrderTerms::default();
        for lie in [
            Lie::RamWithoutEvidence,
            Lie::ProcWithoutEvidence,
            Lie::DiskWithoutEvidence,
        ] {
            let claim = lie.claim().expect("a limit lie claims an end");
            assert!(claim.finish.is_some(), "{lie:?}");
            assert!(claim.counted.peak_mem < sold.memory_bytes() / 2);
            assert!(claim.counted.peak_procs < sold.max_processes);
        }
        assert_eq!(Lie::EarlyDone.name(), "early-done");
    }
}
