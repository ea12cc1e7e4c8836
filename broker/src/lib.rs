//! The jusy broker: a QUIC relay for nodes, per-order TCP ports for clients, and
//! the HTTP API that sells sessions.
//!
//! # Layout
//! * [`config`] — the TOML configuration and its defaults.
//! * [`check`] — `jusy-broker check`: whether the broker can start.
//! * [`store`] — durable state in sled: identity, accounts by keyed digest.
//! * [`ledger`] — money and orders in sled transactions: charge, settle, audit.
//! * [`limit`] — token-bucket rate limits keyed by address or identity, in
//!   bounded memory (the API's requests, the relay's handshakes and speed tests).
//! * [`mesh`] — libp2p among brokers: allowlist, DHT of capacity, requests.
//! * [`remote`] — answering other brokers: offers of free nodes, reservations,
//!   events of orders whose ledger is here.
//! * [`relay`] — node connections, slot registry, order-port splicing.
//! * [`orders`] — the order book: claim, assign, open port, end.
//! * [`api`] — HTTP routes and their JSON errors.
//! * [`web`] — the web pages for clients, node owners and the operator.
//! * [`metrics`] — Prometheus metrics, when `metrics_listen` is set.

pub mod api;
pub mod check;
pub mod config;
pub mod ledger;
pub mod limit;
pub mod mesh;
pub mod metrics;
pub mod orders;
pub mod relay;
pub mod remote;
pub mod store;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;

use jusy_common::identity::PeerId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use config::Config;
use ledger::Ledger;
use orders::Orders;
use relay::{DataPlane, Relay, RelayEvent};
use store::Store;

/// The broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("binding HTTP API {addr}: {source}")]
    BindApi {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("binding the metrics endpoint {addr}: {source}")]
    BindMetrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Mesh(#[from] mesh::MeshError),
}

/// The mesh of a broker that is not alone: its handle, the task that owns the
/// swarm, and the other brokers' requests waiting to be served.
#[derive(Debug)]
struct MeshPart {
    mesh: mesh::Mesh,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    inbound: mpsc::UnboundedReceiver<mesh::Inbound>,
}

/// A broker whose sockets are bound, ready to run.
#[derive(Debug)]
pub struct Broker {
    pub api_addr: SocketAddr,
    pub relay_addr: SocketAddr,
    pub key: PeerId,
    pub store: Store,
    pub relay: Arc<Relay>,
    api_listener: tokio::net::TcpListener,
    endpoint: relay::quic::Endpoint,
    paths: relay::PathConfigs,
    orders: Arc<Orders>,
    events: mpsc::UnboundedReceiver<RelayEvent>,
    mesh: Option<MeshPart>,
    cfg: Config,
    proxies: Arc<api::client_addr::Proxies>,
    http_limits: api::serve::Limits,
    data_plane: DataPlane,
    form_key: web::csrf::FormKey,
    metrics: Option<tokio::net::TcpListener>,
}

impl Broker {
    /// Opens the database and binds the API and relay sockets.
    /// `open_files` is how many file descriptors the process may hold: the
    /// API's connections take at most half of them.
    pub async fn bind(cfg: Config, store: Store, open_files: u64) -> Result<Self, BrokerError> {
        let proxies = Arc::new(cfg.proxies()?);
        let http_limits = cfg.http_limits().within_fd_limit(open_files);
        let identity = store.identity()?;
        let data_plane = DataPlane::start(cfg.busy_poll()).map_err(relay::RelayError::DataPlane)?;
        let (endpoint, paths) = Relay::bind(
            &identity,
            cfg.relay_listen,
            cfg.quic_max_mtu,
            data_plane.handle(),
        )?;
        let relay_addr = endpoint
            .local_addr()
            .map_err(|source| relay::RelayError::Bind {
                addr: cfg.relay_listen,
                source,
            })?;
        let api_listener = tokio::net::TcpListener::bind(cfg.api_listen)
            .await
            .map_err(|source| BrokerError::BindApi {
                addr: cfg.api_listen,
                source,
            })?;
        let metrics = match cfg.metrics_listen {
            Some(addr) => Some(
                metrics::bind(addr)
                    .await
                    .map_err(|source| BrokerError::BindMetrics { addr, source })?,
            ),
            None => None,
        };
        let api_addr = api_listener
            .local_addr()
            .map_err(|source| BrokerError::BindApi {
                addr: cfg.api_listen,
                source,
            })?;
        let mut ledger = Ledger::open(&store, cfg.pricing())?;
        ledger.hold_ms = cfg.hold_secs.saturating_mul(1000);
        let recovered = ledger.recover(store::now_ms())?;
        if recovered > 0 {
            tracing::warn!(recovered, "settled orders left unfinished by the last run");
        }
        let key = PeerId::from_signing_key(&identity);
        let form_key = web::csrf::FormKey::derive(&identity);
        let (mesh, advertise) = match cfg.mesh()? {
            None => (None, None),
            Some(mut settings) => {
                settings
                    .trust
                    .extend(remote::trust::parse_all(&store.admitted_brokers()?));
                let (updates, capacity) = mpsc::unbounded_channel();
                let (inbound_tx, inbound) = mpsc::unbounded_channel();
                let stop = CancellationToken::new();
                let (mesh, task) =
                    mesh::Mesh::start(&identity, settings, capacity, inbound_tx, stop.clone())
                        .await?;
                let advertise = relay::Advertise {
                    relay: key,
                    host: cfg.public_host.clone(),
                    port: relay_addr.port(),
                    every: std::time::Duration::from_secs(cfg.capacity_refresh_secs),
                    validity: std::time::Duration::from_secs(cfg.capacity_validity_secs),
                    updates,
                };
                let part = MeshPart {
                    mesh,
                    task,
                    stop,
                    inbound,
                };
                (Some(part), Some(advertise))
            }
        };
        let (tx, events) = mpsc::unbounded_channel();
        let relay = Relay::new(
            tx,
            store.clone(),
            cfg.speed_test(),
            cfg.relay_admission(),
            advertise,
            data_plane.handle().clone(),
        );
        let served = mesh.as_ref().map(|m| {
            (
                m.mesh.clone(),
                remote::Served::new(relay.clone(), m.mesh.clone(), &cfg),
            )
        });
        let orders = Orders::new(cfg.clone(), store.clone(), ledger, relay.clone(), served);
        Ok(Self {
            api_addr,
            relay_addr,
            key,
            store,
            relay,
            api_listener,
            endpoint,
            paths,
            orders,
            events,
            mesh,
            cfg,
            proxies,
            http_limits,
            data_plane,
            form_key,
            metrics,
        })
    }

    /// The machine-readable line printed on stdout once the broker is ready.
    pub fn ready_line(&self) -> String {
        let mut line = serde_json::json!({
            "event": "ready",
            "api": self.api_addr.to_string(),
            "relay": self.relay_addr.to_string(),
            "broker_key": self.key.to_string(),
        });
        let metrics = self.metrics.as_ref().and_then(|l| l.local_addr().ok());
        if let (Some(addr), Some(obj)) = (metrics, line.as_object_mut()) {
            obj.insert("metrics".into(), addr.to_string().into());
        }
        if let (Some(m), Some(obj)) = (&self.mesh, line.as_object_mut()) {
            obj.insert("mesh".into(), m.mesh.addr.to_string().into());
            obj.insert("mesh_peer_id".into(), m.mesh.peer_id.to_string().into());
        }
        line.to_string()
    }

    /// Serves until `stop` is cancelled. Then, in this order: the API stops
    /// taking requests; every live order is ended as cancelled by the broker
    /// and settled (the nodes did nothing wrong); the relay closes its node
    /// connections and its data plane ends; the database is flushed.
    pub async fn run(self, stop: CancellationToken) -> Result<(), BrokerError> {
        tracing::info!(api = %self.api_addr, relay = %self.relay_addr, broker_key = %self.key, "broker running");
        let relay_stop = CancellationToken::new();
        let relay_task = self.data_plane.spawn(self.relay.clone().serve(
            self.endpoint,
            self.paths,
            relay_stop.clone(),
        ));
        let follow = tokio::spawn(self.orders.clone().follow(self.events));
        let timers_stop = CancellationToken::new();
        let timers = tokio::spawn(self.orders.clone().watch_timers(timers_stop.clone()));
        let mesh = self.mesh.zip(self.orders.served()).map(|(m, served)| {
            let serving = tokio::spawn(remote::serve(
                m.inbound,
                self.relay.clone(),
                served.clone(),
                self.orders.clone(),
                m.mesh.clone(),
                self.store.clone(),
            ));
            let watching = tokio::spawn(self.orders.clone().watch_relays(m.stop.clone()));
            let trusting = tokio::spawn(remote::trust::keep(
                m.mesh.clone(),
                self.store.clone(),
                m.stop.clone(),
            ));
            let learning = tokio::spawn(remote::relays::learn(
                m.mesh.clone(),
                self.relay.clone(),
                m.stop.clone(),
            ));
            (
                m.task,
                m.stop,
                serving,
                served,
                [learning, trusting, watching],
            )
        });
        let metrics_stop = CancellationToken::new();
        let metrics = self.metrics.map(|listener| {
            tokio::spawn(metrics::serve(
                listener,
                self.orders.clone(),
                self.relay.clone(),
                metrics_stop.clone(),
            ))
        });
        let orders = self.orders.clone();
        let api = api::Api::new(self.orders, self.relay, self.store.clone(), &self.cfg);
        let pages = web::Web::new(
            api.clone(),
            &self.cfg,
            self.api_addr,
            self.relay_addr,
            self.key,
            self.form_key,
        );
        let app = api::router(api).merge(web::router(pages));
        api::serve::serve(
            self.api_listener,
            app,
            self.proxies,
            self.http_limits,
            stop.clone(),
        )
        .await;
        stop.cancel();
        metrics_stop.cancel();
        if let Some(task) = metrics {
            let _ = task.await;
        }
        timers_stop.cancel();
        let _ = timers.await;
        orders.cancel_all().await;
        relay_stop.cancel();
        let _ = relay_task.await;
        if let Some((task, stop, serving, served, helpers)) = mesh {
            served.shutdown().await;
            stop.cancel();
            for helper in helpers {
                let _ = helper.await;
            }
            let _ = task.await;
            // The swarm's end closed the inbound channel, which ends `serving`.
            let _ = serving.await;
        }
        follow.abort();
        // Joining the data plane's thread blocks until its runtime is gone.
        let data_plane = self.data_plane;
        let _ = tokio::task::spawn_blocking(move || drop(data_plane)).await;
        self.store.flush()?;
        Ok(())
    }
}
