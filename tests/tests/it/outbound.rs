//! Outbound capture: connect4/6 + getpeername + SO_ORIGINAL_DST.
use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
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

/// What `podapp call` printed its socket gave: (`getpeername`, `getsockname`).
pub(crate) fn app_view(out: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let line = out
        .lines()
        .find(|l| l.starts_with("peer="))
        .with_context(|| format!("no peer= line in {out:?}"))?;
    let field = |name: &str| -> anyhow::Result<SocketAddr> {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .with_context(|| format!("no {name} in {line:?}"))?;
        v.parse()
            .with_context(|| format!("bad address {v:?} in {line:?}"))
    };
    Ok((field("peer=")?, field("local=")?))
}

/// The same pod dials the same destinations before and after it is enrolled: IPv4, IPv6
/// and an IPv4-mapped address on a dual-stack socket. Captured, `getpeername` gives the
/// same address and `getsockname` the same address (the pod's own, the one the kernel
/// picks without capture; only the ephemeral port differs), and ztunnel's record names
/// the app's exact address and port as the source: its accepted end sees the app's
/// socket as its peer. `capture` is the Topology's `--capture` (None: eBPF).
pub(crate) fn captured_app_sees_what_an_uncaptured_one_sees(
    capture: Option<&str>,
) -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.capture = capture.map(str::to_owned);
    let a = t.add_pod("a", false, true)?;
    let b = t.add_pod("b", false, true)?;
    let _s4 = t.serve(&b, b.addr(8080))?;
    let _s6 = t.serve(&b, b.addr6(8080))?;
    let z = t.start_ztunnel(false)?;
    let mapped = SocketAddr::new(IpAddr::V6(b.ip4.to_ipv6_mapped()), 8080);
    let dsts = [b.addr(8080), b.addr6(8080), mapped];

    let mut uncaptured = Vec::new();
    for dst in dsts {
        let out = t.call(&a, dst, &[])?;
        assert!(out.contains("match=true"), "{dst}: {out}");
        uncaptured.push(app_view(&out)?);
    }
    // The kernel's own choice, for the record: the pod's address of each family.
    let own = [
        IpAddr::V4(a.ip4),
        IpAddr::V6(a.ip6.expect("dual-stack pod")),
        IpAddr::V6(a.ip4.to_ipv6_mapped()),
    ];
    for ((_, local), want) in uncaptured.iter().zip(own) {
        assert_eq!(local.ip(), want, "uncaptured getsockname");
    }
    assert_eq!(z.dump()?.connections.opened_total, 0);

    t.set_ambient("a", true)?;
    z.wait_enrolled(&[&a])?;
    let mut captured = Vec::new();
    for (dst, (peer, local)) in dsts.iter().zip(&uncaptured) {
        let out = t.call(&a, *dst, &[])?;
        assert!(out.contains("match=true"), "{dst}: {out}");
        let (cpeer, clocal) = app_view(&out)?;
        assert_eq!(cpeer, *peer, "getpeername of a captured connect to {dst}");
        assert_eq!(
            clocal.ip(),
            local.ip(),
            "getsockname of a captured connect to {dst}"
        );
        assert_ne!(clocal.port(), 0);
        captured.push(clocal);
    }

    let d = z.wait_for("three closed outbound records", |d| {
        d.connections
            .list
            .iter()
            .filter(|r| r.direction == Direction::Outbound && r.outcome.is_some())
            .count()
            == dsts.len()
    })?;
    let canonical = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    // The IPv4 and the v4-mapped connects share a destination: each record is found by
    // its app's exact address and port, which ztunnel saw as its peer.
    for (dst, local) in dsts.iter().zip(captured) {
        assert!(
            d.connections
                .list
                .iter()
                .any(|r| r.direction == Direction::Outbound
                    && r.dst == canonical(*dst)
                    && r.src == canonical(local)
                    && r.outcome.as_deref() == Some("ok")),
            "no record of {local} → {dst}: ztunnel saw another source than the app's socket: {:?}",
            d.connections.list
        );
    }
    if capture.is_none() {
        assert_eq!(d.capture.counters["connect_captured"], 3);
        assert_eq!(d.capture.counters["orig_dst_hit"], 3);
        assert_eq!(d.capture.counters["connect_source_loopback"], 0);
    }
    Ok(())
}

#[test]
fn captured_app_sees_the_addresses_of_an_uncaptured_connect() -> anyhow::Result<()> {
    captured_app_sees_what_an_uncaptured_one_sees(None)
}

/// An app that binds its own source keeps it: an address (port 0, the kernel picks the
/// port at bind) stays as the app chose it; a port without an address cannot be bound to
/// the pod's address by the connect hook (the socket is bound already), so the source
/// stays loopback — counted, and captured all the same.
#[test]
fn an_apps_own_bind_is_kept_and_a_port_only_bind_is_counted() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    let own = a.addr(0).to_string();
    let out = t.call(&a, b.addr(8080), &["--bind", &own])?;
    assert!(out.contains("match=true"), "{out}");
    let (peer, local) = app_view(&out)?;
    assert_eq!(peer, b.addr(8080));
    assert_eq!(local.ip(), IpAddr::V4(a.ip4));

    let out = t.call(&a, b.addr(8080), &["--bind", "0.0.0.0:41234"])?;
    assert!(out.contains("match=true"), "{out}");
    let (peer, local) = app_view(&out)?;
    assert_eq!(peer, b.addr(8080));
    assert_eq!(local, "127.0.0.1:41234".parse::<SocketAddr>()?);

    let d = z.wait_for("two closed outbound records", |d| {
        d.connections
            .list
            .iter()
            .filter(|r| r.direction == Direction::Outbound && r.outcome.as_deref() == Some("ok"))
            .count()
            == 2
    })?;
    assert_eq!(d.capture.counters["connect_captured"], 2);
    assert_eq!(d.capture.counters["connect_source_loopback"], 1);
    // The record names the pod's address with the app's port, as before the fix.
    assert!(
        d.connections
            .list
            .iter()
            .any(|r| r.src == a.addr(41234) && r.dst == b.addr(8080)),
        "{:?}",
        d.connections.list
    );
    Ok(())
}
