//! Inbound capture: tc ingress + bpf_sk_assign to ztunnel's :15006.
use ztunnel::proxy::Direction;
use ztunnel_tests::Topology;

#[test]
fn inbound_to_enrolled_pod_arrives_on_15006_with_original_destination() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let _srv = t.serve(&a, "0.0.0.0:8080".parse()?)?;
    let z = t.start_ztunnel(false)?;

    let out = t.call(&c, a.addr(8080), &["--bytes", "10000"])?;
    assert!(out.contains("match=true"), "{out}");
    let d = z.wait_for("the inbound record", |d| {
        d.connections.list.iter().any(|c| c.outcome.is_some())
    })?;
    let rec = &d.connections.list[0];
    assert_eq!(rec.direction, Direction::Inbound);
    assert_eq!(rec.pod, a.key());
    assert_eq!(
        rec.dst,
        a.addr(8080),
        "local address of the accepted socket"
    );
    assert_eq!(rec.src.ip(), c.addr(0).ip());
    assert_eq!(rec.bytes_sent, 10000);
    assert_eq!(d.capture.counters["inbound_steered"], 1);
    Ok(())
}

#[test]
fn hbone_port_is_not_captured() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let z = t.start_ztunnel(false)?;

    // :15008 reaches ztunnel's HBONE listener untouched, which wants TLS: plain bytes
    // get the connection closed, and nothing is steered to :15006.
    let res = t.call(&c, a.addr(15008), &[]);
    assert!(
        res.is_err(),
        "plain TCP to :15008 must not be echoed: {res:?}"
    );
    let d = z.dump()?;
    assert_eq!(d.capture.counters["inbound_steered"], 0);
    assert_eq!(d.connections.opened_total, 0);
    Ok(())
}
