//! ztunnel's command line: `ztunnel run …` starts the node proxy, `ztunnel waypoint …` a
//! waypoint; `ztunnel status`,
//! `workloads`, `services`, `policies`, `certificates` and `connections` read a running
//! one's admin port.
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ztunnel::{app, cli, config::Config, telemetry, waypoint};

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "eBPF-accelerated zero-trust node proxy"
)]
struct Cli {
    #[command(flatten)]
    inspect: cli::Options,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy.
    Run(Box<Config>),
    /// Run a waypoint: the L7 proxy of the services and workloads that name it.
    Waypoint(Box<waypoint::Args>),
    #[command(flatten)]
    Inspect(cli::Command),
    /// Show or switch the kernel's per-program BPF statistics (runs, run time).
    BpfStats(cli::BpfStatsArgs),
    /// Show or switch the capture programs' decisions in the log.
    CaptureLog(cli::CaptureLogArgs),
    /// Watch the capture programs' decisions live.
    #[command(subcommand)]
    Capture(cli::CaptureCommand),
}

fn main() -> anyhow::Result<()> {
    // rustls has both backends compiled in (HBONE's records may be ring's, `tls::provider`),
    // so it cannot pick a process default by itself: a library building a config without
    // a provider gets aws-lc-rs', as before. Err: one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(cfg) => {
            // Declared before the runtime, so dropped after it: what the last tasks logged
            // is written out.
            let (log, _flush) =
                telemetry::init(cfg.log_format).context("failed to start the log writer thread")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.resolved_worker_threads())
                .enable_all()
                .build()?;
            rt.block_on(app::run(*cfg, log))
        }
        Command::Waypoint(args) => {
            let (_log, _flush) = telemetry::init(args.log_format)
                .context("failed to start the log writer thread")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(waypoint::run(*args))
        }
        Command::Inspect(c) => cli::run(&c, &cli.inspect),
        Command::BpfStats(a) => cli::run_bpf_stats(&a, &cli.inspect),
        Command::CaptureLog(a) => cli::run_capture_log(&a, &cli.inspect),
        Command::Capture(c) => cli::run_capture(&c, &cli.inspect),
    }
}
