//! `cargo xtask bench converge`: 20 clusters x 5,000 nodes in real etcd; cold
//! start, propagation latency under churn and RSS of the agent, against the goals.
use crate::util::{cargo, sh, target_dir};

#[derive(Debug, clap::Args)]
pub struct ConvergeArgs {
    /// Remote clusters (one real etcd each).
    #[arg(long, default_value_t = 20)]
    pub clusters: usize,
    /// Nodes per remote cluster.
    #[arg(long, default_value_t = 5000)]
    pub nodes: usize,
    /// Updates per second during the churn phase.
    #[arg(long, default_value_t = 100)]
    pub rate: usize,
    /// Seconds of churn.
    #[arg(long, default_value_t = 20)]
    pub churn_secs: usize,
}

pub fn run(a: &ConvergeArgs) -> anyhow::Result<()> {
    // The binary is measured too (cold start and RSS of a real process).
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "podmesh-agent",
        "--bin",
        "podmesh-agent",
    ]))?;
    let target = target_dir();
    let mut cmd = super::bench_test("agent_bench", "bench_converge");
    cmd.env(
        "PODMESH_AGENT_BIN",
        target.join("release").join("podmesh-agent"),
    )
    .env("PODMESH_BENCH_CLUSTERS", a.clusters.to_string())
    .env("PODMESH_BENCH_NODES", a.nodes.to_string())
    .env("PODMESH_BENCH_RATE", a.rate.to_string())
    .env("PODMESH_BENCH_CHURN_SECS", a.churn_secs.to_string());
    sh(&mut cmd)
}
