//! `cargo xtask fuzz`: runs the agent's cargo-fuzz targets for a fixed time
//! each and prints what they did (executions, coverage, corpus, crashes).
//!
//! The targets live in `agent/fuzz` (its own workspace, nightly, sanitizers);
//! cargo-fuzz is installed from crates.io when missing.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::util::{root, sh, show};

/// Every target of `agent/fuzz/Cargo.toml`.
const TARGETS: &[&str] = &[
    "record_decode",
    "etcd_client_config",
    "plan_parse",
    "plan_suggest",
];

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Targets run at the same time (each uses one core).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Targets to run (default: all of them).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

/// What one run printed at its end.
#[derive(Debug, Default)]
struct Outcome {
    target: String,
    ok: bool,
    execs: Option<u64>,
    per_sec: Option<u64>,
    cov: Option<u64>,
    corpus: Option<String>,
    log: PathBuf,
}

pub fn run(a: &FuzzArgs) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let targets: Vec<String> = if a.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        a.targets.clone()
    };
    let dir = root().join("agent/fuzz");
    let logs = dir.join("target/logs");
    std::fs::create_dir_all(&logs)?;
    // Build once up front so that the timed runs fuzz rather than compile.
    sh(nightly_cargo(&dir).args(["fuzz", "build"]))?;
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for chunk in targets.chunks(a.jobs.max(1)) {
        let mut running = Vec::new();
        for t in chunk {
            let log = logs.join(format!("{t}.log"));
            let file = std::fs::File::create(&log)?;
            let mut cmd = nightly_cargo(&dir);
            cmd.args(["fuzz", "run", t, "--"])
                .arg(format!("-max_total_time={}", a.seconds))
                .arg("-print_final_stats=1")
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file);
            eprintln!("+ {}  (log: {})", show(&cmd), log.display());
            running.push((t.clone(), log, cmd.spawn()?));
        }
        for (t, log, mut child) in running {
            let st = child.wait()?;
            let mut o = parse(&std::fs::read_to_string(&log).unwrap_or_default());
            o.target = t;
            o.ok = st.success();
            o.log = log;
            outcomes.push(o);
        }
    }
    println!(
        "\nfuzz: {} s per target, {} at a time, {:.0?} in all\n",
        a.seconds,
        a.jobs.max(1),
        started.elapsed()
    );
    println!(
        "{:<20} {:>8} {:>14} {:>10} {:>8} {:>16}",
        "target", "result", "executions", "exec/s", "cov", "corpus"
    );
    let dash = || "-".to_string();
    for o in &outcomes {
        println!(
            "{:<20} {:>8} {:>14} {:>10} {:>8} {:>16}",
            o.target,
            if o.ok { "ok" } else { "CRASH" },
            o.execs.map_or_else(dash, |v| v.to_string()),
            o.per_sec.map_or_else(dash, |v| v.to_string()),
            o.cov.map_or_else(dash, |v| v.to_string()),
            o.corpus.clone().unwrap_or_else(dash),
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    if !failed.is_empty() {
        for o in &failed {
            eprintln!(
                "fuzz: {} failed; see {} and agent/fuzz/artifacts/{}/ (reproduce: cargo +nightly fuzz run {} <artifact>, in agent/)",
                o.target,
                o.log.display(),
                o.target,
                o.target
            );
        }
        bail!("{} fuzz target(s) found a failure", failed.len());
    }
    Ok(())
}

/// `cargo +nightly` in `dir`, without the variables of the stable cargo that
/// started xtask (they would pin the toolchain or the target dir).
fn nightly_cargo(dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly").current_dir(dir);
    for k in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
    ] {
        c.env_remove(k);
    }
    c
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let has = |args: &[&str]| {
        Command::new("cargo")
            .args(args)
            .env_remove("RUSTUP_TOOLCHAIN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&["+nightly", "--version"]) {
        bail!("fuzzing needs the nightly toolchain (sanitizers): rustup toolchain install nightly");
    }
    if !has(&["fuzz", "--version"]) {
        eprintln!("fuzz: installing cargo-fuzz (crates.io)");
        sh(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
            .context("installing cargo-fuzz")?;
    }
    Ok(())
}

/// Reads libFuzzer's final `stat::` lines and its `DONE` line.
fn parse(log: &str) -> Outcome {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    let done = log
        .lines()
        .rev()
        .find(|l| l.contains("DONE") || l.contains("cov:"));
    let field = |key: &str| -> Option<String> {
        let mut words = done?.split_whitespace();
        words.find(|w| *w == key)?;
        words.next().map(str::to_string)
    };
    Outcome {
        execs: stat("stat::number_of_executed_units:"),
        per_sec: stat("stat::average_exec_per_sec:"),
        cov: field("cov:").and_then(|v| v.parse().ok()),
        corpus: field("corp:"),
        ..Outcome::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_stats() {
        let log = "#1024\tpulse  cov: 10 ft: 11 corp: 3/30b exec/s: 512 rss: 40Mb\n\
                   #99999\tDONE   cov: 1234 ft: 2345 corp: 321/45Kb lim: 4096 exec/s: 166 rss: 80Mb\n\
                   Done 99999 runs in 601 second(s)\n\
                   stat::number_of_executed_units: 99999\n\
                   stat::average_exec_per_sec:     166\n\
                   stat::new_units_added:          42\n";
        let o = parse(log);
        assert_eq!(o.execs, Some(99_999));
        assert_eq!(o.per_sec, Some(166));
        assert_eq!(o.cov, Some(1234));
        assert_eq!(o.corpus.as_deref(), Some("321/45Kb"));
        let empty = parse("");
        assert_eq!((empty.execs, empty.cov), (None, None));
    }
}
