//! `jusy-liar`: a node that lies, for the adversarial tests. It speaks the
//! node's protocol to a real relay — QUIC with its identity's certificate,
//! hello, ready slots, an honest speed test, signed acceptances and receipt
//! chains — but runs no sessions and tells the lie chosen with `--lie`
//! (`lie.rs`): a `DONE` or a limit without evidence, a receipt of impossible
//! CPU time, a session it never ends, terms other than the order's, the end
//! of another node's order.
//!
//! ```text
//! JUSY_OWNER=<owner hash> jusy-liar --broker 127.0.0.1:7443 --broker-key <key> \
//!     --data-dir <dir> --lie early-done
//! ```
//!
//! Instead of SSH, a client stream gets the line `jusy-liar`; a line `LOGIN`
//! from the client makes the liar report a login on that stream (and answer
//! `logged-in`), so a test logs in with a plain TCP connection to the order
//! port. What it does is printed as JSON event lines on stdout, like
//! `jusy-node`'s: `registered`, `speed_test`, `accepted`, `logged_in`,
//! `receipt`, `ended`, `cancel`, and `lie` when it has sent its lie. SIGTERM
//! closes its connection, so that the relay stops offering its slots at once;
//! a relay that drops it ends it with exit code 1.

mod lie;
mod link;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use jusy_common::identity::PeerId;
use jusy_common::wire::OrderId;

use lie::Lie;

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "jusy-liar", about = "A jusy node that lies, for tests")]
struct Cli {
    /// The relay's QUIC address (`ip:port`).
    #[arg(long)]
    broker: std::net::SocketAddr,
    /// The relay's key, pinned as `jusy-node` pins it.
    #[arg(long)]
    broker_key: PeerId,
    /// Where its identity and host key are kept (made on first start).
    #[arg(long)]
    data_dir: PathBuf,
    /// The lie to tell.
    #[arg(long, value_enum)]
    lie: Lie,
    /// The order whose end `ends-others` claims (another node's).
    #[arg(long, required_if_eq("lie", "ends-others"))]
    victim: Option<OrderId>,
    /// Cores reported in the hello (and run in the speed test).
    #[arg(long, default_value_t = 1)]
    cores: u32,
    /// Ready slots offered at once.
    #[arg(long, default_value_t = 1)]
    slots: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("data directory {}", cli.data_dir.display()))?;
    let identity = jusy_node::keys::load_or_create_identity(&cli.data_dir)?;
    let host_key = jusy_node::keys::load_or_create_host_key(&cli.data_dir)?
        .public_key()
        .to_openssh()?;
    let setup = link::Setup {
        relay: cli.broker,
        relay_key: cli.broker_key,
        identity,
        host_key,
        // Read like jusy-node's: never from the command line.
        owner: std::env::var("JUSY_OWNER").ok(),
        cores: cli.cores,
        slots: cli.slots,
        lie: cli.lie,
        victim: cli.victim,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(link::run(setup))
}
