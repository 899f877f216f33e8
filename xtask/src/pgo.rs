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
use std::fs;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

use crate::exec::{capture, exec, exec_with_stderr};
use crate::workspace::{self, cargo};

/// The committed profile, relative to the workspace root.
pub const PROFILE: &str = "ztunnel/pgo/ztunnel.proftext.gz";

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
    Ok(bin)
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

/// `cargo xtask pgo`: takes the profile again and writes it to [`PROFILE`].
pub fn run_profile() -> anyhow::Result<()> {
    if !workspace::is_root()? {
        bail!(
            "the profile is taken in the bench, which creates network namespaces: run it as root"
        );
    }
    let target = workspace::target_dir()?;
    let host = host_triple()?;
    let dir = target.join("pgo");
    let raw = dir.join("raw");
    if raw.exists() {
        fs::remove_dir_all(&raw).with_context(|| format!("failed to remove {}", raw.display()))?;
    }
    fs::create_dir_all(&raw).with_context(|| format!("failed to create {}", raw.display()))?;
    // The bench and its pods' app, plain release builds.
    exec(cargo().args(["build", "--release", "-p", "ztunnel-tests", "--bins"]))?;
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
    let release = target.join("release");
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
    Ok(())
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
    let partial = to.with_extension("gz.partial");
    fs::write(&partial, gz.finish()?)
        .with_context(|| format!("failed to write {}", partial.display()))?;
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
