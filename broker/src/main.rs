//! `jusy-broker`: parses the command line, loads the configuration, and runs the
//! broker, a devnet, or an administrative command.

mod devnet;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use jusy_broker::Broker;
use jusy_broker::config::Config;
use jusy_broker::ledger::Ledger;
use jusy_broker::store::{Role, Store};
use jusy_common::ledger::{Account, AccountId};
use tokio_util::sync::CancellationToken;

/// The jusy broker: relay for nodes behind NAT, order ports, HTTP API, ledger.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, global = true, value_name = "FORMAT", default_value_t)]
    log_format: jusy_node::logging::LogFormat,
}

/// Flags of `serve`; each overrides the configuration file.
#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file (see deploy/broker.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API address.
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// QUIC (UDP) address nodes dial.
    #[arg(long)]
    relay_listen: Option<SocketAddr>,
    /// Address order ports bind to.
    #[arg(long)]
    order_bind: Option<std::net::IpAddr>,
    /// Host name clients are told to connect to.
    #[arg(long)]
    public_host: Option<String>,
    /// Seconds a client has to log in to a new order (an order term).
    #[arg(long)]
    connect_window_secs: Option<u32>,
    /// CPU seconds an order buys (an order term).
    #[arg(long)]
    cpu_budget_secs: Option<u32>,
    /// Wall-clock seconds of a session from its first login (an order term).
    #[arg(long)]
    wall_secs: Option<u32>,
    /// Memory of a session in MiB (an order term).
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Processes of a session at once (an order term).
    #[arg(long)]
    max_processes: Option<u32>,
    /// Disk of a session in MiB; 0: no disk of its own (an order term).
    #[arg(long)]
    disk_mib: Option<u32>,
    /// Seconds a session outlives its last logged-in connection (an order term).
    #[arg(long)]
    grace_secs: Option<u32>,
    /// Price of one CPU-hour in satoshi.
    #[arg(long)]
    price_sat: Option<u64>,
    /// Bearer token of the operator endpoints.
    #[arg(long)]
    operator_token: Option<String>,
    /// Requests per second per address and per hash.
    #[arg(long)]
    rate_limit_per_sec: Option<u32>,
    /// Burst of requests per address and per hash.
    #[arg(long)]
    rate_limit_burst: Option<u32>,
    /// Rounds of the node speed test; 0 turns it off.
    #[arg(long)]
    speed_test_rounds: Option<u32>,
    /// Longest a node may take for the speed test, in milliseconds.
    #[arg(long)]
    speed_test_limit_ms: Option<u64>,
    /// Seconds between speed tests of an attached node.
    #[arg(long)]
    speed_test_interval_secs: Option<u64>,
    /// UDP address of the brokers' mesh (libp2p over QUIC); without it the
    /// broker works alone.
    #[arg(long)]
    mesh_listen: Option<SocketAddr>,
    /// Join the mesh through this broker's address (as its `ready` line
    /// prints it); repeatable, added to `mesh_join`.
    #[arg(long = "join", value_name = "MULTIADDR")]
    join: Vec<String>,
    /// Let this broker (broker key or mesh peer id) into the mesh;
    /// repeatable, added to `mesh_peers`.
    #[arg(long = "trust", value_name = "PEER")]
    trust: Vec<String>,
    /// Seconds between a node's capacity statements.
    #[arg(long)]
    capacity_refresh_secs: Option<u64>,
    /// Seconds a capacity statement stays valid.
    #[arg(long)]
    capacity_validity_secs: Option<u64>,
    /// Microseconds the relay keeps polling after client traffic; 0: never.
    #[arg(long)]
    busy_poll_us: Option<u32>,
    /// Lowest client rating (percent) that may order; 0: no one is refused.
    #[arg(long)]
    min_client_rating: Option<u8>,
    /// Orders a client may hold that nobody has logged in to yet.
    #[arg(long)]
    max_unconnected_orders: Option<u32>,
    /// Seconds owners' earnings are held (and clients may dispute them).
    #[arg(long)]
    hold_secs: Option<u64>,
    /// Serve Prometheus metrics (`GET /metrics`) at this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// Where an offline command finds the database (the broker must be stopped).
#[derive(Debug, Args)]
struct DataDir {
    #[arg(long, default_value = "/var/lib/jusy-broker")]
    data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Check whether the broker can start with this configuration (data
    /// directory, disk, open files, its addresses free) and print a report;
    /// exits 1 when it cannot. Takes the flags of `serve`; changes nothing.
    Check(Box<ServeArgs>),
    /// Client accounts (broker stopped).
    Client {
        #[command(subcommand)]
        cmd: AccountCmd,
    },
    /// Node-owner accounts (broker stopped).
    Owner {
        #[command(subcommand)]
        cmd: AccountCmd,
    },
    /// Credit a deposit to an account by its id (broker stopped).
    Deposit {
        #[command(flatten)]
        db: DataDir,
        #[arg(long)]
        account_id: String,
        /// `client` or `owner`.
        #[arg(long, default_value = "client")]
        role: String,
        #[arg(long)]
        amount_sat: u64,
    },
    /// Print every order as a JSON line (broker stopped).
    Orders {
        #[command(flatten)]
        db: DataDir,
    },
    /// Check the books; prints the audit as JSON and fails if they do not
    /// balance (broker stopped).
    Audit {
        #[command(flatten)]
        db: DataDir,
    },
    /// Print this broker's identity: its broker key and mesh peer id, for
    /// other brokers' `--trust` (creates the identity if there is none yet;
    /// broker stopped).
    Key {
        #[command(flatten)]
        db: DataDir,
    },
    /// The operator's release key: make it, and sign node releases with it
    /// (keep the key file offline; nodes pin the public key as
    /// `release_key`).
    Release {
        #[command(subcommand)]
        cmd: ReleaseCmd,
    },
    /// Start a broker, a node and a demo client on this machine.
    Devnet {
        /// Where the devnet keeps its state.
        #[arg(long, default_value_os_t = std::env::temp_dir().join("jusy-devnet"))]
        data_dir: PathBuf,
        /// HTTP API address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        api_listen: SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum ReleaseCmd {
    /// Print the release key's public half (hex) for nodes' `release_key`,
    /// making the key file (0600) if there is none.
    Key {
        /// The release key's file (32 secret bytes).
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Sign a node binary: writes `<binary>.sig` and prints its path.
    Sign {
        #[arg(long)]
        key_file: PathBuf,
        /// The release binary to sign.
        #[arg(long)]
        binary: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AccountCmd {
    /// Create an account and print its secret hash (shown only this once).
    Add {
        #[command(flatten)]
        db: DataDir,
        /// Credit this many satoshi at once.
        #[arg(long, default_value_t = 0)]
        deposit: u64,
    },
}

/// The release key in `path`, made (0600, never overwritten) when absent.
fn release_key(path: &std::path::Path, make: bool) -> anyhow::Result<ed25519_dalek::SigningKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("{}: not a release key (32 bytes)", path.display()))?;
            Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && make => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| path.display().to_string())?;
            f.write_all(&seed)?;
            f.sync_all()?;
            Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

fn release(cmd: ReleaseCmd) -> anyhow::Result<()> {
    match cmd {
        ReleaseCmd::Key { key_file } => {
            let key = release_key(&key_file, true)?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
        }
        ReleaseCmd::Sign { key_file, binary } => {
            let key = release_key(&key_file, false)?;
            let bytes = std::fs::read(&binary).with_context(|| binary.display().to_string())?;
            let mut out = binary.clone().into_os_string();
            out.push(".sig");
            let out = PathBuf::from(out);
            std::fs::write(&out, jusy_common::release::sign(&key, &bytes) + "\n")?;
            println!("{}", out.display());
        }
    }
    Ok(())
}

fn load(args: ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    macro_rules! take {
        ($($field:ident),*) => { $(if let Some(v) = args.$field { cfg.$field = v; })* };
    }
    take!(
        data_dir,
        api_listen,
        relay_listen,
        order_bind,
        public_host,
        connect_window_secs,
        price_sat
    );
    take!(rate_limit_per_sec, rate_limit_burst);
    take!(
        speed_test_rounds,
        speed_test_limit_ms,
        speed_test_interval_secs
    );
    take!(capacity_refresh_secs, capacity_validity_secs, busy_poll_us);
    take!(min_client_rating, max_unconnected_orders, hold_secs);
    if let Some(addr) = args.metrics_listen {
        cfg.metrics_listen = Some(addr);
    }
    take!(
        cpu_budget_secs,
        wall_secs,
        memory_mib,
        max_processes,
        disk_mib,
        grace_secs
    );
    if args.mesh_listen.is_some() {
        cfg.mesh_listen = args.mesh_listen;
    }
    cfg.mesh_join.extend(args.join);
    cfg.mesh_peers.extend(args.trust);
    if args.operator_token.is_some() {
        cfg.operator_token = args.operator_token;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn open(dir: &Path) -> anyhow::Result<(Store, Ledger)> {
    let store = Store::open(dir)?;
    let ledger = Ledger::open(&store, Config::default().pricing())?;
    Ok((store, ledger))
}

fn main() -> anyhow::Result<()> {
    // The devnet's node starts its sessions' inits from this binary.
    jusy_node::sandbox::init::run_if_asked();
    jusy_node::state::private_umask();
    let cli = {
        use clap::{CommandFactory, FromArgMatches};
        let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
        let matches = jusy_node::cli::with_defaults(Cli::command(), &defaults).get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    };
    jusy_node::logging::init(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve(args) => {
            let cfg = load(*args)?;
            rt.block_on(async {
                let store = Store::open(&cfg.data_dir)?;
                let broker = Broker::bind(cfg, store, raise_open_files()).await?;
                println!("{}", broker.ready_line());
                broker.run(stop_on_signal()).await?;
                anyhow::Ok(())
            })
        }
        Cmd::Release { cmd } => release(cmd),
        Cmd::Check(args) => {
            let cfg = load(*args)?;
            let findings = jusy_broker::check::run(&cfg);
            print!("{}", jusy_node::check::report(&findings, "run the broker"));
            std::process::exit(i32::from(findings.iter().any(|f| !f.ok)));
        }
        Cmd::Client {
            cmd: AccountCmd::Add { db, deposit },
        } => add_account(&db.data_dir, Role::Client, deposit),
        Cmd::Owner {
            cmd: AccountCmd::Add { db, deposit },
        } => add_account(&db.data_dir, Role::Owner, deposit),
        Cmd::Deposit {
            db,
            account_id,
            role,
            amount_sat,
        } => {
            let (store, ledger) = open(&db.data_dir)?;
            let id: AccountId = account_id
                .parse()
                .context("account id is 64 hex characters")?;
            let (role, account) = match role.as_str() {
                "client" => (Role::Client, Account::Client(id)),
                "owner" => (Role::Owner, Account::Owner(id)),
                other => anyhow::bail!("role is client or owner, not {other}"),
            };
            anyhow::ensure!(
                store.account_by_id(role, &id)?.is_some(),
                "no such {role:?} account"
            );
            println!("{}", ledger.deposit(account, amount_sat)?);
            Ok(())
        }
        Cmd::Orders { db } => {
            let (_, ledger) = open(&db.data_dir)?;
            for (id, rec) in ledger.orders()? {
                println!("{}", jusy_broker::api::client::order_json(id, &rec, &[]));
            }
            Ok(())
        }
        Cmd::Audit { db } => {
            let (_, ledger) = open(&db.data_dir)?;
            let audit = ledger.audit()?;
            println!("{}", serde_json::to_string(&audit)?);
            anyhow::ensure!(audit.ok, "the books do not balance: {:?}", audit.problems);
            Ok(())
        }
        Cmd::Key { db } => {
            let store = Store::open(&db.data_dir)?;
            let key = jusy_common::identity::PeerId::from_signing_key(&store.identity()?);
            let peer = jusy_broker::mesh::libp2p_id(&key)?;
            println!(
                "{}",
                serde_json::json!({"broker_key": key.to_string(), "mesh_peer_id": peer.to_string()})
            );
            Ok(())
        }
        Cmd::Devnet {
            data_dir,
            api_listen,
        } => rt.block_on(async { devnet::run(data_dir, api_listen, stop_on_signal()).await }),
    }
}

fn add_account(dir: &Path, role: Role, deposit: u64) -> anyhow::Result<()> {
    let (store, ledger) = open(dir)?;
    let (hash, id) = store.add_account(role)?;
    if deposit > 0 {
        let account = match role {
            Role::Client => Account::Client(id),
            Role::Owner => Account::Owner(id),
        };
        ledger.deposit(account, deposit)?;
    }
    println!("{hash}");
    Ok(())
}

/// Raises the soft limit of open files to the hard one (systemd starts
/// services at 1024, too few for a busy API and its order ports) and returns
/// the limit in force.
fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a pointer valid for it.
    // (nix would wrap it, but only behind a feature that rebuilds the node's
    // dependencies; this is the only call.)
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    // The kernel refuses more than fs.nr_open, 2^20 by default.
    let want = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit through a pointer valid for it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return want;
        }
    }
    lim.rlim_cur
}

/// A token cancelled by SIGINT or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => tracing::error!("cannot listen for signals"),
        }
        s.cancel();
    });
    stop
}
