//! Signed releases of the node: the operator signs each binary with their
//! release key (ed25519), and a node installs a binary only when the
//! signature verifies against the key pinned in its configuration.
//!
//! What is signed is [`DOMAIN`] followed by the binary's SHA-256, so that a
//! release signature can never be mistaken for any other signature the same
//! key might make. A signature file holds the 64-byte signature as 128 hex
//! characters (and optional whitespace).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// What precedes the binary's digest in the signed message.
pub const DOMAIN: &[u8] = b"jusy-node release v1\0";

/// Why a release is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("the signature file is not 128 hex characters")]
    BadSignature,
    #[error("the release key is not 64 hex characters of an ed25519 key")]
    BadKey,
    #[error("the signature does not verify with the pinned release key: not installed")]
    Mismatch,
}

/// The message a release signature signs.
pub fn message(binary: &[u8]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&Sha256::digest(binary));
    m
}

/// Signs `binary` (the operator's side): the signature file's text.
pub fn sign(key: &SigningKey, binary: &[u8]) -> String {
    hex::encode(key.sign(&message(binary)).to_bytes())
}

/// The release key from its hex text.
pub fn parse_key(text: &str) -> Result<VerifyingKey, ReleaseError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| ReleaseError::BadKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| ReleaseError::BadKey)
}

/// Checks `signature` (a signature file's text) on `binary` with `key`.
pub fn verify(key: &VerifyingKey, binary: &[u8], signature: &str) -> Result<(), ReleaseError> {
    let text: String = signature.split_whitespace().collect();
    let mut bytes = [0u8; 64];
    hex::decode_to_slice(&text, &mut bytes).map_err(|_| ReleaseError::BadSignature)?;
    key.verify_strict(&message(binary), &Signature::from_bytes(&bytes))
        .map_err(|_| ReleaseError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pinned_key_and_the_signed_binary_verify() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let binary = b"\x7fELF a node";
        let sig = sign(&key, binary);
        let pinned = parse_key(&hex::encode(key.verifying_key().to_bytes())).unwrap();
        assert_eq!(verify(&pinned, binary, &format!("{sig}\n")), Ok(()));
        assert_eq!(
            verify(&pinned, binary, &sign(&other, binary)),
            Err(ReleaseError::Mismatch)
        );
        assert_eq!(
            verify(&pinned, b"\x7fELF another", &sig),
            Err(ReleaseError::Mismatch)
        );
        assert_eq!(
            verify(&pinned, binary, "zz"),
            Err(ReleaseError::BadSignature)
        );
        assert_eq!(parse_key("00"), Err(ReleaseError::BadKey));
        // The bare digest, signed without the domain, is not a release.
        let bare = hex::encode(key.sign(&Sha256::digest(binary)).to_bytes());
        assert_eq!(verify(&pinned, binary, &bare), Err(ReleaseError::Mismatch));
    }
}
