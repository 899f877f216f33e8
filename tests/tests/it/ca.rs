//! The built-in CA's directory shared by ztunnels that start at the same time.
use ztunnel_tests::Topology;

/// The `serial=` of the built-in CA root line of a ztunnel log, and whether it generated it.
fn root_serial(log: &str) -> Option<(String, bool)> {
    let line = log.lines().find(|l| {
        l.contains("generated a new built-in ca root") || l.contains("loaded the built-in ca root")
    })?;
    let serial = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("serial="))?
        .trim_matches('"')
        .to_owned();
    Some((serial, line.contains("generated")))
}

#[test]
fn ten_ztunnels_racing_on_an_empty_ca_dir_all_start_with_the_same_root() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let file = t.workloads_path();
    t.write_workloads()?;
    assert!(!t.dir.path().join("ca").exists(), "the ca dir starts empty");
    let mut zs = Vec::new();
    for n in 0..10 {
        zs.push(t.spawn_ztunnel(&format!("ca-race-{n}"), false, &file)?);
    }
    let mut serials = Vec::new();
    for z in &zs {
        z.wait_for("the admin api", |_| true)?;
        // The log is written by a thread of its own: the line may follow the admin api.
        let log = z.log_when(|l| root_serial(l).is_some());
        let (serial, generated) = root_serial(&log)
            .ok_or_else(|| anyhow::anyhow!("no built-in ca root line in:\n{log}"))?;
        serials.push((serial, generated));
    }
    let generated = serials.iter().filter(|(_, g)| *g).count();
    assert_eq!(
        generated, 1,
        "exactly one ztunnel creates the root: {serials:?}"
    );
    assert!(
        serials.iter().all(|(s, _)| *s == serials[0].0),
        "every ztunnel runs with the same root: {serials:?}"
    );
    for z in &zs {
        assert!(z.alive(), "ztunnel exited:\n{}", z.log_text());
    }
    Ok(())
}
