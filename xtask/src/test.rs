//! `cargo xtask test`: lint, build the daemon and the test pods' binary, then run the unit
//! tests and the privileged integration tests (root: network namespaces, eBPF, cgroups).
//! Nothing is printed after cargo test's own summary, which CI reads.
use anyhow::{bail, ensure};

use crate::exec::exec;
use crate::lint;
use crate::workspace::{self, EBPF_CRATE, cargo};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo xtask lint` (for quick local runs)
    #[arg(long)]
    pub no_lint: bool,
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
    exec(cargo().args(["build", "-p", "ztunnel", "--bins"]))?;
    exec(cargo().args(["build", "-p", "ztunnel-tests", "--bins"]))?;

    let debug = workspace::target_dir()?.join("debug");
    let (ztunnel, podapp) = (debug.join("ztunnel"), debug.join("podapp"));
    for bin in [&ztunnel, &podapp] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }

    // The integration tests share kernel state (bpffs pins, cgroups, iptables), so they
    // run one at a time.
    exec(
        cargo()
            .env("ZTUNNEL_BIN", &ztunnel)
            .env("PODAPP_BIN", &podapp)
            .args(["test", "--workspace", "--exclude", EBPF_CRATE])
            .args(["--", "--test-threads=1"])
            .args(&options.args),
    )
}
