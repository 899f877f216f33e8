//! Where things are: the workspace root and cargo's target directory, and whether we are root.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::exec::capture;

/// The eBPF crate: built only for the BPF target, so host-side cargo runs leave it out.
pub const EBPF_CRATE: &str = "ztunnel-ebpf";
/// The fuzz targets: built only by cargo-fuzz (nightly, `--cfg fuzzing`, libFuzzer), so
/// host-side cargo runs leave them out too.
pub const FUZZ_CRATE: &str = "ztunnel-fuzz";

/// The workspace root: xtask's parent directory.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir is inside the workspace")
}

/// A `cargo` command (through the rustup proxy, so `rust-toolchain.toml` applies) run in
/// the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root());
    cmd
}

/// `cargo test` over every crate that runs on the host. Whatever builds test binaries
/// uses this one selection: cargo unifies features over the packages selected, so
/// another selection (`-p ztunnel-tests`) compiles ztunnel and half its dependencies
/// again, with other features.
pub fn cargo_test() -> Command {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", EBPF_CRATE])
        .args(["--exclude", FUZZ_CRATE]);
    cmd
}

/// Cargo's target directory as cargo itself resolves it (`CARGO_TARGET_DIR`, config, default).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let metadata = capture(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("failed to parse `cargo metadata` output")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` output has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Whether we run as root (effective uid 0), asked of `id -u`.
pub fn is_root() -> anyhow::Result<bool> {
    let uid = capture(Command::new("id").arg("-u"))?;
    Ok(uid.trim() == "0")
}
