//! The start-up probe picks the capture path the running kernel supports, and the path
//! in use is the one it reports: TCX links from Linux 6.6, a clsact qdisc before; eBPF
//! capture from 5.15 (netns cookies in sockops), iptables below. `cargo xtask vm-test`
//! runs these on every kernel of the matrix; on the host they check the host's kernel.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ztunnel_tests::{Pod, Topology};

/// `(major, minor)` of the running kernel, read independently of ztunnel's probe.
fn kernel() -> anyhow::Result<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.trim().split(['.', '-', '+']);
    let mut next = || -> anyhow::Result<u32> {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected kernel release {release:?}"))
    };
    Ok((next()?, next()?))
}

/// `ip netns exec <pod> <args…>`, stdout.
fn in_pod(pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .args(args)
        .output()
        .with_context(|| format!("failed to run {args:?} in {}", pod.netns))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} in {} failed: {}",
        pod.netns,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn auto_capture_takes_the_path_the_kernel_supports() -> anyhow::Result<()> {
    let version = kernel()?;
    let (tcx, cookies) = (version >= (6, 6), version >= (5, 15));
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let z = t.start_ztunnel(false)?;
    let d = z.dump()?;
    let features = &d.capture.features;
    assert_eq!(features["tcx"], tcx, "{version:?}: {features}");
    assert_eq!(
        features["netns_cookie_in_sockops"], cookies,
        "{version:?}: {features}"
    );

    let qdiscs = in_pod(&a, &["tc", "qdisc", "show", "dev", "eth0"])?;
    let nat = in_pod(&a, &["iptables", "-t", "nat", "-S"])?;
    if cookies {
        assert_eq!(d.capture.mode, "ebpf", "{version:?}");
        let pod = &d.enrolled_pods[0];
        assert!(
            pod.attached_programs
                .iter()
                .any(|p| p == "tc_ingress_capture"),
            "{pod:?}"
        );
        // TCX links need no qdisc; without TCX the filter hangs off a clsact qdisc.
        assert_eq!(qdiscs.contains("clsact"), !tcx, "{version:?}: {qdiscs}");
        assert!(!nat.contains("ZTUNNEL"), "{nat}");
    } else {
        assert_eq!(d.capture.mode, "iptables", "{version:?}");
        assert!(nat.contains("ZTUNNEL_OUTPUT"), "{nat}");
        assert!(!qdiscs.contains("clsact"), "{qdiscs}");
    }

    // The path works: A's outbound call is carried by ztunnel either way.
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    z.wait_for("the outbound record", |d| {
        d.connections
            .list
            .iter()
            .any(|r| r.dst == b.addr(8080) && r.outcome.is_some())
    })?;
    Ok(())
}

#[test]
fn forced_ebpf_capture_is_refused_below_5_15_and_loads_above() -> anyhow::Result<()> {
    let version = kernel()?;
    let mut t = Topology::new()?;
    t.capture = Some("ebpf".to_owned());
    t.add_pod("a", true, false)?;
    if version >= (5, 15) {
        let z = t.start_ztunnel(false)?;
        assert_eq!(z.dump()?.capture.mode, "ebpf");
        return Ok(());
    }
    t.write_workloads()?;
    let file = t.workloads_path();
    let z = t.spawn_ztunnel("node1", false, &file)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while z.alive() {
        assert!(
            Instant::now() < deadline,
            "ztunnel --capture ebpf kept running on {version:?}:\n{}",
            z.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = z.log_text();
    assert!(
        log.contains("eBPF capture needs Linux >= 5.15"),
        "no clear refusal on {version:?}:\n{log}"
    );
    Ok(())
}
