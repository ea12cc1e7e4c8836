//! A jusy network on loopback, started the way an operator and a node owner
//! start it: `jusy-broker client add`, `jusy-broker serve`, `jusy-node`. Orders
//! go through the real `curl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::process::{self, Proc, bin};
use crate::scene::Scene;

/// How long a process may take to say it is ready.
pub const READY: Duration = Duration::from_secs(30);

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub relay: SocketAddr,
    pub key: String,
}

impl Broker {
    /// Creates a client account in the broker's database (the broker must not
    /// be running on it) and returns its hash.
    pub fn add_client(scene: &Scene, data_dir: &std::path::Path) -> anyhow::Result<String> {
        let mut cmd = Command::new(bin("jusy-broker")?);
        cmd.args(["client", "add", "--data-dir"]).arg(data_dir);
        let out = process::run(scene, cmd, None, READY)?;
        anyhow::ensure!(out.status == Some(0), "client add failed: {}", out.stderr);
        Ok(out.text().trim().to_owned())
    }

    /// Starts `jusy-broker serve` on loopback; `relay_port` 0 lets the OS pick.
    pub fn start(
        scene: &Scene,
        name: &str,
        data_dir: PathBuf,
        relay_port: u16,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("jusy-broker")?);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--relay-listen", &format!("127.0.0.1:{relay_port}")])
            .args(["--order-bind", "127.0.0.1", "--public-host", "127.0.0.1"])
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
            data_dir,
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

    /// `curl` GET of an API path: HTTP status and JSON body.
    pub fn get(&self, scene: &Scene, path: &str) -> anyhow::Result<(u16, Value)> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
            .arg(format!("http://{}{path}", self.api));
        let out = process::run(scene, cmd, None, Duration::from_secs(30))?;
        anyhow::ensure!(out.status == Some(0), "curl failed: {}", out.stderr);
        let text = out.text();
        let (body, code) = text.rsplit_once('\n').context("no status line from curl")?;
        let body = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
        Ok((code.trim().parse()?, body))
    }

    /// Orders a session the documented way: `GET /order/<client hash>`.
    pub fn order(&self, scene: &Scene, client: &str) -> anyhow::Result<(u16, Value)> {
        self.get(scene, &format!("/order/{client}"))
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub proc: Proc,
    pub data_dir: PathBuf,
    /// The node's identity (hex), from its `registered` event.
    pub node_id: String,
}

impl Node {
    /// Starts `jusy-node` against `broker` and waits until it has registered.
    pub fn start(
        scene: &Scene,
        name: &str,
        broker: &Broker,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_in(scene, name, scene.subdir(name)?, broker, extra)
    }

    /// Like [`Node::start`] with the node's data directory at `data_dir`.
    pub fn start_in(
        scene: &Scene,
        name: &str,
        data_dir: PathBuf,
        broker: &Broker,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("jusy-node")?);
        cmd.arg("--broker")
            .arg(broker.relay.to_string())
            .args(["--broker-key", &broker.key])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .env("RUST_LOG", "info,jusy_node=debug,quinn=warn");
        let mut proc = Proc::start(scene, name, cmd)?;
        let registered = proc.wait_event("registered", READY)?;
        let node_id = registered["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            proc,
            data_dir,
            node_id,
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
