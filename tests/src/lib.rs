//! Fixtures for the privileged integration tests: a "node" network namespace with a
//! bridge, "pods" (network namespaces joined by veths, one cgroup each), processes run
//! inside a pod's netns and cgroup, and a ztunnel process with its own cgroup and pin
//! directory. Everything is torn down when the [`Topology`] drops, also on panic.
use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use ztunnel::admin::ConfigDump;

pub mod bench;
pub mod demo;
pub mod fake_cni;
pub mod fake_istiod;
pub mod in_pod;
pub mod istio;
pub mod istioctl;
pub mod upgrade;
pub mod waypoint;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Live [`Ztunnel`] handles per pin directory: during an upgrade two ztunnels of a node
/// share its pins, and only the last one to go may remove them.
static PIN_USERS: std::sync::Mutex<BTreeMap<PathBuf, usize>> =
    std::sync::Mutex::new(BTreeMap::new());

fn pin_users(dir: &Path, delta: isize) -> usize {
    let mut users = PIN_USERS.lock().unwrap_or_else(|p| p.into_inner());
    let n = users.entry(dir.to_owned()).or_default();
    *n = n.saturating_add_signed(delta);
    let left = *n;
    if left == 0 {
        users.remove(dir);
    }
    left
}

/// Fails the test loudly unless it runs as root: these tests need real netns and eBPF.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the privileged integration tests need root (real network namespaces, cgroups and eBPF); run `sudo cargo xtask test`"
    );
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// `ip -n <ns> …`
fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

fn cgroup2_root() -> PathBuf {
    ztunnel::ebpf::mount_point("cgroup2").expect("a cgroup2 mount (cargo xtask setup mounts one)")
}

pub fn ztunnel_bin() -> PathBuf {
    bin("ZTUNNEL_BIN", "ztunnel")
}

pub fn podapp_bin() -> PathBuf {
    bin("PODAPP_BIN", "podapp")
}

fn bin(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    // Next to this executable (target/<profile>/demo), or one level up from a test
    // binary (target/<profile>/deps/it-…).
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable dir");
    let p = [
        dir.join(name),
        dir.parent().map(|d| d.join(name)).unwrap_or_default(),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| dir.join(name));
    assert!(
        p.exists(),
        "{} not found; build it first (`cargo xtask test` does) or set {env}",
        p.display()
    );
    p
}

/// A pod: its own netns, a veth into the node's bridge, and a cgroup named as the
/// kubelet names it (cgroupfs driver: `…/kubepods/pod<uid>`).
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// A Kubernetes-shaped UID, unique on the machine (ZDS and cgroup names use it).
    pub uid: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    /// Enrolled in the workload file (label `istio.io/dataplane-mode=ambient`).
    pub ambient: bool,
    /// The node it runs on (`node1`, `node2`).
    pub node: String,
    pub service_account: String,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6.expect("pod has IPv6")), port)
    }

    pub fn key(&self) -> String {
        format!("default/{}", self.name)
    }

    /// Sets each `key=value` in the pod's netns (`sysctl -w`), failing with sysctl's
    /// error and the netns.
    pub fn sysctl(&self, settings: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.netns, "sysctl", "-qw"])
            .args(settings))
        .map(drop)
    }
}

/// A running process in a pod; killed on drop.
pub struct PodProcess {
    child: Option<Child>,
    what: String,
}

impl PodProcess {
    /// The process id (0 once waited for).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// What it wrote to stderr (piped), read to the end: for a process that has exited.
    pub fn stderr_text(&mut self) -> String {
        use std::io::Read as _;
        let mut text = String::new();
        if let Some(e) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = e.read_to_string(&mut text);
        }
        text
    }

    /// Whether it has exited (it is reaped then).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Waits for it to exit and returns stdout, failing on a non-zero exit.
    pub fn wait_ok(mut self) -> anyhow::Result<String> {
        let child = self.child.take().expect("child present until waited");
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{} failed ({}): {stdout}{}",
                self.what,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Reads one line of stdout (e.g. a server's "ready").
    pub fn read_line(&mut self) -> anyhow::Result<String> {
        use std::io::Read as _;
        let out = self
            .child
            .as_mut()
            .and_then(|c| c.stdout.as_mut())
            .context("no stdout")?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b)? == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A ztunnel process; SIGTERM then SIGKILL on drop.
pub struct Ztunnel {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    keep_pins: bool,
    /// Print the log when dropped (for tests: the harness shows it only on failure).
    pub print_log: bool,
}

impl Ztunnel {
    /// The Prometheus text from `/metrics`.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        http(self.metrics, "GET", "/metrics")
    }

    /// The value of the first sample of `metric` whose labels include all of `labels`,
    /// 0 when there is none (a counter not yet incremented is not exposed).
    pub fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<u64> {
        Ok(metric_sample(&self.metrics_text()?, metric, labels).unwrap_or(0))
    }

    /// `Ok(body)` when `/healthz/ready` answers 200, `Err` with the reason otherwise.
    pub fn ready(&self) -> anyhow::Result<String> {
        http(self.readiness, "GET", "/healthz/ready")
    }

    pub fn dump(&self) -> anyhow::Result<ConfigDump> {
        let body = http(self.admin, "GET", "/config_dump")?;
        serde_json::from_str(&body).with_context(|| format!("bad /config_dump: {body}"))
    }

    pub fn set_fast_path(&self, on: bool) -> anyhow::Result<()> {
        http(self.admin, "POST", &format!("/fast_path?enabled={on}")).map(drop)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `cond` holds for it, or as it is after 30 s ([`log_when`]).
    pub fn log_when(&self, cond: impl Fn(&str) -> bool) -> String {
        log_when(|| self.log_text(), cond)
    }

    /// The first log line containing `needle`, waiting for it (60 s at most: never a
    /// speed test); fails at once if the ztunnel exits first.
    pub fn wait_log_line(&self, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log_text();
            if let Some(l) = log.lines().find(|l| l.contains(needle)) {
                return Ok(l.to_string());
            }
            anyhow::ensure!(self.alive(), "the ztunnel exited\n{log}");
            anyhow::ensure!(Instant::now() < deadline, "no log line {needle:?}\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls the admin API until `cond` holds (generous timeout: never a speed test).
    pub fn wait_for(
        &self,
        what: &str,
        cond: impl Fn(&ConfigDump) -> bool,
    ) -> anyhow::Result<ConfigDump> {
        self.wait_for_within(what, Duration::from_secs(60), cond)
    }

    /// Polls the admin API until `n` of the connections listed have ended.
    pub fn wait_closed(&self, n: usize) -> anyhow::Result<ConfigDump> {
        self.wait_for(&format!("{n} closed connections"), |d| {
            d.connections
                .list
                .iter()
                .filter(|r| r.outcome.is_some())
                .count()
                == n
        })
    }

    /// [`Self::wait_for`] with its own limit.
    pub fn wait_for_within(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&ConfigDump) -> bool,
    ) -> anyhow::Result<ConfigDump> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(d) = self.dump()
                && cond(&d)
            {
                return Ok(d);
            }
            if !self.alive() {
                bail!(
                    "ztunnel exited while waiting for {what}\nztunnel log:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; last dump: {:?}\nztunnel log:\n{}",
                    self.dump().ok(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until exactly `pods` are enrolled.
    pub fn wait_enrolled(&self, pods: &[&Pod]) -> anyhow::Result<ConfigDump> {
        let mut want: Vec<String> = pods.iter().map(|p| p.key()).collect();
        want.sort();
        self.wait_for(&format!("enrolled pods {want:?}"), |d| {
            let mut have: Vec<String> = d.enrolled_pods.iter().map(|p| p.name.clone()).collect();
            have.sort();
            have == want
        })
    }

    /// SIGKILL, as a crash would: nothing is detached or unpinned.
    pub fn crash(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.keep_pins = true;
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits (at most `secs`) for the process to exit on its own; whether it did.
    pub fn wait_exit(&mut self, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            match self.child.as_mut().map(Child::try_wait) {
                None | Some(Ok(Some(_))) => return true,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_owned())
            })
            .is_some_and(|rest| !rest.starts_with('Z'))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Already exited and reaped (`wait_exit`): its pid may be another process's.
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.stop();
        // The harness shows a test's output only when it fails: then this log is there.
        if self.print_log {
            println!(
                "---- ztunnel log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        // Another ztunnel of the node (an upgrade's other side) still uses the pins.
        if pin_users(&self.pin_dir, -1) == 0 && !self.keep_pins {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// A blocking HTTP/1.1 request to the admin API (hyper on a throwaway runtime).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt as _, Empty};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Bounded: a ztunnel that stops answering fails the call instead of hanging the test.
    let call = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .body(Empty::<bytes::Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!("{method} {path}: {status}: {body}");
        }
        anyhow::Ok(body)
    };
    rt.block_on(async {
        tokio::time::timeout(HTTP_TIMEOUT, call)
            .await
            .with_context(|| {
                format!("{method} http://{addr}{path}: no answer within {HTTP_TIMEOUT:?}")
            })?
    })
}

/// `N` different loopback ports free right now (other test runs on the machine use
/// others). All are held until all are picked: the kernel may hand a port that was just
/// let go to the next bind, and two of ztunnel's servers given one port cannot both
/// serve it.
pub fn free_local_ports<const N: usize>() -> anyhow::Result<[SocketAddr; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = held
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?;
    addrs
        .try_into()
        .map_err(|_| anyhow::anyhow!("{N} listeners gave another count of addresses"))
}

/// How long [`http`] waits for ztunnel's admin, metrics or readiness port.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// One or two nodes: each a netns with a bridge (`10.<s>.<node>.1/24`) and pods attached
/// to it; two nodes are joined by a veth "wire" and route between each other (forwarding
/// is switched on inside the node namespaces only).
pub struct Topology {
    pub id: String,
    /// Node netns names, `node1` first.
    pub nodes: Vec<String>,
    pub dir: tempfile::TempDir,
    cgroup_base: PathBuf,
    subnet: u8,
    pub pods: Vec<Pod>,
    veths: Vec<String>,
    procs: Vec<u32>,
    starts: u32,
    /// `--capture` for the ztunnels this topology starts (default: ztunnel's own, auto).
    pub capture: Option<String>,
    /// Admin, metrics and readiness addresses for the ztunnels this topology starts
    /// (default: free ports, different for each); fixed ones make an upgrade's two
    /// ztunnels contend for them, as on one host under systemd.
    pub ports: Option<[SocketAddr; 3]>,
    /// Extra environment for the ztunnels this topology starts.
    pub ztunnel_env: Vec<(String, String)>,
    /// Appended to [`Self::workloads_yaml`] (a `services:` section, say).
    pub services_yaml: String,
}

impl Topology {
    pub fn new() -> anyhow::Result<Self> {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("zt{}x{n}", std::process::id() % 100_000);
        Self::named(&id, 100 + (n % 100) as u8)
    }

    /// A topology with a fixed name (all its namespaces start with `<id>-`) and address
    /// block `10.<subnet>.0.0/16`, so that another process can find and remove it.
    pub fn named(id: &str, subnet: u8) -> anyhow::Result<Self> {
        let id = id.to_owned();
        let node_ns = format!("{id}-node1");
        let cgroup_base = cgroup2_root().join(format!("{id}-test"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-files-"))
            .tempdir()?;
        let topo = Self {
            id,
            nodes: vec![node_ns.clone()],
            // Named after the topology so that `teardown` can find it too.
            dir,
            cgroup_base,
            subnet,
            pods: Vec::new(),
            veths: Vec::new(),
            procs: Vec::new(),
            starts: 0,
            capture: None,
            ports: None,
            ztunnel_env: Vec::new(),
            services_yaml: String::new(),
        };
        std::fs::create_dir_all(topo.cgroup_base.join("kubepods"))?;
        topo.make_node(1)?;
        Ok(topo)
    }

    fn make_node(&self, n: u8) -> anyhow::Result<()> {
        let ns = self.nodes[usize::from(n - 1)].as_str();
        ip(&["netns", "add", ns])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
        ip_in(ns, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(
            ns,
            &[
                "addr",
                "add",
                &format!("{}/24", self.gateway4(n)),
                "dev",
                "br0",
            ],
        )?;
        ip_in(ns, &["link", "set", "br0", "up"])?;
        Ok(())
    }

    /// The second octet of every address in this topology.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    /// The bridge address of node `n`: the default gateway of its pods.
    pub fn gateway4(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, n, 1)
    }

    /// Captures TCP on node1's side of the wire between the nodes.
    pub fn tcpdump_wire(&self) -> anyhow::Result<Tcpdump> {
        let file = self.dir.path().join(format!("wire-{}.pcap", self.starts));
        Tcpdump::start(&self.nodes[0], "wire", file)
    }

    /// Adds node2, wired to node1, with routes both ways.
    pub fn add_node(&mut self) -> anyhow::Result<String> {
        assert_eq!(self.nodes.len(), 1, "the fixture builds at most two nodes");
        let ns = format!("{}-node2", self.id);
        self.nodes.push(ns.clone());
        self.make_node(2)?;
        let (n1, n2) = (self.nodes[0].clone(), ns.clone());
        ip(&[
            "link", "add", "wire", "netns", &n1, "type", "veth", "peer", "name", "wire", "netns",
            &n2,
        ])?;
        let s = self.subnet;
        for (node, me, peer, other) in [(&n1, 1u8, 2u8, 2u8), (&n2, 2, 1, 1)] {
            ip_in(
                node,
                &["addr", "add", &format!("10.{s}.255.{me}/24"), "dev", "wire"],
            )?;
            ip_in(node, &["link", "set", "wire", "up"])?;
            ip_in(
                node,
                &[
                    "route",
                    "add",
                    &format!("10.{s}.{other}.0/24"),
                    "via",
                    &format!("10.{s}.255.{peer}"),
                ],
            )?;
            // Forwarding inside the node namespace only; the host keeps its own setting.
            run(Command::new("ip").args([
                "netns",
                "exec",
                node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]))?;
        }
        Ok("node2".to_owned())
    }

    /// Adds a pod on node1 with an IPv4 address (and IPv6 when `dual_stack`).
    pub fn add_pod(&mut self, name: &str, ambient: bool, dual_stack: bool) -> anyhow::Result<Pod> {
        self.add_pod_on(1, name, ambient, dual_stack)
    }

    /// Adds a pod on node `node` (1 or 2).
    pub fn add_pod_on(
        &mut self,
        node: u8,
        name: &str,
        ambient: bool,
        dual_stack: bool,
    ) -> anyhow::Result<Pod> {
        let node_ns = self.nodes[usize::from(node - 1)].clone();
        let k = self.pods.len() as u8 + 10;
        let netns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &netns])?;
        let host_if = format!("v{}{k}", &self.id[2..].replace('x', ""));
        let host_if: String = host_if.chars().take(15).collect();
        ip(&[
            "link", "add", &host_if, "netns", &node_ns, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        self.veths.push(host_if.clone());
        ip_in(&node_ns, &["link", "set", &host_if, "master", "br0", "up"])?;
        let ip4 = Ipv4Addr::new(10, self.subnet, node, k);
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        ip_in(
            &netns,
            &["addr", "add", &format!("{ip4}/24"), "dev", "eth0"],
        )?;
        let ip6 = if dual_stack {
            let a: Ipv6Addr = format!("fd00:{}::{k}", self.subnet).parse()?;
            ip_in(
                &netns,
                &["addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"],
            )?;
            Some(a)
        } else {
            None
        };
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        let gw = self.gateway4(node).to_string();
        ip_in(&netns, &["route", "add", "default", "via", &gw])?;
        // Unique on the machine: this process, this topology's subnet, the pod's number.
        let uid = format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            std::process::id(),
            self.subnet,
            k
        );
        let cgroup = self.cgroup_base.join("kubepods").join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)?;
        let pod = Pod {
            name: name.to_owned(),
            uid,
            netns_path: PathBuf::from("/var/run/netns").join(&netns),
            netns,
            cgroup,
            ip4,
            ip6,
            ambient,
            node: format!("node{node}"),
            service_account: name.to_owned(),
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Runs `podapp <args>` inside the pod's netns and cgroup.
    pub fn spawn(&mut self, pod: &Pod, args: &[&str]) -> anyhow::Result<PodProcess> {
        self.spawn_program(pod, &podapp_bin(), args)
    }

    /// Runs `program <args>` inside the pod's netns and cgroup.
    pub fn spawn_program(
        &mut self,
        pod: &Pod,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<PodProcess> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let what = format!("{} {} in {}", program.display(), args.join(" "), pod.name);
        self.spawn_command(pod, cmd, what)
    }

    /// Runs `cmd` (its program, arguments, environment and output as the caller set them;
    /// stdin is null) inside the pod's netns and cgroup; `what` names it in errors.
    pub fn spawn_command(
        &mut self,
        pod: &Pod,
        mut cmd: Command,
        what: String,
    ) -> anyhow::Result<PodProcess> {
        let netns = File::open(&pod.netns_path)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(pod.cgroup.join("cgroup.procs"))?;
        cmd.stdin(Stdio::null());
        let (ns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
        // SAFETY: only async-signal-safe calls (write, setns) on descriptors opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process (cgroup v2, Documentation/admin-guide/cgroup-v2.rst).
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to spawn {cmd:?}"))?;
        self.procs.push(child.id());
        drop((netns, procs));
        Ok(PodProcess {
            child: Some(child),
            what,
        })
    }

    /// Starts an echo server in the pod and waits until it listens.
    pub fn serve(&mut self, pod: &Pod, addr: SocketAddr) -> anyhow::Result<PodProcess> {
        self.serve_with(pod, addr, &[])
    }

    /// [`Self::serve`] with extra flags (`--log-peers`).
    pub fn serve_with(
        &mut self,
        pod: &Pod,
        addr: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<PodProcess> {
        let addr = addr.to_string();
        let mut args = vec!["serve", addr.as_str()];
        args.extend_from_slice(extra);
        let mut p = self.spawn(pod, &args)?;
        let line = p.read_line()?;
        if !line.starts_with("ready") {
            bail!("server in {} did not start: {line:?}", pod.name);
        }
        Ok(p)
    }

    /// Runs `podapp call` and returns its stdout.
    pub fn call(&mut self, pod: &Pod, dst: SocketAddr, extra: &[&str]) -> anyhow::Result<String> {
        let dst = dst.to_string();
        let mut args = vec!["call", dst.as_str()];
        args.extend_from_slice(extra);
        self.spawn(pod, &args)?.wait_ok()
    }

    /// Runs `podapp call` from node `n`'s own network namespace (as the kubelet's probes
    /// do) and returns its stdout.
    pub fn call_from_node(&self, n: u8, dst: SocketAddr, extra: &[&str]) -> anyhow::Result<String> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.nodes[usize::from(n - 1)]])
            .arg(podapp_bin())
            .args(["call", &dst.to_string()])
            .args(extra))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The workload file for the current pods (service account = pod name).
    pub fn workloads_yaml(&self) -> String {
        let mut out = String::from("namespaces:\n  - name: default\nworkloads:\n");
        for p in &self.pods {
            let mut addrs = vec![p.ip4.to_string()];
            if let Some(a) = p.ip6 {
                addrs.push(a.to_string());
            }
            let mut labels = BTreeMap::new();
            labels.insert("app", p.name.as_str());
            if p.ambient {
                labels.insert("istio.io/dataplane-mode", "ambient");
            }
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            out += &format!(
                "  - name: {}\n    namespace: default\n    node: {}\n    serviceAccount: {}\n    addresses: [{}]\n    labels: {{ {} }}\n    netns: {}\n    cgroup: {}\n",
                p.name,
                p.node,
                p.service_account,
                addrs.join(", "),
                labels.join(", "),
                p.netns_path.display(),
                p.cgroup.display()
            );
        }
        out += &self.services_yaml;
        out
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-{node}", self.id))
    }

    /// A node's `--handover-socket`: shared by its ztunnels, as the DaemonSet's host
    /// mount of `/var/run/ztunnel` is.
    pub fn handover_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("handover-{node}.sock"))
    }

    pub fn workloads_path(&self) -> PathBuf {
        self.dir.path().join("workloads.yaml")
    }

    /// Where a process of the topology logs: a directory of its own, not the workload
    /// file's. ztunnel watches the workload file's directory, and every write to a file
    /// there wakes its watcher (about 6% of both ztunnels' CPU in the bench's
    /// connection phase, from their own access logs), a cost no node has.
    pub fn log_file(&self, name: &str) -> anyhow::Result<(PathBuf, File)> {
        let dir = self.dir.path().join("logs");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        let f = File::create(&path)
            .map_err(|e| anyhow::anyhow!("failed to create {}: {e}", path.display()))?;
        Ok((path, f))
    }

    /// Writes the workload file atomically (write + rename), as an operator's tool would.
    pub fn write_workloads(&self) -> anyhow::Result<()> {
        self.write_workloads_text(&self.workloads_yaml())
    }

    pub fn write_workloads_text(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(".workloads.yaml.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.workloads_path())?;
        Ok(())
    }

    /// Sets a pod's enrolment label and rewrites the file.
    pub fn set_ambient(&mut self, name: &str, ambient: bool) -> anyhow::Result<()> {
        for p in &mut self.pods {
            if p.name == name {
                p.ambient = ambient;
            }
        }
        self.write_workloads()
    }

    /// Starts node1's ztunnel.
    pub fn start_ztunnel(&mut self, fast_path: bool) -> anyhow::Result<Ztunnel> {
        self.start_ztunnel_on("node1", fast_path)
    }

    /// Starts a node's ztunnel in its own cgroup, with its own pin dir and admin port; all
    /// nodes share the built-in CA's directory, so they trust each other.
    pub fn start_ztunnel_on(&mut self, node: &str, fast_path: bool) -> anyhow::Result<Ztunnel> {
        self.write_workloads()?;
        let file = self.workloads_path();
        self.start_ztunnel_with_file(node, fast_path, &file)
    }

    /// Starts a node's ztunnel reading its own workload file, for tests where the nodes
    /// must disagree (e.g. about an identity).
    pub fn start_ztunnel_with_file(
        &mut self,
        node: &str,
        fast_path: bool,
        file: &Path,
    ) -> anyhow::Result<Ztunnel> {
        let z = self.spawn_ztunnel(node, fast_path, file)?;
        let want: Vec<&Pod> = self
            .pods
            .iter()
            .filter(|p| p.ambient && p.node == node)
            .collect();
        z.wait_enrolled(&want)?;
        Ok(z)
    }

    /// Starts a node's ztunnel without waiting for anything.
    pub fn spawn_ztunnel(
        &mut self,
        node: &str,
        fast_path: bool,
        file: &Path,
    ) -> anyhow::Result<Ztunnel> {
        let mut source = Command::new("");
        source.arg("--workloads").arg(file);
        self.spawn_ztunnel_from(node, fast_path, &source)
    }

    /// Starts a node's ztunnel with these source arguments (`--workloads <file>`, or
    /// `--source istio …`) without waiting for anything.
    pub fn spawn_ztunnel_with(
        &mut self,
        node: &str,
        fast_path: bool,
        source_args: &[std::ffi::OsString],
    ) -> anyhow::Result<Ztunnel> {
        let mut source = Command::new("");
        source.args(source_args);
        self.spawn_ztunnel_from(node, fast_path, &source)
    }

    /// Starts a node's ztunnel with its workload source given by `source`'s arguments and
    /// environment (the program of `source` is ignored).
    pub fn spawn_ztunnel_from(
        &mut self,
        node: &str,
        fast_path: bool,
        source: &Command,
    ) -> anyhow::Result<Ztunnel> {
        let [admin, metrics, readiness] = match self.ports {
            Some(ports) => ports,
            None => free_local_ports()?,
        };
        let pin_dir = self.pin_dir(node);
        // Each ztunnel in a cgroup of its own, as each ztunnel pod has in Kubernetes: an
        // upgrade's two ztunnels of a node must not share one.
        let cgroup = self
            .cgroup_base
            .join(format!("ztunnel-{node}-{}", self.starts));
        let (log, logf) = self.log_file(&format!("ztunnel-{node}-{}.log", self.starts))?;
        self.starts += 1;
        let mut cmd = Command::new(ztunnel_bin());
        if let Some(mode) = &self.capture {
            cmd.env("ZTUNNEL_CAPTURE", mode);
        }
        for (k, v) in &self.ztunnel_env {
            cmd.env(k, v);
        }
        // The node's socket unless the test points this ztunnel elsewhere.
        let mut handover: Vec<std::ffi::OsString> = Vec::new();
        if !self
            .ztunnel_env
            .iter()
            .any(|(k, _)| k == "ZTUNNEL_HANDOVER_SOCKET")
        {
            handover.push("--handover-socket".into());
            handover.push(self.handover_socket(node).into());
        }
        for (k, v) in source.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        let child = cmd
            .arg("run")
            .args(source.get_args())
            .args(&handover)
            .args(["--node", node])
            .arg("--bpf-pin-dir")
            .arg(&pin_dir)
            .arg("--cgroup")
            .arg(&cgroup)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--readiness-addr")
            .arg(readiness.to_string())
            .arg(format!("--fast-path={fast_path}"))
            .arg("--ca-dir")
            .arg(self.dir.path().join("ca"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("failed to start ztunnel")?;
        pin_users(&pin_dir, 1);
        let z = Ztunnel {
            child: Some(child),
            admin,
            metrics,
            readiness,
            log,
            pin_dir,
            cgroup,
            keep_pins: false,
            print_log: true,
        };
        Ok(z)
    }
}

/// Removes what a [`Topology::named`] topology left running: every process in its
/// cgroups (ztunnels and pod apps), its namespaces, cgroups and pins.
pub fn teardown(id: &str) -> anyhow::Result<()> {
    remove_cgroup_tree(&cgroup2_root().join(format!("{id}-test")));
    let list = run(Command::new("ip").args(["netns", "list"]))?;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(&format!("{id}-")) {
            let _ = ip(&["netns", "del", name]);
        }
    }
    for entry in std::fs::read_dir("/sys/fs/bpf")?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{id}-"))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    // The files of a kept topology (its workload file, CA root, captures).
    for entry in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{id}-files-"))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// What of a topology is still on the machine (namespaces, cgroup, pins), for checks
/// that nothing was left behind.
pub fn leftovers(id: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let list = run(Command::new("ip").args(["netns", "list"]))?;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(&format!("{id}-")) {
            out.push(format!("netns {name}"));
        }
    }
    let cg = cgroup2_root().join(format!("{id}-test"));
    if cg.exists() {
        out.push(format!("cgroup {}", cg.display()));
    }
    for entry in std::fs::read_dir("/sys/fs/bpf")?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{id}-"))
        {
            out.push(format!("pins {}", entry.path().display()));
        }
    }
    Ok(out)
}

impl Drop for Topology {
    fn drop(&mut self) {
        for pid in &self.procs {
            // SAFETY: signalling processes we started; a stale pid only gets ESRCH.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for p in &self.pods {
            let _ = ip(&["netns", "del", &p.netns]);
        }
        for n in &self.nodes {
            let _ = ip(&["netns", "del", n]);
        }
        // Leaves first: pods, ztunnel, then the base.
        remove_cgroup_tree(&self.cgroup_base);
        // Pins a crashed ztunnel left behind.
        for n in 1..=self.nodes.len() {
            let _ = std::fs::remove_dir_all(self.pin_dir(&format!("node{n}")));
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: killing leftover test processes in our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A packet capture (tcpdump) on an interface of a test namespace.
pub struct Tcpdump {
    child: Option<Child>,
    file: PathBuf,
}

impl Tcpdump {
    /// Starts capturing TCP on `iface` inside netns `ns` and waits until tcpdump listens.
    pub fn start(ns: &str, iface: &str, file: PathBuf) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            // Debian's tcpdump drops to its own user, which cannot write into our 0700
            // temp dir; without immediate mode packets of a short capture stay buffered.
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "-Z",
                "root",
                "--immediate-mode",
            ])
            .args(["-i", iface, "-U", "-n", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start tcpdump")?;
        // tcpdump says "listening on …" once the capture is open.
        let mut err = child.stderr.take().context("tcpdump stderr")?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        use std::io::Read as _;
        while err.read(&mut b)? == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        if !line.contains("listening") {
            bail!("tcpdump did not start: {line}");
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Ok(Self {
            child: Some(child),
            file,
        })
    }

    /// Stops the capture and returns `tcpdump -nn -A` of what it saw: one header line per
    /// packet followed by its payload as ASCII.
    pub fn finish(mut self) -> anyhow::Result<String> {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` passes the signal on; tcpdump flushes and exits on SIGINT.
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            c.wait()?;
        }
        let out = run(Command::new("tcpdump")
            .args(["-nn", "-A", "-r"])
            .arg(&self.file))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Asserts that `wire` (from [`Tcpdump::finish`]) holds packets, that every one is to or
/// from `ip`'s HBONE port 15008, and that `marker` never shows in clear.
pub fn assert_only_hbone(wire: &str, ip: Ipv4Addr, marker: &str) {
    let headers: Vec<&str> = wire.lines().filter(|l| l.contains(" IP ")).collect();
    assert!(!headers.is_empty(), "nothing captured");
    let hbone = format!("{ip}.15008");
    for h in &headers {
        assert!(h.contains(&hbone), "packet not on the HBONE port: {h}");
    }
    assert!(!wire.contains(marker), "plaintext on the wire");
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `bpftool` output for a cgroup: the programs attached there (empty when none).
pub fn cgroup_programs(cgroup: &Path) -> anyhow::Result<String> {
    let out = run(Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// tc/TCX programs on the pod's interfaces, as `bpftool net show` reports them.
pub fn pod_net_programs(pod: &Pod) -> anyhow::Result<String> {
    let out =
        run(Command::new("ip").args(["netns", "exec", &pod.netns, "bpftool", "net", "show"]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the first sample of `metric` in the Prometheus text `text` whose labels
/// include all of `labels` (`metric value` without labels matches an empty `labels`).
pub fn metric_sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A ztunnel's original-destination map filled to its limit through its pin (as a flood
/// of connections would fill it), with keys no socket cookie reaches (cookies count up
/// from 1 per boot); [`FilledOrigDstMap::empty`] takes them out again.
pub struct FilledOrigDstMap {
    map: aya::maps::HashMap<aya::maps::MapData, u64, ztunnel_common::orig_dst::OrigDst>,
    filled: u64,
}

impl FilledOrigDstMap {
    const FILLER: u64 = 1 << 62;

    pub fn fill(z: &Ztunnel) -> anyhow::Result<Self> {
        use aya::maps::{HashMap, Map, MapData};
        use ztunnel_common::orig_dst::{self, OrigDst};
        let pin = z.pin_dir.join("maps").join(orig_dst::BY_COOKIE);
        let mut map: HashMap<MapData, u64, OrigDst> =
            HashMap::try_from(Map::HashMap(MapData::from_pin(&pin)?))?;
        let mut filled = 0u64;
        while map
            .insert(Self::FILLER + filled, OrigDst::default(), 0)
            .is_ok()
        {
            filled += 1;
            ensure!(
                filled <= u64::from(orig_dst::MAX_ENTRIES),
                "{} does not fill",
                pin.display()
            );
        }
        ensure!(
            filled == u64::from(orig_dst::MAX_ENTRIES),
            "{} filled at {filled}, not at its limit {}",
            pin.display(),
            orig_dst::MAX_ENTRIES
        );
        Ok(FilledOrigDstMap { map, filled })
    }

    /// Removes every entry [`FilledOrigDstMap::fill`] put in.
    pub fn empty(mut self) -> anyhow::Result<()> {
        for k in 0..self.filled {
            self.map.remove(&(Self::FILLER + k))?;
        }
        Ok(())
    }
}

/// A log as `read` gives it, once `cond` holds for it, or as it is after 30 s (never a
/// speed test): ztunnel and the waypoint write their logs from a thread of their own, so
/// a line can land after the client has seen what it describes. The caller asserts.
pub fn log_when(read: impl Fn() -> String, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = read();
        if cond(&log) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
