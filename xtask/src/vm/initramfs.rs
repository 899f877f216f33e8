//! The VMs' initramfs: a part every kernel shares (busybox, the test binaries, the tools
//! they run with their shared libraries, a minimal /etc), and per kernel `/init` and the
//! kernel modules the tests need, decompressed and in load order. The kernel unpacks the
//! two cpio archives one after the other.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use super::kernel::Kernel;
use super::{RELEASE_MARK, RESULT_MARK, copy, mkdir, write};
use crate::exec::{capture, command_line, exec};

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
    "iptables-restore",
    "ip6tables-restore",
    "iptables-save",
];

/// iptables' extensions, loaded with dlopen (Debian's multiarch path).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// The binaries that go into the VM.
pub(super) struct Bins {
    pub(super) ztunnel: PathBuf,
    pub(super) podapp: PathBuf,
    pub(super) it: PathBuf,
}

/// The part of the initramfs every kernel shares: busybox, our binaries, the tools and
/// their libraries, a minimal /etc. Laid out merged-/usr like the host.
pub(super) fn build_common(bins: &Bins, root: &Path, out: &Path) -> anyhow::Result<()> {
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

/// `/init`, the kernel modules (decompressed, in load order) and the common part, as
/// one initramfs (the kernel unpacks concatenated cpio archives in order).
pub(super) fn build_initrd(
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
