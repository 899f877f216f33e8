//! The waypoint's metrics: Istio's HTTP request families as its waypoint (Envoy's
//! `istio.stats`) reports them, `reporter="waypoint"`, with the same labels as the TCP
//! families plus `response_code` and `grpc_response_status`; and the TCP connections it
//! refused.
use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::metrics::ConnLabels;

/// Istio's `reporter` value for a waypoint.
pub const REPORTER_WAYPOINT: &str = "waypoint";

/// Istio's buckets for `istio_request_duration_milliseconds` (its stats filter's
/// defaults).
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`: powers of ten
/// from 1 byte to 1 GB.
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// One request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub conn: ConnLabels,
    pub response_code: String,
    /// The `grpc-status` of a gRPC response; empty otherwise (as Istio reports it).
    pub grpc_response_status: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    tcp_denied: Counter,
    /// HBONE connections open.
    pub connections: Gauge,
    /// HBONE connections closed at once because `connections` was at its limit.
    pub over_limit: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "istio_requests",
            "The total number of requests",
            requests.clone(),
        );
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS_MS)) as fn() -> Histogram,
        );
        let request_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(SIZE_BUCKETS)) as fn() -> Histogram,
        );
        let response_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(SIZE_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's first byte to the response's last",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request sizes (body bytes)",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response sizes (body bytes)",
            response_bytes.clone(),
        );
        let tcp_denied = Counter::default();
        registry.register(
            "ztunnel_waypoint_connections_denied",
            "TCP streams through the waypoint refused by its authorization policies",
            tcp_denied.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "ztunnel_waypoint_connections",
            "HBONE connections open on the waypoint",
            connections.clone(),
        );
        let over_limit = Counter::default();
        registry.register(
            "ztunnel_waypoint_connections_over_limit",
            "HBONE connections closed at once because the waypoint had --max-connections open",
            over_limit.clone(),
        );
        Arc::new(Metrics {
            registry,
            connections,
            over_limit,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_denied,
        })
    }

    /// Counts one finished request.
    pub fn record(
        &self,
        labels: &RequestLabels,
        duration_ms: f64,
        req_bytes: u64,
        resp_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(duration_ms);
        self.request_bytes
            .get_or_create(labels)
            .observe(req_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(resp_bytes as f64);
    }

    pub fn tcp_denied(&self) {
        self.tcp_denied.inc();
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "encoding the waypoint's metrics failed");
        }
        out
    }
}
