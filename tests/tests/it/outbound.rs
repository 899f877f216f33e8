//! Outbound capture: connect4/6 + getpeername + SO_ORIGINAL_DST.
use ztunnel::proxy::Direction;
use ztunnel_tests::Topology;

#[test]
fn enrolled_pod_outbound_is_captured_and_app_view_is_unchanged() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    let out = t.call(&a, b.addr(8080), &["--bytes", "4096"])?;
    // The app still sees the destination it dialled, not ztunnel's listener.
    assert!(out.contains(&format!("peer={}", b.addr(8080))), "{out}");
    assert!(out.contains("match=true"), "{out}");

    let d = z.wait_for("the outbound connection record", |d| {
        d.connections.list.iter().any(|c| c.outcome.is_some())
    })?;
    let outbound: Vec<_> = d
        .connections
        .list
        .iter()
        .filter(|c| c.direction == Direction::Outbound)
        .collect();
    // Exactly one: ztunnel's own connect to B was not captured again (no loop).
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert_eq!(outbound[0].pod, a.key());
    assert_eq!(
        outbound[0].dst,
        b.addr(8080),
        "ztunnel learned the original destination"
    );
    assert_eq!(outbound[0].bytes_sent, 4096);
    assert_eq!(outbound[0].bytes_received, 4096);
    assert_eq!(d.capture.counters["connect_captured"], 1);
    assert_eq!(d.capture.counters["orig_dst_hit"], 1);
    Ok(())
}

#[test]
fn non_enrolled_pod_outbound_is_not_captured() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let c = t.add_pod("c", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;
    let _ = a;

    let out = t.call(&c, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    let d = z.dump()?;
    assert_eq!(d.connections.opened_total, 0, "{:?}", d.connections.list);
    assert_eq!(d.capture.counters["connect_captured"], 0);
    Ok(())
}

#[test]
fn pod_loopback_and_own_address_are_not_captured() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let _srv = t.serve(&a, "0.0.0.0:8080".parse()?)?;
    let z = t.start_ztunnel(false)?;

    let out = t.call(&a, "127.0.0.1:8080".parse()?, &[])?;
    assert!(out.contains("peer=127.0.0.1:8080"), "{out}");
    let out = t.call(&a, a.addr(8080), &[])?;
    assert!(out.contains(&format!("peer={}", a.addr(8080))), "{out}");
    let d = z.dump()?;
    assert_eq!(d.connections.opened_total, 0, "{:?}", d.connections.list);
    assert_eq!(d.capture.counters["connect_captured"], 0);
    assert_eq!(d.capture.counters["inbound_steered"], 0);
    Ok(())
}
