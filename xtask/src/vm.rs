//! `cargo xtask vm-test`: the capture-relevant privileged integration tests inside
//! short-lived qemu VMs, one per kernel series. Debian's kernels are fetched with
//! `apt-get download` under a private APT configuration (never installed on the host)
//! and cached under `target/vm/`; each VM boots its kernel with a busybox initramfs that
//! holds the test binary, ztunnel, podapp, the tools the tests run and the kernel modules
//! they need, runs the tests, prints a result line and powers off.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::exec::{capture, command_line, exec};
use crate::workspace::{self, cargo};

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
        "inbound::inbound_to_enrolled_pod_arrives_on_15006_with_original_destination",
        Needs::EbpfCapture,
    ),
    ("inbound::hbone_port_is_not_captured", Needs::EbpfCapture),
    (
        "enrolment::enrolment_keeps_existing_connections_and_unenrolment_leaves_nothing",
        Needs::EbpfCapture,
    ),
    (
        "enrolment::crashed_ztunnel_fails_closed_and_its_successor_takes_over",
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
];

/// Kernel modules the tests use (with their dependencies); built-in ones are skipped.
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "af_packet",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "xt_REDIRECT",
    "xt_mark",
    "xt_multiport",
    "xt_tcpudp",
];

/// Modules of their own on some kernels only, part of another module on the rest:
/// `nft_counter` (every iptables-nft rule has a counter) joined `nf_tables` in 5.11.
const OPTIONAL_MODULES: &[&str] = &["nft_counter"];

/// Host programs copied into the VM (found on PATH), with their shared libraries.
const TOOLS: &[&str] = &[
    "ip",
    "tc",
    "sysctl",
    "tcpdump",
    "bpftool",
    "iptables",
    "ip6tables",
];

/// iptables' extensions, loaded with dlopen (Debian's multiarch path).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

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
    let mut vms = Vec::new();
    for s in &series {
        let kernel = fetch_kernel(s, &mirror, &dir)?;
        let tests: Vec<&str> = TESTS
            .iter()
            .filter(|(_, needs)| applies(s, *needs))
            .map(|(name, _)| *name)
            .collect();
        let vm_dir = dir.join(format!("run-{}", s.version));
        let initrd = build_initrd(&kernel, &common, &tests, &vm_dir)?;
        vms.push(Vm {
            series: s.version,
            kernel,
            initrd,
            dir: vm_dir,
        });
    }

    let jobs = options
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let queue = Mutex::new(vms.iter().collect::<Vec<_>>());
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
                        .insert(vm.series, outcome);
                }
            });
        }
    });
    let results = results.into_inner().expect("results lock");
    Ok(report(&series, &vms, &results))
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

/// The binaries that go into the VM.
struct Bins {
    ztunnel: PathBuf,
    podapp: PathBuf,
    it: PathBuf,
}

fn build() -> anyhow::Result<Bins> {
    exec(cargo().args(["build", "-p", "ztunnel", "-p", "ztunnel-tests", "--bins"]))?;
    let mut cmd = cargo();
    cmd.args(["test", "-p", "ztunnel-tests", "--test", "it", "--no-run"])
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

/// The part of the initramfs every kernel shares: busybox, our binaries, the tools and
/// their libraries, a minimal /etc. Laid out merged-/usr like the host.
fn build_common(bins: &Bins, root: &Path, out: &Path) -> anyhow::Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("failed to remove {}", root.display()))?;
    }
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "busybox",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "var",
        "root",
    ] {
        mkdir(&root.join(d))?;
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("var/run", "../run"),
    ] {
        symlink(to, root.join(link))
            .with_context(|| format!("failed to link {link} in {}", root.display()))?;
    }

    // Busybox provides the shell and the init-time commands, in its own directory so
    // that its applets (ip, tc, sysctl) never shadow the real tools.
    let busybox = which("busybox")?;
    copy(&busybox, &root.join("busybox/busybox"))?;
    for applet in capture(Command::new(&busybox).arg("--list"))?.lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            symlink("busybox", root.join("busybox").join(applet))
                .with_context(|| format!("failed to link busybox applet {applet}"))?;
        }
    }

    let mut elves = Vec::new();
    for (src, name) in [
        (&bins.ztunnel, "ztunnel"),
        (&bins.podapp, "podapp"),
        (&bins.it, "it"),
    ] {
        let dst = root.join("usr/bin").join(name);
        // Debug info is most of a debug build; the VM does not need it.
        exec(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(src)
                .arg(&dst),
        )?;
        elves.push(src.clone());
    }
    for tool in TOOLS {
        let path = which(tool)?;
        let real = fs::canonicalize(&path)
            .with_context(|| format!("failed to resolve {}", path.display()))?;
        copy(&real, &inside(root, &real))?;
        let name_dir = canonical_dir(&path)?;
        let link = inside(root, &name_dir.join(tool));
        if !link.exists() {
            symlink(&real, &link).with_context(|| format!("failed to link {}", link.display()))?;
        }
        elves.push(real);
    }
    for entry in
        fs::read_dir(XTABLES_DIR).with_context(|| format!("failed to read {XTABLES_DIR}"))?
    {
        let path = entry
            .with_context(|| format!("failed to read {XTABLES_DIR}"))?
            .path();
        copy(&path, &inside(root, &path))?;
        elves.push(path);
    }
    let mut libs = BTreeSet::new();
    for elf in &elves {
        libs.extend(shared_libraries(elf)?);
    }
    for lib in &libs {
        let dst = inside(
            root,
            &canonical_dir(lib)?.join(lib.file_name().context("library path")?),
        );
        if !dst.exists() {
            copy(lib, &dst)?;
        }
    }

    let etc = root.join("etc");
    // tcpdump drops to its own user when reading a capture back.
    write(
        &etc.join("passwd"),
        "root:x:0:0:root:/root:/busybox/sh\ntcpdump:x:101:101::/nonexistent:/busybox/false\n",
    )?;
    write(&etc.join("group"), "root:x:0:\ntcpdump:x:101:\n")?;
    write(
        &etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files\n",
    )?;
    for f in ["/etc/protocols", "/etc/services"] {
        if Path::new(f).exists() {
            copy(Path::new(f), &inside(root, Path::new(f)))?;
        }
    }
    cpio(root, out)
}

/// `ldd`'s absolute paths, the dynamic loader included.
fn shared_libraries(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .with_context(|| format!("failed to run ldd {}", elf.display()))?;
    // A static binary makes ldd fail with "not a dynamic executable": no libraries.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            bail!("{}: {}", elf.display(), line.trim());
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// The canonical directory of `path` (through /lib → /usr/lib and the like), keeping
/// the file name: a library must keep its soname even when it is a symlink.
fn canonical_dir(path: &Path) -> anyhow::Result<PathBuf> {
    let parent = path.parent().context("path without a directory")?;
    fs::canonicalize(parent).with_context(|| format!("failed to resolve {}", parent.display()))
}

/// `path` (absolute, on the host) inside `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found; `cargo xtask setup` installs it"))
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

/// A newc cpio archive of everything under `root`, owned by root, as the kernel unpacks
/// an initramfs.
fn cpio(root: &Path, out: &Path) -> anyhow::Result<()> {
    let file =
        fs::File::create(out).with_context(|| format!("failed to create {}", out.display()))?;
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet"])
        .current_dir(root)
        .stdout(file);
    let line = command_line(&cmd);
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {line}"))?;
    ensure!(
        status.success(),
        "{line} in {} failed: {status}",
        root.display()
    );
    Ok(())
}

/// The Debian mirror host the host's own APT uses, e.g. `http://deb.debian.org`.
fn mirror() -> anyhow::Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let name = file.to_string_lossy();
        if !(name.ends_with(".list") || name.ends_with(".sources")) {
            continue;
        }
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if let Some(host) = mirror_in(&text) {
            return Ok(host);
        }
    }
    bail!(
        "no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d (an http(s) URI ending in /debian)"
    )
}

/// The first `scheme://host` whose URI path is `/debian` or `/debian-security`, from a
/// one-line (`deb [opts] URI suite …`) or deb822 (`URIs: …`) sources file.
fn mirror_in(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.starts_with("http://") || w.starts_with("https://"))
        .find_map(|uri| {
            let uri = uri.trim_end_matches('/');
            let (base, last) = uri.rsplit_once('/')?;
            (matches!(last, "debian" | "debian-security")
                && base.contains("://")
                && !base.ends_with(':'))
            .then(|| base.to_owned())
        })
}

/// A kernel unpacked from its .debs.
struct Kernel {
    package: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The private APT setup of one suite: its own sources list, lists and cache dirs.
fn apt(dir: &Path, mirror: &str, s: &Series) -> anyhow::Result<PathBuf> {
    let apt = dir.join("apt").join(s.suite);
    for d in [
        "state/lists/partial",
        "cache/archives/partial",
        "etc/apt.conf.d",
        "etc/preferences.d",
        "etc/sources.list.d",
    ] {
        mkdir(&apt.join(d))?;
    }
    let status = apt.join("state/status");
    if !status.exists() {
        write(&status, "")?;
    }
    write(
        &apt.join("etc/sources.list"),
        &format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror}/{} {} main\n",
            s.archive, s.suite
        ),
    )?;
    let a = apt.display();
    let conf = apt.join("apt.conf");
    write(
        &conf,
        &format!(
            "Dir::State \"{a}/state\";\n\
             Dir::State::status \"{a}/state/status\";\n\
             Dir::Cache \"{a}/cache\";\n\
             Dir::Etc::SourceList \"{a}/etc/sources.list\";\n\
             Dir::Etc::SourceParts \"{a}/etc/sources.list.d\";\n\
             Dir::Etc::Parts \"{a}/etc/apt.conf.d\";\n\
             Dir::Etc::Preferences \"{a}/etc/preferences\";\n\
             Dir::Etc::PreferencesParts \"{a}/etc/preferences.d\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Sandbox::User \"root\";\n\
             Acquire::Languages \"none\";\n"
        ),
    )?;
    Ok(conf)
}

/// Resolves the newest `linux-image-<series>…-amd64[-unsigned]` of the suite, downloads
/// it (and, for the split packaging of newer kernels, its `linux-binary-`/`linux-modules-`
/// parts) and unpacks it under `target/vm/kernels/<package>/`. Offline, the newest
/// cached kernel of the series is used.
fn fetch_kernel(s: &Series, mirror: &str, dir: &Path) -> anyhow::Result<Kernel> {
    let conf = apt(dir, mirror, s)?;
    let kernels = dir.join("kernels");
    let apt_cmd = |program: &str| {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &conf);
        cmd
    };
    if let Err(e) = capture(apt_cmd("apt-get").args(["-qq", "update"])) {
        let cached = newest_cached(&kernels, s)?;
        let Some(cached) = cached else {
            return Err(e.context(format!(
                "failed to update the package lists of {} and no {} kernel is cached",
                s.suite, s.version
            )));
        };
        eprintln!(
            "vm-test: {}: package lists not updated ({e:#}); using cached {}",
            s.version, cached.package
        );
        return Ok(cached);
    }
    let names = capture(apt_cmd("apt-cache").args(["search", "--names-only", "^linux-image-"]))?;
    let Some(package) = newest_image(
        s.version,
        names.lines().filter_map(|l| l.split(" - ").next()),
    ) else {
        // The suite moved on (backports keep only recent kernels): the cache still has it.
        if let Some(cached) = newest_cached(&kernels, s)? {
            eprintln!(
                "vm-test: {}: no longer in {}; using cached {}",
                s.version, s.suite, cached.package
            );
            return Ok(cached);
        }
        bail!("no linux-image-{}…-amd64 package in {}", s.version, s.suite);
    };
    let unpacked = kernels.join(&package);
    if let Some(k) = load_cached(&unpacked)? {
        return Ok(k);
    }

    // The ABI string (e.g. `7.3.4+deb13-amd64`) names the package's own parts.
    let abi = package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_owned();
    let depends = capture(apt_cmd("apt-cache").args(["depends", &package]))?;
    let mut packages = vec![package.clone()];
    packages.extend(
        depends
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .filter(|d| d.starts_with("linux-") && d.ends_with(&abi))
            .map(str::to_owned),
    );
    let debs = unpacked.join("debs");
    if unpacked.exists() {
        fs::remove_dir_all(&unpacked)
            .with_context(|| format!("failed to remove {}", unpacked.display()))?;
    }
    mkdir(&debs)?;
    exec(
        apt_cmd("apt-get")
            .args(["-qq", "download"])
            .args(&packages)
            .current_dir(&debs),
    )?;
    let root = unpacked.join("root");
    for deb in fs::read_dir(&debs).with_context(|| format!("failed to read {}", debs.display()))? {
        let deb = deb
            .with_context(|| format!("failed to read {}", debs.display()))?
            .path();
        exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    write(&unpacked.join("series"), s.version)?;
    load_cached(&unpacked)?
        .with_context(|| format!("{package} has no vmlinuz or no modules directory"))
}

/// The newest `linux-image-<version>[.-]…-amd64` (signed or `-unsigned`) among `names`,
/// comparing the ABI strings' numbers.
fn newest_image<'a>(version: &str, names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter(|n| {
            let Some(abi) = n.strip_prefix("linux-image-") else {
                return false;
            };
            let Some(rest) = abi.strip_prefix(version) else {
                return false;
            };
            let flavour = abi.trim_end_matches("-unsigned");
            // `6.1.0-56`, not `6.12…` nor the meta package `6.1-amd64`.
            let mut after = rest.chars();
            matches!(after.next(), Some('.' | '-'))
                && after.next().is_some_and(|c| c.is_ascii_digit())
                && flavour.ends_with("-amd64")
                && !flavour.ends_with("-cloud-amd64")
                && !flavour.ends_with("-rt-amd64")
                && !flavour.ends_with("-dbg")
        })
        .max_by(|a, b| {
            natural_key(a)
                .cmp(&natural_key(b))
                // The same kernel signed or not: take the unsigned one, it needs nothing else.
                .then(a.ends_with("-unsigned").cmp(&b.ends_with("-unsigned")))
        })
        .map(str::to_owned)
}

/// The runs of digits in `s`, for version ordering (`6.12.118+deb13` > `6.12.115+deb13.1`).
fn natural_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(u64::MAX))
        .collect()
}

fn newest_cached(kernels: &Path, s: &Series) -> anyhow::Result<Option<Kernel>> {
    let Ok(entries) = fs::read_dir(kernels) else {
        return Ok(None);
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        if fs::read_to_string(e.path().join("series")).is_ok_and(|v| v == s.version) {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let Some(newest) = newest_image(s.version, found.iter().map(String::as_str)) else {
        return Ok(None);
    };
    load_cached(&kernels.join(newest))
}

/// An unpacked kernel: `boot/vmlinuz-*` or `usr/lib/modules/<release>/vmlinuz`, and the
/// modules directory; `None` when not (completely) unpacked.
fn load_cached(unpacked: &Path) -> anyhow::Result<Option<Kernel>> {
    if !unpacked.join("series").exists() {
        return Ok(None);
    }
    let root = unpacked.join("root");
    let package = unpacked
        .file_name()
        .context("kernel directory name")?
        .to_string_lossy()
        .into_owned();
    for base in ["lib/modules", "usr/lib/modules"] {
        let Ok(entries) = fs::read_dir(root.join(base)) else {
            continue;
        };
        for e in entries.flatten() {
            let modules = e.path();
            let release = e.file_name().to_string_lossy().into_owned();
            let vmlinuz = [
                root.join("boot").join(format!("vmlinuz-{release}")),
                modules.join("vmlinuz"),
            ]
            .into_iter()
            .find(|p| p.is_file());
            if let Some(vmlinuz) = vmlinuz
                && modules.join("kernel").is_dir()
            {
                return Ok(Some(Kernel {
                    package,
                    vmlinuz,
                    modules,
                }));
            }
        }
    }
    Ok(None)
}

/// `/init`, the kernel modules (decompressed, in load order) and the common part, as
/// one initramfs (the kernel unpacks concatenated cpio archives in order).
fn build_initrd(
    kernel: &Kernel,
    common: &Path,
    tests: &[&str],
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)
            .with_context(|| format!("failed to remove {}", root.display()))?;
    }
    mkdir(&root.join("modules"))?;
    let order = modules(&kernel.modules, &root.join("modules"))?;
    write(&root.join("modules/order"), &(order.join("\n") + "\n"))?;
    let init = root.join("init");
    write(&init, &init_script(tests))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("failed to make {} executable", init.display()))?;
    let own = dir.join("kernel.cpio");
    cpio(&root, &own)?;
    let initrd = dir.join("initrd.cpio");
    let mut out = fs::File::create(&initrd)
        .with_context(|| format!("failed to create {}", initrd.display()))?;
    for part in [common, own.as_path()] {
        let mut f =
            fs::File::open(part).with_context(|| format!("failed to open {}", part.display()))?;
        std::io::copy(&mut f, &mut out)
            .with_context(|| format!("failed to write {}", initrd.display()))?;
    }
    Ok(initrd)
}

fn init_script(tests: &[&str]) -> String {
    format!(
        r#"#!/busybox/sh
export PATH=/usr/sbin:/usr/bin:/busybox
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns
mount -t bpf bpffs /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
exec >/dev/ttyS1 2>&1
echo "{RELEASE_MARK}$(uname -r)"
while read -r m; do insmod /modules/$m.ko || echo "insmod $m failed"; done < /modules/order
ip link set lo up
ZTUNNEL_BIN=/usr/bin/ztunnel PODAPP_BIN=/usr/bin/podapp RUST_BACKTRACE=1 \
  /usr/bin/it --test-threads=1 --exact {tests}
echo "{RESULT_MARK}$?"
sync
poweroff -f
"#,
        tests = tests.join(" ")
    )
}

/// Copies [`MODULES`] and what they depend on into `out` (decompressed), returning
/// their names in load order: dependencies first. Built-in modules are skipped.
fn modules(dir: &Path, out: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = BTreeMap::new();
    index_modules(&dir.join("kernel"), &mut files)?;
    let builtin: BTreeSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in MODULES {
        add_module(&normalise(m), &files, &builtin, out, &mut seen, &mut order)?;
    }
    for m in OPTIONAL_MODULES {
        if files.contains_key(*m) {
            add_module(m, &files, &builtin, out, &mut seen, &mut order)?;
        }
    }
    Ok(order)
}

fn add_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    out: &Path,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    if !seen.insert(name.to_owned()) || builtin.contains(name) {
        return Ok(());
    }
    let src = files
        .get(name)
        .with_context(|| format!("kernel module {name} is neither built in nor shipped"))?;
    let dst = out.join(format!("{name}.ko"));
    let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "xz" | "zst" => {
            let tool = if ext == "xz" { "xz" } else { "zstd" };
            let file = fs::File::create(&dst)
                .with_context(|| format!("failed to create {}", dst.display()))?;
            let mut cmd = Command::new(tool);
            cmd.arg("-dc").arg(src).stdout(file);
            let line = command_line(&cmd);
            let status = cmd
                .status()
                .with_context(|| format!("failed to run {line}"))?;
            ensure!(status.success(), "{line} failed: {status}");
        }
        _ => copy(src, &dst)?,
    }
    let depends = capture(Command::new("modinfo").args(["-F", "depends"]).arg(&dst))?;
    for dep in depends.trim().split(',').filter(|d| !d.is_empty()) {
        add_module(&normalise(dep), files, builtin, out, seen, order)?;
    }
    // `softdep: pre: crc32c` names an algorithm the module asks the crypto API for
    // (libcrc32c → nf_tables): its generic implementation, when it is a module.
    let softdep = capture(Command::new("modinfo").args(["-F", "softdep"]).arg(&dst))?;
    for line in softdep.lines() {
        let Some(pre) = line.trim().strip_prefix("pre:") else {
            continue;
        };
        let pre = pre.split("post:").next().unwrap_or_default();
        for dep in pre.split_whitespace().map(normalise) {
            if let Some(m) = [dep.clone(), format!("{dep}_generic")]
                .into_iter()
                .find(|m| files.contains_key(m))
            {
                add_module(&m, files, builtin, out, seen, order)?;
            }
        }
    }
    order.push(name.to_owned());
    Ok(())
}

fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))? {
        let path = e
            .with_context(|| format!("failed to read {}", dir.display()))?
            .path();
        if path.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(name) = module_name(&path) {
            files.insert(name, path);
        }
    }
    Ok(())
}

/// `…/nf_nat.ko.xz` → `nf_nat`; dashes and underscores are the same to the kernel.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.split_once(".ko")?.0;
    Some(normalise(stem))
}

fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

struct Vm {
    series: &'static str,
    kernel: Kernel,
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
        eprintln!("vm-test: {}: booting {}", self.series, self.kernel.package);
        let error = self
            .qemu(accel, &console, &tests_log)
            .err()
            .map(|e| format!("{e:#}"));
        let log = fs::read_to_string(&tests_log).unwrap_or_default();
        let outcome = parse(&log, started.elapsed(), console, error);
        eprintln!(
            "vm-test: {}: done in {:.0?} ({} passed, {} failed)",
            self.series,
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
fn report(series: &[&Series], vms: &[Vm], results: &BTreeMap<&str, Outcome>) -> Summary {
    let mut summary = Summary::default();
    let width = TESTS.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut header = format!("{:width$}", "test \\ kernel");
    for s in series {
        header += &format!(" {:>6}", s.version);
    }
    println!("\n{header}");
    for (name, needs) in TESTS {
        let mut row = format!("{name:width$}");
        for s in series {
            let cell = if !applies(s, *needs) {
                "n/a"
            } else {
                match results.get(s.version).and_then(|o| o.tests.get(*name)) {
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
        let Some(o) = results.get(vm.series) else {
            continue;
        };
        println!(
            "{:>5}: {} ({}), {}, {:.0?}{}",
            vm.series,
            o.release.as_deref().unwrap_or("did not boot"),
            vm.kernel.package,
            capture_path(version(vm.series)),
            o.elapsed,
            o.error
                .as_deref()
                .map(|e| format!(", {e}"))
                .unwrap_or_default()
        );
    }
    for vm in vms {
        let Some(o) = results.get(vm.series) else {
            continue;
        };
        let missing = TESTS.iter().any(|(n, needs)| {
            applies(find(series, vm.series), *needs) && !o.tests.contains_key(*n)
        });
        if o.exit != Some(0) || o.tests.values().any(|ok| !ok) || missing {
            println!(
                "\n==== {} ({}): test output ====\n{}",
                vm.series, vm.kernel.package, o.log
            );
            let console = fs::read_to_string(&o.console).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(40).collect();
            println!(
                "==== {}: last lines of the console ({}) ====",
                vm.series,
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

fn find<'a>(series: &[&'a Series], version: &str) -> &'a Series {
    series
        .iter()
        .find(|s| s.version == version)
        .copied()
        .expect("every VM comes from a series")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_image_takes_the_highest_abi_of_the_series() {
        let names = [
            "linux-image-6.1.0-55-amd64",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.12.118+deb12-amd64",
            "linux-image-6.1-amd64",
        ];
        assert_eq!(
            newest_image("6.1", names.into_iter()).as_deref(),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        let names = [
            "linux-image-6.12.115+deb13.1-amd64",
            "linux-image-6.12.118+deb13-amd64",
            "linux-image-6.12.118+deb13-rt-amd64",
        ];
        assert_eq!(
            newest_image("6.12", names.into_iter()).as_deref(),
            Some("linux-image-6.12.118+deb13-amd64")
        );
        assert_eq!(newest_image("7.3", names.into_iter()), None);
    }

    #[test]
    fn mirror_comes_from_one_line_and_deb822_sources() {
        assert_eq!(
            mirror_in("Types: deb\n# http://snapshot.debian.org/archive/debian/x\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
                .as_deref(),
            Some("http://deb.debian.org")
        );
        assert_eq!(
            mirror_in("deb [arch=amd64] https://mirror.example.org/debian/ bookworm main\n")
                .as_deref(),
            Some("https://mirror.example.org")
        );
        assert_eq!(
            mirror_in("deb https://packages.cloud.google.com/apt cloud-sdk main\n"),
            None
        );
    }

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
    fn ebpf_tests_apply_from_5_15() {
        let old = &SERIES[0];
        assert!(!applies(old, Needs::EbpfCapture));
        assert!(applies(old, Needs::Any));
        assert!(SERIES[1..].iter().all(|s| applies(s, Needs::EbpfCapture)));
    }
}
