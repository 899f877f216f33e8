//! The `/config_dump` as `istioctl ztunnel-config` reads it: the shapes below are written
//! from the JSON field names istioctl publishes for Istio's ztunnel dump (istio/istio
//! `istioctl/pkg/writer/ztunnel/configdump/api.go`), and the tables from the columns its
//! `workloads`, `services`, `policies`, `certificates` and `connections` views print. They
//! are our own code: a compatibility check that ztunnel's dump feeds Istio's tool, not a
//! copy of it. Fields istioctl reads are required here (a missing one fails the parse).
use std::collections::BTreeMap;

use anyhow::Context as _;
use serde::Deserialize;

/// The dump's sections istioctl reads.
#[derive(Debug, Deserialize)]
pub struct Dump {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    pub certificates: Vec<Certs>,
    /// istioctl matches `workloadstate` without regard to case.
    #[serde(rename = "workloadState", default)]
    pub workload_state: BTreeMap<String, WorkloadState>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub workload_ips: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
    pub protocol: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub cluster_id: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default)]
    pub locality: Locality,
    pub node: String,
    pub status: String,
    #[serde(default)]
    pub hostname: String,
    pub capacity: u32,
}

#[derive(Debug, Default, Deserialize)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

#[derive(Debug, Deserialize)]
pub struct GatewayAddress {
    pub destination: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `network/ip`.
    pub vips: Vec<String>,
    pub ports: BTreeMap<String, i64>,
    pub waypoint: Option<GatewayAddress>,
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
    pub port: BTreeMap<String, u16>,
}

#[derive(Debug, Deserialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: String,
    pub action: String,
    pub rules: Vec<Vec<Vec<PolicyMatch>>>,
}

/// One match; string matches are `{"Exact": …}`, `{"Prefix": …}`, `{"Suffix": …}` or
/// `{"Presence": …}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMatch {
    #[serde(default)]
    pub namespaces: Vec<StringMatch>,
    #[serde(default)]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default)]
    pub principals: Vec<StringMatch>,
    #[serde(default)]
    pub not_principals: Vec<StringMatch>,
    #[serde(default)]
    pub source_ips: Vec<String>,
    #[serde(default)]
    pub not_source_ips: Vec<String>,
    #[serde(default)]
    pub destination_ips: Vec<String>,
    #[serde(default)]
    pub not_destination_ips: Vec<String>,
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    #[serde(rename = "Exact")]
    pub exact: Option<String>,
    #[serde(rename = "Suffix")]
    pub suffix: Option<String>,
    #[serde(rename = "Prefix")]
    pub prefix: Option<String>,
    #[serde(rename = "Presence")]
    pub presence: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certs {
    pub identity: String,
    pub state: String,
    pub cert_chain: Vec<Cert>,
    pub root_certs: Vec<Cert>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cert {
    /// The PEM text, base64-encoded.
    pub pem: String,
    /// Decimal.
    pub serial_number: String,
    pub valid_from: String,
    pub expiration_time: String,
}

#[derive(Debug, Deserialize)]
pub struct WorkloadState {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub connections: Connections,
    pub info: WorkloadInfo,
}

#[derive(Debug, Default, Deserialize)]
pub struct Connections {
    pub inbound: Vec<Connection>,
    pub outbound: Vec<Connection>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub src: String,
    pub original_dst: String,
    pub actual_dst: String,
    pub protocol: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub trust_domain: String,
    pub service_account: String,
}

impl Dump {
    /// Parses a `/config_dump` body.
    pub fn parse(body: &str) -> anyhow::Result<Dump> {
        let de = &mut serde_json::Deserializer::from_str(body);
        serde_path_to_error::deserialize(de)
            .context("the dump does not have the shapes istioctl ztunnel-config reads")
    }

    /// `istioctl ztunnel-config workloads`.
    pub fn workloads_table(&self) -> String {
        let mut rows: Vec<&Workload> = self.workloads.iter().collect();
        rows.sort_by(|a, b| {
            (format!("{}.{}", a.namespace, a.name), &a.node)
                .cmp(&(format!("{}.{}", b.namespace, b.name), &b.node))
        });
        let rows = rows.into_iter().map(|w| {
            let address = if w.workload_ips.is_empty() {
                w.hostname.clone()
            } else {
                w.workload_ips.join(",")
            };
            let waypoint = if w.waypoint.is_some() { "NA" } else { "None" };
            vec![
                w.namespace.clone(),
                w.name.clone(),
                address,
                w.node.clone(),
                waypoint.to_owned(),
                w.protocol.clone(),
            ]
        });
        tabulate(
            &[
                "NAMESPACE",
                "POD NAME",
                "ADDRESS",
                "NODE",
                "WAYPOINT",
                "PROTOCOL",
            ],
            rows,
            1,
        )
    }

    /// `istioctl ztunnel-config services`: endpoints as healthy/all, by the workloads'
    /// status.
    pub fn services_table(&self) -> String {
        let healthy: BTreeMap<&str, bool> = self
            .workloads
            .iter()
            .map(|w| (w.uid.as_str(), w.status == "Healthy"))
            .collect();
        let mut rows: Vec<&Service> = self.services.iter().collect();
        rows.sort_by(|a, b| {
            (&a.namespace, &a.name, &a.hostname).cmp(&(&b.namespace, &b.name, &b.hostname))
        });
        let rows = rows.into_iter().map(|s| {
            let ips: Vec<&str> = s
                .vips
                .iter()
                .map(|v| v.split_once('/').map_or("", |(_, ip)| ip))
                .collect();
            let up = s
                .endpoints
                .values()
                .filter(|e| healthy.get(e.workload_uid.as_str()) == Some(&true))
                .count();
            let waypoint = if s.waypoint.is_some() { "NA" } else { "None" };
            vec![
                s.namespace.clone(),
                s.name.clone(),
                ips.join(","),
                waypoint.to_owned(),
                format!("{up}/{}", s.endpoints.len()),
            ]
        });
        tabulate(
            &[
                "NAMESPACE",
                "SERVICE NAME",
                "SERVICE VIP",
                "WAYPOINT",
                "ENDPOINTS",
            ],
            rows,
            1,
        )
    }

    /// `istioctl ztunnel-config policies`.
    pub fn policies_table(&self) -> String {
        let mut rows: Vec<&Policy> = self.policies.iter().collect();
        rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let rows = rows.into_iter().map(|p| {
            vec![
                p.namespace.clone(),
                p.name.clone(),
                p.action.clone(),
                p.scope.clone(),
            ]
        });
        tabulate(&["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"], rows, 1)
    }

    /// `istioctl ztunnel-config certificates`: one row per certificate, serial numbers in
    /// hex; `valid` is whether `now` (RFC 3339) lies within its validity.
    pub fn certificates_table(&self, now: &str) -> String {
        let mut rows = Vec::new();
        for c in &self.certificates {
            let state = if c.state.contains("Unavailable") {
                "Unavailable".to_owned()
            } else {
                c.state.clone()
            };
            if c.cert_chain.is_empty() {
                let na = || "NA".to_owned();
                rows.push(vec![
                    c.identity.clone(),
                    na(),
                    state,
                    "false".to_owned(),
                    na(),
                    na(),
                    na(),
                ]);
                continue;
            }
            let kinds = c
                .cert_chain
                .iter()
                .enumerate()
                .map(|(i, cert)| (if i == 0 { "Leaf" } else { "Intermediate" }, cert))
                .chain(c.root_certs.iter().map(|cert| ("Root", cert)));
            for (kind, cert) in kinds {
                let valid = !cert.valid_from.is_empty()
                    && cert.valid_from.as_str() < now
                    && now < cert.expiration_time.as_str();
                rows.push(vec![
                    c.identity.clone(),
                    kind.to_owned(),
                    state.clone(),
                    valid.to_string(),
                    decimal_to_hex(&cert.serial_number),
                    or_na(&cert.expiration_time),
                    or_na(&cert.valid_from),
                ]);
            }
        }
        tabulate(
            &[
                "CERTIFICATE NAME",
                "TYPE",
                "STATUS",
                "VALID CERT",
                "SERIAL NUMBER",
                "NOT AFTER",
                "NOT BEFORE",
            ],
            rows.into_iter(),
            5,
        )
    }

    /// `istioctl ztunnel-config connections`: each pod's open connections.
    pub fn connections_table(&self) -> String {
        let mut rows = Vec::new();
        for st in self.workload_state.values() {
            let pod = format!("{}.{}", st.info.name, st.info.namespace);
            for (direction, list) in [
                ("inbound", &st.connections.inbound),
                ("outbound", &st.connections.outbound),
            ] {
                for c in list {
                    rows.push(vec![
                        pod.clone(),
                        direction.to_owned(),
                        c.src.clone(),
                        c.original_dst.clone(),
                        c.actual_dst.clone(),
                        c.protocol.clone(),
                    ]);
                }
            }
        }
        tabulate(
            &[
                "WORKLOAD",
                "DIRECTION",
                "LOCAL",
                "REMOTE",
                "REMOTE TARGET",
                "PROTOCOL",
            ],
            rows.into_iter(),
            1,
        )
    }
}

fn or_na(v: &str) -> String {
    if v.is_empty() {
        "NA".to_owned()
    } else {
        v.to_owned()
    }
}

/// A decimal number of any length in lowercase hex (istioctl prints serials so).
fn decimal_to_hex(decimal: &str) -> String {
    let mut digits: Vec<u32> = decimal.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.is_empty() {
        return "0".to_owned();
    }
    let mut hex = Vec::new();
    while digits.iter().any(|d| *d != 0) {
        let mut rem = 0;
        for d in &mut digits {
            let cur = rem * 10 + *d;
            *d = cur / 16;
            rem = cur % 16;
        }
        hex.push(std::char::from_digit(rem, 16).expect("a hex digit"));
    }
    if hex.is_empty() {
        return "0".to_owned();
    }
    hex.iter().rev().collect()
}

/// Columns as Go's tabwriter aligns them: every cell but a line's last padded to its
/// column's widest cell plus `padding` spaces.
fn tabulate(header: &[&str], rows: impl Iterator<Item = Vec<String>>, padding: usize) -> String {
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    lines.extend(rows);
    let cols = header.len();
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        for (i, cell) in line.iter().enumerate() {
            if i + 1 == cols {
                out.push_str(cell);
            } else {
                let pad = widths[i] + padding - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Dump {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../ztunnel/tests/golden/config_dump.json");
        let text = std::fs::read_to_string(&path).expect("the ztunnel cli's dump fixture");
        Dump::parse(&text).expect("istioctl's shapes parse the fixture")
    }

    #[test]
    fn the_cli_fixture_dump_renders_as_istioctl_tables() {
        let d = fixture();
        assert_eq!(
            d.workloads_table(),
            "\
NAMESPACE POD NAME   ADDRESS            NODE   WAYPOINT PROTOCOL
legacy    db-0       10.2.0.9           node-b None     TCP
shop      backend-0  10.1.0.6,fd00:1::6 node-a None     HBONE
shop      backend-1  10.2.0.7           node-b None     HBONE
shop      frontend-0 10.1.0.5           node-a None     HBONE
"
        );
        assert_eq!(
            d.services_table(),
            "\
NAMESPACE SERVICE NAME SERVICE VIP            WAYPOINT ENDPOINTS
legacy    db           10.96.0.30             None     1/1
shop      backend      10.96.0.20,fd00:96::20 None     2/2
shop      frontend                            None     0/0
"
        );
        assert_eq!(
            d.policies_table(),
            "\
NAMESPACE    POLICY NAME    ACTION SCOPE
istio-system deny-legacy    Deny   Global
shop         allow-frontend Allow  WorkloadSelector
"
        );
        let certs = d.certificates_table("2025-06-01T12:00:00Z");
        let rows: Vec<Vec<&str>> = certs
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let backend = "spiffe://cluster.local/ns/shop/sa/backend";
        assert_eq!(
            rows,
            [
                vec![
                    "CERTIFICATE",
                    "NAME",
                    "TYPE",
                    "STATUS",
                    "VALID",
                    "CERT",
                    "SERIAL",
                    "NUMBER",
                    "NOT",
                    "AFTER",
                    "NOT",
                    "BEFORE"
                ],
                vec![
                    backend,
                    "Leaf",
                    "Available",
                    "true",
                    "3dce73f53caa4b8112a6",
                    "2025-06-02T08:00:00Z",
                    "2025-06-01T08:00:00Z"
                ],
                vec![
                    backend,
                    "Root",
                    "Available",
                    "true",
                    "6bf7fc82494f",
                    "2035-01-01T00:00:00Z",
                    "2025-01-01T00:00:00Z"
                ],
                vec![
                    "spiffe://cluster.local/ns/shop/sa/frontend",
                    "NA",
                    "Initializing",
                    "false",
                    "NA",
                    "NA",
                    "NA"
                ],
                vec![
                    "spiffe://cluster.local/ns/shop/sa/legacy",
                    "NA",
                    "Unavailable",
                    "false",
                    "NA",
                    "NA",
                    "NA"
                ],
            ],
            "{certs}"
        );
        // istioctl's certificate table pads its columns by five.
        assert!(
            certs
                .lines()
                .nth(1)
                .is_some_and(|l| l.starts_with(&format!("{backend}      Leaf"))),
            "{certs}"
        );
        let conns = d.connections_table();
        let rows: Vec<Vec<&str>> = conns
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "WORKLOAD",
                    "DIRECTION",
                    "LOCAL",
                    "REMOTE",
                    "REMOTE",
                    "TARGET",
                    "PROTOCOL"
                ],
                vec![
                    "frontend-0.shop",
                    "outbound",
                    "10.1.0.5:40312",
                    "10.96.0.20:80",
                    "10.1.0.6:15008",
                    "HBONE"
                ],
            ],
            "{conns}"
        );
    }

    #[test]
    fn serials_print_in_hex_whatever_their_length() {
        assert_eq!(decimal_to_hex("255"), "ff");
        assert_eq!(decimal_to_hex("0"), "0");
        // 2^128 + 1: past any machine integer.
        assert_eq!(
            decimal_to_hex("340282366920938463463374607431768211457"),
            "100000000000000000000000000000001"
        );
    }

    #[test]
    fn a_dump_missing_a_field_istioctl_reads_is_refused_by_name() {
        let err = Dump::parse(
            r#"{"workloads": [{"uid": "u"}], "services": [], "policies": [], "certificates": []}"#,
        )
        .expect_err("workloadIps is missing");
        assert!(format!("{err:#}").contains("workloads[0]"), "{err:#}");
    }
}
