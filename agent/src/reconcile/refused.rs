//! Entries the datapath refused: each is its node record's rejection
//! (`datapath-refused`) in the status until an upsert of it succeeds, it is
//! deleted, or a full resync no longer wants it. Refused entries are not
//! retried in a loop; every full resync and every change of the record tries them again.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use ipnet::IpNet;

use crate::{
    datapath::{Refusal, RemoteRoute},
    desired::{RecordOutcome, RecordState, Rejection, code},
    model::node_key,
    status::RouteStatus,
};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Refused {
    cluster: String,
    node: String,
    code: &'static str,
    message: String,
}

/// The refused entries, shared by the reconciler (writer) and the status (reader).
#[derive(Clone, Debug, Default)]
pub struct Refusals(Arc<Mutex<BTreeMap<IpNet, Refused>>>);

impl Refusals {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<IpNet, Refused>> {
        self.0.lock().expect("refusals lock")
    }

    /// An upsert of `routes` went through except for `refused`: forgets the
    /// earlier refusals of `routes` and records these. Returns the records
    /// newly refused (or refused for another reason), as (cluster, key, why).
    pub fn applied(
        &self,
        routes: &[RemoteRoute],
        refused: &[Refusal],
    ) -> Vec<(String, String, Rejection)> {
        let mut g = self.lock();
        let mut before = BTreeMap::new();
        for r in routes {
            if let Some(old) = g.remove(&r.cidr) {
                before.insert(r.cidr, old);
            }
        }
        let by_cidr: BTreeMap<IpNet, &RemoteRoute> = if refused.is_empty() {
            BTreeMap::new()
        } else {
            routes.iter().map(|r| (r.cidr, r)).collect()
        };
        let mut newly = Vec::new();
        for f in refused {
            let Some(r) = by_cidr.get(&f.cidr) else {
                continue;
            };
            let now = Refused {
                cluster: r.cluster.clone(),
                node: r.node.clone(),
                code: f.reason.code(),
                message: f.to_string(),
            };
            if before.get(&f.cidr) != Some(&now) {
                newly.push((
                    now.cluster.clone(),
                    node_key(&now.cluster, &now.node),
                    rejection(&now),
                ));
            }
            g.insert(f.cidr, now);
        }
        newly.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        newly.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        newly
    }

    /// These entries were deleted.
    pub fn forget(&self, cidrs: &[IpNet]) {
        let mut g = self.lock();
        for c in cidrs {
            g.remove(c);
        }
    }

    /// Only the entries in `keep` are wanted (a full resync).
    pub fn retain(&self, keep: &BTreeSet<IpNet>) {
        self.lock().retain(|c, _| keep.contains(c));
    }

    /// Number of refused entries.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no entry is refused.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Node records with a refused entry, by cluster and reason code.
    pub fn nodes_by_cluster(&self) -> BTreeMap<String, BTreeMap<&'static str, usize>> {
        let g = self.lock();
        let nodes: BTreeMap<(&str, &str), &'static str> = g
            .values()
            .map(|r| ((r.cluster.as_str(), r.node.as_str()), r.code))
            .collect();
        let mut out: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
        for ((c, _), code) in nodes {
            *out.entry(c.to_string())
                .or_default()
                .entry(code)
                .or_default() += 1;
        }
        out
    }

    /// Shows the node records with a refused entry as rejected, and leaves
    /// the refused routes out of `routes` (the datapath does not hold them).
    pub fn overlay(&self, records: &mut [RecordOutcome], routes: &mut Vec<RouteStatus>) {
        let g = self.lock();
        if g.is_empty() {
            return;
        }
        routes.retain(|r| !g.contains_key(&r.cidr));
        for rec in records.iter_mut() {
            if rec.kind != "node" || rec.state != RecordState::Programmed {
                continue;
            }
            if let Some(r) = rec.pod_cidrs.iter().find_map(|c| g.get(c)) {
                rec.state = RecordState::Rejected(rejection(r));
            }
        }
    }
}

fn rejection(r: &Refused) -> Rejection {
    if r.code != code::DATAPATH_REFUSED {
        return Rejection::new(r.code, r.message.clone());
    }
    Rejection::new(
        code::DATAPATH_REFUSED,
        format!(
            "node {} of cluster {}: this node's datapath does not install it: {}",
            r.node, r.cluster, r.message
        ),
    )
}
