//! L7 authorization at the waypoint: Istio's AuthorizationPolicy as a waypoint enforces it
//! (policies attached by `targetRefs` to the waypoint's Gateway or to a Service behind it).
//!
//! SKELETON: the interface the waypoint runtime (`waypoint.rs`) codes against. The bodies
//! and the full policy shape are being written on branch `l7`.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::policy::Action;

/// An object a policy or route names: `namespace/name` of a kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

/// One AuthorizationPolicy for waypoints (the workload file's `waypointPolicies:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointPolicy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
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

/// The policies of one config version, indexed for the waypoint `gateway`.
#[derive(Debug, Default)]
pub struct PolicyIndex {}

impl PolicyIndex {
    pub fn new(_policies: &[WaypointPolicy], _root_namespace: &str) -> Self {
        unimplemented!("branch l7")
    }

    /// Decides a request through waypoint `gateway` to `service` (`None`: addressed to a
    /// workload), by Istio's order: CUSTOM (unsupported), DENY, ALLOW.
    pub fn evaluate(
        &self,
        _gateway: &ObjectRef,
        _service: Option<&ObjectRef>,
        _req: &RequestAttrs<'_>,
    ) -> Decision {
        unimplemented!("branch l7")
    }
}

/// Checks every policy of a file version; the error names the policy and the field.
pub fn validate_all(_policies: &[WaypointPolicy]) -> Result<(), String> {
    unimplemented!("branch l7")
}
