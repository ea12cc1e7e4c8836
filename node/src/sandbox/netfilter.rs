//! Outbound network rules for sessions: an nftables table owned by this node that
//! lets session users (matched by socket uid) open TCP connections to port 22 and
//! nothing else, and by default keeps them off private, link-local and loopback
//! addresses (the owner's LAN and the node's own services).
//!
//! The ruleset is built from typed values (numbers and parsed addresses) and fed
//! to `nft -f -`; no string from a client or a file reaches it unparsed.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::process::Stdio;
use std::str::FromStr;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Loading rules failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the rules: {0}")]
    Failed(String),
}

/// An address range such as `192.168.0.0/16` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

/// Not an address range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an address range (addr/len): {0}")]
pub struct BadCidr(String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(s.to_owned());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.parse().map_err(|_| bad())?,
            None => max,
        };
        if len > max {
            return Err(bad());
        }
        Ok(Self { addr, len })
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Destinations refused by default: "this network", private, shared (CGNAT),
/// loopback, link-local, multicast and reserved ranges.
const PRIVATE_V4: &str = "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, \
                          172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4";
/// Loopback, unspecified, unique-local, link-local, multicast, and IPv4-mapped
/// (so a mapped address cannot sneak around the IPv4 list).
const PRIVATE_V6: &str = "::/128, ::1/128, ::ffff:0:0/96, fc00::/7, fe80::/10, ff00::/8";

/// The owner's network policy for sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Also allow private, link-local and loopback destinations (port 22 only).
    pub allow_private: bool,
    /// Ranges exempt from the private-address refusal (port 22 only still).
    pub allow: Vec<Cidr>,
}

/// This node's nftables table.
#[derive(Clone, Debug)]
pub struct Netfilter {
    table: String,
    policy: Policy,
}

impl Netfilter {
    /// `tag` names the node; it must be lowercase letters, digits or `_`.
    pub fn new(tag: &str, policy: Policy) -> Self {
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        Self {
            table: format!("jusy_{tag}"),
            policy,
        }
    }

    /// Replaces this node's table (leftovers of a crash included) with a fresh one
    /// that has no session users yet.
    pub async fn install(&self) -> Result<(), NetError> {
        nft(&self.ruleset()).await
    }

    /// Removes this node's table.
    pub async fn remove(&self) -> Result<(), NetError> {
        nft(&format!(
            "table inet {t} {{}}\ndelete table inet {t}\n",
            t = self.table
        ))
        .await
    }

    /// Puts a session user under the rules.
    pub async fn add_user(&self, uid: u32) -> Result<(), NetError> {
        nft(&format!(
            "add element inet {} sessions {{ {uid} }}\n",
            self.table
        ))
        .await
    }

    /// Takes a session user out of the rules (after its processes are gone).
    pub async fn remove_user(&self, uid: u32) -> Result<(), NetError> {
        nft(&format!(
            "delete element inet {} sessions {{ {uid} }}\n",
            self.table
        ))
        .await
    }

    fn ruleset(&self) -> String {
        let t = &self.table;
        // Declaring the table first makes the delete succeed when it is absent,
        // and the whole file is applied atomically.
        let mut s = format!(
            "table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{\n\
             \tset sessions {{ type uid; }}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority 0; policy accept;\n\
             \t\tmeta skuid @sessions jump session\n\
             \t}}\n\
             \tchain session {{\n"
        );
        if !self.policy.allow_private {
            for c in &self.policy.allow {
                let family = if c.addr.is_ipv4() { "ip" } else { "ip6" };
                let _ = writeln!(s, "\t\t{family} daddr {c} tcp dport 22 accept");
            }
            let _ = writeln!(
                s,
                "\t\tip daddr {{ {PRIVATE_V4} }} meta l4proto tcp reject with tcp reset"
            );
            let _ = writeln!(
                s,
                "\t\tip6 daddr {{ {PRIVATE_V6} }} meta l4proto tcp reject with tcp reset"
            );
        }
        // TCP elsewhere gets a reset so clients fail fast; UDP (DNS too), ICMP and
        // everything else is dropped.
        s.push_str(
            "\t\ttcp dport 22 accept\n\
             \t\tmeta l4proto tcp reject with tcp reset\n\
             \t\tdrop\n\
             \t}\n}\n",
        );
        s
    }
}

async fn nft(script: &str) -> Result<(), NetError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(NetError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(NetError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(
            "10.1.0.0/16".parse(),
            Ok(Cidr {
                addr: "10.1.0.0".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
                len: 16
            })
        );
        assert_eq!(
            "::1".parse::<Cidr>().map(|c| c.to_string()),
            Ok("::1/128".into())
        );
        for bad in ["10.0.0.0/33", "x/8", "1.2.3.4/", "1.2.3.4/8; flush ruleset"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ruleset_allows_port_22_only_and_exempts_owner_ranges() {
        let allow = vec![Cidr::from_str("127.0.0.2").unwrap_or(Cidr {
            addr: IpAddr::from([0, 0, 0, 0]),
            len: 0,
        })];
        let nf = Netfilter::new(
            "ab12; drop",
            Policy {
                allow_private: false,
                allow,
            },
        );
        let rules = nf.ruleset();
        assert!(rules.contains("table inet jusy_ab12drop {"), "{rules}");
        let exempt = rules.find("ip daddr 127.0.0.2/32 tcp dport 22 accept");
        let private = rules.find("ip daddr { 0.0.0.0/8");
        assert!(exempt.is_some() && exempt < private, "{rules}");
        assert!(rules.ends_with("\t\ttcp dport 22 accept\n\t\tmeta l4proto tcp reject with tcp reset\n\t\tdrop\n\t}\n}\n"));
        let open = Netfilter::new(
            "x",
            Policy {
                allow_private: true,
                allow: Vec::new(),
            },
        );
        assert!(!open.ruleset().contains("0.0.0.0/8"));
    }
}
