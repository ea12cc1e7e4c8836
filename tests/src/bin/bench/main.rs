//! `bench`: jusy side by side with what users would pick instead (OpenSSH
//! direct, an OpenSSH reverse relay, bore, rathole), all on loopback and run
//! interleaved; prints medians and ratios and writes them to BENCHMARKS.md.
//!
//! Run as root from the workspace root (it creates a Linux user and starts
//! `sshd`): `cargo build --release --workspace --bins && cargo run --release -p
//! jusy-tests --bin bench`. Missing contenders are installed first (`apt-get
//! install openssh-server`, `cargo install bore-cli rathole`) unless
//! `--no-install`. `--quick` runs tiny sizes (what the test suite checks).

// A measuring tool over fixed-size column arrays and JSON it asked for itself;
// an out-of-range index is a bug of the bench, and a panic reports it.
#![allow(clippy::indexing_slicing)]

mod api;
mod capacity;
mod forwarding;
mod report;
mod service;
mod simnode;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jusy_tests::process::Proc;
use jusy_tests::{Broker, Login, Node, Scene};

use report::{COLUMNS, Table};
use tools::{Keys, local};

/// Sizes and counts of one run.
#[derive(Debug, Clone)]
struct Opts {
    bulk_mib: u64,
    bulk_rounds: usize,
    trials: usize,
    orders: usize,
    pings: usize,
    raw_mib: u64,
    nodes: Vec<usize>,
    install: bool,
    out: Option<PathBuf>,
    /// Sections to run (all when empty): see [`SECTIONS`].
    only: Vec<String>,
    /// `quic_max_mtu` of each relay measured in the capacity section.
    relay_mtus: Vec<u16>,
    /// Sessions streaming at once through one relay (the active section).
    sessions: usize,
    /// The relays' `busy_poll_us`, when not their default.
    busy_poll_us: Option<u32>,
    /// Seconds of ordering measured in each API row.
    api_secs: u64,
    /// Connections of the slowloris in the second API row.
    slow: usize,
}

/// The sections of the main table, measured on contenders started side by
/// side.
const FIELD_SECTIONS: [&str; 6] = ["bulk", "download", "true", "order", "echo", "raw"];

/// The sections `--only` may name.
const SECTIONS: [&str; 11] = [
    "bulk", "download", "true", "order", "echo", "raw", "capacity", "active", "receipts", "api",
    "forward",
];

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    fn parse() -> anyhow::Result<Self> {
        let mut o = Self {
            bulk_mib: 1024,
            bulk_rounds: 3,
            trials: 21,
            orders: 7,
            pings: 5000,
            raw_mib: 1024,
            nodes: vec![1000, 10_000],
            install: true,
            out: Some(PathBuf::from("BENCHMARKS.md")),
            only: Vec::new(),
            // What a relay tries towards a node on loopback, and towards one
            // across the internet.
            relay_mtus: vec![jusy_node::QUIC_MTU, report::INTERNET_MTU],
            sessions: 100,
            busy_poll_us: None,
            api_secs: 10,
            slow: 5000,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--quick" => {
                    (o.bulk_mib, o.bulk_rounds, o.trials, o.orders) = (8, 1, 3, 1);
                    (o.pings, o.raw_mib, o.nodes, o.out) = (200, 16, vec![20], None);
                    o.relay_mtus = vec![jusy_node::QUIC_MTU];
                    o.sessions = 4;
                    (o.api_secs, o.slow) = (2, 500);
                }
                "--bulk-mib" => o.bulk_mib = val()?.parse()?,
                "--bulk-rounds" => o.bulk_rounds = val()?.parse()?,
                "--trials" => o.trials = val()?.parse()?,
                "--orders" => o.orders = val()?.parse()?,
                "--pings" => o.pings = val()?.parse()?,
                "--raw-mib" => o.raw_mib = val()?.parse()?,
                "--sessions" => o.sessions = val()?.parse()?,
                "--api-secs" => o.api_secs = val()?.parse()?,
                "--slow" => o.slow = val()?.parse()?,
                "--nodes" => {
                    o.nodes = val()?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?;
                }
                "--only" => {
                    o.only = val()?.split(',').map(str::to_owned).collect();
                    if let Some(bad) = o.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                        bail!("--only takes sections of {SECTIONS:?}, not {bad:?}");
                    }
                    // A partial run is for looking, not for the record.
                    o.out = None;
                }
                "--relay-mtu" => {
                    o.relay_mtus = val()?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?;
                }
                "--busy-poll-us" => o.busy_poll_us = Some(val()?.parse()?),
                "--no-install" => o.install = false,
                "--out" => o.out = Some(val()?.into()),
                "--no-out" => o.out = None,
                _ => bail!(
                    "unknown argument {a}; flags: --quick --bulk-mib N --bulk-rounds N \
                     --trials N --orders N --pings N --raw-mib N --nodes N,N --sessions N \
                     --api-secs N --slow N --no-install --out FILE --no-out \
                     --only SECTION,SECTION --relay-mtu N,N --busy-poll-us N"
                ),
            }
        }
        Ok(o)
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse()?;
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "run the bench as root: it creates a session user and starts sshd"
    );
    if std::env::var_os("JUSY_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("bench has no directory")?;
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("JUSY_BIN_DIR", dir) };
    }
    if opts.install {
        tools::install_missing()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let scene = Scene::new("bench")?;
    eprintln!("bench: working in {}", scene.dir().display());
    let homes = scene.subdir("homes")?;
    std::fs::set_permissions(&homes, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let user = rt.block_on(async {
        use jusy_node::sandbox::{uids::Uids, user};
        let uids = Uids::open(scene.dir().join("uid-cursor"), user::DEFAULT_IDS).await;
        anyhow::Ok(user::SessionUser::create(&homes, true, uids.next().await?).await?)
    })?;
    rt.spawn(clean_up_when_interrupted(
        user.clone(),
        scene.dir().to_owned(),
    ));
    // useradd leaves the password locked ("!"), and sshd refuses locked accounts
    // even for key logins; "*" has no password either but is not locked.
    let unlocked = Command::new("usermod")
        .args(["-p", "*", &user.name])
        .status();
    let result = unlocked.map_err(anyhow::Error::from).and_then(|s| {
        anyhow::ensure!(s.success(), "usermod failed");
        run(&opts, &scene, &rt, &user)
    });
    if let Err(e) = rt.block_on(user.remove()) {
        eprintln!("bench: removing user {}: {e}", user.name);
    }
    let table = result.inspect_err(|_| {
        scene.report();
    })?;
    let text = report::markdown(&table, &opts_line(&opts));
    println!("{text}");
    if let Some(out) = &opts.out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench: wrote {}", out.display());
    }
    let _ = std::fs::remove_dir_all(scene.dir());
    Ok(())
}

/// On Ctrl-C or SIGTERM: stops every process the bench started (the node
/// removes its session users itself), removes the weighed cgroup and the lab
/// of the forwarding section, the bench's login user and its working
/// directory, and exits. Without it an interrupted run would
/// leave them behind: the run's own clean-up is on the way out of `main`.
async fn clean_up_when_interrupted(user: jusy_node::sandbox::user::SessionUser, dir: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("bench: interrupted; stopping what it started");
    let children = children_of(std::process::id());
    for &pid in &children {
        // SAFETY: plain kill(2) on a child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && children
            .iter()
            .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    {
        // Reaps what ended; a child that does not end by the deadline is
        // killed below.
        // SAFETY: waitpid on our own children, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for &pid in &children {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    forwarding::remove_weighed().await;
    jusy_tests::lab::remove_all_of_this_process();
    if let Err(e) = user.remove().await {
        eprintln!("bench: removing user {}: {e}", user.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(130);
}

/// The pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let fields = capacity::stat_fields(pid).ok()?;
        let ppid: u32 = fields.get(1)?.parse().ok()?;
        (ppid == parent).then_some(i32::try_from(pid).ok()?)
    })
    .collect()
}

fn opts_line(o: &Opts) -> String {
    format!(
        "bulk {} MiB × {} rounds; `ssh true` × {}; {} orders; {} echo round trips; \
         raw stream {} MiB × {} rounds; idle nodes {:?}; API {} s per row, slowloris {} \
         connections; session forwarding bulk {} MiB × {} rounds",
        o.bulk_mib,
        o.bulk_rounds,
        o.trials,
        o.orders,
        o.pings,
        o.raw_mib,
        o.bulk_rounds,
        o.nodes,
        o.api_secs,
        o.slow,
        o.bulk_mib,
        o.bulk_rounds
    )
}

/// Every contender, started: how to reach each by SSH and by raw TCP.
struct Field {
    ssh: [Option<Vec<String>>; COLUMNS.len()],
    raw: [Option<SocketAddr>; COLUMNS.len()],
    /// The jusy broker and client for ordering, and processes kept alive.
    broker: Broker,
    client: String,
    _procs: Vec<Proc>,
    _node: Node,
    _raw_broker: Broker,
}

fn run(
    opts: &Opts,
    scene: &Scene,
    rt: &tokio::runtime::Runtime,
    user: &jusy_node::sandbox::user::SessionUser,
) -> anyhow::Result<Table> {
    let keys = Keys::make(scene.dir())?;
    let mut table = Table::default();
    if FIELD_SECTIONS.iter().any(|s| opts.runs(s)) {
        field_rows(opts, scene, rt, &keys, user, &mut table)?;
    }
    if opts.runs("capacity") {
        eprintln!("bench: relay capacity");
        for &mtu in &opts.relay_mtus {
            let measured = capacity::idle_nodes(scene, rt, &opts.nodes, mtu)?;
            table.capacity.extend(measured);
        }
    }
    if opts.runs("active") {
        eprintln!("bench: {} active sessions", opts.sessions);
        table.active = Some(capacity::active_sessions(scene, rt, opts.sessions)?);
    }
    if opts.runs("receipts") {
        eprintln!("bench: receipts");
        table.receipts_per_sec = Some(capacity::receipts_per_sec()?);
    }
    if opts.runs("api") {
        eprintln!("bench: API orders");
        table.api = api::orders(scene, rt, opts.api_secs, opts.slow)?;
    }
    if opts.runs("forward") {
        eprintln!("bench: session forwarding");
        table.forwarding = Some(forwarding::bulk(
            scene,
            rt,
            &keys,
            &user.name,
            opts.bulk_mib << 20,
            opts.bulk_rounds,
        )?);
    }
    Ok(table)
}

/// The rows of the main table: every contender started side by side.
fn field_rows(
    opts: &Opts,
    scene: &Scene,
    rt: &tokio::runtime::Runtime,
    keys: &Keys,
    user: &jusy_node::sandbox::user::SessionUser,
    table: &mut Table,
) -> anyhow::Result<()> {
    let field = start_field(scene, rt, keys, user, opts.busy_poll_us)?;
    eprintln!("bench: SSH bulk");
    let bytes = opts.bulk_mib << 20;
    let mut mbps: [Vec<f64>; COLUMNS.len()] = Default::default();
    let mut cpu: [Vec<f64>; COLUMNS.len()] = Default::default();
    for _ in 0..opts.bulk_rounds * usize::from(opts.runs("bulk")) {
        for (i, args) in field.ssh.iter().enumerate() {
            if let Some(args) = args {
                let busy = capacity::machine_busy_secs()?;
                match bulk(keys, args, bytes) {
                    Ok(t) => {
                        mbps[i].push(bytes as f64 / 1e6 / t.as_secs_f64());
                        cpu[i].push((capacity::machine_busy_secs()? - busy) / (bytes as f64 / 1e9));
                    }
                    Err(e) => table.failed(i, "bulk", &e),
                }
            }
        }
    }
    table.row(
        &format!(
            "SSH bulk `head -c {}M \\| ssh 'cat >/dev/null'`, MB/s",
            opts.bulk_mib
        ),
        &mbps,
        0,
    );
    table.row(
        "CPU per GB of that bulk, whole machine (every process, all cores), s",
        &cpu,
        2,
    );

    eprintln!("bench: SSH download");
    let mut down: [Vec<f64>; COLUMNS.len()] = Default::default();
    for _ in 0..opts.bulk_rounds * usize::from(opts.runs("download")) {
        for (i, args) in field.ssh.iter().enumerate() {
            if let Some(args) = args {
                match download(keys, args, bytes) {
                    Ok(t) => down[i].push(bytes as f64 / 1e6 / t.as_secs_f64()),
                    Err(e) => table.failed(i, "download", &e),
                }
            }
        }
    }
    table.row(
        &format!(
            "SSH download `ssh 'head -c {}M /dev/zero' >/dev/null`, MB/s",
            opts.bulk_mib
        ),
        &down,
        0,
    );

    eprintln!("bench: ssh true");
    let mut ms: [Vec<f64>; COLUMNS.len()] = Default::default();
    for trial in 0..=opts.trials * usize::from(opts.runs("true")) {
        for (i, args) in field.ssh.iter().enumerate() {
            if let Some(args) = args {
                match ssh_true(keys, args) {
                    // The first round warms caches and is not counted.
                    Ok(t) if trial > 0 => ms[i].push(t.as_secs_f64() * 1e3),
                    Ok(_) => {}
                    Err(e) => table.failed(i, "ssh true", &e),
                }
            }
        }
    }
    table.row("`ssh … true`, ms", &ms, 1);

    eprintln!("bench: order to first command");
    let mut first: [Vec<f64>; COLUMNS.len()] = Default::default();
    for _ in 0..opts.orders * usize::from(opts.runs("order")) {
        field.broker.wait_capacity(scene, 1)?;
        first[0].push(order_to_first_command(scene, &field)?.as_secs_f64() * 1e3);
    }
    table.row("order (HTTP) + first `ssh true`, ms", &first, 1);

    eprintln!("bench: echo latency");
    let mut rtt: [Vec<f64>; COLUMNS.len()] = Default::default();
    let rounds = 10;
    for _ in 0..rounds * usize::from(opts.runs("echo")) {
        for (i, addr) in field.raw.iter().enumerate() {
            if let Some(addr) = addr {
                match service::echo_rtts(*addr, 50, opts.pings / rounds) {
                    Ok(got) => rtt[i].extend(got.iter().map(|d| d.as_secs_f64() * 1e6)),
                    Err(e) => table.failed(i, "echo", &e),
                }
            }
        }
    }
    table.row("64-byte echo round trip, median µs", &rtt, 1);
    table.row_with("64-byte echo round trip, p99 µs", &rtt, 1, report::p99);
    let direct = report::median(&rtt[report::OPENSSH_DIRECT]);
    let added = rtt
        .clone()
        .map(|v| v.iter().map(|x| x - direct).collect::<Vec<_>>());
    table.row("added by the tunnel (median − direct TCP), µs", &added, 1);

    eprintln!("bench: raw tunnel throughput");
    let raw_bytes = opts.raw_mib << 20;
    let mut gbps: [Vec<f64>; COLUMNS.len()] = Default::default();
    for _ in 0..opts.bulk_rounds * usize::from(opts.runs("raw")) {
        for (i, addr) in field.raw.iter().enumerate() {
            if let Some(addr) = addr {
                match service::stream(*addr, raw_bytes) {
                    Ok(t) => gbps[i].push(raw_bytes as f64 * 8.0 / 1e9 / t.as_secs_f64()),
                    Err(e) => table.failed(i, "raw stream", &e),
                }
            }
        }
    }
    table.row("one TCP stream through the tunnel, Gbit/s", &gbps, 2);
    Ok(())
}

fn start_field(
    scene: &Scene,
    rt: &tokio::runtime::Runtime,
    keys: &Keys,
    user: &jusy_node::sandbox::user::SessionUser,
    busy_poll_us: Option<u32>,
) -> anyhow::Result<Field> {
    let mut procs = Vec::new();
    let service = rt.block_on(service::start())?;
    let target = |port: u16| {
        vec![
            "-p".to_owned(),
            port.to_string(),
            format!("{}@127.0.0.1", user.name),
        ]
    };

    let (direct_port, node_pub) = rt.block_on(tools::node_ssh_direct(
        scene,
        user.clone(),
        &keys.client_pub,
    ))?;
    keys.trust(direct_port, &two_fields(&node_pub))?;

    let (sshd, sshd_port) = tools::sshd(scene, "sshd", keys)?;
    let (relay_sshd, relay_port) = tools::sshd(scene, "sshd-relay", keys)?;
    procs.extend([sshd, relay_sshd]);
    let (rev, rev_ports) = tools::reverse_relay(
        scene,
        keys,
        &user.name,
        relay_port,
        &[local(sshd_port), service],
    )?;
    procs.push(rev);
    // bore and rathole are optional with --no-install: their columns stay empty.
    let mut tunnels = vec![Some(rev_ports)];
    for (name, start) in [
        ("bore", tools::bore as fn(&Scene, &[SocketAddr]) -> _),
        ("rathole", tools::rathole),
    ] {
        tunnels.push(if tools::which(name).is_some() {
            let (started, ports) = start(scene, &[local(sshd_port), service])?;
            procs.extend(started);
            Some(ports)
        } else {
            eprintln!("bench: {name} is not installed; its column stays empty");
            None
        });
    }
    for ports in tunnels.iter().flatten() {
        tools::wait_banner(local(ports[0]))?;
        service::wait_echo(local(ports[1]))?;
        keys.trust(ports[0], &keys.host_pub)?;
    }
    let ssh_via = |i: usize| tunnels[i].as_ref().map(|p| target(p[0]));
    let raw_via = |i: usize| tunnels[i].as_ref().map(|p| local(p[1]));

    // jusy: a broker and a real node; the bench's key is registered on the
    // client's account, and one idle connection holds the session open.
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let busy_poll = busy_poll_us.map(|us| us.to_string());
    let mut limits = vec!["--rate-limit-per-sec", "1000", "--rate-limit-burst", "1000"];
    if let Some(us) = &busy_poll {
        limits.extend(["--busy-poll-us", us]);
    }
    // Simulated nodes do not run the speed test.
    let untested = [&limits[..], &["--speed-test-rounds", "0"]].concat();
    let broker = Broker::start_with(scene, "broker", data, 0, &limits)?;
    let node = Node::start(scene, "node", &broker, &["--ready-slots", "8"])?;
    broker.wait_capacity(scene, 1)?;
    let (status, body) = broker.request(
        scene,
        "PUT",
        &format!("/account/{client}/keys"),
        &[],
        Some(keys.client_pub.as_bytes()),
    )?;
    anyhow::ensure!(status == 200, "registering the bench key: {body}");
    let (status, order) = broker.order(scene, &client)?;
    anyhow::ensure!(status == 200, "order failed: {order}");
    keys.trust_line(order["known_hosts"].as_str().context("known_hosts")?)?;
    let port = order["port"].as_u64().context("port")?;
    let jusy = vec![
        "-p".to_owned(),
        port.to_string(),
        format!(
            "{}@127.0.0.1",
            order["username"].as_str().context("username")?
        ),
    ];
    sandboxed(keys, &jusy)?;
    let mut hold = ssh(keys, &jusy);
    hold.arg("-N");
    procs.push(Proc::start(scene, "jusy-hold", hold)?);

    // jusy's tunnel without SSH: a second broker whose only node is simulated
    // and serves the raw workload on its streams.
    let data = scene.subdir("broker-raw")?;
    let raw_client = Broker::add_client(scene, &data)?;
    let raw_broker = Broker::start_with(scene, "broker-raw", data, 0, &untested)?;
    let broker_key = raw_broker.key.parse()?;
    let relay = raw_broker.relay;
    rt.block_on(async {
        let endpoint = simnode::endpoint()?;
        let node = simnode::attach(&endpoint, relay, broker_key, 4).await?;
        tokio::spawn(async move {
            let _endpoint = endpoint;
            if let Err(e) = node.serve_workload().await {
                eprintln!("bench: simulated node ended: {e:#}");
            }
        });
        anyhow::Ok(())
    })?;
    raw_broker.wait_capacity(scene, 1)?;
    let (status, raw_order) = raw_broker.order(scene, &raw_client)?;
    anyhow::ensure!(status == 200, "raw order failed: {raw_order}");
    let raw_port = u16::try_from(raw_order["port"].as_u64().context("port")?)?;
    service::wait_echo(local(raw_port))?;

    // Reverse relay: the client hops through the relay sshd (`ssh -J`).
    let reverse = ssh_via(0).map(|t| {
        let mut jump = vec![
            "-J".to_owned(),
            format!("{}@127.0.0.1:{relay_port}", user.name),
        ];
        jump.extend(t);
        jump
    });
    Ok(Field {
        ssh: [
            Some(jusy),
            Some(target(direct_port)),
            Some(target(sshd_port)),
            reverse,
            ssh_via(1),
            ssh_via(2),
        ],
        raw: [
            Some(local(raw_port)),
            None,
            Some(service),
            raw_via(0),
            raw_via(1),
            raw_via(2),
        ],
        broker,
        client,
        _procs: procs,
        _node: node,
        _raw_broker: raw_broker,
    })
}

/// Fails unless a command of the session at `args` runs as its own user in
/// namespaces of its own (network, mount, pid, IPC, UTS): the jusy column
/// and the order row measure a root node's real sandbox, not a development
/// node's.
fn sandboxed(keys: &Keys, args: &[String]) -> anyhow::Result<()> {
    const NAMESPACES: [&str; 5] = ["net", "mnt", "pid", "ipc", "uts"];
    let mut cmd = ssh(keys, args);
    cmd.arg(format!(
        "id -u; for n in {}; do readlink /proc/self/ns/$n; done",
        NAMESPACES.join(" ")
    ))
    .stdin(Stdio::null());
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let [uid, theirs @ ..] = &lines[..] else {
        bail!(
            "{cmd:?}: no output; {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    anyhow::ensure!(
        theirs.len() == NAMESPACES.len(),
        "{cmd:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(*uid != "0", "the session runs as root");
    for (ns, theirs) in NAMESPACES.iter().zip(theirs) {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"))?;
        anyhow::ensure!(
            ours.to_string_lossy() != *theirs,
            "the session shares the {ns} namespace of the machine ({theirs})"
        );
    }
    Ok(())
}

fn two_fields(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ssh(keys: &Keys, args: &[String]) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.env_remove("SSH_AUTH_SOCK")
        .arg("-F")
        .arg(&keys.ssh_config)
        .args(args);
    cmd
}

fn ssh_true(keys: &Keys, args: &[String]) -> anyhow::Result<Duration> {
    let mut cmd = ssh(keys, args);
    cmd.arg("true").stdin(Stdio::null());
    let t = Instant::now();
    let out = cmd.output()?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

fn bulk(keys: &Keys, args: &[String], bytes: u64) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut head = Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut cmd = ssh(keys, args);
    cmd.arg("cat >/dev/null")
        .stdin(head.stdout.take().context("head stdout")?);
    let out = cmd.output()?;
    let took = t.elapsed();
    let desc = format!("{cmd:?}");
    // The command holds the pipe's read end: close it, or a failed ssh
    // leaves head blocked forever.
    drop(cmd);
    let _ = head.kill();
    head.wait()?;
    anyhow::ensure!(
        out.status.success(),
        "{desc}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// `ssh … 'head -c bytes /dev/zero'` with the output thrown away; fails if
/// less arrived.
fn download(keys: &Keys, args: &[String], bytes: u64) -> anyhow::Result<Duration> {
    let mut cmd = ssh(keys, args);
    cmd.arg(format!("head -c {bytes} /dev/zero"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().context("ssh stdout")?;
    let got = std::io::copy(&mut out, &mut std::io::sink())?;
    let status = child.wait()?;
    let took = t.elapsed();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    anyhow::ensure!(
        status.success() && got == bytes,
        "{cmd:?}: {got} bytes; {err}"
    );
    Ok(took)
}

/// What a new client does: `GET /order/…` with curl, save the key and the
/// `known_hosts` line, `ssh … true` with strict host-key checking.
fn order_to_first_command(scene: &Scene, field: &Field) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let (status, order) = field.broker.order(scene, &field.client)?;
    anyhow::ensure!(status == 200, "order failed: {order}");
    let login = Login::from_order(scene, &order)?;
    let mut cmd = login.ssh_command(&login.key, &[]);
    cmd.arg("true").stdin(Stdio::null());
    let out = cmd.output()?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}
