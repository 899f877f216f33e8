//! L4 authorization and strict mTLS, enforced by the destination's ztunnel.
use std::time::{Duration, Instant};

use ztunnel_tests::{Pod, PodProcess, Topology, Ztunnel};

struct Mesh {
    t: Topology,
    a: Pod,
    b: Pod,
    c: Pod,
    d: Pod,
    _servers: Vec<PodProcess>,
    _z1: Ztunnel,
    z2: Ztunnel,
}

/// node1: A (sa a) and D (sa d) enrolled, C outside the mesh; node2: B (sa b) serving
/// :8080 and :9090.
fn mesh(policies: &str) -> anyhow::Result<Mesh> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let c = t.add_pod_on(1, "c", false, false)?;
    let d = t.add_pod_on(1, "d", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let servers = vec![t.serve(&b, b.addr(8080))?, t.serve(&b, b.addr(9090))?];
    t.write_workloads_text(&format!("{}{policies}", t.workloads_yaml()))?;
    let file = t.workloads_path();
    let z1 = t.start_ztunnel_with_file("node1", false, &file)?;
    let z2 = t.start_ztunnel_with_file("node2", false, &file)?;
    Ok(Mesh {
        t,
        a,
        b,
        c,
        d,
        _servers: servers,
        _z1: z1,
        z2,
    })
}

impl Mesh {
    fn ok(&mut self, from: &Pod, port: u16) -> bool {
        let (from, dst) = (from.clone(), self.b.addr(port));
        matches!(self.t.call(&from, dst, &[]), Ok(out) if out.contains("match=true"))
    }

    /// Rewrites the file with these policies (both ztunnels watch it).
    fn set_policies(&self, policies: &str) -> anyhow::Result<()> {
        self.t
            .write_workloads_text(&format!("{}{policies}", self.t.workloads_yaml()))
    }

    /// Waits until node2's log contains `needle`.
    fn wait_log(&self, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.z2.log_text();
            if log.contains(needle) {
                return Ok(log);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{needle:?} not in node2's log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

const ALLOW_A: &str = "policies:
  - name: allow-a
    namespace: default
    scope: WORKLOAD_SELECTOR
    selector: { app: b }
    action: ALLOW
    rules:
      - from:
          - principals: [cluster.local/ns/default/sa/a]
";

#[test]
fn allow_by_principal_admits_only_that_principal() -> anyhow::Result<()> {
    let mut m = mesh(ALLOW_A)?;
    assert!(m.ok(&m.a.clone(), 8080), "A is allowed");
    assert!(!m.ok(&m.d.clone(), 8080), "D is not");
    let d = m.z2.wait_for("the denial record", |d| {
        d.connections.list.iter().any(|r| {
            r.outcome
                .as_deref()
                .is_some_and(|o| o.starts_with("denied"))
                && r.src_identity.as_deref() == Some("spiffe://cluster.local/ns/default/sa/d")
        })
    })?;
    let denial = d
        .connections
        .list
        .iter()
        .find(|r| {
            r.outcome
                .as_deref()
                .is_some_and(|o| o.starts_with("denied"))
        })
        .and_then(|r| r.outcome.clone())
        .unwrap_or_default();
    assert!(
        denial.contains("no ALLOW policy matched") && denial.contains("default/allow-a"),
        "{denial}"
    );
    let text = m.z2.metrics_text()?;
    assert!(
        text.contains(
            "ztunnel_policy_denials_total{reason=\"policy\",policy=\"default/allow-a\"} 1"
        ),
        "{text}"
    );
    Ok(())
}

#[test]
fn deny_by_namespace_port_and_ip_block() -> anyhow::Result<()> {
    let mut m = mesh("")?;
    assert!(m.ok(&m.a.clone(), 8080));

    m.set_policies(
        "policies:
  - name: no-default
    namespace: default
    scope: NAMESPACE
    action: DENY
    rules:
      - from:
          - namespaces: [default]
",
    )?;
    m.wait_log("workload file reloaded")?;
    assert!(!m.ok(&m.a.clone(), 8080), "namespace default is denied");

    let a_ip = m.a.ip4;
    m.set_policies(&format!(
        "policies:
  - name: no-9090
    namespace: default
    scope: NAMESPACE
    action: DENY
    rules:
      - to:
          - destinationPorts: [9090]
  - name: no-a-ip
    namespace: default
    scope: NAMESPACE
    action: DENY
    rules:
      - from:
          - sourceIps: [{a_ip}/32]
        to:
          - destinationPorts: [8080]
"
    ))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.ok(&m.d.clone(), 9090) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!m.ok(&m.d.clone(), 9090), "port 9090 is denied to everyone");
    // New policies apply at once; the removed no-default stays in force until its removal
    // has held for --config-settle (a half-written file must not drop a DENY).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !m.ok(&m.d.clone(), 8080) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(m.ok(&m.d.clone(), 8080), "D may use 8080");
    assert!(!m.ok(&m.a.clone(), 8080), "A's address is blocked on 8080");
    // The log is written by a thread of its own: the line may follow the refusal.
    m.wait_log("rule 0 of DENY policy default/no-a-ip matched")?;
    Ok(())
}

#[test]
fn strict_mtls_refuses_plaintext_and_allows_hbone() -> anyhow::Result<()> {
    let mut m = mesh(
        "peerAuthentications:
  - name: strict
    namespace: default
    mode: STRICT
",
    )?;
    assert!(m.ok(&m.a.clone(), 8080), "HBONE from A is allowed");
    assert!(!m.ok(&m.c.clone(), 8080), "plaintext from C is refused");
    m.wait_log("STRICT mTLS refuses plaintext")?;
    Ok(())
}

#[test]
fn a_new_policy_closes_a_long_lived_connection_and_says_why() -> anyhow::Result<()> {
    let mut m = mesh("")?;
    let dst = m.b.addr(8080).to_string();
    let a = m.a.clone();
    let mut hold = m.t.spawn(&a, &["hold", &dst, "--secs", "30"])?;
    assert!(hold.read_line()?.starts_with("connected"));
    m.z2.wait_for("the held connection", |d| !d.connections.list.is_empty())?;

    m.set_policies(
        "policies:
  - name: deny-a
    namespace: default
    scope: NAMESPACE
    action: DENY
    rules:
      - from:
          - principals: [cluster.local/ns/default/sa/a]
",
    )?;
    let res = hold.wait_ok();
    assert!(res.is_err(), "the held connection must be closed: {res:?}");
    let log = m.wait_log("closed: policy changed")?;
    assert!(log.contains("DENY policy default/deny-a"), "{log}");
    Ok(())
}

#[test]
fn a_malformed_policy_is_rejected_and_the_previous_ones_stay() -> anyhow::Result<()> {
    let mut m = mesh(ALLOW_A)?;
    assert!(!m.ok(&m.d.clone(), 8080));
    m.set_policies(
        "policies:
  - name: broken
    namespace: default
    scope: NAMESPACE
    action: DENY
    rules:
      - from:
          - sourceIps: [10.0.0.0/33]
",
    )?;
    let log = m.wait_log("workload file rejected")?;
    assert!(log.contains("10.0.0.0/33"), "{log}");
    // ALLOW-a is still in force: D stays denied, A allowed.
    assert!(!m.ok(&m.d.clone(), 8080));
    assert!(m.ok(&m.a.clone(), 8080));
    Ok(())
}
