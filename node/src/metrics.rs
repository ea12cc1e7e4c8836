//! Prometheus metrics of the node, served on loopback only when
//! `metrics_port` is set (off by default): what it sold and how its
//! sessions ended.
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `jusy_node_sessions` | gauge | sessions assigned to an order and not ended |
//! | `jusy_node_sessions_ended_total{reason}` | counter | sessions ended, by end reason |
//! | `jusy_node_limit_ends_total{limit}` | counter | sessions ended by a limit (`RAM`, `PROC`, `DISK`) |
//! | `jusy_node_cpu_sold_seconds_total` | counter | CPU time of ended sessions |
//! | `jusy_node_receipts_total` | counter | signed receipts sent |
//!
//! The endpoint answers `GET /metrics` over HTTP/1.1 (hyper); any other
//! path is 404.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use jusy_common::wire::EndReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: String,
}

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sessions: Gauge,
    ended: Family<ReasonLabel, Counter>,
    limit_ends: Family<LimitLabel, Counter>,
    cpu_sold: Counter<f64, AtomicU64>,
    pub receipts: Counter,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            sessions: Gauge::default(),
            ended: Family::default(),
            limit_ends: Family::default(),
            cpu_sold: Counter::default(),
            receipts: Counter::default(),
        };
        let mut registry = Registry::with_prefix("jusy_node");
        registry.register(
            "sessions",
            "Sessions assigned to an order and not ended",
            m.sessions.clone(),
        );
        registry.register(
            "sessions_ended",
            "Sessions ended, by end reason",
            m.ended.clone(),
        );
        registry.register(
            "limit_ends",
            "Sessions ended by a memory, process or disk limit",
            m.limit_ends.clone(),
        );
        registry.register(
            "cpu_sold_seconds",
            "CPU time of ended sessions",
            m.cpu_sold.clone(),
        );
        registry.register("receipts", "Signed receipts sent", m.receipts.clone());
        Self { registry, ..m }
    }

    /// A session ended with `reason` after `cpu_us` of CPU time.
    pub fn ended(&self, reason: EndReason, cpu_us: u64) {
        let code = reason.code().to_owned();
        self.ended
            .get_or_create(&ReasonLabel {
                reason: code.clone(),
            })
            .inc();
        if matches!(
            reason,
            EndReason::MemoryLimit | EndReason::ProcessLimit | EndReason::DiskLimit
        ) {
            self.limit_ends
                .get_or_create(&LimitLabel { limit: code })
                .inc();
        }
        // Microseconds as seconds; exact below 2^53 µs (285 years).
        #[allow(clippy::cast_precision_loss)]
        self.cpu_sold.inc_by(cpu_us as f64 / 1e6);
        self.sessions.dec();
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves the metrics on `127.0.0.1:port` until `stop`; returns the bound
/// address once listening.
pub async fn serve(
    port: u16,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| async move {
                    Ok::<_, std::convert::Infallible>(answer(&req))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(io, service);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok((addr, task))
}

fn answer<B>(req: &hyper::Request<B>) -> hyper::Response<String> {
    let mut response = hyper::Response::new(String::new());
    if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
        *response.body_mut() = METRICS.render();
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
    } else {
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
    }
    response
}
