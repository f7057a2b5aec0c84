//! `cargo xtask bench …`: each benchmark measures podmesh and its peer in one run
//! and prints figures and ratios.
use clap::Subcommand;

mod datapath;
mod install;

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Pod-to-pod TCP throughput and RTT across clusters: ebpf, vxlan, direct, plain veth.
    Datapath(datapath::DatapathArgs),
    /// Time to program 10k/100k remote nodes per mode vs `ip -batch` with nexthop objects.
    Install(install::InstallArgs),
}

pub fn run(b: Bench) -> anyhow::Result<()> {
    match b {
        Bench::Datapath(a) => datapath::run(&a),
        Bench::Install(a) => install::run(&a),
    }
}
