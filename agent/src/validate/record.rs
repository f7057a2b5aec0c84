//! Checks of one remote record on its own: key vs value, identity, CIDRs, containment.
//!
//! Conflicts between records (overlaps, who is the newcomer) need the state of
//! the mesh and are decided with an [`super::overlap::CidrIndex`] by the caller.
use ipnet::IpNet;

use super::{Finding, Severity, cidr::cidr_problem, cidr_finding, code, identity};
use crate::model::{ClusterRecord, NodeRecord};

fn mismatch(cluster: &str, key: &str, field: &str, value: &str) -> Finding {
    Finding::new(
        Severity::Error,
        code::RECORD_KEY_MISMATCH,
        vec![cluster.to_string()],
        vec![],
        format!(
            "record {key} has {field} {value:?}, which disagrees with its key; the key is authoritative: fix the publisher of this record"
        ),
    )
}

/// Findings of the cluster record stored under `podmesh/v1/clusters/<key_cluster>`.
pub fn check_cluster_record(key_cluster: &str, r: &ClusterRecord) -> Vec<Finding> {
    let key = crate::model::cluster_key(key_cluster);
    let mut out = Vec::new();
    out.extend(identity::name_finding(key_cluster));
    if r.name != key_cluster {
        out.push(mismatch(key_cluster, &key, "name", &r.name));
    }
    out.extend(identity::id_finding(key_cluster, r.id.into()));
    for (kind, list) in [("Pod", &r.pod_cidrs), ("service", &r.service_cidrs)] {
        for n in list {
            if let Some(p) = cidr_problem(n) {
                out.push(cidr_finding(key_cluster, kind, &p));
            }
        }
    }
    out
}

/// The CIDRs of `inner` not inside any CIDR of `declared`.
pub fn outside(inner: &[IpNet], declared: &[IpNet]) -> Vec<IpNet> {
    inner
        .iter()
        .filter(|n| !declared.iter().any(|d| d.contains(*n)))
        .copied()
        .collect()
}

/// Findings of the node record stored under `podmesh/v1/nodes/<key_cluster>/<key_node>`;
/// with its cluster's record, also Pod CIDRs outside the cluster's declared ones
/// and a cluster ID that disagrees with it.
pub fn check_node_record(
    key_cluster: &str,
    key_node: &str,
    r: &NodeRecord,
    cluster: Option<&ClusterRecord>,
) -> Vec<Finding> {
    let key = crate::model::node_key(key_cluster, key_node);
    let mut out = Vec::new();
    out.extend(identity::name_finding(key_cluster));
    if let Some(why) = crate::model::node_name_problem(key_node) {
        out.push(Finding::new(
            Severity::Error,
            code::NODE_NAME_INVALID,
            vec![key_cluster.to_string()],
            r.pod_cidrs.clone(),
            format!(
                "node record {:?} names node {:?}, which is not a Kubernetes node name ({why}): a DNS subdomain of lowercase letters, digits, '-' and '.'; fix the publisher of this record",
                key, key_node
            ),
        ));
    }
    if r.name != key_node {
        out.push(mismatch(key_cluster, &key, "name", &r.name));
    }
    if r.cluster != key_cluster {
        out.push(mismatch(key_cluster, &key, "cluster", &r.cluster));
    }
    out.extend(identity::id_finding(key_cluster, r.cluster_id.into()));
    if r.addresses.is_empty() {
        out.push(Finding::new(
            Severity::Error,
            code::NODE_ADDRESS_MISSING,
            vec![key_cluster.to_string()],
            r.pod_cidrs.clone(),
            format!("node record {key} lists no address, so its pods have no tunnel endpoint; the agent on that node must publish its underlay address"),
        ));
    }
    for n in &r.pod_cidrs {
        if let Some(p) = cidr_problem(n) {
            let mut f = cidr_finding(key_cluster, "Pod", &p);
            f.message = format!("node {key_node}: {}", f.message);
            out.push(f);
        }
    }
    if let Some(c) = cluster {
        out.extend(check_node_in_cluster(
            key_cluster,
            key_node,
            r.cluster_id,
            &r.pod_cidrs,
            c,
        ));
    }
    out
}

/// The checks of a node record against its cluster's record: a `clusterID`
/// that disagrees with it, Pod CIDRs outside the cluster's declared ones.
pub fn check_node_in_cluster(
    key_cluster: &str,
    key_node: &str,
    cluster_id: u32,
    pod_cidrs: &[IpNet],
    c: &ClusterRecord,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if c.id != cluster_id {
        let key = crate::model::node_key(key_cluster, key_node);
        out.push(mismatch(
            key_cluster,
            &key,
            "clusterID",
            &cluster_id.to_string(),
        ));
    }
    for n in outside(pod_cidrs, &c.pod_cidrs) {
        let declared = c
            .pod_cidrs
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut cidrs = vec![n];
        cidrs.extend(&c.pod_cidrs);
        out.push(Finding::new(
            Severity::Error,
            code::NODE_POD_CIDR_OUTSIDE_CLUSTER,
            vec![key_cluster.to_string()],
            cidrs,
            format!("node {key_node} of cluster {key_cluster} has Pod CIDR {n} outside the cluster's declared Pod CIDRs [{declared}]; fix the node's Pod CIDR or declare the range in the cluster record (--cluster-pod-cidr)"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterRecord {
        serde_json::from_str(
            r#"{"name":"east","id":1,"podCIDRs":["10.1.0.0/16","fd00:1::/56"],"serviceCIDRs":["10.96.0.0/12"]}"#,
        )
        .unwrap()
    }

    fn node(pod: &str) -> NodeRecord {
        serde_json::from_str(&format!(
            r#"{{"name":"node-1","cluster":"east","clusterID":1,"addresses":["192.168.1.10"],"podCIDRs":["{pod}"]}}"#
        ))
        .unwrap()
    }

    fn codes(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.code).collect()
    }

    #[test]
    fn good_records_are_clean() {
        assert!(check_cluster_record("east", &cluster()).is_empty());
        assert!(
            check_node_record("east", "node-1", &node("10.1.1.0/24"), Some(&cluster())).is_empty()
        );
        assert!(check_node_record("east", "node-1", &node("fd00:1:0:1::/64"), None).is_empty());
    }

    #[test]
    fn key_mismatch_and_bad_values() {
        let mut c = cluster();
        c.id = 0;
        c.pod_cidrs.push("127.0.0.0/8".parse().unwrap());
        assert_eq!(
            codes(&check_cluster_record("west", &c)),
            [
                code::RECORD_KEY_MISMATCH,
                code::CLUSTER_ID_INVALID,
                code::CIDR_RESERVED
            ]
        );
        let mut n = node("10.1.1.1/24");
        n.addresses.clear();
        assert_eq!(
            codes(&check_node_record("east", "node-2", &n, None)),
            [
                code::RECORD_KEY_MISMATCH,
                code::NODE_ADDRESS_MISSING,
                code::CIDR_NOT_CANONICAL
            ]
        );
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        for bad in [
            "Node-1",
            "n\u{1b}[2J",
            "n\nINFO forged",
            "-n",
            "n..m",
            "n_1",
            &"a".repeat(64),
            &format!("{}.x", "a.".repeat(126)),
        ] {
            let mut n = node("10.1.1.0/24");
            n.name = bad.to_string();
            assert_eq!(
                codes(&check_node_record("east", bad, &n, None)),
                [code::NODE_NAME_INVALID],
                "{bad:?}"
            );
        }
        for good in ["node-1", "ip-10-0-0-1.eu-west-1.compute.internal", "1"] {
            let mut n = node("10.1.1.0/24");
            n.name = good.to_string();
            assert!(
                check_node_record("east", good, &n, None).is_empty(),
                "{good}"
            );
        }
    }

    #[test]
    fn node_pod_cidr_outside_declared_ranges() {
        let f = check_node_record("east", "node-1", &node("10.2.1.0/24"), Some(&cluster()));
        assert_eq!(codes(&f), [code::NODE_POD_CIDR_OUTSIDE_CLUSTER]);
        assert_eq!(f[0].cidrs[0], "10.2.1.0/24".parse::<IpNet>().unwrap());
        assert_eq!(
            outside(
                &["10.1.0.0/16".parse().unwrap()],
                &["10.1.0.0/16".parse().unwrap()]
            ),
            []
        );
    }
}
