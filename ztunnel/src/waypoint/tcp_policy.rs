//! TEMPORARY (branch waypoint): TCP streams through the waypoint are refused until the
//! L4 evaluation over branch l7's policy types lands here.
use std::net::IpAddr;

use super::authz::{Decision, ObjectRef, PolicyIndex};

pub(super) struct ConnAttrs<'a> {
    pub port: u16,
    pub source_principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
}

pub(super) fn evaluate(
    _index: &PolicyIndex,
    _gateway: &ObjectRef,
    _service: Option<&ObjectRef>,
    _conn: &ConnAttrs<'_>,
) -> Decision {
    Decision::Deny {
        policy: "-".to_owned(),
        reason: "TCP policy evaluation pending".to_owned(),
    }
}
