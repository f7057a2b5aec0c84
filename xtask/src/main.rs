//! `cargo xtask`: project automation (setup, test, demo, bench, vm-test).
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "podmesh project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what this machine lacks (Debian packages, bpf-linker).
    Setup,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => anyhow::bail!("setup is not written yet"),
    }
}
