//! `cargo xtask build-ebpf`: builds the eBPF object the way every build does (ztunnel's
//! build script, through aya-build) and shows where it landed.
use std::fs;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::exec::exec;
use crate::workspace::{self, cargo};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_options: &Options) -> anyhow::Result<()> {
    exec(cargo().args(["build", "-p", "ztunnel"]))?;
    let (path, size) = newest_object()?;
    println!("{} ({size} bytes)", path.display());
    Ok(())
}

/// The newest `target/debug/build/ztunnel-*/out/ztunnel`: each build-script hash has its own
/// out dir, and stale ones stay behind.
fn newest_object() -> anyhow::Result<(PathBuf, u64)> {
    let build = workspace::target_dir()?.join("debug/build");
    let entries =
        fs::read_dir(&build).with_context(|| format!("failed to read {}", build.display()))?;
    let mut newest: Option<(SystemTime, PathBuf, u64)> = None;
    for entry in entries {
        let entry = entry.with_context(|| format!("failed to read {}", build.display()))?;
        if !entry.file_name().to_string_lossy().starts_with("ztunnel-") {
            continue;
        }
        let object = entry.path().join("out/ztunnel");
        let Ok(metadata) = fs::metadata(&object) else {
            continue;
        };
        let modified = metadata
            .modified()
            .with_context(|| format!("failed to read the mtime of {}", object.display()))?;
        if metadata.is_file() && newest.as_ref().is_none_or(|(time, ..)| modified > *time) {
            newest = Some((modified, object, metadata.len()));
        }
    }
    let (_, path, size) = newest.with_context(|| {
        format!(
            "no eBPF object at {}/ztunnel-*/out/ztunnel",
            build.display()
        )
    })?;
    Ok((path, size))
}
