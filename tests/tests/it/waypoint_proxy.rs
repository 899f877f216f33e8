//! Our own waypoint (`ztunnel waypoint`, issue 17 build 2) between two nodes' ztunnels:
//! L7 policy, HTTPRoute splits, HTTP/1.1 and HTTP/2, metrics, TCP ports at L4.
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use ztunnel_tests::{Pod, PodProcess, Topology, metric_sample, waypoint::Waypoint};

/// node1: `a` (enrolled, the client) and `c` (enrolled, another client). node2: `b1`
/// and `b2` (enrolled, HTTP servers v1 and v2 on :8080, an echo server on :9000) and
/// `wp` (not enrolled: the waypoint's pod). Services: `db` (VIP :80 → 8080, port named
/// `http`; :9000 plain TCP) selecting b1 and naming the waypoint, `db-v1` and `db-v2`
/// (one each), `waypoint` selecting wp.
struct Mesh {
    t: Topology,
    a: Pod,
    c: Pod,
    b1: Pod,
    b2: Pod,
    wp: Pod,
    db: SocketAddr,
    _servers: Vec<PodProcess>,
}

/// The mesh above, with `v2_args` added to db v2's HTTP server.
fn mesh_with(v2_args: &[&str]) -> anyhow::Result<Mesh> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let c = t.add_pod_on(1, "c", true, false)?;
    let b1 = t.add_pod_on(2, "b1", true, false)?;
    let b2 = t.add_pod_on(2, "b2", true, false)?;
    let wp = t.add_pod_on(2, "wp", false, false)?;
    let db: SocketAddr = format!("10.{}.250.20:80", t.subnet()).parse()?;
    let mut servers = Vec::new();
    for (pod, name) in [(&b1, "v1"), (&b2, "v2")] {
        let addr = pod.addr(8080).to_string();
        let mut args = vec!["http-serve", addr.as_str(), "--name", name];
        if name == "v2" {
            args.extend_from_slice(v2_args);
        }
        let mut p = t.spawn(pod, &args)?;
        let line = p.read_line()?;
        anyhow::ensure!(
            line.starts_with("ready"),
            "http server in {}: {line}",
            pod.name
        );
        servers.push(p);
        servers.push(t.serve(pod, pod.addr(9000))?);
    }
    Ok(Mesh {
        t,
        a,
        c,
        b1,
        b2,
        wp,
        db,
        _servers: servers,
    })
}

/// The L7 config: a policy letting `a` GET `/orders/*` and nothing else (so POST is
/// refused), and a route sending 90% of db's requests to db-v1 and 10% to db-v2.
const L7: &str = r#"waypointPolicies:
  - name: orders-read
    namespace: default
    targetRefs: [{ kind: Service, group: "", name: db }]
    action: ALLOW
    rules:
      - from: [{ source: { principals: ["cluster.local/ns/default/sa/a"] } }]
        to: [{ operation: { methods: ["GET"], paths: ["/orders/*"] } }]
httpRoutes:
  - name: db-split
    namespace: default
    parentRefs: [{ kind: Service, group: "", name: db }]
    rules:
      - backendRefs:
          - { name: db-v1, port: 80, weight: 90 }
          - { name: db-v2, port: 80, weight: 10 }
"#;

/// A mesh whose file holds `config`, with both nodes' ztunnels and the waypoint
/// running; `v2_args` go to db v2's server, `waypoint_args` to the waypoint.
struct Running {
    m: Mesh,
    w: Waypoint,
    z1: ztunnel_tests::Ztunnel,
    z2: ztunnel_tests::Ztunnel,
}

fn running(config: &str, v2_args: &[&str], waypoint_args: &[&str]) -> anyhow::Result<Running> {
    let mut m = mesh_with(v2_args)?;
    m.write(config)?;
    let file = m.t.workloads_path();
    let z1 = m.t.start_ztunnel_with_file("node1", false, &file)?;
    let z2 = m.t.start_ztunnel_with_file("node2", false, &file)?;
    let mut source = Waypoint::file_source(&m.t);
    source.args(waypoint_args);
    let wp = m.wp.clone();
    let w = Waypoint::start_with(&mut m.t, &wp, "waypoint", source)?;
    Ok(Running { m, w, z1, z2 })
}

impl Mesh {
    fn write(&self, extra: &str) -> anyhow::Result<()> {
        let s = self.t.subnet();
        let yaml = format!(
            "{}services:
  - name: db
    namespace: default
    addresses: [{db}]
    ports: [{{port: 80, targetPort: 8080, name: http}}, {{port: 81, targetPort: 8080, name: http2-api}}, {{port: 9000}}]
    selector: {{ app: b1 }}
    waypoint: {{ hostname: waypoint.default.svc.cluster.local }}
  - name: db-v1
    namespace: default
    addresses: [10.{s}.250.21]
    ports: [{{port: 80, targetPort: 8080, name: http}}]
    selector: {{ app: b1 }}
  - name: db-v2
    namespace: default
    addresses: [10.{s}.250.22]
    ports: [{{port: 80, targetPort: 8080, appProtocol: http}}]
    selector: {{ app: b2 }}
  - name: waypoint
    namespace: default
    addresses: [10.{s}.250.15]
    ports: [{{port: 15008}}]
    selector: {{ app: wp }}
{extra}",
            self.t.workloads_yaml(),
            db = self.db.ip(),
        );
        self.t.write_workloads_text(&yaml)
    }

    /// `podapp http-get` from `pod` to db's VIP; its stdout.
    fn get(&mut self, pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
        let pod = pod.clone();
        let dst = self.db.to_string();
        let mut all = vec!["http-get", dst.as_str()];
        all.extend_from_slice(args);
        self.t.spawn(&pod, &all)?.wait_ok()
    }
}

/// The `summary {...}` line of `podapp http-get`.
fn summary(out: &str) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("summary "))
        .with_context(|| format!("no summary in {out}"))?;
    Ok(serde_json::from_str(line)?)
}

#[test]
fn l7_policy_allows_get_refuses_post_with_403_and_the_route_splits_90_10() -> anyhow::Result<()> {
    let Running { mut m, w, z1, z2 } = running(L7, &[], &[])?;
    let (a, c) = (m.a.clone(), m.c.clone());

    // 1,000 GETs over HTTP/1.1 on one connection: every one allowed, split exactly 90/10
    // (the waypoint takes backends in turns).
    let out = m.get(&a, &["--path", "/orders/7", "--count", "1000"])?;
    let got = summary(&out)?;
    assert_eq!(
        got,
        [("200 v1".to_owned(), 900), ("200 v2".to_owned(), 100)].into(),
        "{out}\n{}",
        w.log_text()
    );
    // The backend saw the client's Host and path.
    assert!(
        out.contains(&format!("GET /orders/7 HTTP/1.1 host={}", m.db)),
        "{out}"
    );

    // HTTP/2 from the client is served too (and policed the same).
    let out = m.get(&a, &["--path", "/orders/8", "--count", "10", "--h2"])?;
    let got = summary(&out)?;
    assert_eq!(got.values().sum::<usize>(), 10, "{out}");
    assert!(got.keys().all(|k| k.starts_with("200 ")), "{out}");

    // POST is not in the ALLOW policy: 403 with Istio's body, and never reaches a backend.
    let out = m.get(
        &a,
        &["--path", "/orders/7", "--method", "POST", "--body", "x"],
    )?;
    assert!(
        out.contains("status=403 body=RBAC: access denied"),
        "{out}\n{}",
        w.log_text()
    );
    // The same over HTTP/2.
    let out = m.get(
        &a,
        &[
            "--path",
            "/orders/7",
            "--method",
            "POST",
            "--body",
            "x",
            "--h2",
        ],
    )?;
    assert!(out.contains("status=403 body=RBAC: access denied"), "{out}");
    // Neither does a path outside /orders/, nor a client the policy does not name.
    let out = m.get(&a, &["--path", "/admin"])?;
    assert!(out.contains("status=403"), "{out}");
    let out = m.get(&c, &["--path", "/orders/7"])?;
    assert!(out.contains("status=403"), "{out}");
    // The path is normalised before policy sees it: `/orders/../admin` is `/admin`.
    let out = m.get(&a, &["--path", "/orders/../admin"])?;
    assert!(out.contains("status=403"), "{out}");
    // A path with an encoded NUL is refused outright, as Istio refuses it.
    let out = m.get(&a, &["--path", "/orders/%00"])?;
    assert!(out.contains("status=400"), "{out}");
    // db's TCP port: the ALLOW policy names only HTTP attributes, which no TCP stream
    // has, so nothing is allowed on it (Istio's rule for TCP): the connection fails.
    let tcp: SocketAddr = format!("{}:9000", m.db.ip()).parse()?;
    let res = m.t.call(&a, tcp, &["--bytes", "100"]);
    assert!(
        res.is_err(),
        "a TCP stream the policy does not allow went through: {res:?}"
    );

    // The waypoint's metrics count both outcomes with Istio's labels.
    let text = w.metrics()?;
    let ok = metric_sample(
        &text,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("response_code", "200"),
            ("destination_service", "db-v1.default.svc.cluster.local"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/a"),
        ],
    )
    .unwrap_or(0);
    assert!(ok >= 900, "{text}");
    let denied: u64 = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"403\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(denied, 5, "{text}");
    assert_eq!(
        metric_sample(&text, "ztunnel_waypoint_connections_denied_total", &[]),
        Some(1),
        "{text}"
    );

    // The tunnels into b1 and b2 came from the waypoint, not from a: b's ztunnel saw
    // the waypoint's identity.
    let d = z2.dump()?;
    assert!(
        d.connections
            .list
            .iter()
            .all(|r| r.src_identity.as_deref() == Some("spiffe://cluster.local/ns/default/sa/wp")),
        "{:?}",
        d.connections.list
    );
    assert!(!d.connections.list.is_empty());
    // And a's ztunnel sent everything to the waypoint.
    let d = z1.dump()?;
    assert!(
        d.connections
            .list
            .iter()
            .all(|r| r.hbone_addr == Some(m.wp.addr(15008))),
        "{:?}",
        d.connections.list
    );
    let _ = (&m.b1, &m.b2);
    Ok(())
}

/// Routes with a request timeout and a flaky backend (every 2nd answer 503); no policy.
const RESILIENCE: &str = r#"httpRoutes:
  - name: db-resilience
    namespace: default
    parentRefs: [{ kind: Service, group: "", name: db, port: 80 }]
    rules:
      - matches: [{ path: { type: PathPrefix, value: /slow } }]
        backendRefs: [{ name: db-v1, port: 80 }]
        timeouts: { request: 500ms }
      - matches: [{ path: { type: PathPrefix, value: /flaky } }]
        backendRefs: [{ name: db-v2, port: 80 }]
      - backendRefs: [{ name: db-v1, port: 80 }]
"#;

#[test]
fn the_waypoint_retries_a_failing_backend_times_out_slow_requests_and_passes_upgrades_http2_and_tcp()
-> anyhow::Result<()> {
    let Running {
        mut m,
        w,
        z1: _z1,
        z2: _z2,
    } = running(RESILIENCE, &["--fail-every", "2"], &[])?;
    let a = m.a.clone();

    // Every second answer of db v2 is a 503; Istio's default retry (2, on 503) hides
    // them: 20 requests, 20 times 200.
    let out = m.get(&a, &["--path", "/flaky/1", "--count", "20"])?;
    assert_eq!(
        summary(&out)?,
        [("200 v2".to_owned(), 20)].into(),
        "{out}\n{}",
        w.log_text()
    );
    // A request slower than the route's 500 ms request timeout: 504, Envoy's body.
    let out = m.get(&a, &["--path", "/slow/5000"])?;
    assert!(
        out.contains("status=504 body=upstream request timeout"),
        "{out}\n{}",
        w.log_text()
    );

    // An HTTP/1.1 upgrade (as WebSocket does) is joined through: 101, then bytes both ways.
    let dst = m.db.to_string();
    let out =
        m.t.spawn(&a, &["http-upgrade", &dst, "--bytes", "100000"])?
            .wait_ok()?;
    assert!(
        out.contains("status=101 sent=100000 received=100000 match=true"),
        "{out}\n{}",
        w.log_text()
    );

    // A port named `http2-…` goes to the backend as HTTP/2, whatever the client spoke.
    let h2 = format!("{}:81", m.db.ip());
    let out =
        m.t.spawn(&a, &["http-get", &h2, "--path", "/h2"])?
            .wait_ok()?;
    assert!(out.contains("status=200 body=v1 GET /h2 HTTP/2.0"), "{out}");

    // A port without an HTTP protocol is relayed at L4 to db's endpoint.
    let tcp: SocketAddr = format!("{}:9000", m.db.ip()).parse()?;
    let out = m.t.call(&a, tcp, &["--bytes", "20000"])?;
    assert!(out.contains("match=true"), "{out}\n{}", w.log_text());
    Ok(())
}

/// SIGTERM drains the waypoint as Istio's does: a request in flight is answered, new
/// connections are refused, and the waypoint exits once its connections have closed
/// (not at its drain timeout).
#[test]
fn sigterm_drains_the_waypoint_answering_what_is_in_flight() -> anyhow::Result<()> {
    let Running {
        mut m,
        mut w,
        z1: _z1,
        z2: _z2,
    } = running(RESILIENCE, &[], &["--drain-timeout", "120s"])?;
    let a = m.a.clone();
    // Warm: the tunnels are up.
    let out = m.get(&a, &["--path", "/orders/1"])?;
    assert!(out.contains("status=200"), "{out}\n{}", w.log_text());

    // A request the backend answers in 3 s (the route's timeout is for /slow only; this
    // path takes the default rule).
    let dst = m.db.to_string();
    let in_flight =
        m.t.spawn(&a, &["http-get", &dst, "--path", "/sleep/3000"])?;
    std::thread::sleep(Duration::from_millis(1000));
    w.terminate();
    let out = in_flight.wait_ok()?;
    assert!(
        out.contains("status=200"),
        "the request in flight during the drain: {out}\n{}",
        w.log_text()
    );
    // The waypoint no longer takes connections: a new call fails.
    let out = m.get(&a, &["--path", "/orders/2"]);
    assert!(
        out.as_ref().map_or(true, |o| !o.contains("status=200")),
        "a new request after SIGTERM: {out:?}"
    );
    assert!(
        w.wait_exit(100),
        "the waypoint did not exit:\n{}",
        w.log_text()
    );
    let log = w.log_text();
    assert!(log.contains("waypoint draining"), "{log}");
    assert!(
        log.contains("waypoint drained: every connection ended"),
        "the connections did not close before the drain timeout:\n{log}"
    );
    Ok(())
}

/// The waypoint's connection limit: with `--max-connections 1`, a's ztunnel holds the one
/// HBONE connection (pooled), c's is closed at once and counted; a is still served.
#[test]
fn the_waypoint_closes_connections_over_its_limit_and_counts_them() -> anyhow::Result<()> {
    let Running {
        mut m,
        w,
        z1: _z1,
        z2: _z2,
    } = running(RESILIENCE, &[], &["--max-connections", "1"])?;
    let (a, c) = (m.a.clone(), m.c.clone());
    let out = m.get(&a, &["--path", "/orders/1"])?;
    assert!(out.contains("status=200"), "{out}\n{}", w.log_text());
    // c is another pod: its ztunnel dials a connection of its own, one over the limit.
    let out = m.get(&c, &["--path", "/orders/1"]);
    assert!(
        out.as_ref().map_or(true, |o| !o.contains("status=200")),
        "c was served over the limit: {out:?}"
    );
    let text = w.metrics()?;
    assert!(
        metric_sample(&text, "ztunnel_waypoint_connections_over_limit_total", &[])
            .is_some_and(|n| n >= 1),
        "{text}"
    );
    assert_eq!(
        metric_sample(&text, "ztunnel_waypoint_connections", &[]),
        Some(1),
        "{text}"
    );
    let log = w.log_when(|l| l.contains("waypoint at its connection limit"));
    assert!(log.contains("waypoint at its connection limit"), "{log}");
    let out = m.get(&a, &["--path", "/orders/2"])?;
    assert!(
        out.contains("status=200"),
        "a's connection still serves: {out}"
    );
    Ok(())
}

/// A waypoint started with a `--pod` the config does not have cannot tell its own traffic
/// from anyone's: a request it sends on to db (which names the waypoint; no route here)
/// would go through the waypoint again, to itself.
/// It is refused (503, the reason in the access log) instead of looping.
#[test]
fn a_waypoint_that_does_not_know_its_own_pod_refuses_rather_than_loops() -> anyhow::Result<()> {
    let Running {
        mut m,
        w,
        z1: _z1,
        z2: _z2,
    } = running("", &[], &["--pod", "not-in-the-config"])?;
    let a = m.a.clone();
    let out = m.get(&a, &["--path", "/orders/1"])?;
    assert!(out.contains("status=503"), "{out}\n{}", w.log_text());
    let log = w.log_when(|l| {
        l.contains("not through a waypoint again") && l.contains("default/not-in-the-config")
    });
    assert!(
        log.contains("not through a waypoint again") && log.contains("default/not-in-the-config"),
        "{log}"
    );
    // One request in, one answer: nothing went round.
    let text = w.metrics()?;
    let total: u64 = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 1, "{text}");
    Ok(())
}
