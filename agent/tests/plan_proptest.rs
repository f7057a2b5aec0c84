//! Property tests: the O(n log n) overlap findings and the incremental index
//! agree with a brute-force pairwise reference on thousands of random plans.
use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use podmesh_agent::validate::{
    ClusterSpec, Finding, code, conflicts,
    overlap::{CidrIndex, overlapping_pairs},
};
use proptest::prelude::*;

/// CIDRs from a deliberately small space so that overlaps are frequent:
/// IPv4 inside 10.0.0.0/14, IPv6 inside fd00::/30, host bits sometimes set.
fn cidr() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (0u32..1 << 18, 8u8..=26).prop_map(|(a, l)| {
            IpNet::V4(Ipv4Net::new((0x0a00_0000 | a << 6).into(), l).unwrap())
        }),
        (0u128..1 << 20, 8u8..=64, any::<bool>()).prop_map(|(a, l, host)| {
            let addr = (0xfd00u128 << 112) | (a << 80) | u128::from(host);
            IpNet::V6(Ipv6Net::new(addr.into(), l).unwrap())
        }),
    ]
}

fn cluster() -> impl Strategy<Value = (Vec<IpNet>, Vec<IpNet>, Vec<IpNet>)> {
    (
        prop::collection::vec(cidr(), 0..6),
        prop::collection::vec(cidr(), 0..4),
        prop::collection::vec(cidr(), 0..4),
    )
}

fn plan() -> impl Strategy<Value = Vec<ClusterSpec>> {
    prop::collection::vec(cluster(), 1..6).prop_map(|cs| {
        cs.into_iter()
            .enumerate()
            .map(|(i, (pod, svc, node))| ClusterSpec {
                name: format!("c{i}"),
                id: i as i64 + 1,
                pod_cidrs: pod,
                service_cidrs: svc,
                node_cidrs: node,
                ..ClusterSpec::default()
            })
            .collect()
    })
}

/// Overlap by the definition (one network address inside the other), with
/// ipnet's own containment, independent of the library's integer spans.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// (code, clusters, cidrs) of every finding the rules of DESIGN.md demand,
/// computed pair by pair.
fn reference(clusters: &[ClusterSpec]) -> BTreeMap<(String, Vec<String>, Vec<String>), usize> {
    let mut all = Vec::new();
    for (ci, c) in clusters.iter().enumerate() {
        for (k, list) in [(0, &c.pod_cidrs), (1, &c.service_cidrs), (2, &c.node_cidrs)] {
            for n in list.iter().filter(|n| n.prefix_len() > 0) {
                all.push((ci, k, *n));
            }
        }
    }
    let mut out = BTreeMap::new();
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            let (a, b) = (all[i], all[j]);
            if !overlaps(&a.2, &b.2) {
                continue;
            }
            let same = a.0 == b.0;
            let code = match (a.1.min(b.1), a.1.max(b.1)) {
                (0, 0) if same => code::POD_CIDR_OVERLAP_SAME_CLUSTER,
                (0, 0) => code::POD_CIDR_OVERLAP,
                (0, 1) => code::POD_CIDR_OVERLAPS_SERVICE,
                (0, 2) => code::POD_CIDR_OVERLAPS_NODE,
                (1, 1) if !same => code::SERVICE_CIDR_OVERLAP,
                (2, 2) if !same => code::NODE_CIDR_OVERLAP,
                _ => continue,
            };
            let mut cl = vec![clusters[a.0].name.clone(), clusters[b.0].name.clone()];
            cl.sort();
            cl.dedup();
            let mut cidrs = vec![a.2.to_string(), b.2.to_string()];
            cidrs.sort();
            *out.entry((code.to_string(), cl, cidrs)).or_default() += 1;
        }
    }
    out
}

fn summarize(f: &[Finding]) -> BTreeMap<(String, Vec<String>, Vec<String>), usize> {
    let mut out = BTreeMap::new();
    for f in f {
        let mut cl = f.clusters.clone();
        cl.sort();
        let mut cidrs: Vec<String> = f.cidrs.iter().map(ToString::to_string).collect();
        cidrs.sort();
        *out.entry((f.code.to_string(), cl, cidrs)).or_default() += 1;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn sweep_findings_equal_pairwise_reference(clusters in plan()) {
        let got = conflicts::check(&clusters);
        prop_assert_eq!(summarize(&got), reference(&clusters));
        // The library's own pairwise peer (used by the benchmark) agrees exactly, in order.
        prop_assert_eq!(got, conflicts::check_pairwise(&clusters));
    }

    #[test]
    fn overlapping_pairs_equal_all_overlapping_pairs(cidrs in prop::collection::vec(cidr(), 0..40)) {
        let mut got: Vec<(usize, usize)> = overlapping_pairs(&cidrs)
            .into_iter()
            .map(|o| {
                prop_assert!(cidrs[o.outer].trunc().contains(&cidrs[o.inner].trunc()));
                Ok((o.outer.min(o.inner), o.outer.max(o.inner)))
            })
            .collect::<Result<_, _>>()?;
        got.sort_unstable();
        let mut want = Vec::new();
        for i in 0..cidrs.len() {
            for j in i + 1..cidrs.len() {
                if overlaps(&cidrs[i], &cidrs[j]) {
                    want.push((i, j));
                }
            }
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn index_queries_equal_brute_force(
        stored in prop::collection::vec(cidr(), 0..40),
        removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        queries in prop::collection::vec(cidr(), 1..20),
    ) {
        let mut ix = CidrIndex::new();
        let mut live: Vec<(IpNet, usize)> = Vec::new();
        for (i, n) in stored.iter().enumerate() {
            ix.insert(*n, i);
            live.push((n.trunc(), i));
        }
        for r in removed {
            if live.is_empty() {
                break;
            }
            let (n, o) = live.remove(r.index(live.len()));
            prop_assert!(ix.remove(&n, &o));
        }
        prop_assert_eq!(ix.len(), live.len());
        for q in queries {
            let mut got: Vec<(IpNet, usize)> = ix.overlapping(&q).into_iter().map(|(n, o)| (n, *o)).collect();
            got.sort_unstable();
            let mut want: Vec<(IpNet, usize)> = live.iter().filter(|(n, _)| overlaps(n, &q)).copied().collect();
            want.sort_unstable();
            prop_assert_eq!(got, want, "query {}", q);
        }
    }
}
