//! Bounds on the mesh's inbound connections, so that a stranger flooding
//! the mesh port holds a bounded share of the broker.
//!
//! Anyone may start a handshake; only brokers on the allowlist get a
//! connection (`allow_block_list` denies the rest once the peer is known).
//! Until then a connection is pending: pending inbound connections are
//! capped per address ([`PendingPerAddress`], an IPv6 /64 counts as one) and
//! in all ([`Pending`]), and established ones in all and per peer (libp2p's
//! `connection_limits`). A pending connection lives at most the QUIC
//! handshake timeout (the idle timeout, four keep-alive periods: 4 s).
//! Refusals are logged at most once a second ([`Refusals`]).
//!
//! What is not bounded here: libp2p's QUIC transport answers every first
//! packet with its half of the handshake before any behaviour is asked, so
//! each attempt costs a signature. A mesh port open to the internet is best
//! limited to the operator's brokers by a firewall as well.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};

use crate::limit::Key;

/// How many inbound connections may be setting up at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// From all addresses.
    pub all: u32,
    /// From one address.
    pub per_address: usize,
}

impl Pending {
    /// 256 in all, 8 from one address: brokers have addresses of their own
    /// and dial one another once, so a stranger needs 32 addresses to fill
    /// the table, for the 4 s a handshake may take.
    pub const PRODUCTION: Pending = Pending {
        all: 256,
        per_address: 8,
    };
}

/// Established inbound connections at most (every one from a trusted broker).
pub const MAX_ESTABLISHED_INCOMING: u32 = 512;

/// Established connections at most, both ways.
pub const MAX_ESTABLISHED: u32 = 1024;

/// Established connections to one broker at most (two brokers that dial
/// each other at once hold two).
pub const MAX_ESTABLISHED_PER_PEER: u32 = 4;

/// How often refused connections are logged at most.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// libp2p's connection limits with the bounds above and `pending`.
pub fn connection_limits(pending: Pending) -> connection_limits::Behaviour {
    connection_limits::Behaviour::new(
        ConnectionLimits::default()
            .with_max_pending_incoming(Some(pending.all))
            .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING))
            .with_max_established(Some(MAX_ESTABLISHED))
            .with_max_established_per_peer(Some(MAX_ESTABLISHED_PER_PEER)),
    )
}

/// Too many pending connections from one address.
#[derive(Debug, thiserror::Error)]
#[error("at most {max} connections from one address may be setting up at once")]
pub struct AddressFull {
    pub max: usize,
}

/// Caps inbound connections whose handshake is under way per address.
#[derive(Debug)]
pub struct PendingPerAddress {
    max: usize,
    pending: HashMap<ConnectionId, Key>,
    per_address: HashMap<Key, usize>,
}

impl PendingPerAddress {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            pending: HashMap::new(),
            per_address: HashMap::new(),
        }
    }

    /// The connection is established or failed: it is pending no more.
    fn settle(&mut self, id: ConnectionId) {
        let Some(addr) = self.pending.remove(&id) else {
            return;
        };
        if let Some(n) = self.per_address.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&addr);
            }
        }
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl NetworkBehaviour for PendingPerAddress {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        // QUIC over IP: every inbound connection has an address.
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        let addr = Key::addr(ip);
        let here = self.per_address.entry(addr).or_default();
        if *here >= self.max {
            return Err(ConnectionDenied::new(AddressFull { max: self.max }));
        }
        *here += 1;
        self.pending.insert(id, addr);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _peer: libp2p::PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.settle(id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        _peer: libp2p::PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ListenFailure(f) = event {
            self.settle(f.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: libp2p::PeerId,
        _id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// Refused inbound connections, logged at most once per [`LOG_EVERY`] with
/// how many there were since.
#[derive(Debug, Default)]
pub struct Refusals {
    logged: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    pub fn note(&mut self, error: &dyn std::error::Error, from: &Multiaddr) {
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        // libp2p's errors say "denied" and keep the why in their sources.
        let mut why = error.to_string();
        let mut source = error.source();
        while let Some(e) = source {
            why = format!("{why}: {e}");
            source = e.source();
        }
        tracing::info!(error = %why, %from, more = self.unlogged, "mesh connection refused");
        self.logged = Some(now);
        self.unlogged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn pending_connections_are_capped_per_address_until_they_settle() {
        let mut p = PendingPerAddress::new(2);
        let local = addr("/ip4/127.0.0.1/udp/7444/quic-v1");
        let stranger = addr("/ip4/192.0.2.1/udp/5000/quic-v1");
        let a = ConnectionId::new_unchecked(1);
        let b = ConnectionId::new_unchecked(2);
        let c = ConnectionId::new_unchecked(3);
        assert!(
            p.handle_pending_inbound_connection(a, &local, &stranger)
                .is_ok()
        );
        assert!(
            p.handle_pending_inbound_connection(b, &local, &stranger)
                .is_ok()
        );
        assert!(
            p.handle_pending_inbound_connection(c, &local, &stranger)
                .is_err()
        );
        // Another address has its own share; a /64 is one address.
        let v6 = addr("/ip6/2001:db8::1/udp/5000/quic-v1");
        let v6_too = addr("/ip6/2001:db8::2/udp/5000/quic-v1");
        let d = ConnectionId::new_unchecked(4);
        let e = ConnectionId::new_unchecked(5);
        let f = ConnectionId::new_unchecked(6);
        assert!(p.handle_pending_inbound_connection(d, &local, &v6).is_ok());
        assert!(
            p.handle_pending_inbound_connection(e, &local, &v6_too)
                .is_ok()
        );
        assert!(p.handle_pending_inbound_connection(f, &local, &v6).is_err());
        // Established or failed, a connection gives its place back.
        let peer = libp2p::identity::Keypair::ed25519_from_bytes([1; 32])
            .unwrap()
            .public()
            .to_peer_id();
        assert!(
            p.handle_established_inbound_connection(a, peer, &local, &stranger)
                .is_ok()
        );
        assert!(
            p.handle_pending_inbound_connection(c, &local, &stranger)
                .is_ok()
        );
        p.settle(b);
        p.settle(b);
        p.settle(c);
        assert!(
            !p.per_address
                .contains_key(&Key::addr("192.0.2.1".parse().unwrap()))
        );
        assert_eq!(p.pending.len(), 2);
    }
}
