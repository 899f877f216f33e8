//! Owns the Prometheus registry: Istio's standard TCP metrics, ztunnel's own gauges and
//! counters, and the `/metrics` and `/healthz/ready` HTTP servers (in [`server`]).
//!
//! Metric and label names follow the Istio Standard Metrics reference
//! (istio.io/latest/docs/reference/config/metrics) and, where that page is silent (label order,
//! defaults), istio/ztunnel `src/proxy/metrics.rs`, so Kiali and the Istio dashboards work
//! unchanged.
//!
//! The exposition is OpenMetrics text (prometheus-client's only text encoder): counters are
//! registered without `_total` and the encoder appends it to the sample name, so
//! `istio_tcp_connections_opened` is scraped as `istio_tcp_connections_opened_total`.
use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        gauge::Gauge,
    },
    registry::{Registry, Unit},
};

mod server;

pub use server::{
    METRICS_CONTENT_TYPE, METRICS_PATH, READINESS_PATH, serve_encoded, serve_metrics,
    serve_readiness,
};

/// The value Istio uses for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";

/// `reporter` when the proxy on the client's side records the connection (outbound).
pub const REPORTER_SOURCE: &str = "source";
/// `reporter` when the proxy on the server's side records the connection (inbound).
pub const REPORTER_DESTINATION: &str = "destination";
/// `connection_security_policy` for a connection that arrived over mTLS (HBONE).
pub const SECURITY_MUTUAL_TLS: &str = "mutual_tls";
/// `response_flags` when nothing went wrong (Envoy's and ztunnel's "no flag").
pub const NO_RESPONSE_FLAGS: &str = "-";

/// `response_flags` values, spelled as istio/ztunnel's `ResponseFlags` encodes them.
pub mod response_flag {
    /// Nothing went wrong.
    pub const NONE: &str = super::NO_RESPONSE_FLAGS;
    /// An authorization policy (or STRICT mTLS) denied the connection, also later on a
    /// policy change.
    pub const DENY: &str = "DENY";
    /// The connection to the destination (the app, the peer, a plain destination) failed.
    pub const CONNECT: &str = "CONNECT";
    /// The TLS handshake with the peer failed.
    pub const TLS_FAILURE: &str = "TLS_FAILURE";
    /// The HTTP/2 handshake or a CONNECT stream with the peer failed.
    pub const H2_HANDSHAKE_FAILURE: &str = "H2_HANDSHAKE_FAILURE";
    /// No certificate for the workload's identity.
    pub const IDENTITY_ERROR: &str = "IDENTITY_ERROR";

    /// Whether a connection closed with `flag` counts in `istio_tcp_connections_failed_total`
    /// (istio/ztunnel counts every flag but none).
    pub fn is_failure(flag: &str) -> bool {
        flag != NONE
    }
}

/// `reason` values for [`Metrics::policy_denied`].
pub mod deny_reason {
    /// An AuthorizationPolicy denied the connection.
    pub const POLICY: &str = "policy";
    /// PeerAuthentication STRICT refused a plaintext connection.
    pub const STRICT_MTLS: &str = "strict_mtls";
    /// The destination (or a required source) is not a workload we know.
    pub const UNKNOWN_WORKLOAD: &str = "unknown_workload";
}

/// The label names of Istio's TCP metric families, in istio/ztunnel's encoding order
/// (what [`ConnLabels`] encodes; the golden tests compare with it).
pub const ISTIO_TCP_LABELS: [&str; 27] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
];

/// The labels of Istio's standard TCP metrics, in the order istio/ztunnel encodes them
/// (`CommonTrafficLabels` in `src/proxy/metrics.rs`), which is also the order of the Istio
/// Standard Metrics page's label list where the two overlap.
///
/// Callers fill what they know; [`Default`] makes every value [`UNKNOWN`] except
/// `request_protocol` (`tcp`) and `response_flags` (`-`). Values are escaped for the
/// exposition by [`Metrics`], so they may hold any text.
///
/// Istio ztunnel's filling rules, for reference: `*_app` and `*_canonical_service` are the
/// workload's canonical name, `*_version` and `*_canonical_revision` its canonical revision,
/// `*_principal` the SPIFFE identity (`spiffe://td/ns/NS/sa/SA`; the source principal only
/// from the peer's verified certificate), `destination_service` the service hostname.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// [`REPORTER_SOURCE`] (outbound) or [`REPORTER_DESTINATION`] (inbound). Left
    /// [`UNKNOWN`] by default so a caller that forgets it shows up on the dashboard rather
    /// than silently counting as one side.
    pub reporter: String,

    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,

    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,

    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,

    /// Always `tcp` for ztunnel (it does not parse HTTP).
    pub request_protocol: String,
    /// [`NO_RESPONSE_FLAGS`], or a flag such as `DENY` (policy) or `CONNECT` (upstream
    /// connect failed), as istio/ztunnel's `ResponseFlags` spells them.
    pub response_flags: String,
    /// [`SECURITY_MUTUAL_TLS`] when the connection was mTLS, else [`UNKNOWN`]; Istio also
    /// reports `unknown` from the source side, where the policy cannot be known.
    pub connection_security_policy: String,

    /// The workloads' locality (Istio's `LocalityLabels`, encoded last).
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

/// A workload's region and zone, [`UNKNOWN`] where it has none.
fn locality_labels(w: &crate::state::Workload) -> (String, String) {
    let l = w.locality.clone().unwrap_or_default();
    let known = |v: String| if v.is_empty() { UNKNOWN.to_owned() } else { v };
    (known(l.region), known(l.zone))
}

impl ConnLabels {
    /// The source workload's labels (Istio's filling rules, above).
    pub fn set_source(&mut self, w: &crate::state::Workload, cluster: &str) {
        self.source_workload = w.workload_name();
        self.source_canonical_service = w.canonical_name();
        self.source_canonical_revision = w.canonical_revision();
        self.source_workload_namespace = w.namespace.clone();
        self.source_app = w.canonical_name();
        self.source_version = w.canonical_revision();
        self.source_cluster = cluster.to_owned();
        (self.source_region, self.source_zone) = locality_labels(w);
    }

    /// The destination workload's labels (not its principal).
    pub fn set_destination(&mut self, w: &crate::state::Workload, cluster: &str) {
        self.destination_workload = w.workload_name();
        self.destination_canonical_service = w.canonical_name();
        self.destination_canonical_revision = w.canonical_revision();
        self.destination_workload_namespace = w.namespace.clone();
        self.destination_app = w.canonical_name();
        self.destination_version = w.canonical_revision();
        self.destination_cluster = cluster.to_owned();
        (self.destination_region, self.destination_zone) = locality_labels(w);
    }

    pub fn set_destination_service(&mut self, svc: &crate::state::Service) {
        self.destination_service = svc.hostname();
        self.destination_service_name = svc.name.clone();
        self.destination_service_namespace = svc.namespace.clone();
    }
}

impl Default for ConnLabels {
    fn default() -> Self {
        let u = || UNKNOWN.to_owned();
        ConnLabels {
            reporter: u(),
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "tcp".to_owned(),
            response_flags: NO_RESPONSE_FLAGS.to_owned(),
            connection_security_policy: u(),
            source_region: u(),
            source_zone: u(),
            destination_region: u(),
            destination_zone: u(),
        }
    }
}

impl ConnLabels {
    /// Every value, in label order.
    fn fields(&self) -> [&String; 27] {
        [
            &self.reporter,
            &self.source_workload,
            &self.source_canonical_service,
            &self.source_canonical_revision,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.source_app,
            &self.source_version,
            &self.source_cluster,
            &self.destination_service,
            &self.destination_service_namespace,
            &self.destination_service_name,
            &self.destination_workload,
            &self.destination_canonical_service,
            &self.destination_canonical_revision,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_app,
            &self.destination_version,
            &self.destination_cluster,
            &self.request_protocol,
            &self.response_flags,
            &self.connection_security_policy,
            &self.source_region,
            &self.source_zone,
            &self.destination_region,
            &self.destination_zone,
        ]
    }

    fn fields_mut(&mut self) -> [&mut String; 27] {
        [
            &mut self.reporter,
            &mut self.source_workload,
            &mut self.source_canonical_service,
            &mut self.source_canonical_revision,
            &mut self.source_workload_namespace,
            &mut self.source_principal,
            &mut self.source_app,
            &mut self.source_version,
            &mut self.source_cluster,
            &mut self.destination_service,
            &mut self.destination_service_namespace,
            &mut self.destination_service_name,
            &mut self.destination_workload,
            &mut self.destination_canonical_service,
            &mut self.destination_canonical_revision,
            &mut self.destination_workload_namespace,
            &mut self.destination_principal,
            &mut self.destination_app,
            &mut self.destination_version,
            &mut self.destination_cluster,
            &mut self.request_protocol,
            &mut self.response_flags,
            &mut self.connection_security_policy,
            &mut self.source_region,
            &mut self.source_zone,
            &mut self.destination_region,
            &mut self.destination_zone,
        ]
    }

    /// The labels as the exposition must carry them: borrowed when nothing needs escaping
    /// (the usual case: Kubernetes names and SPIFFE ids hold no `\`, `"` or newline).
    fn escaped(&self) -> Cow<'_, ConnLabels> {
        if !self.fields().iter().any(|v| needs_escape(v)) {
            return Cow::Borrowed(self);
        }
        let mut out = self.clone();
        for v in out.fields_mut() {
            if let Cow::Owned(e) = escape(v) {
                *v = e;
            }
        }
        Cow::Owned(out)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenyLabels {
    reason: String,
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    source: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrainStateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptErrorLabels {
    listener: String,
    error: String,
}

/// `listener` values: the kinds of listener ztunnel opens in each enrolled pod
/// (:15008, :15006, :15001); ztunnel's own admin listener counts its accept errors as
/// `admin`.
pub mod listener {
    pub const HBONE: &str = "hbone";
    pub const INBOUND: &str = "inbound";
    pub const OUTBOUND: &str = "outbound";
    pub const ADMIN: &str = "admin";
    /// The per-pod listeners, whose series exist from the start.
    pub const POD: [&str; 3] = [HBONE, INBOUND, OUTBOUND];
}

/// Every metric ztunnel exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,

    connections_opened: Family<ConnLabels, Counter>,
    connections_closed: Family<ConnLabels, Counter>,
    sent_bytes: Family<ConnLabels, Counter>,
    received_bytes: Family<ConnLabels, Counter>,
    connections_failed: Family<ConnLabels, Counter>,
    xds: Arc<XdsCollector>,
    workload_manager: WorkloadManagerMetrics,

    enrolled_pods: Gauge,
    active_connections: Family<DirectionLabels, Gauge>,
    pool_connections: Gauge,
    pool_streams: Gauge,
    tls_client_configs: Gauge,
    policy_denials: Family<DenyLabels, Counter>,
    certificate_expiry: Family<IdentityLabels, Gauge>,
    control_plane_up: Family<ComponentLabels, Gauge>,
    timeouts: Family<StepLabels, Counter>,
    dial_ports_skipped: Counter,
    listener_connections: Family<ListenerLabels, Gauge>,
    listener_saturated: Family<ListenerLabels, Counter>,
    accept_errors: Family<AcceptErrorLabels, Counter>,
    capture: Arc<CaptureCollector>,
    config: ConfigMetrics,
    handover: HandoverMetrics,
    drain: DrainMetrics,
    /// Istio's `istio_dns_*` families (the DNS proxy, [`crate::dns`]).
    pub dns: crate::dns::Metrics,
}

/// The drain (issue 15: SIGTERM lets established connections finish). The series exist
/// from the start, at 0.
#[derive(Debug)]
struct DrainMetrics {
    draining: Gauge,
    connections: Family<DrainStateLabels, Gauge>,
    forced: Counter,
}

impl DrainMetrics {
    fn register(registry: &mut Registry) -> Self {
        let draining = Gauge::default();
        registry.register(
            "ztunnel_draining",
            "1 once a drain has started (SIGTERM, POST /quitquitquit, a successor taking \
             over): readiness answers 503, the pods' listeners accept nothing new",
            draining.clone(),
        );
        let connections = Family::<DrainStateLabels, Gauge>::default();
        registry.register(
            "ztunnel_drain_connections",
            "Proxied connections of the drain, by state (at_start: open when it started; \
             remaining: still open)",
            connections.clone(),
        );
        for state in [drain_state::AT_START, drain_state::REMAINING] {
            connections
                .get_or_create(&DrainStateLabels {
                    state: state.to_owned(),
                })
                .set(0);
        }
        let forced = Counter::default();
        registry.register(
            "ztunnel_drain_forced_connections",
            "Connections the drain timeout (--drain-timeout) ended, outcome `drain timeout`",
            forced.clone(),
        );
        Self {
            draining,
            connections,
            forced,
        }
    }

    fn set(&self, state: &str, n: usize) {
        self.connections
            .get_or_create(&DrainStateLabels {
                state: state.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// `state` values of `ztunnel_drain_connections`.
pub mod drain_state {
    pub const AT_START: &str = "at_start";
    pub const REMAINING: &str = "remaining";
}

/// Config versions and enrolment (issue 14: a config that is not completely written is
/// not a config; capture never wider than the pod).
#[derive(Debug)]
struct ConfigMetrics {
    rejected: Family<RejectedLabels, Counter>,
    held: Gauge,
    enrolment_failures: Family<ReasonLabels, Counter>,
}

impl ConfigMetrics {
    fn register(registry: &mut Registry) -> Self {
        let rejected = Family::<RejectedLabels, Counter>::default();
        registry.register(
            "ztunnel_config_rejected",
            "Config versions not taken, by source and reason (empty, unreadable, invalid); \
             the last good version stays in force",
            rejected.clone(),
        );
        let held = Gauge::default();
        registry.register(
            "ztunnel_config_held_objects",
            "Objects the latest config version takes away that stay in force until the \
             change has held for --config-settle",
            held.clone(),
        );
        let enrolment_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ztunnel_enrolment_failures",
            "Failed pod enrolments, by reason (cgroup_scope: the pod's cgroup is broader \
             than the pod; error: anything else); each is retried",
            enrolment_failures.clone(),
        );
        Self {
            rejected,
            held,
            enrolment_failures,
        }
    }
}

/// Upgrades (issue 15: a new ztunnel takes the pods' listening sockets over from the
/// running one).
#[derive(Debug)]
struct HandoverMetrics {
    handovers: Family<HandoverLabels, Counter>,
    orig_dst_from_map: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoverLabels {
    role: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

impl HandoverMetrics {
    fn register(registry: &mut Registry) -> Self {
        let handovers = Family::<HandoverLabels, Counter>::default();
        registry.register(
            "ztunnel_handovers",
            "Upgrades this ztunnel took part in, by role (successor, predecessor) and \
             result (complete; predecessor_gone, successor_gone: the other one exited or \
             crashed first; refused; error)",
            handovers.clone(),
        );
        let orig_dst_from_map = Family::<ResultLabels, Counter>::default();
        registry.register(
            "ztunnel_orig_dst_from_map",
            "Original destinations ztunnel read from the map itself because no program \
             answered SO_ORIGINAL_DST (listening sockets inherited from a predecessor that \
             has exited), by result (hit, miss)",
            orig_dst_from_map.clone(),
        );
        Self {
            handovers,
            orig_dst_from_map,
        }
    }
}

// Registered names; the encoder appends `_total` to counters.
const OPENED: &str = "istio_tcp_connections_opened";
const CLOSED: &str = "istio_tcp_connections_closed";
const SENT: &str = "istio_tcp_sent_bytes";
const RECEIVED: &str = "istio_tcp_received_bytes";
const FAILED: &str = "istio_tcp_connections_failed";

impl Metrics {
    /// Builds the registry with every metric registered (gauges start at 0; the
    /// `direction="inbound"|"outbound"` active-connection series exist from the start).
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();

        let connections_opened = Family::<ConnLabels, Counter>::default();
        registry.register(
            OPENED,
            "The total number of TCP connections opened",
            connections_opened.clone(),
        );
        let connections_closed = Family::<ConnLabels, Counter>::default();
        registry.register(
            CLOSED,
            "The total number of TCP connections closed",
            connections_closed.clone(),
        );
        let sent_bytes = Family::<ConnLabels, Counter>::default();
        registry.register(
            SENT,
            "The size of total bytes sent during response in case of a TCP connection \
             (destination to source)",
            sent_bytes.clone(),
        );
        let received_bytes = Family::<ConnLabels, Counter>::default();
        registry.register(
            RECEIVED,
            "The size of total bytes received during request in case of a TCP connection \
             (source to destination)",
            received_bytes.clone(),
        );

        let connections_failed = Family::<ConnLabels, Counter>::default();
        registry.register(
            FAILED,
            "The total number of TCP connections that failed to establish (unstable)",
            connections_failed.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        registry.register("istio_build", "Istio component build info", build.clone());
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel".to_owned(),
                tag: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        let xds = Arc::new(XdsCollector::default());
        registry.register_collector(Box::new(Arc::clone(&xds)));
        let workload_manager = WorkloadManagerMetrics::register(&mut registry);
        registry.register_collector(Box::new(ProcessCollector));
        registry.register_collector(Box::new(RuntimeCollector {
            handle: tokio::runtime::Handle::try_current().ok(),
        }));

        let enrolled_pods = Gauge::default();
        registry.register(
            "ztunnel_enrolled_pods",
            "Pods on this node whose traffic ztunnel currently captures",
            enrolled_pods.clone(),
        );
        let active_connections = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "ztunnel_active_connections",
            "Proxied connections currently open, by direction",
            active_connections.clone(),
        );
        for direction in ["inbound", "outbound"] {
            active_connections
                .get_or_create(&DirectionLabels {
                    direction: direction.to_owned(),
                })
                .set(0);
        }
        let pool_connections = Gauge::default();
        registry.register(
            "ztunnel_hbone_pool_connections",
            "HTTP/2 connections in the outbound HBONE pool",
            pool_connections.clone(),
        );
        let pool_streams = Gauge::default();
        registry.register(
            "ztunnel_hbone_pool_streams",
            "CONNECT streams open on pooled HBONE connections",
            pool_streams.clone(),
        );
        let tls_client_configs = Gauge::default();
        registry.register(
            "ztunnel_tls_client_configs",
            format!(
                "TLS client configs kept for HBONE dials, one per source certificate and \
                 expected server identities (at most {}; the least recently used is dropped)",
                crate::tls::CLIENT_CONFIGS_LIMIT
            ),
            tls_client_configs.clone(),
        );
        let policy_denials = Family::<DenyLabels, Counter>::default();
        registry.register(
            "ztunnel_policy_denials",
            "Connections refused, by reason (policy, strict_mtls, unknown_workload) and \
             the denying policy (namespace/name, empty when no policy applies)",
            policy_denials.clone(),
        );
        let certificate_expiry = Family::<IdentityLabels, Gauge>::default();
        registry.register(
            "ztunnel_certificate_expiry_seconds",
            "Seconds until the workload certificate of an identity expires (negative once \
             expired)",
            certificate_expiry.clone(),
        );
        let control_plane_up = Family::<ComponentLabels, Gauge>::default();
        registry.register(
            "ztunnel_control_plane_up",
            "1 while the control-plane interface works (xds: stream to istiod open; ca: last \
             certificate request succeeded; zds: connected to istio-cni), else 0",
            control_plane_up.clone(),
        );
        let timeouts = Family::<StepLabels, Counter>::default();
        registry.register(
            "ztunnel_timeouts",
            "Data-path steps that took longer than their timeout, by step (tcp_connect, \
             tls_accept, h2_accept, tls_connect, hbone_dial, connect_response); each ended \
             its connection, or its stream for connect_response",
            timeouts.clone(),
        );
        for step in crate::limits::Step::ALL {
            timeouts
                .get_or_create(&StepLabels {
                    step: step.as_str().to_owned(),
                })
                .inc_by(0);
        }
        let dial_ports_skipped = Counter::default();
        registry.register(
            "ztunnel_inbound_dial_ports_skipped",
            "Source ports the kernel gave an inbound dial to the app that a client \
             connection ztunnel holds has too (the app's socket would need the tuple of \
             ztunnel's own accepted one, and the dial's SYN would reach ztunnel's socket); \
             each dial then took another port",
            dial_ports_skipped.clone(),
        );
        let listener_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "ztunnel_listener_connections",
            "Connections the pods' listeners hold (each counts against its listener's cap, \
             --max-connections-per-listener), by kind of listener",
            listener_connections.clone(),
        );
        let listener_saturated = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "ztunnel_listener_saturated",
            "Times a listener reached its connection cap and stopped accepting (new \
             connections waited in the kernel backlog), by kind of listener",
            listener_saturated.clone(),
        );
        for l in listener::POD {
            let labels = ListenerLabels {
                listener: l.to_owned(),
            };
            listener_connections.get_or_create(&labels).set(0);
            listener_saturated.get_or_create(&labels).inc_by(0);
        }
        let accept_errors = Family::<AcceptErrorLabels, Counter>::default();
        registry.register(
            "ztunnel_accept_errors",
            "Failed accept() calls, by kind of listener and error (emfile, enfile, enobufs, \
             enomem and other back off from 10 ms to 1 s; connection does not)",
            accept_errors.clone(),
        );
        registry.register_collector(Box::new(SocketsOpenCollector {
            listeners: listener_connections.clone(),
        }));
        let capture = Arc::new(CaptureCollector::default());
        registry.register_collector(Box::new(Arc::clone(&capture)));
        registry.register_collector(Box::new(LogCollector));
        let config = ConfigMetrics::register(&mut registry);
        let handover = HandoverMetrics::register(&mut registry);
        let drain = DrainMetrics::register(&mut registry);
        let dns = crate::dns::Metrics::register(&mut registry);

        Arc::new(Metrics {
            registry,
            connections_opened,
            connections_closed,
            sent_bytes,
            received_bytes,
            connections_failed,
            xds,
            workload_manager,
            enrolled_pods,
            active_connections,
            pool_connections,
            pool_streams,
            tls_client_configs,
            policy_denials,
            certificate_expiry,
            control_plane_up,
            timeouts,
            dial_ports_skipped,
            listener_connections,
            listener_saturated,
            accept_errors,
            capture,
            config,
            handover,
            drain,
            dns,
        })
    }

    /// Counts an upgrade (`role`: `successor` or `predecessor`).
    pub fn handover(&self, role: &str, result: &str) {
        self.handover
            .handovers
            .get_or_create(&HandoverLabels {
                role: escape(role).into_owned(),
                result: escape(result).into_owned(),
            })
            .inc();
    }

    /// Counts an original destination ztunnel looked up in the map itself.
    pub fn orig_dst_from_map(&self, result: &str) {
        self.handover
            .orig_dst_from_map
            .get_or_create(&ResultLabels {
                result: escape(result).into_owned(),
            })
            .inc();
    }

    /// A drain started with `at_start` proxied connections open.
    pub fn drain_started(&self, at_start: usize) {
        self.drain.draining.set(1);
        self.drain.set(drain_state::AT_START, at_start);
        self.drain.set(drain_state::REMAINING, at_start);
    }

    /// Proxied connections the drain still waits for.
    pub fn set_drain_remaining(&self, n: usize) {
        self.drain.set(drain_state::REMAINING, n);
    }

    /// Counts connections the drain timeout ended.
    pub fn drain_forced(&self, n: usize) {
        self.drain.forced.inc_by(n as u64);
    }

    /// Connections the pods' listeners hold now (accepted and not finished, whatever
    /// their stage), all kinds together.
    pub fn listener_connections_held(&self) -> i64 {
        listener::POD
            .iter()
            .map(|l| self.listener_connections(l).get())
            .sum()
    }

    /// Counts a config version not taken (`source`: `file`; `reason`: `empty`,
    /// `unreadable`, `invalid`).
    pub fn config_rejected(&self, source: &str, reason: &str) {
        self.config
            .rejected
            .get_or_create(&RejectedLabels {
                source: escape(source).into_owned(),
                reason: escape(reason).into_owned(),
            })
            .inc();
    }

    /// Counts a data-path step that took longer than its timeout.
    pub fn timed_out(&self, step: crate::limits::Step) {
        self.timeouts
            .get_or_create(&StepLabels {
                step: step.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts a source port an inbound dial gave up (see [`crate::proxy`]'s client tuples).
    pub fn dial_port_skipped(&self) {
        self.dial_ports_skipped.inc();
    }

    /// Sets how many removed objects are held in force while their removal settles.
    pub fn set_config_held(&self, n: i64) {
        self.config.held.set(n);
    }

    /// Counts a failed enrolment (`cgroup_scope` or `error`).
    pub fn enrolment_failed(&self, reason: &str) {
        self.config
            .enrolment_failures
            .get_or_create(&ReasonLabels {
                reason: escape(reason).into_owned(),
            })
            .inc();
    }

    /// The gauge of connections held by listeners of one kind ([`listener`]); the caller
    /// increments it per accepted connection and decrements it when the connection closes.
    pub fn listener_connections(&self, listener: &str) -> Gauge {
        self.listener_connections
            .get_or_create(&ListenerLabels {
                listener: escape(listener).into_owned(),
            })
            .clone()
    }

    /// Counts a listener finding itself at its connection cap.
    pub fn listener_saturated(&self, listener: &str) {
        self.listener_saturated
            .get_or_create(&ListenerLabels {
                listener: escape(listener).into_owned(),
            })
            .inc();
    }

    /// Counts a failed `accept()`.
    pub fn accept_failed(&self, listener: &str, error: crate::limits::AcceptError) {
        self.accept_errors
            .get_or_create(&AcceptErrorLabels {
                listener: escape(listener).into_owned(),
                error: error.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts a connection as opened (`istio_tcp_connections_opened_total`).
    pub fn connection_opened(&self, labels: &ConnLabels) {
        self.connections_opened
            .get_or_create(&labels.escaped())
            .inc();
    }

    /// Counts a connection as closed and adds its bytes.
    ///
    /// Directions are Istio's, which are Envoy's downstream view and the same for both
    /// reporters (istio.io "Istio Standard Metrics"; istio/istio#32399, kiali/kiali#6760):
    /// - `sent`: bytes from the **destination to the source**, the response direction
    ///   (`istio_tcp_sent_bytes_total`, "bytes sent during response"). For an outbound
    ///   (`reporter=source`) connection that is what ztunnel wrote back to the local app.
    /// - `received`: bytes from the **source to the destination**, the request direction
    ///   (`istio_tcp_received_bytes_total`, "bytes received during request").
    ///
    /// `labels` should be the labels given to [`Metrics::connection_opened`], except
    /// `response_flags`, which may now carry the outcome (as istio/ztunnel does): the
    /// closed count (and, for any flag but `-`, `istio_tcp_connections_failed_total`) goes
    /// under the flag, the bytes under `-` as istio/ztunnel counts them from the open. If
    /// bytes were already reported with [`Metrics::bytes_transferred`], pass only the rest.
    pub fn connection_closed(&self, labels: &ConnLabels, sent: u64, received: u64) {
        let labels = labels.escaped();
        self.connections_closed.get_or_create(&labels).inc();
        if response_flag::is_failure(&labels.response_flags) {
            self.connections_failed.get_or_create(&labels).inc();
        }
        if labels.response_flags == NO_RESPONSE_FLAGS {
            self.add_bytes(&labels, sent, received);
        } else {
            let opened = ConnLabels {
                response_flags: NO_RESPONSE_FLAGS.to_owned(),
                ..labels.into_owned()
            };
            self.add_bytes(&opened, sent, received);
        }
    }

    /// Adds bytes of a connection that is still open (same directions as
    /// [`Metrics::connection_closed`]). Optional: without it a long-lived connection's bytes
    /// appear only when it closes, while istio/ztunnel counts them as they flow.
    pub fn bytes_transferred(&self, labels: &ConnLabels, sent: u64, received: u64) {
        self.add_bytes(&labels.escaped(), sent, received);
    }

    /// Adds to both byte counters, creating the pair even for zero so every label set
    /// that closed a connection also has its byte series.
    fn add_bytes(&self, escaped: &ConnLabels, sent: u64, received: u64) {
        self.sent_bytes.get_or_create(escaped).inc_by(sent);
        self.received_bytes.get_or_create(escaped).inc_by(received);
    }

    /// Sets the number of open connections in one direction (`inbound` or `outbound`).
    pub fn set_active(&self, direction: &str, n: i64) {
        self.active_connections
            .get_or_create(&DirectionLabels {
                direction: escape(direction).into_owned(),
            })
            .set(n);
    }

    /// Counts a refused connection. `reason` is one of [`deny_reason`]; `policy` is the
    /// denying policy as `namespace/name`, or `""` when the refusal is not a policy's.
    pub fn policy_denied(&self, reason: &str, policy: &str) {
        self.policy_denials
            .get_or_create(&DenyLabels {
                reason: escape(reason).into_owned(),
                policy: escape(policy).into_owned(),
            })
            .inc();
    }

    /// Sets the number of pods whose traffic is captured on this node (also Istio's
    /// `workload_manager_active_proxy_count`).
    pub fn set_enrolled_pods(&self, n: i64) {
        self.enrolled_pods.set(n);
        self.workload_manager.active.set(n);
    }

    /// Sets the number of pods that should be captured but are not yet (enrolment failed
    /// and waits for its retry): Istio's `workload_manager_pending_proxy_count`.
    pub fn set_pending_pods(&self, n: i64) {
        self.workload_manager.pending.set(n);
    }

    /// Counts a pod's capture started (`workload_manager_proxies_started_total`).
    pub fn pod_enrolled(&self) {
        self.workload_manager.started.inc();
    }

    /// Counts a pod's capture stopped (`workload_manager_proxies_stopped_total`).
    pub fn pod_unenrolled(&self) {
        self.workload_manager.stopped.inc();
    }

    /// Replaces the xDS client's totals with a new reading (Istio's `istio_xds_*`).
    pub fn set_xds(&self, totals: &XdsTotals) {
        *self
            .xds
            .totals
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = totals.clone();
    }

    /// Sets whether a control-plane interface (`xds`, `ca`, `zds`) works.
    pub fn set_control_plane_up(&self, component: &str, up: bool) {
        self.control_plane_up
            .get_or_create(&ComponentLabels {
                component: component.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Sets the outbound HBONE pool's connection and stream counts.
    pub fn set_pool(&self, connections: i64, streams: i64) {
        self.pool_connections.set(connections);
        self.pool_streams.set(streams);
    }

    /// Sets how many TLS client configs the HBONE dials keep (`tls::ClientConfigs`).
    pub fn set_tls_client_configs(&self, configs: i64) {
        self.tls_client_configs.set(configs);
    }

    /// Sets the seconds left before `identity`'s certificate expires (`not_after - now`;
    /// negative once it has).
    pub fn set_certificate_expiry(&self, identity: &str, secs: i64) {
        self.certificate_expiry
            .get_or_create(&IdentityLabels {
                identity: escape(identity).into_owned(),
            })
            .set(secs);
    }

    /// Drops `identity`'s expiry series, for when its certificate is no longer held (the
    /// last pod with that identity left), so a stale countdown does not linger.
    pub fn remove_certificate(&self, identity: &str) {
        self.certificate_expiry.remove(&IdentityLabels {
            identity: escape(identity).into_owned(),
        });
    }

    /// Replaces the eBPF side's numbers with a new reading: `counters` are the programs'
    /// running totals by event name (`ztunnel_capture_events_total{event}`), `map_entries`
    /// the entries in each map (`ztunnel_map_entries{map}`). A name missing from a reading
    /// is no longer exported.
    pub fn set_capture(
        &self,
        counters: &BTreeMap<&'static str, u64>,
        map_entries: &BTreeMap<&'static str, u64>,
    ) {
        let mut snap = self
            .capture
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        snap.events.clone_from(counters);
        snap.map_entries.clone_from(map_entries);
    }

    /// Replaces the kernel's per-program statistics with a new reading
    /// (`ztunnel_bpf_program_runs_total{program}`, `ztunnel_bpf_program_run_seconds_total{program}`,
    /// `ztunnel_bpf_stats_enabled`).
    pub fn set_bpf_stats(&self, status: &crate::ebpf::run_stats::Status) {
        let mut snap = self
            .capture
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        snap.bpf_stats_enabled = status.enabled;
        snap.bpf_programs.clone_from(&status.programs);
    }

    /// Sets the number of `capture watch` streams open (`ztunnel_capture_watchers`; at
    /// most [`crate::diagnostics::MAX_WATCHERS`]).
    pub fn set_capture_watchers(&self, n: usize) {
        self.capture
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .watchers = n as i64;
    }

    /// The whole exposition, OpenMetrics text ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(fmt::Error) = prometheus_client::encoding::text::encode(&mut out, &self.registry)
        {
            // Writing into a String cannot fail and our collector only forwards the
            // writer's errors, so this is unreachable in practice; serve what we have.
            tracing::error!("failed to encode metrics; the exposition is incomplete");
        }
        out
    }

    /// The current value of one of the four Istio TCP counters for `labels` (0 when the
    /// series does not exist). `name` may be given with or without `_total`.
    pub fn counter_value(&self, name: &str, labels: &ConnLabels) -> u64 {
        let family = match name.strip_suffix("_total").unwrap_or(name) {
            OPENED => &self.connections_opened,
            CLOSED => &self.connections_closed,
            SENT => &self.sent_bytes,
            RECEIVED => &self.received_bytes,
            FAILED => &self.connections_failed,
            _ => return 0,
        };
        family.get(&labels.escaped()).map_or(0, |c| c.get())
    }
}

/// The eBPF side's last reading. A collector rather than `Family<_, Gauge>` so the totals
/// are typed `counter` in the exposition (and named `_total`), which is what they are:
/// `rate()` and `increase()` then handle a reset (maps recreated) correctly, and u64 totals
/// need no cast to a gauge's i64. prometheus-client's `Counter` cannot be set, and keeping
/// our own delta against the last reading would double-count across a map reset.
#[derive(Debug, Default)]
struct CaptureCollector {
    snapshot: Mutex<CaptureSnapshot>,
}

#[derive(Debug, Default)]
struct CaptureSnapshot {
    events: BTreeMap<&'static str, u64>,
    map_entries: BTreeMap<&'static str, u64>,
    bpf_stats_enabled: bool,
    bpf_programs: Vec<crate::ebpf::run_stats::ProgramRuns>,
    watchers: i64,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut family = encoder.encode_descriptor(
                "ztunnel_capture_events",
                "Events counted by the eBPF programs since they were loaded, by event.",
                None,
                MetricType::Counter,
            )?;
            for (event, total) in &snap.events {
                let labels = [("event", escape(event))];
                ConstCounter::new(*total).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "ztunnel_map_entries",
                "Entries currently in each eBPF map, by map.",
                None,
                MetricType::Gauge,
            )?;
            for (map, entries) in &snap.map_entries {
                let labels = [("map", escape(map))];
                ConstGauge::new(*entries).encode(family.encode_family(&labels)?)?;
            }
        }
        ConstGauge::new(snap.watchers).encode(encoder.encode_descriptor(
            "ztunnel_capture_watchers",
            "Open `capture watch` streams (at most 8); while any is open the capture programs report every decision.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::from(snap.bpf_stats_enabled)).encode(encoder.encode_descriptor(
            "ztunnel_bpf_stats_enabled",
            "1 while the kernel keeps BPF program statistics (asked through /bpf_stats, or kernel.bpf_stats_enabled set); the run counters grow only then.",
            None,
            MetricType::Gauge,
        )?)?;
        {
            let mut family = encoder.encode_descriptor(
                "ztunnel_bpf_program_runs",
                "Runs of each capture program counted by the kernel while BPF statistics were on, by program.",
                None,
                MetricType::Counter,
            )?;
            for p in &snap.bpf_programs {
                let labels = [("program", escape(&p.program))];
                ConstCounter::new(p.runs).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "ztunnel_bpf_program_run_seconds",
            "Time spent in each capture program counted by the kernel while BPF statistics were on, by program.",
            None,
            MetricType::Counter,
        )?;
        for p in &snap.bpf_programs {
            let labels = [("program", escape(&p.program))];
            // Exact up to 2^53 ns, over 100 days of run time.
            let secs = p.run_time_ns as f64 / 1e9;
            ConstCounter::new(secs).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `ztunnel_log_lines_dropped_total`, read from the log writer at scrape time.
#[derive(Debug)]
struct LogCollector;

impl Collector for LogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let family = encoder.encode_descriptor(
            "ztunnel_log_lines_dropped",
            "Log lines dropped because the queue to the log writer thread was full \
             (stderr not read fast enough); the data path never waits for the log",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(crate::telemetry::dropped_lines()).encode(family)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

/// Istio's in-pod mode metrics (`workload_manager_*`): a "proxy" there is a pod whose
/// capture ztunnel runs, so these follow enrolment.
#[derive(Debug)]
struct WorkloadManagerMetrics {
    active: Gauge,
    pending: Gauge,
    started: Counter,
    stopped: Counter,
}

impl WorkloadManagerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            active: Gauge::default(),
            pending: Gauge::default(),
            started: Counter::default(),
            stopped: Counter::default(),
        };
        registry.register(
            "workload_manager_active_proxy_count",
            "The total number current workloads with active proxies (unstable)",
            m.active.clone(),
        );
        registry.register(
            "workload_manager_pending_proxy_count",
            "The total number current workloads with pending proxies (unstable)",
            m.pending.clone(),
        );
        registry.register(
            "workload_manager_proxies_started",
            "The total number of proxies that were started (unstable)",
            m.started.clone(),
        );
        registry.register(
            "workload_manager_proxies_stopped",
            "The total number of proxies that were stopped (unstable)",
            m.stopped.clone(),
        );
        m
    }
}

/// What the xDS client counted since start: responses and their resources' bytes by type
/// URL, and stream ends by Istio's termination reason (`ConnectionError`, `Error`,
/// `Reconnect`, `Complete`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct XdsTotals {
    pub messages: BTreeMap<String, u64>,
    pub message_bytes: BTreeMap<String, u64>,
    pub terminations: BTreeMap<&'static str, u64>,
}

/// One counter family with one label, for a collector to encode.
struct CounterFamily<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    label: &'a str,
    samples: Vec<(&'a str, u64)>,
}

/// A per-worker count of the tokio runtime.
type PerWorker = fn(&tokio::runtime::RuntimeMetrics, usize) -> u64;

/// `istio_xds_*`, from the xDS client's last reading (a collector, as for the eBPF
/// counters: the totals are kept by the client and copied before each scrape).
#[derive(Debug, Default)]
struct XdsCollector {
    totals: Mutex<XdsTotals>,
}

impl Collector for XdsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let t = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let families = [
            CounterFamily {
                name: "istio_xds_connection_terminations",
                help: "The total number of completed connections to xds server (unstable)",
                unit: None,
                label: "reason",
                samples: t.terminations.iter().map(|(k, v)| (*k, *v)).collect(),
            },
            CounterFamily {
                name: "istio_xds_message",
                help: "Total number of messages received (unstable)",
                unit: None,
                label: "url",
                samples: t.messages.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
            },
            CounterFamily {
                name: "istio_xds_message",
                help: "Total number of bytes received (unstable)",
                unit: Some(Unit::Bytes),
                label: "url",
                samples: t
                    .message_bytes
                    .iter()
                    .map(|(k, v)| (k.as_str(), *v))
                    .collect(),
            },
        ];
        for CounterFamily {
            name,
            help,
            unit,
            label,
            samples,
        } in families
        {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for (value, total) in samples {
                let labels = [(label, escape(value))];
                ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// `process_open_fds` and `process_max_fds` (the soft `RLIMIT_NOFILE`), as Istio's ztunnel
/// exposes them, read at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // The directory's own descriptor is open while it is listed.
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            let open = entries.count().saturating_sub(1) as u64;
            let gauge = ConstGauge::new(open);
            gauge.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                gauge.metric_type(),
            )?)?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            let gauge = ConstGauge::new(soft);
            gauge.encode(encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of file descriptors",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: u64,
}

/// Istio's `tokio_*` runtime families, from the runtime the metrics were built on.
#[derive(Debug)]
struct RuntimeCollector {
    handle: Option<tokio::runtime::Handle>,
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(handle) = &self.handle else {
            return Ok(());
        };
        let m = handle.metrics();
        let gauges: [(&str, &str, usize); 3] = [
            (
                "tokio_num_workers",
                "the number of worker threads used by the runtime",
                m.num_workers(),
            ),
            (
                "tokio_global_queue_depth",
                "the number of tasks currently scheduled in the runtime's global queue",
                m.global_queue_depth(),
            ),
            (
                "tokio_num_alive_tasks",
                "the number of alive tasks in the runtime",
                m.num_alive_tasks(),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let workers = m.num_workers();
        {
            let mut family = encoder.encode_descriptor(
                "tokio_worker_total_busy_duration_seconds",
                "the amount of time worker threads have been busy",
                None,
                MetricType::Counter,
            )?;
            for w in 0..workers {
                let busy = m.worker_total_busy_duration(w).as_secs_f64();
                ConstCounter::new(busy)
                    .encode(family.encode_family(&WorkerLabels { worker: w as u64 })?)?;
            }
        }
        let counts: [(&str, &str, PerWorker); 2] = [
            (
                "tokio_worker_park_count",
                "the total number of times the given worker thread has parked",
                tokio::runtime::RuntimeMetrics::worker_park_count,
            ),
            (
                "tokio_worker_park_unpark_count",
                "the total number of times the given worker thread has parked and unparked",
                tokio::runtime::RuntimeMetrics::worker_park_unpark_count,
            ),
        ];
        for (name, help, value) in counts {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for w in 0..workers {
                ConstCounter::new(value(&m, w))
                    .encode(family.encode_family(&WorkerLabels { worker: w as u64 })?)?;
            }
        }
        Ok(())
    }
}

/// Istio's `istio_tcp_sockets_open{reporter}`: the sockets its listeners accepted and still
/// hold. Here that is what the pods' listeners hold (`ztunnel_listener_connections`):
/// :15001 on the source's side, :15006 and :15008 on the destination's.
#[derive(Debug)]
struct SocketsOpenCollector {
    listeners: Family<ListenerLabels, Gauge>,
}

impl Collector for SocketsOpenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let held = |l: &str| {
            self.listeners
                .get(&ListenerLabels {
                    listener: l.to_owned(),
                })
                .map_or(0, |g| g.get())
        };
        let mut family = encoder.encode_descriptor(
            "istio_tcp_sockets_open",
            "The current number of open TCP sockets (unstable)",
            None,
            MetricType::Gauge,
        )?;
        for (reporter, n) in [
            (REPORTER_SOURCE, held(listener::OUTBOUND)),
            (
                REPORTER_DESTINATION,
                held(listener::INBOUND) + held(listener::HBONE),
            ),
        ] {
            ConstGauge::new(n).encode(family.encode_family(&[("reporter", reporter)])?)?;
        }
        Ok(())
    }
}

fn needs_escape(v: &str) -> bool {
    v.contains(['\\', '"', '\n'])
}

/// Escapes a label value as the OpenMetrics text format requires (`\\`, `\"`, `\n`);
/// prometheus-client 0.24 writes label values verbatim, so an unescaped quote would cut
/// the line and make the whole scrape fail.
fn escape(v: &str) -> Cow<'_, str> {
    if !needs_escape(v) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 2);
    for c in v.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str(r#"\""#),
            '\n' => out.push_str(r"\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inbound HBONE connection from sleep to echo, filled as ztunnel would.
    fn inbound_sleep_to_echo() -> ConnLabels {
        ConnLabels {
            reporter: REPORTER_DESTINATION.into(),
            source_workload: "sleep".into(),
            source_canonical_service: "sleep".into(),
            source_canonical_revision: "v1".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
            source_app: "sleep".into(),
            source_version: "v1".into(),
            source_cluster: "Kubernetes".into(),
            destination_service: "echo.test.svc.cluster.local".into(),
            destination_service_namespace: "test".into(),
            destination_service_name: "echo".into(),
            destination_workload: "echo".into(),
            destination_canonical_service: "echo".into(),
            destination_canonical_revision: "latest".into(),
            destination_workload_namespace: "test".into(),
            destination_principal: "spiffe://cluster.local/ns/test/sa/echo".into(),
            destination_app: "echo".into(),
            destination_version: "latest".into(),
            destination_cluster: "Kubernetes".into(),
            connection_security_policy: SECURITY_MUTUAL_TLS.into(),
            source_region: "eu-west1".into(),
            source_zone: "eu-west1-b".into(),
            destination_region: "eu-west1".into(),
            destination_zone: "eu-west1-c".into(),
            ..ConnLabels::default()
        }
    }

    const SLEEP_TO_ECHO: &str = concat!(
        r#"{reporter="destination",source_workload="sleep",source_canonical_service="sleep","#,
        r#"source_canonical_revision="v1",source_workload_namespace="default","#,
        r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep",source_app="sleep","#,
        r#"source_version="v1",source_cluster="Kubernetes","#,
        r#"destination_service="echo.test.svc.cluster.local",destination_service_namespace="test","#,
        r#"destination_service_name="echo",destination_workload="echo","#,
        r#"destination_canonical_service="echo",destination_canonical_revision="latest","#,
        r#"destination_workload_namespace="test","#,
        r#"destination_principal="spiffe://cluster.local/ns/test/sa/echo",destination_app="echo","#,
        r#"destination_version="latest",destination_cluster="Kubernetes",request_protocol="tcp","#,
        r#"response_flags="-",connection_security_policy="mutual_tls","#,
        r#"source_region="eu-west1",source_zone="eu-west1-b","#,
        r#"destination_region="eu-west1",destination_zone="eu-west1-c"}"#,
    );

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn assert_line(text: &str, line: &str) {
        assert!(
            lines(text).contains(&line),
            "missing line\n  {line}\nin exposition:\n{text}"
        );
    }

    #[test]
    fn conn_labels_default_to_unknown() {
        let l = ConnLabels::default();
        assert_eq!(l.request_protocol, "tcp");
        assert_eq!(l.response_flags, "-");
        let others: Vec<&String> = l
            .fields()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| ![20, 21].contains(i))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(others.len(), 25);
        assert!(others.iter().all(|v| *v == UNKNOWN), "{others:?}");
    }

    #[test]
    fn default_labels_encode_in_istio_order() {
        let m = Metrics::new();
        m.connection_opened(&ConnLabels::default());
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .expect("opened series");
        let inner = line
            .trim_start_matches("istio_tcp_connections_opened_total{")
            .rsplit_once("} ")
            .expect("closing brace")
            .0;
        let pairs: Vec<(&str, &str)> = inner
            .split(',')
            .map(|kv| kv.split_once('=').expect("key=value"))
            .collect();
        let names: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, ISTIO_TCP_LABELS);
        for (k, v) in pairs {
            let want = match k {
                "request_protocol" => "\"tcp\"",
                "response_flags" => "\"-\"",
                _ => "\"unknown\"",
            };
            assert_eq!(v, want, "label {k}");
        }
    }

    #[test]
    fn opened_and_closed_connections_are_exposed_with_istio_names() {
        let m = Metrics::new();
        let l = inbound_sleep_to_echo();
        m.connection_opened(&l);
        m.connection_opened(&l);
        // sleep sent 9 bytes, echo answered 27: Istio counts the answer as "sent".
        m.bytes_transferred(&l, 20, 4);
        m.connection_closed(&l, 7, 5);
        let text = m.encode();

        assert_line(&text, "# TYPE istio_tcp_connections_opened counter");
        assert_line(&text, "# TYPE istio_tcp_sent_bytes counter");
        assert_line(
            &text,
            &format!("istio_tcp_connections_opened_total{SLEEP_TO_ECHO} 2"),
        );
        assert_line(
            &text,
            &format!("istio_tcp_connections_closed_total{SLEEP_TO_ECHO} 1"),
        );
        assert_line(
            &text,
            &format!("istio_tcp_sent_bytes_total{SLEEP_TO_ECHO} 27"),
        );
        assert_line(
            &text,
            &format!("istio_tcp_received_bytes_total{SLEEP_TO_ECHO} 9"),
        );
        assert_eq!(text.lines().last(), Some("# EOF"));

        assert_eq!(m.counter_value("istio_tcp_connections_opened_total", &l), 2);
        assert_eq!(m.counter_value("istio_tcp_connections_closed", &l), 1);
        assert_eq!(m.counter_value("istio_tcp_sent_bytes_total", &l), 27);
        assert_eq!(m.counter_value("istio_tcp_received_bytes_total", &l), 9);
        assert_eq!(m.counter_value("istio_no_such_metric", &l), 0);
        assert_eq!(
            m.counter_value("istio_tcp_sent_bytes", &ConnLabels::default()),
            0
        );
    }

    #[test]
    fn closing_with_a_flag_is_a_separate_series() {
        let m = Metrics::new();
        let l = inbound_sleep_to_echo();
        m.connection_opened(&l);
        let denied = ConnLabels {
            response_flags: "DENY".into(),
            ..l.clone()
        };
        m.connection_closed(&denied, 3, 4);
        assert_eq!(m.counter_value("istio_tcp_connections_closed", &l), 0);
        assert_eq!(m.counter_value("istio_tcp_connections_closed", &denied), 1);
        // Failed with a flag: counted as failed; istio/ztunnel's bytes stay under `-`.
        assert_eq!(m.counter_value("istio_tcp_connections_failed", &denied), 1);
        assert_eq!(m.counter_value("istio_tcp_connections_failed", &l), 0);
        assert_eq!(m.counter_value("istio_tcp_sent_bytes", &l), 3);
        assert_eq!(m.counter_value("istio_tcp_received_bytes", &l), 4);
        assert_eq!(m.counter_value("istio_tcp_sent_bytes", &denied), 0);
        // A clean close is not a failure.
        m.connection_closed(&l, 0, 0);
        assert_eq!(m.counter_value("istio_tcp_connections_failed", &l), 0);
    }

    /// Every family Istio's ztunnel exposes that applies here, with its type and label
    /// names in order (istio/ztunnel `src/proxy/metrics.rs`, `src/metrics/*.rs`,
    /// `src/xds/metrics.rs`, `src/inpod/metrics.rs`), after one connection and an xDS
    /// reading, on a tokio runtime as in the daemon.
    #[test]
    fn istio_families_types_and_labels_are_istios() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let m = rt.block_on(async { Metrics::new() });
        let l = inbound_sleep_to_echo();
        m.connection_opened(&l);
        m.connection_closed(
            &ConnLabels {
                response_flags: response_flag::CONNECT.into(),
                ..l.clone()
            },
            1,
            2,
        );
        m.set_xds(&XdsTotals {
            messages: BTreeMap::from([("type.googleapis.com/istio.workload.Address".into(), 2)]),
            message_bytes: BTreeMap::from([(
                "type.googleapis.com/istio.workload.Address".into(),
                300,
            )]),
            terminations: BTreeMap::from([("Reconnect", 1)]),
        });
        let text = m.encode();
        let istio: Vec<String> = ISTIO_TCP_LABELS.iter().map(|s| (*s).to_owned()).collect();
        let want: &[(&str, &str, Vec<String>)] = &[
            (
                "istio_tcp_connections_opened_total",
                "counter",
                istio.clone(),
            ),
            (
                "istio_tcp_connections_closed_total",
                "counter",
                istio.clone(),
            ),
            (
                "istio_tcp_connections_failed_total",
                "counter",
                istio.clone(),
            ),
            ("istio_tcp_sent_bytes_total", "counter", istio.clone()),
            ("istio_tcp_received_bytes_total", "counter", istio.clone()),
            ("istio_tcp_sockets_open", "gauge", vec!["reporter".into()]),
            (
                "istio_build",
                "gauge",
                vec!["component".into(), "tag".into()],
            ),
            (
                "istio_xds_connection_terminations_total",
                "counter",
                vec!["reason".into()],
            ),
            ("istio_xds_message_total", "counter", vec!["url".into()]),
            (
                "istio_xds_message_bytes_total",
                "counter",
                vec!["url".into()],
            ),
            ("workload_manager_active_proxy_count", "gauge", vec![]),
            ("workload_manager_pending_proxy_count", "gauge", vec![]),
            ("workload_manager_proxies_started_total", "counter", vec![]),
            ("workload_manager_proxies_stopped_total", "counter", vec![]),
            ("process_open_fds", "gauge", vec![]),
            ("process_max_fds", "gauge", vec![]),
            ("tokio_num_workers", "gauge", vec![]),
            ("tokio_global_queue_depth", "gauge", vec![]),
            ("tokio_num_alive_tasks", "gauge", vec![]),
            (
                "tokio_worker_total_busy_duration_seconds_total",
                "counter",
                vec!["worker".into()],
            ),
            (
                "tokio_worker_park_count_total",
                "counter",
                vec!["worker".into()],
            ),
            (
                "tokio_worker_park_unpark_count_total",
                "counter",
                vec!["worker".into()],
            ),
        ];
        for (sample, kind, labels) in want {
            let family = sample.strip_suffix("_total").unwrap_or(sample);
            assert_line(&text, &format!("# TYPE {family} {kind}"));
            let line = text
                .lines()
                .find(|l| {
                    l.strip_prefix(sample)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
                .unwrap_or_else(|| panic!("no sample of {sample} in:\n{text}"));
            let names: Vec<String> = line
                .split_once('{')
                .and_then(|(_, rest)| rest.rsplit_once('}'))
                .map(|(inner, _)| {
                    inner
                        .split("\",")
                        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(&names, labels, "{line}");
        }
        assert_line(&text, r#"istio_build{component="ztunnel",tag="0.1.0"} 1"#);
        assert_line(&text, "tokio_num_workers 2");
        assert_line(
            &text,
            "istio_xds_message_bytes_total{url=\"type.googleapis.com/istio.workload.Address\"} 300",
        );
        assert_line(
            &text,
            r#"istio_xds_connection_terminations_total{reason="Reconnect"} 1"#,
        );
        assert_line(&text, r#"istio_tcp_sockets_open{reporter="source"} 0"#);
        let fds = text
            .lines()
            .find_map(|l| l.strip_prefix("process_open_fds "))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("process_open_fds");
        assert!(fds > 2, "{fds} open descriptors");
        drop(m);
        rt.shutdown_background();
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        let l = ConnLabels {
            source_workload: "a\"b\\c\nd".into(),
            ..ConnLabels::default()
        };
        m.connection_opened(&l);
        assert_eq!(m.counter_value("istio_tcp_connections_opened", &l), 1);
        let text = m.encode();
        assert!(text.contains(r#",source_workload="a\"b\\c\nd","#), "{text}");
        m.policy_denied(deny_reason::POLICY, "ns/\"quoted\"");
        assert_line(
            &m.encode(),
            r#"ztunnel_policy_denials_total{reason="policy",policy="ns/\"quoted\""} 1"#,
        );
    }

    #[test]
    fn ztunnel_gauges_and_denials_are_exposed() {
        let m = Metrics::new();
        let text = m.encode();
        assert_line(&text, "ztunnel_enrolled_pods 0");
        assert_line(
            &text,
            r#"ztunnel_active_connections{direction="inbound"} 0"#,
        );
        assert_line(
            &text,
            r#"ztunnel_active_connections{direction="outbound"} 0"#,
        );

        m.set_enrolled_pods(3);
        m.set_active("outbound", 7);
        m.set_pool(2, 5);
        m.set_tls_client_configs(3);
        m.policy_denied(deny_reason::POLICY, "test/deny-sleep");
        m.policy_denied(deny_reason::POLICY, "test/deny-sleep");
        m.policy_denied(deny_reason::STRICT_MTLS, "");
        m.set_certificate_expiry("spiffe://cluster.local/ns/test/sa/echo", 86_000);
        m.set_certificate_expiry("spiffe://cluster.local/ns/old/sa/gone", -5);
        m.remove_certificate("spiffe://cluster.local/ns/old/sa/gone");

        let text = m.encode();
        assert_line(&text, "# TYPE ztunnel_enrolled_pods gauge");
        assert_line(&text, "ztunnel_enrolled_pods 3");
        assert_line(
            &text,
            r#"ztunnel_active_connections{direction="outbound"} 7"#,
        );
        assert_line(&text, "ztunnel_hbone_pool_connections 2");
        assert_line(&text, "ztunnel_hbone_pool_streams 5");
        assert_line(&text, "ztunnel_tls_client_configs 3");
        assert_line(&text, "# TYPE ztunnel_policy_denials counter");
        assert_line(
            &text,
            r#"ztunnel_policy_denials_total{reason="policy",policy="test/deny-sleep"} 2"#,
        );
        assert_line(
            &text,
            r#"ztunnel_policy_denials_total{reason="strict_mtls",policy=""} 1"#,
        );
        assert_line(
            &text,
            r#"ztunnel_certificate_expiry_seconds{identity="spiffe://cluster.local/ns/test/sa/echo"} 86000"#,
        );
        assert!(!text.contains("ns/old/sa/gone"), "{text}");
    }

    #[test]
    fn limit_metrics_exist_from_the_start_and_count() {
        use crate::limits::{AcceptError, Step};
        let m = Metrics::new();
        let text = m.encode();
        for step in Step::ALL {
            assert_line(
                &text,
                &format!(r#"ztunnel_timeouts_total{{step="{}"}} 0"#, step.as_str()),
            );
        }
        for l in listener::POD {
            assert_line(
                &text,
                &format!(r#"ztunnel_listener_connections{{listener="{l}"}} 0"#),
            );
            assert_line(
                &text,
                &format!(r#"ztunnel_listener_saturated_total{{listener="{l}"}} 0"#),
            );
        }
        m.timed_out(Step::TlsAccept);
        m.timed_out(Step::TlsAccept);
        m.listener_saturated(listener::HBONE);
        m.accept_failed(listener::OUTBOUND, AcceptError::Emfile);
        let g = m.listener_connections(listener::INBOUND);
        g.inc();
        g.inc();
        let text = m.encode();
        assert_line(&text, "# TYPE ztunnel_timeouts counter");
        assert_line(&text, r#"ztunnel_timeouts_total{step="tls_accept"} 2"#);
        assert_line(
            &text,
            r#"ztunnel_listener_saturated_total{listener="hbone"} 1"#,
        );
        assert_line(
            &text,
            r#"ztunnel_accept_errors_total{listener="outbound",error="emfile"} 1"#,
        );
        assert_line(&text, "# TYPE ztunnel_listener_connections gauge");
        assert_line(
            &text,
            r#"ztunnel_listener_connections{listener="inbound"} 2"#,
        );
    }

    #[test]
    fn drain_metrics_exist_from_the_start_and_follow_the_drain() {
        let m = Metrics::new();
        let text = m.encode();
        assert_line(&text, "ztunnel_draining 0");
        assert_line(&text, r#"ztunnel_drain_connections{state="at_start"} 0"#);
        assert_line(&text, r#"ztunnel_drain_connections{state="remaining"} 0"#);
        assert_line(&text, "ztunnel_drain_forced_connections_total 0");
        m.drain_started(4);
        m.set_drain_remaining(3);
        m.drain_forced(3);
        let text = m.encode();
        assert_line(&text, "# TYPE ztunnel_draining gauge");
        assert_line(&text, "ztunnel_draining 1");
        assert_line(&text, r#"ztunnel_drain_connections{state="at_start"} 4"#);
        assert_line(&text, r#"ztunnel_drain_connections{state="remaining"} 3"#);
        assert_line(&text, "# TYPE ztunnel_drain_forced_connections counter");
        assert_line(&text, "ztunnel_drain_forced_connections_total 3");
    }

    #[test]
    fn listener_connections_held_sums_every_kind() {
        let m = Metrics::new();
        assert_eq!(m.listener_connections_held(), 0);
        m.listener_connections(listener::HBONE).inc();
        m.listener_connections(listener::OUTBOUND).inc();
        m.listener_connections(listener::OUTBOUND).inc();
        assert_eq!(m.listener_connections_held(), 3);
        m.listener_connections(listener::OUTBOUND).dec();
        assert_eq!(m.listener_connections_held(), 2);
    }

    #[test]
    fn capture_readings_replace_the_previous_one() {
        let m = Metrics::new();
        let counters = BTreeMap::from([("connect_captured", 10), ("orig_dst_hit", 4)]);
        let maps = BTreeMap::from([("ORIG_DST_BY_COOKIE", 3), ("POD_ADDRS", 2)]);
        m.set_capture(&counters, &maps);
        let text = m.encode();
        assert_line(&text, "# TYPE ztunnel_capture_events counter");
        assert_line(
            &text,
            r#"ztunnel_capture_events_total{event="connect_captured"} 10"#,
        );
        assert_line(
            &text,
            r#"ztunnel_capture_events_total{event="orig_dst_hit"} 4"#,
        );
        assert_line(&text, "# TYPE ztunnel_map_entries gauge");
        assert_line(&text, r#"ztunnel_map_entries{map="ORIG_DST_BY_COOKIE"} 3"#);
        assert_line(&text, r#"ztunnel_map_entries{map="POD_ADDRS"} 2"#);

        // Totals are set, not added; a name absent from the new reading disappears.
        let counters = BTreeMap::from([("connect_captured", 12)]);
        m.set_capture(&counters, &BTreeMap::new());
        let text = m.encode();
        assert_line(
            &text,
            r#"ztunnel_capture_events_total{event="connect_captured"} 12"#,
        );
        assert!(!text.contains("orig_dst_hit"), "{text}");
        assert!(!text.contains("POD_ADDRS"), "{text}");
        assert_eq!(text.lines().last(), Some("# EOF"));
    }
}
