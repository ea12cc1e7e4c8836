//! The node's configuration: a TOML file, overridden by command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything a node needs to run. Every field has a default except the broker.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Relay broker QUIC address, `host:port`. Required.
    pub broker: String,
    /// The relay broker's public key (64 hex characters), pinned in the handshake. Required.
    pub broker_key: String,
    /// The owner hash whose account earns for this node's sessions. Default: none
    /// (the node works but earns nothing).
    pub owner: Option<String>,
    /// Where the node keeps its keys and session homes. Default `/var/lib/jusy-node`.
    pub data_dir: PathBuf,
    /// Sessions kept ready ahead of orders. Default ⌈1.3 × cores⌉.
    pub ready_slots: Option<usize>,
    /// Seconds a session survives after its last connection closes. Default 5.
    pub grace_secs: u64,
    /// Wall-clock limit of a session in seconds from its first connection. Default 10800 (3 h).
    pub wall_secs: u64,
    /// OpenSSH `sftp-server` to run for the sftp subsystem. Default: the first that
    /// exists of the usual Debian, Fedora and Arch paths.
    pub sftp_server: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            broker: String::new(),
            broker_key: String::new(),
            owner: None,
            data_dir: PathBuf::from("/var/lib/jusy-node"),
            ready_slots: None,
            grace_secs: 5,
            wall_secs: 3 * 3600,
            sftp_server: None,
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
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn ready_slots(&self) -> usize {
        self.ready_slots.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores * 13).div_ceil(10)
        })
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
        assert!(!cfg.broker.is_empty());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<Config>("brokr = \"x\"").is_err());
    }
}
