//! Kubernetes objects → the store's types: a Pod becomes a [`Workload`], a Namespace a
//! [`Namespace`], a Service with a selector and a cluster IP a [`Service`], a Gateway of
//! class `istio-waypoint` a waypoint that `istio.io/use-waypoint` labels point at. Each
//! converter keeps only what the store uses; objects it cannot use are skipped with the
//! reason.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;

use crate::state::{
    LocalConfig, Namespace, Protocol, Service, ServicePort, WAYPOINT_HBONE_PORT, WaypointRef,
    Workload,
};

/// The Gateway API class of Istio's waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// On a namespace, service or pod: the waypoint (a Gateway's name) its traffic goes
/// through; `none` opts out of a namespace's.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Beside [`USE_WAYPOINT`]: the waypoint's namespace, when not the object's own.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint Gateway: which traffic it takes (`service`, the default; `workload`;
/// `all`; `none`).
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// On a Gateway's own pods and service: they never go through a waypoint themselves.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// What ztunnel keeps of a waypoint Gateway: which traffic it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waypoint {
    pub for_services: bool,
    pub for_workloads: bool,
}

/// A Gateway of class `istio-waypoint` as a [`Waypoint`]; `None` for other classes.
pub fn gateway(g: &DynamicObject) -> Option<Waypoint> {
    if g.data["spec"]["gatewayClassName"].as_str() != Some(WAYPOINT_CLASS) {
        return None;
    }
    let for_ = g
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(WAYPOINT_FOR))
        .map_or("service", String::as_str);
    let (for_services, for_workloads) = match for_ {
        "service" => (true, false),
        "workload" => (false, true),
        "all" => (true, true),
        "none" => (false, false),
        other => {
            tracing::warn!(gateway = %key(&g.metadata), value = other, "unknown {WAYPOINT_FOR}; taking it as `service`, the default");
            (true, false)
        }
    };
    Some(Waypoint {
        for_services,
        for_workloads,
    })
}

/// An object's spec with its name and namespace: the shape the workload file writes a
/// waypoint's routes and policies in.
fn flattened(o: &DynamicObject) -> serde_json::Value {
    let mut v = match &o.data["spec"] {
        serde_json::Value::Object(m) => serde_json::Value::Object(m.clone()),
        _ => serde_json::json!({}),
    };
    v["name"] = o.metadata.name.clone().unwrap_or_default().into();
    v["namespace"] = o.metadata.namespace.clone().unwrap_or_default().into();
    v
}

/// An HTTPRoute for a waypoint; `None` (warned about, naming the object and the field)
/// when it does not parse or is invalid: istiod likewise leaves an invalid route out.
pub fn http_route(o: &DynamicObject) -> Option<crate::waypoint::route::HttpRoute> {
    let object = format!("HTTPRoute {}", key(&o.metadata));
    let route: crate::waypoint::route::HttpRoute = match serde_path_to_error::deserialize(
        flattened(o),
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%object, field = %e.path(), error = %e.inner(), "ignoring an HTTPRoute that does not parse");
            return None;
        }
    };
    if let Err(reason) = crate::waypoint::route::validate_all(std::slice::from_ref(&route)) {
        tracing::warn!(%object, %reason, "ignoring an invalid HTTPRoute");
        return None;
    }
    Some(route)
}

/// An AuthorizationPolicy a waypoint enforces: one with `targetRefs` (or `targetRef`);
/// `None` for the others, which are the node ztunnels' (`selector` or namespace-wide, L4,
/// carried by istiod's xDS, not read here), and for one that does not parse or is invalid
/// (warned about, naming the object and the field).
pub fn waypoint_policy(o: &DynamicObject) -> Option<crate::waypoint::authz::WaypointPolicy> {
    let spec = &o.data["spec"];
    if spec.get("targetRefs").is_none() && spec.get("targetRef").is_none() {
        return None;
    }
    let object = format!("AuthorizationPolicy {}", key(&o.metadata));
    let policy: crate::waypoint::authz::WaypointPolicy = match serde_path_to_error::deserialize(
        flattened(o),
    ) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%object, field = %e.path(), error = %e.inner(), "ignoring an AuthorizationPolicy that does not parse");
            return None;
        }
    };
    if let Err(reason) = crate::waypoint::authz::validate_all(std::slice::from_ref(&policy)) {
        tracing::warn!(%object, %reason, "ignoring an invalid AuthorizationPolicy");
        return None;
    }
    Some(policy)
}

/// The name of the policy standing in for AuthorizationPolicies that exist but may not be
/// listed (403): it denies every request at every waypoint until they can be read.
pub const DENY_ALL_UNREADABLE: &str = "authorizationpolicies-not-readable";

/// A DENY policy matching every request at every waypoint (GatewayClass
/// `istio-waypoint`, from the root namespace): what a waypoint applies while it may not
/// read AuthorizationPolicies, so that a policy it cannot see is never bypassed.
pub fn deny_all_waypoints(root_namespace: &str) -> crate::waypoint::authz::WaypointPolicy {
    crate::waypoint::authz::WaypointPolicy {
        name: DENY_ALL_UNREADABLE.to_owned(),
        namespace: root_namespace.to_owned(),
        target_refs: vec![crate::waypoint::authz::TargetRef {
            group: crate::waypoint::authz::GATEWAY_GROUP.to_owned(),
            kind: "GatewayClass".to_owned(),
            name: WAYPOINT_CLASS.to_owned(),
            namespace: None,
        }],
        target_ref: None,
        selector: None,
        action: crate::policy::Action::Deny,
        rules: vec![crate::waypoint::authz::PolicyRule::default()],
    }
}

/// The waypoint an object's traffic goes through, as Istio resolves it: the object's own
/// `istio.io/use-waypoint` label, else its namespace's (`none` on the object opts out of
/// the namespace's); the waypoint's namespace from `istio.io/use-waypoint-namespace`
/// beside that label, else the object's. Only a Gateway of class `istio-waypoint` that
/// takes this kind of traffic (`services`: a service's; else a workload's) counts; a
/// label naming anything else is ignored, as istiod ignores it (the traffic goes to its
/// destination directly, over HBONE and L4-policed). A Gateway's own pods and service
/// never use a waypoint.
pub fn use_waypoint(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    waypoints: &BTreeMap<String, Waypoint>,
    services: bool,
) -> Option<WaypointRef> {
    if labels.contains_key(GATEWAY_NAME) {
        return None;
    }
    let from = if labels.contains_key(USE_WAYPOINT) {
        labels
    } else {
        namespace_labels.filter(|l| l.contains_key(USE_WAYPOINT))?
    };
    let name = from.get(USE_WAYPOINT)?;
    if name.is_empty() || name == "none" {
        return None;
    }
    let ns = from
        .get(USE_WAYPOINT_NAMESPACE)
        .map_or(namespace, String::as_str);
    let w = waypoints.get(&format!("{ns}/{name}"))?;
    if !(if services {
        w.for_services
    } else {
        w.for_workloads
    }) {
        return None;
    }
    Some(WaypointRef {
        address: None,
        hostname: Some(format!("{name}.{ns}.svc.cluster.local")),
        namespace: Some(ns.to_owned()),
        port: WAYPOINT_HBONE_PORT,
    })
}

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
        ports.push(ServicePort {
            port,
            target_port,
            name: sp.name.clone(),
            app_protocol: sp.app_protocol.clone(),
        });
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
    waypoints: &BTreeMap<String, Waypoint>,
    placements: &BTreeMap<String, Placement>,
) -> LocalConfig {
    let ns_labels = |ns: &str| namespaces.get(ns).map(|n| &n.labels);
    let mut taken = std::collections::BTreeSet::new();
    let workloads = pods
        .values()
        .map(|p| {
            let mut w = p.workload.clone();
            w.waypoint = use_waypoint(
                &w.namespace,
                &w.labels,
                ns_labels(&w.namespace),
                waypoints,
                false,
            );
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
        .filter_map(|k| {
            let mut s = service(k, pods)?;
            let labels = k.metadata.labels.clone().unwrap_or_default();
            s.waypoint = use_waypoint(
                &s.namespace,
                &labels,
                ns_labels(&s.namespace),
                waypoints,
                true,
            );
            Some(s)
        })
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

    #[test]
    fn use_waypoint_follows_istio_precedence_and_the_gateways_kind() {
        let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let gw = |class: &str, for_: Option<&str>| -> DynamicObject {
            let mut v = serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "wp", "namespace": "shop", "labels": {}},
                "spec": {"gatewayClassName": class, "listeners": []}
            });
            if let Some(f) = for_ {
                v["metadata"]["labels"][WAYPOINT_FOR] = serde_json::json!(f);
            }
            serde_json::from_value(v).expect("gateway")
        };
        assert_eq!(
            gateway(&gw("istio", None)),
            None,
            "another class is no waypoint"
        );
        let service_wp = gateway(&gw(WAYPOINT_CLASS, None)).expect("waypoint");
        assert!(
            service_wp.for_services && !service_wp.for_workloads,
            "service by default"
        );
        let all = gateway(&gw(WAYPOINT_CLASS, Some("all"))).expect("waypoint");
        let workload = gateway(&gw(WAYPOINT_CLASS, Some("workload"))).expect("waypoint");
        let none = gateway(&gw(WAYPOINT_CLASS, Some("none"))).expect("waypoint");

        let wp = |ns: &str| WaypointRef {
            address: None,
            hostname: Some(format!("wp.{ns}.svc.cluster.local")),
            namespace: Some(ns.to_owned()),
            port: 15008,
        };
        let ns_wp = labels(&[(USE_WAYPOINT, "wp")]);
        let waypoints =
            |w: Waypoint| BTreeMap::from([("shop/wp".to_owned(), w), ("infra/wp".to_owned(), w)]);
        let svc = waypoints(service_wp);
        // The namespace's label applies to a service without one.
        assert_eq!(
            use_waypoint("shop", &labels(&[]), Some(&ns_wp), &svc, true),
            Some(wp("shop"))
        );
        // The object's own label wins; `none` opts out of the namespace's.
        let own = labels(&[(USE_WAYPOINT, "wp"), (USE_WAYPOINT_NAMESPACE, "infra")]);
        assert_eq!(
            use_waypoint("shop", &own, Some(&ns_wp), &svc, true),
            Some(wp("infra"))
        );
        let opt_out = labels(&[(USE_WAYPOINT, "none")]);
        assert_eq!(
            use_waypoint("shop", &opt_out, Some(&ns_wp), &svc, true),
            None
        );
        // A name that is no waypoint Gateway: ignored, as istiod ignores it.
        let missing = labels(&[(USE_WAYPOINT, "nope")]);
        assert_eq!(use_waypoint("shop", &missing, None, &svc, true), None);
        // A service waypoint takes no workload traffic, a workload one no service traffic.
        assert_eq!(use_waypoint("shop", &ns_wp, None, &svc, false), None);
        let wl = waypoints(workload);
        assert_eq!(
            use_waypoint("shop", &ns_wp, None, &wl, false),
            Some(wp("shop"))
        );
        assert_eq!(use_waypoint("shop", &ns_wp, None, &wl, true), None);
        for kind in [true, false] {
            assert_eq!(
                use_waypoint("shop", &ns_wp, None, &waypoints(all), kind),
                Some(wp("shop"))
            );
            assert_eq!(
                use_waypoint("shop", &ns_wp, None, &waypoints(none), kind),
                None
            );
        }
        // The waypoint's own pods and service never go through a waypoint.
        let its_own = labels(&[(GATEWAY_NAME, "wp")]);
        assert_eq!(
            use_waypoint("shop", &its_own, Some(&ns_wp), &svc, true),
            None
        );
    }
}
