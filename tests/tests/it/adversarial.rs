//! The adversarial suite: what an attacker or a careless operator tries against the
//! fail-closed promise, one module per surface.
mod orig_dst;
mod packets;
mod ports;
