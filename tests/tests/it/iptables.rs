//! The iptables capture fallback carries the same traffic as eBPF capture.
use ztunnel::proxy::Direction;
use ztunnel_tests::Topology;

#[test]
fn iptables_capture_carries_outbound_inbound_and_hbone() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.capture = Some("iptables".to_owned());
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let c = t.add_pod_on(2, "c", false, false)?;
    let _sa = t.serve(&a, a.addr(8080))?;
    let mut sb = t.serve_with(&b, b.addr(8080), &["--log-peers"])?;
    let _sc = t.serve(&c, c.addr(8080))?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let z2 = t.start_ztunnel_on("node2", false)?;
    assert_eq!(z1.dump()?.capture.mode, "iptables");

    // A → B: HBONE; B's app sees A's address.
    let out = t.call(&a, b.addr(8080), &["--bytes", "100000"])?;
    assert!(
        out.contains(&format!("peer={}", b.addr(8080))) && out.contains("match=true"),
        "{out}"
    );
    let peer = sb.read_line()?;
    assert!(peer.starts_with(&format!("conn from {}:", a.ip4)), "{peer}");
    // A → C: C is outside the mesh, plain TCP through A's ztunnel.
    let out = t.call(&a, c.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    // C → A: plaintext into an enrolled pod, redirected to :15006 with its original
    // destination from conntrack.
    let out = t.call(&c, a.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");

    let d = z1.wait_closed(3)?;
    let find = |dir: Direction, dst| {
        d.connections
            .list
            .iter()
            .find(|r| r.direction == dir && r.dst == dst)
            .cloned()
    };
    let ab = find(Direction::Outbound, b.addr(8080)).expect("A → B record");
    assert_eq!(ab.security_policy, "mutual_tls");
    assert_eq!(ab.bytes_sent, 100000);
    let ac = find(Direction::Outbound, c.addr(8080)).expect("A → C record");
    assert_eq!(ac.security_policy, "unknown");
    let ca = find(Direction::Inbound, a.addr(8080)).expect("C → A record");
    assert_eq!(ca.src.ip(), c.addr(0).ip());
    let _ = z2;
    Ok(())
}

#[test]
fn iptables_unenrolment_removes_the_rules() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.capture = Some("iptables".to_owned());
    let a = t.add_pod("a", true, false)?;
    let z = t.start_ztunnel(false)?;
    let rules = |pod: &ztunnel_tests::Pod| -> anyhow::Result<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns, "iptables", "-t", "nat", "-S"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert!(rules(&a)?.contains("ZTUNNEL_OUTPUT"));
    t.set_ambient("a", false)?;
    z.wait_enrolled(&[])?;
    let left = rules(&a)?;
    assert!(!left.contains("ZTUNNEL"), "{left}");
    Ok(())
}

/// REDIRECT keeps the socket's own addresses (NAT rewrites packets, not sockets): the
/// same checks as the eBPF path's.
#[test]
fn iptables_captured_app_sees_the_addresses_of_an_uncaptured_connect() -> anyhow::Result<()> {
    crate::outbound::captured_app_sees_what_an_uncaptured_one_sees(Some("iptables"))
}

#[test]
fn iptables_a_changed_spec_reenrols_the_pod_without_a_moment_uncaptured() -> anyhow::Result<()> {
    crate::adversarial::config::changed_spec_reenrols_without_a_moment_uncaptured(Some("iptables"))
}
