//! The drain on SIGTERM and `POST /quitquitquit`: readiness 503 at once, listeners
//! closed, GOAWAY to HBONE peers, established connections (HBONE streams both ways,
//! plaintext relays both ways, a long transfer) run to their end byte-exact, or are
//! closed with outcome `drain timeout` once `--drain-timeout` passes; pooled outbound
//! connections close with their last stream; on exit every pod's capture and return path
//! stay for the next ztunnel.
//!
//! The apps pause their transfers (`podapp call --pause-at`) until the drain has started,
//! then resume: the connections carry data during the drain, not only before it.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ztunnel_tests::{Pod, PodProcess, Topology, Ztunnel, cgroup_programs, http, pod_net_programs};

const MIB: usize = 1 << 20;

/// The apps' transfers: 64 MiB each way for the long one, 1 MiB for the others, all
/// paused at a quarter until the resume file exists.
const LONG: usize = 64 * MIB;
const SHORT: usize = MIB;

/// A client app paused in the middle of a transfer.
struct Paused {
    process: PodProcess,
    bytes: usize,
    resume: PathBuf,
    what: String,
}

impl Paused {
    /// Starts `podapp call` from `pod` to `dst` and waits until it has sent a quarter of
    /// `bytes` and paused.
    fn start(
        t: &mut Topology,
        pod: &Pod,
        dst: std::net::SocketAddr,
        bytes: usize,
        name: &str,
    ) -> anyhow::Result<Self> {
        let resume = t.dir.path().join(format!("resume-{name}"));
        let (total, at, dst_s) = (bytes.to_string(), (bytes / 4).to_string(), dst.to_string());
        let resume_s = resume.display().to_string();
        let mut process = t.spawn(
            pod,
            &[
                "call",
                &dst_s,
                "--bytes",
                &total,
                "--seed",
                "11",
                "--pause-at",
                &at,
                "--resume-file",
                &resume_s,
            ],
        )?;
        let what = format!("{name} ({} -> {dst})", pod.name);
        let first = process.read_line()?;
        anyhow::ensure!(first.starts_with("peer="), "{what}: {first:?}");
        let paused = process.read_line()?;
        anyhow::ensure!(paused.starts_with("paused"), "{what}: {paused:?}");
        Ok(Self {
            process,
            bytes,
            resume,
            what,
        })
    }

    fn resume(&self) -> anyhow::Result<()> {
        std::fs::write(&self.resume, b"go").with_context(|| format!("resume {}", self.what))
    }

    /// Resumes and asserts the whole transfer came back byte-exact.
    fn finish(self) -> anyhow::Result<()> {
        self.resume()?;
        let out = self
            .process
            .wait_ok()
            .with_context(|| format!("{} failed", self.what))?;
        anyhow::ensure!(
            out.contains(&format!("received={} match=true", self.bytes)),
            "{}: {out}",
            self.what
        );
        Ok(())
    }

    /// Resumes and returns the app's failure (the connection was ended under it).
    fn finish_failed(self) -> anyhow::Result<String> {
        self.resume()?;
        match self.process.wait_ok() {
            Ok(out) => bail!("{} succeeded though it was cut: {out}", self.what),
            Err(e) => Ok(format!("{e:#}")),
        }
    }
}

fn signal(z: &Ztunnel, sig: libc::c_int) {
    // SAFETY: signalling the ztunnel this test started.
    unsafe { libc::kill(z.pid() as i32, sig) };
}

/// Waits (generously) for the process to exit.
fn wait_exit(z: &Ztunnel, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while z.alive() {
        if start.elapsed() > within {
            bail!(
                "ztunnel still running {within:?} after the drain started\n{}",
                z.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(start.elapsed())
}

/// Polls readiness until it answers 503; returns its reason.
fn wait_not_ready(z: &Ztunnel) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match z.ready() {
            Err(e) => return Ok(format!("{e:#}")),
            Ok(_) if Instant::now() > deadline => {
                bail!("readiness still 200 after the drain started")
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs a command inside a test namespace and returns its stdout.
fn in_netns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pod's listening TCP ports.
fn listening(pod: &Pod) -> anyhow::Result<String> {
    in_netns(&pod.netns, &["ss", "-Hltn"])
}

/// Established TCP connections in the pod's netns to `dst`.
fn established_to(pod: &Pod, dst: std::net::SocketAddr) -> anyhow::Result<usize> {
    let out = in_netns(
        &pod.netns,
        &[
            "ss",
            "-Htn",
            "state",
            "established",
            "dst",
            &dst.to_string(),
        ],
    )?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Polls the ztunnel's log until it holds `needle`.
fn wait_log(z: &Ztunnel, needle: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !z.log_text().contains(needle) {
        if Instant::now() > deadline {
            bail!("{needle:?} never appeared in the log:\n{}", z.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The access log lines (one per closed connection).
fn access_lines(z: &Ztunnel) -> Vec<String> {
    z.log_text()
        .lines()
        .filter(|l| l.contains("\taccess\tconnection complete\t"))
        .map(str::to_owned)
        .collect()
}

/// A metric sample's value in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until the drain's metrics are in (readiness turns 503 a moment before the
/// drain itself starts) and returns the exposition.
fn draining_metrics(z: &Ztunnel) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = z.metrics_text()?;
        if sample(&text, "ztunnel_draining") == Some(1.0) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("ztunnel_draining never became 1:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `node`'s ztunnel with the drain timeout given as Istio's variable
/// (`CONNECTION_TERMINATION_DEADLINE`, what `--drain-timeout` reads) and waits until it
/// has enrolled its pods.
fn start_with(
    t: &mut Topology,
    node: &str,
    drain_timeout: Option<&str>,
) -> anyhow::Result<Ztunnel> {
    t.write_workloads()?;
    let mut source = std::process::Command::new("");
    source.arg("--workloads").arg(t.workloads_path());
    if let Some(d) = drain_timeout {
        source.env("CONNECTION_TERMINATION_DEADLINE", d);
    }
    let z = t.spawn_ztunnel_from(node, false, &source)?;
    let want: Vec<Pod> = t
        .pods
        .iter()
        .filter(|p| p.ambient && p.node == node)
        .cloned()
        .collect();
    z.wait_enrolled(&want.iter().collect::<Vec<_>>())?;
    Ok(z)
}

/// The return path's rule and route in a pod's netns (see `proxy/return_path.rs`).
fn return_path(pod: &Pod) -> anyhow::Result<(bool, bool)> {
    let rules = in_netns(&pod.netns, &["ip", "-4", "rule", "show"])?;
    let routes = in_netns(&pod.netns, &["ip", "-4", "route", "show", "table", "133"])?;
    Ok((
        rules.contains("fwmark 0x111/0xfff lookup 133"),
        routes.contains("local default dev lo"),
    ))
}

/// Pods `a` and `b` enrolled on one node, `c` outside the mesh; echo servers on b and c.
/// While four connections are paused mid-transfer — a → b over HBONE (64 MiB: an
/// outbound stream and an inbound HBONE stream), c → b in plaintext (an inbound relay on
/// :15006), a → c in plaintext (an outbound relay) — `trigger` starts the drain. Each
/// then runs to its end byte-exact, and ztunnel exits as soon as they are done.
fn established_connections_finish_within_the_drain(
    trigger: impl FnOnce(&Ztunnel) -> anyhow::Result<()>,
    cause: &str,
) -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let _sc = t.serve(&c, c.addr(8080))?;
    // Far longer than the test: the drain must end because the connections did.
    let z = start_with(&mut t, "node1", Some("10m"))?;

    let calls = vec![
        Paused::start(&mut t, &a, b.addr(8080), LONG, "hbone")?,
        Paused::start(&mut t, &c, b.addr(8080), SHORT, "inbound-plain")?,
        Paused::start(&mut t, &a, c.addr(8080), SHORT, "outbound-plain")?,
    ];
    let d = z.wait_for("the four open connections", |d| {
        d.connections
            .list
            .iter()
            .filter(|r| r.outcome.is_none())
            .count()
            == 4
    })?;
    assert!(
        d.connections.list.iter().all(|r| r.outcome.is_none()),
        "{:?}",
        d.connections.list
    );

    trigger(&z)?;
    let why = wait_not_ready(&z)?;
    assert!(
        why.contains("503") && why.contains(&format!("draining ({cause})")),
        "{why}"
    );
    // Nothing listens in the pods any more: new connections fail closed (no successor).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (la, lb) = (listening(&a)?, listening(&b)?);
        if !["15001", "15006", "15008"]
            .iter()
            .any(|p| la.contains(&format!(":{p} ")) || lb.contains(&format!(":{p} ")))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listeners still open:\n{la}\n{lb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = t.call(&a, c.addr(8080), &[]);
    let err = format!("{:?}", refused.expect_err("no listener, no plaintext"));
    assert!(err.contains("Connection refused"), "{err}");
    let metrics = draining_metrics(&z)?;
    assert_eq!(
        sample(&metrics, r#"ztunnel_drain_connections{state="at_start"}"#),
        Some(4.0),
        "{metrics}"
    );
    assert!(z.alive(), "ztunnel must wait for the connections");

    // The transfers go on through the draining ztunnel and finish byte-exact.
    for call in calls {
        call.finish()?;
    }
    wait_exit(&z, Duration::from_secs(60))?;
    let log = z.log_text();
    assert!(
        log.contains("drain finished: every connection ended")
            && log.contains("connections=4 remaining=0 forced=0"),
        "{log}"
    );
    let access = access_lines(&z);
    assert_eq!(access.len(), 4, "{access:#?}");
    for line in &access {
        assert!(
            line.contains("\tinfo\t") && !line.contains(" error="),
            "{line}"
        );
    }
    assert!(
        log.contains("capture and return path left in place"),
        "{log}"
    );
    Ok(())
}

#[test]
fn sigterm_lets_established_connections_finish_byte_exact() -> anyhow::Result<()> {
    established_connections_finish_within_the_drain(
        |z| {
            signal(z, libc::SIGTERM);
            Ok(())
        },
        "SIGTERM",
    )
}

#[test]
fn quitquitquit_lets_established_connections_finish_byte_exact() -> anyhow::Result<()> {
    established_connections_finish_within_the_drain(
        |z| {
            let body = http(z.admin, "POST", "/quitquitquit")?;
            anyhow::ensure!(body.trim() == "draining", "{body}");
            Ok(())
        },
        "POST /quitquitquit",
    )
}

#[test]
fn connections_left_at_the_drain_timeout_are_closed_with_that_outcome() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let _sc = t.serve(&c, c.addr(8080))?;
    let z = start_with(&mut t, "node1", Some("4s"))?;
    let calls = vec![
        Paused::start(&mut t, &a, b.addr(8080), SHORT, "hbone")?,
        Paused::start(&mut t, &c, b.addr(8080), SHORT, "inbound-plain")?,
        Paused::start(&mut t, &a, c.addr(8080), SHORT, "outbound-plain")?,
    ];
    z.wait_for("the four open connections", |d| {
        d.connections.list.len() == 4 && d.connections.list.iter().all(|r| r.outcome.is_none())
    })?;

    let signalled = Instant::now();
    signal(&z, libc::SIGTERM);
    wait_not_ready(&z)?;
    // Counted while it runs: four at the start, four remaining, none forced yet.
    let metrics = draining_metrics(&z)?;
    for (name, want) in [
        ("ztunnel_draining", 1.0),
        (r#"ztunnel_drain_connections{state="at_start"}"#, 4.0),
        (r#"ztunnel_drain_connections{state="remaining"}"#, 4.0),
        ("ztunnel_drain_forced_connections_total", 0.0),
    ] {
        assert_eq!(sample(&metrics, name), Some(want), "{name}\n{metrics}");
    }
    // Nobody resumes: the timeout ends them, and ztunnel exits right after.
    wait_exit(&z, Duration::from_secs(60))?;
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "exited before the timeout: {took:?}"
    );
    let log = z.log_text();
    assert!(
        log.contains("drain timeout passed") && log.contains("connections=4 remaining=4 forced=4"),
        "{log}"
    );
    let access = access_lines(&z);
    assert_eq!(access.len(), 4, "{access:#?}");
    for line in &access {
        assert!(line.contains(r#"error="drain timeout""#), "{line}");
    }
    // The apps saw their connections end (EOF, then a failed write or a short echo).
    for call in calls {
        call.finish_failed()?;
    }
    Ok(())
}

#[test]
fn pooled_outbound_connection_closes_when_its_last_stream_ends() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let a = t.add_pod_on(1, "a", true, false)?;
    let c = t.add_pod_on(1, "c", false, false)?;
    let b = t.add_pod_on(2, "b", true, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let _sc = t.serve(&c, c.addr(8080))?;
    let z1 = start_with(&mut t, "node1", Some("10m"))?;
    let _z2 = start_with(&mut t, "node2", None)?;

    // Two streams on one pooled connection to b's :15008, and a plaintext connection
    // that keeps the drain going after both.
    let first = Paused::start(&mut t, &a, b.addr(8080), SHORT, "first")?;
    let second = Paused::start(&mut t, &a, b.addr(8080), SHORT, "second")?;
    let keep = Paused::start(&mut t, &a, c.addr(8080), SHORT, "keep")?;
    let hbone = b.addr(15008);
    assert_eq!(established_to(&a, hbone)?, 1, "one pooled connection");

    signal(&z1, libc::SIGTERM);
    wait_not_ready(&z1)?;
    first.finish()?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        established_to(&a, hbone)?,
        1,
        "the connection stays while a stream is open"
    );
    second.finish()?;
    // Its last stream ended: it closes now, though ztunnel still drains.
    let deadline = Instant::now() + Duration::from_secs(20);
    while established_to(&a, hbone)? > 0 {
        assert!(
            Instant::now() < deadline,
            "the pooled connection outlived its last stream"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(z1.alive(), "still draining (one connection open)");
    keep.finish()?;
    wait_exit(&z1, Duration::from_secs(60))?;
    assert!(
        z1.log_text().contains("connections=3 remaining=0 forced=0"),
        "{}",
        z1.log_text()
    );
    Ok(())
}

#[test]
fn peer_gets_goaway_and_opens_new_streams_on_the_successor() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    t.add_node()?;
    let b = t.add_pod_on(1, "b", true, false)?;
    let c = t.add_pod_on(2, "c", true, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let z1 = start_with(&mut t, "node1", Some("10m"))?;
    let z2 = start_with(&mut t, "node2", None)?;

    // c's ztunnel (the peer) holds one pooled connection to b's :15008, with a stream.
    let old = Paused::start(&mut t, &c, b.addr(8080), LONG, "old")?;
    assert_eq!(established_to(&c, b.addr(15008))?, 1);

    // h2 logs each frame it receives at debug: that is how we see the GOAWAY arrive.
    http(
        z2.admin,
        "POST",
        "/logging?level=info,h2::codec::framed_read=debug",
    )?;
    signal(&z1, libc::SIGTERM);
    wait_not_ready(&z1)?;
    // A stream the peer opens before the GOAWAY reaches it is still served (RFC 9113
    // §6.8): the next call waits for it.
    wait_log(&z2, "frame=GoAway")?;
    http(z2.admin, "POST", "/logging?level=info")?;
    // The peer does not open the next stream on the drained connection: it dials anew,
    // and with nothing listening on b's :15008 (no successor yet) the call fails closed.
    let refused = t.call(&c, b.addr(8080), &[]);
    assert!(refused.is_err(), "no listener, yet the call went through");
    // The log is written by a thread of its own: the lines may follow the refusal.
    wait_log(&z2, "failed to connect to the hbone peer")?;
    wait_log(&z2, "Connection refused")?;
    let z2_log = z2.log_text();
    assert!(
        z2_log.contains("failed to connect to the hbone peer")
            && z2_log.contains("Connection refused"),
        "the peer should have dialled a new connection:\n{z2_log}"
    );

    // A successor on b's node (started after the old one closed its listeners) takes the
    // new streams; the old stream stays on the draining ztunnel.
    let z1b = start_with(&mut t, "node1", None)?;
    let out = t.call(&c, b.addr(8080), &["--bytes", "100000"])?;
    assert!(out.contains("received=100000 match=true"), "{out}");
    z1b.wait_for("the new stream on the successor", |d| {
        d.connections
            .list
            .iter()
            .any(|r| r.outcome.as_deref() == Some("ok"))
    })?;
    assert!(
        access_lines(&z1).is_empty(),
        "the draining ztunnel took a new stream: {:#?}",
        access_lines(&z1)
    );
    old.finish()?;
    wait_exit(&z1, Duration::from_secs(60))?;
    let log = z1.log_text();
    assert!(log.contains("connections=1 remaining=0 forced=0"), "{log}");
    let access = access_lines(&z1);
    assert_eq!(access.len(), 1, "{access:#?}");
    assert!(!access[0].contains(" error="), "{}", access[0]);

    // The old one's exit left the return path the successor relies on: inbound calls
    // still get their replies.
    let out = t.call(&c, b.addr(8080), &["--bytes", "100000"])?;
    assert!(out.contains("received=100000 match=true"), "{out}");
    Ok(())
}

#[test]
fn after_the_drain_capture_and_return_path_stay_and_the_pod_fails_closed() -> anyhow::Result<()> {
    let mut t = Topology::new()?;
    let a = t.add_pod("a", true, false)?;
    let b = t.add_pod("b", true, false)?;
    let c = t.add_pod("c", false, false)?;
    let _sb = t.serve(&b, b.addr(8080))?;
    let _sc = t.serve(&c, c.addr(8080))?;
    let z = start_with(&mut t, "node1", None)?;
    let out = t.call(&c, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    assert_eq!(return_path(&b)?, (true, true));

    signal(&z, libc::SIGTERM);
    wait_exit(&z, Duration::from_secs(60))?;
    // Everything stays for the next ztunnel: the pins, the programs, the return path.
    let pins: &Path = &z.pin_dir;
    assert!(pins.join("pods").is_dir(), "pins gone: {}", pins.display());
    for pod in [&a, &b] {
        assert!(
            cgroup_programs(&pod.cgroup)?.contains("connect4_capture"),
            "{} lost its capture",
            pod.name
        );
        // (bpftool here does not list TCX links: look at the pin.)
        let tc = pins.join("pods").join(pod.key()).join("tc_ingress_capture");
        assert!(
            tc.exists() || pod_net_programs(pod)?.contains("tc_ingress"),
            "{} lost its tc program ({} missing)",
            pod.name,
            tc.display()
        );
        assert_eq!(
            return_path(pod)?,
            (true, true),
            "{}'s return path was removed",
            pod.name
        );
    }
    // The pods fail closed: a's connect goes to :15001, where nothing listens; a SYN to
    // b is steered to a :15006 that is gone and dropped, never passed to b's app.
    let err = format!(
        "{:?}",
        t.call(&a, c.addr(8080), &[]).expect_err("no plaintext")
    );
    assert!(err.contains("Connection refused"), "{err}");
    let mut plain = std::process::Command::new("ip")
        .args(["netns", "exec", &c.netns])
        .arg(ztunnel_tests::podapp_bin())
        .args(["call", &b.addr(8080).to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(5));
    let ended = plain.try_wait()?;
    let _ = plain.kill();
    let _ = plain.wait();
    assert!(
        ended.is_none(),
        "a plaintext call into b must hang (its SYN dropped), but it ended: {ended:?}"
    );

    // The next ztunnel takes over and the return path serves inbound again.
    let z2 = start_with(&mut t, "node1", None)?;
    let out = t.call(&c, b.addr(8080), &["--bytes", "100000"])?;
    assert!(out.contains("received=100000 match=true"), "{out}");
    let out = t.call(&a, b.addr(8080), &[])?;
    assert!(out.contains("match=true"), "{out}");
    z2.wait_for("both calls", |d| d.connections.opened_total >= 3)?;
    Ok(())
}
