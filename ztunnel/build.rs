//! Compiles the kernel programs (`ztunnel-ebpf`) with the nightly toolchain and
//! bpf-linker, for `include_bytes_aligned!` in `src/ebpf.rs`. `cargo xtask setup`
//! installs both.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf = concat!(env!("CARGO_MANIFEST_DIR"), "/../ztunnel-ebpf");
    let common = concat!(env!("CARGO_MANIFEST_DIR"), "/../ztunnel-common");
    println!("cargo:rerun-if-changed={common}");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ztunnel-ebpf",
            root_dir: ebpf,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("failed to build the eBPF programs; run `cargo xtask setup` first")
}
