//! `cargo xtask bench install`: time to program 10k and 100k remote nodes in
//! every datapath mode, against `ip -batch` with nexthop objects, same run.
use crate::util::sh;

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Remote node counts, comma separated.
    #[arg(long, default_value = "10000,100000")]
    pub sizes: String,
}

pub fn run(args: &InstallArgs) -> anyhow::Result<()> {
    sh(
        super::bench_test("datapath_bench", "bench_install")
            .env("PODMESH_BENCH_SIZES", &args.sizes),
    )
}
