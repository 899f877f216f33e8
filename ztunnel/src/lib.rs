//! ztunnel: a node proxy that captures enrolled pods' traffic with eBPF and carries it
//! between pods. `main.rs` only parses arguments and calls [`app::run`].
pub mod admin;
pub mod app;
pub mod capture;
pub mod cgroup;
pub mod cli;
mod code_pages;
pub mod config;
pub mod diagnostics;
pub mod dns;
pub mod drain;
pub mod ebpf;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod iptables;
pub mod istio;
pub mod kube;
pub mod limits;
pub mod metrics;
pub mod netns;
mod opening;
pub mod policy;
pub mod probes;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod waypoint;
