//! What the pages show, computed without I/O: amounts, times, CPU time, an
//! order's row with its receipt check, and SVG charts (bars and a rising line)
//! laid out in whole pixels for the templates to draw.

use jusy_common::identity::PeerId;
use jusy_common::order::OrderState;
use jusy_common::receipt::{ChainVerifier, SignedReceipt};
use jusy_common::verdict::{Party, Verdict};
use jusy_common::wire::{EndReason, OrderId};

use jusy_common::hold::{Hold, HoldState};

use crate::ledger::OrderRecord;
use crate::store::now_ms;

/// Satoshi with thousands separators: `1 234 567 sat`.
pub fn sat(amount: u64) -> String {
    let digits = amount.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    format!("{out} sat")
}

/// CPU time: milliseconds under a second (a short session's few
/// milliseconds would read as "0.0 s"), else seconds with one decimal.
pub fn cpu(us: u64) -> String {
    if us < 1_000_000 {
        format!("{} ms", us / 1_000)
    } else {
        format!("{}.{} s", us / 1_000_000, (us % 1_000_000) / 100_000)
    }
}

/// A byte count in the largest binary unit that keeps it at least 1.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut unit = 0;
    let mut scaled = n;
    while scaled >= 1024 * 1024 && unit + 1 < UNITS.len() {
        scaled /= 1024;
        unit += 1;
    }
    let tenths = scaled * 10 / 1024;
    format!(
        "{}.{} {}",
        tenths / 10,
        tenths % 10,
        UNITS.get(unit).copied().unwrap_or("TiB")
    )
}

/// A duration in the largest whole unit: `24 h`, `90 min`, `5 s`.
pub fn duration_words(ms: u64) -> String {
    let secs = ms / 1000;
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{} h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// A Unix time in milliseconds as `YYYY-MM-DD HH:MM` UTC.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// The first 12 characters of an id, enough to tell orders and nodes apart.
pub fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// An order as a history row.
#[derive(Debug, Clone)]
pub struct OrderRow {
    pub id: String,
    pub short_id: String,
    pub created: String,
    pub state: &'static str,
    /// Why it ended, in words; empty while it runs.
    pub reason: String,
    pub cpu: String,
    pub cpu_us: u64,
    /// The session's network traffic: sent ↑, received ↓.
    pub net: String,
    pub charged: String,
    pub refunded: String,
    pub node: String,
    pub owner_earned: u64,
    pub receipts: usize,
    pub receipt_check: String,
    pub receipts_ok: bool,
    /// What became of the owner's earnings: held, disputed, released or
    /// refunded, in words; empty when the owner earned nothing.
    pub hold: String,
    /// Whether the client may dispute them now.
    pub disputable: bool,
    /// The client's reason, once disputed.
    pub dispute_reason: String,
}

/// What became of an order's held earnings, in words, at `now_ms`.
pub fn hold_words(h: &Hold, now_ms: u64) -> String {
    let refunded = h.dispute.as_ref().map_or(0, |d| d.refunded_sat);
    match h.state {
        HoldState::Held if now_ms < h.until_ms => format!(
            "{} held for the owner until {} UTC; you may dispute it until then",
            sat(h.amount_sat),
            utc(h.until_ms)
        ),
        HoldState::Held => format!("{} due to the owner", sat(h.amount_sat)),
        HoldState::Disputed => format!(
            "{} disputed: held until the operator decides",
            sat(h.amount_sat)
        ),
        HoldState::Refunded => format!("{} refunded after the dispute", sat(refunded)),
        HoldState::Released if h.dispute.as_ref().is_some_and(|d| d.rejected) => {
            format!(
                "dispute rejected: {} released to the owner",
                sat(h.amount_sat)
            )
        }
        HoldState::Released if refunded > 0 => format!(
            "{} refunded after the dispute, {} released to the owner",
            sat(refunded),
            sat(h.amount_sat - refunded)
        ),
        HoldState::Released => format!("{} released to the owner", sat(h.amount_sat)),
    }
}

/// What the broker made of an end, in words, after its reason.
fn verdict_words(v: &Verdict) -> String {
    let mut words = String::new();
    if v.quick_close {
        words.push_str(" within 20 s: proven CPU paid, the rest refunded");
    }
    if !v.upheld {
        words.push_str(" — not shown by the evidence: the node's fault, unproven part refunded");
    }
    if v.by == Party::Broker && v.reason == EndReason::WallClock {
        words.push_str(" — ended by the broker's clock");
    }
    if v.lied {
        words.push_str(" — the node claimed more CPU time than was possible");
    }
    words
}

/// A finish reason in words.
fn reason_words(code: &str) -> &'static str {
    match code {
        "CLIENT_CLOSED" => "client closed",
        "NEVER_CONNECTED" => "never connected (refunded)",
        "WALL" => "wall clock limit",
        "CANCELLED" => "cancelled by the broker",
        "NODE_SHUTDOWN" => "node shut down",
        "NODE_LOST" => "node lost",
        "NODE_FAILED" => "node failed",
        "DONE" => "CPU hour used",
        "RAM" => "memory limit",
        "PROC" => "process limit",
        "DISK" => "disk limit",
        _ => "ended",
    }
}

impl OrderRow {
    pub fn new(id: OrderId, rec: &OrderRecord, receipts: &[Vec<u8>]) -> Self {
        let o = &rec.order;
        let (state, mut reason) = match o.state {
            OrderState::Reserved => ("waiting", String::new()),
            OrderState::Connected => ("running", String::new()),
            OrderState::Finished(r) => ("finished", reason_words(r.code()).to_owned()),
            OrderState::Cancelled(r) => ("cancelled", reason_words(r.code()).to_owned()),
        };
        if let Some(v) = o.verdict {
            reason.push_str(&verdict_words(&v));
        }
        let (receipts_ok, receipt_check) = check_receipts(id, &rec.node_id, receipts);
        Self {
            id: id.to_string(),
            short_id: short(&id.to_string()),
            created: utc(rec.created_ms),
            state,
            reason,
            cpu: cpu(o.proven_cpu_us),
            cpu_us: o.proven_cpu_us,
            net: format!(
                "↑ {} ↓ {}",
                bytes(rec.traffic.sent),
                bytes(rec.traffic.received)
            ),
            charged: sat(o.pricing.price_sat),
            refunded: o
                .settlement
                .map_or_else(|| "held".to_owned(), |s| sat(s.refund)),
            node: short(&rec.node_id),
            owner_earned: o.settlement.map_or(0, |s| s.owner),
            receipts: receipts.len(),
            receipt_check,
            receipts_ok,
            hold: rec
                .hold
                .as_ref()
                .map(|h| hold_words(h, now_ms()))
                .unwrap_or_default(),
            disputable: rec.hold.as_ref().is_some_and(|h| h.disputable(now_ms())),
            dispute_reason: rec
                .hold
                .as_ref()
                .and_then(|h| h.dispute.as_ref())
                .map(|d| d.reason.clone())
                .unwrap_or_default(),
        }
    }
}

/// Verifies an order's receipts as a client would: each signed by the order's
/// node, for this order, chained in sequence.
pub fn check_receipts(id: OrderId, node_id: &str, receipts: &[Vec<u8>]) -> (bool, String) {
    if receipts.is_empty() {
        return (true, "none yet".to_owned());
    }
    let Ok(node) = node_id.parse::<PeerId>() else {
        return (false, "unknown node key".to_owned());
    };
    let mut chain = ChainVerifier::new(id, node);
    for (i, bytes) in receipts.iter().enumerate() {
        if let Err(e) = SignedReceipt::decode(bytes).and_then(|r| chain.accept(&r)) {
            return (false, format!("receipt {i} fails: {e}"));
        }
    }
    (true, "verified".to_owned())
}

/// Chart size in SVG user units; the SVG scales to the page width.
pub const WIDTH: u32 = 600;
pub const HEIGHT: u32 = 200;
/// Room on the left for the axis label.
const LEFT: u32 = 8;
/// Widest bar, so that a few orders do not look like a solid block.
const MAX_BAR: u32 = 40;

/// One bar of a bar chart.
#[derive(Debug, Clone)]
pub struct Bar {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
    pub title: String,
}

/// A chart ready to draw: bars, or a polyline's points, and its top value.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub bars: Vec<Bar>,
    pub points: String,
    pub top: String,
    pub empty: bool,
}

fn scale(v: u64, max: u64) -> u32 {
    let h = u128::from(v) * u128::from(HEIGHT - 20) / u128::from(max.max(1));
    u32::try_from(h).unwrap_or(HEIGHT)
}

impl Chart {
    /// Bars of `values` (label, value), left to right.
    pub fn bars(values: &[(String, u64)], top: impl Fn(u64) -> String) -> Self {
        let max = values.iter().map(|(_, v)| *v).max().unwrap_or(0);
        let n = u32::try_from(values.len()).unwrap_or(u32::MAX).max(1);
        let slot = ((WIDTH - LEFT) / n).min(MAX_BAR * 4 / 3);
        let w = (slot * 3 / 4).max(1);
        let bars = values
            .iter()
            .zip(0u32..)
            .map(|((label, v), i)| {
                // A zero still shows as a hairline, so the order is visible.
                let h = scale(*v, max).max(1);
                Bar {
                    x: LEFT + i * slot + (slot - w) / 2,
                    y: HEIGHT - h,
                    w,
                    h,
                    title: label.clone(),
                }
            })
            .collect();
        Self {
            bars,
            points: String::new(),
            top: top(max),
            empty: values.is_empty(),
        }
    }

    /// A rising line through cumulative `values`, evenly spaced.
    pub fn cumulative(values: &[u64], top: impl Fn(u64) -> String) -> Self {
        let mut sum = 0u64;
        let totals: Vec<u64> = values
            .iter()
            .map(|v| {
                sum = sum.saturating_add(*v);
                sum
            })
            .collect();
        let n = u32::try_from(totals.len()).unwrap_or(u32::MAX).max(1);
        let step = (WIDTH - LEFT) / n;
        let mut points = format!("{LEFT},{HEIGHT}");
        for (t, i) in totals.iter().zip(1u32..) {
            points.push_str(&format!(" {},{}", LEFT + i * step, HEIGHT - scale(*t, sum)));
        }
        Self {
            bars: Vec::new(),
            points,
            top: top(sum),
            empty: values.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(sat(20_000), "20\u{202f}000 sat");
        assert_eq!(sat(7), "7 sat");
        assert_eq!(cpu(1_250_000), "1.2 s");
        assert_eq!(cpu(43_900), "43 ms");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(1_709_210_096_000), "2024-02-29 12:34");
    }

    #[test]
    fn charts_fit_their_box() {
        let c = Chart::bars(&[("a".into(), 10), ("b".into(), 0)], |m| m.to_string());
        assert_eq!(c.top, "10");
        let [a, b] = c.bars.as_slice() else {
            panic!("two bars")
        };
        assert_eq!(a.y + a.h, HEIGHT);
        assert_eq!(b.h, 1);
        assert!(b.x + b.w <= WIDTH);
        let line = Chart::cumulative(&[5, 5], |m| m.to_string());
        assert_eq!(line.top, "10");
        assert!(line.points.ends_with(&format!("{},20", LEFT + 2 * 296)));
        assert!(Chart::bars(&[], |m| m.to_string()).empty);
    }
}
