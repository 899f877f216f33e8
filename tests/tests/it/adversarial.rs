//! The adversarial suite: what an attacker or a careless operator does to an enrolled pod,
//! and what must hold anyway (issue 14: fail closed, no bypass, bounded resources).
mod probes;
