//! Home and carrier routers: forwarding on, nftables masquerade out of the WAN
//! side, nothing accepted inbound but replies (no port forwarding), optionally
//! all UDP dropped; and the faults tests inject: links down, NAT state flushed,
//! a new public address, delay and loss with `tc netem`.

use std::net::Ipv4Addr;

use crate::lab::netns::{self, End};
use crate::scene::Scene;

/// A NAT router: its WAN side and the far end of its uplink.
#[derive(Debug, Clone)]
pub struct Router {
    pub ns: String,
    /// The router's WAN interface.
    pub wan: End,
    /// The other end of the WAN link (internet switch port or carrier router).
    pub upstream: End,
    /// The router's current public (or carrier-side) address.
    pub wan_ip: Ipv4Addr,
    pub wan_prefix: u8,
}

/// The router's whole nftables ruleset. One table per namespace, so it goes
/// away with the namespace.
fn ruleset(block_udp: bool) -> String {
    let udp = if block_udp {
        "        meta l4proto udp counter drop\n"
    } else {
        ""
    };
    format!(
        "table ip jusy_lab {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
{udp}        iifname \"lan\" oifname \"wan\" accept
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname {{ \"lo\", \"lan\" }} accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"wan\" masquerade
    }}
}}
"
    )
}

/// Makes `ns` a NAT router between its `lan` and `wan` interfaces.
pub(crate) fn configure(scene: &Scene, ns: &str, block_udp: bool) -> anyhow::Result<()> {
    netns::sysctl(scene, ns, "net.ipv4.ip_forward=1")?;
    // When the WAN address is renumbered, the new address must survive the
    // removal of the old one instead of being deleted with it.
    netns::sysctl(scene, ns, "net.ipv4.conf.all.promote_secondaries=1")?;
    netns::exec(
        scene,
        ns,
        &["nft", "-f", "-"],
        Some(ruleset(block_udp).as_bytes()),
    )
    .map(drop)
}

impl Router {
    /// Brings the WAN link down or up (a cable pulled, an ISP outage).
    pub fn set_uplink(&self, scene: &Scene, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        netns::ip(
            scene,
            &["-n", &self.ns, "link", "set", &self.wan.ifname, state],
        )
    }

    /// Forgets every NAT mapping, as a router reboot or a full table does.
    pub fn flush_conntrack(&self, scene: &Scene) -> anyhow::Result<()> {
        netns::exec(scene, &self.ns, &["conntrack", "-F"], None).map(drop)
    }

    /// The router's NAT table (`conntrack -L`).
    pub fn conntrack(&self, scene: &Scene) -> anyhow::Result<String> {
        Ok(netns::exec(scene, &self.ns, &["conntrack", "-L"], None)?.text())
    }

    /// How many UDP packets from the LAN the router has dropped (only counted
    /// when the router blocks UDP).
    pub fn dropped_udp(&self, scene: &Scene) -> anyhow::Result<u64> {
        let chain = netns::exec(
            scene,
            &self.ns,
            &["nft", "list", "chain", "ip", "jusy_lab", "forward"],
            None,
        )?
        .text();
        let count = chain
            .lines()
            .find(|l| l.contains("udp") && l.contains("drop"))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        count.ok_or_else(|| anyhow::anyhow!("no UDP drop counter in {}:\n{chain}", self.ns))
    }

    /// Moves the WAN side to `new` and drops the old address, as an ISP
    /// handing out a new lease does; the kernel then forgets the masqueraded
    /// mappings of the old address.
    pub fn renumber(&mut self, scene: &Scene, new: Ipv4Addr) -> anyhow::Result<()> {
        let old = format!("{}/{}", self.wan_ip, self.wan_prefix);
        netns::address(scene, &self.wan, &format!("{new}/{}", self.wan_prefix))?;
        netns::ip(
            scene,
            &["-n", &self.ns, "addr", "del", &old, "dev", &self.wan.ifname],
        )?;
        self.wan_ip = new;
        Ok(())
    }

    /// Delays and drops packets both ways on the uplink with `tc netem`.
    pub fn impair_uplink(&self, scene: &Scene, delay_ms: u32, loss_pct: f64) -> anyhow::Result<()> {
        for end in [&self.wan, &self.upstream] {
            netns::exec(
                scene,
                &end.ns,
                &[
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    &end.ifname,
                    "root",
                    "netem",
                    "delay",
                    &format!("{delay_ms}ms"),
                    "loss",
                    &format!("{loss_pct}%"),
                ],
                None,
            )?;
        }
        Ok(())
    }
}
