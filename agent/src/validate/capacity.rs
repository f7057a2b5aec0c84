//! Capacity: enough per-node Pod CIDR blocks for the expected nodes, with headroom.
//!
//! Headroom is room to grow: the check warns when the blocks would not hold
//! 20 % more nodes than expected (blocks < 1.2 × nodes).
use ipnet::IpNet;

use super::{ClusterSpec, Finding, Severity, code, overlap::span};

/// Number of aligned `/mask` blocks in the union of `cidrs` of one family
/// (`v6` selects it), saturating at `u128::MAX`. CIDRs longer than `mask`
/// contribute nothing; nested CIDRs are counted once.
pub fn blocks(cidrs: &[IpNet], v6: bool, mask: u8) -> u128 {
    let mut spans: Vec<(u128, u8, u128)> = cidrs
        .iter()
        .filter(|n| matches!(n, IpNet::V6(_)) == v6)
        .map(|n| {
            let (_, s, e) = span(n);
            (s, n.prefix_len(), e)
        })
        .collect();
    spans.sort_unstable();
    let mut total: u128 = 0;
    let mut covered_to: Option<u128> = None;
    for (start, plen, end) in spans {
        if covered_to.is_some_and(|c| start <= c) {
            continue; // inside a CIDR already counted
        }
        covered_to = Some(end);
        if plen <= mask {
            let n = 1u128
                .checked_shl(u32::from(mask - plen))
                .unwrap_or(u128::MAX);
            total = total.saturating_add(n);
        }
    }
    total
}

/// Capacity findings of every cluster that sets `nodeMaskSize` and/or `nodes`.
pub fn check(clusters: &[ClusterSpec]) -> Vec<Finding> {
    clusters.iter().flat_map(check_cluster).collect()
}

/// `cidrs` as a comma-separated list, the way messages name them.
fn list(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// " (10.1.0.0/16, fd00:1::/56)" naming `cidrs` in a message, or nothing when
/// there are none.
fn named(cidrs: &[IpNet]) -> String {
    if cidrs.is_empty() {
        String::new()
    } else {
        format!(" ({})", list(cidrs))
    }
}

/// Every finding here is about how a cluster's Pod CIDRs split into per-node
/// blocks, so each names the Pod CIDRs it concerns: those of the family in
/// question, or all of the cluster's when it has none of that family. Only a
/// cluster without any Pod CIDR gets findings without CIDRs.
fn check_cluster(c: &ClusterSpec) -> Vec<Finding> {
    let name = &c.name;
    let mut out = Vec::new();
    let one = |sev, code, cidrs, msg| Finding::new(sev, code, vec![name.clone()], cidrs, msg);
    let (masks, nodes) = match (c.node_mask_size, c.nodes) {
        (None, None) => return out,
        (None, Some(n)) => {
            out.push(one(
                Severity::Info,
                code::CAPACITY_NOT_CHECKED,
                c.pod_cidrs.clone(),
                format!("cluster {name} expects {n} nodes but sets no nodeMaskSize; add nodeMaskSize (e.g. {{ipv4: 24, ipv6: 64}}) to check that its Pod CIDRs{} can hold them", named(&c.pod_cidrs)),
            ));
            return out;
        }
        (Some(m), n) => (m, n),
    };
    for (v6, mask, fam, bits) in [
        (false, masks.ipv4, "ipv4", 32u8),
        (true, masks.ipv6, "ipv6", 128u8),
    ] {
        let Some(mask) = mask else { continue };
        let family: Vec<IpNet> = c
            .pod_cidrs
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6 && n.prefix_len() > 0)
            .copied()
            .collect();
        // The Pod CIDRs this family's mask splits, else all of them.
        let involved = if family.is_empty() {
            c.pod_cidrs.clone()
        } else {
            family.clone()
        };
        if mask == 0 || mask > bits {
            out.push(one(
                Severity::Error,
                code::NODE_MASK_SIZE_INVALID,
                involved.clone(),
                format!("cluster {name} has nodeMaskSize.{fam} {mask}, which is no per-node prefix length for its Pod CIDRs{}; use 1-{bits} (typically {})", named(&involved), if v6 { 64 } else { 24 }),
            ));
            continue;
        }
        if family.is_empty() {
            out.push(one(
                Severity::Warning,
                code::NODE_MASK_SIZE_UNUSED,
                involved.clone(),
                format!("cluster {name} sets nodeMaskSize.{fam} but none of its Pod CIDRs{} is {fam}; add an {fam} Pod CIDR or remove nodeMaskSize.{fam}", named(&involved)),
            ));
            continue;
        }
        for n in family.iter().filter(|n| n.prefix_len() > mask) {
            out.push(one(
                Severity::Warning,
                code::POD_CIDR_SMALLER_THAN_NODE_MASK,
                vec![*n],
                format!("Pod CIDR {n} of cluster {name} is smaller than one per-node /{mask} block and gives no node any address; enlarge it to /{mask} or shorter, or lengthen nodeMaskSize.{fam}"),
            ));
        }
        let Some(nodes) = nodes else {
            out.push(one(
                Severity::Info,
                code::CAPACITY_NOT_CHECKED,
                family.clone(),
                format!("cluster {name} sets nodeMaskSize.{fam} but not nodes; add the expected node count to check that its {fam} Pod CIDRs{} can hold them", named(&family)),
            ));
            continue;
        };
        let have = blocks(&family, v6, mask);
        let need = u128::from(nodes);
        let cidrs_list = list(&family);
        if have < need {
            out.push(one(
                Severity::Error,
                code::CAPACITY_INSUFFICIENT,
                family.clone(),
                format!("cluster {name} expects {nodes} nodes but its {fam} Pod CIDRs ({cidrs_list}) hold only {have} per-node /{mask} blocks; add Pod CIDRs, use a shorter prefix, or a longer nodeMaskSize.{fam}"),
            ));
        } else if have.saturating_mul(5) < need.saturating_mul(6) {
            let spare = (have - need) * 100 / need.max(1);
            out.push(one(
                Severity::Warning,
                code::CAPACITY_HEADROOM_LOW,
                family.clone(),
                format!("cluster {name} expects {nodes} nodes and its {fam} Pod CIDRs ({cidrs_list}) hold {have} per-node /{mask} blocks: {spare} % room to grow, under 20 %; plan a larger Pod CIDR before the cluster grows"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::NodeMaskSize;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn spec(pod: &[&str], v4: Option<u8>, v6: Option<u8>, nodes: Option<u64>) -> ClusterSpec {
        ClusterSpec {
            name: "east".into(),
            id: 1,
            pod_cidrs: pod.iter().map(|s| n(s)).collect(),
            node_mask_size: Some(NodeMaskSize { ipv4: v4, ipv6: v6 }),
            nodes,
            ..ClusterSpec::default()
        }
    }

    fn codes(c: &ClusterSpec) -> Vec<&'static str> {
        check(std::slice::from_ref(c))
            .iter()
            .map(|f| f.code)
            .collect()
    }

    #[test]
    fn block_counts() {
        assert_eq!(blocks(&[n("10.1.0.0/16")], false, 24), 256);
        assert_eq!(
            blocks(&[n("10.1.0.0/16"), n("10.1.3.0/24")], false, 24),
            256
        );
        assert_eq!(
            blocks(&[n("10.1.0.0/16"), n("10.2.0.0/23")], false, 24),
            258
        );
        assert_eq!(blocks(&[n("10.1.0.0/25")], false, 24), 0);
        assert_eq!(blocks(&[n("fd00::/56")], true, 64), 256);
        assert_eq!(blocks(&[n("fd00::/56"), n("10.0.0.0/8")], true, 64), 256);
        assert_eq!(blocks(&[n("8000::/1")], true, 128), 1 << 127);
        assert_eq!(blocks(&[n("8000::/1"), n("::/1")], true, 128), u128::MAX);
    }

    #[test]
    fn enough_with_headroom_is_clean() {
        assert!(codes(&spec(&["10.1.0.0/16"], Some(24), None, Some(200))).is_empty());
        assert!(
            codes(&spec(
                &["10.1.0.0/16", "fd00::/56"],
                Some(24),
                Some(64),
                Some(213)
            ))
            .is_empty()
        );
    }

    #[test]
    fn too_few_blocks_is_an_error() {
        let c = spec(&["10.1.0.0/16"], Some(24), None, Some(300));
        let f = check(std::slice::from_ref(&c));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, code::CAPACITY_INSUFFICIENT);
        assert!(
            f[0].message.contains("only 256 per-node /24 blocks"),
            "{}",
            f[0].message
        );
        // Dual-stack: the IPv6 side alone can be short.
        assert_eq!(
            codes(&spec(
                &["10.0.0.0/8", "fd00::/60"],
                Some(24),
                Some(64),
                Some(100)
            )),
            [code::CAPACITY_INSUFFICIENT]
        );
    }

    #[test]
    fn headroom_under_20_percent_warns() {
        assert_eq!(
            codes(&spec(&["10.1.0.0/16"], Some(24), None, Some(214))),
            [code::CAPACITY_HEADROOM_LOW]
        );
        assert_eq!(
            codes(&spec(&["10.1.0.0/16"], Some(24), None, Some(256))),
            [code::CAPACITY_HEADROOM_LOW]
        );
    }

    #[test]
    fn mask_problems_and_skips() {
        assert_eq!(
            codes(&spec(&["10.1.0.0/16"], Some(33), None, Some(1))),
            [code::NODE_MASK_SIZE_INVALID]
        );
        assert_eq!(
            codes(&spec(&["10.1.0.0/16"], Some(24), Some(64), Some(1))),
            [code::NODE_MASK_SIZE_UNUSED]
        );
        assert_eq!(
            codes(&spec(
                &["10.1.0.0/16", "10.2.0.0/26"],
                Some(24),
                None,
                Some(10)
            )),
            [code::POD_CIDR_SMALLER_THAN_NODE_MASK]
        );
        assert_eq!(
            codes(&spec(&["10.1.0.0/16"], Some(24), None, None)),
            [code::CAPACITY_NOT_CHECKED]
        );
        let mut c = spec(&["10.1.0.0/16"], None, None, Some(5));
        c.node_mask_size = None;
        assert_eq!(codes(&c), [code::CAPACITY_NOT_CHECKED]);
    }

    /// Every capacity finding names the Pod CIDRs it is about, in `cidrs` and
    /// in its message: the family's, or all of them when the family has none.
    #[test]
    fn findings_name_the_pod_cidrs_involved() {
        let cases: [(ClusterSpec, &str, &[&str]); 5] = [
            (
                spec(&["10.1.0.0/16", "fd00:1::/56"], Some(33), None, Some(1)),
                code::NODE_MASK_SIZE_INVALID,
                &["10.1.0.0/16"],
            ),
            (
                spec(&["10.1.0.0/16"], None, Some(0), Some(1)),
                code::NODE_MASK_SIZE_INVALID,
                &["10.1.0.0/16"],
            ),
            (
                spec(&["10.1.0.0/16", "10.9.0.0/16"], Some(24), Some(64), None),
                code::NODE_MASK_SIZE_UNUSED,
                &["10.1.0.0/16", "10.9.0.0/16"],
            ),
            (
                spec(&["fd00:1::/56"], None, Some(64), None),
                code::CAPACITY_NOT_CHECKED,
                &["fd00:1::/56"],
            ),
            (
                ClusterSpec {
                    node_mask_size: None,
                    ..spec(&["10.1.0.0/16", "fd00:1::/56"], None, None, Some(5))
                },
                code::CAPACITY_NOT_CHECKED,
                &["10.1.0.0/16", "fd00:1::/56"],
            ),
        ];
        for (c, want_code, want) in cases {
            let found = check(std::slice::from_ref(&c));
            let f = found
                .iter()
                .find(|f| f.code == want_code)
                .unwrap_or_else(|| panic!("no {want_code} in {found:?}"));
            let want: Vec<IpNet> = want.iter().map(|s| n(s)).collect();
            assert_eq!(f.cidrs, want, "{want_code}: {}", f.message);
            for w in &want {
                assert!(
                    f.message.contains(&w.to_string()),
                    "{want_code}: {}",
                    f.message
                );
            }
        }
        // Only a cluster without any Pod CIDR has none to name.
        let f = check(&[spec(&[], Some(24), None, Some(3))]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, code::NODE_MASK_SIZE_UNUSED);
        assert!(f[0].cidrs.is_empty());
    }
}
