//! `cargo xtask demo`: the whole system on one machine. Two nodes, four pods, a ztunnel
//! per node with the built-in CA; a call in plaintext, live enrolment without restarts,
//! the same call as mTLS on the wire, a DENY policy, L7 through a waypoint (a 403 and a
//! 90/10 split), a summary, node1's ztunnel upgraded while calls flow both ways, and a
//! clean teardown.
//! Every claim printed is checked first; a claim that does not hold is an error.
use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::{Pod, Topology, Ztunnel, leftovers, podapp_bin, teardown, upgrade};

/// Name prefix of everything the demo creates (namespaces, cgroups, pins).
pub const ID: &str = "ztdemo";
const SUBNET: u8 = 201;
const MARKER: &str = "secret-order-4711 ";
/// New connections per second each way during the upgrade: steady, and light enough for
/// a debug build on a busy two-core machine.
const UPGRADE_RATE: u32 = 20;

pub struct Options {
    /// Leave the topology running and print how to explore it.
    pub keep: bool,
}

/// What the demo showed, for the test that runs it.
#[derive(Debug, Default)]
pub struct Report {
    pub plaintext_before_enrolment: bool,
    pub only_tls_after_enrolment: bool,
    pub identities_in_access_log: bool,
    pub long_lived_connection_survived: bool,
    pub policy_refused: bool,
    /// Through db's waypoint: backend's `POST /orders` answered 403 `RBAC: access denied`.
    pub waypoint_refused_post: bool,
    /// Through db's waypoint: how 100 `GET /orders/42` split between db v1 and v2.
    pub waypoint_split: (usize, usize),
    /// frontend resolved `backend.default.svc.cluster.local` to its VIP through the DNS
    /// capture (the answer from the server it asked) and called it by that VIP.
    pub resolved_by_name: bool,
    /// Calls made both ways while node1's ztunnel was upgraded, and how many failed.
    pub upgrade_calls: u64,
    pub upgrade_failed_calls: u64,
    /// Pings the long-lived connection carried across the upgrade (it broke if `None`).
    pub upgrade_pings: Option<u64>,
    /// The old ztunnel drained and exited.
    pub old_ztunnel_exited: bool,
    pub nothing_left_behind: bool,
}

/// db's waypoint config: backend may `GET /orders/*` (anything else is refused with 403),
/// and db's requests split 90/10 between its two versions.
const DB_WAYPOINT: &str = r#"waypointPolicies:
  - name: db-orders-read
    namespace: default
    targetRefs: [{ kind: Service, group: "", name: db }]
    action: ALLOW
    rules:
      - from: [{ source: { principals: ["cluster.local/ns/default/sa/backend"] } }]
        to: [{ operation: { methods: ["GET"], paths: ["/orders/*"] } }]
httpRoutes:
  - name: db-canary
    namespace: default
    parentRefs: [{ kind: Service, group: "", name: db }]
    rules:
      - backendRefs:
          - { name: db-v1, port: 80, weight: 90 }
          - { name: db-v2, port: 80, weight: 10 }
"#;

struct Out {
    colour: bool,
}

impl Out {
    fn step(&self, s: &str) {
        if self.colour {
            println!("\x1b[1;34m▶\x1b[0m \x1b[1m{s}\x1b[0m");
        } else {
            println!("▶ {s}");
        }
    }

    fn ok(&self, s: &str) {
        if self.colour {
            println!("  \x1b[32m✔\x1b[0m {s}");
        } else {
            println!("  ✔ {s}");
        }
    }

    fn note(&self, s: &str) {
        println!("    {s}");
    }
}

/// frontend → backend with the marker payload, captured on the wire between the nodes.
fn call_on_the_wire(t: &mut Topology, from: &Pod, to: &Pod) -> anyhow::Result<String> {
    let cap = t.tcpdump_wire()?;
    let call = t.call(
        from,
        to.addr(8080),
        &["--bytes", "3000", "--pattern", MARKER],
    )?;
    ensure!(call.contains("match=true"), "the call failed: {call}");
    cap.finish()
}

fn enrolled_pods(t: &Topology, node: &str) -> Vec<Pod> {
    t.pods
        .iter()
        .filter(|p| p.ambient && p.node == node)
        .cloned()
        .collect()
}

fn wait_enrolled(z: &Ztunnel, pods: &[Pod]) -> anyhow::Result<()> {
    let refs: Vec<&Pod> = pods.iter().collect();
    z.wait_enrolled(&refs).map(drop)
}

const DENY_DB: &str = "policies:
  - name: db-only-from-backend
    namespace: default
    scope: WORKLOAD_SELECTOR
    selector: { app: db }
    action: DENY
    rules:
      - from:
          - principals: [cluster.local/ns/default/sa/frontend]
";

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let out = Out {
        colour: std::io::stdout().is_terminal(),
    };
    let started = Instant::now();
    let mut report = Report::default();
    // A previous `--keep` run, or one that was killed, may have left things behind.
    teardown(ID)?;

    out.step("Creating two nodes and six pods (network namespaces, a bridge per node, cgroups)");
    let mut t = Topology::named(ID, SUBNET)?;
    t.add_node()?;
    let frontend = t.add_pod_on(1, "frontend", false, false)?;
    let batch = t.add_pod_on(1, "batch", false, false)?;
    let backend = t.add_pod_on(2, "backend", false, false)?;
    let db = t.add_pod_on(2, "db", false, false)?;
    let db_v2 = t.add_pod_on(2, "db-v2", false, false)?;
    let waypoint_pod = t.add_pod_on(2, "waypoint", false, false)?;
    let mut servers = Vec::new();
    for p in [&frontend, &batch, &backend, &db] {
        servers.push(t.serve(p, p.addr(8080))?);
        out.note(&format!(
            "{:<9} {:<6} {}  serving :8080",
            p.name, p.node, p.ip4
        ));
    }
    for (p, version) in [(&db, "v1"), (&db_v2, "v2")] {
        let addr = p.addr(8081).to_string();
        let mut server = t.spawn(p, &["http-serve", &addr, "--name", version])?;
        let line = server.read_line()?;
        ensure!(
            line.starts_with("ready"),
            "http server in {}: {line}",
            p.name
        );
        servers.push(server);
        out.note(&format!(
            "{:<9} {:<6} {}  serving HTTP :8081 (db {version})",
            p.name, p.node, p.ip4
        ));
    }
    out.note(&format!(
        "{:<9} {:<6} {}  db's waypoint (not enrolled, as Istio's waypoints are not)",
        waypoint_pod.name, waypoint_pod.node, waypoint_pod.ip4
    ));
    let backend_vip = format!("10.{SUBNET}.250.80");
    t.services_yaml = format!(
        "services:
  - name: backend
    namespace: default
    addresses: [{backend_vip}]
    ports: [{{port: 80, targetPort: 8080}}]
    selector: {{ app: backend }}
  - name: db
    namespace: default
    addresses: [10.{SUBNET}.250.90]
    ports: [{{port: 80, targetPort: 8081, name: http}}]
    selector: {{ app: db }}
    waypoint: {{ hostname: waypoint.default.svc.cluster.local }}
  - name: db-v1
    namespace: default
    addresses: [10.{SUBNET}.250.91]
    ports: [{{port: 80, targetPort: 8081, name: http}}]
    selector: {{ app: db }}
  - name: db-v2
    namespace: default
    addresses: [10.{SUBNET}.250.92]
    ports: [{{port: 80, targetPort: 8081, name: http}}]
    selector: {{ app: db-v2 }}
  - name: waypoint
    namespace: default
    addresses: [10.{SUBNET}.250.95]
    ports: [{{port: 15008}}]
    selector: {{ app: waypoint }}
"
    );
    out.step("Starting one ztunnel per node (built-in CA, workload file, eBPF capture)");
    let mut z1 = t.start_ztunnel_on("node1", false)?;
    let mut z2 = t.start_ztunnel_on("node2", false)?;
    z1.print_log = false;
    z2.print_log = false;
    out.ok("both ztunnels ready; no pod enrolled yet");

    out.step("Before enrolment: frontend calls backend");
    let wire = call_on_the_wire(&mut t, &frontend, &backend)?;
    report.plaintext_before_enrolment = wire.contains(MARKER.trim());
    ensure!(
        report.plaintext_before_enrolment,
        "expected the payload in clear on the wire:\n{wire}"
    );
    out.ok(&format!(
        "plaintext: the capture between the nodes shows {:?} and port 8080",
        MARKER.trim()
    ));

    out.step("A long-running connection batch → db, opened before enrolment");
    let db_addr = db.addr(8080).to_string();
    let mut hold = t.spawn(&batch, &["hold", &db_addr, "--secs", "6"])?;
    let first = hold.read_line()?;
    ensure!(first.starts_with("connected"), "hold: {first}");
    out.ok("pinging every 50 ms");

    out.step("Enrolling every pod live: istio.io/dataplane-mode=ambient, no restart");
    for name in ["frontend", "batch", "backend", "db", "db-v2"] {
        t.set_ambient(name, true)?;
    }
    wait_enrolled(&z1, &enrolled_pods(&t, "node1"))?;
    wait_enrolled(&z2, &enrolled_pods(&t, "node2"))?;
    out.ok("capture attached to the five app pods; their apps kept running");

    out.step("After enrolment: the same call");
    let wire = call_on_the_wire(&mut t, &frontend, &backend)?;
    let hbone = format!("{}.15008", backend.ip4);
    // Only frontend ↔ backend packets: batch → db's old connection still crosses the
    // wire in plaintext, as it should (it was opened before enrolment).
    let (fa, ba) = (format!(" {}.", frontend.ip4), format!(" {}.", backend.ip4));
    let packets: Vec<&str> = wire
        .lines()
        .filter(|l| l.contains(" IP ") && l.contains(&fa) && l.contains(&ba))
        .collect();
    report.only_tls_after_enrolment = !packets.is_empty()
        && packets.iter().all(|l| l.contains(&hbone))
        && !wire.contains(MARKER.trim());
    ensure!(
        report.only_tls_after_enrolment,
        "expected only TLS to {hbone} on the wire:\n{wire}"
    );
    out.ok(&format!(
        "mTLS: {} packets, all to or from {}:15008 (HBONE), payload not visible",
        packets.len(),
        backend.ip4
    ));
    let ids = (
        "spiffe://cluster.local/ns/default/sa/frontend",
        "spiffe://cluster.local/ns/default/sa/backend",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let log = z2.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("access") && l.contains(ids.0) && l.contains(ids.1))
        {
            break l.to_owned();
        }
        ensure!(
            Instant::now() < deadline,
            "no access log line with both identities:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    report.identities_in_access_log = true;
    out.ok("backend's ztunnel logged the connection with both SPIFFE identities:");
    out.note(&format!("src.identity={} dst.identity={}", ids.0, ids.1));
    let _ = line;

    out.step("DNS: frontend resolves backend by name, then calls it");
    // The cluster's DNS as a pod's resolv.conf names it: the query never leaves the pod,
    // ztunnel answers it on the pod's :15053 (eBPF capture), from the address asked.
    let kube_dns = "10.96.0.10:53";
    let out_q = t
        .spawn(
            &frontend,
            &["dns-query", kube_dns, "backend.default.svc.cluster.local"],
        )?
        .wait_ok()?;
    ensure!(
        out_q.trim() == format!("from={kube_dns} rcode=No Error a={backend_vip}"),
        "dns-query: {out_q}"
    );
    let called = t.call(&frontend, format!("{backend_vip}:80").parse()?, &[])?;
    ensure!(called.contains("match=true"), "call by VIP: {called}");
    report.resolved_by_name = true;
    out.ok(&format!(
        "backend.default.svc.cluster.local → {backend_vip} (answered by ztunnel as {kube_dns}); the call went through"
    ));

    out.step("Policy: DENY frontend → db");
    t.write_workloads_text(&format!("{}{DENY_DB}", t.workloads_yaml()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if t.call(&frontend, db.addr(8080), &[]).is_err() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the DENY policy never took effect"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The refusal reaches the caller before the access line reaches the log (the log is
    // written asynchronously): wait for the line, as for the identities above.
    let denied = |log: &str| {
        log.lines().any(|l| {
            l.contains("connection denied by policy") && l.contains("default/db-only-from-backend")
        })
    };
    let log = z2.log_when(denied);
    report.policy_refused = denied(&log);
    ensure!(
        report.policy_refused,
        "no denial in db's ztunnel log:\n{log}"
    );
    out.ok(
        "refused: db's ztunnel answered 401 (rule 0 of DENY policy default/db-only-from-backend)",
    );
    let call = t.call(&backend, db.addr(8080), &[])?;
    ensure!(
        call.contains("match=true"),
        "backend → db must still work: {call}"
    );
    out.ok("backend → db still allowed");

    let held = hold
        .wait_ok()
        .context("the long-running connection broke")?;
    report.long_lived_connection_survived = held.contains("pings=");
    out.ok(&format!(
        "the long-running connection survived enrolment ({})",
        held.trim()
    ));

    let waypoint = l7_through_the_waypoint(&out, &mut t, &backend, &waypoint_pod, &mut report)?;

    out.step("Summary");
    summary(&out, &t, &[&z1, &z2])?;
    println!(
        "    {:<30} GET /orders/42 x100: {} to db v1, {} to db v2; POST /orders: 403",
        "backend → db (L7)", report.waypoint_split.0, report.waypoint_split.1
    );
    drop(waypoint);

    let z1 = upgrade_node1(&out, &mut t, z1, &frontend, &batch, &backend, &mut report)?;

    if opts.keep {
        keep(&out, &t, &z1, &z2, &frontend, &backend);
        std::mem::forget(servers);
        std::mem::forget(z1);
        std::mem::forget(z2);
        std::mem::forget(t);
        return Ok(report);
    }
    drop(servers);
    drop((z1, z2));
    drop(t);
    let left = leftovers(ID)?;
    report.nothing_left_behind = left.is_empty();
    ensure!(report.nothing_left_behind, "left behind: {left:?}");
    out.ok(&format!(
        "torn down: no namespace, cgroup, pinned program or process left ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(report)
}

/// db behind its waypoint: backend's GETs allowed and split 90/10 between db's two
/// versions by an HTTPRoute, its POST refused by the waypoint's L7 policy with 403.
fn l7_through_the_waypoint(
    out: &Out,
    t: &mut Topology,
    backend: &Pod,
    waypoint_pod: &Pod,
    report: &mut Report,
) -> anyhow::Result<crate::waypoint::Waypoint> {
    out.step(
        "L7 with a waypoint: db gets one (ztunnel waypoint), with an HTTP policy and a 90/10 route",
    );
    t.write_workloads_text(&format!("{}{DENY_DB}{DB_WAYPOINT}", t.workloads_yaml()))?;
    let waypoint = crate::waypoint::Waypoint::start(t, waypoint_pod, "waypoint")?;
    out.ok(&format!(
        "waypoint serving HBONE on {}:15008 as spiffe://cluster.local/ns/default/sa/waypoint",
        waypoint_pod.ip4
    ));
    let db_vip = format!("10.{SUBNET}.250.90:80");
    let get = |t: &mut Topology, extra: &[&str]| -> anyhow::Result<String> {
        let mut args = vec!["http-get", db_vip.as_str()];
        args.extend_from_slice(extra);
        t.spawn(backend, &args)?.wait_ok()
    };
    // The nodes' ztunnels take the new file within a moment: until then backend's
    // request goes straight to db (no policy there refuses it).
    let deadline = Instant::now() + Duration::from_secs(30);
    let post = loop {
        let post = get(
            t,
            &["--path", "/orders", "--method", "POST", "--body", "{}"],
        )?;
        if post.contains("status=403") {
            break post;
        }
        ensure!(
            Instant::now() < deadline,
            "the waypoint never refused the POST: {post}\n{}",
            waypoint.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    report.waypoint_refused_post = post.contains("status=403 body=RBAC: access denied");
    ensure!(report.waypoint_refused_post, "POST: {post}");
    out.ok("backend → POST /orders: 403 RBAC: access denied (policy default/db-orders-read allows only GET /orders/*)");
    let gets = get(t, &["--path", "/orders/42", "--count", "100"])?;
    let line = gets
        .lines()
        .find_map(|l| l.strip_prefix("summary "))
        .with_context(|| format!("no summary from http-get: {gets}"))?;
    let counts: std::collections::BTreeMap<String, usize> = serde_json::from_str(line)?;
    let v1 = counts.get("200 v1").copied().unwrap_or(0);
    let v2 = counts.get("200 v2").copied().unwrap_or(0);
    report.waypoint_split = (v1, v2);
    ensure!(
        v1 + v2 == 100,
        "expected 100 answers from db v1 and v2: {counts:?}\n{}",
        waypoint.log_text()
    );
    ensure!((v1, v2) == (90, 10), "expected a 90/10 split: {counts:?}");
    out.ok(&format!(
        "backend → GET /orders/42 x100: 200 each; {v1} served by db v1, {v2} by db v2 (HTTPRoute default/db-canary, 90/10)"
    ));
    Ok(waypoint)
}

/// node1's ztunnel upgraded as a DaemonSet rollout does it, while frontend (node1) and
/// backend (node2) call each other at a steady rate and batch (node1) holds a connection
/// to backend open, pinging: the new ztunnel takes every pod over, the old one stops
/// accepting, is stopped, drains and exits. Fails unless every call succeeded and the
/// long-lived connection stayed intact. Returns node1's new ztunnel.
fn upgrade_node1(
    out: &Out,
    t: &mut Topology,
    mut old: Ztunnel,
    frontend: &Pod,
    batch: &Pod,
    backend: &Pod,
    report: &mut Report,
) -> anyhow::Result<Ztunnel> {
    out.step("Upgrading node1's ztunnel while calls flow both ways and a connection stays open");
    let stop = t.dir.path().join("upgrade-stop");
    let fb = upgrade::rate(t, frontend, backend.addr(8080), UPGRADE_RATE, &stop)?;
    let bf = upgrade::rate(t, backend, frontend.addr(8080), UPGRADE_RATE, &stop)?;
    let held = upgrade::hold(t, batch, backend.addr(8080), &stop)?;
    out.ok(&format!(
        "frontend → backend and backend → frontend: {UPGRADE_RATE} new connections/s each; \
         batch → backend held open, a ping every 50 ms"
    ));
    std::thread::sleep(Duration::from_secs(2));
    let old_pid = old.pid();
    let up = upgrade::upgrade(t, "node1", &old)?;
    let mut new = up.new;
    new.print_log = false;
    out.ok(&format!(
        "new ztunnel (pid {}) started beside the old one (pid {old_pid}): it took {} listening \
         sockets over and the old one stopped accepting {} ms after the new one started",
        new.pid(),
        up.listeners_taken,
        up.handover_ms
    ));
    out.ok(&format!(
        "new ztunnel ready after {} ms; the old one got SIGTERM (as the kubelet stops the old \
         pod) and drains the connections it still carries",
        up.ready_ms
    ));
    // More traffic, on the new ztunnel alone, while the old one drains.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, b"")?;
    let mut failed = 0;
    for (what, p) in [("frontend → backend", fb), ("backend → frontend", bf)] {
        let c = upgrade::counts(p)?;
        report.upgrade_calls += c.attempted;
        failed += c.failed;
        out.note(&format!(
            "{what:<19} {:>4} calls, {} failed",
            c.attempted, c.failed
        ));
        if c.failed > 0 {
            out.note(&format!("  {}", c.json["failures"]));
        }
    }
    report.upgrade_failed_calls = failed;
    let pings = upgrade::pings(held);
    match &pings {
        Ok(n) => out.note(&format!(
            "batch → backend     {n:>4} pings, connection intact"
        )),
        Err(e) => out.note(&format!("batch → backend     broke: {e:#}")),
    }
    report.upgrade_pings = pings.as_ref().ok().copied();
    report.old_ztunnel_exited = old.wait_exit(120);
    ensure!(
        report.old_ztunnel_exited,
        "the old ztunnel did not exit after its drain:\n{}",
        old.log_text()
    );
    let exited = up.started.elapsed();
    drop(old);
    ensure!(
        failed == 0,
        "{failed} of {} calls failed during the upgrade",
        report.upgrade_calls
    );
    pings.context("the long-lived connection broke during the upgrade")?;
    out.ok(&format!(
        "0 of {} calls failed; the old ztunnel drained its last connection and exited \
         (within {:.1} s of the new one's start)",
        report.upgrade_calls,
        exited.as_secs_f64()
    ));
    Ok(new)
}

fn summary(out: &Out, t: &Topology, zs: &[&Ztunnel]) -> anyhow::Result<()> {
    let dumps = zs
        .iter()
        .map(|z| z.dump())
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "    {:<9} {:<6} {:<9} {:<46} {:>5} {:>9}",
        "POD", "NODE", "ENROLLED", "IDENTITY", "CONNS", "BYTES"
    );
    for p in &t.pods {
        let recs: Vec<_> = dumps
            .iter()
            .flat_map(|d| d.connections.list.iter())
            .filter(|r| r.pod == p.key())
            .collect();
        let bytes: u64 = recs.iter().map(|r| r.bytes_sent + r.bytes_received).sum();
        println!(
            "    {:<9} {:<6} {:<9} {:<46} {:>5} {:>9}",
            p.name,
            p.node,
            if p.ambient { "yes" } else { "no" },
            format!("spiffe://cluster.local/ns/default/sa/{}", p.service_account),
            recs.len(),
            bytes
        );
    }
    let mut pairs = std::collections::BTreeMap::new();
    for d in &dumps {
        for r in d
            .connections
            .list
            .iter()
            .filter(|r| r.direction == ztunnel::proxy::Direction::Outbound)
        {
            let from = r.pod.trim_start_matches("default/").to_owned();
            let vip = |ip: std::net::IpAddr| {
                dumps.iter().flat_map(|d| d.services.iter()).find(|s| {
                    s.vips
                        .iter()
                        .any(|v| v.rsplit('/').next() == Some(ip.to_string().as_str()))
                })
            };
            let to = t
                .pods
                .iter()
                .find(|p| p.addr(0).ip() == r.dst.ip())
                .map(|p| p.name.clone())
                .or_else(|| vip(r.dst.ip()).map(|s| format!("{} (service)", s.name)))
                .unwrap_or_else(|| r.dst.ip().to_string());
            let status = if r.outcome.as_deref().is_some_and(|o| o.contains("401")) {
                "denied by policy".to_owned()
            } else if r.security_policy == "mutual_tls" {
                "mutual_tls".to_owned()
            } else {
                "plaintext".to_owned()
            };
            pairs.insert((from, to), status);
        }
    }
    println!("    {:<30} MTLS", "SERVICES");
    println!(
        "    {:<30} plaintext (before enrolment)",
        "frontend → backend"
    );
    for ((from, to), status) in pairs {
        println!("    {:<30} {status}", format!("{from} → {to}"));
    }
    let _ = out;
    Ok(())
}

fn keep(out: &Out, t: &Topology, z1: &Ztunnel, z2: &Ztunnel, from: &Pod, to: &Pod) {
    out.step("Left running (--keep). Explore:");
    let cg = from.cgroup.join("cgroup.procs");
    out.note(&format!(
        "call from {} (inside its netns and cgroup, so it is captured):",
        from.name
    ));
    out.note(&format!(
        "  sh -c 'echo $$ > {}; exec ip netns exec {} {} call {}'",
        cg.display(),
        from.netns,
        podapp_bin().display(),
        to.addr(8080)
    ));
    out.note(&format!(
        "node status:  {} status --admin {}   (node2: --admin {})",
        crate::ztunnel_bin().display(),
        z1.admin,
        z2.admin
    ));
    out.note(&format!(
        "metrics:      curl -s http://{}/metrics",
        z1.metrics
    ));
    out.note(&format!(
        "workload file: {} (edit it; both ztunnels follow)",
        t.workloads_path().display()
    ));
    out.note("tear down:    cargo xtask demo --down");
}
