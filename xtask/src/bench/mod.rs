//! `cargo xtask bench …`: each benchmark measures podmesh and its peer in one run
//! and prints figures and ratios.
use clap::Subcommand;

mod converge;
mod datapath;
mod install;
mod plan;
mod proxy;

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Control plane: 20 clusters x 5,000 nodes, cold start, churn latency, RSS.
    Converge(converge::ConvergeArgs),
    /// Pod-to-pod TCP throughput and RTT across clusters: ebpf, vxlan, direct, plain veth.
    Datapath(datapath::DatapathArgs),
    /// Time to program 10k/100k remote nodes per mode vs `ip -batch` with nexthop objects.
    Install(install::InstallArgs),
    /// Watch fan-out: podmesh-etcd-proxy vs etcd grpc-proxy vs direct etcd (latency, RSS, upstream watches).
    Proxy(proxy::ProxyArgs),
    /// `podmesh plan check` (sort/sweep) against a naive pairwise check at 1k, 10k, 100k CIDRs.
    Plan(plan::PlanArgs),
}

pub fn run(b: Bench) -> anyhow::Result<()> {
    // The machine is shared: builds and measurements run at low priority,
    // which every child inherits.
    let _ = std::process::Command::new("renice")
        .args(["-n", "10", "-p", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status();
    match b {
        Bench::Converge(a) => converge::run(&a),
        Bench::Datapath(a) => datapath::run(&a),
        Bench::Install(a) => install::run(&a),
        Bench::Proxy(a) => proxy::run(&a),
        Bench::Plan(a) => plan::run(&a),
    }
}

/// The ignored benchmark test `name` in tests/tests/`file`.rs, built in
/// release mode (through [`cargo`](crate::util::cargo), so the build is shared
/// with other xtask commands rather than redone). Most need root: network
/// namespaces, bpffs, eBPF, real etcd.
pub fn bench_test(file: &str, name: &str) -> std::process::Command {
    let mut c = crate::util::cargo();
    c.args([
        "test",
        "--release",
        "-p",
        "podmesh-tests",
        "--test",
        file,
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "--exact",
        name,
    ]);
    c
}
