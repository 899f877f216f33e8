//! Map entries go away with their connections: occupancy stays bounded.
use ztunnel_tests::Topology;

#[test]
fn occupancy_stays_bounded_after_10k_connections() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    let dst = b.addr(8080).to_string();
    let out = t
        .spawn(&a, &["many", &dst, "--count", "10000"])?
        .wait_ok()?;
    assert!(out.contains("ok=10000"), "{out}");
    let d = z.wait_for("map entries to drain", |d| {
        d.capture.occupancy.orig_dst_by_cookie == 0 && d.capture.occupancy.orig_dst_by_tuple == 0
    })?;
    assert_eq!(d.capture.counters["connect_captured"], 10000);
    assert_eq!(d.capture.counters["orig_dst_hit"], 10000);
    println!(
        "occupancy after 10000 connections: {:?}",
        d.capture.occupancy
    );
    Ok(())
}
