//! The DNS proxy (issue 18): every enrolled pod's `127.0.0.1:15053` answers service
//! hostnames from the store and forwards the rest to the upstream of
//! `--dns-resolv-conf`, from inside the pod; `dig` (bind9-dnsutils) is the real resolver
//! asking, a `podapp dns-upstream` in a plain pod the upstream.
use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;
use ztunnel_tests::{Pod, PodProcess, Topology, Ztunnel, metric_sample};

const DIG: &str = "/usr/bin/dig";

/// `pod`'s DNS counters in the dump.
fn pod_counters<'d>(
    d: &'d ztunnel::admin::ConfigDump,
    pod: &Pod,
) -> anyhow::Result<&'d ztunnel::dns::PodStatsDump> {
    d.dns
        .pods
        .get(&pod.key())
        .with_context(|| format!("no DNS counters for {} in {:?}", pod.key(), d.dns))
}

/// What [`query`] returns for an answer NXDOMAIN from `server`.
fn nxdomain_from(server: SocketAddr) -> (String, String, String) {
    (
        server.to_string(),
        "Non-Existent Domain".to_owned(),
        String::new(),
    )
}

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
    /// The upstream resolver; it stops when dropped (bind it: `..` would drop it).
    _upstream: Option<PodProcess>,
}

/// Node 1: `client` (enrolled), `plain` (not), `dns` (not; the upstream resolver, when
/// `upstream_up`); services `web` (one VIP), `wide` (40 VIPs: too many for 512 bytes) and
/// `ext` (hostname `api.example.com`). ztunnel's resolv.conf names `nameserver`.
fn mesh(upstream_up: bool, timeout: &str) -> anyhow::Result<Mesh> {
    mesh_with(upstream_up, timeout, |_| {})
}

/// [`mesh`], with `setup` changing the topology before ztunnel starts.
fn mesh_with(
    upstream_up: bool,
    timeout: &str,
    setup: impl FnOnce(&mut Topology),
) -> anyhow::Result<Mesh> {
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
    setup(&mut t);
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

/// `podapp dns-query` in `pod`: `(answer's source, rcode, A records)`. `how`: `""`
/// (unconnected UDP), `"--connect"` (connected UDP) or `"--tcp"`.
pub fn query(
    t: &mut Topology,
    pod: &Pod,
    server: SocketAddr,
    name: &str,
    how: &str,
) -> anyhow::Result<(String, String, String)> {
    let server = server.to_string();
    let mut args = vec!["dns-query", server.as_str(), name];
    if !how.is_empty() {
        args.push(how);
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
        assert_eq!(a_records(&out), [vip.as_str()], "{name}: {out}");
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
    assert_eq!(a_records(&out), [vip.as_str()], "{out}");
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
    let stats = pod_counters(&d, &client)?;
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
        assert_eq!(a_records(&out), [vip.as_str()], "{out}");
    }
    let d = z.dump()?;
    let stats = pod_counters(&d, &client)?;
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
    // The log is written by a thread of its own: wait for the (rate-limited) line.
    z.wait_log_line("DNS query answered SERVFAIL")?;
    let log = z.log_text();
    assert!(
        log.contains("DNS query answered SERVFAIL") && log.contains("no answer within"),
        "{log}"
    );
    Ok(())
}

#[test]
fn dns_capture_off_leaves_the_pods_dns_alone() -> anyhow::Result<()> {
    let Mesh {
        mut t,
        client,
        dns,
        z,
        _upstream,
        ..
    } = mesh_with(true, "5s", |t| {
        t.ztunnel_env
            .push(("ZTUNNEL_DNS_CAPTURE".to_owned(), "false".to_owned()));
    })?;
    // No proxy on the pod's :15053.
    let err = dig(&mut t, &client, &["web.default.svc.cluster.local"])
        .expect_err("no DNS proxy with --dns-capture=false");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    // The pod's queries go to the server it names, which does not know the service.
    let server = SocketAddr::new(dns.ip4.into(), 53);
    for how in ["", "--connect", "--tcp"] {
        assert_eq!(
            query(
                &mut t,
                &client,
                server,
                "web.default.svc.cluster.local",
                how
            )?,
            (
                server.to_string(),
                "Non-Existent Domain".to_owned(),
                String::new()
            ),
            "{how}"
        );
    }
    let d = z.dump()?;
    assert!(!d.dns.enabled && d.dns.pods.is_empty(), "{:?}", d.dns);
    assert_eq!(d.config["dnsProxy"], false);
    assert_eq!(
        d.capture.counters.get("dns_captured").copied().unwrap_or(0),
        0
    );
    Ok(())
}

/// The iptables fallback sends port 53 to the proxy too; conntrack gives the answers the
/// server's address back.
#[test]
fn iptables_capture_sends_dns_to_the_proxy() -> anyhow::Result<()> {
    let Mesh {
        mut t,
        client,
        plain,
        dns,
        z,
        vip,
        _upstream,
    } = mesh_with(true, "5s", |t| t.capture = Some("iptables".to_owned()))?;
    assert_eq!(z.dump()?.capture.mode, "iptables");
    let server = SocketAddr::new(dns.ip4.into(), 53);
    let web = "web.default.svc.cluster.local";
    for how in ["", "--connect", "--tcp"] {
        assert_eq!(
            query(&mut t, &client, server, web, how)?,
            (server.to_string(), "No Error".to_owned(), vip.clone()),
            "{how}"
        );
    }
    assert_eq!(
        query(&mut t, &plain, server, web, "")?,
        nxdomain_from(server)
    );
    let d = z.dump()?;
    let stats = pod_counters(&d, &client)?;
    assert_eq!(stats.answered_locally, 3, "{:?}", d.dns);
    Ok(())
}

/// A Kubernetes pod's resolv.conf (ClusterFirst), its nameserver the cluster's DNS.
fn pod_resolv_conf(t: &Topology, server: &Pod) -> anyhow::Result<std::path::PathBuf> {
    let resolv = t.dir.path().join("pod-resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver {}\noptions ndots:5\n",
            server.ip4
        ),
    )?;
    Ok(resolv)
}

/// Kernel capture with podapp alone (it runs in the VM matrix too): an enrolled pod's
/// queries to any port-53 server are the proxy's, over unconnected UDP, connected UDP
/// and TCP, and every answer comes from the server the pod asked.
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
    let web = "web.default.svc.cluster.local";
    let found = |from: SocketAddr, a: &str| (from.to_string(), "No Error".to_owned(), a.to_owned());
    for how in ["", "--connect", "--tcp"] {
        assert_eq!(
            query(&mut t, &client, server, web, how)?,
            found(server, &vip),
            "{how}"
        );
        // Forwarded, and the upstream's answer too comes from the server asked.
        assert_eq!(
            query(&mut t, &client, server, "external.example.org", how)?,
            found(server, "198.51.100.7"),
            "{how}"
        );
    }
    // Any server the pod names is the proxy's: a made-up one answers too.
    let other: SocketAddr = "192.0.2.53:53".parse()?;
    for how in ["", "--connect"] {
        assert_eq!(
            query(&mut t, &client, other, web, how)?,
            found(other, &vip),
            "{how}"
        );
    }
    // Another port is not DNS: not captured (the upstream has nothing on :5353).
    let err = query(
        &mut t,
        &client,
        SocketAddr::new(dns.ip4.into(), 5353),
        web,
        "",
    )
    .expect_err("port 5353 is not captured");
    assert!(format!("{err:#}").contains("no answer"), "{err:#}");

    // A pod outside the mesh asks the upstream itself: it does not know the service.
    assert_eq!(
        query(&mut t, &plain, server, web, "")?,
        nxdomain_from(server)
    );

    let d = z.dump()?;
    let stats = pod_counters(&d, &client)?;
    assert_eq!(
        (stats.answered_locally, stats.forwarded, stats.failures),
        (5, 3, 0),
        "{:?}",
        d.dns
    );
    assert!(!d.dns.pods.contains_key(&plain.key()), "{:?}", d.dns);
    let counter = |k: &str| d.capture.counters.get(k).copied().unwrap_or(0);
    // UDP: 2 × 2 sends and 2 connects captured; TCP: 2 connects.
    assert_eq!(counter("dns_captured"), 8, "{:?}", d.capture.counters);
    // Unconnected UDP answers read with their source (recvfrom): 3; a connected
    // socket's recv asks for no source, its getpeername answers from the map.
    assert!(
        counter("dns_answer_restored") >= 3,
        "{:?}",
        d.capture.counters
    );
    assert_eq!(counter("dns_refused"), 0, "{:?}", d.capture.counters);
    Ok(())
}

/// Real resolvers through the capture: glibc (which drops an answer whose source is not
/// the server it asked) with a Kubernetes pod's search list, and dig over UDP and TCP.
#[test]
fn glibc_and_dig_resolve_mesh_names_through_the_capture() -> anyhow::Result<()> {
    let Mesh {
        mut t,
        client,
        plain,
        dns,
        z: _z,
        vip,
        _upstream,
    } = mesh(true, "5s")?;
    let resolv = pod_resolv_conf(&t, &dns)?;
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
        &["getent", "hosts", "api.example.com"],
    )?;
    assert!(
        out.starts_with(&format!("240.240.{}.5 ", t.subnet())),
        "{out}"
    );
    let out = with_resolv(
        &mut t,
        &client,
        &resolv,
        &["getent", "hosts", "external.example.org"],
    )?;
    assert!(out.starts_with("198.51.100.7 "), "{out}");
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
        assert_eq!(a_records(&out), [vip.as_str()], "{proto}: {out}");
        assert!(out.contains(&format!("SERVER: {}#53", dns.ip4)), "{out}");
    }
    // Outside the mesh the cluster's DNS (here: the fake upstream) does not know it.
    assert!(with_resolv(&mut t, &plain, &resolv, &["getent", "hosts", "web"]).is_err());
    Ok(())
}

/// A service with only a hostname (ServiceEntry-like) gets an auto-allocated VIP: an
/// enrolled pod resolves the name to it and its connections to that VIP reach the
/// service's endpoint over HBONE.
#[test]
fn hostname_only_service_resolves_to_its_auto_vip_and_is_reached_by_name() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let client = t.add_pod("client", true, false)?;
    let server = t.add_pod("server", true, false)?;
    let _srv = t.serve(&server, server.addr(8080))?;
    let mut yaml = t.workloads_yaml();
    yaml += "services:\n  - name: db\n    namespace: default\n    hostname: db.example.internal\n    addresses: []\n    ports: [{port: 80, targetPort: 8080}]\n    selector: { app: server }\n";
    let file = t.dir.path().join("hostname-service.yaml");
    std::fs::write(&file, &yaml)?;
    let z = t.start_ztunnel_with_file("node1", false, &file)?;

    let d = z.dump()?;
    let svc = d
        .services
        .iter()
        .find(|s| s.hostname == "db.example.internal")
        .context("the hostname service")?;
    let [vip] = svc.vips.as_slice() else {
        panic!("one auto-allocated VIP: {svc:?}");
    };
    let vip = vip.rsplit('/').next().unwrap_or(vip).to_owned();
    assert!(vip.starts_with("240.240."), "{vip}");

    // Any server the pod asks (captured), with the pod's search list appended or not.
    let asked: SocketAddr = "192.0.2.53:53".parse()?;
    for name in [
        "db.example.internal",
        "db.example.internal.default.svc.cluster.local",
    ] {
        assert_eq!(
            query(&mut t, &client, asked, name, "")?,
            (asked.to_string(), "No Error".to_owned(), vip.clone()),
            "{name}"
        );
    }
    let dst: SocketAddr = format!("{vip}:80").parse()?;
    let out = t.call(&client, dst, &["--bytes", "3000"])?;
    assert!(out.contains("match=true"), "{out}");
    let d = z.wait_for("the connection to the hostname service", |d| {
        d.connections
            .list
            .iter()
            .any(|r| r.dst == dst && r.outcome.is_some())
    })?;
    let rec = d
        .connections
        .list
        .iter()
        .find(|r| r.dst == dst && r.outcome.is_some())
        .context("record")?;
    assert_eq!(rec.outcome.as_deref(), Some("ok"), "{rec:?}");
    assert_eq!(rec.security_policy, "mutual_tls", "{rec:?}");
    assert_eq!(
        rec.dst_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/server")
    );
    Ok(())
}

/// Back-to-back queries, answered locally and forwarded, captured: every one is
/// answered right and none fails. The rates and latencies are printed (information
/// only: this shared machine's speed is nobody's assertion).
#[test]
fn sustained_queries_are_all_answered_locally_and_forwarded() -> anyhow::Result<()> {
    let Mesh {
        mut t,
        client,
        dns,
        z,
        vip,
        _upstream,
        ..
    } = mesh(true, "5s")?;
    let server = SocketAddr::new(dns.ip4.into(), 53).to_string();
    let mut total = 0u64;
    for (what, name, expect) in [
        ("local", "web.default.svc.cluster.local", vip.as_str()),
        ("forwarded", "external.example.org", "198.51.100.7"),
    ] {
        let out = t
            .spawn(
                &client,
                &["dns-rr", &server, name, "--expect", expect, "--secs", "2"],
            )?
            .wait_ok()?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        println!("dns {what}: {v}");
        assert_eq!(v["wrong"], 0, "{what}: {v}");
        let n = v["queries"].as_u64().context("queries")?;
        assert!(n > 0, "{what}: {v}");
        total += n;
    }
    let d = z.dump()?;
    let stats = pod_counters(&d, &client)?;
    assert_eq!(stats.queries, total, "{:?}", d.dns);
    assert_eq!(stats.failures, 0, "{:?}", d.dns);
    Ok(())
}

/// With the original-destination map full (a flood of connections) an enrolled pod's
/// DNS query is refused (EPERM), never sent uncaptured to the server; with room again it
/// is captured as usual.
#[test]
fn full_orig_dst_map_refuses_dns_queries_and_none_goes_direct() -> anyhow::Result<()> {
    let Mesh {
        mut t,
        client,
        dns,
        z,
        vip,
        _upstream,
        ..
    } = mesh(true, "5s")?;
    let full = ztunnel_tests::FilledOrigDstMap::fill(&z)?;
    let server = SocketAddr::new(dns.ip4.into(), 53);
    let web = "web.default.svc.cluster.local";
    for how in ["", "--connect"] {
        let err = query(&mut t, &client, server, web, how)
            .expect_err("a query must not be sent with the map full");
        assert!(
            format!("{err:#}").contains("Operation not permitted"),
            "{how}: {err:#}"
        );
    }
    let d = z.dump()?;
    assert_eq!(
        d.capture.counters["dns_refused"], 2,
        "{:?}",
        d.capture.counters
    );
    assert_eq!(
        d.capture.counters["dns_captured"], 0,
        "{:?}",
        d.capture.counters
    );
    // Nothing reached the proxy (the sends failed in the kernel).
    assert!(d.dns.pods[&client.key()].queries == 0, "{:?}", d.dns);

    full.empty()?;
    assert_eq!(
        query(&mut t, &client, server, web, "")?,
        (server.to_string(), "No Error".to_owned(), vip.clone())
    );
    Ok(())
}
