//! [`Live::step`], in the order it runs: settle last step's flips, follow the
//! clusters' lifecycle and re-derive changed records, decide acceptance in
//! newcomer order, refresh the reasons of rejected records, then hand out the
//! delta and the records that became rejected.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;

use super::{Class, Dirty, Id, Live, LiveCluster, Name, Owner, Rec, Step, Work};
use crate::{
    datapath::RemoteRoute,
    desired::{Ops, Rejection, RemoteEntries, cluster_states, node_of},
    model::ClusterRecord,
};

/// Routes installed before a cluster synced, by cluster: they seed its index.
type Seeds = BTreeMap<String, BTreeMap<IpNet, RemoteRoute>>;

impl Live {
    /// Applies the changes of `dirty` (and of the remotes' lifecycle, found by
    /// comparing with `remotes`) and returns the delta for the datapath.
    pub fn step(&mut self, remotes: &BTreeMap<String, RemoteEntries>, dirty: Dirty) -> Step {
        let mut w = Work::default();
        self.settle_flips(&mut w);
        let mut seeds = self.claim_orphans(&mut w, remotes);
        self.follow_clusters(&mut w, remotes, &dirty, &mut seeds);
        self.decide_acceptance(&mut w);
        self.refresh_reasons(&mut w);
        let ops = self.delta(&w, remotes);
        let newly_rejected = self.outcomes(&mut w);
        Step {
            ops,
            newly_rejected,
        }
    }

    /// 0. Last step's flips become this step's existing owners (or newcomers).
    fn settle_flips(&mut self, w: &mut Work) {
        for id in std::mem::take(&mut self.flipped) {
            let cidrs = match self
                .clusters
                .get_mut(&*id.0)
                .and_then(|cl| cl.recs.get_mut(&*id.1))
            {
                // Acceptance cannot change by this alone (the accepted set is
                // also the greedy choice in the new order); a rejected one is now
                // a newcomer, which changes the checks its reason comes from.
                Some(Rec::Cand(c)) if c.p != c.accepted => {
                    c.p = c.accepted;
                    c.accepted
                }
                _ => continue,
            };
            if !cidrs {
                self.mark(w, id, false);
            }
        }
    }

    /// 1a. The routes installed at start, and those of clusters the cache
    /// forgot since the last step, by the configured cluster they seed;
    /// routes of clusters not configured are withdrawn.
    fn claim_orphans(&mut self, w: &mut Work, remotes: &BTreeMap<String, RemoteEntries>) -> Seeds {
        let mut orphans_by = Seeds::new();
        if let Some(o) = self.orphans.take() {
            for r in o {
                if remotes.contains_key(&r.cluster) {
                    orphans_by
                        .entry(r.cluster.clone())
                        .or_default()
                        .insert(r.cidr, r);
                } else {
                    w.touched.insert(r.cidr);
                }
            }
        }
        for (name, routes) in std::mem::take(&mut self.detached) {
            self.remove_cluster(w, &name);
            if remotes.contains_key(&name) {
                orphans_by.entry(name).or_default().extend(routes);
            }
        }
        orphans_by
    }

    /// 1b. Cluster lifecycle and cluster records: clusters gone are removed,
    /// new ones seeded, and the records of each synced cluster re-derived
    /// (all of them when the cluster synced, its state or the local ranges
    /// changed; else the dirty ones).
    fn follow_clusters(
        &mut self,
        w: &mut Work,
        remotes: &BTreeMap<String, RemoteEntries>,
        dirty: &Dirty,
        seeds: &mut Seeds,
    ) {
        let states = {
            let clusters = &self.clusters;
            cluster_states(&self.local, remotes, |n| {
                clusters
                    .get(n)
                    .is_some_and(|c| c.accepted > 0 || !c.seed.is_empty())
                    || seeds.contains_key(n)
            })
        };
        let revalidate = std::mem::take(&mut self.revalidate);
        let gone: Vec<String> = self
            .clusters
            .keys()
            .filter(|n| !remotes.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.remove_cluster(w, &name);
        }
        for (name, rem) in remotes {
            if !self.clusters.contains_key(name) {
                let seed = seeds.remove(name).unwrap_or_default();
                self.add_cluster(w, name, seed);
            }
            let mut all = revalidate;
            let mut seed = None;
            if rem.synced_once && !self.clusters[name].synced {
                seed = Some(self.drop_seed(w, name));
                if let Some(cl) = self.clusters.get_mut(name) {
                    cl.synced = true;
                }
                all = true;
            }
            if self.update_cluster_state(w, name, states.get(name.as_str())) {
                all = true;
            }
            if !self.clusters[name].synced {
                continue;
            }
            let keys: Vec<String> = if all {
                let mut k: BTreeSet<String> = self.clusters[name]
                    .recs
                    .keys()
                    .map(|k| k.to_string())
                    .collect();
                k.extend(rem.entries.keys().cloned());
                k.into_iter().collect()
            } else {
                dirty
                    .get(name)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default()
            };
            for key in keys {
                self.rederive(w, remotes, &states, name, &key, seed.as_ref());
            }
        }
    }

    /// A cluster seen for the first time, holding `seed` (its routes
    /// installed before) until it completes a list.
    fn add_cluster(&mut self, w: &mut Work, name: &str, seed: BTreeMap<IpNet, RemoteRoute>) {
        let cname: Name = name.into();
        for r in seed.values() {
            self.index
                .insert(r.cidr, Owner::Seed(cname.clone(), r.node.as_str().into()));
            self.routes += 1;
            w.touched.insert(r.cidr);
        }
        self.clusters.insert(
            name.to_string(),
            LiveCluster {
                name: cname,
                synced: false,
                state: None,
                recs: HashMap::new(),
                accepted: 0,
                seed,
                nodes_programmed: 0,
                by_reason: BTreeMap::new(),
            },
        );
    }

    /// Takes the new state of `name`'s cluster record, moving its declared
    /// Pod CIDRs; returns whether it changed (every record is then re-derived).
    fn update_cluster_state(
        &mut self,
        w: &mut Work,
        name: &str,
        new_state: Option<&Result<&ClusterRecord, Rejection>>,
    ) -> bool {
        let same = match (&self.clusters[name].state, new_state) {
            (None, None) => true,
            (Some(Ok(a)), Some(Ok(b))) => a == *b,
            (Some(Err(a)), Some(Err(b))) => a == b,
            _ => false,
        };
        if same {
            return false;
        }
        let cl = &self.clusters[name];
        let cname = cl.name.clone();
        let ids: Vec<Id> = cl.recs.keys().map(|k| (cname.clone(), k.clone())).collect();
        for id in &ids {
            self.snap(w, id);
        }
        let old = self.clusters.get_mut(name).and_then(|cl| cl.state.take());
        if let Some(Ok(rec)) = old {
            for d in &rec.pod_cidrs {
                self.declared.remove(d, &cname);
                self.touch_neighbours(w, &[*d], Some(name));
            }
        }
        let new_owned = new_state.map(|s| s.clone().cloned());
        if let Some(Ok(rec)) = &new_owned {
            for d in &rec.pod_cidrs {
                self.declared.insert(*d, cname.clone());
                self.touch_neighbours(w, &[*d], Some(name));
            }
        }
        if let Some(cl) = self.clusters.get_mut(name) {
            cl.state = new_owned;
        }
        true
    }

    /// 2. Acceptance, in newcomer order; a flip queues the later neighbours.
    fn decide_acceptance(&mut self, w: &mut Work) {
        while let Some(item) = w.queue.pop_first() {
            let id: Id = (item.2.clone(), item.3.clone());
            if self.sigma(&id.0, &id.1).as_ref() != Some(&item) {
                continue; // re-keyed or gone since it was queued
            }
            self.snap(w, &id);
            let accept = self.reject_reason(&id, Some(&item)).is_none();
            let Some(Rec::Cand(c)) = self
                .clusters
                .get_mut(&*id.0)
                .and_then(|cl| cl.recs.get_mut(&*id.1))
            else {
                continue;
            };
            w.reason.insert(id.clone());
            w.evaluated.push(id.clone());
            if accept == c.accepted {
                continue;
            }
            c.accepted = accept;
            let cidrs = c.cidrs.clone();
            if let Some(cl) = self.clusters.get_mut(&*id.0) {
                if accept {
                    cl.accepted += 1;
                } else {
                    cl.accepted -= 1;
                }
            }
            if accept {
                self.routes += cidrs.len();
            } else {
                self.routes -= cidrs.len();
            }
            w.touched.extend(cidrs.iter().copied());
            for cidr in cidrs.iter() {
                for n in self.neighbours(cidr, None) {
                    if n == id {
                        continue;
                    }
                    let later = self.sigma(&n.0, &n.1).is_some_and(|s| s > item);
                    self.mark(w, n, later);
                }
            }
        }
    }

    /// Step 3: reasons of rejected candidates, against the final owners;
    /// candidates whose acceptance now differs from their `p` are re-keyed next step.
    fn refresh_reasons(&mut self, w: &mut Work) {
        let mut reasons: Vec<(Id, Option<Box<Rejection>>)> = Vec::new();
        for id in &w.reason {
            let Some(c) = self.cand(&id.0, &id.1) else {
                continue;
            };
            let r = if c.accepted {
                None
            } else {
                Some(Box::new(self.reject_reason(id, None).unwrap_or_else(
                    || {
                        Rejection::new(
                            crate::validate::code::POD_CIDR_OVERLAP,
                            format!(
                                "node {} of cluster {}: Pod CIDR conflict",
                                node_of(&id.1),
                                id.0
                            ),
                        )
                    },
                )))
            };
            reasons.push((id.clone(), r));
        }
        for (id, r) in reasons {
            if let Some(Rec::Cand(c)) = self
                .clusters
                .get_mut(&*id.0)
                .and_then(|cl| cl.recs.get_mut(&*id.1))
            {
                c.reason = r;
            }
        }
        for id in std::mem::take(&mut w.evaluated) {
            if self.cand(&id.0, &id.1).is_some_and(|c| c.p != c.accepted) {
                self.flipped.push(id);
            }
        }
        self.flipped.sort();
        self.flipped.dedup();
    }

    /// 4. The delta: every CIDR touched is upserted or deleted.
    fn delta(&self, w: &Work, remotes: &BTreeMap<String, RemoteEntries>) -> Ops {
        let mut ops = Ops::default();
        for cidr in &w.touched {
            match self.route_at(remotes, cidr) {
                Some(r) => ops.upsert.push(r),
                None => ops.delete.push(*cidr),
            }
        }
        ops
    }

    /// 5. Outcomes: counts, and what became rejected (sorted by cluster and key).
    fn outcomes(&mut self, w: &mut Work) -> Vec<(String, String, Rejection)> {
        let mut newly = Vec::new();
        for (id, old) in std::mem::take(&mut w.snaps) {
            let new = self.class(&id.0, &id.1);
            if new == old {
                continue;
            }
            let rejection = match &new {
                Some(Class::Rejected(_)) => self.rejection(&id),
                _ => None,
            };
            let Some(cl) = self.clusters.get_mut(&*id.0) else {
                continue;
            };
            for (c, delta) in [(&old, -1isize), (&new, 1)] {
                match c {
                    Some(Class::ProgrammedNode) => {
                        cl.nodes_programmed = cl.nodes_programmed.wrapping_add_signed(delta);
                    }
                    Some(Class::Rejected(code)) => {
                        let e = cl.by_reason.entry(code.clone()).or_default();
                        *e = e.wrapping_add_signed(delta);
                        if *e == 0 {
                            cl.by_reason.remove(code);
                        }
                    }
                    _ => {}
                }
            }
            if let Some(r) = rejection {
                newly.push((id.0.to_string(), id.1.to_string(), r));
            }
        }
        newly.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        newly
    }
}
