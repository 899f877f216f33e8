//! `cargo xtask fuzz`: builds the fuzz targets of `fuzz/` with cargo-fuzz (libFuzzer,
//! nightly toolchain) and runs each for a while, one after the other; `cargo xtask test`
//! runs each for [`TEST_SECS`]. The harnesses live in `ztunnel/src/fuzzing/`, which
//! also makes each target's seeds; the corpus grows in `fuzz/corpus/<target>/`. A crash
//! (panic, overflow, allocation over the cap, stall) fails the command and names the
//! input that caused it, saved in `fuzz/artifacts/<target>/`.
//!
//! Build settings, chosen for build time on two cores: no sanitizer (the code under test
//! is safe Rust: the findings are panics, overflows, stalls and runaway allocation, which
//! need none; ASan would instrument every memory access of every crate and slow each
//! run), cargo's dev profile (debug assertions and overflow checks on; incremental
//! rebuilds of the workspace crates; not the release profile, whose fat LTO and one
//! codegen unit are for the shipped binary) with `-Copt-level=3` ([`FUZZ_RUSTFLAGS`]),
//! and a target directory of its own (`target/fuzz`), so that the instrumented build
//! never invalidates the regular one.
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};

use crate::exec::{command_line, exec};
use crate::workspace;

/// Every fuzz target: a binary of `fuzz/` and a module of `ztunnel::fuzzing`.
pub const TARGETS: &[&str] = &[
    "connect_request",
    "hbone_server",
    "workload_file",
    "zds",
    "xds",
    "ca_answer",
];

/// Seconds per target in `cargo xtask test`.
pub const TEST_SECS: u64 = 15;

/// libFuzzer's per-input limit: longer than the harnesses' own 20 s deadlines, so a stall
/// is reported by the harness, which says what stalled.
const INPUT_TIMEOUT_SECS: u64 = 60;

/// On top of the dev profile (debug assertions and overflow checks on, incremental builds
/// of the workspace crates): full optimisation in 16 codegen units (opt-level 1 built
/// 12% faster but ran 4 times slower), and line tables only, for backtraces.
const FUZZ_RUSTFLAGS: &str = "-Copt-level=3 -Ccodegen-units=16 -Cdebuginfo=line-tables-only";

/// Where each fuzz binary writes its seeds (`ztunnel::fuzzing::SEEDS_DIR_ENV`).
const SEEDS_DIR_ENV: &str = "ZTUNNEL_FUZZ_SEEDS";

#[derive(clap::Args)]
pub struct Options {
    /// Fuzz only this target (repeatable; default: every target, one after the other)
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Vec<String>,
    /// Seconds of fuzzing per target
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Run the target once on this input (a crash artifact) instead of fuzzing; needs
    /// exactly one --target
    #[arg(long)]
    pub input: Option<PathBuf>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let targets: Vec<&str> = if options.target.is_empty() {
        TARGETS.to_vec()
    } else {
        options.target.iter().map(String::as_str).collect()
    };
    if let Some(input) = &options.input {
        let [target] = targets[..] else {
            bail!("--input needs exactly one --target");
        };
        return reproduce(target, input);
    }
    ensure!(options.secs > 0, "--secs must be at least 1");
    let outcomes = suite(&targets, options.secs, Echo::All)?;
    eprintln!();
    eprintln!("{}", table(&outcomes));
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crash.is_some())
        .map(|o| o.target.as_str())
        .collect();
    ensure!(
        failed.is_empty(),
        "fuzzing found a crash in {}",
        failed.join(", ")
    );
    Ok(())
}

/// What each target's output shows while it runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Everything libFuzzer prints (`cargo xtask fuzz`).
    All,
    /// Nothing; the log is kept under `target/fuzz/logs/` and shown when the target fails
    /// (`cargo xtask test`).
    OnFailure,
}

/// One target's run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub target: String,
    pub secs: u64,
    /// Inputs run, and per second (libFuzzer's final stats).
    pub execs: u64,
    pub execs_per_sec: u64,
    /// Coverage points reached and corpus size at the end.
    pub cov: Option<u64>,
    pub corpus: Option<String>,
    /// The failure and the saved input(s) that caused it.
    pub crash: Option<Crash>,
}

#[derive(Debug)]
pub struct Crash {
    pub summary: String,
    pub inputs: Vec<PathBuf>,
}

/// Builds every target, then fuzzes each of `targets` for `secs`.
pub fn suite(targets: &[&str], secs: u64, echo: Echo) -> anyhow::Result<Vec<Outcome>> {
    let started = Instant::now();
    exec(&mut cargo_fuzz("build")?)?;
    eprintln!(
        "fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    targets.iter().map(|t| fuzz(t, secs, echo)).collect()
}

/// `rustup run nightly cargo fuzz <subcommand>` with our build settings (module docs).
fn cargo_fuzz(subcommand: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace::root())
        // cargo-fuzz appends these to its own flags, so they win. Only the targets get
        // them: build scripts (and the eBPF build ztunnel's runs) do not.
        .env("RUSTFLAGS", FUZZ_RUSTFLAGS)
        .args(["run", "nightly", "cargo", "fuzz", subcommand])
        .arg("--fuzz-dir")
        .arg(workspace::root().join("fuzz"))
        .args(["--dev", "--sanitizer", "none"])
        .arg("--target-dir")
        .arg(workspace::target_dir()?.join("fuzz"));
    Ok(cmd)
}

fn fuzz(target: &str, secs: u64, echo: Echo) -> anyhow::Result<Outcome> {
    let root = workspace::root();
    let corpus = root.join("fuzz/corpus").join(target);
    let logs = workspace::target_dir()?.join("fuzz/logs");
    fs::create_dir_all(&logs).with_context(|| format!("failed to create {}", logs.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log = fs::File::create(&log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))?;

    let mut cmd = cargo_fuzz("run")?;
    cmd.env(SEEDS_DIR_ENV, &corpus)
        .arg(target)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let line = command_line(&cmd);
    eprintln!("$ {line}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stderr = child.stderr.take().context("cargo fuzz has no stderr")?;
    let mut stats = Stats::default();
    for l in BufReader::new(stderr).lines() {
        let l = l.with_context(|| format!("failed to read the output of `{line}`"))?;
        if echo == Echo::All {
            eprintln!("{l}");
        }
        writeln!(log, "{l}").with_context(|| format!("failed to write {}", log_path.display()))?;
        stats.add(&l);
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    let crash = (!status.success()).then(|| {
        if echo == Echo::OnFailure {
            show_tail(&log_path);
        }
        Crash {
            summary: stats.error.clone().unwrap_or_else(|| status.to_string()),
            inputs: stats.inputs.iter().map(|p| root.join(p)).collect(),
        }
    });
    Ok(Outcome {
        target: target.to_owned(),
        secs,
        execs: stats.execs,
        execs_per_sec: stats.execs_per_sec,
        cov: stats.cov,
        corpus: stats.corpus,
        crash,
    })
}

/// Runs `target` once on `input`, as the fuzzer ran it.
fn reproduce(target: &str, input: &Path) -> anyhow::Result<()> {
    let mut cmd = cargo_fuzz("run")?;
    exec(cmd.arg(target).arg(input))
}

/// The end of a failed target's log: libFuzzer's report and the panic.
fn show_tail(log: &Path) {
    const LINES: usize = 60;
    match fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {} ---", log.display());
            for l in &lines[lines.len().saturating_sub(LINES)..] {
                eprintln!("{l}");
            }
        }
        Err(e) => eprintln!("failed to read {}: {e}", log.display()),
    }
}

/// What libFuzzer's output says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stats {
    execs: u64,
    execs_per_sec: u64,
    cov: Option<u64>,
    corpus: Option<String>,
    /// The panic message and where, or else `==<pid>== ERROR: libFuzzer: …`.
    error: Option<String>,
    /// `src/x.rs:1:2` of a `thread '…' panicked at src/x.rs:1:2:` line, whose message is
    /// the next line.
    panic_at: Option<String>,
    /// Inputs libFuzzer saved (`Test unit written to <path>`).
    inputs: Vec<PathBuf>,
}

impl Stats {
    fn add(&mut self, line: &str) {
        if let Some(at) = self.panic_at.take() {
            self.error = Some(format!("panicked at {at} {}", line.trim()));
            return;
        }
        let value = |key: &str| {
            line.strip_prefix(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(n) = value("stat::number_of_executed_units:") {
            self.execs = n;
        } else if let Some(n) = value("stat::average_exec_per_sec:") {
            self.execs_per_sec = n;
        } else if let Some(path) = line.split("Test unit written to ").nth(1) {
            self.inputs.push(PathBuf::from(path.trim()));
        } else if let Some(e) = line.split("ERROR: libFuzzer: ").nth(1) {
            self.error.get_or_insert_with(|| e.trim().to_owned());
        } else if let Some(at) = line
            .strip_prefix("thread '")
            .and_then(|l| l.split(" panicked at ").nth(1))
        {
            // The panic comes before libFuzzer's "deadly signal" and says more.
            self.panic_at = Some(at.trim_end_matches(':').to_owned());
        } else if line.starts_with('#') {
            // `#1234\tDONE   cov: 512 ft: 2048 corp: 80/6432b lim: 4096 exec/s: 821 …`
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                match w {
                    "cov:" => self.cov = words.next().and_then(|v| v.parse().ok()),
                    "corp:" => self.corpus = words.next().map(str::to_owned),
                    _ => {}
                }
            }
        }
    }
}

/// `target  secs  execs  execs/s  cov  corpus  result`.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "{:<16} {:>5} {:>10} {:>8} {:>6} {:>12}  result\n",
        "target", "secs", "execs", "execs/s", "cov", "corpus"
    );
    for o in outcomes {
        out += &format!(
            "{:<16} {:>5} {:>10} {:>8} {:>6} {:>12}  {}\n",
            o.target,
            o.secs,
            o.execs,
            o.execs_per_sec,
            o.cov.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            o.corpus.as_deref().unwrap_or("-"),
            result(o)
        );
    }
    out
}

/// `ok`, or the failure and the input that caused it.
pub fn result(o: &Outcome) -> String {
    match &o.crash {
        None => "ok".to_owned(),
        Some(c) => {
            let inputs: Vec<String> = c.inputs.iter().map(|p| p.display().to_string()).collect();
            let input = if inputs.is_empty() {
                "no input saved".to_owned()
            } else {
                format!(
                    "input {} (cargo xtask fuzz --target {} --input <path>)",
                    inputs.join(", "),
                    o.target
                )
            };
            format!("FAILED: {}; {input}", c.summary)
        }
    }
}

/// The targets `cargo xtask test` runs for these test-binary arguments: each target
/// counts as a test named `fuzz::<target>` and follows libtest's filters (substring
/// match, `--exact`, `--skip`); no filter runs them all.
pub fn selected(args: &[String]) -> Vec<&'static str> {
    // libtest options whose value is the next argument rather than a filter.
    const WITH_VALUE: &[&str] = &[
        "--skip",
        "--test-threads",
        "--logfile",
        "--format",
        "--color",
        "--shuffle-seed",
        "-Z",
    ];
    let (mut filters, mut skips, mut exact) = (Vec::new(), Vec::new(), false);
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--exact" => exact = true,
            "--skip" => skips.extend(args.next()),
            o if WITH_VALUE.contains(&o) => {
                args.next();
            }
            o if o.starts_with('-') => {}
            f => filters.push(f),
        }
    }
    TARGETS
        .iter()
        .copied()
        .filter(|t| {
            let name = format!("fuzz::{t}");
            let hit = |f: &&str| {
                if exact { name == *f } else { name.contains(*f) }
            };
            (filters.is_empty() || filters.iter().any(hit))
                && !skips.iter().any(|s| name.contains(s.as_str()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn targets_follow_libtest_filters() {
        assert_eq!(selected(&[]), TARGETS);
        assert_eq!(selected(&args(&["--nocapture"])), TARGETS);
        assert_eq!(selected(&args(&["fuzz"])), TARGETS);
        assert_eq!(selected(&args(&["adversarial::"])), Vec::<&str>::new());
        assert_eq!(selected(&args(&["fuzz::zds"])), ["zds"]);
        assert_eq!(selected(&args(&["xds"])), ["xds"]);
        assert_eq!(
            selected(&args(&["--exact", "fuzz::xds", "--test-threads", "1"])),
            ["xds"]
        );
        assert_eq!(selected(&args(&["--exact", "xds"])), Vec::<&str>::new());
        assert_eq!(
            selected(&args(&["fuzz::", "--skip", "hbone", "--skip", "ca_"])),
            ["connect_request", "workload_file", "zds", "xds"]
        );
    }

    #[test]
    fn libfuzzer_output_gives_stats_and_the_crashing_input() {
        let mut s = Stats::default();
        for l in [
            "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb",
            "#40231\tDONE   cov: 1234 ft: 5678 corp: 321/45Kb lim: 4096 exec/s: 2682 rss: 61Mb",
            "stat::number_of_executed_units: 40231",
            "stat::average_exec_per_sec:     2682",
        ] {
            s.add(l);
        }
        assert_eq!(
            (s.execs, s.execs_per_sec, s.cov, s.corpus.as_deref()),
            (40231, 2682, Some(1234), Some("321/45Kb"))
        );
        assert_eq!(s.error, None);

        let mut s = Stats::default();
        for l in [
            "thread '<unnamed>' (123) panicked at ztunnel/src/x.rs:1:2:",
            "zds request 4 unanswered after 20s",
            "stack backtrace:",
            "==123== ERROR: libFuzzer: deadly signal",
            "artifact_prefix='/w/fuzz/artifacts/zds/'; Test unit written to /w/fuzz/artifacts/zds/crash-abc",
        ] {
            s.add(l);
        }
        assert_eq!(
            s.error.as_deref(),
            Some("panicked at ztunnel/src/x.rs:1:2 zds request 4 unanswered after 20s")
        );
        assert_eq!(s.inputs, [PathBuf::from("/w/fuzz/artifacts/zds/crash-abc")]);
    }

    /// The list here, the binaries of `fuzz/` and what each binary runs must agree.
    #[test]
    fn targets_match_the_fuzz_crate() {
        let fuzz = workspace::root().join("fuzz");
        let manifest = fs::read_to_string(fuzz.join("Cargo.toml")).expect("fuzz/Cargo.toml");
        let mut bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "ztunnel-fuzz")
            .collect();
        bins.sort_unstable();
        let mut want = TARGETS.to_vec();
        want.sort_unstable();
        assert_eq!(bins, want);
        for t in TARGETS {
            let path = fuzz.join(format!("fuzz_targets/{t}.rs"));
            let src = fs::read_to_string(&path).expect("fuzz target source");
            assert!(
                src.contains(&format!("init(\"{t}\")"))
                    && src.contains(&format!("fuzzing::{t}::run(")),
                "{} must seed and run {t}",
                path.display()
            );
        }
    }
}
