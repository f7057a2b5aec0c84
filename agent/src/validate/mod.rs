//! The validation core shared by `podmesh plan check` and the running agent (DESIGN.md, "Validation rules").
//!
//! # Using it at run time
//!
//! Everything here is pure and synchronous; nothing panics on hostile input.
//!
//! - Single values: [`cidr::cidr_problem`] (host bits, reserved space, default
//!   route) returns a [`cidr::CidrProblem`] whose `Display` says what to do and
//!   whose [`code`](cidr::CidrProblem::code) is the stable finding code;
//!   [`identity::cluster_id_problem`] and [`crate::model::cluster_name_problem`]
//!   check identities.
//! - One record: [`record::check_cluster_record`] and
//!   [`record::check_node_record`] return the [`Finding`]s of a remote record on
//!   its own (key vs value, names, IDs, CIDRs, a node Pod CIDR outside its
//!   cluster's declared Pod CIDRs). An empty list means the record may be
//!   considered for programming.
//! - Conflicts between records: keep a [`overlap::CidrIndex`] of what is
//!   programmed (owner type of your choice, e.g. the record key), ask
//!   [`overlap::CidrIndex::overlapping`] before programming a newcomer, then
//!   `insert` it; `remove` it when the record goes away. A stored `/8` is
//!   found by a query for a `/24` inside it and the other way round.
//! - A whole mesh at once (what `plan check` does): [`check`] over
//!   [`ClusterSpec`]s, built from [`crate::model::ClusterRecord`]s with
//!   `ClusterSpec::from`. It uses [`overlap::overlapping_pairs`], an
//!   O(n log n) sweep.
//!
//! A [`Finding`] serializes to the JSON shape of `plan check -o json`:
//! `{"severity","code","clusters","cidrs","message"}`; codes are the
//! constants in [`code`] and never change meaning.
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::ClusterRecord;

pub mod capacity;
pub mod cidr;
pub mod conflicts;
pub mod identity;
pub mod overlap;
pub mod record;

/// How bad a finding is. `plan check` exits 1 when any finding is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The plan or record cannot work as written; a record with one is never programmed.
    Error,
    /// Works, but probably not as intended.
    Warning,
    /// Worth knowing (e.g. a check that was skipped and why).
    Info,
}

impl Severity {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One problem, naming the clusters and CIDRs involved and saying what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// Stable machine-readable code, one of [`code`].
    pub code: &'static str,
    /// Clusters involved, in the order the message names them.
    pub clusters: Vec<String>,
    /// CIDRs involved, as written, in the order the message names them.
    pub cidrs: Vec<IpNet>,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl Finding {
    /// A finding; `clusters` and `cidrs` in the order `message` names them.
    pub fn new(
        severity: Severity,
        code: &'static str,
        clusters: Vec<String>,
        cidrs: Vec<IpNet>,
        message: String,
    ) -> Self {
        Self {
            severity,
            code,
            clusters,
            cidrs,
            message,
        }
    }
}

/// The stable finding codes.
pub mod code {
    /// A cluster name that is not a DNS label of 1-32 characters.
    pub const CLUSTER_NAME_INVALID: &str = "cluster-name-invalid";
    /// Two clusters with the same name.
    pub const CLUSTER_NAME_DUPLICATE: &str = "cluster-name-duplicate";
    /// A cluster ID outside 1-255.
    pub const CLUSTER_ID_INVALID: &str = "cluster-id-invalid";
    /// Two clusters with the same ID.
    pub const CLUSTER_ID_DUPLICATE: &str = "cluster-id-duplicate";
    /// A CIDR with host bits set.
    pub const CIDR_NOT_CANONICAL: &str = "cidr-not-canonical";
    /// A CIDR overlapping reserved address space.
    pub const CIDR_RESERVED: &str = "cidr-reserved";
    /// `0.0.0.0/0` or `::/0`.
    pub const CIDR_DEFAULT_ROUTE: &str = "cidr-default-route";
    /// Pod CIDRs of two clusters overlap.
    pub const POD_CIDR_OVERLAP: &str = "pod-cidr-overlap";
    /// Two Pod CIDRs of one cluster overlap (redundant declaration).
    pub const POD_CIDR_OVERLAP_SAME_CLUSTER: &str = "pod-cidr-overlap-same-cluster";
    /// A Pod CIDR overlaps a service CIDR (of any cluster).
    pub const POD_CIDR_OVERLAPS_SERVICE: &str = "pod-cidr-overlaps-service";
    /// A Pod CIDR overlaps a node (underlay) CIDR (of any cluster).
    pub const POD_CIDR_OVERLAPS_NODE: &str = "pod-cidr-overlaps-node";
    /// Node (underlay) CIDRs of two clusters overlap.
    pub const NODE_CIDR_OVERLAP: &str = "node-cidr-overlap";
    /// Service CIDRs of two clusters overlap.
    pub const SERVICE_CIDR_OVERLAP: &str = "service-cidr-overlap";
    /// A node's Pod CIDR lies outside its cluster's declared Pod CIDRs.
    pub const NODE_POD_CIDR_OUTSIDE_CLUSTER: &str = "node-pod-cidr-outside-cluster";
    /// A record whose value disagrees with its key.
    pub const RECORD_KEY_MISMATCH: &str = "record-key-mismatch";
    /// A node record without an underlay address (no tunnel endpoint).
    pub const NODE_ADDRESS_MISSING: &str = "node-address-missing";
    /// A node key names a node whose name is not a DNS subdomain.
    pub const NODE_NAME_INVALID: &str = "node-name-invalid";
    /// Fewer per-node blocks than expected nodes.
    pub const CAPACITY_INSUFFICIENT: &str = "capacity-insufficient";
    /// Fewer than 20 % spare per-node blocks.
    pub const CAPACITY_HEADROOM_LOW: &str = "capacity-headroom-low";
    /// A `nodeMaskSize` that is no prefix length of its family.
    pub const NODE_MASK_SIZE_INVALID: &str = "node-mask-size-invalid";
    /// A `nodeMaskSize` for a family the cluster has no Pod CIDR of.
    pub const NODE_MASK_SIZE_UNUSED: &str = "node-mask-size-unused";
    /// A Pod CIDR smaller than one per-node block: it yields no block.
    pub const POD_CIDR_SMALLER_THAN_NODE_MASK: &str = "pod-cidr-smaller-than-node-mask";
    /// The capacity check was skipped (only one of `nodes` and `nodeMaskSize` given).
    pub const CAPACITY_NOT_CHECKED: &str = "capacity-not-checked";
}

/// Per-node Pod CIDR prefix lengths, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMaskSize {
    /// Prefix length of each node's IPv4 Pod CIDR (e.g. 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<u8>,
    /// Prefix length of each node's IPv6 Pod CIDR (e.g. 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<u8>,
}

/// One cluster of a mesh as validation sees it: a plan entry or a cluster record.
///
/// Name and ID are kept unchecked (as written) so that invalid values become
/// findings rather than parse errors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Cluster name as written.
    pub name: String,
    /// Cluster ID as written (valid: 1-255).
    pub id: i64,
    /// The cluster's Pod CIDRs.
    #[serde(rename = "podCIDRs", default, deserialize_with = "de_cidrs")]
    pub pod_cidrs: Vec<IpNet>,
    /// The cluster's service CIDRs.
    #[serde(rename = "serviceCIDRs", default, deserialize_with = "de_cidrs")]
    pub service_cidrs: Vec<IpNet>,
    /// The cluster's node (underlay) CIDRs.
    #[serde(rename = "nodeCIDRs", default, deserialize_with = "de_cidrs")]
    pub node_cidrs: Vec<IpNet>,
    /// Per-node Pod CIDR sizes, for the capacity check.
    #[serde(
        rename = "nodeMaskSize",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub node_mask_size: Option<NodeMaskSize>,
    /// Expected node count, for the capacity check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u64>,
}

/// A CIDR whose parse error quotes the offending value (serde's own says only
/// "invalid IP address syntax").
struct CidrValue(IpNet);

impl<'de> Deserialize<'de> for CidrValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor (not String then parse) so that the deserializer attaches
        // the value's own line and field path to the error.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CidrValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a CIDR such as 10.1.0.0/16")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<CidrValue, E> {
                s.trim().parse().map(CidrValue).map_err(|_| {
                    E::custom(format!(
                        "{s:?} is not a CIDR (write address/prefix-length, e.g. 10.1.0.0/16 or \"fd00:1::/56\")"
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

fn de_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<CidrValue>::deserialize(d)?
        .into_iter()
        .map(|c| c.0)
        .collect())
}

impl From<&ClusterRecord> for ClusterSpec {
    fn from(r: &ClusterRecord) -> Self {
        Self {
            name: r.name.clone(),
            id: r.id.into(),
            pod_cidrs: r.pod_cidrs.clone(),
            service_cidrs: r.service_cidrs.clone(),
            ..Self::default()
        }
    }
}

/// Every finding of a whole mesh: identities, each CIDR, overlaps, capacity.
///
/// Errors come first, then warnings, then infos; within a severity the order
/// is the order of the rules and of the input, so output is stable.
pub fn check(clusters: &[ClusterSpec]) -> Vec<Finding> {
    let mut out = identity::check(clusters);
    out.extend(cidr_findings(clusters));
    out.extend(conflicts::check(clusters));
    out.extend(capacity::check(clusters));
    out.sort_by_key(|f| f.severity);
    out
}

/// A finding for each CIDR of each cluster that has a [`cidr::CidrProblem`].
pub fn cidr_findings(clusters: &[ClusterSpec]) -> Vec<Finding> {
    let mut out = Vec::new();
    for c in clusters {
        for (kind, list) in [
            ("Pod", &c.pod_cidrs),
            ("service", &c.service_cidrs),
            ("node", &c.node_cidrs),
        ] {
            for net in list {
                if let Some(p) = cidr::cidr_problem(net) {
                    out.push(cidr_finding(&c.name, kind, &p));
                }
            }
        }
    }
    out
}

/// The error finding for `problem` in a `kind` ("Pod", "service", "node") CIDR of `cluster`.
pub fn cidr_finding(cluster: &str, kind: &str, problem: &cidr::CidrProblem) -> Finding {
    Finding::new(
        Severity::Error,
        problem.code(),
        vec![cluster.to_string()],
        vec![problem.given()],
        format!("{kind} CIDR of cluster {cluster}: {problem}"),
    )
}
