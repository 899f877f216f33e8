//! L7 authorization at the waypoint: Istio's AuthorizationPolicy as a waypoint enforces it,
//! for policies attached by `targetRefs` to the waypoint's Gateway, to a Service behind it,
//! or (from the root namespace) to every waypoint through the `istio-waypoint` GatewayClass.
//! The workload file's `waypointPolicies:` holds them; [`validate_all_in_root`] checks a file
//! version, [`PolicyIndex`] decides each request.
//!
//! # Shape
//!
//! The Kubernetes object with its metadata flattened (`name`, `namespace`) and its `spec`
//! fields alongside:
//!
//! ```yaml
//! waypointPolicies:
//! - name: orders-read-only
//!   namespace: shop
//!   targetRefs:                       # or the singular `targetRef`
//!   - kind: Service                   # group "" (core)
//!     name: db
//!   - group: gateway.networking.k8s.io
//!     kind: Gateway                   # the waypoint itself
//!     name: waypoint
//!   action: ALLOW                     # ALLOW (default) | DENY
//!   rules:                            # OR
//!   - from:                           # OR over entries; AND across from/to/when
//!     - source:
//!         principals: [cluster.local/ns/shop/sa/backend]
//!         notNamespaces: [test]
//!         ipBlocks: [10.0.0.0/8]
//!     to:
//!     - operation:
//!         methods: [GET, HEAD]
//!         paths: [/orders/*]
//!         notPaths: [/orders/admin*]
//!         hosts: [db.shop.svc.cluster.local]
//!         ports: ["8080"]
//!     when:
//!     - key: request.headers[x-tenant]
//!       values: [acme]
//!     - key: source.ip
//!       notValues: [10.9.0.0/16]
//! ```
//!
//! `when` keys: `request.headers[Name]`, `source.ip`, `source.namespace`, `source.principal`,
//! `destination.port`, `destination.ip`.
//!
//! # Semantics, and where they come from
//!
//! - **Which policies apply** (istio/istio `pilot/pkg/model/policyattachment.go`
//!   `WorkloadPolicyMatcher::ShouldAttachPolicy` with `IsWaypoint`): a `Gateway` targetRef
//!   (group `gateway.networking.k8s.io`) naming the waypoint, from a policy in the waypoint's
//!   namespace; a `Service` targetRef (group `""`/`core`) naming the request's destination
//!   service, from a policy in that service's namespace; a `GatewayClass` targetRef naming
//!   `istio-waypoint` from a policy in the root namespace: every waypoint. A request addressed
//!   to a workload rather than a service sees only the Gateway and GatewayClass ones.
//!   Policies with a `selector`, or with no targetRef at all, never apply at a waypoint in
//!   Istio (waypoints never use selectors); [`validate_all`] refuses them here (L4 policies
//!   belong in `policies:`). Cross-namespace targetRefs are refused, as Istio's validation
//!   refuses them.
//! - **Order** (istio.io `reference/config/security/authorization-policy`): CUSTOM (not
//!   supported: no external authorizer here), then any matching DENY denies; then, if no ALLOW
//!   applies the request is allowed, else one must match. AUDIT only logs in Istio and needs a
//!   telemetry provider: refused too.
//! - **Matching** (istio/istio `pilot/pkg/security/authz/model`): a policy with no rules
//!   matches nothing (an ALLOW without rules denies everything, a DENY without rules does
//!   nothing); a rule with no `from`/`to`/`when` matches everything; entries of a list are
//!   OR'ed, fields AND'ed; a `not…` field holds when no value matches. Strings are exact,
//!   `prefix*`, `*suffix` or `*` (non-empty) as [`crate::policy::StringMatch`].
//! - **Methods** are compared case-sensitively with the request's method (Istio: Envoy's
//!   `:method` header matcher). **Hosts** case-insensitively with the `Host`/`:authority`,
//!   with or without its port (istiod's `hostMatcherWithRegex` appends `(:[0-9]+)?`).
//!   **Ports** and `destination.port` with the service port the client dialled.
//! - **Paths** are matched after Istio's default normalisation `NORMALIZE_AND_MERGE_SLASHES`
//!   (istio.io `reference/config/security/normalization`, Envoy `normalize_path` then
//!   `merge_slashes`): percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded
//!   once, other escapes kept (so `%2F` stays `%2F`, hex upper-cased), `\` turned into `/`,
//!   `.`/`..` segments resolved (RFC 3986 5.2.4), then repeated slashes merged; a `%00` is
//!   refused (Istio answers 400; [`normalize_path`] says so, and a request carrying one is
//!   denied wherever a policy applies). The query is not part of the path.
//! - **Identity**: principals are compared with the client's SPIFFE identity minus
//!   `spiffe://` (`cluster.local/ns/a/sa/b`), namespaces with the identity's namespace. A
//!   request without identity never matches `principals`/`namespaces`/`source.principal`/
//!   `source.namespace` values and always matches their `not…` forms; likewise a missing
//!   header for `request.headers[…]` (Envoy's `not_rule` over a header matcher).
//! - **Headers**: the name case-insensitively; several values of one header are joined with
//!   `,` before matching (istio.io normalization, "duplicate headers"); `*` means present.
//! - **TCP streams** through the waypoint (a port that is not HTTP) are decided by
//!   [`PolicyIndex::evaluate_connection`] with the same policies, as Istio's network RBAC
//!   filter does (`pilot/pkg/security/authz/model`, `forTCP`): an ALLOW rule naming anything
//!   HTTP-only (hosts, methods, paths, `request.headers[…]`) matches no connection; a DENY
//!   rule is taken without those fields, so it matches more. Both err on refusing.
//! - `source.ip` / `ipBlocks` is the client's address as the waypoint knows it (the tunnel's
//!   source), `destination.ip` the address the client dialled.
//!
//! Not supported, refused with the reason: `requestPrincipals`/`notRequestPrincipals` and
//! `request.auth.*` (no JWT authentication here), `remoteIpBlocks`/`remote.ip` (no
//! X-Forwarded-For trust here), CUSTOM and AUDIT actions, ServiceEntry targetRefs (no
//! ServiceEntry in the workload file), and any other `when` key. A `*` inside a value (not
//! leading or trailing) is refused: Istio would compare it literally, which is never what was
//! meant.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};
use tracing::warn;

use crate::policy::{Action, IpNet, StringMatch};

/// The API group of Gateway and GatewayClass.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of Istio's waypoints; a root-namespace policy naming it applies to all.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

const SPIFFE_PREFIX: &str = "spiffe://";

/// An object a policy or route names: `namespace/name` of a kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One AuthorizationPolicy for waypoints (the workload file's `waypointPolicies:`); see the
/// module documentation for its shape and meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointPolicy {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<TargetRef>,
    /// Istio's older singular form; used when `targetRefs` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    /// Accepted only to refuse it with the reason: selectors never apply at waypoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default = "default_action", deserialize_with = "action_from_str")]
    pub action: Action,
    /// OR'ed; none at all matches nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<PolicyRule>,
}

fn default_action() -> Action {
    Action::Allow
}

/// ALLOW and DENY; the other actions Istio has get a reason, not serde's list of variants.
fn action_from_str<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "ALLOW" => Ok(Action::Allow),
        "DENY" => Ok(Action::Deny),
        "CUSTOM" => Err(serde::de::Error::custom(
            "action CUSTOM is not supported: this waypoint has no external authorizer",
        )),
        "AUDIT" => Err(serde::de::Error::custom(
            "action AUDIT is not supported: it needs a telemetry audit provider, which this waypoint does not have",
        )),
        other => Err(serde::de::Error::custom(format!(
            "unknown action {other:?}: expected ALLOW or DENY"
        ))),
    }
}

/// Istio's `PolicyTargetReference`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `gateway.networking.k8s.io` for Gateway/GatewayClass, `""` or `core` for Service.
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    /// Must be the policy's own namespace when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Istio's `WorkloadSelector`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One rule: `from`, `to` and each `when` AND'ed; an absent or empty list does not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// Istio's `Source`; every field given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Refused (no JWT authentication here); parsed to say so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Refused (no X-Forwarded-For trust here); parsed to say so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// Istio's `Operation`; every field given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Port numbers, written as strings as in Istio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// Istio's `Condition`: `values` OR'ed, none of `notValues` may match, at least one given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// What a policy sees of one HTTP request at the waypoint.
#[derive(Debug, Clone)]
pub struct RequestAttrs<'a> {
    pub method: &'a http::Method,
    /// The request's path, without the query.
    pub path: &'a str,
    /// The `Host` / `:authority` header, as sent.
    pub host: &'a str,
    /// The service port the client dialled.
    pub port: u16,
    pub headers: &'a http::HeaderMap,
    /// The client's SPIFFE identity (`spiffe://td/ns/x/sa/y`); `None` for none.
    pub source_principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
}

/// The verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `ns/name` of the deciding policy (or the applicable ALLOW ones, comma-separated).
        policy: String,
        reason: String,
    },
}

/// Why a request path cannot be normalised (Istio answers such a request with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {path:?} contains %00, which Istio refuses (400)")]
    EncodedNul { path: String },
}

/// Istio's default path normalisation `NORMALIZE_AND_MERGE_SLASHES`, as authorization and
/// routing see the path: decode escaped unreserved characters once (other escapes kept,
/// hex upper-cased), `\` to `/`, resolve `.` and `..` (RFC 3986 5.2.4), merge repeated
/// slashes. Idempotent. A path not starting with `/` (`*`, absolute form) is returned as is.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2]));
            if let (Some(hi), Some(lo)) = hex {
                let c = hi * 16 + lo;
                if c == 0 {
                    return Err(PathError::EncodedNul {
                        path: path.to_owned(),
                    });
                }
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(char::from(c));
                } else {
                    decoded.push('%');
                    decoded.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                    decoded.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                }
                i += 3;
                continue;
            }
        }
        if b == b'\\' {
            decoded.push('/');
            i += 1;
            continue;
        }
        // Copy the whole UTF-8 character (the input is a str, so boundaries are sound).
        let len = utf8_len(b);
        decoded.push_str(&path[i..i + len]);
        i += len;
    }
    // RFC 3986 5.2.4 over the segments after the leading '/'.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = n == last,
            ".." => {
                out.pop();
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for seg in &out {
        // Merging slashes is dropping empty segments (Envoy merges after normalising).
        if !seg.is_empty() {
            normal.push('/');
            normal.push_str(seg);
        }
    }
    if normal.is_empty() || trailing_slash || out.last().is_some_and(|s| s.is_empty()) {
        normal.push('/');
    }
    if normal == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normal))
    }
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// A value as AuthorizationPolicy writes strings; `*` only leading, trailing or alone.
fn string_match(value: &str) -> Result<StringMatch, String> {
    if value.is_empty() {
        return Err("empty value (it would match nothing)".to_owned());
    }
    let inner = value.strip_prefix('*').unwrap_or(value);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if value != "*" && inner.contains('*') {
        return Err(format!(
            "{value:?}: `*` is allowed only as the whole value, its first or its last character"
        ));
    }
    Ok(StringMatch::from(value))
}

fn port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{value:?} is not a port number (1-65535)")),
    }
}

fn ip_net(value: &str) -> Result<IpNet, String> {
    value.parse::<IpNet>().map_err(|e| e.to_string())
}

/// A field path and why it is refused.
type FieldError = (String, String);

fn each<T>(
    field: &str,
    values: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse(v).map_err(|reason| (format!("{field}[{i}]"), reason)))
        .collect()
}

fn refuse_if_set(field: String, values: &[String], reason: &str) -> Result<(), FieldError> {
    if values.is_empty() {
        Ok(())
    } else {
        Err((field, reason.to_owned()))
    }
}

/// One `source` entry, compiled.
#[derive(Debug, Default)]
struct SourceMatch {
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
}

/// One `operation` entry, compiled; hosts lower-cased.
#[derive(Debug, Default)]
struct OperationMatch {
    hosts: Vec<StringMatch>,
    not_hosts: Vec<StringMatch>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<StringMatch>,
    not_methods: Vec<StringMatch>,
    paths: Vec<StringMatch>,
    not_paths: Vec<StringMatch>,
}

#[derive(Debug)]
enum Attribute {
    Header(http::HeaderName),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    DestinationIp,
}

#[derive(Debug)]
enum Values {
    Strings(Vec<StringMatch>),
    Ips(Vec<IpNet>),
    Ports(Vec<u16>),
}

#[derive(Debug)]
struct ConditionMatch {
    attribute: Attribute,
    values: Option<Values>,
    not_values: Option<Values>,
}

#[derive(Debug)]
struct CompiledRule {
    from: Vec<SourceMatch>,
    to: Vec<OperationMatch>,
    when: Vec<ConditionMatch>,
}

fn compile_source(field: &str, s: &Source) -> Result<SourceMatch, FieldError> {
    refuse_if_set(
        format!("{field}.requestPrincipals"),
        &s.request_principals,
        "not supported: there is no JWT (RequestAuthentication) at this waypoint",
    )?;
    refuse_if_set(
        format!("{field}.notRequestPrincipals"),
        &s.not_request_principals,
        "not supported: there is no JWT (RequestAuthentication) at this waypoint",
    )?;
    refuse_if_set(
        format!("{field}.remoteIpBlocks"),
        &s.remote_ip_blocks,
        "not supported: this waypoint does not trust X-Forwarded-For; use ipBlocks",
    )?;
    refuse_if_set(
        format!("{field}.notRemoteIpBlocks"),
        &s.not_remote_ip_blocks,
        "not supported: this waypoint does not trust X-Forwarded-For; use notIpBlocks",
    )?;
    let m = SourceMatch {
        principals: each(&format!("{field}.principals"), &s.principals, string_match)?,
        not_principals: each(
            &format!("{field}.notPrincipals"),
            &s.not_principals,
            string_match,
        )?,
        namespaces: each(&format!("{field}.namespaces"), &s.namespaces, string_match)?,
        not_namespaces: each(
            &format!("{field}.notNamespaces"),
            &s.not_namespaces,
            string_match,
        )?,
        ip_blocks: each(&format!("{field}.ipBlocks"), &s.ip_blocks, ip_net)?,
        not_ip_blocks: each(&format!("{field}.notIpBlocks"), &s.not_ip_blocks, ip_net)?,
    };
    if m.principals.is_empty()
        && m.not_principals.is_empty()
        && m.namespaces.is_empty()
        && m.not_namespaces.is_empty()
        && m.ip_blocks.is_empty()
        && m.not_ip_blocks.is_empty()
    {
        return Err((
            field.to_owned(),
            "an empty source matches nothing (Istio refuses it); omit `from` to match every source"
                .to_owned(),
        ));
    }
    Ok(m)
}

fn lower_match(value: &str) -> Result<StringMatch, String> {
    string_match(&value.to_ascii_lowercase())
}

fn compile_operation(field: &str, o: &Operation) -> Result<OperationMatch, FieldError> {
    let m = OperationMatch {
        hosts: each(&format!("{field}.hosts"), &o.hosts, lower_match)?,
        not_hosts: each(&format!("{field}.notHosts"), &o.not_hosts, lower_match)?,
        ports: each(&format!("{field}.ports"), &o.ports, port)?,
        not_ports: each(&format!("{field}.notPorts"), &o.not_ports, port)?,
        methods: each(&format!("{field}.methods"), &o.methods, string_match)?,
        not_methods: each(&format!("{field}.notMethods"), &o.not_methods, string_match)?,
        paths: each(&format!("{field}.paths"), &o.paths, string_match)?,
        not_paths: each(&format!("{field}.notPaths"), &o.not_paths, string_match)?,
    };
    if m.hosts.is_empty()
        && m.not_hosts.is_empty()
        && m.ports.is_empty()
        && m.not_ports.is_empty()
        && m.methods.is_empty()
        && m.not_methods.is_empty()
        && m.paths.is_empty()
        && m.not_paths.is_empty()
    {
        return Err((
            field.to_owned(),
            "an empty operation matches nothing (Istio refuses it); omit `to` to match every operation"
                .to_owned(),
        ));
    }
    Ok(m)
}

fn compile_condition(field: &str, c: &Condition) -> Result<ConditionMatch, FieldError> {
    let key = c.key.as_str();
    let attribute = if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        Attribute::Header(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            (
                format!("{field}.key"),
                format!("{key:?}: {name:?} is not a valid header name"),
            )
        })?)
    } else {
        match key {
            "source.ip" => Attribute::SourceIp,
            "source.namespace" => Attribute::SourceNamespace,
            "source.principal" => Attribute::SourcePrincipal,
            "destination.port" => Attribute::DestinationPort,
            "destination.ip" => Attribute::DestinationIp,
            k if k.starts_with("request.auth.") => {
                return Err((
                    format!("{field}.key"),
                    format!(
                        "key {k:?} is not supported: there is no JWT authentication at this waypoint"
                    ),
                ));
            }
            k => {
                return Err((
                    format!("{field}.key"),
                    format!(
                        "key {k:?} is not supported here (supported: request.headers[<name>], source.ip, source.namespace, source.principal, destination.port, destination.ip)"
                    ),
                ));
            }
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((
            field.to_owned(),
            "a condition needs `values` or `notValues`".to_owned(),
        ));
    }
    let parse = |name: &str, list: &[String]| -> Result<Option<Values>, FieldError> {
        if list.is_empty() {
            return Ok(None);
        }
        let field = format!("{field}.{name}");
        Ok(Some(match attribute {
            Attribute::SourceIp | Attribute::DestinationIp => {
                Values::Ips(each(&field, list, ip_net)?)
            }
            Attribute::DestinationPort => Values::Ports(each(&field, list, port)?),
            _ => Values::Strings(each(&field, list, string_match)?),
        }))
    };
    let values = parse("values", &c.values)?;
    let not_values = parse("notValues", &c.not_values)?;
    Ok(ConditionMatch {
        attribute,
        values,
        not_values,
    })
}

fn compile_rule(field: &str, r: &PolicyRule) -> Result<CompiledRule, FieldError> {
    let mut from = Vec::with_capacity(r.from.len());
    for (i, f) in r.from.iter().enumerate() {
        let field = format!("{field}.from[{i}].source");
        match &f.source {
            Some(s) => from.push(compile_source(&field, s)?),
            None => return Err((field, "missing: each `from` entry needs a source".into())),
        }
    }
    let mut to = Vec::with_capacity(r.to.len());
    for (i, t) in r.to.iter().enumerate() {
        let field = format!("{field}.to[{i}].operation");
        match &t.operation {
            Some(o) => to.push(compile_operation(&field, o)?),
            None => return Err((field, "missing: each `to` entry needs an operation".into())),
        }
    }
    let when = r
        .when
        .iter()
        .enumerate()
        .map(|(i, c)| compile_condition(&format!("{field}.when[{i}]"), c))
        .collect::<Result<_, _>>()?;
    Ok(CompiledRule { from, to, when })
}

/// Where a policy applies.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Gateway(ObjectRef),
    Service(ObjectRef),
    AllWaypoints,
}

fn is_core(group: &str) -> bool {
    group.is_empty() || group == "core"
}

/// The targets of a policy; `root_namespace` `None`: not known (GatewayClass refs are then
/// only checked for their shape).
fn targets(p: &WaypointPolicy, root_namespace: Option<&str>) -> Result<Vec<Target>, FieldError> {
    let (refs, field): (Vec<&TargetRef>, &str) = match (&p.target_ref, p.target_refs.is_empty()) {
        (Some(_), false) => {
            return Err((
                "targetRef".into(),
                "give `targetRefs` or `targetRef`, not both".into(),
            ));
        }
        (Some(one), true) => (vec![one], "targetRef"),
        (None, _) => (p.target_refs.iter().collect(), "targetRefs"),
    };
    if refs.is_empty() {
        return Err((
            "targetRefs".into(),
            "missing: a policy applies at a waypoint only through targetRefs (Gateway, Service or the istio-waypoint GatewayClass); L4 policies belong in `policies:`".into(),
        ));
    }
    let mut out = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let f = if field == "targetRef" {
            field.to_owned()
        } else {
            format!("{field}[{i}]")
        };
        if r.name.is_empty() {
            return Err((format!("{f}.name"), "must not be empty".into()));
        }
        if let Some(ns) = &r.namespace
            && ns != &p.namespace
        {
            return Err((
                format!("{f}.namespace"),
                format!(
                    "{ns:?} is not the policy's namespace {:?}: cross-namespace targetRefs are not supported (Istio refuses them)",
                    p.namespace
                ),
            ));
        }
        let target = match (r.kind.as_str(), r.group.as_str()) {
            ("Gateway", GATEWAY_GROUP) => {
                Target::Gateway(ObjectRef::new(p.namespace.clone(), r.name.clone()))
            }
            ("Service", g) if is_core(g) => {
                Target::Service(ObjectRef::new(p.namespace.clone(), r.name.clone()))
            }
            ("GatewayClass", GATEWAY_GROUP) => {
                if r.name != WAYPOINT_GATEWAY_CLASS {
                    return Err((
                        format!("{f}.name"),
                        format!(
                            "GatewayClass {:?}: only {WAYPOINT_GATEWAY_CLASS:?} is a waypoint class",
                            r.name
                        ),
                    ));
                }
                if let Some(root) = root_namespace
                    && root != p.namespace
                {
                    return Err((
                        f,
                        format!(
                            "a GatewayClass targetRef applies only from the root namespace {root:?} (Istio ignores it elsewhere)"
                        ),
                    ));
                }
                Target::AllWaypoints
            }
            ("Gateway" | "GatewayClass", g) => {
                return Err((
                    format!("{f}.group"),
                    format!("{g:?}: kind {} is in group {GATEWAY_GROUP}", r.kind),
                ));
            }
            ("Service", g) => {
                return Err((
                    format!("{f}.group"),
                    format!("{g:?}: kind Service is in the core group (\"\" or core)"),
                ));
            }
            ("ServiceEntry", _) => {
                return Err((
                    format!("{f}.kind"),
                    "ServiceEntry is not supported: the workload file has no ServiceEntry".into(),
                ));
            }
            (k, _) => {
                return Err((
                    format!("{f}.kind"),
                    format!("{k:?} is not a waypoint target (Gateway, Service or GatewayClass)"),
                ));
            }
        };
        out.push(target);
    }
    Ok(out)
}

/// A policy compiled for evaluation.
#[derive(Debug)]
struct CompiledPolicy {
    id: String,
    action: Action,
    /// `Err`: a rule that failed to compile (possible only for a version that skipped
    /// validation): it matches as fail-closed demands, always for DENY, never for ALLOW.
    rules: Vec<Result<CompiledRule, ()>>,
}

fn check(p: &WaypointPolicy, root_namespace: Option<&str>) -> Result<(), FieldError> {
    if p.name.is_empty() {
        return Err(("name".into(), "must not be empty".into()));
    }
    if p.namespace.is_empty() {
        return Err(("namespace".into(), "must not be empty".into()));
    }
    if p.selector.is_some() {
        return Err((
            "selector".into(),
            "a policy with a selector never applies at a waypoint (Istio ignores it there); use targetRefs, or put L4 policies in `policies:`".into(),
        ));
    }
    targets(p, root_namespace)?;
    for (i, r) in p.rules.iter().enumerate() {
        compile_rule(&format!("rules[{i}]"), r)?;
    }
    Ok(())
}

fn check_all(policies: &[WaypointPolicy], root_namespace: Option<&str>) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for (i, p) in policies.iter().enumerate() {
        let object = format!("waypointPolicies[{i}] ({}/{})", p.namespace, p.name);
        if !seen.insert((p.namespace.as_str(), p.name.as_str())) {
            return Err(format!("{object}: duplicate policy"));
        }
        check(p, root_namespace)
            .map_err(|(field, reason)| format!("{object}: {field}: {reason}"))?;
    }
    Ok(())
}

/// Checks every policy of a file version; the error names the policy and the field.
/// GatewayClass targetRefs are checked for their shape only; [`validate_all_in_root`] also
/// checks that they come from the root namespace.
pub fn validate_all(policies: &[WaypointPolicy]) -> Result<(), String> {
    check_all(policies, None)
}

/// [`validate_all`], knowing the root namespace.
pub fn validate_all_in_root(
    policies: &[WaypointPolicy],
    root_namespace: &str,
) -> Result<(), String> {
    check_all(policies, Some(root_namespace))
}

/// The policies of one config version, indexed by what they attach to.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    policies: Vec<CompiledPolicy>,
    by_gateway: HashMap<ObjectRef, Vec<usize>>,
    by_service: HashMap<ObjectRef, Vec<usize>>,
    all_waypoints: Vec<usize>,
}

impl PolicyIndex {
    /// Compiles the policies of a validated version. A policy that does not validate (a
    /// caller that skipped [`validate_all`]) is still indexed fail-closed: its targets as far
    /// as they parse, its broken rules matching always for DENY and never for ALLOW.
    pub fn new(policies: &[WaypointPolicy], root_namespace: &str) -> Self {
        let mut index = PolicyIndex::default();
        let mut sorted: Vec<&WaypointPolicy> = policies.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for p in sorted {
            let id = format!("{}/{}", p.namespace, p.name);
            let targets = match targets(p, Some(root_namespace)) {
                Ok(t) => t,
                Err((field, reason)) => {
                    warn!(policy = %id, field, reason, "waypoint policy targets nothing");
                    continue;
                }
            };
            let rules = p
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    compile_rule(&format!("rules[{i}]"), r).map_err(|(field, reason)| {
                        warn!(policy = %id, field, reason, "waypoint policy rule does not compile; it fails closed");
                    })
                })
                .collect();
            let n = index.policies.len();
            index.policies.push(CompiledPolicy {
                id,
                action: p.action,
                rules,
            });
            for t in targets {
                let list = match t {
                    Target::Gateway(g) => index.by_gateway.entry(g).or_default(),
                    Target::Service(s) => index.by_service.entry(s).or_default(),
                    Target::AllWaypoints => &mut index.all_waypoints,
                };
                if list.last() != Some(&n) {
                    list.push(n);
                }
            }
        }
        index
    }

    /// The policies that apply at `gateway` for a request to `service`, in `ns/name` order.
    fn applicable(&self, gateway: &ObjectRef, service: Option<&ObjectRef>) -> Vec<usize> {
        let mut out: Vec<usize> = self.all_waypoints.clone();
        out.extend(self.by_gateway.get(gateway).into_iter().flatten());
        if let Some(s) = service {
            out.extend(self.by_service.get(s).into_iter().flatten());
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Decides a request through waypoint `gateway` to `service` (`None`: addressed to a
    /// workload), by Istio's order: CUSTOM (unsupported), DENY, ALLOW.
    pub fn evaluate(
        &self,
        gateway: &ObjectRef,
        service: Option<&ObjectRef>,
        req: &RequestAttrs<'_>,
    ) -> Decision {
        let applicable = self.applicable(gateway, service);
        if applicable.is_empty() {
            return Decision::Allow;
        }
        // The query is not part of the path (istio.io normalization, "path with query"),
        // whether or not the caller already stripped it.
        let raw_path = req.path.split(['?', '#']).next().unwrap_or(req.path);
        let path = match normalize_path(raw_path) {
            Ok(p) => p,
            Err(e) => {
                return Decision::Deny {
                    policy: applicable
                        .iter()
                        .map(|&i| self.policies[i].id.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    reason: e.to_string(),
                };
            }
        };
        let ctx = Context::new(
            req.source_principal,
            req.port,
            req.source_ip,
            req.destination_ip,
            Some(HttpView::new(req, &path)),
        );
        self.decide(&applicable, &ctx)
    }

    /// Decides a TCP connection (a stream on a port that is not HTTP) through waypoint
    /// `gateway` to `service`, as Istio's network RBAC filter does with the same policies:
    /// an ALLOW rule naming anything HTTP-only (hosts, methods, paths, their `not…` forms,
    /// `request.headers[…]`) matches no connection; in a DENY rule those fields are left
    /// out, so the rule matches more (istio/istio `pilot/pkg/security/authz/model`,
    /// `forTCP`; istio.io "authorization for TCP traffic").
    pub fn evaluate_connection(
        &self,
        gateway: &ObjectRef,
        service: Option<&ObjectRef>,
        conn: &ConnectionAttrs<'_>,
    ) -> Decision {
        let applicable = self.applicable(gateway, service);
        if applicable.is_empty() {
            return Decision::Allow;
        }
        let ctx = Context::new(
            conn.source_principal,
            conn.port,
            conn.source_ip,
            conn.destination_ip,
            None,
        );
        self.decide(&applicable, &ctx)
    }

    /// DENY first, then ALLOW, over the applicable policies.
    fn decide(&self, applicable: &[usize], ctx: &Context<'_>) -> Decision {
        for &i in applicable {
            let p = &self.policies[i];
            if p.action == Action::Deny && p.matches(ctx) {
                return Decision::Deny {
                    policy: p.id.clone(),
                    reason: "matched a DENY policy".to_owned(),
                };
            }
        }
        let allows: Vec<&CompiledPolicy> = applicable
            .iter()
            .map(|&i| &self.policies[i])
            .filter(|p| p.action == Action::Allow)
            .collect();
        if allows.is_empty() || allows.iter().any(|p| p.matches(ctx)) {
            return Decision::Allow;
        }
        Decision::Deny {
            policy: allows
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
            reason: "no ALLOW policy matched".to_owned(),
        }
    }
}

/// What a policy sees of one TCP connection through the waypoint.
#[derive(Debug, Clone)]
pub struct ConnectionAttrs<'a> {
    /// The service port the client dialled.
    pub port: u16,
    /// The client's SPIFFE identity (`spiffe://td/ns/x/sa/y`); `None` for none.
    pub source_principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
}

/// The HTTP side of a request, derived once.
struct HttpView<'r> {
    method: &'r str,
    path: &'r str,
    headers: &'r http::HeaderMap,
    host: String,
    /// The host without a `:port`, when it has one.
    host_no_port: Option<String>,
}

impl<'r> HttpView<'r> {
    fn new(req: &'r RequestAttrs<'_>, path: &'r str) -> Self {
        let host = req.host.to_ascii_lowercase();
        let host_no_port = strip_port(&host).map(str::to_owned);
        HttpView {
            method: req.method.as_str(),
            path,
            headers: req.headers,
            host,
            host_no_port,
        }
    }

    fn host_matches(&self, m: &StringMatch) -> bool {
        m.matches(&self.host) || self.host_no_port.as_deref().is_some_and(|h| m.matches(h))
    }

    /// The header's values joined with `,`; `None` when absent.
    fn header(&self, name: &http::HeaderName) -> Option<String> {
        let mut values = self.headers.get_all(name).iter().peekable();
        values.peek()?;
        Some(
            values
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(","),
        )
    }
}

/// A request or connection as matching reads it; `http` is `None` for a TCP connection.
struct Context<'r> {
    principal: Option<&'r str>,
    namespace: Option<&'r str>,
    port: u16,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    http: Option<HttpView<'r>>,
}

impl<'r> Context<'r> {
    fn new(
        source_principal: Option<&'r str>,
        port: u16,
        source_ip: IpAddr,
        destination_ip: IpAddr,
        http: Option<HttpView<'r>>,
    ) -> Self {
        let principal = source_principal.map(|p| p.strip_prefix(SPIFFE_PREFIX).unwrap_or(p));
        // `td/ns/<ns>/sa/<sa>`
        let namespace = principal.and_then(|p| {
            let mut parts = p.split('/');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(_), Some("ns"), Some(ns), Some("sa")) if !ns.is_empty() => Some(ns),
                _ => None,
            }
        });
        Context {
            principal,
            namespace,
            port,
            source_ip,
            destination_ip,
            http,
        }
    }
}

/// `host:port` → `host` (`[v6]:port` → `[v6]`); `None` when there is no port.
fn strip_port(host: &str) -> Option<&str> {
    let (head, tail) = host.rsplit_once(':')?;
    if tail.is_empty() || !tail.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if head.contains(':') && !head.ends_with(']') {
        return None;
    }
    Some(head)
}

/// `values` (any) and `not_values` (none) over an optional attribute: an absent one matches
/// no value and so every `not` list.
fn strings_hold(pos: &[StringMatch], neg: &[StringMatch], value: Option<&str>) -> bool {
    (pos.is_empty() || value.is_some_and(|v| pos.iter().any(|m| m.matches(v))))
        && !(value.is_some_and(|v| neg.iter().any(|m| m.matches(v))))
}

fn ips_hold(pos: &[IpNet], neg: &[IpNet], ip: IpAddr) -> bool {
    (pos.is_empty() || pos.iter().any(|n| n.contains(ip))) && !neg.iter().any(|n| n.contains(ip))
}

fn ports_hold(pos: &[u16], neg: &[u16], port: u16) -> bool {
    (pos.is_empty() || pos.contains(&port)) && !neg.contains(&port)
}

impl SourceMatch {
    fn matches(&self, ctx: &Context<'_>) -> bool {
        strings_hold(&self.principals, &self.not_principals, ctx.principal)
            && strings_hold(&self.namespaces, &self.not_namespaces, ctx.namespace)
            && ips_hold(&self.ip_blocks, &self.not_ip_blocks, ctx.source_ip)
    }
}

impl OperationMatch {
    fn uses_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    /// For a TCP connection the HTTP fields are left out (only a DENY rule gets here with
    /// them; see [`PolicyIndex::evaluate_connection`]).
    fn matches(&self, ctx: &Context<'_>) -> bool {
        ports_hold(&self.ports, &self.not_ports, ctx.port)
            && ctx.http.as_ref().is_none_or(|h| {
                (self.hosts.is_empty() || self.hosts.iter().any(|m| h.host_matches(m)))
                    && !self.not_hosts.iter().any(|m| h.host_matches(m))
                    && strings_hold(&self.methods, &self.not_methods, Some(h.method))
                    && strings_hold(&self.paths, &self.not_paths, Some(h.path))
            })
    }
}

impl ConditionMatch {
    fn holds(&self, values: &Values, ctx: &Context<'_>) -> bool {
        match (values, &self.attribute) {
            (Values::Strings(list), Attribute::Header(name)) => ctx
                .http
                .as_ref()
                .and_then(|h| h.header(name))
                .is_some_and(|v| {
                    list.iter().any(|m| match m {
                        // Envoy's present_match: the header is there, whatever its value.
                        StringMatch::Presence => true,
                        m => m.matches(&v),
                    })
                }),
            (Values::Strings(list), Attribute::SourceNamespace) => ctx
                .namespace
                .is_some_and(|v| list.iter().any(|m| m.matches(v))),
            (Values::Strings(list), Attribute::SourcePrincipal) => ctx
                .principal
                .is_some_and(|v| list.iter().any(|m| m.matches(v))),
            (Values::Ips(list), Attribute::SourceIp) => {
                list.iter().any(|n| n.contains(ctx.source_ip))
            }
            (Values::Ips(list), Attribute::DestinationIp) => {
                list.iter().any(|n| n.contains(ctx.destination_ip))
            }
            (Values::Ports(list), Attribute::DestinationPort) => list.contains(&ctx.port),
            // compile_condition pairs every attribute with its kind of value.
            _ => false,
        }
    }

    fn matches(&self, ctx: &Context<'_>) -> bool {
        if ctx.http.is_none() && matches!(self.attribute, Attribute::Header(_)) {
            // Left out for a TCP connection (only a DENY rule gets here with it).
            return true;
        }
        self.values.as_ref().is_none_or(|v| self.holds(v, ctx))
            && !self.not_values.as_ref().is_some_and(|v| self.holds(v, ctx))
    }
}

impl CompiledRule {
    fn uses_http(&self) -> bool {
        self.to.iter().any(OperationMatch::uses_http)
            || self
                .when
                .iter()
                .any(|c| matches!(c.attribute, Attribute::Header(_)))
    }

    fn matches(&self, ctx: &Context<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(ctx)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(ctx)))
            && self.when.iter().all(|c| c.matches(ctx))
    }
}

impl CompiledPolicy {
    fn matches(&self, ctx: &Context<'_>) -> bool {
        self.rules.iter().any(|r| match r {
            // An ALLOW rule about HTTP never matches a TCP connection.
            Ok(rule) if ctx.http.is_none() && self.action == Action::Allow && rule.uses_http() => {
                false
            }
            Ok(rule) => rule.matches(ctx),
            Err(()) => self.action == Action::Deny,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: (&str, &str) = ("shop", "waypoint");
    const SVC: (&str, &str) = ("shop", "db");

    /// A request as the table writes it: method, path, host, port, client identity.
    struct Req {
        method: &'static str,
        path: &'static str,
        host: &'static str,
        port: u16,
        principal: Option<&'static str>,
        headers: &'static [(&'static str, &'static str)],
        src: &'static str,
    }

    const GET_ORDERS: Req = Req {
        method: "GET",
        path: "/orders/1",
        host: "db.shop.svc.cluster.local:8080",
        port: 8080,
        principal: Some("spiffe://cluster.local/ns/shop/sa/backend"),
        headers: &[],
        src: "10.0.0.5",
    };

    fn decide(policies: &str, service: Option<(&str, &str)>, req: &Req) -> Decision {
        let policies: Vec<WaypointPolicy> = serde_norway::from_str(policies).expect("yaml");
        validate_all_in_root(&policies, "istio-system").expect("valid");
        let index = PolicyIndex::new(&policies, "istio-system");
        let method = http::Method::from_bytes(req.method.as_bytes()).expect("method");
        let mut headers = http::HeaderMap::new();
        for (k, v) in req.headers {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_static(v),
            );
        }
        let attrs = RequestAttrs {
            method: &method,
            path: req.path,
            host: req.host,
            port: req.port,
            headers: &headers,
            source_principal: req.principal,
            source_ip: req.src.parse().expect("ip"),
            destination_ip: "10.96.0.10".parse().expect("ip"),
        };
        let service = service.map(|(ns, n)| ObjectRef::new(ns, n));
        index.evaluate(&ObjectRef::new(GW.0, GW.1), service.as_ref(), &attrs)
    }

    fn allowed(policies: &str, req: &Req) -> bool {
        decide(policies, Some(SVC), req) == Decision::Allow
    }

    /// One ALLOW policy on service db with the given rules.
    fn allow_rules(rules: &str) -> String {
        format!(
            "- name: p\n  namespace: shop\n  targetRefs: [{{kind: Service, name: db}}]\n  rules:\n{rules}"
        )
    }

    #[test]
    fn operations_match_as_istio_does() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, Req, bool)] = &[
            ("exact path", "  - to: [{operation: {paths: [/orders/1]}}]\n", GET_ORDERS, true),
            ("prefix path", "  - to: [{operation: {paths: [/orders/*]}}]\n", GET_ORDERS, true),
            ("suffix path", "  - to: [{operation: {paths: ['*/1']}}]\n", GET_ORDERS, true),
            ("any path", "  - to: [{operation: {paths: ['*']}}]\n", GET_ORDERS, true),
            ("other path", "  - to: [{operation: {paths: [/users]}}]\n", GET_ORDERS, false),
            ("query is not path", "  - to: [{operation: {paths: [/orders/1]}}]\n", Req { path: "/orders/1?a=b", ..GET_ORDERS }, true),
            ("query cannot dodge notPaths", "  - to: [{operation: {notPaths: [/orders/1]}}]\n", Req { path: "/orders/1?a=b", ..GET_ORDERS }, false),
            ("notPaths excludes", "  - to: [{operation: {notPaths: [/orders/*]}}]\n", GET_ORDERS, false),
            ("notPaths passes others", "  - to: [{operation: {notPaths: [/admin*]}}]\n", GET_ORDERS, true),
            ("paths and notPaths", "  - to: [{operation: {paths: [/orders/*], notPaths: [/orders/1]}}]\n", GET_ORDERS, false),
            ("method case-sensitive", "  - to: [{operation: {methods: [get]}}]\n", GET_ORDERS, false),
            ("method exact", "  - to: [{operation: {methods: [GET]}}]\n", GET_ORDERS, true),
            ("notMethods", "  - to: [{operation: {notMethods: [POST]}}]\n", Req { method: "POST", ..GET_ORDERS }, false),
            ("host with port", "  - to: [{operation: {hosts: [db.shop.svc.cluster.local]}}]\n", GET_ORDERS, true),
            ("host case-insensitive", "  - to: [{operation: {hosts: [DB.Shop.svc.cluster.local]}}]\n", GET_ORDERS, true),
            ("host written with port", "  - to: [{operation: {hosts: ['db.shop.svc.cluster.local:8080']}}]\n", GET_ORDERS, true),
            ("host suffix", "  - to: [{operation: {hosts: ['*.cluster.local']}}]\n", GET_ORDERS, true),
            ("host prefix", "  - to: [{operation: {hosts: ['db.*']}}]\n", GET_ORDERS, true),
            ("other host", "  - to: [{operation: {hosts: [web.shop]}}]\n", GET_ORDERS, false),
            ("notHosts", "  - to: [{operation: {notHosts: ['*.cluster.local']}}]\n", GET_ORDERS, false),
            ("port", "  - to: [{operation: {ports: ['8080']}}]\n", GET_ORDERS, true),
            ("other port", "  - to: [{operation: {ports: ['9090']}}]\n", GET_ORDERS, false),
            ("notPorts", "  - to: [{operation: {notPorts: ['8080']}}]\n", GET_ORDERS, false),
            ("fields AND", "  - to: [{operation: {methods: [GET], paths: [/users]}}]\n", GET_ORDERS, false),
            ("entries OR", "  - to: [{operation: {paths: [/users]}}, {operation: {methods: [GET]}}]\n", GET_ORDERS, true),
            ("rules OR", "  - to: [{operation: {paths: [/users]}}]\n  - to: [{operation: {methods: [GET]}}]\n", GET_ORDERS, true),
            ("from and to AND", "  - from: [{source: {namespaces: [web]}}]\n    to: [{operation: {methods: [GET]}}]\n", GET_ORDERS, false),
            ("empty rule matches all", "  - {}\n", GET_ORDERS, true),
        ];
        for (name, rules, req, want) in cases {
            assert_eq!(allowed(&allow_rules(rules), req), *want, "{name}");
        }
    }

    #[test]
    fn sources_and_conditions_match_as_istio_does() {
        let plaintext = Req {
            principal: None,
            ..GET_ORDERS
        };
        let tenant = Req {
            headers: &[("x-tenant", "acme"), ("X-Tenant", "beta")],
            ..GET_ORDERS
        };
        #[rustfmt::skip]
        let cases: &[(&str, &str, &Req, bool)] = &[
            ("principal minus spiffe://", "  - from: [{source: {principals: [cluster.local/ns/shop/sa/backend]}}]\n", &GET_ORDERS, true),
            ("principal with spiffe:// never matches", "  - from: [{source: {principals: ['spiffe://cluster.local/ns/shop/sa/backend']}}]\n", &GET_ORDERS, false),
            ("principal suffix", "  - from: [{source: {principals: ['*/sa/backend']}}]\n", &GET_ORDERS, true),
            ("namespace of identity", "  - from: [{source: {namespaces: [shop]}}]\n", &GET_ORDERS, true),
            ("notNamespaces", "  - from: [{source: {notNamespaces: [shop]}}]\n", &GET_ORDERS, false),
            ("no identity: principals never", "  - from: [{source: {principals: ['*']}}]\n", &plaintext, false),
            ("no identity: namespaces never", "  - from: [{source: {namespaces: [shop]}}]\n", &plaintext, false),
            ("no identity: notPrincipals always", "  - from: [{source: {notPrincipals: ['*']}}]\n", &plaintext, true),
            ("no identity: notNamespaces always", "  - from: [{source: {notNamespaces: [shop]}}]\n", &plaintext, true),
            ("identity: notPrincipals * excludes", "  - from: [{source: {notPrincipals: ['*']}}]\n", &GET_ORDERS, false),
            ("ipBlocks", "  - from: [{source: {ipBlocks: [10.0.0.0/24]}}]\n", &GET_ORDERS, true),
            ("notIpBlocks", "  - from: [{source: {notIpBlocks: [10.0.0.5]}}]\n", &GET_ORDERS, false),
            ("header values joined", "  - when: [{key: 'request.headers[x-tenant]', values: ['acme,beta']}]\n", &tenant, true),
            ("header prefix", "  - when: [{key: 'request.headers[X-TENANT]', values: ['acme*']}]\n", &tenant, true),
            ("missing header never in values", "  - when: [{key: 'request.headers[x-tenant]', values: ['*']}]\n", &GET_ORDERS, false),
            ("missing header always notValues", "  - when: [{key: 'request.headers[x-tenant]', notValues: [acme]}]\n", &GET_ORDERS, true),
            ("header present", "  - when: [{key: 'request.headers[x-tenant]', values: ['*']}]\n", &tenant, true),
            ("source.ip", "  - when: [{key: source.ip, values: [10.0.0.0/8]}]\n", &GET_ORDERS, true),
            ("source.ip notValues", "  - when: [{key: source.ip, notValues: [10.0.0.0/8]}]\n", &GET_ORDERS, false),
            ("source.namespace", "  - when: [{key: source.namespace, values: [shop]}]\n", &GET_ORDERS, true),
            ("source.principal", "  - when: [{key: source.principal, values: [cluster.local/ns/shop/sa/backend]}]\n", &GET_ORDERS, true),
            ("destination.port", "  - when: [{key: destination.port, values: ['9090']}]\n", &GET_ORDERS, false),
            ("destination.ip", "  - when: [{key: destination.ip, values: [10.96.0.0/16]}]\n", &GET_ORDERS, true),
            ("conditions AND", "  - when: [{key: destination.ip, values: [10.96.0.0/16]}, {key: source.namespace, values: [web]}]\n", &GET_ORDERS, false),
            ("values and notValues", "  - when: [{key: source.ip, values: [10.0.0.0/8], notValues: [10.0.0.5]}]\n", &GET_ORDERS, false),
        ];
        for (name, rules, req, want) in cases {
            assert_eq!(allowed(&allow_rules(rules), req), *want, "{name}");
        }
    }

    #[test]
    fn paths_are_normalised_as_istio_default_does() {
        #[rustfmt::skip]
        let cases: &[(&str, &str)] = &[
            ("/a/../b", "/b"),
            ("//a", "/a"),
            ("/a//b///c", "/a/b/c"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%5cb", "/a%5Cb"),
            ("/%61%62%63", "/abc"),
            ("/a%2E%2E/b", "/a../b"),
            ("/a/%2E%2E/b", "/b"),
            ("/a\\b", "/a/b"),
            ("/a//../b", "/a/b"),
            ("/a/", "/a/"),
            ("/", "/"),
            ("/%7e%2D%5f", "/~-_"),
            ("/caf\u{e9}/%zz", "/caf\u{e9}/%zz"),
            ("*", "*"),
        ];
        for (input, want) in cases {
            let got = normalize_path(input).expect(input);
            assert_eq!(got, *want, "{input}");
            assert_eq!(
                normalize_path(&got).expect("again"),
                got,
                "idempotent on {input}"
            );
        }
        assert!(matches!(
            normalize_path("/a%00b"),
            Err(PathError::EncodedNul { .. })
        ));
    }

    #[test]
    fn a_normalised_path_is_what_policy_sees() {
        let deny_admin = "- name: no-admin\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin*]}}]\n";
        for path in [
            "/orders/../admin",
            "//admin",
            "/%61dmin",
            "/./admin/x",
            "\\admin",
        ] {
            let req = Req { path, ..GET_ORDERS };
            assert!(!allowed(deny_admin, &req), "{path} slipped past the DENY");
        }
        let req = Req {
            path: "/a%00/admin",
            ..GET_ORDERS
        };
        match decide(deny_admin, Some(SVC), &req) {
            Decision::Deny { reason, .. } => assert!(reason.contains("%00"), "{reason}"),
            Decision::Allow => panic!("%00 allowed"),
        }
    }

    #[test]
    fn deny_comes_before_allow_and_the_verdict_names_the_policy() {
        let both = "- name: allow-all\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n  rules: [{}]\n- name: no-post\n  namespace: shop\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n";
        let post = Req {
            method: "POST",
            ..GET_ORDERS
        };
        assert_eq!(
            decide(both, Some(SVC), &post),
            Decision::Deny {
                policy: "shop/no-post".into(),
                reason: "matched a DENY policy".into()
            }
        );
        assert_eq!(decide(both, Some(SVC), &GET_ORDERS), Decision::Allow);

        let two_allows = "- name: a\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n  rules: [{to: [{operation: {methods: [PUT]}}]}]\n- name: b\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n  rules: [{to: [{operation: {methods: [DELETE]}}]}]\n";
        assert_eq!(
            decide(two_allows, Some(SVC), &GET_ORDERS),
            Decision::Deny {
                policy: "shop/a,shop/b".into(),
                reason: "no ALLOW policy matched".into()
            }
        );
    }

    #[test]
    fn empty_rules_allow_nothing_and_deny_nothing() {
        let allow_nothing =
            "- name: nothing\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n";
        assert!(!allowed(allow_nothing, &GET_ORDERS));
        let deny_nothing = "- name: nothing\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n  action: DENY\n";
        assert!(allowed(deny_nothing, &GET_ORDERS));
        assert!(allowed("[]", &GET_ORDERS), "no policy at all allows");
    }

    #[test]
    fn policies_apply_by_target() {
        let allow_nothing = |refs: &str, ns: &str| {
            format!("- name: p\n  namespace: {ns}\n  targetRefs: [{refs}]\n")
        };
        type Case<'a> = (&'a str, String, Option<(&'a str, &'a str)>, bool);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (
                "this service",
                allow_nothing("{kind: Service, name: db}", "shop"),
                Some(SVC),
                true,
            ),
            (
                "service, core group",
                allow_nothing("{kind: Service, group: core, name: db}", "shop"),
                Some(SVC),
                true,
            ),
            (
                "another service",
                allow_nothing("{kind: Service, name: web}", "shop"),
                Some(SVC),
                false,
            ),
            (
                "same-named service elsewhere",
                allow_nothing("{kind: Service, name: db}", "web"),
                Some(SVC),
                false,
            ),
            (
                "service, request to a workload",
                allow_nothing("{kind: Service, name: db}", "shop"),
                None,
                false,
            ),
            (
                "this gateway",
                allow_nothing(
                    "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}",
                    "shop",
                ),
                Some(SVC),
                true,
            ),
            (
                "gateway, request to a workload",
                allow_nothing(
                    "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}",
                    "shop",
                ),
                None,
                true,
            ),
            (
                "another gateway",
                allow_nothing(
                    "{group: gateway.networking.k8s.io, kind: Gateway, name: other}",
                    "shop",
                ),
                Some(SVC),
                false,
            ),
            (
                "same-named gateway elsewhere",
                allow_nothing(
                    "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}",
                    "web",
                ),
                Some(SVC),
                false,
            ),
            (
                "waypoint class from root",
                allow_nothing(
                    "{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}",
                    "istio-system",
                ),
                None,
                true,
            ),
        ];
        for (name, policy, service, applies) in cases {
            let denied = decide(policy, *service, &GET_ORDERS) != Decision::Allow;
            assert_eq!(denied, *applies, "{name}");
        }
        let singular = "- name: p\n  namespace: shop\n  targetRef: {kind: Service, name: db}\n";
        assert!(
            !allowed(singular, &GET_ORDERS),
            "the singular targetRef applies"
        );
    }

    #[test]
    fn invalid_policies_are_refused_naming_object_field_and_reason() {
        let base = "- name: p\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n";
        #[rustfmt::skip]
        let cases: &[(&str, String, &str)] = &[
            ("bad method list entry", format!("{base}  rules: [{{to: [{{operation: {{methods: [GET, 'P*T']}}}}]}}]\n"), "rules[0].to[0].operation.methods[1]"),
            ("port not a number", format!("{base}  rules: [{{to: [{{operation: {{ports: ['80', 'http']}}}}]}}]\n"), "rules[0].to[0].operation.ports[1]"),
            ("bad cidr", format!("{base}  rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/33]}}}}]}}]\n"), "rules[0].from[0].source.ipBlocks[0]"),
            ("jwt", format!("{base}  rules: [{{from: [{{source: {{requestPrincipals: ['*']}}}}]}}]\n"), "no JWT"),
            ("remote ip", format!("{base}  rules: [{{from: [{{source: {{remoteIpBlocks: [1.2.3.4]}}}}]}}]\n"), "rules[0].from[0].source.remoteIpBlocks"),
            ("empty source", format!("{base}  rules: [{{from: [{{source: {{}}}}]}}]\n"), "rules[0].from[0].source: an empty source"),
            ("missing operation", format!("{base}  rules: [{{to: [{{}}]}}]\n"), "rules[0].to[0].operation: missing"),
            ("unknown key", format!("{base}  rules: [{{when: [{{key: 'request.regex.headers[x]', values: [a]}}]}}]\n"), "\"request.regex.headers[x]\" is not supported"),
            ("jwt key", format!("{base}  rules: [{{when: [{{key: 'request.auth.claims[iss]', values: [a]}}]}}]\n"), "rules[0].when[0].key"),
            ("condition without values", format!("{base}  rules: [{{when: [{{key: source.ip}}]}}]\n"), "rules[0].when[0]: a condition needs"),
            ("empty value", format!("{base}  rules: [{{to: [{{operation: {{paths: ['']}}}}]}}]\n"), "rules[0].to[0].operation.paths[0]: empty value"),
            ("selector", "- name: p\n  namespace: shop\n  selector: {matchLabels: {app: db}}\n".to_owned(), "selector: a policy with a selector"),
            ("no targets", "- name: p\n  namespace: shop\n".to_owned(), "targetRefs: missing"),
            ("both target forms", "- name: p\n  namespace: shop\n  targetRef: {kind: Service, name: db}\n  targetRefs: [{kind: Service, name: db}]\n".to_owned(), "not both"),
            ("cross-namespace target", "- name: p\n  namespace: shop\n  targetRefs: [{kind: Service, name: db, namespace: web}]\n".to_owned(), "targetRefs[0].namespace"),
            ("service in wrong group", "- name: p\n  namespace: shop\n  targetRefs: [{kind: Service, group: apps, name: db}]\n".to_owned(), "targetRefs[0].group"),
            ("gateway in core group", "- name: p\n  namespace: shop\n  targetRefs: [{kind: Gateway, name: waypoint}]\n".to_owned(), "targetRefs[0].group"),
            ("service entry", "- name: p\n  namespace: shop\n  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: x}]\n".to_owned(), "ServiceEntry is not supported"),
            ("class outside root", "- name: p\n  namespace: shop\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n".to_owned(), "only from the root namespace"),
            ("other class", "- name: p\n  namespace: istio-system\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio}]\n".to_owned(), "targetRefs[0].name"),
            ("duplicate", format!("{base}{base}"), "waypointPolicies[1] (shop/p): duplicate policy"),
        ];
        for (name, yaml, want) in cases {
            let policies: Vec<WaypointPolicy> = serde_norway::from_str(yaml).expect(name);
            let err = validate_all_in_root(&policies, "istio-system").expect_err(name);
            assert!(err.contains("waypointPolicies["), "{name}: {err}");
            assert!(err.contains(want), "{name}: {err}");
        }
    }

    #[test]
    fn unsupported_actions_and_unknown_fields_fail_to_parse_with_the_reason() {
        let parse = |yaml: &str| serde_norway::from_str::<Vec<WaypointPolicy>>(yaml).map(|_| ());
        let head = "- name: p\n  namespace: shop\n  targetRefs: [{kind: Service, name: db}]\n";
        for (action, want) in [
            ("CUSTOM", "no external authorizer"),
            ("AUDIT", "audit provider"),
            ("allow", "expected ALLOW or DENY"),
        ] {
            let err = parse(&format!("{head}  action: {action}\n")).expect_err(action);
            assert!(err.to_string().contains(want), "{action}: {err}");
        }
        let err = parse(&format!("{head}  provider: {{name: ext}}\n")).expect_err("provider");
        assert!(err.to_string().contains("provider"), "{err}");
        let err = parse(&format!(
            "{head}  rules: [{{to: [{{operation: {{method: [GET]}}}}]}}]\n"
        ))
        .expect_err("typo");
        assert!(err.to_string().contains("method"), "{err}");
        let p: Vec<WaypointPolicy> = serde_norway::from_str(head).expect("default action");
        assert_eq!(p[0].action, Action::Allow);
    }

    #[test]
    fn a_policy_that_skipped_validation_fails_closed() {
        let index = |action: &str| {
            let yaml = format!(
                "- name: p\n  namespace: shop\n  targetRefs: [{{kind: Service, name: db}}]\n  action: {action}\n  rules:\n  - to: [{{operation: {{ports: [http]}}}}]\n"
            );
            let policies: Vec<WaypointPolicy> = serde_norway::from_str(&yaml).expect("yaml");
            assert!(validate_all(&policies).is_err());
            PolicyIndex::new(&policies, "istio-system")
        };
        let method = http::Method::GET;
        let headers = http::HeaderMap::new();
        let attrs = RequestAttrs {
            method: &method,
            path: "/",
            host: "db",
            port: 80,
            headers: &headers,
            source_principal: None,
            source_ip: "10.0.0.1".parse().expect("ip"),
            destination_ip: "10.0.0.2".parse().expect("ip"),
        };
        let gw = ObjectRef::new("shop", "waypoint");
        let svc = ObjectRef::new("shop", "db");
        for action in ["DENY", "ALLOW"] {
            assert!(
                matches!(
                    index(action).evaluate(&gw, Some(&svc), &attrs),
                    Decision::Deny { .. }
                ),
                "a broken {action} rule let the request through"
            );
        }
    }

    #[test]
    fn tcp_connections_are_policed_as_istio_network_rbac_does() {
        let decide_tcp = |policies: &str, port: u16| {
            let policies: Vec<WaypointPolicy> = serde_norway::from_str(policies).expect("yaml");
            validate_all_in_root(&policies, "istio-system").expect("valid");
            let conn = ConnectionAttrs {
                port,
                source_principal: Some("spiffe://cluster.local/ns/shop/sa/backend"),
                source_ip: "10.0.0.5".parse().expect("ip"),
                destination_ip: "10.96.0.10".parse().expect("ip"),
            };
            PolicyIndex::new(&policies, "istio-system").evaluate_connection(
                &ObjectRef::new(GW.0, GW.1),
                Some(&ObjectRef::new(SVC.0, SVC.1)),
                &conn,
            ) == Decision::Allow
        };
        let deny = |rules: &str| {
            format!(
                "- name: d\n  namespace: shop\n  targetRefs: [{{kind: Service, name: db}}]\n  action: DENY\n  rules:\n{rules}"
            )
        };
        #[rustfmt::skip]
        let cases: &[(&str, String, u16, bool)] = &[
            ("no policy", "[]".to_owned(), 8080, true),
            ("allow by port", allow_rules("  - to: [{operation: {ports: ['8080']}}]\n"), 8080, true),
            ("allow by other port", allow_rules("  - to: [{operation: {ports: ['9090']}}]\n"), 8080, false),
            ("allow by principal", allow_rules("  - from: [{source: {principals: [cluster.local/ns/shop/sa/backend]}}]\n"), 8080, true),
            ("allow by source.ip", allow_rules("  - when: [{key: source.ip, values: [10.0.0.0/8]}]\n"), 8080, true),
            ("allow rule with methods never matches", allow_rules("  - from: [{source: {namespaces: [shop]}}]\n    to: [{operation: {methods: [GET]}}]\n"), 8080, false),
            ("allow rule with a header never matches", allow_rules("  - when: [{key: 'request.headers[x]', values: ['*']}]\n"), 8080, false),
            ("other allow rule still can", allow_rules("  - to: [{operation: {paths: [/x]}}]\n  - to: [{operation: {ports: ['8080']}}]\n"), 8080, true),
            ("deny by paths matches more", deny("  - to: [{operation: {paths: [/admin]}}]\n"), 8080, false),
            ("deny by header matches more", deny("  - when: [{key: 'request.headers[x]', values: [a]}]\n"), 8080, false),
            ("deny keeps its ports", deny("  - to: [{operation: {ports: ['9090'], methods: [POST]}}]\n"), 8080, true),
            ("deny keeps its source", deny("  - from: [{source: {namespaces: [web]}}]\n    to: [{operation: {methods: [POST]}}]\n"), 8080, true),
        ];
        for (name, policies, port, want) in cases {
            assert_eq!(decide_tcp(policies, *port), *want, "{name}");
        }
    }

    /// The module documentation's example parses, validates and means what it says.
    #[test]
    fn the_documented_example_parses_and_decides() {
        let doc = include_str!("authz.rs");
        let yaml: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! waypointPolicies:"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| {
                format!(
                    "{}\n",
                    l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
                )
            })
            .collect();
        let policies: Vec<WaypointPolicy> = serde_norway::from_str(&yaml).expect("doc example");
        assert_eq!(policies.len(), 1);
        let dumped = serde_norway::to_string(&policies).expect("dump");
        let again: Vec<WaypointPolicy> = serde_norway::from_str(&dumped).expect("read the dump");
        assert_eq!(again, policies);
        assert_eq!(policies[0].target_refs.len(), 2);
        let tenant = Req {
            path: "/orders/7",
            headers: &[("x-tenant", "acme")],
            ..GET_ORDERS
        };
        assert!(allowed(&yaml, &tenant));
        let admin = Req {
            path: "/orders/admin/x",
            ..tenant
        };
        assert!(!allowed(&yaml, &admin), "notPaths");
        let other = Req {
            principal: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
            ..tenant
        };
        assert!(!allowed(&yaml, &other), "principal");
    }
}
