//! Cross-node traffic between two "nodes", each with its own ztunnel.
use ztunnel::proxy::Direction;
use ztunnel_tests::Topology;

const MARKER: &str = "plaintext-marker-";

#[test]
fn non_mesh_pod_is_reached_in_plain_tcp() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let c = t.add_pod_on(2, "c", false, false)?;
    let _srv = t.serve(&c, c.addr(8080))?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let _z2 = t.start_ztunnel_on("node2", false)?;

    let cap = t.tcpdump_wire()?;
    let out = t.call(&a, c.addr(8080), &["--bytes", "2000", "--pattern", MARKER])?;
    assert!(out.contains("match=true"), "{out}");
    let wire = cap.finish()?;
    // Captured by A's ztunnel, but C is outside the mesh: plain TCP to C:8080.
    assert!(
        wire.contains(MARKER),
        "expected plaintext on the wire:\n{wire}"
    );
    assert!(wire.contains(&format!("> {}.8080:", c.ip4)), "{wire}");
    let d = z1.wait_for("the outbound record", |d| {
        d.connections.list.iter().any(|r| r.outcome.is_some())
    })?;
    assert_eq!(d.connections.list[0].direction, Direction::Outbound);
    assert_eq!(d.connections.list[0].dst, c.addr(8080));
    Ok(())
}
