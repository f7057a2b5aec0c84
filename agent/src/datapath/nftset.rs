//! Elements of an nf_tables interval set over netlink: add and delete prefixes, read them back.
//!
//! Why not `nft add/delete element`: nft 1.0.6 reads the whole set into its
//! cache for every change to an interval set, and its deletes are quadratic
//! (measured here: 17 s to delete 2k prefixes from a set of 10k; 1.5 s to
//! delete one of 100k, 1.3 s to add one). The kernel's own cost is a tree
//! insert or erase per element, so podmesh sends the elements itself, as
//! libnftnl would: each prefix is two elements of the set's rbtree, its first
//! address and, flagged `NFT_SET_ELEM_INTERVAL_END`, the address after its
//! last (none for a prefix that ends at the top of the address space). Each
//! chunk is one nfnetlink transaction (batch begin, one NEWSETELEM or
//! DELSETELEM, batch end). Layouts: include/uapi/linux/netfilter/nf_tables.h
//! and nfnetlink.h.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ipnet::IpNet;

use super::nl::{Attrs, Msg, Netlink, NlError, attrs, consts::NLM_F_CREATE};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

/// Prefixes per transaction: as many as one attribute's 64 KiB holds (40
/// bytes per IPv4 prefix, 64 per IPv6 one), since every transaction's
/// commit costs time that grows with the set.
const fn chunk(v4: bool) -> usize {
    if v4 { 1500 } else { 1000 }
}

/// One element of an interval set: a key and whether it ends an interval.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    /// The address, in network byte order (4 or 16 bytes).
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END`.
    pub end: bool,
}

/// The elements that stand for `cidr` in an interval set.
pub fn elements_of(cidr: IpNet) -> Vec<Element> {
    let (start, after): (Vec<u8>, Option<Vec<u8>>) = match cidr {
        IpNet::V4(n) => (
            n.network().octets().to_vec(),
            u32::from(n.broadcast())
                .checked_add(1)
                .map(|a| Ipv4Addr::from(a).octets().to_vec()),
        ),
        IpNet::V6(n) => (
            n.network().octets().to_vec(),
            u128::from(n.broadcast())
                .checked_add(1)
                .map(|a| Ipv6Addr::from(a).octets().to_vec()),
        ),
    };
    let mut v = vec![Element {
        key: start,
        end: false,
    }];
    if let Some(key) = after {
        v.push(Element { key, end: true });
    }
    v
}

/// The prefixes a set's elements stand for. Intervals that are not exactly
/// one prefix (written by something else) are returned in `other`.
pub fn prefixes_of(mut elems: Vec<Element>) -> (Vec<IpNet>, usize) {
    // At one key, an interval's end sorts before the next one's start.
    elems.sort_by(|a, b| a.key.cmp(&b.key).then(b.end.cmp(&a.end)));
    let mut out = Vec::new();
    let mut other = 0;
    let mut open: Option<Vec<u8>> = None;
    let close =
        |start: Vec<u8>, last: Option<IpAddr>, out: &mut Vec<IpNet>, other: &mut usize| match (
            addr_of(&start),
            last,
        ) {
            (Some(lo), Some(hi)) => match prefix_of(lo, hi) {
                Some(len) => out.push(IpNet::new(lo, len).expect("length checked")),
                None => *other += 1,
            },
            _ => *other += 1,
        };
    for e in elems {
        if e.end {
            if let Some(start) = open.take() {
                close(start, addr_of(&e.key).and_then(prev), &mut out, &mut other);
            }
        } else if let Some(start) = open.replace(e.key) {
            // Two starts in a row: the first is open-ended, not ours.
            drop(start);
            other += 1;
        }
    }
    if let Some(start) = open {
        let top = match start.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::BROADCAST)),
            16 => Some(IpAddr::V6(Ipv6Addr::from(u128::MAX))),
            _ => None,
        };
        close(start, top, &mut out, &mut other);
    }
    (out, other)
}

fn addr_of(key: &[u8]) -> Option<IpAddr> {
    match key.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(key).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(key).ok()?))),
        _ => None,
    }
}

fn prev(a: IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(v) => u32::from(v).checked_sub(1).map(|x| IpAddr::V4(x.into())),
        IpAddr::V6(v) => u128::from(v).checked_sub(1).map(|x| IpAddr::V6(x.into())),
    }
}

/// An nf_tables netlink socket in one network namespace.
#[derive(Debug)]
pub struct NftSets {
    nl: Netlink,
}

fn nfgenmsg(family: u8, res_id: u16) -> Vec<u8> {
    let mut v = vec![family, 0];
    v.extend_from_slice(&res_id.to_be_bytes());
    v
}

fn strz(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A NEWSETELEM (`add`) or DELSETELEM of `cidrs`; a DELSETELEM without
/// elements flushes the set.
fn elements_msg(table: &str, set: &str, add: bool, cidrs: Option<&[IpNet]>) -> Msg {
    let (ty, flags) = if add {
        (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
    } else {
        (NFT_MSG_DELSETELEM, 0)
    };
    let mut body = Attrs::with_header(&nfgenmsg(NFPROTO_INET, 0));
    body.put(NFTA_SET_ELEM_LIST_TABLE, &strz(table))
        .put(NFTA_SET_ELEM_LIST_SET, &strz(set));
    if let Some(cidrs) = cidrs {
        let mut list = Attrs::default();
        for c in cidrs {
            for e in elements_of(*c) {
                let mut value = Attrs::default();
                value.put(NFTA_DATA_VALUE, &e.key);
                let mut elem = Attrs::default();
                elem.nested(NFTA_SET_ELEM_KEY, &value);
                if e.end {
                    elem.put(
                        NFTA_SET_ELEM_FLAGS,
                        &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
                    );
                }
                list.nested(NFTA_LIST_ELEM, &elem);
            }
        }
        body.nested(NFTA_SET_ELEM_LIST_ELEMENTS, &list);
    }
    Msg {
        ty: (NFNL_SUBSYS_NFTABLES << 8) | ty,
        flags,
        body: body.build(),
    }
}

impl NftSets {
    /// Opens the socket in the namespace at `netns` (`None`: this process's).
    pub fn open(netns: Option<&Path>) -> Result<Self, NlError> {
        Ok(Self {
            nl: Netlink::open_netfilter(netns)?,
        })
    }

    /// Adds (`add`) or deletes the prefixes `cidrs` (of one family) in set
    /// `set` of table `inet table`. Adding a prefix that is there is fine;
    /// deleting one that is not fails its transaction with ENOENT.
    pub fn change(
        &mut self,
        table: &str,
        set: &str,
        add: bool,
        cidrs: &[IpNet],
    ) -> Result<(), NlError> {
        let per = chunk(cidrs.first().is_none_or(|c| matches!(c, IpNet::V4(_))));
        for chunk in cidrs.chunks(per) {
            self.commit(&[elements_msg(table, set, add, Some(chunk))])?;
        }
        Ok(())
    }

    /// Empties the set and adds `keep` (at most one chunk) in one
    /// transaction: no moment without the kept prefixes, and no per-element
    /// delete (a flush is one walk of the set).
    pub fn replace(&mut self, table: &str, set: &str, keep: &[IpNet]) -> Result<(), NlError> {
        let mut msgs = vec![elements_msg(table, set, false, None)];
        if !keep.is_empty() {
            msgs.push(elements_msg(table, set, true, Some(keep)));
        }
        self.commit(&msgs)
    }

    /// Whether `n` prefixes of this family fit one [`NftSets::replace`].
    pub fn fits_one_transaction(v4: bool, n: usize) -> bool {
        n <= chunk(v4)
    }

    fn commit(&mut self, msgs: &[Msg]) -> Result<(), NlError> {
        let batch = |ty| Msg {
            ty,
            flags: 0,
            body: nfgenmsg(0, NFNL_SUBSYS_NFTABLES),
        };
        let failed =
            self.nl
                .transaction(batch(NFNL_MSG_BATCH_BEGIN), msgs, batch(NFNL_MSG_BATCH_END))?;
        match failed.first() {
            Some((_, errno)) => Err(NlError::Kernel { errno: *errno }),
            None => Ok(()),
        }
    }

    /// The prefixes of set `set` of table `inet table`, and how many of its
    /// intervals are not exactly one prefix. ENOENT: no such set.
    pub fn list(&mut self, table: &str, set: &str) -> Result<(Vec<IpNet>, usize), NlError> {
        let mut body = Attrs::with_header(&nfgenmsg(NFPROTO_INET, 0));
        body.put(NFTA_SET_ELEM_LIST_TABLE, &strz(table))
            .put(NFTA_SET_ELEM_LIST_SET, &strz(set));
        let replies = self.nl.dump(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
            body.build(),
        )?;
        let mut elems = Vec::new();
        for r in replies {
            let Some(attrs_bytes) = r.body.get(4..) else {
                continue;
            };
            for (ty, v) in attrs(attrs_bytes) {
                if ty != NFTA_SET_ELEM_LIST_ELEMENTS {
                    continue;
                }
                for (lt, lv) in attrs(v) {
                    if lt != NFTA_LIST_ELEM {
                        continue;
                    }
                    let mut key = None;
                    let mut end = false;
                    for (et, ev) in attrs(lv) {
                        match et {
                            NFTA_SET_ELEM_KEY => {
                                key = attrs(ev)
                                    .find(|(t, _)| *t == NFTA_DATA_VALUE)
                                    .map(|(_, k)| k.to_vec());
                            }
                            NFTA_SET_ELEM_FLAGS => {
                                let f = ev
                                    .get(0..4)
                                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
                                    .unwrap_or(0);
                                end = f & NFT_SET_ELEM_INTERVAL_END != 0;
                            }
                            _ => {}
                        }
                    }
                    if let Some(key) = key {
                        elems.push(Element { key, end });
                    }
                }
            }
        }
        Ok(prefixes_of(elems))
    }
}

/// The prefix length of the range `lo..=hi` when it is exactly one prefix.
fn prefix_of(lo: IpAddr, hi: IpAddr) -> Option<u8> {
    let (lo, hi, bits) = match (lo, hi) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return None,
    };
    let span = hi.checked_sub(lo)?.checked_add(1)?;
    if !span.is_power_of_two() || lo % span != 0 {
        return None;
    }
    Some(bits - span.trailing_zeros() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    #[test]
    fn prefixes_become_a_start_and_an_end_and_back() {
        let cidrs = [
            net("10.2.0.0/26"),
            net("10.2.0.64/26"),
            net("10.9.0.7/32"),
            net("255.255.255.0/24"),
            net("fd00:2::/64"),
        ];
        let elems: Vec<Element> = cidrs.iter().flat_map(|c| elements_of(*c)).collect();
        assert_eq!(elems.len(), 9, "the prefix at the top has no end element");
        assert_eq!(
            elems[1],
            Element {
                key: vec![10, 2, 0, 64],
                end: true
            }
        );
        let (back, other) = prefixes_of(elems);
        let mut want = cidrs.to_vec();
        want.sort();
        let mut back = back;
        back.sort();
        assert_eq!(back, want);
        assert_eq!(other, 0);
    }

    #[test]
    fn a_full_chunk_fits_one_attribute() {
        for (cidr, v4) in [("10.0.0.0/26", true), ("fd00::/64", false)] {
            let c: IpNet = net(cidr);
            let per_prefix: usize = elements_of(c)
                .iter()
                .map(|e| 4 + 4 + 4 + e.key.len() + if e.end { 8 } else { 0 })
                .sum();
            assert!(
                4 + per_prefix * chunk(v4) <= usize::from(u16::MAX),
                "{cidr}"
            );
        }
    }

    #[test]
    fn ranges_that_are_not_one_prefix_are_counted_apart() {
        let elems = vec![
            Element {
                key: vec![10, 0, 0, 1],
                end: false,
            },
            Element {
                key: vec![10, 0, 0, 3],
                end: true,
            },
            Element {
                key: vec![10, 0, 1, 0],
                end: false,
            },
            Element {
                key: vec![10, 0, 2, 0],
                end: true,
            },
        ];
        let (p, other) = prefixes_of(elems);
        assert_eq!(p, vec![net("10.0.1.0/24")]);
        assert_eq!(other, 1);
    }

    #[test]
    fn prefix_of_accepts_only_aligned_power_of_two_ranges() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(prefix_of(ip("10.0.0.0"), ip("10.0.255.255")), Some(16));
        assert_eq!(prefix_of(ip("10.0.0.1"), ip("10.0.0.2")), None);
        assert_eq!(prefix_of(ip("fd00::"), ip("fd00::ffff")), Some(112));
    }
}
