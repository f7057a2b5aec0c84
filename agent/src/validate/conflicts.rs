//! Overlaps between the Pod, service and node CIDRs of a mesh's clusters.
use ipnet::IpNet;

use super::{ClusterSpec, Finding, Severity, code, overlap::overlapping_pairs};

/// Which list of a cluster a CIDR comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `podCIDRs`
    Pod,
    /// `serviceCIDRs`
    Service,
    /// `nodeCIDRs` (underlay)
    Node,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Pod => "Pod CIDR",
            Kind::Service => "service CIDR",
            Kind::Node => "node CIDR",
        }
    }
}

/// One CIDR of one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Index of the cluster in the input.
    pub cluster: usize,
    /// Which list it is from.
    pub kind: Kind,
    /// The CIDR as written.
    pub cidr: IpNet,
}

/// Every CIDR of `clusters` in input order (cluster, then Pod, service, node
/// lists), without default routes: those are reported on their own and would
/// otherwise "overlap" everything.
pub fn entries(clusters: &[ClusterSpec]) -> Vec<Entry> {
    let mut out = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        for (kind, list) in [
            (Kind::Pod, &c.pod_cidrs),
            (Kind::Service, &c.service_cidrs),
            (Kind::Node, &c.node_cidrs),
        ] {
            out.extend(
                list.iter()
                    .filter(|n| n.prefix_len() > 0)
                    .map(|&cidr| Entry {
                        cluster: i,
                        kind,
                        cidr,
                    }),
            );
        }
    }
    out
}

/// The finding for two overlapping entries, `a` listed before `b`, if the
/// rules care about that combination.
pub fn classify(clusters: &[ClusterSpec], a: &Entry, b: &Entry) -> Option<Finding> {
    let same = a.cluster == b.cluster;
    // Name the Pod CIDR first when only one of the two is one.
    let (a, b) = if b.kind == Kind::Pod && a.kind != Kind::Pod {
        (b, a)
    } else {
        (a, b)
    };
    let (ca, cb) = (&clusters[a.cluster].name, &clusters[b.cluster].name);
    let names = if same {
        vec![ca.clone()]
    } else {
        vec![ca.clone(), cb.clone()]
    };
    let what = format!(
        "{} {} of cluster {ca} overlaps {} {} of cluster {cb}",
        a.kind.label(),
        a.cidr,
        b.kind.label(),
        b.cidr
    );
    let (severity, code, advice) = match (a.kind, b.kind) {
        (Kind::Pod, Kind::Pod) if same => (
            Severity::Warning,
            code::POD_CIDR_OVERLAP_SAME_CLUSTER,
            "the cluster declares the same addresses twice; drop the one inside the other",
        ),
        (Kind::Pod, Kind::Pod) => (
            Severity::Error,
            code::POD_CIDR_OVERLAP,
            "pods of one cluster could not reach pods of the other and the agents would quarantine one of them; give each cluster a disjoint Pod CIDR (`podmesh plan suggest` lists free ones)",
        ),
        (Kind::Pod, Kind::Service) => (
            Severity::Error,
            code::POD_CIDR_OVERLAPS_SERVICE,
            "traffic to those addresses would go to pods or to services depending on where it starts; move the Pod CIDR or the service CIDR so that they are disjoint",
        ),
        (Kind::Pod, Kind::Node) => (
            Severity::Error,
            code::POD_CIDR_OVERLAPS_NODE,
            "routes to pods would capture traffic to nodes (and the tunnels between them); move the Pod CIDR out of the node network",
        ),
        (Kind::Node, Kind::Node) if !same => (
            Severity::Warning,
            code::NODE_CIDR_OVERLAP,
            "tunnel endpoints must be unique and reachable across clusters; fine for one shared underlay where no address is used twice, otherwise renumber one network",
        ),
        (Kind::Service, Kind::Service) if !same => (
            Severity::Warning,
            code::SERVICE_CIDR_OVERLAP,
            "legal, since service addresses stay inside their cluster, but a service address then means different services in each cluster; make them disjoint if services are ever to be shared",
        ),
        _ => return None,
    };
    Some(Finding::new(
        severity,
        code,
        names,
        vec![a.cidr, b.cidr],
        format!("{what}: {advice}"),
    ))
}

/// Every overlap finding of `clusters`, by an O(n log n) sweep, ordered by
/// the input positions of the two CIDRs.
pub fn check(clusters: &[ClusterSpec]) -> Vec<Finding> {
    let es = entries(clusters);
    let cidrs: Vec<IpNet> = es.iter().map(|e| e.cidr).collect();
    let mut pairs: Vec<(usize, usize)> = overlapping_pairs(&cidrs)
        .into_iter()
        .map(|o| (o.outer.min(o.inner), o.outer.max(o.inner)))
        .collect();
    pairs.sort_unstable();
    pairs
        .into_iter()
        .filter_map(|(i, j)| classify(clusters, &es[i], &es[j]))
        .collect()
}

/// The same findings as [`check`] by comparing every pair: O(n²), the
/// reference for tests and the peer in `cargo xtask bench plan`.
pub fn check_pairwise(clusters: &[ClusterSpec]) -> Vec<Finding> {
    let es = entries(clusters);
    let mut out = Vec::new();
    for i in 0..es.len() {
        for j in i + 1..es.len() {
            if super::overlap::overlaps(&es[i].cidr, &es[j].cidr) {
                out.extend(classify(clusters, &es[i], &es[j]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, pod: &[&str], svc: &[&str], node: &[&str]) -> ClusterSpec {
        let p = |l: &[&str]| l.iter().map(|s| s.parse().unwrap()).collect();
        ClusterSpec {
            name: name.into(),
            id: 1,
            pod_cidrs: p(pod),
            service_cidrs: p(svc),
            node_cidrs: p(node),
            ..ClusterSpec::default()
        }
    }

    fn codes(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.code).collect()
    }

    #[test]
    fn disjoint_plan_is_clean() {
        let c = [
            spec(
                "east",
                &["10.1.0.0/16", "fd00:1::/56"],
                &["10.96.0.0/12"],
                &["192.168.1.0/24"],
            ),
            spec(
                "west",
                &["10.2.0.0/16", "fd00:2::/56"],
                &["10.112.0.0/12"],
                &["192.168.2.0/24"],
            ),
        ];
        assert!(check(&c).is_empty());
    }

    #[test]
    fn pod_overlaps_across_clusters_are_errors_naming_both() {
        let c = [
            spec("east", &["10.1.0.0/16"], &[], &[]),
            spec("west", &["10.1.128.0/17"], &[], &[]),
        ];
        let f = check(&c);
        assert_eq!(codes(&f), [code::POD_CIDR_OVERLAP]);
        assert_eq!(f[0].severity, Severity::Error);
        assert_eq!(f[0].clusters, ["east", "west"]);
        assert_eq!(
            f[0].cidrs,
            [
                "10.1.0.0/16".parse::<IpNet>().unwrap(),
                "10.1.128.0/17".parse().unwrap()
            ]
        );
    }

    #[test]
    fn ipv6_pod_overlap() {
        let c = [
            spec("east", &["fd00:1::/48"], &[], &[]),
            spec("west", &["fd00:1:0:5::/64"], &[], &[]),
        ];
        assert_eq!(codes(&check(&c)), [code::POD_CIDR_OVERLAP]);
    }

    #[test]
    fn pod_vs_service_and_node_also_within_one_cluster() {
        let c = [
            spec(
                "east",
                &["10.1.0.0/16"],
                &["10.1.96.0/20"],
                &["10.1.200.0/24"],
            ),
            spec("west", &["10.2.0.0/16"], &["10.1.0.0/16"], &[]),
        ];
        let f = check(&c);
        assert_eq!(
            codes(&f),
            [
                code::POD_CIDR_OVERLAPS_SERVICE,
                code::POD_CIDR_OVERLAPS_NODE,
                code::POD_CIDR_OVERLAPS_SERVICE,
                code::SERVICE_CIDR_OVERLAP,
            ]
        );
        assert_eq!(f[0].clusters, ["east"]);
        // The Pod CIDR is named first even when the service CIDR comes first.
        assert_eq!(f[2].clusters, ["east", "west"]);
        assert!(f[2].message.starts_with(
            "Pod CIDR 10.1.0.0/16 of cluster east overlaps service CIDR 10.1.0.0/16 of cluster west"
        ));
    }

    #[test]
    fn node_and_service_overlaps_across_clusters_are_warnings() {
        let c = [
            spec("east", &[], &["10.96.0.0/12"], &["192.168.0.0/16"]),
            spec("west", &[], &["10.96.0.0/12"], &["192.168.1.0/24"]),
        ];
        let f = check(&c);
        assert_eq!(
            codes(&f),
            [code::SERVICE_CIDR_OVERLAP, code::NODE_CIDR_OVERLAP]
        );
        assert!(f.iter().all(|f| f.severity == Severity::Warning));
    }

    #[test]
    fn same_cluster_pod_overlap_warns_and_same_cluster_node_service_do_not() {
        let c = [spec(
            "east",
            &["10.1.0.0/16", "10.1.4.0/24"],
            &["10.96.0.0/12", "10.96.0.0/16"],
            &["192.168.0.0/16", "192.168.0.0/16"],
        )];
        assert_eq!(codes(&check(&c)), [code::POD_CIDR_OVERLAP_SAME_CLUSTER]);
    }

    #[test]
    fn default_routes_do_not_flood_overlaps() {
        let c = [
            spec("east", &["0.0.0.0/0"], &[], &[]),
            spec("west", &["10.2.0.0/16"], &[], &[]),
        ];
        assert!(check(&c).is_empty());
    }

    #[test]
    fn sweep_equals_pairwise_on_a_mixed_plan() {
        let c = [
            spec(
                "a",
                &["10.0.0.0/8", "fd00::/8"],
                &["10.96.0.0/12"],
                &["10.250.0.0/16"],
            ),
            spec(
                "b",
                &["10.1.0.0/16", "fd00:1::/64"],
                &["10.96.0.0/16"],
                &["10.250.1.0/24"],
            ),
            spec("c", &["10.1.2.0/24"], &["172.16.0.0/12"], &["fd00:1::/80"]),
        ];
        assert_eq!(check(&c), check_pairwise(&c));
        assert!(check(&c).len() > 5);
    }
}
