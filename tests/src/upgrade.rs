//! An upgrade of one node's ztunnel while traffic flows, as the upgrade tests, the demo
//! and the bench drive it: clients in pods opening new connections at a steady rate and
//! holding one open with pings, the successor started beside the running ztunnel, the
//! handover awaited, and the old one stopped as the kubelet stops an old pod.
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use ztunnel::admin::ConfigDump;

use crate::{Pod, PodProcess, Topology, Ztunnel};

/// The clients' own limit, in seconds, should the caller never write the stop file: a
/// safety net only, above the longest run (an emulated VM moves a 64 MiB transfer in
/// minutes) and within the VM matrix's 30-minute timeout.
const MAX_SECS: &str = "1500";

/// How long one of [`rate`]'s connections, or one of [`hold`]'s pings, may take before it
/// counts as failed. On one CPU (the kernel-matrix VMs, emulated) a minute: there loading
/// a second ztunnel's eBPF programs or a bulk transfer starves every process for more
/// than the usual ten seconds (read timeouts seen on 7.3 before any handover began, and
/// once a held connection's ping echoed after more than ten seconds while the old
/// ztunnel drained), which says nothing about the upgrade; a refused, reset or garbled
/// connection still fails at once.
fn call_timeout_secs() -> &'static str {
    if one_cpu() { "60" } else { "10" }
}

/// How long a test waits for something an upgrade does: `d`, or five times `d` on one
/// CPU (the kernel-matrix VMs, emulated), where a second ztunnel took 40 s to load its
/// eBPF programs beside another VM (7.3, stop 32: a 60 s wait for its first enrolment
/// retries ran out), which says nothing about the upgrade.
pub fn wait_limit(d: Duration) -> Duration {
    if one_cpu() { d * 5 } else { d }
}

/// One CPU: the kernel-matrix VMs (one vCPU, emulated), where the upgrade tests take
/// longer limits and lighter loads.
pub fn one_cpu() -> bool {
    matches!(std::thread::available_parallelism().map(usize::from), Ok(1))
}

/// A steady stream of new connections from `from` to `dst`, `per_sec` a second, each
/// sending 64 bytes and checking the echo, until `stop` exists (at most [`MAX_SECS`]).
/// Read its counts with [`counts`] once `stop` is written.
pub fn rate(
    t: &mut Topology,
    from: &Pod,
    dst: SocketAddr,
    per_sec: u32,
    stop: &Path,
) -> anyhow::Result<PodProcess> {
    let per_sec = per_sec.to_string();
    let (p, line) = client(t, from, "rate", dst, &["--per-sec", &per_sec], stop)?;
    ensure!(
        line == "started",
        "rate client from {}: {line:?}",
        from.name
    );
    Ok(p)
}

/// Starts podapp's `cmd` client from `from` to `dst` with `args`, the common limits and
/// `stop`; returns it with its first line.
fn client(
    t: &mut Topology,
    from: &Pod,
    cmd: &str,
    dst: SocketAddr,
    args: &[&str],
    stop: &Path,
) -> anyhow::Result<(PodProcess, String)> {
    let dst = dst.to_string();
    let stop = stop.display().to_string();
    let mut all = vec![cmd, &dst];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--secs",
        MAX_SECS,
        "--stop-file",
        &stop,
        "--timeout-secs",
        call_timeout_secs(),
    ]);
    let mut p = t.spawn(from, &all)?;
    let line = p.read_line()?;
    Ok((p, line))
}

/// A rate client's counts, once it has stopped.
#[derive(Debug)]
pub struct Counts {
    pub attempted: u64,
    pub failed: u64,
    /// The client's whole report, the first failures (with their times) included.
    pub json: serde_json::Value,
}

pub fn counts(p: PodProcess) -> anyhow::Result<Counts> {
    let out = p.wait_ok()?;
    let line = out.lines().last().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("the rate client printed no counts: {out:?}"))?;
    let n = |k: &str| {
        json[k]
            .as_u64()
            .with_context(|| format!("no {k:?} in the rate client's counts {json}"))
    };
    Ok(Counts {
        attempted: n("attempted")?,
        failed: n("failed")?,
        json,
    })
}

/// A connection from `from` to `dst` held open with a ping every 50 ms until `stop`
/// exists (at most [`MAX_SECS`]); [`pings`] fails unless every ping came back.
pub fn hold(
    t: &mut Topology,
    from: &Pod,
    dst: SocketAddr,
    stop: &Path,
) -> anyhow::Result<PodProcess> {
    let (p, line) = client(t, from, "hold", dst, &[], stop)?;
    ensure!(
        line.starts_with("connected"),
        "hold from {}: {line}",
        from.name
    );
    Ok(p)
}

/// The pings a held connection carried, once it has stopped; an error if the
/// connection broke (podapp fails on a lost or garbled echo).
pub fn pings(p: PodProcess) -> anyhow::Result<u64> {
    let out = p.wait_ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix("pings="))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no ping count in {out:?}"))
}

/// Polls a ztunnel's dump until its handover is in `state`: within a minute, or five on
/// one CPU, where a successor starting beside the running ztunnel, its clients and a
/// bulk transfer took 56 s to load its eBPF programs once (emulated 7.3, a busy host).
pub fn wait_handover(z: &Ztunnel, state: &str) -> anyhow::Result<ConfigDump> {
    let limit = Duration::from_secs(if one_cpu() { 300 } else { 60 });
    z.wait_for_within(&format!("handover state {state}"), limit, |d| {
        d.handover.state == state
    })
}

/// Waits (generously) for a ztunnel to exit.
pub fn wait_exit(z: &mut Ztunnel, what: &str) -> anyhow::Result<()> {
    ensure!(z.wait_exit(120), "{what} did not exit\n{}", z.log_text());
    Ok(())
}

/// The old ztunnel, once every connection it carried has ended, stays (a supervisor
/// would restart one that exits, and it would take the node back) until it is stopped,
/// as the kubelet stops an old pod; then it exits at once.
pub fn stop_drained(z: &mut Ztunnel) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !z.log_text().contains("handed over and drained") {
        ensure!(z.alive(), "the old ztunnel exited\n{}", z.log_text());
        ensure!(
            Instant::now() < deadline,
            "the old ztunnel did not drain\n{}",
            z.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    ensure!(z.alive(), "the old ztunnel exited by itself");
    z.terminate();
    wait_exit(z, "the old ztunnel")
}

/// A node's ztunnel taken over by its successor ([`upgrade`]).
pub struct Upgraded {
    /// The successor, serving every pod of the node.
    pub new: Ztunnel,
    /// When the successor was started.
    pub started: Instant,
    /// From the successor's start to the predecessor no longer accepting, as the
    /// successor measured it (`handover.elapsedMs` in its `/config_dump`).
    pub handover_ms: u64,
    /// Listening sockets the successor took over.
    pub listeners_taken: usize,
    /// From the successor's start to its readiness answering 200, as seen here.
    pub ready_ms: u64,
}

/// Upgrades `node`'s ztunnel as a DaemonSet rollout with `maxSurge: 1` does: starts the
/// successor beside `old` (same flags, its own cgroup, the node's pins and handover
/// socket), waits until it has taken every pod over from `old` (which then no longer
/// accepts) and answers ready, then stops `old` with SIGTERM as the kubelet stops the old
/// pod. `old` drains and exits once the last connection it carries ends: wait for that
/// with [`Ztunnel::wait_exit`].
pub fn upgrade(t: &mut Topology, node: &str, old: &Ztunnel) -> anyhow::Result<Upgraded> {
    let file = t.workloads_path();
    let started = Instant::now();
    let new = t.spawn_ztunnel(node, false, &file)?;
    let d = wait_handover(&new, "complete")?;
    let (Some(handover_ms), Some(pid)) = (d.handover.elapsed_ms, d.handover.predecessor_pid) else {
        bail!(
            "the successor's handover is complete but names no time or predecessor: {:?}",
            d.handover
        );
    };
    ensure!(
        pid == old.pid(),
        "{node}'s successor took over from pid {pid}, not from the running ztunnel (pid {})",
        old.pid()
    );
    let deadline = Instant::now() + wait_limit(Duration::from_secs(60));
    while let Err(e) = new.ready() {
        ensure!(
            Instant::now() < deadline,
            "the successor on {node} took over but is not ready: {e:#}\n{}",
            new.log_text()
        );
        ensure!(new.alive(), "the successor exited\n{}", new.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready_ms = started.elapsed().as_millis() as u64;
    old.terminate();
    Ok(Upgraded {
        new,
        started,
        handover_ms,
        listeners_taken: d.handover.listeners_taken,
        ready_ms,
    })
}
