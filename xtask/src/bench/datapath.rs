//! `cargo xtask bench datapath`: iperf3 TCP throughput and ping RTT pod to pod
//! across clusters for ebpf, vxlan, direct, WireGuard between the clusters
//! (the userspace process with its own packet loop and with gotatun's device)
//! and a plain veth pair, same run;
//! with `--ip-family ipv6`, each mode over an IPv6-only underlay next to the
//! same mode over IPv4, same run.
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
    /// Underlay family to compare: `ipv4` (the modes against each other and
    /// a plain veth pair) or `ipv6` (each mode over an IPv6-only underlay
    /// against the same mode over IPv4).
    #[arg(long, value_enum, default_value = "ipv4")]
    pub ip_family: IpFamily,
}

/// The underlay family `bench datapath` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

pub fn run(args: &DatapathArgs) -> anyhow::Result<()> {
    let test = match args.ip_family {
        IpFamily::Ipv4 => "bench_datapath",
        IpFamily::Ipv6 => "bench_datapath_ipv6_underlay",
    };
    sh(super::bench_test("datapath_bench", test)
        .env("PODMESH_BENCH_ROUNDS", args.rounds.to_string())
        .env("PODMESH_BENCH_SECONDS", args.seconds.to_string()))
}
