//! `cargo xtask bench plan`: `podmesh plan check` (sort/sweep) against a naive
//! pairwise check on generated plans of 1k, 10k and 100k CIDRs.
//!
//! The measuring code is the `plan_bench` example of the agent crate, so that
//! xtask itself never links the agent (whose build needs what `xtask setup`
//! installs); this builds it and the `podmesh` binary in release mode and runs it.
use std::process::Command;

use clap::Args;

use crate::util::{cargo, sh, target_dir};

/// Arguments of `cargo xtask bench plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Plan sizes in CIDRs.
    #[arg(default_values_t = [1_000, 10_000, 100_000])]
    pub sizes: Vec<usize>,
}

pub fn run(a: &PlanArgs) -> anyhow::Result<()> {
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "podmesh-agent",
        "--bin",
        "podmesh",
        "--example",
        "plan_bench",
    ]))?;
    let target = target_dir();
    let mut bench = Command::new(target.join("release/examples/plan_bench"));
    bench.args(a.sizes.iter().map(ToString::to_string));
    sh(&mut bench)
}
