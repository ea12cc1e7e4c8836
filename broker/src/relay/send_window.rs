//! How much a relay buffers towards one node: the connection's QUIC send
//! window, sized from what the path to the node delivers.
//!
//! quinn accepts stream writes up to the window, and a client uploads far
//! faster than a node's downlink (or the relay's core) takes the bytes: with
//! a fixed window sized for a fast, long path, every busy session holds that
//! much in the relay. Here the window follows twice the bandwidth-delay
//! product the connection measures (the rate it delivers times its shortest
//! round trip, as BBR sizes what it keeps in flight): on a path the window
//! limits, the bytes in flight are the whole window, so the next window
//! doubles; on a path that limits itself, it settles at twice what the path
//! carries in one round trip. The shortest round trip, not the current one:
//! bytes queued on the way make the round trip longer, and a window sized on
//! that would grow the queue that grew it.

use std::time::Duration;

use tokio::time::Instant;

/// The smallest window: a few hundred round trips of a home uplink's worth,
/// and what a connection starts with.
pub const MIN: u64 = 2 << 20;

/// The largest window: 32 MiB, 4 Gbit/s at 64 ms.
pub const MAX: u64 = 32 << 20;

/// How often a busy connection's window is looked at.
const EVERY: Duration = Duration::from_millis(250);

/// Round trips shorter than this (loopback) count as this long: a window is
/// never sized for less than a millisecond of the measured rate.
const MIN_RTT: Duration = Duration::from_millis(1);

/// The window for a connection that sent `sent` bytes in `elapsed` on a path
/// whose shortest round trip is `rtt`: twice its bandwidth-delay product,
/// held to [`MIN`]..=[`MAX`].
pub fn window(sent: u64, elapsed: Duration, rtt: Duration) -> u64 {
    let elapsed = elapsed.as_secs_f64();
    if elapsed <= 0.0 {
        return MIN;
    }
    let bdp = sent as f64 / elapsed * rtt.max(MIN_RTT).as_secs_f64();
    // Saturating float-to-int cast; clamp bounds it either way.
    ((2.0 * bdp) as u64).clamp(MIN, MAX)
}

/// Retunes one connection's send window while a client uploads through it.
#[derive(Debug, Default)]
pub struct Tuner {
    /// When the last sample was taken, and the connection's bytes sent then.
    last: Option<(Instant, u64)>,
    /// The shortest round trip seen, from before the upload queued anything.
    min_rtt: Option<Duration>,
}

impl Tuner {
    /// Samples `conn` at most every [`EVERY`] and sets its send window.
    pub fn tick(&mut self, conn: &super::quic::Connection) {
        let now = Instant::now();
        if self.last.is_some_and(|(at, _)| now - at < EVERY) {
            return;
        }
        let sent = conn.sent_bytes();
        let rtt = conn.rtt();
        let min_rtt = *self
            .min_rtt
            .insert(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        if let Some((at, before)) = self.last {
            conn.set_send_window(window(sent.saturating_sub(before), now - at, min_rtt));
        }
        self.last = Some((now, sent));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn near(got: u64, want: u64) -> bool {
        got.abs_diff(want) <= 2
    }

    #[test]
    fn a_path_the_window_limits_gets_twice_the_window() {
        // 4 MiB in flight per 40 ms round trip: the window was the limit.
        let w = 4 << 20;
        let sent = w * 25 / 4; // over 250 ms: w per 40 ms
        assert!(near(window(sent, 250 * MS, 40 * MS), 2 * w));
    }

    #[test]
    fn a_slow_path_settles_at_twice_its_bandwidth_delay_product() {
        // 100 Mbit/s at 50 ms: 625 kB in flight, under the floor.
        let sent = 100_000_000 / 8 / 4; // over 250 ms
        assert_eq!(window(sent, 250 * MS, 50 * MS), MIN);
        // 1 Gbit/s at 20 ms: 2.5 MB in flight, twice that.
        let sent = 1_000_000_000 / 8 / 4;
        assert!(near(window(sent, 250 * MS, 20 * MS), 5_000_000));
    }

    #[test]
    fn the_window_stays_within_its_bounds() {
        assert_eq!(window(0, 250 * MS, 40 * MS), MIN, "an idle connection");
        assert_eq!(window(u64::MAX, 250 * MS, 40 * MS), MAX);
        assert_eq!(window(1 << 30, Duration::ZERO, 40 * MS), MIN);
        // Loopback's microseconds count as a millisecond.
        assert_eq!(
            window(3 << 30, Duration::from_secs(1), Duration::from_micros(50)),
            window(3 << 30, Duration::from_secs(1), MS)
        );
    }
}
