//! The client side of an order: the credentials from `GET /order/…` saved as a
//! key file and a `known_hosts` file, and the stock OpenSSH tools run with
//! strict host-key checking against them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::process::{self, Output};
use crate::scene::Scene;
use crate::site::Site;

/// How long one client command may take.
pub const COMMAND: Duration = Duration::from_secs(120);

/// Everything needed to log in to one order.
#[derive(Debug, Clone)]
pub struct Login {
    /// Where the client's tools run.
    pub site: Site,
    pub dir: PathBuf,
    pub user: String,
    pub host: String,
    pub port: u16,
    pub order_id: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// The cipher preference the broker named for the node, if any.
    pub ciphers: Option<String>,
}

impl Login {
    /// Saves the order's `privkey` and `known_hosts` line in a fresh directory,
    /// for tools run on this machine.
    pub fn from_order(scene: &Scene, order: &Value) -> anyhow::Result<Self> {
        Self::from_order_at(scene, &Site::local(), order)
    }

    /// Like [`Login::from_order`], for tools run at `site`.
    pub fn from_order_at(scene: &Scene, site: &Site, order: &Value) -> anyhow::Result<Self> {
        let field = |k: &str| {
            order[k]
                .as_str()
                .with_context(|| format!("order has no {k}: {order}"))
        };
        let order_id = field("order_id")?.to_owned();
        let dir = scene.subdir(&format!("client-{order_id}"))?;
        let key = dir.join("key");
        std::fs::write(&key, field("privkey")?)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let known_hosts = dir.join("known_hosts");
        std::fs::write(&known_hosts, format!("{}\n", field("known_hosts")?))?;
        Ok(Self {
            site: site.clone(),
            user: field("username")?.to_owned(),
            host: field("host")?.to_owned(),
            port: u16::try_from(order["port"].as_u64().context("order has no port")?)?,
            order_id,
            key,
            known_hosts,
            dir,
            ciphers: order["ssh_ciphers"].as_str().map(str::to_owned),
        })
    }

    /// Options every OpenSSH tool gets: no user config, no agent, only this key,
    /// strict host-key checking against the key the broker returned, and the
    /// ciphers the broker named, as its users are told to run.
    pub fn options(&self, key: &Path) -> Vec<String> {
        let mut options: Vec<String> = [
            "-F".to_owned(),
            "/dev/null".to_owned(),
            "-i".to_owned(),
            key.display().to_string(),
            "-o".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
            "-o".to_owned(),
            "BatchMode=yes".to_owned(),
            "-o".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            "-o".to_owned(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".to_owned(),
            "ConnectTimeout=20".to_owned(),
        ]
        .into();
        if let Some(ciphers) = &self.ciphers {
            options.extend(["-o".to_owned(), format!("Ciphers={ciphers}")]);
        }
        options
    }

    /// `ssh … -l user -p port host` with extra options, ready for a remote command.
    pub fn ssh_command(&self, key: &Path, extra: &[&str]) -> Command {
        self.ssh_command_as(key, &self.user, extra)
    }

    /// Like [`Login::ssh_command`], logging in as `user`.
    pub fn ssh_command_as(&self, key: &Path, user: &str, extra: &[&str]) -> Command {
        let mut cmd = self.site.command("ssh");
        cmd.env_remove("SSH_AUTH_SOCK")
            .args(self.options(key))
            .args(extra)
            .args(["-l", user, "-p", &self.port.to_string(), &self.host]);
        cmd
    }

    /// Runs `remote` over ssh with the order's key.
    pub fn ssh(&self, scene: &Scene, remote: &str, input: Option<&[u8]>) -> anyhow::Result<Output> {
        let mut cmd = self.ssh_command(&self.key, &[]);
        cmd.arg(remote);
        process::run(scene, cmd, input, COMMAND)
    }

    /// `scp` between `from` and `to`, where a remote path is written `:path`.
    pub fn scp(&self, scene: &Scene, from: &str, to: &str) -> anyhow::Result<Output> {
        self.scp_within(scene, from, to, COMMAND)
    }

    /// Like [`Login::scp`], allowed to take up to `timeout`.
    pub fn scp_within(
        &self,
        scene: &Scene,
        from: &str,
        to: &str,
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let remote = |p: &str| match p.strip_prefix(':') {
            Some(path) => format!("{}@{}:{path}", self.user, self.host),
            None => p.to_owned(),
        };
        let mut cmd = self.site.command("scp");
        cmd.env_remove("SSH_AUTH_SOCK")
            .args(self.options(&self.key))
            .args(["-P", &self.port.to_string(), &remote(from), &remote(to)]);
        process::run(scene, cmd, None, timeout)
    }

    /// Runs an `sftp` batch of commands.
    pub fn sftp(&self, scene: &Scene, batch: &str) -> anyhow::Result<Output> {
        let batch_file = self.dir.join("sftp.batch");
        std::fs::write(&batch_file, batch)?;
        let mut cmd = self.site.command("sftp");
        cmd.env_remove("SSH_AUTH_SOCK")
            .args(self.options(&self.key))
            .args(["-P", &self.port.to_string(), "-b"])
            .arg(&batch_file)
            .arg(format!("{}@{}", self.user, self.host));
        process::run(scene, cmd, None, COMMAND)
    }

    /// `rsync -e ssh…` between `from` and `to`, where a remote path is `:path`.
    pub fn rsync(&self, scene: &Scene, from: &str, to: &str) -> anyhow::Result<Output> {
        let remote = |p: &str| match p.strip_prefix(':') {
            Some(path) => format!("{}@{}:{path}", self.user, self.host),
            None => p.to_owned(),
        };
        let ssh = format!("ssh -p {} {}", self.port, self.options(&self.key).join(" "));
        let mut cmd = self.site.command("rsync");
        cmd.env_remove("SSH_AUTH_SOCK")
            .args(["-a", "-e", &ssh, &remote(from), &remote(to)]);
        process::run(scene, cmd, None, COMMAND)
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            break;
        };
        h.update(chunk);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes `len` pseudo-random bytes (incompressible, reproducible) to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) -> anyhow::Result<()> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        // xorshift64: fast, and enough to defeat compression.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data)?;
    Ok(())
}
