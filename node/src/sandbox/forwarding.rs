//! IP forwarding on the node's machine, which session networks need: turned on
//! at start with the owner's IPv6 router advertisements kept, and off again by
//! the last jusy node to stop if it was off before.

use std::path::{Path, PathBuf};

use super::network::{NetworkError, run};

/// The machine's forwarding switches (each network namespace has its own).
///
/// IPv6 forwarding is global in Linux (`all.forwarding`), and a forwarding
/// interface stops accepting router advertisements; every interface that
/// accepted them (`accept_ra` 1) is set to accept them while forwarding (2)
/// first, so the owner's IPv6 addresses and routes stay. When forwarding was
/// off, a marker in `/run` remembers it until reboot (when it is off again): the
/// rules then keep the machine from routing anything but sessions, and the last
/// jusy node to stop turns it off again.
#[derive(Debug)]
pub(super) struct Forwarding {
    ipv6: bool,
    marker: PathBuf,
}

const FORWARD_V4: &str = "/proc/sys/net/ipv4/ip_forward";
const FORWARD_V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

impl Forwarding {
    pub(super) fn new(ipv6: bool) -> Result<Self, NetworkError> {
        let path = Path::new("/proc/thread-self/ns/net");
        let ns = std::fs::metadata(path).map_err(|source| NetworkError::Io {
            path: path.to_owned(),
            source,
        })?;
        use std::os::unix::fs::MetadataExt;
        let marker = PathBuf::from(format!("/run/jusy-forwarding-was-off-{}", ns.ino()));
        Ok(Self { ipv6, marker })
    }

    fn switches(&self) -> &'static [&'static str] {
        if self.ipv6 {
            &[FORWARD_V4, FORWARD_V6]
        } else {
            &[FORWARD_V4]
        }
    }

    /// Whether forwarding was off before jusy turned it on.
    pub(super) fn was_off(&self) -> Result<bool, NetworkError> {
        let mut off = self.marker.exists();
        for path in self.switches() {
            off |= read_sysctl(path)? != "1";
        }
        Ok(off)
    }

    pub(super) fn enable(&self, was_off: bool) -> Result<(), NetworkError> {
        if was_off {
            std::fs::write(&self.marker, b"").map_err(|source| NetworkError::Io {
                path: self.marker.clone(),
                source,
            })?;
        }
        if self.ipv6 {
            let conf = Path::new("/proc/sys/net/ipv6/conf");
            let dirs = std::fs::read_dir(conf).map_err(|source| NetworkError::Io {
                path: conf.to_owned(),
                source,
            })?;
            for dir in dirs.flatten() {
                let ra = dir.path().join("accept_ra");
                let ra = ra.to_string_lossy();
                if read_sysctl(&ra).is_ok_and(|v| v == "1") {
                    write_sysctl(&ra, "2")?;
                }
            }
        }
        for path in self.switches() {
            write_sysctl(path, "1")?;
        }
        Ok(())
    }

    /// Turns forwarding off again if jusy turned it on and no jusy table is
    /// left (no other node runs here).
    pub(super) async fn restore(&self) -> Result<(), NetworkError> {
        if !self.marker.exists() {
            return Ok(());
        }
        let tables = run("nft", &["list", "tables"]).await?;
        if tables.contains("jusy_") {
            return Ok(());
        }
        for path in self.switches() {
            write_sysctl(path, "0")?;
        }
        std::fs::remove_file(&self.marker).map_err(|source| NetworkError::Io {
            path: self.marker.clone(),
            source,
        })
    }
}

fn read_sysctl(path: &str) -> Result<String, NetworkError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| NetworkError::Io {
            path: path.into(),
            source,
        })
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetworkError> {
    std::fs::write(path, value).map_err(|source| NetworkError::Io {
        path: path.into(),
        source,
    })
}
