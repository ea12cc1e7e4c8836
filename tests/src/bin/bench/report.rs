//! The results table: medians per contender, the targets as ratios,
//! and the machine they were measured on, as Markdown.

use std::fmt::Write;
use std::process::Command;

use crate::capacity::{Active, Capacity};

pub const COLUMNS: [&str; 6] = [
    "jusy",
    "node SSH direct",
    "OpenSSH direct",
    "OpenSSH reverse relay",
    "bore",
    "rathole",
];
/// The largest datagram a relay tries towards a node across the internet:
/// an IPv4 packet on a 1500-byte link, less its IP and UDP headers
/// (`jusy_node::mtu_towards`).
pub const INTERNET_MTU: u16 = 1500 - 28;

const JUSY: usize = 0;
const NODE_DIRECT: usize = 1;
pub const OPENSSH_DIRECT: usize = 2;
const REVERSE: usize = 3;
const BORE: usize = 4;

/// Measured rows: a label, and per column the summary value (if measured).
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<(String, [Option<f64>; COLUMNS.len()], usize)>,
    pub capacity: Vec<Capacity>,
    pub active: Option<Active>,
    pub receipts_per_sec: Option<f64>,
    /// Runs that failed (left out of the medians), shown under the table.
    failures: Vec<String>,
}

pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

pub fn p99(v: &[f64]) -> f64 {
    quantile(v, 0.99)
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 - 1.0) * q).round() as usize;
    s.get(i).copied().unwrap_or(f64::NAN)
}

impl Table {
    /// A row of medians, shown with `decimals` digits.
    pub fn row(&mut self, label: &str, samples: &[Vec<f64>; COLUMNS.len()], decimals: usize) {
        self.row_with(label, samples, decimals, median);
    }

    pub fn row_with(
        &mut self,
        label: &str,
        samples: &[Vec<f64>; COLUMNS.len()],
        decimals: usize,
        summary: fn(&[f64]) -> f64,
    ) {
        let values = samples
            .each_ref()
            .map(|s| (!s.is_empty()).then(|| summary(s)));
        self.rows.push((label.to_owned(), values, decimals));
    }

    /// Records a failed run of `column`; the bench goes on without it.
    pub fn failed(&mut self, column: usize, what: &str, e: &anyhow::Error) {
        let name = COLUMNS.get(column).copied().unwrap_or("?");
        eprintln!("bench: {name}: {what} failed: {e:#}");
        let first = format!("{e:#}");
        let first = first.lines().next().unwrap_or_default();
        self.failures.push(format!("{name}, {what}: {first}"));
    }

    fn get(&self, prefix: &str, col: usize) -> Option<f64> {
        self.rows
            .iter()
            .find(|(l, _, _)| l.starts_with(prefix))
            .and_then(|(_, v, _)| v.get(col).copied().flatten())
    }
}

/// The whole report: machine, table, targets.
pub fn markdown(t: &Table, sizes: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Produced by `cargo run --release -p jusy-tests --bin bench` (see README). \
         All on loopback, contenders interleaved round by round; every cell is a median \
         unless it says otherwise.\n"
    );
    let _ = writeln!(s, "{}", machine());
    let _ = writeln!(s, "Sizes: {sizes}.\n");
    let _ = writeln!(s, "| | {} |", COLUMNS.join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(COLUMNS.len()));
    for (label, values, decimals) in &t.rows {
        let cells: Vec<String> = values
            .iter()
            .map(|v| v.map_or("—".to_owned(), |v| format!("{v:.decimals$}")))
            .collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    if !t.failures.is_empty() {
        let _ = writeln!(s, "\nFailed runs, left out of the medians:\n");
        for f in &t.failures {
            let _ = writeln!(s, "* {f}");
        }
    }
    let _ = writeln!(
        s,
        "\nIn the raw rows (echo, one stream) there is no SSH: \"OpenSSH direct\" is plain \
         loopback TCP to the echo/sink service (the baseline), jusy is the order port → QUIC \
         stream path of a relay to a simulated node that serves the workload on its streams, \
         and the reverse relay is the `ssh -R` forwarded port.\n"
    );
    if !t.capacity.is_empty() {
        let _ = writeln!(
            s,
            "## Relay capacity (idle simulated nodes: real QUIC handshake, hello, keep-alives)\n"
        );
        let _ = writeln!(
            s,
            "A relay tries QUIC datagrams up to what its route to the node carries, held to \
             `quic_max_mtu` (default {}). The simulated nodes are on loopback, which carries \
             any size; a node across the internet is behind a 1500-byte link, where the relay \
             tries {INTERNET_MTU} bytes. That row is measured on loopback with \
             `quic_max_mtu = {INTERNET_MTU}`, which gives the same connections.\n",
            jusy_node::QUIC_MTU
        );
        let _ = writeln!(
            s,
            "| largest datagram tried | nodes | relay RSS, MiB | RSS per node, KB | relay CPU, % of a core | CPU per node, µs/s |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
        for c in &t.capacity {
            let _ = writeln!(
                s,
                "| {}{} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
                c.mtu,
                match c.mtu {
                    jusy_node::QUIC_MTU => " (loopback, jumbo-frame LAN)",
                    INTERNET_MTU => " (a node across the internet)",
                    _ => "",
                },
                c.nodes,
                c.rss_kb as f64 / 1024.0,
                c.rss_per_node_kb(),
                c.cpu_percent,
                c.cpu_percent / 100.0 * 1e6 / c.nodes as f64
            );
        }
        let _ = writeln!(s);
    }
    if let Some(a) = t.active {
        let _ = writeln!(
            s,
            "## Relay with {} active sessions (each on its own simulated node, every client \
             streaming into its node's sink at once)\n",
            a.sessions
        );
        let _ = writeln!(
            s,
            "| sessions | all clients together, Gbit/s | relay CPU, % of a core | relay RSS, MiB | RSS per session above the idle relay, KB |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.1} | {:.1} | {:.1} |\n",
            a.sessions,
            a.gbps,
            a.cpu_percent,
            a.rss_kb as f64 / 1024.0,
            a.rss_per_session_kb()
        );
    }
    if let Some(r) = t.receipts_per_sec {
        let _ = writeln!(
            s,
            "Receipt verification (decode + ed25519 signature + chain checks, one thread): \
             **{r:.0} receipts/s per core**.\n"
        );
    }
    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(s, "| target | measured | met |");
    let _ = writeln!(s, "|---|---:|---|");
    let mut target = |name: &str, value: Option<f64>, unit: &str, ok: fn(f64) -> bool| {
        let (shown, met) = match value {
            Some(v) if v.is_finite() => (
                format!("{v:.2}{unit}"),
                if ok(v) { "yes" } else { "**no**" },
            ),
            _ => ("—".to_owned(), "not measured"),
        };
        let _ = writeln!(s, "| {name} | {shown} | {met} |");
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let bulk = |c| t.get("SSH bulk", c);
    target(
        "bulk ≥ 1.0× bore",
        ratio(bulk(JUSY), bulk(BORE)),
        "×",
        |v| v >= 1.0,
    );
    target(
        "bulk ≥ 1.8× OpenSSH reverse relay",
        ratio(bulk(JUSY), bulk(REVERSE)),
        "×",
        |v| v >= 1.8,
    );
    target(
        "relay costs ≤ 10 % of bulk vs node SSH direct",
        ratio(bulk(JUSY), bulk(NODE_DIRECT)).map(|r| (1.0 - r) * 100.0),
        " %",
        |v| v <= 10.0,
    );
    let t_true = |c| t.get("`ssh … true`", c);
    target(
        "`ssh true` ≤ 0.6× OpenSSH direct",
        ratio(t_true(JUSY), t_true(OPENSSH_DIRECT)),
        "×",
        |v| v <= 0.6,
    );
    target(
        "order-to-first-command ≤ 150 ms",
        t.get("order (HTTP)", JUSY),
        " ms",
        |v| v <= 150.0,
    );
    let added = |c| t.get("added by the tunnel", c);
    target(
        "added echo latency ≤ 0.8× bore's",
        ratio(added(JUSY), added(BORE)),
        "×",
        |v| v <= 0.8,
    );
    target(
        "raw tunnel ≥ 5 Gbit/s, one stream",
        t.get("one TCP stream", JUSY),
        " Gbit/s",
        |v| v >= 5.0,
    );
    for (mtu, whom) in [
        (INTERNET_MTU, "nodes across the internet"),
        (jusy_node::QUIC_MTU, "nodes on loopback"),
    ] {
        target(
            &format!("≤ 30 KB relay memory per idle node at 10,000 ({whom})"),
            t.capacity
                .iter()
                .find(|c| c.nodes >= 10_000 && c.mtu == mtu)
                .map(Capacity::rss_per_node_kb),
            " KB",
            |v| v <= 30.0,
        );
    }
    s
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|_| "not installed".into())
    };
    let tool = |name: &str| match crate::tools::which(name) {
        Some(p) => version(&p.to_string_lossy(), &["--version"]),
        None => "not installed".into(),
    };
    format!(
        "Machine: {cores} cores, {cpu}, Linux {}. Date: {}.\n\n\
         Versions: jusy {} ({}), {}, {}, {}, {}.\n",
        kernel.trim(),
        version("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        env!("CARGO_PKG_VERSION"),
        version("git", &["rev-parse", "--short", "HEAD"]),
        version("ssh", &["-V"]),
        tool("bore"),
        tool("rathole"),
        version("rustc", &["--version"]),
    )
}
