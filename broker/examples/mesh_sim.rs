//! The brokers' mesh at scale, in one process: many brokers (the real
//! `jusy_broker::mesh`, libp2p over QUIC on loopback, Kademlia, the
//! allowlist) and many nodes' signed capacity statements; measures how often
//! and how fast a random broker finds a random node's record, and finds a
//! relay offering capacity in a random shard.
//!
//! `cargo run --release --example mesh_sim -- <brokers> <nodes> <lookups>
//! <slowdown>` (defaults 100 5000 1000 10). Results: `docs/mesh-scale.md`.

// A tool: a failed step is reported by aborting the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use jusy_broker::mesh::limits::Pending;
use jusy_broker::mesh::{Mesh, MeshSettings, Pace, libp2p_id};
use jusy_broker::relay::CapacityUpdate;
use jusy_common::capacity::{Capacity, SHARDS, SignedCapacity, Terms};
use jusy_common::identity::PeerId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Broker {
    key: PeerId,
    mesh: Mesh,
    updates: mpsc::UnboundedSender<CapacityUpdate>,
    _inbound: mpsc::UnboundedReceiver<jusy_broker::mesh::Inbound>,
}

fn key(kind: u8, n: u32) -> SigningKey {
    let mut seed = [kind; 32];
    seed[..4].copy_from_slice(&n.to_le_bytes());
    SigningKey::from_bytes(&seed)
}

fn now_ms() -> u64 {
    jusy_broker::store::now_ms()
}

/// Deterministic pseudo-random numbers (splitmix64), so runs compare.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let brokers = args.first().copied().unwrap_or(100);
    let nodes = args.get(1).copied().unwrap_or(5000);
    let lookups = args.get(2).copied().unwrap_or(1000);
    // Every broker here shares one machine with all the others, so that
    // machine carries 100 machines' worth of the mesh's periodic background
    // work (keep-alives to ~99 peers each, provider records of 16 shards
    // each renewed every 30 s). It runs `slow` times slower than in
    // production (default 10; 1 is production's pace); publications and
    // lookups, what is measured, are not slowed.
    let slow = args.get(3).copied().unwrap_or(10).max(1) as u32;
    let pace = Pace {
        keep_alive: Pace::PRODUCTION.keep_alive * slow,
        provider_ttl: Pace::PRODUCTION.provider_ttl * slow,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,jusy_broker=error".into()),
        )
        .init();
    let stop = CancellationToken::new();
    let keys: Vec<SigningKey> = (0..brokers as u32).map(|i| key(1, i)).collect();
    let trust: Vec<libp2p::PeerId> = keys
        .iter()
        .map(|k| libp2p_id(&PeerId::from_signing_key(k)).unwrap())
        .collect();

    let started = Instant::now();
    let mut all: Vec<Broker> = Vec::new();
    let mut tasks = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let join = match all.first() {
            Some(first) => vec![first.mesh.addr.clone()],
            None => vec![],
        };
        let settings = MeshSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_ip: None,
            join,
            trust: trust.clone(),
            pace,
            // Every broker here dials from 127.0.0.1.
            pending: Pending {
                all: 1024,
                per_address: 1024,
            },
        };
        let (updates, capacity) = mpsc::unbounded_channel();
        let (inbound_tx, inbound) = mpsc::unbounded_channel();
        let (mesh, task) = Mesh::start(k, settings, capacity, inbound_tx, stop.clone()).await?;
        tasks.push(task);
        all.push(Broker {
            key: PeerId::from_signing_key(k),
            mesh,
            updates,
            _inbound: inbound,
        });
        if i % 25 == 24 {
            eprintln!("{} brokers started", i + 1);
        }
    }
    // Let routing tables fill: every broker knows at least a few others.
    let want = (brokers - 1).min(8);
    loop {
        let mut ready = 0;
        for b in &all {
            if b.mesh.peers(64).await?.len() >= want {
                ready += 1;
            }
        }
        if ready == brokers || started.elapsed() > Duration::from_secs(120) {
            eprintln!(
                "{ready}/{brokers} brokers know {want}+ others after {:?}",
                started.elapsed()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let publish = Instant::now();
    let mut node_ids = Vec::with_capacity(nodes);
    for n in 0..nodes {
        let relay = &all[n % brokers];
        let now = now_ms();
        let c = Capacity {
            node_id: PeerId([0; 32]),
            free_slots: 2,
            cores: 4,
            terms: Terms {
                relay: relay.key,
                relay_host: "127.0.0.1".into(),
                relay_port: 7443,
                owner: None,
                speed_ms: 900,
                issued_ms: now,
                expires_ms: now + 115_000,
            },
        };
        let signed = SignedCapacity::sign(&key(2, n as u32), c)?;
        node_ids.push((signed.capacity().node_id, n % brokers));
        relay.updates.send(CapacityUpdate::Published(signed))?;
        // Relays publish as nodes attach, not all at once.
        if n % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The puts run in the background (at most 2 at once per broker): wait
    // until every relay has finished its own.
    loop {
        let mut pending = 0;
        for b in &all {
            pending += b.mesh.publishing().await?;
        }
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{nodes} statements published in {:?}", publish.elapsed());
    // How many brokers keep a copy of each statement (the relay's own among them).
    let mut copies = Vec::new();
    for (node, _) in node_ids.iter().take(50) {
        let mut n = 0;
        for b in &all {
            n += usize::from(b.mesh.holds(*node).await?);
        }
        copies.push(n);
    }
    copies.sort_unstable();
    eprintln!("copies per statement (50 sampled): {copies:?}");

    let mut rng = Rng(7);
    // Eight lookups at a time, like a busy API broker.
    let mut jobs = tokio::task::JoinSet::new();
    let plan: Vec<(PeerId, Mesh)> = (0..lookups)
        .map(|_| {
            let (node, relay) = node_ids[rng.below(nodes)];
            let mut asker = rng.below(brokers);
            if asker == relay && brokers > 1 {
                asker = (asker + 1) % brokers;
            }
            (node, all[asker].mesh.clone())
        })
        .collect();
    for chunk in plan.chunks(lookups.div_ceil(8).max(1)) {
        let chunk = chunk.to_vec();
        jobs.spawn(async move {
            let mut out = Vec::new();
            for (node, mesh) in chunk {
                let t = Instant::now();
                let got = mesh.record(node).await.ok().flatten();
                out.push((
                    t.elapsed(),
                    got.is_some_and(|s| s.capacity().node_id == node),
                ));
            }
            out
        });
    }
    let mut found = 0usize;
    let mut latencies = Vec::with_capacity(lookups);
    while let Some(done) = jobs.join_next().await {
        for (took, ok) in done? {
            latencies.push(took);
            found += usize::from(ok);
        }
    }
    latencies.sort();

    let mut shard_found = 0usize;
    let mut shard_latencies = Vec::new();
    let shard_lookups = lookups.min(200);
    for _ in 0..shard_lookups {
        let asker = rng.below(brokers);
        let shard = rng.below(usize::from(SHARDS)) as u8;
        let t = Instant::now();
        let providers = all[asker].mesh.providers(shard).await?;
        shard_latencies.push(t.elapsed());
        if !providers.is_empty() {
            shard_found += 1;
        }
    }
    shard_latencies.sort();

    println!(
        "{}",
        serde_json::json!({
            "brokers": brokers,
            "nodes": nodes,
            "record_lookups": lookups,
            "record_found": found,
            "record_success": found as f64 / lookups.max(1) as f64,
            "record_p50_ms": percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            "record_p95_ms": percentile(&latencies, 0.95).as_secs_f64() * 1e3,
            "record_p99_ms": percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            "shard_lookups": shard_lookups,
            "shard_found": shard_found,
            "shard_p50_ms": percentile(&shard_latencies, 0.5).as_secs_f64() * 1e3,
            "shard_p95_ms": percentile(&shard_latencies, 0.95).as_secs_f64() * 1e3,
            "total_s": started.elapsed().as_secs_f64(),
        })
    );
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
