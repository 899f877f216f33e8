//! Gateway API HTTPRoute (`gateway.networking.k8s.io/v1`) at the waypoint: which backend a
//! request goes to, with its timeouts and retries. The workload file's `httpRoutes:` holds
//! them; [`validate_all`] checks a file version, [`RouteTable`] selects per request.
//!
//! # Shape
//!
//! The Kubernetes object with its metadata flattened (`name`, `namespace`) and its `spec`
//! fields alongside:
//!
//! ```yaml
//! httpRoutes:
//! - name: db-split
//!   namespace: shop
//!   parentRefs:
//!   - kind: Service                   # GAMMA: requests to service shop/db
//!     group: ""
//!     name: db
//!     port: 8080                      # optional: only that service port
//!   - group: gateway.networking.k8s.io
//!     kind: Gateway                   # every request through this waypoint…
//!     name: waypoint
//!   hostnames: [db.shop.svc.cluster.local, "*.example.com"]   # …whose Host matches
//!   rules:
//!   - name: orders
//!     matches:                        # OR; none at all: one match on path prefix /
//!     - path: {type: PathPrefix, value: /orders}   # Exact | PathPrefix | RegularExpression
//!       method: GET
//!       headers:
//!       - {type: Exact, name: x-canary, value: "yes"}
//!       queryParams:
//!       - {type: RegularExpression, name: v, value: "[0-9]+"}
//!     backendRefs:
//!     - {name: db-v1, port: 8080, weight: 90}
//!     - {name: db-v2, port: 8080, weight: 10}
//!     timeouts: {request: 10s, backendRequest: 2s}
//!     retry: {attempts: 3, codes: [503], backoff: 100ms}
//! ```
//!
//! # Semantics, and where they come from
//!
//! From gateway-api `apis/v1/httproute_types.go` unless said otherwise:
//! - **Attachment.** A `Service` parentRef (group `""`/`core`) attaches the route to requests
//!   whose destination is that service (GAMMA), on every port or only `port`; `hostnames`
//!   do not apply to it. A `Gateway` parentRef (the default kind, group
//!   `gateway.networking.k8s.io`) attaches it to every request through that waypoint whose
//!   Host matches `hostnames` (empty: all; case-insensitive, port ignored; `*.example.com`
//!   matches any name with that suffix but not `example.com` itself). The parentRef's
//!   namespace must be the route's: a consumer route (GAMMA's cross-namespace Service
//!   parentRef applies only to clients in the route's namespace, which a route table does
//!   not see) and a cross-namespace Gateway (an istio waypoint's listener allows routes from
//!   its own namespace only) are refused.
//! - **Matching.** A match with nothing set is a path prefix `/`; a rule without matches has
//!   one such match. Within a match every condition holds (path, method, every header, every
//!   query parameter). `PathPrefix` matches on segment boundaries (`/foo` matches `/foo` and
//!   `/foo/bar`, not `/foobar`; a trailing `/` in the value is ignored, as Istio does).
//!   Regular expressions (the `regex` crate, RE2-like: linear time) must match the whole
//!   value; one compiled expression may take at most [`REGEX_SIZE_LIMIT`] (1 MiB). Header
//!   names compare case-insensitively, values exactly; several values of one header are
//!   joined with `,` (Envoy); of repeated query parameters the first counts; a repeated
//!   header or query name within one match: the first entry counts. The path is matched
//!   after Istio's normalisation (see [`super::authz::normalize_path`]).
//! - **Precedence** across the rules of all attached routes: an Exact path, then (Istio's
//!   order, implementation-specific in the spec) a RegularExpression path, the longer
//!   pattern first, then the longest PathPrefix; then a method match; then more header
//!   matches; then more query matches; then the route first by `namespace/name` (there is no
//!   creation time in a file); then the first rule, then the first match.
//! - **No match.** When routes attach but none matches, Istio's waypoint answers 404
//!   (Envoy's `route_not_found`): [`NoBackend`] with status 404. No route attaching at all:
//!   `Ok(None)`, the request goes to its destination unchanged.
//! - **Backends.** A `Service` (the only kind; group `""`/`core`) in the route's namespace
//!   (another namespace needs a ReferenceGrant, not modelled: refused); `port` optional here
//!   (absent: the port the client dialled); weight 1 by default. Weighted backends are taken
//!   in turns: weights are divided by their greatest common divisor, and each backend takes
//!   its weight's run of every `sum` requests matching the rule (90/10: 9 then 1 of every
//!   10), so the shares hold exactly over any run of `sum` requests (a counter per rule;
//!   Istio/Envoy draws at random). A new config version starts the turns afresh. A rule
//!   without backendRefs sends the request to the parent Service when the route attached
//!   through one (GAMMA, GEP-1426); through a Gateway it answers 500, as do a rule whose
//!   weights are all 0 and a turn landing on an invalid backend ([`NoBackend`], status
//!   500), as the spec requires.
//! - **Timeouts** are Gateway API durations (`1h`, `10s`, `500ms`, up to four parts of up to
//!   five digits each); `0s` disables. `request` bounds the whole request including retries,
//!   `backendRequest` each try.
//! - **Retries** ([`Chosen::retries`]): `retry.attempts` when given (the experimental
//!   HTTPRouteRetry); otherwise Istio's default for waypoints and sidecars, 2 retries on
//!   connect-failure, refused-stream, unavailable, cancelled and retriable status code 503
//!   (istio/istio `pilot/pkg/networking/core/route/retry/retry.go` `DefaultPolicy`).
//!   `retry.codes` (400–599) replace the retriable codes (default `[503]`); `backoff` is the
//!   base interval (Envoy's default 25 ms when absent).
//!
//! Not supported, refused by name (unknown fields): `filters` (header modifiers, mirrors,
//! redirects, rewrites), `sessionPersistence`, `sectionName` (a waypoint has one listener),
//! backend kinds other than Service.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::authz::{GATEWAY_GROUP, ObjectRef, normalize_path};

/// Istio's default number of retries (`DefaultPolicy`: `Attempts: 2`).
pub const DEFAULT_RETRIES: u32 = 2;
/// Istio's default retriable status code (`retriable-status-codes` with 503).
pub const DEFAULT_RETRY_CODES: &[u16] = &[503];

/// One HTTPRoute (the workload file's `httpRoutes:`), Gateway API v1 shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

/// Gateway API `ParentReference`: a Service (GAMMA) or the waypoint's Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// Default `gateway.networking.k8s.io`; `""`/`core` for Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Default `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    #[serde(default = "root_path")]
    pub value: String,
}

fn root_path() -> String {
    "/".to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Gateway API durations, as written (`10s`, `500ms`, `1h30m`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// The backend a request goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    /// `ns/name` of the route and the index of its rule that matched.
    pub route: String,
    pub rule: usize,
    /// The backend service, and the service port to use (`None`: the port the client
    /// dialled).
    pub service: ObjectRef,
    pub port: Option<u16>,
    /// The rule's request timeout (`timeouts.request`); `None`: no timeout.
    pub timeout: Option<Duration>,
    /// How many more times a request that failed to connect or got one of `retry_codes` is
    /// tried.
    pub retries: u32,
    /// The timeout of each try (`timeouts.backendRequest`); `None`: none beyond `timeout`.
    pub try_timeout: Option<Duration>,
    /// The response statuses that are retried (`retry.codes`, default 503).
    pub retry_codes: Vec<u16>,
    /// The base interval between tries (`retry.backoff`); `None`: Envoy's 25 ms.
    pub retry_backoff: Option<Duration>,
}

/// What a route match sees of a request.
pub type RequestParts = http::request::Parts;

/// Why a request has nowhere to go: a matched rule without a valid backend (500, as Gateway
/// API requires), or attached routes none of whose rules match (404, as Istio answers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route} rule {rule}: {reason}")]
pub struct NoBackend {
    /// `ns/name` of the route (for a 404: of every attached route, comma-separated).
    pub route: String,
    /// The rule that matched (for a 404: the number of rules considered).
    pub rule: usize,
    pub reason: String,
    /// The status to answer: 500 or 404.
    pub status: http::StatusCode,
}

/// Parses a Gateway API duration: 1 to 4 parts of 1 to 5 digits with `h`, `m`, `s` or `ms`
/// (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a Gateway API duration (e.g. 10s, 500ms, 1h30m)");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// A duration where zero means "none".
fn optional_duration(s: Option<&String>) -> Result<Option<Duration>, String> {
    match s {
        None => Ok(None),
        Some(s) => parse_duration(s).map(|d| (!d.is_zero()).then_some(d)),
    }
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A field path and why it is refused.
type FieldError = (String, String);

fn is_core(group: &str) -> bool {
    group.is_empty() || group == "core"
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Parent {
    Service {
        service: ObjectRef,
        port: Option<u16>,
    },
    Gateway(ObjectRef),
}

fn parent(route: &HttpRoute, i: usize, p: &ParentRef) -> Result<Parent, FieldError> {
    let field = format!("parentRefs[{i}]");
    if p.name.is_empty() {
        return Err((format!("{field}.name"), "must not be empty".into()));
    }
    if let Some(ns) = &p.namespace
        && ns != &route.namespace
    {
        return Err((
            format!("{field}.namespace"),
            format!(
                "{ns:?} is not the route's namespace {:?}: cross-namespace parents (GAMMA consumer routes, other namespaces' waypoints) are not supported",
                route.namespace
            ),
        ));
    }
    let kind = p.kind.as_deref().unwrap_or("Gateway");
    let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
    let object = ObjectRef::new(route.namespace.clone(), p.name.clone());
    match kind {
        "Service" if is_core(group) => {
            if p.port == Some(0) {
                return Err((format!("{field}.port"), "must not be 0".into()));
            }
            Ok(Parent::Service {
                service: object,
                port: p.port,
            })
        }
        "Service" => Err((
            format!("{field}.group"),
            format!("{group:?}: kind Service is in the core group (\"\" or core)"),
        )),
        "Gateway" if group == GATEWAY_GROUP => {
            if p.port.is_some() {
                return Err((
                    format!("{field}.port"),
                    "a waypoint Gateway has one listener: attach to a Service to restrict to a port".into(),
                ));
            }
            Ok(Parent::Gateway(object))
        }
        "Gateway" => Err((
            format!("{field}.group"),
            format!("{group:?}: kind Gateway is in group {GATEWAY_GROUP}"),
        )),
        k => Err((
            format!("{field}.kind"),
            format!("{k:?}: a route attaches to a Service or the waypoint's Gateway"),
        )),
    }
}

fn check_hostname(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(format!(
            "{h:?} is not a lower-case DNS name, optionally with a leading `*.` (no port, no address)"
        ));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("{h:?}: addresses are not hostnames"));
    }
    Ok(())
}

/// The most memory one compiled expression may take (the `regex` crate's own default is
/// 10 MiB); matching time is linear in the input whatever the pattern.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn regex_full(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{pattern:?} is not a valid regular expression: {e}"))
}

#[derive(Debug)]
enum PathRule {
    Exact(String),
    /// Without a trailing `/`; empty for `/`.
    Prefix(String),
    Regex(regex::Regex, usize),
}

#[derive(Debug)]
enum ValueRule {
    Exact(String),
    Regex(regex::Regex),
}

impl ValueRule {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueRule::Exact(e) => e == v,
            ValueRule::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct CompiledMatch {
    path: PathRule,
    method: Option<http::Method>,
    headers: Vec<(http::HeaderName, ValueRule)>,
    query: Vec<(String, ValueRule)>,
}

fn value_rule(field: &str, m: &ValueMatch) -> Result<ValueRule, FieldError> {
    match m.kind {
        ValueMatchType::Exact => Ok(ValueRule::Exact(m.value.clone())),
        ValueMatchType::RegularExpression => regex_full(&m.value)
            .map(ValueRule::Regex)
            .map_err(|r| (format!("{field}.value"), r)),
    }
}

fn compile_match(field: &str, m: &RouteMatch) -> Result<CompiledMatch, FieldError> {
    let path = match &m.path {
        None => PathRule::Prefix(String::new()),
        Some(p) => {
            let vf = format!("{field}.path.value");
            match p.kind {
                PathMatchType::Exact | PathMatchType::PathPrefix if !p.value.starts_with('/') => {
                    return Err((vf, format!("{:?} must start with /", p.value)));
                }
                PathMatchType::Exact => PathRule::Exact(p.value.clone()),
                PathMatchType::PathPrefix => {
                    PathRule::Prefix(p.value.trim_end_matches('/').to_owned())
                }
                PathMatchType::RegularExpression => {
                    PathRule::Regex(regex_full(&p.value).map_err(|r| (vf, r))?, p.value.len())
                }
            }
        }
    };
    let method = match &m.method {
        None => None,
        Some(name) if METHODS.contains(&name.as_str()) => {
            Some(http::Method::from_bytes(name.as_bytes()).map_err(|_| {
                (
                    format!("{field}.method"),
                    format!("{name:?} is not a method"),
                )
            })?)
        }
        Some(name) => {
            return Err((
                format!("{field}.method"),
                format!("{name:?} is not one of {}", METHODS.join(", ")),
            ));
        }
    };
    let mut headers: Vec<(http::HeaderName, ValueRule)> = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let f = format!("{field}.headers[{i}]");
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            (
                format!("{f}.name"),
                format!("{:?} is not a valid header name", h.name),
            )
        })?;
        let rule = value_rule(&f, h)?;
        // Only the first entry of a name counts (Gateway API).
        if !headers.iter().any(|(n, _)| n == name) {
            headers.push((name, rule));
        }
    }
    let mut query: Vec<(String, ValueRule)> = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let f = format!("{field}.queryParams[{i}]");
        if q.name.is_empty() {
            return Err((format!("{f}.name"), "must not be empty".into()));
        }
        let rule = value_rule(&f, q)?;
        if !query.iter().any(|(n, _)| n == &q.name) {
            query.push((q.name.clone(), rule));
        }
    }
    Ok(CompiledMatch {
        path,
        method,
        headers,
        query,
    })
}

#[derive(Debug)]
struct Backend {
    /// `Err`: why this backend cannot take requests (its turns answer 500).
    target: Result<(ObjectRef, Option<u16>), String>,
    weight: u32,
}

fn backend(
    route: &HttpRoute,
    field: &str,
    b: &BackendRef,
) -> Result<(ObjectRef, Option<u16>), FieldError> {
    if !b.group.as_deref().is_none_or(is_core) {
        return Err((
            format!("{field}.group"),
            format!("{:?}: backends are Services, in the core group", b.group),
        ));
    }
    if b.kind.as_deref().is_some_and(|k| k != "Service") {
        return Err((
            format!("{field}.kind"),
            format!("{:?}: only Service backends are supported", b.kind),
        ));
    }
    if b.name.is_empty() {
        return Err((format!("{field}.name"), "must not be empty".into()));
    }
    if let Some(ns) = &b.namespace
        && ns != &route.namespace
    {
        return Err((
            format!("{field}.namespace"),
            format!(
                "{ns:?} is not the route's namespace {:?}: a cross-namespace backend needs a ReferenceGrant, which is not supported",
                route.namespace
            ),
        ));
    }
    if b.port == Some(0) {
        return Err((format!("{field}.port"), "must not be 0".into()));
    }
    Ok((
        ObjectRef::new(route.namespace.clone(), b.name.clone()),
        b.port,
    ))
}

#[derive(Debug)]
struct CompiledRule {
    matches: Vec<CompiledMatch>,
    backends: Vec<Backend>,
    total_weight: u64,
    /// Requests that matched this rule so far: the next one's turn.
    turn: AtomicUsize,
    timeout: Option<Duration>,
    try_timeout: Option<Duration>,
    retries: u32,
    retry_codes: Vec<u16>,
    retry_backoff: Option<Duration>,
}

fn compile_rule(
    route: &HttpRoute,
    field: &str,
    r: &RouteRule,
    strict: bool,
) -> Result<CompiledRule, FieldError> {
    let matches = if r.matches.is_empty() {
        vec![compile_match(field, &RouteMatch::default())?]
    } else {
        r.matches
            .iter()
            .enumerate()
            .map(|(i, m)| compile_match(&format!("{field}.matches[{i}]"), m))
            .collect::<Result<_, _>>()?
    };
    let mut backends = Vec::with_capacity(r.backend_refs.len());
    for (i, b) in r.backend_refs.iter().enumerate() {
        let f = format!("{field}.backendRefs[{i}]");
        match backend(route, &f, b) {
            Ok(target) => backends.push(Backend {
                target: Ok(target),
                weight: b.weight,
            }),
            // Validation refuses a bad backend; a version that skipped it gets 500s for
            // that backend's share, as Gateway API prescribes for an invalid backendRef.
            Err(e) if strict => return Err(e),
            Err((f, reason)) => backends.push(Backend {
                target: Err(format!("{f}: {reason}")),
                weight: b.weight,
            }),
        }
    }
    let timeouts = r.timeouts.clone().unwrap_or_default();
    let timeout = optional_duration(timeouts.request.as_ref())
        .map_err(|e| (format!("{field}.timeouts.request"), e))?;
    let try_timeout = optional_duration(timeouts.backend_request.as_ref())
        .map_err(|e| (format!("{field}.timeouts.backendRequest"), e))?;
    if let (Some(t), Some(b)) = (timeout, try_timeout)
        && b > t
    {
        return Err((
            format!("{field}.timeouts.backendRequest"),
            format!(
                "{b:?} is longer than timeouts.request {t:?} (Gateway API requires it not to be)"
            ),
        ));
    }
    let retry = r.retry.clone().unwrap_or_default();
    for (i, c) in retry.codes.iter().enumerate() {
        if !(400..=599).contains(c) {
            return Err((
                format!("{field}.retry.codes[{i}]"),
                format!("{c} is not a status code from 400 to 599"),
            ));
        }
    }
    let retry_backoff = optional_duration(retry.backoff.as_ref())
        .map_err(|e| (format!("{field}.retry.backoff"), e))?;
    // Weights divided by their greatest common divisor, so 90/10 takes turns over every
    // 10 requests (9 then 1), not every 100.
    let gcd = backends.iter().fold(0u32, |g, b| gcd(g, b.weight));
    if gcd > 1 {
        for b in &mut backends {
            b.weight /= gcd;
        }
    }
    Ok(CompiledRule {
        matches,
        total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
        backends,
        turn: AtomicUsize::new(0),
        timeout,
        try_timeout,
        retries: retry.attempts.unwrap_or(DEFAULT_RETRIES),
        retry_codes: if retry.codes.is_empty() {
            DEFAULT_RETRY_CODES.to_vec()
        } else {
            retry.codes.clone()
        },
        retry_backoff,
    })
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[derive(Debug)]
struct CompiledRoute {
    id: String,
    parents: Vec<Parent>,
    /// Lower-cased; `*.x` kept as written.
    hostnames: Vec<String>,
    rules: Vec<CompiledRule>,
}

fn compile_route(r: &HttpRoute, strict: bool) -> Result<CompiledRoute, FieldError> {
    if r.name.is_empty() {
        return Err(("name".into(), "must not be empty".into()));
    }
    if r.namespace.is_empty() {
        return Err(("namespace".into(), "must not be empty".into()));
    }
    if r.parent_refs.is_empty() {
        return Err((
            "parentRefs".into(),
            "missing: a route attaches to nothing without a Service or Gateway parentRef".into(),
        ));
    }
    let parents = r
        .parent_refs
        .iter()
        .enumerate()
        .map(|(i, p)| parent(r, i, p))
        .collect::<Result<_, _>>()?;
    for (i, h) in r.hostnames.iter().enumerate() {
        check_hostname(h).map_err(|e| (format!("hostnames[{i}]"), e))?;
    }
    let rules = r
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| compile_rule(r, &format!("rules[{i}]"), rule, strict))
        .collect::<Result<_, _>>()?;
    Ok(CompiledRoute {
        id: format!("{}/{}", r.namespace, r.name),
        parents,
        hostnames: r.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
        rules,
    })
}

/// Checks every route of a file version; the error names the route and the field.
pub fn validate_all(routes: &[HttpRoute]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for (i, r) in routes.iter().enumerate() {
        let object = format!("httpRoutes[{i}] ({}/{})", r.namespace, r.name);
        if !seen.insert((r.namespace.as_str(), r.name.as_str())) {
            return Err(format!("{object}: duplicate route"));
        }
        compile_route(r, true).map_err(|(field, reason)| format!("{object}: {field}: {reason}"))?;
    }
    Ok(())
}

/// How a route attaches to a request; through its Service parent when both would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attached {
    No,
    Service,
    Gateway,
}

/// One match of one rule, in precedence order.
#[derive(Debug, Clone, Copy)]
struct Entry {
    route: usize,
    rule: usize,
    matched: usize,
}

/// The routes of one config version, and their matches in Gateway API precedence.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
    entries: Vec<Entry>,
}

/// Larger sorts first: the precedence key of a match.
fn rank(m: &CompiledMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        PathRule::Exact(p) => (3, p.len()),
        PathRule::Regex(_, len) => (2, *len),
        PathRule::Prefix(p) => (1, p.len()),
    };
    (
        kind,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

/// Whether `host` (lower-cased, port stripped) matches a route hostname.
fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        // `.example.com`: a suffix with at least one label before it.
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// The request's host, lower-cased, without the port.
fn request_host(req: &RequestParts) -> Option<String> {
    let raw = match req.uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => req
            .headers
            .get(http::header::HOST)?
            .to_str()
            .ok()?
            .to_owned(),
    };
    let host = raw.rsplit_once('@').map_or(raw.as_str(), |(_, h)| h);
    let host = match host.rsplit_once(':') {
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) =>
        {
            h
        }
        _ => host,
    };
    Some(host.to_ascii_lowercase())
}

/// The first value of each query parameter, percent-decoded.
fn query_value<'q>(query: &'q str, name: &str) -> Option<std::borrow::Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (
                (bytes[i + 1] as char).to_digit(16),
                (bytes[i + 2] as char).to_digit(16),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

impl CompiledMatch {
    fn matches(&self, path: &str, req: &RequestParts) -> bool {
        let path_ok = match &self.path {
            PathRule::Exact(p) => path == p,
            PathRule::Prefix(p) => {
                p.is_empty()
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathRule::Regex(r, _) => r.is_match(path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, rule)| {
                let mut values = req.headers.get_all(name).iter().peekable();
                values.peek().is_some()
                    && rule.matches(
                        &values
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .collect::<Vec<_>>()
                            .join(","),
                    )
            })
            && self.query.iter().all(|(name, rule)| {
                req.uri
                    .query()
                    .and_then(|q| query_value(q, name))
                    .is_some_and(|v| rule.matches(&v))
            })
    }
}

impl RouteTable {
    /// Compiles the routes of a validated version. A route that does not validate (a caller
    /// that skipped [`validate_all`]) is left out, except that a bad backend keeps its share
    /// of turns and answers 500 for it, as Gateway API prescribes.
    pub fn new(routes: &[HttpRoute]) -> Self {
        let mut sorted: Vec<&HttpRoute> = routes.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut table = RouteTable::default();
        for r in sorted {
            match compile_route(r, false) {
                Ok(c) => table.routes.push(c),
                Err((field, reason)) => {
                    warn!(route = %format!("{}/{}", r.namespace, r.name), field, reason, "http route left out");
                }
            }
        }
        for (ri, route) in table.routes.iter().enumerate() {
            for (rule_i, rule) in route.rules.iter().enumerate() {
                for mi in 0..rule.matches.len() {
                    table.entries.push(Entry {
                        route: ri,
                        rule: rule_i,
                        matched: mi,
                    });
                }
            }
        }
        // Stable: equal ranks keep route (ns/name), rule and match order.
        let routes = &table.routes;
        table.entries.sort_by(|a, b| {
            let ka = rank(&routes[a.route].rules[a.rule].matches[a.matched]);
            let kb = rank(&routes[b.route].rules[b.rule].matches[b.matched]);
            kb.cmp(&ka)
        });
        table
    }

    fn attaches(
        route: &CompiledRoute,
        gateway: &ObjectRef,
        service: &ObjectRef,
        port: u16,
        host: Option<&str>,
    ) -> Attached {
        let by_service = route.parents.iter().any(|p| match p {
            Parent::Service {
                service: s,
                port: p,
            } => s == service && p.is_none_or(|p| p == port),
            Parent::Gateway(_) => false,
        });
        if by_service {
            return Attached::Service;
        }
        let by_gateway = route.parents.iter().any(|p| match p {
            Parent::Gateway(g) => {
                g == gateway
                    && (route.hostnames.is_empty()
                        || host.is_some_and(|h| {
                            route.hostnames.iter().any(|pat| hostname_matches(pat, h))
                        }))
            }
            Parent::Service { .. } => false,
        });
        if by_gateway {
            Attached::Gateway
        } else {
            Attached::No
        }
    }

    /// The backend for a request to `service`:`port` through the waypoint `gateway`.
    /// `Ok(None)`: no route attaches to it: the request goes to `service` itself.
    /// Weighted backends are taken in turns (each its weight's share of every `sum`
    /// requests matching that rule).
    pub fn select(
        &self,
        gateway: &ObjectRef,
        service: &ObjectRef,
        port: u16,
        req: &RequestParts,
    ) -> Result<Option<Chosen>, NoBackend> {
        if self.routes.is_empty() {
            return Ok(None);
        }
        let host = request_host(req);
        let attached: Vec<Attached> = self
            .routes
            .iter()
            .map(|r| Self::attaches(r, gateway, service, port, host.as_deref()))
            .collect();
        if attached.iter().all(|a| *a == Attached::No) {
            return Ok(None);
        }
        // A path that does not normalise (%00) is matched as sent; authorization refuses it.
        let raw = req.uri.path();
        let path = normalize_path(raw).unwrap_or(std::borrow::Cow::Borrowed(raw));
        for e in &self.entries {
            if attached[e.route] == Attached::No {
                continue;
            }
            let route = &self.routes[e.route];
            let rule = &route.rules[e.rule];
            if rule.matches[e.matched].matches(&path, req) {
                // GAMMA (GEP-1426): a rule without backendRefs on a Service parent sends the
                // request to that service; on a Gateway it has nowhere to go.
                let parent = (attached[e.route] == Attached::Service).then_some(service);
                return rule.choose(&route.id, e.rule, parent).map(Some);
            }
        }
        let considered = self
            .routes
            .iter()
            .zip(&attached)
            .filter(|(_, a)| **a != Attached::No)
            .map(|(r, _)| r)
            .collect::<Vec<_>>();
        Err(NoBackend {
            route: considered
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
            rule: considered.iter().map(|r| r.rules.len()).sum(),
            reason: "no rule of the attached routes matches the request (Istio answers 404)"
                .to_owned(),
            status: http::StatusCode::NOT_FOUND,
        })
    }
}

impl CompiledRule {
    fn choose(
        &self,
        route: &str,
        rule: usize,
        parent: Option<&ObjectRef>,
    ) -> Result<Chosen, NoBackend> {
        let fail = |reason: String| NoBackend {
            route: route.to_owned(),
            rule,
            reason,
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
        };
        let chosen = |service: ObjectRef, port: Option<u16>| Chosen {
            route: route.to_owned(),
            rule,
            service,
            port,
            timeout: self.timeout,
            retries: self.retries,
            try_timeout: self.try_timeout,
            retry_codes: self.retry_codes.clone(),
            retry_backoff: self.retry_backoff,
        };
        if self.backends.is_empty() {
            return match parent {
                Some(service) => Ok(chosen(service.clone(), None)),
                None => Err(fail(
                    "the rule has no backendRefs and the route is attached to a Gateway".to_owned(),
                )),
            };
        }
        if self.total_weight == 0 {
            return Err(fail("every backendRef has weight 0".to_owned()));
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) as u64 % self.total_weight;
        let mut acc = 0u64;
        let backend = self
            .backends
            .iter()
            .find(|b| {
                acc += u64::from(b.weight);
                turn < acc
            })
            .expect("turn < total_weight, the sum of the weights");
        let (service, port) = backend.target.clone().map_err(fail)?;
        Ok(chosen(service, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> ObjectRef {
        ObjectRef::new("shop", "waypoint")
    }

    fn db() -> ObjectRef {
        ObjectRef::new("shop", "db")
    }

    fn table(yaml: &str) -> RouteTable {
        let routes: Vec<HttpRoute> = serde_norway::from_str(yaml).expect("yaml");
        validate_all(&routes).expect("valid");
        RouteTable::new(&routes)
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestParts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn get(uri: &str) -> RequestParts {
        request("GET", uri, &[("host", "db.shop.svc.cluster.local:8080")])
    }

    /// The backend name chosen for a request to shop/db:8080.
    fn pick(t: &RouteTable, req: &RequestParts) -> String {
        match t.select(&gw(), &db(), 8080, req) {
            Ok(Some(c)) => c.service.name,
            other => panic!("{other:?}"),
        }
    }

    /// One Service-attached route with one rule per `(match, backend)`.
    fn route(name: &str, rules: &[(&str, &str)]) -> String {
        let mut y = format!(
            "- name: {name}\n  namespace: shop\n  parentRefs: [{{kind: Service, group: \"\", name: db}}]\n  rules:\n"
        );
        for (m, backend) in rules {
            y.push_str(&format!(
                "  - matches: [{m}]\n    backendRefs: [{{name: {backend}, port: 8080}}]\n"
            ));
        }
        y
    }

    #[test]
    fn precedence_follows_gateway_api() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], RequestParts, &'a str);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (
                "exact beats prefix",
                &[
                    ("{path: {type: PathPrefix, value: /a}}", "prefix"),
                    ("{path: {type: Exact, value: /a/b}}", "exact"),
                ],
                get("/a/b"),
                "exact",
            ),
            (
                "longest prefix",
                &[
                    ("{path: {value: /a}}", "short"),
                    ("{path: {value: /a/b}}", "long"),
                ],
                get("/a/b/c"),
                "long",
            ),
            (
                "method after path",
                &[
                    ("{path: {value: /a}}", "plain"),
                    ("{path: {value: /a}, method: GET}", "method"),
                ],
                get("/a"),
                "method",
            ),
            (
                "path before method",
                &[
                    ("{path: {value: /a}, method: GET}", "method"),
                    ("{path: {value: /a/b}}", "longer"),
                ],
                get("/a/b"),
                "longer",
            ),
            (
                "more headers",
                &[
                    ("{headers: [{name: x-a, value: '1'}]}", "one"),
                    (
                        "{headers: [{name: x-a, value: '1'}, {name: x-b, value: '2'}]}",
                        "two",
                    ),
                ],
                request("GET", "/", &[("x-a", "1"), ("x-b", "2")]),
                "two",
            ),
            (
                "headers before query",
                &[
                    (
                        "{queryParams: [{name: q, value: '1'}, {name: r, value: '2'}]}",
                        "query",
                    ),
                    ("{headers: [{name: x-a, value: '1'}]}", "header"),
                ],
                request("GET", "/?q=1&r=2", &[("x-a", "1")]),
                "header",
            ),
            (
                "more query params",
                &[
                    ("{queryParams: [{name: q, value: '1'}]}", "one"),
                    (
                        "{queryParams: [{name: q, value: '1'}, {name: r, value: '2'}]}",
                        "two",
                    ),
                ],
                get("/?q=1&r=2"),
                "two",
            ),
            (
                "then the first rule",
                &[
                    ("{path: {value: /a}}", "first"),
                    ("{path: {value: /a}}", "second"),
                ],
                get("/a"),
                "first",
            ),
            (
                "regex between exact and prefix",
                &[
                    ("{path: {type: PathPrefix, value: /a/b/c}}", "prefix"),
                    ("{path: {type: RegularExpression, value: '/a/.*'}}", "regex"),
                ],
                get("/a/b/c"),
                "regex",
            ),
            (
                "a failing better match yields",
                &[
                    ("{path: {type: Exact, value: /a}}", "exact"),
                    ("{path: {value: /}}", "root"),
                ],
                get("/b"),
                "root",
            ),
        ];
        for (name, rules, req, want) in cases {
            let t = table(&route("r", rules));
            assert_eq!(pick(&t, req), *want, "{name}");
        }
        // Across routes: ties go to the route first by namespace/name, whatever the order listed.
        let two = format!(
            "{}{}",
            route("zeta", &[("{path: {value: /a}}", "zeta")]),
            route("alpha", &[("{path: {value: /a}}", "alpha")])
        );
        assert_eq!(pick(&table(&two), &get("/a")), "alpha");
        // …but a better match in a later route wins.
        let two = format!(
            "{}{}",
            route("alpha", &[("{path: {value: /a}}", "alpha")]),
            route("zeta", &[("{path: {value: /a/b}}", "zeta")])
        );
        assert_eq!(pick(&table(&two), &get("/a/b")), "zeta");
    }

    #[test]
    fn matches_follow_gateway_api() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, RequestParts, bool)] = &[
            ("prefix on segment", "{path: {value: /foo}}", get("/foo/bar"), true),
            ("prefix itself", "{path: {value: /foo}}", get("/foo"), true),
            ("prefix not mid-segment", "{path: {value: /foo}}", get("/foobar"), false),
            ("prefix trailing slash ignored", "{path: {value: /foo/}}", get("/foo"), true),
            ("prefix / matches all", "{path: {value: /}}", get("/anything"), true),
            ("empty match is prefix /", "{}", get("/x/y"), true),
            ("exact", "{path: {type: Exact, value: /foo}}", get("/foo"), true),
            ("exact not prefix", "{path: {type: Exact, value: /foo}}", get("/foo/"), false),
            ("exact ignores query", "{path: {type: Exact, value: /foo}}", get("/foo?x=1"), true),
            ("path normalised", "{path: {type: Exact, value: /b}}", get("/a/../b"), true),
            ("slashes merged", "{path: {value: /a/b}}", get("//a//b"), true),
            ("regex whole path", "{path: {type: RegularExpression, value: '/v[0-9]+'}}", get("/v12"), true),
            ("regex anchored", "{path: {type: RegularExpression, value: '/v[0-9]+'}}", get("/v12/x"), false),
            ("method", "{method: POST}", get("/"), false),
            ("header name any case", "{headers: [{name: X-Canary, value: 'yes'}]}", request("GET", "/", &[("x-canary", "yes")]), true),
            ("header value exact", "{headers: [{name: x-canary, value: 'yes'}]}", request("GET", "/", &[("x-canary", "Yes")]), false),
            ("header absent", "{headers: [{name: x-canary, value: 'yes'}]}", get("/"), false),
            ("header regex", "{headers: [{type: RegularExpression, name: x-v, value: 'v[12]'}]}", request("GET", "/", &[("x-v", "v2")]), true),
            ("header first entry counts", "{headers: [{name: x-a, value: '1'}, {name: x-a, value: '2'}]}", request("GET", "/", &[("x-a", "1")]), true),
            ("query exact", "{queryParams: [{name: v, value: '2'}]}", get("/p?a=1&v=2"), true),
            ("query first value", "{queryParams: [{name: v, value: '2'}]}", get("/p?v=1&v=2"), false),
            ("query decoded", "{queryParams: [{name: v, value: 'a b'}]}", get("/p?v=a%20b"), true),
            ("query absent", "{queryParams: [{name: v, value: '2'}]}", get("/p"), false),
        ];
        for (name, m, req, want) in cases {
            let t = table(&route("r", &[(m, "hit")]));
            let got = match t.select(&gw(), &db(), 8080, req) {
                Ok(Some(_)) => true,
                Err(e) if e.status == http::StatusCode::NOT_FOUND => false,
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn weighted_backends_take_exact_turns() {
        let t = table(
            "- name: split\n  namespace: shop\n  parentRefs: [{kind: Service, name: db, group: ''}]\n  rules:\n  - backendRefs:\n    - {name: v1, port: 8080, weight: 90}\n    - {name: v2, port: 8080, weight: 10}\n    - {name: never, port: 8080, weight: 0}\n",
        );
        let picks: Vec<String> = (0..1000).map(|_| pick(&t, &get("/"))).collect();
        assert_eq!(picks.iter().filter(|p| *p == "v1").count(), 900);
        assert_eq!(picks.iter().filter(|p| *p == "v2").count(), 100);
        for window in picks.windows(10) {
            assert_eq!(
                window.iter().filter(|p| *p == "v2").count(),
                1,
                "every run of 10 holds 9/1"
            );
        }
    }

    #[test]
    fn a_rule_without_a_usable_backend_answers_500_and_no_match_404_as_gateway_api_says() {
        let zero = table(
            "- name: z\n  namespace: shop\n  parentRefs: [{kind: Service, name: db, group: ''}]\n  rules:\n  - matches: [{path: {value: /z}}]\n    backendRefs: [{name: v1, port: 8080, weight: 0}]\n  - matches: [{path: {value: /none}}]\n",
        );
        let err = zero
            .select(&gw(), &db(), 8080, &get("/z"))
            .expect_err("weight 0");
        assert_eq!(err.status, http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!((err.route.as_str(), err.rule), ("shop/z", 0));
        assert!(err.reason.contains("weight 0"), "{err}");
        // GAMMA: no backendRefs on a Service parent → the parent service itself.
        let parent = zero
            .select(&gw(), &db(), 8080, &get("/none"))
            .expect("to the parent")
            .expect("routed");
        assert_eq!((parent.service, parent.port, parent.rule), (db(), None, 1));
        let on_gateway = table(
            "- name: g\n  namespace: shop\n  parentRefs: [{name: waypoint}]\n  rules: [{matches: [{path: {value: /none}}]}]\n",
        );
        let err = on_gateway
            .select(&gw(), &db(), 8080, &get("/none"))
            .expect_err("no backends on a gateway");
        assert_eq!((err.status.as_u16(), err.rule), (500, 0));
        assert!(err.reason.contains("no backendRefs"), "{err}");
        let err = zero
            .select(&gw(), &db(), 8080, &get("/other"))
            .expect_err("no rule matches");
        assert_eq!(err.status, http::StatusCode::NOT_FOUND);
        assert_eq!(err.route, "shop/z");

        // A backend that skipped validation keeps its turns and answers 500 for them.
        let routes: Vec<HttpRoute> = serde_norway::from_str(
            "- name: bad\n  namespace: shop\n  parentRefs: [{kind: Service, name: db, group: ''}]\n  rules:\n  - backendRefs:\n    - {name: v1, port: 8080}\n    - {kind: ConfigMap, name: v2, port: 8080}\n",
        )
        .expect("yaml");
        assert!(validate_all(&routes).is_err());
        let t = RouteTable::new(&routes);
        assert_eq!(pick(&t, &get("/")), "v1");
        let err = t
            .select(&gw(), &db(), 8080, &get("/"))
            .expect_err("invalid");
        assert!(err.reason.contains("backendRefs[1].kind"), "{err}");
    }

    #[test]
    fn routes_attach_by_service_port_and_gateway_hostnames() {
        let yaml = "- name: svc\n  namespace: shop\n  parentRefs: [{kind: Service, group: '', name: db, port: 8080}]\n  hostnames: [db.shop]\n  rules: [{backendRefs: [{name: by-service}]}]\n- name: zgw\n  namespace: shop\n  parentRefs: [{name: waypoint}]\n  hostnames: ['*.example.com', web.shop]\n  rules: [{backendRefs: [{name: by-gateway}]}]\n";
        let t = table(yaml);
        let host = |h: &str| request("GET", "/", &[("host", h)]);
        let select = |svc: &ObjectRef, port: u16, req: &RequestParts| {
            t.select(&gw(), svc, port, req)
                .expect("no error")
                .map(|c| c.service.name)
        };
        let web = ObjectRef::new("shop", "web");
        #[rustfmt::skip]
        let cases: &[(&str, &ObjectRef, u16, RequestParts, Option<&str>)] = &[
            ("service and port", &db(), 8080, host("db"), Some("by-service")),
            ("service, other port", &db(), 9090, host("db"), None),
            ("hostnames do not apply to a service parent", &db(), 8080, host("elsewhere.org"), Some("by-service")),
            ("other service, no hostname", &web, 80, host("web.other"), None),
            ("gateway hostname", &web, 80, host("web.shop"), Some("by-gateway")),
            ("gateway hostname with port, any case", &web, 80, host("WEB.shop:80"), Some("by-gateway")),
            ("wildcard hostname", &web, 80, host("a.b.example.com"), Some("by-gateway")),
            ("wildcard needs a label", &web, 80, host("example.com"), None),
            ("authority form", &web, 80, request("GET", "http://x.example.com:80/", &[]), Some("by-gateway")),
            ("same-named service elsewhere", &ObjectRef::new("web", "db"), 8080, host("db"), None),
        ];
        for (name, svc, port, req, want) in cases {
            assert_eq!(select(svc, *port, req).as_deref(), *want, "{name}");
        }
        let other_gw = t
            .select(
                &ObjectRef::new("shop", "other"),
                &web,
                80,
                &host("web.shop"),
            )
            .expect("no error");
        assert_eq!(other_gw, None, "another waypoint");
        assert_eq!(
            RouteTable::new(&[]).select(&gw(), &db(), 80, &host("db")),
            Ok(None)
        );
    }

    #[test]
    fn timeouts_and_retries_are_carried() {
        for (input, want) in [
            ("10s", Duration::from_secs(10)),
            ("500ms", Duration::from_millis(500)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(input), Ok(want), "{input}");
        }
        for bad in [
            "",
            "10",
            "1.5s",
            "123456s",
            "1h1h1h1h1h",
            "10 s",
            "-1s",
            "1d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        let t = table(
            "- name: r\n  namespace: shop\n  parentRefs: [{kind: Service, group: '', name: db}]\n  rules:\n  - matches: [{path: {value: /slow}}]\n    backendRefs: [{name: v1}]\n    timeouts: {request: 10s, backendRequest: 2s}\n    retry: {attempts: 5, codes: [502, 503], backoff: 100ms}\n  - backendRefs: [{name: v1, port: 9090}]\n    timeouts: {request: 0s}\n",
        );
        let slow = t
            .select(&gw(), &db(), 8080, &get("/slow"))
            .expect("ok")
            .expect("routed");
        assert_eq!(slow.timeout, Some(Duration::from_secs(10)));
        assert_eq!(slow.try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(slow.retries, 5);
        assert_eq!(slow.retry_codes, vec![502, 503]);
        assert_eq!(slow.retry_backoff, Some(Duration::from_millis(100)));
        assert_eq!(
            (slow.port, slow.rule, slow.route.as_str()),
            (None, 0, "shop/r")
        );
        let plain = t
            .select(&gw(), &db(), 8080, &get("/"))
            .expect("ok")
            .expect("routed");
        assert_eq!(plain.timeout, None, "0s disables");
        assert_eq!(plain.retries, DEFAULT_RETRIES);
        assert_eq!(plain.retry_codes, DEFAULT_RETRY_CODES);
        assert_eq!(plain.port, Some(9090));
    }

    #[test]
    fn invalid_routes_are_refused_naming_object_field_and_reason() {
        let head =
            "- name: r\n  namespace: shop\n  parentRefs: [{kind: Service, group: '', name: db}]\n";
        #[rustfmt::skip]
        let cases: &[(&str, String, &str)] = &[
            ("path without /", format!("{head}  rules: [{{matches: [{{path: {{value: foo}}}}]}}]\n"), "rules[0].matches[0].path.value"),
            ("bad regex", format!("{head}  rules: [{{matches: [{{path: {{type: RegularExpression, value: '(a'}}}}]}}]\n"), "not a valid regular expression"),
            ("bad header regex", format!("{head}  rules: [{{matches: [{{headers: [{{type: RegularExpression, name: x, value: '['}}]}}]}}]\n"), "rules[0].matches[0].headers[0].value"),
            ("regex too big", format!("{head}  rules: [{{matches: [{{path: {{type: RegularExpression, value: '/(?:\\w{{100}}){{100}}'}}}}]}}]\n"), "size limit"),
            ("bad header name", format!("{head}  rules: [{{matches: [{{headers: [{{name: 'a b', value: x}}]}}]}}]\n"), "rules[0].matches[0].headers[0].name"),
            ("bad method", format!("{head}  rules: [{{matches: [{{method: get}}]}}]\n"), "rules[0].matches[0].method"),
            ("bad timeout", format!("{head}  rules: [{{timeouts: {{request: 10}}}}]\n"), "rules[0].timeouts.request"),
            ("try longer than request", format!("{head}  rules: [{{timeouts: {{request: 1s, backendRequest: 2s}}}}]\n"), "rules[0].timeouts.backendRequest"),
            ("bad retry code", format!("{head}  rules: [{{retry: {{codes: [200]}}}}]\n"), "rules[0].retry.codes[0]"),
            ("backend kind", format!("{head}  rules: [{{backendRefs: [{{name: a}}, {{kind: ServiceImport, name: b}}]}}]\n"), "rules[0].backendRefs[1].kind"),
            ("backend elsewhere", format!("{head}  rules: [{{backendRefs: [{{name: a, namespace: web}}]}}]\n"), "ReferenceGrant"),
            ("backend port 0", format!("{head}  rules: [{{backendRefs: [{{name: a, port: 0}}]}}]\n"), "rules[0].backendRefs[0].port"),
            ("no parents", "- name: r\n  namespace: shop\n".to_owned(), "parentRefs: missing"),
            ("consumer route", "- name: r\n  namespace: shop\n  parentRefs: [{kind: Service, group: '', name: db, namespace: web}]\n".to_owned(), "parentRefs[0].namespace"),
            ("service in wrong group", "- name: r\n  namespace: shop\n  parentRefs: [{kind: Service, name: db}]\n".to_owned(), "parentRefs[0].group"),
            ("other parent kind", "- name: r\n  namespace: shop\n  parentRefs: [{kind: ServiceImport, group: '', name: db}]\n".to_owned(), "parentRefs[0].kind"),
            ("bad hostname", format!("{head}  hostnames: ['db:80']\n"), "hostnames[0]"),
            ("wildcard inside", format!("{head}  hostnames: ['a.*.com']\n"), "hostnames[0]"),
            ("duplicate", format!("{head}{head}"), "httpRoutes[1] (shop/r): duplicate route"),
        ];
        for (name, yaml, want) in cases {
            let routes: Vec<HttpRoute> = serde_norway::from_str(yaml).expect(name);
            let err = validate_all(&routes).expect_err(name);
            assert!(err.contains("httpRoutes["), "{name}: {err}");
            assert!(err.contains(want), "{name}: {err}");
        }
        for (field, yaml) in [
            ("filters", format!("{head}  rules: [{{filters: []}}]\n")),
            (
                "sectionName",
                "- name: r\n  namespace: shop\n  parentRefs: [{name: w, sectionName: mesh}]\n"
                    .to_owned(),
            ),
            (
                "type",
                format!("{head}  rules: [{{matches: [{{path: {{type: Prefix, value: /}}}}]}}]\n"),
            ),
        ] {
            let err = serde_norway::from_str::<Vec<HttpRoute>>(&yaml).expect_err(field);
            assert!(
                err.to_string().contains(field) || err.to_string().contains("Prefix"),
                "{field}: {err}"
            );
        }
    }

    /// The module documentation's example parses, validates and routes as it says.
    #[test]
    fn the_documented_example_parses_and_routes() {
        let doc = include_str!("route.rs");
        let yaml: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! httpRoutes:"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| {
                format!(
                    "{}\n",
                    l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
                )
            })
            .collect();
        let routes: Vec<HttpRoute> = serde_norway::from_str(&yaml).expect("doc example");
        assert_eq!(routes[0].rules[0].backend_refs.len(), 2);
        // The admin port dumps what it read; it reads back the same.
        let dumped = serde_norway::to_string(&routes).expect("dump");
        let again: Vec<HttpRoute> = serde_norway::from_str(&dumped).expect("read the dump");
        assert_eq!(again, routes);
        let t = table(&yaml);
        let req = request(
            "GET",
            "/orders/7?v=12",
            &[("host", "db.shop.svc.cluster.local"), ("x-canary", "yes")],
        );
        let picks: Vec<String> = (0..10).map(|_| pick(&t, &req)).collect();
        assert_eq!(picks.iter().filter(|p| *p == "db-v1").count(), 9);
        let miss = request("GET", "/users", &[("host", "db.shop.svc.cluster.local")]);
        let err = t.select(&gw(), &db(), 8080, &miss).expect_err("no rule");
        assert_eq!(err.status, http::StatusCode::NOT_FOUND);
    }
}
