//! L4 authorization with Istio's semantics: [`Authorization`] policies (ALLOW or DENY on the
//! peer's identity and namespace, source and destination addresses, destination port), checked
//! for each inbound connection by [`evaluate`], and [`PeerAuthentication`] (does a workload take
//! plaintext?), answered by [`requires_mtls`]. Both come from the `policies:` list of the local
//! workload file, and the admin port dumps them back in the same shape.
//!
//! # Shape
//!
//! ```yaml
//! policies:
//! - name: allow-frontend
//!   namespace: shop
//!   scope: WORKLOAD_SELECTOR          # GLOBAL | NAMESPACE | WORKLOAD_SELECTOR
//!   selector: {app: backend}          # only with WORKLOAD_SELECTOR
//!   action: ALLOW                     # ALLOW | DENY
//!   rules:                            # OR: the policy matches if any rule does
//!   - from:                           # AND: every clause of a rule (from, to, each when)
//!     - principals: [cluster.local/ns/shop/sa/frontend]   # OR: any entry of a clause
//!     - namespaces: [monitoring]
//!     to:
//!     - destinationPorts: [8080]
//!     when:
//!     - notSourceIps: [10.9.0.0/16]
//! ```
//!
//! Within one entry (a [`Match`]) every field given must hold (AND); a list field holds when any
//! of its values matches, a `not…` field when none does. Strings follow AuthorizationPolicy:
//! `exact`, `prefix*`, `*suffix`, `*` (present). Addresses are CIDRs or bare addresses.
//!
//! Mapping onto ztunnel's xDS `istio.security.Authorization`: `rules` are its `groups`; a rule's
//! `from`, `to` and each `when` entry are the group's `rules` (clauses); the entries of `from` and
//! `to` are a clause's `matches`, and a `when` entry is a clause of one match. That is exactly how
//! istiod fills them from an AuthorizationPolicy (istio/istio
//! `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`, `handleRule`):
//! `from[].source` → `from`, `to[].operation.ports` → `to`, each L4 `when` condition → `when`.
//! Any field may appear in any clause; the names only say where Istio puts them. L7 fields
//! (methods, paths, hosts, requestPrincipals, …) are refused: they need a waypoint.
//!
//! # Semantics, and where they come from
//!
//! - Applicable policies (istio/ztunnel `src/state.rs` `assert_rbac`, `src/state/policy.rs`;
//!   istiod `ambient/workloads.go` `buildWorkloadPolicies`): GLOBAL ones in the root namespace,
//!   NAMESPACE ones in the destination's namespace, and WORKLOAD_SELECTOR ones in the
//!   destination's namespace *or the root namespace* whose labels are a subset of the
//!   destination's. istiod only emits GLOBAL for root-namespace policies without a selector, so a
//!   GLOBAL policy elsewhere applies nowhere here ([`validate_all`] refuses it).
//! - Any matching DENY denies; otherwise no applicable ALLOW allows; otherwise one ALLOW must
//!   match (istio.io `reference/config/security/authorization-policy`, quoted in `assert_rbac`).
//! - Matching (ztunnel `src/rbac.rs`): no rules never matches (an ALLOW without rules denies
//!   everything, a DENY without rules does nothing, which Istio's validation refuses); a rule
//!   without clauses and a clause without entries match everything; an entry without fields never
//!   matches (istio/istio#61126).
//! - Principals are `<trust-domain>/ns/<ns>/sa/<sa>`, compared with the peer's SPIFFE identity
//!   minus `spiffe://` (ztunnel `StringMatch::matches_principal`; istiod strips the prefix too).
//!   Namespaces are compared with the identity's namespace. A plaintext peer has neither: it
//!   never matches `principals`/`namespaces` and always matches `notPrincipals`/`notNamespaces`,
//!   so `notPrincipals: ["*"]` selects plaintext, which is how istiod expresses STRICT mTLS.
//! - PeerAuthentication (istiod `ambient/authorization.go` `convertedSelectorPeerAuthentications`):
//!   a workload policy (selector, in the workload's namespace) beats the namespace policy (no
//!   selector), which beats the mesh policy (no selector, root namespace); UNSET inherits;
//!   selector policies in the root namespace are ignored. DISABLE is not supported in ambient
//!   (istio.io `reference/config/security/peer_authentication`) and counts as PERMISSIVE.
//!   Istio breaks ties by age; we take the first one listed. Port-level mTLS is not modelled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{AddrParseError, IpAddr, SocketAddr};
use std::num::ParseIntError;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tracing::trace;

use crate::identity::Identity;

/// Istio's default root namespace; policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

const SPIFFE_PREFIX: &str = "spiffe://";

/// Errors of the policy module: parsing addresses and checking policies.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid cidr {input:?}: the address does not parse (expected e.g. 10.0.0.0/8, fd00::/8 or 10.0.0.1)"
    )]
    CidrAddress {
        input: String,
        #[source]
        source: AddrParseError,
    },

    #[error("invalid cidr {input:?}: the prefix length does not parse")]
    CidrPrefix {
        input: String,
        #[source]
        source: ParseIntError,
    },

    #[error(
        "invalid cidr {input:?}: prefix length {prefix} is longer than the address ({max} bits)"
    )]
    CidrPrefixTooLong { input: String, prefix: u8, max: u8 },

    #[error("invalid authorization policy {policy}: {field}: {reason}")]
    InvalidAuthorization {
        policy: String,
        field: String,
        reason: String,
    },

    #[error("invalid peer authentication {policy}: {field}: {reason}")]
    InvalidPeerAuthentication {
        policy: String,
        field: String,
        reason: String,
    },
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Every workload in the mesh; only honoured in the root namespace.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads carrying all of `selector`'s labels, in the policy's namespace (or in every
    /// namespace, for a policy in the root namespace).
    WorkloadSelector,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Global => "GLOBAL",
            Scope::Namespace => "NAMESPACE",
            Scope::WorkloadSelector => "WORKLOAD_SELECTOR",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// An L4 authorization policy; see the module documentation for its shape and meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    /// Labels a workload must all carry; only with [`Scope::WorkloadSelector`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    /// OR'd; none at all matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One rule: its clauses are AND'ed, the entries of a clause OR'ed. A missing clause does not
/// constrain; a rule with none matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// A clause, by convention on the source (Istio's `from[].source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Match>>,
    /// A clause, by convention on the destination (Istio's `to[].operation.ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Match>>,
    /// Further clauses of one entry each (Istio's `when` conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Match>>,
}

/// Conditions on one connection; every non-empty field must hold. Istio's `istio.security.Match`
/// without its `serviceAccounts` fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// A string pattern written as in AuthorizationPolicy: `exact`, `prefix*`, `*suffix`, or `*`
/// for "present" (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl From<&str> for StringMatch {
    /// istiod's `stringToMatch`: `*` first, then a leading `*`, then a trailing one.
    fn from(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(pattern.to_owned())
        }
    }
}

impl From<String> for StringMatch {
    fn from(pattern: String) -> Self {
        StringMatch::from(pattern.as_str())
    }
}

impl From<StringMatch> for String {
    fn from(pattern: StringMatch) -> Self {
        pattern.to_string()
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(exact) => f.write_str(exact),
            StringMatch::Prefix(prefix) => write!(f, "{prefix}*"),
            StringMatch::Suffix(suffix) => write!(f, "*{suffix}"),
            StringMatch::Presence => f.write_str("*"),
        }
    }
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128). Host bits
/// after the prefix are ignored, as Istio's validation accepts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, Error> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(Error::CidrPrefixTooLong {
                input: format!("{addr}/{prefix}"),
                prefix,
                max,
            });
        }
        Ok(Self { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the block. An IPv4 peer seen on a dual-stack socket as
    /// `::ffff:a.b.c.d` is an IPv4 peer, and a block written as `::ffff:a.b.c.d/N` (N ≥ 96) is
    /// an IPv4 block; otherwise families never mix (`::/0` holds no IPv4 peer), as in ztunnel,
    /// which canonicalises addresses before matching.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, prefix) = match self.addr {
            IpAddr::V6(v6) if self.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), self.prefix - 96),
                None => (self.addr, self.prefix),
            },
            _ => (self.addr, self.prefix),
        };
        match (net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                // A shift by the full width (prefix 0) overflows: that mask is empty.
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl FromStr for IpNet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|source| Error::CidrAddress {
            input: s.to_owned(),
            source,
        })?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix.parse().map_err(|source| Error::CidrPrefix {
                input: s.to_owned(),
                source,
            })?,
        };
        if prefix > max {
            return Err(Error::CidrPrefixTooLong {
                input: s.to_owned(),
                prefix,
                max,
            });
        }
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for IpNet {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IpNet> for String {
    fn from(net: IpNet) -> Self {
        net.to_string()
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The connection being authorized, as the destination's ztunnel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub src_ip: IpAddr,
    /// The peer's full SPIFFE URI (`spiffe://td/ns/a/sa/b`); `None` for plaintext.
    pub src_identity: Option<String>,
    pub dst: SocketAddr,
}

/// The verdict on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `ns/name` of the DENY policy that matched, or of every applicable ALLOW policy
        /// (comma-separated) when none of them matched.
        policy: String,
        /// Index into the DENY policy's `rules`; `None` when no ALLOW policy matched.
        rule: Option<usize>,
        reason: String,
    },
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allow"),
            Decision::Deny { reason, .. } => write!(f, "deny: {reason}"),
        }
    }
}

/// What the peer is, worked out once per connection rather than once per match.
struct Peer<'a> {
    /// The identity without `spiffe://`, the form principals are written in.
    principal: Option<&'a str>,
    namespace: Option<String>,
}

impl<'a> Peer<'a> {
    fn of(conn: &'a Connection) -> Self {
        let identity = conn.src_identity.as_deref();
        Peer {
            // ztunnel fails a principal match when the prefix is missing, so do we.
            principal: identity.and_then(|id| id.strip_prefix(SPIFFE_PREFIX)),
            namespace: identity
                .and_then(|id| id.parse::<Identity>().ok())
                .map(|id| id.namespace),
        }
    }
}

/// A field with its `not…` twin: the positive list, when given, must hit; the negative one must
/// not.
fn field_matches<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

impl Match {
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    fn matches(&self, peer: &Peer<'_>, conn: &Connection) -> bool {
        // ztunnel skips entries without fields instead of treating them as "anything".
        if self.is_empty() {
            return false;
        }
        let namespace = peer.namespace.as_deref();
        field_matches(&self.namespaces, &self.not_namespaces, |m| {
            namespace.is_some_and(|ns| m.matches(ns))
        }) && field_matches(&self.principals, &self.not_principals, |m| {
            peer.principal.is_some_and(|p| m.matches(p))
        }) && field_matches(&self.source_ips, &self.not_source_ips, |net| {
            net.contains(conn.src_ip)
        }) && field_matches(&self.destination_ips, &self.not_destination_ips, |net| {
            net.contains(conn.dst.ip())
        }) && field_matches(
            &self.destination_ports,
            &self.not_destination_ports,
            |port| *port == conn.dst.port(),
        )
    }

    fn validate(&self, at: &str) -> Result<(), Problem> {
        if self.is_empty() {
            return Err(Problem::new(
                at,
                "an entry without fields never matches (as in ztunnel); give it a field or remove it",
            ));
        }
        let strings = [
            ("namespaces", &self.namespaces, false),
            ("notNamespaces", &self.not_namespaces, false),
            ("principals", &self.principals, true),
            ("notPrincipals", &self.not_principals, true),
        ];
        for (name, patterns, principal) in strings {
            for (i, pattern) in patterns.iter().enumerate() {
                let text = pattern.to_string();
                if text.is_empty() {
                    return Err(Problem::new(
                        format!("{at}.{name}[{i}]"),
                        "must not be empty; use \"*\" for any value",
                    ));
                }
                if principal && text.starts_with(SPIFFE_PREFIX) {
                    let fixed = text.trim_start_matches(SPIFFE_PREFIX);
                    return Err(Problem::new(
                        format!("{at}.{name}[{i}]"),
                        format!(
                            "{text:?} never matches: principals are written without spiffe:// \
                             (use {fixed:?})"
                        ),
                    ));
                }
            }
        }
        let ports = [
            ("destinationPorts", &self.destination_ports),
            ("notDestinationPorts", &self.not_destination_ports),
        ];
        for (name, ports) in ports {
            if let Some(i) = ports.iter().position(|port| *port == 0) {
                return Err(Problem::new(
                    format!("{at}.{name}[{i}]"),
                    "port 0 never matches a connection",
                ));
            }
        }
        Ok(())
    }
}

impl Rule {
    /// The clauses, all of which must hold: `from`, `to`, then each `when` entry on its own.
    fn clauses(&self) -> impl Iterator<Item = &[Match]> {
        self.from
            .as_deref()
            .into_iter()
            .chain(self.to.as_deref())
            .chain(self.when.iter().flatten().map(std::slice::from_ref))
    }

    fn matches(&self, peer: &Peer<'_>, conn: &Connection) -> bool {
        // A clause without entries matches, as in ztunnel; validation keeps them out of files.
        self.clauses()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(peer, conn)))
    }

    fn validate(&self, at: &str) -> Result<(), Problem> {
        let clauses = [("from", &self.from), ("to", &self.to), ("when", &self.when)];
        for (name, clause) in clauses {
            let Some(entries) = clause else { continue };
            if entries.is_empty() {
                // Istio refuses this too: it reads like "from nobody" but constrains nothing.
                return Err(Problem::new(
                    format!("{at}.{name}"),
                    "an empty list would match every connection; remove the field instead",
                ));
            }
            for (i, entry) in entries.iter().enumerate() {
                entry.validate(&format!("{at}.{name}[{i}]"))?;
            }
        }
        Ok(())
    }
}

/// A field path and what is wrong there, before the policy's name is attached.
struct Problem {
    field: String,
    reason: String,
}

impl Problem {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn validate_selector(selector: &BTreeMap<String, String>) -> Result<(), Problem> {
    if selector.keys().any(String::is_empty) {
        return Err(Problem::new("selector", "a label name must not be empty"));
    }
    Ok(())
}

/// Whether every label of the selector is on the workload (Kubernetes `matchLabels`).
pub(crate) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

impl Authorization {
    /// `namespace/name`, the policy's name in logs and decisions.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy applies to a destination workload.
    pub fn applies_to(
        &self,
        root_namespace: &str,
        dest_namespace: &str,
        dest_labels: &BTreeMap<String, String>,
    ) -> bool {
        match self.scope {
            Scope::Global => self.namespace == root_namespace,
            Scope::Namespace => self.namespace == dest_namespace,
            Scope::WorkloadSelector => {
                (self.namespace == dest_namespace || self.namespace == root_namespace)
                    && selects(&self.selector, dest_labels)
            }
        }
    }

    /// The index of the first rule the connection matches, if any.
    pub fn matches(&self, conn: &Connection) -> Option<usize> {
        self.matching_rule(&Peer::of(conn), conn)
    }

    fn matching_rule(&self, peer: &Peer<'_>, conn: &Connection) -> Option<usize> {
        self.rules.iter().position(|rule| rule.matches(peer, conn))
    }

    /// Checks what serde cannot: names, scope against selector, and rules that could never
    /// mean what they seem to.
    pub fn validate(&self) -> Result<(), Error> {
        self.check().map_err(|problem| Error::InvalidAuthorization {
            policy: self.key(),
            field: problem.field,
            reason: problem.reason,
        })
    }

    fn check(&self) -> Result<(), Problem> {
        if self.name.is_empty() {
            return Err(Problem::new("name", "must not be empty"));
        }
        if self.namespace.is_empty() {
            return Err(Problem::new("namespace", "must not be empty"));
        }
        match (self.scope, self.selector.is_empty()) {
            (Scope::WorkloadSelector, true) => {
                return Err(Problem::new(
                    "selector",
                    "scope WORKLOAD_SELECTOR needs at least one label; use scope NAMESPACE to \
                     cover the whole namespace",
                ));
            }
            (Scope::Global | Scope::Namespace, false) => {
                return Err(Problem::new(
                    "selector",
                    format!(
                        "only used with scope WORKLOAD_SELECTOR, but the scope is {}",
                        self.scope
                    ),
                ));
            }
            _ => {}
        }
        validate_selector(&self.selector)?;
        if self.action == Action::Deny && self.rules.is_empty() {
            return Err(Problem::new(
                "rules",
                "a DENY policy without rules never matches; add an empty rule `{}` to deny \
                 every connection",
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(&format!("rules[{i}]"))?;
        }
        Ok(())
    }
}

/// The verdict on `conn` to a workload in `dest_namespace` with `dest_labels`, checking every
/// policy. The store decides through an [`Index`] instead, which finds the same policies.
pub fn evaluate(
    policies: &[Authorization],
    root_namespace: &str,
    dest_namespace: &str,
    dest_labels: &BTreeMap<String, String>,
    conn: &Connection,
) -> Decision {
    decide(
        policies
            .iter()
            .filter(|p| p.applies_to(root_namespace, dest_namespace, dest_labels)),
        conn,
    )
}

/// The authorization policies that may apply to a destination, found from its namespace and
/// labels rather than by checking every policy: the GLOBAL ones, its namespace's NAMESPACE
/// ones, and the WORKLOAD_SELECTOR ones of its namespace and of the root namespace, each filed
/// under one label of its selector (`key=value`, the first key), which a workload must carry
/// to be selected. Built with the store, once per config version; a lookup costs the
/// destination's label count plus the policies found, however many policies there are
/// (istio/ztunnel keeps policies by namespace and has istiod name each workload's selector
/// policies, which is what the labels filed here are in Istio mode).
#[derive(Debug, Clone, Default)]
pub struct Index {
    root_namespace: String,
    /// GLOBAL policies of the root namespace (elsewhere GLOBAL applies nowhere).
    global: Vec<usize>,
    /// NAMESPACE policies by namespace.
    namespace: HashMap<String, Vec<usize>>,
    /// WORKLOAD_SELECTOR policies by namespace, then label key, then label value.
    selector: HashMap<String, HashMap<String, HashMap<String, Vec<usize>>>>,
    /// WORKLOAD_SELECTOR policies without a selector, by namespace: they select every
    /// workload, as [`Authorization::applies_to`] reads them (validation refuses them).
    select_all: HashMap<String, Vec<usize>>,
}

impl Index {
    /// Indexes `policies` by position: lookups take the same slice.
    pub fn new(policies: &[Authorization], root_namespace: &str) -> Self {
        let mut index = Index {
            root_namespace: root_namespace.to_owned(),
            ..Index::default()
        };
        for (i, p) in policies.iter().enumerate() {
            match p.scope {
                Scope::Global => {
                    if p.namespace == root_namespace {
                        index.global.push(i);
                    }
                }
                Scope::Namespace => index
                    .namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(i),
                Scope::WorkloadSelector => match p.selector.iter().next() {
                    None => index
                        .select_all
                        .entry(p.namespace.clone())
                        .or_default()
                        .push(i),
                    Some((key, value)) => index
                        .selector
                        .entry(p.namespace.clone())
                        .or_default()
                        .entry(key.clone())
                        .or_default()
                        .entry(value.clone())
                        .or_default()
                        .push(i),
                },
            }
        }
        index
    }

    /// The policies of `policies` (the slice the index was built from) that apply to a
    /// destination, in their order in the slice, as [`evaluate`] finds them.
    pub fn applicable<'p>(
        &self,
        policies: &'p [Authorization],
        dest_namespace: &str,
        dest_labels: &BTreeMap<String, String>,
    ) -> Vec<&'p Authorization> {
        let root = self.root_namespace.as_str();
        let mut found: Vec<usize> = self.global.clone();
        let namespaces: &[&str] = if dest_namespace == root {
            &[root]
        } else {
            &[dest_namespace, root]
        };
        if let Some(ids) = self.namespace.get(dest_namespace) {
            found.extend(ids);
        }
        for ns in namespaces {
            if let Some(ids) = self.select_all.get(*ns) {
                found.extend(ids);
            }
            let Some(by_key) = self.selector.get(*ns) else {
                continue;
            };
            for (key, value) in dest_labels {
                if let Some(ids) = by_key.get(key).and_then(|by_value| by_value.get(value)) {
                    found.extend(ids);
                }
            }
        }
        // Each policy is filed once, so there are no duplicates; the order is the slice's,
        // which decides which DENY is reported and how ALLOW policies are listed.
        found.sort_unstable();
        found
            .into_iter()
            .filter_map(|i| policies.get(i))
            .filter(|p| p.applies_to(root, dest_namespace, dest_labels))
            .collect()
    }

    /// [`evaluate`] over the policies the index finds.
    pub fn evaluate(
        &self,
        policies: &[Authorization],
        dest_namespace: &str,
        dest_labels: &BTreeMap<String, String>,
        conn: &Connection,
    ) -> Decision {
        decide(self.applicable(policies, dest_namespace, dest_labels), conn)
    }
}

/// The verdict from the policies that apply, in their configured order.
fn decide<'p>(
    applicable: impl IntoIterator<Item = &'p Authorization>,
    conn: &Connection,
) -> Decision {
    let peer = Peer::of(conn);
    let (allow, deny): (Vec<&Authorization>, Vec<&Authorization>) = applicable
        .into_iter()
        .partition(|p| p.action == Action::Allow);

    for policy in deny {
        if let Some(rule) = policy.matching_rule(&peer, conn) {
            let key = policy.key();
            trace!(policy = %key, rule, "deny policy matched");
            return Decision::Deny {
                reason: format!("rule {rule} of DENY policy {key} matched"),
                policy: key,
                rule: Some(rule),
            };
        }
    }
    if allow.is_empty() {
        trace!("no allow policy applies");
        return Decision::Allow;
    }
    if let Some(policy) = allow
        .iter()
        .find(|p| p.matching_rule(&peer, conn).is_some())
    {
        trace!(policy = %policy.key(), "allow policy matched");
        return Decision::Allow;
    }
    let keys = allow.iter().map(|p| p.key()).collect::<Vec<_>>().join(", ");
    Decision::Deny {
        reason: format!("no ALLOW policy matched (applicable: {keys})"),
        policy: keys,
        rule: None,
    }
}

/// Checks a whole policy list: each policy and peer authentication on its own, then what only
/// the list shows — duplicate names, GLOBAL policies outside the root namespace (istiod never
/// makes those, and they apply nowhere), and selector peer authentications in the root
/// namespace (Istio ignores those).
pub fn validate_all(
    policies: &[Authorization],
    peer_auths: &[PeerAuthentication],
    root_namespace: &str,
) -> Result<(), Error> {
    let mut seen = BTreeSet::new();
    for policy in policies {
        policy.validate()?;
        let invalid = |field: &str, reason: String| Error::InvalidAuthorization {
            policy: policy.key(),
            field: field.to_owned(),
            reason,
        };
        if !seen.insert(policy.key()) {
            return Err(invalid(
                "name",
                "another authorization policy in the namespace has this name".to_owned(),
            ));
        }
        if policy.scope == Scope::Global && policy.namespace != root_namespace {
            return Err(invalid(
                "scope",
                format!(
                    "GLOBAL only applies in the root namespace {root_namespace}; move the policy \
                     there or use scope NAMESPACE"
                ),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for peer_auth in peer_auths {
        peer_auth.validate()?;
        let invalid = |field: &str, reason: String| Error::InvalidPeerAuthentication {
            policy: peer_auth.key(),
            field: field.to_owned(),
            reason,
        };
        if !seen.insert(peer_auth.key()) {
            return Err(invalid(
                "name",
                "another peer authentication in the namespace has this name".to_owned(),
            ));
        }
        if peer_auth.namespace == root_namespace && !peer_auth.selector.is_empty() {
            return Err(invalid(
                "selector",
                format!(
                    "Istio ignores selectors in the root namespace {root_namespace}; move the \
                     policy to the workload's namespace"
                ),
            ));
        }
    }
    Ok(())
}

/// Istio's PeerAuthentication mTLS mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the wider policy; at mesh level, PERMISSIVE.
    #[default]
    Unset,
    /// Not supported in ambient (HBONE is always mTLS): behaves as PERMISSIVE.
    Disable,
    /// Plaintext and mTLS peers are both accepted.
    Permissive,
    /// Only mTLS peers are accepted.
    Strict,
}

/// Whether a workload accepts plaintext peers. Without a selector it covers its namespace, or
/// the mesh when in the root namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub mode: MtlsMode,
}

impl PeerAuthentication {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let check = || {
            if self.name.is_empty() {
                return Err(Problem::new("name", "must not be empty"));
            }
            if self.namespace.is_empty() {
                return Err(Problem::new("namespace", "must not be empty"));
            }
            validate_selector(&self.selector)
        };
        check().map_err(|problem| Error::InvalidPeerAuthentication {
            policy: self.key(),
            field: problem.field,
            reason: problem.reason,
        })
    }
}

/// Whether the workload must only accept mTLS peers: the effective mode, after precedence and
/// inheritance, is STRICT. Checks every peer authentication; the store asks an [`MtlsIndex`],
/// which finds the same ones.
pub fn requires_mtls(
    peer_auths: &[PeerAuthentication],
    root_namespace: &str,
    workload_namespace: &str,
    workload_labels: &BTreeMap<String, String>,
) -> bool {
    // Istio keeps the oldest policy of each level; we have no ages, so the first listed wins.
    let mesh = peer_auths
        .iter()
        .find(|p| p.namespace == root_namespace && p.selector.is_empty());
    let namespace = peer_auths.iter().find(|p| {
        p.namespace == workload_namespace && p.namespace != root_namespace && p.selector.is_empty()
    });
    let workload = peer_auths.iter().find(|p| {
        p.namespace == workload_namespace
            && p.namespace != root_namespace
            && !p.selector.is_empty()
            && selects(&p.selector, workload_labels)
    });
    strict([mesh, namespace, workload])
}

/// The peer authentications of each level by namespace, so that [`requires_mtls`]'s answer
/// costs the destination namespace's selector policies, not every peer authentication.
#[derive(Debug, Clone, Default)]
pub struct MtlsIndex {
    /// The first mesh policy (root namespace, no selector).
    mesh: Option<usize>,
    /// The first namespace policy (no selector) of each namespace but the root.
    namespace: HashMap<String, usize>,
    /// Selector policies of each namespace but the root, in order.
    workload: HashMap<String, Vec<usize>>,
}

impl MtlsIndex {
    /// Indexes `peer_auths` by position: lookups take the same slice.
    pub fn new(peer_auths: &[PeerAuthentication], root_namespace: &str) -> Self {
        let mut index = MtlsIndex::default();
        for (i, p) in peer_auths.iter().enumerate() {
            match (p.namespace == root_namespace, p.selector.is_empty()) {
                (true, true) => {
                    index.mesh.get_or_insert(i);
                }
                // Istio ignores selector policies in the root namespace.
                (true, false) => {}
                (false, true) => {
                    index.namespace.entry(p.namespace.clone()).or_insert(i);
                }
                (false, false) => index
                    .workload
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(i),
            }
        }
        index
    }

    /// [`requires_mtls`] for a workload, over `peer_auths` (the slice the index was built
    /// from).
    pub fn requires_mtls(
        &self,
        peer_auths: &[PeerAuthentication],
        workload_namespace: &str,
        workload_labels: &BTreeMap<String, String>,
    ) -> bool {
        let mesh = self.mesh.and_then(|i| peer_auths.get(i));
        let namespace = self
            .namespace
            .get(workload_namespace)
            .and_then(|i| peer_auths.get(*i));
        let workload = self.workload.get(workload_namespace).and_then(|ids| {
            ids.iter()
                .filter_map(|i| peer_auths.get(*i))
                .find(|p| selects(&p.selector, workload_labels))
        });
        strict([mesh, namespace, workload])
    }
}

/// The effective mode of the mesh, namespace and workload levels (widest first) is STRICT.
fn strict(levels: [Option<&PeerAuthentication>; 3]) -> bool {
    let mut strict = false;
    for level in levels.into_iter().flatten() {
        match level.mode {
            MtlsMode::Unset => {}
            MtlsMode::Strict => strict = true,
            MtlsMode::Permissive | MtlsMode::Disable => strict = false,
        }
    }
    strict
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const ROOT: &str = "istio-system";

    fn conn(src: &str, identity: Option<&str>, dst: &str) -> Connection {
        Connection {
            src_ip: src.parse().expect("source address"),
            src_identity: identity.map(str::to_owned),
            dst: dst.parse().expect("destination address"),
        }
    }

    fn plaintext() -> Connection {
        conn("10.0.0.1", None, "10.0.1.2:8080")
    }

    fn tls() -> Connection {
        conn(
            "10.0.0.1",
            Some("spiffe://td/ns/namespace/sa/account"),
            "10.0.1.2:8080",
        )
    }

    fn tls_alt() -> Connection {
        conn(
            "10.0.0.3",
            Some("spiffe://td-alt/ns/ns-alt/sa/sa-alt"),
            "10.0.1.4:9090",
        )
    }

    fn from_ns(namespace: &str, dst: &str) -> Connection {
        conn(
            "10.0.0.1",
            Some(&format!("spiffe://td/ns/{namespace}/sa/account")),
            dst,
        )
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn policies(yaml: &str) -> Vec<Authorization> {
        serde_norway::from_str(yaml).expect("valid policies")
    }

    fn policy(yaml: &str) -> Authorization {
        serde_norway::from_str(yaml).expect("valid policy")
    }

    /// An ALLOW policy whose only rule has one `from` entry.
    fn with_match(entry: &str) -> Authorization {
        policy(&format!(
            "{{name: p, namespace: shop, scope: NAMESPACE, action: ALLOW, rules: [{{from: [{entry}]}}]}}"
        ))
    }

    #[test]
    fn string_patterns_follow_authorization_policy() {
        let cases = [
            ("abc", StringMatch::Exact("abc".into())),
            ("abc*", StringMatch::Prefix("abc".into())),
            ("*abc", StringMatch::Suffix("abc".into())),
            ("*", StringMatch::Presence),
            // istiod checks for a leading `*` before a trailing one.
            ("*abc*", StringMatch::Suffix("abc*".into())),
        ];
        for (text, expected) in cases {
            let parsed = StringMatch::from(text);
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string(), text, "{text} round trip");
        }
    }

    #[test]
    fn string_matches() {
        let cases = [
            ("foo", "foo", true),
            ("foo", "foobar", false),
            ("foo", "", false),
            ("foo*", "foobar", true),
            ("foo*", "foo", true),
            ("foo*", "notfoo", false),
            ("foo*", "", false),
            ("*foo", "barfoo", true),
            ("*foo", "foonot", false),
            ("*foo", "", false),
            ("*", "x", true),
            ("*", "", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                StringMatch::from(pattern).matches(value),
                expected,
                "{pattern} against {value:?}"
            );
        }
    }

    #[test]
    fn cidrs_parse() {
        let cases: [(&str, Result<&str, &str>); 10] = [
            ("10.0.0.0/8", Ok("10.0.0.0/8")),
            ("10.0.0.1", Ok("10.0.0.1/32")),
            ("10.1.2.3/8", Ok("10.1.2.3/8")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            ("fd00::/8", Ok("fd00::/8")),
            ("fd00::1", Ok("fd00::1/128")),
            (
                "10.0.0.0/33",
                Err("prefix length 33 is longer than the address (32 bits)"),
            ),
            ("fd00::/129", Err("longer than the address (128 bits)")),
            ("10.0.0/8", Err("the address does not parse")),
            ("10.0.0.0/x", Err("the prefix length does not parse")),
        ];
        for (input, expected) in cases {
            match (input.parse::<IpNet>(), expected) {
                (Ok(net), Ok(shown)) => assert_eq!(net.to_string(), shown, "{input}"),
                (Err(err), Err(message)) => {
                    let text = err.to_string();
                    assert!(text.contains(message), "{input}: {text}");
                    assert!(text.contains(input), "{input}: {text}");
                }
                (got, _) => panic!("{input}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn cidr_contains() {
        let cases = [
            ("10.0.0.0/8", "10.255.0.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3/8", "10.9.9.9", true),
            ("10.0.0.1", "10.0.0.1", true),
            ("10.0.0.1", "10.0.0.2", false),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("0.0.0.0/0", "fd00::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            // An IPv4 peer on a dual-stack socket is still an IPv4 peer...
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("10.0.0.0/8", "::ffff:11.1.2.3", false),
            // ...and not an IPv6 one, as in ztunnel.
            ("::/0", "::ffff:10.1.2.3", false),
            ("::/0", "10.1.2.3", false),
            // A mapped block is an IPv4 block.
            ("::ffff:10.0.0.0/104", "10.1.2.3", true),
            ("::ffff:0:0/96", "192.0.2.1", true),
        ];
        for (net, ip, expected) in cases {
            let parsed: IpNet = net.parse().expect("valid cidr");
            let ip: IpAddr = ip.parse().expect("valid address");
            assert_eq!(parsed.contains(ip), expected, "{net} contains {ip}");
        }
    }

    #[test]
    fn every_field_and_its_negation() {
        // (entry, plaintext, tls, tls_alt), as ztunnel's `rbac.rs` tests.
        let cases = [
            ("{namespaces: [namespace]}", false, true, false),
            ("{notNamespaces: [namespace]}", true, false, true),
            ("{namespaces: [ns-*]}", false, false, true),
            ("{namespaces: ['*']}", false, true, true),
            ("{notNamespaces: ['*']}", true, false, false),
            (
                "{principals: [td/ns/namespace/sa/account]}",
                false,
                true,
                false,
            ),
            (
                "{notPrincipals: [td/ns/namespace/sa/account]}",
                true,
                false,
                true,
            ),
            ("{principals: [td/*]}", false, true, false),
            ("{principals: ['*/sa/sa-alt']}", false, false, true),
            ("{principals: ['*']}", false, true, true),
            ("{notPrincipals: ['*']}", true, false, false),
            ("{sourceIps: [10.0.0.1]}", true, true, false),
            ("{notSourceIps: [10.0.0.1]}", false, false, true),
            ("{sourceIps: [10.0.0.0/24]}", true, true, true),
            ("{destinationIps: [10.0.1.2]}", true, true, false),
            ("{notDestinationIps: [10.0.1.2]}", false, false, true),
            ("{destinationPorts: [8080]}", true, true, false),
            ("{notDestinationPorts: [8080]}", false, false, true),
            ("{destinationPorts: [80, 9090]}", false, false, true),
            // Fields of one entry are AND'ed; a field and its negation too.
            (
                "{principals: ['*'], destinationPorts: [8080]}",
                false,
                true,
                false,
            ),
            (
                "{sourceIps: [10.0.0.0/8], notSourceIps: [10.0.0.3]}",
                true,
                true,
                false,
            ),
        ];
        for (entry, plain, mtls, alt) in cases {
            let p = with_match(entry);
            assert_eq!(
                p.matches(&plaintext()).is_some(),
                plain,
                "{entry} plaintext"
            );
            assert_eq!(p.matches(&tls()).is_some(), mtls, "{entry} tls");
            assert_eq!(p.matches(&tls_alt()).is_some(), alt, "{entry} tls_alt");
        }
    }

    #[test]
    fn ipv6_connections() {
        let v6 = conn(
            "fd00::1",
            Some("spiffe://td/ns/namespace/sa/account"),
            "[fd00::2]:8080",
        );
        let mapped = conn("::ffff:10.0.0.1", None, "[::ffff:10.0.1.2]:8080");
        let cases = [
            ("{sourceIps: ['fd00::/64']}", &v6, true),
            ("{sourceIps: ['fd00::/64']}", &mapped, false),
            ("{notSourceIps: ['fd00::1']}", &v6, false),
            ("{destinationIps: ['fd00::2']}", &v6, true),
            ("{destinationIps: [10.0.1.0/24]}", &v6, false),
            ("{sourceIps: [10.0.0.0/24]}", &mapped, true),
            ("{notSourceIps: [10.0.0.1]}", &mapped, false),
            ("{destinationIps: [10.0.1.2]}", &mapped, true),
            (
                "{destinationPorts: [8080], namespaces: [namespace]}",
                &v6,
                true,
            ),
        ];
        for (entry, conn, expected) in cases {
            assert_eq!(
                with_match(entry).matches(conn).is_some(),
                expected,
                "{entry} against {conn:?}"
            );
        }
    }

    #[test]
    fn malformed_identity_matches_no_namespace() {
        let odd = conn("10.0.0.1", Some("spiffe://td/weird"), "10.0.1.2:8080");
        let cases = [
            ("{namespaces: ['*']}", false),
            ("{notNamespaces: [weird]}", true),
            ("{principals: [td/weird]}", true),
        ];
        for (entry, expected) in cases {
            assert_eq!(
                with_match(entry).matches(&odd).is_some(),
                expected,
                "{entry}"
            );
        }
    }

    #[test]
    fn rules_or_clauses_and_entries_or() {
        let nested = "{name: p, namespace: shop, scope: NAMESPACE, action: ALLOW, rules: [
            {from: [{namespaces: [a]}, {namespaces: [b]}], to: [{destinationPorts: [80]}],
             when: [{notSourceIps: [10.0.0.9]}]},
            {to: [{destinationPorts: [9000]}]}]}";
        let p = policy(nested);
        let cases = [
            (from_ns("a", "10.0.1.2:80"), Some(0)),
            (from_ns("b", "10.0.1.2:80"), Some(0)),
            (from_ns("bad", "10.0.1.2:80"), None),
            (from_ns("b", "10.0.1.2:81"), None),
            (from_ns("bad", "10.0.1.2:9000"), Some(1)),
            (
                conn(
                    "10.0.0.9",
                    Some("spiffe://td/ns/a/sa/account"),
                    "10.0.1.2:80",
                ),
                None,
            ),
        ];
        for (conn, expected) in cases {
            assert_eq!(p.matches(&conn), expected, "{conn:?}");
        }
    }

    #[test]
    fn empty_structures_as_ztunnel() {
        let cases = [
            // No rules: nothing matches.
            ("rules: []", None),
            // A rule without clauses matches everything.
            ("rules: [{}]", Some(0)),
            // A clause without entries matches everything (validation refuses it).
            ("rules: [{from: []}]", Some(0)),
            // An entry without fields matches nothing (validation refuses it).
            ("rules: [{from: [{}]}]", None),
            ("rules: [{from: [{}, {destinationPorts: [8080]}]}]", Some(0)),
        ];
        for (rules, expected) in cases {
            let p = policy(&format!(
                "{{name: p, namespace: shop, scope: NAMESPACE, action: ALLOW, {rules}}}"
            ));
            assert_eq!(p.matches(&plaintext()), expected, "{rules}");
        }
    }

    #[test]
    fn scopes() {
        let backend = labels(&[("app", "backend"), ("version", "v1")]);
        let cases = [
            ("{namespace: istio-system, scope: GLOBAL}", true),
            ("{namespace: shop, scope: GLOBAL}", false),
            ("{namespace: other, scope: GLOBAL}", false),
            ("{namespace: shop, scope: NAMESPACE}", true),
            ("{namespace: other, scope: NAMESPACE}", false),
            ("{namespace: istio-system, scope: NAMESPACE}", false),
            (
                "{namespace: shop, scope: WORKLOAD_SELECTOR, selector: {app: backend}}",
                true,
            ),
            (
                "{namespace: shop, scope: WORKLOAD_SELECTOR, selector: {app: backend, version: v1}}",
                true,
            ),
            (
                "{namespace: shop, scope: WORKLOAD_SELECTOR, selector: {app: frontend}}",
                false,
            ),
            (
                "{namespace: shop, scope: WORKLOAD_SELECTOR, selector: {app: backend, tier: db}}",
                false,
            ),
            (
                "{namespace: other, scope: WORKLOAD_SELECTOR, selector: {app: backend}}",
                false,
            ),
            // Root-namespace selector policies cover matching workloads everywhere.
            (
                "{namespace: istio-system, scope: WORKLOAD_SELECTOR, selector: {app: backend}}",
                true,
            ),
        ];
        for (fields, expected) in cases {
            let p = policy(&fields.replacen('{', "{name: p, action: ALLOW, ", 1));
            assert_eq!(p.applies_to(ROOT, "shop", &backend), expected, "{fields}");
            let list = [p];
            let found = Index::new(&list, ROOT).applicable(&list, "shop", &backend);
            assert_eq!(found.len(), usize::from(expected), "index: {fields}");
        }
    }

    #[test]
    fn decisions() {
        let deny_all_plaintext = "{name: strict, namespace: shop, scope: NAMESPACE, action: DENY,
            rules: [{from: [{notPrincipals: ['*']}]}]}";
        let allow_a = "{name: allow-a, namespace: shop, scope: NAMESPACE, action: ALLOW,
            rules: [{from: [{namespaces: [a]}]}]}";
        let allow_b = "{name: allow-b, namespace: shop, scope: NAMESPACE, action: ALLOW,
            rules: [{from: [{namespaces: [b]}]}]}";
        let deny_a_9000 = "{name: deny-a, namespace: shop, scope: NAMESPACE, action: DENY,
            rules: [{to: [{destinationPorts: [9000]}]}, {from: [{namespaces: [a]}]}]}";
        // `None` for allow, else the policy and rule that denied.
        type Denied = Option<(&'static str, Option<usize>)>;
        let cases: Vec<(&str, String, Connection, Denied)> =
            vec![
            ("no policies", "[]".into(), tls(), None),
            (
                "deny that does not match, no allow",
                format!("[{deny_all_plaintext}]"),
                tls(),
                None,
            ),
            (
                "deny plaintext",
                format!("[{deny_all_plaintext}]"),
                plaintext(),
                Some(("shop/strict", Some(0))),
            ),
            (
                "deny before allow",
                format!("[{allow_a}, {deny_a_9000}]"),
                from_ns("a", "10.0.1.2:80"),
                Some(("shop/deny-a", Some(1))),
            ),
            (
                "first matching deny rule is named",
                format!("[{deny_a_9000}]"),
                from_ns("a", "10.0.1.2:9000"),
                Some(("shop/deny-a", Some(0))),
            ),
            ("allow matches", format!("[{allow_a}]"), from_ns("a", "10.0.1.2:80"), None),
            (
                "allow does not match",
                format!("[{allow_a}]"),
                from_ns("c", "10.0.1.2:80"),
                Some(("shop/allow-a", None)),
            ),
            (
                "second allow matches",
                format!("[{allow_a}, {allow_b}]"),
                from_ns("b", "10.0.1.2:80"),
                None,
            ),
            (
                "no allow matches: all named",
                format!("[{allow_a}, {allow_b}]"),
                from_ns("c", "10.0.1.2:80"),
                Some(("shop/allow-a, shop/allow-b", None)),
            ),
            (
                "allow needs identity",
                format!("[{allow_a}]"),
                plaintext(),
                Some(("shop/allow-a", None)),
            ),
            (
                "allow without rules denies everything",
                "[{name: none, namespace: shop, scope: NAMESPACE, action: ALLOW}]".into(),
                tls(),
                Some(("shop/none", None)),
            ),
            (
                "deny with an empty rule denies everything",
                "[{name: all, namespace: shop, scope: NAMESPACE, action: DENY, rules: [{}]}]"
                    .into(),
                tls(),
                Some(("shop/all", Some(0))),
            ),
            (
                "deny without rules does nothing",
                "[{name: nothing, namespace: shop, scope: NAMESPACE, action: DENY}]".into(),
                tls(),
                None,
            ),
            (
                "other namespaces do not apply",
                "[{name: x, namespace: other, scope: NAMESPACE, action: ALLOW}]".into(),
                tls(),
                None,
            ),
            (
                "global in the root namespace applies",
                "[{name: mesh, namespace: istio-system, scope: GLOBAL, action: ALLOW,
                   rules: [{from: [{namespaces: [a]}]}]}]"
                    .into(),
                from_ns("c", "10.0.1.2:80"),
                Some(("istio-system/mesh", None)),
            ),
            (
                "global outside the root namespace does not",
                "[{name: mesh, namespace: other, scope: GLOBAL, action: ALLOW}]".into(),
                tls(),
                None,
            ),
            (
                "global deny plus local allow",
                format!(
                    "[{allow_a}, {{name: mesh-deny, namespace: istio-system, scope: GLOBAL,
                       action: DENY, rules: [{{to: [{{destinationPorts: [22]}}]}}]}}]"
                ),
                from_ns("a", "10.0.1.2:22"),
                Some(("istio-system/mesh-deny", Some(0))),
            ),
            (
                "selector that does not match",
                "[{name: db, namespace: shop, scope: WORKLOAD_SELECTOR, selector: {app: db},
                   action: ALLOW}]"
                    .into(),
                tls(),
                None,
            ),
            (
                "selector that matches",
                "[{name: be, namespace: shop, scope: WORKLOAD_SELECTOR, selector: {app: backend},
                   action: ALLOW}]"
                    .into(),
                tls(),
                Some(("shop/be", None)),
            ),
            (
                "ipv6 allow",
                "[{name: v6, namespace: shop, scope: NAMESPACE, action: ALLOW,
                   rules: [{from: [{sourceIps: ['fd00::/8']}]}]}]"
                    .into(),
                conn("fd00::1", None, "[fd00::2]:80"),
                None,
            ),
        ];
        let dest = labels(&[("app", "backend")]);
        for (name, yaml, conn, expected) in cases {
            let list = policies(&yaml);
            let decision = evaluate(&list, ROOT, "shop", &dest, &conn);
            assert_eq!(
                Index::new(&list, ROOT).evaluate(&list, "shop", &dest, &conn),
                decision,
                "{name}: the index decides as the scan"
            );
            match (&decision, expected) {
                (Decision::Allow, None) => {}
                (
                    Decision::Deny {
                        policy,
                        rule,
                        reason,
                    },
                    Some((want_policy, want_rule)),
                ) => {
                    assert_eq!(policy, want_policy, "{name}");
                    assert_eq!(*rule, want_rule, "{name}");
                    assert!(reason.contains(want_policy), "{name}: {reason}");
                }
                _ => panic!("{name}: got {decision:?}, want {expected:?}"),
            }
        }
    }

    #[test]
    fn peer_authentication_precedence() {
        let web = labels(&[("app", "web")]);
        let cases: [(&str, &str, bool); 16] = [
            ("none", "[]", false),
            (
                "mesh strict",
                "[{name: m, namespace: istio-system, mode: STRICT}]",
                true,
            ),
            (
                "mesh unset is permissive",
                "[{name: m, namespace: istio-system}]",
                false,
            ),
            (
                "mesh disable",
                "[{name: m, namespace: istio-system, mode: DISABLE}]",
                false,
            ),
            (
                "namespace overrides mesh",
                "[{name: m, namespace: istio-system, mode: STRICT},
                  {name: n, namespace: shop, mode: PERMISSIVE}]",
                false,
            ),
            (
                "namespace unset inherits mesh",
                "[{name: m, namespace: istio-system, mode: STRICT},
                  {name: n, namespace: shop, mode: UNSET}]",
                true,
            ),
            (
                "namespace strict over permissive mesh",
                "[{name: m, namespace: istio-system, mode: PERMISSIVE},
                  {name: n, namespace: shop, mode: STRICT}]",
                true,
            ),
            (
                "other namespace",
                "[{name: n, namespace: other, mode: STRICT}]",
                false,
            ),
            (
                "workload overrides namespace",
                "[{name: n, namespace: shop, mode: STRICT},
                  {name: w, namespace: shop, selector: {app: web}, mode: PERMISSIVE}]",
                false,
            ),
            (
                "workload disable overrides mesh",
                "[{name: m, namespace: istio-system, mode: STRICT},
                  {name: w, namespace: shop, selector: {app: web}, mode: DISABLE}]",
                false,
            ),
            (
                "workload strict",
                "[{name: n, namespace: shop, mode: PERMISSIVE},
                  {name: w, namespace: shop, selector: {app: web}, mode: STRICT}]",
                true,
            ),
            (
                "workload unset inherits",
                "[{name: n, namespace: shop, mode: STRICT},
                  {name: w, namespace: shop, selector: {app: web}}]",
                true,
            ),
            (
                "selector that does not match",
                "[{name: n, namespace: shop, mode: STRICT},
                  {name: w, namespace: shop, selector: {app: db}, mode: PERMISSIVE}]",
                true,
            ),
            (
                "selector in the root namespace is ignored",
                "[{name: w, namespace: istio-system, selector: {app: web}, mode: STRICT}]",
                false,
            ),
            (
                "first namespace policy wins",
                "[{name: a, namespace: shop, mode: STRICT},
                  {name: b, namespace: shop, mode: PERMISSIVE}]",
                true,
            ),
            (
                "first workload policy wins",
                "[{name: a, namespace: shop, selector: {app: web}, mode: PERMISSIVE},
                  {name: b, namespace: shop, selector: {app: web}, mode: STRICT}]",
                false,
            ),
        ];
        for (name, yaml, expected) in cases {
            let peer_auths: Vec<PeerAuthentication> =
                serde_norway::from_str(yaml).expect("valid peer authentications");
            assert_eq!(
                requires_mtls(&peer_auths, ROOT, "shop", &web),
                expected,
                "{name}"
            );
            assert_eq!(
                MtlsIndex::new(&peer_auths, ROOT).requires_mtls(&peer_auths, "shop", &web),
                expected,
                "index: {name}"
            );
        }
        // In the root namespace itself, the mesh policy is the namespace policy.
        let mesh: Vec<PeerAuthentication> =
            serde_norway::from_str("[{name: m, namespace: istio-system, mode: STRICT}]")
                .expect("valid peer authentications");
        assert!(requires_mtls(&mesh, ROOT, ROOT, &web));
        assert!(MtlsIndex::new(&mesh, ROOT).requires_mtls(&mesh, ROOT, &web));
    }

    /// Policies and peer authentications drawn from a few namespaces (the root among them),
    /// labels and scopes, so that selectors overlap, repeat and miss; including what
    /// validation refuses (GLOBAL outside the root, selectors where the scope ignores them,
    /// a WORKLOAD_SELECTOR without labels, root-namespace selector peer authentications).
    pub(crate) fn generated(
        rng: &mut impl rand::Rng,
    ) -> (Vec<Authorization>, Vec<PeerAuthentication>) {
        const NAMESPACES: [&str; 4] = [ROOT, "shop", "web", "db"];
        let pick = |rng: &mut dyn rand::RngCore, from: &[&str]| -> String {
            from[rand::Rng::random_range(rng, 0..from.len())].to_owned()
        };
        let selector = |rng: &mut dyn rand::RngCore| -> BTreeMap<String, String> {
            let mut labels = BTreeMap::new();
            for key in ["app", "tier", "version"] {
                if rand::Rng::random_bool(rng, 0.4) {
                    labels.insert(key.to_owned(), pick(rng, &["x", "y", "z"]));
                }
            }
            labels
        };
        let policies = (0..rng.random_range(0..16))
            .map(|i| Authorization {
                name: format!("p{}", rng.random_range(0..12)),
                namespace: pick(rng, &NAMESPACES),
                scope: [Scope::Global, Scope::Namespace, Scope::WorkloadSelector]
                    [rng.random_range(0..3)],
                selector: selector(rng),
                action: if rng.random_bool(0.5) {
                    Action::Allow
                } else {
                    Action::Deny
                },
                rules: (0..rng.random_range(0..3))
                    .map(|_| Rule {
                        from: Some(vec![Match {
                            namespaces: vec![StringMatch::from(pick(rng, &NAMESPACES))],
                            ..Match::default()
                        }]),
                        to: rng.random_bool(0.3).then(|| {
                            vec![Match {
                                destination_ports: vec![[80, 9000][i % 2]],
                                ..Match::default()
                            }]
                        }),
                        when: None,
                    })
                    .collect(),
            })
            .collect();
        let peer_auths = (0..rng.random_range(0..8))
            .map(|_| PeerAuthentication {
                name: format!("pa{}", rng.random_range(0..6)),
                namespace: pick(rng, &NAMESPACES),
                selector: if rng.random_bool(0.5) {
                    selector(rng)
                } else {
                    BTreeMap::new()
                },
                mode: [
                    MtlsMode::Unset,
                    MtlsMode::Disable,
                    MtlsMode::Permissive,
                    MtlsMode::Strict,
                ][rng.random_range(0..4)],
            })
            .collect();
        (policies, peer_auths)
    }

    #[test]
    fn the_indexes_find_what_a_scan_finds_on_generated_policies() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let mut compared = 0;
        for _ in 0..500 {
            let (policies, peer_auths) = generated(&mut rng);
            let index = Index::new(&policies, ROOT);
            let mtls = MtlsIndex::new(&peer_auths, ROOT);
            for ns in [ROOT, "shop", "web", "db", "elsewhere"] {
                for _ in 0..8 {
                    let mut dest = BTreeMap::new();
                    for key in ["app", "tier", "version", "other"] {
                        if rng.random_bool(0.6) {
                            let value = ["x", "y", "z"][rng.random_range(0..3)];
                            dest.insert(key.to_owned(), value.to_owned());
                        }
                    }
                    let scanned: Vec<&Authorization> = policies
                        .iter()
                        .filter(|p| p.applies_to(ROOT, ns, &dest))
                        .collect();
                    let found = index.applicable(&policies, ns, &dest);
                    assert_eq!(found.len(), scanned.len(), "{ns} {dest:?} {policies:?}");
                    assert!(
                        found
                            .iter()
                            .zip(&scanned)
                            .all(|(a, b)| std::ptr::eq(*a, *b)),
                        "same policies in the same order: {ns} {dest:?} {policies:?}"
                    );
                    assert_eq!(
                        mtls.requires_mtls(&peer_auths, ns, &dest),
                        requires_mtls(&peer_auths, ROOT, ns, &dest),
                        "{ns} {dest:?} {peer_auths:?}"
                    );
                    let from = ["shop", "web", "db"][rng.random_range(0..3)];
                    let port = [80, 9000][rng.random_range(0..2)];
                    let c = from_ns(from, &format!("10.0.1.2:{port}"));
                    assert_eq!(
                        index.evaluate(&policies, ns, &dest, &c),
                        evaluate(&policies, ROOT, ns, &dest, &c)
                    );
                    compared += usize::from(!scanned.is_empty());
                }
            }
        }
        // The generator is not vacuous: most lookups find some policy.
        assert!(compared > 5_000, "only {compared} lookups found a policy");
    }

    #[test]
    fn validation() {
        let cases: [(&str, &str, Option<&str>); 14] = [
            (
                "valid",
                "scope: WORKLOAD_SELECTOR, selector: {app: be}, action: ALLOW,
                 rules: [{from: [{principals: [td/ns/a/sa/b]}], to: [{destinationPorts: [80]}]}]",
                None,
            ),
            (
                "allow without rules",
                "scope: NAMESPACE, action: ALLOW",
                None,
            ),
            (
                "deny with an empty rule",
                "scope: NAMESPACE, action: DENY, rules: [{}]",
                None,
            ),
            (
                "selector scope without selector",
                "scope: WORKLOAD_SELECTOR, action: ALLOW",
                Some("selector: scope WORKLOAD_SELECTOR needs at least one label"),
            ),
            (
                "selector without selector scope",
                "scope: NAMESPACE, selector: {app: be}, action: ALLOW",
                Some("selector: only used with scope WORKLOAD_SELECTOR"),
            ),
            (
                "empty label name",
                "scope: WORKLOAD_SELECTOR, selector: {'': be}, action: ALLOW",
                Some("selector: a label name must not be empty"),
            ),
            (
                "deny without rules",
                "scope: NAMESPACE, action: DENY",
                Some("rules: a DENY policy without rules never matches"),
            ),
            (
                "empty from",
                "scope: NAMESPACE, action: ALLOW, rules: [{from: []}]",
                Some("rules[0].from: an empty list"),
            ),
            (
                "empty when",
                "scope: NAMESPACE, action: ALLOW, rules: [{}, {when: []}]",
                Some("rules[1].when: an empty list"),
            ),
            (
                "empty entry",
                "scope: NAMESPACE, action: ALLOW, rules: [{to: [{destinationPorts: [1]}, {}]}]",
                Some("rules[0].to[1]: an entry without fields never matches"),
            ),
            (
                "spiffe principal",
                "scope: NAMESPACE, action: ALLOW,
                 rules: [{from: [{principals: ['spiffe://td/ns/a/sa/b']}]}]",
                Some("rules[0].from[0].principals[0]: \"spiffe://td/ns/a/sa/b\" never matches"),
            ),
            (
                "spiffe not-principal prefix",
                "scope: NAMESPACE, action: DENY,
                 rules: [{from: [{notPrincipals: ['spiffe://td/*']}]}]",
                Some("notPrincipals[0]: \"spiffe://td/*\" never matches"),
            ),
            (
                "empty namespace value",
                "scope: NAMESPACE, action: ALLOW, rules: [{from: [{namespaces: [a, '']}]}]",
                Some("rules[0].from[0].namespaces[1]: must not be empty"),
            ),
            (
                "port 0",
                "scope: NAMESPACE, action: ALLOW, rules: [{to: [{notDestinationPorts: [0]}]}]",
                Some("rules[0].to[0].notDestinationPorts[0]: port 0 never matches"),
            ),
        ];
        for (name, fields, expected) in cases {
            let yaml = format!("{{name: bad, namespace: shop, {fields}}}");
            match (policy(&yaml).validate(), expected) {
                (Ok(()), None) => {}
                (Err(err), Some(message)) => {
                    let text = err.to_string();
                    assert!(text.contains(message), "{name}: {text}");
                    assert!(text.contains("shop/"), "{name} names the policy: {text}");
                }
                (got, _) => panic!("{name}: got {got:?}, want {expected:?}"),
            }
        }
        let unnamed = policy("{name: '', namespace: shop, scope: NAMESPACE, action: ALLOW}");
        let err = unnamed.validate().expect_err("empty name").to_string();
        assert_eq!(
            err,
            "invalid authorization policy shop/: name: must not be empty"
        );
    }

    #[test]
    fn validation_of_the_whole_list() {
        let cases: [(&str, &str, &str, Option<&str>); 6] = [
            (
                "valid",
                "[{name: a, namespace: istio-system, scope: GLOBAL, action: ALLOW},
                  {name: a, namespace: shop, scope: NAMESPACE, action: ALLOW}]",
                "[{name: default, namespace: istio-system, mode: STRICT}]",
                None,
            ),
            (
                "duplicate policy",
                "[{name: a, namespace: shop, scope: NAMESPACE, action: ALLOW},
                  {name: a, namespace: shop, scope: NAMESPACE, action: DENY, rules: [{}]}]",
                "[]",
                Some("authorization policy shop/a: name: another"),
            ),
            (
                "global outside the root namespace",
                "[{name: g, namespace: shop, scope: GLOBAL, action: ALLOW}]",
                "[]",
                Some("shop/g: scope: GLOBAL only applies in the root namespace istio-system"),
            ),
            (
                "invalid policy",
                "[{name: d, namespace: shop, scope: NAMESPACE, action: DENY}]",
                "[]",
                Some("shop/d: rules:"),
            ),
            (
                "duplicate peer authentication",
                "[]",
                "[{name: p, namespace: shop}, {name: p, namespace: shop, mode: STRICT}]",
                Some("peer authentication shop/p: name: another"),
            ),
            (
                "selector peer authentication in the root namespace",
                "[]",
                "[{name: p, namespace: istio-system, selector: {app: web}, mode: STRICT}]",
                Some("istio-system/p: selector: Istio ignores selectors in the root namespace"),
            ),
        ];
        for (name, authz, peer_auths, expected) in cases {
            let peer_auths: Vec<PeerAuthentication> =
                serde_norway::from_str(peer_auths).expect("valid peer authentications");
            match (validate_all(&policies(authz), &peer_auths, ROOT), expected) {
                (Ok(()), None) => {}
                (Err(err), Some(message)) => {
                    let text = err.to_string();
                    assert!(text.contains(message), "{name}: {text}");
                }
                (got, _) => panic!("{name}: got {got:?}, want {expected:?}"),
            }
        }
    }

    #[test]
    fn malformed_yaml_is_refused_by_serde() {
        let base = "name: p, namespace: shop, scope: NAMESPACE, action: ALLOW";
        let cases = [
            (
                "rules: [{from: [{sourceIps: [10.0.0.0/33]}]}]",
                "invalid cidr",
            ),
            (
                "rules: [{to: [{methods: [GET]}]}]",
                "unknown field `methods`",
            ),
            ("rules: [{to: [{destinationPorts: [70000]}]}]", "70000"),
            ("rules: [{from: [{principals: td/ns/a/sa/b}]}]", "sequence"),
            ("selector: {app: be}, extra: 1", "unknown field `extra`"),
        ];
        for (fields, message) in cases {
            let yaml = format!("{{{base}, {fields}}}");
            let err = serde_norway::from_str::<Authorization>(&yaml)
                .expect_err("malformed policy")
                .to_string();
            assert!(err.contains(message), "{fields}: {err}");
        }
        for (yaml, message) in [
            (
                "{name: p, namespace: shop, scope: global, action: ALLOW}",
                "unknown variant",
            ),
            (
                "{name: p, namespace: shop, scope: NAMESPACE}",
                "missing field `action`",
            ),
        ] {
            let err = serde_norway::from_str::<Authorization>(yaml)
                .expect_err("malformed policy")
                .to_string();
            assert!(err.contains(message), "{yaml}: {err}");
        }
    }

    #[test]
    fn policies_round_trip_through_yaml() {
        let yaml = "
- name: allow-frontend
  namespace: shop
  scope: WORKLOAD_SELECTOR
  selector: {app: backend}
  action: ALLOW
  rules:
  - from:
    - principals: [cluster.local/ns/shop/sa/frontend]
    - namespaces: [monitoring]
    to:
    - destinationPorts: [8080]
    when:
    - notSourceIps: [10.9.0.0/16, 'fd00::/8']
- name: deny-ssh
  namespace: istio-system
  scope: GLOBAL
  action: DENY
  rules:
  - to: [{destinationPorts: [22]}]
";
        let parsed = policies(yaml);
        for p in &parsed {
            p.validate().expect("example policies are valid");
        }
        let dumped = serde_norway::to_string(&parsed).expect("serialize");
        assert!(dumped.contains("WORKLOAD_SELECTOR"), "{dumped}");
        assert!(dumped.contains("10.9.0.0/16"), "{dumped}");
        assert_eq!(policies(&dumped), parsed, "{dumped}");

        let json = serde_json::to_value(&parsed[0]).expect("serialize");
        assert_eq!(
            json["rules"][0]["from"][0]["principals"][0],
            "cluster.local/ns/shop/sa/frontend"
        );
        assert_eq!(json["rules"][0]["when"][0]["notSourceIps"][1], "fd00::/8");
    }
}
