//! `plan suggest`: the first free aligned blocks that overlap nothing in a plan.
//!
//! The used ranges (every CIDR of the plan plus reserved space) are merged
//! into sorted disjoint intervals; the walk jumps from one used interval to
//! the next aligned start, so its cost is O(m log m + blocks), whatever the
//! size of the search space.
use std::collections::BTreeSet;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::Plan;
use crate::validate::{cidr::reserved_ranges, overlap::span};

/// Where `plan suggest` looks when no `--within` is given, per family.
pub fn default_within(v6: bool) -> Vec<IpNet> {
    let v: &[&str] = if v6 {
        &["fd00::/8"]
    } else {
        &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
    };
    v.iter().map(|s| s.parse().expect("valid CIDR")).collect()
}

/// A request that cannot be answered as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuggestError {
    /// `--family` is neither 4 nor 6.
    #[error("--family {0} is not an address family; use 4 or 6")]
    BadFamily(u8),
    /// The prefix length does not exist in the family.
    #[error("--prefix-len {len} is longer than an IPv{family} address ({bits} bits)")]
    PrefixTooLong {
        /// Requested length.
        len: u8,
        /// 4 or 6.
        family: u8,
        /// Address bits of the family.
        bits: u8,
    },
    /// A `--within` range with host bits set: which block was meant is a guess.
    #[error(
        "--within {within} has host bits set; write {canonical} (or a longer prefix if only part of it is meant)"
    )]
    WithinNotCanonical {
        /// The range as given.
        within: IpNet,
        /// The range it lies in, without host bits.
        canonical: IpNet,
    },
    /// A `--within` range of the other family.
    #[error("--within {within} is not an IPv{family} range; pass --family or ranges of one family")]
    FamilyMismatch {
        /// The offending range.
        within: IpNet,
        /// The family in use.
        family: u8,
    },
    /// A `--within` range smaller than the requested blocks.
    #[error(
        "--within {within} is smaller than a /{len}; pass a shorter --prefix-len or a larger range"
    )]
    WithinTooSmall {
        /// The offending range.
        within: IpNet,
        /// Requested length.
        len: u8,
    },
}

/// The first `count` free `/prefix_len` blocks inside `within` (in the order
/// given; empty means [`default_within`]) that overlap no CIDR of `plan` and no
/// reserved space. `family` (4 or 6) defaults to the family of `within`, else 4.
/// Fewer than `count` blocks come back when the space runs out.
pub fn suggest(
    plan: &Plan,
    prefix_len: u8,
    within: &[IpNet],
    count: usize,
    family: Option<u8>,
) -> Result<Vec<IpNet>, SuggestError> {
    let v6 = match family {
        Some(4) => false,
        Some(6) => true,
        Some(f) => return Err(SuggestError::BadFamily(f)),
        None => matches!(within.first(), Some(IpNet::V6(_))),
    };
    let (fam, bits) = if v6 { (6, 128u8) } else { (4, 32u8) };
    if prefix_len > bits {
        return Err(SuggestError::PrefixTooLong {
            len: prefix_len,
            family: fam,
            bits,
        });
    }
    let within = if within.is_empty() {
        default_within(v6)
            .into_iter()
            .filter(|w| w.prefix_len() <= prefix_len)
            .collect()
    } else {
        within.to_vec()
    };
    for w in &within {
        if w.addr() != w.network() {
            return Err(SuggestError::WithinNotCanonical {
                within: *w,
                canonical: w.trunc(),
            });
        }
        if matches!(w, IpNet::V6(_)) != v6 {
            return Err(SuggestError::FamilyMismatch {
                within: *w,
                family: fam,
            });
        }
        if w.prefix_len() > prefix_len {
            return Err(SuggestError::WithinTooSmall {
                within: *w,
                len: prefix_len,
            });
        }
    }
    let used = used_intervals(plan, v6);
    let host = u32::from(bits - prefix_len);
    let size_m1: u128 = if host >= 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    };
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for w in &within {
        if out.len() >= count {
            break;
        }
        let (_, ws, we) = span(w);
        let mut cur = ws;
        while out.len() < count {
            let Some(last) = cur.checked_add(size_m1).filter(|&l| l <= we) else {
                break;
            };
            let i = used.partition_point(|&(_, e)| e < cur);
            if let Some(&(s, e)) = used.get(i)
                && s <= last
            {
                match e.checked_add(1).and_then(|n| align_up(n, size_m1)) {
                    Some(n) => cur = n,
                    None => break,
                }
                continue;
            }
            if seen.insert(cur) {
                out.push(block(v6, cur, prefix_len));
            }
            match last.checked_add(1) {
                Some(n) => cur = n,
                None => break,
            }
        }
    }
    Ok(out)
}

fn align_up(x: u128, size_m1: u128) -> Option<u128> {
    Some(x.checked_add(size_m1)? & !size_m1)
}

fn block(v6: bool, start: u128, len: u8) -> IpNet {
    if v6 {
        IpNet::V6(Ipv6Net::new(start.into(), len).expect("valid prefix"))
    } else {
        IpNet::V4(Ipv4Net::new((start as u32).into(), len).expect("valid prefix"))
    }
}

/// Every plan CIDR of the family and the reserved ranges, merged into sorted
/// disjoint inclusive intervals. Default routes in the plan are left out: they
/// are errors of their own and would leave nothing to suggest.
fn used_intervals(plan: &Plan, v6: bool) -> Vec<(u128, u128)> {
    let mut spans: Vec<(u128, u128)> = plan
        .clusters
        .iter()
        .flat_map(|c| {
            c.pod_cidrs
                .iter()
                .chain(&c.service_cidrs)
                .chain(&c.node_cidrs)
        })
        .copied()
        .filter(|n| n.prefix_len() > 0)
        .chain(reserved_ranges().into_iter().map(|(r, _)| r))
        .map(|n| span(&n))
        .filter(|&(f, _, _)| f == v6)
        .map(|(_, s, e)| (s, e))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{ClusterSpec, overlap::overlaps};

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn plan(pods: &[&str]) -> Plan {
        Plan {
            clusters: vec![ClusterSpec {
                name: "east".into(),
                id: 1,
                pod_cidrs: pods.iter().map(|s| n(s)).collect(),
                ..ClusterSpec::default()
            }],
        }
    }

    fn strs(v: Vec<IpNet>) -> Vec<String> {
        v.into_iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn first_free_blocks_skip_used_ones() {
        let p = plan(&["10.0.0.0/16", "10.1.0.0/16", "10.3.0.0/17"]);
        assert_eq!(
            strs(suggest(&p, 16, &[], 3, None).unwrap()),
            ["10.2.0.0/16", "10.4.0.0/16", "10.5.0.0/16"]
        );
        // 10.0.0.0/15 is used, 10.2.0.0/15 holds 10.3.0.0/17: nothing left in the /14.
        assert!(
            suggest(&p, 15, &[n("10.0.0.0/14")], 5, None)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn continues_into_the_next_within_range_and_stops_when_full() {
        let p = plan(&["10.0.0.0/8"]);
        // 192.168.0.0/16 cannot hold a /12 and is skipped when it is only a default.
        assert_eq!(
            strs(suggest(&p, 12, &[], 2, None).unwrap()),
            ["172.16.0.0/12"]
        );
        let got = suggest(&p, 16, &[], 3, None).unwrap();
        assert_eq!(
            strs(got),
            ["172.16.0.0/16", "172.17.0.0/16", "172.18.0.0/16"]
        );
        let got = suggest(&p, 16, &[n("10.0.0.0/8")], 3, None).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn ipv6_defaults_to_ula_and_avoids_plan_and_reserved_space() {
        let p = plan(&["fd00::/16"]);
        assert_eq!(
            strs(suggest(&p, 16, &[], 1, Some(6)).unwrap()),
            ["fd01::/16"]
        );
        // fe80::/10 (link-local) and ff00::/8 (multicast) leave only fe00::/9 free.
        let got = suggest(&plan(&[]), 9, &[n("fe00::/7")], 4, None).unwrap();
        assert_eq!(strs(got), ["fe00::/9"]);
        let got = suggest(&plan(&[]), 8, &[n("::/0")], 2, None).unwrap();
        assert_eq!(strs(got), ["100::/8", "200::/8"]);
    }

    #[test]
    fn many_used_ranges_are_walked_not_enumerated() {
        // 16384 used /24s fill 10.0.0.0/8's first quarter; the answer is past them.
        let pods: Vec<String> = (0..16384u32)
            .map(|i| format!("10.{}.{}.0/24", i >> 8, i & 255))
            .collect();
        let p = plan(&pods.iter().map(String::as_str).collect::<Vec<_>>());
        let got = suggest(&p, 24, &[n("10.0.0.0/8")], 2, None).unwrap();
        assert_eq!(strs(got.clone()), ["10.64.0.0/24", "10.64.1.0/24"]);
        let got = suggest(&p, 32, &[n("10.0.0.0/8")], 1, None).unwrap();
        assert_eq!(strs(got), ["10.64.0.0/32"]);
        for g in suggest(&p, 20, &[], 10, None).unwrap() {
            assert!(
                p.clusters[0].pod_cidrs.iter().all(|u| !overlaps(u, &g)),
                "{g}"
            );
        }
    }

    #[test]
    fn bad_requests() {
        let p = plan(&[]);
        assert_eq!(
            suggest(&p, 33, &[], 1, None),
            Err(SuggestError::PrefixTooLong {
                len: 33,
                family: 4,
                bits: 32
            })
        );
        assert!(matches!(
            suggest(&p, 16, &[n("fd00::/8")], 1, Some(4)),
            Err(SuggestError::FamilyMismatch { .. })
        ));
        assert!(matches!(
            suggest(&p, 8, &[n("10.0.0.0/16")], 1, None),
            Err(SuggestError::WithinTooSmall { .. })
        ));
        assert_eq!(
            suggest(&p, 8, &[], 1, Some(5)),
            Err(SuggestError::BadFamily(5))
        );
        // Host bits are refused, not truncated to some block the user did not name.
        let e = suggest(&p, 24, &[n("10.0.0.0/16"), n("10.1.2.3/16")], 1, None).unwrap_err();
        assert_eq!(
            e,
            SuggestError::WithinNotCanonical {
                within: n("10.1.2.3/16"),
                canonical: n("10.1.0.0/16")
            }
        );
        assert!(
            e.to_string()
                .starts_with("--within 10.1.2.3/16 has host bits set; write 10.1.0.0/16"),
            "{e}"
        );
        assert!(matches!(
            suggest(&p, 64, &[n("fd00::1/48")], 1, None),
            Err(SuggestError::WithinNotCanonical { .. })
        ));
    }

    #[test]
    fn overlapping_within_ranges_do_not_repeat_blocks() {
        let got = suggest(
            &plan(&[]),
            24,
            &[n("10.0.0.0/23"), n("10.0.0.0/22")],
            4,
            None,
        )
        .unwrap();
        assert_eq!(
            strs(got),
            ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"]
        );
    }
}
