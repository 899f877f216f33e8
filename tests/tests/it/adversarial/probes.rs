//! Kubelet probes under STRICT mTLS: from the node's own addresses they reach the app, as
//! istio-cni's probe SNAT lets them in Istio; from a pod outside the mesh nothing does.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use ztunnel_tests::Topology;

#[test]
fn node_probes_reach_strict_pods_and_nothing_else_from_outside_does() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let server = t.add_pod("server", true, false)?;
    let outsider = t.add_pod("outsider", false, false)?;
    let _srv = t.serve(&server, server.addr(8080))?;
    t.write_workloads_text(&format!(
        "{}peerAuthentications:\n  - name: strict\n    namespace: default\n    mode: STRICT\n",
        t.workloads_yaml()
    ))?;
    // The node's netns is node1's (a host /proc whose pid 1 lives there), so the default
    // `node` probe source means node1's addresses, the bridge the pods route through.
    let host_proc = t.dir.path().join("hostproc");
    std::fs::create_dir_all(host_proc.join("1/ns"))?;
    std::os::unix::fs::symlink(
        format!("/var/run/netns/{}", t.nodes[0]),
        host_proc.join("1/ns/net"),
    )?;
    let mut source = Command::new("");
    source
        .arg("--workloads")
        .arg(t.workloads_path())
        .env("ZTUNNEL_HOST_PROC", &host_proc);
    let z = t.spawn_ztunnel_from("node1", false, &source)?;
    z.wait_enrolled(&[&server])?;

    // The node's addresses are read in the background: wait until the probe passes.
    let node_ip = t.gateway4(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        match t.call_from_node(1, server.addr(8080), &[]) {
            Ok(out) if out.contains("match=true") => break out,
            other => anyhow::ensure!(
                Instant::now() < deadline,
                "a probe from the node never reached the STRICT pod: {other:?}\nztunnel log:\n{}",
                z.log_text()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(out.contains("match=true"), "{out}");
    // It went through ztunnel, from the node's address, marked as a probe.
    let dump = z.dump()?;
    assert!(
        dump.connections
            .list
            .iter()
            .any(|c| c.probe && c.src.ip() == node_ip && c.dst == server.addr(8080)),
        "no probe record from {node_ip}: {:?}",
        dump.connections.list
    );
    // Probes stay out of Istio's metrics, as Istio's never reach its ztunnel.
    let metrics = z.metrics_text()?;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")),
        "a probe was counted in Istio's metrics:\n{metrics}"
    );

    // A plaintext call from a pod outside the mesh is still refused by STRICT mTLS...
    let refused = t.call(&outsider, server.addr(8080), &[]);
    assert!(
        !matches!(&refused, Ok(out) if out.contains("match=true")),
        "plaintext from outside the mesh reached a STRICT pod: {refused:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !z.log_text().contains("STRICT mTLS refuses plaintext") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no STRICT denial logged:\n{}",
            z.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and counted like any other inbound connection (so the check above can fail).
    let metrics = z.metrics_text()?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")),
        "the refused call is missing from Istio's metrics:\n{metrics}"
    );
    Ok(())
}
