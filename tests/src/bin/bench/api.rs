//! The HTTP API's order rate: clients, each with its own account and
//! address, ordering as fast as they are answered for a fixed time, alone and
//! while a slowloris holds thousands of connections that never finish their
//! headers.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use jusy_common::identity::PeerId;
use jusy_tests::{Broker, Scene};
use socket2::{Domain, Socket, Type};

/// Clients ordering at once, each on its own loopback address
/// (127.0.3.x) with its own account.
pub const CLIENTS: u8 = 16;
/// Simulated nodes, and the slots each offers: every order holds its slot
/// for [`HOLD`], so they must outnumber the orders of that time.
pub const NODES: usize = 8;
const SLOTS: u64 = 1000;
/// How long a simulated node keeps an order before ending it as never
/// connected.
pub const HOLD: Duration = Duration::from_secs(1);
/// The slowloris: this many connections from each of its addresses
/// (127.0.4.x), below the broker's per-address cap (256), each sending one
/// byte of a header every [`SLOW_BYTE_EVERY`].
pub const SLOW_PER_ADDRESS: usize = 100;
pub const SLOW_BYTE_EVERY: Duration = Duration::from_secs(2);
/// How often the slowloris looks for connections the broker cut, and sends
/// the next share of bytes.
const SLOW_TICK: Duration = Duration::from_millis(50);
/// Ordering before the measured window starts.
const WARM_UP: Duration = Duration::from_secs(1);

/// The broker's configuration for both rows: rate limits far above what the
/// clients reach, and room for the slowloris under the connection cap (the
/// broker holds it to half its open-file limit in any case). Everything else
/// is the default, among it the 10 s header timeout.
pub const CONFIG: &str = "rate_limit_per_sec = 1000000\nrate_limit_burst = 1000000\n\
                          http_max_connections = 100000\n";

/// One measured window of ordering.
#[derive(Debug, Clone)]
pub struct ApiRun {
    pub orders_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Answers other than 200, and requests that failed.
    pub failed: usize,
    /// The broker's CPU time in the window, in % of one core.
    pub broker_cpu_percent: f64,
    /// Connections the slowloris keeps (0: none ran), and how many it held.
    pub slow: usize,
    pub held: Held,
}

impl ApiRun {
    pub fn label(&self) -> &'static str {
        if self.slow > 0 {
            "API orders under slowloris"
        } else {
            "API orders alone"
        }
    }
}

/// Starts a broker with simulated nodes and measures `secs` of ordering
/// alone, then as long again under a slowloris of `slow` connections.
pub fn orders(
    scene: &Scene,
    rt: &tokio::runtime::Runtime,
    secs: u64,
    slow: usize,
) -> anyhow::Result<Vec<ApiRun>> {
    anyhow::ensure!(
        slow.div_ceil(SLOW_PER_ADDRESS) < 255,
        "{slow} slow connections need more than 254 addresses"
    );
    let open_files = raise_open_files()?;
    anyhow::ensure!(
        open_files >= 2 * slow as u64 + 1000,
        "{open_files} open files are too few for {slow} slow connections"
    );
    let name = "broker-api";
    let data = scene.subdir(name)?;
    // Deposits no window of ordering spends: every order is refunded when
    // its node ends it, and only those held at once are in escrow.
    let hashes = (0..CLIENTS)
        .map(|_| Broker::add_account(scene, &data, "client", 1 << 50))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = scene.dir().join(format!("{name}.toml"));
    std::fs::write(&config, CONFIG)?;
    let broker = Broker::start_with(
        scene,
        name,
        data,
        0,
        &[
            "--speed-test-rounds",
            "0",
            "--config",
            config.to_str().context("config path")?,
        ],
    )?;
    let key: PeerId = broker.key.parse()?;
    let relay = broker.relay;
    let nodes = rt.block_on(async {
        let endpoint = crate::simnode::endpoint()?;
        let mut nodes = Vec::new();
        for _ in 0..NODES {
            let node = crate::simnode::attach(&endpoint, relay, key, SLOTS).await?;
            nodes.push(tokio::spawn(node.accept_and_end(HOLD)));
        }
        anyhow::Ok((endpoint, nodes))
    })?;
    broker.wait_capacity(scene, NODES as u64 * SLOTS)?;
    let window = Duration::from_secs(secs);

    let pid = broker.proc.pid();
    let mut runs = vec![measure(broker.api, pid, &hashes, window)?];

    eprintln!("bench: opening {slow} slow connections");
    let stop = Arc::new(AtomicBool::new(false));
    let loris = Slowloris::open(broker.api, slow)?;
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || loris.trickle(&stop))
    };
    let under = measure(broker.api, pid, &hashes, window);
    stop.store(true, Ordering::Relaxed);
    let held = trickle
        .join()
        .map_err(|_| anyhow::anyhow!("the slowloris panicked"))??;
    runs.push(ApiRun {
        slow,
        held,
        ..under?
    });
    let (endpoint, nodes) = nodes;
    for n in nodes {
        n.abort();
    }
    drop(endpoint);
    Ok(runs)
}

/// Every client orders back to back, each order on a connection of its own
/// (as `curl` makes it), for a warm-up and then `window`; latency is from
/// the connect to the last byte of the answer. `broker` is the broker's pid.
fn measure(
    api: SocketAddr,
    broker: u32,
    hashes: &[String],
    window: Duration,
) -> anyhow::Result<ApiRun> {
    let start = Instant::now();
    let (from, to) = (start + WARM_UP, start + WARM_UP + window);
    let (per_client, cpu) = std::thread::scope(|s| {
        let cpu = s.spawn(move || {
            std::thread::sleep(from.saturating_duration_since(Instant::now()));
            let before = crate::capacity::cpu_ticks(broker)?;
            std::thread::sleep(to.saturating_duration_since(Instant::now()));
            let used = crate::capacity::cpu_ticks(broker)? - before;
            anyhow::Ok(crate::capacity::cpu_percent(used, window))
        });
        let threads: Vec<_> = hashes
            .iter()
            .zip(1..)
            .map(|(hash, i)| {
                s.spawn(move || {
                    let addr = Ipv4Addr::new(127, 0, 3, i);
                    let mut latencies = Vec::new();
                    let mut failed = 0;
                    loop {
                        let t = Instant::now();
                        if t >= to {
                            break;
                        }
                        let ok = order(addr, api, hash);
                        let done = Instant::now();
                        if t >= from && done <= to {
                            match ok {
                                Ok(200) => latencies.push((done - t).as_secs_f64() * 1e3),
                                Ok(_) | Err(_) => failed += 1,
                            }
                        }
                    }
                    (latencies, failed)
                })
            })
            .collect();
        let per_client = threads
            .into_iter()
            .map(|t| t.join())
            .collect::<Result<Vec<_>, _>>();
        (per_client, cpu.join())
    });
    let per_client = per_client.map_err(|_| anyhow::anyhow!("an ordering client panicked"))?;
    let broker_cpu_percent = cpu.map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))??;
    let mut latencies = Vec::new();
    let mut failed = 0;
    for (l, f) in per_client {
        latencies.extend(l);
        failed += f;
    }
    anyhow::ensure!(!latencies.is_empty(), "no order was answered 200");
    Ok(ApiRun {
        orders_per_sec: latencies.len() as f64 / window.as_secs_f64(),
        p50_ms: crate::report::median(&latencies),
        p99_ms: crate::report::p99(&latencies),
        failed,
        broker_cpu_percent,
        slow: 0,
        held: Held::default(),
    })
}

/// `GET /order/<hash>` on a fresh connection from `from`: the HTTP status.
fn order(from: Ipv4Addr, api: SocketAddr, hash: &str) -> anyhow::Result<u16> {
    let mut conn = connect_from(from, api)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.write_all(
        format!("GET /order/{hash} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)?;
    let head = std::str::from_utf8(answer.get(..12).context("short answer")?)?;
    Ok(head
        .split(' ')
        .nth(1)
        .with_context(|| format!("status line {head:?}"))?
        .parse()?)
}

/// A TCP connection to `to` from the loopback address `from` (all of
/// 127.0.0.0/8 is this machine's, so each is another client address).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from.into(), 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(10))?;
    Ok(s.into())
}

/// Connections that send a request line and then one header byte at a time;
/// one the broker closes is opened again.
struct Slowloris {
    api: SocketAddr,
    conns: Vec<(Ipv4Addr, Option<TcpStream>)>,
}

impl Slowloris {
    fn open(api: SocketAddr, count: usize) -> anyhow::Result<Self> {
        let mut conns = Vec::with_capacity(count);
        for i in 0..count {
            let from = Ipv4Addr::new(127, 0, 4, u8::try_from(i / SLOW_PER_ADDRESS + 1)?);
            conns.push((from, Some(slow_connection(from, api)?)));
        }
        Ok(Self { api, conns })
    }

    /// Sends every connection one more byte every [`SLOW_BYTE_EVERY`],
    /// a share of them each [`SLOW_TICK`], and opens again at once those
    /// the broker cut (at its header timeout), until `stop`.
    fn trickle(mut self, stop: &AtomicBool) -> anyhow::Result<Held> {
        let ticks_per_byte = (SLOW_BYTE_EVERY.as_millis() / SLOW_TICK.as_millis()).max(1);
        let per_tick = self.conns.len().div_ceil(usize::try_from(ticks_per_byte)?);
        let (mut turn, mut reopened, mut open) = (0, 0, Vec::new());
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            for at in self.cut()? {
                if let Some((from, conn)) = self.conns.get_mut(at) {
                    // One refused is tried again on the next tick.
                    *conn = slow_connection(*from, self.api).ok();
                    reopened += usize::from(conn.is_some());
                }
            }
            for _ in 0..per_tick {
                if let Some((_, conn)) = self.conns.get_mut(turn) {
                    // One whose write fails is found cut on the next tick.
                    let _ = conn.as_mut().map(|c| c.write_all(b"a"));
                }
                turn = (turn + 1) % self.conns.len();
            }
            open.push(self.conns.iter().filter(|(_, c)| c.is_some()).count());
            next += SLOW_TICK;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        Ok(Held {
            mean: open.iter().sum::<usize>() / open.len().max(1),
            least: open.iter().copied().min().unwrap_or(0),
            reopened,
        })
    }

    /// The connections the broker closed (or answered, which it does only
    /// before closing), and those not open.
    fn cut(&self) -> anyhow::Result<Vec<usize>> {
        let mut fds: Vec<libc::pollfd> = self
            .conns
            .iter()
            .map(|(_, c)| libc::pollfd {
                // poll skips a negative descriptor.
                fd: c.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: poll reads and writes the `fds.len()` pollfd structs the
        // pointer points to, and returns at once (timeout 0).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), libc::nfds_t::try_from(fds.len())?, 0) };
        anyhow::ensure!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
        Ok(fds
            .iter()
            .enumerate()
            .filter(|(_, p)| p.fd < 0 || p.revents != 0)
            .map(|(i, _)| i)
            .collect())
    }
}

/// How many connections the slowloris held over a window: the mean and the
/// least of its ticks, and how many it opened again after the broker cut them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Held {
    pub mean: usize,
    pub least: usize,
    pub reopened: usize,
}

/// A connection from `from` that has sent a request line and the start of a
/// header, left non-blocking.
fn slow_connection(from: Ipv4Addr, api: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut conn = connect_from(from, api)?;
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: slow\r\nX-Slow: ")?;
    conn.set_nonblocking(true)?;
    Ok(conn)
}

/// Raises this process's open-file limit to its hard limit (for the
/// slowloris); brokers started after it inherit it.
fn raise_open_files() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one rlimit through a
    // pointer valid for it.
    unsafe {
        anyhow::ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0,
            "getrlimit: {}",
            std::io::Error::last_os_error()
        );
        lim.rlim_cur = lim.rlim_max.min(1 << 20);
        anyhow::ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(lim.rlim_cur)
}
