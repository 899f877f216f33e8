//! The DNS proxy (issue 18): every enrolled pod's `127.0.0.1:15053` answers service
//! hostnames from the store and forwards the rest to the upstream of
//! `--dns-resolv-conf`, from inside the pod; `dig` (bind9-dnsutils) is the real resolver
//! asking, a `podapp dns-upstream` in a plain pod the upstream.
use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;
use ztunnel_tests::{Pod, PodProcess, Topology, Ztunnel, metric_sample};

const DIG: &str = "/usr/bin/dig";

/// Runs `dig @127.0.0.1 -p 15053 <args>` in `pod` (one try, 10 s: a proxy that answers
/// at all answers far sooner) and returns its output.
fn dig(t: &mut Topology, pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["@127.0.0.1", "-p", "15053", "+tries=1", "+timeout=10"];
    all.extend_from_slice(args);
    t.spawn_program(pod, Path::new(DIG), &all)?
        .wait_ok()
        .with_context(|| format!("dig {} in {}", all.join(" "), pod.name))
}

struct Mesh {
    t: Topology,
    client: Pod,
    plain: Pod,
    /// The upstream resolver's pod.
    dns: Pod,
    z: Ztunnel,
    vip: String,
    _upstream: Option<PodProcess>,
}

/// Node 1: `client` (enrolled), `plain` (not), `dns` (not; the upstream resolver, when
/// `upstream_up`); services `web` (one VIP), `wide` (40 VIPs: too many for 512 bytes) and
/// `ext` (hostname `api.example.com`). ztunnel's resolv.conf names `nameserver`.
fn mesh(upstream_up: bool, timeout: &str) -> anyhow::Result<Mesh> {
    let mut t = Topology::new()?;
    let client = t.add_pod("client", true, false)?;
    let plain = t.add_pod("plain", false, false)?;
    let dns = t.add_pod("dns", false, false)?;
    let upstream = if upstream_up {
        let mut p = t.spawn(&dns, &["dns-upstream", &format!("{}:53", dns.ip4)])?;
        let line = p.read_line()?;
        anyhow::ensure!(
            line.starts_with("ready"),
            "upstream did not start: {line:?}"
        );
        Some(p)
    } else {
        None
    };
    let s = t.subnet();
    let vip = format!("10.{s}.250.10");
    let wide: Vec<String> = (1..=40).map(|i| format!("10.{s}.251.{i}")).collect();
    let mut yaml = t.workloads_yaml();
    yaml += &format!(
        "services:\n  - name: web\n    namespace: default\n    addresses: [{vip}]\n    ports: [{{port: 80}}]\n    selector: {{ app: client }}\n  - name: wide\n    namespace: default\n    addresses: [{}]\n    ports: [{{port: 80}}]\n  - name: ext\n    namespace: default\n    hostname: api.example.com\n    addresses: [240.240.{s}.5]\n    ports: [{{port: 443}}]\n",
        wide.join(", ")
    );
    let file = t.dir.path().join("with-services.yaml");
    std::fs::write(&file, &yaml)?;
    // Upstream down: an address on the pods' subnet that nobody has (no answer at all).
    let nameserver = if upstream_up {
        dns.ip4.to_string()
    } else {
        format!("10.{s}.1.250")
    };
    let resolv = t.dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("search default.svc.cluster.local\nnameserver {nameserver}\n"),
    )?;
    t.ztunnel_env.push((
        "ZTUNNEL_DNS_RESOLV_CONF".to_owned(),
        resolv.display().to_string(),
    ));
    t.ztunnel_env.push((
        "ZTUNNEL_DNS_UPSTREAM_TIMEOUT".to_owned(),
        timeout.to_owned(),
    ));
    let z = t.start_ztunnel_with_file("node1", false, &file)?;
    Ok(Mesh {
        t,
        client,
        plain,
        dns,
        z,
        vip,
        _upstream: upstream,
    })
}

/// Runs `cmd` in `pod` with `resolv` bind-mounted on `/etc/resolv.conf` (in a mount
/// namespace of its own, as a container has its own file) and returns its output.
fn with_resolv(t: &mut Topology, pod: &Pod, resolv: &Path, cmd: &[&str]) -> anyhow::Result<String> {
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$@\"",
        resolv.display()
    );
    let mut args = vec!["-m", "--propagation", "private", "sh", "-c", &script, "sh"];
    args.extend_from_slice(cmd);
    t.spawn_program(pod, Path::new("/usr/bin/unshare"), &args)?
        .wait_ok()
        .with_context(|| {
            format!(
                "{} in {} with {}",
                cmd.join(" "),
                pod.name,
                resolv.display()
            )
        })
}

/// `podapp dns-query` in `pod`: `(answer's source, rcode, A records)`.
fn query(
    t: &mut Topology,
    pod: &Pod,
    server: SocketAddr,
    name: &str,
    tcp: bool,
) -> anyhow::Result<(String, String, String)> {
    let server = server.to_string();
    let mut args = vec!["dns-query", server.as_str(), name];
    if tcp {
        args.push("--tcp");
    }
    let out = t.spawn(pod, &args)?.wait_ok()?;
    let field = |k: &str| {
        out.trim_end()
            .split(&format!("{k}="))
            .nth(1)
            .map(|v| {
                v.split(" rcode=")
                    .next()
                    .unwrap_or(v)
                    .split(" a=")
                    .next()
                    .unwrap_or(v)
                    .to_owned()
            })
            .unwrap_or_default()
    };
    Ok((field("from"), field("rcode"), field("a")))
}

fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
}

/// The `A` records' addresses in dig's answer section.
fn a_records(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[3] == "A").then(|| f[4].to_owned())
        })
        .collect()
}

#[test]
fn enrolled_pod_resolves_services_locally_and_forwards_the_rest() -> anyhow::Result<()> {
    let Mesh {
        mut t,
        client,
        plain,
        z,
        vip,
        dns: _,
        _upstream,
    } = mesh(true, "5s")?;

    // Every form a pod asks for a service in: the full name, the short names, the name
    // with a search domain appended.
    for name in [
        "web.default.svc.cluster.local",
        "web",
        "web.default",
        "web.default.svc",
    ] {
        let out = dig(&mut t, &client, &[name, "A"])?;
        assert_eq!(status(&out), "NOERROR", "{name}: {out}");
        assert_eq!(a_records(&out), [vip.clone()], "{name}: {out}");
        assert!(
            out.contains("flags: qr aa rd ra"),
            "{name}: authoritative: {out}"
        );
        assert!(
            out.contains("SERVER: 127.0.0.1#15053(127.0.0.1) (UDP)"),
            "{name}: {out}"
        );
    }
    let out = dig(
        &mut t,
        &client,
        &["api.example.com.default.svc.cluster.local"],
    )?;
    assert_eq!(
        a_records(&out),
        [format!("240.240.{}.5", t.subnet())],
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            .split_whitespace()
            .rev()
            .take(2)
            .eq(["api.example.com.", "CNAME"])),
        "{out}"
    );
    // A known name without an address of the family: NOERROR, no records.
    let out = dig(&mut t, &client, &["web.default.svc.cluster.local", "AAAA"])?;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    // Over TCP too.
    let out = dig(&mut t, &client, &["+tcp", "web.default.svc.cluster.local"])?;
    assert_eq!(a_records(&out), [vip.clone()], "{out}");
    // 40 VIPs do not fit in 512 bytes: truncated over UDP, whole over TCP.
    let out = dig(
        &mut t,
        &client,
        &["+noedns", "wide.default.svc.cluster.local"],
    )?;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(a_records(&out).len(), 40, "{out}");

    // Names the mesh does not know go upstream, answered as the upstream answers.
    let out = dig(&mut t, &client, &["external.example.org"])?;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert_eq!(a_records(&out), ["198.51.100.7"], "{out}");
    let out = dig(&mut t, &client, &["nothing.example.org"])?;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    // The upstream truncates: the pod's retry over TCP is forwarded over TCP.
    let out = dig(&mut t, &client, &["+noedns", "big.example.org"])?;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(a_records(&out).len(), 60, "{out}");

    // Counted by pod: 9 local (4 forms of `web`, `api…`, AAAA, TCP, `wide` over UDP and
    // again over TCP), 4 forwarded (`big` twice).
    let d = z.dump()?;
    assert!(d.dns.enabled);
    let stats = d
        .dns
        .pods
        .get(&client.key())
        .context("client's DNS counters")?;
    assert_eq!(stats.answered_locally, 9, "{:?}", d.dns);
    assert_eq!(stats.forwarded, 4, "{:?}", d.dns);
    assert_eq!(stats.failures, 0, "{:?}", d.dns);
    assert_eq!(stats.queries, 13, "{:?}", d.dns);
    assert_eq!(d.config["dnsProxy"], true);
    let metrics = z.metrics_text()?;
    let udp_a = [("request_protocol", "udp"), ("request_query_type", "a")];
    assert!(
        metric_sample(&metrics, "istio_dns_requests_total", &udp_a).unwrap_or(0) >= 8,
        "{metrics}"
    );
    assert_eq!(
        metric_sample(
            &metrics,
            "istio_dns_upstream_requests_total",
            &[
                ("request_protocol", "tcp"),
                ("source_canonical_service", "client")
            ]
        ),
        Some(1),
        "{metrics}"
    );

    // A pod outside the mesh has no proxy on its :15053.
    let err = dig(&mut t, &plain, &["web.default.svc.cluster.local"])
        .expect_err("no DNS proxy in a pod outside the mesh");
    assert!(
        format!("{err:#}").contains("refused"),
        "dig in the plain pod: {err:#}"
    );
    Ok(())
}

#[test]
fn upstream_down_answers_servfail_within_the_timeout_and_the_next_query_works() -> anyhow::Result<()>
{
    let Mesh {
        mut t,
        client,
        z,
        vip,
        plain: _,
        dns: _,
        _upstream,
    } = mesh(false, "1s")?;
    // dig waits 10 s: a SERVFAIL means ztunnel gave up on the upstream itself.
    for _ in 0..2 {
        let out = dig(&mut t, &client, &["external.example.org"])?;
        assert_eq!(status(&out), "SERVFAIL", "{out}");
        let out = dig(&mut t, &client, &["+tcp", "external.example.org"])?;
        assert_eq!(status(&out), "SERVFAIL", "{out}");
        // The mesh's names do not need the upstream.
        let out = dig(&mut t, &client, &["web"])?;
        assert_eq!(a_records(&out), [vip.clone()], "{out}");
    }
    let d = z.dump()?;
    let stats = d
        .dns
        .pods
        .get(&client.key())
        .context("client's DNS counters")?;
    assert_eq!((stats.forwarded, stats.failures), (4, 4), "{:?}", d.dns);
    assert_eq!(
        d.dns.upstreams,
        [format!("10.{}.1.250:53", t.subnet()).parse::<SocketAddr>()?]
    );
    assert_eq!(
        z.metric(
            "istio_dns_upstream_failures_total",
            &[("request_protocol", "udp")]
        )?,
        2
    );
    let log = z.log_text();
    assert!(
        log.contains("DNS query answered SERVFAIL") && log.contains("no answer within"),
        "{log}"
    );
    Ok(())
}

#[test]
fn dns_capture_off_leaves_the_pods_port_alone() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let client = t.add_pod("client", true, false)?;
    t.ztunnel_env
        .push(("ZTUNNEL_DNS_CAPTURE".to_owned(), "false".to_owned()));
    let z = t.start_ztunnel(false)?;
    let err = dig(&mut t, &client, &["web.default.svc.cluster.local"])
        .expect_err("no DNS proxy with --dns-capture=false");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    let d = z.dump()?;
    assert!(!d.dns.enabled && d.dns.pods.is_empty(), "{:?}", d.dns);
    assert_eq!(d.config["dnsProxy"], false);
    Ok(())
}

#[test]
fn captured_queries_reach_the_proxy_and_answers_come_from_the_server_asked() -> anyhow::Result<()> {
    let Mesh {
        mut t,
        client,
        plain,
        dns,
        z,
        vip,
        _upstream,
    } = mesh(true, "5s")?;
    let server = SocketAddr::new(dns.ip4.into(), 53);
    // A Kubernetes pod's resolv.conf (ClusterFirst), its nameserver the cluster's DNS.
    let resolv = t.dir.path().join("pod-resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver {}\noptions ndots:5\n",
            dns.ip4
        ),
    )?;

    // glibc drops an answer whose source is not the server it asked: it resolves.
    let out = with_resolv(&mut t, &client, &resolv, &["getent", "hosts", "web"])?;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        [vip.as_str(), "web.default.svc.cluster.local"],
        "{out}"
    );
    let out = with_resolv(
        &mut t,
        &client,
        &resolv,
        &["getent", "hosts", "external.example.org"],
    )?;
    assert!(out.starts_with("198.51.100.7 "), "{out}");
    // dig over UDP and TCP, to the resolv.conf server.
    for proto in ["+notcp", "+tcp"] {
        let out = with_resolv(
            &mut t,
            &client,
            &resolv,
            &[
                DIG,
                proto,
                "+tries=1",
                "+timeout=10",
                "web.default.svc.cluster.local",
            ],
        )?;
        assert_eq!(a_records(&out), [vip.clone()], "{proto}: {out}");
        assert!(out.contains(&format!("SERVER: {}#53", dns.ip4)), "{out}");
    }

    // The answer's source is the server asked (unconnected UDP: recvfrom), and a TCP
    // connection's peer is the server too.
    let web = "web.default.svc.cluster.local";
    assert_eq!(
        query(&mut t, &client, server, web, false)?,
        (server.to_string(), "No Error".to_owned(), vip.clone())
    );
    assert_eq!(
        query(&mut t, &client, server, web, true)?,
        (server.to_string(), "No Error".to_owned(), vip.clone())
    );
    // Any server the pod names is the proxy's: a made-up one answers too.
    let other: SocketAddr = "192.0.2.53:53".parse()?;
    assert_eq!(
        query(&mut t, &client, other, web, false)?,
        (other.to_string(), "No Error".to_owned(), vip.clone())
    );

    // A pod outside the mesh asks the upstream itself: it does not know the service.
    assert_eq!(
        query(&mut t, &plain, server, web, false)?,
        (
            server.to_string(),
            "Non-Existent Domain".to_owned(),
            String::new()
        )
    );
    assert!(with_resolv(&mut t, &plain, &resolv, &["getent", "hosts", "web"]).is_err());

    let d = z.dump()?;
    let stats = d
        .dns
        .pods
        .get(&client.key())
        .context("client's DNS counters")?;
    // glibc's search list and A/AAAA pairs make the exact numbers its own business.
    assert!(
        stats.answered_locally >= 7 && stats.forwarded >= 1 && stats.failures == 0,
        "{:?}",
        d.dns
    );
    assert!(!d.dns.pods.contains_key(&plain.key()), "{:?}", d.dns);
    let counter = |k: &str| d.capture.counters.get(k).copied().unwrap_or(0);
    assert!(counter("dns_captured") >= 7, "{:?}", d.capture.counters);
    assert!(
        counter("dns_answer_restored") >= 5,
        "{:?}",
        d.capture.counters
    );
    assert_eq!(counter("dns_refused"), 0, "{:?}", d.capture.counters);
    Ok(())
}
