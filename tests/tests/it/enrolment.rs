//! Enrolment and unenrolment of running pods, live, from the workload file.
use ztunnel_tests::{Topology, cgroup_programs, pod_net_programs};

#[test]
fn enrolment_keeps_existing_connections_and_unenrolment_leaves_nothing() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", false, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    // A long-lived connection opened before enrolment.
    let b_addr = b.addr(8080).to_string();
    let mut hold = t.spawn(&a, &["hold", &b_addr, "--secs", "4"])?;
    let first = hold.read_line()?;
    assert!(first.starts_with("connected"), "{first}");

    t.set_ambient("a", true)?;
    let d = z.wait_enrolled(&[&a])?;
    let programs = &d.enrolled_pods[0].attached_programs;
    for p in [
        "connect4_capture",
        "connect6_capture",
        "getpeername4_capture",
        "sockops_capture",
        "tc_ingress_capture",
    ] {
        assert!(
            programs.iter().any(|x| x == p),
            "{p} missing from {programs:?}"
        );
    }

    // The next connection is captured ...
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    let d = z.wait_for("the captured connection", |d| {
        d.connections.opened_total == 1
    })?;
    assert_eq!(d.connections.list[0].pod, a.key());
    assert_eq!(d.capture.occupancy.pod_sources, 1, "a's IPv4 source");
    // ... and the one opened before kept flowing throughout.
    let held = hold.wait_ok()?;
    assert!(held.contains("pings="), "{held}");

    t.set_ambient("a", false)?;
    let d = z.wait_enrolled(&[])?;
    assert_eq!(d.capture.occupancy.pod_addrs, 0);
    assert_eq!(d.capture.occupancy.pod_sources, 0);
    assert_eq!(d.capture.occupancy.orig_dst_by_cookie, 0);
    assert_eq!(d.capture.occupancy.orig_dst_by_tuple, 0);
    assert_eq!(
        cgroup_programs(&a.cgroup)?,
        "",
        "programs left on the pod cgroup"
    );
    let net = pod_net_programs(&a)?;
    assert!(
        !net.contains("tc_ingress"),
        "tc program left in the pod: {net}"
    );

    // New connections go direct again.
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    assert_eq!(z.dump()?.connections.opened_total, 1);
    Ok(())
}

#[test]
fn crashed_ztunnel_fails_closed_and_its_successor_takes_over() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    z.crash();

    // Capture stays attached: the connect still goes to :15001, where nothing listens.
    let res = t.call(&a, b.addr(8080), &[]);
    let err = format!("{:?}", res.expect_err("no plaintext while ztunnel is down"));
    assert!(err.contains("Connection refused"), "{err}");

    // A new ztunnel adopts the pinned capture: one set of programs, traffic flows.
    let z = t.start_ztunnel(false)?;
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    let d = z.wait_for("the captured connection", |d| {
        d.connections.opened_total == 1
    })?;
    assert_eq!(d.connections.list[0].pod, a.key());
    let progs = cgroup_programs(&a.cgroup)?;
    assert_eq!(progs.matches("connect4_capture").count(), 1, "{progs}");
    assert_eq!(progs.matches("sockops_capture").count(), 1, "{progs}");
    Ok(())
}
