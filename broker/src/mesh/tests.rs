//! Brokers' meshes in one process on loopback: trusted brokers find each
//! other's records and answer requests; an untrusted one is refused.

use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use jusy_common::capacity::{Capacity, SignedCapacity, Terms, shard_of};
use jusy_common::identity::PeerId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;

struct Broker {
    key: PeerId,
    mesh: Mesh,
    updates: mpsc::UnboundedSender<CapacityUpdate>,
    _stop: tokio_util::sync::DropGuard,
}

/// Starts a broker's mesh; it answers `Offers` with `offer`.
async fn broker(
    seed: u8,
    join: Vec<Multiaddr>,
    trust: Vec<libp2p::PeerId>,
) -> (Broker, Option<mpsc::UnboundedSender<Vec<u8>>>) {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let settings = MeshSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        public_ip: None,
        join,
        trust,
        pace: super::Pace::PRODUCTION,
        pending: super::limits::Pending::PRODUCTION,
    };
    let (updates, capacity) = mpsc::unbounded_channel();
    let (inbound_tx, mut inbound) = mpsc::unbounded_channel::<Inbound>();
    let stop = CancellationToken::new();
    let (mesh, _task) = Mesh::start(&key, settings, capacity, inbound_tx, stop.clone())
        .await
        .expect("mesh starts");
    let (offer_tx, mut offer_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut offers = Vec::new();
        while let Some(req) = inbound.recv().await {
            while let Ok(o) = offer_rx.try_recv() {
                offers.push(o);
            }
            let _ = req.reply.send(MeshResponse::Offers(offers.clone()));
        }
    });
    let b = Broker {
        key: PeerId::from_signing_key(&key),
        mesh,
        updates,
        _stop: stop.drop_guard(),
    };
    (b, Some(offer_tx))
}

fn statement(node: u8, relay: PeerId) -> SignedCapacity {
    statement_for(node, relay, 20_000)
}

fn statement_for(node: u8, relay: PeerId, valid_ms: u64) -> SignedCapacity {
    let now = crate::store::now_ms();
    let capacity = Capacity {
        node_id: PeerId([0; 32]),
        free_slots: 2,
        cores: 1,
        terms: Terms {
            relay,
            relay_host: "127.0.0.1".into(),
            relay_port: 7443,
            owner: None,
            speed_ms: 900,
            issued_ms: now,
            expires_ms: now + valid_ms,
        },
    };
    SignedCapacity::sign(&SigningKey::from_bytes(&[node; 32]), capacity).expect("sign")
}

/// Asks until `found` says yes; the mesh has no event for "stored elsewhere".
async fn eventually<F, Fut>(mut found: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(Duration::from_secs(20), async {
        while !found().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("condition within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_brokers_share_records_and_offers() {
    let b_key = PeerId::from_signing_key(&SigningKey::from_bytes(&[2; 32]));
    let (a, _) = broker(1, vec![], vec![libp2p_id(&b_key).expect("id")]).await;
    let (b, b_offers) = broker(2, vec![a.mesh.addr.clone()], vec![]).await;
    assert_eq!(b.key, b_key);
    let signed = statement(10, b.key);
    let node = signed.capacity().node_id;
    b_offers
        .expect("offers")
        .send(signed.bytes().to_vec())
        .expect("offer");
    b.updates
        .send(CapacityUpdate::Published(signed.clone()))
        .expect("publish");

    eventually(|| async { a.mesh.record(node).await.ok().flatten().is_some() }).await;
    assert_eq!(
        a.mesh.record(node).await.expect("mesh").as_ref(),
        Some(&signed)
    );
    let shard = shard_of(&node);
    eventually(|| async {
        a.mesh
            .providers(shard)
            .await
            .is_ok_and(|p| p.contains(&b.mesh.peer_id))
    })
    .await;
    let offers = a
        .mesh
        .offers(b.mesh.peer_id, shard, crate::store::now_ms())
        .await
        .expect("offers");
    assert_eq!(offers, vec![signed]);
    // Offers for another shard, or from a relay they do not name, are dropped.
    let other = (shard + 1) % jusy_common::capacity::SHARDS;
    assert!(
        a.mesh
            .offers(b.mesh.peer_id, other, crate::store::now_ms())
            .await
            .expect("offers")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_broker_is_refused() {
    let (a, _) = broker(3, vec![], vec![]).await;
    let (c, _) = broker(4, vec![a.mesh.addr.clone()], vec![]).await;
    let signed = statement(11, c.key);
    let node = signed.capacity().node_id;
    c.updates
        .send(CapacityUpdate::Published(signed))
        .expect("publish");
    let asked = c
        .mesh
        .request(a.mesh.peer_id, MeshRequest::Offers { shard: 0 })
        .await;
    assert!(matches!(asked, Err(MeshError::Request { .. })), "{asked:?}");
    assert_eq!(a.mesh.record(node).await.expect("mesh"), None);
    assert!(
        a.mesh
            .providers(shard_of(&node))
            .await
            .expect("mesh")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_not_found_after_its_expiry() {
    let b_key = PeerId::from_signing_key(&SigningKey::from_bytes(&[6; 32]));
    let (a, _) = broker(5, vec![], vec![libp2p_id(&b_key).expect("id")]).await;
    let (b, _) = broker(6, vec![a.mesh.addr.clone()], vec![]).await;
    let signed = statement_for(12, b.key, 1_500);
    let node = signed.capacity().node_id;
    let expires = signed.capacity().terms.expires_ms;
    b.updates
        .send(CapacityUpdate::Published(signed))
        .expect("publish");
    eventually(|| async { a.mesh.record(node).await.ok().flatten().is_some() }).await;
    // The node is gone and its relay publishes nothing more: once the
    // statement's expiry has passed, no broker offers it.
    eventually(|| async {
        crate::store::now_ms() >= expires
            && a.mesh.record(node).await.ok().flatten().is_none()
            && b.mesh.record(node).await.ok().flatten().is_none()
    })
    .await;
    assert!(
        crate::store::now_ms() < expires + 5_000,
        "found long after its expiry"
    );
}
