//! `jusy-node check`: whether this machine can serve sessions, tested the way
//! the node uses it, in a report a person can read. Nothing is changed: no
//! key, user, cgroup, table or file is made.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jusy_common::identity::PeerId;
use quinn::crypto::rustls::QuicClientConfig;

use crate::config::Config;
use crate::sandbox::cgroup::Layout;

/// How long the relay has to answer a QUIC handshake.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);

/// Programs the node runs.
pub const TOOLS: [(&str, &str); 7] = [
    ("nft", "nftables"),
    ("useradd", "passwd"),
    ("userdel", "passwd"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
];

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Whether the node can serve as far as this check goes.
    pub ok: bool,
    pub what: &'static str,
    pub detail: String,
}

pub fn ok(what: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        ok: true,
        what,
        detail: detail.into(),
    }
}

pub fn problem(what: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        ok: false,
        what,
        detail: detail.into(),
    }
}

/// Where `program` is on `PATH`, if it is there and executable.
pub fn on_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn root() -> Finding {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        ok("root", "running as root")
    } else {
        problem(
            "root",
            "not root: sessions are users, cgroups, mounts and nftables tables of their own; \
             run the node (and this check) as root",
        )
    }
}

fn cgroups() -> Finding {
    match Layout::detect() {
        Ok(Layout::V2 { root }) => ok(
            "cgroups",
            format!("v2 at {} with memory and pids", root.display()),
        ),
        Ok(Layout::V1 { memory, pids, .. }) => ok(
            "cgroups",
            format!(
                "v1: memory at {}, pids at {}",
                memory.display(),
                pids.display()
            ),
        ),
        Err(e) => {
            // Not mounted in this mount namespace (`ip netns exec` mounts a
            // fresh /sys): the node mounts the kernel's hierarchies itself
            // when the controllers are enabled.
            let enabled = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
            let on = |name: &str| {
                enabled.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.first() == Some(&name) && f.get(3) == Some(&"1")
                })
            };
            if on("memory") && on("pids") {
                ok(
                    "cgroups",
                    "not mounted here; memory and pids are enabled, and the node mounts them \
                     under its data directory at start",
                )
            } else {
                problem(
                    "cgroups",
                    format!("{e}: mount cgroup2 with the memory and pids controllers enabled"),
                )
            }
        }
    }
}

fn loop_devices() -> Finding {
    let control = Path::new("/dev/loop-control");
    if control.exists() {
        ok("loop devices", "/dev/loop-control is there")
    } else {
        problem(
            "loop devices",
            "no /dev/loop-control: session disks are loop-mounted images; \
             load the loop module (modprobe loop) or set disk_mib = 0",
        )
    }
}

fn tools() -> Vec<Finding> {
    TOOLS
        .iter()
        .map(|(tool, package)| match on_path(tool) {
            Some(p) => ok("program", format!("{tool} at {}", p.display())),
            None => problem(
                "program",
                format!("{tool} is not on PATH: install it (Debian: {package})"),
            ),
        })
        .collect()
}

fn nftables() -> Finding {
    if on_path("nft").is_none() {
        return problem(
            "nftables",
            "nft is not on PATH: install nftables; each session's traffic is filtered by it",
        );
    }
    match std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
    {
        Ok(out) if out.status.success() => ok("nftables", "nft lists tables"),
        Ok(out) => problem(
            "nftables",
            format!(
                "nft list tables failed: {} (is nf_tables in the kernel?)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Err(e) => problem("nftables", format!("nft did not run: {e}")),
    }
}

fn user_namespaces() -> Finding {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    match max {
        Some(n) => ok(
            "user namespaces",
            format!(
                "user.max_user_namespaces = {n}; the node does not need them, and sessions \
                 are refused them (seccomp) whatever it is"
            ),
        ),
        None => ok(
            "user namespaces",
            "no user namespaces in this kernel; the node does not need them",
        ),
    }
}

/// The nearest existing directory at or above `path`.
fn existing(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.is_dir())
}

fn disk(cfg: &Config) -> Finding {
    let Some(dir) = existing(&cfg.data_dir) else {
        return problem("disk", format!("{} has no parent", cfg.data_dir.display()));
    };
    let st = match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => st,
        Err(e) => return problem("disk", format!("statvfs {}: {e}", dir.display())),
    };
    let free_mib = st.blocks_available().saturating_mul(st.fragment_size()) >> 20;
    let need = cfg.disk_mib.saturating_add(cfg.disk_reserve_mib);
    if free_mib >= need {
        ok(
            "disk",
            format!(
                "{free_mib} MiB free at {}; one session disk ({} MiB) and the reserve ({} MiB) fit",
                dir.display(),
                cfg.disk_mib,
                cfg.disk_reserve_mib
            ),
        )
    } else {
        problem(
            "disk",
            format!(
                "only {free_mib} MiB free at {}: one session disk (disk_mib = {}) and the \
                 reserve (disk_reserve_mib = {}) need {need} MiB; free space, move data_dir, \
                 or lower them",
                dir.display(),
                cfg.disk_mib,
                cfg.disk_reserve_mib
            ),
        )
    }
}

/// A QUIC handshake with the relay, pinned to its key, with a throwaway
/// identity (the node's own key is not touched).
async fn relay(cfg: &Config) -> Finding {
    if cfg.broker.is_empty() {
        return problem("relay", "no relay: set broker (or --broker)");
    }
    let key: PeerId = match cfg.broker_key.parse() {
        Ok(k) => k,
        Err(_) => {
            return problem(
                "relay",
                "broker_key is not a key: use the 64 hex characters the broker printed",
            );
        }
    };
    let addr: SocketAddr = match tokio::net::lookup_host(&cfg.broker)
        .await
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => return problem("relay", format!("{} does not resolve", cfg.broker)),
    };
    let mut seed = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut seed) {
        return problem("relay", format!("no randomness for a throwaway key: {e}"));
    }
    let identity = ed25519_dalek::SigningKey::from_bytes(&seed);
    let bind: SocketAddr = if addr.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let attempt = async {
        let mut endpoint = crate::client_endpoint(bind, cfg.quic_max_mtu)?;
        let tls = jusy_common::tls::client_config(&identity, key, jusy_common::wire::ALPN)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let quic = QuicClientConfig::try_from(tls).map_err(std::io::Error::other)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport_config(1200)));
        endpoint.set_default_client_config(config);
        let started = Instant::now();
        let conn = endpoint
            .connect(addr, "jusy")
            .map_err(std::io::Error::other)?
            .await
            .map_err(std::io::Error::other)?;
        let took = started.elapsed();
        conn.close(0u32.into(), b"check");
        endpoint.wait_idle().await;
        Ok::<Duration, std::io::Error>(took)
    };
    match tokio::time::timeout(HANDSHAKE_WAIT, attempt).await {
        Ok(Ok(took)) => ok(
            "relay",
            format!(
                "QUIC handshake with {addr} in {} ms, its key as pinned",
                took.as_millis()
            ),
        ),
        Ok(Err(e)) => problem(
            "relay",
            format!("QUIC handshake with {addr} failed: {e} (is broker_key the relay's?)"),
        ),
        Err(_) => problem(
            "relay",
            format!(
                "no answer from {addr} over UDP within {} s: outgoing UDP to port {} may be \
                 blocked (the node dials out over QUIC, which is UDP), or the relay is down",
                HANDSHAKE_WAIT.as_secs(),
                addr.port()
            ),
        ),
    }
}

/// Every check, in the order the report lists them.
pub async fn run(cfg: &Config) -> Vec<Finding> {
    let mut findings = vec![root(), cgroups(), loop_devices()];
    findings.extend(tools());
    findings.push(nftables());
    findings.push(user_namespaces());
    findings.push(disk(cfg));
    findings.push(relay(cfg).await);
    findings
}

/// The report: one line per check, then whether this machine can `able`
/// (`"serve sessions"`).
pub fn report(findings: &[Finding], able: &str) -> String {
    let mut out = String::new();
    for f in findings {
        let mark = if f.ok { "ok  " } else { "FAIL" };
        out.push_str(&format!("{mark} {:<16} {}\n", f.what, f.detail));
    }
    let problems = findings.iter().filter(|f| !f.ok).count();
    if problems == 0 {
        out.push_str(&format!("This machine can {able}.\n"));
    } else {
        out.push_str(&format!(
            "{problems} problem(s): this machine cannot {able} until they are fixed.\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_problems_and_says_whether_it_can_serve() {
        let good = [ok("root", "running as root")];
        assert!(report(&good, "serve sessions").ends_with("This machine can serve sessions.\n"));
        let bad = [ok("root", "yes"), problem("disk", "only 3 MiB free")];
        let text = report(&bad, "serve sessions");
        assert!(text.contains("FAIL disk"), "{text}");
        assert!(text.contains("1 problem(s)"), "{text}");
    }

    #[test]
    fn a_disk_too_small_for_a_session_is_a_problem() {
        let cfg = Config {
            data_dir: std::env::temp_dir(),
            disk_mib: u64::MAX / 4,
            ..Config::default()
        };
        let finding = disk(&cfg);
        assert!(
            !finding.ok && finding.detail.contains("disk_mib"),
            "{finding:?}"
        );
    }
}
