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
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
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
    #[error("invalid workload file {path}: {location}field `{field}`: {message}")]
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
    #[serde(default)]
    pub workloads: Vec<Workload>,
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
    /// The service's virtual IPs.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Workloads in the same namespace whose labels include all of these back the service.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Extra identities the service's endpoints may present (SPIFFE URIs).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
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
            serde_yaml::from_str::<serde_yaml::Value>(text),
            Ok(serde_yaml::Value::Null)
        ) {
            return Err(Error::Empty {
                path: path.to_owned(),
            });
        }
        let de = serde_yaml::Deserializer::from_str(text);
        let cfg: LocalConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
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
        self.workloads
            .iter()
            .filter(|w| self.captured_on(w, node))
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

/// Where an outbound connection goes, decided from the destination the app dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through an HBONE tunnel to the endpoint's ztunnel.
    Hbone {
        /// The endpoint pod and target port (after VIP and port translation).
        endpoint: SocketAddr,
        /// `namespace/name` of the endpoint workload.
        workload: String,
        /// SPIFFE identities the server may present: the workload's, plus the
        /// service's subject alt names when reached through a service.
        identities: Vec<String>,
        /// The service hostname when the app dialled a VIP.
        service: Option<String>,
    },
    /// Plain TCP to this address (a workload outside the mesh, or unknown).
    Passthrough { dst: SocketAddr },
    /// A service VIP with no endpoint for the port: refuse the connection.
    NoEndpoint { service: String, port: u16 },
}

/// The workload store: the file's content indexed by address.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub cfg: LocalConfig,
    by_addr: BTreeMap<IpAddr, usize>,
    by_vip: BTreeMap<IpAddr, usize>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Store {
    pub fn new(cfg: LocalConfig) -> Self {
        let mut by_addr = BTreeMap::new();
        for (i, w) in cfg.workloads.iter().enumerate() {
            for a in &w.addresses {
                by_addr.insert(*a, i);
            }
        }
        let mut by_vip = BTreeMap::new();
        for (i, s) in cfg.services.iter().enumerate() {
            for a in &s.addresses {
                by_vip.insert(*a, i);
            }
        }
        Self {
            cfg,
            by_addr,
            by_vip,
            next: Default::default(),
        }
    }

    pub fn workload_by_addr(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_addr.get(&ip).map(|i| &self.cfg.workloads[*i])
    }

    pub fn workload(&self, key: &str) -> Option<&Workload> {
        self.cfg.workloads.iter().find(|w| w.key() == key)
    }

    pub fn protocol(&self, w: &Workload) -> Protocol {
        self.cfg.protocol(w)
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

    /// Endpoints of a service: workloads of its namespace matching its selector.
    pub fn endpoints<'a>(&'a self, svc: &'a Service) -> impl Iterator<Item = &'a Workload> + 'a {
        self.cfg.workloads.iter().filter(move |w| {
            w.namespace == svc.namespace
                && !svc.selector.is_empty()
                && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        })
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

    /// Decides the path for a connection to `dst`.
    pub fn route(&self, dst: SocketAddr) -> Route {
        if let Some(i) = self.by_vip.get(&dst.ip()) {
            let svc = &self.cfg.services[*i];
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
            // Round robin over the endpoints.
            let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let w = eps[n % eps.len()];
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
                        workload: w.key(),
                        identities,
                        service: Some(svc.hostname()),
                    }
                }
                Protocol::Tcp => Route::Passthrough { dst: endpoint },
            };
        }
        match self.workload_by_addr(dst.ip()) {
            Some(w) if self.protocol(w) == Protocol::Hbone => Route::Hbone {
                endpoint: dst,
                workload: w.key(),
                identities: vec![self.identity(w)],
                service: None,
            },
            _ => Route::Passthrough { dst },
        }
    }
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
mod tests {
    use super::*;

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
            store.route(a),
            Route::Hbone {
                endpoint: a,
                workload: "mesh/a".into(),
                identities: vec!["spiffe://cluster.local/ns/mesh/sa/default".into()],
                service: None,
            }
        );
        // b opted out: plain TCP; unknown addresses too.
        for dst in ["10.0.0.2:80", "192.0.2.9:443"] {
            let dst: SocketAddr = dst.parse().expect("addr");
            assert_eq!(store.route(dst), Route::Passthrough { dst });
        }
        // A VIP: endpoint a, port 80 → 8080, plus the service's SANs.
        match store.route("10.96.0.1:80".parse().expect("addr")) {
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
            store.route("10.96.0.1:81".parse().expect("addr")),
            Route::NoEndpoint { .. }
        ));
        assert!(matches!(
            store.route("10.96.0.2:80".parse().expect("addr")),
            Route::NoEndpoint { .. }
        ));
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
}
