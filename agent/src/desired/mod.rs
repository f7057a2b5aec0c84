//! Desired state: a pure function of the local ranges, the remote records and
//! what is programmed now; and the pure diff that drives the [`crate::datapath::Datapath`].
//!
//! Newcomer rules (DESIGN.md, "Validation rules"): a conflict never moves an
//! existing owner. Nodes are considered programmed-first; within one cluster
//! the record with the higher create revision loses; across clusters the one
//! not yet programmed loses; at a cold start a range that two clusters'
//! declarations both cover is programmed for neither.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::RemoteRoute,
    model::{ClusterRecord, NodeRecord, cluster_key, parse_mac},
    validate::{
        Finding, Severity, code as vcode,
        overlap::{CidrIndex, overlaps},
        record::{check_cluster_record, check_node_record},
    },
};

pub mod decode;

pub use decode::{Decoded, Entry, Rejection, code};

/// This cluster's ranges, which no remote may take.
#[derive(Clone, Debug, Default)]
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
}

/// The entries of one remote cluster, as its connection keeps them.
#[derive(Clone, Debug, Default)]
pub struct RemoteEntries {
    /// Whether a complete list has been received at least once; before that
    /// the cluster is not considered (a partial list must not decide newcomers).
    pub synced_once: bool,
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

/// The outcome of [`desired`].
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Every route to program, by CIDR.
    pub routes: BTreeMap<IpNet, RemoteRoute>,
    /// Every remote record and what became of it, by (cluster, key).
    pub records: Vec<RecordOutcome>,
}

impl Desired {
    /// Rejected records.
    pub fn rejected(&self) -> impl Iterator<Item = (&RecordOutcome, &Rejection)> {
        self.records.iter().filter_map(|r| match &r.state {
            RecordState::Rejected(j) => Some((r, j)),
            RecordState::Programmed => None,
        })
    }
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

struct ValidCluster<'a> {
    record: &'a ClusterRecord,
}

/// Computes the desired routes and every record's outcome. Pure.
///
/// `programmed` is what the datapath holds now (the previous desired state):
/// it decides who is the existing owner in a conflict.
pub fn desired(
    local: &LocalRanges,
    remotes: &BTreeMap<String, RemoteEntries>,
    programmed: &BTreeMap<IpNet, RemoteRoute>,
) -> Desired {
    let mut out = Desired::default();
    let programmed_clusters: BTreeSet<&str> =
        programmed.values().map(|r| r.cluster.as_str()).collect();

    // 1. Cluster records.
    let mut cluster_state: BTreeMap<&str, Result<ValidCluster<'_>, Rejection>> = BTreeMap::new();
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
            Some(Decoded::Node { .. }) => Err(Rejection::new(
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
            by_id.entry(v.record.id).or_default().push(name);
        }
    }
    for (id, names) in by_id.into_iter().filter(|(_, n)| n.len() > 1) {
        let owners: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| programmed_clusters.contains(n))
            .collect();
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
    for (name, st) in &cluster_state {
        let rem = &remotes[*name];
        let key = cluster_key(name);
        if let Some(e) = rem.entries.get(&key)
            && let Decoded::Cluster(c) = &e.decoded
        {
            out.records.push(RecordOutcome {
                cluster: name.to_string(),
                key,
                kind: "cluster".into(),
                name: Some(c.name.clone()),
                addresses: vec![],
                pod_cidrs: c.pod_cidrs.clone(),
                state: match st {
                    Ok(_) => RecordState::Programmed,
                    Err(r) => RecordState::Rejected(r.clone()),
                },
            });
        }
    }
    // Declared Pod CIDRs of valid clusters, for the cold-start rule.
    let mut declared: CidrIndex<&str> = CidrIndex::new();
    for (name, st) in &cluster_state {
        if let Ok(v) = st {
            for c in &v.record.pod_cidrs {
                declared.insert(*c, *name);
            }
        }
    }

    // 2. Node records that pass the single-record checks.
    struct Candidate<'a> {
        cluster: &'a str,
        node: &'a str,
        entry: &'a Entry,
        record: &'a NodeRecord,
        mac: Option<[u8; 6]>,
        programmed: bool,
    }
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for (name, rem) in remotes.iter().filter(|(_, r)| r.synced_once) {
        let cstate = &cluster_state[name.as_str()];
        for entry in rem.entries.values() {
            let reject = |out: &mut Desired, rec: Option<(&str, &NodeRecord)>, r: Rejection| {
                out.records.push(RecordOutcome {
                    cluster: name.clone(),
                    key: entry.key.clone(),
                    kind: if rec.is_some() { "node" } else { "unknown" }.into(),
                    name: rec.map(|(n, _)| n.to_string()),
                    addresses: rec.map(|(_, r)| r.addresses.clone()).unwrap_or_default(),
                    pod_cidrs: rec.map(|(_, r)| r.pod_cidrs.clone()).unwrap_or_default(),
                    state: RecordState::Rejected(r),
                });
            };
            let (node, record) = match &entry.decoded {
                Decoded::Cluster(_) => continue,
                Decoded::Invalid(r) => {
                    if entry.key != cluster_key(name) {
                        reject(&mut out, None, r.clone());
                    } else {
                        // Reported once, as the cluster record.
                        out.records.push(RecordOutcome {
                            cluster: name.clone(),
                            key: entry.key.clone(),
                            kind: "cluster".into(),
                            name: None,
                            addresses: vec![],
                            pod_cidrs: vec![],
                            state: RecordState::Rejected(r.clone()),
                        });
                    }
                    continue;
                }
                Decoded::Node { node, record } => (node.as_str(), record),
            };
            let cluster_rec = match cstate {
                Ok(v) => v.record,
                Err(r) => {
                    let r = if r.code == code::CLUSTER_RECORD_MISSING {
                        r.clone()
                    } else {
                        Rejection::new(
                            code::CLUSTER_REJECTED,
                            format!("cluster {name} is rejected ({}): {}", r.code, r.message),
                        )
                    };
                    reject(&mut out, Some((node, record)), r);
                    continue;
                }
            };
            if let Some(r) = check_node(local, name, node, record, cluster_rec) {
                reject(&mut out, Some((node, record)), r);
                continue;
            }
            let mac = record.vtep_mac.as_deref().and_then(parse_mac);
            let is_programmed = record.pod_cidrs.iter().any(|c| {
                programmed
                    .get(c)
                    .is_some_and(|r| r.cluster == *name && r.node == node)
            });
            candidates.push(Candidate {
                cluster: name,
                node,
                entry,
                record,
                mac,
                programmed: is_programmed,
            });
        }
    }

    // 3. Conflicts: existing owners first, then newcomers by create revision.
    candidates.sort_by(|a, b| {
        (
            !a.programmed,
            a.entry.create_revision,
            a.cluster,
            &a.entry.key,
        )
            .cmp(&(
                !b.programmed,
                b.entry.create_revision,
                b.cluster,
                &b.entry.key,
            ))
    });
    let mut owners: CidrIndex<(&str, &str)> = CidrIndex::new();
    // A configured cluster that has not completed a list yet (agent restart,
    // remote unreachable since) keeps what is programmed for it: last known state.
    for r in programmed.values() {
        if remotes.get(&r.cluster).is_some_and(|x| !x.synced_once) {
            owners.insert(r.cidr, (r.cluster.as_str(), r.node.as_str()));
            out.routes.insert(r.cidr, r.clone());
        }
    }
    for c in candidates {
        let mut problem = None;
        let mut mine: Vec<IpNet> = Vec::new();
        for cidr in &c.record.pod_cidrs {
            if !c.programmed
                && let Some((d, other)) = declared
                    .overlapping(cidr)
                    .into_iter()
                    .find(|(_, o)| **o != c.cluster)
            {
                problem = Some(Rejection::new(
                    vcode::POD_CIDR_OVERLAP,
                    format!(
                        "node {} of cluster {}: Pod CIDR {cidr} is also inside cluster {other}'s declared Pod CIDR {d}; a range two clusters declare is programmed for neither (fix the address plan: `podmesh plan check`)",
                        c.node, c.cluster
                    ),
                ));
                break;
            }
            if let Some((o, (oc, on))) = owners.overlapping(cidr).into_iter().next() {
                let (code, why) = if *oc == c.cluster {
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
                problem = Some(Rejection::new(
                    code,
                    format!(
                        "node {} of cluster {}: Pod CIDR {cidr} overlaps {o} of node {on} in cluster {oc}; {why} (give the node a free Pod CIDR)",
                        c.node, c.cluster
                    ),
                ));
                break;
            }
            if let Some(o) = mine.iter().find(|m| overlaps(m, cidr)) {
                problem = Some(Rejection::new(
                    vcode::POD_CIDR_OVERLAP_SAME_CLUSTER,
                    format!(
                        "node {} of cluster {} lists overlapping Pod CIDRs {o} and {cidr}",
                        c.node, c.cluster
                    ),
                ));
                break;
            }
            mine.push(*cidr);
        }
        let state = match problem {
            Some(r) => RecordState::Rejected(r),
            None => {
                for cidr in &c.record.pod_cidrs {
                    owners.insert(*cidr, (c.cluster, c.node));
                    out.routes.insert(
                        *cidr,
                        RemoteRoute {
                            cidr: *cidr,
                            cluster: c.cluster.to_string(),
                            node: c.node.to_string(),
                            node_addr: c.record.addresses[0],
                            vtep_mac: c.mac,
                        },
                    );
                }
                RecordState::Programmed
            }
        };
        out.records.push(RecordOutcome {
            cluster: c.cluster.to_string(),
            key: c.entry.key.clone(),
            kind: "node".into(),
            name: Some(c.node.to_string()),
            addresses: c.record.addresses.clone(),
            pod_cidrs: c.record.pod_cidrs.clone(),
            state,
        });
    }
    out.records
        .sort_by(|a, b| (&a.cluster, &a.key).cmp(&(&b.cluster, &b.key)));
    out
}

fn check_cluster<'a>(
    local: &LocalRanges,
    name: &str,
    c: &'a ClusterRecord,
) -> Result<ValidCluster<'a>, Rejection> {
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
    Ok(ValidCluster { record: c })
}

fn check_node(
    local: &LocalRanges,
    cluster: &str,
    node: &str,
    r: &NodeRecord,
    c: &ClusterRecord,
) -> Option<Rejection> {
    if let Some(j) = first_error(check_node_record(cluster, node, r, Some(c))) {
        return Some(j);
    }
    let a = r.addresses[0];
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
        return Some(Rejection::new(
            code::NODE_ADDRESS_INVALID,
            format!(
                "node {node} of cluster {cluster} publishes tunnel endpoint {a}, which cannot be reached; its agent must publish the node's underlay address"
            ),
        ));
    }
    if let Some(m) = &r.vtep_mac
        && parse_mac(m).is_none()
    {
        return Some(Rejection::new(
            code::NODE_VTEP_MAC_INVALID,
            format!(
                "node {node} of cluster {cluster} publishes vtepMAC {m:?}, not six colon-separated hex octets"
            ),
        ));
    }
    for p in &r.pod_cidrs {
        if let Some(j) = local_overlap(local, &format!("node {node} of cluster {cluster}"), p) {
            return Some(j);
        }
    }
    None
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

/// The diff from `installed` to `desired`. Pure.
pub fn diff(
    installed: &BTreeMap<IpNet, RemoteRoute>,
    desired: &BTreeMap<IpNet, RemoteRoute>,
) -> Ops {
    Ops {
        upsert: desired
            .iter()
            .filter(|(c, r)| installed.get(*c) != Some(*r))
            .map(|(_, r)| r.clone())
            .collect(),
        delete: installed
            .keys()
            .filter(|c| !desired.contains_key(*c))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests;
