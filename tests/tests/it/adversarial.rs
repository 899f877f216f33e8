//! The adversarial suite (issue 14): what an attacker or a careless operator can do to a
//! node, and that the mesh fails closed and stays bounded through it. One module per
//! part of the issue.
mod bounds;
