//! Runs the performance harness (see `ztunnel_tests::bench`); `cargo xtask bench` builds
//! it in release mode and runs it.
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    about = "S0 no mesh vs I Istio's ztunnel vs S1 iptables vs S2 eBPF vs S3 fast path, side by side, and an upgrade under load"
)]
struct Cli {
    /// One round of one-second measurements and 100 idle connections (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Run only this scenario (repeat for several); ratios need S0 among them.
    #[arg(long = "scenario", value_enum)]
    only: Vec<ztunnel_tests::bench::Scenario>,
    /// Measure only the upgrade under load (a ztunnel handed over to a successor at
    /// a fixed connection rate), not S0–S3.
    #[arg(long, conflicts_with = "only")]
    upgrade_only: bool,
    /// Measure only request/response latency, and the proxies' context switches,
    /// syscalls and CPU per request.
    #[arg(long, conflicts_with = "upgrade_only")]
    latency_only: bool,
    /// Measure only memory: idle RSS and what 1,000 idle connections (tunnelled, and
    /// plain outside the mesh) add, in full rounds.
    #[arg(long, conflicts_with_all = ["upgrade_only", "latency_only"])]
    memory_only: bool,
    /// Sample the ztunnels with perf and draw flame graphs (perturbs the figures).
    #[arg(long)]
    profile: bool,
    /// Only draw bench.md and bench.svg again from this bench.json (no measuring).
    #[arg(long, value_name = "BENCH_JSON")]
    render: Option<PathBuf>,
    /// Where bench.md, bench.json and bench.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Istio's ztunnel binary (release, `testing` feature): adds scenario I
    /// (docs/bench/README.md says how to build it).
    #[arg(long, value_name = "PATH")]
    istio_ztunnel: Option<PathBuf>,
    /// Run as `PROGRAM idle PID…` once the proxies' idle memory is read and as `PROGRAM
    /// conns PID…` once the first idle connections' is, and wait for it (`cargo xtask
    /// pgo` takes the data path's link order this way).
    #[arg(long, value_name = "PROGRAM")]
    memory_hook: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(json) = &cli.render {
        let report = ztunnel_tests::bench::render(json)?;
        print!("{}", ztunnel_tests::bench::markdown(&report));
        return Ok(());
    }
    ztunnel_tests::require_root();
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the bench topologies down");
        let _ = ztunnel_tests::bench::remove_leftovers();
        std::process::exit(130);
    })?;
    let report = ztunnel_tests::bench::run(&ztunnel_tests::bench::Options {
        quick: cli.quick,
        only: cli.only,
        profile: cli.profile,
        out_dir: cli.out.clone(),
        istio_ztunnel: cli.istio_ztunnel,
        upgrade_only: cli.upgrade_only,
        latency_only: cli.latency_only,
        memory_only: cli.memory_only,
        memory_hook: cli.memory_hook,
    })?;
    print!("{}", ztunnel_tests::bench::markdown(&report));
    println!(
        "\nwritten: {0}/bench.md {0}/bench.json {0}/bench.svg",
        cli.out.display()
    );
    Ok(())
}
