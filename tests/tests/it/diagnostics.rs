//! Kernel-side diagnostics: the capture programs' decisions in the log and in `ztunnel
//! capture watch`, and the kernel's per-program statistics, switched on through the admin
//! port and the CLI.
use std::{
    io::BufRead as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ztunnel::{diagnostics::CaptureEvent, ebpf::run_stats::Status, netns::Netns};
use ztunnel_tests::{Pod, Topology, Ztunnel, http, metric_sample};

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
    // The log is written by a thread of its own: wait for the line.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !z.log_text().contains("BPF program statistics off") {
        anyhow::ensure!(Instant::now() < deadline, "{}", z.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
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
fn kernel_diagnostics_need_ebpf_capture() -> anyhow::Result<()> {
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
    for path in ["/logging?capture=debug", "/capture/watch"] {
        let method = if path.starts_with("/logging") {
            "POST"
        } else {
            "GET"
        };
        let err = http(z.admin, method, path).expect_err("iptables capture");
        assert!(
            err.to_string().contains("409") && err.to_string().contains("iptables"),
            "{path}: {err}"
        );
    }
    assert_eq!(http(z.admin, "GET", "/logging")?.trim(), "info");
    Ok(())
}

/// A fragment of a TCP datagram (more fragments, offset 0: the first 8 bytes of a TCP
/// header), sent raw from `from` to `to`: tc on `to`'s eth0 drops it.
fn send_tcp_fragment(from: &Pod, src: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<()> {
    let mut ip =
        etherparse::Ipv4Header::new(8, 64, etherparse::IpNumber::TCP, src.octets(), to.octets())?;
    ip.more_fragments = true;
    ip.identification = 0x2020;
    let mut packet = ip.to_bytes().to_vec();
    packet.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1]);
    Netns::open(&from.netns_path)?.run_on_thread(move || -> anyhow::Result<()> {
        // IPPROTO_RAW: the header is ours (the kernel fills in length and checksum).
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )?;
        s.send_to(&packet, &SocketAddr::V4(SocketAddrV4::new(to, 0)).into())?;
        Ok(())
    })?
}

fn ipv4(pod: &Pod) -> Ipv4Addr {
    match pod.addr(0).ip() {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

/// The log's capture decision lines.
fn decisions(z: &Ztunnel) -> Vec<String> {
    z.log_text()
        .lines()
        .filter(|l| l.contains("\tcapture decision\t"))
        .map(str::to_owned)
        .collect()
}

/// Waits for a decision line holding every one of `parts`.
fn wait_decision(z: &Ztunnel, parts: &[String]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(l) = decisions(z)
            .into_iter()
            .find(|l| parts.iter().all(|p| l.contains(p.as_str())))
        {
            return Ok(l);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no capture decision with {parts:?}; decisions:\n{}",
            decisions(z).join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ztunnel capture-log …` against `z`.
fn capture_log(z: &Ztunnel, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(ztunnel_tests::ztunnel_bin())
        .arg("capture-log")
        .args(args)
        .args(["--admin", &z.admin.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "capture-log {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// How many of `z`'s mappings are of a BPF map: the decision ring buffer's two (its
/// positions and its data) while mapped, none otherwise (ztunnel maps no other map).
fn bpf_map_mappings(z: &Ztunnel) -> anyhow::Result<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", z.pid()))?;
    Ok(maps
        .lines()
        .filter(|l| l.ends_with("anon_inode:bpf-map"))
        .count())
}

/// Waits (at most 5 s: the reader polls every second while idle) until the ring is
/// mapped or not.
fn wait_ring_mapped(z: &Ztunnel, mapped: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = bpf_map_mappings(z)?;
        if (n > 0) == mapped {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ring buffer is {} after 5 s ({n} BPF map mappings)",
            if mapped {
                "still unmapped"
            } else {
                "still mapped"
            }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn capture_log_names_the_pod_and_reason_of_each_decision_only_when_on() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let local: SocketAddr = "127.0.0.1:9090".parse()?;
    let _lo = t.serve(&a, local)?;
    let z = t.start_ztunnel(false)?;
    let exercise = |t: &mut Topology| -> anyhow::Result<()> {
        let out = t.call(&a, b.addr(8080), &[])?;
        anyhow::ensure!(out.contains("match=true"), "{out}");
        let out = t.call(&a, local, &[])?;
        anyhow::ensure!(out.contains("match=true"), "{out}");
        // Plaintext from outside the mesh: tc steers b's SYN to :15006.
        let out = t.call(&c, b.addr(8080), &[])?;
        anyhow::ensure!(out.contains("match=true"), "{out}");
        send_tcp_fragment(&c, ipv4(&c), ipv4(&a))
    };

    // Off (the default): the programs report nothing, so nothing is logged.
    exercise(&mut t)?;
    z.wait_for("the fragment counted", |d| {
        d.capture.counters.get("inbound_drop_fragment") == Some(&1)
    })?;
    assert!(decisions(&z).is_empty(), "{:?}", decisions(&z));
    // Nor is the ring mapped (its 520 KiB would count in ztunnel's memory).
    assert_eq!(bpf_map_mappings(&z)?, 0, "the ring is mapped while off");

    let on = capture_log(&z, &["on"])?;
    assert!(on.contains("capture: connect=debug tc=debug"), "{on}");
    wait_ring_mapped(&z, true)?;
    exercise(&mut t)?;
    let pod = |p: &Pod| format!("pod=\"{}\"", p.key());
    let line = wait_decision(
        &z,
        &[
            "program=\"connect\"".into(),
            "decision=\"captured\"".into(),
            pod(&a),
            format!("dst=\"{}\"", b.addr(8080)),
        ],
    )?;
    assert!(
        line.contains("reason=\"redirected to ztunnel's :15001\""),
        "{line}"
    );
    wait_decision(
        &z,
        &[
            "program=\"connect\"".into(),
            "decision=\"skipped\"".into(),
            pod(&a),
            format!("dst=\"{local}\""),
            "reason=\"loopback destination\"".into(),
        ],
    )?;
    wait_decision(
        &z,
        &[
            "program=\"tc\"".into(),
            "decision=\"captured\"".into(),
            pod(&b),
            format!("src=\"{}:", ipv4(&c)),
            format!("dst=\"{}\"", b.addr(8080)),
            "reason=\"SYN steered to ztunnel's :15006\"".into(),
        ],
    )?;
    let line = wait_decision(
        &z,
        &[
            "program=\"tc\"".into(),
            "decision=\"dropped\"".into(),
            pod(&a),
            "reason=\"IP fragment of TCP\"".into(),
        ],
    )?;
    assert!(
        line.contains("\twarn\tcapture\t") && line.contains(&format!("src=\"{}:0\"", ipv4(&c))),
        "{line}"
    );

    // Off again: a new connect adds no line.
    let off = capture_log(&z, &["off"])?;
    assert_eq!(off.trim(), "info", "{off}");
    let before = decisions(&z).len();
    exercise(&mut t)?;
    z.wait_for("the second fragment counted", |d| {
        d.capture.counters.get("inbound_drop_fragment") == Some(&3)
    })?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(decisions(&z).len(), before, "{:?}", decisions(&z));
    // Read until empty, then unmapped.
    wait_ring_mapped(&z, false)?;

    // One program at one level: tc's drops only.
    let on = capture_log(&z, &["on", "--program", "tc", "--level", "warn"])?;
    assert!(
        on.contains("capture: tc=warn") && !on.contains("connect="),
        "{on}"
    );
    exercise(&mut t)?;
    wait_decision(&z, &["decision=\"dropped\"".into(), pod(&a)])?;
    z.wait_for("the fourth fragment counted", |d| {
        d.capture.counters.get("inbound_drop_fragment") == Some(&4)
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let new: Vec<String> = decisions(&z).split_off(before);
    assert!(
        new.len() == 1 && new[0].contains("IP fragment of TCP"),
        "{new:?}"
    );
    let err = http(z.admin, "POST", "/logging?capture=tcp:debug").expect_err("bad program");
    assert!(err.to_string().contains("400") && err.to_string().contains("unknown program"));
    Ok(())
}

#[test]
fn capture_watch_shows_a_pods_connect_live() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    let mut watch = Command::new(ztunnel_tests::ztunnel_bin())
        .args(["capture", "watch", "--pod", &a.key(), "-o", "json"])
        .args(["--admin", &z.admin.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = watch.stdout.take().context("watch stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !z.log_text().contains("capture watch started") {
            anyhow::ensure!(Instant::now() < deadline, "{}", z.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = z.metrics_text()?;
        anyhow::ensure!(
            metric_sample(&text, "ztunnel_capture_watchers", &[]) == Some(1),
            "{text}"
        );
        let out = t.call(&a, b.addr(8080), &[])?;
        anyhow::ensure!(out.contains("match=true"), "{out}");
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .with_context(|| format!("no captured connect from a; saw {seen:?}"))?;
            let e: CaptureEvent = serde_json::from_str(&line).with_context(|| line.clone())?;
            // Only a's decisions: b's inbound SYN (tc) is not shown.
            anyhow::ensure!(e.pod.as_deref() == Some(a.key().as_str()), "{line}");
            if e.program == "connect" && e.decision == "captured" && e.dst == Some(b.addr(8080)) {
                return Ok(());
            }
            seen.push(line);
        }
    })();
    let _ = watch.kill();
    let _ = watch.wait();
    result?;
    // The watcher gone, the programs stop reporting: nothing was asked of the log.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !z.log_text().contains("capture watch ended") {
        anyhow::ensure!(Instant::now() < deadline, "{}", z.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(decisions(&z).is_empty(), "{:?}", decisions(&z));
    let text = z.metrics_text()?;
    assert_eq!(
        metric_sample(&text, "ztunnel_capture_watchers", &[]),
        Some(0),
        "{text}"
    );
    Ok(())
}

/// The tuple map full (a flood of established captured connections): sockops cannot
/// record the connection's original destination, so ztunnel finds none and closes it
/// (fail closed). Both are counted (`tuple_record_failed` was never counted before) and,
/// with the capture log at `warn`, each is a line naming the pod.
#[test]
fn a_full_tuple_map_is_counted_logged_and_fails_closed() -> anyhow::Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use ztunnel_common::orig_dst::{self, OrigDst, TupleKey};

    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", false, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;
    capture_log(&z, &["on", "--level", "warn"])?;

    // Filled through the pin with keys of no netns (cookies count up from 1 per boot).
    let pin = z.pin_dir.join("maps").join(orig_dst::BY_TUPLE);
    let mut map: HashMap<MapData, TupleKey, OrigDst> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&pin)?))?;
    let key = |k: u32| TupleKey {
        netns_cookie: u64::MAX - u64::from(k),
        ..TupleKey::default()
    };
    let mut filled = 0u32;
    while map.insert(key(filled), OrigDst::default(), 0).is_ok() {
        filled += 1;
        anyhow::ensure!(
            filled <= orig_dst::MAX_ENTRIES,
            "{} does not fill",
            pin.display()
        );
    }
    assert_eq!(filled, orig_dst::MAX_ENTRIES);

    let out = t.call(&a, b.addr(8080), &[]);
    assert!(
        !out.as_ref().is_ok_and(|o| o.contains("match=true")),
        "a connection without an original destination was carried: {out:?}"
    );
    let d = z.wait_for("the failed record and the miss counted", |d| {
        d.capture.counters.get("tuple_record_failed") == Some(&1)
            && d.capture.counters.get("orig_dst_miss") == Some(&1)
    })?;
    assert_eq!(
        d.capture.counters["connect_captured"], 1,
        "{:?}",
        d.capture.counters
    );
    let pod = format!("pod=\"{}\"", a.key());
    let line = wait_decision(
        &z,
        &[
            "program=\"sockops\"".into(),
            "decision=\"failed\"".into(),
            pod.clone(),
            format!("dst=\"{}\"", b.addr(8080)),
        ],
    )?;
    assert!(line.contains("tuple map full"), "{line}");
    wait_decision(
        &z,
        &[
            "program=\"sockopt\"".into(),
            "decision=\"miss\"".into(),
            pod,
        ],
    )?;
    // At `warn` the captured connect itself is not logged.
    assert!(
        !decisions(&z)
            .iter()
            .any(|l| l.contains("decision=\"captured\"")),
        "{:?}",
        decisions(&z)
    );

    // Room again: the next connection is carried.
    for k in 0..filled {
        map.remove(&key(k))?;
    }
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    Ok(())
}
