//! Prometheus metrics of the apiserver and the plain-HTTP health endpoints: `/healthz` (the
//! process runs), `/readyz` (the first sync of the source into the store is done), `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The apiserver's metrics.
pub struct Metrics {
    registry: Registry,
    ready: AtomicBool,
    /// Source documents that could not be used, per load.
    pub source_problems: Gauge,
    /// Keys written (put or deleted) into the store.
    pub store_writes: Counter,
    /// Identities this cluster holds.
    pub identities: Gauge,
    /// Services written.
    pub services: Gauge,
    /// Global services written.
    pub global_services: Gauge,
    /// Export watch streams open now.
    pub export_watchers: Gauge,
    /// Watchers reset because they fell behind.
    pub export_resets: Counter,
    /// Stored values skipped by the Export server because they did not decode.
    pub export_undecodable: Counter,
}

impl Metrics {
    /// A registry with every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clustermesh");
        let m = |r: &mut Registry, name: &str, help: &str, metric: Gauge| {
            r.register(name, help, metric.clone());
            metric
        };
        let c = |r: &mut Registry, name: &str, help: &str, metric: Counter| {
            r.register(name, help, metric.clone());
            metric
        };
        let source_problems = m(
            &mut registry,
            "source_problems",
            "Source documents that could not be used in the last load",
            Gauge::default(),
        );
        let store_writes = c(
            &mut registry,
            "apiserver_store_writes",
            "Keys put or deleted in the kvstore",
            Counter::default(),
        );
        let identities = m(
            &mut registry,
            "identities",
            "Identities allocated by this cluster",
            Gauge::default(),
        );
        let services = m(
            &mut registry,
            "services",
            "Services written by this cluster",
            Gauge::default(),
        );
        let global_services = m(
            &mut registry,
            "global_services",
            "Global services written by this cluster",
            Gauge::default(),
        );
        let export_watchers = m(
            &mut registry,
            "export_watchers",
            "Open Export watch streams",
            Gauge::default(),
        );
        let export_resets = c(
            &mut registry,
            "export_resets",
            "Export watchers reset because they fell behind",
            Counter::default(),
        );
        let export_undecodable = c(
            &mut registry,
            "export_undecodable_values",
            "Stored values the Export server skipped",
            Counter::default(),
        );
        Self {
            registry,
            ready: AtomicBool::new(false),
            source_problems,
            store_writes,
            identities,
            services,
            global_services,
            export_watchers,
            export_resets,
            export_undecodable,
        }
    }

    /// Marks the apiserver ready.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether the apiserver is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The health and metrics routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: the first sync is not done\n",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.render(),
                )
            }),
        )
        .with_state(metrics)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address a listener is bound to, for logs.
pub fn bound(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
