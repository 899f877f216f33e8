//! Gateway API HTTPRoute at the waypoint: which backend a request goes to.
//!
//! SKELETON: the interface the waypoint runtime (`waypoint.rs`) codes against. The bodies
//! and the full route shape are being written on branch `l7`.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::authz::ObjectRef;

/// One HTTPRoute (the workload file's `httpRoutes:`), Gateway API v1 shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
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
    /// How many more times a request that failed to connect or got a 503 is tried.
    pub retries: u32,
}

/// What a route match sees of a request.
pub type RequestParts = http::request::Parts;

/// The routes of one config version, indexed by the service they attach to.
#[derive(Debug, Default)]
pub struct RouteTable {}

/// Why a request matched a rule but has nowhere to go (answered with 500, as Gateway API
/// requires for a rule without valid backends).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route} rule {rule}: {reason}")]
pub struct NoBackend {
    pub route: String,
    pub rule: usize,
    pub reason: String,
}

impl RouteTable {
    pub fn new(_routes: &[HttpRoute]) -> Self {
        unimplemented!("branch l7")
    }

    /// The backend for a request to `service`:`port` through the waypoint `gateway`.
    /// `Ok(None)`: no route attaches to it: the request goes to `service` itself.
    /// Weighted backends are taken in turns (each its weight's share of every `sum`
    /// requests matching that rule).
    pub fn select(
        &self,
        _gateway: &ObjectRef,
        _service: &ObjectRef,
        _port: u16,
        _req: &RequestParts,
    ) -> Result<Option<Chosen>, NoBackend> {
        unimplemented!("branch l7")
    }
}

/// Checks every route of a file version; the error names the route and the field.
pub fn validate_all(_routes: &[HttpRoute]) -> Result<(), String> {
    unimplemented!("branch l7")
}
