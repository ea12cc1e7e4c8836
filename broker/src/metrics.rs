//! Prometheus metrics (`metrics_listen`, off by default): counters kept as
//! things happen, and gauges read from the broker's state at each scrape.
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `jusy_orders_created_total` | counter | orders charged and placed |
//! | `jusy_orders_settled_total{state}` | counter | orders settled, by end (`CLIENT_CLOSED`, `NEVER_CONNECTED`, …) |
//! | `jusy_orders_live{state}` | gauge | live orders: `reserved` (nobody logged in yet), `connected` |
//! | `jusy_nodes` | gauge | nodes attached to the relay |
//! | `jusy_free_slots` | gauge | their ready sessions |
//! | `jusy_relay_udp_bytes{direction}` | gauge | UDP bytes of the attached nodes' connections (`sent`, `received`) |
//! | `jusy_relay_lost_packets` | gauge | packets those connections lost |
//! | `jusy_relay_rtt_seconds{stat}` | gauge | their round-trip times (`min`, `max`) |
//! | `jusy_ledger_sat{total}` | gauge | `deposits`, `withdrawals` |
//! | `jusy_rate_limited_total{limit}` | counter | requests refused by a rate limit (`api`, `login`, `signup`) |
//! | `jusy_mesh_peers` | gauge | brokers this one knows in the mesh |

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::orders::Orders;
use crate::relay::Relay;

/// One label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatLabel {
    pub stat: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TotalLabel {
    pub total: String,
}

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub orders_created: Counter,
    pub orders_settled: Family<StateLabel, Counter>,
    pub rate_limited: Family<LimitLabel, Counter>,
    orders_live: Family<StateLabel, Gauge>,
    nodes: Gauge,
    free_slots: Gauge,
    udp_bytes: Family<DirectionLabel, Gauge>,
    lost_packets: Gauge,
    rtt: Family<StatLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    ledger: Family<TotalLabel, Gauge>,
    mesh_peers: Gauge,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn label<T: From<String>>(text: &str) -> T {
    T::from(text.to_owned())
}

impl From<String> for StateLabel {
    fn from(state: String) -> Self {
        Self { state }
    }
}
impl From<String> for LimitLabel {
    fn from(limit: String) -> Self {
        Self { limit }
    }
}
impl From<String> for DirectionLabel {
    fn from(direction: String) -> Self {
        Self { direction }
    }
}
impl From<String> for StatLabel {
    fn from(stat: String) -> Self {
        Self { stat }
    }
}
impl From<String> for TotalLabel {
    fn from(total: String) -> Self {
        Self { total }
    }
}

fn gauge(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("jusy");
        let m = Self {
            registry: Registry::default(),
            orders_created: Counter::default(),
            orders_settled: Family::default(),
            rate_limited: Family::default(),
            orders_live: Family::default(),
            nodes: Gauge::default(),
            free_slots: Gauge::default(),
            udp_bytes: Family::default(),
            lost_packets: Gauge::default(),
            rtt: Family::default(),
            ledger: Family::default(),
            mesh_peers: Gauge::default(),
        };
        registry.register(
            "orders_created",
            "Orders charged and placed",
            m.orders_created.clone(),
        );
        registry.register(
            "orders_settled",
            "Orders settled, by how they ended",
            m.orders_settled.clone(),
        );
        registry.register(
            "orders_live",
            "Live orders: reserved (nobody logged in yet) or connected",
            m.orders_live.clone(),
        );
        registry.register("nodes", "Nodes attached to the relay", m.nodes.clone());
        registry.register(
            "free_slots",
            "Ready sessions of the attached nodes",
            m.free_slots.clone(),
        );
        registry.register(
            "relay_udp_bytes",
            "UDP bytes of the attached nodes' QUIC connections",
            m.udp_bytes.clone(),
        );
        registry.register(
            "relay_lost_packets",
            "Packets the attached nodes' QUIC connections lost",
            m.lost_packets.clone(),
        );
        registry.register(
            "relay_rtt_seconds",
            "Round-trip times of the attached nodes' QUIC paths",
            m.rtt.clone(),
        );
        registry.register(
            "ledger_sat",
            "Satoshi that entered (deposits) and left (withdrawals) the books",
            m.ledger.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "mesh_peers",
            "Brokers this one knows in the mesh",
            m.mesh_peers.clone(),
        );
        Self { registry, ..m }
    }

    /// A request refused by the `limit` rate limit.
    pub fn limited(&self, limit: &str) {
        self.rate_limited.get_or_create(&label(limit)).inc();
    }

    /// An order settled with end `state`.
    pub fn settled(&self, state: &str) {
        self.orders_settled.get_or_create(&label(state)).inc();
    }

    /// Reads the gauges from the broker's state and encodes everything.
    async fn render(&self, orders: &Orders, relay: &Relay) -> Result<String, std::fmt::Error> {
        let (reserved, connected) = orders.live_counts();
        self.orders_live
            .get_or_create(&label("reserved"))
            .set(gauge(reserved));
        self.orders_live
            .get_or_create(&label("connected"))
            .set(gauge(connected));
        let (nodes, free) = relay.capacity();
        self.nodes.set(gauge(nodes));
        self.free_slots.set(gauge(free));
        let (mut sent, mut received, mut lost) = (0u64, 0u64, 0u64);
        let (mut min_rtt, mut max_rtt) = (f64::INFINITY, 0f64);
        for node in relay.nodes() {
            let stats = node.conn.stats();
            sent = sent.saturating_add(stats.udp_tx.bytes);
            received = received.saturating_add(stats.udp_rx.bytes);
            lost = lost.saturating_add(stats.path.lost_packets);
            let rtt = stats.path.rtt.as_secs_f64();
            min_rtt = min_rtt.min(rtt);
            max_rtt = max_rtt.max(rtt);
        }
        self.udp_bytes
            .get_or_create(&label("sent"))
            .set(gauge(sent));
        self.udp_bytes
            .get_or_create(&label("received"))
            .set(gauge(received));
        self.lost_packets.set(gauge(lost));
        let min_rtt = if min_rtt.is_finite() { min_rtt } else { 0.0 };
        self.rtt.get_or_create(&label("min")).set(min_rtt);
        self.rtt.get_or_create(&label("max")).set(max_rtt);
        let (deposits, withdrawals) = orders.ledger.totals().unwrap_or_default();
        self.ledger
            .get_or_create(&label("deposits"))
            .set(gauge(deposits));
        self.ledger
            .get_or_create(&label("withdrawals"))
            .set(gauge(withdrawals));
        if let Some(mesh) = orders.mesh() {
            let peers = mesh.peers(10_000).await.map_or(0, |p| p.len());
            self.mesh_peers.set(gauge(peers));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[derive(Clone)]
struct Sources {
    orders: Arc<Orders>,
    relay: Arc<Relay>,
}

async fn scrape(State(s): State<Sources>) -> Response {
    match METRICS.render(&s.orders, &s.relay).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    orders: Arc<Orders>,
    relay: Arc<Relay>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Sources { orders, relay });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

/// Where the metrics are served, once bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
