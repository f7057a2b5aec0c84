//! `cargo xtask`: project automation (setup, test, demo, bench, vm-test, fuzz).
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod fuzz;
mod setup;
mod setup_deploy;
mod test;
mod util;
mod vm_test;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "podmesh project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what this machine lacks (Debian packages, bpf-linker); idempotent.
    Setup(setup::SetupArgs),
    /// Setup, then fmt check, clippy, unit tests, the privileged integration tests and the VM run.
    Test(test::TestArgs),
    /// A multi-cluster mesh in network namespaces: `demo [--clusters N] [--keep]`, `demo down`.
    Demo(demo::DemoArgs),
    /// Benchmarks, each side by side with its peer in the same run.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// The ipip datapath on a Debian kernel with IPIP, in a qemu VM (software emulation).
    VmTest(vm_test::VmTestArgs),
    /// The agent's cargo-fuzz targets, a fixed time each (nightly; installs cargo-fuzz).
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(a) => setup::run(&a),
        Command::Test(a) => test::run(&a),
        Command::Bench(b) => bench::run(b),
        Command::Demo(a) => demo::run(&a),
        Command::VmTest(a) => vm_test::run(&a),
        Command::Fuzz(a) => fuzz::run(&a),
    }
}
