//! `podmesh diagnose`'s output: a table (failed checks with their evidence
//! and fix) or the JSON report.
use std::fmt::Write;

use super::{Report, Severity};
use crate::cli::status::safe;

/// The JSON report, pretty-printed.
pub fn json(r: &Report) -> String {
    serde_json::to_string_pretty(r).expect("a report always serializes")
}

/// The table: one line per check (layer, cluster, check, result, evidence),
/// with the fix under every failed one, and a summary line.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let w_cl = r
        .checks
        .iter()
        .map(|c| c.cluster.as_deref().map_or(1, str::len))
        .max()
        .unwrap_or(7)
        .max(7);
    let w_check = r
        .checks
        .iter()
        .map(|c| c.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "{:<8}  {:<w_cl$}  {:<w_check$}  {:<4}  EVIDENCE",
        "LAYER", "CLUSTER", "CHECK", "OK"
    );
    for c in &r.checks {
        let result = match (c.ok, c.severity) {
            (true, _) => "ok",
            (false, Severity::Error) => "FAIL",
            (false, Severity::Warning) => "WARN",
            (false, Severity::Info) => "info",
        };
        let _ = writeln!(
            out,
            "{:<8}  {:<w_cl$}  {:<w_check$}  {:<4}  {}",
            c.layer.as_str(),
            c.cluster.as_deref().unwrap_or("-"),
            c.check,
            result,
            safe(&c.evidence)
        );
        if !c.ok && !c.fix.is_empty() {
            let _ = writeln!(
                out,
                "{:<8}  {:<w_cl$}  {:<w_check$}        fix: {}",
                "",
                "",
                "",
                safe(&c.fix)
            );
        }
    }
    let failed = r.checks.iter().filter(|c| c.is_failure()).count();
    let warned = r
        .checks
        .iter()
        .filter(|c| !c.ok && c.severity == Severity::Warning)
        .count();
    let _ = writeln!(
        out,
        "\n{}: {} checks, {failed} failed, {warned} warnings",
        if r.ok { "OK" } else { "FAILED" },
        r.checks.len()
    );
    out
}
