//! An OpenSSH master connection to an order (`ssh -M -S <socket>`) and the
//! channels other `ssh -S <socket>` clients open over it: many channels on one
//! SSH connection, the way ControlMaster users and tools built on it work.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::{COMMAND, Login};
use crate::process::{self, Output};
use crate::scene::Scene;

/// A running `ssh -M` master connection; closed (and its socket removed) on drop.
#[derive(Debug)]
pub struct Master {
    login: Login,
    pub socket: PathBuf,
    /// The master's stderr, where OpenSSH reports channels the server refused.
    pub log: PathBuf,
    child: Child,
}

impl Master {
    /// Connects `login`'s order and waits until the master accepts clients.
    pub fn open(scene: &Scene, login: &Login, name: &str) -> anyhow::Result<Self> {
        let mut r = [0u8; 6];
        getrandom::fill(&mut r)?;
        // A socket path must fit in 108 bytes: scene directories may not.
        let socket = std::env::temp_dir().join(format!("jusy-mux-{}", hex::encode(r)));
        let log = scene.dir().join(format!("{name}.err"));
        scene.add_log(log.clone());
        let err = std::fs::File::create(&log)?;
        let mut cmd = login.ssh_command(&login.key, &["-M", "-N", "-o", "ControlPersist=no"]);
        cmd.arg("-S")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err));
        scene.note(&format!("start {name}: {cmd:?}"));
        let child = cmd.spawn().context("starting the ssh master")?;
        let mut master = Self {
            login: login.clone(),
            socket,
            log,
            child,
        };
        // OpenSSH has no readiness event: ask the socket until it answers.
        let deadline = Instant::now() + COMMAND;
        loop {
            let mut check = master.client();
            check.args(["-O", "check"]);
            let out = check.stdin(Stdio::null()).output()?;
            if out.status.success() {
                return Ok(master);
            }
            if let Some(status) = master.child.try_wait()? {
                anyhow::bail!("the ssh master exited with {status}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the ssh master never answered on {}",
                master.socket.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// An `ssh -S` client of this master. Its own destination is a closed
    /// port, so if the master were gone it would fail instead of quietly
    /// opening a connection of its own.
    fn client(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.env_remove("SSH_AUTH_SOCK")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "ControlMaster=no", "-S"])
            .arg(&self.socket)
            .args(["-p", "1", "-l", &self.login.user, "127.0.0.1"]);
        cmd
    }

    /// A client that opens one channel running `remote`.
    pub fn command(&self, remote: &str) -> Command {
        let mut cmd = self.client();
        cmd.arg(remote);
        cmd
    }

    /// Runs `remote` on a channel of this connection to its end.
    pub fn run(&self, scene: &Scene, remote: &str) -> anyhow::Result<Output> {
        process::run(scene, self.command(remote), None, COMMAND)
    }

    /// Starts `remote` on a channel of this connection, its input from `stdin`,
    /// without waiting for it.
    pub fn spawn(&self, remote: &str, stdin: Stdio) -> anyhow::Result<Child> {
        let mut cmd = self.command(remote);
        cmd.stdin(stdin).stdout(Stdio::null()).stderr(Stdio::null());
        Ok(cmd.spawn()?)
    }

    /// The master's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the master wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self
            .client()
            .args(["-O", "exit"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Client processes killed when dropped, so a failing test leaves none behind.
#[derive(Debug, Default)]
pub struct Children(pub Vec<Child>);

impl Children {
    /// How many are still running.
    pub fn running(&mut self) -> usize {
        self.0
            .iter_mut()
            .map(Child::try_wait)
            .filter(|w| matches!(w, Ok(None)))
            .count()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
