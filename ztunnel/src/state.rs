//! The workload store's embedded source: a local YAML file listing namespaces and
//! workloads, including this node's pods with their netns and cgroup. Enrolment follows
//! the `istio.io/dataplane-mode` label on the pod or its namespace (the pod's value wins;
//! `none` opts out). The file is watched; an invalid file is reported with its path,
//! line and field, and the last good state stays in force. An empty file is never a
//! version (a file being rewritten in place is empty for a moment): an intended empty
//! config is written explicitly, `workloads: []`. See [`file`] for how the file is
//! watched and [`settle`] for how removals wait until a version is confirmed.
pub mod file;
pub mod settle;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::policy;

/// The label that enrols a pod or a namespace.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";
pub const NONE: &str = "none";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read workload file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `field` is `` field `workloads[0].addresses[0]`: ``, or empty when the error is
    /// the document's own (a second document, say).
    #[error("invalid workload file {path}: {location}{field}{message}")]
    Parse {
        path: PathBuf,
        location: String,
        field: String,
        message: String,
    },
    #[error(
        "workload file {path} is empty: a file being written looks like this, so it is not taken as a version; to run with no workloads write `workloads: []`"
    )]
    Empty { path: PathBuf },
    #[error("invalid workload file {path}: {object}: {reason}")]
    Invalid {
        path: PathBuf,
        object: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    /// The SPIFFE trust domain of workloads that do not name their own.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The cluster's name, as it appears in baggage and metrics.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// Shared between versions: a new version (a source's rebuild, the settler's, the
    /// store's copy) copies pointers, not workloads, and compares unchanged ones by pointer.
    #[serde(default)]
    pub workloads: Vec<Arc<Workload>>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Where mesh-wide (GLOBAL) policies and peer authentications live.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// L4 authorization policies (Istio's `istio.security.Authorization`).
    #[serde(default)]
    pub policies: Vec<policy::Authorization>,
    /// mTLS modes (Istio's PeerAuthentication; STRICT refuses plaintext).
    #[serde(default)]
    pub peer_authentications: Vec<policy::PeerAuthentication>,
    /// L7 authorization policies enforced by waypoints (Istio's AuthorizationPolicy with
    /// `targetRefs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waypoint_policies: Vec<crate::waypoint::authz::WaypointPolicy>,
    /// Gateway API HTTPRoutes applied by waypoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<crate::waypoint::route::HttpRoute>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            cluster: default_cluster(),
            namespaces: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            root_namespace: default_root_namespace(),
            policies: Vec::new(),
            peer_authentications: Vec::new(),
            waypoint_policies: Vec::new(),
            http_routes: Vec::new(),
        }
    }
}

fn default_root_namespace() -> String {
    policy::DEFAULT_ROOT_NAMESPACE.to_owned()
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

fn default_cluster() -> String {
    "Kubernetes".to_owned()
}

/// How a workload receives traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Plain TCP: not in the mesh.
    Tcp,
    /// HTTP/2 CONNECT over mTLS to port 15008.
    Hbone,
}

/// A Kubernetes Service: VIPs and a port map, with endpoints chosen by label selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Defaults to `<name>.<namespace>.svc.cluster.local`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The service's virtual IPs. Empty with a `hostname` of its own: one is
    /// auto-allocated ([`allocate_vips`]).
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Workloads in the same namespace whose labels include all of these back the service.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Extra identities the service's endpoints may present (SPIFFE URIs).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The waypoint that connections to this service's addresses go through (Istio's
    /// `Service.waypoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
    /// Waypoints sharing the service's connections by weight (Istio's
    /// `Service.weighted_waypoints`, for a canary); when empty or all weights are 0,
    /// `waypoint` applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_waypoints: Vec<WeightedWaypoint>,
}

/// One waypoint of a weighted set and its relative weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedWaypoint {
    pub waypoint: WaypointRef,
    pub weight: u32,
}

impl Service {
    /// The waypoint for the `n`th connection: from the weighted set, each waypoint for its
    /// share of every `sum of weights` connections in turn (Istio draws at random with the
    /// same shares); else the single `waypoint`.
    pub fn waypoint_for(&self, n: usize) -> Option<&WaypointRef> {
        let total: u64 = self
            .weighted_waypoints
            .iter()
            .map(|w| u64::from(w.weight))
            .sum();
        if total == 0 {
            return self.waypoint.as_ref();
        }
        let mut pick = n as u64 % total;
        for w in &self.weighted_waypoints {
            if pick < u64::from(w.weight) {
                return Some(&w.waypoint);
            }
            pick -= u64::from(w.weight);
        }
        self.waypoint.as_ref()
    }
}

/// Istio's HBONE port of a waypoint (`GatewayAddress.hbone_mtls_port`'s usual value).
pub const WAYPOINT_HBONE_PORT: u16 = 15008;

/// A reference to a waypoint, as Istio's `GatewayAddress` names one: either an address (a
/// waypoint pod's, or the VIP of the waypoint's service) or a service by namespace and
/// hostname; the waypoint's pods are dialled at `port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointRef {
    /// A waypoint pod's address, or its service's VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// The waypoint service's hostname (with `namespace`), e.g.
    /// `waypoint.shop.svc.cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The waypoint service's namespace; defaults to the referring object's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The waypoint's HBONE port.
    #[serde(default = "default_waypoint_port")]
    pub port: u16,
}

fn default_waypoint_port() -> u16 {
    WAYPOINT_HBONE_PORT
}

impl WaypointRef {
    /// Why the reference names no waypoint, if it does not.
    fn check(&self) -> Result<(), String> {
        match (&self.address, &self.hostname) {
            (Some(_), Some(_)) => {
                Err("waypoint: give `address` or `hostname`, not both".to_owned())
            }
            (None, None) => Err("waypoint: needs an `address` or a `hostname`".to_owned()),
            (None, Some(h)) if h.is_empty() => Err("waypoint: `hostname` is empty".to_owned()),
            (Some(_), None) if self.namespace.is_some() => {
                Err("waypoint: `namespace` goes with `hostname`, not `address`".to_owned())
            }
            _ if self.port == 0 => Err("waypoint: `port` must not be 0".to_owned()),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.address, &self.hostname) {
            (Some(a), _) => write!(f, "{}", SocketAddr::new(*a, self.port)),
            (None, Some(h)) => match &self.namespace {
                Some(ns) => write!(f, "{ns}/{h}:{}", self.port),
                None => write!(f, "{h}:{}", self.port),
            },
            (None, None) => write!(f, "(none)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The port's name; `http…`, `http2…` and `grpc…` name an HTTP port (Istio's
    /// protocol selection by port name) when there is no `appProtocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Kubernetes' `appProtocol` (`http`, `http2`, `grpc`, `tcp`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn hostname(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", self.name, self.namespace))
    }

    /// The target port for a service port, if the service exposes it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port.unwrap_or(p.port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    /// Defaults to `<cluster>//Pod/<namespace>/<name>`, as Istio forms it.
    #[serde(default)]
    pub uid: Option<String>,
    /// The node the pod runs on; ztunnel captures only its own node's pods.
    pub node: String,
    #[serde(default)]
    pub network: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Defaults to the file's `trustDomain`.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Defaults to HBONE for enrolled workloads, TCP otherwise.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Defaults to the `app.kubernetes.io/name`, `app` or `name` label, else the name.
    #[serde(default)]
    pub canonical_name: Option<String>,
    /// Defaults to the `app.kubernetes.io/version` or `version` label, else `latest`.
    #[serde(default)]
    pub canonical_revision: Option<String>,
    /// The owning controller's kind, lowercase (`deployment`, …); defaults to `pod`.
    #[serde(default)]
    pub workload_type: Option<String>,
    /// The owning controller's name; defaults to the pod's name.
    #[serde(default)]
    pub workload_name: Option<String>,
    /// The pod's network namespace (a bind mount such as /var/run/netns/x, or
    /// /proc/<pid>/ns/net). Required for pods on this node.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The pod's cgroup v2 directory. Required for pods on this node.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Where the pod runs (istiod's `locality`; Kubernetes' `topology.kubernetes.io/*`
    /// node labels): fills the `*_region` and `*_zone` metric labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    /// The waypoint that connections addressed to this workload go through (Istio's
    /// `Workload.waypoint`); connections to a service it backs follow the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// A workload's locality, as istiod's `istio.workload.Locality` carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Workload {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn canonical_name(&self) -> String {
        self.canonical_name
            .clone()
            .or_else(|| {
                ["app.kubernetes.io/name", "app", "name"]
                    .iter()
                    .find_map(|l| self.labels.get(*l).cloned())
            })
            .unwrap_or_else(|| self.name.clone())
    }

    pub fn canonical_revision(&self) -> String {
        self.canonical_revision
            .clone()
            .or_else(|| {
                ["app.kubernetes.io/version", "version"]
                    .iter()
                    .find_map(|l| self.labels.get(*l).cloned())
            })
            .unwrap_or_else(|| "latest".to_owned())
    }

    pub fn workload_type(&self) -> String {
        self.workload_type
            .clone()
            .unwrap_or_else(|| "pod".to_owned())
    }

    pub fn workload_name(&self) -> String {
        self.workload_name
            .clone()
            .unwrap_or_else(|| self.name.clone())
    }
}

/// A pod on this node that should be captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPod {
    pub key: String,
    /// The pod's SPIFFE identity.
    pub identity: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub addresses: Vec<IpAddr>,
}

impl LocalConfig {
    /// Parses and validates the file's text. A text without any YAML content (empty,
    /// blank or only comments) is [`Error::Empty`], never a config with no workloads.
    pub fn parse(path: &Path, text: &str, node: &str) -> Result<Self, Error> {
        if matches!(
            serde_norway::from_str::<serde_norway::Value>(text),
            Ok(serde_norway::Value::Null)
        ) {
            return Err(Error::Empty {
                path: path.to_owned(),
            });
        }
        let de = serde_norway::Deserializer::from_str(text);
        let cfg: LocalConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = match e.path().to_string() {
                root if root == "." => String::new(),
                path => format!("field `{path}`: "),
            };
            let inner = e.into_inner();
            let location = inner
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            Error::Parse {
                path: path.to_owned(),
                location,
                field,
                message: inner.to_string(),
            }
        })?;
        cfg.validate(path, node)?;
        Ok(cfg)
    }

    pub fn load(path: &Path, node: &str) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, node)
    }

    fn validate(&self, path: &Path, node: &str) -> Result<(), Error> {
        let invalid = |object: String, reason: String| Error::Invalid {
            path: path.to_owned(),
            object,
            reason,
        };
        let mut keys = BTreeSet::new();
        let mut addrs = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let object = format!("workloads[{i}] ({})", w.key());
            if w.name.is_empty() || w.namespace.is_empty() {
                return Err(invalid(
                    object,
                    "name and namespace must not be empty".into(),
                ));
            }
            if !keys.insert(w.key()) {
                return Err(invalid(object, "duplicate workload".into()));
            }
            for a in &w.addresses {
                if let Some(other) = addrs.insert(*a, w.key()) {
                    return Err(invalid(
                        object,
                        format!("address {a} is also used by {other}"),
                    ));
                }
            }
            if w.node == node && (w.netns.is_none() || w.cgroup.is_none()) {
                return Err(invalid(
                    object,
                    format!("a pod on this node ({node}) needs `netns` and `cgroup`"),
                ));
            }
            if let Some(mode) = w.labels.get(DATAPLANE_MODE) {
                check_mode(mode).map_err(|reason| invalid(object.clone(), reason))?;
            }
            if let Some(wp) = &w.waypoint {
                wp.check()
                    .map_err(|reason| invalid(object.clone(), reason))?;
            }
        }
        let mut svc_keys = BTreeSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let object = format!("services[{i}] ({})", svc.key());
            if !svc_keys.insert(svc.key()) {
                return Err(invalid(object, "duplicate service".into()));
            }
            if svc.ports.is_empty() {
                return Err(invalid(object, "a service needs at least one port".into()));
            }
            for a in &svc.addresses {
                if let Some(other) = addrs.insert(*a, svc.key()) {
                    return Err(invalid(
                        object,
                        format!("address {a} is also used by {other}"),
                    ));
                }
            }
            for san in &svc.subject_alt_names {
                if !san.starts_with("spiffe://") {
                    return Err(invalid(
                        object.clone(),
                        format!("subjectAltNames entry {san:?} is not a spiffe:// identity"),
                    ));
                }
            }
            for wp in svc
                .waypoint
                .iter()
                .chain(svc.weighted_waypoints.iter().map(|w| &w.waypoint))
            {
                wp.check()
                    .map_err(|reason| invalid(object.clone(), reason))?;
            }
        }
        policy::validate_all(
            &self.policies,
            &self.peer_authentications,
            &self.root_namespace,
        )
        .map_err(|e| Error::Invalid {
            path: path.to_owned(),
            object: "policies".to_owned(),
            reason: e.to_string(),
        })?;
        // The message is `<list>[i] (ns/name): <field>: <reason>`; names have no ": ".
        let split = |message: String| match message.split_once(": ") {
            Some((object, reason)) => invalid(object.to_owned(), reason.to_owned()),
            None => invalid("waypoint config".to_owned(), message),
        };
        crate::waypoint::authz::validate_all_in_root(&self.waypoint_policies, &self.root_namespace)
            .map_err(split)?;
        crate::waypoint::route::validate_all(&self.http_routes).map_err(split)?;
        for (i, ns) in self.namespaces.iter().enumerate() {
            if let Some(mode) = ns.labels.get(DATAPLANE_MODE) {
                check_mode(mode)
                    .map_err(|reason| invalid(format!("namespaces[{i}] ({})", ns.name), reason))?;
            }
        }
        Ok(())
    }

    /// Whether a workload is in the mesh: its own label, else its namespace's.
    pub fn enrolled(&self, w: &Workload) -> bool {
        let mode = w.labels.get(DATAPLANE_MODE).or_else(|| {
            self.namespaces
                .iter()
                .find(|n| n.name == w.namespace)
                .and_then(|n| n.labels.get(DATAPLANE_MODE))
        });
        mode.is_some_and(|m| m == AMBIENT)
    }

    /// How a workload receives traffic: its own `protocol`, else HBONE when enrolled.
    pub fn protocol(&self, w: &Workload) -> Protocol {
        w.protocol.unwrap_or(if self.enrolled(w) {
            Protocol::Hbone
        } else {
            Protocol::Tcp
        })
    }

    /// Whether `node`'s ztunnel captures the workload: it runs there, is enrolled, and its
    /// netns and cgroup are known.
    pub fn captured_on(&self, w: &Workload, node: &str) -> bool {
        w.node == node && self.enrolled(w) && w.netns.is_some() && w.cgroup.is_some()
    }

    /// This node's pods that should be captured now.
    pub fn local_enrolled(&self, node: &str) -> BTreeMap<String, LocalPod> {
        let modes = Enrolment::of(self);
        self.workloads
            .iter()
            .filter(|w| modes.captured_on(w, node))
            .filter_map(|w| {
                Some((
                    w.key(),
                    LocalPod {
                        key: w.key(),
                        identity: format!(
                            "spiffe://{}/ns/{}/sa/{}",
                            w.trust_domain.as_deref().unwrap_or(&self.trust_domain),
                            w.namespace,
                            w.service_account
                        ),
                        netns: w.netns.clone()?,
                        cgroup: w.cgroup.clone()?,
                        addresses: w.addresses.clone(),
                    },
                ))
            })
            .collect()
    }
}

/// [`LocalConfig::enrolled`], [`LocalConfig::protocol`] and [`LocalConfig::captured_on`]
/// with the namespaces found by name, for passes over every workload.
pub(crate) struct Enrolment<'a> {
    namespaces: HashMap<&'a str, &'a Namespace>,
}

impl<'a> Enrolment<'a> {
    pub(crate) fn of(cfg: &'a LocalConfig) -> Self {
        let mut namespaces = HashMap::with_capacity(cfg.namespaces.len());
        for ns in &cfg.namespaces {
            // The first of a name, as the scan finds it.
            namespaces.entry(ns.name.as_str()).or_insert(ns);
        }
        Self { namespaces }
    }

    pub(crate) fn enrolled(&self, w: &Workload) -> bool {
        let mode = w.labels.get(DATAPLANE_MODE).or_else(|| {
            self.namespaces
                .get(w.namespace.as_str())
                .and_then(|n| n.labels.get(DATAPLANE_MODE))
        });
        mode.is_some_and(|m| m == AMBIENT)
    }

    pub(crate) fn protocol(&self, w: &Workload) -> Protocol {
        w.protocol.unwrap_or(if self.enrolled(w) {
            Protocol::Hbone
        } else {
            Protocol::Tcp
        })
    }

    pub(crate) fn captured_on(&self, w: &Workload, node: &str) -> bool {
        w.node == node && self.enrolled(w) && w.netns.is_some() && w.cgroup.is_some()
    }
}

/// Where an outbound connection goes, decided from the destination the app dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through an HBONE tunnel to the endpoint's ztunnel, or to the destination's
    /// waypoint.
    Hbone {
        /// The CONNECT's `:authority`: the endpoint pod and target port (after VIP and
        /// port translation); through a waypoint, the destination as the app dialled it.
        endpoint: SocketAddr,
        /// Where the tunnel goes: the endpoint's address at :15008, or a waypoint pod's
        /// address at the waypoint's port.
        next_hop: SocketAddr,
        /// `namespace/name` of the workload at `next_hop` (the endpoint or the waypoint).
        workload: String,
        /// SPIFFE identities the server may present: the workload's, plus the
        /// service's subject alt names when reached through a service (the waypoint's and
        /// its service's through a waypoint).
        identities: Vec<String>,
        /// The service hostname when the app dialled a VIP.
        service: Option<String>,
        /// The waypoint reference followed, if any.
        waypoint: Option<String>,
    },
    /// The destination names a waypoint that has no pod with an address: refuse the
    /// connection (never bypass the waypoint).
    NoWaypoint {
        /// The service hostname or workload key the app's destination belongs to.
        target: String,
        waypoint: String,
    },
    /// Plain TCP to this address (a workload outside the mesh, or unknown).
    Passthrough { dst: SocketAddr },
    /// A service VIP with no endpoint for the port: refuse the connection.
    NoEndpoint { service: String, port: u16 },
}

/// The workload store: one config version with its indexes, built when the version is
/// swapped in, so that every lookup on the connection path (route, authorize, metric
/// labels, baggage) costs the same at ten workloads as at a hundred thousand: workloads by
/// address and by `namespace/name`, services by VIP, each service's endpoints and each
/// workload's first service, namespaces by name, and the policies by namespace and selector
/// label ([`policy::Index`], [`policy::MtlsIndex`]). Each index answers exactly as a scan of
/// the config would (the tests compare them on generated configs); where the config names an
/// address or key twice, the same one wins as in the scan.
#[derive(Debug, Clone)]
pub struct Store {
    pub cfg: LocalConfig,
    /// Workload by address; of two with one address (never in a valid config), the last.
    by_addr: HashMap<IpAddr, usize>,
    /// Service by VIP; of two with one VIP, the last.
    by_vip: HashMap<IpAddr, usize>,
    /// Workload by `namespace/name`; of two with one key, the first.
    by_key: HashMap<String, usize>,
    /// Namespace by name; of two with one name, the first.
    namespaces: HashMap<String, usize>,
    /// Each service's endpoints (workloads of its namespace carrying its selector), in
    /// config order.
    endpoints: Vec<Vec<usize>>,
    /// Each service's endpoints that have an address: the round robin's choice.
    routable: Vec<Vec<usize>>,
    /// For the first workload of each key: the first service with an endpoint of that key.
    service_of: Vec<Option<usize>>,
    /// Services by hostname (lowercase, no trailing dot), in config order.
    by_hostname: HashMap<String, Vec<usize>>,
    /// Service by `namespace/name`; of two with one key (never in a valid config), the
    /// first.
    service_by_key: HashMap<String, usize>,
    policies: policy::Index,
    mtls: policy::MtlsIndex,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The turn of each connection to a service with weighted waypoints.
    next_waypoint: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Where hostname-only services get their VIPs (Istio's auto-allocation range for
/// ServiceEntries, `240.240.0.0/16`).
pub const AUTO_VIP_PREFIX: [u8; 2] = [240, 240];

/// Gives every service that has a hostname of its own (not a Kubernetes service's
/// `*.svc.cluster.local`) and no address a VIP from [`AUTO_VIP_PREFIX`], as Istio's
/// auto-allocation does for ServiceEntries, so that its name resolves (the DNS proxy)
/// and connections to it are routed like any service's. The VIP comes from a hash of the
/// hostname (FNV-1a), taking the next free one on a collision with an address in use,
/// services in hostname order: the same hostname gets the same VIP in every version of
/// the config and on every node, unless a new hostname collides with it first. Services
/// sharing a hostname share its VIP. Headless Kubernetes services keep none.
pub fn allocate_vips(services: &mut [Service]) {
    let mut wanting: Vec<(String, usize)> = services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.addresses.is_empty())
        .filter_map(|(i, s)| {
            let h = s
                .hostname
                .as_deref()?
                .trim_end_matches('.')
                .to_ascii_lowercase();
            (!h.ends_with(".svc.cluster.local") && !h.is_empty()).then_some((h, i))
        })
        .collect();
    if wanting.is_empty() {
        return;
    }
    wanting.sort();
    let mut taken: std::collections::HashSet<IpAddr> = services
        .iter()
        .flat_map(|s| s.addresses.iter().copied())
        .collect();
    let mut given: HashMap<String, IpAddr> = HashMap::new();
    for (host, i) in wanting {
        let vip = match given.get(&host) {
            Some(v) => *v,
            None => {
                // FNV-1a: stable across builds and nodes (std's hasher is seeded).
                let mut hash: u32 = 0x811c_9dc5;
                for b in host.bytes() {
                    hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
                }
                // 65534 slots: .0.0 and .255.255 are never handed out.
                let mut slot = (hash % 65534) + 1;
                let vip = loop {
                    let [_, _, hi, lo] = slot.to_be_bytes();
                    let ip = IpAddr::from([AUTO_VIP_PREFIX[0], AUTO_VIP_PREFIX[1], hi, lo]);
                    if taken.insert(ip) {
                        break Some(ip);
                    }
                    slot = slot % 65534 + 1;
                    if slot == (hash % 65534) + 1 {
                        // Every address of the range is in use: no VIP (the name is forwarded).
                        break None;
                    }
                };
                let Some(vip) = vip else {
                    tracing::warn!(hostname = %host, "no free auto-allocated VIP in 240.240.0.0/16");
                    continue;
                };
                given.insert(host, vip);
                vip
            }
        };
        services[i].addresses.push(vip);
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new(LocalConfig::default())
    }
}

impl Store {
    /// Indexes a config: a pass over the workloads, one over the services and one over the
    /// policies, each entry found by hash.
    pub fn new(mut cfg: LocalConfig) -> Self {
        allocate_vips(&mut cfg.services);
        let mut by_addr = HashMap::with_capacity(cfg.workloads.len());
        let mut by_key = HashMap::with_capacity(cfg.workloads.len());
        // The first workload index of each workload's key.
        let mut first_of_key = Vec::with_capacity(cfg.workloads.len());
        for (i, w) in cfg.workloads.iter().enumerate() {
            for a in &w.addresses {
                by_addr.insert(*a, i);
            }
            first_of_key.push(*by_key.entry(w.key()).or_insert(i));
        }
        let mut by_vip = HashMap::with_capacity(cfg.services.len());
        let mut by_hostname: HashMap<String, Vec<usize>> =
            HashMap::with_capacity(cfg.services.len());
        // Services by their selector's first label: a workload without that label is not
        // an endpoint, so each workload is checked against the services filed under its
        // own labels only.
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        let mut service_by_key = HashMap::with_capacity(cfg.services.len());
        for (s, svc) in cfg.services.iter().enumerate() {
            service_by_key.entry(svc.key()).or_insert(s);
            for a in &svc.addresses {
                by_vip.insert(*a, s);
            }
            by_hostname
                .entry(normal_hostname(&svc.hostname()))
                .or_default()
                .push(s);
            if let Some((k, v)) = svc.selector.iter().next() {
                by_label
                    .entry((svc.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(s);
            }
        }
        let mut endpoints = vec![Vec::new(); cfg.services.len()];
        if !by_label.is_empty() {
            for (i, w) in cfg.workloads.iter().enumerate() {
                for (k, v) in &w.labels {
                    let Some(services) =
                        by_label.get(&(w.namespace.as_str(), k.as_str(), v.as_str()))
                    else {
                        continue;
                    };
                    for s in services {
                        if policy::selects(&cfg.services[*s].selector, &w.labels) {
                            endpoints[*s].push(i);
                        }
                    }
                }
            }
        }
        let routable = endpoints
            .iter()
            .map(|eps| {
                eps.iter()
                    .copied()
                    .filter(|i| !cfg.workloads[*i].addresses.is_empty())
                    .collect()
            })
            .collect();
        let mut service_of = vec![None; cfg.workloads.len()];
        for (s, eps) in endpoints.iter().enumerate() {
            for i in eps {
                service_of[first_of_key[*i]].get_or_insert(s);
            }
        }
        let mut namespaces = HashMap::with_capacity(cfg.namespaces.len());
        for (i, ns) in cfg.namespaces.iter().enumerate() {
            namespaces.entry(ns.name.clone()).or_insert(i);
        }
        let policies = policy::Index::new(&cfg.policies, &cfg.root_namespace);
        let mtls = policy::MtlsIndex::new(&cfg.peer_authentications, &cfg.root_namespace);
        Self {
            cfg,
            by_addr,
            by_vip,
            by_key,
            namespaces,
            endpoints,
            routable,
            service_of,
            by_hostname,
            service_by_key,
            policies,
            mtls,
            next: Default::default(),
            next_waypoint: Default::default(),
        }
    }

    pub fn workload_by_addr(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_addr.get(&ip).map(|i| &*self.cfg.workloads[*i])
    }

    /// The workload `namespace/name`.
    pub fn workload(&self, key: &str) -> Option<&Workload> {
        self.by_key.get(key).map(|i| &*self.cfg.workloads[*i])
    }

    /// Whether a workload is in the mesh: its own label, else its namespace's
    /// ([`LocalConfig::enrolled`]).
    pub fn enrolled(&self, w: &Workload) -> bool {
        let mode = w.labels.get(DATAPLANE_MODE).or_else(|| {
            self.namespaces
                .get(&w.namespace)
                .and_then(|i| self.cfg.namespaces[*i].labels.get(DATAPLANE_MODE))
        });
        mode.is_some_and(|m| m == AMBIENT)
    }

    /// How a workload receives traffic ([`LocalConfig::protocol`]).
    pub fn protocol(&self, w: &Workload) -> Protocol {
        w.protocol.unwrap_or(if self.enrolled(w) {
            Protocol::Hbone
        } else {
            Protocol::Tcp
        })
    }

    pub fn trust_domain<'a>(&'a self, w: &'a Workload) -> &'a str {
        w.trust_domain.as_deref().unwrap_or(&self.cfg.trust_domain)
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self, w: &Workload) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain(w),
            w.namespace,
            w.service_account
        )
    }

    pub fn uid(&self, w: &Workload) -> String {
        w.uid
            .clone()
            .unwrap_or_else(|| format!("{}//Pod/{}/{}", self.cfg.cluster, w.namespace, w.name))
    }

    /// Endpoints of the service at `service` in `cfg.services`: workloads of its namespace
    /// matching its (non-empty) selector, in config order.
    pub fn endpoints(&self, service: usize) -> impl Iterator<Item = &Workload> + '_ {
        self.endpoints
            .get(service)
            .into_iter()
            .flatten()
            .map(|i| &*self.cfg.workloads[*i])
    }

    /// The first service (in config order) with an endpoint named like `w`: the
    /// destination service of Istio's metric labels.
    pub fn service_of(&self, w: &Workload) -> Option<&Service> {
        let i = *self.by_key.get(&w.key())?;
        self.service_of[i].map(|s| &self.cfg.services[s])
    }

    /// The authorization verdict for a connection into workload `key` (`namespace/name`).
    /// Plaintext into a workload under STRICT mTLS is denied before any policy.
    pub fn authorize(&self, key: &str, conn: &policy::Connection) -> policy::Decision {
        let Some(w) = self.workload(key) else {
            return policy::Decision::Deny {
                policy: String::new(),
                rule: None,
                reason: format!("unknown workload {key}"),
            };
        };
        if conn.src_identity.is_none()
            && self
                .mtls
                .requires_mtls(&self.cfg.peer_authentications, &w.namespace, &w.labels)
        {
            return policy::Decision::Deny {
                policy: String::new(),
                rule: None,
                reason: "STRICT mTLS refuses plaintext".to_owned(),
            };
        }
        self.policies
            .evaluate(&self.cfg.policies, &w.namespace, &w.labels, conn)
    }

    /// The service index (in `cfg.services`) with VIP `ip`; of two with one VIP, the last.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<usize> {
        self.by_vip.get(&ip).copied()
    }

    /// The service with this hostname (any case, with or without the trailing dot) in
    /// namespace `ns`, else the first of that hostname in any namespace when `ns` has none
    /// (Istio's choice for a hostname: its own namespace's first).
    /// The service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.service_by_key
            .get(&format!("{namespace}/{name}"))
            .map(|i| &self.cfg.services[*i])
    }

    pub fn service_by_hostname(&self, hostname: &str, ns: &str) -> Option<usize> {
        let all = self.by_hostname.get(&normal_hostname(hostname))?;
        all.iter()
            .copied()
            .find(|s| self.cfg.services[*s].namespace == ns)
            .or_else(|| all.first().copied())
    }

    /// The pods (workload indices) of the waypoint `wp`, named by an object of namespace
    /// `ns`: the workload at its address, else the routable endpoints of the service at its
    /// address (a VIP); or the routable endpoints of the service of its hostname in its
    /// namespace (the referrer's if it names none). Empty if none is known.
    fn waypoint_pods(&self, wp: &WaypointRef, ns: &str) -> (Vec<usize>, Option<usize>) {
        if let Some(addr) = wp.address {
            if let Some(i) = self.by_addr.get(&addr) {
                return (vec![*i], None);
            }
            return match self.service_by_vip(addr) {
                Some(s) => (self.routable[s].clone(), Some(s)),
                None => (Vec::new(), None),
            };
        }
        let Some(host) = &wp.hostname else {
            return (Vec::new(), None);
        };
        let ns = wp.namespace.as_deref().unwrap_or(ns);
        let found = self
            .by_hostname
            .get(&normal_hostname(host))
            .and_then(|all| {
                all.iter()
                    .copied()
                    .find(|s| self.cfg.services[*s].namespace == ns)
            });
        match found {
            Some(s) => (self.routable[s].clone(), Some(s)),
            None => (Vec::new(), None),
        }
    }

    /// The route through waypoint `wp` (named by `target`, of namespace `ns`) to `dst` as
    /// dialled: HBONE to one of its pods (round robin) at its port, `:authority` = `dst`,
    /// the pod's identity (and its service's alt names) expected; `None` when `src` is one
    /// of the waypoint's own pods (its traffic goes on as if there were no waypoint).
    fn via_waypoint(
        &self,
        wp: &WaypointRef,
        ns: &str,
        target: String,
        src: Option<&str>,
        dst: SocketAddr,
        service: Option<String>,
    ) -> Option<Route> {
        let (pods, wp_service) = self.waypoint_pods(wp, ns);
        if src.is_some_and(|src| pods.iter().any(|i| self.cfg.workloads[*i].key() == src)) {
            return None;
        }
        if pods.is_empty() {
            return Some(Route::NoWaypoint {
                target,
                waypoint: wp.to_string(),
            });
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let w = &self.cfg.workloads[pods[n % pods.len()]];
        // A waypoint named by a pod's address is dialled at that address; otherwise at the
        // pod's address of the destination's family where it has one.
        let ip = match wp.address {
            Some(a) if w.addresses.contains(&a) => a,
            _ => *w
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == dst.is_ipv4())
                .unwrap_or(&w.addresses[0]),
        };
        let mut identities = vec![self.identity(w)];
        if let Some(s) = wp_service {
            identities.extend(self.cfg.services[s].subject_alt_names.iter().cloned());
        }
        Some(Route::Hbone {
            endpoint: dst,
            next_hop: SocketAddr::new(ip, wp.port),
            workload: w.key(),
            identities,
            service,
            waypoint: Some(wp.to_string()),
        })
    }

    /// Decides the path for a connection from workload `src` (`namespace/name`, the
    /// captured pod) to `dst`, Istio's order: a service VIP whose service names a waypoint
    /// goes to that waypoint (whatever the port); else the service's endpoint, or the
    /// workload at `dst`; a workload dialled by its own address (not through a service)
    /// that names a waypoint goes to that waypoint. A waypoint's own pods skip it.
    pub fn route(&self, src: Option<&str>, dst: SocketAddr) -> Route {
        if let Some(i) = self.service_by_vip(dst.ip()) {
            let svc = &self.cfg.services[i];
            let weighted = !svc.weighted_waypoints.is_empty();
            let n = if weighted {
                self.next_waypoint
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            } else {
                0
            };
            if let Some(wp) = svc.waypoint_for(n)
                && let Some(route) = self.via_waypoint(
                    wp,
                    &svc.namespace,
                    svc.hostname(),
                    src,
                    dst,
                    Some(svc.hostname()),
                )
            {
                return route;
            }
            let Some(target) = svc.target_port(dst.port()) else {
                return Route::NoEndpoint {
                    service: svc.hostname(),
                    port: dst.port(),
                };
            };
            let eps = &self.routable[i];
            if eps.is_empty() {
                return Route::NoEndpoint {
                    service: svc.hostname(),
                    port: dst.port(),
                };
            }
            // Round robin over the endpoints.
            let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let w = &self.cfg.workloads[eps[n % eps.len()]];
            let ip = w
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == dst.is_ipv4())
                .unwrap_or(&w.addresses[0]);
            let endpoint = SocketAddr::new(*ip, target);
            return match self.protocol(w) {
                Protocol::Hbone => {
                    let mut identities = vec![self.identity(w)];
                    identities.extend(svc.subject_alt_names.iter().cloned());
                    Route::Hbone {
                        endpoint,
                        next_hop: SocketAddr::new(endpoint.ip(), ztunnel_common::ports::HBONE),
                        workload: w.key(),
                        identities,
                        service: Some(svc.hostname()),
                        waypoint: None,
                    }
                }
                Protocol::Tcp => Route::Passthrough { dst: endpoint },
            };
        }
        let Some(w) = self.workload_by_addr(dst.ip()) else {
            return Route::Passthrough { dst };
        };
        if let Some(wp) = &w.waypoint
            && let Some(route) = self.via_waypoint(wp, &w.namespace, w.key(), src, dst, None)
        {
            return route;
        }
        match self.protocol(w) {
            Protocol::Hbone => Route::Hbone {
                endpoint: dst,
                next_hop: SocketAddr::new(dst.ip(), ztunnel_common::ports::HBONE),
                workload: w.key(),
                identities: vec![self.identity(w)],
                service: None,
                waypoint: None,
            },
            Protocol::Tcp => Route::Passthrough { dst },
        }
    }
}

/// A hostname as the indexes hold it: lowercase, without the trailing dot.
fn normal_hostname(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn check_mode(mode: &str) -> Result<(), String> {
    if mode == AMBIENT || mode == NONE {
        Ok(())
    } else {
        Err(format!(
            "label {DATAPLANE_MODE}={mode:?} must be {AMBIENT:?} or {NONE:?}"
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn svc(name: &str, ns: &str, hostname: Option<&str>, vips: &[&str]) -> Service {
        Service {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            hostname: hostname.map(str::to_owned),
            addresses: vips.iter().map(|v| v.parse().expect("ip")).collect(),
            ports: vec![ServicePort {
                port: 80,
                target_port: Some(8080),
                name: None,
                app_protocol: None,
            }],
            selector: BTreeMap::from([("app".to_owned(), "db".to_owned())]),
            subject_alt_names: Vec::new(),
            waypoint: None,
            weighted_waypoints: Vec::new(),
        }
    }

    fn vips(services: &[Service]) -> BTreeMap<String, Vec<IpAddr>> {
        services
            .iter()
            .map(|s| (s.key(), s.addresses.clone()))
            .collect()
    }

    #[test]
    fn hostname_only_services_get_a_stable_auto_allocated_vip() {
        let mut services = vec![
            svc("db", "shop", Some("db.example.internal"), &[]),
            svc("db-copy", "other", Some("DB.example.internal."), &[]),
            svc("api", "shop", Some("api.example.com"), &[]),
            // Kubernetes services without an address are headless: no VIP.
            svc("headless", "shop", None, &[]),
            svc(
                "headless2",
                "shop",
                Some("headless2.shop.svc.cluster.local"),
                &[],
            ),
            // A VIP given stays the only one.
            svc("given", "shop", Some("given.example.com"), &["240.240.1.1"]),
        ];
        allocate_vips(&mut services);
        let got = vips(&services);
        let db = got["shop/db"].clone();
        assert_eq!(db.len(), 1, "{got:?}");
        assert!(
            matches!(db[0], IpAddr::V4(v) if v.octets()[..2] == AUTO_VIP_PREFIX),
            "{got:?}"
        );
        // One hostname, one VIP, whatever the case or trailing dot.
        assert_eq!(got["other/db-copy"], db);
        assert_eq!(got["shop/api"].len(), 1);
        assert_ne!(got["shop/api"], db);
        assert!(got["shop/headless"].is_empty() && got["shop/headless2"].is_empty());
        assert_eq!(
            got["shop/given"],
            ["240.240.1.1".parse::<IpAddr>().expect("ip")]
        );

        // Stable: the same VIPs from another order, and with other services around.
        let mut again: Vec<Service> = services
            .iter()
            .rev()
            .map(|s| {
                let mut s = s.clone();
                if s.key() != "shop/given" {
                    s.addresses.clear();
                }
                s
            })
            .collect();
        again.push(svc("web", "shop", None, &["10.96.0.1"]));
        allocate_vips(&mut again);
        let again = vips(&again);
        for k in ["shop/db", "other/db-copy", "shop/api"] {
            assert_eq!(again[k], got[k], "{k}");
        }
    }

    #[test]
    fn an_auto_allocated_vip_never_takes_an_address_in_use_and_routes_like_any_vip() {
        let mut probe = vec![svc("db", "shop", Some("db.example.internal"), &[])];
        allocate_vips(&mut probe);
        let natural = probe[0].addresses[0];
        // Another service owns that address: the next one is taken.
        let mut services = vec![
            svc("db", "shop", Some("db.example.internal"), &[]),
            svc("owner", "shop", None, &[&natural.to_string()]),
        ];
        allocate_vips(&mut services);
        assert_eq!(services[0].addresses.len(), 1);
        assert_ne!(services[0].addresses[0], natural);

        let store = Store::new(LocalConfig {
            workloads: vec![Arc::new(Workload {
                name: "db-0".to_owned(),
                namespace: "shop".to_owned(),
                uid: None,
                node: "node1".to_owned(),
                network: String::new(),
                addresses: vec!["10.0.0.9".parse().expect("ip")],
                service_account: "db".to_owned(),
                trust_domain: None,
                protocol: None,
                labels: BTreeMap::from([("app".to_owned(), "db".to_owned())]),
                canonical_name: None,
                canonical_revision: None,
                workload_type: None,
                workload_name: None,
                netns: None,
                cgroup: None,
                locality: None,
                waypoint: None,
            })],
            services: vec![svc("db", "shop", Some("db.example.internal"), &[])],
            ..LocalConfig::default()
        });
        let vip = store.cfg.services[0].addresses[0];
        assert_eq!(vip, natural);
        // Not enrolled: plain TCP to the endpoint and target port, as through any VIP.
        match store.route(None, SocketAddr::new(vip, 80)) {
            Route::Passthrough { dst } => {
                assert_eq!(dst, "10.0.0.9:8080".parse::<SocketAddr>().expect("addr"));
            }
            other => panic!("{other:?}"),
        }
    }

    fn parse(text: &str) -> Result<LocalConfig, Error> {
        LocalConfig::parse(Path::new("w.yaml"), text, "node1")
    }

    const BASE: &str = r#"
namespaces:
  - name: mesh
    labels: { istio.io/dataplane-mode: ambient }
  - name: plain
workloads:
  - name: a
    namespace: mesh
    node: node1
    addresses: [10.0.0.1]
    netns: /run/netns/a
    cgroup: /sys/fs/cgroup/a
  - name: b
    namespace: mesh
    node: node1
    addresses: [10.0.0.2]
    labels: { istio.io/dataplane-mode: none }
    netns: /run/netns/b
    cgroup: /sys/fs/cgroup/b
  - name: c
    namespace: plain
    node: node1
    addresses: [10.0.0.3]
    labels: { istio.io/dataplane-mode: ambient }
    netns: /run/netns/c
    cgroup: /sys/fs/cgroup/c
  - name: d
    namespace: mesh
    node: node2
    addresses: [10.0.1.4]
"#;

    #[test]
    fn enrolment_follows_pod_label_then_namespace_label() {
        let cfg = parse(BASE).expect("valid file");
        let local = cfg.local_enrolled("node1");
        let keys: Vec<_> = local.keys().cloned().collect();
        // a: namespace says ambient; b: pod opts out; c: pod opts in; d: other node.
        assert_eq!(keys, ["mesh/a", "plain/c"]);
        assert_eq!(local["mesh/a"].netns, PathBuf::from("/run/netns/a"));
    }

    #[test]
    fn routes_follow_protocol_vips_and_port_maps() {
        let text = format!(
            "{BASE}services:\n  - name: web\n    namespace: mesh\n    addresses: [10.96.0.1]\n    ports: [{{port: 80, targetPort: 8080}}]\n    selector: {{ app: a }}\n    subjectAltNames: [spiffe://cluster.local/ns/mesh/sa/web]\n  - name: empty\n    namespace: mesh\n    addresses: [10.96.0.2]\n    ports: [{{port: 80}}]\n    selector: {{ app: nobody }}\n"
        )
        .replace("    netns: /run/netns/a\n", "    labels: { app: a }\n    netns: /run/netns/a\n");
        let store = Store::new(parse(&text).expect("valid file"));
        let a: SocketAddr = "10.0.0.1:9000".parse().expect("addr");
        // a is enrolled (namespace label): HBONE, its own identity only.
        assert_eq!(
            store.route(None, a),
            Route::Hbone {
                endpoint: a,
                next_hop: "10.0.0.1:15008".parse().expect("addr"),
                workload: "mesh/a".into(),
                identities: vec!["spiffe://cluster.local/ns/mesh/sa/default".into()],
                service: None,
                waypoint: None,
            }
        );
        // b opted out: plain TCP; unknown addresses too.
        for dst in ["10.0.0.2:80", "192.0.2.9:443"] {
            let dst: SocketAddr = dst.parse().expect("addr");
            assert_eq!(store.route(None, dst), Route::Passthrough { dst });
        }
        // A VIP: endpoint a, port 80 → 8080, plus the service's SANs.
        match store.route(None, "10.96.0.1:80".parse().expect("addr")) {
            Route::Hbone {
                endpoint,
                identities,
                service,
                ..
            } => {
                assert_eq!(endpoint, "10.0.0.1:8080".parse().expect("addr"));
                assert_eq!(identities.len(), 2);
                assert_eq!(service.as_deref(), Some("web.mesh.svc.cluster.local"));
            }
            other => panic!("unexpected {other:?}"),
        }
        // A port the service does not expose, or no endpoints: refused.
        assert!(matches!(
            store.route(None, "10.96.0.1:81".parse().expect("addr")),
            Route::NoEndpoint { .. }
        ));
        assert!(matches!(
            store.route(None, "10.96.0.2:80".parse().expect("addr")),
            Route::NoEndpoint { .. }
        ));
    }

    /// BASE plus a waypoint (pods wp-0 and wp-1 behind service `waypoint`), a service `web`
    /// (endpoint a) and a service `db` (endpoint c2), for the waypoint tests.
    fn waypoint_config(web_waypoint: &str, a_waypoint: &str) -> String {
        format!(
            r#"{BASE}  - name: wp-0
    namespace: mesh
    node: node2
    serviceAccount: waypoint
    addresses: [10.0.1.10]
    labels: {{ gateway.networking.k8s.io/gateway-name: waypoint }}
  - name: wp-1
    namespace: mesh
    node: node2
    serviceAccount: waypoint
    addresses: [10.0.1.11]
    labels: {{ gateway.networking.k8s.io/gateway-name: waypoint }}
  - name: a2
    namespace: mesh
    node: node2
    addresses: [10.0.1.5]
    labels: {{ app: a }}
{a_waypoint}services:
  - name: waypoint
    namespace: mesh
    addresses: [10.96.0.15]
    ports: [{{port: 15008}}]
    selector: {{ gateway.networking.k8s.io/gateway-name: waypoint }}
    subjectAltNames: [spiffe://cluster.local/ns/mesh/sa/waypoint-extra]
  - name: web
    namespace: mesh
    addresses: [10.96.0.1]
    ports: [{{port: 80, targetPort: 8080}}]
    selector: {{ app: a }}
{web_waypoint}"#
        )
    }

    #[test]
    fn a_service_with_a_waypoint_is_reached_through_it_with_the_vip_as_authority() {
        for (how, reference) in [
            (
                "by hostname",
                "    waypoint: { hostname: waypoint.mesh.svc.cluster.local }\n",
            ),
            ("by VIP", "    waypoint: { address: 10.96.0.15 }\n"),
        ] {
            let store = Store::new(parse(&waypoint_config(reference, "")).expect(how));
            let vip: SocketAddr = "10.96.0.1:80".parse().expect("addr");
            let mut hops = BTreeSet::new();
            for _ in 0..4 {
                match store.route(Some("mesh/a"), vip) {
                    Route::Hbone {
                        endpoint,
                        next_hop,
                        workload,
                        identities,
                        service,
                        waypoint,
                    } => {
                        assert_eq!(endpoint, vip, "{how}: authority is the VIP:port as dialled");
                        assert_eq!(next_hop.port(), 15008, "{how}");
                        assert!(workload.starts_with("mesh/wp-"), "{how}: {workload}");
                        assert_eq!(
                            identities,
                            [
                                "spiffe://cluster.local/ns/mesh/sa/waypoint",
                                "spiffe://cluster.local/ns/mesh/sa/waypoint-extra"
                            ],
                            "{how}"
                        );
                        assert_eq!(service.as_deref(), Some("web.mesh.svc.cluster.local"));
                        assert!(waypoint.is_some(), "{how}");
                        hops.insert(next_hop);
                    }
                    other => panic!("{how}: {other:?}"),
                }
            }
            // Round robin over the waypoint's pods.
            assert_eq!(hops.len(), 2, "{how}: {hops:?}");
            // Any port of the VIP, as Istio: the waypoint decides.
            assert!(matches!(
                store.route(Some("mesh/a"), "10.96.0.1:81".parse().expect("addr")),
                Route::Hbone {
                    waypoint: Some(_),
                    ..
                }
            ));
            // The endpoint dialled by its own address: no waypoint (a has none).
            assert!(matches!(
                store.route(Some("mesh/c"), "10.0.0.1:8080".parse().expect("addr")),
                Route::Hbone { waypoint: None, .. }
            ));
        }
    }

    #[test]
    fn a_waypoints_own_pods_and_unresolved_waypoints() {
        let reference = "    waypoint: { hostname: waypoint.mesh.svc.cluster.local }\n";
        let store = Store::new(parse(&waypoint_config(reference, "")).expect("valid"));
        let vip: SocketAddr = "10.96.0.1:80".parse().expect("addr");
        // The waypoint's own outbound goes to the service's endpoints (no loop).
        for wp in ["mesh/wp-0", "mesh/wp-1"] {
            match store.route(Some(wp), vip) {
                Route::Hbone {
                    waypoint: None,
                    endpoint,
                    ..
                } => assert_eq!(endpoint.port(), 8080),
                other => panic!("{wp}: {other:?}"),
            }
        }
        // A waypoint nobody knows: refused, never sent to the endpoint.
        for (how, reference) in [
            (
                "unknown hostname",
                "    waypoint: { hostname: nope.mesh.svc.cluster.local }\n",
            ),
            (
                "other namespace",
                "    waypoint: { hostname: waypoint.mesh.svc.cluster.local, namespace: plain }\n",
            ),
            ("unknown address", "    waypoint: { address: 10.9.9.9 }\n"),
        ] {
            let store = Store::new(parse(&waypoint_config(reference, "")).expect(how));
            match store.route(Some("mesh/a"), vip) {
                Route::NoWaypoint { target, .. } => {
                    assert_eq!(target, "web.mesh.svc.cluster.local", "{how}");
                }
                other => panic!("{how}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_workload_waypoint_applies_only_when_the_workload_is_dialled_by_address() {
        // a2 (an endpoint of web) names wp-1 by its pod address; web has no waypoint.
        let cfg = waypoint_config("", "    waypoint: { address: 10.0.1.11 }\n");
        let store = Store::new(parse(&cfg).expect("valid"));
        let direct: SocketAddr = "10.0.1.5:8080".parse().expect("addr");
        match store.route(Some("mesh/a"), direct) {
            Route::Hbone {
                endpoint,
                next_hop,
                workload,
                ..
            } => {
                assert_eq!(endpoint, direct);
                assert_eq!(next_hop, "10.0.1.11:15008".parse().expect("addr"));
                assert_eq!(workload, "mesh/wp-1");
            }
            other => panic!("{other:?}"),
        }
        // Through the service (which names none), no waypoint, as in Istio.
        for _ in 0..4 {
            assert!(matches!(
                store.route(Some("mesh/a"), "10.96.0.1:80".parse().expect("addr")),
                Route::Hbone { waypoint: None, .. }
            ));
        }
        // The waypoint's own pod dials a2 directly.
        assert!(matches!(
            store.route(Some("mesh/wp-1"), direct),
            Route::Hbone { waypoint: None, .. }
        ));
        // Not enrolled (plain TCP) workloads with a waypoint still go through it.
        let cfg = cfg.replace(
            "    addresses: [10.0.0.2]\n",
            "    addresses: [10.0.0.2]\n    waypoint: { address: 10.96.0.15 }\n",
        );
        let store = Store::new(parse(&cfg).expect("valid"));
        assert!(matches!(
            store.route(Some("mesh/a"), "10.0.0.2:80".parse().expect("addr")),
            Route::Hbone {
                waypoint: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn weighted_waypoints_share_connections_by_weight_and_zero_weights_fall_back() {
        let weighted = "    weightedWaypoints:\n      - { waypoint: { hostname: waypoint.mesh.svc.cluster.local }, weight: 3 }\n      - { waypoint: { address: 10.0.1.11 }, weight: 1 }\n";
        let store = Store::new(parse(&waypoint_config(weighted, "")).expect("valid"));
        let vip: SocketAddr = "10.96.0.1:80".parse().expect("addr");
        let mut by_ref: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..8 {
            match store.route(Some("mesh/a"), vip) {
                Route::Hbone {
                    waypoint: Some(w), ..
                } => *by_ref.entry(w).or_default() += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            by_ref,
            BTreeMap::from([
                ("10.0.1.11:15008".to_owned(), 2),
                ("waypoint.mesh.svc.cluster.local:15008".to_owned(), 6)
            ]),
            "3:1 over 8 connections"
        );
        // All weights 0: the single `waypoint` applies; without one, none.
        let zero = "    waypoint: { address: 10.0.1.10 }\n    weightedWaypoints:\n      - { waypoint: { address: 10.0.1.11 }, weight: 0 }\n";
        let store = Store::new(parse(&waypoint_config(zero, "")).expect("valid"));
        assert!(matches!(
            store.route(Some("mesh/a"), vip),
            Route::Hbone { waypoint: Some(w), .. } if w == "10.0.1.10:15008"
        ));
        let zero =
            "    weightedWaypoints:\n      - { waypoint: { address: 10.0.1.11 }, weight: 0 }\n";
        let store = Store::new(parse(&waypoint_config(zero, "")).expect("valid"));
        assert!(matches!(
            store.route(Some("mesh/a"), vip),
            Route::Hbone { waypoint: None, .. }
        ));
        // A bad reference in the set is refused like a bad `waypoint`.
        let bad = "    weightedWaypoints:\n      - { waypoint: { port: 15008 }, weight: 1 }\n";
        let err = parse(&waypoint_config(bad, ""))
            .expect_err("bad")
            .to_string();
        assert!(err.contains("needs an `address` or a `hostname`"), "{err}");
    }

    #[test]
    fn a_bad_waypoint_reference_names_the_object_and_the_reason() {
        for (reference, reason) in [
            (
                "{ address: 10.0.0.9, hostname: w.mesh.svc.cluster.local }",
                "not both",
            ),
            ("{ port: 15008 }", "needs an `address` or a `hostname`"),
            ("{ hostname: \"\" }", "`hostname` is empty"),
            (
                "{ address: 10.0.0.9, namespace: mesh }",
                "`namespace` goes with `hostname`",
            ),
            ("{ address: 10.0.0.9, port: 0 }", "`port` must not be 0"),
        ] {
            let text = waypoint_config(&format!("    waypoint: {reference}\n"), "");
            let err = parse(&text).expect_err(reference).to_string();
            assert!(err.contains("services[1] (mesh/web)"), "{err}");
            assert!(err.contains(reason), "{reference}: {err}");
            let text = waypoint_config("", &format!("    waypoint: {reference}\n"));
            let err = parse(&text).expect_err(reference).to_string();
            assert!(err.contains("(mesh/a2)"), "{err}");
            assert!(err.contains(reason), "{reference}: {err}");
        }
        let err = parse(&waypoint_config("    waypoint: { adress: 10.0.0.9 }\n", ""))
            .expect_err("typo")
            .to_string();
        assert!(err.contains("adress"), "{err}");
    }

    #[test]
    fn services_are_found_by_hostname_in_the_namespace_first() {
        let mut other = svc(
            "web",
            "plain",
            Some("web.mesh.svc.cluster.local"),
            &["10.96.9.9"],
        );
        other.selector.clear();
        let store = Store::new(LocalConfig {
            services: vec![other, svc("web", "mesh", None, &["10.96.0.1"])],
            ..LocalConfig::default()
        });
        assert_eq!(
            store.service_by_hostname("web.mesh.svc.cluster.local", "mesh"),
            Some(1)
        );
        assert_eq!(
            store.service_by_hostname("WEB.mesh.svc.cluster.local.", "mesh"),
            Some(1)
        );
        assert_eq!(
            store.service_by_hostname("web.mesh.svc.cluster.local", "else"),
            Some(0)
        );
        assert_eq!(
            store.service_by_hostname("db.mesh.svc.cluster.local", "mesh"),
            None
        );
    }

    #[test]
    fn syntax_errors_name_line_and_field() {
        let text =
            "workloads:\n  - name: a\n    namespace: x\n    node: n\n    addresses: [not-an-ip]\n";
        let err = parse(text).expect_err("bad address").to_string();
        assert!(err.contains("w.yaml"), "{err}");
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("workloads[0].addresses"), "{err}");
    }

    #[test]
    fn a_second_document_duplicate_keys_and_alias_bombs_are_errors_naming_the_line() {
        let mut bomb =
            String::from("workloads:\n  - &a0 {name: a, namespace: x, node: n, addresses: []}\n");
        // Nine levels of ten aliases each, a billion workloads once expanded: refused at
        // the first element that is not a workload, line 3, nothing expanded.
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            bomb += &format!("  - &a{i} [{refs}]\n");
        }
        for (text, want) in [
            (
                "workloads: []\n---\nworkloads: []\n",
                "more than one document",
            ),
            (
                "workloads:\n  - name: a\n    name: b\n    namespace: x\n    node: n\n    addresses: []\n",
                "duplicate field `name`",
            ),
            ("workloads: [\n", "line 2"),
            (&bomb, "line 3"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(matches!(err, Error::Parse { .. }), "{text:?}: {err}");
            let msg = err.to_string();
            assert!(msg.contains("w.yaml") && msg.contains(want), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        assert!(matches!(parse("~\n"), Err(Error::Empty { .. })));
        assert!(matches!(parse("null\n"), Err(Error::Empty { .. })));
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let text = "workloads:\n  - name: a\n    namespace: x\n    node: n\n    addresses: []\n    adresses: []\n";
        let err = parse(text).expect_err("typo").to_string();
        assert!(err.contains("adresses"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_object() {
        let dup = BASE.replace("10.0.0.2", "10.0.0.1");
        let err = parse(&dup).expect_err("duplicate address").to_string();
        assert!(
            err.contains("workloads[1] (mesh/b)") && err.contains("10.0.0.1"),
            "{err}"
        );

        let missing = "workloads:\n  - name: a\n    namespace: x\n    node: node1\n    addresses: [10.0.0.9]\n";
        let err = parse(missing).expect_err("no netns").to_string();
        assert!(err.contains("needs `netns` and `cgroup`"), "{err}");

        let bad_mode = BASE.replace("dataplane-mode: none", "dataplane-mode: sidecar");
        let err = parse(&bad_mode).expect_err("bad label").to_string();
        assert!(err.contains("\"sidecar\""), "{err}");
    }

    #[test]
    fn a_bad_http_route_or_waypoint_policy_rejects_the_file_naming_object_and_field() {
        let route = "httpRoutes:\n- name: split\n  namespace: shop\n  parentRefs: [{kind: Service, group: \"\", name: db}]\n  rules:\n  - matches:\n    - path: {type: PathPrefix, value: orders}\n    backendRefs: [{name: db-v1, port: 8080}]\n";
        let err = parse(route).expect_err("path without /").to_string();
        assert!(
            err.contains("httpRoutes[0] (shop/split)")
                && err.contains("rules[0].matches[0].path.value")
                && err.contains("must start with /"),
            "{err}"
        );

        let policy = "waypointPolicies:\n- name: ro\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n  rules:\n  - to:\n    - operation: {ports: [\"http\"]}\n";
        let err = parse(policy).expect_err("port not a number").to_string();
        assert!(
            err.contains("waypointPolicies[0] (shop/ro)")
                && err.contains("rules[0].to[0].operation.ports[0]"),
            "{err}"
        );

        let good = "waypointPolicies:\n- name: ro\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n  rules:\n  - to:\n    - operation: {methods: [GET]}\nhttpRoutes:\n- name: split\n  namespace: shop\n  parentRefs: [{kind: Service, group: \"\", name: db}]\n  rules:\n  - backendRefs: [{name: db-v1, port: 8080}]\n";
        let cfg = parse(good).expect("a valid policy and route");
        assert_eq!(cfg.waypoint_policies.len(), 1);
        assert_eq!(cfg.http_routes.len(), 1);
    }

    #[test]
    fn a_waypoint_class_policy_must_come_from_the_files_root_namespace() {
        let policy = |ns: &str| {
            format!(
                "waypointPolicies:\n- name: all\n  namespace: {ns}\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}}]\n"
            )
        };
        let err = parse(&policy("shop"))
            .expect_err("not the root")
            .to_string();
        assert!(
            err.contains("waypointPolicies[0] (shop/all)") && err.contains("root namespace"),
            "{err}"
        );
        parse(&policy("istio-system")).expect("the default root namespace");
        let custom = format!("rootNamespace: mesh-root\n{}", policy("mesh-root"));
        parse(&custom).expect("the file's own root namespace");
        let custom = format!("rootNamespace: mesh-root\n{}", policy("istio-system"));
        parse(&custom).expect_err("no longer the root");
    }

    /// A config drawn from a few namespaces, names, labels and addresses, so that
    /// selectors overlap and miss, and including what validation refuses (two workloads
    /// under one key or one address, a VIP that is also a pod's address, namespaces listed
    /// twice, workloads without addresses).
    pub(super) fn generated(rng: &mut impl rand::Rng) -> LocalConfig {
        const NAMESPACES: [&str; 4] = [policy::DEFAULT_ROOT_NAMESPACE, "shop", "web", "db"];
        fn pick(rng: &mut dyn rand::RngCore, from: &[&str]) -> String {
            from[rand::Rng::random_range(rng, 0..from.len())].to_owned()
        }
        fn labels(rng: &mut dyn rand::RngCore, mode: bool) -> BTreeMap<String, String> {
            let mut labels = BTreeMap::new();
            for key in ["app", "tier", "version"] {
                if rand::Rng::random_bool(rng, 0.5) {
                    labels.insert(key.to_owned(), pick(rng, &["x", "y", "z"]));
                }
            }
            if mode && rand::Rng::random_bool(rng, 0.3) {
                labels.insert(DATAPLANE_MODE.to_owned(), pick(rng, &[AMBIENT, NONE]));
            }
            labels
        }
        let ip = |rng: &mut dyn rand::RngCore, base: u8| -> IpAddr {
            let last = rand::Rng::random_range(rng, 0..40u8);
            if rand::Rng::random_bool(rng, 0.1) {
                IpAddr::from([0xfd00, 0, 0, 0, 0, 0, u16::from(base), u16::from(last)])
            } else {
                IpAddr::from([10, 0, base, last])
            }
        };
        let namespaces = (0..rng.random_range(0..6))
            .map(|_| Namespace {
                name: pick(rng, &NAMESPACES),
                labels: labels(rng, true),
            })
            .collect();
        let workloads = (0..rng.random_range(0..40))
            .map(|_| {
                Arc::new(Workload {
                    name: format!("w{}", rng.random_range(0..30)),
                    namespace: pick(rng, &NAMESPACES),
                    uid: None,
                    node: pick(rng, &["node1", "node2"]),
                    network: String::new(),
                    addresses: (0..rng.random_range(0..3)).map(|_| ip(rng, 0)).collect(),
                    service_account: pick(rng, &["default", "web"]),
                    trust_domain: None,
                    protocol: [None, None, Some(Protocol::Tcp), Some(Protocol::Hbone)]
                        [rng.random_range(0..4)],
                    labels: labels(rng, true),
                    canonical_name: None,
                    canonical_revision: None,
                    workload_type: None,
                    workload_name: None,
                    netns: rng.random_bool(0.5).then(|| PathBuf::from("/run/netns/x")),
                    cgroup: rng
                        .random_bool(0.5)
                        .then(|| PathBuf::from("/sys/fs/cgroup/x")),
                    locality: None,
                    waypoint: None,
                })
            })
            .collect();
        let services = (0..rng.random_range(0..10))
            .map(|i| Service {
                name: format!("s{i}"),
                namespace: pick(rng, &NAMESPACES),
                hostname: None,
                // Mostly VIPs of their own; sometimes a pod's address.
                addresses: (0..rng.random_range(1..3))
                    .map(|_| {
                        let base = if rng.random_bool(0.8) { 96 } else { 0 };
                        ip(rng, base)
                    })
                    .collect(),
                ports: vec![ServicePort {
                    port: 80,
                    target_port: rng.random_bool(0.5).then_some(8080),
                    name: None,
                    app_protocol: None,
                }],
                selector: labels(rng, false),
                subject_alt_names: Vec::new(),
                waypoint: None,
                weighted_waypoints: Vec::new(),
            })
            .collect();
        let (policies, peer_authentications) = policy::tests::generated(rng);
        LocalConfig {
            namespaces,
            workloads,
            services,
            policies,
            peer_authentications,
            ..LocalConfig::default()
        }
    }

    /// The store's answers as they were before its indexes: scans of the config.
    struct Scan<'a> {
        cfg: &'a LocalConfig,
        next: usize,
    }

    impl<'a> Scan<'a> {
        fn workload(&self, key: &str) -> Option<&'a Workload> {
            self.cfg
                .workloads
                .iter()
                .map(|w| &**w)
                .find(|w| w.key() == key)
        }

        fn workload_by_addr(&self, ip: IpAddr) -> Option<&'a Workload> {
            // The address map kept the last workload inserted for an address.
            self.cfg
                .workloads
                .iter()
                .map(|w| &**w)
                .rev()
                .find(|w| w.addresses.contains(&ip))
        }

        fn endpoints(&self, svc: &'a Service) -> impl Iterator<Item = &'a Workload> + 'a {
            self.cfg.workloads.iter().map(|w| &**w).filter(move |w| {
                w.namespace == svc.namespace
                    && !svc.selector.is_empty()
                    && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            })
        }

        fn service_of(&self, w: &Workload) -> Option<&'a Service> {
            self.cfg
                .services
                .iter()
                .find(|s| self.endpoints(s).any(|e| e.key() == w.key()))
        }

        fn authorize(&self, key: &str, conn: &policy::Connection) -> policy::Decision {
            let Some(w) = self.workload(key) else {
                return policy::Decision::Deny {
                    policy: String::new(),
                    rule: None,
                    reason: format!("unknown workload {key}"),
                };
            };
            if conn.src_identity.is_none()
                && policy::requires_mtls(
                    &self.cfg.peer_authentications,
                    &self.cfg.root_namespace,
                    &w.namespace,
                    &w.labels,
                )
            {
                return policy::Decision::Deny {
                    policy: String::new(),
                    rule: None,
                    reason: "STRICT mTLS refuses plaintext".to_owned(),
                };
            }
            policy::evaluate(
                &self.cfg.policies,
                &self.cfg.root_namespace,
                &w.namespace,
                &w.labels,
                conn,
            )
        }

        fn identity(&self, w: &Workload) -> String {
            let td = w.trust_domain.as_deref().unwrap_or(&self.cfg.trust_domain);
            format!("spiffe://{td}/ns/{}/sa/{}", w.namespace, w.service_account)
        }

        fn route(&mut self, dst: SocketAddr) -> Route {
            // The last service with the VIP, as the VIP map kept it.
            if let Some(svc) = self
                .cfg
                .services
                .iter()
                .rev()
                .find(|s| s.addresses.contains(&dst.ip()))
            {
                let Some(target) = svc.target_port(dst.port()) else {
                    return Route::NoEndpoint {
                        service: svc.hostname(),
                        port: dst.port(),
                    };
                };
                let eps: Vec<&Workload> = self
                    .endpoints(svc)
                    .filter(|w| !w.addresses.is_empty())
                    .collect();
                if eps.is_empty() {
                    return Route::NoEndpoint {
                        service: svc.hostname(),
                        port: dst.port(),
                    };
                }
                let w = eps[self.next % eps.len()];
                self.next += 1;
                let ip = w
                    .addresses
                    .iter()
                    .find(|a| a.is_ipv4() == dst.is_ipv4())
                    .unwrap_or(&w.addresses[0]);
                let endpoint = SocketAddr::new(*ip, target);
                return match self.cfg.protocol(w) {
                    Protocol::Hbone => {
                        let mut identities = vec![self.identity(w)];
                        identities.extend(svc.subject_alt_names.iter().cloned());
                        Route::Hbone {
                            endpoint,
                            next_hop: SocketAddr::new(endpoint.ip(), 15008),
                            workload: w.key(),
                            identities,
                            service: Some(svc.hostname()),
                            waypoint: None,
                        }
                    }
                    Protocol::Tcp => Route::Passthrough { dst: endpoint },
                };
            }
            match self.workload_by_addr(dst.ip()) {
                Some(w) if self.cfg.protocol(w) == Protocol::Hbone => Route::Hbone {
                    endpoint: dst,
                    next_hop: SocketAddr::new(dst.ip(), 15008),
                    workload: w.key(),
                    identities: vec![self.identity(w)],
                    service: None,
                    waypoint: None,
                },
                _ => Route::Passthrough { dst },
            }
        }
    }

    fn same<T>(a: Option<&T>, b: Option<&T>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    #[test]
    fn the_store_answers_as_a_scan_of_the_config_on_generated_configs() {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let (mut vip_routes, mut with_service, mut endpoints) = (0, 0, 0);
        for _ in 0..300 {
            let cfg = generated(&mut rng);
            let store = Store::new(cfg.clone());
            let mut scan = Scan {
                cfg: &store.cfg,
                next: 0,
            };
            let mut keys: Vec<String> = cfg.workloads.iter().map(|w| w.key()).collect();
            keys.push("shop/nobody".to_owned());
            for key in &keys {
                assert!(same(store.workload(key), scan.workload(key)), "{key}");
            }
            for w in &store.cfg.workloads {
                assert_eq!(store.protocol(w), cfg.protocol(w), "{}", w.key());
                assert_eq!(store.enrolled(w), cfg.enrolled(w), "{}", w.key());
                let found = store.service_of(w);
                assert!(same(found, scan.service_of(w)), "{}", w.key());
                with_service += usize::from(found.is_some());
            }
            for svc in &store.cfg.services {
                let scanned = store
                    .cfg
                    .services
                    .iter()
                    .find(|s| s.namespace == svc.namespace && s.name == svc.name);
                assert!(
                    same(store.service(&svc.namespace, &svc.name), scanned),
                    "{}",
                    svc.key()
                );
            }
            assert!(store.service("shop", "nobody").is_none());
            for (i, svc) in store.cfg.services.iter().enumerate() {
                let indexed: Vec<*const Workload> =
                    store.endpoints(i).map(std::ptr::from_ref).collect();
                let scanned: Vec<*const Workload> =
                    scan.endpoints(svc).map(std::ptr::from_ref).collect();
                assert_eq!(indexed, scanned, "endpoints of {}", svc.key());
                endpoints += indexed.len();
            }
            let mut addrs: Vec<IpAddr> = cfg
                .workloads
                .iter()
                .flat_map(|w| w.addresses.iter().copied())
                .chain(
                    cfg.services
                        .iter()
                        .flat_map(|s| s.addresses.iter().copied()),
                )
                .collect();
            addrs.push(IpAddr::from([192, 0, 2, 1]));
            for ip in &addrs {
                assert!(same(
                    store.workload_by_addr(*ip),
                    scan.workload_by_addr(*ip)
                ));
            }
            // Routes in the same order keep the round robins in step.
            for _ in 0..3 {
                for ip in &addrs {
                    for port in [80, 81] {
                        let dst = SocketAddr::new(*ip, port);
                        let route = store.route(None, dst);
                        assert_eq!(route, scan.route(dst), "{dst}");
                        vip_routes += usize::from(matches!(
                            route,
                            Route::Hbone {
                                service: Some(_),
                                ..
                            }
                        ));
                    }
                }
            }
            for key in &keys {
                for identity in [None, Some("shop"), Some("web"), Some("db")] {
                    for port in [80, 9000] {
                        let conn = policy::Connection {
                            src_ip: IpAddr::from([10, 0, 0, 1]),
                            src_identity: identity
                                .map(|ns| format!("spiffe://cluster.local/ns/{ns}/sa/default")),
                            dst: SocketAddr::from(([10, 0, 0, 2], port)),
                        };
                        assert_eq!(
                            store.authorize(key, &conn),
                            scan.authorize(key, &conn),
                            "{key} {conn:?}"
                        );
                    }
                }
            }
        }
        // The generator reaches what the indexes are for.
        assert!(vip_routes > 200, "{vip_routes} routes through a service");
        assert!(
            with_service > 500,
            "{with_service} workloads behind a service"
        );
        assert!(endpoints > 300, "{endpoints} endpoints");
    }
}
