//! Compiles the kernel programs (`ztunnel-ebpf`) with the nightly toolchain and
//! bpf-linker, for `include_bytes_aligned!` in `src/ebpf.rs`. `cargo xtask setup`
//! installs both. Also generates the Istio control-plane messages (prost/tonic) from
//! `proto/` with protoc (Debian's protobuf-compiler, also installed by setup).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    // Relative relocations packed as DT_RELR (glibc 2.36, the image's Debian 12): the
    // dynamic loader reads ~12 KB at start instead of 686 KB of `.rela.dyn`, which stayed
    // resident (ARCHITECTURE.md, Performance, "Idle memory, measured again").
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    // `cargo xtask build` links with this file (lld's `--symbol-ordering-file`), which
    // rustc does not track as an input: a new order must link the binary again.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/pgo/ztunnel.order")
    );
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

fn compile_protos() -> anyhow::Result<()> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    println!("cargo:rerun-if-changed={dir}");
    let files = [
        "google/rpc/status.proto",
        "envoy/discovery.proto",
        "istio/workload.proto",
        "istio/authorization.proto",
        "istio/zds.proto",
        "istio/ca.proto",
    ]
    .map(|f| format!("{dir}/{f}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&files, &[dir.to_owned()])
        .context("failed to compile proto/ (is protoc installed? `cargo xtask setup` installs it)")
}
