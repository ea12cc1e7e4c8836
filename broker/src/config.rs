//! The broker's configuration: a TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use jusy_common::terms::OrderTerms;
use serde::Deserialize;

use crate::api::client_addr::{ForwardedHeader, Proxies};
use crate::api::serve::Limits;

/// Everything a broker needs to run; every field has a default.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database (sled) lives. Default `/var/lib/jusy-broker`.
    pub data_dir: PathBuf,
    /// HTTP API address. Default `127.0.0.1:8080`.
    pub api_listen: SocketAddr,
    /// UDP address nodes dial over QUIC. Default `0.0.0.0:7443`.
    pub relay_listen: SocketAddr,
    /// Address order ports bind to. Default `0.0.0.0`.
    pub order_bind: std::net::IpAddr,
    /// Inclusive range of TCP ports for orders, e.g. `[20000, 29999]`.
    /// Default: none, the OS picks a free port.
    pub order_ports: Option<(u16, u16)>,
    /// Host name or address clients are told to connect to. Default `127.0.0.1`.
    pub public_host: String,
    /// Seconds a client has to log in to an order for the first time (a TCP
    /// connection that does not authenticate is no login); the broker
    /// cancels the order itself (a full refund) 2 s after it, whatever the
    /// node says. An order term. Default 120.
    pub connect_window_secs: u32,
    /// CPU seconds an order buys across all its session's processes; used
    /// up, the session ends with `DONE`. An order term, like the five below:
    /// the broker decides every order's terms, its node enforces exactly
    /// them and signs them, and a node that cannot (its own settings are the
    /// most it offers) refuses the order, which then goes to another node.
    /// Default 3600.
    pub cpu_budget_secs: u32,
    /// Wall-clock seconds from the first login; then the session ends with
    /// `WALL`, by the node, or by the broker 10 s later. Default 10800 (3 h).
    pub wall_secs: u32,
    /// Memory of a session in MiB, without swap (`RAM`). Default 2048.
    pub memory_mib: u32,
    /// Processes a session may have at once (`PROC`). Default 50.
    pub max_processes: u32,
    /// Disk of a session's home in MiB (`DISK`); 0 sells homes without a
    /// disk of their own, which only nodes with `disk_mib = 0` take.
    /// Default 5120.
    pub disk_mib: u32,
    /// Seconds a session outlives its client's last logged-in connection,
    /// so that sequential `ssh` and `scp` commands reach the same session.
    /// Default 5.
    pub grace_secs: u32,
    /// Price of one CPU-hour in satoshi. Default 20000.
    pub price_sat: u64,
    /// The node owner's share of proven CPU time, in parts per million. Default 800000 (80 %).
    pub owner_share_ppm: u32,
    /// Bearer token for the operator endpoints (`/admin/…`). Default: none, and
    /// those endpoints answer 401.
    pub operator_token: Option<String>,
    /// Requests per second allowed per client address and per hash. Default 10.
    pub rate_limit_per_sec: u32,
    /// Requests allowed in a burst per client address and per hash. Default 30.
    pub rate_limit_burst: u32,
    /// Seconds a client has to send a request's line and headers, counted
    /// from the connection's start or the end of the previous response (so
    /// it is also how long an idle keep-alive connection stays open).
    /// Default 10.
    pub http_header_timeout_secs: u64,
    /// Seconds an API connection may move no byte either way (a stalled
    /// request body, a client that stops reading its answer) before it takes
    /// no more requests; after as long again without a byte it is cut.
    /// Default 60.
    pub http_idle_timeout_secs: u64,
    /// Open API connections at most; more are closed at once. The broker
    /// raises its open-file limit as far as allowed and uses at most half of
    /// it for API connections, whatever this says, so that order ports keep
    /// theirs. Default 4096.
    pub http_max_connections: u32,
    /// Open API connections at most per client address (an IPv6 /64 counts
    /// as one): enough for the clients behind one NAT, and a slow-header
    /// flood needs that many addresses per 256 connections. More are closed
    /// at once. Trusted proxies are held only to `http_max_connections`.
    /// Default 256.
    pub http_max_connections_per_address: u32,
    /// Reverse proxies (addresses or blocks such as `10.0.0.0/8`) whose
    /// `forwarded_header` names the client; rate and connection limits then
    /// apply to that client instead of the proxy. From anyone else the
    /// header is ignored. Default: none.
    pub trusted_proxies: Vec<String>,
    /// The header trusted proxies write the client's address in:
    /// `"x-forwarded-for"` or `"forwarded"` (RFC 7239). Default
    /// `"x-forwarded-for"`.
    pub forwarded_header: ForwardedHeader,
    /// Rounds of the node speed test; 0 turns the test off. Default
    /// `jusy_common::speed::ROUNDS` (about one second on the reference core).
    pub speed_test_rounds: u32,
    /// Longest a node may take to answer the speed test, in milliseconds,
    /// measured by the broker (round trip included). Default 2000.
    pub speed_test_limit_ms: u64,
    /// Seconds between speed tests of an attached node. Default 21600 (6 h).
    pub speed_test_interval_secs: u64,
    /// Speed-test digests the relay computes at once, about a second of one
    /// core each; nodes wait for a turn up to 30 s, then are told to come
    /// back later. First tests on this relay are also rate limited per
    /// address and per node key (`relay::speed_tests`). 0: half the
    /// broker's cores, at least one. Default 0.
    pub speed_test_concurrency: u32,
    /// Seconds a QUIC connection to the relay has, from its first packet,
    /// to finish its handshake and say the node's hello; it is closed
    /// otherwise. Default 10.
    pub relay_hello_timeout_secs: u64,
    /// Connections to the relay that have not said their node's hello yet,
    /// at most; when they are this many, a new one closes the oldest of them
    /// (so strangers' half-done handshakes cannot keep a node out for long).
    /// Attached nodes do not count. Default 1024.
    pub relay_max_handshakes: u32,
    /// Such connections at most from one address (an IPv6 /64 counts as
    /// one); more are refused. Also the burst of new handshakes one address
    /// may start. Default 16.
    pub relay_max_handshakes_per_address: u32,
    /// New handshakes one address may start per second after its burst; more
    /// are refused, and the node tries again. Default 4.
    pub relay_handshakes_per_sec_per_address: u32,
    /// New handshakes per second from all addresses (and the burst), which
    /// keeps the relay's data-plane core for the traffic of attached nodes.
    /// Default 1000.
    pub relay_handshakes_per_sec: u32,
    /// UDP address of the brokers' mesh (libp2p over QUIC), e.g.
    /// `0.0.0.0:7444`. Default: none, and the broker works alone, as the only
    /// relay and API.
    pub mesh_listen: Option<SocketAddr>,
    /// Mesh addresses of brokers to join at start
    /// (`/ip4/…/udp/…/quic-v1/p2p/<peer id>`, as printed in their `ready`
    /// line); each is trusted. Default: none.
    pub mesh_join: Vec<String>,
    /// Brokers allowed in the mesh, by broker key (64 hex characters) or mesh
    /// peer id; connections from any other broker are denied, so it can
    /// neither publish records nor reserve slots. Default: none.
    pub mesh_peers: Vec<String>,
    /// Seconds between the capacity statements a relay asks of each attached
    /// node. Default 5.
    pub capacity_refresh_secs: u64,
    /// Seconds a capacity statement stays valid: a node that vanishes is no
    /// longer offered after this. Default 20, at most 120.
    pub capacity_validity_secs: u64,
    /// Largest QUIC datagram tried towards nodes, in bytes (1200 to 6500):
    /// path MTU discovery keeps what each path carries. Default 6500; towards
    /// each node no more than the route to it carries
    /// ([`jusy_node::mtu_towards`]).
    pub quic_max_mtu: u16,
    /// Microseconds the relay keeps polling its sockets, instead of
    /// sleeping, after a client's keystroke-sized bytes go to a node whose
    /// round trip is shorter: the node's answer or the client's next bytes are
    /// picked up without a wake-up, for up to that much CPU per keystroke.
    /// 0 turns it off; at most 1000. Default 200.
    pub busy_poll_us: u32,
    /// Lowest client rating, in percent, that may still order: a client whose
    /// sessions of the last 7 days kept breaking their node's limits (memory,
    /// processes, disk) falls below it and is refused with 403 until those
    /// sessions are older. A new client is rated 90 %; nine sessions that
    /// broke limits and none that did not take it to 47 %. 0 refuses no one;
    /// at most 100. Default 50.
    pub min_client_rating: u8,
    /// Orders a client may hold that nobody has logged in to yet; one more
    /// is refused with 409 (on the web page, with the same message) until
    /// the client logs in to one or one ends (an order nobody logs in to is
    /// cancelled and refunded after `connect_window_secs`). Orders that were
    /// logged in to, or have ended, do not count. At least 1. Default 3.
    pub max_unconnected_orders: u32,
    /// Seconds an owner's earnings from an order are held before they are
    /// released to the owner's account (and can be withdrawn). Within it
    /// the order's client may dispute them; disputed earnings stay held
    /// until the operator decides. 0 releases them at once, with no
    /// disputes. Default 86400 (a day).
    pub hold_secs: u64,
    /// Where Prometheus metrics are served (`GET /metrics`); keep it off the
    /// internet (loopback, or an address only the scraper reaches). Default:
    /// not served.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/jusy-broker"),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            relay_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            order_bind: std::net::IpAddr::from([0, 0, 0, 0]),
            order_ports: None,
            public_host: "127.0.0.1".to_owned(),
            connect_window_secs: OrderTerms::default().connect_window_secs,
            cpu_budget_secs: OrderTerms::default().cpu_budget_secs,
            wall_secs: OrderTerms::default().wall_secs,
            memory_mib: OrderTerms::default().memory_mib,
            max_processes: OrderTerms::default().max_processes,
            disk_mib: OrderTerms::default().disk_mib,
            grace_secs: OrderTerms::default().grace_secs,
            price_sat: 20_000,
            owner_share_ppm: 800_000,
            operator_token: None,
            rate_limit_per_sec: 10,
            rate_limit_burst: 30,
            http_header_timeout_secs: 10,
            http_idle_timeout_secs: 60,
            http_max_connections: 4096,
            http_max_connections_per_address: 256,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            speed_test_rounds: jusy_common::speed::ROUNDS,
            speed_test_limit_ms: 2_000,
            speed_test_interval_secs: 6 * 3600,
            speed_test_concurrency: 0,
            relay_hello_timeout_secs: 10,
            relay_max_handshakes: 1024,
            relay_max_handshakes_per_address: 16,
            relay_handshakes_per_sec_per_address: 4,
            relay_handshakes_per_sec: 1000,
            mesh_listen: None,
            mesh_join: Vec::new(),
            mesh_peers: Vec::new(),
            capacity_refresh_secs: 5,
            capacity_validity_secs: 20,
            quic_max_mtu: jusy_node::QUIC_MTU,
            min_client_rating: 50,
            max_unconnected_orders: 3,
            hold_secs: jusy_common::hold::DEFAULT_HOLD_MS / 1000,
            metrics_listen: None,
            busy_poll_us: 200,
        }
    }
}

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("order_ports range {0}-{1} is empty")]
    EmptyRange(u16, u16),
    #[error("owner_share_ppm {0} is more than 1000000 (100 %)")]
    Share(u32),
    #[error("operator_token must be at least 16 characters")]
    WeakToken,
    #[error("rate limits must be at least 1")]
    RateLimit,
    #[error("HTTP timeouts and connection limits must be at least 1")]
    HttpLimit,
    #[error("the relay's hello timeout and handshake limits must be at least 1")]
    RelayLimit,
    #[error("trusted_proxies: {0}")]
    Proxy(String),
    #[error("mesh_join and mesh_peers need mesh_listen")]
    MeshListen,
    #[error("mesh: {0}")]
    Mesh(#[from] crate::mesh::MeshError),
    #[error("mesh join address {0}: {1}")]
    JoinAddr(String, String),
    #[error(
        "capacity_validity_secs must be more than capacity_refresh_secs (at least 1) and at most 120"
    )]
    Validity,
    #[error("quic_max_mtu {0} is outside 1200 to 6500")]
    QuicMtu(u16),
    #[error("busy_poll_us {0} is more than 1000")]
    BusyPoll(u32),
    #[error(
        "cpu_budget_secs, wall_secs, memory_mib, max_processes and connect_window_secs must be at least 1"
    )]
    Terms,
    #[error("min_client_rating {0} is more than 100 (percent)")]
    ClientRating(u8),
    #[error("max_unconnected_orders must be at least 1")]
    Unconnected,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some((lo, hi)) = self.order_ports
            && (lo > hi || lo == 0)
        {
            return Err(ConfigError::EmptyRange(lo, hi));
        }
        if self.owner_share_ppm > 1_000_000 {
            return Err(ConfigError::Share(self.owner_share_ppm));
        }
        if self.operator_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::WeakToken);
        }
        if self.rate_limit_per_sec == 0 || self.rate_limit_burst == 0 {
            return Err(ConfigError::RateLimit);
        }
        if self.relay_hello_timeout_secs == 0
            || self.relay_max_handshakes == 0
            || self.relay_max_handshakes_per_address == 0
            || self.relay_handshakes_per_sec_per_address == 0
            || self.relay_handshakes_per_sec == 0
        {
            return Err(ConfigError::RelayLimit);
        }
        if self.http_header_timeout_secs == 0
            || self.http_idle_timeout_secs == 0
            || self.http_max_connections == 0
            || self.http_max_connections_per_address == 0
        {
            return Err(ConfigError::HttpLimit);
        }
        self.proxies()?;
        if self.capacity_refresh_secs == 0
            || self.capacity_validity_secs <= self.capacity_refresh_secs
            || self.capacity_validity_secs * 1000 > jusy_common::capacity::MAX_VALIDITY_MS
        {
            return Err(ConfigError::Validity);
        }
        if !jusy_node::QUIC_MTU_RANGE.contains(&self.quic_max_mtu) {
            return Err(ConfigError::QuicMtu(self.quic_max_mtu));
        }
        if self.busy_poll() > crate::relay::data_plane::MAX_BUSY_POLL {
            return Err(ConfigError::BusyPoll(self.busy_poll_us));
        }
        if self.cpu_budget_secs == 0
            || self.wall_secs == 0
            || self.memory_mib == 0
            || self.max_processes == 0
            || self.connect_window_secs == 0
        {
            return Err(ConfigError::Terms);
        }
        if self.min_client_rating > 100 {
            return Err(ConfigError::ClientRating(self.min_client_rating));
        }
        if self.max_unconnected_orders == 0 {
            return Err(ConfigError::Unconnected);
        }
        self.mesh()?;
        Ok(())
    }

    /// The API listener's limits, before the open-file limit is applied.
    pub fn http_limits(&self) -> Limits {
        Limits {
            header_timeout: std::time::Duration::from_secs(self.http_header_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(self.http_idle_timeout_secs),
            max_connections: self.http_max_connections as usize,
            max_per_address: self.http_max_connections_per_address as usize,
        }
    }

    /// The reverse proxies whose forwarding header is believed.
    pub fn proxies(&self) -> Result<Proxies, ConfigError> {
        let trusted = self
            .trusted_proxies
            .iter()
            .map(|p| p.parse().map_err(ConfigError::Proxy))
            .collect::<Result<_, _>>()?;
        Ok(Proxies {
            trusted,
            header: self.forwarded_header,
        })
    }

    /// How long the relay busy polls after client traffic.
    pub fn busy_poll(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.busy_poll_us.into())
    }

    /// How this broker joins the mesh; `None` when it works alone.
    pub fn mesh(&self) -> Result<Option<crate::mesh::MeshSettings>, ConfigError> {
        let Some(listen) = self.mesh_listen else {
            if self.mesh_join.is_empty() && self.mesh_peers.is_empty() {
                return Ok(None);
            }
            return Err(ConfigError::MeshListen);
        };
        let join = self
            .mesh_join
            .iter()
            .map(|a| {
                let addr: libp2p::Multiaddr =
                    a.parse().map_err(|e: libp2p::multiaddr::Error| {
                        ConfigError::JoinAddr(a.clone(), e.to_string())
                    })?;
                crate::mesh::peer_of(&addr)?;
                Ok(addr)
            })
            .collect::<Result<_, ConfigError>>()?;
        let trust = self
            .mesh_peers
            .iter()
            .map(|p| crate::mesh::parse_peer(p))
            .collect::<Result<_, _>>()?;
        Ok(Some(crate::mesh::MeshSettings {
            listen,
            public_ip: self.public_host.parse().ok(),
            join,
            trust,
            pace: crate::mesh::Pace::PRODUCTION,
            pending: crate::mesh::limits::Pending::PRODUCTION,
        }))
    }

    pub fn speed_test(&self) -> crate::relay::SpeedTest {
        let half_the_cores = std::thread::available_parallelism().map_or(1, |n| n.get() / 2);
        let concurrency = match self.speed_test_concurrency {
            0 => half_the_cores,
            n => n as usize,
        };
        crate::relay::SpeedTest {
            rounds: self.speed_test_rounds,
            limit: std::time::Duration::from_millis(self.speed_test_limit_ms),
            interval: std::time::Duration::from_secs(self.speed_test_interval_secs.max(1)),
            concurrency: concurrency.max(1),
        }
    }

    /// The relay's bounds on connections that have not said hello yet.
    pub fn relay_admission(&self) -> crate::relay::admission::Limits {
        use crate::limit::Rate;
        let per_address = self.relay_max_handshakes_per_address;
        crate::relay::admission::Limits {
            hello_timeout: std::time::Duration::from_secs(self.relay_hello_timeout_secs),
            max: self.relay_max_handshakes as usize,
            max_per_address: per_address as usize,
            per_address: Rate::per_sec(self.relay_handshakes_per_sec_per_address, per_address),
            all: Rate::per_sec(self.relay_handshakes_per_sec, self.relay_handshakes_per_sec),
        }
    }

    /// The terms of every order this broker sells.
    pub fn terms(&self) -> OrderTerms {
        OrderTerms {
            cpu_budget_secs: self.cpu_budget_secs,
            wall_secs: self.wall_secs,
            memory_mib: self.memory_mib,
            max_processes: self.max_processes,
            disk_mib: self.disk_mib,
            connect_window_secs: self.connect_window_secs,
            grace_secs: self.grace_secs,
        }
    }

    pub fn pricing(&self) -> jusy_common::order::Pricing {
        jusy_common::order::Pricing {
            price_sat: self.price_sat,
            owner_share_ppm: self.owner_share_ppm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/broker.example.toml");
        let cfg = Config::load(&path).expect("deploy/broker.example.toml must load");
        assert_eq!(cfg.order_ports, Some((20000, 29999)));
        let proxies = cfg.proxies().expect("trusted proxies");
        assert!(proxies.trusts("127.0.0.1".parse().expect("address")));
        assert!(!proxies.trusts("192.0.2.1".parse().expect("address")));
    }

    #[test]
    fn http_limits_are_checked() {
        assert!(
            Config::default()
                .proxies()
                .expect("none")
                .trusted
                .is_empty()
        );
        let cfg = Config {
            trusted_proxies: vec!["10.0.0.0/33".into()],
            ..Config::default()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::Proxy(_))));
        let cfg = Config {
            http_max_connections_per_address: 0,
            ..Config::default()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::HttpLimit)));
    }

    #[test]
    fn relay_limits_are_checked() {
        let limits = Config::default().relay_admission();
        assert_eq!(limits.max, 1024);
        assert_eq!(limits.max_per_address, 16);
        assert!(Config::default().speed_test().concurrency >= 1);
        let cfg = Config {
            speed_test_concurrency: 3,
            ..Config::default()
        };
        assert_eq!(cfg.speed_test().concurrency, 3);
        let cfg = Config {
            relay_max_handshakes_per_address: 0,
            ..Config::default()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::RelayLimit)));
    }

    #[test]
    fn mesh_settings() {
        assert!(Config::default().mesh().expect("alone").is_none());
        let key = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
        let lonely = Config {
            mesh_peers: vec![key.into()],
            ..Config::default()
        };
        assert!(matches!(lonely.validate(), Err(ConfigError::MeshListen)));
        let joined = Config {
            mesh_listen: Some(SocketAddr::from(([0, 0, 0, 0], 7444))),
            mesh_peers: vec![key.into()],
            mesh_join: vec!["/ip4/198.18.0.2/udp/7444/quic-v1".into()],
            ..Config::default()
        };
        assert!(matches!(joined.validate(), Err(ConfigError::Mesh(_))));
        let peer = crate::mesh::parse_peer(key).expect("broker key");
        let joined = Config {
            mesh_join: vec![format!("/ip4/198.18.0.2/udp/7444/quic-v1/p2p/{peer}")],
            ..joined
        };
        let settings = joined.mesh().expect("valid").expect("mesh");
        assert_eq!(settings.trust, vec![peer]);
        assert_eq!(settings.join.len(), 1);
    }

    #[test]
    fn at_least_one_unconnected_order_is_allowed() {
        assert_eq!(Config::default().max_unconnected_orders, 3);
        let cfg = Config {
            max_unconnected_orders: 0,
            ..Config::default()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::Unconnected)));
    }

    #[test]
    fn empty_port_range_is_rejected() {
        let cfg = Config {
            order_ports: Some((10, 5)),
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn quic_mtu_outside_its_range_is_rejected() {
        assert_eq!(Config::default().quic_max_mtu, 6500);
        for (mtu, ok) in [(1199, false), (1200, true), (1452, true), (6501, false)] {
            let cfg = Config {
                quic_max_mtu: mtu,
                ..Config::default()
            };
            assert_eq!(cfg.validate().is_ok(), ok, "{mtu}");
        }
    }

    #[test]
    fn busy_poll_is_bounded() {
        assert_eq!(
            Config::default().busy_poll(),
            crate::relay::data_plane::BUSY_POLL
        );
        for (us, ok) in [(0, true), (200, true), (1000, true), (1001, false)] {
            let cfg = Config {
                busy_poll_us: us,
                ..Config::default()
            };
            assert_eq!(cfg.validate().is_ok(), ok, "{us}");
        }
    }
}
