//! `cargo xtask bench datapath`: iperf3 TCP throughput and ping RTT pod to pod
//! across clusters for ebpf, vxlan, direct and a plain veth pair, same run.
use crate::util::sh;

#[derive(Debug, clap::Args)]
pub struct DatapathArgs {
    /// Rounds (modes interleaved; the best of each is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

pub fn run(args: &DatapathArgs) -> anyhow::Result<()> {
    sh(super::bench_test("datapath_bench", "bench_datapath")
        .env("PODMESH_BENCH_ROUNDS", args.rounds.to_string()))
}
