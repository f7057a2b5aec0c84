//! Rendering `plan check` findings: a table grouped by severity, or one JSON object.
use std::{fmt::Write, path::Path};

use serde::Serialize;

use super::Plan;
use crate::validate::{Finding, Severity};

/// Finding counts per severity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Number of error findings.
    pub errors: usize,
    /// Number of warning findings.
    pub warnings: usize,
    /// Number of info findings.
    pub infos: usize,
    /// Clusters in the plan.
    pub clusters: usize,
    /// CIDRs in the plan (Pod, service and node).
    pub cidrs: usize,
}

impl Summary {
    /// Counts `findings` of `plan`.
    pub fn new(plan: &Plan, findings: &[Finding]) -> Self {
        let count = |s| findings.iter().filter(|f| f.severity == s).count();
        Self {
            errors: count(Severity::Error),
            warnings: count(Severity::Warning),
            infos: count(Severity::Info),
            clusters: plan.clusters.len(),
            cidrs: plan
                .clusters
                .iter()
                .map(|c| c.pod_cidrs.len() + c.service_cidrs.len() + c.node_cidrs.len())
                .sum(),
        }
    }
}

#[derive(Serialize)]
struct JsonReport<'a> {
    plan: String,
    summary: Summary,
    findings: &'a [Finding],
}

/// The `-o json` report: `{"plan", "summary", "findings": [...]}`, pretty-printed.
pub fn json(path: &Path, plan: &Plan, findings: &[Finding]) -> String {
    let r = JsonReport {
        plan: path.display().to_string(),
        summary: Summary::new(plan, findings),
        findings,
    };
    serde_json::to_string_pretty(&r).expect("findings always serialize")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The table report: one section per severity (errors first), each finding as
/// a row of code, clusters and CIDRs with its message below; ANSI colour on
/// the headings when `colour` is set.
pub fn table(path: &Path, plan: &Plan, findings: &[Finding], colour: bool) -> String {
    let mut out = String::new();
    let paint = |s: &str, sev: Severity| {
        if !colour {
            return s.to_string();
        }
        let c = match sev {
            Severity::Error => "1;31",
            Severity::Warning => "1;33",
            Severity::Info => "1;36",
        };
        format!("\x1b[{c}m{s}\x1b[0m")
    };
    for (sev, title) in [
        (Severity::Error, "ERRORS"),
        (Severity::Warning, "WARNINGS"),
        (Severity::Info, "INFO"),
    ] {
        let group: Vec<&Finding> = findings.iter().filter(|f| f.severity == sev).collect();
        if group.is_empty() {
            continue;
        }
        let rows: Vec<(String, String, String)> = group
            .iter()
            .map(|f| {
                let cidrs = f
                    .cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                (f.code.to_string(), f.clusters.join(", "), cidrs)
            })
            .collect();
        let w_code = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(4);
        let w_cl = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(8);
        let _ = writeln!(out, "{}", paint(&format!("{title} ({})", group.len()), sev));
        let _ = writeln!(out, "  {:<w_code$}  {:<w_cl$}  CIDRS", "CODE", "CLUSTERS");
        for (f, (code, cl, cidrs)) in group.iter().zip(&rows) {
            let line = format!("  {code:<w_code$}  {cl:<w_cl$}  {cidrs}");
            let _ = writeln!(out, "{}", line.trim_end());
            let _ = writeln!(out, "      {}", f.message);
        }
        out.push('\n');
    }
    let s = Summary::new(plan, findings);
    let _ = writeln!(
        out,
        "{}: {}, {}, {} ({} and {} checked)",
        path.display(),
        plural(s.errors, "error", "errors"),
        plural(s.warnings, "warning", "warnings"),
        plural(s.infos, "info", "infos"),
        plural(s.clusters, "cluster", "clusters"),
        plural(s.cidrs, "CIDR", "CIDRs"),
    );
    out
}
