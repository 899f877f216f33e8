//! What each inspection command prints for a [`ConfigDump`]: aligned columns without borders
//! or colours (like `kubectl get` and `istioctl ztunnel-config`), or JSON. Nothing here reads
//! the clock, so the same dump always renders the same text; durations come from the dump.
use std::collections::BTreeMap;

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

use super::{Command, Output};
use crate::{
    admin::{CertificateDump, ConfigDump, ServiceDump, WorkloadDump},
    app::HandoverStatus,
    ebpf::Occupancy,
    policy::{Authorization, MtlsMode, PeerAuthentication},
    proxy::{ConnectionRecord, Direction},
};

/// Spaces between columns, as `kubectl get` leaves.
const COLUMN_GAP: u16 = 3;

/// A certificate's state without its reason (`Unavailable: …` → `Unavailable`), as
/// istioctl shows it; the reason is the dump's `error`.
fn short_state(state: &str) -> &str {
    state.split_once(':').map_or(state, |(s, _)| s)
}

/// Shown in a cell that has no value, so every row has every column for `awk`.
const NONE: &str = "-";

/// Renders `cmd`'s view of `dump`: tables sort rows by namespace and name where they have
/// them; JSON is the matching part of the dump in the daemon's order (for `status`, a
/// summary). Either ends with a newline.
pub fn render(cmd: &Command, dump: &ConfigDump, output: Output) -> anyhow::Result<String> {
    match output {
        Output::Table => Ok(match cmd {
            Command::Status => status_table(&Status::of(dump)),
            Command::Workloads => workloads_table(&dump.workloads),
            Command::Services => services_table(&dump.services),
            Command::Policies => {
                policies_table(&dump.authorization_policies, &dump.peer_authentications)
            }
            Command::Certificates => certificates_table(&dump.certificates),
            Command::Connections => connections_table(&dump.connections.list),
        }),
        Output::Json => match cmd {
            Command::Status => pretty(&Status::of(dump)),
            Command::Workloads => pretty(&dump.workloads),
            Command::Services => pretty(&dump.services),
            Command::Policies => pretty(&Policies {
                authorization_policies: &dump.authorization_policies,
                peer_authentications: &dump.peer_authentications,
            }),
            Command::Certificates => pretty(&dump.certificates),
            Command::Connections => pretty(&dump.connections),
        },
    }
}

fn pretty<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| anyhow::anyhow!("failed to encode the output as JSON: {e}"))?;
    text.push('\n');
    Ok(text)
}

/// `ztunnel policies -o json`: both kinds of policy, under the dump's own names.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Policies<'a> {
    authorization_policies: &'a [Authorization],
    peer_authentications: &'a [PeerAuthentication],
}

/// `ztunnel status`: the node at a glance. The table and the JSON show the same fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
    /// The `--node` the daemon runs with.
    node: Option<&'a str>,
    capture: CaptureStatus<'a>,
    enrolled_pods: EnrolledStatus<'a>,
    certificates: Vec<CertificateStatus<'a>>,
    connections: ConnectionsStatus,
    /// The last upgrade this ztunnel took part in.
    handover: &'a HandoverStatus,
    /// Entries in each eBPF map.
    occupancy: &'a Occupancy,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CaptureStatus<'a> {
    mode: &'a str,
    /// The probed kernel version; the feature flags below follow from it.
    kernel: Option<&'a str>,
    tcx: Option<bool>,
    netns_cookie_in_sockops: Option<bool>,
    fast_path: bool,
    pin_dir: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EnrolledStatus<'a> {
    count: usize,
    names: Vec<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateStatus<'a> {
    identity: &'a str,
    state: &'a str,
    /// As of the dump; absent when there is no certificate.
    expires_in_seconds: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionsStatus {
    opened_total: u64,
    active: usize,
    hbone_pool_connections: usize,
    hbone_pool_streams: usize,
}

impl<'a> Status<'a> {
    fn of(dump: &'a ConfigDump) -> Self {
        // `capture.features` is `ebpf::Features` as JSON (its field names as written in
        // Rust); `config` holds Istio's setting names (`localNode`).
        let features = &dump.capture.features;
        Status {
            node: dump.config.get("localNode").and_then(|v| v.as_str()),
            capture: CaptureStatus {
                mode: &dump.capture.mode,
                kernel: features.get("kernel").and_then(|v| v.as_str()),
                tcx: features.get("tcx").and_then(|v| v.as_bool()),
                netns_cookie_in_sockops: features
                    .get("netns_cookie_in_sockops")
                    .and_then(|v| v.as_bool()),
                fast_path: dump.capture.fast_path,
                pin_dir: &dump.capture.pin_dir,
            },
            enrolled_pods: EnrolledStatus {
                count: dump.enrolled_pods.len(),
                names: dump.enrolled_pods.iter().map(|p| p.name.as_str()).collect(),
            },
            certificates: dump
                .certificates
                .iter()
                .map(|c| CertificateStatus {
                    identity: &c.identity,
                    state: short_state(&c.state),
                    expires_in_seconds: (!c.cert_chain.is_empty()).then_some(c.expiry_seconds),
                })
                .collect(),
            connections: ConnectionsStatus {
                opened_total: dump.connections.opened_total,
                active: dump
                    .connections
                    .list
                    .iter()
                    .filter(|c| is_active(c))
                    .count(),
                hbone_pool_connections: dump.connections.hbone_pool_connections,
                hbone_pool_streams: dump.connections.hbone_pool_streams,
            },
            handover: &dump.handover,
            occupancy: &dump.capture.occupancy,
        }
    }
}

/// One line for the last upgrade: its state, the predecessor, the sockets taken over and
/// the handover time, and whether a successor can find this ztunnel.
fn handover_line(h: &HandoverStatus) -> String {
    let mut line = match h.state.as_str() {
        "" | "none" => "no predecessor".to_owned(),
        "handed_over" => "handed over to a successor, draining".to_owned(),
        state => {
            let pid = h
                .predecessor_pid
                .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            let mut l = format!(
                "{state} (predecessor pid {pid}, {} listening sockets taken",
                h.listeners_taken
            );
            if let Some(ms) = h.elapsed_ms {
                l += &format!(", {ms} ms");
            }
            l + ")"
        }
    };
    if h.serving {
        line += "; serving the handover socket";
    }
    line
}

fn status_table(s: &Status<'_>) -> String {
    let yes_no = |v: Option<bool>| match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    let c = &s.connections;
    let summary = [
        ("Node:", s.node.unwrap_or("unknown").to_owned()),
        (
            "Capture:",
            format!("{} (pinned at {})", s.capture.mode, s.capture.pin_dir),
        ),
        ("Kernel:", s.capture.kernel.unwrap_or("unknown").to_owned()),
        ("TCX:", yes_no(s.capture.tcx).to_owned()),
        (
            "Netns cookie in sockops:",
            yes_no(s.capture.netns_cookie_in_sockops).to_owned(),
        ),
        (
            "Fast path:",
            if s.capture.fast_path { "on" } else { "off" }.to_owned(),
        ),
        ("Enrolled pods:", s.enrolled_pods.count.to_string()),
        ("Certificates:", s.certificates.len().to_string()),
        (
            "Connections:",
            format!("{} opened, {} active", c.opened_total, c.active),
        ),
        (
            "HBONE pool:",
            format!(
                "{} connections, {} streams",
                c.hbone_pool_connections, c.hbone_pool_streams
            ),
        ),
        ("Upgrade:", handover_line(s.handover)),
    ];
    let mut sections = vec![grid(
        &[],
        summary
            .into_iter()
            .map(|(label, value)| vec![label.to_owned(), value]),
    )];
    if !s.enrolled_pods.names.is_empty() {
        sections.push(grid(
            &["ENROLLED POD"],
            s.enrolled_pods.names.iter().map(|n| vec![(*n).to_owned()]),
        ));
    }
    if !s.certificates.is_empty() {
        sections.push(grid(
            &["IDENTITY", "STATE", "EXPIRES IN"],
            s.certificates.iter().map(|c| {
                vec![
                    c.identity.to_owned(),
                    c.state.to_owned(),
                    expires_in(c.expires_in_seconds),
                ]
            }),
        ));
    }
    // Every field of `Occupancy`, without naming them here: new maps show up by themselves.
    let occupancy: BTreeMap<String, serde_json::Value> = serde_json::to_value(s.occupancy)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    sections.push(grid(
        &["MAP", "ENTRIES"],
        occupancy
            .into_iter()
            .map(|(name, entries)| vec![name, entries.to_string()]),
    ));
    sections.join("\n")
}

fn workloads_table(workloads: &[WorkloadDump]) -> String {
    let mut rows: Vec<&WorkloadDump> = workloads.iter().collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    grid(
        &[
            "NAMESPACE",
            "NAME",
            "ADDRESSES",
            "NODE",
            "PROTOCOL",
            "IDENTITY",
        ],
        rows.into_iter().map(|w| {
            vec![
                or_none(&w.namespace),
                or_none(&w.name),
                joined(&w.workload_ips),
                or_none(&w.node),
                or_none(&w.protocol),
                or_none(&w.identity),
            ]
        }),
    )
}

fn services_table(services: &[ServiceDump]) -> String {
    let mut rows: Vec<&ServiceDump> = services.iter().collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    grid(
        &["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"],
        rows.into_iter().map(|s| {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|(port, target)| format!("{port}→{target}"))
                .collect();
            // Istio writes a VIP as `network/ip`.
            let vips: Vec<&str> = s
                .vips
                .iter()
                .map(|v| v.rsplit_once('/').map_or(v.as_str(), |(_, ip)| ip))
                .collect();
            vec![
                or_none(&s.namespace),
                or_none(&s.name),
                joined(&vips),
                joined(&ports),
                s.endpoints.len().to_string(),
            ]
        }),
    )
}

fn policies_table(policies: &[Authorization], peer_auths: &[PeerAuthentication]) -> String {
    let mut authz: Vec<&Authorization> = policies.iter().collect();
    authz.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut peer: Vec<&PeerAuthentication> = peer_auths.iter().collect();
    peer.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let authz = grid(
        &["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"],
        authz.into_iter().map(|p| {
            vec![
                or_none(&p.namespace),
                or_none(&p.name),
                p.scope.to_string(),
                p.action.to_string(),
                p.rules.len().to_string(),
            ]
        }),
    );
    let peer = grid(
        &["NAMESPACE", "NAME", "MODE"],
        peer.into_iter().map(|p| {
            vec![
                or_none(&p.namespace),
                or_none(&p.name),
                mtls_mode(p.mode).to_owned(),
            ]
        }),
    );
    format!("Authorization policies:\n{authz}\nPeer authentications:\n{peer}")
}

fn certificates_table(certs: &[CertificateDump]) -> String {
    grid(
        &["IDENTITY", "STATE", "VALID FROM", "EXPIRES", "EXPIRES IN"],
        certs.iter().map(|c| {
            // The leaf comes first in the chain.
            let leaf = c.cert_chain.first();
            vec![
                or_none(&c.identity),
                or_none(short_state(&c.state)),
                leaf.map_or_else(|| NONE.to_owned(), |l| or_none(&l.valid_from)),
                leaf.map_or_else(|| NONE.to_owned(), |l| or_none(&l.expiration_time)),
                expires_in(leaf.map(|_| c.expiry_seconds)),
            ]
        }),
    )
}

fn connections_table(list: &[ConnectionRecord]) -> String {
    grid(
        &[
            "DIRECTION",
            "POD",
            "SOURCE",
            "DESTINATION",
            "SRC IDENTITY",
            "DST IDENTITY",
            "SECURITY",
            "BYTES SENT",
            "BYTES RECEIVED",
            "DURATION",
            "OUTCOME",
        ],
        list.iter().map(|c| {
            let active = is_active(c);
            vec![
                match c.direction {
                    Direction::Outbound => "outbound",
                    Direction::Inbound => "inbound",
                }
                .to_owned(),
                or_none(&c.pod),
                c.src.to_string(),
                c.dst.to_string(),
                c.src_identity
                    .as_deref()
                    .map_or_else(|| NONE.to_owned(), or_none),
                c.dst_identity
                    .as_deref()
                    .map_or_else(|| NONE.to_owned(), or_none),
                or_none(&c.security_policy),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
                // An active connection's age would need the clock; the dump has none.
                c.duration_ms.map_or_else(|| NONE.to_owned(), millis),
                if active {
                    "active".to_owned()
                } else {
                    c.outcome
                        .as_deref()
                        .map_or_else(|| NONE.to_owned(), or_none)
                },
            ]
        }),
    )
}

/// A connection is active until it is closed, which sets its duration.
fn is_active(c: &ConnectionRecord) -> bool {
    c.duration_ms.is_none()
}

fn mtls_mode(mode: MtlsMode) -> &'static str {
    match mode {
        MtlsMode::Unset => "UNSET",
        MtlsMode::Disable => "DISABLE",
        MtlsMode::Permissive => "PERMISSIVE",
        MtlsMode::Strict => "STRICT",
    }
}

/// `ztunnel bpf-stats`: whether the kernel counts, then each program's runs, run time and
/// cost per run.
pub fn bpf_stats(
    status: &crate::ebpf::run_stats::Status,
    output: Output,
) -> anyhow::Result<String> {
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(status)? + "\n");
    }
    let state = match (&status.enabled_until, status.sysctl) {
        (Some(until), _) => format!("on until {until}"),
        (None, Some(true)) => "on (kernel.bpf_stats_enabled=1)".to_owned(),
        (None, _) => "off (ztunnel bpf-stats on [--for 10m])".to_owned(),
    };
    let rows = status.programs.iter().map(|p| {
        vec![
            p.program.clone(),
            p.id.to_string(),
            p.runs.to_string(),
            format!("{:.6}", p.run_time_ns as f64 / 1e9),
            p.ns_per_run.to_string(),
        ]
    });
    Ok(format!("BPF statistics: {state}\n")
        + &grid(&["PROGRAM", "ID", "RUNS", "RUN SECONDS", "NS/RUN"], rows))
}

/// A borderless table: a header line (unless `header` is empty), then one line per row,
/// columns left-aligned and [`COLUMN_GAP`] apart, no trailing spaces.
fn grid(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    if !header.is_empty() {
        table.set_header(header.to_vec());
    }
    for row in rows {
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, COLUMN_GAP));
    }
    let mut text = table.trim_fmt();
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        NONE.to_owned()
    } else {
        s.to_owned()
    }
}

/// Comma-separated, without spaces so that a cell stays one word.
fn joined<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return NONE.to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `None` when there is no certificate; the daemon reports 0 seconds for an expired one.
fn expires_in(seconds: Option<u64>) -> String {
    match seconds {
        None => NONE.to_owned(),
        Some(0) => "expired".to_owned(),
        Some(s) => secs(s),
    }
}

/// The two largest units, `kubectl`-style: `45s`, `3m20s`, `14h0m`, `2d3h`.
fn secs(s: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    for (i, (size, unit)) in UNITS.iter().enumerate() {
        if s >= *size || *size == 1 {
            return match UNITS.get(i + 1) {
                Some((next, next_unit)) => {
                    format!("{}{unit}{}{next_unit}", s / size, s % size / next)
                }
                None => format!("{s}{unit}"),
            };
        }
    }
    unreachable!("the last unit is one second")
}

/// Milliseconds under a second, tenths of a second under a minute, then as [`secs`].
fn millis(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}.{}s", ms / 1_000, ms % 1_000 / 100),
        _ => secs(ms / 1_000),
    }
}

/// Where the golden files (and the dump they are rendered from) live.
#[cfg(test)]
pub(super) fn golden_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (String, ConfigDump) {
        let path = golden_dir().join("config_dump.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
        let dump = super::super::parse_dump(text.as_bytes())
            .unwrap_or_else(|e| panic!("failed to parse {}: {e:#}", path.display()));
        (text, dump)
    }

    /// `UPDATE_GOLDEN=1 cargo test -p ztunnel --lib cli` rewrites the golden files; review
    /// the diff before keeping it.
    #[test]
    fn every_command_renders_as_its_golden_files() {
        let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
        let (_, dump) = fixture();
        let mut stale = Vec::new();
        for cmd in Command::ALL {
            for (output, ext) in [(Output::Table, "table"), (Output::Json, "json")] {
                let actual = render(&cmd, &dump, output).expect("renders");
                let path = golden_dir().join(format!("{}.{ext}", cmd.name()));
                if update {
                    std::fs::write(&path, &actual)
                        .unwrap_or_else(|e| panic!("failed to write {}: {e}", path.display()));
                    continue;
                }
                let expected = std::fs::read_to_string(&path).unwrap_or_default();
                if actual != expected {
                    stale.push(format!(
                        "{}:\n--- expected\n{expected}--- actual\n{actual}",
                        path.display()
                    ));
                }
            }
        }
        assert!(
            stale.is_empty(),
            "output differs from golden files (rerun with UPDATE_GOLDEN=1 if the change is \
             intended):\n{}",
            stale.join("\n")
        );
    }

    /// The fixture is exactly what the daemon would serve for it: every field present, none
    /// unknown. Adding a field to the dump fails here until the fixture (and the golden files)
    /// show it.
    #[test]
    fn fixture_dump_has_every_field_of_the_dump() {
        let (text, dump) = fixture();
        let written: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
        let reencoded = serde_json::to_value(&dump).expect("dump encodes");
        assert_eq!(reencoded, written);
    }

    #[test]
    fn bpf_stats_table_says_until_when_and_shows_each_program() {
        let (_, dump) = fixture();
        let table = bpf_stats(&dump.capture.bpf_stats, Output::Table).expect("renders");
        assert_eq!(
            table,
            "BPF statistics: on until 2025-06-01T09:10:00Z\n\
             PROGRAM              ID    RUNS   RUN SECONDS   NS/RUN\n\
             connect4_capture     812   41     0.000062      1500\n\
             tc_ingress_capture   820   0      0.000000      0\n"
        );
        let mut off = dump.capture.bpf_stats.clone();
        off.enabled_until = None;
        off.enabled = false;
        let table = bpf_stats(&off, Output::Table).expect("renders");
        assert!(
            table.starts_with("BPF statistics: off (ztunnel bpf-stats on [--for 10m])\n"),
            "{table}"
        );
        off.sysctl = Some(true);
        let table = bpf_stats(&off, Output::Table).expect("renders");
        assert!(
            table.starts_with("BPF statistics: on (kernel.bpf_stats_enabled=1)\n"),
            "{table}"
        );
    }

    #[test]
    fn active_connections_show_active_and_no_duration() {
        let (_, dump) = fixture();
        let active: Vec<&ConnectionRecord> = dump
            .connections
            .list
            .iter()
            .filter(|c| is_active(c))
            .collect();
        assert_eq!(active.len(), 1, "the fixture has one active connection");
        let table = connections_table(&dump.connections.list);
        let line = table
            .lines()
            .find(|l| l.contains(&active[0].src.to_string()))
            .expect("the active connection has a row");
        assert!(line.ends_with("active"), "{line}");
        assert_eq!(line.split_whitespace().nth(9), Some(NONE), "{line}");
    }

    #[test]
    fn expires_in_comes_from_the_dump_not_the_clock() {
        let (_, mut dump) = fixture();
        dump.certificates[0].expiry_seconds = 90;
        let table = certificates_table(&dump.certificates);
        assert!(table.contains(" 1m30s"), "{table}");
    }

    #[test]
    fn durations_show_their_two_largest_units() {
        for (seconds, text) in [
            (0, "0s"),
            (59, "59s"),
            (60, "1m0s"),
            (200, "3m20s"),
            (50_430, "14h0m"),
            (86_399, "23h59m"),
            (183_600, "2d3h"),
        ] {
            assert_eq!(secs(seconds), text, "{seconds}s");
        }
        for (ms, text) in [
            (0, "0ms"),
            (999, "999ms"),
            (1_250, "1.2s"),
            (59_999, "59.9s"),
            (754_000, "12m34s"),
        ] {
            assert_eq!(millis(ms), text, "{ms}ms");
        }
        assert_eq!(expires_in(None), NONE);
        assert_eq!(expires_in(Some(0)), "expired");
    }

    #[test]
    fn empty_lists_render_headers_only() {
        assert_eq!(
            workloads_table(&[]),
            "NAMESPACE   NAME   ADDRESSES   NODE   PROTOCOL   IDENTITY\n"
        );
        assert_eq!(connections_table(&[]).lines().count(), 1);
    }
}
