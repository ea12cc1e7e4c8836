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
    /// Rounds of the node speed test; 0 turns the test off. Default
    /// `jusy_common::speed::ROUNDS` (about one second on the reference core).
    pub speed_test_rounds: u32,
    /// Longest a node may take to answer the speed test, in milliseconds,
    /// measured by the broker (round trip included). Default 2000.
    pub speed_test_limit_ms: u64,
    /// Seconds between speed tests of an attached node. Default 21600 (6 h).
    pub speed_test_interval_secs: u64,
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
            price_sat: 20_000,
            owner_share_ppm: 800_000,
            operator_token: None,
            rate_limit_per_sec: 10,
            rate_limit_burst: 30,
            speed_test_rounds: jusy_common::speed::ROUNDS,
            speed_test_limit_ms: 2_000,
            speed_test_interval_secs: 6 * 3600,
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
        Ok(())
    }

    pub fn speed_test(&self) -> crate::relay::SpeedTest {
        crate::relay::SpeedTest {
            rounds: self.speed_test_rounds,
            limit: std::time::Duration::from_millis(self.speed_test_limit_ms),
            interval: std::time::Duration::from_secs(self.speed_test_interval_secs.max(1)),
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
