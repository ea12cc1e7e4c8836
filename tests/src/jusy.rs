//! A jusy network started the way an operator and a node owner start it:
//! `jusy-broker client add`, `jusy-broker serve`, `jusy-node`, each at a [`Site`]
//! (loopback, or a host of a lab network). Orders go through the real `curl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::process::{self, Proc, bin};
use crate::scene::Scene;
use crate::site::Site;

/// How long a process may take to say it is ready.
pub const READY: Duration = Duration::from_secs(30);

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub site: Site,
    pub api: SocketAddr,
    pub relay: SocketAddr,
    pub key: String,
    /// The broker's mesh address, when it was started with `--mesh-listen`.
    pub mesh: Option<String>,
    /// Where it serves metrics, when started with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
}

impl Broker {
    /// Creates a client account with funds for 50 orders at the default price
    /// in the broker's database (the broker must not be running on it) and
    /// returns its hash.
    pub fn add_client(scene: &Scene, data_dir: &std::path::Path) -> anyhow::Result<String> {
        Self::add_account(scene, data_dir, "client", 1_000_000)
    }

    /// The broker key of the broker whose database is `data_dir` (made now if
    /// there is none yet), from `jusy-broker key`, for other brokers' `--trust`.
    pub fn identity(scene: &Scene, data_dir: &std::path::Path) -> anyhow::Result<String> {
        Ok(Self::keys(scene, data_dir)?.0)
    }

    /// Like [`Broker::identity`], with the broker's mesh peer id.
    pub fn keys(scene: &Scene, data_dir: &std::path::Path) -> anyhow::Result<(String, String)> {
        let mut cmd = Command::new(bin("jusy-broker")?);
        cmd.args(["key", "--data-dir"]).arg(data_dir);
        let out = process::run(scene, cmd, None, READY)?;
        anyhow::ensure!(out.status == Some(0), "key failed: {}", out.stderr);
        let v: Value = serde_json::from_str(out.text().trim())?;
        let field = |k: &str| -> anyhow::Result<String> {
            Ok(v[k].as_str().with_context(|| k.to_owned())?.to_owned())
        };
        Ok((field("broker_key")?, field("mesh_peer_id")?))
    }

    /// Creates a client or owner account with `deposit` satoshi.
    pub fn add_account(
        scene: &Scene,
        data_dir: &std::path::Path,
        role: &str,
        deposit: u64,
    ) -> anyhow::Result<String> {
        let mut cmd = Command::new(bin("jusy-broker")?);
        cmd.args([role, "add", "--deposit", &deposit.to_string(), "--data-dir"])
            .arg(data_dir);
        let out = process::run(scene, cmd, None, READY)?;
        anyhow::ensure!(out.status == Some(0), "{role} add failed: {}", out.stderr);
        Ok(out.text().trim().to_owned())
    }

    /// Starts `jusy-broker serve` on loopback; `relay_port` 0 lets the OS pick.
    pub fn start(
        scene: &Scene,
        name: &str,
        data_dir: PathBuf,
        relay_port: u16,
    ) -> anyhow::Result<Self> {
        Self::start_at(scene, name, &Site::local(), data_dir, relay_port, &[])
    }

    /// Like [`Broker::start`], with extra `serve` flags.
    pub fn start_with(
        scene: &Scene,
        name: &str,
        data_dir: PathBuf,
        relay_port: u16,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_at(scene, name, &Site::local(), data_dir, relay_port, extra)
    }

    /// Starts `jusy-broker serve` at `site`, listening and announcing its
    /// address; `relay_port` 0 lets the OS pick; `extra` are more `serve` flags.
    pub fn start_at(
        scene: &Scene,
        name: &str,
        site: &Site,
        data_dir: PathBuf,
        relay_port: u16,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let ip = site.ip.to_string();
        let mut cmd = site.command(bin("jusy-broker")?);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--api-listen", &SocketAddr::new(site.ip, 0).to_string()])
            .args([
                "--relay-listen",
                &SocketAddr::new(site.ip, relay_port).to_string(),
            ])
            .args(["--order-bind", &ip, "--public-host", &ip])
            .args(extra)
            // The terms test nodes can meet: their 512 MiB disks (see
            // `Node::spawn_in`) and the shortest grace they offer; tests with
            // other nodes sell other terms.
            .args(if extra.contains(&"--disk-mib") {
                &[][..]
            } else {
                &["--disk-mib", "512"][..]
            })
            .args(if extra.contains(&"--grace-secs") {
                &[][..]
            } else {
                &["--grace-secs", "1"][..]
            })
            // A short speed test keeps start-up quick in debug builds, with a
            // limit a busy machine meets; tests of the test itself override both.
            .args(if extra.contains(&"--speed-test-rounds") {
                &[][..]
            } else {
                &[
                    "--speed-test-rounds",
                    "200000",
                    "--speed-test-limit-ms",
                    "20000",
                ][..]
            })
            .env("RUST_LOG", "info,jusy_broker=debug,quinn=warn");
        let mut proc = Proc::start(scene, name, cmd)?;
        let ready = proc.wait_event("ready", READY)?;
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            ready[k]
                .as_str()
                .context("ready line field")?
                .parse()
                .context("address")
        };
        Ok(Self {
            api: addr("api")?,
            relay: addr("relay")?,
            key: ready["broker_key"]
                .as_str()
                .context("broker_key")?
                .to_owned(),
            mesh: ready["mesh"].as_str().map(str::to_owned),
            metrics: ready["metrics"].as_str().and_then(|m| m.parse().ok()),
            data_dir,
            site: site.clone(),
            proc,
        })
    }

    /// Waits until the broker offers at least `slots` ready slots.
    pub fn wait_capacity(&self, scene: &Scene, slots: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY;
        loop {
            let (status, body) = self.get(scene, "/health")?;
            if status == 200 && body["free_slots"].as_u64() >= Some(slots) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("broker never offered {slots} slots; last health: {body}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `curl` GET of an API path from the broker's own host: HTTP status and
    /// JSON body.
    pub fn get(&self, scene: &Scene, path: &str) -> anyhow::Result<(u16, Value)> {
        self.get_from(scene, &self.site, path)
    }

    /// `curl` GET of an API path from `from`.
    pub fn get_from(&self, scene: &Scene, from: &Site, path: &str) -> anyhow::Result<(u16, Value)> {
        api_request(scene, from, self.api, "GET", path, &[], None)
    }

    /// Any `curl` request to the API from the broker's own host: HTTP status
    /// and JSON body.
    pub fn request(
        &self,
        scene: &Scene,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&[u8]>,
    ) -> anyhow::Result<(u16, Value)> {
        api_request(scene, &self.site, self.api, method, path, headers, body)
    }

    /// Orders a session the documented way: `GET /order/<client hash>`.
    pub fn order(&self, scene: &Scene, client: &str) -> anyhow::Result<(u16, Value)> {
        self.get(scene, &format!("/order/{client}"))
    }

    /// Orders from a client's host, the way that client would.
    pub fn order_from(
        &self,
        scene: &Scene,
        from: &Site,
        client: &str,
    ) -> anyhow::Result<(u16, Value)> {
        self.get_from(scene, from, &format!("/order/{client}"))
    }
}

/// A `curl` request from `from` to the broker API at `api`: HTTP status and
/// JSON body.
pub fn api_request(
    scene: &Scene,
    from: &Site,
    api: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Value)> {
    let mut cmd = from.command("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    cmd.arg(format!("http://{api}{path}"));
    let out = process::run(scene, cmd, body, Duration::from_secs(30))?;
    anyhow::ensure!(out.status == Some(0), "curl failed: {}", out.stderr);
    let text = out.text();
    let (body, code) = text.rsplit_once('\n').context("no status line from curl")?;
    let body = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    Ok((code.trim().parse()?, body))
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub proc: Proc,
    pub data_dir: PathBuf,
    /// The node's identity (hex), from its `registered` event.
    pub node_id: String,
    /// The largest QUIC datagram it tries towards its relay, from the same.
    pub max_datagram: u64,
}

impl Node {
    /// Starts `jusy-node` on this machine against `broker` and waits until it
    /// has registered.
    pub fn start(
        scene: &Scene,
        name: &str,
        broker: &Broker,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_at(scene, name, &Site::local(), broker, extra)
    }

    /// Like [`Node::start`], earning for the owner whose hash is `owner`
    /// (given as a node owner is told to: in the environment).
    pub fn start_owned(
        scene: &Scene,
        name: &str,
        broker: &Broker,
        owner: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_owned_in(scene, name, scene.subdir(name)?, broker, owner, extra)
    }

    /// Like [`Node::start_owned`] with the node's data directory at `data_dir`.
    pub fn start_owned_in(
        scene: &Scene,
        name: &str,
        data_dir: PathBuf,
        broker: &Broker,
        owner: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let site = Site::local();
        let relay = broker.relay;
        let mut node = Self::spawn_in(
            scene,
            name,
            &site,
            data_dir,
            broker,
            relay,
            Some(owner),
            extra,
        )?;
        node.wait_registered()?;
        Ok(node)
    }

    /// Like [`Node::start`] with the node's data directory at `data_dir`.
    pub fn start_in(
        scene: &Scene,
        name: &str,
        data_dir: PathBuf,
        broker: &Broker,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut node = Self::spawn_in(
            scene,
            name,
            &Site::local(),
            data_dir,
            broker,
            broker.relay,
            None,
            extra,
        )?;
        node.wait_registered()?;
        Ok(node)
    }

    /// Starts `jusy-node` at `site` against `broker` and waits until it has
    /// registered.
    pub fn start_at(
        scene: &Scene,
        name: &str,
        site: &Site,
        broker: &Broker,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_via(scene, name, site, broker, broker.relay, extra)
    }

    /// Like [`Node::start_at`], dialling `relay` instead of the broker's own
    /// relay address (a relay reached through an impairer, say); the node
    /// still pins `broker`'s key.
    pub fn start_via(
        scene: &Scene,
        name: &str,
        site: &Site,
        broker: &Broker,
        relay: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut node = Self::spawn_via(scene, name, site, broker, relay, extra)?;
        node.wait_registered()?;
        Ok(node)
    }

    /// Waits for the node's `registered` event and notes its identity.
    pub fn wait_registered(&mut self) -> anyhow::Result<()> {
        let registered = self.proc.wait_event("registered", READY)?;
        registered["node_id"]
            .as_str()
            .unwrap_or_default()
            .clone_into(&mut self.node_id);
        self.max_datagram = registered["max_datagram"].as_u64().unwrap_or_default();
        Ok(())
    }

    /// Starts `jusy-node` at `site` without waiting for it to register (for
    /// homes whose node cannot get out).
    pub fn spawn_at(
        scene: &Scene,
        name: &str,
        site: &Site,
        broker: &Broker,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn_via(scene, name, site, broker, broker.relay, extra)
    }

    fn spawn_via(
        scene: &Scene,
        name: &str,
        site: &Site,
        broker: &Broker,
        relay: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn_in(
            scene,
            name,
            site,
            scene.subdir(name)?,
            broker,
            relay,
            None,
            extra,
        )
    }

    /// Like [`Node::spawn_via`] with the node's data directory at `data_dir`,
    /// and the owner hash, if any, in `JUSY_OWNER`.
    #[allow(clippy::too_many_arguments)]
    fn spawn_in(
        scene: &Scene,
        name: &str,
        site: &Site,
        data_dir: PathBuf,
        broker: &Broker,
        relay: SocketAddr,
        owner: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = site.command(bin("jusy-node")?);
        cmd.arg("--broker")
            .arg(relay.to_string())
            .args(["--broker-key", &broker.key])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            // Every session disk counts at its full size against the free
            // space (5 GiB by default): tests that do not size their disks
            // get 512 MiB ones (more than any test writes), so parallel
            // tests fit on a build machine.
            .args(if extra.contains(&"--disk-mib") {
                &[][..]
            } else {
                &["--disk-mib", "512"][..]
            })
            .env("RUST_LOG", "info,jusy_node=debug,quinn=warn");
        if let Some(owner) = owner {
            cmd.env("JUSY_OWNER", owner);
        }
        let proc = Proc::start(scene, name, cmd)?;
        Ok(Self {
            proc,
            data_dir,
            node_id: String::new(),
            max_datagram: 0,
        })
    }

    /// Waits for the node to report the end of an order's session (after its
    /// user and data are removed) and returns the end reason code.
    pub fn wait_session_end(
        &mut self,
        order_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let ev = self
            .proc
            .wait_event_where("session_ended", timeout, |v| v["order_id"] == order_id)?;
        Ok(ev["reason"].as_str().unwrap_or_default().to_owned())
    }
}

/// Whether a Linux user exists (`getent passwd`).
pub fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
