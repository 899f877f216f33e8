//! `cargo xtask bench`: build ztunnel, podapp and the harness in release mode, then run
//! S0–S3 side by side, then the upgrade under load (as root), and Istio's ztunnel as
//! scenario I when `--istio-ztunnel PATH` gives its binary. Reports go to `target/bench/`
//! unless `--out` says else.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure};

use crate::exec::exec;
use crate::pgo;
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
    /// Run only this scenario (s0, i, s1, s2, s3; repeatable), e.g. while profiling one
    #[arg(long = "scenario")]
    pub scenarios: Vec<String>,
    /// Istio's ztunnel binary, built in release with its `testing` feature: adds scenario I
    /// (Istio's ztunnel side by side; docs/bench/README.md says how to build it)
    #[arg(long, value_name = "PATH")]
    pub istio_ztunnel: Option<PathBuf>,
    /// Measure only the upgrade under load: failed connections and handover time while
    /// a ztunnel hands over to a successor at 200 new connections/s
    #[arg(long, conflicts_with = "scenarios")]
    pub upgrade_only: bool,
    /// Measure only request/response latency, and the proxies' context switches,
    /// syscalls and CPU per request (a short loop while working on latency)
    #[arg(long, conflicts_with = "upgrade_only")]
    pub latency_only: bool,
    /// Measure only memory: idle RSS and what 1,000 idle connections add (a loop of a
    /// few minutes while working on memory)
    #[arg(long, conflicts_with_all = ["upgrade_only", "latency_only"])]
    pub memory_only: bool,
}

/// The Istio ztunnel binary as an absolute path (the harness runs it inside pods), or a
/// clear error naming the path and how to get one.
fn istio_binary(path: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow::anyhow!(
            "--istio-ztunnel {}: {e} (docs/bench/README.md says how to build Istio's ztunnel)",
            path.display()
        )
    })?;
    ensure!(
        meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        "--istio-ztunnel {}: not an executable file",
        path.display()
    );
    Ok(std::path::absolute(path)?)
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !workspace::is_root()? {
        bail!("the bench creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    let istio = options
        .istio_ztunnel
        .as_deref()
        .map(istio_binary)
        .transpose()?;
    // The shipped binary, as `cargo xtask build` makes it (profile-guided); the bench and
    // its pods' app are plain release builds.
    let ztunnel = pgo::build_ztunnel()?;
    exec(cargo().args(["build", "--release", "-p", "ztunnel-tests", "--bins"]))?;
    let target = workspace::target_dir()?;
    let release = target.join("release");
    let (podapp, bench) = (release.join("podapp"), release.join("bench"));
    for bin in [&podapp, &bench] {
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
    if options.latency_only {
        cmd.arg("--latency-only");
    }
    if options.memory_only {
        cmd.arg("--memory-only");
    }
    for s in &options.scenarios {
        cmd.arg("--scenario").arg(s);
    }
    if let Some(bin) = &istio {
        cmd.arg("--istio-ztunnel").arg(bin);
    }
    exec(&mut cmd)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn istio_binary_must_be_an_executable_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let missing = istio_binary(&dir.path().join("ztunnel")).expect_err("missing");
        assert!(
            format!("{missing:#}").contains("docs/bench/README.md"),
            "{missing:#}"
        );
        let not_a_file = istio_binary(dir.path()).expect_err("a directory");
        assert!(format!("{not_a_file:#}").contains("not an executable file"));
        let bin = dir.path().join("zt");
        std::fs::write(&bin, "")?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644))?;
        assert!(istio_binary(&bin).is_err(), "not executable");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        assert_eq!(istio_binary(&bin)?, bin);
        Ok(())
    }

    #[test]
    fn relative_istio_binary_becomes_absolute() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let bin = dir.path().join("zt");
        std::fs::write(&bin, "")?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        let cwd = std::env::current_dir()?;
        let rel = pathdiff(&bin, &cwd);
        assert!(rel.is_relative());
        assert_eq!(istio_binary(&rel)?, cwd.join(&rel));
        Ok(())
    }

    /// `to` relative to `from` (both absolute) by climbing to the root.
    fn pathdiff(to: &Path, from: &Path) -> PathBuf {
        let mut p = PathBuf::new();
        for _ in from.components().skip(1) {
            p.push("..");
        }
        p.join(to.strip_prefix("/").expect("absolute"))
    }
}
