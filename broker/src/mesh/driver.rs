//! The task that owns the libp2p swarm: it applies the broker's commands
//! (publish, look up, ask another broker), checks everything other brokers
//! try to store before storing it, and hands their requests to the broker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use jusy_common::capacity::{self, SignedCapacity};
use jusy_common::identity::PeerId;
use libp2p::futures::StreamExt;
use libp2p::kad::{self, store::RecordStore};
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::protocol::{Behaviour, BehaviourEvent, MeshRequest, MeshResponse};
use super::{Inbound, MeshError, libp2p_id};
use crate::relay::CapacityUpdate;

/// What the broker asks of its swarm.
#[derive(Debug)]
pub(super) enum Command {
    Request {
        peer: libp2p::PeerId,
        request: MeshRequest,
        reply: oneshot::Sender<Result<MeshResponse, MeshError>>,
    },
    Respond {
        channel: ResponseChannel<MeshResponse>,
        response: MeshResponse,
    },
    Providers {
        shard: u8,
        reply: oneshot::Sender<Vec<libp2p::PeerId>>,
    },
    Record {
        node_id: PeerId,
        reply: oneshot::Sender<Option<SignedCapacity>>,
    },
    Dial {
        addr: Multiaddr,
    },
    /// Lets brokers in; answers with those not already trusted.
    Admit {
        peers: Vec<libp2p::PeerId>,
        reply: oneshot::Sender<Vec<libp2p::PeerId>>,
    },
    /// Every broker let in.
    Trusted {
        reply: oneshot::Sender<Vec<libp2p::PeerId>>,
    },
    /// Some brokers of the routing table (at most `max`).
    Peers {
        max: usize,
        reply: oneshot::Sender<Vec<libp2p::PeerId>>,
    },
    /// How many publications are queued or under way.
    Publishing {
        reply: oneshot::Sender<usize>,
    },
    /// Whether this broker's own store holds a record for the node.
    Holds {
        node_id: PeerId,
        reply: oneshot::Sender<bool>,
    },
}

pub(super) struct Driver {
    pub swarm: Swarm<Behaviour>,
    pub commands: mpsc::UnboundedReceiver<Command>,
    /// For the tasks that wait for the broker's answer to an inbound request.
    pub respond: mpsc::UnboundedSender<Command>,
    pub capacity: mpsc::UnboundedReceiver<CapacityUpdate>,
    pub inbound: mpsc::UnboundedSender<Inbound>,
    pub requests: HashMap<OutboundRequestId, oneshot::Sender<Result<MeshResponse, MeshError>>>,
    pub providers: HashMap<
        kad::QueryId,
        (
            HashSet<libp2p::PeerId>,
            oneshot::Sender<Vec<libp2p::PeerId>>,
        ),
    >,
    pub records: HashMap<kad::QueryId, (PeerId, oneshot::Sender<Option<SignedCapacity>>)>,
    /// Nodes this relay advertises, and their shards.
    pub published: HashMap<PeerId, u8>,
    /// Brokers that could not be dialled, and when: left out of provider
    /// answers (their records outlive them) until they connect again or
    /// their provider records must have expired.
    pub down: HashMap<libp2p::PeerId, Instant>,
    /// When a lost broker was last dialled again (at most once per
    /// [`REDIAL_EVERY`], so a broker that refuses this one is not hammered).
    pub redials: HashMap<libp2p::PeerId, Instant>,
    /// Records waiting to be published, at most one per key (the newest).
    pub queued: VecDeque<kad::Record>,
    /// Publications under way, and what they publish: a burst of them over
    /// one connection would exceed the peers' inbound stream limit and be
    /// dropped.
    pub putting: HashMap<kad::QueryId, kad::Record>,
    /// How long a lost broker's provider records may still be found.
    pub provider_ttl: Duration,
    pub tasks: JoinSet<()>,
    /// Inbound connections refused, for the log.
    pub refusals: super::limits::Refusals,
}

/// How often a lost broker is dialled again at most.
const REDIAL_EVERY: Duration = Duration::from_secs(30);

/// Publications in flight at once.
const MAX_PUTS: usize = 2;

/// A record's deadline on the local monotonic clock.
fn instant_of(expires_ms: u64, now_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(expires_ms.saturating_sub(now_ms))
}

/// Checks a record another broker wants stored: a statement under its own
/// node's key, signed by that node, current, and published by the relay it
/// names.
fn valid_record(record: &kad::Record, source: &libp2p::PeerId, now_ms: u64) -> Option<Instant> {
    let node = capacity::node_of_key(record.key.as_ref())?;
    let signed = SignedCapacity::decode(&record.value).ok()?;
    signed.check_time(now_ms).ok()?;
    let c = signed.capacity();
    (c.node_id == node && libp2p_id(&c.terms.relay).ok()? == *source)
        .then(|| instant_of(c.terms.expires_ms, now_ms))
}

impl Driver {
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm(event),
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                Some(update) = self.capacity.recv() => self.on_capacity(update),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
        }
        self.tasks.shutdown().await;
    }

    fn kad(&mut self) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        &mut self.swarm.behaviour_mut().kad
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().rpc.send_request(&peer, request);
                self.requests.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                // The asker may have gone; it retries if it still cares.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, response);
            }
            Command::Providers { shard, reply } => {
                let id = self.kad().get_providers(capacity::shard_key(shard).into());
                self.providers.insert(id, (HashSet::new(), reply));
            }
            Command::Record { node_id, reply } => {
                let id = self.kad().get_record(capacity::node_key(&node_id).into());
                self.records.insert(id, (node_id, reply));
            }
            Command::Peers { max, reply } => {
                let mut peers: Vec<libp2p::PeerId> =
                    self.swarm.connected_peers().copied().collect();
                for bucket in self.kad().kbuckets() {
                    peers.extend(bucket.iter().map(|e| *e.node.key.preimage()));
                }
                peers.sort();
                peers.dedup();
                peers.truncate(max);
                let _ = reply.send(peers);
            }
            Command::Holds { node_id, reply } => {
                let key: kad::RecordKey = capacity::node_key(&node_id).into();
                let _ = reply.send(self.kad().store_mut().get(&key).is_some());
            }
            Command::Publishing { reply } => {
                let _ = reply.send(self.queued.len() + self.putting.len());
            }
            Command::Admit { peers, reply } => {
                let allow = &mut self.swarm.behaviour_mut().allow;
                let new: Vec<libp2p::PeerId> = peers
                    .into_iter()
                    .filter(|p| !allow.allowed_peers().contains(p))
                    .collect();
                for peer in &new {
                    allow.allow_peer(*peer);
                }
                let _ = reply.send(new);
            }
            Command::Trusted { reply } => {
                let mut peers: Vec<libp2p::PeerId> = self
                    .swarm
                    .behaviour()
                    .allow
                    .allowed_peers()
                    .iter()
                    .copied()
                    .collect();
                peers.sort();
                let _ = reply.send(peers);
            }
            Command::Dial { addr } => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, error = %e, "mesh dial failed");
                }
            }
        }
    }

    fn on_capacity(&mut self, update: CapacityUpdate) {
        match update {
            CapacityUpdate::Published(signed) => {
                let c = signed.capacity();
                let node_id = c.node_id;
                let shard = capacity::shard_of(&node_id);
                let record = kad::Record {
                    key: capacity::node_key(&node_id).into(),
                    value: signed.bytes().to_vec(),
                    publisher: None,
                    expires: Some(instant_of(c.terms.expires_ms, crate::store::now_ms())),
                };
                self.queued.retain(|r| r.key != record.key);
                self.queued.push_back(record);
                self.pump();
                let first_in_shard = !self.published.values().any(|s| *s == shard);
                self.published.insert(node_id, shard);
                if first_in_shard
                    && let Err(e) = self
                        .kad()
                        .start_providing(capacity::shard_key(shard).into())
                {
                    tracing::warn!(shard, error = %e, "cannot provide shard");
                }
            }
            CapacityUpdate::Withdrawn(node_id) => {
                let Some(shard) = self.published.remove(&node_id) else {
                    return;
                };
                let key: kad::RecordKey = capacity::node_key(&node_id).into();
                self.queued.retain(|r| r.key != key);
                self.kad().remove_record(&key);
                if !self.published.values().any(|s| *s == shard) {
                    self.kad()
                        .stop_providing(&capacity::shard_key(shard).into());
                }
            }
        }
    }

    /// Queues a publication that timed out again (a busy mesh times queries
    /// out), unless the statement has expired, its node is no
    /// longer advertised, or a newer statement for it is queued already.
    fn retry(&mut self, record: kad::Record) {
        let current = record.expires.is_some_and(|e| e > Instant::now())
            && capacity::node_of_key(record.key.as_ref())
                .is_some_and(|node| self.published.contains_key(&node));
        if current && !self.queued.iter().any(|r| r.key == record.key) {
            self.queued.push_back(record);
        }
    }

    /// Starts queued publications while fewer than [`MAX_PUTS`] run.
    fn pump(&mut self) {
        while self.putting.len() < MAX_PUTS {
            let Some(record) = self.queued.pop_front() else {
                return;
            };
            match self.kad().put_record(record.clone(), kad::Quorum::One) {
                Ok(id) => {
                    self.putting.insert(id, record);
                }
                Err(e) => tracing::warn!(error = %e, "capacity record not stored"),
            }
        }
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(e)) => self.on_rpc(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(
                libp2p::identify::Event::Received { peer_id, info, .. },
            )) => {
                for addr in info.listen_addrs {
                    self.kad().add_address(&peer_id, addr);
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                self.down.remove(&peer_id);
                tracing::info!(peer = %peer_id, "mesh peer connected");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                tracing::info!(peer = %peer_id, cause = ?cause, "mesh peer disconnected");
                if cause.is_some() {
                    // Lost rather than idle: its provider records outlive it,
                    // so leave it out until a dial shows it is back.
                    self.down.insert(peer_id, Instant::now());
                    self.redials.retain(|_, at| at.elapsed() < REDIAL_EVERY);
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        self.redials.entry(peer_id)
                    {
                        e.insert(Instant::now());
                        if let Err(e) = self.swarm.dial(peer_id) {
                            tracing::debug!(peer = %peer_id, error = %e, "mesh redial not started");
                        }
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => self.refusals.note(&error, &send_back_addr),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                // Unreachable now: left out of provider answers, and out of
                // the routing table so lookups stop waiting on it; it comes
                // back when it connects again.
                if let Some(peer) = peer_id {
                    self.down.insert(peer, Instant::now());
                    self.kad().remove_peer(&peer);
                }
                tracing::info!(peer = ?peer_id, error = %error, "mesh dial failed");
            }
            _ => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => match valid_record(&record, &source, crate::store::now_ms()) {
                Some(expires) => {
                    let record = kad::Record {
                        expires: Some(record.expires.map_or(expires, |e| e.min(expires))),
                        ..record
                    };
                    if let Err(e) = self.kad().store_mut().put(record) {
                        tracing::warn!(error = %e, "capacity record not stored");
                    }
                }
                None => tracing::warn!(peer = %source, "invalid capacity record refused"),
            },
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } => {
                let is_shard = (0..capacity::SHARDS)
                    .any(|s| record.key.as_ref() == capacity::shard_key(s).as_slice());
                if is_shard {
                    if let Err(e) = self.kad().store_mut().add_provider(record) {
                        tracing::warn!(error = %e, "provider record not stored");
                    }
                } else {
                    tracing::warn!(peer = %record.provider, "provider record for a foreign key refused");
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => self.on_query(id, result, step.last),
            _ => {}
        }
    }

    fn on_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        match result {
            kad::QueryResult::GetProviders(found) => {
                let Some((mut seen, reply)) = self.providers.remove(&id) else {
                    return;
                };
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = found {
                    seen.extend(providers);
                }
                self.down
                    .retain(|_, since| since.elapsed() < self.provider_ttl);
                seen.retain(|p| !self.down.contains_key(p));
                // Some capacity is enough: the first answer that names a live
                // provider ends the lookup (the local store's, often).
                if last || !seen.is_empty() {
                    if let Some(mut q) = self.kad().query_mut(&id) {
                        q.finish();
                    }
                    let _ = reply.send(seen.into_iter().collect());
                } else {
                    self.providers.insert(id, (seen, reply));
                }
            }
            kad::QueryResult::GetRecord(found) => {
                let Some((node_id, reply)) = self.records.remove(&id) else {
                    return;
                };
                let now = crate::store::now_ms();
                let valid = match found {
                    Ok(kad::GetRecordOk::FoundRecord(r)) => SignedCapacity::decode(&r.record.value)
                        .ok()
                        .filter(|s| s.capacity().node_id == node_id && s.check_time(now).is_ok()),
                    _ => None,
                };
                match valid {
                    Some(s) => {
                        if let Some(mut q) = self.kad().query_mut(&id) {
                            q.finish();
                        }
                        let _ = reply.send(Some(s));
                    }
                    None if last => {
                        let _ = reply.send(None);
                    }
                    None => {
                        self.records.insert(id, (node_id, reply));
                    }
                }
            }
            kad::QueryResult::PutRecord(result) => {
                if !last {
                    return;
                }
                let Some(record) = self.putting.remove(&id) else {
                    return;
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "capacity record reached no other broker");
                    // A query that timed out took its time; one that found no
                    // broker to store at fails at once and waits for the
                    // relay's next refresh instead of spinning here.
                    if matches!(e, kad::PutRecordError::Timeout { .. }) {
                        self.retry(record);
                    }
                }
                self.pump();
            }
            _ => {}
        }
    }

    fn on_rpc(&mut self, event: request_response::Event<MeshRequest, MeshResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let (reply, answer) = oneshot::channel();
                let inbound = Inbound {
                    from: peer,
                    request,
                    reply,
                };
                if self.inbound.send(inbound).is_err() {
                    let response = MeshResponse::Refused("broker stopping".into());
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rpc
                        .send_response(channel, response);
                    return;
                }
                let respond = self.respond.clone();
                self.tasks.spawn(async move {
                    let response = answer
                        .await
                        .unwrap_or_else(|_| MeshResponse::Refused("no answer".into()));
                    let _ = respond.send(Command::Respond { channel, response });
                });
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.requests.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.requests.remove(&request_id) {
                    let _ = reply.send(Err(MeshError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use jusy_common::capacity::{Capacity, Terms};

    fn record(node: u8, relay: PeerId, now: u64) -> kad::Record {
        let capacity = Capacity {
            node_id: PeerId([0; 32]),
            free_slots: 1,
            cores: 1,
            terms: Terms {
                relay,
                relay_host: "h".into(),
                relay_port: 1,
                owner: None,
                speed_ms: 1,
                issued_ms: now,
                expires_ms: now + 10_000,
            },
        };
        let signed =
            SignedCapacity::sign(&SigningKey::from_bytes(&[node; 32]), capacity).expect("sign");
        kad::Record::new(
            capacity::node_key(&signed.capacity().node_id),
            signed.bytes().to_vec(),
        )
    }

    #[test]
    fn only_a_statements_own_relay_may_store_it() {
        let relay = PeerId::from_signing_key(&SigningKey::from_bytes(&[1; 32]));
        let other = PeerId::from_signing_key(&SigningKey::from_bytes(&[2; 32]));
        let relay_peer = libp2p_id(&relay).expect("id");
        let other_peer = libp2p_id(&other).expect("id");
        let now = 1_000_000;
        let good = record(7, relay, now);
        assert!(valid_record(&good, &relay_peer, now).is_some());
        assert!(valid_record(&good, &other_peer, now).is_none());
        assert!(valid_record(&good, &relay_peer, now + 10_000).is_none());
        let mut moved = good.clone();
        moved.key = capacity::node_key(&other).into();
        assert!(valid_record(&moved, &relay_peer, now).is_none());
        let mut forged = good;
        if let Some(b) = forged.value.get_mut(40) {
            *b ^= 1;
        }
        assert!(valid_record(&forged, &relay_peer, now).is_none());
    }
}
