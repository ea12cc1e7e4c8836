//! `jusy-broker devnet`: a broker and a node on this machine, and a demo client,
//! so that one command gives a network to order from and `ssh` into.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use jusy_broker::Broker;
use jusy_broker::config::Config;
use jusy_broker::ledger::Ledger;
use jusy_broker::store::{Role, Store};
use jusy_common::ledger::Account;

/// Session disks of the devnet, in MiB: they count at their full size
/// against the free space, and 1 GiB ones fit on a development machine where
/// 5 GiB ones (the default) might leave no slot at all.
const DEVNET_DISK_MIB: u32 = 1024;

/// Runs the local network until `stop` is cancelled.
pub async fn run(
    data_dir: PathBuf,
    api_listen: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // The node's session users pass through this directory to their homes.
    jusy_node::state::create_traversable(&data_dir)?;
    let store = Store::open(&data_dir.join("broker"))?;
    let cfg = Config {
        data_dir: data_dir.join("broker"),
        api_listen,
        relay_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        order_bind: [127, 0, 0, 1].into(),
        // The local node is tested as any node is, but a busy development
        // machine must not fail it for speed.
        speed_test_limit_ms: 30_000,
        // What the demo node below offers.
        disk_mib: DEVNET_DISK_MIB,
        ..Config::default()
    };
    // A demo client with funds for ten orders, and an owner for the node.
    let (client, client_id) = store.add_account(Role::Client)?;
    Ledger::open(&store, cfg.pricing())?.deposit(Account::Client(client_id), 10 * cfg.price_sat)?;
    let (owner, _) = store.add_account(Role::Owner)?;
    let broker = Broker::bind(cfg, store, super::raise_open_files()).await?;
    let api = broker.api_addr;
    let node_cfg = jusy_node::config::Config {
        broker: broker.relay_addr.to_string(),
        broker_key: broker.key.to_string(),
        data_dir: data_dir.join("node"),
        ready_slots: Some(2),
        disk_mib: DEVNET_DISK_MIB.into(),
        owner: Some(owner),
        ..Default::default()
    };
    let relay = broker.relay.clone();
    let ready = serde_json::json!({
        "event": "ready",
        "api": api.to_string(),
        "relay": broker.relay_addr.to_string(),
        "broker_key": broker.key.to_string(),
        "client_hash": client,
    });
    let broker_key = broker.key;
    let broker_task = tokio::spawn(broker.run(stop.clone()));
    let node_stop = CancellationToken::new();
    let node_task = tokio::spawn(jusy_node::run(node_cfg, broker_key, node_stop.clone()));

    // Say how to use it once the node has a slot ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while relay.capacity().1 == 0 && tokio::time::Instant::now() < deadline && !stop.is_cancelled()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{ready}");
    println!(
        "\njusy devnet is up: a broker on http://{api} and a node with ready sessions.\n\n\
         Order a shell and log in with the jusy CLI:\n\n  \
         cargo run --release --bin jusy -- order http://{api} {client} --ssh\n\n\
         or by hand, as any client can:\n\n  \
         curl -s http://{api}/order/{client} > order.json\n  \
         python3 -c 'import json;o=json.load(open(\"order.json\"));open(\"key\",\"w\").write(o[\"privkey\"]);open(\"known_hosts\",\"w\").write(o[\"known_hosts\"]+\"\\n\");print(o[\"username\"],o[\"port\"])'\n  \
         chmod 600 key\n  \
         ssh -i key -o UserKnownHostsFile=known_hosts -l <username> -p <port> 127.0.0.1\n\n\
         Press Ctrl-C to stop; sessions are ended and their users removed.\n"
    );

    stop.cancelled().await;
    node_stop.cancel();
    node_task.await??;
    broker_task.await??;
    Ok(())
}
