//! The original-destination map is bounded and fails closed: when it is full an enrolled
//! pod's connect is refused (EPERM), never sent direct; entries leave with their sockets,
//! also those of connects the kernel failed after the capture recorded them.
use std::time::Duration;

use ztunnel_common::orig_dst;
use ztunnel_tests::{FilledOrigDstMap, Topology};

#[test]
fn full_orig_dst_map_refuses_connects_and_nothing_goes_direct() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    // Fill the map, as a flood of connections would.
    let full = FilledOrigDstMap::fill(&z)?;

    let wire = t.dir.path().join("b-eth0.pcap");
    let cap = ztunnel_tests::Tcpdump::start(&b.netns, "eth0", wire)?;
    let err = t
        .call(&a, b.addr(8080), &[])
        .expect_err("a connect must not succeed with the map full");
    let err = format!("{err:#}");
    assert!(err.contains("Operation not permitted"), "{err}");
    let seen = cap.finish()?;
    assert!(
        !seen.contains(&format!("{}.8080", b.ip4)),
        "the refused connect went out direct:\n{seen}"
    );
    let d = z.dump()?;
    assert_eq!(d.capture.counters["connect_refused"], 1);
    assert_eq!(d.capture.counters["connect_captured"], 0);
    assert_eq!(d.connections.opened_total, 0);
    let metrics = z.metrics_text()?;
    assert!(
        metrics.contains(r#"ztunnel_capture_events_total{event="connect_refused"} 1"#),
        "{metrics}"
    );

    // Room again: the next connect is captured as usual.
    full.empty()?;
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    assert_eq!(z.dump()?.capture.counters["connect_captured"], 1);
    Ok(())
}

/// A connect the capture recorded but the kernel then failed (its 4-tuple is taken)
/// never reaches `tcp_connect`, so sockops never sees it close; its entry must still go
/// when the app closes the socket, or such failures would fill the map for good.
#[test]
fn failed_connects_leave_no_orig_dst_entry() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    let dst = b.addr(8080).to_string();
    let out = t
        .spawn(&a, &["same-port", &dst, "--port", "40500"])?
        .wait_ok()?;
    assert!(
        out.contains("first=ok") && out.contains("second=Cannot assign requested address"),
        "{out}"
    );
    let d = z.wait_for("every original-destination entry gone", |d| {
        d.capture.occupancy.orig_dst_by_cookie == 0 && d.capture.occupancy.orig_dst_by_tuple == 0
    })?;
    assert_eq!(d.capture.counters["connect_captured"], 2);
    // Nothing lingers: wait a little and look again.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(z.dump()?.capture.occupancy.orig_dst_by_cookie, 0);
    Ok(())
}

/// A pin left by a build whose original-destination map was LRU (it evicted live
/// entries instead of refusing) must not be reused: ztunnel replaces it with a map of
/// its own shape, which then fills and refuses.
#[test]
fn an_lru_map_pinned_by_an_older_build_is_replaced() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let _a = t.add_pod("a", true, false)?;
    let maps = t.pin_dir("node1").join("maps");
    std::fs::create_dir_all(&maps)?;
    let pin = maps.join(orig_dst::BY_COOKIE);
    let out = std::process::Command::new("bpftool")
        .arg("map")
        .arg("create")
        .arg(&pin)
        .args([
            "type", "lru_hash", "key", "8", "value", "32", "entries", "1024",
        ])
        .args(["name", "ORIG_DST_COOKIE"])
        .output()?;
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        aya::maps::MapInfo::from_pin(&pin)?.map_type()?,
        aya::maps::MapType::LruHash
    );

    let z = t.start_ztunnel(false)?;
    let info = aya::maps::MapInfo::from_pin(&pin)?;
    assert_eq!(info.map_type()?, aya::maps::MapType::Hash);
    assert_eq!(info.max_entries(), orig_dst::MAX_ENTRIES);
    // Logged at start-up, but written by the log's own thread: wait for the line.
    z.wait_log_line("has another shape; replacing it")?;
    Ok(())
}
