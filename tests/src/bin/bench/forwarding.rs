//! Session forwarding: SSH bulk from inside a session to an `sshd` out on the
//! NAT lab's internet, through the session's network namespace and the node's
//! forwarding and NAT, beside the same transfer from the node's own host, as
//! root and in a cgroup weighed as the node weighs its sessions.

use std::time::Duration;

use anyhow::Context;
use jusy_node::sandbox::cgroup::{CgroupLimits, Layout, NodeCgroups, SessionCgroup};
use jusy_tests::lab::{HomeOpts, Lab};
use jusy_tests::process::{self, Output, Proc};
use jusy_tests::{Broker, Login, Node, Scene};

use crate::tools::Keys;

/// The lab's public addresses (198.18.0.0/15) are a special-use range, which
/// a node refuses sessions by default: the node is told to allow it.
const LAB_INTERNET: &str = "198.18.0.0/15";

/// SSH bulk to the lab's `sshd`, MB/s per round, from each side.
#[derive(Debug, Default)]
pub struct Forwarding {
    pub from_node: Vec<f64>,
    /// From the node's host, in a cgroup made as a session's is.
    pub from_node_weighed: Vec<f64>,
    pub from_session: Vec<f64>,
}

/// A root node at home behind the lab's NAT router, its broker and an
/// `sshd` on the lab's internet; in each of `rounds`, `bytes` uploaded by
/// `ssh` from the node's host and then from inside a session. `login_as` is
/// the user the bench's key logs in as on that `sshd`.
pub fn bulk(
    scene: &Scene,
    rt: &tokio::runtime::Runtime,
    keys: &Keys,
    login_as: &str,
    bytes: u64,
    rounds: usize,
) -> anyhow::Result<Forwarding> {
    let mut lab = Lab::new(scene)?;
    let site = lab.public_host("broker")?;
    let data = scene.subdir("broker-lab")?;
    let client = Broker::add_client(scene, &data)?;
    let broker = Broker::start_at(scene, "broker-lab", &site, data, 0, &[])?;
    let target = lab.public_host("sshd")?;
    let _sshd = crate::tools::sshd_at(scene, "sshd-lab", keys, &target, 22)?;
    let laptop = lab.public_host("client")?;
    let home = lab.home("home", HomeOpts::default())?;
    let _node = Node::start_at(
        scene,
        "node-lab",
        &home.host,
        &broker,
        &["--ready-slots", "1", "--net-allow", LAB_INTERNET],
    )?;
    broker.wait_capacity(scene, 1)?;
    let (status, order) = broker.order_from(scene, &laptop, &client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {order}");
    let login = Login::from_order_at(scene, &laptop, &order)?;
    // One connection holds the session open between the transfers.
    let mut hold = login.ssh_command(&login.key, &[]);
    hold.arg("echo '{\"event\":\"held\"}' && exec sleep 100000");
    let mut hold = Proc::start(scene, "lab-hold", hold)?;
    hold.wait_event("held", jusy_tests::jusy::READY)?;
    // The session's client gets the bench's key and trusts the lab sshd.
    let key = std::fs::read(&keys.client_key)?;
    let setup = format!(
        "umask 077 && mkdir -p ~/.ssh && cat > ~/.ssh/id_ed25519 && \
         echo '{} {}' > ~/.ssh/known_hosts",
        target.ip, keys.host_pub
    );
    checked(
        login.ssh(scene, &setup, Some(&key))?,
        "setting up the session",
    )?;

    let upload = |ssh_options: &str| {
        // Times the transfer alone, where it runs: not the login to the
        // session that starts it.
        format!(
            "s=$(date +%s%N) && head -c {bytes} /dev/zero | ssh {ssh_options} \
             -l {login_as} {} 'cat >/dev/null' && echo $(( $(date +%s%N) - s ))",
            target.ip
        )
    };
    let from_node = upload(&format!("-F {}", keys.ssh_config.display()));
    let from_session = upload(
        "-o BatchMode=yes -o IdentitiesOnly=yes -i ~/.ssh/id_ed25519 \
         -o StrictHostKeyChecking=yes -o UserKnownHostsFile=~/.ssh/known_hosts",
    );
    let mbps = |out: Output, what: &str| -> anyhow::Result<f64> {
        let out = checked(out, what)?;
        let ns: f64 = out
            .text()
            .trim()
            .parse()
            .with_context(|| format!("{what}: {:?}", out.text()))?;
        Ok(bytes as f64 / 1e6 / (ns / 1e9))
    };
    let timeout = Duration::from_secs(600);
    let weight = SessionWeight::new()?;
    let measured = (|| {
        let mut got = Forwarding::default();
        for _ in 0..rounds {
            let mut sh = home.host.command("sh");
            sh.args(["-c", &from_node]);
            got.from_node.push(mbps(
                process::run(scene, sh, None, timeout)?,
                "from the node",
            )?);
            let mut sh = home.host.command("sh");
            sh.args(["-c", &from_node]);
            weight.put(&mut sh);
            got.from_node_weighed.push(mbps(
                process::run(scene, sh, None, timeout)?,
                "from the node, weighed as a session",
            )?);
            let mut ssh = login.ssh_command(&login.key, &[]);
            ssh.arg(&from_session);
            got.from_session.push(mbps(
                process::run(scene, ssh, None, timeout)?,
                "from the session",
            )?);
        }
        anyhow::Ok(got)
    })();
    rt.block_on(weight.remove());
    measured
}

/// A cgroup made by the node's own code as it makes a session's: its parent
/// weighs a fifth of the default CPU and disk weight (`weights.rs`), so a
/// transfer from the node's host in it competes for a busy machine as a
/// session does.
struct SessionWeight {
    parent: NodeCgroups,
    cgroup: SessionCgroup,
}

impl SessionWeight {
    fn new() -> anyhow::Result<Self> {
        let parent = NodeCgroups::new(Layout::detect()?, &weight_tag())?;
        let cgroup = parent.create(
            "transfer",
            CgroupLimits {
                memory: 2 << 30,
                pids: 51,
            },
        )?;
        Ok(Self { parent, cgroup })
    }

    /// Makes `cmd` start in the cgroup.
    fn put(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let fds = self.cgroup.join_fds();
        // SAFETY: the closure only writes to descriptors the cgroup holds
        // open for as long as `self` lives (write(2) is async-signal-safe).
        unsafe { cmd.pre_exec(move || jusy_node::sandbox::cgroup::join_in_child(&fds)) };
    }

    /// Kills what is left in the cgroup and removes it and its parent.
    async fn remove(self) {
        if let Err(e) = self.cgroup.destroy().await {
            eprintln!("bench: removing the weighed cgroup: {e}");
        }
        self.parent.remove();
    }
}

/// `out` if its command succeeded.
fn checked(out: Output, what: &str) -> anyhow::Result<Output> {
    anyhow::ensure!(
        out.status == Some(0),
        "{what} failed ({:?}): {}{}",
        out.status,
        out.text(),
        out.stderr
    );
    Ok(out)
}

/// Names this run's weighed cgroups (`jusy-<tag>` under each hierarchy).
fn weight_tag() -> String {
    format!("bench{}", std::process::id())
}

/// Removes this run's weighed cgroups, if any (an interrupted run).
pub async fn remove_weighed() {
    let Ok(layout) = Layout::detect() else {
        return;
    };
    let tag = weight_tag();
    if let Ok(parent) = NodeCgroups::new(layout, &tag) {
        parent.sweep().await;
        parent.remove();
    }
}
