//! `cargo xtask lint`: rustfmt and clippy (`-D warnings`) on the host crates, and clippy on
//! the eBPF crate for its own target with the nightly toolchain, as its build does.
use std::process::Command;

use anyhow::bail;

use crate::exec::{command_line, exec};
use crate::workspace::{self, EBPF_CRATE, FUZZ_CRATE, cargo};

#[derive(clap::Args, Default)]
pub struct Options {}

pub fn run(_options: &Options) -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);

    let mut clippy = cargo();
    clippy
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--exclude",
            FUZZ_CRATE,
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"]);

    // aya-ebpf selects per-architecture code (pt_regs layouts) by `bpf_target_arch`, which
    // aya-build sets from the host; linting needs the same cfg. A target dir of its own
    // keeps these flags from invalidating the regular build.
    let mut ebpf_clippy = Command::new("rustup");
    ebpf_clippy
        .current_dir(workspace::root())
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        )
        .args(["run", "nightly", "cargo", "clippy", "-p", EBPF_CRATE])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(workspace::target_dir()?.join("ebpf-lint"))
        .args(["--", "-D", "warnings"]);

    // Run every check, so one run shows all that needs fixing.
    let mut failed = Vec::new();
    for cmd in [&mut fmt, &mut clippy, &mut ebpf_clippy] {
        if let Err(err) = exec(cmd) {
            eprintln!("error: {err:#}");
            failed.push(command_line(cmd));
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join("; "));
    }
    Ok(())
}
