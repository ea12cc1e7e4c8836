//! `jusy-broker check`: whether the broker can start with this
//! configuration, in a report a person can read (the same form as
//! `jusy-node check`). Nothing is changed; no database is opened.

use std::net::SocketAddr;
use std::path::Path;

use jusy_node::check::{Finding, ok, problem};

use crate::config::Config;

/// Open files below which the API's share is small (see
/// [`crate::api::serve::Limits::within_fd_limit`]).
const MIN_OPEN_FILES: u64 = 8192;

/// Free space the database should have room to grow into, in MiB.
const MIN_FREE_MIB: u64 = 1024;

fn tcp(what: &'static str, field: &str, addr: SocketAddr) -> Finding {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => ok(what, format!("{field} {addr} is free (TCP)")),
        Err(e) => problem(
            what,
            format!(
                "{field} {addr} cannot be bound (TCP): {e}; is a broker already running, or \
                 is the address another's? change {field}"
            ),
        ),
    }
}

fn udp(what: &'static str, field: &str, addr: SocketAddr) -> Finding {
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => ok(what, format!("{field} {addr} is free (UDP)")),
        Err(e) => problem(
            what,
            format!(
                "{field} {addr} cannot be bound (UDP): {e}; is a broker already running? \
                 change {field}"
            ),
        ),
    }
}

fn data_dir(dir: &Path) -> Finding {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => problem(
            "data directory",
            format!("{} is not a directory: change data_dir", dir.display()),
        ),
        // SAFETY: geteuid cannot fail.
        Ok(m) if m.uid() != unsafe { libc::geteuid() } => problem(
            "data directory",
            format!(
                "{} belongs to uid {}, not to this user: chown it or run as its owner",
                dir.display(),
                m.uid()
            ),
        ),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            let note = if mode & 0o077 == 0 {
                String::new()
            } else {
                format!(" (mode {mode:o}: made 0700 at start)")
            };
            ok("data directory", format!("{}{note}", dir.display()))
        }
        Err(_) => match dir.ancestors().skip(1).find(|p| p.is_dir()) {
            Some(parent) if nix::unistd::access(parent, nix::unistd::AccessFlags::W_OK).is_ok() => {
                ok(
                    "data directory",
                    format!("{} is made at start", dir.display()),
                )
            }
            _ => problem(
                "data directory",
                format!(
                    "{} does not exist and cannot be made here: create it, or change data_dir",
                    dir.display()
                ),
            ),
        },
    }
}

fn open_files() -> Finding {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a pointer valid for it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return problem("open files", "getrlimit failed");
    }
    if lim.rlim_max >= MIN_OPEN_FILES {
        ok(
            "open files",
            format!("up to {} (raised to that at start)", lim.rlim_max),
        )
    } else {
        problem(
            "open files",
            format!(
                "at most {} open files: every client connection takes one; raise the hard \
                 limit to {MIN_OPEN_FILES} or more (LimitNOFILE= in the unit, nofile in \
                 limits.conf)",
                lim.rlim_max
            ),
        )
    }
}

fn disk(dir: &Path) -> Finding {
    let Some(existing) = dir.ancestors().find(|p| p.is_dir()) else {
        return problem("disk", format!("{} has no parent", dir.display()));
    };
    match nix::sys::statvfs::statvfs(existing) {
        Ok(st) => {
            let free = st.blocks_available().saturating_mul(st.fragment_size()) >> 20;
            if free >= MIN_FREE_MIB {
                ok("disk", format!("{free} MiB free at {}", existing.display()))
            } else {
                problem(
                    "disk",
                    format!(
                        "only {free} MiB free at {}: the ledger needs room to grow \
                         ({MIN_FREE_MIB} MiB at least)",
                        existing.display()
                    ),
                )
            }
        }
        Err(e) => problem("disk", format!("statvfs {}: {e}", existing.display())),
    }
}

/// Every check, in report order.
pub fn run(cfg: &Config) -> Vec<Finding> {
    let mut findings = vec![
        data_dir(&cfg.data_dir),
        disk(&cfg.data_dir),
        open_files(),
        tcp("HTTP API", "api_listen", cfg.api_listen),
        udp("relay", "relay_listen", cfg.relay_listen),
    ];
    if let Some(addr) = cfg.metrics_listen {
        findings.push(tcp("metrics", "metrics_listen", addr));
    }
    match cfg.mesh() {
        Ok(Some(m)) => findings.push(udp("mesh", "mesh_listen", m.listen)),
        Ok(None) => findings.push(ok("mesh", "alone (no mesh_listen)")),
        Err(e) => findings.push(problem("mesh", e.to_string())),
    }
    findings.push(match &cfg.operator_token {
        Some(_) => ok("operator", "operator token set"),
        None => ok(
            "operator",
            "no operator_token: the operator API and page are off",
        ),
    });
    findings
}
