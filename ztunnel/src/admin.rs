//! The admin API on loopback (default 127.0.0.1:15000): `/config_dump` (JSON of the
//! running state), `/fast_path` (GET shows, POST `?enabled=true|false` switches),
//! `/bpf_stats` (GET shows the kernel's per-program statistics, POST
//! `?enabled=true[&duration=10m]|false` switches them), `/logging` and `/quitquitquit`
//! (drain, then exit).
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{
    app::{EnrolledPodInfo, Shared},
    config::Config,
    ebpf::{Features, Occupancy},
    proxy::ConnectionRecord,
};

/// What `/config_dump` returns: Istio ztunnel's sections with its field names and shapes
/// (`workloads`, `services`, `policies`, `stagedServices`, `certificates`, `version`,
/// `config`, `staticConfig`, and in-pod mode's `workloadState`), so that
/// `istioctl ztunnel-config` reads it, then ztunnel's own sections under their own names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    /// Every workload the store knows.
    pub workloads: Vec<WorkloadDump>,
    pub services: Vec<ServiceDump>,
    /// Authorization policies in Istio's xDS shape (rules → clauses → matches).
    pub policies: Vec<PolicyDump>,
    /// Istio's endpoints whose service it has not received yet. Always empty here: a
    /// service's endpoints are chosen by its selector from the workloads known, so none
    /// waits for its service.
    #[serde(default)]
    pub staged_services: BTreeMap<String, BTreeMap<String, EndpointDump>>,
    pub certificates: Vec<CertificateDump>,
    pub version: VersionDump,
    /// Istio's settings (its key names) that exist here.
    pub config: serde_json::Value,
    /// What a local file says (`--workloads`), as Istio dumps its `LOCAL_XDS_PATH` file.
    pub static_config: serde_json::Value,
    /// Each enrolled pod by uid, as Istio's in-pod mode shows it (read by
    /// `istioctl ztunnel-config connections`).
    #[serde(default)]
    pub workload_state: BTreeMap<String, WorkloadStateDump>,

    /// ztunnel's own settings, by its flag names.
    pub ztunnel_config: serde_json::Value,
    /// Authorization policies in the workload file's shape (`from`, `to`, `when`).
    pub authorization_policies: Vec<crate::policy::Authorization>,
    pub peer_authentications: Vec<crate::policy::PeerAuthentication>,
    pub enrolled_pods: Vec<EnrolledPodInfo>,
    pub capture: CaptureDump,
    pub connections: ConnectionsDump,
    /// The last upgrade this ztunnel took part in.
    #[serde(default)]
    pub handover: crate::app::HandoverStatus,
    /// The DNS proxy: its upstreams and each enrolled pod's counters.
    #[serde(default)]
    pub dns: crate::dns::DnsDump,
}

/// A workload, with Istio ztunnel's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadDump {
    pub uid: String,
    pub workload_ips: Vec<std::net::IpAddr>,
    /// `HBONE` or `TCP`.
    pub protocol: String,
    /// `Standard` (host-network pods are never captured, as in Istio).
    pub network_mode: String,
    pub name: String,
    pub namespace: String,
    pub trust_domain: String,
    pub service_account: String,
    #[serde(default)]
    pub network: String,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub node: String,
    /// `Healthy` (the local file has no health; unhealthy xDS workloads back no service).
    pub status: String,
    pub cluster_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<crate::state::Locality>,
    /// The workload's waypoint, in Istio's shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddressDump>,
    /// The services the workload backs, `namespace/hostname`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Istio's load-balancing weight; every endpoint weighs the same here (1).
    pub capacity: u32,
    /// The SPIFFE identity (ours: Istio derives it from the fields above).
    pub identity: String,
}

/// A service, with Istio ztunnel's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDump {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `network/ip`, as Istio writes a network address.
    pub vips: Vec<String>,
    /// Service port → target port.
    pub ports: BTreeMap<u16, u16>,
    /// Endpoints by workload uid.
    pub endpoints: BTreeMap<String, EndpointDump>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The service's waypoint, in Istio's shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddressDump>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_waypoints: Vec<WeightedWaypointDump>,
    /// Istio's `canonical`: the service is a Kubernetes Service (not a ServiceEntry).
    pub canonical: bool,
    /// Istio's `visibility`: every client may reach it.
    pub visibility: String,
}

/// A waypoint reference as Istio's ztunnel dumps a `GatewayAddress`: `destination` is
/// `<network>/<ip>` for an address, `<namespace>/<hostname>` for a hostname.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddressDump {
    pub destination: String,
    pub hbone_mtls_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedWaypointDump {
    pub destination: GatewayAddressDump,
    pub weight: u32,
}

impl GatewayAddressDump {
    /// `namespace`: the referring object's, for a hostname that names none.
    fn of(wp: &crate::state::WaypointRef, namespace: &str) -> Self {
        let destination = match (&wp.address, &wp.hostname) {
            (Some(a), _) => format!("/{a}"),
            (None, Some(h)) => format!("{}/{h}", wp.namespace.as_deref().unwrap_or(namespace)),
            (None, None) => String::new(),
        };
        Self {
            destination,
            hbone_mtls_port: wp.port,
        }
    }
}

/// One endpoint of a service, with Istio ztunnel's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDump {
    pub workload_uid: String,
    /// Service port → the endpoint's port.
    pub port: BTreeMap<u16, u16>,
    /// `Healthy`.
    pub status: String,
}

/// An authorization policy as Istio's ztunnel dumps it: `rules` is a list of rules, each a
/// list of clauses (all must match), each a list of matches (one must match).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDump {
    pub name: String,
    pub namespace: String,
    /// `Global`, `Namespace` or `WorkloadSelector`.
    pub scope: String,
    /// `Allow` or `Deny`.
    pub action: String,
    pub rules: Vec<Vec<Vec<MatchDump>>>,
    pub dry_run: bool,
}

/// One match of a clause, with Istio's field names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchDump {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatchDump>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatchDump>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatchDump>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatchDump>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// A string match as Istio's ztunnel serializes it (`{"Exact": "x"}`, `{"Presence": []}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StringMatchDump {
    Prefix(String),
    Suffix(String),
    Exact(String),
    Presence(),
}

impl From<&crate::policy::StringMatch> for StringMatchDump {
    fn from(m: &crate::policy::StringMatch) -> Self {
        use crate::policy::StringMatch as M;
        match m {
            M::Exact(v) => Self::Exact(v.clone()),
            M::Prefix(v) => Self::Prefix(v.clone()),
            M::Suffix(v) => Self::Suffix(v.clone()),
            M::Presence => Self::Presence(),
        }
    }
}

impl From<&crate::policy::Match> for MatchDump {
    fn from(m: &crate::policy::Match) -> Self {
        let strings = |v: &[crate::policy::StringMatch]| v.iter().map(Into::into).collect();
        let nets = |v: &[crate::policy::IpNet]| v.iter().map(ToString::to_string).collect();
        MatchDump {
            namespaces: strings(&m.namespaces),
            not_namespaces: strings(&m.not_namespaces),
            principals: strings(&m.principals),
            not_principals: strings(&m.not_principals),
            source_ips: nets(&m.source_ips),
            not_source_ips: nets(&m.not_source_ips),
            destination_ips: nets(&m.destination_ips),
            not_destination_ips: nets(&m.not_destination_ips),
            destination_ports: m.destination_ports.clone(),
            not_destination_ports: m.not_destination_ports.clone(),
        }
    }
}

impl From<&crate::policy::Authorization> for PolicyDump {
    /// As istiod writes an AuthorizationPolicy for ztunnel: a rule's `from` is its first
    /// clause, `to` the next, and each `when` entry a clause of one match.
    fn from(a: &crate::policy::Authorization) -> Self {
        use crate::policy::{Action, Scope};
        let rules = a
            .rules
            .iter()
            .map(|r| {
                let mut clauses: Vec<Vec<MatchDump>> = Vec::new();
                for part in [&r.from, &r.to].into_iter().flatten() {
                    clauses.push(part.iter().map(Into::into).collect());
                }
                for w in r.when.iter().flatten() {
                    clauses.push(vec![w.into()]);
                }
                clauses
            })
            .collect();
        PolicyDump {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope: match a.scope {
                Scope::Global => "Global",
                Scope::Namespace => "Namespace",
                Scope::WorkloadSelector => "WorkloadSelector",
            }
            .to_owned(),
            action: match a.action {
                Action::Allow => "Allow",
                Action::Deny => "Deny",
            }
            .to_owned(),
            rules,
            dry_run: false,
        }
    }
}

/// A workload certificate, with Istio ztunnel's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateDump {
    pub identity: String,
    /// `Available`, `Initializing` or `Unavailable: <why>`, as Istio's ztunnel writes it.
    pub state: String,
    /// The leaf, then intermediates.
    pub cert_chain: Vec<CertDump>,
    /// The trust anchors.
    pub root_certs: Vec<CertDump>,
    /// Seconds until the leaf expires (0 when expired or missing); ours.
    pub expiry_seconds: u64,
    /// Why the last fetch failed; ours.
    pub error: Option<String>,
}

/// One certificate, with Istio ztunnel's field names and encodings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    /// The PEM text, base64-encoded (as Istio's dump carries it).
    pub pem: String,
    /// Decimal.
    pub serial_number: String,
    /// RFC 3339.
    pub valid_from: String,
    /// RFC 3339.
    pub expiration_time: String,
}

impl CertDump {
    /// The certificate's PEM text.
    pub fn pem_text(&self) -> Option<String> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.pem)
            .ok()?;
        String::from_utf8(bytes).ok()
    }

    fn new(der: &[u8]) -> Self {
        use base64::Engine as _;
        use x509_parser::prelude::FromDer as _;
        let pem = crate::identity::certificate_pem(der);
        let parsed = x509_parser::certificate::X509Certificate::from_der(der).ok();
        let time = |t: Option<i64>| {
            t.and_then(|secs| u64::try_from(secs).ok())
                .map(|secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        };
        CertDump {
            pem: base64::engine::general_purpose::STANDARD.encode(pem),
            serial_number: parsed
                .as_ref()
                .map(|(_, c)| c.serial.to_string())
                .unwrap_or_default(),
            valid_from: rfc3339(time(
                parsed
                    .as_ref()
                    .map(|(_, c)| c.validity().not_before.timestamp()),
            )),
            expiration_time: rfc3339(time(
                parsed
                    .as_ref()
                    .map(|(_, c)| c.validity().not_after.timestamp()),
            )),
        }
    }
}

/// Istio's build information, filled with this build's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionDump {
    pub version: String,
    pub rust_version: String,
    pub build_profile: String,
    /// The Istio release whose surfaces this build follows (its `istio_build` tag).
    pub istio_version: String,
    pub crypto_provider: String,
}

impl VersionDump {
    fn current() -> Self {
        VersionDump {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            rust_version: env!("CARGO_PKG_RUST_VERSION").to_owned(),
            build_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_owned(),
            istio_version: env!("CARGO_PKG_VERSION").to_owned(),
            crypto_provider: crate::tls::crypto_provider_name(),
        }
    }
}

/// An enrolled pod as Istio's in-pod mode shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStateDump {
    /// `Up`.
    pub state: String,
    pub connections: WorkloadConnectionsDump,
    pub info: WorkloadInfoDump,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadConnectionsDump {
    pub inbound: Vec<PodConnectionDump>,
    pub outbound: Vec<PodConnectionDump>,
}

/// An open connection of a pod, with Istio's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodConnectionDump {
    pub src: String,
    pub original_dst: String,
    pub actual_dst: String,
    /// `HBONE` or `TCP`.
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfoDump {
    pub name: String,
    pub namespace: String,
    pub trust_domain: String,
    pub service_account: String,
}

fn rfc3339(t: Option<std::time::SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default()
}

fn state_dump(
    shared: &Shared,
) -> (
    Vec<WorkloadDump>,
    Vec<ServiceDump>,
    std::sync::Arc<crate::state::Store>,
) {
    let store = shared.proxy.store();
    // Each workload's services (`namespace/hostname`), from one pass over the endpoints.
    let mut services_of: HashMap<String, Vec<String>> = HashMap::new();
    for (i, s) in store.cfg.services.iter().enumerate() {
        let name = format!("{}/{}", s.namespace, s.hostname());
        for e in store.endpoints(i) {
            let list = services_of.entry(e.key()).or_default();
            if list.last() != Some(&name) {
                list.push(name.clone());
            }
        }
    }
    let services_of = |w: &crate::state::Workload| -> Vec<String> {
        services_of.get(&w.key()).cloned().unwrap_or_default()
    };
    let workloads = store
        .cfg
        .workloads
        .iter()
        .map(|w| WorkloadDump {
            uid: store.uid(w),
            workload_ips: w.addresses.clone(),
            protocol: match store.protocol(w) {
                crate::state::Protocol::Hbone => "HBONE",
                crate::state::Protocol::Tcp => "TCP",
            }
            .to_owned(),
            network_mode: "Standard".to_owned(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            trust_domain: store.trust_domain(w).to_owned(),
            service_account: w.service_account.clone(),
            network: w.network.clone(),
            workload_name: w.workload_name(),
            workload_type: w.workload_type(),
            canonical_name: w.canonical_name(),
            canonical_revision: w.canonical_revision(),
            node: w.node.clone(),
            status: "Healthy".to_owned(),
            cluster_id: store.cfg.cluster.clone(),
            locality: w.locality.clone(),
            waypoint: w
                .waypoint
                .as_ref()
                .map(|wp| GatewayAddressDump::of(wp, &w.namespace)),
            services: services_of(w),
            capacity: 1,
            identity: store.identity(w),
        })
        .collect();
    let services = store
        .cfg
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let ports: BTreeMap<u16, u16> = s
                .ports
                .iter()
                .map(|p| (p.port, p.target_port.unwrap_or(p.port)))
                .collect();
            ServiceDump {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname(),
                vips: s.addresses.iter().map(|a| format!("/{a}")).collect(),
                endpoints: store
                    .endpoints(i)
                    .map(|w| {
                        let uid = store.uid(w);
                        let ep = EndpointDump {
                            workload_uid: uid.clone(),
                            port: ports.clone(),
                            status: "Healthy".to_owned(),
                        };
                        (uid, ep)
                    })
                    .collect(),
                ports,
                subject_alt_names: s.subject_alt_names.clone(),
                waypoint: s
                    .waypoint
                    .as_ref()
                    .map(|wp| GatewayAddressDump::of(wp, &s.namespace)),
                weighted_waypoints: s
                    .weighted_waypoints
                    .iter()
                    .map(|w| WeightedWaypointDump {
                        destination: GatewayAddressDump::of(&w.waypoint, &s.namespace),
                        weight: w.weight,
                    })
                    .collect(),
                canonical: true,
                visibility: "Public".to_owned(),
            }
        })
        .collect();
    (workloads, services, store)
}

fn certificates(shared: &Shared) -> Vec<CertificateDump> {
    let now = std::time::SystemTime::now();
    shared
        .proxy
        .certs
        .snapshot()
        .into_iter()
        .map(|c| CertificateDump {
            identity: c.identity.to_string(),
            state: match c.state {
                "available" => "Available".to_owned(),
                "pending" => "Initializing".to_owned(),
                _ => format!(
                    "Unavailable: {}",
                    c.error.as_deref().unwrap_or("no certificate")
                ),
            },
            cert_chain: c.chain.iter().map(|d| CertDump::new(d)).collect(),
            root_certs: c.roots.iter().map(|d| CertDump::new(d)).collect(),
            expiry_seconds: c
                .not_after
                .and_then(|t| t.duration_since(now).ok())
                .map_or(0, |d| d.as_secs()),
            error: c.error,
        })
        .collect()
}

/// Istio's setting names for the settings that exist here (istio/ztunnel `src/config.rs`
/// `Config`, serialized in camelCase). Durations as serde writes a `Duration`.
fn istio_config(cfg: &Config, cluster: &str) -> serde_json::Value {
    let duration = |d: std::time::Duration| serde_json::json!({ "secs": d.as_secs(), "nanos": d.subsec_nanos() });
    let on_pod = |port: u16| format!("[::]:{port}");
    let istio_mode = cfg.source == crate::config::Source::Istio;
    let pool = crate::hbone::PoolSettings::default();
    let mut c = serde_json::json!({
        "proxy": true,
        "dnsProxy": cfg.dns_capture,
        "adminAddr": cfg.admin_addr.to_string(),
        "statsAddr": cfg.metrics_addr.to_string(),
        "readinessAddr": cfg.readiness_addr.to_string(),
        "inboundAddr": on_pod(ztunnel_common::ports::HBONE),
        "inboundPlaintextAddr": on_pod(ztunnel_common::ports::INBOUND_PLAINTEXT),
        "outboundAddr": format!("127.0.0.1:{}", ztunnel_common::ports::OUTBOUND),
        "illegalPorts": ztunnel_common::ports::NEVER_CAPTURED,
        "localNode": cfg.node,
        "proxyMode": "Shared",
        "clusterId": cluster,
        "secretTtl": duration(cfg.cert_lifetime),
        "selfTerminationDeadline": duration(crate::drain::timeout(
            cfg.drain_timeout,
            cfg.termination_grace_period_seconds,
        )),
        "poolMaxStreamsPerConn": pool.max_streams_per_conn,
        "poolUnusedReleaseTimeout": duration(pool.idle_timeout),
        "windowSize": pool.initial_stream_window,
        "connectionWindowSize": pool.connection_window,
        "frameSize": pool.max_frame_size,
    });
    if istio_mode {
        c["xdsAddress"] = cfg.istio.xds_address.clone().into();
        c["caAddress"] = cfg
            .istio
            .ca_address
            .clone()
            .unwrap_or_else(|| cfg.istio.xds_address.clone())
            .into();
        c["inpodUds"] = cfg.istio.zds_socket.display().to_string().into();
    }
    c
}

/// The workload file's content as read (Istio's `staticConfig` holds its local file's).
fn static_config(cfg: &Config, store: &crate::state::Store) -> serde_json::Value {
    if cfg.source == crate::config::Source::File {
        serde_json::json!({
            "workloads": store.cfg.workloads,
            "services": store.cfg.services,
            "policies": store.cfg.policies,
        })
    } else {
        serde_json::json!({ "workloads": [], "services": [], "policies": [] })
    }
}

fn workload_state(
    shared: &Shared,
    store: &crate::state::Store,
    list: &[ConnectionRecord],
) -> BTreeMap<String, WorkloadStateDump> {
    use crate::proxy::Direction;
    shared
        .enrolled_info()
        .iter()
        .filter_map(|pod| {
            let w = store.workload(&pod.name)?;
            let mut connections = WorkloadConnectionsDump::default();
            for c in list
                .iter()
                .filter(|c| c.pod == pod.name && c.outcome.is_none())
            {
                let protocol = if c.hbone_addr.is_some() {
                    "HBONE"
                } else {
                    "TCP"
                };
                let actual = c.hbone_addr.map_or(c.dst, |h| {
                    std::net::SocketAddr::new(h.ip(), ztunnel_common::ports::HBONE)
                });
                let dump = PodConnectionDump {
                    src: c.src.to_string(),
                    original_dst: c.dst.to_string(),
                    actual_dst: actual.to_string(),
                    protocol: protocol.to_owned(),
                };
                match c.direction {
                    Direction::Inbound => connections.inbound.push(dump),
                    Direction::Outbound => connections.outbound.push(dump),
                }
            }
            Some((
                store.uid(w),
                WorkloadStateDump {
                    state: "Up".to_owned(),
                    connections,
                    info: WorkloadInfoDump {
                        name: w.name.clone(),
                        namespace: w.namespace.clone(),
                        trust_domain: store.trust_domain(w).to_owned(),
                        service_account: w.service_account.clone(),
                    },
                },
            ))
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureDump {
    pub mode: String,
    pub features: serde_json::Value,
    pub fast_path: bool,
    pub pin_dir: String,
    pub occupancy: Occupancy,
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The kernel's run count and run time per program, counted only while statistics
    /// are on (`/bpf_stats`).
    #[serde(default)]
    pub bpf_stats: crate::ebpf::run_stats::Status,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsDump {
    pub opened_total: u64,
    /// Pooled outbound HBONE connections and the streams open on them.
    pub hbone_pool_connections: usize,
    pub hbone_pool_streams: usize,
    pub list: Vec<ConnectionRecord>,
}

pub fn dump(cfg: &Config, shared: &Shared) -> ConfigDump {
    let features: &Features = shared.capture.features();
    let (opened_total, list) = shared.proxy.connections.snapshot();
    let (workloads, services, store) = state_dump(shared);
    ConfigDump {
        workloads,
        services,
        policies: store.cfg.policies.iter().map(PolicyDump::from).collect(),
        staged_services: BTreeMap::new(),
        certificates: certificates(shared),
        version: VersionDump::current(),
        config: istio_config(cfg, &store.cfg.cluster),
        static_config: static_config(cfg, &store),
        workload_state: workload_state(shared, &store, &list),
        ztunnel_config: serde_json::to_value(cfg).unwrap_or_default(),
        authorization_policies: store.cfg.policies.clone(),
        peer_authentications: store.cfg.peer_authentications.clone(),
        enrolled_pods: shared.enrolled_info(),
        handover: shared.handover_status(),
        dns: shared.proxy.dns().map(|d| d.dump()).unwrap_or_default(),
        capture: CaptureDump {
            mode: shared.capture.mode().to_owned(),
            features: serde_json::to_value(features).unwrap_or_default(),
            fast_path: shared.capture.fast_path(),
            pin_dir: shared
                .capture
                .pin_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            occupancy: shared.capture.occupancy(),
            counters: shared
                .capture
                .stats()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            bpf_stats: shared.capture.run_stats(),
        },
        connections: {
            let pool = shared.proxy.pool_stats();
            ConnectionsDump {
                opened_total,
                hbone_pool_connections: pool.connections,
                hbone_pool_streams: pool.active_streams,
                list,
            }
        },
    }
}

pub async fn serve(listener: TcpListener, cfg: Arc<Config>, shared: Arc<Shared>) {
    let mut errors = crate::limits::AcceptErrors::new(
        crate::metrics::listener::ADMIN,
        "ztunnel",
        shared.proxy.metrics.clone(),
    );
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                errors.accepted();
                accepted
            }
            Err(e) => {
                // Out of descriptors, retrying at once would spin.
                errors.failed(&e).await;
                continue;
            }
        };
        if !peer.ip().is_loopback() {
            // Belt and braces: the listener is bound to loopback already.
            continue;
        }
        let (cfg, shared) = (cfg.clone(), shared.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (cfg, shared) = (cfg.clone(), shared.clone());
                async move {
                    Ok::<_, Infallible>(
                        if req.method() == Method::GET && req.uri().path() == "/capture/watch" {
                            capture_watch(req.uri().query().unwrap_or(""), &shared)
                        } else {
                            handle(req, &cfg, &shared, peer).map(BodyExt::boxed_unsync)
                        },
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn handle(
    req: Request<Incoming>,
    cfg: &Config,
    shared: &Arc<Shared>,
    _peer: SocketAddr,
) -> Response<Full<Bytes>> {
    tracing::debug!(method = %req.method(), uri = %req.uri(), "admin request");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => json(StatusCode::OK, &dump(cfg, shared)),
        (&Method::GET, "/fast_path") => json(
            StatusCode::OK,
            &serde_json::json!({ "enabled": shared.capture.fast_path() }),
        ),
        (&Method::POST, "/fast_path") => {
            let q = req.uri().query().unwrap_or("");
            let on = match q {
                "enabled=true" => true,
                "enabled=false" => false,
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "expected ?enabled=true or ?enabled=false\n",
                    );
                }
            };
            match shared.capture.set_fast_path(on) {
                Ok(()) => {
                    tracing::info!(enabled = on, "fast path switched");
                    json(StatusCode::OK, &serde_json::json!({ "enabled": on }))
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            }
        }
        (&Method::GET, "/bpf_stats") => json(StatusCode::OK, &shared.capture.run_stats()),
        (&Method::POST, "/bpf_stats") => bpf_stats(req.uri().query().unwrap_or(""), shared),
        (&Method::GET, "/logging") => text(StatusCode::OK, &logging_status(shared)),
        (&Method::POST, "/logging") => {
            let query = req.uri().query().unwrap_or("");
            let param = |name: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .filter(|v| !v.is_empty())
            };
            let (level, capture) = (param("level"), param("capture"));
            if level.is_none() && capture.is_none() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "expected ?level=<filter> and/or ?capture=<off|warn|info|debug or program:level,…>\n",
                );
            }
            if let Some(spec) = capture {
                match shared.diagnostics.set_log(shared, spec) {
                    Ok(()) => {
                        tracing::info!(capture = %shared.diagnostics.describe(), "capture log levels changed");
                    }
                    Err(e @ crate::diagnostics::Error::Spec { .. }) => {
                        return text(StatusCode::BAD_REQUEST, &format!("{e}\n"));
                    }
                    Err(e) => return text(StatusCode::CONFLICT, &format!("{e}\n")),
                }
            }
            if let Some(level) = level {
                match shared.log.set(level) {
                    Ok(()) => tracing::info!(level, "log level changed"),
                    Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
                }
            }
            text(StatusCode::OK, &logging_status(shared))
        }
        (&Method::POST, "/quitquitquit") => {
            shared.request_drain("POST /quitquitquit", false);
            text(StatusCode::OK, "draining\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /config_dump, GET|POST /fast_path, GET|POST /bpf_stats, GET|POST /logging, GET /capture/watch, POST /quitquitquit\n",
        ),
    }
}

/// The log filter, then, when any program group logs its decisions, a second line
/// `capture: connect=debug tc=warn`.
fn logging_status(shared: &Shared) -> String {
    let capture = shared.diagnostics.describe();
    if capture == "off" {
        format!("{}\n", shared.log.level())
    } else {
        format!("{}\ncapture: {capture}\n", shared.log.level())
    }
}

type StreamingBody = UnsyncBoxBody<Bytes, Infallible>;

/// How long a watcher may leave its stream unread before it is disconnected.
const WATCH_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `GET /capture/watch[?pod=ns/name]`: one JSON line per capture decision, for as long as
/// the client reads (a client that stops reading for 30 s is disconnected); while any
/// watcher is connected the programs report every decision.
fn capture_watch(query: &str, shared: &Arc<Shared>) -> Response<StreamingBody> {
    let pod = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("pod="))
        .filter(|p| !p.is_empty())
        .map(|p| p.replace("%2F", "/").replace("%2f", "/"));
    let mut watch = match crate::diagnostics::watch(shared, pod.clone()) {
        Ok(w) => w,
        Err(e @ crate::diagnostics::Error::TooManyWatchers) => {
            return text(StatusCode::TOO_MANY_REQUESTS, &format!("{e}\n"))
                .map(BodyExt::boxed_unsync);
        }
        Err(e) => return text(StatusCode::CONFLICT, &format!("{e}\n")).map(BodyExt::boxed_unsync),
    };
    tracing::info!(pod = pod.as_deref().unwrap_or("*"), "capture watch started");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                () = tx.closed() => break,
                e = watch.next() => match e {
                    Some(e) => e,
                    None => break,
                },
            };
            let mut line = serde_json::to_vec(&*event).unwrap_or_default();
            line.push(b'\n');
            if tx
                .send_timeout(Ok(Frame::data(Bytes::from(line))), WATCH_SEND_TIMEOUT)
                .await
                .is_err()
            {
                break;
            }
        }
        tracing::info!("capture watch ended");
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = Response::new(body.boxed_unsync());
    if let Ok(v) = "application/x-ndjson".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// What a POST to `/bpf_stats` asks: `enabled=true` (with `duration=<humantime>`, at most
/// an hour, 10 minutes if left out) or `enabled=false`.
#[derive(Debug, PartialEq, Eq)]
enum BpfStatsRequest {
    On(std::time::Duration),
    Off,
}

fn parse_bpf_stats(query: &str) -> Result<BpfStatsRequest, String> {
    let (mut enabled, mut duration) = (None, None);
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("enabled", "true")) => enabled = Some(true),
            Some(("enabled", "false")) => enabled = Some(false),
            Some(("duration", d)) => {
                duration = Some(
                    humantime::parse_duration(d)
                        .map_err(|e| format!("bad duration {d:?}: {e} (e.g. 30s, 10m, 1h)"))?,
                );
            }
            _ => return Err(format!("unknown parameter {kv:?}")),
        }
    }
    match (enabled, duration) {
        (Some(true), d) => Ok(BpfStatsRequest::On(
            d.unwrap_or(crate::ebpf::run_stats::DEFAULT_DURATION),
        )),
        (Some(false), None) => Ok(BpfStatsRequest::Off),
        (Some(false), Some(_)) => Err("a duration goes with enabled=true only".to_owned()),
        (None, _) => Err("expected ?enabled=true[&duration=10m] or ?enabled=false".to_owned()),
    }
}

/// Turns the kernel's per-program statistics on for a bounded time (a timer turns them
/// off again) or off at once, and answers with the new status.
fn bpf_stats(query: &str, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    let req = match parse_bpf_stats(query) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    match req {
        BpfStatsRequest::On(duration) => match shared.capture.enable_run_stats(duration) {
            Ok(until) => {
                tracing::info!(duration = %humantime::format_duration(duration), "BPF program statistics on");
                let shared = Arc::clone(shared);
                tokio::spawn(async move {
                    tokio::time::sleep_until(until.into()).await;
                    // A later request may have extended them; expire only what ran out.
                    if shared.capture.expire_run_stats() {
                        tracing::info!("BPF program statistics off: their time ran out");
                    }
                });
            }
            Err(e @ crate::capture::Error::RunStatsNeedEbpf) => {
                return text(StatusCode::CONFLICT, &format!("{e}\n"));
            }
            Err(
                e @ crate::capture::Error::RunStats(crate::ebpf::run_stats::Error::Enable {
                    ..
                }),
            ) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("{:#}\n", anyhow::Error::new(e)),
                );
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        },
        BpfStatsRequest::Off => {
            if shared.capture.disable_run_stats() {
                tracing::info!("BPF program statistics off");
            }
        }
    }
    json(StatusCode::OK, &shared.capture.run_stats())
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => response(status, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(status, "text/plain", body.as_bytes().to_vec())
}

fn response(status: StatusCode, ty: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ty.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{BpfStatsRequest as R, parse_bpf_stats};

    #[test]
    fn bpf_stats_requests_parse_and_bad_ones_say_why() {
        use crate::ebpf::run_stats::DEFAULT_DURATION;
        let table: [(&str, Result<R, &str>); 8] = [
            ("enabled=true", Ok(R::On(DEFAULT_DURATION))),
            (
                "enabled=true&duration=30s",
                Ok(R::On(Duration::from_secs(30))),
            ),
            (
                "duration=2m&enabled=true",
                Ok(R::On(Duration::from_secs(120))),
            ),
            ("enabled=false", Ok(R::Off)),
            ("", Err("expected ?enabled=true")),
            ("enabled=yes", Err("unknown parameter \"enabled=yes\"")),
            ("enabled=true&duration=soon", Err("bad duration \"soon\"")),
            ("enabled=false&duration=1m", Err("enabled=true only")),
        ];
        for (query, want) in table {
            match (parse_bpf_stats(query), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{query}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{query}: {got}"),
                (got, want) => panic!("{query}: got {got:?}, want {want:?}"),
            }
        }
    }
}
