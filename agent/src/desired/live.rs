//! The incremental desired state: per changed entry, validate that one record
//! against persistent indexes and hand only the delta to the datapath.
//!
//! The from-scratch computation (`desired::oracle`, a test module) stays the
//! reference: after every step, [`Live`] holds exactly what it would compute
//! with the previous step's routes as `programmed` (a property test replays
//! random event sequences against it).
//!
//! Acceptance is the greedy choice of that computation in newcomer order
//! (programmed first, then by create revision) over the overlap graph of the
//! candidates' Pod CIDRs. A change re-decides only the records whose inputs
//! changed, in newcomer order, and a record whose acceptance flips queues its
//! later neighbours; reasons of rejected records are told against the final
//! owners, so they only need refreshing around what changed.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use ipnet::IpNet;

use super::{
    Decoded, LocalRanges, Ops, RecordOutcome, RecordState, Rejection, RemoteEntries, conflict,
    entry_static, node_of, outcome_row, route_of,
};
use crate::{
    compact::Few, datapath::RemoteRoute, model::ClusterRecord, validate::overlap::CidrIndex,
};

type Name = Arc<str>;
type Id = (Name, Name);

/// Who holds a CIDR in the index: a candidate node record (by cluster and
/// key), or a route kept for a cluster that has not completed a list yet.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owner {
    Node(Name, Name),
    Seed(Name, Name),
}

#[derive(Debug)]
struct Cand {
    /// Programmed in the previous step: an existing owner.
    p: bool,
    accepted: bool,
    create_revision: i64,
    cidrs: Few<IpNet>,
    reason: Option<Box<Rejection>>,
}

#[derive(Debug)]
enum Rec {
    /// The cluster record: its outcome is the cluster's state.
    Cluster,
    /// Rejected on its own (or because its cluster is).
    Rejected(Box<Rejection>),
    /// May be programmed, subject to conflicts.
    Cand(Cand),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Class {
    ProgrammedNode,
    ProgrammedCluster,
    Rejected(String),
}

#[derive(Debug)]
struct LiveCluster {
    name: Name,
    synced: bool,
    state: Option<Result<ClusterRecord, Rejection>>,
    recs: HashMap<Name, Rec>,
    /// Accepted candidates.
    accepted: usize,
    /// Routes kept while the cluster has not completed a list.
    seed: BTreeMap<IpNet, RemoteRoute>,
    nodes_programmed: usize,
    by_reason: BTreeMap<String, usize>,
}

/// Per remote cluster: node records programmed, rejected records by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Node records whose routes are programmed.
    pub nodes_programmed: usize,
    /// Rejected records by reason code.
    pub rejected_by_reason: BTreeMap<String, usize>,
}

/// Keys changed since the last step, by remote cluster.
pub type Dirty = HashMap<String, HashSet<String>>;

/// What one step changed.
#[derive(Clone, Debug, Default)]
pub struct Step {
    /// The delta for the datapath.
    pub ops: Ops,
    /// Records that became rejected (or changed reason) in this step.
    pub newly_rejected: Vec<(String, String, Rejection)>,
}

#[derive(Default)]
struct Work {
    queue: BTreeSet<(bool, i64, Name, Name)>,
    reason: HashSet<Id>,
    touched: BTreeSet<IpNet>,
    snaps: HashMap<Id, Option<Class>>,
    evaluated: Vec<Id>,
}

/// The incremental desired state (see the module documentation).
#[derive(Debug)]
pub struct Live {
    local: LocalRanges,
    clusters: BTreeMap<String, LiveCluster>,
    index: CidrIndex<Owner>,
    declared: CidrIndex<Name>,
    /// Routes installed when the agent started, not yet claimed by a cluster.
    orphans: Option<Vec<RemoteRoute>>,
    /// Routes of clusters the cache forgot since the last step, by cluster:
    /// kept if the cluster is configured again before the step (as the full
    /// computation would keep them, as the programmed routes of an unsynced cluster).
    detached: BTreeMap<String, BTreeMap<IpNet, RemoteRoute>>,
    /// Candidates whose acceptance differs from their `p`: re-keyed next step.
    flipped: Vec<Id>,
    /// The local ranges changed: the next step re-validates every record.
    revalidate: bool,
    routes: usize,
}

impl Live {
    /// An engine for `local`, starting from the routes the datapath holds.
    pub fn new(local: LocalRanges, installed: Vec<RemoteRoute>) -> Self {
        Self {
            local,
            clusters: BTreeMap::new(),
            index: CidrIndex::new(),
            declared: CidrIndex::new(),
            orphans: Some(installed),
            detached: BTreeMap::new(),
            flipped: Vec::new(),
            revalidate: false,
            routes: 0,
        }
    }

    /// Replaces the local ranges (this node's Pod CIDRs or address changed,
    /// as a Node from Kubernetes can): the next step re-validates every
    /// record against them. Programmed records stay the existing owners
    /// among remotes, but one that now overlaps a local range is withdrawn:
    /// a remote never takes local traffic. Returns whether anything changed.
    pub fn set_local(&mut self, local: LocalRanges) -> bool {
        if self.local == local {
            return false;
        }
        self.local = local;
        self.revalidate = true;
        true
    }

    /// Number of desired routes.
    pub fn route_count(&self) -> usize {
        self.routes
    }

    /// Programmed and rejected counts of `cluster`.
    pub fn counts(&self, cluster: &str) -> Counts {
        self.clusters
            .get(cluster)
            .map(|c| Counts {
                nodes_programmed: c.nodes_programmed,
                rejected_by_reason: c.by_reason.clone(),
            })
            .unwrap_or_default()
    }

    fn cand(&self, cluster: &str, key: &str) -> Option<&Cand> {
        match self.clusters.get(cluster)?.recs.get(key)? {
            Rec::Cand(c) => Some(c),
            _ => None,
        }
    }

    fn class(&self, cluster: &str, key: &str) -> Option<Class> {
        let cl = self.clusters.get(cluster)?;
        Some(match cl.recs.get(key)? {
            Rec::Cluster => match cl.state.as_ref()? {
                Ok(_) => Class::ProgrammedCluster,
                Err(r) => Class::Rejected(r.code.clone()),
            },
            Rec::Rejected(r) => Class::Rejected(r.code.clone()),
            Rec::Cand(c) if c.accepted => Class::ProgrammedNode,
            Rec::Cand(c) => {
                Class::Rejected(c.reason.as_ref().map_or(String::new(), |r| r.code.clone()))
            }
        })
    }

    fn snap(&self, w: &mut Work, id: &Id) {
        if !w.snaps.contains_key(id) {
            let c = self.class(&id.0, &id.1);
            w.snaps.insert(id.clone(), c);
        }
    }

    fn enqueue(&self, w: &mut Work, cluster: &Name, key: &Name) {
        if let Some(c) = self.cand(cluster, key) {
            w.queue
                .insert((!c.p, c.create_revision, cluster.clone(), key.clone()));
        }
    }

    fn mark(&self, w: &mut Work, id: Id, queue: bool) {
        self.snap(w, &id);
        if queue {
            self.enqueue(w, &id.0, &id.1);
        }
        w.reason.insert(id);
    }

    /// Candidates whose Pod CIDRs overlap `cidr`, except those of `skip_cluster`.
    fn neighbours(&self, cidr: &IpNet, skip_cluster: Option<&str>) -> Vec<Id> {
        self.index
            .overlapping(cidr)
            .into_iter()
            .filter_map(|(_, o)| match o {
                Owner::Node(c, k) if skip_cluster != Some(&**c) => Some((c.clone(), k.clone())),
                _ => None,
            })
            .collect()
    }

    fn touch_neighbours(&self, w: &mut Work, cidrs: &[IpNet], skip_cluster: Option<&str>) {
        for cidr in cidrs {
            for id in self.neighbours(cidr, skip_cluster) {
                self.mark(w, id, true);
            }
        }
    }

    fn sigma(&self, cluster: &Name, key: &Name) -> Option<(bool, i64, Name, Name)> {
        self.cand(cluster, key)
            .map(|c| (!c.p, c.create_revision, cluster.clone(), key.clone()))
    }

    /// Removes the seed routes of `cluster` from the index.
    fn drop_seed(&mut self, w: &mut Work, cluster: &str) -> BTreeMap<IpNet, RemoteRoute> {
        let Some(cl) = self.clusters.get_mut(cluster) else {
            return BTreeMap::new();
        };
        let seed = std::mem::take(&mut cl.seed);
        let name = cl.name.clone();
        for r in seed.values() {
            self.index
                .remove(&r.cidr, &Owner::Seed(name.clone(), r.node.as_str().into()));
            self.routes -= 1;
            w.touched.insert(r.cidr);
        }
        let cidrs: Vec<IpNet> = seed.keys().copied().collect();
        self.touch_neighbours(w, &cidrs, None);
        seed
    }

    /// Re-derives `key` of `cluster` from the entry `remotes` holds now.
    fn rederive(
        &mut self,
        w: &mut Work,
        remotes: &BTreeMap<String, RemoteEntries>,
        states: &BTreeMap<&str, Result<&ClusterRecord, Rejection>>,
        cluster: &str,
        key: &str,
        seed: Option<&BTreeMap<IpNet, RemoteRoute>>,
    ) {
        let Some(cl) = self.clusters.get(cluster) else {
            return;
        };
        let cname = cl.name.clone();
        let kname: Name = match cl.recs.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => key.into(),
        };
        let id = (cname.clone(), kname.clone());
        self.snap(w, &id);
        let old = self
            .clusters
            .get_mut(cluster)
            .and_then(|cl| cl.recs.remove(key));
        let mut old_accepted: Option<Few<IpNet>> = None;
        if let Some(Rec::Cand(c)) = old {
            let owner = Owner::Node(cname.clone(), kname.clone());
            for cidr in c.cidrs.iter() {
                self.index.remove(cidr, &owner);
            }
            if c.accepted {
                if let Some(cl) = self.clusters.get_mut(cluster) {
                    cl.accepted -= 1;
                }
                self.routes -= c.cidrs.len();
                w.touched.extend(c.cidrs.iter().copied());
                old_accepted = Some(c.cidrs.clone());
            }
            self.touch_neighbours(w, &c.cidrs, None);
        }
        let entry = remotes
            .get(cluster)
            .filter(|r| r.synced_once)
            .and_then(|r| r.entries.get(key));
        let (Some(entry), Some(cstate)) = (entry, states.get(cluster)) else {
            return;
        };
        let rec = match entry_static(&self.local, cluster, key, entry, cstate) {
            Ok(None) => Rec::Cluster,
            Err(r) => Rec::Rejected(Box::new(r)),
            Ok(Some(data)) => {
                let node = node_of(key);
                let p = data.pod_cidrs.iter().any(|c| {
                    old_accepted.as_ref().is_some_and(|o| o.contains(c))
                        || seed.and_then(|s| s.get(c)).is_some_and(|r| r.node == node)
                });
                let owner = Owner::Node(cname.clone(), kname.clone());
                for cidr in data.pod_cidrs.iter() {
                    self.index.insert(*cidr, owner.clone());
                }
                Rec::Cand(Cand {
                    p,
                    accepted: false,
                    create_revision: entry.create_revision,
                    cidrs: data.pod_cidrs.clone(),
                    reason: None,
                })
            }
        };
        let is_cand = matches!(rec, Rec::Cand(_));
        if let Some(cl) = self.clusters.get_mut(cluster) {
            cl.recs.insert(kname, rec);
        }
        if is_cand {
            self.mark(w, id, true);
        }
    }

    /// The first owner (seed or accepted candidate other than `me`) overlapping
    /// `cidr`; with `before`, only candidates ahead of `me` in newcomer order.
    fn first_owner<'s>(
        &'s self,
        cidr: &IpNet,
        me: &Id,
        before: Option<&(bool, i64, Name, Name)>,
    ) -> Option<(IpNet, &'s str, &'s str)> {
        self.index
            .overlapping(cidr)
            .into_iter()
            .find_map(|(o, owner)| match owner {
                Owner::Seed(c, n) => Some((o, &**c, &**n)),
                Owner::Node(c, k) if !(*c == me.0 && *k == me.1) => {
                    let d = self.cand(c, k)?;
                    if !d.accepted {
                        return None;
                    }
                    if let Some(b) = before
                        && (!d.p, d.create_revision, c, k) >= (b.0, b.1, &b.2, &b.3)
                    {
                        return None;
                    }
                    Some((o, &**c, node_of(k)))
                }
                Owner::Node(..) => None,
            })
    }

    fn reject_reason(
        &self,
        id: &Id,
        before: Option<&(bool, i64, Name, Name)>,
    ) -> Option<Rejection> {
        let c = self.cand(&id.0, &id.1)?;
        conflict(
            &id.0,
            node_of(&id.1),
            &c.cidrs,
            c.p,
            &self.declared,
            |cidr| self.first_owner(cidr, id, before),
        )
    }

    /// Called before the cache forgets `cluster` (with its entries still in
    /// `remotes`): remembers its routes until the next step.
    pub fn detach(&mut self, cluster: &str, remotes: &BTreeMap<String, RemoteEntries>) {
        let Some(cl) = self.clusters.get(cluster) else {
            return;
        };
        if self.detached.contains_key(cluster) {
            return;
        }
        let mut routes = cl.seed.clone();
        for rec in cl.recs.values() {
            if let Rec::Cand(c) = rec
                && c.accepted
            {
                for cidr in c.cidrs.iter() {
                    if let Some(r) = self.route_at(remotes, cidr) {
                        routes.insert(*cidr, r);
                    }
                }
            }
        }
        self.detached.insert(cluster.to_string(), routes);
    }

    fn rejection(&self, id: &Id) -> Option<Rejection> {
        let cl = self.clusters.get(&*id.0)?;
        match cl.recs.get(&*id.1)? {
            Rec::Cluster => cl.state.as_ref()?.as_ref().err().cloned(),
            Rec::Rejected(r) => Some((**r).clone()),
            Rec::Cand(c) => c.reason.as_deref().cloned(),
        }
    }

    fn remove_cluster(&mut self, w: &mut Work, name: &str) {
        self.drop_seed(w, name);
        let Some(cl) = self.clusters.get(name) else {
            return;
        };
        let cname = cl.name.clone();
        let keys: Vec<Name> = cl.recs.keys().cloned().collect();
        for k in keys {
            let Some(Rec::Cand(c)) = self
                .clusters
                .get_mut(name)
                .and_then(|cl| cl.recs.remove(&k))
            else {
                continue;
            };
            let owner = Owner::Node(cname.clone(), k.clone());
            for cidr in c.cidrs.iter() {
                self.index.remove(cidr, &owner);
            }
            if c.accepted {
                self.routes -= c.cidrs.len();
                w.touched.extend(c.cidrs.iter().copied());
            }
            self.touch_neighbours(w, &c.cidrs, Some(name));
        }
        if let Some(cl) = self.clusters.remove(name)
            && let Some(Ok(rec)) = cl.state
        {
            for d in &rec.pod_cidrs {
                self.declared.remove(d, &cname);
                self.touch_neighbours(w, &[*d], Some(name));
            }
        }
        w.snaps.retain(|id, _| *id.0 != *name);
        w.reason.retain(|id| *id.0 != *name);
    }

    /// Every record of the synced remotes with its outcome, as `/status` lists them.
    pub fn records(&self, remotes: &BTreeMap<String, RemoteEntries>) -> Vec<RecordOutcome> {
        self.records_of(remotes, None)
    }

    /// [`Live::records`] of one remote cluster, or of all with `None`.
    pub fn records_of(
        &self,
        remotes: &BTreeMap<String, RemoteEntries>,
        cluster: Option<&str>,
    ) -> Vec<RecordOutcome> {
        let mut out = Vec::new();
        for (name, rem) in remotes
            .iter()
            .filter(|(n, r)| r.synced_once && cluster.is_none_or(|c| c == n.as_str()))
        {
            let Some(cl) = self.clusters.get(name).filter(|c| c.synced) else {
                continue;
            };
            for (key, entry) in &rem.entries {
                let state = match cl.recs.get(key.as_str()) {
                    None => continue,
                    Some(Rec::Cluster) => match &cl.state {
                        Some(Ok(_)) => RecordState::Programmed,
                        Some(Err(r)) => RecordState::Rejected(r.clone()),
                        None => continue,
                    },
                    Some(Rec::Rejected(r)) => RecordState::Rejected((**r).clone()),
                    Some(Rec::Cand(c)) if c.accepted => RecordState::Programmed,
                    Some(Rec::Cand(c)) => match &c.reason {
                        Some(r) => RecordState::Rejected((**r).clone()),
                        None => continue,
                    },
                };
                out.push(outcome_row(name, key, entry, state));
            }
        }
        out
    }

    /// The desired route for exactly `cidr`, if any.
    pub fn route_at(
        &self,
        remotes: &BTreeMap<String, RemoteEntries>,
        cidr: &IpNet,
    ) -> Option<RemoteRoute> {
        self.index.get(cidr).iter().find_map(|o| match o {
            Owner::Seed(c, _) => self.clusters.get(&**c)?.seed.get(cidr).cloned(),
            Owner::Node(c, k) => {
                if !self.cand(c, k)?.accepted {
                    return None;
                }
                match &remotes.get(&**c)?.entries.get(&**k)?.decoded {
                    Decoded::Node(n) => {
                        Some(route_of(c, node_of(k), *cidr, n, self.local.underlay))
                    }
                    _ => None,
                }
            }
        })
    }

    /// Every desired route, by CIDR.
    pub fn routes(
        &self,
        remotes: &BTreeMap<String, RemoteEntries>,
    ) -> BTreeMap<IpNet, RemoteRoute> {
        self.routes_of(remotes, None)
    }

    /// [`Live::routes`] of one remote cluster, or of all with `None`.
    pub fn routes_of(
        &self,
        remotes: &BTreeMap<String, RemoteEntries>,
        cluster: Option<&str>,
    ) -> BTreeMap<IpNet, RemoteRoute> {
        let mut out = BTreeMap::new();
        for (cidr, o) in self.index.iter() {
            let owner = match o {
                Owner::Seed(c, _) | Owner::Node(c, _) => &**c,
            };
            if cluster.is_some_and(|c| c != owner) {
                continue;
            }
            let r = match o {
                Owner::Seed(c, _) => self
                    .clusters
                    .get(&**c)
                    .and_then(|cl| cl.seed.get(&cidr).cloned()),
                Owner::Node(c, k) => self.cand(c, k).filter(|d| d.accepted).and_then(|_| {
                    match &remotes.get(&**c)?.entries.get(&**k)?.decoded {
                        Decoded::Node(n) => {
                            Some(route_of(c, node_of(k), cidr, n, self.local.underlay))
                        }
                        _ => None,
                    }
                }),
            };
            if let Some(r) = r {
                out.insert(cidr, r);
            }
        }
        out
    }
}

mod step;
#[cfg(test)]
mod tests;
