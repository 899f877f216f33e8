//! `cargo xtask bench --quick` as a smoke test: the harness runs every scenario and
//! reports every figure, with ratios, in all three formats, and the upgrade under load.
//! Timings and failure counts are not judged here (that is what the bench and the
//! upgrade tests are for). Scenario I (Istio's ztunnel) runs only when
//! `ISTIO_ZTUNNEL_BIN` names its binary (docs/bench/README.md).
use ztunnel_tests::bench::{self, FIGURES, Report, Scenario};

#[test]
fn quick_bench_reports_every_figure_for_every_scenario() -> anyhow::Result<()> {
    ztunnel_tests::require_root();
    let dir = tempfile::tempdir()?;
    let istio_ztunnel = std::env::var_os("ISTIO_ZTUNNEL_BIN").map(std::path::PathBuf::from);
    let with_istio = istio_ztunnel.is_some();
    let report = bench::run(&bench::Options {
        quick: true,
        only: Vec::new(),
        profile: false,
        out_dir: dir.path().to_owned(),
        istio_ztunnel,
        upgrade_only: false,
        latency_only: false,
        memory_only: false,
        memory_hook: None,
    })?;
    let ran: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| with_istio || *s != Scenario::I)
        .collect();
    let scenarios: Vec<Scenario> = report.scenarios.iter().map(|r| r.scenario).collect();
    assert_eq!(scenarios, ran);
    for s in ran.iter().copied() {
        for f in FIGURES {
            let v = report.get(s, f.key);
            if f.ztunnel_only && s == Scenario::S0 {
                assert_eq!(v, None, "{s:?} has no ztunnel, so no {}", f.key);
                continue;
            }
            if s.not_measured().iter().any(|(k, _)| *k == f.key) {
                assert_eq!(v, None, "{s:?} should not measure {}", f.key);
                let sc = report
                    .scenarios
                    .iter()
                    .find(|r| r.scenario == s)
                    .expect("scenario");
                assert!(sc.not_measured[f.key].contains("not measured"));
                continue;
            }
            let v = v.unwrap_or_else(|| panic!("{s:?} lacks {}", f.key));
            assert!(v.is_finite() && v >= 0.0, "{s:?} {}: {v}", f.key);
            if !f.key.starts_with("kib_per") {
                assert!(v > 0.0, "{s:?} {} is zero", f.key);
            }
        }
    }
    // Ratios to S0 from the same run, for every figure S0 has.
    let s2 = report
        .scenarios
        .iter()
        .find(|r| r.scenario == Scenario::S2)
        .expect("S2");
    let tput = &s2.figures["tput_1_gbps"];
    let s0 = report
        .get(Scenario::S0, "tput_1_gbps")
        .expect("S0 throughput");
    let ratio = tput.ratio_to_s0.expect("ratio to S0");
    assert!((ratio - tput.value / s0).abs() < 1e-9);
    let u = report
        .upgrade
        .as_ref()
        .expect("the upgrade under load is measured");
    assert_eq!(u.rate_per_sec, bench::UPGRADE_RATE);
    assert_eq!(u.rounds, 1);
    assert!(u.attempted > 0, "no connection during the upgrade: {u:?}");
    assert!(u.failed <= u.attempted, "{u:?}");
    assert!(u.handover_ms > 0.0, "{u:?}");
    assert!(
        u.ready_ms >= u.handover_ms && u.predecessor_exit_ms >= u.handover_ms,
        "the handover ends before the successor is ready and the predecessor exits: {u:?}"
    );
    // Ours against Istio's when it ran, and the targets stated against it; one more for
    // the upgrade.
    assert_eq!(tput.ratio_to_i.is_some(), with_istio);
    assert_eq!(
        report.targets.len(),
        if with_istio { 10 } else { 8 },
        "{:?}",
        report.targets
    );
    assert!(
        report
            .targets
            .iter()
            .any(|t| t.name.contains("upgrade under load"))
    );

    let json: Report =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("bench.json"))?)?;
    assert_eq!(json.scenarios.len(), ran.len());
    assert_eq!(
        json.upgrade.as_ref().map(|u| (u.attempted, u.failed)),
        Some((u.attempted, u.failed))
    );
    assert!(!json.machine.kernel.is_empty() && !json.commit.is_empty());
    let md = std::fs::read_to_string(dir.path().join("bench.md"))?;
    for f in FIGURES {
        assert!(md.contains(f.label), "bench.md lacks {}", f.label);
    }
    assert!(md.contains("## Upgrade under load"), "{md}");
    assert!(
        md.contains(&format!("| connections failed | {} |", u.failed)),
        "{md}"
    );
    let svg = std::fs::read_to_string(dir.path().join("bench.svg"))?;
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // One bar per figure a scenario has (those measured without a proxy too: S0's
    // figures), plus the legend.
    let bars: usize = report
        .scenarios
        .iter()
        .map(|sc| {
            FIGURES
                .iter()
                .filter(|f| !f.ztunnel_only && sc.figures.contains_key(f.key))
                .count()
        })
        .sum();
    assert!(
        bars >= ran.len() * 5,
        "{bars} bars for {} scenarios",
        ran.len()
    );
    assert_eq!(svg.matches("<rect").count(), bars + ran.len());
    assert!(
        bench::leftovers_gone()?,
        "the bench left namespaces, cgroups or pins"
    );
    Ok(())
}

/// `--memory-only`: the memory figures of the proxied scenario, and nothing else (no
/// throughput, latency or connection rate, no upgrade).
#[test]
fn memory_only_bench_reports_only_the_memory_figures() -> anyhow::Result<()> {
    ztunnel_tests::require_root();
    let dir = tempfile::tempdir()?;
    let report = bench::run(&bench::Options {
        quick: true,
        only: vec![Scenario::S2],
        profile: false,
        out_dir: dir.path().to_owned(),
        istio_ztunnel: None,
        upgrade_only: false,
        latency_only: false,
        memory_only: true,
        memory_hook: None,
    })?;
    let memory = [
        "rss_idle_mib",
        "rss_idle_conns_mib",
        "kib_per_idle_conn",
        "kib_per_more_idle_conn",
        "kib_per_idle_plain_conn",
        "rss_peak_mib",
    ];
    for f in FIGURES {
        let v = report.get(Scenario::S2, f.key);
        if memory.contains(&f.key) {
            let v = v.unwrap_or_else(|| panic!("S2 lacks {}", f.key));
            assert!(v.is_finite() && v >= 0.0, "{}: {v}", f.key);
        } else {
            assert_eq!(v, None, "a memory-only run measured {}", f.key);
        }
    }
    let idle = report.get(Scenario::S2, "rss_idle_mib").expect("idle RSS");
    let with_conns = report
        .get(Scenario::S2, "rss_idle_conns_mib")
        .expect("RSS with connections");
    assert!(idle > 1.0 && with_conns >= idle, "{idle} {with_conns}");
    assert!(report.upgrade.is_none());
    assert!(
        bench::leftovers_gone()?,
        "the bench left namespaces, cgroups or pins"
    );
    Ok(())
}
