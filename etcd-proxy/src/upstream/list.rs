//! The upstream prefix listed in pages pinned to one revision, so that no single answer passes the receive limit.
//!
//! One unpaged read of the whole prefix stops working once the prefix holds
//! more than the client's receive limit (4 MiB by default: about 28k node
//! records), and a proxy that cannot list never syncs. Pages of
//! [`PAGE_KEYS`] keys at the first page's revision give the same snapshot
//! as one read; a page that is still too large (large values) is read again
//! in smaller pages.
use etcd_client::{KvClient, proto::PbKeyValue};
use podmesh_plumbing::etcd_page::get_page;

use crate::prefix::prefix_end;

/// Keys per page.
pub const PAGE_KEYS: i64 = 1000;
/// The largest answer the proxy accepts from its upstream (a page of 1,000
/// keys of up to 64 KiB each; pages shrink when values are larger).
pub const RECEIVE_LIMIT: usize = 64 << 20;

/// Every key-value under `prefix` at one revision, and that revision.
pub async fn list(
    kv: &mut KvClient,
    prefix: &[u8],
) -> Result<(Vec<PbKeyValue>, i64), etcd_client::Error> {
    let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
    let mut from = prefix.to_vec();
    let mut revision = 0;
    let mut page = PAGE_KEYS;
    let mut out = Vec::new();
    loop {
        let resp = get_page(kv, &from, &end, revision, &mut page, false).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let kvs = resp.0.kvs;
        if let Some(last) = kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        let empty = kvs.is_empty();
        out.extend(kvs);
        if !more || empty {
            return Ok((out, revision));
        }
    }
}

/// What identifies the prefix's content at one revision without its values:
/// how many keys, and a hash over every key with its create and mod
/// revisions and version, in key order. Two etcds that agree on it at a
/// revision hold the same history of the prefix up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub keys: u64,
    pub hash: u64,
}

/// Builds a [`Fingerprint`] from key-values given in key order.
#[derive(Debug, Default)]
pub struct Fingerprinter {
    keys: u64,
    hasher: std::hash::DefaultHasher,
}

impl Fingerprinter {
    pub fn add(&mut self, kv: &PbKeyValue) {
        use std::hash::Hasher as _;
        self.keys += 1;
        self.hasher.write_usize(kv.key.len());
        self.hasher.write(&kv.key);
        self.hasher.write_i64(kv.create_revision);
        self.hasher.write_i64(kv.mod_revision);
        self.hasher.write_i64(kv.version);
    }

    pub fn finish(self) -> Fingerprint {
        use std::hash::Hasher as _;
        Fingerprint {
            keys: self.keys,
            hash: self.hasher.finish(),
        }
    }
}

/// The [`Fingerprint`] of the upstream's prefix at `revision`, read in pages
/// of keys only (no values cross the network).
pub async fn fingerprint_at(
    kv: &mut KvClient,
    prefix: &[u8],
    revision: i64,
) -> Result<Fingerprint, etcd_client::Error> {
    let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
    let mut from = prefix.to_vec();
    let mut f = Fingerprinter::default();
    let mut page = PAGE_KEYS * 10;
    loop {
        let resp = get_page(kv, &from, &end, revision, &mut page, true).await?;
        let more = resp.more();
        let kvs = resp.0.kvs;
        for kv in &kvs {
            f.add(kv);
        }
        match kvs.last() {
            Some(last) if more => {
                from = last.key.clone();
                from.push(0);
            }
            _ => return Ok(f.finish()),
        }
    }
}
