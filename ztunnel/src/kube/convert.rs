//! Kubernetes objects → the store's types: a Pod becomes a [`Workload`], a Namespace a
//! [`Namespace`], a Service with a selector and a cluster IP a [`Service`]. Each converter
//! keeps only what the store uses; objects it cannot use are skipped with the reason.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::state::{LocalConfig, Namespace, Protocol, Service, ServicePort, Workload};

/// Labels naming a workload's canonical service, most specific first (Istio's order).
pub const CANONICAL_NAME_LABELS: &[&str] = &[
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// Labels naming a workload's canonical revision, most specific first.
pub const CANONICAL_REVISION_LABELS: &[&str] = &[
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// What ztunnel keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// The pod's UID: how its cgroup is found on the node.
    pub uid: String,
    pub workload: Workload,
    /// Host-network pods share the node's network namespace: never captured.
    pub host_network: bool,
    /// Named container ports, for Services whose `targetPort` is a name.
    pub named_ports: BTreeMap<String, u16>,
}

/// `namespace/name` of any object.
pub fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// A Pod that has an identity and may carry traffic; `None` for finished pods (their IP
/// may already belong to another pod) and pods without a name or UID.
pub fn pod(p: &Pod) -> Option<PodRecord> {
    let meta = &p.metadata;
    let name = meta.name.clone()?;
    let namespace = meta.namespace.clone()?;
    let uid = meta.uid.clone()?;
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let host_network = spec.host_network.unwrap_or(false);
    let mut addresses: Vec<IpAddr> = Vec::new();
    if !host_network && let Some(s) = status {
        let ips = s
            .pod_ips
            .iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(s.pod_ip.as_deref());
        for ip in ips {
            match ip.parse() {
                Ok(a) if !addresses.contains(&a) => addresses.push(a),
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), ip, "ignoring an unparsable pod IP")
                }
            }
        }
    }
    let labels: BTreeMap<String, String> = meta.labels.clone().unwrap_or_default();
    let first_label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let (workload_type, workload_name) = owner(p);
    let named_ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|cp| cp.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|cp| Some((cp.name.clone()?, u16::try_from(cp.container_port).ok()?)))
        .collect();
    Some(PodRecord {
        uid,
        host_network,
        named_ports,
        workload: Workload {
            canonical_name: first_label(CANONICAL_NAME_LABELS),
            canonical_revision: first_label(CANONICAL_REVISION_LABELS),
            name,
            namespace,
            uid: None,
            node: spec.node_name.clone().unwrap_or_default(),
            network: String::new(),
            addresses,
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            trust_domain: None,
            protocol: host_network.then_some(Protocol::Tcp),
            labels,
            workload_type,
            workload_name,
            netns: None,
            cgroup: None,
            // The node's topology labels are not watched (see ARCHITECTURE.md).
            locality: None,
            waypoint: None,
        },
    })
}

/// The controller that owns the pod, as Istio names it: a ReplicaSet made by a Deployment
/// (it carries the `pod-template-hash` label) counts as the Deployment.
fn owner(p: &Pod) -> (Option<String>, Option<String>) {
    let Some(o) = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return (None, None);
    };
    let hash = p
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match (o.kind.as_str(), hash) {
        ("ReplicaSet", Some(h)) if o.name.ends_with(&format!("-{h}")) => (
            Some("deployment".to_owned()),
            Some(o.name[..o.name.len() - h.len() - 1].to_owned()),
        ),
        (kind, _) => (Some(kind.to_lowercase()), Some(o.name.clone())),
    }
}

pub fn namespace(n: &KubeNamespace) -> Option<Namespace> {
    Some(Namespace {
        name: n.metadata.name.clone()?,
        labels: n.metadata.labels.clone().unwrap_or_default(),
    })
}

/// A Service as the store routes it. Only Services with a selector and a cluster IP: their
/// endpoints are the selected pods. Others (headless, ExternalName, selector-less ones such
/// as `default/kubernetes`) are left out, so traffic to them passes through untouched.
pub fn service(s: &KubeService, pods: &BTreeMap<String, PodRecord>) -> Option<Service> {
    let name = s.metadata.name.clone()?;
    let namespace = s.metadata.namespace.clone()?;
    let spec = s.spec.as_ref()?;
    let selector = spec.selector.clone().unwrap_or_default();
    if selector.is_empty() || spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let addresses: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .fold(Vec::new(), |mut v, a| {
            if !v.contains(&a) {
                v.push(a);
            }
            v
        });
    if addresses.is_empty() {
        return None;
    }
    let selected = || {
        pods.values().filter(|p| {
            p.workload.namespace == namespace
                && selector
                    .iter()
                    .all(|(k, v)| p.workload.labels.get(k) == Some(v))
        })
    };
    let mut ports = Vec::new();
    for sp in spec.ports.iter().flatten() {
        if sp.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        let target_port = match &sp.target_port {
            None => None,
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(port_name)) => {
                match selected().find_map(|p| p.named_ports.get(port_name).copied()) {
                    Some(n) => Some(n),
                    None => {
                        tracing::debug!(service = %format!("{namespace}/{name}"), port, port_name, "named target port not found on any selected pod yet");
                        continue;
                    }
                }
            }
        };
        ports.push(ServicePort { port, target_port });
    }
    if ports.is_empty() {
        return None;
    }
    Some(Service {
        name,
        namespace,
        hostname: None,
        addresses,
        ports,
        selector,
        subject_alt_names: Vec::new(),
        waypoint: None,
        weighted_waypoints: Vec::new(),
    })
}

/// Where a local pod lives on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

/// The whole configuration from the mirrored objects; `placements` (by pod UID) gives local
/// pods their netns and cgroup. Pods sharing an address (an old pod not yet gone and its
/// successor) keep the first one by `namespace/name`, so the result never depends on
/// arrival order.
pub fn local_config(
    trust_domain: &str,
    namespaces: &BTreeMap<String, Namespace>,
    pods: &BTreeMap<String, PodRecord>,
    services: &BTreeMap<String, KubeService>,
    placements: &BTreeMap<String, Placement>,
) -> LocalConfig {
    let mut taken = std::collections::BTreeSet::new();
    let workloads = pods
        .values()
        .map(|p| {
            let mut w = p.workload.clone();
            w.addresses.retain(|a| taken.insert(*a));
            if let Some(pl) = placements.get(&p.uid) {
                w.netns = Some(pl.netns.clone());
                w.cgroup = Some(pl.cgroup.clone());
            }
            std::sync::Arc::new(w)
        })
        .collect();
    let services = services
        .values()
        .filter_map(|s| service(s, pods))
        .filter(|s| s.addresses.iter().all(|a| taken.insert(*a)))
        .collect();
    LocalConfig {
        trust_domain: trust_domain.to_owned(),
        namespaces: namespaces.values().cloned().collect(),
        workloads,
        services,
        ..LocalConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("valid pod")
    }

    fn web() -> Pod {
        pod_json(serde_json::json!({
            "metadata": {
                "name": "web-7d9f-abcde", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "version": "v2", "pod-template-hash": "7d9f"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "rs", "controller": true}]
            },
            "spec": {
                "nodeName": "node1", "serviceAccountName": "web-sa",
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]
            },
            "status": {"phase": "Running", "podIP": "10.1.0.11", "podIPs": [{"ip": "10.1.0.11"}, {"ip": "fd00::11"}]}
        }))
    }

    #[test]
    fn pod_becomes_a_workload_with_identity_and_canonical_names() {
        let r = pod(&web()).expect("running pod converts");
        let w = &r.workload;
        assert_eq!(r.uid, "u-1");
        assert_eq!(w.key(), "shop/web-7d9f-abcde");
        assert_eq!(w.node, "node1");
        assert_eq!(w.service_account, "web-sa");
        assert_eq!(
            w.addresses,
            vec![
                "10.1.0.11".parse::<IpAddr>().expect("ip"),
                "fd00::11".parse().expect("ip")
            ]
        );
        assert_eq!(w.canonical_name(), "web");
        assert_eq!(w.canonical_revision(), "v2");
        assert_eq!(w.workload_type(), "deployment");
        assert_eq!(w.workload_name(), "web");
        assert_eq!(r.named_ports.get("http"), Some(&8080));
        let cfg = local_config(
            "example.org",
            &BTreeMap::new(),
            &BTreeMap::from([(w.key(), r.clone())]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(
            crate::state::Store::new(cfg.clone()).identity(&cfg.workloads[0]),
            "spiffe://example.org/ns/shop/sa/web-sa"
        );
    }

    #[test]
    fn canonical_labels_follow_istio_precedence() {
        let mut p = web();
        let labels = p.metadata.labels.as_mut().expect("labels");
        labels.insert(
            "service.istio.io/canonical-name".into(),
            "storefront".into(),
        );
        labels.insert("app.kubernetes.io/version".into(), "1.2".into());
        let w = pod(&p).expect("converts").workload;
        assert_eq!(w.canonical_name(), "storefront");
        assert_eq!(w.canonical_revision(), "1.2");
    }

    #[test]
    fn finished_and_host_network_pods() {
        let mut done = web();
        done.status.as_mut().expect("status").phase = Some("Succeeded".into());
        assert_eq!(pod(&done), None, "a finished pod's IP may be reused");
        let mut host = web();
        host.spec.as_mut().expect("spec").host_network = Some(true);
        let r = pod(&host).expect("host-network pods are workloads");
        assert!(r.host_network);
        assert!(r.workload.addresses.is_empty(), "they share the node's IP");
        assert_eq!(r.workload.protocol, Some(Protocol::Tcp));
    }

    #[test]
    fn services_need_a_selector_and_a_cluster_ip() {
        let pods = BTreeMap::from([("shop/web".to_owned(), pod(&web()).expect("pod"))]);
        let svc = |v: serde_json::Value| -> KubeService { serde_json::from_value(v).expect("svc") };
        let s = service(
            &svc(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                         "ports": [{"port": 80, "targetPort": "http"}, {"port": 81, "targetPort": 9090},
                                   {"port": 82}, {"port": 53, "protocol": "UDP"}]}
            })),
            &pods,
        )
        .expect("selector service converts");
        assert_eq!(
            s.addresses,
            vec!["10.96.0.20".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            s.target_port(80),
            Some(8080),
            "named port resolved from the pod"
        );
        assert_eq!(s.target_port(81), Some(9090));
        assert_eq!(s.target_port(82), Some(82));
        assert_eq!(s.target_port(53), None, "udp ports are not proxied");
        for (what, v) in [
            (
                "selector-less",
                serde_json::json!({"metadata": {"name": "kubernetes", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}]}}),
            ),
            (
                "headless",
                serde_json::json!({"metadata": {"name": "h", "namespace": "shop"},
                "spec": {"selector": {"app": "web"}, "clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
        ] {
            assert_eq!(
                service(&svc(v), &pods),
                None,
                "{what} services pass through"
            );
        }
    }

    #[test]
    fn shared_addresses_go_to_one_pod_only() {
        let a = pod(&web()).expect("pod");
        let mut b = a.clone();
        b.workload.name = "web-new".into();
        b.uid = "u-2".into();
        let pods = BTreeMap::from([(a.workload.key(), a.clone()), (b.workload.key(), b.clone())]);
        let cfg = local_config(
            "td",
            &BTreeMap::new(),
            &pods,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let with_addr: Vec<_> = cfg
            .workloads
            .iter()
            .filter(|w| !w.addresses.is_empty())
            .map(|w| w.name.clone())
            .collect();
        assert_eq!(with_addr, vec!["web-7d9f-abcde".to_owned()]);
    }
}
