//! Each session's own network: a veth pair from the node into the session's
//! network namespace, a point-to-point address pair (IPv4 /31, IPv6 /127) from
//! a block of the session pool this node claims, a default route through the
//! node, DNS answered by the node at the gateway address, and byte counters.
//!
//! [`HostNet`] is the node-wide part: it claims the block, turns forwarding on,
//! installs the nftables table ([`super::netfilter`]) and sweeps what a crashed
//! run left. [`SessionNet`] is one session's part, made by [`HostNet::attach`]
//! from the pid of a process inside the session's namespace.
//!
//! # Names and claims
//! Every interface of this node is named `jy<tag8>…`: an empty bridge `jy<tag8>`
//! (a bridge rather than a dummy, which some kernels lack) carries the routes
//! of the node's claimed blocks, so packets to a free address are dropped
//! there, not sent to the LAN; the veths are `jy<tag8><index>`. Adding that
//! route fails when another node on the machine holds the same block, which
//! makes the claim atomic; removing the bridge releases it.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::task::JoinSet;

use super::dns::{DnsError, Resolver};
use super::forwarding::Forwarding;
use super::netfilter::{Cidr, NetError, Netfilter, Policy, SessionLinks};

/// Every jusy session interface name starts with this.
pub const LINK_PREFIX: &str = "jy";
/// Prefix length of the IPv4 block one node claims: 512 sessions of a /31.
const NODE_BLOCK_V4: u8 = 22;
/// Prefix length of the IPv6 block one node claims.
const NODE_BLOCK_V6: u8 = 64;
/// Sessions one node can network at once.
const SESSIONS: u32 = 1 << (32 - NODE_BLOCK_V4 - 1);

/// Session pools and the owner's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// IPv4 pool session networks come from (at most a /22).
    pub v4: Cidr,
    /// IPv6 pool (at most a /64); unused when the machine has no IPv6.
    pub v6: Cidr,
    pub policy: Policy,
}

/// Setting up or removing session networking failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "session pool {pool} must be an {family} range of at least /{max} (set it in the node config)"
    )]
    Pool {
        pool: Cidr,
        family: &'static str,
        max: u8,
    },
    #[error(
        "every block of the session pools {v4} and {v6} overlaps a route of this machine \
         ({routes}); choose free ranges with --session-net-v4 / --session-net-v6"
    )]
    NoBlock { v4: Cidr, v6: Cidr, routes: String },
    #[error("all {SESSIONS} session networks of this node are in use")]
    Full,
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: &'static str,
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Nft(#[from] NetError),
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// Bytes through a session's link since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Sent by the session (out of its namespace).
    pub sent: u64,
    /// Received by the session.
    pub received: u64,
}

/// The addresses of one session's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    pub gateway4: Ipv4Addr,
    pub session4: Ipv4Addr,
    pub gateway6: Option<Ipv6Addr>,
    pub session6: Option<Ipv6Addr>,
}

/// The block of the pools one node owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    v4: Cidr,
    base4: Ipv4Addr,
    v6: Option<Cidr>,
}

impl Block {
    /// Block number `n` of the pools (IPv6 left out when the machine has none).
    fn nth(cfg: &NetConfig, n: u32, ipv6: bool) -> Option<Self> {
        let v4 = sub(cfg.v4, NODE_BLOCK_V4, u128::from(n))?;
        let IpAddr::V4(base4) = v4.addr else {
            return None;
        };
        let v6 = if ipv6 {
            Some(sub(cfg.v6, NODE_BLOCK_V6, u128::from(n))?)
        } else {
            None
        };
        Some(Self { v4, base4, v6 })
    }

    /// Session `k`'s pair: the node's end is even, the session's the next one.
    fn session(&self, k: u32) -> Addrs {
        let base6 = self.v6.map(|c| c.addr);
        let four = |i: u32| Ipv4Addr::from(u32::from(self.base4).wrapping_add(i));
        let six = |i: u32| match base6 {
            Some(IpAddr::V6(b)) => Some(Ipv6Addr::from(u128::from(b).wrapping_add(u128::from(i)))),
            _ => None,
        };
        Addrs {
            gateway4: four(2 * k),
            session4: four(2 * k + 1),
            gateway6: six(2 * k),
            session6: six(2 * k + 1),
        }
    }
}

/// Sub-range number `n` of length `len` inside `pool`.
fn sub(pool: Cidr, len: u8, n: u128) -> Option<Cidr> {
    let bits = if pool.addr.is_ipv4() { 32 } else { 128 };
    if len < pool.len || len > bits || n >> (len - pool.len) != 0 {
        return None;
    }
    let base = bits_of(pool.addr) + (n << (bits - len));
    let addr = match pool.addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(base).ok()?)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(base)),
    };
    Some(Cidr { addr, len })
}

fn bits_of(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Whether two ranges of the same family share an address.
fn overlaps(a: Cidr, b: Cidr) -> bool {
    if a.addr.is_ipv4() != b.addr.is_ipv4() {
        return false;
    }
    let bits = if a.addr.is_ipv4() { 32 } else { 128 };
    let len = u32::from(a.len.min(b.len));
    let shift = bits - len;
    let mask = |x: u128| x.checked_shr(shift).unwrap_or(0);
    mask(bits_of(a.addr)) == mask(bits_of(b.addr))
}

/// The node-wide part of session networking.
#[derive(Debug)]
pub struct HostNet {
    /// `jy<tag8>`: the claim bridge's name and every veth's prefix.
    prefix: String,
    block: Block,
    netfilter: Netfilter,
    forwarding: Forwarding,
    resolver: Resolver,
    /// Which session indices are in use.
    used: Mutex<Vec<bool>>,
}

impl HostNet {
    /// Sweeps this node's leftovers, claims a free block of the pools, turns
    /// forwarding on and installs the rules. `tag` names the node.
    pub async fn start(tag: &str, cfg: &NetConfig) -> Result<Self, NetworkError> {
        for (pool, family, max, v4) in [
            (cfg.v4, "IPv4", NODE_BLOCK_V4, true),
            (cfg.v6, "IPv6", NODE_BLOCK_V6, false),
        ] {
            if pool.addr.is_ipv4() != v4 || pool.len > max {
                return Err(NetworkError::Pool { pool, family, max });
            }
        }
        let tag8: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let prefix = format!("{LINK_PREFIX}{tag8}");
        let swept = sweep(&prefix).await?;
        if swept > 0 {
            tracing::info!(
                links = swept,
                "removed session links left by an earlier run"
            );
        }
        let ipv6 = Path::new("/proc/sys/net/ipv6").exists();
        let block = claim(&prefix, cfg, ipv6, &tag8).await?;
        let started = Self::finish(tag, cfg, prefix.clone(), block, ipv6).await;
        if started.is_err() {
            let _ = sweep(&prefix).await;
        }
        started
    }

    /// The rest of [`HostNet::start`], once the block is claimed.
    async fn finish(
        tag: &str,
        cfg: &NetConfig,
        prefix: String,
        block: Block,
        ipv6: bool,
    ) -> Result<Self, NetworkError> {
        let resolver = Resolver::system()?;
        let forwarding = Forwarding::new(ipv6)?;
        let guard = forwarding.was_off()?;
        let mut pools = vec![cfg.v4];
        if ipv6 {
            pools.push(cfg.v6);
        }
        let netfilter = Netfilter::new(
            tag,
            cfg.policy.clone(),
            SessionLinks {
                prefix: prefix.clone(),
                pools,
                guard,
            },
        );
        // The rules stand before forwarding starts, and a node stopping now
        // sees this node's table and leaves forwarding on.
        netfilter.install().await?;
        forwarding.enable(guard)?;
        tracing::info!(v4 = %block.v4, v6 = ?block.v6.map(|c| c.to_string()), guard, "session networks");
        Ok(Self {
            prefix,
            block,
            netfilter,
            forwarding,
            resolver,
            used: Mutex::new(vec![false; SESSIONS as usize]),
        })
    }

    /// The node's nftables table (for sessions still in the node's namespace).
    pub fn netfilter(&self) -> &Netfilter {
        &self.netfilter
    }

    /// Removes the rules and releases the block (after every session detached),
    /// and turns forwarding off if jusy turned it on and no other node runs.
    pub async fn stop(&self) {
        if let Err(e) = self.netfilter.remove().await {
            tracing::error!(error = %e, "removing the nftables table failed");
        }
        if let Err(e) = sweep(&self.prefix).await {
            tracing::error!(error = %e, "removing session links failed");
        }
        if let Err(e) = self.forwarding.restore().await {
            tracing::error!(error = %e, "turning forwarding off again failed");
        }
    }

    /// Gives the network namespace of process `pid` its link to the node: a
    /// veth whose far end is `eth0` there, addresses, default routes, loopback
    /// up, and DNS answered at the gateway.
    pub async fn attach(&self, pid: u32) -> Result<SessionNet, NetworkError> {
        let k = self.take_index()?;
        let made = self.link(pid, k).await;
        if made.is_err() {
            self.free_index(k);
        }
        made
    }

    async fn link(&self, pid: u32, k: u32) -> Result<SessionNet, NetworkError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let ns = File::open(&path).map_err(|source| NetworkError::Io { path, source })?;
        // Our own fd of the namespace: it cannot be another process's after a
        // pid is reused, and it keeps the namespace (so the link and its
        // counters) alive until detach.
        let ns_path = format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd());
        let name = format!("{}{k:x}", self.prefix);
        let a = self.block.session(k);
        let mut host = format!(
            "link add {name} type veth peer name eth0 netns {ns_path}\n\
             addr add {}/31 dev {name}\n",
            a.gateway4
        );
        let mut inside = format!(
            "link set lo up\nlink set eth0 up\naddr add {}/31 dev eth0\n\
             route add default via {}\n",
            a.session4, a.gateway4
        );
        if let (Some(g6), Some(s6)) = (a.gateway6, a.session6) {
            host.push_str(&format!("addr add {g6}/127 dev {name} nodad\n"));
            inside.push_str(&format!(
                "addr add {s6}/127 dev eth0 nodad\nroute add default via {g6}\n"
            ));
        }
        host.push_str(&format!("link set {name} up\n"));
        let net = async {
            ip_batch(&["-b", "-"], &host).await?;
            ip_batch(&[&format!("--net={ns_path}"), "ip", "-b", "-"], &inside).await?;
            let mut dns = JoinSet::new();
            self.resolver
                .serve(IpAddr::V4(a.gateway4), &mut dns)
                .await?;
            Ok::<_, NetworkError>(dns)
        }
        .await;
        match net {
            Ok(dns) => Ok(SessionNet {
                name,
                index: k,
                addrs: a,
                _ns: ns,
                dns,
            }),
            Err(e) => {
                let _ = ip_batch(&["-b", "-"], &format!("link del {name}\n")).await;
                Err(e)
            }
        }
    }

    /// Removes a session's link and returns what it carried (an error only
    /// when the counters could not be read; the link is removed regardless).
    pub async fn detach(&self, mut net: SessionNet) -> Result<Traffic, NetworkError> {
        let traffic = net.traffic().await;
        let removed = ip_batch(&["-b", "-"], &format!("link del {}\n", net.name)).await;
        // The DNS sockets must be closed before the index (and so the gateway
        // address they are bound to) can be handed out again.
        net.dns.abort_all();
        while net.dns.join_next().await.is_some() {}
        self.free_index(net.index);
        removed?;
        let traffic = traffic?;
        tracing::info!(
            link = net.name,
            sent = traffic.sent,
            received = traffic.received,
            "session network removed"
        );
        Ok(traffic)
    }

    fn take_index(&self) -> Result<u32, NetworkError> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let k = used.iter().position(|u| !u).ok_or(NetworkError::Full)?;
        if let Some(u) = used.get_mut(k) {
            *u = true;
        }
        u32::try_from(k).map_err(|_| NetworkError::Full)
    }

    fn free_index(&self, k: u32) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = used.get_mut(k as usize) {
            *u = false;
        }
    }
}

/// One session's network.
#[derive(Debug)]
pub struct SessionNet {
    name: String,
    index: u32,
    addrs: Addrs,
    _ns: File,
    /// The session's DNS service; aborted when dropped.
    dns: JoinSet<()>,
}

impl SessionNet {
    /// The node-side interface name.
    pub fn link(&self) -> &str {
        &self.name
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// What the session's `/etc/resolv.conf` says: ask the node.
    pub fn resolv_conf(&self) -> String {
        format!("nameserver {}\n", self.addrs.gateway4)
    }

    /// Bytes through the link so far.
    pub async fn traffic(&self) -> Result<Traffic, NetworkError> {
        link_traffic(&self.name).await
    }
}

/// Bytes through a session link so far. Asked over netlink (`ip -s`), which
/// answers for the node's own namespace, where `/sys` may show another's.
pub async fn link_traffic(name: &str) -> Result<Traffic, NetworkError> {
    let out = run("ip", &["-j", "-s", "link", "show", "dev", name]).await?;
    let bad = |what: &str| NetworkError::Failed {
        cmd: format!("ip -j -s link show dev {name}"),
        stderr: format!("{what} in {out}"),
    };
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|_| bad("not JSON"))?;
    let stats = v
        .get(0)
        .and_then(|l| l.get("stats64"))
        .ok_or_else(|| bad("no stats64"))?;
    let bytes = |dir: &str| {
        stats
            .get(dir)
            .and_then(|d| d.get("bytes"))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(dir))
    };
    // The node's end: what it receives, the session sent.
    Ok(Traffic {
        sent: bytes("rx")?,
        received: bytes("tx")?,
    })
}

/// Deletes every link named `prefix…` (the claim bridge and session veths).
async fn sweep(prefix: &str) -> Result<usize, NetworkError> {
    let out = run("ip", &["-j", "link", "show"]).await?;
    let links: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| NetworkError::Failed {
            cmd: "ip -j link show".into(),
            stderr: e.to_string(),
        })?;
    let mut script = String::new();
    let mut n = 0;
    for name in links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.get("ifname")?.as_str())
        .filter(|name| name.starts_with(prefix))
    {
        script.push_str(&format!("link del {name}\n"));
        n += 1;
    }
    if n > 0 {
        // A veth whose namespace died meanwhile is already gone: -force goes on.
        ip_batch(&["-force", "-b", "-"], &script).await.ok();
    }
    Ok(n)
}

/// Claims the first block, starting from one the tag picks, that no route of the
/// machine overlaps and no other node holds.
async fn claim(
    prefix: &str,
    cfg: &NetConfig,
    ipv6: bool,
    tag8: &str,
) -> Result<Block, NetworkError> {
    let mut routes = routes_of("-4").await?;
    if ipv6 {
        routes.extend(routes_of("-6").await?);
    }
    ip_batch(
        &["-b", "-"],
        &format!("link add {prefix} type bridge\nlink set {prefix} up\n"),
    )
    .await?;
    let blocks = 1u32 << (NODE_BLOCK_V4 - cfg.v4.len);
    let start = tag8
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    for i in 0..blocks {
        let Some(block) = Block::nth(cfg, (start.wrapping_add(i)) % blocks, ipv6) else {
            continue;
        };
        let mine = std::iter::once(block.v4).chain(block.v6);
        if mine.clone().any(|c| routes.iter().any(|r| overlaps(c, *r))) {
            continue;
        }
        let mut script = format!("route add {} dev {prefix}\n", block.v4);
        if let Some(v6) = block.v6 {
            script.push_str(&format!("route add {v6} dev {prefix}\n"));
        }
        // Another node may have claimed it since the routes were read.
        if ip_batch(&["-b", "-"], &script).await.is_ok() {
            return Ok(block);
        }
        let _ = ip_batch(
            &["-force", "-b", "-"],
            &format!("route flush dev {prefix}\n"),
        )
        .await;
    }
    let _ = ip_batch(&["-b", "-"], &format!("link del {prefix}\n")).await;
    Err(NetworkError::NoBlock {
        v4: cfg.v4,
        v6: cfg.v6,
        routes: routes
            .iter()
            .filter(|r| overlaps(**r, cfg.v4) || overlaps(**r, cfg.v6))
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Destinations of the machine's routes in every table, except local,
/// broadcast and multicast entries (the machine's own addresses sit inside
/// ranges that have a route of their own).
async fn routes_of(family: &str) -> Result<Vec<Cidr>, NetworkError> {
    let out = run("ip", &["-j", family, "route", "show", "table", "all"]).await?;
    let list: serde_json::Value = serde_json::from_str(&out).map_err(|e| NetworkError::Failed {
        cmd: format!("ip -j {family} route show table all"),
        stderr: e.to_string(),
    })?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            !matches!(
                r.get("type").and_then(|t| t.as_str()),
                Some("local" | "broadcast" | "multicast" | "anycast")
            )
        })
        .filter_map(|r| r.get("dst")?.as_str()?.parse::<Cidr>().ok())
        .collect())
}

/// Runs `ip` (or `nsenter … ip` when the first argument is `--net=`) with a
/// batch script on stdin.
async fn ip_batch(args: &[&str], script: &str) -> Result<(), NetworkError> {
    let program = if args.first().is_some_and(|a| a.starts_with("--net=")) {
        "nsenter"
    } else {
        "ip"
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Spawn {
            cmd: program,
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|source| NetworkError::Spawn {
                cmd: program,
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| NetworkError::Spawn {
            cmd: program,
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Failed {
            cmd: format!("{program} {}: {}", args.join(" "), script.trim()),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

pub(super) async fn run(program: &'static str, args: &[&str]) -> Result<String, NetworkError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| NetworkError::Spawn {
            cmd: program,
            source,
        })?;
    if !out.status.success() {
        return Err(NetworkError::Failed {
            cmd: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        NetConfig {
            v4: "172.30.0.0/16".parse().unwrap(),
            v6: "fd6a:7573:7900::/48".parse().unwrap(),
            policy: Policy::default(),
        }
    }

    #[test]
    fn blocks_and_sessions_get_distinct_point_to_point_pairs() {
        let b = Block::nth(&cfg(), 3, true).unwrap();
        assert_eq!(b.v4.to_string(), "172.30.12.0/22");
        assert_eq!(b.v6.unwrap().to_string(), "fd6a:7573:7900:3::/64");
        let first = b.session(0);
        assert_eq!(first.gateway4, Ipv4Addr::new(172, 30, 12, 0));
        assert_eq!(first.session4, Ipv4Addr::new(172, 30, 12, 1));
        assert_eq!(first.gateway6.unwrap().to_string(), "fd6a:7573:7900:3::");
        let last = b.session(SESSIONS - 1);
        assert_eq!(last.session4, Ipv4Addr::new(172, 30, 15, 255));
        assert_eq!(last.session6.unwrap().to_string(), "fd6a:7573:7900:3::3ff");
        assert!(
            Block::nth(&cfg(), 64, true).is_none(),
            "a /16 holds 64 blocks of /22"
        );
        assert_eq!(Block::nth(&cfg(), 1, false).unwrap().v6, None);
    }

    #[test]
    fn overlap_is_by_the_shorter_prefix() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        assert!(overlaps(c("172.30.12.0/22"), c("172.16.0.0/12")));
        assert!(overlaps(c("172.30.12.0/22"), c("172.30.13.7")));
        assert!(!overlaps(c("172.30.12.0/22"), c("172.30.16.0/24")));
        assert!(overlaps(c("0.0.0.0/0"), c("10.0.0.0/8")));
        assert!(!overlaps(c("10.0.0.0/8"), c("fd00::/8")));
        assert!(overlaps(
            c("fd6a:7573:7900:3::/64"),
            c("fd6a:7573:7900::/48")
        ));
    }

    #[test]
    fn pools_too_small_for_a_block_are_refused() {
        assert!(sub("10.0.0.0/24".parse().unwrap(), NODE_BLOCK_V4, 0).is_none());
        assert!(sub("10.0.0.0/22".parse().unwrap(), NODE_BLOCK_V4, 0).is_some());
        assert!(sub("10.0.0.0/22".parse().unwrap(), NODE_BLOCK_V4, 1).is_none());
    }
}
