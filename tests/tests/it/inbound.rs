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

/// ztunnel dials the app from the client's address, with a port the pod's kernel picks
/// by the dial's own tuple. In the pod's netns the client's connection, which ztunnel
/// accepted, holds the tuple (pod:8080, client:port) already: a dial that got that port
/// would send its SYN to ztunnel's accepted socket instead of the app, and hang until the
/// connect timeout. The port ranges make the kernel pick exactly that port (connects try
/// the range's even ports first): first the client's own, then one that another of the
/// client's open connections has.
#[test]
fn inbound_dials_never_take_the_tuple_of_a_client_connection() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let srv = t.serve(&a, "0.0.0.0:8080".parse()?)?;
    let z = t.start_ztunnel(false)?;
    let c_ip = c.addr(0).ip();

    // The client's own port.
    a.sysctl(&["net.ipv4.ip_local_port_range=40000 40001"])?;
    let bind = std::net::SocketAddr::new(c_ip, 40000).to_string();
    let out = t.call(&c, a.addr(8080), &["--bind", &bind, "--bytes", "100"])?;
    assert!(out.contains("match=true"), "{out}");

    // The port of another connection of the client's, still open.
    c.sysctl(&["net.ipv4.ip_local_port_range=40004 40004"])?;
    a.sysctl(&["net.ipv4.ip_local_port_range=40010 40011"])?;
    let dst = a.addr(8080).to_string();
    let mut hold = t.spawn(&c, &["hold", &dst, "--secs", "4"])?;
    let first = hold.read_line()?;
    assert!(first.starts_with("connected"), "{first}");
    // The client is connected once ztunnel accepted; its dial to the app (from
    // c:40010) must have its port before the range changes. The server runs in a's
    // netns, so its /proc/<pid>/net/tcp lists a's sockets: addresses in hex, the IPv4
    // address as the kernel's u32 (byte-reversed here), then the port.
    let std::net::IpAddr::V4(ip) = c_ip else {
        anyhow::bail!("c has no IPv4 address: {c_ip}");
    };
    let [o1, o2, o3, o4] = ip.octets();
    let dialled = format!("{o4:02X}{o3:02X}{o2:02X}{o1:02X}:{:04X}", 40010);
    let table = format!("/proc/{}/net/tcp", srv.pid());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&table)?.contains(&dialled) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no socket of {c_ip}:40010 in {table} ({dialled})"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    a.sysctl(&["net.ipv4.ip_local_port_range=40004 40005"])?;
    let bind = std::net::SocketAddr::new(c_ip, 40006).to_string();
    let out = t.call(&c, a.addr(8080), &["--bind", &bind, "--bytes", "100"])?;
    assert!(out.contains("match=true"), "{out}");
    let held = hold.wait_ok()?;
    assert!(held.contains("pings="), "{held}");

    // Both dials went to the app, from ports other than the client connections'.
    let d = z.wait_closed(3)?;
    for r in &d.connections.list {
        assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    }
    // Each of the two calls' dials got the held port first, and took another.
    assert_eq!(
        z.metric("ztunnel_inbound_dial_ports_skipped_total", &[])?,
        2
    );
    Ok(())
}
