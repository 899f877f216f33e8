//! Authorization of a TCP stream through the waypoint (a port that is not HTTP), with
//! Istio's rule for policies that name HTTP attributes on TCP traffic (istio.io,
//! "Authorization for TCP traffic"): an ALLOW rule that needs an HTTP attribute (host,
//! method, path, a `request.*` condition) cannot match, so it is left out — an ALLOW
//! policy with only such rules then allows no TCP stream; a DENY rule has its HTTP
//! attributes left out and matches on what remains, so it refuses more, never less.
//! [`for_tcp`] rewrites a config's policies that way once per config version; the
//! rewritten set is evaluated by the same [`PolicyIndex`] as HTTP requests.
use std::net::IpAddr;

use super::authz::{
    Decision, ObjectRef, Operation, PolicyIndex, PolicyRule, RequestAttrs, WaypointPolicy,
};
use crate::policy::Action;

/// What a policy sees of one TCP stream.
pub(super) struct ConnAttrs<'a> {
    pub port: u16,
    pub source_principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
}

fn operation_is_http(o: &Operation) -> bool {
    !(o.hosts.is_empty()
        && o.not_hosts.is_empty()
        && o.methods.is_empty()
        && o.not_methods.is_empty()
        && o.paths.is_empty()
        && o.not_paths.is_empty())
}

/// `request.headers[…]` and any other `request.*` key: attributes of an HTTP request.
fn condition_is_http(key: &str) -> bool {
    key.starts_with("request.")
}

fn rule_is_http(r: &PolicyRule) -> bool {
    r.to
        .iter()
        .filter_map(|t| t.operation.as_ref())
        .any(operation_is_http)
        || r.when.iter().any(|c| condition_is_http(&c.key))
}

/// A DENY rule without its HTTP attributes: an operation left with no field is dropped
/// (as if it had not been written), as are `request.*` conditions.
fn without_http(r: &PolicyRule) -> PolicyRule {
    let mut r = r.clone();
    for t in &mut r.to {
        if let Some(o) = &mut t.operation {
            o.hosts.clear();
            o.not_hosts.clear();
            o.methods.clear();
            o.not_methods.clear();
            o.paths.clear();
            o.not_paths.clear();
        }
    }
    r.to.retain(|t| {
        t.operation
            .as_ref()
            .is_some_and(|o| !o.ports.is_empty() || !o.not_ports.is_empty())
    });
    r.when.retain(|c| !condition_is_http(&c.key));
    r
}

/// The policies as they apply to TCP streams.
pub(super) fn for_tcp(policies: &[WaypointPolicy]) -> Vec<WaypointPolicy> {
    policies
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.rules = match p.action {
                Action::Allow => p.rules.into_iter().filter(|r| !rule_is_http(r)).collect(),
                Action::Deny => p.rules.iter().map(without_http).collect(),
            };
            p
        })
        .collect()
}

/// Decides a TCP stream through waypoint `gateway` to `service` with the policies
/// rewritten by [`for_tcp`].
pub(super) fn evaluate(
    tcp_index: &PolicyIndex,
    gateway: &ObjectRef,
    service: Option<&ObjectRef>,
    conn: &ConnAttrs<'_>,
) -> Decision {
    let headers = http::HeaderMap::new();
    // No HTTP attribute is left in the rewritten policies: these are never consulted.
    let req = RequestAttrs {
        method: &http::Method::GET,
        path: "/",
        host: "",
        port: conn.port,
        headers: &headers,
        source_principal: conn.source_principal,
        source_ip: conn.source_ip,
        destination_ip: conn.destination_ip,
    };
    tcp_index.evaluate(gateway, service, &req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(yaml: &str) -> Vec<WaypointPolicy> {
        serde_yaml::from_str(yaml).expect("test policies parse")
    }

    fn decide(yaml: &str, principal: Option<&str>, port: u16) -> Decision {
        let index = PolicyIndex::new(&for_tcp(&policies(yaml)), "istio-system");
        evaluate(
            &index,
            &ObjectRef::new("shop", "waypoint"),
            Some(&ObjectRef::new("shop", "db")),
            &ConnAttrs {
                port,
                source_principal: principal,
                source_ip: "10.0.0.1".parse().expect("ip"),
                destination_ip: "10.96.0.10".parse().expect("ip"),
            },
        )
    }

    const A: Option<&str> = Some("spiffe://cluster.local/ns/shop/sa/a");

    #[test]
    fn an_allow_rule_naming_http_attributes_allows_no_tcp_stream() {
        let only_http = r#"
- name: get-only
  namespace: shop
  targetRefs: [{kind: Service, group: "", name: db}]
  rules:
  - to: [{operation: {methods: [GET], ports: ["9000"]}}]
"#;
        assert!(matches!(decide(only_http, A, 9000), Decision::Deny { .. }));
        // Beside an L4 rule, the L4 rule still allows.
        let mixed = r#"
- name: mixed
  namespace: shop
  targetRefs: [{kind: Service, group: "", name: db}]
  rules:
  - to: [{operation: {paths: ["/x"]}}]
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/a"]}}]
    to: [{operation: {ports: ["9000"]}}]
"#;
        assert_eq!(decide(mixed, A, 9000), Decision::Allow);
        assert!(matches!(decide(mixed, A, 9001), Decision::Deny { .. }));
        assert!(matches!(decide(mixed, None, 9000), Decision::Deny { .. }));
    }

    #[test]
    fn a_deny_rule_naming_http_attributes_refuses_on_what_remains() {
        // DENY POST to port 9000 from anyone: on TCP, "to port 9000" remains.
        let deny = r#"
- name: no-post
  namespace: shop
  targetRefs: [{kind: Service, group: "", name: db}]
  action: DENY
  rules:
  - to: [{operation: {methods: [POST], ports: ["9000"]}}]
"#;
        assert!(matches!(decide(deny, A, 9000), Decision::Deny { .. }));
        assert_eq!(decide(deny, A, 9001), Decision::Allow);
        // Only HTTP attributes, from one principal: every stream of that principal.
        let deny_all = r#"
- name: no-admin
  namespace: shop
  targetRefs: [{kind: Service, group: "", name: db}]
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/a"]}}]
    to: [{operation: {paths: ["/admin"]}}]
    when: [{key: "request.headers[x-debug]", values: ["1"]}]
"#;
        assert!(matches!(decide(deny_all, A, 1234), Decision::Deny { .. }));
        assert_eq!(
            decide(deny_all, Some("spiffe://cluster.local/ns/shop/sa/b"), 1234),
            Decision::Allow
        );
    }

    #[test]
    fn no_policy_allows_every_tcp_stream() {
        assert_eq!(decide("[]", None, 9000), Decision::Allow);
    }
}
