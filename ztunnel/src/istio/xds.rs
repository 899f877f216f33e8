//! Delta ADS client for istiod: subscribes (wildcard) to `istio.workload.Address` and
//! `istio.security.Authorization`, converts each resource into the store's types, ACKs
//! good responses and NACKs a response with invalid resources (naming each and why)
//! while the rest of it applies and the invalid ones keep their last good version.
//! Reconnects with backoff and resubscribes with the versions it holds.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    channel::AuthChannel,
    proto::{
        ADDRESS_TYPE, AUTHORIZATION_TYPE,
        envoy::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
        rpc, security, workload,
    },
    source::IstioSource,
};
use crate::{
    policy::{self, IpNet, StringMatch},
    state::{Protocol, Service, ServicePort, WaypointRef, WeightedWaypoint, Workload},
};

/// Label given to a workload for each service it backs (`namespace/hostname`): our
/// services select their endpoints by label, istiod lists them on the workload.
pub const SERVICE_LABEL_PREFIX: &str = "xds.ztunnel.io/service.";
/// Label given to a workload for each selector policy istiod says applies to it.
pub const POLICY_LABEL_PREFIX: &str = "xds.ztunnel.io/policy.";
const SELECTED: &str = "true";

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// gRPC INVALID_ARGUMENT, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("resource {name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("xds stream failed: {}: {}", status.code(), status.message())]
    Stream {
        #[source]
        status: tonic::Status,
    },
    #[error("xds stream closed by istiod")]
    Closed,
}

impl Error {
    /// Istio's `istio_xds_connection_terminations_total` reason for a stream that ended
    /// with this error: `ConnectionError` when istiod was never reached, `Reconnect` for
    /// the ends istiod causes on purpose (its max connection age, a GOAWAY), `Complete`
    /// when istiod closed the stream cleanly, `Error` for the rest (istio/ztunnel
    /// `src/xds/client.rs`).
    pub fn termination_reason(&self, got_response: bool) -> &'static str {
        use tonic::Code;
        match self {
            Error::Closed => "Complete",
            Error::Stream { status } => {
                let msg = status.message();
                match status.code() {
                    Code::Unavailable if !got_response && !msg.contains("transport is closing") => {
                        "ConnectionError"
                    }
                    Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => "Reconnect",
                    Code::Unavailable
                        if msg.contains("transport is closing")
                            || msg.contains("received prior goaway") =>
                    {
                        "Reconnect"
                    }
                    _ => "Error",
                }
            }
            Error::Invalid { .. } => "Error",
        }
    }
}

/// A workload as istiod describes it, converted.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsWorkload {
    /// Shared with every config built from it.
    pub workload: Arc<Workload>,
    pub healthy: bool,
    /// `namespace/hostname` with its (service port, target port) pairs for this workload,
    /// both sorted. A workload backs a service or two: sorted lists take a fraction of what
    /// maps would (two B-tree nodes, about 600 bytes per workload).
    pub services: Vec<(String, Vec<(u16, u16)>)>,
}

/// What one `Address` resource holds.
#[derive(Debug, Clone, PartialEq)]
pub enum XdsAddress {
    Workload(Box<XdsWorkload>),
    Service(Box<Service>),
}

/// What one `Authorization` resource holds.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsAuthorization {
    pub policy: policy::Authorization,
    /// Dry-run policies are logged, never enforced.
    pub dry_run: bool,
}

/// Every resource held, by type and name, with its version.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    pub addresses: BTreeMap<String, (String, XdsAddress)>,
    pub authorizations: BTreeMap<String, (String, XdsAuthorization)>,
}

impl Resources {
    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE => self
                .addresses
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
            _ => self
                .authorizations
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
        }
    }

    /// Applies one response; returns the invalid resources (name and reason), which are
    /// left as they were.
    pub fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<Error> {
        let mut errors = Vec::new();
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                errors.push(invalid(&r.name, "resource has no body"));
                continue;
            };
            if any.type_url != resp.type_url {
                errors.push(invalid(
                    &r.name,
                    format!("body type {} is not {}", any.type_url, resp.type_url),
                ));
                continue;
            }
            let converted = match resp.type_url.as_str() {
                ADDRESS_TYPE => workload::Address::decode(any.value.as_slice())
                    .map_err(|e| format!("does not decode: {e}"))
                    .and_then(|a| convert_address(&a))
                    .map(|a| {
                        self.addresses
                            .insert(r.name.clone(), (r.version.clone(), a));
                    }),
                AUTHORIZATION_TYPE => security::Authorization::decode(any.value.as_slice())
                    .map_err(|e| format!("does not decode: {e}"))
                    .and_then(|a| convert_authorization(&a))
                    .map(|a| {
                        self.authorizations
                            .insert(r.name.clone(), (r.version.clone(), a));
                    }),
                other => Err(format!("unsupported type {other}")),
            };
            if let Err(reason) = converted {
                errors.push(invalid(&r.name, reason));
            }
        }
        for name in &resp.removed_resources {
            match resp.type_url.as_str() {
                ADDRESS_TYPE => self.addresses.remove(name).map(drop),
                _ => self.authorizations.remove(name).map(drop),
            };
        }
        errors
    }
}

fn invalid(name: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|_| "bad")?)),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|_| "bad")?,
        )),
        n => Err(format!("address of {n} bytes is neither IPv4 nor IPv6")),
    }
}

fn port(p: u32, what: &str) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("{what} {p} is out of range"))
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

pub fn convert_address(a: &workload::Address) -> Result<XdsAddress, String> {
    match &a.r#type {
        Some(workload::address::Type::Workload(w)) => {
            convert_workload(w).map(|w| XdsAddress::Workload(Box::new(w)))
        }
        Some(workload::address::Type::Service(s)) => {
            convert_service(s).map(|s| XdsAddress::Service(Box::new(s)))
        }
        None => Err("address is neither a workload nor a service".into()),
    }
}

/// Istio's `GatewayAddress` as our [`WaypointRef`]: an address (a waypoint pod's or its
/// service's VIP) or a service by namespace and hostname, with the HBONE port (0 or
/// absent, as istiod never sends it: 15008).
fn convert_waypoint(g: &workload::GatewayAddress) -> Result<WaypointRef, String> {
    let port = match port(g.hbone_mtls_port, "waypoint hbone_mtls_port")? {
        0 => crate::state::WAYPOINT_HBONE_PORT,
        p => p,
    };
    match &g.destination {
        Some(workload::gateway_address::Destination::Address(a)) => Ok(WaypointRef {
            address: Some(ip(&a.address).map_err(|e| format!("waypoint {e}"))?),
            hostname: None,
            namespace: None,
            port,
        }),
        Some(workload::gateway_address::Destination::Hostname(h)) => {
            if h.hostname.is_empty() {
                return Err("waypoint hostname is empty".into());
            }
            Ok(WaypointRef {
                address: None,
                hostname: Some(h.hostname.clone()),
                namespace: non_empty(&h.namespace),
                port,
            })
        }
        None => Err("waypoint has neither an address nor a hostname".into()),
    }
}

fn convert_workload(w: &workload::Workload) -> Result<XdsWorkload, String> {
    if w.name.is_empty() || w.namespace.is_empty() {
        return Err("workload name and namespace must not be empty".into());
    }
    let addresses = w
        .addresses
        .iter()
        .map(|a| ip(a))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match workload::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(workload::TunnelProtocol::Hbone) => Protocol::Hbone,
        // Sidecar mTLS is not spoken here: such workloads are dialled as plain TCP.
        Ok(workload::TunnelProtocol::None | workload::TunnelProtocol::LegacyIstioMtls) => {
            Protocol::Tcp
        }
        Err(_) => return Err(format!("unknown tunnel protocol {}", w.tunnel_protocol)),
    };
    let workload_type = workload::WorkloadType::try_from(w.workload_type)
        .map_err(|_| format!("unknown workload type {}", w.workload_type))?;
    let mut labels = BTreeMap::new();
    let healthy = w.status == workload::WorkloadStatus::Healthy as i32;
    let mut services = Vec::with_capacity(w.services.len());
    for (key, ports) in &w.services {
        let mut list = Vec::with_capacity(ports.ports.len());
        for p in &ports.ports {
            list.push((
                port(p.service_port, "service port")?,
                port(p.target_port, "target port")?,
            ));
        }
        // A service port listed twice: the last one counts (stable sort, then the last
        // of each run).
        list.sort_by_key(|&(service_port, _)| service_port);
        list.reverse();
        list.dedup_by_key(|&mut (service_port, _)| service_port);
        list.reverse();
        services.push((key.clone(), list));
        if healthy {
            labels.insert(format!("{SERVICE_LABEL_PREFIX}{key}"), SELECTED.to_owned());
        }
    }
    services.sort_unstable_by(|a: &(String, _), b| a.0.cmp(&b.0));
    for p in &w.authorization_policies {
        labels.insert(format!("{POLICY_LABEL_PREFIX}{p}"), SELECTED.to_owned());
    }
    Ok(XdsWorkload {
        workload: Arc::new(Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            uid: non_empty(&w.uid),
            node: w.node.clone(),
            network: w.network.clone(),
            addresses,
            service_account: non_empty(&w.service_account).unwrap_or_else(|| "default".into()),
            trust_domain: non_empty(&w.trust_domain),
            protocol: Some(protocol),
            labels,
            canonical_name: non_empty(&w.canonical_name),
            canonical_revision: non_empty(&w.canonical_revision),
            workload_type: Some(workload_type.as_str_name().to_lowercase()),
            workload_name: non_empty(&w.workload_name),
            netns: None,
            cgroup: None,
            locality: w
                .locality
                .as_ref()
                .map(|l| crate::state::Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    subzone: l.subzone.clone(),
                })
                .filter(|l| *l != crate::state::Locality::default()),
            waypoint: w.waypoint.as_ref().map(convert_waypoint).transpose()?,
        }),
        healthy,
        services,
    })
}

fn convert_service(s: &workload::Service) -> Result<Service, String> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        return Err("service name, namespace and hostname must not be empty".into());
    }
    let addresses = s
        .addresses
        .iter()
        .map(|a| ip(&a.address))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            Ok(ServicePort {
                port: port(p.service_port, "service port")?,
                // 0: a named target port, resolved per workload (see `Resources` users).
                target_port: match port(p.target_port, "target port")? {
                    0 => None,
                    t => Some(t),
                },
                // Istio's workload API carries no port name or protocol: the waypoint
                // that would need them is Istio's own there.
                name: None,
                app_protocol: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    for san in &s.subject_alt_names {
        if !san.starts_with("spiffe://") {
            return Err(format!(
                "subject alt name {san:?} is not a spiffe:// identity"
            ));
        }
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: Some(s.hostname.clone()),
        addresses,
        ports,
        selector: BTreeMap::from([(format!("{SERVICE_LABEL_PREFIX}{key}"), SELECTED.to_owned())]),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(convert_waypoint).transpose()?,
        weighted_waypoints: s
            .weighted_waypoints
            .iter()
            .map(|w| {
                let destination = w
                    .destination
                    .as_ref()
                    .ok_or("weighted waypoint has no destination")?;
                Ok(WeightedWaypoint {
                    waypoint: convert_waypoint(destination)?,
                    weight: w.weight,
                })
            })
            .collect::<Result<Vec<_>, String>>()?,
    })
}

pub fn convert_authorization(a: &security::Authorization) -> Result<XdsAuthorization, String> {
    let scope = match security::Scope::try_from(a.scope) {
        Ok(security::Scope::Global) => policy::Scope::Global,
        Ok(security::Scope::Namespace) => policy::Scope::Namespace,
        Ok(security::Scope::WorkloadSelector) => policy::Scope::WorkloadSelector,
        Err(_) => return Err(format!("unknown scope {}", a.scope)),
    };
    let action = match security::Action::try_from(a.action) {
        Ok(security::Action::Allow) => policy::Action::Allow,
        Ok(security::Action::Deny) => policy::Action::Deny,
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    let key = format!("{}/{}", a.namespace, a.name);
    let selector = if scope == policy::Scope::WorkloadSelector {
        BTreeMap::from([(format!("{POLICY_LABEL_PREFIX}{key}"), SELECTED.to_owned())])
    } else {
        BTreeMap::new()
    };
    let rules = a
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| convert_rule(r).map_err(|e| format!("rules[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let policy = policy::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope,
        selector,
        action,
        rules,
    };
    policy.validate().map_err(|e| e.to_string())?;
    Ok(XdsAuthorization {
        policy,
        dry_run: a.dry_run,
    })
}

/// istiod writes a rule as up to three kinds of clause: the sources, the ports, and one
/// clause of one match per `when` condition. Ours has `from`, `to` and single-match `when`
/// clauses, so any clause past the second must hold exactly one match.
fn convert_rule(r: &security::Rule) -> Result<policy::Rule, String> {
    let mut clauses = r
        .clauses
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.matches
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    convert_match(m).map_err(|e| format!("clauses[{i}].matches[{j}]: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let from = clauses.next();
    let to = clauses.next();
    let mut when = Vec::new();
    for (i, mut c) in clauses.enumerate() {
        match c.len() {
            // An empty clause matches everything: it constrains nothing.
            0 => {}
            1 => when.extend(c.pop()),
            n => {
                return Err(format!(
                    "clauses[{}] has {n} matches; only the first two clauses may have several",
                    i + 2
                ));
            }
        }
    }
    Ok(policy::Rule {
        from,
        to,
        when: (!when.is_empty()).then_some(when),
    })
}

fn string_matches(ms: &[security::StringMatch]) -> Result<Vec<StringMatch>, String> {
    use security::string_match::MatchType;
    ms.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
            None => Err("string match without a match type".to_owned()),
        })
        .collect()
}

fn nets(addrs: &[security::Address]) -> Result<Vec<IpNet>, String> {
    addrs
        .iter()
        .map(|a| {
            let ip = ip(&a.address)?;
            let len = u8::try_from(a.length)
                .map_err(|_| format!("prefix length {} too long", a.length))?;
            IpNet::new(ip, len).map_err(|e| e.to_string())
        })
        .collect()
}

fn ports(ps: &[u32]) -> Result<Vec<u16>, String> {
    ps.iter().map(|p| port(*p, "port")).collect()
}

/// A service account match `ns/sa` is a principal of any trust domain ending in
/// `/ns/<ns>/sa/<sa>`; it can join `principals` only when those are not also given (a
/// match's fields are AND'ed, its values OR'ed).
fn with_service_accounts(
    principals: Vec<StringMatch>,
    sas: &[security::ServiceAccountMatch],
    field: &str,
) -> Result<Vec<StringMatch>, String> {
    if sas.is_empty() {
        return Ok(principals);
    }
    if !principals.is_empty() {
        return Err(format!(
            "{field} together with the matching principals field is not supported"
        ));
    }
    Ok(sas
        .iter()
        .map(|s| StringMatch::Suffix(format!("/ns/{}/sa/{}", s.namespace, s.service_account)))
        .collect())
}

fn convert_match(m: &security::Match) -> Result<policy::Match, String> {
    Ok(policy::Match {
        namespaces: string_matches(&m.namespaces)?,
        not_namespaces: string_matches(&m.not_namespaces)?,
        principals: with_service_accounts(
            string_matches(&m.principals)?,
            &m.service_accounts,
            "serviceAccounts",
        )?,
        not_principals: with_service_accounts(
            string_matches(&m.not_principals)?,
            &m.not_service_accounts,
            "notServiceAccounts",
        )?,
        source_ips: nets(&m.source_ips)?,
        not_source_ips: nets(&m.not_source_ips)?,
        destination_ips: nets(&m.destination_ips)?,
        not_destination_ips: nets(&m.not_destination_ips)?,
        destination_ports: ports(&m.destination_ports)?,
        not_destination_ports: ports(&m.not_destination_ports)?,
    })
}

/// Istio's node id for a ztunnel: `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
pub fn node(
    pod_ip: &str,
    pod_name: &str,
    pod_namespace: &str,
    node_name: &str,
    cluster: &str,
) -> Node {
    let s = |v: &str| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(v.to_owned())),
    };
    Node {
        id: format!(
            "ztunnel~{pod_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"
        ),
        cluster: cluster.to_owned(),
        metadata: Some(prost_types::Struct {
            fields: BTreeMap::from([
                ("NAME".to_owned(), s(pod_name)),
                ("NAMESPACE".to_owned(), s(pod_namespace)),
                ("INSTANCE_IPS".to_owned(), s(pod_ip)),
                ("NODE_NAME".to_owned(), s(node_name)),
                ("CLUSTER_ID".to_owned(), s(cluster)),
            ]),
        }),
        user_agent_name: "ztunnel".to_owned(),
    }
}

/// Runs the ADS stream forever, reconnecting with backoff.
pub async fn run(channel: AuthChannel, node: Node, source: Arc<IstioSource>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut got_response = false;
        let err = stream_once(channel.clone(), &node, &source, &mut got_response).await;
        source.count_xds_termination(err.termination_reason(got_response));
        source.set_xds_connected(false, Some(err.to_string()));
        if got_response {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "xds stream to istiod ended; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn stream_once(
    channel: AuthChannel,
    node: &Node,
    source: &IstioSource,
    got_response: &mut bool,
) -> Error {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let initial_resource_versions = source.with_xds(|r| r.versions(type_url));
        // Subscribing to nothing by name is the wildcard subscription istiod expects.
        let req = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.to_owned(),
            initial_resource_versions,
            ..Default::default()
        };
        if tx.send(req).await.is_err() {
            return Error::Closed;
        }
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut responses = match client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Error::Stream { status },
    };
    loop {
        let resp = match responses.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Error::Closed,
            Err(status) => return Error::Stream { status },
        };
        if !*got_response {
            source.set_xds_connected(true, None);
        }
        *got_response = true;
        source.count_xds_message(&resp);
        let errors = source.apply_xds(&resp);
        let error_detail = (!errors.is_empty()).then(|| {
            let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            tracing::error!(type_url = %resp.type_url, nonce = %resp.nonce, %message, "xds resources rejected (NACK); keeping their last good version");
            rpc::Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }
        });
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return Error::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::proto::envoy::Resource;

    fn workload(name: &str, addr: [u8; 4]) -> workload::Workload {
        workload::Workload {
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![addr.to_vec()],
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            service_account: "web".into(),
            node: "node1".into(),
            uid: format!("c1//Pod/shop/{name}"),
            services: HashMap::from([(
                "shop/web.shop.svc".into(),
                workload::PortList {
                    ports: vec![workload::Port {
                        service_port: 80,
                        target_port: 8080,
                    }],
                },
            )]),
            authorization_policies: vec!["shop/only-frontend".into()],
            ..Default::default()
        }
    }

    fn resource<M: prost::Message>(type_url: &str, name: &str, version: &str, m: &M) -> Resource {
        Resource {
            version: version.into(),
            name: name.into(),
            resource: Some(prost_types::Any {
                type_url: type_url.into(),
                value: m.encode_to_vec(),
            }),
            aliases: vec![],
        }
    }

    fn address(w: workload::Workload) -> workload::Address {
        workload::Address {
            r#type: Some(workload::address::Type::Workload(w)),
        }
    }

    #[test]
    fn workloads_become_store_workloads_labelled_for_services_and_policies() {
        let XdsAddress::Workload(w) =
            convert_address(&address(workload("web-0", [10, 0, 0, 7]))).expect("valid")
        else {
            panic!("not a workload")
        };
        assert_eq!(w.workload.key(), "shop/web-0");
        assert_eq!(w.workload.addresses, vec![IpAddr::from([10, 0, 0, 7])]);
        assert_eq!(w.workload.protocol, Some(Protocol::Hbone));
        assert_eq!(w.workload.workload_type.as_deref(), Some("deployment"));
        assert!(
            w.workload
                .labels
                .contains_key("xds.ztunnel.io/service.shop/web.shop.svc")
        );
        assert!(
            w.workload
                .labels
                .contains_key("xds.ztunnel.io/policy.shop/only-frontend")
        );
        assert_eq!(
            w.services,
            [("shop/web.shop.svc".to_owned(), vec![(80, 8080)])]
        );
        assert_eq!(w.workload.locality, None, "no locality sent, none kept");
    }

    #[test]
    fn service_ports_are_sorted_and_a_repeated_port_keeps_its_last_target() {
        let mut w = workload("web-0", [10, 0, 0, 7]);
        let port = |service_port, target_port| workload::Port {
            service_port,
            target_port,
        };
        w.services = HashMap::from([
            (
                "shop/web.shop.svc".into(),
                workload::PortList {
                    ports: vec![port(443, 8443), port(80, 8080), port(80, 9090)],
                },
            ),
            (
                "shop/api.shop.svc".into(),
                workload::PortList {
                    ports: vec![port(9000, 0)],
                },
            ),
        ]);
        let XdsAddress::Workload(w) = convert_address(&address(w)).expect("valid") else {
            panic!("not a workload")
        };
        assert_eq!(
            w.services,
            [
                ("shop/api.shop.svc".to_owned(), vec![(9000, 0)]),
                (
                    "shop/web.shop.svc".to_owned(),
                    vec![(80, 9090), (443, 8443)]
                ),
            ]
        );
    }

    #[test]
    fn stream_ends_get_istios_termination_reasons() {
        let stream = |code, msg: &str| Error::Stream {
            status: tonic::Status::new(code, msg),
        };
        let cases = [
            (Error::Closed, true, "Complete"),
            (
                stream(tonic::Code::Unavailable, "connection refused"),
                false,
                "ConnectionError",
            ),
            (
                stream(tonic::Code::Unavailable, "transport is closing"),
                true,
                "Reconnect",
            ),
            (stream(tonic::Code::Cancelled, "x"), true, "Reconnect"),
            (
                stream(tonic::Code::PermissionDenied, "bad token"),
                false,
                "Error",
            ),
            (stream(tonic::Code::Unavailable, "reset"), true, "Error"),
        ];
        for (err, got_response, want) in cases {
            assert_eq!(err.termination_reason(got_response), want, "{err}");
        }
    }

    #[test]
    fn a_workloads_locality_is_kept_for_the_metric_labels() {
        let mut with = workload("web-0", [10, 0, 0, 7]);
        with.locality = Some(workload::Locality {
            region: "eu-west1".into(),
            zone: "eu-west1-b".into(),
            subzone: String::new(),
        });
        let XdsAddress::Workload(w) = convert_address(&address(with)).expect("valid") else {
            panic!("not a workload")
        };
        let l = w.workload.locality.clone().expect("locality kept");
        assert_eq!(
            (l.region.as_str(), l.zone.as_str()),
            ("eu-west1", "eu-west1-b")
        );
    }

    #[test]
    fn waypoint_fields_are_decoded_as_istio_defines_them() {
        use workload::gateway_address::Destination;
        let by_address = |bytes: Vec<u8>, port| workload::GatewayAddress {
            destination: Some(Destination::Address(workload::NetworkAddress {
                network: String::new(),
                address: bytes,
            })),
            hbone_mtls_port: port,
        };
        // Workload.waypoint (8): an address and the HBONE port.
        let mut w = workload("web-0", [10, 0, 0, 7]);
        w.waypoint = Some(by_address(vec![10, 96, 0, 15], 15008));
        let bytes = address(w).encode_to_vec();
        let decoded = workload::Address::decode(bytes.as_slice()).expect("decodes");
        let XdsAddress::Workload(got) = convert_address(&decoded).expect("valid") else {
            panic!("not a workload")
        };
        assert_eq!(
            got.workload.waypoint,
            Some(WaypointRef {
                address: Some(IpAddr::from([10, 96, 0, 15])),
                hostname: None,
                namespace: None,
                port: 15008,
            })
        );
        // Service.waypoint (7): a namespaced hostname; port 0 means 15008.
        let svc = workload::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            waypoint: Some(workload::GatewayAddress {
                destination: Some(Destination::Hostname(workload::NamespacedHostname {
                    namespace: "infra".into(),
                    hostname: "waypoint.infra.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 0,
            }),
            ..Default::default()
        };
        let as_address = |s: workload::Service| workload::Address {
            r#type: Some(workload::address::Type::Service(s)),
        };
        let XdsAddress::Service(got) = convert_address(&as_address(svc.clone())).expect("valid")
        else {
            panic!("not a service")
        };
        assert_eq!(
            got.waypoint,
            Some(WaypointRef {
                address: None,
                hostname: Some("waypoint.infra.svc.cluster.local".into()),
                namespace: Some("infra".into()),
                port: 15008,
            })
        );
        // Service.weighted_waypoints (13): each destination with its weight.
        let mut weighted = svc.clone();
        weighted.weighted_waypoints = vec![workload::WeightedWaypoint {
            destination: Some(by_address(vec![10, 96, 0, 16], 15008)),
            weight: 2,
        }];
        let XdsAddress::Service(got) =
            convert_address(&as_address(weighted.clone())).expect("valid")
        else {
            panic!("not a service")
        };
        assert_eq!(
            got.weighted_waypoints,
            [WeightedWaypoint {
                waypoint: WaypointRef {
                    address: Some(IpAddr::from([10, 96, 0, 16])),
                    hostname: None,
                    namespace: None,
                    port: 15008,
                },
                weight: 2,
            }]
        );
        weighted.weighted_waypoints[0].destination = None;
        let err = convert_address(&as_address(weighted)).expect_err("no destination");
        assert!(
            err.contains("weighted waypoint has no destination"),
            "{err}"
        );
        // Bad references are refused with the reason (the resource is NACKed).
        for (bad, reason) in [
            (by_address(vec![1, 2, 3], 15008), "neither IPv4 nor IPv6"),
            (by_address(vec![10, 0, 0, 1], 70000), "out of range"),
            (
                workload::GatewayAddress {
                    destination: None,
                    hbone_mtls_port: 15008,
                },
                "neither an address nor a hostname",
            ),
            (
                workload::GatewayAddress {
                    destination: Some(Destination::Hostname(Default::default())),
                    hbone_mtls_port: 15008,
                },
                "hostname is empty",
            ),
        ] {
            let mut s = svc.clone();
            s.waypoint = Some(bad.clone());
            let err = convert_address(&as_address(s)).expect_err(reason);
            assert!(err.contains(reason), "{err}");
            let mut w = workload("web-0", [10, 0, 0, 7]);
            w.waypoint = Some(bad);
            let err = convert_address(&address(w)).expect_err(reason);
            assert!(err.contains(reason), "{err}");
        }
    }

    #[test]
    fn istiod_rules_map_onto_from_to_and_when() {
        use security::string_match::MatchType;
        let m = |f: fn(&mut security::Match)| {
            let mut m = security::Match::default();
            f(&mut m);
            m
        };
        let a = security::Authorization {
            name: "only-frontend".into(),
            namespace: "shop".into(),
            scope: security::Scope::WorkloadSelector as i32,
            action: security::Action::Allow as i32,
            rules: vec![security::Rule {
                clauses: vec![
                    security::Clause {
                        matches: vec![m(|m| {
                            m.principals = vec![security::StringMatch {
                                match_type: Some(MatchType::Exact("td/ns/shop/sa/front".into())),
                            }]
                        })],
                    },
                    security::Clause {
                        matches: vec![m(|m| m.destination_ports = vec![8080])],
                    },
                    security::Clause {
                        matches: vec![m(|m| {
                            m.not_source_ips = vec![security::Address {
                                address: vec![10, 9, 0, 0],
                                length: 16,
                            }]
                        })],
                    },
                ],
            }],
            dry_run: false,
        };
        let got = convert_authorization(&a).expect("valid").policy;
        assert_eq!(got.scope, policy::Scope::WorkloadSelector);
        assert_eq!(
            got.selector.keys().collect::<Vec<_>>(),
            ["xds.ztunnel.io/policy.shop/only-frontend"]
        );
        let rule = &got.rules[0];
        assert_eq!(
            rule.from.as_ref().expect("from")[0].principals,
            vec![StringMatch::Exact("td/ns/shop/sa/front".into())]
        );
        assert_eq!(
            rule.to.as_ref().expect("to")[0].destination_ports,
            vec![8080]
        );
        assert_eq!(
            rule.when.as_ref().expect("when")[0].not_source_ips,
            vec!["10.9.0.0/16".parse().expect("net")]
        );
    }

    #[test]
    fn invalid_resource_is_reported_by_name_and_keeps_its_last_good_version() {
        let mut r = Resources::default();
        let good = resource(
            ADDRESS_TYPE,
            "c1//Pod/shop/web-0",
            "1",
            &address(workload("web-0", [10, 0, 0, 7])),
        );
        let resp = |resources, removed: Vec<String>| DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            resources,
            removed_resources: removed,
            nonce: "n".into(),
            ..Default::default()
        };
        assert!(r.apply(&resp(vec![good], vec![])).is_empty());
        // Version 2 carries a 3-byte address; another workload in the same response is fine.
        let bad = resource(
            ADDRESS_TYPE,
            "c1//Pod/shop/web-0",
            "2",
            &address(workload("web-0", [10, 0, 0, 7])),
        )
        .resource
        .map(|mut any| {
            let mut w = workload("web-0", [10, 0, 0, 7]);
            w.addresses = vec![vec![1, 2, 3]];
            any.value = address(w).encode_to_vec();
            any
        });
        let bad = Resource {
            version: "2".into(),
            name: "c1//Pod/shop/web-0".into(),
            resource: bad,
            aliases: vec![],
        };
        let other = resource(
            ADDRESS_TYPE,
            "c1//Pod/shop/web-1",
            "1",
            &address(workload("web-1", [10, 0, 0, 8])),
        );
        let errors = r.apply(&resp(vec![bad, other], vec![]));
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(
            msg.contains("c1//Pod/shop/web-0") && msg.contains("3 bytes"),
            "{msg}"
        );
        assert_eq!(
            r.addresses["c1//Pod/shop/web-0"].0, "1",
            "last good version stays"
        );
        assert!(r.addresses.contains_key("c1//Pod/shop/web-1"));
        assert_eq!(r.versions(ADDRESS_TYPE).len(), 2);
        // Removal.
        assert!(
            r.apply(&resp(vec![], vec!["c1//Pod/shop/web-1".into()]))
                .is_empty()
        );
        assert!(!r.addresses.contains_key("c1//Pod/shop/web-1"));
    }

    #[test]
    fn node_id_has_istios_form() {
        let n = node("10.0.0.1", "ztunnel-abc", "istio-system", "node1", "c1");
        assert_eq!(
            n.id,
            "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
    }
}
