//! Desired state: a pure function of the local ranges, the remote records and
//! what is programmed now, kept incrementally by [`live::Live`] in the
//! [`MeshCache`]; its delta drives the [`crate::datapath::Datapath`].
//! The from-scratch computation it must agree with is a test oracle (`oracle`).
//!
//! Newcomer rules (DESIGN.md, "Validation rules"): a conflict never moves an
//! existing owner. Nodes are considered programmed-first; within one cluster
//! the record with the higher create revision loses; across clusters the one
//! not yet programmed loses; at a cold start a range that two clusters'
//! declarations both cover is programmed for neither.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::RemoteRoute,
    model::{ClusterRecord, UnderlayFamily, cluster_key},
    validate::{
        Finding, Severity, code as vcode,
        overlap::{CidrIndex, overlaps},
        record::{check_cluster_record, check_node_in_cluster},
    },
};

pub mod cache;
pub mod decode;
pub mod live;
#[cfg(test)]
mod oracle;

pub use cache::MeshCache;
pub use decode::{Decoded, Entry, NodeData, Rejection, code};

/// This cluster's ranges, which no remote may take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalRanges {
    /// This cluster's name.
    pub cluster: String,
    /// This cluster's ID.
    pub cluster_id: u32,
    /// Declared Pod CIDRs of this cluster, and this node's own.
    pub pod: Vec<IpNet>,
    /// Service CIDRs of this cluster.
    pub service: Vec<IpNet>,
    /// Node (underlay) addresses/CIDRs of this cluster known here.
    pub node: Vec<IpNet>,
    /// The underlay's family: a remote node's tunnel endpoint is its
    /// address of this family.
    pub underlay: UnderlayFamily,
}

/// The entries of one remote cluster, as its connection keeps them.
#[derive(Clone, Debug, Default)]
pub struct RemoteEntries {
    /// Whether a complete list has been received at least once; before that
    /// the cluster is not considered (a partial list must not decide newcomers).
    pub synced_once: bool,
    /// List generation of its connection (entries not seen in a complete list are pruned).
    pub generation: u64,
    /// Entries by key.
    pub entries: BTreeMap<String, Entry>,
}

/// The state of one remote record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RecordState {
    /// Its routes are in the desired state.
    Programmed,
    /// Never reaches the datapath, for this reason.
    Rejected(Rejection),
}

/// One remote record with its outcome, as `/status` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOutcome {
    /// The remote cluster it was read from.
    pub cluster: String,
    /// The etcd key.
    pub key: String,
    /// `cluster` or `node` (or `unknown` for undecodable entries).
    pub kind: String,
    /// Node or cluster name, when decodable.
    pub name: Option<String>,
    /// The node's addresses.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The record's Pod CIDRs.
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<IpNet>,
    /// Programmed or rejected.
    #[serde(flatten)]
    pub state: RecordState,
}

fn first_error(findings: Vec<Finding>) -> Option<Rejection> {
    findings
        .into_iter()
        .find(|f| f.severity == Severity::Error)
        .map(|f| Rejection::new(f.code, f.message))
}

/// Why `cidr` of `who` may not be used because it overlaps this cluster's ranges.
fn local_overlap(local: &LocalRanges, who: &str, cidr: &IpNet) -> Option<Rejection> {
    let hit = |list: &[IpNet]| list.iter().find(|l| overlaps(l, cidr)).copied();
    let (code, what, l) = if let Some(l) = hit(&local.pod) {
        (vcode::POD_CIDR_OVERLAP, "Pod CIDR", l)
    } else if let Some(l) = hit(&local.service) {
        (vcode::POD_CIDR_OVERLAPS_SERVICE, "service CIDR", l)
    } else if let Some(l) = hit(&local.node) {
        (vcode::POD_CIDR_OVERLAPS_NODE, "node address", l)
    } else {
        return None;
    };
    Some(Rejection::new(
        code,
        format!(
            "{who}: Pod CIDR {cidr} overlaps local cluster {}'s {what} {l}; a remote cluster can never take local traffic, so it is not programmed (renumber one of the clusters; `podmesh plan check` shows all conflicts)",
            local.cluster
        ),
    ))
}

/// The node name of a node key (`podmesh/v1/nodes/<cluster>/<node>`).
pub(crate) fn node_of(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(_, n)| n)
}

/// The validity of each synced remote's cluster record, duplicate IDs resolved:
/// a cluster that already has routes (`has_routes`) keeps its ID, the others
/// sharing it are rejected. Shared by [`live::Live`] and the test oracle.
pub(crate) fn cluster_states<'a>(
    local: &LocalRanges,
    remotes: &'a BTreeMap<String, RemoteEntries>,
    has_routes: impl Fn(&str) -> bool,
) -> BTreeMap<&'a str, Result<&'a ClusterRecord, Rejection>> {
    let mut cluster_state: BTreeMap<&str, Result<&ClusterRecord, Rejection>> = BTreeMap::new();
    for (name, rem) in remotes.iter().filter(|(_, r)| r.synced_once) {
        let key = cluster_key(name);
        let state = match rem.entries.get(&key).map(|e| &e.decoded) {
            None => Err(Rejection::new(
                code::CLUSTER_RECORD_MISSING,
                format!(
                    "cluster {name} publishes no cluster record ({key}); its nodes cannot be validated (run the cluster's agents with --cluster-pod-cidr)"
                ),
            )),
            Some(Decoded::Invalid(r)) => Err(r.clone()),
            Some(Decoded::Node(_)) => Err(Rejection::new(
                code::RECORD_KEY_UNKNOWN,
                format!("{key} does not hold a cluster record"),
            )),
            Some(Decoded::Cluster(c)) => check_cluster(local, name, c),
        };
        cluster_state.insert(name, state);
    }
    // Duplicate IDs across remotes: an already programmed cluster keeps its ID.
    let mut by_id: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (name, st) in &cluster_state {
        if let Ok(v) = st {
            by_id.entry(v.id).or_default().push(name);
        }
    }
    for (id, names) in by_id.into_iter().filter(|(_, n)| n.len() > 1) {
        let owners: Vec<&str> = names.iter().copied().filter(|n| has_routes(n)).collect();
        for n in &names {
            if owners.contains(n) {
                continue;
            }
            let others: Vec<&str> = names.iter().copied().filter(|o| o != n).collect();
            cluster_state.insert(
                n,
                Err(Rejection::new(
                    vcode::CLUSTER_ID_DUPLICATE,
                    format!(
                        "cluster {n} uses cluster ID {id}, which cluster(s) {} also use; IDs must be unique in a mesh, so {n} is not programmed (give it a free ID)",
                        others.join(", ")
                    ),
                )),
            );
        }
    }
    cluster_state
}

/// What one entry is on its own, given its cluster's state: `Ok(Some(node))`
/// may be programmed (subject to conflicts), `Ok(None)` is the cluster record
/// (reported with the cluster's state), `Err` is rejected.
pub(crate) fn entry_static<'e>(
    local: &LocalRanges,
    cluster: &str,
    key: &str,
    entry: &'e Entry,
    cstate: &Result<&ClusterRecord, Rejection>,
) -> Result<Option<&'e NodeData>, Rejection> {
    let n = match &entry.decoded {
        Decoded::Cluster(_) => return Ok(None),
        Decoded::Invalid(r) => return Err(r.clone()),
        Decoded::Node(n) => n,
    };
    let node = node_of(key);
    let c = match cstate {
        Ok(c) => *c,
        Err(r) if r.code == code::CLUSTER_RECORD_MISSING => return Err(r.clone()),
        Err(r) => {
            return Err(Rejection::new(
                code::CLUSTER_REJECTED,
                format!("cluster {cluster} is rejected ({}): {}", r.code, r.message),
            ));
        }
    };
    if let Some(r) = &n.early {
        return Err((**r).clone());
    }
    // Local ranges before the containment in its own cluster: a node claiming
    // this cluster's pods, services or nodes is the finding that matters here
    // (it would take local traffic), whatever its own cluster declares.
    for p in n.pod_cidrs.iter() {
        if let Some(j) = local_overlap(local, &format!("node {node} of cluster {cluster}"), p) {
            return Err(j);
        }
    }
    // A remote node that names this node's own address (of either
    // family) would have this node send its remote traffic to itself.
    if let Some(a) = n
        .addresses
        .iter()
        .find(|a| local.node.iter().any(|h| h.contains(*a)))
    {
        return Err(Rejection::new(
            code::NODE_ADDRESS_LOCAL,
            format!(
                "node {node} of cluster {cluster} publishes tunnel endpoint {a}, an address of this node; its routes would loop back here (two nodes with the same address, or a record copied from this cluster)"
            ),
        ));
    }
    if local.underlay.endpoint(&n.addresses).is_none() {
        let listed = n
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Rejection::new(
            code::NODE_ADDRESS_FAMILY_MISSING,
            format!(
                "node {node} of cluster {cluster} publishes no {} address ({listed}), and this node's underlay is {}: there is no tunnel endpoint to send to (give that node's agent an {} --node-ip, or run this cluster with --underlay-family {})",
                local.underlay,
                local.underlay,
                local.underlay,
                UnderlayFamily::of(n.addresses[0]).flag()
            ),
        ));
    }
    if let Some(r) = first_error(check_node_in_cluster(
        cluster,
        node,
        n.cluster_id,
        &n.pod_cidrs,
        c,
    )) {
        return Err(r);
    }
    if let Some(r) = &n.late {
        return Err((**r).clone());
    }
    Ok(Some(n))
}

/// The row `/status` shows for `key` of `cluster`.
pub(crate) fn outcome_row(
    cluster: &str,
    key: &str,
    entry: &Entry,
    state: RecordState,
) -> RecordOutcome {
    let (kind, name, addresses, pod_cidrs) = match &entry.decoded {
        Decoded::Cluster(c) => ("cluster", Some(c.name.clone()), vec![], c.pod_cidrs.clone()),
        Decoded::Node(n) => (
            "node",
            Some(node_of(key).to_string()),
            n.addresses.to_vec(),
            n.pod_cidrs.to_vec(),
        ),
        Decoded::Invalid(_) if key == cluster_key(cluster) => ("cluster", None, vec![], vec![]),
        Decoded::Invalid(_) => ("unknown", None, vec![], vec![]),
    };
    RecordOutcome {
        cluster: cluster.to_string(),
        key: key.to_string(),
        kind: kind.into(),
        name,
        addresses,
        pod_cidrs,
        state,
    }
}

/// The first CIDR of another cluster's declared Pod CIDRs that overlaps
/// `cidr` (outermost first; of equal CIDRs, the smallest cluster name).
pub(crate) fn foreign_declared<'i, S: AsRef<str>>(
    declared: &'i CidrIndex<S>,
    cidr: &IpNet,
    cluster: &str,
) -> Option<(IpNet, &'i str)> {
    let mut best: Option<(IpNet, &str)> = None;
    for (d, o) in declared.overlapping(cidr) {
        let o = o.as_ref();
        if o == cluster {
            continue;
        }
        match best {
            None => best = Some((d, o)),
            Some((bd, bo)) if bd == d && o < bo => best = Some((d, o)),
            Some((bd, _)) if bd != d => break,
            Some(_) => {}
        }
    }
    best
}

/// Why node `node` of `cluster` with `cidrs` conflicts with the mesh: another
/// cluster's declared range (only for a record not programmed yet), a range
/// of an owner (`first_owner` gives the first overlapping owner's CIDR,
/// cluster and node), or its own overlapping CIDRs. `None`: no conflict.
pub(crate) fn conflict<'o, S: AsRef<str>>(
    cluster: &str,
    node: &str,
    cidrs: &[IpNet],
    programmed: bool,
    declared: &CidrIndex<S>,
    mut first_owner: impl FnMut(&IpNet) -> Option<(IpNet, &'o str, &'o str)>,
) -> Option<Rejection> {
    for (i, cidr) in cidrs.iter().enumerate() {
        if !programmed && let Some((d, other)) = foreign_declared(declared, cidr, cluster) {
            return Some(Rejection::new(
                vcode::POD_CIDR_OVERLAP,
                format!(
                    "node {node} of cluster {cluster}: Pod CIDR {cidr} is also inside cluster {other}'s declared Pod CIDR {d}; a range two clusters declare is programmed for neither (fix the address plan: `podmesh plan check`)"
                ),
            ));
        }
        if let Some((o, oc, on)) = first_owner(cidr) {
            let (code, why) = if oc == cluster {
                (
                    vcode::POD_CIDR_OVERLAP_SAME_CLUSTER,
                    "the record created later in the same cluster loses",
                )
            } else {
                (
                    vcode::POD_CIDR_OVERLAP,
                    "the cluster that joined later loses; the existing owner keeps its traffic",
                )
            };
            return Some(Rejection::new(
                code,
                format!(
                    "node {node} of cluster {cluster}: Pod CIDR {cidr} overlaps {o} of node {on} in cluster {oc}; {why} (give the node a free Pod CIDR)"
                ),
            ));
        }
        if let Some(o) = cidrs[..i].iter().find(|m| overlaps(m, cidr)) {
            return Some(Rejection::new(
                vcode::POD_CIDR_OVERLAP_SAME_CLUSTER,
                format!(
                    "node {node} of cluster {cluster} lists overlapping Pod CIDRs {o} and {cidr}"
                ),
            ));
        }
    }
    None
}

/// The route of an accepted node: to its address of the `underlay` family
/// ([`entry_static`] rejects a node without one).
pub(crate) fn route_of(
    cluster: &str,
    node: &str,
    cidr: IpNet,
    n: &NodeData,
    underlay: UnderlayFamily,
) -> RemoteRoute {
    RemoteRoute {
        cidr,
        cluster: cluster.to_string(),
        node: node.to_string(),
        node_addr: underlay.endpoint(&n.addresses).unwrap_or(n.addresses[0]),
        vtep_mac: n.vtep_mac,
        wireguard_key: n.wireguard_key,
    }
}

fn check_cluster<'a>(
    local: &LocalRanges,
    name: &str,
    c: &'a ClusterRecord,
) -> Result<&'a ClusterRecord, Rejection> {
    if let Some(r) = first_error(check_cluster_record(name, c)) {
        return Err(r);
    }
    if name == local.cluster || c.id == local.cluster_id {
        return Err(Rejection::new(
            code::LOCAL_CLUSTER_CLAIMED,
            format!(
                "cluster {name} (ID {}) claims the name or ID of this cluster {} (ID {}); names and IDs must be unique in a mesh",
                c.id, local.cluster, local.cluster_id
            ),
        ));
    }
    for p in &c.pod_cidrs {
        if let Some(r) = local_overlap(local, &format!("cluster {name}"), p) {
            return Err(r);
        }
    }
    Ok(c)
}

/// Operations that turn `installed` into `desired`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ops {
    /// Routes to add or change.
    pub upsert: Vec<RemoteRoute>,
    /// CIDRs to remove.
    pub delete: Vec<IpNet>,
}

impl Ops {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty()
    }
}

#[cfg(test)]
mod tests;
