//! `cargo xtask setup`: makes a fresh Debian 12 machine (rustup with the pinned stable and
//! a nightly toolchain, run as root) able to build the eBPF programs and run the privileged
//! tests. Each step checks first and does nothing when already done, so a second run takes
//! seconds; every other command runs this first.
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::exec::{capture, exec, succeeds};
use crate::workspace::{self, cargo};

/// Debian packages the integration tests drive (`ip`, `tc`, `nft`, `iperf3`, …).
const PACKAGES: &[&str] = &[
    "iproute2",
    "tcpdump",
    "iptables",
    "nftables",
    "iperf3",
    // `dig`: the DNS proxy tests resolve through a real resolver inside a pod.
    "bind9-dnsutils",
    "protobuf-compiler",
    "python3-venv",
    // `cargo xtask vm-test`: the VMs, their initramfs, and unpacking kernel modules.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "kmod",
    "binutils",
    // libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets.
    "g++",
    // The bench's capture cost per connection is a perf profile (and `--profile`).
    "linux-perf",
    // The bench's HTTP load at max rate (S0, S2 and S4, the waypoint).
    "wrk",
    // `cargo xtask pgo`'s link order: callgrind lists the functions that ran.
    "valgrind",
];
/// PyPI's kubernetes-validate: the Kubernetes OpenAPI schemas bundled, so the deploy/
/// manifest test checks them offline. Pinned; installed into a venv under the target dir.
const KUBERNETES_VALIDATE: &str = "1.37.0";
/// Installed when the release ships it; only debugging aids depend on it.
const OPTIONAL_PACKAGES: &[&str] = &["bpftool"];
/// The pinned stable toolchain's components (rust-toolchain.toml lists the same).
const STABLE_COMPONENTS: &[&str] = &["rustfmt", "clippy", "llvm-tools"];
/// Nightly components: rust-src for `-Z build-std=core`, clippy for the eBPF lint.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];
/// cargo-fuzz, for `cargo xtask fuzz` and the fuzzing in `cargo xtask test`. Pinned; it
/// builds libFuzzer (libfuzzer-sys) with the C++ compiler.
const CARGO_FUZZ: &str = "0.13.2";

#[derive(clap::Args, Default)]
pub struct Options {
    /// Only what building needs (toolchain components, bpf-linker): for container image
    /// builds, which neither need the test tools nor may mount filesystems.
    #[arg(long)]
    pub build_only: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    nightly_components()?;
    stable_components()?;
    bpf_linker()?;
    if options.build_only {
        return Ok(());
    }
    packages()?;
    cargo_fuzz()?;
    kubernetes_validate()?;
    let mounts = Mounts::read()?;
    bpffs(&mounts)?;
    cgroup2(&mounts)?;
    Ok(())
}

/// Where `cargo xtask setup` installs kubernetes-validate; `cargo xtask test` passes it to
/// the deploy/ test as `KUBERNETES_VALIDATE`.
pub fn kubernetes_validate_bin() -> anyhow::Result<PathBuf> {
    Ok(workspace::target_dir()?.join("kube-tools/venv/bin/kubernetes-validate"))
}

fn kubernetes_validate() -> anyhow::Result<()> {
    let step = "kubernetes-validate";
    let bin = kubernetes_validate_bin()?;
    let installed = bin.is_file()
        && capture(Command::new(&bin).arg("--version"))
            .is_ok_and(|v| v.trim() == KUBERNETES_VALIDATE);
    if installed {
        report(step, "ok");
        return Ok(());
    }
    let venv = bin
        .parent()
        .and_then(Path::parent)
        .context("kubernetes-validate's venv path has no parent")?;
    exec(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(venv),
    )?;
    exec(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE}")),
    )?;
    report(
        step,
        &format!("installed {KUBERNETES_VALIDATE} in {}", venv.display()),
    );
    Ok(())
}

/// `cargo fuzz` (run with the nightly toolchain, as `cargo xtask fuzz` does), at the pinned
/// version; `cargo install` replaces another version.
fn cargo_fuzz() -> anyhow::Result<()> {
    let step = "cargo-fuzz";
    let want = format!("cargo-fuzz {CARGO_FUZZ}");
    let version =
        || capture(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]));
    if version().is_ok_and(|v| v.trim() == want) {
        report(step, "ok");
        return Ok(());
    }
    exec(cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ]))?;
    let got = version().context("cargo-fuzz was installed but `cargo fuzz --version` fails")?;
    if got.trim() != want {
        bail!("installed cargo-fuzz {CARGO_FUZZ} but `cargo fuzz --version` says {got:?}");
    }
    report(step, &format!("installed {CARGO_FUZZ}"));
    Ok(())
}

fn report(step: &str, outcome: &str) {
    eprintln!("setup: {step}: {outcome}");
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !workspace::is_root()? {
        bail!("{what} needs root: rerun `cargo xtask setup` as root (or do it by hand)");
    }
    Ok(())
}

fn nightly_components() -> anyhow::Result<()> {
    components(
        "nightly rust-src, clippy",
        Some("nightly"),
        NIGHTLY_COMPONENTS,
    )
}

/// rustfmt, clippy and llvm-tools (`llvm-profdata`, for the profile-guided release
/// build) for the toolchain pinned in rust-toolchain.toml (rustup runs in the workspace
/// root, so the pin applies). rustup adds a pinned toolchain's components when it
/// installs the toolchain, not when the pin gains one later: so this checks each.
fn stable_components() -> anyhow::Result<()> {
    components(
        "stable rustfmt, clippy, llvm-tools",
        None,
        STABLE_COMPONENTS,
    )
}

/// Adds those of `wanted` that `toolchain` (None: the pinned one) lacks.
fn components(step: &str, toolchain: Option<&str>, wanted: &[&str]) -> anyhow::Result<()> {
    let rustup = |args: &[&str]| {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(workspace::root()).args(args);
        if let Some(toolchain) = toolchain {
            cmd.args(["--toolchain", toolchain]);
        }
        cmd
    };
    let installed = capture(&mut rustup(&["component", "list", "--installed"])).with_context(|| {
        match toolchain {
            Some(t) => format!("failed to list the {t} toolchain's components; install it with `rustup toolchain install {t}`"),
            None => "failed to list the pinned toolchain's components".to_owned(),
        }
    })?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|name| !has_component(&installed, name))
        .collect();
    if missing.is_empty() {
        report(step, "ok");
        return Ok(());
    }
    exec(rustup(&["component", "add"]).args(&missing))?;
    report(step, &format!("installed {}", missing.join(", ")));
    Ok(())
}

/// `rustup component list --installed` prints `rust-src` but `clippy-x86_64-unknown-linux-gnu`.
fn has_component(installed: &str, name: &str) -> bool {
    installed
        .lines()
        .map(str::trim)
        .any(|line| line == name || line.starts_with(&format!("{name}-")))
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// bpf-linker links against rustc's own LLVM (the nightly's libLLVM), so the bitcode
/// rustc emits is always readable by it. Its binary keeps the prefix as RUNPATH: when
/// If the prefix is removed, `--version` fails and this step rebuilds it.
fn bpf_linker() -> anyhow::Result<()> {
    let step = "bpf-linker";
    let installed = cargo_home()?.join("bin/bpf-linker");
    if succeeds(Command::new("bpf-linker").arg("--version"))
        || succeeds(Command::new(&installed).arg("--version"))
    {
        report(step, "ok");
        return Ok(());
    }

    let sysroot = capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let llvm_dir = Path::new(sysroot.trim()).join("lib");
    let llvm_name = libllvm_name(&llvm_dir)?;
    let major = llvm_major(&llvm_name).with_context(|| {
        format!(
            "failed to read the LLVM major version from {llvm_name} in {}",
            llvm_dir.display()
        )
    })?;

    // Outside the target dir: the linker records this path and must outlive `cargo clean`.
    let prefix = cargo_home()?.join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("failed to create {}", lib.display()))?;
    // Links left by an older nightly would point at a libLLVM that is gone.
    for entry in fs::read_dir(&lib).with_context(|| format!("failed to read {}", lib.display()))? {
        let path = entry
            .with_context(|| format!("failed to read {}", lib.display()))?
            .path();
        if path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("libLLVM"))
        {
            fs::remove_file(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
        }
    }
    for link in ["libLLVM.so", llvm_name.as_str()] {
        let (original, link) = (llvm_dir.join(&llvm_name), lib.join(link));
        symlink(&original, &link).with_context(|| {
            format!(
                "failed to link {} to {}",
                link.display(),
                original.display()
            )
        })?;
    }

    // `--force`: a bpf-linker that no longer runs is still recorded as installed.
    exec(
        cargo()
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--force", "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")]),
    )?;
    if !succeeds(Command::new(&installed).arg("--version")) {
        bail!(
            "bpf-linker was installed but `{} --version` fails",
            installed.display()
        );
    }
    report(
        step,
        &format!("built against rustc's LLVM {major} ({llvm_name})"),
    );
    Ok(())
}

/// The versioned libLLVM in a rustc sysroot's lib dir, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn libllvm_name(dir: &Path) -> anyhow::Result<String> {
    let entries = fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("failed to read {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") && name.contains("-rust-") {
            return Ok(name);
        }
    }
    bail!(
        "no libLLVM.so.*-rust-* in {}; is the nightly toolchain complete?",
        dir.display()
    )
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major(name: &str) -> Option<u32> {
    let version = name.strip_prefix("libLLVM.so.")?;
    let end = version
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(version.len());
    version[..end].parse().ok()
}

fn packages() -> anyhow::Result<()> {
    let step = "packages";
    let all: Vec<&str> = PACKAGES.iter().chain(OPTIONAL_PACKAGES).copied().collect();
    let Some(installed) = installed_packages(&all)? else {
        report(
            step,
            &format!("no dpkg, skipped (install {} yourself)", all.join(" ")),
        );
        return Ok(());
    };
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|name| !installed.iter().any(|i| i == name))
        .collect();
    let missing_optional: Vec<&str> = OPTIONAL_PACKAGES
        .iter()
        .copied()
        .filter(|name| !installed.iter().any(|i| i == name))
        .collect();
    if missing.is_empty() && missing_optional.is_empty() {
        report(step, "ok");
        return Ok(());
    }
    // Only refresh the package lists when something required is missing, so an optional
    // package the release lacks does not cost an `apt-get update` on every run.
    if !missing.is_empty() {
        require_root(&format!("installing {}", missing.join(" ")))?;
        exec(Command::new("apt-get").arg("update"))?;
    }
    let mut skipped = Vec::new();
    for name in missing_optional {
        if apt_has_candidate(name)? {
            missing.push(name);
        } else {
            skipped.push(name);
        }
    }
    if !missing.is_empty() {
        require_root(&format!("installing {}", missing.join(" ")))?;
        exec(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y"])
                .args(&missing),
        )?;
    }
    let mut outcome = Vec::new();
    if !missing.is_empty() {
        outcome.push(format!("installed {}", missing.join(" ")));
    }
    if !skipped.is_empty() {
        outcome.push(format!("{} not available, skipped", skipped.join(" ")));
    }
    report(step, &outcome.join("; "));
    Ok(())
}

/// Which of `names` dpkg reports as "install ok installed"; `None` without dpkg.
fn installed_packages(names: &[&str]) -> anyhow::Result<Option<Vec<String>>> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Package} ${Status}\n"]).args(names);
    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).context("failed to start dpkg-query"),
    };
    // dpkg-query exits 1 when some package is unknown, after listing the known ones.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let installed = stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| *status == "install ok installed")
        .map(|(name, _)| name.to_owned())
        .collect();
    Ok(Some(installed))
}

/// Whether apt knows an installable version of `name` (`Candidate:` other than `(none)`).
fn apt_has_candidate(name: &str) -> anyhow::Result<bool> {
    let policy = capture(Command::new("apt-cache").args(["policy", name]))?;
    Ok(policy
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Candidate:"))
        .any(|candidate| candidate.trim() != "(none)"))
}

/// One line of /proc/self/mountinfo: where, and which filesystem type.
struct Mount {
    point: String,
    fstype: String,
}

struct Mounts(Vec<Mount>);

impl Mounts {
    fn read() -> anyhow::Result<Self> {
        let path = "/proc/self/mountinfo";
        let text = fs::read_to_string(path).with_context(|| format!("failed to read {path}"))?;
        Ok(Self::parse(&text))
    }

    /// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: the mount point is
    /// the fifth field, the type the first after ` - ` (proc(5)).
    fn parse(text: &str) -> Self {
        let mounts = text
            .lines()
            .filter_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                Some(Mount {
                    point: left.split(' ').nth(4)?.to_owned(),
                    fstype: right.split(' ').next()?.to_owned(),
                })
            })
            .collect();
        Self(mounts)
    }

    fn is(&self, point: &str, fstype: &str) -> bool {
        self.0
            .iter()
            .any(|m| m.point == point && m.fstype == fstype)
    }

    fn has_type(&self, fstype: &str) -> bool {
        self.0.iter().any(|m| m.fstype == fstype)
    }
}

fn mount(fstype: &str, point: &str) -> anyhow::Result<()> {
    require_root(&format!("mounting {fstype} at {point}"))?;
    fs::create_dir_all(point).with_context(|| format!("failed to create {point}"))?;
    exec(Command::new("mount").args(["-t", fstype, fstype, point]))
}

/// Pinned maps and programs live in bpffs.
fn bpffs(mounts: &Mounts) -> anyhow::Result<()> {
    let (step, point) = ("bpffs", "/sys/fs/bpf");
    if mounts.is(point, "bpf") {
        report(step, "ok");
        return Ok(());
    }
    mount("bpf", point)?;
    report(step, &format!("mounted at {point}"));
    Ok(())
}

/// cgroup/connect4 and sock_ops programs attach to a cgroup v2 directory.
fn cgroup2(mounts: &Mounts) -> anyhow::Result<()> {
    let step = "cgroup2";
    if mounts.has_type("cgroup2") {
        report(step, "ok");
        return Ok(());
    }
    // A tmpfs or v1 hierarchies at /sys/fs/cgroup: v2 goes beside them, as systemd's
    // hybrid layout does.
    let v1_layout = mounts.is("/sys/fs/cgroup", "tmpfs")
        || mounts
            .0
            .iter()
            .any(|m| m.fstype == "cgroup" && m.point.starts_with("/sys/fs/cgroup"));
    let point = if v1_layout {
        "/sys/fs/cgroup/unified"
    } else {
        "/sys/fs/cgroup"
    };
    mount("cgroup2", point)?;
    report(step, &format!("mounted at {point}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_the_file_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.9-rust-1.40.0-nightly"), Some(9));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
    }

    #[test]
    fn components_match_with_or_without_target_suffix() {
        let installed = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        assert!(has_component(installed, "rust-src"));
        assert!(has_component(installed, "clippy"));
        assert!(!has_component(installed, "rustfmt"));
        assert!(!has_component(
            "rust-std-x86_64-unknown-linux-gnu",
            "rust-src"
        ));
    }

    #[test]
    fn mountinfo_gives_point_and_type() {
        let mounts = Mounts::parse(
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n",
        );
        assert!(mounts.is("/sys/fs/cgroup", "tmpfs"));
        assert!(mounts.is("/sys/fs/cgroup/unified", "cgroup2"));
        assert!(mounts.has_type("cgroup2"));
        assert!(!mounts.has_type("bpf"));
    }
}
