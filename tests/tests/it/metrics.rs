//! Istio's TCP metrics on :15020 and readiness on :15021.
use std::time::{Duration, Instant};

use ztunnel_tests::{Topology, metric_sample};

#[test]
fn both_reporters_count_the_bytes_moved_with_istio_labels() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z1 = t.start_ztunnel_on("node1", false)?;
    let z2 = t.start_ztunnel_on("node2", false)?;

    let out = t.call(&a, b.addr(8080), &["--bytes", "30000"])?;
    assert!(out.contains("match=true"), "{out}");
    for z in [&z1, &z2] {
        z.wait_for("the closed connection", |d| {
            d.connections.list.iter().any(|r| r.outcome.is_some())
        })?;
    }
    for (z, reporter) in [(&z1, "source"), (&z2, "destination")] {
        let text = z.metrics_text()?;
        let labels = [
            ("reporter", reporter),
            ("source_workload", "a"),
            ("source_workload_namespace", "default"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/a"),
            ("destination_workload", "b"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/b",
            ),
            ("request_protocol", "tcp"),
            ("connection_security_policy", "mutual_tls"),
        ];
        // The echo sends back what it got: 30000 bytes each way.
        for metric in [
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            assert_eq!(
                metric_sample(&text, metric, &labels),
                Some(30000),
                "{metric} ({reporter}):\n{text}"
            );
        }
        for metric in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            assert_eq!(
                metric_sample(&text, metric, &labels),
                Some(1),
                "{metric} ({reporter}):\n{text}"
            );
        }
        assert!(text.contains("ztunnel_enrolled_pods 1"), "{text}");
    }
    let text = z1.metrics_text()?;
    assert!(
        metric_sample(
            &text,
            "ztunnel_capture_events_total",
            &[("event", "connect_captured")]
        ) == Some(1),
        "{text}"
    );
    // The log writer kept up (its queue never filled), and the counter is exposed.
    assert_eq!(
        metric_sample(&text, "ztunnel_log_lines_dropped_total", &[]),
        Some(0),
        "{text}"
    );
    Ok(())
}

#[test]
fn readiness_waits_for_capture_and_certificates() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    // First the file points at a netns that does not exist yet: enrolment keeps failing.
    let real = t.workloads_yaml();
    let missing = real.replace(
        &a.netns_path.display().to_string(),
        "/var/run/netns/does-not-exist",
    );
    t.write_workloads_text(&missing)?;
    let file = t.workloads_path();
    let z = t.spawn_ztunnel("node1", false, &file)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let reason = loop {
        match z.ready() {
            Err(e) if e.to_string().contains("503") => break e.to_string(),
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "readiness never answered 503");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reason.contains("default/a"), "{reason}");

    t.write_workloads_text(&real)?;
    z.wait_enrolled(&[&a])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while z.ready().is_err() {
        anyhow::ensure!(Instant::now() < deadline, "never ready: {:?}", z.ready());
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
