//! Kernel-side diagnostics: the kernel's per-program statistics, switched on through the
//! admin port and the CLI for a bounded time.
use std::time::{Duration, Instant};

use ztunnel::ebpf::run_stats::Status;
use ztunnel_tests::{Topology, Ztunnel, http, metric_sample};

fn bpf_stats(z: &Ztunnel, method: &str, query: &str) -> anyhow::Result<Status> {
    let body = http(z.admin, method, &format!("/bpf_stats{query}"))?;
    Ok(serde_json::from_str(&body)?)
}

fn runs(s: &Status, program: &str) -> u64 {
    s.programs
        .iter()
        .find(|p| p.program == program)
        .map_or(0, |p| p.runs)
}

/// `ztunnel bpf-stats …` against `z`; its standard output.
fn cli(z: &Ztunnel, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(ztunnel_tests::ztunnel_bin())
        .arg("bpf-stats")
        .args(args)
        .args(["--admin", &z.admin.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bpf-stats {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn bpf_stats_count_the_programs_a_transfer_ran() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    // Off until asked (unless the host's sysctl keeps them on for everyone).
    let before = bpf_stats(&z, "GET", "")?;
    assert_eq!(before.enabled_until, None, "{before:?}");
    assert_eq!(before.enabled, before.sysctl == Some(true), "{before:?}");
    assert_eq!(
        before.programs.len(),
        ztunnel_common::program::ALL.len(),
        "{before:?}"
    );

    let on = cli(&z, &["on", "--for", "5m"])?;
    assert!(on.starts_with("BPF statistics: on until "), "{on}");
    let s = bpf_stats(&z, "GET", "")?;
    assert!(s.enabled && s.enabled_until.is_some(), "{s:?}");

    let out = t.call(&a, b.addr(8080), &["--bytes", "30000"])?;
    assert!(out.contains("match=true"), "{out}");

    // Every program the connection went through ran, and its time was counted: the
    // outbound connect, sockops on both ends, tc on b's eth0 for the inbound SYN, the
    // original destination asked by ztunnel.
    let s = bpf_stats(&z, "GET", "")?;
    for program in [
        "connect4_capture",
        "sockops_capture",
        "tc_ingress_capture",
        "getsockopt_orig_dst",
    ] {
        let p = s
            .programs
            .iter()
            .find(|p| p.program == program)
            .unwrap_or_else(|| panic!("{program} listed: {s:?}"));
        assert!(
            p.runs > runs(&before, program) && p.run_time_ns > 0 && p.id > 0,
            "{p:?} (before: {before:?})"
        );
    }

    // The same numbers in /metrics, /config_dump and the CLI's table.
    let text = z.metrics_text()?;
    assert_eq!(
        metric_sample(&text, "ztunnel_bpf_stats_enabled", &[]),
        Some(1),
        "{text}"
    );
    let m = metric_sample(
        &text,
        "ztunnel_bpf_program_runs_total",
        &[("program", "connect4_capture")],
    )
    .unwrap_or(0);
    assert!(m >= runs(&s, "connect4_capture") && m > 0, "{text}");
    let secs = text
        .lines()
        .find(|l| {
            l.starts_with("ztunnel_bpf_program_run_seconds_total{")
                && l.contains("program=\"tc_ingress_capture\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(secs.is_some_and(|s| s > 0.0), "{text}");
    let d = z.dump()?;
    assert!(d.capture.bpf_stats.enabled, "{:?}", d.capture.bpf_stats);
    assert!(
        runs(&d.capture.bpf_stats, "connect4_capture") >= runs(&s, "connect4_capture"),
        "{:?}",
        d.capture.bpf_stats
    );
    let table = cli(&z, &[])?;
    let row = table
        .lines()
        .find(|l| l.starts_with("connect4_capture "))
        .unwrap_or_else(|| panic!("no connect4_capture row:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols[2].parse::<u64>()? > 0, "{table}");
    let json: Status = serde_json::from_str(&cli(&z, &["-o", "json"])?)?;
    assert!(json.enabled, "{json:?}");

    // Off on request: ztunnel no longer holds them.
    let off = cli(&z, &["off"])?;
    let s = bpf_stats(&z, "GET", "")?;
    assert_eq!(s.enabled_until, None, "{s:?}");
    assert_eq!(s.enabled, s.sysctl == Some(true), "{s:?}\n{off}");
    assert!(z.log_text().contains("BPF program statistics off"));
    Ok(())
}

#[test]
fn bpf_stats_go_off_when_their_time_runs_out_and_bad_requests_say_why() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let _a = t.add_pod("a", true, false)?;
    let z = t.start_ztunnel(false)?;

    for (query, why) in [
        ("?enabled=true&duration=2h", "the limit is 1h"),
        ("?enabled=true&duration=0s", "enabled=false"),
        ("?enabled=maybe", "unknown parameter"),
        ("", "expected ?enabled=true"),
    ] {
        let err = bpf_stats(&z, "POST", query).expect_err(query);
        assert!(
            err.to_string().contains("400") && err.to_string().contains(why),
            "{query}: {err}"
        );
    }
    assert_eq!(bpf_stats(&z, "GET", "")?.enabled_until, None);

    let s = bpf_stats(&z, "POST", "?enabled=true&duration=2s")?;
    assert!(s.enabled_until.is_some(), "{s:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while bpf_stats(&z, "GET", "")?.enabled_until.is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "BPF statistics still held a minute after a 2 s request"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The timer, not only the reading, turned them off.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !z
        .log_text()
        .contains("BPF program statistics off: their time ran out")
    {
        anyhow::ensure!(Instant::now() < deadline, "{}", z.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn bpf_stats_need_ebpf_capture() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.capture = Some("iptables".to_owned());
    let _a = t.add_pod("a", true, false)?;
    let z = t.start_ztunnel(false)?;
    let err = bpf_stats(&z, "POST", "?enabled=true").expect_err("iptables capture");
    assert!(
        err.to_string().contains("409") && err.to_string().contains("iptables"),
        "{err}"
    );
    let s = bpf_stats(&z, "GET", "")?;
    assert!(s.programs.is_empty() && s.enabled_until.is_none(), "{s:?}");
    Ok(())
}
