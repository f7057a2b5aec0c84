//! Cluster identities: names are DNS labels, IDs are 1-255, both unique in a mesh.
use std::collections::BTreeMap;

use super::{ClusterSpec, Finding, Severity, code};
use crate::model::cluster_name_problem;

/// Why `id` is not a valid cluster ID, or `None` when it is.
pub fn cluster_id_problem(id: i64) -> Option<&'static str> {
    match id {
        1..=255 => None,
        0 => Some("0 is reserved for \"no cluster\""),
        _ => Some("outside 1-255"),
    }
}

/// The finding for an invalid cluster name, if `name` is one.
pub fn name_finding(name: &str) -> Option<Finding> {
    cluster_name_problem(name).map(|why| {
        Finding::new(
            Severity::Error,
            code::CLUSTER_NAME_INVALID,
            vec![name.to_string()],
            vec![],
            format!(
                "cluster name {name:?} is invalid ({why}); use a DNS label of 1-32 characters: lowercase letters, digits and '-', starting and ending with a letter or digit"
            ),
        )
    })
}

/// The finding for an invalid cluster ID of `cluster`, if `id` is one.
pub fn id_finding(cluster: &str, id: i64) -> Option<Finding> {
    cluster_id_problem(id).map(|why| {
        Finding::new(
            Severity::Error,
            code::CLUSTER_ID_INVALID,
            vec![cluster.to_string()],
            vec![],
            format!(
                "cluster {cluster} has ID {id} ({why}); give it an ID from 1 to 255 that no other cluster of the mesh uses"
            ),
        )
    })
}

/// Invalid and duplicate names and IDs across `clusters`.
pub fn check(clusters: &[ClusterSpec]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_id: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for c in clusters {
        out.extend(name_finding(&c.name));
        out.extend(id_finding(&c.name, c.id));
        *by_name.entry(&c.name).or_default() += 1;
        by_id.entry(c.id).or_default().push(&c.name);
    }
    // Report duplicates in input order of their first occurrence.
    let mut reported_names = std::collections::HashSet::new();
    let mut reported_ids = std::collections::HashSet::new();
    for c in clusters {
        let n = by_name[c.name.as_str()];
        if n > 1 && reported_names.insert(c.name.as_str()) {
            out.push(Finding::new(
                Severity::Error,
                code::CLUSTER_NAME_DUPLICATE,
                vec![c.name.clone()],
                vec![],
                format!(
                    "cluster name {} is used by {n} clusters; every cluster of a mesh needs its own name",
                    c.name
                ),
            ));
        }
        let names = &by_id[&c.id];
        if names.len() > 1 && reported_ids.insert(c.id) {
            let mut distinct: Vec<String> = Vec::new();
            for n in names {
                if !distinct.iter().any(|d| d == n) {
                    distinct.push(n.to_string());
                }
            }
            out.push(Finding::new(
                Severity::Error,
                code::CLUSTER_ID_DUPLICATE,
                distinct,
                vec![],
                format!(
                    "cluster ID {} is used by {} clusters ({}); give each cluster its own ID (1-255)",
                    c.id,
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, id: i64) -> ClusterSpec {
        ClusterSpec {
            name: name.into(),
            id,
            ..ClusterSpec::default()
        }
    }

    fn codes(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.code).collect()
    }

    #[test]
    fn valid_identities_are_clean() {
        assert!(check(&[spec("east", 1), spec("west", 255)]).is_empty());
    }

    #[test]
    fn invalid_names_and_ids() {
        let f = check(&[spec("East_1", 0), spec("west", 256), spec("x", -1)]);
        assert_eq!(
            codes(&f),
            [
                code::CLUSTER_NAME_INVALID,
                code::CLUSTER_ID_INVALID,
                code::CLUSTER_ID_INVALID,
                code::CLUSTER_ID_INVALID
            ]
        );
        assert_eq!(f[0].clusters, ["East_1"]);
        assert!(f[1].message.contains("ID 0"), "{}", f[1].message);
    }

    #[test]
    fn duplicates_are_reported_once_with_all_clusters() {
        let f = check(&[
            spec("east", 1),
            spec("west", 1),
            spec("east", 2),
            spec("south", 1),
        ]);
        assert_eq!(
            codes(&f),
            [code::CLUSTER_NAME_DUPLICATE, code::CLUSTER_ID_DUPLICATE]
        );
        assert_eq!(f[0].clusters, ["east"]);
        assert_eq!(f[1].clusters, ["east", "west", "south"]);
    }
}
