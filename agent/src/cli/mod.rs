//! The `podmesh` command-line tool.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod cleanup;
pub mod diagnose;
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
    /// Find the first broken link towards each remote cluster (config, reach,
    /// authz, sync, datapath, plan), with the evidence and the fix. Exit 0
    /// when every check passes, 1 when one fails, 2 when it cannot run.
    Diagnose(diagnose::DiagnoseArgs),
    /// Render clustermesh Secret entries.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Remove everything podmesh installed on this node (routes, nexthops,
    /// devices, pinned maps, the masquerade exemption): an uninstall, once
    /// the agent is gone for good. Needs root.
    Cleanup(cleanup::CleanupArgs),
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
        Command::Diagnose(a) => ExitCode::from(diagnose::run(&a)),
        Command::Secret(SecretCommand::Render(a)) => ExitCode::from(secret::run(&a)),
        Command::Cleanup(a) => cleanup::run(&a),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap's own consistency checks of every subcommand and flag, and a
    /// help text that documents each subcommand.
    #[test]
    fn command_line_is_consistent_and_documented() {
        let mut cmd = Cli::command();
        cmd.clone().debug_assert();
        let help = cmd.render_long_help().to_string();
        for sub in ["version", "plan", "status", "diagnose", "secret", "cleanup"] {
            assert!(help.contains(sub), "--help does not list {sub}:\n{help}");
        }
        for sub in cmd.get_subcommands() {
            assert!(
                sub.get_about().is_some(),
                "subcommand {} has no description",
                sub.get_name()
            );
        }
    }
}
