//! Relay capacity (memory and CPU of one relay holding many idle simulated
//! nodes, or many active sessions), receipt verification throughput, and the
//! `/proc` readings they and the bulk row's CPU time are made of.

use std::time::{Duration, Instant};

use anyhow::Context;
use jusy_common::identity::{PeerId, signing_key_from_seed};
use jusy_common::receipt::{ChainBuilder, ChainVerifier, SignedReceipt};
use jusy_common::wire::OrderId;
use jusy_tests::{Broker, Scene};

/// One relay holding `nodes` idle node connections.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub nodes: usize,
    /// The relay's `quic_max_mtu`.
    pub mtu: u16,
    pub rss_kb: u64,
    pub baseline_kb: u64,
    pub cpu_percent: f64,
}

impl Capacity {
    pub fn rss_per_node_kb(&self) -> f64 {
        self.rss_kb.saturating_sub(self.baseline_kb) as f64 / self.nodes as f64
    }
}

/// How long relay CPU is sampled once the nodes are attached.
const CPU_WINDOW: Duration = Duration::from_secs(10);

/// Attaches idle simulated nodes to a fresh relay in steps up to each count;
/// the relay tries QUIC datagrams up to `mtu` (its `quic_max_mtu`).
pub fn idle_nodes(
    scene: &Scene,
    rt: &tokio::runtime::Runtime,
    counts: &[usize],
    mtu: u16,
) -> anyhow::Result<Vec<Capacity>> {
    let name = format!("broker-capacity-{mtu}");
    let data = scene.subdir(&name)?;
    let broker = fresh_relay(scene, &name, data, &format!("quic_max_mtu = {mtu}\n"))?;
    let pid = broker.proc.pid();
    std::thread::sleep(Duration::from_secs(1));
    let baseline_kb = rss_kb(pid)?;
    let key: PeerId = broker.key.parse()?;
    let mut held = Vec::new();
    let mut endpoints = Vec::new();
    let mut out = Vec::new();
    for &count in counts {
        let start = Instant::now();
        let base = held.len();
        let more = count.saturating_sub(base);
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..more {
                // Several sockets, so that one socket's buffers are not the limit.
                if endpoints.is_empty() || (base + i) % 1000 == 0 {
                    endpoints.push(crate::simnode::endpoint()?);
                }
                let endpoint = endpoints.last().context("endpoint")?.clone();
                let relay = broker.relay;
                set.spawn(async move { crate::simnode::attach(&endpoint, relay, key, 0).await });
                // A bounded number of handshakes in flight.
                if set.len() >= 64
                    && let Some(done) = set.join_next().await
                {
                    held.push(done??);
                }
            }
            while let Some(done) = set.join_next().await {
                held.push(done??);
            }
            anyhow::Ok(())
        })?;
        wait_nodes(scene, &broker, count)?;
        eprintln!(
            "bench: {count} idle nodes attached in {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_secs(3));
        let cpu0 = cpu_ticks(pid)?;
        std::thread::sleep(CPU_WINDOW);
        let cpu1 = cpu_ticks(pid)?;
        out.push(Capacity {
            nodes: count,
            mtu,
            rss_kb: rss_kb(pid)?,
            baseline_kb,
            cpu_percent: cpu_percent(cpu1 - cpu0, CPU_WINDOW),
        });
    }
    drop(held);
    Ok(out)
}

/// Starts a relay for simulated nodes (no speed test, rate limits out of the
/// way) with `config` as its TOML configuration.
fn fresh_relay(
    scene: &Scene,
    name: &str,
    data: std::path::PathBuf,
    config: &str,
) -> anyhow::Result<Broker> {
    let path = scene.dir().join(format!("{name}.toml"));
    // Every simulated node dials from one loopback address, thousands at once.
    let handshakes = "relay_max_handshakes = 100000\n\
                      relay_max_handshakes_per_address = 100000\n\
                      relay_handshakes_per_sec_per_address = 100000\n\
                      relay_handshakes_per_sec = 100000\n";
    std::fs::write(&path, format!("{handshakes}{config}"))?;
    let flags = [
        "--rate-limit-per-sec",
        "1000",
        "--rate-limit-burst",
        "1000",
        "--speed-test-rounds",
        "0",
        "--config",
        path.to_str().context("config path")?,
    ];
    Broker::start_with(scene, name, data, 0, &flags)
}

/// `ticks` of CPU time over `window`, as a percentage of one core.
pub fn cpu_percent(ticks: u64, window: Duration) -> f64 {
    ticks as f64 / ticks_per_sec() / window.as_secs_f64() * 100.0
}

/// The clock ticks `/proc` counts CPU time in, per second.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU time every core of the machine has spent busy since boot, in seconds:
/// `/proc/stat`'s total less idle and I/O wait.
pub fn machine_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("/proc/stat: {line}"))?;
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy: u64 = ticks.iter().take(8).sum::<u64>()
        - ticks.get(3).copied().unwrap_or(0)
        - ticks.get(4).copied().unwrap_or(0);
    Ok(busy as f64 / ticks_per_sec())
}

fn wait_nodes(scene: &Scene, broker: &Broker, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, health) = broker.get(scene, "/health")?;
        if health["nodes"].as_u64() >= Some(count as u64) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "relay never counted {count} nodes: {health}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()
        .context("VmRSS")
}

/// The fields of `/proc/<pid>/stat` after the parenthesised command name
/// (which may hold spaces and parentheses): the state is the first, the
/// parent's pid the second.
pub fn stat_fields(pid: u32) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let fields = stat_fields(pid)?;
    // The 14th and 15th fields of the whole line.
    let field =
        |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context("short stat")?.parse()?) };
    Ok(field(11)? + field(12)?)
}

/// Receipts verified per second on one thread: decode (signature) and chain
/// checks, over one order's chain of signed receipts; median of 5 runs.
pub fn receipts_per_sec() -> anyhow::Result<f64> {
    const CHAIN: u64 = 5000;
    let key = signing_key_from_seed(&[7; 32]).context("key")?;
    let order = OrderId([1; 12]);
    let mut builder = ChainBuilder::new(order, &key);
    let chain: Vec<_> = (0..CHAIN)
        .map(|i| {
            builder
                .next(
                    &key,
                    jusy_common::receipt::Counted {
                        cpu_us: i * 1000,
                        peak_mem: i,
                        ..Default::default()
                    },
                    i * 10,
                    None,
                )
                .map(|r| *r.bytes())
                .context("chain ended early")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut rates = Vec::new();
    for _ in 0..5 {
        let mut verifier = ChainVerifier::new(order, PeerId::from_signing_key(&key));
        let t = Instant::now();
        for bytes in &chain {
            verifier.accept(&SignedReceipt::decode(bytes)?)?;
        }
        rates.push(CHAIN as f64 / t.elapsed().as_secs_f64());
    }
    Ok(crate::report::median(&rates))
}

/// One relay carrying `sessions` sessions at once, each on its own simulated
/// node, every client streaming into its node's sink.
#[derive(Debug, Clone, Copy)]
pub struct Active {
    pub sessions: usize,
    /// Relay RSS while they stream.
    pub rss_kb: u64,
    /// Relay RSS with the same nodes attached and orders placed, before any
    /// byte flows.
    pub idle_kb: u64,
    pub cpu_percent: f64,
    /// What all clients sent through the relay together.
    pub gbps: f64,
}

impl Active {
    pub fn rss_per_session_kb(&self) -> f64 {
        self.rss_kb.saturating_sub(self.idle_kb) as f64 / self.sessions as f64
    }
}

/// How long the streaming sessions are measured, after they all started.
const ACTIVE_WINDOW: Duration = Duration::from_secs(5);

/// Orders `sessions` sessions on a fresh relay with as many simulated nodes,
/// starts every client streaming, and samples the relay while they do.
pub fn active_sessions(
    scene: &Scene,
    rt: &tokio::runtime::Runtime,
    sessions: usize,
) -> anyhow::Result<Active> {
    let name = "broker-active";
    let data = scene.subdir(name)?;
    let client = Broker::add_client(scene, &data)?;
    // Enough of the client's deposit for every order, and every one may
    // wait unconnected (the simulated clients never log in).
    let config = format!("price_sat = 1000\nmax_unconnected_orders = {sessions}\n");
    let broker = fresh_relay(scene, name, data, &config)?;
    let pid = broker.proc.pid();
    let key: PeerId = broker.key.parse()?;
    let relay = broker.relay;
    let (endpoint, nodes) = rt.block_on(async {
        let endpoint = crate::simnode::endpoint()?;
        let mut nodes = Vec::new();
        for _ in 0..sessions {
            let node = crate::simnode::attach(&endpoint, relay, key, 1).await?;
            nodes.push(tokio::spawn(node.serve_workload()));
        }
        anyhow::Ok((endpoint, nodes))
    })?;
    broker.wait_capacity(scene, sessions as u64)?;
    let mut ports = Vec::new();
    for _ in 0..sessions {
        let (status, order) = broker.order(scene, &client)?;
        anyhow::ensure!(status == 200, "order {} failed: {order}", ports.len());
        ports.push(u16::try_from(order["port"].as_u64().context("port")?)?);
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle_kb = rss_kb(pid)?;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = std::sync::Arc::new(std::sync::Barrier::new(sessions + 1));
    let clients: Vec<_> = ports
        .iter()
        .map(|&port| {
            let (stop, sent, started) = (stop.clone(), sent.clone(), started.clone());
            std::thread::spawn(move || {
                let streamed =
                    crate::service::stream_until(crate::tools::local(port), &stop, &sent, &started);
                if streamed.is_err() {
                    // Whoever waits for the start must not wait forever.
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                streamed
            })
        })
        .collect();
    started.wait();
    // Past the first windows and congestion controllers' start.
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, bytes0, t0) = (
        cpu_ticks(pid)?,
        sent.load(std::sync::atomic::Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(ACTIVE_WINDOW);
    let (cpu1, bytes1, took) = (
        cpu_ticks(pid)?,
        sent.load(std::sync::atomic::Ordering::Relaxed),
        t0.elapsed(),
    );
    let rss_kb = rss_kb(pid)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("a streaming client panicked"))??;
    }
    for n in nodes {
        n.abort();
    }
    drop(endpoint);
    Ok(Active {
        sessions,
        rss_kb,
        idle_kb,
        cpu_percent: cpu_percent(cpu1 - cpu0, took),
        gbps: (bytes1 - bytes0) as f64 * 8.0 / 1e9 / took.as_secs_f64(),
    })
}
