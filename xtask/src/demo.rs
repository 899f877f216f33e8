//! `cargo xtask demo`: build ztunnel and the demo, then run it (as root). `--keep`
//! leaves the topology running; `--down` removes it.
use anyhow::{bail, ensure};

use crate::exec::exec;
use crate::workspace::{self, cargo};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Leave the two nodes and four pods running and print how to explore them
    #[arg(long)]
    pub keep: bool,
    /// Tear down what `--keep` left running
    #[arg(long, conflicts_with = "keep")]
    pub down: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !workspace::is_root()? {
        bail!("the demo creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    exec(cargo().args(["build", "-p", "ztunnel", "--bins"]))?;
    exec(cargo().args(["build", "-p", "ztunnel-tests", "--bins"]))?;
    let debug = workspace::target_dir()?.join("debug");
    let (ztunnel, podapp, demo) = (
        debug.join("ztunnel"),
        debug.join("podapp"),
        debug.join("demo"),
    );
    for bin in [&ztunnel, &podapp, &demo] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }
    let mut cmd = std::process::Command::new(&demo);
    cmd.env("ZTUNNEL_BIN", &ztunnel).env("PODAPP_BIN", &podapp);
    if options.keep {
        cmd.arg("--keep");
    }
    if options.down {
        cmd.arg("--down");
    }
    exec(&mut cmd)
}
