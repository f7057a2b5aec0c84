//! `cargo xtask bench datapath`: iperf3 TCP throughput and ping RTT pod to pod
//! across clusters for ebpf, vxlan, direct and a plain veth pair, same run.
use crate::util::sh;

#[derive(Debug, clap::Args)]
pub struct DatapathArgs {
    /// Rounds (paths interleaved, order rotated each round; medians are
    /// compared, best and worst shown).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
}

pub fn run(args: &DatapathArgs) -> anyhow::Result<()> {
    sh(super::bench_test("datapath_bench", "bench_datapath")
        .env("PODMESH_BENCH_ROUNDS", args.rounds.to_string())
        .env("PODMESH_BENCH_SECONDS", args.seconds.to_string()))
}
