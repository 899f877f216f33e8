//! `cargo xtask vm-test`: the capture-relevant privileged integration tests inside
//! short-lived qemu VMs, one per kernel series. Debian's kernels are fetched with
//! `apt-get download` under a private APT configuration (never installed on the host)
//! and cached under `target/vm/`; each VM boots its kernel with a busybox initramfs that
//! holds the test binary, ztunnel, podapp, the tools the tests run and the kernel modules
//! they need, runs the tests, prints a result line and powers off.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::exec::{capture, command_line, exec};
use crate::workspace::{self, cargo};

mod initramfs;
mod kernel;

use initramfs::{Bins, build_common, build_initrd};
use kernel::{Kernel, fetch_kernel, mirror};

/// A kernel series of the matrix and the Debian suite that carries it.
struct Series {
    version: &'static str,
    /// Archive path on the mirror host: `debian` or `debian-security`.
    archive: &'static str,
    suite: &'static str,
}

const SERIES: &[Series] = &[
    Series {
        version: "5.10",
        archive: "debian-security",
        suite: "bullseye-security",
    },
    Series {
        version: "6.1",
        archive: "debian-security",
        suite: "bookworm-security",
    },
    Series {
        version: "6.12",
        archive: "debian-security",
        suite: "trixie-security",
    },
    Series {
        version: "6.18",
        archive: "debian",
        suite: "trixie-backports",
    },
    Series {
        version: "7.3",
        archive: "debian",
        suite: "trixie-backports",
    },
];

/// The oldest and the newest series: what `cargo xtask test` runs.
pub const EDGES: &[&str] = &["5.10", "7.3"];

/// What a test needs from the kernel to be meaningful there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Runs on every kernel: the capture path is whatever `--capture auto` picks.
    Any,
    /// Asserts eBPF capture itself (its programs, counters or pins): Linux >= 5.15, where
    /// sockops has netns cookies. Below that `auto` picks iptables and `ebpf` is refused,
    /// which the `kernel::` tests check instead.
    EbpfCapture,
}

/// The VM subset: the tests whose outcome depends on the kernel's capture path, chosen
/// to run in a few minutes under TCG. Policy, metrics, admin, transfer sizes and the
/// HBONE protocol tests exercise userspace only and run on the host.
const TESTS: &[(&str, Needs)] = &[
    (
        "kernel::auto_capture_takes_the_path_the_kernel_supports",
        Needs::Any,
    ),
    (
        "kernel::forced_ebpf_capture_is_refused_below_5_15_and_loads_above",
        Needs::Any,
    ),
    (
        "outbound::enrolled_pod_outbound_is_captured_and_app_view_is_unchanged",
        Needs::EbpfCapture,
    ),
    (
        "outbound::non_enrolled_pod_outbound_is_not_captured",
        Needs::EbpfCapture,
    ),
    (
        "outbound::pod_loopback_and_own_address_are_not_captured",
        Needs::EbpfCapture,
    ),
    (
        "outbound::captured_app_sees_the_addresses_of_an_uncaptured_connect",
        Needs::EbpfCapture,
    ),
    (
        "outbound::an_apps_own_bind_is_kept_and_a_port_only_bind_is_counted",
        Needs::EbpfCapture,
    ),
    (
        "inbound::inbound_to_enrolled_pod_arrives_on_15006_with_original_destination",
        Needs::EbpfCapture,
    ),
    ("inbound::hbone_port_is_not_captured", Needs::EbpfCapture),
    // A dial's own port choice on each kernel: a port bound with SO_REUSEADDR and refused
    // at bind or connect only where its tuple is in use, and the pod's port range read
    // in its netns.
    (
        "inbound::inbound_dials_and_client_connections_never_take_each_others_tuples",
        Needs::Any,
    ),
    (
        "enrolment::enrolment_keeps_existing_connections_and_unenrolment_leaves_nothing",
        Needs::EbpfCapture,
    ),
    (
        "enrolment::crashed_ztunnel_fails_closed_and_its_successor_takes_over",
        Needs::EbpfCapture,
    ),
    (
        "drain::after_the_drain_capture_and_return_path_stay_and_the_pod_fails_closed",
        Needs::EbpfCapture,
    ),
    (
        "dns::captured_queries_reach_the_proxy_and_answers_come_from_the_server_asked",
        Needs::EbpfCapture,
    ),
    ("tunnel::non_mesh_pod_is_reached_in_plain_tcp", Needs::Any),
    (
        "tunnel::pod_to_pod_across_nodes_is_mtls_on_the_wire_with_both_identities",
        Needs::Any,
    ),
    (
        "iptables::iptables_capture_carries_outbound_inbound_and_hbone",
        Needs::Any,
    ),
    (
        "iptables::iptables_unenrolment_removes_the_rules",
        Needs::Any,
    ),
    (
        "iptables::iptables_captured_app_sees_the_addresses_of_an_uncaptured_connect",
        Needs::Any,
    ),
    (
        "iptables::iptables_a_changed_spec_reenrols_the_pod_without_a_moment_uncaptured",
        Needs::Any,
    ),
    (
        "adversarial::config::a_changed_spec_reenrols_the_pod_without_a_moment_uncaptured",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::packets::fragmented_ipv4_syn_is_dropped_under_strict",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::packets::fragmented_ipv6_syn_is_dropped_under_strict",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::packets::ipv6_syn_behind_extension_headers_is_steered_to_ztunnel",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::packets::syn_to_the_pods_link_local_address_is_steered_to_ztunnel",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::packets::truncated_tcp_headers_are_dropped_and_counted",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::packets::syn_matching_a_time_wait_socket_passes_ztunnel",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::orig_dst::full_orig_dst_map_refuses_connects_and_nothing_goes_direct",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::orig_dst::failed_connects_leave_no_orig_dst_entry",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::orig_dst::an_lru_map_pinned_by_an_older_build_is_replaced",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::ports::app_ports_in_ztunnels_range_are_tunnelled_to_the_app",
        Needs::Any,
    ),
    (
        "adversarial::ports::outside_connects_to_ztunnels_pod_ports_are_refused",
        Needs::EbpfCapture,
    ),
    (
        "adversarial::ports::outside_connects_to_ztunnels_pod_ports_are_refused_under_iptables",
        Needs::Any,
    ),
    // Upgrades: the listening sockets handed over, the capture replaced without a gap
    // (TCX links or clsact's filter slot), per-pod state kept.
    (
        "upgrade::upgrade_takes_every_pod_over_without_a_failed_connection",
        Needs::EbpfCapture,
    ),
    (
        "upgrade::a_successor_crashing_during_the_overlap_leaves_the_old_ztunnel_serving",
        Needs::EbpfCapture,
    ),
    (
        "upgrade::the_old_ztunnel_crashing_during_the_overlap_leaves_the_new_one_serving",
        Needs::EbpfCapture,
    ),
    (
        "upgrade::a_ztunnel_that_cannot_take_over_never_cleans_up_after_the_running_one",
        Needs::EbpfCapture,
    ),
    // Diagnostics: the decision events' ring buffer and level map on every kernel the
    // programs load on (the verifier sees each log site even when off), and the
    // kernel's per-program statistics (BPF_ENABLE_STATS).
    (
        "diagnostics::capture_log_names_the_pod_and_reason_of_each_decision_only_when_on",
        Needs::EbpfCapture,
    ),
    (
        "diagnostics::bpf_stats_count_the_programs_a_transfer_ran",
        Needs::EbpfCapture,
    ),
];

/// Printed by `/init` after the tests: `ZTUNNEL-VM-RESULT exit=<status>`.
const RESULT_MARK: &str = "ZTUNNEL-VM-RESULT exit=";
const RELEASE_MARK: &str = "ZTUNNEL-VM-KERNEL ";

/// Under TCG one VM of the matrix takes a few minutes; this only catches a hung VM.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accel {
    /// Emulation: works everywhere, slower
    #[default]
    Tcg,
    /// Hardware virtualisation through /dev/kvm
    Kvm,
}

#[derive(clap::Args)]
pub struct Options {
    /// Kernel series to boot, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = SERIES.iter().map(|s| s.version.to_owned()))]
    pub kernel: Vec<String>,
    /// qemu accelerator
    #[arg(long, value_enum, default_value_t)]
    pub accel: Accel,
    /// VMs at once (default: the number of cores)
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Run only the matrix's tests whose name contains this (repeatable; default: all)
    #[arg(long = "test", value_name = "NAME")]
    pub only: Vec<String>,
}

/// Tests counted over the whole matrix.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub passed: u64,
    pub failed: u64,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let summary = run_matrix(options)?;
    println!(
        "vm-test: {} passed, {} failed",
        summary.passed, summary.failed
    );
    ensure!(summary.failed == 0, "{} VM test(s) failed", summary.failed);
    Ok(())
}

/// Builds, fetches, boots and reports; the table and any failing test's log go to stdout.
pub fn run_matrix(options: &Options) -> anyhow::Result<Summary> {
    let series: Vec<&Series> = options
        .kernel
        .iter()
        .map(|v| {
            SERIES.iter().find(|s| s.version == v).with_context(|| {
                let known: Vec<&str> = SERIES.iter().map(|s| s.version).collect();
                format!("unknown kernel series {v}; known: {}", known.join(", "))
            })
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(!series.is_empty(), "no kernel series given");
    let selected: Vec<(&str, Needs)> = TESTS
        .iter()
        .filter(|(name, _)| {
            options.only.is_empty() || options.only.iter().any(|f| name.contains(f.as_str()))
        })
        .copied()
        .collect();
    ensure!(
        !selected.is_empty(),
        "no test of the matrix matches {:?}",
        options.only
    );
    if options.accel == Accel::Kvm {
        ensure!(
            Path::new("/dev/kvm").exists(),
            "--accel kvm needs /dev/kvm; use --accel tcg"
        );
    }

    let dir = workspace::target_dir()?.join("vm");
    fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let bins = build()?;
    let common = dir.join("common.cpio");
    build_common(&bins, &dir.join("common"), &common)?;

    let mirror = mirror()?;
    let jobs = options
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let per_series: Vec<Vec<&str>> = series
        .iter()
        .map(|s| {
            selected
                .iter()
                .filter(|(_, needs)| applies(s, *needs))
                .map(|(name, _)| *name)
                .collect()
        })
        .collect();
    let cap = per_vm_cap(per_series.iter().flatten().map(|t| weight(t)).sum(), jobs);
    let mut vms = Vec::new();
    for (s, tests) in series.iter().zip(&per_series) {
        let kernel = fetch_kernel(s, &mirror, &dir)?;
        let parts = split(tests, cap);
        let count = parts.len();
        for (i, tests) in parts.into_iter().enumerate() {
            let (name, vm_dir) = if count == 1 {
                (s.version.to_owned(), dir.join(format!("run-{}", s.version)))
            } else {
                (
                    format!("{} #{}", s.version, i + 1),
                    dir.join(format!("run-{}-{}", s.version, i + 1)),
                )
            };
            let initrd = build_initrd(&kernel, &common, &tests, &vm_dir)?;
            vms.push(Vm {
                series: s.version,
                name,
                kernel: kernel.clone(),
                tests,
                initrd,
                dir: vm_dir,
            });
        }
    }

    // The VMs with the most work first (the queue pops from its end).
    let mut queue: Vec<&Vm> = vms.iter().collect();
    queue.sort_by_key(|vm| vm.tests.iter().map(|t| weight(t)).sum::<usize>());
    let queue = Mutex::new(queue);
    let results = Mutex::new(BTreeMap::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(vms.len()) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().expect("queue lock").pop();
                    let Some(vm) = next else { break };
                    let outcome = vm.boot(options.accel);
                    results
                        .lock()
                        .expect("results lock")
                        .insert(vm.name.clone(), outcome);
                }
            });
        }
    });
    let results = results.into_inner().expect("results lock");
    Ok(report(&series, &selected, &vms, &results))
}

/// A test's share of a VM's time under TCG, in units of an ordinary test (13–22 s on
/// 7.3 with two VMs at once). The upgrade under load (a steady stream of calls, two held
/// connections and a 4 MiB transfer across the handover, then the drain) took ~300 s and
/// the other upgrade tests, a second ztunnel started and stopped, ~90 s each; with these
/// weights `cargo xtask test`'s two cores finish within 20 s of each other (7.3 #1 635 s,
/// 7.3 #2 483 s then 5.10 172 s).
fn weight(test: &str) -> usize {
    if test == "upgrade::upgrade_takes_every_pod_over_without_a_failed_connection" {
        35
    } else if test.starts_with("upgrade::") {
        7
    } else {
        1
    }
}

/// Least work worth a VM of its own: under TCG a boot costs about as much as a test.
const MIN_WEIGHT_PER_VM: usize = 8;

/// The most work (in [`weight`]s) one VM takes when work `total` goes to `jobs` VMs at
/// once, so that the jobs finish together: a series with more than this (7.3 in `cargo
/// xtask test`, 90 against 5.10's 10) is split over several VMs instead of leaving the
/// other jobs idle while it runs.
fn per_vm_cap(total: usize, jobs: usize) -> usize {
    total.div_ceil(jobs.max(1)).max(MIN_WEIGHT_PER_VM)
}

/// One series' tests split into VMs of at most `cap` work: full VMs and one holding the
/// rest. The heaviest tests are dealt first, each to the VM least full for its size, so
/// that the long upgrade tests do not pile up in one VM. No tests, no VM (an `/init`
/// naming no test would run them all).
fn split<'a>(tests: &[&'a str], cap: usize) -> Vec<Vec<&'a str>> {
    let cap = cap.max(1);
    let total: usize = tests.iter().map(|t| weight(t)).sum();
    let count = total.div_ceil(cap);
    let sizes: Vec<usize> = (0..count).map(|i| cap.min(total - i * cap)).collect();
    let mut parts: Vec<Vec<&str>> = vec![Vec::new(); count];
    let mut loads = vec![0usize; count];
    let mut order = tests.to_vec();
    order.sort_by_key(|t| std::cmp::Reverse(weight(t)));
    for test in order {
        // Every test weighs at least 1, so a test means at least one VM.
        let part = (0..count)
            .min_by(|a, b| (loads[*a] * sizes[*b]).cmp(&(loads[*b] * sizes[*a])))
            .expect("tests make at least one VM");
        loads[part] += weight(test);
        parts[part].push(test);
    }
    parts
}

fn applies(series: &Series, needs: Needs) -> bool {
    match needs {
        Needs::Any => true,
        Needs::EbpfCapture => version(series.version) >= (5, 15),
    }
}

fn version(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn build() -> anyhow::Result<Bins> {
    // As `cargo xtask test` builds them, so that after it this compiles nothing: the
    // daemon with its own features, podapp with the tests (`workspace::cargo_test`).
    exec(cargo().args(["build", "-p", "ztunnel", "--bins"]))?;
    let mut cmd = workspace::cargo_test();
    cmd.args(["--test", "it", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"]);
    eprintln!("$ {}", command_line(&cmd));
    let out = capture(&mut cmd)?;
    let it = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "it")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the `it` test executable")?;
    let debug = workspace::target_dir()?.join("debug");
    Ok(Bins {
        ztunnel: debug.join("ztunnel"),
        podapp: debug.join("podapp"),
        it,
    })
}

fn mkdir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("failed to create {}", path.display()))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        mkdir(parent)?;
    }
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("failed to copy {} to {}", from.display(), to.display()))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

struct Vm {
    series: &'static str,
    /// The series, or `<series> #<n>` when its tests are split over several VMs.
    name: String,
    kernel: Kernel,
    tests: Vec<&'static str>,
    initrd: PathBuf,
    dir: PathBuf,
}

/// What one VM reported.
struct Outcome {
    /// Test name → passed.
    tests: BTreeMap<String, bool>,
    /// `uname -r` inside the VM.
    release: Option<String>,
    /// The test binary's exit status; `None` when the VM never got that far.
    exit: Option<i32>,
    elapsed: Duration,
    log: String,
    console: PathBuf,
    error: Option<String>,
}

impl Vm {
    fn boot(&self, accel: Accel) -> Outcome {
        let started = Instant::now();
        let console = self.dir.join("console.log");
        let tests_log = self.dir.join("tests.log");
        eprintln!(
            "vm-test: {}: booting {} ({} tests)",
            self.name,
            self.kernel.package,
            self.tests.len()
        );
        let error = self
            .qemu(accel, &console, &tests_log)
            .err()
            .map(|e| format!("{e:#}"));
        let log = fs::read_to_string(&tests_log).unwrap_or_default();
        let outcome = parse(&log, started.elapsed(), console, error);
        eprintln!(
            "vm-test: {}: done in {:.0?} ({} passed, {} failed)",
            self.name,
            outcome.elapsed,
            outcome.tests.values().filter(|ok| **ok).count(),
            outcome.tests.values().filter(|ok| !**ok).count()
        );
        outcome
    }

    fn qemu(&self, accel: Accel, console: &Path, tests_log: &Path) -> anyhow::Result<()> {
        let mut cmd = Command::new("qemu-system-x86_64");
        match accel {
            Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        };
        cmd.args([
            "-M",
            "pc",
            "-m",
            "2048",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-kernel"])
        .arg(&self.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&self.initrd)
        // The CPU's RNG seeds the kernel's at once: getrandom() does not wait for
        // entropy on kernels that would (5.10).
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet random.trust_cpu=on",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", tests_log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let line = command_line(&cmd);
        eprintln!("$ {line}");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("failed to start {line}"))?;
        let deadline = Instant::now() + VM_TIMEOUT;
        loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("failed to wait for {line}"))?
            {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut stderr);
                }
                ensure!(
                    status.success(),
                    "qemu failed ({status}): {}",
                    stderr.trim()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the VM did not power off within {VM_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Reads libtest's `test <name> ... ok|FAILED` lines and `/init`'s marks.
fn parse(log: &str, elapsed: Duration, console: PathBuf, error: Option<String>) -> Outcome {
    let mut tests = BTreeMap::new();
    let mut release = None;
    let mut exit = None;
    for line in log.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(r) = line.strip_prefix(RELEASE_MARK) {
            release = Some(r.trim().to_owned());
        } else if let Some(code) = line.strip_prefix(RESULT_MARK) {
            exit = code.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, result)) = rest.rsplit_once(" ... ")
        {
            match result.trim() {
                "ok" => {
                    tests.insert(name.to_owned(), true);
                }
                "FAILED" => {
                    tests.insert(name.to_owned(), false);
                }
                _ => {}
            }
        }
    }
    Outcome {
        tests,
        release,
        exit,
        elapsed,
        log: log.to_owned(),
        console,
        error,
    }
}

/// Prints the kernel × test table, every failing VM's log, and returns the counts. A
/// test the VM should have run but did not report counts as failed.
fn report(
    series: &[&Series],
    tests: &[(&str, Needs)],
    vms: &[Vm],
    results: &BTreeMap<String, Outcome>,
) -> Summary {
    let mut summary = Summary::default();
    let width = tests.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut header = format!("{:width$}", "test \\ kernel");
    for s in series {
        header += &format!(" {:>6}", s.version);
    }
    println!("\n{header}");
    for (name, needs) in tests {
        let mut row = format!("{name:width$}");
        for s in series {
            let cell = if !applies(s, *needs) {
                "n/a"
            } else {
                let outcome = vms
                    .iter()
                    .find(|vm| vm.series == s.version && vm.tests.contains(name))
                    .and_then(|vm| results.get(&vm.name))
                    .and_then(|o| o.tests.get(*name));
                match outcome {
                    Some(true) => {
                        summary.passed += 1;
                        "ok"
                    }
                    Some(false) => {
                        summary.failed += 1;
                        "FAIL"
                    }
                    None => {
                        summary.failed += 1;
                        "-"
                    }
                }
            };
            row += &format!(" {cell:>6}");
        }
        println!("{row}");
    }
    println!(
        "n/a: asserts eBPF capture, which needs netns cookies in sockops (Linux >= 5.15); \
         there --capture auto uses iptables and --capture ebpf is refused (kernel:: tests)"
    );
    println!("-: not reported (the VM failed before the test finished)");
    for vm in vms {
        let Some(o) = results.get(&vm.name) else {
            continue;
        };
        println!(
            "{:>7}: {} ({}), {}, {} tests, {:.0?}{}",
            vm.name,
            o.release.as_deref().unwrap_or("did not boot"),
            vm.kernel.package,
            capture_path(version(vm.series)),
            vm.tests.len(),
            o.elapsed,
            o.error
                .as_deref()
                .map(|e| format!(", {e}"))
                .unwrap_or_default()
        );
    }
    for vm in vms {
        let Some(o) = results.get(&vm.name) else {
            continue;
        };
        let missing = vm.tests.iter().any(|n| !o.tests.contains_key(*n));
        if o.exit != Some(0) || o.tests.values().any(|ok| !ok) || missing {
            println!(
                "\n==== {} ({}): test output ====\n{}",
                vm.name, vm.kernel.package, o.log
            );
            let console = fs::read_to_string(&o.console).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(40).collect();
            println!(
                "==== {}: last lines of the console ({}) ====",
                vm.name,
                o.console.display()
            );
            for l in tail.iter().rev() {
                println!("{l}");
            }
            if o.exit.is_some_and(|c| c != 0) && !o.tests.values().any(|ok| !ok) {
                summary.failed += 1;
            }
        }
    }
    summary
}

/// The capture path `--capture auto` must take on a kernel, as `kernel::` asserts.
fn capture_path(kernel: (u32, u32)) -> &'static str {
    if kernel < (5, 15) {
        "iptables capture (no netns cookies in sockops)"
    } else if kernel < (6, 6) {
        "eBPF capture, tc on clsact (no TCX)"
    } else {
        "eBPF capture, tc on TCX"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines_and_init_marks_are_read() {
        let log = "ZTUNNEL-VM-KERNEL 5.10.0-46-amd64\r\nrunning 2 tests\r\ntest a::b ... ok\r\ntest a::c ... FAILED\r\nZTUNNEL-VM-RESULT exit=101\r\n";
        let o = parse(log, Duration::ZERO, PathBuf::new(), None);
        assert_eq!(o.release.as_deref(), Some("5.10.0-46-amd64"));
        assert_eq!(o.exit, Some(101));
        assert_eq!(o.tests.get("a::b"), Some(&true));
        assert_eq!(o.tests.get("a::c"), Some(&false));
    }

    #[test]
    fn the_edges_split_so_both_jobs_do_the_same_work() {
        let old: Vec<&str> = TESTS
            .iter()
            .filter(|(_, needs)| *needs == Needs::Any)
            .map(|(n, _)| *n)
            .collect();
        let new: Vec<&str> = TESTS.iter().map(|(n, _)| *n).collect();
        let work = |tests: &[&str]| tests.iter().map(|t| weight(t)).sum::<usize>();
        let cap = per_vm_cap(work(&old) + work(&new), 2);
        assert_eq!(split(&old, cap).len(), 1);
        let parts = split(&new, cap);
        assert_eq!(parts.len(), 2);
        // Every test once; the smaller VM and the old kernel's
        // together about as much work as the larger.
        let mut all: Vec<&str> = parts.concat();
        all.sort_unstable();
        let mut want = new.clone();
        want.sort_unstable();
        assert_eq!(all, want);
        // The upgrade under load in one VM, the three other upgrade tests in the other.
        let upgrades: Vec<usize> = parts
            .iter()
            .map(|p| p.iter().filter(|n| n.starts_with("upgrade::")).count())
            .collect();
        assert_eq!(upgrades, [1, 3]);
        let (a, b) = (work(&parts[0]), work(&parts[1]) + work(&old));
        assert!(a.abs_diff(b) <= 2, "{a} against {b}");
    }

    #[test]
    fn a_matrix_with_a_vm_per_job_or_little_work_is_not_split() {
        let tests: Vec<&str> = (0..38).map(|_| "t").collect();
        // Five series on two cores: far more work than one series a VM.
        assert_eq!(split(&tests, per_vm_cap(5 * 38, 2)).len(), 1);
        // Many cores: never less than MIN_WEIGHT_PER_VM a VM but the last.
        let parts = split(&tests, per_vm_cap(48, 64));
        assert_eq!(parts.len(), 5);
        assert!(parts.iter().all(|p| p.len() >= 6), "{parts:?}");
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 38);
        assert_eq!(split(&[], per_vm_cap(0, 2)), Vec::<Vec<&str>>::new());
    }

    #[test]
    fn ebpf_tests_apply_from_5_15() {
        let old = &SERIES[0];
        assert!(!applies(old, Needs::EbpfCapture));
        assert!(applies(old, Needs::Any));
        assert!(SERIES[1..].iter().all(|s| applies(s, Needs::EbpfCapture)));
    }
}
