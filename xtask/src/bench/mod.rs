//! `cargo xtask bench …`: each benchmark measures podmesh and its peer in one run
//! and prints figures and ratios.
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Bench {}

pub fn run(b: Bench) -> anyhow::Result<()> {
    match b {}
}
