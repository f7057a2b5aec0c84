//! `cargo xtask bench datapath`: iperf3 TCP throughput and ping RTT pod to pod
//! across clusters for ebpf, vxlan, direct and a plain veth pair, same run.
use std::process::Command;

use crate::util::{cargo, sh};

#[derive(Debug, clap::Args)]
pub struct DatapathArgs {
    /// Rounds (modes interleaved; the best of each is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

pub fn run(args: &DatapathArgs) -> anyhow::Result<()> {
    sh(bench_test("bench_datapath").env("PODMESH_BENCH_ROUNDS", args.rounds.to_string()))
}

/// The ignored benchmark test `name` of tests/tests/datapath_bench.rs, built
/// in release mode and run at low priority (the machine is shared). It needs
/// root: network namespaces, bpffs, eBPF.
pub fn bench_test(name: &str) -> Command {
    let base = cargo();
    let mut c = Command::new("nice");
    c.current_dir(
        base.get_current_dir()
            .expect("cargo() sets the workspace root"),
    )
    .args(["-n", "10"])
    .arg(base.get_program())
    .args([
        "test",
        "--release",
        "-p",
        "podmesh-tests",
        "--test",
        "datapath_bench",
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "--exact",
        name,
    ]);
    c
}
