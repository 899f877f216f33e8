//! Generated prost/tonic types for the messages in `ztunnel/proto/`, in modules that
//! mirror the proto packages (generated code refers across packages by relative path),
//! re-exported under short names.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod packages {
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
    pub mod envoy {
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
        }
    }
    pub mod istio {
        pub mod workload {
            tonic::include_proto!("istio.workload");
            pub mod zds {
                tonic::include_proto!("istio.workload.zds");
            }
        }
        pub mod security {
            tonic::include_proto!("istio.security");
        }
        pub mod v1 {
            pub mod auth {
                tonic::include_proto!("istio.v1.auth");
            }
        }
    }
}

pub use packages::envoy::service::discovery::v3 as envoy;
pub use packages::google::rpc;
pub use packages::istio::security;
pub use packages::istio::v1::auth as ca;
pub use packages::istio::workload;
pub use packages::istio::workload::zds;

/// Type URLs of the xDS resources ztunnel subscribes to.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// Round trips against bytes encoded by hand from Istio's and Envoy's published field
/// numbers: a wrong number or wire type in `proto/` fails here.
#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use prost::Message;

    use super::*;

    // Wire types (protobuf encoding spec): 0 varint, 2 length-delimited.
    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }
    fn int(field: u64, v: u64) -> Vec<u8> {
        let mut out = varint(field << 3);
        out.extend(varint(v));
        out
    }
    fn bytes(field: u64, b: &[u8]) -> Vec<u8> {
        let mut out = varint((field << 3) | 2);
        out.extend(varint(b.len() as u64));
        out.extend_from_slice(b);
        out
    }
    fn msg(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// Decodes `wire` into `want`'s type, compares, and encodes `want` back to `wire`.
    fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(wire: &[u8], want: M) {
        let got = M::decode(wire).expect("fixture decodes");
        assert_eq!(got, want);
        assert_eq!(want.encode_to_vec(), wire, "encoding of {want:?}");
    }

    #[test]
    fn zds_messages_match_published_field_numbers() {
        round_trip(
            &int(1, 1),
            zds::ZdsHello {
                version: zds::Version::V1 as i32,
            },
        );
        let info = msg(&[bytes(1, b"web-0"), bytes(2, b"shop"), bytes(3, b"web")]);
        let add = msg(&[bytes(1, b"uid-1"), bytes(2, &info)]);
        round_trip(
            &bytes(1, &add),
            zds::WorkloadRequest {
                payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
                    uid: "uid-1".into(),
                    workload_info: Some(zds::WorkloadInfo {
                        name: "web-0".into(),
                        namespace: "shop".into(),
                        service_account: "web".into(),
                    }),
                })),
            },
        );
        round_trip(
            &bytes(2, &bytes(2, b"uid-1")),
            zds::WorkloadRequest {
                payload: Some(zds::workload_request::Payload::Del(zds::DelWorkload {
                    uid: "uid-1".into(),
                })),
            },
        );
        round_trip(
            &bytes(3, &[]),
            zds::WorkloadRequest {
                payload: Some(zds::workload_request::Payload::SnapshotSent(
                    zds::SnapshotSent {},
                )),
            },
        );
        round_trip(
            &bytes(5, &bytes(1, b"uid-2")),
            zds::WorkloadRequest {
                payload: Some(zds::workload_request::Payload::Keep(zds::KeepWorkload {
                    uid: "uid-2".into(),
                })),
            },
        );
        round_trip(
            &bytes(1, &bytes(1, b"no netns")),
            zds::WorkloadResponse {
                payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
                    error: "no netns".into(),
                })),
            },
        );
    }

    #[test]
    fn ca_messages_match_published_field_numbers() {
        // Struct{fields{"ImpersonatedIdentity": Value{string_value}}}
        let value = bytes(3, b"spiffe://td/ns/a/sa/b");
        let entry = msg(&[bytes(1, b"ImpersonatedIdentity"), bytes(2, &value)]);
        let wire = msg(&[bytes(1, b"CSR"), int(3, 86400), bytes(4, &bytes(1, &entry))]);
        round_trip(
            &wire,
            ca::IstioCertificateRequest {
                csr: "CSR".into(),
                validity_duration: 86400,
                metadata: Some(prost_types::Struct {
                    fields: BTreeMap::from([(
                        "ImpersonatedIdentity".to_owned(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(
                                "spiffe://td/ns/a/sa/b".into(),
                            )),
                        },
                    )]),
                }),
            },
        );
        round_trip(
            &msg(&[bytes(1, b"LEAF"), bytes(1, b"ROOT")]),
            ca::IstioCertificateResponse {
                cert_chain: vec!["LEAF".into(), "ROOT".into()],
            },
        );
    }

    fn waypoint_by_address() -> workload::GatewayAddress {
        workload::GatewayAddress {
            destination: Some(workload::gateway_address::Destination::Address(
                workload::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 15],
                },
            )),
            hbone_mtls_port: 15008,
        }
    }

    #[test]
    fn workload_and_service_match_published_field_numbers() {
        let port = msg(&[int(1, 80), int(2, 8080)]);
        let services_entry = msg(&[bytes(1, b"shop/web.shop.svc"), bytes(2, &bytes(1, &port))]);
        // GatewayAddress{address: NetworkAddress{address}, hbone_mtls_port: 15008}
        let by_address = msg(&[bytes(2, &bytes(2, &[10, 96, 0, 15])), int(3, 15008)]);
        // GatewayAddress{hostname: NamespacedHostname{namespace, hostname}, hbone_mtls_port}
        let by_hostname = msg(&[
            bytes(1, &msg(&[bytes(1, b"shop"), bytes(2, b"wp.shop.svc")])),
            int(3, 15008),
        ]);
        let workload = msg(&[
            bytes(1, b"web-0"),
            bytes(2, b"shop"),
            bytes(3, &[10, 0, 0, 7]),
            bytes(4, b"net1"),
            int(5, 1),
            bytes(6, b"td"),
            bytes(7, b"web"),
            bytes(8, &by_address),
            bytes(9, b"node1"),
            bytes(10, b"web"),
            bytes(11, b"v1"),
            int(12, 2),
            bytes(13, b"web-0"),
            bytes(16, b"shop/allow"),
            int(17, 1),
            bytes(18, b"c1"),
            bytes(20, b"c1//Pod/shop/web-0"),
            bytes(22, &services_entry),
            bytes(
                24,
                &msg(&[bytes(1, b"r1"), bytes(2, b"z1"), bytes(3, b"s1")]),
            ),
        ]);
        round_trip(
            &bytes(1, &workload),
            workload::Address {
                r#type: Some(workload::address::Type::Workload(workload::Workload {
                    name: "web-0".into(),
                    namespace: "shop".into(),
                    addresses: vec![vec![10, 0, 0, 7]],
                    network: "net1".into(),
                    tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
                    trust_domain: "td".into(),
                    service_account: "web".into(),
                    waypoint: Some(waypoint_by_address()),
                    node: "node1".into(),
                    canonical_name: "web".into(),
                    canonical_revision: "v1".into(),
                    workload_type: workload::WorkloadType::Pod as i32,
                    workload_name: "web-0".into(),
                    authorization_policies: vec!["shop/allow".into()],
                    status: workload::WorkloadStatus::Unhealthy as i32,
                    cluster_id: "c1".into(),
                    uid: "c1//Pod/shop/web-0".into(),
                    services: HashMap::from([(
                        "shop/web.shop.svc".to_owned(),
                        workload::PortList {
                            ports: vec![workload::Port {
                                service_port: 80,
                                target_port: 8080,
                            }],
                        },
                    )]),
                    locality: Some(workload::Locality {
                        region: "r1".into(),
                        zone: "z1".into(),
                        subzone: "s1".into(),
                    }),
                })),
            },
        );
        let service = msg(&[
            bytes(1, b"web"),
            bytes(2, b"shop"),
            bytes(3, b"web.shop.svc"),
            bytes(4, &msg(&[bytes(1, b"net1"), bytes(2, &[10, 96, 0, 1])])),
            bytes(5, &port),
            bytes(6, b"spiffe://td/ns/shop/sa/web"),
            bytes(7, &by_hostname),
            // WeightedWaypoint{destination, weight: 3}
            bytes(13, &msg(&[bytes(1, &by_address), int(2, 3)])),
        ]);
        round_trip(
            &bytes(2, &service),
            workload::Address {
                r#type: Some(workload::address::Type::Service(workload::Service {
                    name: "web".into(),
                    namespace: "shop".into(),
                    hostname: "web.shop.svc".into(),
                    addresses: vec![workload::NetworkAddress {
                        network: "net1".into(),
                        address: vec![10, 96, 0, 1],
                    }],
                    ports: vec![workload::Port {
                        service_port: 80,
                        target_port: 8080,
                    }],
                    subject_alt_names: vec!["spiffe://td/ns/shop/sa/web".into()],
                    waypoint: Some(workload::GatewayAddress {
                        destination: Some(workload::gateway_address::Destination::Hostname(
                            workload::NamespacedHostname {
                                namespace: "shop".into(),
                                hostname: "wp.shop.svc".into(),
                            },
                        )),
                        hbone_mtls_port: 15008,
                    }),
                    weighted_waypoints: vec![workload::WeightedWaypoint {
                        destination: Some(waypoint_by_address()),
                        weight: 3,
                    }],
                })),
            },
        );
    }

    #[test]
    fn authorization_matches_published_field_numbers() {
        let exact = bytes(1, b"td/ns/shop/sa/web");
        let presence = bytes(4, &[]);
        let addr = msg(&[bytes(1, &[10, 1, 0, 0]), int(2, 16)]);
        let sa = msg(&[bytes(1, b"shop"), bytes(2, b"web")]);
        let m = msg(&[
            bytes(1, &bytes(2, b"sh")),
            bytes(2, &bytes(3, b"op")),
            bytes(3, &exact),
            bytes(4, &presence),
            bytes(5, &addr),
            bytes(6, &addr),
            bytes(7, &addr),
            bytes(8, &addr),
            bytes(9, &varint(8080)),
            bytes(10, &varint(22)),
            bytes(11, &sa),
            bytes(12, &sa),
        ]);
        let wire = msg(&[
            bytes(1, b"allow"),
            bytes(2, b"shop"),
            int(3, 2),
            int(4, 1),
            bytes(5, &bytes(1, &bytes(2, &m))),
            int(6, 1),
        ]);
        let a = security::Address {
            address: vec![10, 1, 0, 0],
            length: 16,
        };
        let s = security::ServiceAccountMatch {
            namespace: "shop".into(),
            service_account: "web".into(),
        };
        let sm = |t| {
            vec![security::StringMatch {
                match_type: Some(t),
            }]
        };
        use security::string_match::MatchType;
        round_trip(
            &wire,
            security::Authorization {
                name: "allow".into(),
                namespace: "shop".into(),
                scope: security::Scope::WorkloadSelector as i32,
                action: security::Action::Deny as i32,
                rules: vec![security::Rule {
                    clauses: vec![security::Clause {
                        matches: vec![security::Match {
                            namespaces: sm(MatchType::Prefix("sh".into())),
                            not_namespaces: sm(MatchType::Suffix("op".into())),
                            principals: sm(MatchType::Exact("td/ns/shop/sa/web".into())),
                            not_principals: sm(MatchType::Presence(())),
                            source_ips: vec![a.clone()],
                            not_source_ips: vec![a.clone()],
                            destination_ips: vec![a.clone()],
                            not_destination_ips: vec![a],
                            destination_ports: vec![8080],
                            not_destination_ports: vec![22],
                            service_accounts: vec![s.clone()],
                            not_service_accounts: vec![s],
                        }],
                    }],
                }],
                dry_run: true,
            },
        );
    }

    #[test]
    fn delta_xds_messages_match_published_field_numbers() {
        let node = msg(&[
            bytes(
                1,
                b"ztunnel~10.0.0.1~zt-1.istio-system~istio-system.svc.cluster.local",
            ),
            bytes(2, b"c1"),
            bytes(6, b"ztunnel"),
        ]);
        let versions_entry = msg(&[bytes(1, b"shop/web"), bytes(2, b"v3")]);
        let status = msg(&[int(1, 3), bytes(2, b"bad resource")]);
        let wire = msg(&[
            bytes(1, &node),
            bytes(2, ADDRESS_TYPE.as_bytes()),
            bytes(3, b"*"),
            bytes(4, b"old"),
            bytes(5, &versions_entry),
            bytes(6, b"nonce-1"),
            bytes(7, &status),
        ]);
        round_trip(
            &wire,
            envoy::DeltaDiscoveryRequest {
                node: Some(envoy::Node {
                    id: "ztunnel~10.0.0.1~zt-1.istio-system~istio-system.svc.cluster.local".into(),
                    cluster: "c1".into(),
                    metadata: None,
                    user_agent_name: "ztunnel".into(),
                }),
                type_url: ADDRESS_TYPE.into(),
                resource_names_subscribe: vec!["*".into()],
                resource_names_unsubscribe: vec!["old".into()],
                initial_resource_versions: HashMap::from([("shop/web".into(), "v3".into())]),
                response_nonce: "nonce-1".into(),
                error_detail: Some(rpc::Status {
                    code: 3,
                    message: "bad resource".into(),
                    details: vec![],
                }),
            },
        );
        let any = msg(&[bytes(1, ADDRESS_TYPE.as_bytes()), bytes(2, &[0x12, 0x00])]);
        let resource = msg(&[
            bytes(1, b"v3"),
            bytes(2, &any),
            bytes(3, b"shop/web"),
            bytes(4, b"alias"),
        ]);
        let wire = msg(&[
            bytes(1, b"sys"),
            bytes(2, &resource),
            bytes(4, ADDRESS_TYPE.as_bytes()),
            bytes(5, b"nonce-2"),
            bytes(6, b"shop/gone"),
        ]);
        round_trip(
            &wire,
            envoy::DeltaDiscoveryResponse {
                system_version_info: "sys".into(),
                resources: vec![envoy::Resource {
                    version: "v3".into(),
                    resource: Some(prost_types::Any {
                        type_url: ADDRESS_TYPE.into(),
                        value: vec![0x12, 0x00],
                    }),
                    name: "shop/web".into(),
                    aliases: vec!["alias".into()],
                }],
                type_url: ADDRESS_TYPE.into(),
                nonce: "nonce-2".into(),
                removed_resources: vec!["shop/gone".into()],
            },
        );
    }
}
