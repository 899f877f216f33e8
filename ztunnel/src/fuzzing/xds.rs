//! What istiod sends: a sequence of delta xDS responses (`istio.workload.Address` and
//! `istio.security.Authorization` resources), each applied as the ADS stream applies it
//! ([`IstioSource::apply_xds`]: conversion into the store's types, then the merged
//! config), and the final config used as the proxy uses it ([`super::exercise_store`]).
//!
//! Input: [`super::records`], each body a `DeltaDiscoveryResponse` (one that does not
//! decode is skipped: tonic would have failed the stream). Checked: a resource the
//! response rejects keeps its last good version, one it accepts takes the new version.
use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use tokio::sync::watch;

use crate::istio::proto::envoy::{DeltaDiscoveryResponse, Resource};
use crate::istio::proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE, security, workload};
use crate::istio::source::{Base, IstioSource};
use crate::istio::xds::{Error, Resources};

const NODE: &str = "node1";

pub fn run(data: &[u8]) {
    let base = Base {
        node: NODE.to_owned(),
        trust_domain: "cluster.local".to_owned(),
        cluster: "Kubernetes".to_owned(),
    };
    let (tx, rx) = watch::channel(IstioSource::empty(&base));
    let (_results_tx, results) = watch::channel(BTreeMap::new());
    let source = IstioSource::new(base, tx, results);
    for (_, body) in super::records(data) {
        let Ok(resp) = DeltaDiscoveryResponse::decode(body) else {
            continue;
        };
        let before = source.with_xds(|r| versions(r, &resp.type_url));
        let errors = source.apply_xds(&resp);
        let after = source.with_xds(|r| versions(r, &resp.type_url));
        check_versions(&resp, &errors, &before, &after);
    }
    super::exercise_store(&rx.borrow(), NODE);
}

fn versions(r: &Resources, type_url: &str) -> BTreeMap<String, String> {
    match type_url {
        ADDRESS_TYPE => r
            .addresses
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect(),
        _ => r
            .authorizations
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect(),
    }
}

/// NACK semantics, for the names that appear once in the response and are not removed by it
/// (a name given twice takes the later valid one; removal comes after the updates).
fn check_versions(
    resp: &DeltaDiscoveryResponse,
    errors: &[Error],
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for r in &resp.resources {
        *count.entry(r.name.as_str()).or_default() += 1;
    }
    let single = |name: &str| {
        count.get(name) == Some(&1) && !resp.removed_resources.iter().any(|n| n == name)
    };
    let mut rejected = Vec::new();
    for e in errors {
        let Error::Invalid { name, .. } = e else {
            panic!("applying a response returned a stream error: {e}");
        };
        rejected.push(name.as_str());
        if single(name) {
            assert_eq!(
                before.get(name),
                after.get(name),
                "rejected resource {name} did not keep its last good version"
            );
        }
    }
    for r in &resp.resources {
        if single(&r.name) && !rejected.contains(&r.name.as_str()) {
            assert_eq!(
                after.get(&r.name),
                Some(&r.version),
                "accepted resource {} is not at its new version",
                r.name
            );
        }
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

fn response(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> Vec<u8> {
    let resp = DeltaDiscoveryResponse {
        type_url: type_url.into(),
        resources,
        removed_resources: removed.iter().map(|n| (*n).to_owned()).collect(),
        nonce: "n".into(),
        ..Default::default()
    };
    super::record(0, &resp.encode_to_vec())
}

/// The xds unit tests' workload: HBONE, one service port, one selector policy.
fn workload(name: &str, addr: &[u8]) -> workload::Address {
    workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![addr.to_vec()],
            tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
            service_account: "web".into(),
            node: NODE.into(),
            uid: format!("c1//Pod/shop/{name}"),
            status: workload::WorkloadStatus::Healthy as i32,
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
        })),
    }
}

fn service() -> workload::Address {
    workload::Address {
        r#type: Some(workload::address::Type::Service(workload::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc".into(),
            addresses: vec![workload::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 20],
            }],
            ports: vec![
                workload::Port {
                    service_port: 80,
                    target_port: 8080,
                },
                // A named target port: 0 on the wire, resolved from the endpoints.
                workload::Port {
                    service_port: 81,
                    target_port: 0,
                },
            ],
            subject_alt_names: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
            waypoint: None,
            weighted_waypoints: vec![],
        })),
    }
}

/// The xds unit tests' policy: `from` principals, `to` ports, a `when` on source addresses.
fn authorization() -> security::Authorization {
    use security::string_match::MatchType;
    let m = |f: fn(&mut security::Match)| {
        let mut m = security::Match::default();
        f(&mut m);
        m
    };
    security::Authorization {
        name: "only-frontend".into(),
        namespace: "shop".into(),
        scope: security::Scope::WorkloadSelector as i32,
        action: security::Action::Allow as i32,
        rules: vec![security::Rule {
            clauses: vec![
                security::Clause {
                    matches: vec![
                        m(|m| {
                            m.principals = vec![security::StringMatch {
                                match_type: Some(MatchType::Exact("td/ns/shop/sa/front".into())),
                            }]
                        }),
                        m(|m| {
                            m.service_accounts = vec![security::ServiceAccountMatch {
                                namespace: "shop".into(),
                                service_account: "front".into(),
                            }]
                        }),
                    ],
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
    }
}

/// istiod's STRICT mTLS, as it writes a PeerAuthentication: DENY `notPrincipals: ["*"]`.
fn strict() -> security::Authorization {
    security::Authorization {
        name: "istio_converted_static_strict".into(),
        namespace: "istio-system".into(),
        scope: security::Scope::Global as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    not_principals: vec![security::StringMatch {
                        match_type: Some(security::string_match::MatchType::Presence(())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let web0 = workload("web-0", &[10, 0, 0, 7]);
    let web1 = workload(
        "web-1",
        &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8],
    );
    let addresses = |resources| response(ADDRESS_TYPE, resources, &[]);
    let authorizations = |resources| response(AUTHORIZATION_TYPE, resources, &[]);
    let mut bad = workload("web-0", &[10, 0, 0, 7]);
    if let Some(workload::address::Type::Workload(w)) = &mut bad.r#type {
        w.addresses = vec![vec![1, 2, 3]];
    }
    let full = [
        addresses(vec![
            resource(ADDRESS_TYPE, "c1//Pod/shop/web-0", "1", &web0),
            resource(ADDRESS_TYPE, "c1//Pod/shop/web-1", "1", &web1),
            resource(ADDRESS_TYPE, "c1/shop/web.shop.svc", "1", &service()),
        ]),
        authorizations(vec![
            resource(
                AUTHORIZATION_TYPE,
                "shop/only-frontend",
                "1",
                &authorization(),
            ),
            resource(
                AUTHORIZATION_TYPE,
                "istio-system/istio_converted_static_strict",
                "1",
                &strict(),
            ),
        ]),
    ]
    .concat();
    let nack = [
        addresses(vec![resource(
            ADDRESS_TYPE,
            "c1//Pod/shop/web-0",
            "1",
            &web0,
        )]),
        addresses(vec![
            resource(ADDRESS_TYPE, "c1//Pod/shop/web-0", "2", &bad),
            resource(ADDRESS_TYPE, "c1//Pod/shop/web-1", "1", &web1),
        ]),
        response(ADDRESS_TYPE, vec![], &["c1//Pod/shop/web-1"]),
    ]
    .concat();
    vec![("mesh", full), ("nack-and-remove", nack)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_convert_into_workloads_services_and_policies() {
        let base = Base {
            node: NODE.to_owned(),
            trust_domain: "cluster.local".to_owned(),
            cluster: "Kubernetes".to_owned(),
        };
        let (tx, rx) = watch::channel(IstioSource::empty(&base));
        let (_results_tx, results) = watch::channel(BTreeMap::new());
        let source = IstioSource::new(base, tx, results);
        let seeds = seeds();
        let mut rejected = 0;
        for (_, seed) in &seeds {
            for (_, body) in super::super::records(seed) {
                let resp = DeltaDiscoveryResponse::decode(body).expect("seed decodes");
                rejected += source.apply_xds(&resp).len();
            }
        }
        // Only the 3-byte address of nack-and-remove.
        assert_eq!(rejected, 1);
        let cfg = rx.borrow().clone();
        assert_eq!(cfg.workloads.len(), 1, "web-1 was removed");
        assert_eq!(cfg.services.len(), 1);
        assert_eq!(cfg.policies.len(), 2);
        for (_, seed) in seeds {
            run(&seed);
        }
    }
}
