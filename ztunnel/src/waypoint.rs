//! `ztunnel waypoint`: the L7 proxy for services and workloads that name a waypoint.
pub mod authz;
pub mod route;
