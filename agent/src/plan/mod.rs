//! Address plans (DESIGN.md, "Plan file"): parsing, reporting and suggesting free ranges.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::validate::{self, ClusterSpec, Finding};

pub mod cilium;
pub mod live;
pub mod read;
pub mod report;
pub mod suggest;

/// A multi-cluster address plan, as written in `PLAN.yaml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The clusters of the mesh.
    pub clusters: Vec<ClusterSpec>,
}

/// Why a plan could not be read at all (`plan check` exits 2).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The file could not be read.
    #[error("{path}: cannot read the plan: {source}")]
    Read {
        /// The plan file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML, a value that is not a CIDR, a missing or unknown field.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        /// The plan file.
        path: PathBuf,
        /// 1-based line of the offending value (0 when unknown).
        line: usize,
        /// 1-based column of the offending value (0 when unknown).
        column: usize,
        /// What is wrong, with the field path (e.g. `clusters[0].podCIDRs[1]: invalid IP address syntax`).
        message: String,
    },
}

impl Plan {
    /// Parses a plan from YAML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PlanError> {
        podmesh_plumbing::yaml::from_str_with_path(text).map_err(|e| {
            let line = e
                .line
                .map_or(0, |l| usize::try_from(l).unwrap_or(usize::MAX));
            let column = e
                .column
                .map_or(0, |c| usize::try_from(c).unwrap_or(usize::MAX));
            let mut message = e.message;
            if text.trim().is_empty() {
                message = "the plan is empty; it needs a `clusters:` list".to_string();
            }
            // Keys and values are quoted back from the file and may hold line
            // breaks; the error stays one line.
            let message: String = message
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().collect()
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            PlanError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        })
    }

    /// Reads and parses the plan file at `path`.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Every finding of the plan, errors first.
    pub fn check(&self) -> Vec<Finding> {
        validate::check(&self.clusters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Plan, PlanError> {
        Plan::parse(s, Path::new("plan.yaml"))
    }

    #[test]
    fn design_example_parses() {
        let p = parse(
            r#"
clusters:
- name: east
  id: 1
  podCIDRs: [10.1.0.0/16, "fd00:1::/56"]
  serviceCIDRs: [10.96.0.0/12]
  nodeCIDRs: [192.168.1.0/24]
  nodeMaskSize: {ipv4: 24, ipv6: 64}    # per-node pod CIDR size (optional)
  nodes: 200
- name: west
  id: 2
- name: north
  id: 3
  podCIDRs:
  - fd00:3::/56
  - 10.3.0.0/16
"#,
        )
        .unwrap();
        assert_eq!(p.clusters.len(), 3);
        assert_eq!(p.clusters[2].pod_cidrs[0].to_string(), "fd00:3::/56");
        assert_eq!(p.clusters[0].pod_cidrs.len(), 2);
        assert_eq!(p.clusters[0].node_mask_size.unwrap().ipv6, Some(64));
        assert!(p.clusters[1].pod_cidrs.is_empty());
        assert!(p.check().is_empty(), "{:?}", p.check());
    }

    /// Node (underlay) CIDRs and per-node masks of both families are checked
    /// alike: an IPv6-only or dual-stack mesh plans like an IPv4 one.
    #[test]
    fn ipv6_node_cidrs_and_masks_are_checked() {
        let p = parse(
            r#"
clusters:
- name: east
  id: 1
  podCIDRs: ["fd00:1::/56", 10.1.0.0/16]
  nodeCIDRs: ["fd31:1::/64", 172.31.1.0/24]
  nodeMaskSize: {ipv4: 24, ipv6: 64}
  nodes: 200
- name: west
  id: 2
  podCIDRs: ["fd00:2::/56", "fd31:1::/80"]
  nodeCIDRs: ["fd31:1::1/64", "fe80::/64", "fd31:2::/64"]
  nodeMaskSize: {ipv6: 129}
"#,
        )
        .unwrap();
        let codes: Vec<(&str, String)> = p
            .check()
            .iter()
            .map(|f| (f.code, f.cidrs[0].to_string()))
            .collect();
        for want in [
            (validate::code::CIDR_NOT_CANONICAL, "fd31:1::1/64"),
            (validate::code::CIDR_RESERVED, "fe80::/64"),
            (validate::code::POD_CIDR_OVERLAPS_NODE, "fd31:1::/80"),
            (validate::code::NODE_MASK_SIZE_INVALID, "fd00:2::/56"),
        ] {
            assert!(
                codes.iter().any(|(c, n)| *c == want.0 && n == want.1),
                "{want:?} not in {codes:?}"
            );
        }
        assert!(
            !codes.iter().any(|(_, n)| n.starts_with("fd00:1::")),
            "east's own ranges are fine: {codes:?}"
        );
    }

    fn syntax(s: &str) -> (usize, String) {
        match parse(s) {
            Err(PlanError::Syntax { line, message, .. }) => (line, message),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn not_a_cidr_names_field_and_line() {
        let (line, msg) =
            syntax("clusters:\n- name: east\n  id: 1\n  podCIDRs: [10.1.0.0/16, 10.1.0.0]\n");
        assert_eq!(line, 4);
        assert!(
            msg.contains("clusters[0].podCIDRs[1]: \"10.1.0.0\" is not a CIDR"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let (line, msg) = syntax("clusters:\n- name: east\n  id: 1\n  podCidrs: [10.1.0.0/16]\n");
        assert_eq!(line, 4);
        assert!(msg.contains("podCidrs"), "{msg}");
        let (_, msg) = syntax("clusters: []\nextra: 1\n");
        assert!(msg.contains("extra"), "{msg}");
        let (_, msg) = syntax("clusters:\n- name: a\n  id: 1\n  nodeMaskSize: {ipv5: 3}\n");
        assert!(msg.contains("ipv5"), "{msg}");
    }

    #[test]
    fn errors_stay_one_line_when_the_file_quotes_line_breaks() {
        let (line, msg) = syntax("clusters:\n- name: a\n  id: 1\n  \"pod\\nCIDRs\": []\n");
        assert_eq!(line, 4);
        assert!(!msg.contains('\n'), "{msg:?}");
        assert!(msg.contains("pod\\nCIDRs"), "{msg}");
    }

    #[test]
    fn bad_yaml_and_empty_files() {
        let (line, _) = syntax("clusters:\n- name: east\n  id: [1\n");
        assert!(line >= 3);
        let (_, msg) = syntax("");
        assert!(msg.contains("empty"), "{msg}");
        let (_, msg) = syntax("clusters:\n- id: 1\n");
        assert!(msg.contains("name"), "{msg}");
    }

    #[test]
    fn host_bits_parse_and_become_findings() {
        let p = parse("clusters:\n- name: east\n  id: 1\n  podCIDRs: [10.1.0.1/16]\n").unwrap();
        let f = p.check();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, validate::code::CIDR_NOT_CANONICAL);
    }
}
