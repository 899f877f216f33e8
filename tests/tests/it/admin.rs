//! The admin API on loopback: config dump, runtime log level, drain.
use std::time::{Duration, Instant};

use ztunnel_tests::{Topology, http};

#[test]
fn config_dump_shows_workloads_certificates_and_attached_programs() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let _b = t.add_pod("b", false, false)?;
    let z = t.start_ztunnel(false)?;
    let d = z.dump()?;

    let wa = d
        .workloads
        .iter()
        .find(|w| w.name == "a")
        .expect("a listed");
    assert_eq!(wa.protocol, "HBONE");
    assert_eq!(wa.identity, "spiffe://cluster.local/ns/default/sa/a");
    assert_eq!(wa.workload_ips, vec![a.addr(0).ip()]);
    let wb = d
        .workloads
        .iter()
        .find(|w| w.name == "b")
        .expect("b listed");
    assert_eq!(wb.protocol, "TCP");

    let cert = d
        .certificates
        .iter()
        .find(|c| c.identity == wa.identity)
        .expect("a's certificate");
    assert_eq!(cert.state, "Available");
    assert!(cert.expiry_seconds > 23 * 3600, "{cert:?}");
    assert!(
        cert.cert_chain[0]
            .pem_text()
            .is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")),
        "{cert:?}"
    );
    assert_eq!(cert.root_certs.len(), 1, "{cert:?}");

    let pod = &d.enrolled_pods[0];
    assert_eq!(pod.name, a.key());
    assert!(
        pod.attached_programs
            .iter()
            .any(|p| p == "tc_ingress_capture")
    );
    assert_eq!(d.capture.mode, "ebpf");
    Ok(())
}

#[test]
fn log_level_changes_at_runtime() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let _a = t.add_pod("a", true, false)?;
    let z = t.start_ztunnel(false)?;
    assert_eq!(http(z.admin, "GET", "/logging")?.trim(), "info");
    http(z.admin, "POST", "/logging?level=debug")?;
    assert_eq!(http(z.admin, "GET", "/logging")?.trim(), "debug");
    // Debug lines now appear: every admin request logs one at debug (written by the
    // log's own thread, after the answer perhaps).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !z.log_text().contains("\tdebug\tadmin\tadmin request") && Instant::now() < deadline {
        http(z.admin, "GET", "/config_dump")?;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        z.log_text().contains("\tdebug\tadmin\tadmin request"),
        "{}",
        z.log_text()
    );
    let err = http(z.admin, "POST", "/logging?level=%5Bbad").expect_err("bad filter");
    assert!(err.to_string().contains("400"), "{err}");
    Ok(())
}

#[test]
fn quitquitquit_drains_and_exits() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let _a = t.add_pod("a", true, false)?;
    let z = t.start_ztunnel(false)?;
    http(z.admin, "POST", "/quitquitquit")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while z.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!z.alive(), "ztunnel still running after /quitquitquit");
    assert!(z.log_text().contains("drain requested"));
    Ok(())
}

#[test]
fn cli_reads_a_running_ztunnel() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let z = t.start_ztunnel(false)?;
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(ztunnel_tests::ztunnel_bin())
            .args(args)
            .args(["--admin", &z.admin.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let status = run(&["status"])?;
    assert!(
        status.contains("Enrolled pods:") && status.contains(&a.key()),
        "{status}"
    );
    let workloads = run(&["workloads", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&workloads)?;
    assert_eq!(v[0]["name"], "a", "{workloads}");
    Ok(())
}
