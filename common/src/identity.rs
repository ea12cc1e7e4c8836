//! Ed25519 identities of nodes and brokers, and their hex text form.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Why a text or byte string is not a public key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a public key is 64 hex characters (32 bytes), got {len} characters")]
    Length { len: usize },
    #[error("public key is not hex: {0}")]
    Hex(#[from] hex::FromHexError),
    #[error("bytes are not a valid ed25519 public key")]
    Invalid,
}

/// The public half of a node's or broker's identity: who it is on the network.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId(#[serde(with = "hex_bytes")] pub [u8; 32]);

impl PeerId {
    pub fn from_signing_key(key: &SigningKey) -> Self {
        Self(key.verifying_key().to_bytes())
    }

    /// The key to check signatures with; fails only for bytes that are not a curve point.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::Invalid)
    }

    /// First 8 hex characters, for logs.
    pub fn short(&self) -> String {
        hex::encode(self.0.get(..4).unwrap_or_default())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(KeyError::Length { len: s.len() });
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)?;
        let id = PeerId(out);
        id.verifying_key()?;
        Ok(id)
    }
}

/// Parses a 32-byte secret key seed and returns the signing key.
pub fn signing_key_from_seed(seed: &[u8]) -> Option<SigningKey> {
    let bytes: [u8; 32] = seed.try_into().ok()?;
    Some(SigningKey::from_bytes(&bytes))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(bytes))
        } else {
            serde::Serialize::serialize(bytes, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
            Ok(out)
        } else {
            <[u8; 32]>::deserialize(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let id = PeerId::from_signing_key(&key);
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<PeerId>().ok(), Some(id));
    }

    #[test]
    fn bad_text_is_an_error() {
        assert!(matches!(
            "abc".parse::<PeerId>(),
            Err(KeyError::Length { len: 3 })
        ));
        assert!(matches!(
            "zz".repeat(32).parse::<PeerId>(),
            Err(KeyError::Hex(_))
        ));
    }
}
