//! The adversarial suite (issue 14): what an attacker or a careless operator can do to a
//! node, and proof that enrolled pods' traffic stays mTLS and policed, or does not flow,
//! and that ztunnel stays bounded through it. One module per surface.
mod bounds;
pub mod config;
mod orig_dst;
mod packets;
mod ports;
mod probes;
