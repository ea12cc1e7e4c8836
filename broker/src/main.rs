//! `jusy-broker`: parses the command line, loads the configuration, and runs the
//! broker, a devnet, or an administrative command.

use std::net::SocketAddr;
use std::path::PathBuf;

mod devnet;

use clap::{Parser, Subcommand};
use jusy_broker::Broker;
use jusy_broker::config::Config;
use jusy_broker::store::Store;
use tokio_util::sync::CancellationToken;

/// The jusy broker: relay for nodes behind NAT, order ports, HTTP API.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve {
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
        /// Seconds a client has to connect to a new order.
        #[arg(long)]
        connect_window_secs: Option<u32>,
    },
    /// Manage client accounts (with the broker stopped).
    Client {
        #[command(subcommand)]
        cmd: ClientCmd,
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
enum ClientCmd {
    /// Create a client account and print its hash.
    Add {
        #[arg(long, default_value = "/var/lib/jusy-broker")]
        data_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn,russh=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Serve {
            config,
            data_dir,
            api_listen,
            relay_listen,
            order_bind,
            public_host,
            connect_window_secs,
        } => {
            let mut cfg = match config {
                Some(p) => Config::load(&p)?,
                None => Config::default(),
            };
            if let Some(v) = data_dir {
                cfg.data_dir = v;
            }
            if let Some(v) = api_listen {
                cfg.api_listen = v;
            }
            if let Some(v) = relay_listen {
                cfg.relay_listen = v;
            }
            if let Some(v) = order_bind {
                cfg.order_bind = v;
            }
            if let Some(v) = public_host {
                cfg.public_host = v;
            }
            if let Some(v) = connect_window_secs {
                cfg.connect_window_secs = v;
            }
            cfg.validate()?;
            rt.block_on(async {
                let store = Store::open(&cfg.data_dir)?;
                let broker = Broker::bind(cfg, store).await?;
                println!("{}", broker.ready_line());
                broker.run(stop_on_signal()).await?;
                anyhow::Ok(())
            })
        }
        Cmd::Client {
            cmd: ClientCmd::Add { data_dir },
        } => {
            let store = Store::open(&data_dir)?;
            println!("{}", store.add_client()?);
            Ok(())
        }
        Cmd::Devnet {
            data_dir,
            api_listen,
        } => rt.block_on(async { devnet::run(data_dir, api_listen, stop_on_signal()).await }),
    }
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
