//! Istio's operator surfaces after a scripted transfer: the access log, `/metrics` and
//! `/config_dump` in the shapes Istio's ztunnel gives them (issue 19). Two nodes: `a`
//! (with a locality) on node1 uploads into `b` on node2 through service `b`'s VIP, is
//! denied on b's :9090 and fails to connect to b's closed :7070.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ztunnel_tests::{Topology, Ztunnel, http, istioctl, metric_sample};

const VIP: &str = "10.96.19.1";
const UPLOAD: u64 = 100_000;

/// The fields of Istio's "connection complete" line, in its order (istio/ztunnel
/// `src/proxy/metrics.rs`); unknown values are left out, `error` only on failures.
const ACCESS_FIELDS: [&str; 17] = [
    "src.addr",
    "src.workload",
    "src.namespace",
    "src.identity",
    "src.cluster",
    "dst.addr",
    "dst.hbone_addr",
    "dst.service",
    "dst.workload",
    "dst.namespace",
    "dst.identity",
    "dst.cluster",
    "direction",
    "bytes_sent",
    "bytes_recv",
    "duration",
    "error",
];

/// An access line: its level and its `key=value` fields in order (values unquoted).
struct Access {
    level: String,
    fields: Vec<(String, String)>,
}

impl Access {
    fn parse(line: &str) -> Option<Access> {
        let cols: Vec<&str> = line.splitn(5, '\t').collect();
        if cols.len() != 5 || cols[2] != "access" || cols[3] != "connection complete" {
            return None;
        }
        let mut fields = Vec::new();
        let mut rest = cols[4];
        while !rest.is_empty() {
            let (key, after) = rest.split_once('=')?;
            let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
                let end = quoted.find('"')?;
                (&quoted[..end], quoted[end + 1..].trim_start())
            } else {
                after.split_once(' ').unwrap_or((after, ""))
            };
            fields.push((key.to_owned(), value.to_owned()));
            rest = next;
        }
        Some(Access {
            level: cols[1].to_owned(),
            fields,
        })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Waits for an access line of `z` that `pick` accepts.
fn access_line(z: &Ztunnel, what: &str, pick: impl Fn(&Access) -> bool) -> anyhow::Result<Access> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = z.log_text();
        if let Some(a) = log.lines().filter_map(Access::parse).find(|a| pick(a)) {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("no access line for {what} in:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The label names of the first sample of `metric` whose labels include `labels`.
fn label_names(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<Vec<String>> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| {
            l.split_once('{')
                .and_then(|(_, r)| r.rsplit_once('}'))
                .map(|(inner, _)| {
                    inner
                        .split("\",")
                        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                        .collect()
                })
                .unwrap_or_default()
        })
}

#[test]
fn a_scripted_transfer_shows_istios_access_log_metrics_and_config_dump() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let _sink = t.serve_with(&b, b.addr(8080), &["--discard"])?;
    let _echo = t.serve(&b, b.addr(9090))?;
    let yaml = t.workloads_yaml().replace(
        "    serviceAccount: a\n",
        "    serviceAccount: a\n    locality: { region: eu-west1, zone: eu-west1-b }\n",
    );
    t.write_workloads_text(&format!(
        "{yaml}services:
  - name: b
    namespace: default
    addresses: [{VIP}]
    ports: [{{ port: 80, targetPort: 8080 }}]
    selector: {{ app: b }}
policies:
  - name: deny-9090
    namespace: default
    scope: WORKLOAD_SELECTOR
    selector: {{ app: b }}
    action: DENY
    rules:
      - to:
          - destinationPorts: [9090]
"
    ))?;
    let file = t.workloads_path();
    let z1 = t.start_ztunnel_with_file("node1", false, &file)?;
    let z2 = t.start_ztunnel_with_file("node2", false, &file)?;

    // 1. An upload into b through the service VIP: b's sink answers nothing.
    let vip: std::net::SocketAddr = format!("{VIP}:80").parse()?;
    let out = t
        .spawn(
            &a,
            &["upload", &vip.to_string(), "--bytes", &UPLOAD.to_string()],
        )?
        .wait_ok()?;
    assert!(out.contains(&format!("sent={UPLOAD} received=0")), "{out}");
    let (ida, idb) = (
        "spiffe://cluster.local/ns/default/sa/a",
        "spiffe://cluster.local/ns/default/sa/b",
    );
    let outbound = access_line(&z1, "the upload (outbound)", |l| {
        l.get("direction") == Some("outbound") && l.get("dst.hbone_addr").is_some()
    })?;
    let inbound = access_line(&z2, "the upload (inbound)", |l| {
        l.get("direction") == Some("inbound") && l.get("bytes_recv") == Some("100000")
    })?;
    let no_error: Vec<&str> = ACCESS_FIELDS[..16].to_vec();
    for line in [&outbound, &inbound] {
        assert_eq!(line.level, "info");
        assert_eq!(line.keys(), no_error, "Istio's fields in Istio's order");
        assert_eq!(line.get("src.workload"), Some("a"));
        assert_eq!(line.get("src.namespace"), Some("default"));
        assert_eq!(line.get("src.identity"), Some(ida));
        assert_eq!(line.get("src.cluster"), Some("Kubernetes"));
        assert_eq!(line.get("dst.workload"), Some("b"));
        assert_eq!(line.get("dst.identity"), Some(idb));
        assert_eq!(line.get("dst.service"), Some("b.default.svc.cluster.local"));
        assert_eq!(
            line.get("dst.addr"),
            Some(b.addr(15008).to_string().as_str())
        );
        assert_eq!(
            line.get("dst.hbone_addr"),
            Some(b.addr(8080).to_string().as_str())
        );
        assert!(line.get("duration").is_some_and(|d| d.ends_with("ms")));
    }
    // The outbound line's source is the pod, not the loopback the connect was rewritten to.
    let src = outbound.get("src.addr").context("src.addr")?;
    assert!(src.starts_with(&format!("{}:", a.addr(0).ip())), "{src}");
    // Istio's byte directions: the upload is sent by the source, received by the destination.
    assert_eq!(outbound.get("bytes_sent"), Some("100000"));
    assert_eq!(outbound.get("bytes_recv"), Some("0"));
    assert_eq!(inbound.get("bytes_sent"), Some("0"));
    assert_eq!(inbound.get("bytes_recv"), Some("100000"));

    // 2. A denial (b's :9090 is denied by policy) and 3. a failed connect (:7070 is closed).
    let _ = t.call(&a, b.addr(9090), &[]);
    let _ = t.call(&a, b.addr(7070), &[]);
    let denied = access_line(&z2, "the denial", |l| {
        l.get("dst.hbone_addr") == Some(b.addr(9090).to_string().as_str())
    })?;
    assert_eq!(denied.level, "error");
    assert_eq!(denied.keys(), ACCESS_FIELDS.to_vec());
    assert!(
        denied.get("error").is_some_and(|e| e.contains("deny-9090")),
        "{:?}",
        denied.fields
    );
    let failed = access_line(&z2, "the failed connect", |l| {
        l.get("dst.hbone_addr") == Some(b.addr(7070).to_string().as_str())
    })?;
    assert_eq!(failed.level, "error");
    assert!(
        failed.get("error").is_some_and(|e| e.contains("connect")),
        "{:?}",
        failed.fields
    );

    // Metrics: Istio's families, label order, flags and locality.
    let text = z2.metrics_text()?;
    let dst_labels = [("reporter", "destination"), ("source_workload", "a")];
    assert_eq!(
        metric_sample(
            &text,
            "istio_tcp_received_bytes_total",
            &[
                ("reporter", "destination"),
                ("destination_service", "b.default.svc.cluster.local"),
                ("response_flags", "-"),
            ]
        ),
        Some(UPLOAD),
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reporter", "destination"), ("response_flags", "DENY"),]
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        metric_sample(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reporter", "destination"), ("response_flags", "CONNECT"),]
        ),
        Some(1),
        "{text}"
    );
    let names = label_names(&text, "istio_tcp_connections_opened_total", &dst_labels)
        .with_context(|| format!("no opened series:\n{text}"))?;
    assert_eq!(names, ztunnel::metrics::ISTIO_TCP_LABELS);
    assert!(
        metric_sample(
            &text,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_region", "eu-west1"),
                ("source_zone", "eu-west1-b"),
                ("destination_region", "unknown"),
            ]
        )
        .is_some_and(|n| n >= 3),
        "{text}"
    );
    for family in [
        "# TYPE istio_build gauge",
        "# TYPE istio_tcp_sockets_open gauge",
        "# TYPE process_open_fds gauge",
        "# TYPE process_max_fds gauge",
        "# TYPE tokio_num_workers gauge",
        "# TYPE tokio_worker_park_count counter",
        "workload_manager_active_proxy_count 1",
        "workload_manager_proxies_started_total 1",
        // node1's pooled HBONE connection, idle but held by b's :15008.
        r#"istio_tcp_sockets_open{reporter="destination"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == family),
            "missing {family:?}:\n{text}"
        );
    }

    // /config_dump as istioctl ztunnel-config reads it.
    let body = http(z1.admin, "GET", "/config_dump")?;
    let dump = istioctl::Dump::parse(&body)?;
    let workloads = dump.workloads_table();
    for (pod, node) in [(&a, "node1"), (&b, "node2")] {
        let ip = pod.addr(0).ip().to_string();
        let row = [
            "default",
            pod.name.as_str(),
            ip.as_str(),
            node,
            "None",
            "HBONE",
        ];
        assert!(
            workloads
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == row),
            "{row:?} in\n{workloads}"
        );
    }
    let services = dump.services_table();
    assert!(
        services
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["default", "b", VIP, "None", "1/1"]),
        "{services}"
    );
    let policies = dump.policies_table();
    assert!(
        policies
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["default", "deny-9090", "Deny", "WorkloadSelector"]),
        "{policies}"
    );
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let certs = dump.certificates_table(&now);
    for kind in ["Leaf", "Root"] {
        assert!(
            certs.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() == 7 && f[0] == ida && f[1] == kind && f[2] == "Available" && f[3] == "true"
            }),
            "{kind} row for {ida}:\n{certs}"
        );
    }
    let st = dump
        .workload_state
        .values()
        .next()
        .context("workloadState")?;
    assert_eq!((st.state.as_str(), st.info.name.as_str()), ("Up", "a"));
    Ok(())
}
