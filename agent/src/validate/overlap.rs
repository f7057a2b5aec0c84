//! Overlap detection over IPv4 and IPv6 CIDRs: a bulk sort/sweep and an incremental index.
//!
//! Two CIDRs are either disjoint or one contains the other, so "overlap" is
//! "containment" and both structures exploit it: the sweep keeps the chain of
//! enclosing prefixes on a stack, the index looks up the (at most 129)
//! enclosing prefixes directly and range-scans the enclosed ones.
use std::collections::BTreeMap;

use ipnet::IpNet;

/// First and last address of `net` (host bits ignored) as integers, with the family.
///
/// IPv4 and IPv6 never compare equal because the family is part of the tuple.
pub fn span(net: &IpNet) -> (bool, u128, u128) {
    match net.trunc() {
        IpNet::V4(n) => (
            false,
            u32::from(n.network()).into(),
            u32::from(n.broadcast()).into(),
        ),
        IpNet::V6(n) => (true, n.network().into(), n.broadcast().into()),
    }
}

/// Whether `a` and `b` share at least one address (same family, one contains the other).
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    let (fa, sa, ea) = span(a);
    let (fb, sb, eb) = span(b);
    fa == fb && sa <= eb && sb <= ea
}

/// One overlapping pair found by [`overlapping_pairs`], as indices into its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Overlap {
    /// The larger (enclosing) CIDR; for two equal CIDRs, the one listed first.
    pub outer: usize,
    /// The CIDR inside `outer`.
    pub inner: usize,
}

/// Every overlapping pair among `cidrs`, in O(n log n + pairs).
///
/// Sorted by (family, first address, prefix length), each CIDR is enclosed by
/// exactly the chain of earlier CIDRs that still reach it; that chain is a
/// stack, popped as soon as an entry ends before the current start.
pub fn overlapping_pairs(cidrs: &[IpNet]) -> Vec<Overlap> {
    let mut order: Vec<(bool, u128, u8, usize, u128)> = cidrs
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (f, s, e) = span(n);
            (f, s, n.prefix_len(), i, e)
        })
        .collect();
    order.sort_unstable();
    let mut out = Vec::new();
    // (family, last address, index) of the enclosing chain, outermost first.
    let mut stack: Vec<(bool, u128, usize)> = Vec::new();
    for &(fam, start, _, i, end) in &order {
        while let Some(&(f, e, _)) = stack.last() {
            if f != fam || e < start {
                stack.pop();
            } else {
                break;
            }
        }
        out.extend(
            stack
                .iter()
                .map(|&(_, _, o)| Overlap { outer: o, inner: i }),
        );
        stack.push((fam, end, i));
    }
    out
}

/// An incremental index of CIDRs with owners, for run-time validation.
///
/// `insert`, `remove` and `overlapping` are O(log n) per stored prefix length
/// plus the number of hits; a `/8` inserted earlier is found by a later query
/// for a `/24` inside it, and vice versa. The same CIDR may have several owners.
#[derive(Clone, Debug)]
pub struct CidrIndex<O> {
    /// (family is IPv6, first address, prefix length) -> owners of that exact CIDR.
    map: BTreeMap<(bool, u128, u8), Vec<O>>,
    /// How many distinct CIDRs of each family and prefix length are stored, so
    /// that the enclosing-prefix lookup skips lengths nothing uses.
    lens: [[u32; 129]; 2],
    len: usize,
}

impl<O> Default for CidrIndex<O> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            lens: [[0; 129]; 2],
            len: 0,
        }
    }
}

fn key(net: &IpNet) -> (bool, u128, u8) {
    let (f, s, _) = span(net);
    (f, s, net.prefix_len())
}

fn net_of(k: &(bool, u128, u8)) -> IpNet {
    let (v6, start, len) = *k;
    if v6 {
        IpNet::V6(ipnet::Ipv6Net::new(start.into(), len).expect("stored prefix is valid"))
    } else {
        let a = std::net::Ipv4Addr::from(start as u32);
        IpNet::V4(ipnet::Ipv4Net::new(a, len).expect("stored prefix is valid"))
    }
}

impl<O> CidrIndex<O> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (CIDR, owner) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `owner` for `cidr` (host bits are ignored).
    pub fn insert(&mut self, cidr: IpNet, owner: O) {
        let k = key(&cidr);
        // Almost every CIDR has one owner: room for exactly one, not the four
        // a first `push` reserves (100k remote nodes would pay 3 unused slots each).
        let owners = self.map.entry(k).or_insert_with(|| Vec::with_capacity(1));
        if owners.is_empty() {
            self.lens[usize::from(k.0)][usize::from(k.2)] += 1;
        }
        owners.push(owner);
        self.len += 1;
    }

    /// Removes one entry of `owner` for `cidr`; returns whether there was one.
    pub fn remove(&mut self, cidr: &IpNet, owner: &O) -> bool
    where
        O: PartialEq,
    {
        let k = key(cidr);
        let Some(owners) = self.map.get_mut(&k) else {
            return false;
        };
        let Some(pos) = owners.iter().position(|o| o == owner) else {
            return false;
        };
        owners.remove(pos);
        self.len -= 1;
        if owners.is_empty() {
            self.map.remove(&k);
            self.lens[usize::from(k.0)][usize::from(k.2)] -= 1;
        }
        true
    }

    /// The owners of exactly `cidr`.
    pub fn get(&self, cidr: &IpNet) -> &[O] {
        self.map.get(&key(cidr)).map_or(&[], Vec::as_slice)
    }

    /// Every stored (CIDR, owner) that shares an address with `cidr`:
    /// enclosing CIDRs first (outermost first), then `cidr` itself and the
    /// CIDRs inside it in address order.
    pub fn overlapping(&self, cidr: &IpNet) -> Vec<(IpNet, &O)> {
        let (fam, start, end) = span(cidr);
        let plen = cidr.prefix_len();
        let bits: u32 = if fam { 128 } else { 32 };
        let mut out = Vec::new();
        for l in 0..plen {
            if self.lens[usize::from(fam)][usize::from(l)] == 0 {
                continue;
            }
            let host = bits - u32::from(l);
            let sup = if host >= 128 {
                0
            } else {
                start >> host << host
            };
            if let Some((k, owners)) = self.map.get_key_value(&(fam, sup, l)) {
                let n = net_of(k);
                out.extend(owners.iter().map(|o| (n, o)));
            }
        }
        for (k, owners) in self.map.range((fam, start, plen)..=(fam, end, u8::MAX)) {
            let n = net_of(k);
            out.extend(owners.iter().map(|o| (n, o)));
        }
        out
    }

    /// Every (CIDR, owner) in address order (IPv4 first).
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &O)> {
        self.map
            .iter()
            .flat_map(|(k, owners)| owners.iter().map(move |o| (net_of(k), o)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn sweep_finds_nested_equal_and_ignores_families() {
        let c = [
            n("10.0.0.0/8"),
            n("10.1.0.0/16"),
            n("10.1.2.0/24"),
            n("10.2.0.0/16"),
            n("11.0.0.0/8"),
            n("10.1.0.0/16"),
            n("::a01:0/112"),
            n("fd00::/8"),
            n("fd00:1::/64"),
        ];
        let mut got = overlapping_pairs(&c);
        got.sort();
        let want = [
            (0, 1),
            (0, 2),
            (0, 3),
            (0, 5),
            (1, 2),
            (1, 5),
            (5, 2),
            (7, 8),
        ];
        let mut want: Vec<_> = want
            .iter()
            .map(|&(outer, inner)| Overlap { outer, inner })
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn index_finds_containing_contained_and_equal() {
        let mut ix = CidrIndex::new();
        ix.insert(n("10.0.0.0/8"), "a");
        ix.insert(n("10.1.2.0/24"), "b");
        ix.insert(n("10.1.2.0/24"), "c");
        ix.insert(n("10.3.0.0/16"), "d");
        ix.insert(n("fd00::/8"), "e");
        assert_eq!(ix.len(), 5);
        let hits = |q: &str, ix: &CidrIndex<&str>| {
            let mut v: Vec<_> = ix
                .overlapping(&n(q))
                .into_iter()
                .map(|(c, o)| format!("{c}={o}"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            hits("10.1.0.0/16", &ix),
            ["10.0.0.0/8=a", "10.1.2.0/24=b", "10.1.2.0/24=c"]
        );
        assert_eq!(hits("10.1.2.128/25", &ix).len(), 3);
        assert_eq!(hits("11.0.0.0/8", &ix), Vec::<String>::new());
        assert_eq!(hits("fd00:0:0:1::/64", &ix), ["fd00::/8=e"]);
        assert_eq!(hits("::/0", &ix), ["fd00::/8=e"]);
        assert_eq!(hits("0.0.0.0/0", &ix).len(), 4);
        assert!(ix.remove(&n("10.1.2.0/24"), &"b"));
        assert!(!ix.remove(&n("10.1.2.0/24"), &"b"));
        assert_eq!(ix.get(&n("10.1.2.0/24")), &["c"]);
        assert!(ix.remove(&n("10.0.0.0/8"), &"a"));
        assert_eq!(hits("10.1.0.0/16", &ix), ["10.1.2.0/24=c"]);
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.iter().count(), 3);
    }

    #[test]
    fn index_handles_host_routes_and_full_lengths() {
        let mut ix = CidrIndex::new();
        ix.insert(n("255.255.255.255/32"), 1);
        ix.insert(n("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"), 2);
        ix.insert(n("::/0"), 3);
        assert_eq!(ix.overlapping(&n("255.0.0.0/8")).len(), 1);
        assert_eq!(ix.overlapping(&n("ffff::/16")).len(), 2);
        assert_eq!(ix.overlapping(&n("::1/128")).len(), 1);
    }
}
