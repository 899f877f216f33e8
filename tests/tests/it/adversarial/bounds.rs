//! Issue 14, build 4: every step of the data path is bounded in time, every listener in
//! connections, and ztunnel rides out running out of descriptors. The attacker is a pod
//! outside the mesh (`m`) talking to an enrolled pod's :15008 directly, or a fake HBONE
//! peer the test plays on another node.
//!
//! Nothing here asserts a duration or a memory size a slow machine could miss: only
//! lower bounds on when ztunnel may act (it must not close a handshake before its
//! timeout), generous deadlines for what it must do, and counts.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use ztunnel::{
    identity::{BuiltinCa, Identity, WorkloadCertificate},
    netns::Netns,
};
use ztunnel_tests::{
    Pod, Topology, Ztunnel,
    in_pod::{self, InPodServer},
};

/// The first bytes of a TLS ClientHello (record header announcing 512 bytes, handshake
/// header, legacy version, part of the random): a handshake that never completes.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a, 0x5a, 0x5a,
];

/// Starts node1's ztunnel with extra settings (environment variables, as an operator's
/// DaemonSet would set them) and waits until node1's enrolled pods are enrolled.
fn start(t: &mut Topology, env: &[(&str, &str)]) -> anyhow::Result<Ztunnel> {
    t.write_workloads()?;
    let mut source = Command::new("");
    source.arg("--workloads").arg(t.workloads_path());
    for (k, v) in env {
        source.env(k, v);
    }
    let z = t.spawn_ztunnel_from("node1", false, &source)?;
    let want: Vec<&Pod> = t
        .pods
        .iter()
        .filter(|p| p.ambient && p.node == "node1")
        .collect();
    z.wait_enrolled(&want)?;
    Ok(z)
}

fn timeouts(z: &Ztunnel, step: &str) -> anyhow::Result<u64> {
    z.metric("ztunnel_timeouts_total", &[("step", step)])
}

/// Polls `cond` every 200 ms until it holds (generous deadlines: never a speed test).
fn wait_until(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Lets this process (and the ztunnels it starts, which inherit it) hold `n` descriptors.
fn allow_open_files(n: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= n {
        return Ok(());
    }
    let hard = hard.max(n);
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .with_context(|| format!("failed to raise RLIMIT_NOFILE to {hard} (root can)"))
}

/// Opens `n` TCP connections from `pod`'s netns to `dst`: nothing is sent on the even
/// ones, the start of a ClientHello on the odd ones. Each comes with when it connected.
fn half_open(pod: &Pod, dst: SocketAddr, n: usize) -> anyhow::Result<Vec<(Instant, TcpStream)>> {
    let ns = Netns::open(&pod.netns_path)?;
    ns.run(&Netns::current()?, || -> anyhow::Result<Vec<_>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            // Past the listener's backlog the kernel drops SYNs and the client retries:
            // connecting can take a while, but it must not fail.
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(120))
                .with_context(|| format!("half-open connection {i} of {n} to {dst}"))?;
            let at = Instant::now();
            if i % 2 == 1 {
                s.write_all(PARTIAL_CLIENT_HELLO)?;
            }
            out.push((at, s));
        }
        Ok(out)
    })?
}

/// Whether the other end closed `s` (EOF or reset); whatever it sent is read and dropped.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Waits (generously) until ztunnel has closed every one of `conns`.
fn wait_all_closed(what: &str, conns: &mut Vec<(Instant, TcpStream)>) -> anyhow::Result<()> {
    let n = conns.len();
    wait_until(what, Duration::from_secs(240), || {
        conns.retain_mut(|(_, s)| !closed_by_peer(s));
        Ok(conns.is_empty())
    })
    .with_context(|| format!("{} of {n} still open", conns.len()))
}

/// Checks that ztunnel closed none of `conns` younger than `timeout` (minus a second of
/// slack for our own bookkeeping): its timer starts at its accept, after our connect, so
/// this holds however slow the machine is. Returns how many were young enough to check.
fn none_closed_before(
    conns: &mut [(Instant, TcpStream)],
    timeout: Duration,
) -> anyhow::Result<usize> {
    let now = Instant::now();
    let mut checked = 0;
    for (i, (at, s)) in conns.iter_mut().enumerate() {
        if now.duration_since(*at) + Duration::from_secs(1) < timeout {
            checked += 1;
            ensure!(
                !closed_by_peer(s),
                "connection {i} was closed {:?} after it connected, before the {timeout:?} handshake timeout",
                now.duration_since(*at)
            );
        }
    }
    Ok(checked)
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// `podapp call` with a deadline: a ztunnel that hangs fails the test instead of hanging it
/// (the call is killed with the topology).
fn call_within(
    t: &mut Topology,
    from: &Pod,
    to: SocketAddr,
    bytes: &str,
) -> anyhow::Result<String> {
    let dst = to.to_string();
    let call = t.spawn(from, &["call", &dst, "--bytes", bytes])?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(call.wait_ok());
    });
    rx.recv_timeout(Duration::from_secs(120))
        .with_context(|| format!("{} -> {to}: no answer within 120 s", from.name))?
}

fn echo_ok(t: &mut Topology, from: &Pod, to: SocketAddr) -> anyhow::Result<()> {
    let out = call_within(t, from, to, "10000")?;
    ensure!(out.contains("match=true"), "{} -> {to}: {out}", from.name);
    Ok(())
}

#[test]
fn ten_thousand_half_open_handshakes_are_closed_at_the_timeout_while_others_are_served()
-> anyhow::Result<()> {
    const N: usize = 10_000;
    // Our N sockets, and ztunnel's N (it inherits the limit), with room to spare.
    allow_open_files(N as u64 + 2_000)?;
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let late = t.add_pod("late", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let c = t.add_pod("c", true, false)?;
    let m = t.add_pod("m", false, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let _sc = t.serve(&c, c.addr(8080))?;
    // Default flags: the 10 s TLS accept timeout and the 16,384 cap are the defaults.
    let z = start(&mut t, &[])?;
    let timeout = Duration::from_secs(10);
    echo_ok(&mut t, &a, b.addr(8080))?;
    echo_ok(&mut t, &a, c.addr(8080))?;
    let idle = memory(z.pid())?;

    let started = Instant::now();
    let mut attack = half_open(&m, b.addr(15008), N)?;
    let opened_in = started.elapsed();
    // Served meanwhile: another pod, and the flooded pod through a new HBONE connection
    // (`late` has never called it, so its ztunnel-side tunnel is a new accept on b's
    // :15008).
    echo_ok(&mut t, &a, c.addr(8080))?;
    echo_ok(&mut t, &late, b.addr(8080))?;
    let held = z.metric("ztunnel_listener_connections", &[("listener", "hbone")])?;
    let under = memory(z.pid())?;
    let young = none_closed_before(&mut attack, timeout)?;
    println!(
        "RSS of ztunnel ({}, default flags): idle VmRSS {} KiB (VmHWM {} KiB); under {N} \
         half-open TLS handshakes to one pod's :15008 ({held} held by the hbone listeners, \
         opened in {opened_in:?}, {young} checked still open before their timeout) VmRSS \
         {} KiB (VmHWM {} KiB)",
        ztunnel_tests::ztunnel_bin().display(),
        idle.0,
        idle.1,
        under.0,
        under.1
    );

    wait_all_closed("ztunnel to close every half-open handshake", &mut attack)?;
    println!(
        "all {N} closed by ztunnel {:?} after the first connect",
        started.elapsed()
    );
    // Each was closed by the handshake timeout, and nothing else timed out.
    wait_until(
        "every tls_accept timeout counted",
        Duration::from_secs(30),
        || Ok(timeouts(&z, "tls_accept")? >= N as u64),
    )?;
    assert_eq!(timeouts(&z, "tls_accept")?, N as u64);
    assert_eq!(timeouts(&z, "h2_accept")?, 0);
    // The listener holds only the real tunnels again (a's and late's into b).
    wait_until(
        "the hbone listeners to let go",
        Duration::from_secs(30),
        || Ok(z.metric("ztunnel_listener_connections", &[("listener", "hbone")])? <= 3),
    )?;
    assert_eq!(
        z.metric("ztunnel_listener_saturated_total", &[("listener", "hbone")])?,
        0,
        "10,000 is below the default cap"
    );
    echo_ok(&mut t, &a, b.addr(8080))?;
    // ztunnel hands free heap back every 10 s: the number after that, for the report.
    std::thread::sleep(Duration::from_secs(12));
    let after = memory(z.pid())?;
    println!(
        "12 s after the attack: ztunnel VmRSS {} KiB (VmHWM {} KiB)",
        after.0, after.1
    );
    Ok(())
}

#[test]
fn a_listener_at_its_cap_stops_accepting_and_catches_up_as_handshakes_time_out()
-> anyhow::Result<()> {
    const CAP: u64 = 50;
    const N: usize = 120;
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let m = t.add_pod("m", false, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let z = start(
        &mut t,
        &[
            ("ZTUNNEL_MAX_CONNECTIONS_PER_LISTENER", "50"),
            ("ZTUNNEL_TLS_ACCEPT_TIMEOUT", "2s"),
            // a's tunnel waits in b's backlog behind the attack: let it.
            ("ZTUNNEL_TLS_CONNECT_TIMEOUT", "5m"),
            ("ZTUNNEL_HBONE_DIAL_TIMEOUT", "5m"),
        ],
    )?;
    let dump = z.dump()?;
    assert_eq!(
        dump.ztunnel_config["limits"]["maxConnectionsPerListener"],
        50
    );
    assert_eq!(dump.ztunnel_config["limits"]["tlsAcceptTimeout"], "2s");

    let mut attack = half_open(&m, b.addr(15008), N)?;
    // The kernel completed every connection, but ztunnel holds only CAP of them.
    wait_until(
        "b's :15008 listener to fill up",
        Duration::from_secs(60),
        || Ok(z.metric("ztunnel_listener_saturated_total", &[("listener", "hbone")])? >= 1),
    )?;
    for _ in 0..5 {
        let held = z.metric("ztunnel_listener_connections", &[("listener", "hbone")])?;
        ensure!(
            held <= CAP,
            "the hbone listener holds {held} connections, cap {CAP}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A real client of b is served once the attack's handshakes time out and the
    // backlog drains.
    echo_ok(&mut t, &a, b.addr(8080))?;
    let _young = none_closed_before(&mut attack, Duration::from_secs(2))?;
    wait_all_closed("ztunnel to close every half-open handshake", &mut attack)?;
    wait_until(
        "every tls_accept timeout counted",
        Duration::from_secs(30),
        || Ok(timeouts(&z, "tls_accept")? >= N as u64),
    )?;
    assert_eq!(timeouts(&z, "tls_accept")?, N as u64);
    let held = z.metric("ztunnel_listener_connections", &[("listener", "hbone")])?;
    assert!(held <= 1, "only a's tunnel is left, got {held}");
    Ok(())
}

/// Whether ztunnel's log says an accept on an HBONE listener failed for lack of
/// descriptors.
fn emfile_logged(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("accept failed") && l.contains("hbone") && l.contains("emfile"))
}

/// What can be seen, without asking ztunnel, of a ztunnel that should be out of
/// descriptors: its descriptors, `pod`'s :15008 accept queue, its threads' states and
/// the end of its log. For a failure's one-line reason.
fn starvation_report(pid: u32, limit: u64, pod: &Pod, log: &str) -> String {
    let fds: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let highest = fds.iter().max().copied().unwrap_or(0);
    let ss = |args: &[&str]| -> String {
        Netns::open(&pod.netns_path)
            .and_then(|ns| ns.exec("ss", args))
            .map(|o| o.trim().replace('\n', " | "))
            .unwrap_or_else(|e| format!("ss: {e}"))
    };
    let listen = ss(&["-Hltn", "sport", "=", ":15008"]);
    let established = ss(&["-Htn", "state", "established", "sport", "=", ":15008"])
        .split(" | ")
        .filter(|l| !l.is_empty())
        .count();
    let mut states = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?");
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            *states.entry(format!("{state}/{wchan}")).or_default() += 1;
        }
    }
    let tail: Vec<&str> = log.lines().rev().take(3).collect();
    format!(
        "{} descriptors (highest {highest}, limit {limit}); b's :15008 listener [Recv-Q Send-Q]: \
         {listen}; {established} established to :15008 in b's netns; threads (state/wchan): \
         {states:?}; last log lines (newest first): {tail:?}",
        fds.len()
    )
}

/// Sets another process's descriptor limit (soft and hard), as `prlimit(1)` would.
fn set_nofile(pid: u32, limit: u64) -> anyhow::Result<()> {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: plain syscall on a pid; `new` outlives it and no old value is asked for.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        bail!(
            "prlimit(pid {pid}, RLIMIT_NOFILE, {limit}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[test]
fn out_of_descriptors_ztunnel_backs_off_and_serves_again_once_they_are_free() -> anyhow::Result<()>
{
    // Each step says when it is done: a failure's output starts with how far it got.
    let test_started = Instant::now();
    let step = |what: &str| println!("[{:>6.1} s] {what}", test_started.elapsed().as_secs_f64());
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let m = t.add_pod("m", false, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    // The half-open connections keep their descriptors for the whole test: no handshake
    // timeout frees one (and restarts the backoff) however slow the machine is.
    let z = start(&mut t, &[("ZTUNNEL_TLS_ACCEPT_TIMEOUT", "300s")])?;
    step("ztunnel started, a and b enrolled");
    echo_ok(&mut t, &a, b.addr(8080)).context("the call before starving ztunnel")?;
    step("a -> b served");
    let before = z
        .metric("ztunnel_accept_errors_total", &[("error", "emfile")])
        .context("metrics before starving ztunnel")?;
    assert_eq!(before, 0, "EMFILE counted before starving ztunnel");

    // Leave ztunnel 16 spare descriptors, then take them: connections to b's :15008 that
    // never handshake. It accepts 16, then every accept fails with EMFILE while the rest
    // wait in the backlog.
    let pid = z.pid();
    let open = open_fds(pid).context("ztunnel's descriptors")?;
    let limit = open + 16;
    set_nofile(pid, limit)?;
    step(&format!(
        "ztunnel (pid {pid}) holds {open} descriptors, limit {limit}"
    ));
    let starved_at = Instant::now();
    // ztunnel is out of descriptors once its log says an accept on b's :15008 failed with
    // EMFILE (its metrics cannot be read now: that takes a descriptor). 64 connections
    // are four times what it has spare; should ztunnel have freed some of its own in the
    // meantime, another batch follows, up to four, each reported.
    let mut attack = Vec::new();
    for batch in 1..=4 {
        attack.extend(half_open(&m, b.addr(15008), 64).context("m's connections to b's :15008")?);
        step(&format!("{} connections to b's :15008 open", attack.len()));
        let out = wait_until("EMFILE", Duration::from_secs(20), || {
            Ok(emfile_logged(&z.log_text()))
        });
        if out.is_ok() {
            break;
        }
        let report = starvation_report(pid, limit, &b, &z.log_text());
        if batch == 4 {
            bail!(
                "ztunnel never ran out of descriptors with {} connections open to b's :15008: {report}",
                attack.len()
            );
        }
        step(&format!("no EMFILE after 20 s: {report}"));
    }
    step("ztunnel out of descriptors");
    // Out of descriptors for a while.
    std::thread::sleep(Duration::from_secs(3));

    drop(attack);
    // Descriptors are free again: ztunnel serves (the first call may still meet the
    // last of the backlog being accepted and closed).
    let mut served = false;
    for _ in 0..20 {
        match echo_ok(&mut t, &a, b.addr(8080)) {
            Ok(()) => {
                served = true;
                break;
            }
            Err(e) => step(&format!("a -> b not served yet: {e:#}")),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        served,
        "ztunnel does not serve again after EMFILE:\n{}",
        z.log_text()
    );
    // Every failed accept happened in this time (the last ones while the descriptors the
    // attack held were being freed).
    let starved_for = starved_at.elapsed();
    step("a -> b served again");

    // It backed off instead of spinning: a hot loop makes hundreds of thousands of
    // accept calls a second; 10 ms doubling to 1 s makes about a dozen in these seconds.
    let emfile = z
        .metric(
            "ztunnel_accept_errors_total",
            &[("listener", "hbone"), ("error", "emfile")],
        )
        .context("metrics after starving ztunnel")?;
    assert!(emfile >= 1, "no EMFILE counted: {}", z.metrics_text()?);
    let bound = 20 + 2 * starved_for.as_secs();
    assert!(
        emfile <= bound,
        "{emfile} failed accepts in {starved_for:?}: the listener spun (bound {bound})"
    );
    let log = z.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("accept failed") && l.contains("hbone"))
        .count() as u64;
    assert!(lines >= 1, "the EMFILE is logged:\n{log}");
    assert!(
        lines <= 2 + starved_for.as_secs() / 5,
        "{lines} log lines for {emfile} failures: not rate-limited"
    );
    println!(
        "out of descriptors for {starved_for:?}: {emfile} failed accepts (EMFILE) on the hbone \
         listener, {lines} log lines"
    );
    Ok(())
}

/// What a fake HBONE peer on another node does with the connections it accepts.
enum PeerMode {
    /// Accepts TCP and never says anything (a TLS server that never answers).
    Silent,
    /// Completes TLS (with the pod's real identity) and HTTP/2, but never answers a
    /// CONNECT.
    NoConnectAnswer(WorkloadCertificate),
}

/// A fake HBONE peer on `pod`'s :15008, served until dropped.
fn fake_peer(pod: &Pod, mode: PeerMode) -> anyhow::Result<InPodServer> {
    let tls = match mode {
        PeerMode::Silent => None,
        PeerMode::NoConnectAnswer(cert) => Some(ztunnel::tls::server_config(&cert)?),
    };
    in_pod::serve(pod, pod.addr(15008), move |tcp| {
        let tls = tls.clone();
        async move {
            let Some(config) = tls else {
                let _silent = tcp;
                std::future::pending::<()>().await;
                return;
            };
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else {
                return;
            };
            let Ok(mut conn) = h2::server::handshake(tls).await else {
                return;
            };
            // Requests are taken (and pings answered) but never responded to.
            let mut unanswered = Vec::new();
            while let Some(Ok(request)) = conn.accept().await {
                unanswered.push(request);
            }
        }
    })
}

/// The outcome ztunnel recorded for its connection to `dst`.
fn outcome(z: &Ztunnel, dst: SocketAddr) -> anyhow::Result<String> {
    let mut found = String::new();
    z.wait_for(&format!("a closed connection to {dst}"), |d| {
        d.connections
            .list
            .iter()
            .any(|r| r.dst == dst && r.outcome.is_some())
    })?
    .connections
    .list
    .iter()
    .filter(|r| r.dst == dst)
    .filter_map(|r| r.outcome.clone())
    .for_each(|o| found = o);
    Ok(found)
}

/// The app's view of a failed call: an error that is a reset, not an empty answer.
fn call_is_reset(t: &mut Topology, from: &Pod, dst: SocketAddr) -> anyhow::Result<()> {
    match call_within(t, from, dst, "1000") {
        Ok(out) => bail!("call to {dst} succeeded: {out}"),
        Err(e) => {
            let e = format!("{e:#}");
            ensure!(e.contains("reset by peer"), "the app must see a reset: {e}");
            Ok(())
        }
    }
}

#[test]
fn each_client_side_step_times_out_at_its_flag() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    // Outside the mesh, dropping SYNs to 7777: a connect that never completes.
    let e = t.add_pod_on(1, "e", false, false)?;
    // "Enrolled" on node2, where no ztunnel runs: its :15008 is the test's fake peer.
    let d = t.add_pod_on(2, "d", true, false)?;
    let out = Command::new("ip")
        .args(["netns", "exec", &e.netns, "iptables", "-w", "-A", "INPUT"])
        .args(["-p", "tcp", "--dport", "7777", "-j", "DROP"])
        .output()?;
    ensure!(
        out.status.success(),
        "iptables in {}: {}",
        e.netns,
        String::from_utf8_lossy(&out.stderr)
    );
    let z = start(
        &mut t,
        &[
            ("ZTUNNEL_TCP_CONNECT_TIMEOUT", "1s"),
            ("ZTUNNEL_TLS_CONNECT_TIMEOUT", "1s"),
            ("ZTUNNEL_CONNECT_RESPONSE_TIMEOUT", "1s"),
        ],
    )?;

    // TCP connect (plain destination).
    call_is_reset(&mut t, &a, e.addr(7777))?;
    let o = outcome(&z, e.addr(7777))?;
    assert!(
        o.contains("tcp_connect timed out after 1s (--tcp-connect-timeout)"),
        "{o}"
    );
    assert_eq!(timeouts(&z, "tcp_connect")?, 1);

    // Client TLS: the peer accepts TCP and never answers the ClientHello.
    let peer = fake_peer(&d, PeerMode::Silent)?;
    call_is_reset(&mut t, &a, d.addr(8080))?;
    let o = outcome(&z, d.addr(8080))?;
    assert!(
        o.contains("tls_connect timed out after 1s (--tls-connect-timeout)"),
        "{o}"
    );
    assert_eq!(timeouts(&z, "tls_connect")?, 1);
    drop(peer);

    // CONNECT response: TLS and HTTP/2 work, the CONNECT is never answered.
    let ca = BuiltinCa::load_or_create(
        &t.dir.path().join("ca"),
        "cluster.local",
        Duration::from_secs(3600),
    )?;
    let d_cert = ca.issue(&Identity::new("cluster.local", "default", "d"))?;
    let peer = fake_peer(&d, PeerMode::NoConnectAnswer(d_cert))?;
    call_is_reset(&mut t, &a, d.addr(8081))?;
    let o = outcome(&z, d.addr(8081))?;
    assert!(
        o.contains("connect_response timed out after 1s (--connect-response-timeout)"),
        "{o}"
    );
    assert_eq!(timeouts(&z, "connect_response")?, 1);
    assert_eq!(timeouts(&z, "hbone_dial")?, 0);
    drop(peer);
    drop(z);

    // The whole dial: with a short dial timeout and a long TLS one, the dial's fires.
    let peer = fake_peer(&d, PeerMode::Silent)?;
    let z = start(&mut t, &[("ZTUNNEL_HBONE_DIAL_TIMEOUT", "1s")])?;
    call_is_reset(&mut t, &a, d.addr(8080))?;
    let o = outcome(&z, d.addr(8080))?;
    assert!(
        o.contains("hbone_dial timed out after 1s (--hbone-dial-timeout)"),
        "{o}"
    );
    assert_eq!(timeouts(&z, "hbone_dial")?, 1);
    assert_eq!(timeouts(&z, "tls_connect")?, 0);
    drop(peer);
    Ok(())
}

#[test]
fn a_client_that_stalls_in_either_handshake_is_dropped_at_its_timeout() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let b = t.add_pod("b", true, false)?;
    let m = t.add_pod("m", false, false)?;
    let z = start(
        &mut t,
        &[
            ("ZTUNNEL_TLS_ACCEPT_TIMEOUT", "1s"),
            ("ZTUNNEL_H2_ACCEPT_TIMEOUT", "1s"),
        ],
    )?;

    // TLS: connected, a partial ClientHello, then nothing.
    let mut stalled = half_open(&m, b.addr(15008), 2)?;
    wait_all_closed("the stalled TLS handshakes to be closed", &mut stalled)?;
    wait_until("two tls_accept timeouts", Duration::from_secs(30), || {
        Ok(timeouts(&z, "tls_accept")? == 2)
    })?;

    // HTTP/2: a mesh client (valid certificate) finishes TLS and never sends its preface.
    let ca = BuiltinCa::load_or_create(
        &t.dir.path().join("ca"),
        "cluster.local",
        Duration::from_secs(3600),
    )?;
    let cert = ca.issue(&Identity::new("cluster.local", "default", "m"))?;
    let config =
        ztunnel::tls::client_config(&cert, vec![Identity::new("cluster.local", "default", "b")])?;
    let ns = Netns::open(&m.netns_path)?;
    let tcp = ns.run(&Netns::current()?, || TcpStream::connect(b.addr(15008)))??;
    tcp.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let waited = rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(ztunnel::tls::server_name(b.addr(0).ip()), tcp)
            .await
            .context("tls with b's ztunnel")?;
        let handshaken = Instant::now();
        tls.flush().await?;
        let mut buf = vec![0u8; 4096];
        loop {
            // The server's SETTINGS may come first; then EOF (or a reset).
            match tokio::time::timeout(Duration::from_secs(60), tls.read(&mut buf)).await {
                Err(_) => bail!("b's ztunnel kept a client without a preface for 60 s"),
                Ok(Ok(0) | Err(_)) => return anyhow::Ok(handshaken.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    })?;
    // ztunnel's timer starts once it has the client's Finished, after our handshake ended.
    assert!(
        waited >= Duration::from_secs(1),
        "dropped after {waited:?}, before the 1 s h2 accept timeout"
    );
    wait_until("one h2_accept timeout", Duration::from_secs(30), || {
        Ok(timeouts(&z, "h2_accept")? == 1)
    })?;
    assert_eq!(timeouts(&z, "tls_accept")?, 2);
    Ok(())
}
