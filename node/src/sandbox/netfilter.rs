//! Network rules for sessions: an nftables table owned by this node. Traffic a
//! session sends out of its own network namespace (through its veth) may open
//! TCP connections to port 22 and nothing else, never to the node itself (only
//! its DNS answer at the session's gateway), never to another session, and by
//! default to no IANA special-use range (the owner's LAN among them); it leaves
//! masqueraded behind the node's address.
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

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// IPv4 destinations refused by default: every IANA special-purpose range
/// (RFC 6890 and its registry) and multicast: "this network" 0/8, private 10/8,
/// shared CGNAT 100.64/10, loopback 127/8, link-local 169.254/16, private
/// 172.16/12, IETF protocol assignments 192.0.0/24, documentation 192.0.2/24,
/// AMT 192.52.193/24, AS112 192.31.196/24 and 192.175.48/24, 6to4 relay anycast
/// 192.88.99/24, private 192.168/16, benchmarking 198.18/15, documentation
/// 198.51.100/24 and 203.0.113/24, multicast 224/4, reserved and broadcast 240/4.
pub const SPECIAL_V4: &str = "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, \
     169.254.0.0/16, 172.16.0.0/12, 192.0.0.0/24, 192.0.2.0/24, 192.31.196.0/24, \
     192.52.193.0/24, 192.88.99.0/24, 192.168.0.0/16, 192.175.48.0/24, 198.18.0.0/15, \
     198.51.100.0/24, 203.0.113.0/24, 224.0.0.0/4, 240.0.0.0/4";
/// IPv6 destinations refused by default: unspecified and loopback, IPv4-mapped
/// (so a mapped address cannot sneak around the IPv4 list), IPv4/IPv6
/// translation 64:ff9b::/96 and 64:ff9b:1::/48, discard-only 100::/64, IETF
/// protocol assignments 2001::/23 (Teredo, ORCHID, benchmarking …),
/// documentation 2001:db8::/32 and 3fff::/20, 6to4 2002::/16, segment-routing
/// SIDs 5f00::/16, unique-local fc00::/7, link-local fe80::/10, multicast ff00::/8.
pub const SPECIAL_V6: &str = "::/128, ::1/128, ::ffff:0:0/96, 64:ff9b::/96, 64:ff9b:1::/48, \
     100::/64, 2001::/23, 2001:db8::/32, 2002::/16, 3fff::/20, 5f00::/16, fc00::/7, \
     fe80::/10, ff00::/8";

/// The owner's network policy for sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Also allow special-use destinations (the LAN, …), port 22 only. The
    /// node's own addresses and other sessions stay refused.
    pub allow_private: bool,
    /// Ranges exempt from the special-use refusal (port 22 only still).
    pub allow: Vec<Cidr>,
}

/// Where sessions' traffic comes from: the node's session interfaces and the
/// address pools every node on this machine draws session networks from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLinks {
    /// Name prefix of this node's session veths (nftables matches `prefix*`).
    pub prefix: String,
    /// Session address pools, refused as destinations even when the owner
    /// allows private ranges, so sessions never reach one another.
    pub pools: Vec<Cidr>,
    /// Forwarding was off before jusy turned it on: forward nothing that does not
    /// enter or leave a jusy session interface, so the owner's machine does not
    /// become a router between its own networks.
    pub guard: bool,
}

/// This node's nftables table.
#[derive(Clone, Debug)]
pub struct Netfilter {
    table: String,
    policy: Policy,
    links: SessionLinks,
}

impl Netfilter {
    /// `tag` names the node; it must be lowercase letters, digits or `_`.
    pub fn new(tag: &str, policy: Policy, links: SessionLinks) -> Self {
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let prefix = links
            .prefix
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        Self {
            table: format!("jusy_{tag}"),
            policy,
            links: SessionLinks { prefix, ..links },
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

    /// The whole table. A session's traffic meets it in three places: `forward`
    /// (to the world, where the policy decides), `input` (to the node itself:
    /// only DNS at the session's own gateway) and `postrouting` (masquerade).
    fn ruleset(&self) -> String {
        let t = &self.table;
        let p = &self.links.prefix;
        // Declaring the table first makes the delete succeed when it is absent,
        // and the whole file is applied atomically.
        let mut s = format!(
            "table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority 0; policy accept;\n\
             \t\tiifname \"{p}*\" ct state established,related accept\n\
             \t\tiifname \"{p}*\" jump egress\n\
             \t\toifname \"{p}*\" ct state established,related accept\n\
             \t\toifname \"{p}*\" drop\n"
        );
        if self.links.guard {
            let all = super::network::LINK_PREFIX;
            let _ = writeln!(s, "\t\tiifname != \"{all}*\" oifname != \"{all}*\" drop");
        }
        let _ = write!(
            s,
            "\t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority 0; policy accept;\n\
             \t\tiifname \"{p}*\" jump to_node\n\
             \t}}\n\
             \tchain to_node {{\n\
             \t\tct state established,related accept\n\
             \t\ticmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept\n\
             \t\tfib daddr . iif type local meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             \t\tmeta l4proto tcp reject with tcp reset\n\
             \t\treject with icmpx admin-prohibited\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tiifname \"{p}*\" oifname != \"{p}*\" masquerade\n\
             \t}}\n\
             \tchain egress {{\n"
        );
        for c in &self.links.pools {
            let f = family(c);
            let _ = writeln!(
                s,
                "\t\t{f} daddr {c} meta l4proto tcp reject with tcp reset"
            );
            let _ = writeln!(s, "\t\t{f} daddr {c} reject with icmpx admin-prohibited");
        }
        if !self.policy.allow_private {
            for c in &self.policy.allow {
                let _ = writeln!(s, "\t\t{} daddr {c} tcp dport 22 accept", family(c));
            }
            let _ = writeln!(
                s,
                "\t\tip daddr {{ {SPECIAL_V4} }} meta l4proto tcp reject with tcp reset"
            );
            let _ = writeln!(
                s,
                "\t\tip6 daddr {{ {SPECIAL_V6} }} meta l4proto tcp reject with tcp reset"
            );
        }
        // TCP elsewhere gets a reset and everything else an ICMP refusal, so
        // programs fail at once instead of waiting for a timeout.
        s.push_str(
            "\t\ttcp dport 22 accept\n\
             \t\tmeta l4proto tcp reject with tcp reset\n\
             \t\treject with icmpx admin-prohibited\n\
             \t}\n}\n",
        );
        s
    }
}

fn family(c: &Cidr) -> &'static str {
    if c.addr.is_ipv4() { "ip" } else { "ip6" }
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

    fn links(guard: bool) -> SessionLinks {
        SessionLinks {
            prefix: "jyab12cd34".into(),
            pools: vec![
                "172.30.0.0/16".parse().unwrap(),
                "fd6a:7573:7900::/48".parse().unwrap(),
            ],
            guard,
        }
    }

    #[test]
    fn ruleset_allows_port_22_only_and_exempts_owner_ranges() {
        let allow = vec!["198.18.0.0/15".parse().unwrap()];
        let nf = Netfilter::new(
            "ab12; drop",
            Policy {
                allow_private: false,
                allow,
            },
            links(false),
        );
        let rules = nf.ruleset();
        assert!(rules.contains("table inet jusy_ab12drop {"), "{rules}");
        let pool = rules.find("ip daddr 172.30.0.0/16 meta l4proto tcp reject with tcp reset");
        let pool6 = rules.find("ip6 daddr fd6a:7573:7900::/48 reject");
        let exempt = rules.find("ip daddr 198.18.0.0/15 tcp dport 22 accept");
        let special = rules.find("ip daddr { 0.0.0.0/8");
        assert!(
            pool.is_some() && pool6.is_some() && pool < exempt,
            "{rules}"
        );
        assert!(exempt.is_some() && exempt < special, "{rules}");
        assert!(rules.ends_with(
            "\t\ttcp dport 22 accept\n\t\tmeta l4proto tcp reject with tcp reset\n\
             \t\treject with icmpx admin-prohibited\n\t}\n}\n"
        ));
        // Sessions' traffic is judged on the way out, the node itself answers
        // only DNS on the session's own link, and nothing new enters a session.
        for line in [
            "iifname \"jyab12cd34*\" jump egress",
            "oifname \"jyab12cd34*\" drop",
            "iifname \"jyab12cd34*\" jump to_node",
            "fib daddr . iif type local meta l4proto { tcp, udp } th dport 53 accept",
            "iifname \"jyab12cd34*\" oifname != \"jyab12cd34*\" masquerade",
        ] {
            assert!(rules.contains(line), "{line} missing from {rules}");
        }
        assert!(!rules.contains("iifname != \"jy*\""), "{rules}");
        let open = Netfilter::new(
            "x",
            Policy {
                allow_private: true,
                allow: Vec::new(),
            },
            links(true),
        );
        let open = open.ruleset();
        assert!(!open.contains("0.0.0.0/8"), "{open}");
        assert!(open.contains("ip daddr 172.30.0.0/16 reject"), "{open}");
        assert!(
            open.contains("iifname != \"jy*\" oifname != \"jy*\" drop"),
            "{open}"
        );
    }

    #[test]
    fn special_use_lists_parse_as_ranges() {
        for list in [SPECIAL_V4, SPECIAL_V6] {
            for c in list.split(", ") {
                assert!(c.trim().parse::<Cidr>().is_ok(), "{c}");
            }
        }
        assert_eq!(SPECIAL_V4.split(", ").count(), 18);
    }
}
