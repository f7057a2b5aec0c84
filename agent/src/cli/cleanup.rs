//! `podmesh cleanup`: removes everything podmesh installed on this node, once podmesh leaves it.
use std::{path::PathBuf, process::ExitCode};

use crate::datapath::uninstall::uninstall;

/// `podmesh cleanup` arguments.
#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// Where the agent pinned its eBPF maps and link (its --bpf-pin-dir).
    #[arg(long, default_value = podmesh_common::PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// The agent's status address: cleanup refuses while an agent answers
    /// there, since it would set everything up again at its next resync.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub status_addr: String,
    /// Clean up even though an agent answers at --status-addr.
    #[arg(long)]
    pub force: bool,
}

/// Runs `podmesh cleanup`: 0 when everything is gone, 1 when something
/// could not be removed, 2 when it refused to start.
pub fn run(a: &CleanupArgs) -> ExitCode {
    if !a.force && super::status::fetch(&a.status_addr).is_ok() {
        eprintln!(
            "podmesh cleanup: an agent answers at {}; it would set the datapath up again. \
             Stop it first (remove the DaemonSet, or its pod from this node), or pass --force",
            a.status_addr
        );
        return ExitCode::from(2);
    }
    let r = uninstall(None, &a.bpf_pin_dir);
    for line in &r.removed {
        println!("removed {line}");
    }
    if r.removed.is_empty() && r.failures.is_empty() {
        println!("nothing of podmesh's on this node");
    }
    for line in &r.failures {
        eprintln!("podmesh cleanup: could not remove {line}");
    }
    if r.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
