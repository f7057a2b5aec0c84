//! `podmesh plan check|suggest`: validate an address plan before anything is connected.
use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::{
    plan::{Plan, live, read, report, suggest},
    remote::secret::Listed,
    validate::Severity,
};

/// Exit status for input that cannot be read (bad YAML, not a CIDR, unknown field).
const EXIT_UNREADABLE: u8 = 2;
/// Exit status for a request that cannot be answered as asked (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable: findings grouped by severity (coloured on a terminal); suggestions one per line.
    Table,
    /// One JSON object.
    Json,
}

/// Check or extend a multi-cluster address plan (see DESIGN.md, "Plan file").
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Validate a plan: names and IDs, CIDRs, overlaps, per-node capacity; or,
    /// with --from-clustermesh, audit the live records of every cluster of a
    /// clustermesh Secret directory (podmesh's and Cilium's layouts).
    /// Exit 0 when clean (warnings allowed), 1 on any error finding, 2 when the plan cannot be read.
    Check(CheckArgs),
    /// Print the first free blocks of a size that overlap nothing in the plan.
    /// Exit 1 when fewer than --count are free, 2 when the plan cannot be read.
    Suggest(SuggestArgs),
}

/// Arguments of `plan check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The plan file (YAML, a `clusters:` list).
    #[arg(value_name = "PLAN.yaml", required_unless_present = "from_clustermesh")]
    pub plan: Option<PathBuf>,
    /// Instead of a plan file: read every cluster listed in this clustermesh
    /// Secret directory (one etcd client YAML per cluster, as the agent and
    /// Cilium use) live and read-only, and check their records: podmesh's
    /// (`podmesh/v1/`) and Cilium's node records (`cilium/state/nodes/v1/`).
    #[arg(long, value_name = "DIR", conflicts_with = "plan")]
    pub from_clustermesh: Option<PathBuf>,
    /// With --from-clustermesh: how long one cluster may take to connect and answer.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = podmesh_plumbing::duration::with_unit)]
    pub timeout: std::time::Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Arguments of `plan suggest`.
#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// The plan file (YAML, a `clusters:` list).
    #[arg(value_name = "PLAN.yaml")]
    pub plan: PathBuf,
    /// Prefix length of the blocks to suggest (e.g. 16 for a cluster's IPv4 Pod CIDR).
    #[arg(long, value_name = "N")]
    pub prefix_len: u8,
    /// Search inside this range (repeatable, searched in order). Default: 10.0.0.0/8,
    /// 172.16.0.0/12, 192.168.0.0/16 for IPv4, fd00::/8 for IPv6.
    #[arg(long, value_name = "CIDR")]
    pub within: Vec<IpNet>,
    /// How many blocks to suggest.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub count: usize,
    /// Address family, 4 or 6 (default: that of --within, else 4).
    #[arg(long, value_name = "4|6")]
    pub family: Option<u8>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Runs a `plan` subcommand and returns the exit status.
pub fn run(cmd: PlanCommand) -> ExitCode {
    match cmd {
        PlanCommand::Check(a) => check(&a),
        PlanCommand::Suggest(a) => suggest_cmd(&a),
    }
}

fn load(path: &Path) -> Result<Plan, ExitCode> {
    Plan::load(path).map_err(|e| {
        eprintln!("podmesh: {e}");
        ExitCode::from(EXIT_UNREADABLE)
    })
}

fn check(a: &CheckArgs) -> ExitCode {
    let (path, plan, findings) = match (&a.plan, &a.from_clustermesh) {
        (_, Some(dir)) => match audit(dir, a.timeout) {
            Ok(c) => (dir.clone(), c.plan, c.findings),
            Err(code) => return code,
        },
        (Some(path), None) => {
            let plan = match load(path) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let findings = plan.check();
            (path.clone(), plan, findings)
        }
        (None, None) => {
            eprintln!("podmesh: give a plan file or --from-clustermesh DIR");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match a.output {
        Output::Json => println!("{}", report::json(&path, &plan, &findings)),
        Output::Table => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            print!("{}", report::table(&path, &plan, &findings, colour));
        }
    }
    if findings.iter().any(|f| f.severity == Severity::Error) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Reads every cluster of the Secret directory `dir` (concurrently) and
/// checks their records; exit 2 when the directory cannot be read.
fn audit(dir: &Path, timeout: std::time::Duration) -> Result<live::LiveCheck, ExitCode> {
    let listed = crate::remote::secret::scan(dir).map_err(|e| {
        eprintln!("podmesh: {e}");
        ExitCode::from(EXIT_UNREADABLE)
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("podmesh: cannot start a runtime: {e}");
            ExitCode::from(EXIT_UNREADABLE)
        })?;
    let clusters = rt.block_on(futures::future::join_all(listed.iter().map(
        |(name, l)| async move {
            match l {
                Listed::File(f) => read::read_cluster(name.as_str(), &f.path, timeout).await,
                Listed::Unreadable { reason, .. } => live::LiveCluster {
                    name: name.to_string(),
                    records: Err(reason.clone()),
                },
            }
        },
    )));
    Ok(live::check(&clusters))
}

fn suggest_cmd(a: &SuggestArgs) -> ExitCode {
    let plan = match load(&a.plan) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let blocks = match suggest::suggest(&plan, a.prefix_len, &a.within, a.count, a.family) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("podmesh: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "prefixLen": a.prefix_len, "suggestions": blocks })
        ),
        Output::Table => blocks.iter().for_each(|b| println!("{b}")),
    }
    if blocks.len() < a.count {
        eprintln!(
            "podmesh: only {} free /{} block(s) of the {} asked for; widen --within or use a longer --prefix-len",
            blocks.len(),
            a.prefix_len,
            a.count
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
