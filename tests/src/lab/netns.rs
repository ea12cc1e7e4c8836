//! Network namespaces and the links between them: checked `ip`/`ip netns exec`
//! commands, veth pairs created directly inside their namespaces (so nothing
//! lands in the machine's own network), and running Rust code inside a
//! namespace.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{self, Output};
use crate::scene::Scene;

/// How long one setup command (`ip`, `nft`, `tc`, `conntrack`) may take.
const SETUP: Duration = Duration::from_secs(30);

/// One end of a link: an interface in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub ns: String,
    pub ifname: String,
}

/// Runs a setup command and fails with its stderr unless it succeeds.
pub(crate) fn checked(scene: &Scene, cmd: Command, input: Option<&[u8]>) -> anyhow::Result<Output> {
    let desc = format!("{cmd:?}");
    let out = process::run(scene, cmd, input, SETUP)?;
    anyhow::ensure!(
        out.status == Some(0),
        "{desc} failed ({:?}): {}",
        out.status,
        out.stderr.trim()
    );
    Ok(out)
}

/// `ip <args>`, checked.
pub(crate) fn ip(scene: &Scene, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    checked(scene, cmd, None).map(drop)
}

/// `ip netns exec <ns> <args>`, checked.
pub(crate) fn exec(
    scene: &Scene,
    ns: &str,
    args: &[&str],
    input: Option<&[u8]>,
) -> anyhow::Result<Output> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    checked(scene, cmd, input)
}

/// Creates namespace `name` with its loopback up.
pub(crate) fn create(scene: &Scene, name: &str) -> anyhow::Result<()> {
    ip(scene, &["netns", "add", name])?;
    ip(scene, &["-n", name, "link", "set", "lo", "up"])
}

/// Creates a veth pair between `a` and `b` and brings both ends up.
pub(crate) fn veth(scene: &Scene, a: &End, b: &End) -> anyhow::Result<()> {
    ip(
        scene,
        &[
            "-n", &a.ns, "link", "add", "name", &a.ifname, "type", "veth", "peer", "name",
            &b.ifname, "netns", &b.ns,
        ],
    )?;
    ip(scene, &["-n", &a.ns, "link", "set", &a.ifname, "up"])?;
    ip(scene, &["-n", &b.ns, "link", "set", &b.ifname, "up"])
}

/// Adds `addr` (with prefix length) to an interface.
pub(crate) fn address(scene: &Scene, end: &End, addr: &str) -> anyhow::Result<()> {
    ip(
        scene,
        &["-n", &end.ns, "addr", "add", addr, "dev", &end.ifname],
    )
}

/// Sets a sysctl inside `ns` (each namespace has its own `net.*` values).
pub(crate) fn sysctl(scene: &Scene, ns: &str, setting: &str) -> anyhow::Result<()> {
    exec(scene, ns, &["sysctl", "-qw", setting], None).map(drop)
}

/// Runs `f` on a thread that has entered namespace `ns`. Sockets keep the
/// namespace they were made in, so a listener made here can be used anywhere.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread, which
        // ends when `f` returns.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    .with_context(|| format!("entering {ns}"))
}
