//! The performance harness behind `cargo xtask bench`: the same two-node topology run
//! as S0 (no mesh), I (Istio's ztunnel, when a binary is given: see [`crate::istio`]),
//! S1 (our ztunnel, iptables capture), S2 (eBPF capture) and S3 (S2 plus the sk_msg fast
//! path), S4 (S2 with a waypoint, `ztunnel waypoint`, on the destination service: HTTP
//! only), a fresh topology per scenario, alternating scenarios round by round so that
//! machine drift spreads over all of them. Each figure is the median over the rounds, with
//! its ratio to S0; ours (S1–S3) also with their ratio to I, and the targets are stated
//! against I when it ran. Then the upgrade under load:
//! node1's ztunnel (S2) handed over to a successor while new connections flow through it
//! at a fixed rate, counting the failed ones and timing the handover.
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{Pod, Topology, istio::IstioZtunnel, teardown, upgrade};

/// The echo port the latency and connection tests use, and iperf3's.
const ECHO_PORT: u16 = 7000;
const IPERF_PORT: u16 = 5201;
/// Topology names: `ztbenchx<round><scenario>`, fixed so an interrupted run can be removed.
const ID_PREFIX: &str = "ztbenchx";
/// The upgrade rounds' topologies: `ztbenchu<round>`.
const UPGRADE_ID_PREFIX: &str = "ztbenchu";
const MAX_ROUNDS: usize = 7;
/// Connections the connection-rate client (`podapp conns`) keeps in flight: enough that
/// without a mesh the client and the echo server, not the wait for each answer, set the rate.
const CONN_CONCURRENCY: usize = 32;
/// The HTTP server's port (`podapp http-serve`), behind the service port 80.
const HTTP_PORT: u16 = 8081;
/// New connections per second through the upgraded ztunnel: half from its node's pod to
/// the other node's, half the other way, so both the outbound and the inbound (HBONE)
/// listeners are handed over under load.
pub const UPGRADE_RATE: u32 = 200;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
pub enum Scenario {
    S0,
    /// Istio's ztunnel (upstream, release build), one instance per pod in its dedicated
    /// mode with its in-pod iptables redirect; run only when a binary is given.
    I,
    S1,
    S2,
    S3,
    /// S2 with a waypoint (`ztunnel waypoint`) on the destination service: HTTP only.
    S4,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::S0,
        Scenario::I,
        Scenario::S1,
        Scenario::S2,
        Scenario::S3,
        Scenario::S4,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Scenario::S0 => "no mesh (pod to pod directly)",
            Scenario::I => "Istio's ztunnel, dedicated mode, in-pod iptables",
            Scenario::S1 => "ztunnel, iptables capture",
            Scenario::S2 => "ztunnel, eBPF capture",
            Scenario::S3 => "ztunnel, eBPF capture + sk_msg fast path",
            Scenario::S4 => {
                "ztunnel, eBPF capture, and a waypoint (ztunnel waypoint) on the service"
            }
        }
    }

    /// Our ztunnel runs (and the pods are enrolled in it).
    pub fn ours(self) -> bool {
        matches!(
            self,
            Scenario::S1 | Scenario::S2 | Scenario::S3 | Scenario::S4
        )
    }

    /// The HTTP figures (`http_*`) are measured: no mesh, S2 and S2 with a waypoint.
    fn http(self) -> bool {
        matches!(self, Scenario::S0 | Scenario::S2 | Scenario::S4)
    }

    /// Some proxy carries the traffic (ours or Istio's).
    pub fn proxied(self) -> bool {
        self != Scenario::S0
    }

    fn capture(self) -> Option<&'static str> {
        match self {
            Scenario::S0 | Scenario::I => None,
            Scenario::S1 => Some("iptables"),
            Scenario::S2 | Scenario::S3 | Scenario::S4 => Some("ebpf"),
        }
    }

    fn fast_path(self) -> bool {
        self == Scenario::S3
    }

    /// Figures this scenario cannot measure, and why.
    pub fn not_measured(self) -> &'static [(&'static str, &'static str)] {
        const BULK: &str = "not measured: a bulk sender on the fast path gets ENOMEM from \
            write() when ztunnel's socket has data queued (an sk_msg ingress redirect has no \
            backpressure; seen on 6.18), so the fast path suits request/response traffic only";
        const NO_EBPF: &str = "not measured: iptables capture runs no eBPF programs; its \
            kernel cost (netfilter NAT and conntrack) is in \"capture's kernel time per \
            connection, perf\"";
        const NOT_OURS: &str = "not measured: the kernel's statistics are read through our \
            admin port (`/bpf_stats`)";
        const ISTIO_DNS_OFF: &str = "not measured: Istio's DNS proxy is opt-in \
            (ISTIO_META_DNS_CAPTURE) and off in this setup";
        const NO_HTTP: &str = "not measured: the HTTP figures compare the waypoint (S4) \
            with S2 and no mesh";
        const HTTP_ONLY: &str = "not measured: S4 measures HTTP through the waypoint; \
            its L4 figures are S2's";
        const NO_WAYPOINT: &str = "not measured: no waypoint in this scenario";
        const fn pairs<const N: usize>(
            keys: [&'static str; N],
            why: &'static str,
        ) -> [(&'static str, &'static str); N] {
            let mut out = [("", ""); N];
            let mut i = 0;
            while i < N {
                out[i] = (keys[i], why);
                i += 1;
            }
            out
        }
        const NO_HTTP_PAIRS: [(&str, &str); 6] = pairs(
            [
                "http_fixed_p50_us",
                "http_fixed_p99_us",
                "http_max_per_sec",
                "http_max_p50_us",
                "http_max_p99_us",
                "waypoint_cpu_ms_per_1k_req",
            ],
            NO_HTTP,
        );
        match self {
            Scenario::S3 => &[
                ("tput_1_gbps", BULK),
                ("tput_8_gbps", BULK),
                ("cpu_s_per_gb", BULK),
                ("ebpf_tc_ns_per_packet", BULK),
                NO_HTTP_PAIRS[0],
                NO_HTTP_PAIRS[1],
                NO_HTTP_PAIRS[2],
                NO_HTTP_PAIRS[3],
                NO_HTTP_PAIRS[4],
                NO_HTTP_PAIRS[5],
            ],
            Scenario::S1 => &[
                ("ebpf_ns_per_conn", NO_EBPF),
                ("ebpf_tc_ns_per_packet", NO_EBPF),
                NO_HTTP_PAIRS[0],
                NO_HTTP_PAIRS[1],
                NO_HTTP_PAIRS[2],
                NO_HTTP_PAIRS[3],
                NO_HTTP_PAIRS[4],
                NO_HTTP_PAIRS[5],
            ],
            Scenario::I => &[
                ("ebpf_ns_per_conn", NOT_OURS),
                ("ebpf_tc_ns_per_packet", NOT_OURS),
                ("dns_local_per_sec", ISTIO_DNS_OFF),
                ("dns_local_p50_us", ISTIO_DNS_OFF),
                ("dns_fwd_per_sec", ISTIO_DNS_OFF),
                ("dns_fwd_p50_us", ISTIO_DNS_OFF),
                NO_HTTP_PAIRS[0],
                NO_HTTP_PAIRS[1],
                NO_HTTP_PAIRS[2],
                NO_HTTP_PAIRS[3],
                NO_HTTP_PAIRS[4],
                NO_HTTP_PAIRS[5],
            ],
            Scenario::S2 => &[("waypoint_cpu_ms_per_1k_req", NO_WAYPOINT)],
            Scenario::S0 => &[],
            Scenario::S4 => &[
                ("tput_1_gbps", HTTP_ONLY),
                ("tput_8_gbps", HTTP_ONLY),
                ("rr_fixed_p50_us", HTTP_ONLY),
                ("rr_fixed_p90_us", HTTP_ONLY),
                ("rr_fixed_p99_us", HTTP_ONLY),
                ("rr_max_p50_us", HTTP_ONLY),
                ("rr_max_p90_us", HTTP_ONLY),
                ("rr_max_p99_us", HTTP_ONLY),
                ("rr_max_per_sec", HTTP_ONLY),
                ("rr_cs_per_req", HTTP_ONLY),
                ("rr_syscalls_per_req", HTTP_ONLY),
                ("rr_cpu_us_per_req", HTTP_ONLY),
                ("conn_per_sec", HTTP_ONLY),
                ("conn_cs_per_conn", HTTP_ONLY),
                ("conn_syscalls_per_conn", HTTP_ONLY),
                ("conn_cpu_us_per_conn", HTTP_ONLY),
                ("cpu_s_per_gb", HTTP_ONLY),
                ("cpu_s_per_1k_conn", HTTP_ONLY),
                ("rss_idle_mib", HTTP_ONLY),
                ("rss_idle_conns_mib", HTTP_ONLY),
                ("kib_per_idle_conn", HTTP_ONLY),
                ("kib_per_more_idle_conn", HTTP_ONLY),
                ("kib_per_idle_plain_conn", HTTP_ONLY),
                ("rss_peak_mib", HTTP_ONLY),
                ("dns_local_per_sec", HTTP_ONLY),
                ("dns_local_p50_us", HTTP_ONLY),
                ("dns_fwd_per_sec", HTTP_ONLY),
                ("dns_fwd_p50_us", HTTP_ONLY),
                ("capture_kernel_ns_per_conn", HTTP_ONLY),
                ("ebpf_ns_per_conn", HTTP_ONLY),
                ("ebpf_tc_ns_per_packet", HTTP_ONLY),
            ],
        }
    }
}

/// What one figure measures: its key, its unit, and whether more is better.
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Measured on the proxy process itself (none in S0).
    pub ztunnel_only: bool,
}

const fn fig(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    ztunnel_only: bool,
) -> Figure {
    Figure {
        key,
        label,
        unit,
        higher_is_better,
        ztunnel_only,
    }
}

/// Every figure a run reports, in table order.
pub const FIGURES: &[Figure] = &[
    fig("tput_1_gbps", "throughput, 1 stream", "Gbit/s", true, false),
    fig(
        "tput_8_gbps",
        "throughput, 8 streams",
        "Gbit/s",
        true,
        false,
    ),
    fig(
        "rr_fixed_p50_us",
        "1 KiB RR at fixed rate, p50",
        "µs",
        false,
        false,
    ),
    fig(
        "rr_fixed_p90_us",
        "1 KiB RR at fixed rate, p90",
        "µs",
        false,
        false,
    ),
    fig(
        "rr_fixed_p99_us",
        "1 KiB RR at fixed rate, p99",
        "µs",
        false,
        false,
    ),
    fig(
        "rr_max_p50_us",
        "1 KiB RR at max rate, p50",
        "µs",
        false,
        false,
    ),
    fig(
        "rr_max_p90_us",
        "1 KiB RR at max rate, p90",
        "µs",
        false,
        false,
    ),
    fig(
        "rr_max_p99_us",
        "1 KiB RR at max rate, p99",
        "µs",
        false,
        false,
    ),
    fig(
        "rr_max_per_sec",
        "1 KiB RR at max rate",
        "req/s",
        true,
        false,
    ),
    fig(
        "rr_cs_per_req",
        "proxies' context switches per request at 1,000 req/s (perf stat, a run of its own)",
        "switches",
        false,
        true,
    ),
    fig(
        "rr_syscalls_per_req",
        "proxies' syscalls per request at 1,000 req/s",
        "syscalls",
        false,
        true,
    ),
    fig(
        "rr_cpu_us_per_req",
        "proxies' CPU per request at 1,000 req/s",
        "µs",
        false,
        true,
    ),
    fig("conn_per_sec", "new connections", "conn/s", true, false),
    fig(
        "conn_cs_per_conn",
        "proxies' context switches per new connection (perf stat, a run of its own)",
        "switches",
        false,
        true,
    ),
    fig(
        "conn_syscalls_per_conn",
        "proxies' syscalls per new connection",
        "syscalls",
        false,
        true,
    ),
    fig(
        "conn_cpu_us_per_conn",
        "proxies' CPU per new connection (under perf stat)",
        "µs",
        false,
        true,
    ),
    fig(
        "cpu_s_per_gb",
        "ztunnel CPU per GB moved",
        "CPU s/GB",
        false,
        true,
    ),
    fig(
        "cpu_s_per_1k_conn",
        "ztunnel CPU per 1,000 connections",
        "CPU s",
        false,
        true,
    ),
    fig("rss_idle_mib", "ztunnel RSS, idle", "MiB", false, true),
    fig(
        "rss_idle_conns_mib",
        "ztunnel RSS, idle tunnelled connections",
        "MiB",
        false,
        true,
    ),
    fig(
        "kib_per_idle_conn",
        "ztunnel memory per idle connection",
        "KiB",
        false,
        true,
    ),
    fig(
        "kib_per_more_idle_conn",
        "ztunnel memory per idle connection, as many again on top (what one more costs)",
        "KiB",
        false,
        true,
    ),
    fig(
        "kib_per_idle_plain_conn",
        "ztunnel memory per idle connection outside the mesh (plain TCP)",
        "KiB",
        false,
        true,
    ),
    fig("rss_peak_mib", "ztunnel RSS, peak", "MiB", false, true),
    fig(
        "dns_local_per_sec",
        "DNS queries answered by the proxy (service name)",
        "queries/s",
        true,
        true,
    ),
    fig(
        "dns_local_p50_us",
        "DNS query answered by the proxy, p50",
        "µs",
        false,
        true,
    ),
    fig(
        "dns_fwd_per_sec",
        "DNS queries forwarded upstream (S0: asked directly)",
        "queries/s",
        true,
        false,
    ),
    fig(
        "dns_fwd_p50_us",
        "DNS query forwarded upstream, p50",
        "µs",
        false,
        false,
    ),
    fig(
        "http_fixed_p50_us",
        "HTTP GET at 1,000 req/s (one connection), p50",
        "µs",
        false,
        false,
    ),
    fig(
        "http_fixed_p99_us",
        "HTTP GET at 1,000 req/s (one connection), p99",
        "µs",
        false,
        false,
    ),
    fig(
        "http_max_per_sec",
        "HTTP GET at max rate (wrk, 16 connections)",
        "req/s",
        true,
        false,
    ),
    fig(
        "http_max_p50_us",
        "HTTP GET at max rate (wrk), p50",
        "µs",
        false,
        false,
    ),
    fig(
        "http_max_p99_us",
        "HTTP GET at max rate (wrk), p99",
        "µs",
        false,
        false,
    ),
    fig(
        "waypoint_cpu_ms_per_1k_req",
        "waypoint CPU per 1,000 HTTP requests (max rate)",
        "CPU ms",
        false,
        true,
    ),
    fig(
        "capture_kernel_ns_per_conn",
        "capture's kernel time per connection, perf: netfilter hooks or BPF programs (both nodes)",
        "ns",
        false,
        true,
    ),
    fig(
        "ebpf_ns_per_conn",
        "capture programs' kernel time per connection (both nodes)",
        "ns",
        false,
        true,
    ),
    fig(
        "ebpf_tc_ns_per_packet",
        "tc ingress program per packet, bulk transfer",
        "ns",
        false,
        true,
    ),
];

pub struct Options {
    pub quick: bool,
    /// Run only these scenarios (all when empty), e.g. to profile one.
    pub only: Vec<Scenario>,
    /// Sample the ztunnels with perf during the single-stream transfer and the
    /// connection-rate test, and write a flame graph of each (`flame-<scenario>-<phase>.svg`).
    /// The sampled figures are then perturbed by the profiler.
    pub profile: bool,
    /// Where the report files go (created if missing).
    pub out_dir: PathBuf,
    /// Istio's ztunnel binary (built with its `testing` feature): adds scenario I.
    pub istio_ztunnel: Option<PathBuf>,
    /// Measure only the upgrade under load (no S0–S3).
    pub upgrade_only: bool,
    /// Measure only request/response latency and the proxies' costs per request.
    pub latency_only: bool,
    /// Measure only memory: idle RSS and what idle connections add, in full rounds.
    pub memory_only: bool,
    /// Run as `PROGRAM idle PID…` once the proxies' idle memory is read, and as `PROGRAM
    /// conns PID…` once the first idle connections' is, waiting for it each time: the
    /// proxies' pids, for a tool that looks at what ran in between (`cargo xtask pgo`'s
    /// link order).
    pub memory_hook: Option<PathBuf>,
}

impl Options {
    /// The scenarios this run measures, in table order: every one (I only with a binary),
    /// or those of `only`.
    pub fn scenarios(&self) -> anyhow::Result<Vec<Scenario>> {
        if self.only.contains(&Scenario::I) && self.istio_ztunnel.is_none() {
            bail!("scenario I needs Istio's ztunnel: pass --istio-ztunnel PATH");
        }
        Ok(Scenario::ALL
            .into_iter()
            .filter(|s| self.only.is_empty() || self.only.contains(s))
            .filter(|s| *s != Scenario::I || self.istio_ztunnel.is_some())
            .collect())
    }

    fn rounds(&self) -> usize {
        if self.quick { 1 } else { 3 }
    }

    /// Seconds each timed measurement runs.
    fn secs(&self) -> f64 {
        if self.quick { 1.0 } else { 5.0 }
    }

    /// How long the idle connections stay idle before their memory is read.
    fn idle_settle(&self) -> Duration {
        if self.quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(11)
        }
    }

    fn idle_conns(&self) -> usize {
        if self.quick { 100 } else { 1000 }
    }

    fn run_scenarios(&self) -> bool {
        !self.upgrade_only
    }

    /// Every figure, or the upgrade alone; not with a scenario subset (profiling).
    fn run_upgrade(&self) -> bool {
        self.upgrade_only || (self.only.is_empty() && !self.latency_only && !self.memory_only)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Value {
    pub value: f64,
    /// value / S0's value for the same figure, from the same run.
    pub ratio_to_s0: Option<f64>,
    /// For ours (S1–S3): value / I's value for the same figure, from the same run.
    #[serde(default)]
    pub ratio_to_i: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub description: String,
    pub figures: BTreeMap<String, Value>,
    /// Figures deliberately not measured in this scenario, with the reason.
    pub not_measured: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub mode: String,
    pub rounds: usize,
    pub seconds_per_measurement: f64,
    pub idle_connections: usize,
    pub date: String,
    pub commit: String,
    pub machine: Machine,
    /// What `<Istio's ztunnel> version` printed, when scenario I ran.
    #[serde(default)]
    pub istio_ztunnel: Option<String>,
    pub scenarios: Vec<ScenarioResult>,
    /// The upgrade under load (absent when not measured, and in older reports).
    #[serde(default)]
    pub upgrade: Option<UpgradeResult>,
    pub targets: Vec<Target>,
}

/// The upgrade under load: node1's ztunnel, with eBPF capture (S2), handed over to a
/// successor while [`UPGRADE_RATE`] new connections a second flow through it, each a
/// 64-byte request echoed back, for a few seconds before and after. One handover per
/// round; the counts are totals over the rounds, the times medians (and maxima).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeResult {
    pub scenario: Scenario,
    pub rate_per_sec: u32,
    pub rounds: usize,
    /// Connections opened during the rounds, and those that failed (refused, reset,
    /// timed out or a wrong echo).
    pub attempted: u64,
    pub failed: u64,
    /// The successor's start to the predecessor no longer accepting (the handover
    /// proper, measured by the successor).
    pub handover_ms: f64,
    pub handover_ms_max: f64,
    /// The successor's start to its readiness answering 200.
    pub ready_ms: f64,
    /// The successor's start to the predecessor's exit: it is stopped (SIGTERM) once the
    /// successor is ready, as the kubelet stops the old pod, and drains first.
    pub predecessor_exit_ms: f64,
    pub predecessor_exit_ms_max: f64,
    /// The first failures, if any: round, seconds into the round's load, error.
    pub failures: Vec<String>,
}

/// One round of the upgrade under load.
struct UpgradeSample {
    attempted: u64,
    failed: u64,
    handover_ms: f64,
    ready_ms: f64,
    exit_ms: f64,
    failures: Vec<String>,
}

impl Report {
    pub fn get(&self, s: Scenario, key: &str) -> Option<f64> {
        self.scenarios
            .iter()
            .find(|r| r.scenario == s)
            .and_then(|r| r.figures.get(key))
            .map(|v| v.value)
    }
}

/// Runs every scenario and writes `bench.md`, `bench.json` and `bench.svg` to `out_dir`.
/// One bench at a time on a machine: runs share fixed topology names, and each removes
/// what another left at its start — a running bench's topology included. Held for the
/// whole run; the kernel releases it if the bench dies.
const LOCK_PATH: &str = "/run/ztunnel-bench.lock";
/// How long a bench waits for another to finish before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);

/// Takes the machine's bench lock (`flock` on `path`, our pid written in it), waiting at
/// most `wait` for the bench holding it, which is named once.
fn lock_machine(path: &Path, wait: Duration) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::{errno::Errno, fcntl::Flock, fcntl::FlockArg};
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("failed to open the bench lock {}", path.display()))
    };
    let deadline = Instant::now() + wait;
    let mut said = false;
    let mut file = open()?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                use std::io::Seek as _;
                lock.set_len(0)?;
                lock.rewind()?;
                write!(lock, "{}", std::process::id())?;
                return Ok(lock);
            }
            Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) => {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                let holder = holder.trim();
                if Instant::now() >= deadline {
                    bail!(
                        "another bench (pid {holder}) still holds {} after {wait:?}: two benches \
                         at once would tear down each other's topologies",
                        path.display()
                    );
                }
                if !said {
                    eprintln!(
                        "bench: another bench (pid {holder}) is running; waiting for it (at most {wait:?})"
                    );
                    said = true;
                }
                file = f;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err((_, errno)) => {
                bail!("failed to lock {}: {errno}", path.display())
            }
        }
    }
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    crate::require_root();
    let scenarios = opts.scenarios()?;
    let _machine = lock_machine(Path::new(LOCK_PATH), LOCK_WAIT)?;
    if let Some(bin) = &opts.istio_ztunnel {
        anyhow::ensure!(
            bin.is_file(),
            "Istio's ztunnel {} is not a file (docs/bench/README.md says how to build it)",
            bin.display()
        );
    }
    remove_leftovers()?;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("failed to create {}", opts.out_dir.display()))?;
    let started = Instant::now();
    let mut samples: BTreeMap<Scenario, Vec<BTreeMap<&'static str, f64>>> = BTreeMap::new();
    let scenario_rounds = if opts.run_scenarios() {
        opts.rounds()
    } else {
        0
    };
    for round in 0..scenario_rounds {
        // Alternate the order each round so that no scenario always runs first.
        let mut order = scenarios.clone();
        let n = order.len().max(1);
        order.rotate_left(round % n);
        for s in order {
            eprintln!(
                "bench: round {}/{} {s:?} ({})",
                round + 1,
                opts.rounds(),
                s.describe()
            );
            let id = format!("{ID_PREFIX}{round}{}", s as u8);
            let subnet = subnet(round, s);
            for bin in std::iter::once(crate::ztunnel_bin()).chain(opts.istio_ztunnel.clone()) {
                evict_from_page_cache(&bin)?;
            }
            let figures = run_scenario(opts, s, &id, subnet).with_context(|| {
                format!("scenario {s:?} ({}) round {}", s.describe(), round + 1)
            })?;
            samples.entry(s).or_default().push(figures);
        }
    }
    let mut upgrades = Vec::new();
    if opts.run_upgrade() {
        for round in 0..opts.rounds() {
            eprintln!(
                "bench: upgrade under load, round {}/{} ({UPGRADE_RATE} new connections/s)",
                round + 1,
                opts.rounds()
            );
            let sample = run_upgrade(opts, round)
                .with_context(|| format!("upgrade under load, round {}", round + 1))?;
            eprintln!(
                "bench: {} of {} connections failed; handover {:.0} ms, predecessor exited after {:.0} ms",
                sample.failed, sample.attempted, sample.handover_ms, sample.exit_ms
            );
            upgrades.push(sample);
        }
    }
    let report = build_report(opts, &samples, &upgrades)?;
    write_outputs(&report, &opts.out_dir)?;
    eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(report)
}

/// Drops a proxy binary's pages from the page cache, so that every scenario's proxies
/// read their code from disk as a node's do, and not from whatever folios the linker's
/// writes or the last run left: how many of the binary's pages an idle proxy has resident
/// (its idle RSS) depends on how large those folios are (ARCHITECTURE.md, Performance,
/// "Idle memory, by code layout"). Only pages no process maps can go; what stays cached
/// is printed.
fn evict_from_page_cache(bin: &Path) -> anyhow::Result<()> {
    let f =
        std::fs::File::open(bin).with_context(|| format!("failed to open {}", bin.display()))?;
    // Dirty pages are not dropped: write them first.
    f.sync_all()
        .with_context(|| format!("failed to sync {}", bin.display()))?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .with_context(|| format!("failed to drop {} from the page cache", bin.display()))?;
    let cached = cached_bytes(&f)?;
    if cached > 0 {
        eprintln!(
            "bench: {} KiB of {} still in the page cache (mapped by a running process)",
            cached / 1024,
            bin.display()
        );
    }
    Ok(())
}

/// Bytes of a file in the page cache (`mincore` over a mapping of it).
fn cached_bytes(f: &std::fs::File) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let len = usize::try_from(f.metadata()?.len())?;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a private read-only mapping of a file we hold open, unmapped below; only
    // its residency is read, never its bytes.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()).context("mmap for mincore");
    }
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })?;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping, which is live until munmap.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping made above, of `len` bytes.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(err).context("mincore");
    }
    Ok(vec.iter().filter(|b| *b & 1 == 1).count() as u64 * page as u64)
}

/// The address block `10.<subnet>.0.0/16` of a round's scenario: distinct for every round
/// and scenario, so that a topology being torn down never shares addresses with the next.
fn subnet(round: usize, s: Scenario) -> u8 {
    u8::try_from(210 + round * Scenario::ALL.len() + s as usize)
        .expect("MAX_ROUNDS rounds of every scenario fit in 210..=255")
}

/// Removes what an interrupted run left (fixed names, like the demo's).
pub fn remove_leftovers() -> anyhow::Result<()> {
    for round in 0..MAX_ROUNDS {
        for s in Scenario::ALL {
            teardown(&format!("{ID_PREFIX}{round}{}", s as u8))?;
        }
        teardown(&format!("{UPGRADE_ID_PREFIX}{round}"))?;
    }
    Ok(())
}

/// One handover of node1's ztunnel (S2) while pod a (node1) and pod b (node2) open
/// [`UPGRADE_RATE`]/2 connections a second each to the other's echo server: a few
/// seconds of load, the successor started, the predecessor stopped once the successor
/// is ready (as in a DaemonSet rollout), a few seconds more.
fn run_upgrade(opts: &Options, round: usize) -> anyhow::Result<UpgradeSample> {
    let id = format!("{UPGRADE_ID_PREFIX}{round}");
    let mut topo = Topology::named(&id, 246 + round as u8)?;
    topo.capture = Scenario::S2.capture().map(str::to_owned);
    topo.add_node()?;
    let a = topo.add_pod_on(1, "a", true, false)?;
    let b = topo.add_pod_on(2, "b", true, false)?;
    for p in [&a, &b] {
        tune_pod(p)?;
    }
    let _echo = [
        topo.serve(&a, a.addr(ECHO_PORT))?,
        topo.serve(&b, b.addr(ECHO_PORT))?,
    ];
    let mut old = topo.start_ztunnel_on("node1", false)?;
    let mut z2 = topo.start_ztunnel_on("node2", false)?;
    old.print_log = false;
    z2.print_log = false;
    old.wait_for("readiness", |_| old.ready().is_ok())?;
    let load = Duration::from_secs_f64(opts.secs().max(2.0));
    let stop = topo.dir.path().join("stop");
    let half = UPGRADE_RATE / 2;
    let ab = upgrade::rate(&mut topo, &a, b.addr(ECHO_PORT), half, &stop)?;
    let ba = upgrade::rate(&mut topo, &b, a.addr(ECHO_PORT), half, &stop)?;
    std::thread::sleep(load);
    let up = upgrade::upgrade(&mut topo, "node1", &old)?;
    let mut new = up.new;
    new.print_log = false;
    // Polled finely: the exit is a figure (it exits once its last connection ended).
    let deadline = Instant::now() + Duration::from_secs(120);
    while old.alive() {
        if Instant::now() > deadline {
            bail!(
                "the old ztunnel did not exit within 120 s of its SIGTERM\n{}",
                old.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let exit_ms = up.started.elapsed().as_secs_f64() * 1000.0;
    upgrade::wait_exit(&mut old, "the old ztunnel")?;
    std::thread::sleep(load);
    std::fs::write(&stop, b"")?;
    let mut sample = UpgradeSample {
        attempted: 0,
        failed: 0,
        handover_ms: up.handover_ms as f64,
        ready_ms: up.ready_ms as f64,
        exit_ms,
        failures: Vec::new(),
    };
    for (what, p) in [("a → b", ab), ("b → a", ba)] {
        let c = upgrade::counts(p)?;
        sample.attempted += c.attempted;
        sample.failed += c.failed;
        for f in c.json["failures"].as_array().into_iter().flatten().take(5) {
            sample.failures.push(format!(
                "round {}, {what}, {:.3} s: {}",
                round + 1,
                f["at_s"].as_f64().unwrap_or_default(),
                f["error"].as_str().unwrap_or_default()
            ));
        }
    }
    let carried = new.dump()?.connections.opened_total;
    if carried == 0 {
        bail!("the successor carried no connection after the handover");
    }
    drop((new, old, z2));
    Ok(sample)
}

fn run_scenario(
    opts: &Options,
    s: Scenario,
    id: &str,
    subnet: u8,
) -> anyhow::Result<BTreeMap<&'static str, f64>> {
    let mut topo = Topology::named(id, subnet)?;
    topo.capture = s.capture().map(str::to_owned);
    topo.add_node()?;
    let client = topo.add_pod_on(1, "client", s.ours(), false)?;
    let server = topo.add_pod_on(2, "server", s.ours(), false)?;
    for p in [&client, &server] {
        tune_pod(p)?;
    }
    // The cluster's DNS server, outside the mesh: a fake one that knows one external
    // name; ztunnel forwards to it, and answers the service `web` itself.
    let dns = topo.add_pod_on(1, "dns", false, false)?;
    let mut upstream = topo.spawn(&dns, &["dns-upstream", &format!("{}:53", dns.ip4)])?;
    let line = upstream.read_line()?;
    if !line.starts_with("ready") {
        bail!("the DNS upstream did not start: {line:?}");
    }
    let resolv = topo.dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\n", dns.ip4))
        .with_context(|| format!("failed to write {}", resolv.display()))?;
    topo.ztunnel_env.push((
        "ZTUNNEL_DNS_RESOLV_CONF".to_owned(),
        resolv.display().to_string(),
    ));
    let web_vip = format!("10.{subnet}.250.10");
    // S4: the waypoint's pod (not enrolled, as Istio's waypoints are not) and service, and
    // `web` naming it.
    let waypoint_pod = if s == Scenario::S4 {
        Some(topo.add_pod_on(2, "waypoint", false, false)?)
    } else {
        None
    };
    topo.services_yaml = format!(
        "services:\n  - name: web\n    namespace: default\n    addresses: [{web_vip}]\n    ports: [{{port: {ECHO_PORT}}}, {{port: 80, targetPort: {HTTP_PORT}, name: http}}]\n    selector: {{ app: server }}\n"
    );
    if waypoint_pod.is_some() {
        topo.services_yaml += &format!(
            "    waypoint: {{ hostname: waypoint.default.svc.cluster.local }}\n  - name: waypoint\n    namespace: default\n    addresses: [10.{subnet}.250.15]\n    ports: [{{port: 15008}}]\n    selector: {{ app: waypoint }}\n"
        );
    }
    let mut ztunnels = Vec::new();
    let mut istio = Vec::new();
    if s.ours() {
        let mut z1 = topo.start_ztunnel_on("node1", s.fast_path())?;
        let mut z2 = topo.start_ztunnel_on("node2", s.fast_path())?;
        z1.print_log = false;
        z2.print_log = false;
        ztunnels = vec![z1, z2];
    }
    if s == Scenario::I {
        let bin = opts
            .istio_ztunnel
            .as_deref()
            .context("scenario I without Istio's ztunnel")?;
        let file = topo.dir.path().join("istio-workloads.yaml");
        // The cluster DNS pod is outside the mesh: not a workload of Istio's (it would
        // be dialled over HBONE), so Istio's ztunnel passes traffic to it through.
        let meshed: Vec<Pod> = topo
            .pods
            .iter()
            .filter(|p| p.name != dns.name)
            .cloned()
            .collect();
        std::fs::write(&file, crate::istio::local_xds_yaml(&meshed)?)
            .with_context(|| format!("failed to write {}", file.display()))?;
        for p in [&client, &server] {
            istio.push(IstioZtunnel::start(&mut topo, p, bin, &file)?);
        }
    }
    // S4 measures HTTP through the waypoint, and nothing else.
    if let Some(wp) = &waypoint_pod {
        let waypoint = crate::waypoint::Waypoint::start(&mut topo, wp, "waypoint")?;
        let _http = start_http_server(&mut topo, &server)?;
        let mut f = BTreeMap::new();
        let dst: std::net::SocketAddr = format!("{web_vip}:80").parse()?;
        http_figures(
            &mut topo,
            &client,
            dst,
            opts.secs(),
            Some(waypoint.pid()),
            &mut f,
        )?;
        drop(waypoint);
        drop((ztunnels, istio));
        return Ok(f);
    }
    // The proxies whose CPU and memory are measured: one per node (or per pod, for I).
    let proxies: Vec<u32> = ztunnels
        .iter()
        .map(|z| z.pid())
        .chain(istio.iter().map(IstioZtunnel::pid))
        .collect();
    if !proxies.is_empty() {
        eprintln!("bench: proxy pids {proxies:?}");
    }
    let mut f = BTreeMap::new();
    // Let start-up settle before the idle reading.
    std::thread::sleep(Duration::from_millis(500));
    let idle = max_rss(&proxies)?;
    memory_hook(opts, "idle", &proxies)?;

    let echo_threads = topo.serve(&server, server.addr(ECHO_PORT))?;
    let echo = server.addr(ECHO_PORT).to_string();
    if opts.latency_only {
        rr_phases(&mut topo, &client, &echo, opts.secs(), &proxies, &mut f)?;
        drop(upstream);
        drop((ztunnels, istio));
        return Ok(f);
    }
    // Idle connections first, before bulk transfers have grown the heap.
    let count = opts.idle_conns().to_string();
    let holder = hold_idle(&mut topo, &client, &echo, &count, "idle connections")?;
    // The tunnels are all up once every connection echoed. Idle means idle for a while:
    // what their opening used and freed goes back (ztunnel trims glibc's heap every 10 s,
    // Istio's jemalloc decays dirty pages over 10 s), so a full run reads the memory 11 s
    // later, a quick one at once.
    std::thread::sleep(opts.idle_settle());
    let with_conns = max_rss(&proxies)?;
    memory_hook(opts, "conns", &proxies)?;
    drop(holder);
    // The same to a destination outside the mesh (the cluster DNS pod's echo): relayed
    // as plain TCP by the client's proxy. Per proxy, the one that grew most.
    let kib_per_plain = if s.proxied() {
        let _plain_echo = topo.serve(&dns, dns.addr(ECHO_PORT))?;
        let plain = dns.addr(ECHO_PORT).to_string();
        // What the tunnels just closed freed goes back first (as above), or these
        // connections would reuse it and read as nearly free.
        std::thread::sleep(opts.idle_settle());
        let before = rss_each(&proxies)?;
        let holder = hold_idle(
            &mut topo,
            &client,
            &plain,
            &count,
            "idle connections outside the mesh",
        )?;
        std::thread::sleep(opts.idle_settle());
        let grew = grew_most(&proxies, &before)?;
        drop(holder);
        Some(grew as f64 / opts.idle_conns() as f64)
    } else {
        None
    };
    // What one more idle tunnelled connection costs once others have paid what is paid
    // once (the data path's code paged in, the allocator's arenas grown): as many
    // connections again, opened while a first batch is open. The first batch refills what
    // the tunnels above left free, so the second reads only its own; its HBONE
    // connections are its own too. Per proxy, the one that grew most. After the plain
    // connections, which would otherwise find the holes of twice as many closed tunnels.
    let kib_per_more = if s.proxied() {
        let first = hold_idle(&mut topo, &client, &echo, &count, "idle connections again")?;
        std::thread::sleep(opts.idle_settle());
        let before = rss_each(&proxies)?;
        let more = hold_idle(&mut topo, &client, &echo, &count, "more idle connections")?;
        std::thread::sleep(opts.idle_settle());
        let grew = grew_most(&proxies, &before)?;
        drop((more, first));
        // Closing 2,000 connections at once keeps both proxies busy for a while (S3's
        // first request/response phase, which comes next, met it as a single stall of
        // 80–190 ms); the next phase starts once they are quiet again.
        wait_quiet(&proxies)?;
        Some(grew as f64 / opts.idle_conns() as f64)
    } else {
        None
    };
    let memory = Memory {
        idle,
        with_conns,
        kib_per_more,
        kib_per_plain,
    };
    if opts.memory_only {
        if s.proxied() {
            memory_figures(opts, &memory, &proxies, &mut f)?;
        }
        drop(upstream);
        drop((ztunnels, istio));
        return Ok(f);
    }
    let iperf = Path::new("iperf3");
    let port = IPERF_PORT.to_string();
    let mut iperf_server = topo.spawn_program(&server, iperf, &["-s", "-p", &port])?;
    wait_listening(&server, IPERF_PORT, &mut iperf_server)?;
    let secs = opts.secs();
    let secs_arg = format!("{}", secs.ceil() as u64);
    let dst = server.ip4.to_string();

    let cpu0 = cpu_seconds(&proxies)?;
    let mut bytes = 0.0;
    let bulk: &[(u32, &str)] = if s.fast_path() {
        &[]
    } else {
        &[(1, "tput_1_gbps"), (8, "tput_8_gbps")]
    };
    for &(streams, key) in bulk {
        let perf = (streams == 1)
            .then(|| Profiler::start(opts, s, "throughput", &proxies))
            .transpose()?
            .flatten();
        let out = topo
            .spawn_program(
                &client,
                iperf,
                &[
                    "-c",
                    &dst,
                    "-p",
                    &port,
                    "-t",
                    &secs_arg,
                    "-P",
                    &streams.to_string(),
                    "-J",
                ],
            )?
            .wait_ok()?;
        if let Some(p) = perf {
            p.finish()?;
        }
        let (bps, moved) = iperf_result(&out)?;
        f.insert(key, bps / 1e9);
        bytes += moved;
    }
    let cpu_tput = cpu_seconds(&proxies)? - cpu0;
    drop(iperf_server);

    rr_phases(&mut topo, &client, &echo, secs, &proxies, &mut f)?;
    let secs_s = format!("{secs}");

    if s.http() {
        let _http = start_http_server(&mut topo, &server)?;
        // No mesh: the server itself; S2: the service, as S4 calls it.
        let dst: std::net::SocketAddr = if s.proxied() {
            format!("{web_vip}:80").parse()?
        } else {
            server.addr(HTTP_PORT)
        };
        http_figures(&mut topo, &client, dst, secs, None, &mut f)?;
    }

    // New connections: the echo server becomes an event loop (a thread per connection
    // would be most of what the rate measures), the same for every scenario.
    drop(echo_threads);
    let _echo = topo.serve_with(&server, server.addr(ECHO_PORT), &["--event-loop"])?;
    let cpu0 = cpu_seconds(&proxies)?;
    let perf = Profiler::start(opts, s, "connections", &proxies)?;
    let concurrency = CONN_CONCURRENCY.to_string();
    let conns_args = [
        "conns",
        &echo,
        "--secs",
        &secs_s,
        "--concurrency",
        &concurrency,
    ];
    let v = json_line(&topo.spawn(&client, &conns_args)?.wait_ok()?)?;
    let cpu_conns = cpu_seconds(&proxies)? - cpu0;
    if let Some(p) = perf {
        p.finish()?;
    }
    let conns = num(&v, "connections")?;
    f.insert("conn_per_sec", num(&v, "per_sec")?);
    if !proxies.is_empty() {
        // What a connection costs the proxies, in a run of its own (perf slows syscalls).
        let dir = topo.dir.path().to_owned();
        let (counts, out) = perf_stat_during(&dir, &proxies, "conns", || {
            topo.spawn(&client, &conns_args)?.wait_ok()
        })?;
        let counted = num(&json_line(&out)?, "connections")?;
        eprintln!("bench:   per connection over {counted} connections: {counts:?}");
        per_unit(&counts, counted, "conn", "conn", &mut f)?;
    }
    // Istio's ztunnel measured only counts if it tunnelled: the server's instance must
    // have accepted the client's connections over mutual TLS.
    if let Some(server_side) = istio.last() {
        let mtls = server_side.mtls_connections_accepted()?;
        if mtls < conns {
            bail!(
                "Istio's ztunnel in the server pod accepted {mtls} connections over mutual TLS, \
                 fewer than the {conns} of the connection test alone: scenario I did not tunnel"
            );
        }
    }

    // DNS from the client pod to the cluster's server: captured and answered by the proxy
    // (a service name) or forwarded (an external name); without a mesh, asked directly.
    if s != Scenario::I {
        let asked = format!("{}:53", dns.ip4);
        let phases: &[(&str, &str, &str, &'static str, &'static str)] = &[
            (
                "local",
                "web.default.svc.cluster.local",
                &web_vip,
                "dns_local_per_sec",
                "dns_local_p50_us",
            ),
            (
                "forwarded",
                "external.example.org",
                "198.51.100.7",
                "dns_fwd_per_sec",
                "dns_fwd_p50_us",
            ),
        ];
        for &(what, name, expect, rate_key, p50_key) in phases {
            if what == "local" && !s.ours() {
                continue;
            }
            let v = json_line(
                &topo
                    .spawn(
                        &client,
                        &[
                            "dns-rr", &asked, name, "--expect", expect, "--secs", &secs_s,
                        ],
                    )?
                    .wait_ok()?,
            )?;
            let wrong = num(&v, "wrong")?;
            if wrong > 0.0 {
                bail!("{wrong} DNS answers for {name} ({what}) were missing or wrong: {v}");
            }
            f.insert(rate_key, num(&v, "per_sec")?);
            f.insert(p50_key, num(&v, "p50_us")?);
        }
    }
    drop(upstream);

    if s.proxied() {
        let ns = capture_kernel_cost(&mut topo, &client, &echo, secs)?;
        f.insert("capture_kernel_ns_per_conn", ns);
    }
    if s.capture() == Some("ebpf") {
        ebpf_cost(
            &mut topo,
            &ztunnels,
            s,
            [&client, &server],
            &echo,
            secs,
            &mut f,
        )?;
    }

    if s.proxied() {
        if bytes > 0.0 {
            f.insert("cpu_s_per_gb", cpu_tput / (bytes / 1e9));
        }
        f.insert("cpu_s_per_1k_conn", cpu_conns / (conns / 1000.0));
        memory_figures(opts, &memory, &proxies, &mut f)?;
    }
    drop((ztunnels, istio));
    Ok(f)
}

/// What a scenario's memory phases read (KiB; the per-connection figures per connection).
struct Memory {
    idle: u64,
    with_conns: u64,
    kib_per_more: Option<f64>,
    kib_per_plain: Option<f64>,
}

/// The memory figures of a proxied scenario: idle RSS (KiB) with and without the idle
/// tunnelled connections, what one more and each plain one added, and the proxies' peak.
/// Runs [`Options::memory_hook`], if any, for `phase` and waits for it.
fn memory_hook(opts: &Options, phase: &str, proxies: &[u32]) -> anyhow::Result<()> {
    let Some(hook) = &opts.memory_hook else {
        return Ok(());
    };
    let status = Command::new(hook)
        .arg(phase)
        .args(proxies.iter().map(u32::to_string))
        .status()
        .with_context(|| format!("failed to run the memory hook {}", hook.display()))?;
    anyhow::ensure!(
        status.success(),
        "the memory hook {} failed for {phase}: {status}",
        hook.display()
    );
    Ok(())
}

fn memory_figures(
    opts: &Options,
    &Memory {
        idle,
        with_conns,
        kib_per_more,
        kib_per_plain,
    }: &Memory,
    proxies: &[u32],
    f: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let mib = |kib: u64| kib as f64 / 1024.0;
    f.insert("rss_idle_mib", mib(idle));
    f.insert("rss_idle_conns_mib", mib(with_conns));
    f.insert(
        "kib_per_idle_conn",
        with_conns.saturating_sub(idle) as f64 / opts.idle_conns() as f64,
    );
    if let Some(kib) = kib_per_more {
        f.insert("kib_per_more_idle_conn", kib);
    }
    if let Some(kib) = kib_per_plain {
        f.insert("kib_per_idle_plain_conn", kib);
    }
    f.insert("rss_peak_mib", mib(max_status(proxies, "VmHWM")?));
    Ok(())
}

/// `podapp http-serve` on the server pod's [`HTTP_PORT`], listening.
fn start_http_server(topo: &mut Topology, server: &Pod) -> anyhow::Result<crate::PodProcess> {
    let addr = server.addr(HTTP_PORT).to_string();
    let mut p = topo.spawn(server, &["http-serve", &addr, "--name", "server"])?;
    let line = p.read_line()?;
    if !line.starts_with("ready") {
        bail!("the HTTP server did not start: {line:?}");
    }
    Ok(p)
}

/// The HTTP figures from `client` to `dst`: latency at 1,000 requests/s on one
/// connection (`podapp http-rr`, from the scheduled time), then wrk at its max rate; with
/// a waypoint, its CPU per 1,000 of wrk's requests.
fn http_figures(
    topo: &mut Topology,
    client: &Pod,
    dst: std::net::SocketAddr,
    secs: f64,
    waypoint: Option<u32>,
    f: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let dst_s = dst.to_string();
    let secs_s = format!("{secs}");
    let v = json_line(
        &topo
            .spawn(
                client,
                &["http-rr", &dst_s, "--secs", &secs_s, "--rate", "1000"],
            )?
            .wait_ok()?,
    )?;
    f.insert("http_fixed_p50_us", num(&v, "p50_us")?);
    f.insert("http_fixed_p99_us", num(&v, "p99_us")?);
    let cpu0 = waypoint.map(|p| cpu_seconds(&[p])).transpose()?;
    let out = topo
        .spawn_program(
            client,
            Path::new("wrk"),
            &[
                "-t1",
                "-c16",
                &format!("-d{}s", secs.ceil() as u64),
                "--latency",
                &format!("http://{dst_s}/"),
            ],
        )?
        .wait_ok()?;
    let w = wrk_result(&out)?;
    f.insert("http_max_per_sec", w.per_sec);
    f.insert("http_max_p50_us", w.p50_us);
    f.insert("http_max_p99_us", w.p99_us);
    if let (Some(pid), Some(cpu0)) = (waypoint, cpu0) {
        let cpu = cpu_seconds(&[pid])? - cpu0;
        f.insert(
            "waypoint_cpu_ms_per_1k_req",
            cpu * 1000.0 / (w.requests / 1000.0),
        );
    }
    Ok(())
}

/// What `wrk --latency` printed.
#[derive(Debug, PartialEq)]
struct Wrk {
    requests: f64,
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Parses `wrk --latency`'s report; a run with failed or non-2xx answers is an error.
fn wrk_result(out: &str) -> anyhow::Result<Wrk> {
    let duration_us = |v: &str| -> anyhow::Result<f64> {
        let split = v
            .find(|c: char| c.is_ascii_alphabetic())
            .with_context(|| format!("wrk latency {v:?} has no unit"))?;
        let (n, unit) = v.split_at(split);
        let n: f64 = n.parse().with_context(|| format!("wrk latency {v:?}"))?;
        Ok(match unit {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            "m" => n * 60e6,
            other => bail!("wrk latency unit {other:?} in {v:?}"),
        })
    };
    let mut w = Wrk {
        requests: f64::NAN,
        per_sec: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
    };
    for line in out.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["50%", v] => w.p50_us = duration_us(v)?,
            ["99%", v] => w.p99_us = duration_us(v)?,
            ["Requests/sec:", v] => w.per_sec = v.parse()?,
            [n, "requests", "in", ..] => w.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                bail!("wrk got {n} answers that were not 2xx or 3xx:\n{out}")
            }
            ["Socket", "errors:", ..] => bail!("wrk: {line}\n{out}"),
            _ => {}
        }
    }
    if [w.requests, w.per_sec, w.p50_us, w.p99_us]
        .iter()
        .any(|v| v.is_nan())
    {
        bail!("wrk's report lacks a figure:\n{out}");
    }
    Ok(w)
}

/// 1 KiB request/response over one connection at 1,000 req/s and back to back: the
/// latency percentiles; then, with proxies, one more run at 1,000 req/s under `perf stat`
/// for their context switches, syscalls and CPU per request (a run of its own: counting
/// syscalls costs time in each one, which the latency figures must not carry).
fn rr_phases(
    topo: &mut Topology,
    client: &Pod,
    echo: &str,
    secs: f64,
    proxies: &[u32],
    f: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let secs_s = format!("{secs}");
    for (rate, prefix) in [(Some("1000"), "rr_fixed"), (None, "rr_max")] {
        let mut args = vec!["rr", echo, "--size", "1024", "--secs", &secs_s];
        if let Some(r) = rate {
            args.extend(["--rate", r]);
        }
        let v = json_line(&topo.spawn(client, &args)?.wait_ok()?)?;
        // Each round's figures, for judging a shared machine's noise (the report keeps
        // the medians).
        eprintln!("bench:   {prefix}: {v}");
        for q in ["p50", "p90", "p99"] {
            f.insert(static_key(prefix, q), num(&v, &format!("{q}_us"))?);
        }
        if rate.is_none() {
            f.insert("rr_max_per_sec", num(&v, "per_sec")?);
        }
    }
    if proxies.is_empty() {
        return Ok(());
    }
    let dir = topo.dir.path().to_owned();
    let (counts, out) = perf_stat_during(&dir, proxies, "rr", || {
        topo.spawn(
            client,
            &[
                "rr", echo, "--size", "1024", "--secs", &secs_s, "--rate", "1000",
            ],
        )?
        .wait_ok()
    })?;
    let requests = num(&json_line(&out)?, "requests")?;
    eprintln!("bench:   per request over {requests} requests: {counts:?}");
    per_unit(&counts, requests, "rr", "req", f)
}

/// The per-unit figures (`<prefix>_cs_per_<unit>`, `<prefix>_syscalls_per_<unit>`,
/// `<prefix>_cpu_us_per_<unit>`) from `perf stat`'s counts over `units` requests or
/// connections.
fn per_unit(
    counts: &BTreeMap<String, f64>,
    units: f64,
    prefix: &str,
    unit: &str,
    f: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let per = |event: &str| -> anyhow::Result<f64> {
        let n = counts
            .get(event)
            .with_context(|| format!("perf stat counted no {event}: {counts:?}"))?;
        Ok(n / units.max(1.0))
    };
    f.insert(
        static_key(prefix, &format!("cs_per_{unit}")),
        per("context-switches")?,
    );
    f.insert(
        static_key(prefix, &format!("syscalls_per_{unit}")),
        per("raw_syscalls:sys_enter")?,
    );
    // task-clock is in milliseconds.
    f.insert(
        static_key(prefix, &format!("cpu_us_per_{unit}")),
        per("task-clock")? * 1000.0,
    );
    Ok(())
}

/// Runs `run` (a client in a pod; it returns the client's output) under `perf stat` on
/// the proxies, counting their context switches, syscalls and CPU (task-clock), and
/// returns the counts with the client's output. A run of its own: counting syscalls
/// slows each one.
fn perf_stat_during(
    dir: &Path,
    proxies: &[u32],
    name: &str,
    run: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<(BTreeMap<String, f64>, String)> {
    let out = dir.join(format!("{name}-perf-stat.csv"));
    let pids: Vec<String> = proxies.iter().map(u32::to_string).collect();
    let mut perf = Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            "context-switches,raw_syscalls:sys_enter,task-clock",
            "-p",
        ])
        .arg(pids.join(","))
        .arg("-o")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("failed to start perf (Debian's linux-perf; `cargo xtask setup` installs it)")?;
    // perf attaches within a moment; the run starts after that.
    std::thread::sleep(Duration::from_millis(300));
    let output = run();
    // SAFETY: signalling our own child; SIGINT makes perf stat write its counts and exit.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let status = perf.wait().context("perf stat did not exit")?;
    let output = output?;
    let csv = std::fs::read_to_string(&out)
        .with_context(|| format!("perf stat ({status}) wrote no {}", out.display()))?;
    Ok((perf_stat_counts(&csv), output))
}

/// `perf stat -x,` output: event name → count (lines `value,unit,event,...`; comments,
/// blank lines and `<not counted>` left out).
fn perf_stat_counts(csv: &str) -> BTreeMap<String, f64> {
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split(',');
            let value: f64 = fields.next()?.trim().parse().ok()?;
            let _unit = fields.next()?;
            let event = fields.next()?.trim();
            Some((event.to_owned(), value))
        })
        .collect()
}

/// Whether a kernel symbol is netfilter at work for a NAT redirect: a table's rules
/// evaluated (iptables-nft or legacy), conntrack, NAT. Not `nf_hook_slow` itself: with
/// `br_netfilter` loaded every bridged packet passes netfilter hooks, capture or not.
fn is_netfilter_capture(sym: &str) -> bool {
    matches!(sym, "nft_do_chain" | "ipt_do_table" | "ip6t_do_table")
        || sym.starts_with("nf_conntrack_in")
        || sym.starts_with("nf_nat_")
}

/// Whether a kernel symbol is one of ztunnel's BPF programs: `bpf_prog_<tag>_<name>`,
/// the name as the kernel lists it (its BTF name, or the object name cut to 15 bytes).
fn is_capture_program(sym: &str) -> bool {
    let Some(rest) = sym.strip_prefix("bpf_prog_") else {
        return false;
    };
    let name = rest.split_once('_').map_or("", |(_tag, name)| name);
    !name.is_empty()
        && ztunnel_common::program::ALL
            .iter()
            .any(|p| p.starts_with(name))
}

/// `count` connections from `client` to the echo at `dst`, each having echoed once, held
/// open (idle) until the returned process is dropped.
fn hold_idle(
    topo: &mut Topology,
    client: &Pod,
    dst: &str,
    count: &str,
    what: &str,
) -> anyhow::Result<crate::PodProcess> {
    let mut holder = topo.spawn(
        client,
        &["parallel", dst, "--count", count, "--secs", "600"],
    )?;
    let line = holder.read_line()?;
    if line != format!("open={count}") {
        bail!("{what} did not open: {line:?} {}", holder.stderr_text());
    }
    Ok(holder)
}

/// The sampling period of [`capture_kernel_cost`]'s profile: one sample per 100 µs of CPU
/// (a quick run's one-second phase still gets tens of samples in eBPF programs).
const CAPTURE_SAMPLE_NS: u64 = 100_000;

/// Kernel time the capture machinery takes per new connection, the same measure for
/// iptables and eBPF capture: a system-wide perf profile (`cpu-clock`, kernel stacks) of
/// one connection-rate phase (`conns`, one thread), counting the samples whose stack
/// passes through netfilter's rules, conntrack or NAT (iptables' redirect: S1 and I) or
/// one of ztunnel's BPF programs (`bpf_prog_<tag>_<name>`, with
/// the helpers it calls: S2 and S3), times the period, per connection. Without
/// the kernel's BPF statistics on (they would add to the programs' time).
fn capture_kernel_cost(
    topo: &mut Topology,
    client: &Pod,
    echo: &str,
    secs: f64,
) -> anyhow::Result<f64> {
    let phase = secs.min(5.0);
    let data = topo.dir.path().join("capture.perf");
    let period = CAPTURE_SAMPLE_NS.to_string();
    // Until interrupted: it covers the whole phase however long the client takes.
    let perf = Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-c",
            &period,
            "-a",
            "-g",
            "--quiet",
            "-o",
        ])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("failed to run perf (Debian's linux-perf; `cargo xtask setup` installs it)")?;
    // perf is sampling once it has set up its buffers.
    std::thread::sleep(Duration::from_millis(500));
    let phase_s = format!("{phase}");
    let run = (|| {
        json_line(
            &topo
                .spawn(
                    client,
                    &["conns", echo, "--secs", &phase_s, "--concurrency", "1"],
                )?
                .wait_ok()?,
        )
    })();
    // Stopped on every path: perf writes its data on SIGINT, then ends by that signal.
    let stopped = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(perf.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let out = perf.wait_with_output().context("perf record")?;
    let v = run?;
    stopped.context("failed to stop perf record")?;
    use std::os::unix::process::ExitStatusExt as _;
    if !out.status.success() && out.status.signal() != Some(libc::SIGINT) {
        bail!(
            "perf record failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let script = Command::new("perf")
        .args(["script", "-F", "comm,ip,sym", "-i"])
        .arg(&data)
        .output()
        .context("perf script")?;
    if !script.status.success() {
        bail!(
            "perf script failed: {}",
            String::from_utf8_lossy(&script.stderr).trim()
        );
    }
    let samples = capture_samples(&String::from_utf8_lossy(&script.stdout));
    let conns = num(&v, "connections")?;
    if conns <= 0.0 {
        bail!("no connection was made while perf sampled: {v}");
    }
    Ok((samples * CAPTURE_SAMPLE_NS) as f64 / conns)
}

/// How many samples of a `perf script -F comm,ip,sym` listing (one block per sample,
/// its stack one frame a line, blocks apart by a blank line) ran in capture machinery:
/// netfilter's rules, conntrack or NAT, or one of ztunnel's BPF programs, anywhere on
/// the stack.
fn capture_samples(script: &str) -> u64 {
    script
        .split("\n\n")
        .filter(|block| {
            block.lines().skip(1).any(|frame| {
                let sym = frame.split_whitespace().nth(1).unwrap_or("");
                is_netfilter_capture(sym) || is_capture_program(sym)
            })
        })
        .count() as u64
}

/// Each capture program's (runs, run time in ns), summed over `ztunnels`, from the
/// kernel's statistics (`/bpf_stats`).
fn bpf_runs(ztunnels: &[crate::Ztunnel]) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let mut total = BTreeMap::new();
    for z in ztunnels {
        let body = crate::http(z.admin, "GET", "/bpf_stats")?;
        let status: ztunnel::ebpf::run_stats::Status =
            serde_json::from_str(&body).with_context(|| format!("bad /bpf_stats: {body}"))?;
        for p in status.programs {
            let e: &mut (u64, u64) = total.entry(p.program).or_default();
            e.0 += p.runs;
            e.1 += p.run_time_ns;
        }
    }
    Ok(total)
}

/// What the capture programs cost, from the kernel's own statistics, switched on for
/// this phase only (they add two clock reads to every BPF program's run, so the other
/// figures are measured without them): kernel time of every program on both nodes per
/// new connection (`conns`, one thread), and of tc ingress per packet during a bulk
/// transfer (not on the fast path, whose bulk transfer is not measured).
fn ebpf_cost(
    topo: &mut Topology,
    ztunnels: &[crate::Ztunnel],
    s: Scenario,
    [client, server]: [&Pod; 2],
    echo: &str,
    secs: f64,
    f: &mut BTreeMap<&'static str, f64>,
) -> anyhow::Result<()> {
    let phase = format!("{}", secs.min(5.0));
    for z in ztunnels {
        crate::http(z.admin, "POST", "/bpf_stats?enabled=true&duration=10m")?;
    }
    let before = bpf_runs(ztunnels)?;
    let v = json_line(
        &topo
            .spawn(
                client,
                &["conns", echo, "--secs", &phase, "--concurrency", "1"],
            )?
            .wait_ok()?,
    )?;
    let after = bpf_runs(ztunnels)?;
    let conns = num(&v, "connections")?;
    let ns: u64 = after
        .iter()
        .map(|(p, (_, t))| t - before.get(p).map_or(0, |b| b.1))
        .sum();
    if conns > 0.0 {
        f.insert("ebpf_ns_per_conn", ns as f64 / conns);
    }
    if !s.fast_path() {
        let port = IPERF_PORT.to_string();
        let iperf = Path::new("iperf3");
        let dst = server.ip4.to_string();
        let mut iperf_server = topo.spawn_program(server, iperf, &["-s", "-p", &port])?;
        wait_listening(server, IPERF_PORT, &mut iperf_server)?;
        let before = bpf_runs(ztunnels)?;
        let t = format!("{}", secs.min(5.0).ceil() as u64);
        topo.spawn_program(client, iperf, &["-c", &dst, "-p", &port, "-t", &t, "-J"])?
            .wait_ok()?;
        let after = bpf_runs(ztunnels)?;
        let tc = ztunnel_common::program::TC_INGRESS;
        let (r0, t0) = before.get(tc).copied().unwrap_or_default();
        let (r1, t1) = after.get(tc).copied().unwrap_or_default();
        if r1 > r0 {
            f.insert("ebpf_tc_ns_per_packet", (t1 - t0) as f64 / (r1 - r0) as f64);
        }
    }
    for z in ztunnels {
        crate::http(z.admin, "POST", "/bpf_stats?enabled=false")?;
    }
    Ok(())
}

/// `perf record` on the proxies for one phase, then a flame graph of it.
struct Profiler {
    child: std::process::Child,
    data: PathBuf,
    svg: PathBuf,
    title: String,
}

impl Profiler {
    fn start(
        opts: &Options,
        s: Scenario,
        phase: &str,
        proxies: &[u32],
    ) -> anyhow::Result<Option<Self>> {
        if !opts.profile || proxies.is_empty() {
            return Ok(None);
        }
        let pids: Vec<String> = proxies.iter().map(u32::to_string).collect();
        let name = format!("flame-{s:?}-{phase}").to_lowercase();
        let data = opts.out_dir.join(format!("{name}.perf.data"));
        let child = Command::new("perf")
            .args([
                "record",
                "--quiet",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-p",
            ])
            .arg(pids.join(","))
            .arg("-o")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context(
                "failed to start perf (Debian's linux-perf; `cargo xtask setup` installs it)",
            )?;
        // perf attaches within a moment; samples before that are simply not taken.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Some(Self {
            child,
            data,
            svg: opts.out_dir.join(format!("{name}.svg")),
            title: format!("{s:?} ({}), {phase}", s.describe()),
        }))
    }

    fn finish(mut self) -> anyhow::Result<()> {
        use inferno::collapse::Collapse as _;
        // SAFETY: signalling our own child; SIGINT makes perf write its file and exit.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        let script = Command::new("perf")
            .args(["script", "--no-inline", "-i"])
            .arg(&self.data)
            .output()
            .context("perf script failed")?;
        if !script.status.success() {
            bail!("perf script: {}", String::from_utf8_lossy(&script.stderr));
        }
        let mut folded = Vec::new();
        inferno::collapse::perf::Folder::default()
            .collapse(&script.stdout[..], &mut folded)
            .context("failed to fold perf's stacks")?;
        let mut fg = inferno::flamegraph::Options::default();
        fg.title = self.title.clone();
        let svg = std::fs::File::create(&self.svg)
            .with_context(|| format!("failed to create {}", self.svg.display()))?;
        inferno::flamegraph::from_reader(&mut fg, &folded[..], svg)
            .with_context(|| format!("failed to draw {}", self.svg.display()))?;
        let _ = std::fs::remove_file(&self.data);
        eprintln!("bench: flame graph {}", self.svg.display());
        Ok(())
    }
}

fn static_key(prefix: &str, q: &str) -> &'static str {
    FIGURES
        .iter()
        .map(|f| f.key)
        .find(|k| k.starts_with(prefix) && k.contains(q))
        .expect("every RR quantile and per-unit count has a figure")
}

/// A wide port range and TIME_WAIT reuse, so that the connection-rate test measures the
/// proxy, not ephemeral-port exhaustion; the servers' ports are kept out of that range:
/// a proxy that dials the app from the client's address (ours) holds the port the server
/// pod's kernel picks for the dial, and a dial on 5201 would keep iperf3 from listening
/// there.
fn tune_pod(p: &Pod) -> anyhow::Result<()> {
    let reserved = format!("net.ipv4.ip_local_reserved_ports={ECHO_PORT},{IPERF_PORT}");
    p.sysctl(&[
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
        &reserved,
    ])
}

/// Waits until `server` (running in `p`) listens on `port`; generous, as the machine may
/// be busy, and failing at once with the server's error output if it exited.
fn wait_listening(p: &Pod, port: u16, server: &mut crate::PodProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if server.exited() {
            bail!(
                "the server for port {port} in {} exited: {}",
                p.name,
                server.stderr_text()
            );
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &p.netns, "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} in {}", p.name)
}

/// Received bits per second and bytes from iperf3's JSON.
fn iperf_result(out: &str) -> anyhow::Result<(f64, f64)> {
    let v: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("iperf3 output is not JSON: {out}"))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bytes")?;
    Ok((bps, bytes))
}

fn json_line(out: &str) -> anyhow::Result<serde_json::Value> {
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("expected a JSON line, got {out:?}"))
}

fn num(v: &serde_json::Value, key: &str) -> anyhow::Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("no number {key:?} in {v}"))
}

/// User + system CPU seconds of the proxies so far.
/// Waits until `pids` spent at most one clock tick of CPU over [`QUIET_SAMPLE`], for at
/// most [`QUIET_LIMIT`] (then says so and goes on).
fn wait_quiet(pids: &[u32]) -> anyhow::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let tick = 1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let deadline = Instant::now() + QUIET_LIMIT;
    let mut last = cpu_seconds(pids)?;
    loop {
        std::thread::sleep(QUIET_SAMPLE);
        let now = cpu_seconds(pids)?;
        if now - last <= tick * 1.5 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!(
                "bench:   the proxies were still busy {QUIET_LIMIT:?} after the last phase ({:.0} ms of CPU in the last {QUIET_SAMPLE:?}); going on",
                (now - last) * 1e3
            );
            return Ok(());
        }
        last = now;
    }
}

/// How long [`wait_quiet`] watches the proxies' CPU at a time, and at most in all.
const QUIET_SAMPLE: Duration = Duration::from_millis(250);
const QUIET_LIMIT: Duration = Duration::from_secs(10);

fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the command: state is field 3, utime 14 and stime 15 (proc(5)).
        let utime: f64 = fields.get(11).context("no utime")?.parse()?;
        let stime: f64 = fields.get(12).context("no stime")?.parse()?;
        total += (utime + stime) / tick;
    }
    Ok(total)
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The larger of the proxies' values (the busier one decides what to provision).
fn max_status(pids: &[u32], field: &str) -> anyhow::Result<u64> {
    let mut m = 0;
    for pid in pids {
        m = m.max(status_kib(*pid, field)?);
    }
    Ok(m)
}

/// Each process's RSS, KiB.
fn rss_each(pids: &[u32]) -> anyhow::Result<Vec<u64>> {
    pids.iter().map(|p| status_kib(*p, "VmRSS")).collect()
}

/// How much the process that grew most grew since `before` (KiB, [`rss_each`]'s order).
fn grew_most(pids: &[u32], before: &[u64]) -> anyhow::Result<u64> {
    let mut grew = 0;
    for (p, b) in pids.iter().zip(before) {
        grew = grew.max(status_kib(*p, "VmRSS")?.saturating_sub(*b));
    }
    Ok(grew)
}

fn max_rss(pids: &[u32]) -> anyhow::Result<u64> {
    max_status(pids, "VmRSS")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn upgrade_result(samples: &[UpgradeSample]) -> Option<UpgradeResult> {
    if samples.is_empty() {
        return None;
    }
    let col = |f: fn(&UpgradeSample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let max = |v: Vec<f64>| v.into_iter().fold(0.0, f64::max);
    Some(UpgradeResult {
        scenario: Scenario::S2,
        rate_per_sec: UPGRADE_RATE,
        rounds: samples.len(),
        attempted: samples.iter().map(|s| s.attempted).sum(),
        failed: samples.iter().map(|s| s.failed).sum(),
        handover_ms: median(col(|s| s.handover_ms)),
        handover_ms_max: max(col(|s| s.handover_ms)),
        ready_ms: median(col(|s| s.ready_ms)),
        predecessor_exit_ms: median(col(|s| s.exit_ms)),
        predecessor_exit_ms_max: max(col(|s| s.exit_ms)),
        failures: samples
            .iter()
            .flat_map(|s| s.failures.iter().cloned())
            .take(10)
            .collect(),
    })
}

fn build_report(
    opts: &Options,
    samples: &BTreeMap<Scenario, Vec<BTreeMap<&'static str, f64>>>,
    upgrades: &[UpgradeSample],
) -> anyhow::Result<Report> {
    let medians: BTreeMap<Scenario, BTreeMap<&'static str, f64>> = samples
        .iter()
        .map(|(s, runs)| {
            let m = FIGURES
                .iter()
                .filter_map(|f| {
                    let vals: Vec<f64> =
                        runs.iter().filter_map(|r| r.get(f.key).copied()).collect();
                    (!vals.is_empty()).then(|| (f.key, median(vals)))
                })
                .collect();
            (*s, m)
        })
        .collect();
    let s0 = medians.get(&Scenario::S0).cloned().unwrap_or_default();
    let istio = medians.get(&Scenario::I).cloned().unwrap_or_default();
    let ratio = |base: &BTreeMap<&'static str, f64>, k: &str, v: f64| {
        base.get(k).filter(|b| **b != 0.0).map(|b| v / b)
    };
    let scenarios = medians
        .iter()
        .map(|(s, m)| ScenarioResult {
            scenario: *s,
            description: s.describe().to_owned(),
            figures: m
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        Value {
                            value: *v,
                            ratio_to_s0: ratio(&s0, k, *v),
                            ratio_to_i: if s.ours() { ratio(&istio, k, *v) } else { None },
                        },
                    )
                })
                .collect(),
            not_measured: s
                .not_measured()
                .iter()
                .map(|(k, why)| ((*k).to_owned(), (*why).to_owned()))
                .collect(),
        })
        .collect();
    let mut report = Report {
        mode: if opts.quick { "quick" } else { "full" }.to_owned(),
        rounds: opts.rounds(),
        seconds_per_measurement: opts.secs(),
        idle_connections: opts.idle_conns(),
        date: date(),
        commit: commit(),
        machine: machine()?,
        istio_ztunnel: opts
            .istio_ztunnel
            .as_deref()
            .filter(|_| medians.contains_key(&Scenario::I))
            .map(istio_version),
        scenarios,
        upgrade: upgrade_result(upgrades),
        targets: Vec::new(),
    };
    report.targets = targets(&report);
    Ok(report)
}

/// The targets of issue 16, for ours (S2, the default eBPF capture) against Istio's ztunnel
/// measured in the same run; the earlier absolute targets when I did not run.
fn targets(r: &Report) -> Vec<Target> {
    let mut t = if r.scenarios.is_empty() {
        Vec::new()
    } else if has_istio(r) {
        targets_against_istio(r)
    } else {
        targets_without_istio(r)
    };
    if let Some(u) = &r.upgrade {
        t.push(Target {
            name: "S2 failed connections during an upgrade under load".to_owned(),
            target: "0".to_owned(),
            measured: format!("{} of {}", u.failed, u.attempted),
            met: u.failed == 0,
        });
    }
    t
}

fn targets_against_istio(r: &Report) -> Vec<Target> {
    use Scenario::*;
    let g = |s, k| r.get(s, k).unwrap_or(f64::NAN);
    let mut t = Vec::new();
    // Latency added over no mesh: ours ≤ factor × Istio's (compared by product, so that
    // an Istio figure at or below S0 still gives a plain answer).
    for (key, what, factor) in [
        ("rr_fixed_p50_us", "p50 at 1,000 req/s", 0.7),
        ("rr_max_p50_us", "p50 back to back", 0.7),
        ("rr_fixed_p99_us", "p99 at 1,000 req/s", 1.0),
        ("rr_max_p99_us", "p99 back to back", 1.0),
    ] {
        if r.get(S0, key).is_none() {
            // A run without S0 (`--scenario`) has no "added" latency to compare.
            t.push(Target {
                name: format!("latency added over S0, 1 KiB RR {what}"),
                target: format!("≤ {factor}× I"),
                measured: "not measured: S0 did not run".to_owned(),
                met: false,
            });
            continue;
        }
        let ours = g(S2, key) - g(S0, key);
        let theirs = g(I, key) - g(S0, key);
        let ratio = if theirs > 0.0 {
            format!(": {:.2}×", ours / theirs)
        } else {
            String::new()
        };
        t.push(Target {
            name: format!("latency added over S0, 1 KiB RR {what}"),
            target: format!("≤ {factor}× I"),
            measured: format!("S2 {ours:+.1} µs vs I {theirs:+.1} µs{ratio}"),
            met: ours <= factor * theirs,
        });
    }
    for (key, name, unit, higher, factor) in [
        (
            "kib_per_idle_conn",
            "memory per idle tunnelled connection",
            "KiB",
            false,
            0.5,
        ),
        (
            "tput_1_gbps",
            "single-stream throughput",
            "Gbit/s",
            true,
            1.5,
        ),
        ("cpu_s_per_gb", "CPU per GB moved", "CPU s/GB", false, 0.7),
        (
            "conn_per_sec",
            "new connections per second",
            "conn/s",
            true,
            1.5,
        ),
        ("rss_idle_mib", "idle RSS per proxy", "MiB", false, 1.0),
    ] {
        let (ours, theirs) = (g(S2, key), g(I, key));
        if ours.is_nan() || theirs.is_nan() {
            // A run of part of the figures (`--latency-only`, `--memory-only`, or
            // without S2 or I).
            t.push(Target {
                name: name.to_owned(),
                target: format!("{} {factor}× I", if higher { "≥" } else { "≤" }),
                measured: "not measured in this run".to_owned(),
                met: false,
            });
            continue;
        }
        let met = if higher {
            ours >= factor * theirs
        } else {
            ours <= factor * theirs
        };
        t.push(Target {
            name: name.to_owned(),
            target: format!("{} {factor}× I", if higher { "≥" } else { "≤" }),
            measured: format!(
                "S2 {} vs I {} {unit}: {:.2}×",
                short(ours),
                short(theirs),
                ours / theirs
            ),
            met,
        });
    }
    t
}

/// A figure with three significant digits or so (no decimals from 100 up).
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn targets_without_istio(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let mut add = |name: &str, target: &str, measured: String, met: bool| {
        t.push(Target {
            name: name.to_owned(),
            target: target.to_owned(),
            measured,
            met,
        })
    };
    scenario_targets(r, &mut add);
    t
}

fn scenario_targets(r: &Report, add: &mut impl FnMut(&str, &str, String, bool)) {
    use Scenario::*;
    let g = |s, k| r.get(s, k).unwrap_or(f64::NAN);
    let tput = g(S2, "tput_1_gbps");
    add(
        "S2 single-stream throughput",
        "≥ 8 Gbit/s",
        format!("{tput:.2} Gbit/s"),
        tput >= 8.0,
    );
    let added = g(S2, "rr_fixed_p50_us") - g(S0, "rr_fixed_p50_us");
    add(
        "S2 p50 round trip added over S0 (1 KiB, fixed rate)",
        "≤ +50 µs",
        format!("{added:+.1} µs"),
        added <= 50.0,
    );
    let conn = g(S2, "conn_per_sec") / g(S1, "conn_per_sec");
    add(
        "S2 / S1 new connections per second",
        "≥ 1.2×",
        format!("{conn:.2}×"),
        conn >= 1.2,
    );
    let (p1, p2, p3) = (
        g(S1, "rr_fixed_p50_us"),
        g(S2, "rr_fixed_p50_us"),
        g(S3, "rr_fixed_p50_us"),
    );
    add(
        "S2 p50 below S1 (fixed rate)",
        "S2 < S1",
        format!("{p2:.1} vs {p1:.1} µs"),
        p2 < p1,
    );
    add(
        "S3 p50 below S2 (fixed rate)",
        "S3 < S2",
        format!("{p3:.1} vs {p2:.1} µs"),
        p3 < p2,
    );
    let idle = g(S2, "rss_idle_mib");
    add(
        "S2 idle RSS",
        "≤ 15 MiB",
        format!("{idle:.1} MiB"),
        idle <= 15.0,
    );
    let per = g(S2, "kib_per_idle_conn");
    add(
        "S2 memory per idle tunnelled connection",
        "≤ 30 KiB",
        format!("{per:.1} KiB"),
        per <= 30.0,
    );
}

/// `<bin> version` (Istio's build info line), or why it could not be read.
fn istio_version(bin: &Path) -> String {
    match Command::new(bin).arg("version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => format!("{} version: {}", bin.display(), o.status),
        Err(e) => format!("{} version: {e}", bin.display()),
    }
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The commit being measured (`ZTUNNEL_COMMIT`, else git's HEAD, `+dirty` when changed).
fn commit() -> String {
    if let Ok(c) = std::env::var("ZTUNNEL_COMMIT") {
        return c;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}+dirty") } else { head }
        }
        None => "unknown".to_owned(),
    }
}

fn machine() -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok(Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        memory_gib: kib / (1024.0 * 1024.0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_owned(),
    })
}

/// Draws `bench.md` and `bench.svg` again from a run's `bench.json` (e.g. after the chart
/// changed), next to it.
pub fn render(json: &Path) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(json)
        .with_context(|| format!("failed to read {}", json.display()))?;
    let r: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench report", json.display()))?;
    write_outputs(&r, json.parent().unwrap_or(Path::new(".")))?;
    Ok(r)
}

fn write_outputs(r: &Report, dir: &Path) -> anyhow::Result<()> {
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("failed to write {}", p.display()))
    };
    write("bench.json", &serde_json::to_string_pretty(r)?)?;
    write("bench.md", &markdown(r))?;
    write("bench.svg", &svg(r))?;
    Ok(())
}

/// A figure with its ratios: `value (r× S0)`, and for ours `value (r× S0, r× I)`.
fn cell(v: Option<&Value>, not_measured: bool) -> String {
    match v {
        None if not_measured => "not measured¹".to_owned(),
        None => "—".to_owned(),
        Some(v) => {
            let n = short(v.value);
            let ratios: Vec<String> = [(v.ratio_to_s0, "S0"), (v.ratio_to_i, "I")]
                .iter()
                .filter_map(|(r, base)| r.map(|r| format!("{r:.2}× {base}")))
                .collect();
            if ratios.is_empty() {
                n
            } else {
                format!("{n} ({})", ratios.join(", "))
            }
        }
    }
}

/// The table (figures × scenarios, each with its ratio to S0) and the targets.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# ztunnel bench ({} run)\n\n{} · commit {} · kernel {} · {} CPUs ({}) · {:.0} GiB\n",
        r.mode,
        r.date,
        r.commit,
        r.machine.kernel,
        r.machine.cpus,
        r.machine.cpu_model,
        r.machine.memory_gib,
    );
    if !r.scenarios.is_empty() {
        s += &format!(
            "\n{} round(s), {} s per measurement, {} idle connections; each figure is the \
             median over the rounds, with its ratio to S0 from the same run{}.\n\n",
            r.rounds,
            r.seconds_per_measurement,
            r.idle_connections,
            if has_istio(r) {
                " and, for ours (S1–S3), its ratio to I (Istio's ztunnel)"
            } else {
                ""
            },
        );
        if let Some(v) = &r.istio_ztunnel {
            s += &format!(
                "I is Istio's ztunnel, `{v}`, one instance per pod in its dedicated mode \
                 (docs/bench/README.md says how it was built and configured).\n\n"
            );
        }
        s += &figure_table(r);
    }
    if let Some(u) = &r.upgrade {
        s += &upgrade_table(u);
    }
    s += if has_istio(r) {
        "\n## Targets (S2 against I, same run)\n\n"
    } else if r.scenarios.is_empty() {
        "\n## Targets\n\n"
    } else {
        "\n## Targets (no Istio's ztunnel in this run: `--istio-ztunnel PATH` adds it)\n\n"
    };
    s += "| target | goal | measured | met |\n|---|---|---|---|\n";
    for t in &r.targets {
        s += &format!(
            "| {} | {} | {} | {} |\n",
            t.name,
            t.target,
            t.measured,
            if t.met { "yes" } else { "no" }
        );
    }
    s
}

/// Figures × scenarios, with the notes on what was not measured.
fn figure_table(r: &Report) -> String {
    let mut s = "| figure | unit |".to_owned();
    for sc in &r.scenarios {
        s += &format!(" {:?} {} |", sc.scenario, sc.description);
    }
    s += "\n|---|---|";
    for _ in &r.scenarios {
        s += "---|";
    }
    s += "\n";
    for f in FIGURES {
        s += &format!("| {} | {} |", f.label, f.unit);
        for sc in &r.scenarios {
            let nm = sc.not_measured.contains_key(f.key);
            s += &format!(" {} |", cell(sc.figures.get(f.key), nm));
        }
        s += "\n";
    }
    let mut notes: Vec<String> = r
        .scenarios
        .iter()
        .flat_map(|sc| {
            sc.not_measured
                .values()
                .map(move |why| format!("{:?}: {why}", sc.scenario))
        })
        .collect();
    notes.dedup();
    for n in notes {
        s += &format!("\n¹ {n}\n");
    }
    s
}

/// The upgrade under load: what was done and what it cost.
fn upgrade_table(u: &UpgradeResult) -> String {
    let mut s = format!(
        "\n## Upgrade under load\n\nnode1's ztunnel ({:?}: {}) handed over to a successor while \
         {} new connections/s flow through it ({} each way between the nodes, each a 64-byte \
         request echoed back); the old one is stopped once the new one is ready, as in a \
         DaemonSet rollout. {} handover(s); counts are totals, times the median (and maximum) \
         from the successor's start.\n\n| figure | value |\n|---|---|\n",
        u.scenario,
        u.scenario.describe(),
        u.rate_per_sec,
        u.rate_per_sec / 2,
        u.rounds
    );
    s += &format!("| connections opened | {} |\n", u.attempted);
    s += &format!("| connections failed | {} |\n", u.failed);
    s += &format!(
        "| handover: to the old ztunnel no longer accepting | {:.0} ms (max {:.0}) |\n",
        u.handover_ms, u.handover_ms_max
    );
    s += &format!("| to the new ztunnel ready | {:.0} ms |\n", u.ready_ms);
    s += &format!(
        "| to the old ztunnel's exit (drained) | {:.0} ms (max {:.0}) |\n",
        u.predecessor_exit_ms, u.predecessor_exit_ms_max
    );
    for f in &u.failures {
        s += &format!("\nfailed: {f}\n");
    }
    s
}

fn has_istio(r: &Report) -> bool {
    r.scenarios.iter().any(|s| s.scenario == Scenario::I)
}

/// The bar colour of a scenario (S0 grey, I purple, S1 orange, S2 blue, S3 green).
fn color(s: Scenario) -> &'static str {
    match s {
        Scenario::S0 => "#9e9e9e",
        Scenario::I => "#8e44ad",
        Scenario::S1 => "#e07b39",
        Scenario::S2 => "#3a7dc9",
        Scenario::S3 => "#3aa35b",
        Scenario::S4 => "#9b59b6",
    }
}

/// Grouped bars: each figure as a ratio to S0 for every scenario (S0 is the 1.0 line).
pub fn svg(r: &Report) -> String {
    let keys: Vec<&Figure> = FIGURES.iter().filter(|f| !f.ztunnel_only).collect();
    let bar = 14.0;
    let (left, top, row) = (320.0, 40.0, bar * r.scenarios.len() as f64 + 16.0);
    let width = 960.0;
    let plot_w = width - left - 80.0;
    let max = r
        .scenarios
        .iter()
        .flat_map(|s| s.figures.values().filter_map(|v| v.ratio_to_s0))
        .fold(1.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let legend = 18.0 * r.scenarios.len() as f64;
    let height = top + row * keys.len() as f64 + 20.0 + legend;
    let x = |ratio: f64| left + plot_w * ratio / max;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">ztunnel bench: ratio to S0 (no mesh), commit {}, kernel {}</text>\n",
        r.commit, r.machine.kernel
    );
    for (i, f) in keys.iter().enumerate() {
        let y0 = top + row * i as f64;
        let better = if f.higher_is_better {
            "higher"
        } else {
            "lower"
        };
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} ({better} is better)</text>\n",
            left - 8.0,
            y0 + row / 2.0,
            f.label
        );
        for (j, sc) in r.scenarios.iter().enumerate() {
            let Some(v) = sc.figures.get(f.key) else {
                continue;
            };
            let ratio = v.ratio_to_s0.unwrap_or(1.0);
            let y = y0 + 2.0 + bar * j as f64;
            let c = color(sc.scenario);
            s += &format!(
                "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{c}\"/>\
                 <text x=\"{:.1}\" y=\"{}\" font-size=\"10\">{ratio:.2}</text>\n",
                x(ratio) - left,
                bar - 2.0,
                x(ratio) + 3.0,
                y + bar - 4.0
            );
        }
    }
    let base = x(1.0);
    s += &format!(
        "<line x1=\"{base:.1}\" y1=\"{top}\" x2=\"{base:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-dasharray=\"4 3\"/>\n",
        height - legend - 15.0
    );
    for (j, sc) in r.scenarios.iter().enumerate() {
        let ly = height - legend + 18.0 * j as f64 - 5.0;
        let c = color(sc.scenario);
        s += &format!(
            "<rect x=\"{left}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{c}\"/>\
             <text x=\"{}\" y=\"{:.1}\">{:?} {}</text>\n",
            ly - 10.0,
            left + 16.0,
            ly,
            sc.scenario,
            sc.description
        );
    }
    s += "</svg>\n";
    s
}

/// Whether every bench topology is gone (nothing in namespaces, cgroups or pins).
pub fn leftovers_gone() -> anyhow::Result<bool> {
    for round in 0..MAX_ROUNDS {
        for s in Scenario::ALL {
            if !crate::leftovers(&format!("{ID_PREFIX}{round}{}", s as u8))?.is_empty() {
                return Ok(false);
            }
        }
        if !crate::leftovers(&format!("{UPGRADE_ID_PREFIX}{round}"))?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_bench_waits_for_the_first_and_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bench.lock");
        let first = super::lock_machine(&path, std::time::Duration::ZERO).expect("free");
        let err = super::lock_machine(&path, std::time::Duration::from_millis(300))
            .expect_err("held by the first");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        super::lock_machine(&path, std::time::Duration::ZERO).expect("free again");
    }

    #[test]
    fn wrk_reports_are_read_and_failures_refused() {
        let out = "Running 1s test @ http://10.1.250.10:80/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.21ms  310.55us   9.87ms   90.12%
    Req/Sec    13.21k   512.10    14.02k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.30ms
     90%    1.71ms
     99%    2.50ms
  13301 requests in 1.00s, 1.98MB read
Requests/sec:  13290.12
Transfer/sec:      1.98MB
";
        assert_eq!(
            super::wrk_result(out).expect("parses"),
            super::Wrk {
                requests: 13301.0,
                per_sec: 13290.12,
                p50_us: 812.0,
                p99_us: 2500.0,
            }
        );
        let failed = format!("{out}  Non-2xx or 3xx responses: 12\n");
        assert!(super::wrk_result(&failed).is_err());
        let errors = format!("{out}  Socket errors: connect 0, read 3, write 0, timeout 0\n");
        assert!(super::wrk_result(&errors).is_err());
        assert!(
            super::wrk_result("Requests/sec: 1\n").is_err(),
            "incomplete"
        );
    }

    use super::*;

    #[test]
    fn perf_stat_csv_gives_each_counted_event() {
        let csv = "# started on Sat Dec  5 21:00:00 2026\n\n\
                   7905,,context-switches,2001234,100.00,,\n\
                   41230,,raw_syscalls:sys_enter,2001234,100.00,,\n\
                   812.45,msec,task-clock,812450000,100.00,0.406,CPUs utilized\n\
                   <not counted>,,cycles,0,0.00,,\n";
        let c = perf_stat_counts(csv);
        assert_eq!(c.get("context-switches"), Some(&7905.0));
        assert_eq!(c.get("raw_syscalls:sys_enter"), Some(&41230.0));
        assert_eq!(c.get("task-clock"), Some(&812.45));
        assert_eq!(c.len(), 3, "{c:?}");
    }

    #[test]
    fn capture_samples_are_those_with_a_netfilter_hook_or_one_of_our_programs_on_the_stack() {
        let script = "\
conns 
\tffffffff81e88420 nft_do_chain
\tffffffff8208aab2 nf_hook_slow
\tffffffff8208c08d ip_output

bridged 
\tffffffff81e88420 ip_sabotage_in
\tffffffff8208aab2 nf_hook_slow
\tffffffff8208c08d ip_rcv_finish

ztunnel 
\tffffffffc0012345 bpf_prog_6deef7357e7b4530_connect4_capture
\tffffffff81234567 __cgroup_bpf_run_filter_sock_addr

ztunnel 
\tffffffffc0012345 bpf_prog_6deef7357e7b4530_tc_ingress_capt
\tffffffff81234567 tcx_run

other 
\tffffffffc0012345 bpf_prog_aaaaaaaaaaaaaaaa_sd_fw_ingress
\tffffffff81234567 __cgroup_bpf_run_filter_skb

idle 
\tffffffff81234567 default_idle
";
        assert_eq!(capture_samples(script), 3);
        assert!(is_capture_program(
            "bpf_prog_6deef7357e7b4530_sk_lookup_time"
        ));
        assert!(!is_capture_program("bpf_prog_6deef7357e7b4530_"));
        assert!(!is_capture_program("nf_hook_slow"));
        assert!(is_capture_program(
            "bpf_prog_f0489fc046b2b451_tc_ingress_capture"
        ));
    }

    fn opts(istio: Option<&str>, only: Vec<Scenario>) -> Options {
        Options {
            quick: false,
            only,
            profile: false,
            out_dir: PathBuf::new(),
            istio_ztunnel: istio.map(PathBuf::from),
            upgrade_only: false,
            latency_only: false,
            memory_only: false,
            memory_hook: None,
        }
    }

    /// One round's figures: every figure at 10 (S0 without the proxy-only ones), then
    /// `set` on top.
    fn round(s: Scenario, set: &[(&'static str, f64)]) -> BTreeMap<&'static str, f64> {
        let mut m: BTreeMap<&'static str, f64> = FIGURES
            .iter()
            .filter(|f| s.proxied() || !f.ztunnel_only)
            .map(|f| (f.key, 10.0))
            .collect();
        m.extend(set.iter().copied());
        m
    }

    /// S0, I and S2 as in issue 16's table (I and S2 given over three rounds, the middle
    /// one being the median).
    fn samples_with_istio() -> BTreeMap<Scenario, Vec<BTreeMap<&'static str, f64>>> {
        let s0 = [
            ("tput_1_gbps", 19.4),
            ("rr_fixed_p50_us", 92.6),
            ("rr_fixed_p99_us", 150.0),
            ("rr_max_p50_us", 68.7),
            ("rr_max_p99_us", 90.0),
            ("conn_per_sec", 15149.0),
        ];
        let istio = [
            ("tput_1_gbps", 6.56),
            ("rr_fixed_p50_us", 172.6),
            ("rr_fixed_p99_us", 250.0),
            ("rr_max_p50_us", 108.7),
            ("rr_max_p99_us", 190.0),
            ("conn_per_sec", 2875.0),
            ("cpu_s_per_gb", 1.43),
            ("rss_idle_mib", 17.0),
            ("kib_per_idle_conn", 6.6),
        ];
        let ours = [
            ("tput_1_gbps", 9.05),
            ("rr_fixed_p50_us", 148.0),
            ("rr_fixed_p99_us", 260.0),
            ("rr_max_p50_us", 128.7),
            ("rr_max_p99_us", 180.0),
            ("conn_per_sec", 3002.0),
            ("cpu_s_per_gb", 1.25),
            ("rss_idle_mib", 14.7),
            ("kib_per_idle_conn", 13.8),
        ];
        let spread = |s: Scenario, set: &[(&'static str, f64)]| {
            // A worse and a better round around the median one.
            let scaled = |k: f64| -> Vec<(&'static str, f64)> {
                set.iter().map(|(n, v)| (*n, v * k)).collect()
            };
            vec![
                round(s, &scaled(1.5)),
                round(s, set),
                round(s, &scaled(0.5)),
            ]
        };
        BTreeMap::from([
            (Scenario::S0, spread(Scenario::S0, &s0)),
            (Scenario::I, spread(Scenario::I, &istio)),
            (Scenario::S2, spread(Scenario::S2, &ours)),
        ])
    }

    fn target<'a>(r: &'a Report, name: &str) -> &'a Target {
        r.targets
            .iter()
            .find(|t| t.name.contains(name))
            .unwrap_or_else(|| panic!("no target {name:?} in {:?}", r.targets))
    }

    #[test]
    fn ours_get_their_ratio_to_istio_and_istio_and_s0_do_not() -> anyhow::Result<()> {
        let r = build_report(&opts(Some("/x"), vec![]), &samples_with_istio(), &[])?;
        let fig = |s: Scenario, k: &str| {
            r.scenarios
                .iter()
                .find(|x| x.scenario == s)
                .expect("scenario in the report")
                .figures[k]
                .clone()
        };
        let ours = fig(Scenario::S2, "tput_1_gbps");
        assert_eq!(ours.value, 9.05, "the median of the three rounds");
        assert!((ours.ratio_to_i.expect("ratio to I") - 9.05 / 6.56).abs() < 1e-9);
        assert!((ours.ratio_to_s0.expect("ratio to S0") - 9.05 / 19.4).abs() < 1e-9);
        let theirs = fig(Scenario::I, "tput_1_gbps");
        assert!((theirs.ratio_to_s0.expect("ratio to S0") - 6.56 / 19.4).abs() < 1e-9);
        assert_eq!(theirs.ratio_to_i, None);
        assert_eq!(fig(Scenario::S0, "tput_1_gbps").ratio_to_i, None);
        // Proxy-only figures have no S0 to compare with, but ours still has I.
        let rss = fig(Scenario::S2, "rss_idle_mib");
        assert_eq!(rss.ratio_to_s0, None);
        assert!((rss.ratio_to_i.expect("ratio to I") - 14.7 / 17.0).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn targets_are_stated_against_istio_when_it_ran() -> anyhow::Result<()> {
        let r = build_report(&opts(Some("/x"), vec![]), &samples_with_istio(), &[])?;
        assert_eq!(r.targets.len(), 9, "{:?}", r.targets);
        // Added p50 at 1,000 req/s: +55.4 µs against +80 µs is 0.69×, within 0.7×.
        let t = target(&r, "p50 at 1,000 req/s");
        assert_eq!(t.target, "≤ 0.7× I");
        assert!(t.met, "{t:?}");
        assert_eq!(t.measured, "S2 +55.4 µs vs I +80.0 µs: 0.69×");
        // Back to back: +60 against +40 is 1.5×.
        let t = target(&r, "p50 back to back");
        assert!(!t.met && t.measured.ends_with("1.50×"), "{t:?}");
        // p99 at fixed rate: +110 against +100, over 1×.
        assert!(!target(&r, "p99 at 1,000 req/s").met);
        assert!(target(&r, "p99 back to back").met);
        // 13.8 KiB against 6.6 is 2.09×, the target 0.5×.
        let t = target(&r, "memory per idle");
        assert!(!t.met && t.measured.contains("2.09×"), "{t:?}");
        // 9.05 / 6.56 = 1.38×, the target 1.5×.
        let t = target(&r, "single-stream");
        assert_eq!(t.target, "≥ 1.5× I");
        assert!(!t.met && t.measured.contains("1.38×"), "{t:?}");
        assert!(!target(&r, "CPU per GB").met);
        assert!(!target(&r, "new connections").met);
        assert!(target(&r, "idle RSS").met);

        let md = markdown(&r);
        assert!(md.contains("## Targets (S2 against I, same run)"), "{md}");
        assert!(md.contains("| 9.05 (0.47× S0, 1.38× I) |"), "{md}");
        assert!(md.contains("| 6.56 (0.34× S0) |"), "{md}");
        assert!(md.contains(" I Istio's ztunnel, dedicated mode, in-pod iptables |"));
        let svg = svg(&r);
        assert!(svg.contains(color(Scenario::I)));
        Ok(())
    }

    #[test]
    fn istio_adding_no_latency_fails_the_target_without_a_ratio() -> anyhow::Result<()> {
        let mut samples = samples_with_istio();
        for r in samples.get_mut(&Scenario::I).expect("I sampled") {
            r.insert("rr_max_p50_us", 68.7);
        }
        let r = build_report(&opts(Some("/x"), vec![]), &samples, &[])?;
        let t = target(&r, "p50 back to back");
        assert!(!t.met, "{t:?}");
        assert!(t.measured.ends_with("vs I +0.0 µs"), "{t:?}");
        Ok(())
    }

    #[test]
    fn without_istio_the_report_keeps_its_earlier_targets_and_no_ratios_to_i() -> anyhow::Result<()>
    {
        let mut samples = samples_with_istio();
        samples.remove(&Scenario::I);
        let r = build_report(&opts(None, vec![]), &samples, &[])?;
        assert_eq!(r.targets.len(), 7, "{:?}", r.targets);
        assert!(
            r.scenarios
                .iter()
                .flat_map(|s| s.figures.values())
                .all(|v| v.ratio_to_i.is_none())
        );
        let md = markdown(&r);
        assert!(!md.contains("× I"), "{md}");
        assert!(md.contains("`--istio-ztunnel PATH` adds it"), "{md}");
        Ok(())
    }

    #[test]
    fn scenario_i_runs_only_with_a_binary() -> anyhow::Result<()> {
        use Scenario::*;
        assert_eq!(opts(None, vec![]).scenarios()?, [S0, S1, S2, S3, S4]);
        assert_eq!(
            opts(Some("/x"), vec![]).scenarios()?,
            [S0, I, S1, S2, S3, S4]
        );
        assert_eq!(
            opts(Some("/x"), vec![S2, I, S0]).scenarios()?,
            [S0, I, S2],
            "table order whatever the order given"
        );
        let e = opts(None, vec![I])
            .scenarios()
            .expect_err("I without a binary");
        assert!(format!("{e}").contains("--istio-ztunnel"), "{e}");
        Ok(())
    }

    #[test]
    fn a_report_written_before_scenario_i_still_reads() -> anyhow::Result<()> {
        let v: Value = serde_json::from_str(r#"{"value": 2.5, "ratio_to_s0": 0.5}"#)?;
        assert_eq!(
            (v.value, v.ratio_to_s0, v.ratio_to_i),
            (2.5, Some(0.5), None)
        );
        Ok(())
    }

    #[test]
    fn topology_subnets_of_every_round_and_scenario_stay_distinct_and_valid() {
        let mut seen = std::collections::BTreeSet::new();
        for round in 0..MAX_ROUNDS {
            for s in Scenario::ALL {
                assert!(seen.insert(subnet(round, s)), "round {round} {s:?}");
            }
        }
        assert_eq!(seen.len(), MAX_ROUNDS * Scenario::ALL.len());
    }
}
