//! Where a started program runs: this machine's own network, or one host of a
//! namespaced lab network (`ip netns exec`), and the address it is reached at.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

/// A network location for programs: a network namespace (or none) and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The network namespace, `None` for the machine's own network.
    pub netns: Option<String>,
    /// The address other programs reach this site at.
    pub ip: IpAddr,
}

impl Site {
    /// Loopback on this machine's own network.
    pub fn local() -> Self {
        Self {
            netns: None,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// A command that runs `program` at this site. `ip netns exec` execs the
    /// program itself, so the child's pid is the program's and signals reach it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
        }
    }
}
