//! `cargo xtask test`: the project's whole check, as CI runs it.
use std::process::Command;

use crate::util::{cargo, root, sh};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup` (the machine is known to be ready).
    #[arg(long)]
    pub skip_setup: bool,
    /// Skip the formatting and clippy checks.
    #[arg(long)]
    pub skip_lint: bool,
    /// Run only the privileged integration tests whose names contain this.
    #[arg(long)]
    pub filter: Option<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    if !args.skip_setup {
        crate::setup::run(&crate::setup::SetupArgs { check: false })?;
    }
    if !args.skip_lint {
        sh(cargo().args(["fmt", "--all", "--check"]))?;
        sh(Command::new("cargo")
            .current_dir(root().join("ebpf/podmesh-ebpf"))
            .args(["fmt", "--check"]))?;
        sh(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    if args.filter.is_none() {
        // Unit tests and doc tests of every crate but the privileged one.
        sh(cargo().args(["test", "--workspace", "--exclude", "podmesh-tests"]))?;
    }
    // Network namespaces, real etcd, real eBPF: they share kernel state, so
    // one at a time.
    let mut it = cargo();
    it.args(["test", "-p", "podmesh-tests", "--"]);
    if let Some(f) = &args.filter {
        it.arg(f);
    }
    it.arg("--test-threads=1");
    sh(&mut it)?;
    eprintln!("xtask test: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}
