//! `cargo xtask test`: lint, build the daemon and the test pods' binary, then run the unit
//! tests and the privileged integration tests (root: network namespaces, eBPF, cgroups).
//! Then each fuzz target for a short fixed time (`cargo xtask fuzz` fuzzes longer), and
//! the capture tests in VMs on the oldest and the newest kernel of the matrix
//! (`cargo xtask vm-test` runs them all). The last line is the total over every test
//! binary, fuzz target and VM, `N passed, N failed`.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, bail, ensure};

use crate::exec::{command_line, exec};
use crate::fuzz;
use crate::lint;
use crate::vm;
use crate::workspace::{self, cargo};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo xtask lint` (for quick local runs)
    #[arg(long)]
    pub no_lint: bool,
    /// Skip the VM tests on the oldest and newest kernels (for quick local runs)
    #[arg(long)]
    pub no_vm: bool,
    /// Skip the fuzz targets (for quick local runs)
    #[arg(long)]
    pub no_fuzz: bool,
    /// Passed to the test binaries after `--`, e.g. a test name filter
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !workspace::is_root()? {
        bail!(
            "the integration tests need root (network namespaces, eBPF programs, cgroups): \
             rerun `cargo xtask test` as root"
        );
    }
    if !options.no_lint {
        lint::run(&lint::Options::default())?;
    }
    // The daemon is built on its own, with the features it ships with. The test pods'
    // binary comes from building the tests: `cargo build -p ztunnel-tests` would unify
    // features differently from `cargo test` and compile ztunnel and half its
    // dependencies a third time (2 min 22 s in CI).
    exec(cargo().args(["build", "-p", "ztunnel", "--bins"]))?;
    exec(workspace::cargo_test().arg("--no-run"))?;

    let debug = workspace::target_dir()?.join("debug");
    let (ztunnel, podapp) = (debug.join("ztunnel"), debug.join("podapp"));
    for bin in [&ztunnel, &podapp] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }

    // The integration tests share kernel state (bpffs pins, cgroups, iptables), so they
    // run one at a time.
    let mut cmd = workspace::cargo_test();
    cmd.env("ZTUNNEL_BIN", &ztunnel)
        .env(
            "KUBERNETES_VALIDATE",
            crate::setup::kubernetes_validate_bin()?,
        )
        .env("PODAPP_BIN", &podapp)
        // A failed test's error is read from the tail of its output: with RUST_BACKTRACE
        // set (as CI sets it), anyhow would bury each error, and the tools' errors a test
        // quotes, under a stack of frames. Panics keep theirs.
        .env(
            "RUST_LIB_BACKTRACE",
            std::env::var_os("RUST_LIB_BACKTRACE").unwrap_or_else(|| "0".into()),
        )
        .args(["--", "--test-threads=1"])
        .args(&options.args)
        .stdout(Stdio::piped());
    let line = command_line(&cmd);
    eprintln!("$ {line}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to run {line}"))?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let mut totals = Totals::default();
    let mut reasons = Reasons::default();
    for l in BufReader::new(stdout).lines() {
        let l = l.with_context(|| format!("failed to read the output of {line}"))?;
        println!("{l}");
        totals.add(&l);
        reasons.add(&l);
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for {line}"))?;
    // Each target counts as a test `fuzz::<target>` and follows the same filters.
    let targets = if options.no_fuzz {
        Vec::new()
    } else {
        fuzz::selected(&options.args)
    };
    let mut fuzz_failed = Vec::new();
    if !targets.is_empty() {
        let outcomes = fuzz::suite(&targets, fuzz::TEST_SECS, fuzz::Echo::OnFailure)?;
        for o in &outcomes {
            println!(
                "test fuzz::{} ... {} ({} s, {} execs, {} execs/s)",
                o.target,
                fuzz::result(o),
                o.secs,
                o.execs,
                o.execs_per_sec
            );
            if o.crash.is_some() {
                fuzz_failed.push(o.target.clone());
            }
        }
        let failed = fuzz_failed.len() as u64;
        totals.passed += outcomes.len() as u64 - failed;
        totals.failed += failed;
    }
    let mut vm_failed = 0;
    if !options.no_vm {
        let vms = vm::run_matrix(&vm::Options {
            kernel: vm::EDGES.iter().map(|v| (*v).to_owned()).collect(),
            accel: vm::Accel::Tcg,
            jobs: None,
            only: Vec::new(),
        })?;
        println!(
            "VMs ({}): {} passed, {} failed",
            vm::EDGES.join(", "),
            vms.passed,
            vms.failed
        );
        totals.passed += vms.passed;
        totals.failed += vms.failed;
        vm_failed = vms.failed;
    }
    // Each failed test's reason again at the very end, where a reader of a long log (or
    // of its tail) finds it: inside the test's own output it sits between the ztunnel log
    // and a backtrace.
    for r in &reasons.found {
        println!("failed: {r}");
    }
    println!("{}", totals.summary());
    ensure!(status.success(), "{line} failed: {status}");
    ensure!(
        fuzz_failed.is_empty(),
        "fuzzing found a crash in {}",
        fuzz_failed.join(", ")
    );
    ensure!(vm_failed == 0, "{vm_failed} VM test(s) failed");
    ensure!(totals.passed > 0, "no test ran");
    Ok(())
}

/// Sums libtest's `test result:` lines.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    fn summary(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed, self.failed);
        if self.ignored > 0 {
            s += &format!(", {} skipped", self.ignored);
        }
        s
    }
}

/// The first line of each failed test's panic message or returned error, read from
/// libtest's `---- <name> stdout ----` sections.
#[derive(Default, Debug)]
struct Reasons {
    test: Option<String>,
    /// The previous line was `thread '…' panicked at <file>:<line>:` (the message follows).
    panic_at: Option<String>,
    found: Vec<String>,
}

impl Reasons {
    const MAX_CHARS: usize = 400;

    fn add(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"))
        {
            self.test = Some(name.to_owned());
            self.panic_at = None;
            return;
        }
        let Some(test) = self.test.clone() else {
            return;
        };
        if let Some(at) = self.panic_at.take() {
            self.record(&test, &format!("{} ({at})", line.trim()));
        } else if let Some(rest) = line.strip_prefix("thread '") {
            // `thread '<name>' panicked at …`, or `thread '<name>' (<tid>) panicked at …`.
            if let Some((_, at)) = rest.split_once(" panicked at ") {
                let at = at.trim_end_matches(':');
                self.panic_at = Some(at.to_owned());
            }
        } else if let Some(err) = line.strip_prefix("Error: ") {
            self.record(&test, err);
        }
    }

    fn record(&mut self, test: &str, reason: &str) {
        let reason: String = reason.chars().take(Self::MAX_CHARS).collect();
        self.found.push(format!("{test}: {reason}"));
        // One reason per test: the first is the cause, later ones its echoes.
        self.test = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_each_failed_test_with_its_message() {
        let mut r = Reasons::default();
        for l in [
            "test a::b ... FAILED",
            "failures:",
            "",
            "---- a::b stdout ----",
            "---- ztunnel log (/tmp/x.log) ----",
            "2026-12-05T10:48:17Z\tinfo\tapp\tstarting ztunnel",
            "Error: timed out after 60s waiting for ztunnel to run out of descriptors",
            "",
            "Stack backtrace:",
            "   0: anyhow::error::<impl anyhow::Error>::msg",
            "---- c::d stdout ----",
            "thread 'c::d' (31127) panicked at tests/tests/it/x.rs:12:5:",
            "ztunnel does not serve again",
            "note: run with `RUST_BACKTRACE=1`",
            "---- e::f stdout ----",
            "some output without a reason",
        ] {
            r.add(l);
        }
        assert_eq!(
            r.found,
            vec![
                "a::b: timed out after 60s waiting for ztunnel to run out of descriptors"
                    .to_owned(),
                "c::d: ztunnel does not serve again (tests/tests/it/x.rs:12:5)".to_owned(),
            ]
        );
    }

    #[test]
    fn totals_sum_libtest_result_lines() {
        let mut t = Totals::default();
        t.add("test result: ok. 7 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add("test result: FAILED. 8 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 3.1s");
        t.add("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 15,
                failed: 1,
                ignored: 2
            }
        );
        assert_eq!(t.summary(), "15 passed, 1 failed, 2 skipped");
    }
}
