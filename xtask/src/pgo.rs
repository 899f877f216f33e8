//! The shipped binary is compiled with profile-guided optimisation. `cargo xtask build`
//! compiles ztunnel in release with `-Cprofile-use` and the profile committed in
//! `ztunnel/pgo/`. `cargo xtask pgo` takes that profile again: it builds an instrumented
//! ztunnel, runs the quick bench's S2 scenario with it, and merges what the two nodes'
//! ztunnels counted.
//!
//! The profile is kept in LLVM's text format, gzipped. The text format does not change
//! between LLVM versions. The build converts it with the pinned toolchain's own
//! `llvm-profdata` (rust-toolchain.toml lists llvm-tools), so it always matches rustc's
//! LLVM. A function whose code has changed since the profile was taken no longer matches
//! its record, and LLVM compiles it as it would without a profile. A dependency, feature
//! or toolchain change renames every function (the crate's hash is in each symbol name):
//! the build counts ztunnel's functions without a record and fails when that is more than
//! half of those the profile holds ([`stale_at`]).
//!
//! The build and the instrumented build both name the host as `--target`. Then
//! RUSTFLAGS reach only the target's crates, not build scripts and proc-macros. So the
//! instrumented build's build scripts write no profiles, and the two builds name the same
//! functions alike. Both select only `-p ztunnel --bin ztunnel`: with other packages
//! selected, cargo unifies other features into the dependencies, and their symbols change.
//!
//! The build also lays out first, in each of its output sections, the functions that ran
//! while the first idle connections were opened ([`ORDER`], lld's
//! `--symbol-ordering-file`): the kernel maps code 64 KiB around each page fault, and
//! those functions lay in 69 windows across the binary. `cargo xtask pgo` takes that list
//! after the profile: it builds the optimised binary, runs the bench's memory phase (full
//! rounds) with both nodes' ztunnels under callgrind, zeroes callgrind's counts once the
//! ztunnels are idle and writes them out once the connections are open (the bench's
//! `--memory-hook`), and keeps the binary's functions with a count, most counted first.
//! Its names carry the same hashes as the profile's, so it goes stale with it: the build
//! counts how many of the listed functions the binary has and fails under half
//! ([`order_stale_at`]).
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

use crate::exec::{capture, exec, exec_with_stderr};
use crate::workspace::{self, cargo};

/// The committed profile, relative to the workspace root.
pub const PROFILE: &str = "ztunnel/pgo/ztunnel.proftext.gz";

/// The committed link order, relative to the workspace root: one symbol per line
/// ([`link_order`]).
pub const ORDER: &str = "ztunnel/pgo/ztunnel.order";

#[derive(clap::Args, Default)]
pub struct BuildOptions {
    /// Also copy the binary here (for image builds)
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `cargo xtask build`.
pub fn run_build(options: &BuildOptions) -> anyhow::Result<()> {
    let bin = build_ztunnel()?;
    if let Some(out) = &options.out {
        if let Some(dir) = out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
        }
        fs::copy(&bin, out)
            .with_context(|| format!("failed to copy {} to {}", bin.display(), out.display()))?;
        eprintln!("ztunnel: {} (copied to {})", bin.display(), out.display());
    } else {
        eprintln!("ztunnel: {}", bin.display());
    }
    Ok(())
}

/// Builds the release ztunnel with the committed profile; returns the binary's path.
pub fn build_ztunnel() -> anyhow::Result<PathBuf> {
    build(OrderCheck::Fail)
}

/// Whether a link order that no longer fits the binary fails the build.
enum OrderCheck {
    Fail,
    Skip,
}

fn build(order_check: OrderCheck) -> anyhow::Result<PathBuf> {
    let target = workspace::target_dir()?;
    let host = host_triple()?;
    let text_gz = workspace::root().join(PROFILE);
    let text = decompressed(&text_gz)?;
    let profile = indexed_profile(&llvm_profdata(&host)?, &text, &text_gz, &target.join("pgo"))?;
    let recorded = recorded_functions(&text);
    let mut unprofiled = 0;
    let mut build = release_build(&host);
    build.env(
        "CARGO_ENCODED_RUSTFLAGS",
        encoded_flags(&[
            format!("-Cprofile-use={}", profile.display()),
            // The profile also sorts the code: LLVM names what ran hot `.text.hot.*` and what
            // never ran `.text.unlikely.*`; this keeps them in their own output sections, so
            // the code that runs lies together (fewer pages resident).
            "-Clink-arg=-Wl,-z,keep-text-section-prefix".to_owned(),
            // The functions that ran while the first connections opened, first in their
            // output section: they then share fewer 64 KiB windows (the module's comment).
            format!(
                "-Clink-arg=-Wl,--symbol-ordering-file={}",
                workspace::root().join(ORDER).display()
            ),
            // Counted below instead of one warning per missing symbol.
            "-Clink-arg=-Wl,--no-warn-symbol-ordering".to_owned(),
            // A warning for each function the profile holds no record of, counted below.
            "-Cllvm-args=-pgo-warn-missing-function".to_owned(),
        ]),
    );
    // The output passes on, but the per-function warnings, which are counted.
    exec_with_stderr(&mut build, |l| {
        if l.contains(UNPROFILED) {
            unprofiled += usize::from(is_ours_unprofiled(&l));
        } else {
            eprintln!("{l}");
        }
    })?;
    eprintln!(
        "profile: {unprofiled} of ztunnel's own functions have no record in it (it holds {recorded})"
    );
    if let Some(why) = stale_at(unprofiled, recorded) {
        bail!(why);
    }
    let bin = target.join(&host).join("release").join("ztunnel");
    ensure!(bin.is_file(), "{} was not built", bin.display());
    let order = read_order()?;
    let symbols = function_symbols(&bin)?;
    let found = order.lines().filter(|l| symbols.contains(*l)).count();
    let listed = order.lines().count();
    eprintln!("link order: {found} of the {listed} functions it lists are in the binary");
    if let (OrderCheck::Fail, Some(why)) = (order_check, order_stale_at(found, listed)) {
        bail!(why);
    }
    Ok(bin)
}

fn read_order() -> anyhow::Result<String> {
    let path = workspace::root().join(ORDER);
    fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))
}

/// The names of the functions `bin` defines (`nm`).
fn function_symbols(bin: &Path) -> anyhow::Result<HashSet<String>> {
    let out = capture(Command::new("nm").arg("--defined-only").arg(bin))?;
    Ok(parse_function_symbols(&out))
}

fn parse_function_symbols(nm: &str) -> HashSet<String> {
    nm.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            matches!(kind, "t" | "T" | "w" | "W").then(|| name.to_owned())
        })
        .collect()
}

/// Why the link order no longer fits the binary, if it does not: under half of the
/// functions it lists are in it (names change as the profile's do, see [`stale_at`]). The
/// build would then lay the code out as without an order, silently.
fn order_stale_at(found: usize, listed: usize) -> Option<String> {
    (found * 2 < listed).then(|| {
        format!(
            "the link order {ORDER} no longer fits ztunnel's code: {found} of the {listed} \
             functions it lists are in the binary; a dependency, feature or toolchain change \
             renames every function. Take it again (as root): cargo xtask pgo"
        )
    })
}

/// The start of the warning `-pgo-warn-missing-function` gives a function the profile
/// holds no record of (rustc passes LLVM's warnings on; cargo replays them on a build with
/// nothing to compile), and the start of ztunnel's own functions' (legacy-mangled) names.
const UNPROFILED: &str = "no profile data available for function ";
const OURS: &str = "_ZN7ztunnel";

/// Whether a line of the build's output is the warning for one of ztunnel's own functions
/// without a record in the profile.
fn is_ours_unprofiled(line: &str) -> bool {
    line.split_once(UNPROFILED)
        .is_some_and(|(_, name)| name.starts_with(OURS))
}

/// How many of ztunnel's own functions the text profile holds a record of.
fn recorded_functions(text: &[u8]) -> usize {
    text.split(|b| *b == b'\n')
        .filter(|l| std::str::from_utf8(l).is_ok_and(is_ours_recorded))
        .count()
}

/// Whether a line of the text profile names one of ztunnel's own functions. A function
/// local to its object file is recorded as `<file>;<symbol>`.
fn is_ours_recorded(line: &str) -> bool {
    line.rsplit_once(';')
        .map_or(line, |(_, symbol)| symbol)
        .starts_with(OURS)
}

/// Why the profile no longer fits ztunnel's code, if it does not: more of ztunnel's
/// functions found no record than half of those the profile holds. Code changed since the
/// profile was taken leaves a few without; a new dependency, a feature change or a new
/// toolchain changes ztunnel's crate hash and with it every function's name, and none
/// matches. The binary would then be built as without a profile while the bench and
/// ARCHITECTURE.md describe the profile-guided one.
fn stale_at(unprofiled: usize, recorded: usize) -> Option<String> {
    (unprofiled > recorded / 2).then(|| {
        format!(
            "the profile {PROFILE} no longer fits ztunnel's code: {unprofiled} of its functions \
             have no record in it (it holds {recorded}); a dependency, feature or toolchain \
             change renames every function. Take it again (as root): cargo xtask pgo"
        )
    })
}

#[derive(clap::Args, Default)]
pub struct PgoOptions {
    /// Take only the link order (for the committed profile), not the profile
    #[arg(long)]
    pub order_only: bool,
}

/// `cargo xtask pgo`: takes the profile again and writes it to [`PROFILE`], then the link
/// order to [`ORDER`].
pub fn run_profile(options: &PgoOptions) -> anyhow::Result<()> {
    if !workspace::is_root()? {
        bail!(
            "the profile is taken in the bench, which creates network namespaces: run it as root"
        );
    }
    let target = workspace::target_dir()?;
    let host = host_triple()?;
    let dir = target.join("pgo");
    let release = target.join("release");
    // The bench and its pods' app, plain release builds.
    exec(cargo().args(["build", "--release", "-p", "ztunnel-tests", "--bins"]))?;
    if options.order_only {
        return take_link_order(&release, &dir);
    }
    let raw = dir.join("raw");
    if raw.exists() {
        fs::remove_dir_all(&raw).with_context(|| format!("failed to remove {}", raw.display()))?;
    }
    fs::create_dir_all(&raw).with_context(|| format!("failed to create {}", raw.display()))?;
    // Its own target directory: the instrumented binary must not take the place of the
    // shipped one in target/.
    let instrumented_dir = dir.join("instrumented");
    exec(
        release_build(&host)
            .arg("--target-dir")
            .arg(&instrumented_dir)
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                encoded_flags(&[format!("-Cprofile-generate={}", raw.display())]),
            ),
    )?;
    let instrumented = instrumented_dir.join(&host).join("release").join("ztunnel");
    exec(
        Command::new(release.join("bench"))
            .env("ZTUNNEL_BIN", &instrumented)
            .env("PODAPP_BIN", release.join("podapp"))
            .args(["--quick", "--scenario", "s2", "--out"])
            .arg(dir.join("bench")),
    )?;
    let mut raws = Vec::new();
    for entry in fs::read_dir(&raw).with_context(|| format!("failed to read {}", raw.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "profraw") {
            raws.push(path);
        }
    }
    ensure!(
        !raws.is_empty(),
        "the instrumented ztunnels wrote no profile to {} (a profile is written when the process exits)",
        raw.display()
    );
    let text = dir.join("ztunnel.proftext");
    exec(
        Command::new(llvm_profdata(&host)?)
            .args(["merge", "--text", "-o"])
            .arg(&text)
            .args(&raws),
    )?;
    let out = workspace::root().join(PROFILE);
    gzip(&text, &out)?;
    eprintln!(
        "profile: {} ({} raw profiles merged, {} KiB)",
        out.display(),
        raws.len(),
        fs::metadata(&out)?.len() / 1024
    );
    take_link_order(&release, &dir)
}

/// Writes [`ORDER`] from the optimised binary's run of the bench's memory phase under
/// callgrind (the module's comment).
fn take_link_order(release: &Path, dir: &Path) -> anyhow::Result<()> {
    let order = counted_run(release, dir)?;
    let path = workspace::root().join(ORDER);
    write_whole(&path, order.as_bytes())?;
    eprintln!(
        "link order: {} ({} functions)",
        path.display(),
        order.lines().count()
    );
    Ok(())
}

/// Builds the binary, runs the bench's memory phase with its ztunnels under callgrind and
/// returns the link order from their counts.
fn counted_run(release: &Path, dir: &Path) -> anyhow::Result<String> {
    // With the order there is, even one that no longer fits (which this replaces): the
    // functions' names do not depend on where they lie.
    let bin = build(OrderCheck::Skip)?;
    let runs = dir.join("callgrind");
    if runs.exists() {
        fs::remove_dir_all(&runs)
            .with_context(|| format!("failed to remove {}", runs.display()))?;
    }
    fs::create_dir_all(&runs).with_context(|| format!("failed to create {}", runs.display()))?;
    let wrapper = runs.join("ztunnel");
    write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --demangle=no '--callgrind-out-file={}/callgrind.%p' '{}' \"$@\"\n",
            runs.display(),
            bin.display()
        ),
    )?;
    // `-z` zeroes the counts, `-d` writes them to `callgrind.<pid>.1`; both wait for the
    // process to answer.
    let hook = runs.join("hook");
    write_script(
        &hook,
        "#!/bin/sh\ncase $1 in idle) op=-z ;; conns) op=-d ;; *) exit 1 ;; esac\nshift\nfor pid in \"$@\"; do callgrind_control $op $pid > /dev/null || exit 1; done\n",
    )?;
    exec(
        Command::new(release.join("bench"))
            .env("ZTUNNEL_BIN", &wrapper)
            .env("PODAPP_BIN", release.join("podapp"))
            // Full rounds: 1,000 connections at once run code that 100 do not (tables
            // and slabs growing).
            .args(["--memory-only", "--scenario", "s2", "--memory-hook"])
            .arg(&hook)
            .arg("--out")
            .arg(runs.join("bench")),
    )?;
    let mut dumps = Vec::new();
    for entry in
        fs::read_dir(&runs).with_context(|| format!("failed to read {}", runs.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "1") {
            dumps.push(
                fs::read_to_string(&path)
                    .with_context(|| format!("failed to read {}", path.display()))?,
            );
        }
    }
    // Both nodes' ztunnels, in each round.
    ensure!(
        dumps.len() >= 2 && dumps.len() % 2 == 0,
        "expected callgrind's counts from both nodes' ztunnels in {}, found {}",
        runs.display(),
        dumps.len()
    );
    let order = link_order(&dumps, &function_symbols(&bin)?);
    let listed = order.lines().count();
    ensure!(
        listed > 100,
        "only {listed} of ztunnel's functions ran while the connections opened"
    );
    Ok(order)
}

fn write_script(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("failed to make {} executable", path.display()))
}

/// The functions of `symbols` that callgrind counted in any of `dumps`, most counted first
/// (then by name), one per line.
fn link_order(dumps: &[String], symbols: &HashSet<String>) -> String {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for dump in dumps {
        for (name, count) in counted(dump) {
            if symbols.contains(&name) {
                *counts.entry(name).or_default() += count;
            }
        }
    }
    let mut order: Vec<(String, u64)> = counts.into_iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    order.into_iter().map(|(name, _)| name + "\n").collect()
}

/// Each function's own instruction count in a callgrind dump (its first event), for the
/// functions with one. The format compresses names: `fn=(7) name` defines id 7, later
/// `fn=(7)` refers to it (`cfn=` too); a cost line follows `calls=` for the call's
/// inclusive cost, which is the callee's, not this function's; a recursion depth is
/// appended to a name as `'2`.
fn counted(dump: &str) -> HashMap<String, u64> {
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut current: Option<&str> = None;
    let mut call_cost = false;
    for line in dump.lines() {
        if let Some(rest) = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))
        {
            let name = match rest.split_once(' ') {
                Some((id, name)) => {
                    names.insert(id, name);
                    Some(name)
                }
                None => names.get(rest).copied(),
            };
            if line.starts_with("fn=") {
                current = name.map(|n| n.split('\'').next().unwrap_or(n));
            }
            continue;
        }
        if line.starts_with("calls=") {
            call_cost = true;
            continue;
        }
        let is_cost =
            line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*'));
        if !is_cost {
            continue;
        }
        if std::mem::take(&mut call_cost) {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(_position), Some(cost)) = (fields.next(), fields.next()) else {
            continue;
        };
        if let (Some(name), Ok(cost)) = (current, cost.parse::<u64>())
            && cost > 0
        {
            *counts.entry(name.to_owned()).or_default() += cost;
        }
    }
    counts
}

/// `cargo build --release -p ztunnel --bin ztunnel --target <host>`: what both the
/// instrumented and the optimised build compile.
fn release_build(host: &str) -> Command {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--locked",
        "-p",
        "ztunnel",
        "--bin",
        "ztunnel",
    ])
    .args(["--target", host]);
    cmd
}

/// Flags for `CARGO_ENCODED_RUSTFLAGS` (which a path with spaces survives).
fn encoded_flags(flags: &[String]) -> String {
    flags.join("\x1f")
}

/// The pinned toolchain's host, from `rustc -vV`.
fn host_triple() -> anyhow::Result<String> {
    let version = capture(
        Command::new("rustc")
            .current_dir(workspace::root())
            .arg("-vV"),
    )?;
    parse_host(&version).context("`rustc -vV` printed no host line")
}

fn parse_host(version: &str) -> Option<String> {
    version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(|host| host.trim().to_owned())
}

/// The pinned toolchain's `llvm-profdata` (the llvm-tools component) on `host`.
fn llvm_profdata(host: &str) -> anyhow::Result<PathBuf> {
    let sysroot = capture(
        Command::new("rustc")
            .current_dir(workspace::root())
            .args(["--print", "sysroot"]),
    )?;
    let bin = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    ensure!(
        bin.is_file(),
        "{} is missing: the llvm-tools component is (rust-toolchain.toml lists it; `cargo xtask setup` adds it)",
        bin.display()
    );
    Ok(bin)
}

/// Converts the text profile `text` (decompressed from `text_gz`) into LLVM's indexed
/// format in `dir` and returns that file's path. The file is replaced only when its content changes: rustc
/// records the profile as an input, so a new modification time alone would compile
/// everything again. The intermediate files carry the process id, and the result is
/// renamed into place, so two builds at once do not read each other's half-written files.
fn indexed_profile(
    profdata: &Path,
    text: &[u8],
    text_gz: &Path,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let pid = std::process::id();
    let plain = dir.join(format!("profile.proftext.{pid}"));
    let fresh = dir.join(format!("profile.profdata.{pid}"));
    let converted = fs::write(&plain, text)
        .with_context(|| format!("failed to write {}", plain.display()))
        .and_then(|()| {
            exec(
                Command::new(profdata)
                    .args(["merge", "-o"])
                    .arg(&fresh)
                    .arg(&plain),
            )
            .with_context(|| format!("the profile {} does not convert", text_gz.display()))
        });
    let _ = fs::remove_file(&plain);
    if let Err(e) = converted {
        let _ = fs::remove_file(&fresh);
        return Err(e);
    }
    let indexed = dir.join("profile.profdata");
    let new = fs::read(&fresh)?;
    if fs::read(&indexed).ok().as_deref() == Some(new.as_slice()) {
        fs::remove_file(&fresh)?;
    } else {
        fs::rename(&fresh, &indexed)?;
    }
    Ok(indexed)
}

fn decompressed(gz: &Path) -> anyhow::Result<Vec<u8>> {
    let file = fs::File::open(gz).with_context(|| format!("failed to open {}", gz.display()))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .with_context(|| format!("{} is not a gzip file", gz.display()))?;
    Ok(out)
}

fn gzip(from: &Path, to: &Path) -> anyhow::Result<()> {
    let text = fs::read(from).with_context(|| format!("failed to read {}", from.display()))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&text)?;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    write_whole(to, &gz.finish()?)
}

/// Writes `bytes` to `to` through a `.partial` file renamed into place, so an interrupted
/// run leaves the committed file whole (a cut-short link order could pass the build's
/// check and lay the code out worse, silently).
fn write_whole(to: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    fs::write(&partial, bytes).with_context(|| format!("failed to write {}", partial.display()))?;
    fs::rename(&partial, to).with_context(|| format!("failed to write {}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ztunnels_own_unprofiled_functions_are_counted() {
        let ours = "warning: ztunnel.6f2c1a-cgu.0: no profile data available for function _ZN7ztunnel5proxy4copy17h0123456789abcdefE Hash = 742261418966908927 up to 0 count discarded";
        let theirs = "warning: h2.4e1b-cgu.0: no profile data available for function _ZN2h25proto4ping17h0123456789abcdefE Hash = 1 up to 0 count discarded";
        // Another crate whose name begins with ours: the length before it tells them apart.
        let prefix_only = "warning: x-cgu.0: no profile data available for function _ZN13ztunnel_tests3run17h0123456789abcdefE Hash = 1";
        assert!(is_ours_unprofiled(ours));
        assert!(!is_ours_unprofiled(theirs));
        assert!(!is_ours_unprofiled(prefix_only));
        assert!(!is_ours_unprofiled("warning: unused variable: `x`"));
    }

    #[test]
    fn ztunnels_records_are_found_with_and_without_a_file_prefix() {
        assert!(is_ours_recorded(
            "_ZN7ztunnel5proxy4copy17h0123456789abcdefE"
        ));
        assert!(is_ours_recorded(
            "ztunnel.6f2c1a-cgu.0;_ZN7ztunnel5proxy4copy17h0123456789abcdefE"
        ));
        assert!(!is_ours_recorded("_ZN2h25proto4ping17h0123456789abcdefE"));
        assert!(!is_ours_recorded("# Func Hash:"));
        assert!(!is_ours_recorded("742261418966908927"));
    }

    #[test]
    fn a_profile_matching_under_half_of_ztunnels_functions_is_stale() {
        assert_eq!(stale_at(0, 4511), None);
        assert_eq!(stale_at(2255, 4511), None);
        let why = stale_at(2256, 4511).expect("more than half without a record");
        assert!(why.contains("cargo xtask pgo"), "{why}");
        assert!(why.contains("2256 of its functions"), "{why}");
    }

    /// A callgrind dump as `callgrind_control -d` writes it, trimmed (positions: line,
    /// events: Ir).
    const DUMP: &str = "# callgrind format
version: 1
positions: line
events: Ir
summary: 1700

ob=(1) /t/ztunnel
fl=(1) ???
fn=(1) _ZN7ztunnel5proxy4open17h0000000000000001E
0 1000
cfn=(2) _ZN2h26client4send17h0000000000000002E
calls=3 0
0 500
+2 100
fn=(2)
0 500
fn=(3) _ZN7ztunnel5proxy5never17h0000000000000003E
fn=(4) _ZN7ztunnel5proxy4copy17h0000000000000004E'2
* 100
fn=(5) memcpy
0 40
";

    #[test]
    fn callgrind_counts_each_functions_own_instructions() {
        let counts = counted(DUMP);
        // `open` ran 1,100 instructions itself; the 500 after `calls=` are `send`'s.
        assert_eq!(counts["_ZN7ztunnel5proxy4open17h0000000000000001E"], 1100);
        assert_eq!(counts["_ZN2h26client4send17h0000000000000002E"], 500);
        // A recursion depth is not part of the name.
        assert_eq!(counts["_ZN7ztunnel5proxy4copy17h0000000000000004E"], 100);
        // Named but never counted: not in the list.
        assert!(!counts.contains_key("_ZN7ztunnel5proxy5never17h0000000000000003E"));
        assert_eq!(counts.len(), 4);
    }

    #[test]
    fn the_link_order_is_the_binarys_counted_functions_most_counted_first() {
        let symbols: HashSet<String> = [
            "_ZN7ztunnel5proxy4open17h0000000000000001E",
            "_ZN2h26client4send17h0000000000000002E",
            "_ZN7ztunnel5proxy4copy17h0000000000000004E",
        ]
        .map(str::to_owned)
        .into();
        // The second node's counts add up with the first's; `memcpy` is libc's.
        let other = "fn=(9) _ZN7ztunnel5proxy4copy17h0000000000000004E\n0 2000\n".to_owned();
        assert_eq!(
            link_order(&[DUMP.to_owned(), other], &symbols),
            "_ZN7ztunnel5proxy4copy17h0000000000000004E\n\
             _ZN7ztunnel5proxy4open17h0000000000000001E\n\
             _ZN2h26client4send17h0000000000000002E\n"
        );
        assert_eq!(link_order(&[], &symbols), "");
    }

    #[test]
    fn the_binarys_functions_are_its_text_symbols() {
        let nm = "00000000003d8580 T _ZN7ztunnel4main17h0000000000000001E
0000000000842330 t aws_lc_0_47_0_sha256_block_data_order
0000000000095000 r _ZN7ztunnel5CONST17h0000000000000002E
0000000001245170 W memcpy
                 U malloc
";
        let symbols = parse_function_symbols(nm);
        assert!(symbols.contains("_ZN7ztunnel4main17h0000000000000001E"));
        assert!(symbols.contains("aws_lc_0_47_0_sha256_block_data_order"));
        assert!(symbols.contains("memcpy"));
        assert_eq!(symbols.len(), 3);
    }

    #[test]
    fn a_link_order_with_under_half_of_its_functions_in_the_binary_is_stale() {
        assert_eq!(order_stale_at(952, 952), None);
        assert_eq!(order_stale_at(476, 952), None);
        let why = order_stale_at(475, 952).expect("under half found");
        assert!(why.contains("cargo xtask pgo"), "{why}");
        assert!(why.contains("475 of the 952"), "{why}");
        // An empty order (none taken yet) lays nothing out and is not stale.
        assert_eq!(order_stale_at(0, 0), None);
    }

    #[test]
    fn host_comes_from_rustcs_version_output() {
        let version = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.95.0\n";
        assert_eq!(
            parse_host(version).as_deref(),
            Some("x86_64-unknown-linux-gnu")
        );
        assert_eq!(parse_host("rustc 1.95.0\n"), None);
    }

    /// Text records: name, then `# Func Hash:`, `# Num Counters:` and `# Counter Values:`,
    /// each followed by its value(s), then value profiles (`# Num Value Kinds:` …) up to
    /// an empty line. Returns each function with the sum of its counters.
    fn counted_functions(text: &str) -> Vec<(&str, u64)> {
        let mut out = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if lines.peek() != Some(&"# Func Hash:") {
                continue;
            }
            let mut total = 0u64;
            let mut in_values = false;
            for l in lines.by_ref() {
                if l.is_empty() {
                    break;
                }
                if l == "# Counter Values:" {
                    in_values = true;
                } else if l.starts_with('#') {
                    in_values = false;
                } else if in_values {
                    total = total.saturating_add(l.parse().unwrap_or(0));
                }
            }
            out.push((line, total));
        }
        out
    }

    #[test]
    fn the_committed_profile_converts_and_counts_the_data_path() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let profdata = llvm_profdata(&host_triple()?)?;
        let text_gz = workspace::root().join(PROFILE);
        let plain = decompressed(&text_gz)?;
        let indexed = indexed_profile(&profdata, &plain, &text_gz, dir.path())?;
        assert!(fs::metadata(&indexed)?.len() > 0);
        let modified = fs::metadata(&indexed)?.modified()?;
        // Converting the same profile again leaves the file as it was, and leaves no
        // intermediate files behind.
        indexed_profile(&profdata, &plain, &text_gz, dir.path())?;
        assert_eq!(fs::metadata(&indexed)?.modified()?, modified);
        let left: Vec<_> = fs::read_dir(dir.path())?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(left, ["profile.profdata"]);

        let text = String::from_utf8(plain)?;
        let functions = counted_functions(&text);
        // A profile of the quick bench, not of a start and stop: ztunnel's HBONE data
        // path, TLS records and the tunnel copy ran thousands of times.
        // Legacy-mangled names carry each path segment's length: `5hbone`, `2h2`.
        for part in ["5hbone", "6rustls", "2h2"] {
            let counted: u64 = functions
                .iter()
                .filter(|(name, _)| name.contains(part))
                .map(|(_, count)| count)
                .sum();
            assert!(
                counted > 100_000,
                "functions named *{part}* counted {counted} times in all"
            );
        }
        // Code that never ran is in the profile too (with zero counts): LLVM puts it
        // apart, in `.text.unlikely`.
        let never = functions.iter().filter(|(_, count)| *count == 0).count();
        assert!(
            never * 4 > functions.len(),
            "{never} of {} functions never ran",
            functions.len()
        );
        Ok(())
    }
}
