//! What a receipt can prove: no more CPU time than the node's cores could
//! have given since the client first logged in, as the broker's own clock
//! measured it.
//!
//! The cores are the fewer of what the node reports and what its last speed
//! test supported (`crate::speed`: one lane per core, all within the limit).
//! The bound has a tolerance — 5 % more, plus one CPU-second per core — for
//! clocks that tick a little differently and for the moments between the
//! node seeing a login and the broker hearing of it. CPU time a receipt
//! claims beyond it is not proven, and the receipt is a fault of the node.

/// The bound's proportional tolerance, in parts per million of the wall time.
pub const TOLERANCE_PPM: u64 = 1_050_000;

/// The bound's constant tolerance: CPU microseconds per core.
pub const SLACK_US_PER_CORE: u64 = 1_000_000;

/// The cores a node is believed to have: what it reports, held to what its
/// speed test supported (`None`: the operator turned the test off and takes
/// nodes at their word); at least one.
pub fn cores(reported: u32, tested: Option<u32>) -> u32 {
    tested.map_or(reported, |t| t.min(reported)).max(1)
}

/// The most CPU microseconds `cores` cores can have used in `elapsed_ms` of
/// wall time (with the tolerance).
pub fn cpu_bound_us(cores: u32, elapsed_ms: u64) -> u64 {
    let cores = u128::from(cores.max(1));
    let per_core = u128::from(elapsed_ms) * 1000 * u128::from(TOLERANCE_PPM) / 1_000_000
        + u128::from(SLACK_US_PER_CORE);
    u64::try_from(per_core * cores).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_the_fewer_of_report_and_test() {
        assert_eq!(cores(8, Some(4)), 4);
        assert_eq!(cores(2, Some(4)), 2);
        assert_eq!(cores(8, None), 8);
        assert_eq!(cores(0, Some(0)), 1);
    }

    #[test]
    fn the_bound_is_wall_time_times_cores_with_tolerance() {
        assert_eq!(cpu_bound_us(1, 0), 1_000_000);
        assert_eq!(cpu_bound_us(2, 15_000), 2 * (15_750_000 + 1_000_000));
        assert_eq!(cpu_bound_us(4, 3_600_000), 4 * (3_780_000_000 + 1_000_000));
        assert_eq!(cpu_bound_us(u32::MAX, u64::MAX), u64::MAX);
    }
}
