//! The broker's durable state in sled: its identity key, client and owner
//! accounts, and the trees the ledger keeps money and orders in.
//!
//! Secret hashes (client and owner hashes) are never stored: accounts are keyed
//! by an HMAC-SHA256 digest of the hash under a key kept in its own file
//! (`digest.key`) beside the database, so a copied database yields no usable
//! hash and cannot even be searched for one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use hmac::{KeyInit, Mac};
use jusy_common::ledger::AccountId;
use serde::{Deserialize, Serialize};

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
    #[error("digest key {path}: {source}")]
    DigestKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("repairing the data directory's permissions: {0}")]
    Repair(#[from] jusy_node::state::RepairError),
}

/// Which kind of account a secret hash opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Owner,
}

/// A client or node-owner account.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountRecord {
    /// The client's own OpenSSH public keys, accepted besides each order's key.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    pub created_ms: u64,
}

/// The database.
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) db: sled::Db,
    digest_key: [u8; 32],
    clients: sled::Tree,
    owners: sled::Tree,
}

/// Secret hashes are 64 hex characters (256 random bits).
pub fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(b)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], StoreError> {
    let err = |source| StoreError::DigestKey {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => bytes
            .try_into()
            .map_err(|_| err(std::io::Error::other("not 32 bytes"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = random::<32>()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(err)?;
            f.write_all(&key).map_err(err)?;
            f.sync_all().map_err(err)?;
            Ok(key)
        }
        Err(e) => Err(err(e)),
    }
}

/// How long opening waits for a database this process just closed: sled's
/// flusher thread lets go of the file lock shortly after the last handle is
/// dropped, not at once.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens the sled database at `path`, waiting up to [`LOCK_WAIT`] while its
/// file lock is still held; a lock another running process holds still
/// fails, after that wait.
fn open_db(path: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::open(path) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`. Everything in `dir` is the
    /// broker's alone: directories 0700, files 0600, repaired when found
    /// looser (the process's umask keeps what sled creates so).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        jusy_node::state::repair_logged(jusy_node::state::Tree {
            root: dir,
            traverse: &[],
            opaque: &[],
        })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(jusy_node::state::DIR)
            .create(dir)
            .map_err(|source| StoreError::DataDir {
                path: dir.to_owned(),
                source,
            })?;
        let digest_key = load_or_create_key(&dir.join("digest.key"))?;
        let path = dir.join("db");
        let db = open_db(&path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            clients: db.open_tree("clients")?,
            owners: db.open_tree("owners")?,
            digest_key,
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

    /// The account id a secret hash opens (whether or not the account exists).
    /// `None` for text that is not a hash.
    pub fn account_id(&self, hash: &str) -> Option<AccountId> {
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hash, &mut secret).ok()?;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.digest_key).ok()?;
        mac.update(&secret);
        Some(AccountId(mac.finalize().into_bytes().into()))
    }

    fn tree(&self, role: Role) -> &sled::Tree {
        match role {
            Role::Client => &self.clients,
            Role::Owner => &self.owners,
        }
    }

    /// Creates an account; returns its secret hash (shown once, never stored)
    /// and its id.
    pub fn add_account(&self, role: Role) -> Result<(String, AccountId), StoreError> {
        let hash = hex::encode(random::<32>()?);
        let id = self
            .account_id(&hash)
            .ok_or_else(|| StoreError::Random("digest of a fresh hash failed".into()))?;
        let record = AccountRecord {
            ssh_keys: Vec::new(),
            created_ms: now_ms(),
        };
        self.tree(role).insert(id.0, serde_json::to_vec(&record)?)?;
        self.tree(role).flush()?;
        Ok((hash, id))
    }

    /// The account a secret hash opens, if there is one. The lookup is by a
    /// keyed digest, so no comparison of secrets happens in this process.
    pub fn account(
        &self,
        role: Role,
        hash: &str,
    ) -> Result<Option<(AccountId, AccountRecord)>, StoreError> {
        let Some(id) = self.account_id(hash).filter(|_| valid_hash(hash)) else {
            return Ok(None);
        };
        Ok(self.account_by_id(role, &id)?.map(|r| (id, r)))
    }

    pub fn account_by_id(
        &self,
        role: Role,
        id: &AccountId,
    ) -> Result<Option<AccountRecord>, StoreError> {
        match self.tree(role).get(id.0)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Replaces a client's own SSH keys; false if there is no such client.
    pub fn set_client_keys(&self, id: &AccountId, keys: Vec<String>) -> Result<bool, StoreError> {
        let Some(mut record) = self.account_by_id(Role::Client, id)? else {
            return Ok(false);
        };
        record.ssh_keys = keys;
        self.clients.insert(id.0, serde_json::to_vec(&record)?)?;
        self.clients.flush()?;
        Ok(true)
    }

    /// Brokers the operator let into the mesh while brokers ran (mesh peer
    /// ids as text), kept across restarts next to the configured ones.
    pub fn admitted_brokers(&self) -> Result<Vec<String>, StoreError> {
        let tree = self.db.open_tree("mesh_trust")?;
        let mut peers = Vec::new();
        for key in tree.iter().keys() {
            peers.push(String::from_utf8_lossy(&key?).into_owned());
        }
        Ok(peers)
    }

    /// Records brokers let into the mesh (flushed before it returns).
    pub fn admit_brokers(&self, peers: &[String]) -> Result<(), StoreError> {
        let tree = self.db.open_tree("mesh_trust")?;
        for peer in peers {
            tree.insert(peer.as_bytes(), &[])?;
        }
        tree.flush()?;
        Ok(())
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("jusy-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn accounts_and_identity_survive_reopen() {
        let dir = tmp("reopen");
        let (hash, id, key) = {
            let s = Store::open(&dir).expect("open");
            let (hash, id) = s.add_account(Role::Client).expect("add");
            (hash, id, s.identity().expect("id"))
        };
        let s = Store::open(&dir).expect("reopen");
        assert_eq!(s.identity().expect("id").to_bytes(), key.to_bytes());
        assert_eq!(
            s.account(Role::Client, &hash).expect("get").map(|a| a.0),
            Some(id)
        );
        assert_eq!(
            s.account(Role::Owner, &hash).expect("get"),
            None,
            "roles are apart"
        );
        assert_eq!(s.account(Role::Client, &"0".repeat(64)).expect("get"), None);
        assert_eq!(s.account(Role::Client, "not-a-hash").expect("get"), None);
        drop(s);
        // The database holds neither the hash nor its plain digest.
        let mut raw = Vec::new();
        for entry in std::fs::read_dir(dir.join("db")).expect("db dir") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                raw.extend(std::fs::read(path).expect("read"));
            }
        }
        let secret = hex::decode(&hash).expect("hex");
        assert!(
            !raw.windows(32).any(|w| w == secret.as_slice()),
            "hash stored in clear"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
