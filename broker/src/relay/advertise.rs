//! Advertising attached nodes to the other brokers: the terms a relay asks
//! its nodes to sign, the check of what they sign, and the updates handed to
//! the mesh (published while a node is attached, withdrawn when it leaves).

use std::time::Duration;

use jusy_common::capacity::{SignedCapacity, Terms};
use jusy_common::identity::PeerId;
use jusy_common::ledger::AccountId;
use tokio::sync::mpsc;

/// What the mesh is told about this relay's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapacityUpdate {
    /// A fresh statement of an attached node.
    Published(SignedCapacity),
    /// The node left this relay.
    Withdrawn(PeerId),
}

/// How a relay advertises its nodes; without it (a broker alone) nodes are
/// never asked to sign anything.
#[derive(Debug, Clone)]
pub struct Advertise {
    /// This relay's identity.
    pub relay: PeerId,
    /// The host clients are told to connect to.
    pub host: String,
    /// The relay's QUIC port for nodes.
    pub port: u16,
    /// Time between statements of one node.
    pub every: Duration,
    /// How long one statement stays valid; a node that vanishes is no longer
    /// offered by other brokers after this.
    pub validity: Duration,
    pub updates: mpsc::UnboundedSender<CapacityUpdate>,
}

/// A statement a node sent that does not fit what it was asked to sign.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatementError {
    #[error(transparent)]
    Capacity(#[from] jusy_common::capacity::CapacityError),
    #[error("statement signed by another node")]
    OtherNode,
    #[error("statement not on the terms the relay proposed")]
    OtherTerms,
    #[error("statement without a request")]
    Unasked,
}

impl Advertise {
    /// The terms for one node's next statement.
    pub fn terms(&self, owner: Option<AccountId>, speed: Option<Duration>, now_ms: u64) -> Terms {
        let validity = u64::try_from(self.validity.as_millis()).unwrap_or(u64::MAX);
        Terms {
            relay: self.relay,
            relay_host: self.host.clone(),
            relay_port: self.port,
            owner,
            speed_ms: speed.map_or(u32::MAX, |s| {
                u32::try_from(s.as_millis()).unwrap_or(u32::MAX)
            }),
            issued_ms: now_ms,
            expires_ms: now_ms.saturating_add(validity),
        }
    }
}

/// Checks a node's answer to [`jusy_common::wire::BrokerMsg::SignCapacity`].
pub fn check(
    node_id: PeerId,
    asked: Option<&Terms>,
    bytes: &[u8],
) -> Result<SignedCapacity, StatementError> {
    let asked = asked.ok_or(StatementError::Unasked)?;
    let signed = SignedCapacity::decode(bytes)?;
    if signed.capacity().node_id != node_id {
        return Err(StatementError::OtherNode);
    }
    if &signed.capacity().terms != asked {
        return Err(StatementError::OtherTerms);
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use jusy_common::capacity::Capacity;

    fn advertise() -> Advertise {
        Advertise {
            relay: PeerId::from_signing_key(&SigningKey::from_bytes(&[1; 32])),
            host: "relay.example".into(),
            port: 7443,
            every: Duration::from_secs(5),
            validity: Duration::from_secs(20),
            updates: mpsc::unbounded_channel().0,
        }
    }

    #[test]
    fn only_the_asked_terms_by_the_node_itself_pass() {
        let node = SigningKey::from_bytes(&[2; 32]);
        let node_id = PeerId::from_signing_key(&node);
        let terms = advertise().terms(None, Some(Duration::from_millis(900)), 1_000);
        assert_eq!(terms.expires_ms, 21_000);
        assert_eq!(terms.speed_ms, 900);
        let capacity = Capacity {
            node_id,
            free_slots: 1,
            cores: 2,
            terms: terms.clone(),
        };
        let signed = SignedCapacity::sign(&node, capacity.clone()).expect("sign");
        assert_eq!(
            check(node_id, Some(&terms), signed.bytes()),
            Ok(signed.clone())
        );
        assert_eq!(
            check(node_id, None, signed.bytes()),
            Err(StatementError::Unasked)
        );
        let other = PeerId::from_signing_key(&SigningKey::from_bytes(&[3; 32]));
        assert_eq!(
            check(other, Some(&terms), signed.bytes()),
            Err(StatementError::OtherNode)
        );
        let mut moved = terms.clone();
        moved.relay_host = "elsewhere".into();
        assert_eq!(
            check(node_id, Some(&moved), signed.bytes()),
            Err(StatementError::OtherTerms)
        );
    }
}
