//! `plan check` over the live records of a mesh: what every cluster's mesh
//! etcd holds now, in podmesh's layout (`podmesh/v1/…`) or in Cilium's
//! (`cilium/state/nodes/v1/<cluster>/<node>`), checked with the same core as
//! a plan file ([`crate::validate::check`] over the cluster records) plus
//! what only records show: node Pod CIDRs that overlap across nodes, a node
//! that claims part of another cluster's range (a hijack: longest-prefix
//! match hands it that part of the other cluster's traffic), and a cluster's
//! etcd that publishes records under another cluster's name.
//!
//! Pure: the records are read by the caller (`podmesh plan check
//! --from-clustermesh`, `podmesh diagnose`).
use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{Plan, cilium};
use crate::{
    desired::decode::code as dcode,
    model::{ClusterRecord, Key, NodeRecord},
    validate::{
        self, ClusterSpec, Finding, Severity,
        cidr::cidr_problem,
        cidr_finding, code as vcode,
        overlap::overlapping_pairs,
        record::{check_node_in_cluster, check_node_record},
    },
};

/// Codes only the live check reports (the others are the validation core's).
pub mod code {
    /// A node claims a Pod CIDR inside (or around) a range another cluster
    /// owns: a node of that cluster or its declared Pod CIDRs.
    pub const POD_CIDR_HIJACK: &str = "pod-cidr-hijack";
    /// A cluster of the Secret directory could not be read.
    pub const CLUSTER_UNREADABLE: &str = "cluster-unreadable";
}

/// One record as read: key and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    /// The etcd key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
}

/// What one cluster's mesh etcd holds, or why it could not be read.
#[derive(Clone, Debug)]
pub struct LiveCluster {
    /// The cluster it was read from (its Secret entry's name).
    pub name: String,
    /// Its records, or why they could not be read.
    pub records: Result<Vec<RawRecord>, String>,
}

/// A node's claim on Pod CIDRs.
#[derive(Clone, Debug)]
struct Claim {
    cluster: String,
    node: String,
    key: String,
    cidrs: Vec<IpNet>,
}

/// The outcome: the clusters as validation saw them (for the summary) and every finding, errors first.
#[derive(Clone, Debug, Default)]
pub struct LiveCheck {
    /// The clusters, from their cluster records (or, for Cilium's, from their node records).
    pub plan: Plan,
    /// Node records read.
    pub nodes: usize,
    /// Every finding.
    pub findings: Vec<Finding>,
}

fn err(code: &'static str, clusters: Vec<String>, cidrs: Vec<IpNet>, message: String) -> Finding {
    Finding::new(Severity::Error, code, clusters, cidrs, message)
}

/// A record read from `from` whose key names `named`.
fn foreign(from: &str, named: &str, key: &str) -> Finding {
    err(
        dcode::RECORD_FOREIGN_CLUSTER,
        vec![from.to_string(), named.to_string()],
        vec![],
        format!(
            "cluster {from}'s etcd publishes {key}, a record of cluster {named}: a hijack of {named}'s identity (an agent of {from} configured with the wrong cluster name, or a record copied across); agents ignore it. Fix or delete the key in {from}'s mesh etcd"
        ),
    )
}

/// Checks the records of every cluster.
pub fn check(clusters: &[LiveCluster]) -> LiveCheck {
    let mut out = LiveCheck::default();
    let mut specs: BTreeMap<String, ClusterSpec> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut claims: Vec<Claim> = Vec::new();
    // Cilium clusters: the ClusterID their node records carry.
    let mut cilium_ids: BTreeMap<String, i64> = BTreeMap::new();
    for lc in clusters {
        order.push(lc.name.clone());
        let records = match &lc.records {
            Ok(r) => r,
            Err(why) => {
                out.findings.push(err(
                    code::CLUSTER_UNREADABLE,
                    vec![lc.name.clone()],
                    vec![],
                    format!("cluster {}: cannot read its records: {why}", lc.name),
                ));
                continue;
            }
        };
        for rec in records {
            if let Ok(key) = Key::parse(&rec.key) {
                if key.cluster() != lc.name {
                    out.findings
                        .push(foreign(&lc.name, key.cluster(), &rec.key));
                    continue;
                }
                match key {
                    Key::Cluster { cluster } => {
                        match serde_json::from_slice::<ClusterRecord>(&rec.value) {
                            Ok(r) => {
                                let mut spec = ClusterSpec::from(&r);
                                spec.name = cluster.clone();
                                if r.name != cluster {
                                    out.findings.push(err(
                                        vcode::RECORD_KEY_MISMATCH,
                                        vec![cluster.clone()],
                                        vec![],
                                        format!("record {} has name {:?}, which disagrees with its key; the key is authoritative: fix the publisher of this record", rec.key, r.name),
                                    ));
                                }
                                specs.insert(cluster, spec);
                            }
                            Err(e) => {
                                out.findings
                                    .push(invalid(&cluster, &rec.key, &e.to_string()))
                            }
                        }
                    }
                    Key::Node { cluster, node } => {
                        match serde_json::from_slice::<NodeRecord>(&rec.value) {
                            Ok(r) => {
                                out.nodes += 1;
                                out.findings
                                    .extend(check_node_record(&cluster, &node, &r, None));
                                claims.push(Claim {
                                    cluster,
                                    node,
                                    key: rec.key.clone(),
                                    cidrs: r.pod_cidrs,
                                });
                            }
                            Err(e) => {
                                out.findings
                                    .push(invalid(&cluster, &rec.key, &e.to_string()))
                            }
                        }
                    }
                }
            } else if let Some((cluster, node)) = cilium::parse_key(&rec.key) {
                if cluster != lc.name {
                    out.findings.push(foreign(&lc.name, cluster, &rec.key));
                    continue;
                }
                match cilium::decode(&rec.value) {
                    Ok(n) => {
                        out.nodes += 1;
                        if n.cluster != cluster && !n.cluster.is_empty() {
                            out.findings.push(err(
                                vcode::RECORD_KEY_MISMATCH,
                                vec![cluster.to_string()],
                                n.pod_cidrs.clone(),
                                format!("record {} has Cluster {:?}, which disagrees with its key; fix the writer of this record", rec.key, n.cluster),
                            ));
                        }
                        match cilium_ids.get(cluster) {
                            Some(id) if *id != n.cluster_id => out.findings.push(err(
                                vcode::RECORD_KEY_MISMATCH,
                                vec![cluster.to_string()],
                                vec![],
                                format!("record {} has ClusterID {} but other nodes of cluster {cluster} have {id}; every node of a cluster carries its one ID", rec.key, n.cluster_id),
                            )),
                            Some(_) => {}
                            None => {
                                cilium_ids.insert(cluster.to_string(), n.cluster_id);
                            }
                        }
                        for c in &n.pod_cidrs {
                            if let Some(p) = cidr_problem(c) {
                                let mut f = cidr_finding(cluster, "Pod", &p);
                                f.message = format!("node {node}: {}", f.message);
                                out.findings.push(f);
                            }
                        }
                        claims.push(Claim {
                            cluster: cluster.to_string(),
                            node: node.to_string(),
                            key: rec.key.clone(),
                            cidrs: n.pod_cidrs,
                        });
                    }
                    Err(e) => out.findings.push(invalid(cluster, &rec.key, &e)),
                }
            }
        }
    }
    for (c, id) in &cilium_ids {
        specs.entry(c.clone()).or_insert_with(|| ClusterSpec {
            name: c.clone(),
            id: *id,
            ..ClusterSpec::default()
        });
    }
    // Nodes of a podmesh cluster without its cluster record.
    let mut missing: Vec<&str> = claims
        .iter()
        .filter(|c| c.key.starts_with(crate::model::NODES_PREFIX))
        .map(|c| c.cluster.as_str())
        .filter(|c| !specs.contains_key(*c))
        .collect();
    missing.dedup();
    for c in missing {
        out.findings.push(err(
            dcode::CLUSTER_RECORD_MISSING,
            vec![c.to_string()],
            vec![],
            format!("cluster {c} publishes node records but no cluster record (podmesh/v1/clusters/{c}): its agents run without --cluster-pod-cidr, or are not running; remote agents reject its nodes"),
        ));
    }
    // The clusters in the order they were read, then the others.
    let mut listed: Vec<ClusterSpec> = order.iter().filter_map(|n| specs.remove(n)).collect();
    listed.extend(specs.into_values());
    out.findings.extend(validate::check(&listed));
    for cl in &claims {
        if let Some(spec) = listed.iter().find(|s| s.name == cl.cluster)
            && !spec.pod_cidrs.is_empty()
            && cl.key.starts_with(crate::model::NODES_PREFIX)
        {
            let rec = ClusterRecord {
                name: spec.name.clone(),
                id: u32::try_from(spec.id).unwrap_or(0),
                pod_cidrs: spec.pod_cidrs.clone(),
                service_cidrs: spec.service_cidrs.clone(),
            };
            let f = check_node_in_cluster(&cl.cluster, &cl.node, rec.id, &cl.cidrs, &rec);
            out.findings.extend(
                f.into_iter()
                    .filter(|f| f.code != vcode::RECORD_KEY_MISMATCH),
            );
        }
    }
    out.findings.extend(cross_claims(&claims, &listed));
    out.findings.sort_by_key(|f| f.severity);
    out.plan = Plan { clusters: listed };
    out
}

fn invalid(cluster: &str, key: &str, why: &str) -> Finding {
    err(
        dcode::RECORD_INVALID_JSON,
        vec![cluster.to_string()],
        vec![],
        format!("record {key} cannot be decoded ({why}); agents ignore it: fix its writer"),
    )
}

/// What one CIDR in the overlap sweep stands for.
enum Owner<'a> {
    Node(&'a Claim),
    Declared(&'a str),
}

/// Overlaps among node claims, and claims on other clusters' declared ranges.
fn cross_claims(claims: &[Claim], clusters: &[ClusterSpec]) -> Vec<Finding> {
    let mut cidrs = Vec::new();
    let mut owners = Vec::new();
    for c in claims {
        for n in c.cidrs.iter().filter(|n| n.prefix_len() > 0) {
            cidrs.push(*n);
            owners.push(Owner::Node(c));
        }
    }
    for s in clusters {
        for n in s.pod_cidrs.iter().filter(|n| n.prefix_len() > 0) {
            cidrs.push(*n);
            owners.push(Owner::Declared(&s.name));
        }
    }
    let mut out = Vec::new();
    for p in overlapping_pairs(&cidrs) {
        let (outer, inner) = (cidrs[p.outer], cidrs[p.inner]);
        match (&owners[p.outer], &owners[p.inner]) {
            (Owner::Node(a), Owner::Node(b)) if a.cluster == b.cluster => {
                if a.node == b.node {
                    continue;
                }
                out.push(err(
                    vcode::POD_CIDR_OVERLAP_SAME_CLUSTER,
                    vec![a.cluster.clone()],
                    vec![outer, inner],
                    format!("nodes {} ({outer}) and {} ({inner}) of cluster {} claim overlapping Pod CIDRs; remote agents program only the older record: a stale record of a renamed node, or a broken allocation in that cluster", a.node, b.node, a.cluster),
                ));
            }
            (Owner::Node(a), Owner::Node(b)) if outer == inner => out.push(err(
                vcode::POD_CIDR_OVERLAP,
                vec![a.cluster.clone(), b.cluster.clone()],
                vec![outer],
                format!("node {} of cluster {} and node {} of cluster {} both claim Pod CIDR {outer}: pods of one cluster are unreachable from the other; renumber one cluster (`podmesh plan suggest` finds free blocks)", a.node, a.cluster, b.node, b.cluster),
            )),
            (Owner::Node(a), Owner::Node(b)) => out.push(hijack(
                &b.cluster,
                &format!("node {}", b.node),
                inner,
                &a.cluster,
                &format!("node {}'s Pod CIDR", a.node),
                outer,
            )),
            (Owner::Declared(d), Owner::Node(b)) if *d != b.cluster => out.push(hijack(
                &b.cluster,
                &format!("node {}", b.node),
                inner,
                d,
                "declared Pod CIDR",
                outer,
            )),
            (Owner::Node(a), Owner::Declared(d)) if *d != a.cluster => out.push(err(
                code::POD_CIDR_HIJACK,
                vec![a.cluster.clone(), d.to_string()],
                vec![outer, inner],
                format!("node {} of cluster {} claims Pod CIDR {outer}, which covers cluster {d}'s declared Pod CIDR {inner}: a remote agent that programs it sends {d}'s traffic to {}; fix that node's Pod CIDR or renumber one cluster", a.node, a.cluster, a.cluster),
            )),
            _ => {}
        }
    }
    out
}

fn hijack(who: &str, what: &str, inner: IpNet, victim: &str, whose: &str, outer: IpNet) -> Finding {
    err(
        code::POD_CIDR_HIJACK,
        vec![who.to_string(), victim.to_string()],
        vec![inner, outer],
        format!(
            "{what} of cluster {who} claims Pod CIDR {inner} inside cluster {victim}'s {whose} {outer}: longest-prefix match sends that part of {victim}'s traffic to {who}; fix the record in {who}'s mesh etcd or renumber one cluster"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, value: &str) -> RawRecord {
        RawRecord {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn codes(c: &LiveCheck) -> Vec<&str> {
        c.findings.iter().map(|f| f.code).collect()
    }

    #[test]
    fn podmesh_records_clean_and_hijacked() {
        let east = LiveCluster {
            name: "east".into(),
            records: Ok(vec![
                rec(
                    "podmesh/v1/clusters/east",
                    r#"{"name":"east","id":1,"podCIDRs":["10.1.0.0/16"]}"#,
                ),
                rec(
                    "podmesh/v1/nodes/east/n1",
                    r#"{"name":"n1","cluster":"east","clusterID":1,"addresses":["192.168.1.1"],"podCIDRs":["10.1.1.0/24"]}"#,
                ),
            ]),
        };
        let west = LiveCluster {
            name: "west".into(),
            records: Ok(vec![
                rec(
                    "podmesh/v1/clusters/west",
                    r#"{"name":"west","id":2,"podCIDRs":["10.2.0.0/16"]}"#,
                ),
                rec(
                    "podmesh/v1/nodes/west/w1",
                    r#"{"name":"w1","cluster":"west","clusterID":2,"addresses":["192.168.2.1"],"podCIDRs":["10.2.1.0/24"]}"#,
                ),
            ]),
        };
        let c = check(&[east.clone(), west.clone()]);
        assert!(c.findings.is_empty(), "{:?}", c.findings);
        assert_eq!(c.nodes, 2);
        let mut bad = west;
        if let Ok(r) = &mut bad.records {
            r.push(rec("podmesh/v1/nodes/west/w2", r#"{"name":"w2","cluster":"west","clusterID":2,"addresses":["192.168.2.2"],"podCIDRs":["10.1.1.128/25"]}"#));
            r.push(rec("podmesh/v1/nodes/east/fake", r#"{"name":"fake","cluster":"east","clusterID":1,"addresses":["192.168.2.3"],"podCIDRs":["10.1.9.0/24"]}"#));
        }
        let c = check(&[east, bad]);
        let codes = codes(&c);
        assert!(codes.contains(&dcode::RECORD_FOREIGN_CLUSTER), "{codes:?}");
        assert!(codes.contains(&code::POD_CIDR_HIJACK), "{codes:?}");
        assert!(
            codes.contains(&vcode::NODE_POD_CIDR_OUTSIDE_CLUSTER),
            "{codes:?}"
        );
        let h = c
            .findings
            .iter()
            .find(|f| f.code == code::POD_CIDR_HIJACK)
            .unwrap();
        assert_eq!(h.clusters, ["west", "east"]);
    }

    #[test]
    fn cilium_records_overlap_and_hijack() {
        let east = LiveCluster {
            name: "east".into(),
            records: Ok(vec![
                rec(
                    "cilium/state/nodes/v1/east/e1",
                    r#"{"Name":"e1","Cluster":"east","ClusterID":1,"IPv4AllocCIDR":{"IP":"10.6.6.0","Mask":"////AA=="}}"#,
                ),
                rec(
                    "cilium/state/nodes/v1/east/e2",
                    r#"{"Name":"e2","Cluster":"east","ClusterID":1,"IPv4AllocCIDR":"10.6.7.0/24"}"#,
                ),
            ]),
        };
        let west = LiveCluster {
            name: "west".into(),
            records: Ok(vec![
                rec(
                    "cilium/state/nodes/v1/west/w1",
                    r#"{"Name":"w1","Cluster":"west","ClusterID":2,"IPv4AllocCIDR":"10.6.6.0/24"}"#,
                ),
                rec(
                    "cilium/state/nodes/v1/west/w2",
                    r#"{"Name":"w2","Cluster":"west","ClusterID":2,"IPv4AllocCIDR":{"IP":"10.6.7.128","Mask":"////gA=="}}"#,
                ),
                rec(
                    "cilium/state/nodes/v1/west/w3",
                    r#"{"Name":"w3","Cluster":"west","ClusterID":2,"IPv4AllocCIDR":"10.8.0.0/24"}"#,
                ),
            ]),
        };
        let c = check(&[east, west]);
        assert_eq!(
            codes(&c),
            [vcode::POD_CIDR_OVERLAP, code::POD_CIDR_HIJACK],
            "{:?}",
            c.findings
        );
        assert_eq!(c.plan.clusters.len(), 2);
        assert_eq!(c.nodes, 5);
    }

    #[test]
    fn duplicate_ids_and_unreadable_clusters() {
        let a = LiveCluster {
            name: "a".into(),
            records: Ok(vec![rec(
                "cilium/state/nodes/v1/a/n",
                r#"{"Name":"n","ClusterID":7,"IPv4AllocCIDR":"10.1.0.0/24"}"#,
            )]),
        };
        let b = LiveCluster {
            name: "b".into(),
            records: Ok(vec![rec(
                "cilium/state/nodes/v1/b/n",
                r#"{"Name":"n","ClusterID":7,"IPv4AllocCIDR":"10.2.0.0/24"}"#,
            )]),
        };
        let c = LiveCluster {
            name: "c".into(),
            records: Err("connection refused".into()),
        };
        let r = check(&[a, b, c]);
        let codes = codes(&r);
        assert!(codes.contains(&vcode::CLUSTER_ID_DUPLICATE), "{codes:?}");
        assert!(codes.contains(&code::CLUSTER_UNREADABLE), "{codes:?}");
    }
}
