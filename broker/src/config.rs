//! The broker's configuration: a TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything a broker needs to run; every field has a default.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
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
    /// Seconds a client has to make its first connection to an order. Default 120.
    pub connect_window_secs: u32,
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
            connect_window_secs: 120,
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
        match self.order_ports {
            Some((lo, hi)) if lo > hi || lo == 0 => Err(ConfigError::EmptyRange(lo, hi)),
            _ => Ok(()),
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
    }

    #[test]
    fn empty_port_range_is_rejected() {
        let cfg = Config {
            order_ports: Some((10, 5)),
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
    }
}
