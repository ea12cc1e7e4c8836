//! The results table: medians per contender, the targets as ratios,
//! and the machine they were measured on, as Markdown.

use std::fmt::Write;
use std::process::Command;

use crate::api::ApiRun;
use crate::capacity::{Active, Capacity};
use crate::forwarding::Forwarding;

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
    pub api: Vec<ApiRun>,
    pub forwarding: Option<Forwarding>,
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
    // A run of other sections only (`--only`) starts no contenders.
    if !t.rows.is_empty() {
        main_table(&mut s, t);
    }
    if !t.failures.is_empty() {
        let _ = writeln!(s, "Failed runs, left out of the medians:\n");
        for f in &t.failures {
            let _ = writeln!(s, "* {f}");
        }
        let _ = writeln!(s);
    }
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
    if !t.api.is_empty() {
        api_section(&mut s, &t.api);
    }
    if let Some(f) = &t.forwarding {
        let _ = writeln!(
            s,
            "## Session forwarding (NAT lab: a root node at home behind a NAT router, `sshd` on \
             the lab's internet)\n"
        );
        let _ = writeln!(s, "| | SSH bulk to the lab's `sshd`, MB/s | rounds |");
        let _ = writeln!(s, "|---|---:|---:|");
        for (label, v) in [
            ("bulk from node to lab sshd", &f.from_node),
            (
                "bulk from node to lab sshd, weighed as a session",
                &f.from_node_weighed,
            ),
            ("bulk from session to lab sshd", &f.from_session),
        ] {
            let _ = writeln!(s, "| {label} | {:.0} | {} |", median(v), v.len());
        }
        let _ = writeln!(
            s,
            "\nEach runs `head -c … /dev/zero | ssh … 'cat >/dev/null'` (stock OpenSSH both \
             ends), timed where it runs, the three interleaved round by round. From the node: \
             as root in the node's own network namespace, through the home router's NAT; \
             weighed as a session: the same in a cgroup the node's own code makes as it makes \
             a session's, whose parent has a fifth of the default CPU and disk weight. From the \
             session: inside a session (its cgroup under that weight), through its own network \
             namespace and the node's forwarding and masquerading (TCP 22 only; the lab's \
             198.18.0.0/15 allowed with `--net-allow`), then the same router. On a machine \
             whose other work wants the CPU, the weight alone slows the session: the target \
             compares it with the node's own transfer at the same weight, so that what it \
             measures is the forwarding path.\n"
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
    target(
        "session forwarding ≥ 80 % of the node's own (at a session's CPU weight)",
        t.forwarding
            .as_ref()
            .map(|f| median(&f.from_session) / median(&f.from_node_weighed) * 100.0),
        " %",
        |v| v >= 80.0,
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

/// The contenders side by side, and what the raw rows compare.
fn main_table(s: &mut String, t: &Table) {
    let _ = writeln!(s, "| | {} |", COLUMNS.join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(COLUMNS.len()));
    for (label, values, decimals) in &t.rows {
        let cells: Vec<String> = values
            .iter()
            .map(|v| v.map_or("—".to_owned(), |v| format!("{v:.decimals$}")))
            .collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        s,
        "\nIn the raw rows (echo, one stream) there is no SSH: \"OpenSSH direct\" is plain \
         loopback TCP to the echo/sink service (the baseline), jusy is the order port → QUIC \
         stream path of a relay to a simulated node that serves the workload on its streams, \
         and the reverse relay is the `ssh -R` forwarded port.\n"
    );
}

/// The API's order rate, alone and under a slowloris, with the broker's
/// configuration.
fn api_section(s: &mut String, runs: &[ApiRun]) {
    let _ = writeln!(
        s,
        "## HTTP API: orders ({} clients, each with its own account and loopback address, \
         ordering back to back, every order on a new connection)\n",
        crate::api::CLIENTS
    );
    let _ = writeln!(
        s,
        "| | orders/s | median latency, ms | p99 latency, ms | not answered 200 | broker CPU, % of a core | slow connections held: mean, least (opened again) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let slow = if r.slow > 0 {
            format!("{}, {} ({})", r.held.mean, r.held.least, r.held.reopened)
        } else {
            "—".to_owned()
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {slow} |",
            r.label(),
            r.orders_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.failed,
            r.broker_cpu_percent
        );
    }
    let _ = writeln!(
        s,
        "\nThe orders go to {} simulated nodes (real QUIC, hello and slots) that accept each \
         at once and end it as never connected {} s later, offering the slot again: each \
         order is the broker's whole path (rate limits, account, slot claim, order port, \
         ed25519 key, flushed sled reservation, `Assign`/`Accepted` to the node) and its \
         settlement, without waiting for real nodes to prepare slots. Broker configuration: \
         `{}` (rate limits far above what the clients reach; room for the slowloris under the \
         connection cap, which the broker holds to half its open-file limit anyway); \
         everything else default, the 10 s header timeout among it. The slowloris holds \
         {} connections from {} loopback addresses, each sending one byte of a header every \
         {} s and opened again when the broker cuts it at its header timeout.\n",
        crate::api::NODES,
        crate::api::HOLD.as_secs(),
        crate::api::CONFIG.trim().replace('\n', "`, `"),
        runs.iter().map(|r| r.slow).max().unwrap_or(0),
        runs.iter()
            .map(|r| r.slow.div_ceil(crate::api::SLOW_PER_ADDRESS))
            .max()
            .unwrap_or(0),
        crate::api::SLOW_BYTE_EVERY.as_secs(),
    );
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
    // What else ran: on a machine shared with other work every number moves.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let busy = load
        .iter()
        .filter_map(|l| l.parse::<f64>().ok())
        .any(|l| l > cores as f64);
    format!(
        "Machine: {cores} cores, {cpu}, Linux {}. Date: {}. Load average at the end of the \
         run: {} (1, 5 and 15 min){}.\n\n\
         Versions: jusy {} ({}), {}, {}, {}, {}.\n",
        kernel.trim(),
        version("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        load.join(", "),
        if busy {
            ": more than the cores, so other work shared the machine and every number is \
             noisier, and most are lower, than on a quiet one"
        } else {
            ""
        },
        env!("CARGO_PKG_VERSION"),
        version("git", &["rev-parse", "--short", "HEAD"]),
        version("ssh", &["-V"]),
        tool("bore"),
        tool("rathole"),
        version("rustc", &["--version"]),
    )
}
