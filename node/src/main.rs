//! `jusy-node`: parses the command line, loads the configuration, and runs the node.

use anyhow::Context;
use jusy_common::identity::PeerId;
use jusy_node::config::{self, Config};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Sell this machine's CPU time as SSH sessions through a jusy relay.
#[derive(Debug, clap::Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    args: NodeArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Check whether this machine can serve sessions (root, cgroups, loop
    /// devices, nftables, the programs the node runs, free disk, the relay
    /// over UDP) and print a report; exits 1 when it cannot. Takes the same
    /// flags and configuration as the node; changes nothing.
    Check(Box<NodeArgs>),
    /// Replace this binary with a release, once its signature verifies
    /// against the operator's release key pinned in the configuration
    /// (`release_key`); refused without one. Restart the node after.
    Update {
        /// The release's binary.
        #[arg(long)]
        binary: PathBuf,
        /// Its signature file (128 hex characters).
        #[arg(long)]
        signature: PathBuf,
        /// TOML configuration file holding `release_key`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// The node's flags; each overrides the configuration file.
#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// TOML configuration file (see deploy/node.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Relay broker QUIC address, host:port.
    #[arg(long)]
    broker: Option<String>,
    /// The relay broker's public key (hex).
    #[arg(long)]
    broker_key: Option<String>,
    /// Another relay to move to when the broker's is lost,
    /// `host:port=<broker key>`; repeatable.
    #[arg(long = "relay", value_name = "ADDR=KEY")]
    relay: Vec<String>,
    /// File holding the owner hash that earns for this node's sessions (or
    /// `owner` in the config, or the JUSY_OWNER environment variable).
    #[arg(long, value_name = "PATH")]
    owner_file: Option<PathBuf>,
    /// Refused: every process on the machine can read a command line.
    #[arg(long, hide = true)]
    owner: Option<String>,
    /// Data directory for keys and session homes.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, value_name = "FORMAT", default_value_t)]
    log_format: jusy_node::logging::LogFormat,
    /// Sessions kept ready ahead of orders.
    #[arg(long)]
    ready_slots: Option<usize>,
    /// Longest grace after a session's last login closes an order may ask.
    #[arg(long)]
    grace_secs: Option<u64>,
    /// Seconds a client connection may stay open without logging in.
    #[arg(long)]
    login_grace_secs: Option<u64>,
    /// Longest wall-clock limit (seconds from the first login) an order may ask.
    #[arg(long)]
    wall_secs: Option<u64>,
    /// Most CPU seconds an order may buy.
    #[arg(long)]
    cpu_budget_secs: Option<u64>,
    /// Seconds between two signed usage receipts of a running session.
    #[arg(long)]
    receipt_secs: Option<u64>,
    /// Most memory in MiB (no swap) an order may ask.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Most processes at once an order may ask.
    #[arg(long)]
    max_processes: Option<u32>,
    /// SSH channels a client may open at once on one connection.
    #[arg(long)]
    max_channels: Option<usize>,
    /// SSH channels a session may have open at once across its connections.
    #[arg(long)]
    max_session_channels: Option<usize>,
    /// Size of a session's home disk in MiB, the most an order may ask (0: no separate disk).
    #[arg(long)]
    disk_mib: Option<u64>,
    /// Space in MiB kept free on the data directory's file system.
    #[arg(long)]
    disk_reserve_mib: Option<u64>,
    /// Serve Prometheus metrics on 127.0.0.1 at this port (0: any free port).
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Let sessions reach private, link-local and loopback addresses (port 22 only).
    #[arg(long)]
    net_allow_private: bool,
    /// An address range (`addr/len`) sessions may reach on port 22 although it is
    /// private; repeatable.
    #[arg(long)]
    net_allow: Vec<jusy_node::sandbox::netfilter::Cidr>,
    /// IPv4 range session networks come from (`addr/len`, at most /22).
    #[arg(long)]
    session_net_v4: Option<jusy_node::sandbox::netfilter::Cidr>,
    /// IPv6 range session networks come from (`addr/len`, at most /64).
    #[arg(long)]
    session_net_v6: Option<jusy_node::sandbox::netfilter::Cidr>,
}

/// `jusy-node update`: installs a signed release over this binary.
fn update(
    binary: &std::path::Path,
    signature: &std::path::Path,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let cfg = match config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let target = std::env::current_exe().context("where this binary is")?;
    let digest =
        jusy_node::update::install(cfg.release_key.as_deref(), binary, signature, &target)?;
    println!(
        "installed the release (sha256 {digest}) at {}; restart the node to run it",
        target.display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    jusy_node::sandbox::init::run_if_asked();
    jusy_node::state::private_umask();
    let parsed = {
        use clap::{CommandFactory, FromArgMatches};
        let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
        let matches = jusy_node::cli::with_defaults(Cli::command(), &defaults).get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    };
    let (cli, check) = match parsed.cmd {
        Some(Cmd::Check(args)) => (*args, true),
        Some(Cmd::Update {
            binary,
            signature,
            config,
        }) => return update(&binary, &signature, config.as_deref()),
        None => (parsed.args, false),
    };
    anyhow::ensure!(
        cli.owner.is_none(),
        "--owner is refused: the owner hash is a secret, and every process on this machine \
         (sessions included) can read a command line. Put it in the config file \
         (owner = \"…\"), in a file named by --owner-file, or in the environment variable {}",
        config::OWNER_ENV
    );
    jusy_node::logging::init(cli.log_format);
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(v) = cli.broker {
        cfg.broker = v;
    }
    if let Some(v) = cli.broker_key {
        cfg.broker_key = v;
    }
    cfg.relays.extend(cli.relay);
    let owner_env = std::env::var_os(config::OWNER_ENV);
    // SAFETY: no other thread exists yet (the runtime is built below), so
    // nothing reads the environment meanwhile. Removed so that no program the
    // node starts (helpers, a session's init) inherits the hash.
    unsafe { std::env::remove_var(config::OWNER_ENV) };
    let config_holds_owner = cfg.owner.is_some();
    cfg.take_owner(cli.owner_file.as_deref(), owner_env)?;
    let secret_files = cli
        .owner_file
        .iter()
        .chain(cli.config.as_ref().filter(|_| config_holds_owner));
    for path in secret_files {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o077 != 0) {
            tracing::warn!(
                path = %path.display(),
                "this file holds the owner hash and others may read it: chmod 600 it"
            );
        }
    }
    if let Some(v) = cli.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = cli.ready_slots {
        cfg.ready_slots = Some(v);
    }
    if let Some(v) = cli.grace_secs {
        cfg.grace_secs = v;
    }
    if let Some(v) = cli.login_grace_secs {
        cfg.login_grace_secs = v;
    }
    if let Some(v) = cli.wall_secs {
        cfg.wall_secs = v;
    }
    if let Some(v) = cli.cpu_budget_secs {
        cfg.cpu_budget_secs = v;
    }
    if let Some(v) = cli.receipt_secs {
        cfg.receipt_secs = v;
    }
    if let Some(v) = cli.memory_mib {
        cfg.memory_mib = v;
    }
    if let Some(v) = cli.max_processes {
        cfg.max_processes = v;
    }
    if let Some(v) = cli.max_channels {
        cfg.max_channels = v;
    }
    if let Some(v) = cli.max_session_channels {
        cfg.max_session_channels = v;
    }
    if let Some(v) = cli.disk_mib {
        cfg.disk_mib = v;
    }
    if let Some(v) = cli.metrics_port {
        cfg.metrics_port = Some(v);
    }
    if let Some(v) = cli.disk_reserve_mib {
        cfg.disk_reserve_mib = v;
    }
    cfg.net_allow_private |= cli.net_allow_private;
    cfg.net_allow.extend(cli.net_allow);
    if let Some(v) = cli.session_net_v4 {
        cfg.session_net_v4 = v;
    }
    if let Some(v) = cli.session_net_v6 {
        cfg.session_net_v6 = v;
    }
    if check {
        let findings = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(jusy_node::check::run(&cfg));
        print!("{}", jusy_node::check::report(&findings, "serve sessions"));
        std::process::exit(i32::from(findings.iter().any(|f| !f.ok)));
    }
    anyhow::ensure!(
        !cfg.broker.is_empty(),
        "no broker address: pass --broker or set `broker` in the config"
    );
    let broker_key: PeerId = cfg
        .broker_key
        .parse()
        .context("broker key: pass --broker-key with the key the broker printed")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let stop = CancellationToken::new();
            let on_signal = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = wait_for_signal().await {
                    tracing::error!(error = %e, "cannot listen for signals");
                }
                on_signal.cancel();
            });
            jusy_node::run(cfg, broker_key, stop).await?;
            Ok(())
        })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
