//! Home and carrier routers: forwarding on, nftables masquerade out of the WAN
//! side, nothing accepted inbound but replies (no port forwarding), optionally
//! all UDP dropped; and the faults tests inject: links down, NAT state flushed,
//! a new public address, delay and loss on the uplink (`tc netem`, or the
//! userspace `jusy-impair` where the kernel has no netem).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;

use crate::jusy::READY;
use crate::lab::netns::{self, End};
use crate::process::{Proc, bin};
use crate::scene::Scene;
use crate::site::Site;

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
    /// The router's address on its LAN side (the gateway of the hosts behind it).
    pub lan_ip: Ipv4Addr,
}

/// A slow, lossy uplink: the same fixed delay and loss rate in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    pub delay_ms: u32,
    pub loss_pct: f64,
    /// Seeds the userspace impairer's losses, so a run can be replayed
    /// (netem draws its own).
    pub seed: u64,
}

/// An impaired uplink as the home's node must use it.
#[derive(Debug)]
pub struct ImpairedUplink {
    /// What the node dials to reach the relay: the relay itself under netem,
    /// the impairer on the router's LAN side otherwise.
    pub relay: SocketAddr,
    /// How the link is impaired, for the test's notes.
    pub how: String,
    /// The userspace impairer, stopped when this is dropped.
    pub impairer: Option<Proc>,
    /// The links `tc netem` impairs, when it is netem.
    netem: Vec<End>,
}

impl ImpairedUplink {
    /// Checks that the impairment has dropped packets by now, which a lossy
    /// link carrying megabytes must have: that the test ran on the link it
    /// meant to. Says how many (netem) or in which directions (the impairer
    /// reports its first loss each way).
    pub fn check_lossy(&mut self, scene: &Scene) -> anyhow::Result<String> {
        if let Some(impairer) = &mut self.impairer {
            let lost = impairer.wait_event("lost", Duration::from_secs(1))?;
            return Ok(format!(
                "jusy-impair lost datagrams going {}",
                lost["direction"]
            ));
        }
        let mut dropped = 0;
        for end in &self.netem {
            let out = netns::exec(
                scene,
                &end.ns,
                &["tc", "-s", "qdisc", "show", "dev", &end.ifname],
                None,
            )?;
            dropped += netem_dropped(&out.text()).with_context(|| {
                format!("no drop count in tc's stats of {end:?}: {}", out.text())
            })?;
        }
        anyhow::ensure!(dropped > 0, "netem dropped nothing on {:?}", self.netem);
        Ok(format!("netem dropped {dropped} packets"))
    }
}

/// The `dropped N` of `tc -s qdisc show`'s first statistics line.
fn netem_dropped(stats: &str) -> Option<u64> {
    let rest = stats.split("(dropped ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
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

    /// Impairs the way from this router's LAN to `relay` (a QUIC relay), both
    /// ways. With `tc netem` the WAN link itself gets the delay and loss, for
    /// all traffic. On kernels without netem, `jusy-impair` runs in the
    /// router's namespace on its LAN address, forwarding UDP to `relay` with
    /// the delay and loss; a node that dials [`ImpairedUplink::relay`] then
    /// sends all its QUIC traffic through it (it still pins the relay's key,
    /// so nothing else changes for it). The impairer's upstream packets leave
    /// from the router's WAN address, as the NATed ones would.
    pub fn impair_uplink(
        &self,
        scene: &Scene,
        relay: SocketAddr,
        imp: Impairment,
    ) -> anyhow::Result<ImpairedUplink> {
        let Some(why) = self.netem_missing(scene) else {
            self.netem(scene, imp)?;
            return Ok(ImpairedUplink {
                relay,
                how: format!("tc netem on {}'s WAN link: {imp:?}", self.ns),
                impairer: None,
                netem: vec![self.wan.clone(), self.upstream.clone()],
            });
        };
        let site = Site {
            netns: Some(self.ns.clone()),
            ip: IpAddr::V4(self.lan_ip),
        };
        let mut cmd = site.command(bin("jusy-impair")?);
        cmd.args(["--listen", &SocketAddr::new(site.ip, 0).to_string()])
            .args(["--upstream", &relay.to_string()])
            .args(["--delay-ms", &imp.delay_ms.to_string()])
            .args(["--loss-pct", &imp.loss_pct.to_string()])
            .args(["--seed", &imp.seed.to_string()]);
        let mut proc = Proc::start(scene, &format!("impair-{}", self.ns), cmd)?;
        let ready = proc.wait_event("ready", READY)?;
        let listen = ready["listen"]
            .as_str()
            .context("impairer's ready line has no listen address")?
            .parse()
            .context("impairer's listen address")?;
        Ok(ImpairedUplink {
            relay: listen,
            how: format!("jusy-impair at {listen} in {} ({why}): {imp:?}", self.ns),
            impairer: Some(proc),
            netem: Vec::new(),
        })
    }

    /// Delays and drops packets both ways on the WAN link with `tc netem`.
    fn netem(&self, scene: &Scene, imp: Impairment) -> anyhow::Result<()> {
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
                    &format!("{}ms", imp.delay_ms),
                    "loss",
                    &format!("{}%", imp.loss_pct),
                ],
                None,
            )?;
        }
        Ok(())
    }

    /// Why `tc netem` cannot run here, if it cannot (a kernel without
    /// `sch_netem`); tried on the router's loopback.
    fn netem_missing(&self, scene: &Scene) -> Option<String> {
        let lo = |args: &[&str]| {
            let mut cmd = vec!["tc", "qdisc"];
            cmd.extend_from_slice(args);
            netns::exec(scene, &self.ns, &cmd, None)
        };
        match lo(&["add", "dev", "lo", "root", "netem", "delay", "1ms"]) {
            Ok(_) => {
                let _ = lo(&["del", "dev", "lo", "root"]);
                None
            }
            Err(e) => Some(format!("tc netem is not available: {e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_drop_count_is_read_from_tc_stats() {
        let stats = "qdisc netem 8001: root refcnt 2 limit 1000 delay 50ms loss 1%\n \
                     Sent 40213 bytes 91 pkt (dropped 3, overlimits 0 requeues 0)\n \
                     backlog 0b 0p requeues 0\n";
        assert_eq!(netem_dropped(stats), Some(3));
        assert_eq!(netem_dropped("qdisc noqueue 0: root refcnt 2"), None);
    }
}
