//! Runs the demo (see `ztunnel_tests::demo`); `--keep` leaves it running, `--down`
//! removes what a kept demo left.
use clap::Parser;

#[derive(Parser)]
#[command(about = "ztunnel on one machine: two nodes, four pods, mTLS, policy and an upgrade")]
struct Cli {
    /// Leave the topology running and print how to explore it.
    #[arg(long)]
    keep: bool,
    /// Tear down what a `--keep` run left behind.
    #[arg(long, conflicts_with = "keep")]
    down: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ztunnel_tests::require_root();
    if cli.down {
        ztunnel_tests::teardown(ztunnel_tests::demo::ID)?;
        println!("demo torn down");
        return Ok(());
    }
    // Ctrl-C (or SIGTERM) mid-demo: tear everything down before leaving.
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the demo down");
        let _ = ztunnel_tests::teardown(ztunnel_tests::demo::ID);
        std::process::exit(130);
    })?;
    ztunnel_tests::demo::run(&ztunnel_tests::demo::Options { keep: cli.keep }).map(drop)
}
