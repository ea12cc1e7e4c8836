//! The broker's durable state in sled: its identity key, client accounts and
//! order records. Client hashes are stored only as SHA-256 digests, so a copied
//! database yields no usable hash.

use std::path::Path;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {source} (is another broker running on it?)")]
    Open { path: String, source: sled::Error },
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// A client account.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Client {
    /// The client's own OpenSSH public keys, accepted besides each order's key.
    pub ssh_keys: Vec<String>,
}

/// What the broker remembers of an order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderRecord {
    pub client: String,
    pub node_id: String,
    pub username: String,
    pub port: u16,
    /// `RUNNING`, or the end reason code.
    pub state: String,
}

/// The database.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    clients: sled::Tree,
    orders: sled::Tree,
}

/// Client hashes are 64 hex characters (256 random bits).
pub fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

fn digest(hash: &str) -> [u8; 32] {
    Sha256::digest(hash.to_ascii_lowercase().as_bytes()).into()
}

fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(b)
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("db");
        let db = sled::open(&path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            clients: db.open_tree("clients")?,
            orders: db.open_tree("orders")?,
            db,
        })
    }

    /// The broker's ed25519 identity, created on first use.
    pub fn identity(&self) -> Result<SigningKey, StoreError> {
        let meta = self.db.open_tree("meta")?;
        if let Some(seed) = meta.get("identity")?
            && let Some(key) = jusy_common::identity::signing_key_from_seed(&seed)
        {
            return Ok(key);
        }
        let seed: [u8; 32] = random()?;
        meta.insert("identity", &seed[..])?;
        meta.flush()?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// Creates a client account; returns its hash (shown once, never stored).
    pub fn add_client(&self) -> Result<String, StoreError> {
        let hash = hex::encode(random::<32>()?);
        self.clients
            .insert(digest(&hash), serde_json::to_vec(&Client::default())?)?;
        self.clients.flush()?;
        Ok(hash)
    }

    pub fn client(&self, hash: &str) -> Result<Option<Client>, StoreError> {
        if !valid_hash(hash) {
            return Ok(None);
        }
        match self.clients.get(digest(hash))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Replaces a client's own SSH keys; false if there is no such client.
    pub fn set_client_keys(&self, hash: &str, keys: Vec<String>) -> Result<bool, StoreError> {
        let Some(mut client) = self.client(hash)? else {
            return Ok(false);
        };
        client.ssh_keys = keys;
        self.clients
            .insert(digest(hash), serde_json::to_vec(&client)?)?;
        self.clients.flush()?;
        Ok(true)
    }

    /// Stores an order record durably before its credentials are handed out.
    pub fn put_order(&self, id: &str, rec: &OrderRecord) -> Result<(), StoreError> {
        self.orders.insert(id, serde_json::to_vec(rec)?)?;
        self.orders.flush()?;
        Ok(())
    }

    pub fn order(&self, id: &str) -> Result<Option<OrderRecord>, StoreError> {
        match self.orders.get(id)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn client_digest(hash: &str) -> String {
        hex::encode(digest(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("jusy-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn clients_and_identity_survive_reopen() {
        let dir = tmp("reopen");
        let (hash, id) = {
            let s = Store::open(&dir).expect("open");
            (s.add_client().expect("add"), s.identity().expect("id"))
        };
        let s = Store::open(&dir).expect("reopen");
        assert_eq!(s.identity().expect("id").to_bytes(), id.to_bytes());
        assert_eq!(s.client(&hash).expect("get"), Some(Client::default()));
        assert_eq!(s.client(&"0".repeat(64)).expect("get"), None);
        assert_eq!(s.client("not-a-hash").expect("get"), None);
        let raw: Vec<_> = s.clients.iter().keys().filter_map(Result::ok).collect();
        assert!(
            raw.iter().all(|k| k.as_ref() != hash.as_bytes()),
            "hash stored in clear"
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
