//! `cargo xtask <command>`: the one task runner for the workspace. Every command but
//! `setup` prepares the machine first, so a fresh checkout needs nothing else.
#![forbid(unsafe_code)]

mod bench;
mod build_ebpf;
mod demo;
mod exec;
mod fuzz;
mod lint;
mod pgo;
mod setup;
mod test;
mod vm;
mod workspace;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "ztunnel's task runner")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain pieces and packages the build and tests need (idempotent)
    Setup(setup::Options),
    /// Check formatting and run clippy on the host crates and on the eBPF crate
    Lint(lint::Options),
    /// Lint, build the binaries and run unit and privileged integration tests
    Test(test::Options),
    /// Build the eBPF object (through ztunnel's build script) and show where it is
    BuildEbpf(build_ebpf::Options),
    /// Run the whole system on this machine: two nodes, four pods, mTLS, a policy, an upgrade
    Demo(demo::Options),
    /// Build the release ztunnel, optimised and laid out with ztunnel/pgo/'s profile and link order
    Build(pgo::BuildOptions),
    /// Take the profile again (an instrumented ztunnel through the quick bench's S2), then the link order (callgrind, the bench's memory phase); root
    Pgo(pgo::PgoOptions),
    /// Measure no mesh vs iptables vs eBPF capture vs fast path, and an upgrade under load
    Bench(bench::Options),
    /// Run the capture-relevant integration tests in qemu VMs, one per kernel version
    VmTest(vm::Options),
    /// Build the fuzz targets (cargo-fuzz, libFuzzer) and fuzz each for a while
    Fuzz(fuzz::Options),
}

/// Errors end the run with their message and causes, without a backtrace: a reader of
/// the log's tail (CI shows the tail) sees the failed tests' reasons printed just before.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Setup(options) = &cli.command {
        return setup::run(options);
    }
    // A build (an image's too) needs only the toolchain pieces.
    let build_only = matches!(cli.command, Command::Build(_));
    setup::run(&setup::Options { build_only })?;
    match &cli.command {
        Command::Setup(_) => Ok(()),
        Command::Lint(options) => lint::run(options),
        Command::Test(options) => test::run(options),
        Command::BuildEbpf(options) => build_ebpf::run(options),
        Command::Demo(options) => demo::run(options),
        Command::Build(options) => pgo::run_build(options),
        Command::Pgo(options) => pgo::run_profile(options),
        Command::Bench(options) => bench::run(options),
        Command::VmTest(options) => vm::run(options),
        Command::Fuzz(options) => fuzz::run(options),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command};

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_what_follows_the_separator_to_the_test_binaries() {
        let cli = Cli::try_parse_from([
            "xtask",
            "test",
            "--no-lint",
            "--",
            "enrolled",
            "--nocapture",
        ])
        .expect("valid command line");
        let Command::Test(options) = cli.command else {
            panic!("parsed as another command");
        };
        assert!(options.no_lint);
        assert_eq!(options.args, ["enrolled", "--nocapture"]);
    }
}
