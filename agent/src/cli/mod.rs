//! The `podmesh` command-line tool.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod plan;
pub mod secret;
pub mod status;

/// podmesh: check a multi-cluster address plan, show mesh status, render Secrets.
#[derive(Debug, Parser)]
#[command(name = "podmesh", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version of podmesh and of its embedded kernel programs.
    Version,
    /// Check a multi-cluster address plan, or find free ranges in it.
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Show a running agent's remote clusters, records and rejections.
    Status(status::StatusArgs),
    /// Render clustermesh Secret entries.
    #[command(subcommand)]
    Secret(SecretCommand),
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// The Secret YAML for one remote cluster, with its certificates inlined.
    Render(secret::RenderArgs),
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!(
                "podmesh {} (eBPF object {} bytes)",
                env!("CARGO_PKG_VERSION"),
                crate::EBPF_OBJECT.len()
            );
            ExitCode::SUCCESS
        }
        Command::Plan(cmd) => plan::run(cmd),
        Command::Status(a) => ExitCode::from(status::run(&a)),
        Command::Secret(SecretCommand::Render(a)) => ExitCode::from(secret::run(&a)),
    }
}
