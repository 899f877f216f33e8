//! Inside a pod only 15001, 15006 and 15008 are ztunnel's, exactly as in Istio; 15000,
//! 15020, 15021 and 15053 are served by ztunnel in its own netns, so in a pod they are the
//! app's like any other port: captured, tunnelled, never sent in plaintext.
use ztunnel::proxy::Direction;
use ztunnel_tests::{Topology, assert_only_hbone};

const MARKER: &str = "plaintext-marker-";
const APP_PORTS: [u16; 4] = [15000, 15020, 15021, 15053];

#[test]
fn app_ports_in_ztunnels_range_are_tunnelled_to_the_app() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let c = t.add_pod_on(1, "c", false, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let mut servers = Vec::new();
    for port in APP_PORTS {
        servers.push(t.serve(&b, b.addr(port))?);
    }
    let z1 = t.start_ztunnel_on("node1", false)?;
    let z2 = t.start_ztunnel_on("node2", false)?;

    let cap = t.tcpdump_wire()?;
    for port in APP_PORTS {
        let out = t.call(&a, b.addr(port), &["--bytes", "3000", "--pattern", MARKER])?;
        assert!(out.contains("match=true"), ":{port}: {out}");
        assert!(out.contains(&format!("peer={}", b.addr(port))), "{out}");
    }
    let wire = cap.finish()?;
    // HBONE on the wire: every packet to or from B's :15008, no payload in clear.
    assert_only_hbone(&wire, b.ip4, MARKER);

    let closed = |d: &ztunnel::admin::ConfigDump, dir: Direction| {
        d.connections
            .list
            .iter()
            .filter(|r| r.direction == dir && r.outcome.as_deref() == Some("ok"))
            .map(|r| (r.dst, r.security_policy.clone()))
            .collect::<Vec<_>>()
    };
    let d1 = z1.wait_for("four tunnelled connections", |d| {
        closed(d, Direction::Outbound).len() == APP_PORTS.len()
    })?;
    let d2 = z2.wait_for("four tunnelled connections", |d| {
        closed(d, Direction::Inbound).len() == APP_PORTS.len()
    })?;
    for port in APP_PORTS {
        let want = (b.addr(port), "mutual_tls".to_owned());
        assert!(closed(&d1, Direction::Outbound).contains(&want), "{d1:?}");
        assert!(closed(&d2, Direction::Inbound).contains(&want), "{d2:?}");
    }

    // Plaintext from outside the mesh reaches those ports too, through B's ztunnel.
    let out = t.call(&c, b.addr(15020), &[])?;
    assert!(out.contains("match=true"), "{out}");
    z2.wait_for("the plaintext connection to :15020", |d| {
        d.connections.list.iter().any(|r| {
            r.direction == Direction::Inbound
                && r.dst == b.addr(15020)
                && r.security_policy == "unknown"
                && r.outcome.as_deref() == Some("ok")
        })
    })?;
    Ok(())
}
