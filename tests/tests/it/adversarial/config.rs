//! Config and enrolment under abuse: the workload file rewritten in place while traffic
//! flows, empty and unreadable files, a stray process in a pod's netns, cgroups broader
//! than a pod, and unenrolment in the middle of a large inbound transfer.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ztunnel_tests::{
    Pod, Topology, Ztunnel, cgroup_programs, fake_cni::FakeCni, fake_istiod::FakeIstiod,
};

use crate::istio::{describe, hand_over, start_istio_ztunnel, two_serving_pods, zds_uid};

const MIB: usize = 1 << 20;
const MARKER: &str = "ADVERSARIAL-CONFIG-PLAINTEXT";

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn metric(z: &Ztunnel, series: &str) -> anyhow::Result<Option<f64>> {
    let text = z.metrics_text()?;
    Ok(text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    }))
}

/// Polls `cond` for up to a minute (never a speed test).
fn wait(what: &str, z: &Ztunnel, cond: impl Fn() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if cond()? {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nztunnel log:\n{}",
            z.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No call failed, no packet carried the marker in clear, and every a ↔ b packet on the
/// wire was HBONE (to or from b's :15008).
fn no_failure_nor_plaintext(failed: &[String], plaintext: usize, wire: &str, a: &Pod, b: &Pod) {
    assert!(
        failed.is_empty() && plaintext == 0,
        "{} calls failed and {plaintext} packets crossed the wire in clear: {failed:#?}",
        failed.len()
    );
    let hbone = format!("{}.15008", b.ip4);
    let (ia, ib) = (format!(" {}.", a.ip4), format!(" {}.", b.ip4));
    for l in wire.lines().filter(|l| l.contains(" IP ")) {
        if l.contains(&ia) && l.contains(&ib) {
            assert!(l.contains(&hbone), "a ↔ b packet outside the tunnel: {l}");
        }
    }
}

/// How many packets of a `tcpdump -A` text carry `needle` in their payload.
fn packets_with(dump: &str, needle: &str) -> usize {
    let mut packets = Vec::new();
    for line in dump.lines() {
        if line.contains(" IP ") {
            packets.push(String::new());
        }
        if let Some(p) = packets.last_mut() {
            p.push_str(line);
        }
    }
    packets.iter().filter(|p| p.contains(needle)).count()
}

/// The readiness answer's error text (empty when ready).
fn readiness_error(z: &Ztunnel) -> String {
    z.ready()
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default()
}

/// A pod's policy routing rules, as `ip rule` lists them inside its netns.
fn ip_rules(pod: &Pod) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["-n", &pod.netns, "rule", "list"])
        .output()
        .context("failed to run ip rule")?;
    anyhow::ensure!(out.status.success(), "ip rule: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `pod` with its processes placed in `cgroup` (and, with `netns_of`, in that pod's
/// network namespace), for processes that sit where they should not.
fn placed(pod: &Pod, cgroup: &Path, netns_of: Option<&Pod>) -> anyhow::Result<Pod> {
    std::fs::create_dir_all(cgroup)?;
    let mut p = pod.clone();
    p.cgroup = cgroup.to_owned();
    if let Some(other) = netns_of {
        p.netns = other.netns.clone();
        p.netns_path = other.netns_path.clone();
    }
    Ok(p)
}

/// The topology's cgroup base: pods live in `<base>/kubepods/pod<uid>`.
fn cgroup_base(p: &Pod) -> PathBuf {
    p.cgroup
        .parent()
        .and_then(Path::parent)
        .expect("pod cgroup below <base>/kubepods")
        .to_owned()
}

/// `cp new.yaml workloads.yaml` (truncate, then write) with the same content over and
/// over, every other time as a slow writer that stops mid-file for longer than ztunnel's
/// quiet period (so a prefix of the file is read), while 200 calls run between enrolled
/// pods on two nodes. Today's code took each empty or half file as a version: pods were
/// unenrolled and re-enrolled, plaintext crossed the wire and calls failed.
#[test]
fn in_place_rewrites_of_the_workload_file_leak_no_plaintext_and_fail_no_call() -> anyhow::Result<()>
{
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z1 = t.start_ztunnel(false)?;
    let file = t.workloads_path();
    let z2 = t.start_ztunnel_with_file("node2", false, &file)?;
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");

    let text = t.workloads_yaml();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, file, text) = (stop.clone(), file.clone(), text.clone());
        std::thread::spawn(move || -> anyhow::Result<(u32, u32)> {
            let (mut fast, mut slow) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                // O_TRUNC, then write: what cp, editors and kubectl cp do.
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&file)?;
                if (fast + slow) % 2 == 1 {
                    // Cut at a different place each time: 1/8 … 7/8 of the file.
                    let cut = text.len() * (slow as usize % 7 + 1) / 8;
                    f.write_all(&text.as_bytes()[..cut])?;
                    f.flush()?;
                    std::thread::sleep(Duration::from_millis(600));
                    f.write_all(&text.as_bytes()[cut..])?;
                    slow += 1;
                } else {
                    f.write_all(text.as_bytes())?;
                    fast += 1;
                }
                drop(f);
                // The whole file stands for a while before the next rewrite, as between
                // an operator's edits or a sync's updates.
                std::thread::sleep(Duration::from_millis(400));
            }
            Ok((fast, slow))
        })
    };

    let cap = t.tcpdump_wire()?;
    let mut failed = Vec::new();
    for i in 0..200 {
        match t.call(&a, b.addr(8080), &["--bytes", "2000", "--pattern", MARKER]) {
            Ok(out) if out.contains("received=2000 match=true") => {}
            other => failed.push(format!("call {i}: {other:?}")),
        }
        // Spread the calls over several seconds of rewrites (a call alone takes a few ms).
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let wire = cap.finish()?;
    let (fast, slow) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    println!("rewrites during the calls: {fast} whole, {slow} slow with a pause mid-file");
    assert!(slow >= 3, "too few slow rewrites ({slow}) to mean anything");

    let plaintext = packets_with(&wire, MARKER);
    println!(
        "failed calls: {}, packets with the payload in clear: {plaintext}",
        failed.len()
    );
    no_failure_nor_plaintext(&failed, plaintext, &wire, &a, &b);
    let mut partial = 0;
    for z in [&z1, &z2] {
        let log = z.log_text();
        assert!(
            !log.contains("pod unenrolled"),
            "a rewrite unenrolled a pod:\n{log}"
        );
        // Half files seen: rejected as invalid, removals held, or cut paths refused.
        partial += log
            .lines()
            .filter(|l| {
                l.contains("workload file rejected")
                    || l.contains("stays in force until")
                    || l.contains("keeping its current enrolment")
            })
            .count();
    }
    println!("partial versions seen by the two ztunnels: {partial}");
    assert!(
        partial > 0,
        "no ztunnel ever read a half-written file: the test proves nothing"
    );
    z1.wait_enrolled(&[&a])?;
    z2.wait_enrolled(&[&b])?;
    Ok(())
}

/// An empty file and an unreadable one (missing, then a directory in its place) are not
/// versions: the last good config stays, a warning names the file and the explicit form,
/// and each is counted. An explicit `workloads: []` is one.
/// The trust-domain line a workload entry gains (after its `serviceAccount:` line).
fn with_trust_domain(yaml: &str, pod: &str, trust_domain: &str) -> String {
    let entry = format!("  - name: {pod}\n");
    let start = yaml.find(&entry).expect("the pod's entry");
    let sa = start
        + yaml[start..]
            .find("    serviceAccount:")
            .expect("serviceAccount");
    let end = sa + yaml[sa..].find('\n').expect("end of line") + 1;
    format!(
        "{}    trustDomain: {trust_domain}\n{}",
        &yaml[..end],
        &yaml[end..]
    )
}

/// Reads a pod's nat table (`iptables-save`) over and over from another thread until
/// finished, keeping each reading that lacks any part of the pod's capture: the jumps
/// from OUTPUT and PREROUTING and the redirects to :15001 and :15006.
struct RulesWatcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<(usize, Vec<String>)>>,
}

impl RulesWatcher {
    fn start(pod: &Pod) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let netns = pod.netns_path.clone();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let netns = ztunnel::netns::Netns::open(&netns)?;
            let needed = [
                "-A OUTPUT -p tcp -j ZTUNNEL_OUTPUT",
                "-A PREROUTING -p tcp -j ZTUNNEL_PREROUTING",
                "-A ZTUNNEL_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
                "-A ZTUNNEL_PREROUTING -i eth0 -p tcp -j REDIRECT --to-ports 15006",
            ];
            let (mut snapshots, mut incomplete) = (0, Vec::new());
            while !stopped.load(Ordering::Relaxed) {
                let text = netns.exec("iptables-save", &["-t", "nat"])?;
                snapshots += 1;
                if !needed.iter().all(|n| text.lines().any(|l| l == *n)) {
                    incomplete.push(text);
                }
            }
            Ok((snapshots, incomplete))
        });
        RulesWatcher { stop, thread }
    }

    /// How many readings were taken, and the incomplete ones.
    fn finish(self) -> anyhow::Result<(usize, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the rules watcher panicked"))?
    }
}

/// A pod's spec changes in place: a new service account (re-enrolled with the new
/// identity), a trust domain the CA refuses (its re-enrolment fails), then an address
/// added and taken away three times. Before this was make-before-break, the pod's
/// capture was detached first and a failed re-enrolment left it uncaptured: its calls
/// went to the wire in clear. Now a connection opened before the changes keeps flowing, no call fails, nothing crosses
/// the wire in clear, the refused spec leaves the pod enrolled as it was (and says why),
/// and the pod's cgroup carries one set of programs, not two.
#[test]
fn a_changed_spec_reenrols_the_pod_without_a_moment_uncaptured() -> anyhow::Result<()> {
    changed_spec_reenrols_without_a_moment_uncaptured(None)
}

/// See [`a_changed_spec_reenrols_the_pod_without_a_moment_uncaptured`]; `capture`: the
/// ztunnels' `--capture` (iptables has no programs on the cgroup to count).
pub fn changed_spec_reenrols_without_a_moment_uncaptured(
    capture: Option<&str>,
) -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.capture = capture.map(str::to_owned);
    let ebpf = capture.is_none();
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z1 = t.start_ztunnel(false)?;
    let file = t.workloads_path();
    let z2 = t.start_ztunnel_with_file("node2", false, &file)?;
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    let programs = cgroup_programs(&a.cgroup)?;
    let links = programs.lines().count();
    assert_eq!(links > 0, ebpf, "a's cgroup: {programs}");

    let stop = t.dir.path().join("stop-hold");
    let dst = b.addr(8080).to_string();
    let stop_arg = stop.display().to_string();
    let mut hold = t.spawn(
        &a,
        &["hold", &dst, "--secs", "300", "--stop-file", &stop_arg],
    )?;
    let first = hold.read_line()?;
    assert!(first.starts_with("connected"), "{first}");
    let cap = t.tcpdump_wire()?;
    let mut failed = Vec::new();
    let calls = |t: &mut Topology, n: usize, failed: &mut Vec<String>| {
        for _ in 0..n {
            match t.call(&a, b.addr(8080), &["--bytes", "2000", "--pattern", MARKER]) {
                Ok(out) if out.contains("received=2000 match=true") => {}
                other => failed.push(format!("{other:?}")),
            }
        }
    };

    // 1. A new service account: re-enrolled with the new identity.
    let renamed = t
        .workloads_yaml()
        .replace("    serviceAccount: a\n", "    serviceAccount: a-v2\n");
    t.write_workloads_text(&renamed)?;
    let new_identity = "spiffe://cluster.local/ns/default/sa/a-v2";
    // Calls go on meanwhile; b's ztunnel sees the new identity once a is re-enrolled.
    let from_new_identity = |z: &Ztunnel| -> anyhow::Result<bool> {
        Ok(z.dump()?
            .connections
            .list
            .iter()
            .any(|r| r.src_identity.as_deref() == Some(new_identity)))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !from_new_identity(&z2)? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "a never called b with its new identity\nztunnel log:\n{}",
            z1.log_text()
        );
        calls(&mut t, 1, &mut failed);
    }
    calls(&mut t, 10, &mut failed);
    assert_eq!(
        cgroup_programs(&a.cgroup)?.lines().count(),
        links,
        "a's cgroup after the re-enrolment: {}",
        cgroup_programs(&a.cgroup)?
    );

    // 2. A trust domain the built-in CA refuses: the re-enrolment fails after its checks
    // pass (at the certificate), and a stays enrolled and captured as it was.
    t.write_workloads_text(&with_trust_domain(&renamed, "a", "elsewhere.example"))?;
    wait("the refused re-enrolment", &z1, || {
        Ok(z1.metric("ztunnel_enrolment_failures_total", &[("reason", "error")])? >= 1)
    })?;
    calls(&mut t, 20, &mut failed);
    let d = z1.dump()?;
    assert!(
        d.enrolled_pods.iter().any(|p| p.name == a.key()),
        "a was unenrolled: {:?}",
        d.enrolled_pods
    );
    assert_eq!(cgroup_programs(&a.cgroup)?.lines().count(), links);
    // The log is written by a thread of its own: the line may follow the count.
    wait("the failure to name the refused identity", &z1, || {
        Ok(z1.log_text().contains("elsewhere.example"))
    })?;
    let log = z1.log_text();
    assert!(!log.contains("pod unenrolled"), "a was unenrolled:\n{log}");

    // 3. The spec is fixed: a is re-enrolled again, to the same end as step 1.
    t.write_workloads_text(&renamed)?;
    calls(&mut t, 10, &mut failed);

    // 4. An address added, then taken away, three times: each change rewrites a's capture
    // for its addresses. Under iptables the rules are read back all the while: before
    // they were rewritten in one commit, a's jumps were gone while the chains were
    // refilled, and its calls went out uncaptured.
    let watcher = (!ebpf).then(|| RulesWatcher::start(&a));
    let [o1, o2, o3, _] = a.ip4.octets();
    let extra = std::net::Ipv4Addr::new(o1, o2, o3, 250);
    let one = format!("addresses: [{}]", a.ip4);
    assert!(renamed.contains(&one), "{renamed}");
    let two = renamed.replace(&one, &format!("addresses: [{}, {extra}]", a.ip4));
    let addresses = |z: &Ztunnel| -> anyhow::Result<usize> {
        Ok(z.dump()?
            .enrolled_pods
            .iter()
            .find(|p| p.name == a.key())
            .map_or(0, |p| p.addresses.len()))
    };
    for round in 0..3 {
        for (text, want) in [(&two, 2), (&renamed, 1)] {
            t.write_workloads_text(text)?;
            wait(
                &format!("a with {want} address(es), round {round}"),
                &z1,
                || Ok(addresses(&z1)? == want),
            )?;
            calls(&mut t, 3, &mut failed);
        }
    }
    if let Some(w) = watcher {
        let (snapshots, incomplete) = w.finish()?;
        assert!(
            snapshots >= 10,
            "the rules were read back only {snapshots} times"
        );
        assert!(
            incomplete.is_empty(),
            "{} of {snapshots} readings of a's nat table lacked its capture; the first:\n{}",
            incomplete.len(),
            incomplete[0]
        );
        println!(
            "a's nat table read {snapshots} times during the address changes, complete each time"
        );
    }

    std::fs::write(&stop, b"")?;
    let held = hold
        .wait_ok()
        .context("the connection opened before the changes")?;
    assert!(held.contains("pings="), "{held}");
    let wire = cap.finish()?;
    let plaintext = packets_with(&wire, MARKER);
    no_failure_nor_plaintext(&failed, plaintext, &wire, &a, &b);
    println!("{held}");
    Ok(())
}

#[test]
fn empty_and_unreadable_workload_files_keep_the_last_good_config() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;
    let path = t.workloads_path();
    let series = |reason: &str| {
        format!("ztunnel_config_rejected_total{{source=\"file\",reason=\"{reason}\"}}")
    };
    let mut calls = 0;
    let mut still_meshed = |t: &mut Topology, what: &str| -> anyhow::Result<()> {
        let out = t.call(&a, b.addr(8080), &[])?;
        assert!(out.contains("match=true"), "{what}: {out}");
        calls += 1;
        let d = z.wait_for("the call's records", |d| {
            d.connections.opened_total >= 2 * calls
        })?;
        let mut pods: Vec<String> = d.enrolled_pods.iter().map(|p| p.name.clone()).collect();
        pods.sort();
        assert_eq!(pods, [a.key(), b.key()], "{what}");
        Ok(())
    };

    // Emptied in place, as the first step of any in-place rewrite.
    std::fs::File::create(&path)?;
    wait("the empty file to be counted", &z, || {
        Ok(metric(&z, &series("empty"))? == Some(1.0))
    })?;
    // The log is written by a thread of its own: the warning may follow the count.
    wait("the warning about the empty file", &z, || {
        Ok(z.log_text()
            .lines()
            .any(|l| l.contains("\twarn\t") && l.contains("is empty")))
    })?;
    let log = z.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("\twarn\t") && l.contains("is empty"))
        .with_context(|| format!("no warning about the empty file:\n{log}"))?;
    assert!(
        warning.contains(&path.display().to_string()) && warning.contains("workloads: []"),
        "{warning}"
    );
    still_meshed(&mut t, "empty file")?;

    // Gone, then a directory where the file was: unreadable.
    std::fs::remove_file(&path)?;
    wait("the missing file to be counted", &z, || {
        Ok(metric(&z, &series("unreadable"))?.unwrap_or(0.0) >= 1.0)
    })?;
    std::fs::create_dir(&path)?;
    wait("the directory to be counted", &z, || {
        Ok(metric(&z, &series("unreadable"))?.unwrap_or(0.0) >= 2.0)
    })?;
    // The log is written by a thread of its own: the line may follow the count.
    let unreadable = format!("failed to read workload file {}", path.display());
    wait("the unreadable file in the log", &z, || {
        Ok(z.log_text().contains(&unreadable))
    })?;
    still_meshed(&mut t, "unreadable file")?;
    assert_eq!(
        metric(&z, "ztunnel_enrolled_pods")?,
        Some(2.0),
        "{}",
        z.metrics_text()?
    );

    // Written explicitly empty, the config is empty: the pods leave the mesh.
    std::fs::remove_dir(&path)?;
    t.write_workloads_text("workloads: []\n")?;
    z.wait_enrolled(&[])?;
    Ok(())
}

/// Istio mode: a stray process in pod a's netns but outside its cgroup (what `nsenter`
/// or `ip netns exec` from a host shell leaves) used to widen a's cgroup to the deepest
/// one common to every process in the netns. Capture attaches only to a's own
/// kubelet-named cgroup; another pod's traffic is not captured.
#[test]
fn a_stray_process_in_a_pods_netns_does_not_widen_capture() -> anyhow::Result<()> {
    let (mut t, a, b, _servers) = two_serving_pods()?;
    let c = t.add_pod("c", false, false)?;
    let d = t.add_pod("d", false, false)?;
    let _sd = t.serve(&d, d.addr(7070))?;
    let base = cgroup_base(&a);
    let stray_cg = base.join("stray");
    let _stray = t.spawn_program(&placed(&a, &stray_cg, None)?, Path::new("sleep"), &["600"])?;

    let istiod = FakeIstiod::start(t.dir.path())?;
    describe(&istiod, &[&a, &b]);
    let mut cni = FakeCni::listen(&t.dir.path().join("zds.sock"))?;
    let z = start_istio_ztunnel(&mut t, &istiod, &cni, "1h")?;
    cni.accept()?;
    hand_over(&mut cni, &[&a, &b])?;
    let dump = z.wait_enrolled(&[&a, &b])?;
    let pa = dump
        .enrolled_pods
        .iter()
        .find(|p| p.name == a.key())
        .context("a enrolled")?;
    assert_eq!(pa.cgroup, a.cgroup, "a's own kubelet cgroup");

    let progs = cgroup_programs(&a.cgroup)?;
    assert!(progs.contains("connect4_capture"), "{progs}");
    for broader in [
        base.clone(),
        base.join("kubepods"),
        stray_cg.clone(),
        c.cgroup.clone(),
    ] {
        assert_eq!(
            cgroup_programs(&broader)?,
            "",
            "capture attached to {}",
            broader.display()
        );
    }
    // Pods outside the mesh talk directly, unseen by ztunnel.
    let before = z.dump()?.connections.opened_total;
    let out = t.call(&c, d.addr(7070), &[])?;
    assert!(out.contains("match=true"), "{out}");
    // a's own traffic is still captured.
    assert!(t.call(&a, b.addr(8080), &[])?.contains("match=true"));
    let after = z.wait_for("a's records", |d| d.connections.opened_total >= before + 2)?;
    assert!(
        after
            .connections
            .list
            .iter()
            .all(|r| r.src.ip() != std::net::IpAddr::V4(c.ip4)
                && r.dst.ip() != std::net::IpAddr::V4(d.ip4)),
        "c → d went through ztunnel: {:?}",
        after.connections.list
    );
    Ok(())
}

/// A pod's cgroup that is broader than the pod is refused with the pod, the cgroup and
/// the reason, in the ZDS ack, in readiness and in a metric; nothing is attached there.
/// Istio mode: a process of another netns in the pod's cgroup. File mode: a cgroup that
/// holds other pods' cgroups, and the cgroup2 root.
#[test]
fn a_cgroup_broader_than_its_pod_is_refused_with_the_reason() -> anyhow::Result<()> {
    let (mut t, a, b, _servers) = two_serving_pods()?;
    let c = t.add_pod("c", false, false)?;
    // A process of c's netns in a's pod cgroup.
    let intruder = t.spawn_program(
        &placed(&c, &a.cgroup, Some(&c))?,
        Path::new("sleep"),
        &["600"],
    )?;

    let istiod = FakeIstiod::start(t.dir.path())?;
    describe(&istiod, &[&a, &b]);
    let mut cni = FakeCni::listen(&t.dir.path().join("zds.sock"))?;
    let z = start_istio_ztunnel(&mut t, &istiod, &cni, "1h")?;
    cni.accept()?;
    assert_eq!(cni.add(&zds_uid(&b), &b)?, "", "add b");
    let ack = cni.add(&zds_uid(&a), &a)?;
    let want = format!(
        "refusing to attach capture for pod default/a to cgroup {}",
        a.cgroup.display()
    );
    assert!(ack.contains(&want), "{ack}");
    assert!(
        ack.contains("belongs to another network namespace") && ack.contains("(sleep)"),
        "{ack}"
    );
    assert_eq!(cni.snapshot_sent()?, "");
    let why = readiness_error(&z);
    assert!(why.contains("503") && why.contains(&want), "{why}");
    assert_eq!(cgroup_programs(&a.cgroup)?, "");
    assert!(
        metric(
            &z,
            "ztunnel_enrolment_failures_total{reason=\"cgroup_scope\"}"
        )?
        .is_some_and(|n| n >= 1.0),
        "{}",
        z.metrics_text()?
    );
    // The intruder gone, the retry enrols a.
    drop(intruder);
    z.wait_enrolled(&[&a, &b])?;
    wait("readiness", &z, || Ok(z.ready().is_ok()))?;
    drop(z);

    // File mode: a's cgroup set to the directory holding every pod's, then to the root.
    let kubepods = cgroup_base(&a).join("kubepods");
    let root = ztunnel::ebpf::mount_point("cgroup2").context("cgroup2 mount")?;
    for (cgroup, reason) in [
        (
            kubepods.clone(),
            format!("it contains pod default/b's cgroup {}", b.cgroup.display()),
        ),
        (root.clone(), "it is the cgroup2 root".to_owned()),
    ] {
        let text = t.workloads_yaml().replace(
            &format!("cgroup: {}\n", a.cgroup.display()),
            &format!("cgroup: {}\n", cgroup.display()),
        );
        t.write_workloads_text(&text)?;
        let file = t.workloads_path();
        let z = t.spawn_ztunnel("node1", false, &file)?;
        z.wait_enrolled(&[&b])?;
        let want = format!(
            "refusing to attach capture for pod default/a to cgroup {}: {reason}",
            cgroup.display()
        );
        wait("the refusal in readiness", &z, || {
            Ok(readiness_error(&z).contains(&want))
        })?;
        // The log is written by a thread of its own: the line may follow readiness.
        wait("the refusal in the log", &z, || {
            Ok(z.log_text().contains(&want))
        })?;
        assert!(
            !cgroup_programs(&cgroup)?.contains("connect4_capture"),
            "capture attached to {}",
            cgroup.display()
        );
        assert!(z.dump()?.enrolled_pods.iter().all(|p| p.name != a.key()));
    }
    Ok(())
}

/// Unenrolling the destination pod in the middle of a 64 MiB echoed transfer (HBONE from
/// an enrolled pod, and plaintext steered to :15006 from a pod outside the mesh) keeps
/// both transfers byte-exact: the return path the app's replies need stays until the last
/// of them has closed, and goes then.
#[test]
fn unenrolment_during_a_64mib_inbound_transfer_is_byte_exact() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let b = t.add_pod("b", true, false)?;
    let _srv = t.serve(&b, b.addr(8080))?;
    let z = t.start_ztunnel(false)?;

    let resume = t.dir.path().join("resume");
    let (dst, big, pause) = (
        b.addr(8080).to_string(),
        (64 * MIB).to_string(),
        (16 * MIB).to_string(),
    );
    let resume_arg = resume.display().to_string();
    let args = |seed: &'static str| {
        vec![
            "call",
            dst.as_str(),
            "--bytes",
            big.as_str(),
            "--seed",
            seed,
            "--pause-at",
            pause.as_str(),
            "--resume-file",
            resume_arg.as_str(),
        ]
    };
    let mut hbone = t.spawn(&a, &args("3"))?;
    let mut plain = t.spawn(&c, &args("4"))?;
    for p in [&mut hbone, &mut plain] {
        let peer = p.read_line()?;
        assert!(peer.starts_with("peer="), "{peer}");
        let paused = p.read_line()?;
        assert!(paused.starts_with("paused"), "{paused}");
    }
    z.wait_for("both inbound connections into b", |d| {
        d.connections
            .list
            .iter()
            .filter(|r| {
                r.pod == b.key()
                    && r.direction == ztunnel::proxy::Direction::Inbound
                    && r.outcome.is_none()
            })
            .count()
            == 2
    })?;

    t.set_ambient("b", false)?;
    z.wait_enrolled(&[&a])?;
    let rules = ip_rules(&b)?;
    assert!(
        rules.contains("lookup 133"),
        "return path removed while connections still need it:\n{rules}"
    );

    std::fs::write(&resume, "")?;
    for (what, p) in [("hbone", hbone), ("plaintext", plain)] {
        let out = p
            .wait_ok()
            .with_context(|| format!("{what} transfer\n{}", z.log_text()))?;
        assert!(
            out.contains(&format!("received={big} match=true")),
            "{what}: {out}"
        );
    }
    wait("the return path to go with the last connection", &z, || {
        Ok(!ip_rules(&b)?.contains("lookup 133"))
    })?;
    let d = z.dump()?;
    for r in d.connections.list.iter().filter(|r| r.pod == b.key()) {
        assert_eq!(r.outcome.as_deref(), Some("ok"), "{r:?}");
    }
    Ok(())
}
