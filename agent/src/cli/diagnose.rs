//! `podmesh diagnose`: the first broken link towards each remote cluster, with its evidence and fix.
use std::{path::PathBuf, time::Duration};

use crate::diagnose::{self, Options, render};

/// Exit status when the diagnosis cannot run at all.
const EXIT_CANNOT_RUN: u8 = 2;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One line per check, the fix under each failed one.
    Table,
    /// `{"ok", "checks": [{"layer", "cluster", "check", "ok", "severity", "evidence", "fix"}]}`.
    Json,
}

/// `podmesh diagnose` arguments.
#[derive(Debug, clap::Args)]
pub struct DiagnoseArgs {
    /// The agent's status address (its --status-addr).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub addr: String,
    /// The clustermesh Secret directory (default: the agent's --clustermesh-config, else /var/lib/podmesh/clustermesh).
    #[arg(long, value_name = "DIR")]
    pub clustermesh_config: Option<PathBuf>,
    /// This cluster's mesh etcd client YAML, to check the plan with this cluster's own records (default: the agent's --kvstore-config).
    #[arg(long, value_name = "FILE")]
    pub kvstore_config: Option<PathBuf>,
    /// Only this remote cluster (repeatable; default: every cluster of the Secret).
    #[arg(long, value_name = "NAME")]
    pub cluster: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Deadline of each network step (DNS, TCP, handshake, each request, each probe).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = podmesh_plumbing::duration::with_unit)]
    pub timeout: Duration,
}

/// Runs the diagnosis: exit 0 when every check passes, 1 when one fails, 2 when it cannot run.
pub fn run(a: &DiagnoseArgs) -> u8 {
    let o = Options {
        addr: a.addr.clone(),
        clustermesh_config: a.clustermesh_config.clone(),
        kvstore_config: a.kvstore_config.clone(),
        clusters: a.cluster.clone(),
        timeout: a.timeout,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podmesh: cannot start a runtime: {e}");
            return EXIT_CANNOT_RUN;
        }
    };
    match rt.block_on(diagnose::diagnose(&o)) {
        Ok(r) => {
            match a.output {
                Output::Json => println!("{}", render::json(&r)),
                Output::Table => print!("{}", render::table(&r)),
            }
            u8::from(!r.ok)
        }
        Err(e) => {
            eprintln!("podmesh: diagnose cannot run: {e}");
            EXIT_CANNOT_RUN
        }
    }
}
