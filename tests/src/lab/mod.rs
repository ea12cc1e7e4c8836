//! The lab: a real network on this machine made of Linux network namespaces,
//! for end-to-end tests across NAT.
//!
//! * The **internet** is one namespace with a bridge (`switch`); every public host plugs
//!   into it with a veth and gets an address from 198.18.0.0/15 (the
//!   benchmarking range, never routed on the real internet).
//! * A **public host** (a broker, a client) sits directly on the internet.
//! * A **home** is a host on 192.168.1.0/24 behind a home router that
//!   masquerades and accepts nothing inbound (see [`router`]). With carrier-grade
//!   NAT the home router's WAN side is 100.64.x.2 behind a carrier router that
//!   NATs once more. Every home reuses 192.168.1.0/24, as real homes do.
//!
//! Programs run in a host with [`Site::command`]; cleanup is in [`sweep`].
//!
//! # Layout
//! * [`netns`] — namespaces, veth links, addresses, code inside a namespace.
//! * [`router`] — NAT routers with nftables, and the faults tests inject
//!   (a slow, lossy uplink through `tc netem` or the `jusy-impair` binary).
//! * [`sweep`] — removal of this lab and of labs left by dead tests.

pub mod netns;
pub mod router;
mod sweep;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

pub use netns::{End, in_netns};
pub use router::{ImpairedUplink, Impairment, Router};

use crate::scene::Scene;
use crate::site::Site;

/// Removes every lab of this process, for a program that ends without
/// dropping its labs (an interrupted bench).
pub fn remove_all_of_this_process() {
    sweep::own();
}

/// How a home reaches the internet.
#[derive(Debug, Clone, Copy, Default)]
pub struct HomeOpts {
    /// The home router sits behind a carrier's NAT (100.64.0.0/10).
    pub cgnat: bool,
    /// The home router drops all UDP (so QUIC cannot get out).
    pub block_udp: bool,
}

/// A home network: one host behind its own router (and maybe a carrier's).
#[derive(Debug, Clone)]
pub struct Home {
    pub host: Site,
    pub router: Router,
    pub carrier: Option<Router>,
}

impl Home {
    /// The home LAN, the same in every home.
    pub const LAN: &str = "192.168.1.0/24";
    /// The home router's LAN address.
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
}

/// A network of namespaces, removed when dropped.
#[derive(Debug)]
pub struct Lab<'s> {
    scene: &'s Scene,
    prefix: String,
    namespaces: Vec<String>,
    internet: String,
    /// Public addresses handed out so far.
    public: u16,
    /// Carrier networks made so far (each gets its own 100.64.x.0/24).
    carriers: u8,
}

impl<'s> Lab<'s> {
    /// Sweeps what dead tests left, then makes an empty internet.
    pub fn new(scene: &'s Scene) -> anyhow::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        sweep::stale();
        let mut lab = Self {
            scene,
            prefix: sweep::prefix(SEQ.fetch_add(1, Ordering::Relaxed)),
            namespaces: Vec::new(),
            internet: String::new(),
            public: 0,
            carriers: 0,
        };
        std::fs::write(scene.dir().join(sweep::MARKER), &lab.prefix)?;
        lab.internet = lab.netns("inet")?;
        netns::ip(
            scene,
            &[
                "-n",
                &lab.internet,
                "link",
                "add",
                "name",
                "switch",
                "type",
                "bridge",
            ],
        )?;
        netns::ip(scene, &["-n", &lab.internet, "link", "set", "switch", "up"])?;
        Ok(lab)
    }

    fn netns(&mut self, role: &str) -> anyhow::Result<String> {
        let name = format!("{}-{role}", self.prefix);
        // Registered first, so that a half-made namespace is removed too.
        self.namespaces.push(name.clone());
        netns::create(self.scene, &name)?;
        Ok(name)
    }

    /// A fresh address on the internet.
    pub fn public_ip(&mut self) -> anyhow::Result<Ipv4Addr> {
        self.public += 1;
        let [hi, lo] = self.public.to_be_bytes();
        anyhow::ensure!(lo != 0 && lo != 255 && hi < 2, "out of public addresses");
        Ok(Ipv4Addr::new(198, 18 + hi, 0, lo))
    }

    /// Plugs interface `ifname` of `ns` into the internet with a fresh public
    /// address; returns the address and the switch port it hangs on.
    fn plug_in(&mut self, ns: &str, ifname: &str) -> anyhow::Result<(Ipv4Addr, End)> {
        let ip = self.public_ip()?;
        let end = End {
            ns: ns.to_owned(),
            ifname: ifname.to_owned(),
        };
        let port = End {
            ns: self.internet.clone(),
            ifname: format!("p{}", self.public),
        };
        netns::veth(self.scene, &end, &port)?;
        netns::ip(
            self.scene,
            &[
                "-n",
                &port.ns,
                "link",
                "set",
                &port.ifname,
                "master",
                "switch",
            ],
        )?;
        netns::address(self.scene, &end, &format!("{ip}/15"))?;
        // The internet is one flat segment: everything on it is on-link.
        netns::ip(
            self.scene,
            &["-n", ns, "route", "add", "default", "dev", ifname],
        )?;
        Ok((ip, port))
    }

    /// A host directly on the internet.
    pub fn public_host(&mut self, role: &str) -> anyhow::Result<Site> {
        let ns = self.netns(role)?;
        let (ip, _) = self.plug_in(&ns, "eth0")?;
        Ok(Site {
            netns: Some(ns),
            ip: IpAddr::V4(ip),
        })
    }

    /// A home: host `role` at 192.168.1.2 behind router `<role>-rt`, which is on
    /// the internet or, with `cgnat`, behind carrier router `<role>-cg`.
    pub fn home(&mut self, role: &str, opts: HomeOpts) -> anyhow::Result<Home> {
        let rt = self.netns(&format!("{role}-rt"))?;
        let wan = End {
            ns: rt.clone(),
            ifname: "wan".into(),
        };
        let (router, carrier) = if opts.cgnat {
            let cg = self.netns(&format!("{role}-cg"))?;
            let (cg_ip, port) = self.plug_in(&cg, "wan")?;
            let cg_lan = End {
                ns: cg.clone(),
                ifname: "lan".into(),
            };
            self.carriers += 1;
            let net = self.carriers;
            anyhow::ensure!(net < 255, "out of carrier networks");
            netns::veth(self.scene, &cg_lan, &wan)?;
            netns::address(self.scene, &cg_lan, &format!("100.64.{net}.1/24"))?;
            netns::address(self.scene, &wan, &format!("100.64.{net}.2/24"))?;
            netns::ip(
                self.scene,
                &[
                    "-n",
                    &rt,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("100.64.{net}.1"),
                ],
            )?;
            router::configure(self.scene, &cg, false)?;
            let carrier = Router {
                ns: cg,
                wan: End {
                    ns: cg_lan.ns.clone(),
                    ifname: "wan".into(),
                },
                upstream: port,
                wan_ip: cg_ip,
                wan_prefix: 15,
                lan_ip: Ipv4Addr::new(100, 64, net, 1),
            };
            let router = Router {
                ns: rt.clone(),
                wan,
                upstream: cg_lan,
                wan_ip: Ipv4Addr::new(100, 64, net, 2),
                wan_prefix: 24,
                lan_ip: Home::GATEWAY,
            };
            (router, Some(carrier))
        } else {
            let (ip, port) = self.plug_in(&rt, "wan")?;
            let router = Router {
                ns: rt.clone(),
                wan,
                upstream: port,
                wan_ip: ip,
                wan_prefix: 15,
                lan_ip: Home::GATEWAY,
            };
            (router, None)
        };
        let host = self.netns(role)?;
        let lan = End {
            ns: rt.clone(),
            ifname: "lan".into(),
        };
        let eth0 = End {
            ns: host.clone(),
            ifname: "eth0".into(),
        };
        netns::veth(self.scene, &lan, &eth0)?;
        netns::address(self.scene, &lan, &format!("{}/24", Home::GATEWAY))?;
        netns::address(self.scene, &eth0, "192.168.1.2/24")?;
        netns::ip(
            self.scene,
            &[
                "-n",
                &host,
                "route",
                "add",
                "default",
                "via",
                &Home::GATEWAY.to_string(),
            ],
        )?;
        router::configure(self.scene, &rt, opts.block_udp)?;
        Ok(Home {
            host: Site {
                netns: Some(host),
                ip: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 2)),
            },
            router,
            carrier,
        })
    }

    /// Adds a route at `site` to `prefix` via `gateway` (e.g. an attacker on
    /// the internet aiming at a home LAN through its router).
    pub fn route(&self, site: &Site, prefix: &str, gateway: Ipv4Addr) -> anyhow::Result<()> {
        let ns = site.netns.as_deref().context("not a lab host")?;
        netns::ip(
            self.scene,
            &[
                "-n",
                ns,
                "route",
                "add",
                prefix,
                "via",
                &gateway.to_string(),
            ],
        )
    }
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            sweep::remove_netns(ns);
        }
        self.scene.note(&format!("lab {} removed", self.prefix));
    }
}
