//! The node's configuration: a TOML file, overridden by command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::sandbox::SandboxLimits;
use crate::sandbox::cgroup::CgroupLimits;
use crate::sandbox::netfilter::{Cidr, Policy};
use crate::sandbox::network::NetConfig;
use crate::sandbox::user::DEFAULT_IDS;

/// Everything a node needs to run. Every field has a default except the broker.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Relay broker QUIC address, `host:port`. Required.
    pub broker: String,
    /// The relay broker's public key (64 hex characters), pinned in the handshake. Required.
    pub broker_key: String,
    /// More relays to move to when the broker's relay is lost, as
    /// `host:port=<broker key>`; relays also tell the node about the others.
    /// Default none.
    pub relays: Vec<String>,
    /// The owner hash whose account earns for this node's sessions. Default: none
    /// (the node works but earns nothing). Also read from the file named by
    /// `--owner-file` or the environment variable `JUSY_OWNER` (they win, in
    /// that order), never from the command line, which every process on the
    /// machine can read.
    pub owner: Option<String>,
    /// Where the node keeps its keys and session homes. Default `/var/lib/jusy-node`.
    pub data_dir: PathBuf,
    /// Sessions kept ready ahead of orders. Default ⌈1.3 × cores⌉.
    pub ready_slots: Option<usize>,
    /// Longest grace an order may ask: seconds a session survives after its
    /// last logged-in connection closes. This and the limits below are the
    /// most this node offers; each order's terms come from the broker, the
    /// node enforces exactly them (and signs them), and refuses an order whose
    /// terms exceed these. Default 5.
    pub grace_secs: u64,
    /// Seconds a client connection may stay open without its SSH user
    /// authenticating, as sshd's `LoginGraceTime`; then the node closes it
    /// (and the relay its TCP connection). Such a connection never counts as
    /// the client's: it neither starts nor holds open a session. Default 10.
    pub login_grace_secs: u64,
    /// Longest wall-clock limit (seconds from the first login) an order may
    /// ask; also the longest connect window. Default 10800 (3 h).
    pub wall_secs: u64,
    /// Lowest uid (and gid) of session users. Default 610000.
    pub uid_min: u32,
    /// Highest uid (and gid) of session users. Default 619999.
    pub uid_max: u32,
    /// Most CPU seconds an order may buy across all its session's processes.
    /// Default 3600.
    pub cpu_budget_secs: u64,
    /// Seconds between two signed usage receipts of a running session. Default 10.
    pub receipt_secs: u64,
    /// Most memory an order may ask, in MiB (never with swap); every slot's
    /// cgroup starts at this and is set to the order's terms. Default 2048.
    pub memory_mib: u64,
    /// Most processes (and threads) at once an order may ask. Default 50.
    pub max_processes: u32,
    /// SSH channels (shells, commands, sftp) a client may have open at once on
    /// one connection, as OpenSSH's `MaxSessions`; one more is refused with
    /// "administratively prohibited". Default 10.
    pub max_channels: usize,
    /// SSH channels a session may have open at once across all its
    /// connections. With the client input the node holds for each (at most
    /// about 4 MiB, see `ssh/input.rs`), this bounds what one session costs
    /// the node. Default 32.
    pub max_session_channels: usize,
    /// Size of a session's home disk image in MiB, the most disk an order may
    /// ask (a smaller disk in the terms ends the session when it uses that
    /// much); 0 keeps homes on the node's own disk without a limit, and takes
    /// only orders sold without one. Default 5120.
    pub disk_mib: u64,
    /// Space in MiB kept free on the data directory's file system. Images are
    /// sparse but may each grow to `disk_mib`: a slot is prepared only while
    /// every image at its full size, the new one included, leaves this much
    /// free; otherwise fewer slots are kept ready (logged as a warning, and a
    /// `disk_short` event line). Default 1024.
    pub disk_reserve_mib: u64,
    /// Serve Prometheus metrics (`GET /metrics`) on `127.0.0.1` at this port
    /// (0: any free port, announced in a `metrics` event line). Loopback
    /// only: a session cannot reach the host's loopback. Default: not served.
    pub metrics_port: Option<u16>,
    /// The operator's release key (64 hex characters, ed25519): `jusy-node
    /// update` installs only binaries signed with it. Default: none, and
    /// every update is refused.
    pub release_key: Option<String>,
    /// Let sessions reach private, link-local and loopback addresses (still TCP
    /// port 22 only). Default false: the owner's LAN and the node's own services
    /// are out of reach.
    pub net_allow_private: bool,
    /// Address ranges (`addr/len`) exempt from the private-address refusal, TCP
    /// port 22 only. Default none.
    pub net_allow: Vec<Cidr>,
    /// IPv4 range the node draws session networks from (at most a /22). Each node
    /// on a machine claims a free /22 of it (512 sessions of a /31) that no route
    /// of the machine overlaps; the node refuses to start when there is none.
    /// Default 172.30.0.0/16, outside the ranges home routers and the usual
    /// container tools hand out first.
    pub session_net_v4: Cidr,
    /// IPv6 range the node draws session networks from (at most a /64; each node
    /// claims a /64, each session a /127), masqueraded like IPv4. Default
    /// fd6a:7573:7900::/48, a unique-local range ("jusy" in hex).
    pub session_net_v6: Cidr,
    /// OpenSSH `sftp-server` to run for the sftp subsystem. Default: the first that
    /// exists of the usual Debian, Fedora and Arch paths.
    pub sftp_server: Option<PathBuf>,
    /// Largest QUIC datagram tried towards the relay, in bytes (1200 to 6500):
    /// path MTU discovery keeps what the path carries. Default 6500.
    pub quic_max_mtu: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            broker: String::new(),
            broker_key: String::new(),
            relays: Vec::new(),
            owner: None,
            data_dir: PathBuf::from("/var/lib/jusy-node"),
            ready_slots: None,
            grace_secs: 5,
            login_grace_secs: 10,
            wall_secs: 3 * 3600,
            uid_min: DEFAULT_IDS.0,
            uid_max: DEFAULT_IDS.1,
            cpu_budget_secs: 3600,
            receipt_secs: 10,
            memory_mib: 2048,
            max_processes: 50,
            max_channels: 10,
            max_session_channels: 32,
            disk_mib: 5120,
            disk_reserve_mib: 1024,
            metrics_port: None,
            release_key: None,
            net_allow_private: false,
            net_allow: Vec::new(),
            session_net_v4: Cidr {
                addr: std::net::IpAddr::V4(std::net::Ipv4Addr::new(172, 30, 0, 0)),
                len: 16,
            },
            session_net_v6: Cidr {
                addr: std::net::IpAddr::V6(std::net::Ipv6Addr::new(
                    0xfd6a, 0x7573, 0x7900, 0, 0, 0, 0, 0,
                )),
                len: 48,
            },
            sftp_server: None,
            quic_max_mtu: crate::QUIC_MTU,
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
    #[error("quic_max_mtu {0} is outside 1200 to 6500")]
    QuicMtu(u16),
    #[error("the owner hash from {from} is not 64 hex characters")]
    Owner { from: String },
}

/// The environment variable that may hold the owner hash.
pub const OWNER_ENV: &str = "JUSY_OWNER";

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
        if !crate::QUIC_MTU_RANGE.contains(&self.quic_max_mtu) {
            return Err(ConfigError::QuicMtu(self.quic_max_mtu));
        }
        Ok(())
    }

    /// Takes the owner hash from the file `file` names, else from `env` (the
    /// value of [`OWNER_ENV`]), else keeps the config's, and checks it.
    pub fn take_owner(
        &mut self,
        file: Option<&Path>,
        env: Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        let from = if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            self.owner = Some(text.trim().to_owned());
            path.display().to_string()
        } else if let Some(value) = env {
            let value = value.into_string().map_err(|_| ConfigError::Owner {
                from: OWNER_ENV.into(),
            })?;
            self.owner = Some(value.trim().to_owned());
            OWNER_ENV.into()
        } else {
            "the config file".into()
        };
        match &self.owner {
            Some(hash) if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Err(ConfigError::Owner { from })
            }
            _ => Ok(()),
        }
    }

    pub fn ready_slots(&self) -> usize {
        self.ready_slots.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores * 13).div_ceil(10)
        })
    }

    /// The most this node offers an order: the broker's terms must fit
    /// within it (and the node enforces the terms, not these).
    pub fn offer(&self) -> jusy_common::terms::OrderTerms {
        let secs = |s: u64| u32::try_from(s).unwrap_or(u32::MAX);
        jusy_common::terms::OrderTerms {
            cpu_budget_secs: secs(self.cpu_budget_secs),
            wall_secs: secs(self.wall_secs),
            memory_mib: secs(self.memory_mib),
            max_processes: self.max_processes,
            disk_mib: secs(self.disk_mib),
            // Holding a slot for a client costs the node only the slot: any
            // window within its wall limit is fine.
            connect_window_secs: secs(self.wall_secs),
            grace_secs: secs(self.grace_secs),
        }
    }

    pub fn sandbox_limits(&self) -> SandboxLimits {
        SandboxLimits {
            cgroup: CgroupLimits {
                memory: self.memory_mib.saturating_mul(1 << 20),
                pids: self.max_processes,
            },
            disk: self.disk_mib.saturating_mul(1 << 20),
        }
    }

    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            v4: self.session_net_v4,
            v6: self.session_net_v6,
            policy: Policy {
                allow_private: self.net_allow_private,
                allow: self.net_allow.clone(),
            },
        }
    }

    pub fn sftp_server(&self) -> PathBuf {
        self.sftp_server.clone().unwrap_or_else(|| {
            [
                "/usr/lib/openssh/sftp-server",
                "/usr/libexec/openssh/sftp-server",
                "/usr/lib/ssh/sftp-server",
                "/usr/libexec/sftp-server",
            ]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/usr/lib/openssh/sftp-server"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let cfg = Config::load(&path).expect("deploy/node.example.toml must load");
        assert_eq!(cfg.grace_secs, 5);
        assert_eq!(cfg.login_grace_secs, 10);
        assert!(!cfg.broker.is_empty());
        assert_eq!(cfg.sandbox_limits().cgroup.pids, 50);
        assert_eq!(cfg.net_allow.len(), 0);
    }

    #[test]
    fn defaults_are_the_services_terms() {
        let cfg: Config = toml::from_str("broker = \"relay:7443\"").expect("minimal config");
        assert_eq!(cfg.grace_secs, 5);
        assert_eq!(cfg.cpu_budget_secs, 3600);
        assert_eq!(cfg.wall_secs, 3 * 3600);
        assert_eq!(cfg.memory_mib, 2048);
        assert_eq!(cfg.max_processes, 50);
        assert_eq!(cfg.disk_mib, 5120);
        assert_eq!(cfg.disk_reserve_mib, 1024);
        assert!(!cfg.net_allow_private);
        assert_eq!(cfg.quic_max_mtu, 6500);
        assert_eq!(cfg.session_net_v4.to_string(), "172.30.0.0/16");
        assert_eq!(cfg.session_net_v6.to_string(), "fd6a:7573:7900::/48");
    }

    #[test]
    fn quic_mtu_outside_its_range_is_refused() {
        for (mtu, ok) in [(1199, false), (1200, true), (6500, true), (9000, false)] {
            let cfg: Config = toml::from_str(&format!("quic_max_mtu = {mtu}")).expect("parses");
            assert_eq!(cfg.validate().is_ok(), ok, "{mtu}");
        }
    }

    #[test]
    fn owner_comes_from_a_file_the_environment_or_the_config() {
        let hash = |c: char| c.to_string().repeat(64);
        let dir = std::env::temp_dir().join(format!("jusy-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("owner");
        std::fs::write(&file, format!("{}\n", hash('a'))).expect("owner file");
        let mut cfg: Config = toml::from_str(&format!("owner = \"{}\"", hash('c'))).expect("toml");
        cfg.take_owner(None, None).expect("config's own");
        assert_eq!(cfg.owner, Some(hash('c')));
        cfg.take_owner(None, Some(hash('b').into())).expect("env");
        assert_eq!(cfg.owner, Some(hash('b')));
        cfg.take_owner(Some(&file), Some(hash('b').into()))
            .expect("file");
        assert_eq!(cfg.owner, Some(hash('a')), "the file wins, trimmed");
        let err = cfg.take_owner(None, Some("not-a-hash".into()));
        assert!(matches!(err, Err(ConfigError::Owner { from }) if from == OWNER_ENV));
        let mut none = Config::default();
        none.take_owner(None, None).expect("no owner is allowed");
        assert_eq!(none.owner, None);
        assert!(none.take_owner(Some(&dir.join("missing")), None).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<Config>("brokr = \"x\"").is_err());
    }

    #[test]
    fn network_exemptions_are_parsed_addresses() {
        let cfg: Result<Config, _> = toml::from_str("net_allow = [\"127.0.0.2/32\", \"fd00::/8\"]");
        assert_eq!(cfg.map(|c| c.net_allow.len()).ok(), Some(2));
        assert!(toml::from_str::<Config>("net_allow = [\"10.0.0.0/8 accept\"]").is_err());
    }
}
