//! Inside a pod only 15001, 15006 and 15008 are ztunnel's, exactly as in Istio; 15000,
//! 15020, 15021 and 15053 are served by ztunnel in its own netns, so in a pod they are the
//! app's like any other port: captured, tunnelled, never sent in plaintext.
use std::net::SocketAddr;

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

/// ztunnel's outbound listener is a pod's loopback only (the app's captured connects are
/// bound to the pod's address but still dial loopback), so nothing outside the pod can
/// be proxied with the pod's identity through it. A connect from outside the pod — a pod
/// outside the mesh (IPv4 and IPv6), the node — to the pod's address on :15001 or
/// :15006 is steered to the inbound listener (tc, or the PREROUTING REDIRECT), which
/// refuses ztunnel's own ports: the connection is closed with nothing carried, and no
/// outbound connection is made. Inside the pod, the pod's own address on :15001 has no
/// listener at all. `capture` is the Topology's `--capture` (None: eBPF).
fn outside_connects_to_ztunnels_ports_are_refused(capture: Option<&str>) -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.capture = capture.map(str::to_owned);
    let a = t.add_pod("a", true, true)?;
    let b = t.add_pod("b", false, false)?;
    let c = t.add_pod("c", false, true)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    // A's outbound listener is live: its app's connects go through it.
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");

    let mut targets: Vec<(&str, SocketAddr)> = Vec::new();
    for port in [
        ztunnel_common::ports::OUTBOUND,
        ztunnel_common::ports::INBOUND_PLAINTEXT,
    ] {
        for dst in [a.addr(port), a.addr6(port)] {
            let r = t.call(&c, dst, &["--bytes", "2000"]);
            assert!(
                !r.as_ref().is_ok_and(|o| o.contains("match=true")),
                "C reached {dst} through ztunnel: {r:?}"
            );
            targets.push(("c", dst));
        }
        let dst = a.addr(port);
        let r = t.call_from_node(1, dst, &["--bytes", "2000"]);
        assert!(
            !r.as_ref().is_ok_and(|o| o.contains("match=true")),
            "the node reached {dst} through ztunnel: {r:?}"
        );
        targets.push(("node", dst));
    }
    let err = t
        .call(&a, a.addr(ztunnel_common::ports::OUTBOUND), &[])
        .expect_err("nothing listens on the pod's own address at :15001");
    assert!(format!("{err:#}").contains("Connection refused"), "{err:#}");

    let refused = |d: &ztunnel::admin::ConfigDump, dst: SocketAddr| {
        let want = format!("refused: port {} belongs to ztunnel", dst.port());
        d.connections
            .list
            .iter()
            .filter(|r| r.dst == dst && r.outcome.as_deref() == Some(want.as_str()))
            .count()
    };
    let d = z.wait_for("every connect to a reserved port refused", |d| {
        targets.iter().all(|(_, dst)| {
            let want = targets.iter().filter(|(_, t)| t == dst).count();
            refused(d, *dst) == want
        })
    })?;
    for r in d.connections.list.iter().filter(|r| r.dst.port() >= 15000) {
        assert_eq!(r.bytes_sent + r.bytes_received, 0, "{r:?}");
        assert_eq!(r.direction, Direction::Inbound, "{r:?}");
    }
    // The only outbound connection is the app's own, to B.
    let outbound: Vec<_> = d
        .connections
        .list
        .iter()
        .filter(|r| r.direction == Direction::Outbound)
        .collect();
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert_eq!(outbound[0].dst, b.addr(8080));
    if capture.is_none() {
        assert_eq!(d.capture.counters["connect_captured"], 1);
        assert_eq!(d.capture.counters["orig_dst_miss"], 0);
    }
    Ok(())
}

#[test]
fn outside_connects_to_ztunnels_pod_ports_are_refused() -> anyhow::Result<()> {
    outside_connects_to_ztunnels_ports_are_refused(None)
}

#[test]
fn outside_connects_to_ztunnels_pod_ports_are_refused_under_iptables() -> anyhow::Result<()> {
    outside_connects_to_ztunnels_ports_are_refused(Some("iptables"))
}
