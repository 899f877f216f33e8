//! Privileged integration tests: real network namespaces, cgroups, eBPF and ztunnel
//! processes. They need root and fail loudly without it. One file per behaviour.
mod admin;
mod adversarial;
mod bench;
mod ca;
mod demo;
mod diagnostics;
pub mod dns;
mod drain;
mod enrolment;
mod inbound;
mod iptables;
mod istio;
mod kernel;
mod kube;
mod metrics;
mod occupancy;
mod outbound;
mod parity;
mod policy;
mod transfer;
mod tunnel;
mod upgrade;
mod waypoint;
mod waypoint_proxy;
