//! Inbound capture: tc ingress + bpf_sk_assign to ztunnel's :15006.
use anyhow::Context as _;
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

/// ztunnel dials the app from the client's address. In the pod's netns a plaintext
/// client connection ztunnel accepted (local pod:8080, remote client:port) is the very
/// socket the app would hold for a dial from client:port, and the app's socket of a
/// dial is the very socket a new client connection from the dial's port would need:
/// either way the second SYN reaches the first connection's socket and hangs until a
/// connect timeout. The dial's port is ztunnel's choice, made before the SYN: an odd
/// port of the pod's range, never one of a client connection it holds; Linux clients
/// connect from even ports. The port ranges leave exactly the ports that would collide.
#[test]
fn inbound_dials_and_client_connections_never_take_each_others_tuples() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let mut srv = t.serve_with(&a, "0.0.0.0:8080".parse()?, &["--log-peers"])?;
    a.sysctl(&["net.ipv4.ip_local_port_range=40000 40001"])?;
    let z = t.start_ztunnel(false)?;
    let c_ip = c.addr(0).ip();
    let from = |port: u16| std::net::SocketAddr::new(c_ip, port).to_string();
    let peer = |srv: &mut ztunnel_tests::PodProcess| -> anyhow::Result<u16> {
        let line = srv.read_line()?;
        let port = line
            .strip_prefix(&format!("conn from {c_ip}:"))
            .and_then(|p| p.trim().parse().ok());
        port.with_context(|| format!("the app's peer: {line:?}"))
    };

    // A client on the pod's only odd port: the dial passes it over for an even one.
    let out = t.call(
        &c,
        a.addr(8080),
        &["--bind", &from(40001), "--bytes", "100"],
    )?;
    assert!(out.contains("match=true"), "{out}");
    assert_eq!(peer(&mut srv)?, 40000, "the dial's port");
    assert_eq!(
        z.metric("ztunnel_inbound_dial_ports_skipped_total", &[])?,
        1
    );

    // A connection held from c:40012, then a new one from c:40010, the port a dial
    // picked by the kernel (even ports first) would have taken for the held one: the
    // new connection's SYN met the app's socket of that dial and hung. Dials take odd
    // ports now. The range is read again once a second old.
    a.sysctl(&["net.ipv4.ip_local_port_range=40010 40013"])?;
    c.sysctl(&["net.ipv4.ip_local_port_range=40012 40012"])?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let dst = a.addr(8080).to_string();
    let mut hold = t.spawn(&c, &["hold", &dst, "--secs", "4"])?;
    let first = hold.read_line()?;
    assert!(first.contains(&format!("peer={dst}")), "{first}");
    let held = peer(&mut srv)?;
    let out = t.call(
        &c,
        a.addr(8080),
        &["--bind", &from(40010), "--bytes", "100"],
    )?;
    assert!(out.contains("match=true"), "{out}");
    let second = peer(&mut srv)?;
    let mut dials = [held, second];
    dials.sort_unstable();
    assert_eq!(dials, [40011, 40013], "the dials' ports");
    let out = hold.wait_ok()?;
    assert!(out.contains("pings="), "{out}");

    let d = z.wait_closed(3)?;
    for r in &d.connections.list {
        assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    }
    assert_eq!(
        z.metric("ztunnel_inbound_dial_ports_skipped_total", &[])?,
        1
    );
    Ok(())
}
