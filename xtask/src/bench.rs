//! `cargo xtask bench`: build ztunnel, podapp and the harness in release mode, then run
//! S0–S3 side by side, then the upgrade under load (as root). Reports go to `target/bench/` unless `--out` says else.
use std::path::PathBuf;

use anyhow::{bail, ensure};

use crate::exec::exec;
use crate::workspace::{self, cargo};

#[derive(clap::Args, Default)]
pub struct Options {
    /// One round of one-second measurements (a smoke run, under two minutes)
    #[arg(long)]
    pub quick: bool,
    /// Where bench.md, bench.json and bench.svg go (default: target/bench)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sample the ztunnels with perf and write flame graphs next to the report
    #[arg(long)]
    pub profile: bool,
    /// Run only this scenario (s0, s1, s2, s3; repeatable), e.g. while profiling one
    #[arg(long = "scenario")]
    pub scenarios: Vec<String>,
    /// Measure only the upgrade under load: failed connections and handover time while
    /// a ztunnel hands over to a successor at 200 new connections/s
    #[arg(long, conflicts_with = "scenarios")]
    pub upgrade_only: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !workspace::is_root()? {
        bail!("the bench creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    exec(cargo().args([
        "build",
        "--release",
        "-p",
        "ztunnel",
        "-p",
        "ztunnel-tests",
        "--bins",
    ]))?;
    let target = workspace::target_dir()?;
    let release = target.join("release");
    let (ztunnel, podapp, bench) = (
        release.join("ztunnel"),
        release.join("podapp"),
        release.join("bench"),
    );
    for bin in [&ztunnel, &podapp, &bench] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }
    let out = options.out.clone().unwrap_or_else(|| target.join("bench"));
    let mut cmd = std::process::Command::new(&bench);
    cmd.env("ZTUNNEL_BIN", &ztunnel)
        .env("PODAPP_BIN", &podapp)
        .arg("--out")
        .arg(&out);
    if options.quick {
        cmd.arg("--quick");
    }
    if options.profile {
        cmd.arg("--profile");
    }
    if options.upgrade_only {
        cmd.arg("--upgrade-only");
    }
    for s in &options.scenarios {
        cmd.arg("--scenario").arg(s);
    }
    exec(&mut cmd)
}
