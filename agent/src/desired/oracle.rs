//! The reference the incremental [`super::live::Live`] is tested against:
//! the desired state recomputed from scratch, and the diff of two route sets.
//! Pure, and used only by tests.
use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use super::{
    Decoded, Entry, LocalRanges, NodeData, Ops, RecordOutcome, RecordState, Rejection,
    RemoteEntries, cluster_states, conflict, entry_static, node_of, outcome_row, route_of,
};
use crate::{datapath::RemoteRoute, model::cluster_key, validate::overlap::CidrIndex};

/// The outcome of [`desired`].
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Every route to program, by CIDR.
    pub routes: BTreeMap<IpNet, RemoteRoute>,
    /// Every remote record and what became of it, by (cluster, key).
    pub records: Vec<RecordOutcome>,
}

impl Desired {
    /// Rejected records.
    pub fn rejected(&self) -> impl Iterator<Item = (&RecordOutcome, &Rejection)> {
        self.records.iter().filter_map(|r| match &r.state {
            RecordState::Rejected(j) => Some((r, j)),
            RecordState::Programmed => None,
        })
    }
}

/// Computes the desired routes and every record's outcome from scratch. Pure.
///
/// `programmed` is what the datapath holds now (the previous desired state):
/// it decides who is the existing owner in a conflict. The agent runs the
/// incremental [`live::Live`], which must always agree with this function.
///
/// Acceptance is decided greedily in newcomer order (programmed records
/// first, then by create revision); a rejected record's reason is then told
/// against the final owners, so that it does not depend on the order in
/// which the records were looked at.
pub fn desired(
    local: &LocalRanges,
    remotes: &BTreeMap<String, RemoteEntries>,
    programmed: &BTreeMap<IpNet, RemoteRoute>,
) -> Desired {
    let mut out = Desired::default();
    let programmed_clusters: BTreeSet<&str> =
        programmed.values().map(|r| r.cluster.as_str()).collect();
    let cluster_state = cluster_states(local, remotes, |n| programmed_clusters.contains(n));

    // 1. Cluster records, and the declared Pod CIDRs of valid clusters (cold-start rule).
    let mut declared: CidrIndex<&str> = CidrIndex::new();
    for (name, st) in &cluster_state {
        let key = cluster_key(name);
        if let Some(e) = remotes[*name].entries.get(&key)
            && let Decoded::Cluster(_) = &e.decoded
        {
            let state = match st {
                Ok(_) => RecordState::Programmed,
                Err(r) => RecordState::Rejected(r.clone()),
            };
            out.records.push(outcome_row(name, &key, e, state));
        }
        if let Ok(v) = st {
            for c in &v.pod_cidrs {
                declared.insert(*c, *name);
            }
        }
    }

    // 2. Node records that pass the single-record checks.
    struct Candidate<'a> {
        cluster: &'a str,
        node: &'a str,
        key: &'a str,
        entry: &'a Entry,
        data: &'a NodeData,
        programmed: bool,
    }
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for (name, rem) in remotes.iter().filter(|(_, r)| r.synced_once) {
        let cstate = &cluster_state[name.as_str()];
        for (key, entry) in &rem.entries {
            match entry_static(local, name, key, entry, cstate) {
                Ok(None) => {}
                Err(r) => out
                    .records
                    .push(outcome_row(name, key, entry, RecordState::Rejected(r))),
                Ok(Some(data)) => {
                    let node = node_of(key);
                    let is_programmed = data.pod_cidrs.iter().any(|c| {
                        programmed
                            .get(c)
                            .is_some_and(|r| r.cluster == *name && r.node == node)
                    });
                    candidates.push(Candidate {
                        cluster: name,
                        node,
                        key,
                        entry,
                        data,
                        programmed: is_programmed,
                    });
                }
            }
        }
    }

    // 3. Conflicts: existing owners first, then newcomers by create revision.
    candidates.sort_by(|a, b| {
        (!a.programmed, a.entry.create_revision, a.cluster, a.key).cmp(&(
            !b.programmed,
            b.entry.create_revision,
            b.cluster,
            b.key,
        ))
    });
    let mut owners: CidrIndex<(&str, &str)> = CidrIndex::new();
    // A configured cluster that has not completed a list yet (agent restart,
    // remote unreachable since) keeps what is programmed for it: last known state.
    for r in programmed.values() {
        if remotes.get(&r.cluster).is_some_and(|x| !x.synced_once) {
            owners.insert(r.cidr, (r.cluster.as_str(), r.node.as_str()));
            out.routes.insert(r.cidr, r.clone());
        }
    }
    fn first<'a>(
        owners: &CidrIndex<(&'a str, &'a str)>,
        cidr: &IpNet,
    ) -> Option<(IpNet, &'a str, &'a str)> {
        owners
            .overlapping(cidr)
            .first()
            .map(|(o, (oc, on))| (*o, *oc, *on))
    }
    let mut rejected: Vec<(usize, Rejection)> = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        match conflict(
            c.cluster,
            c.node,
            &c.data.pod_cidrs,
            c.programmed,
            &declared,
            |cidr| first(&owners, cidr),
        ) {
            Some(r) => rejected.push((i, r)),
            None => {
                for cidr in c.data.pod_cidrs.iter() {
                    owners.insert(*cidr, (c.cluster, c.node));
                    out.routes.insert(
                        *cidr,
                        route_of(c.cluster, c.node, *cidr, c.data, local.underlay),
                    );
                }
                out.records.push(outcome_row(
                    c.cluster,
                    c.key,
                    c.entry,
                    RecordState::Programmed,
                ));
            }
        }
    }
    // 4. Each rejected record's reason, told against the final owners.
    for (i, first_reason) in rejected {
        let c = &candidates[i];
        let r = conflict(
            c.cluster,
            c.node,
            &c.data.pod_cidrs,
            c.programmed,
            &declared,
            |cidr| first(&owners, cidr),
        )
        .unwrap_or(first_reason);
        out.records.push(outcome_row(
            c.cluster,
            c.key,
            c.entry,
            RecordState::Rejected(r),
        ));
    }
    out.records
        .sort_by(|a, b| (&a.cluster, &a.key).cmp(&(&b.cluster, &b.key)));
    out
}

/// The diff from `installed` to `desired`. Pure.
pub fn diff(
    installed: &BTreeMap<IpNet, RemoteRoute>,
    desired: &BTreeMap<IpNet, RemoteRoute>,
) -> Ops {
    Ops {
        upsert: desired
            .iter()
            .filter(|(c, r)| installed.get(*c) != Some(*r))
            .map(|(_, r)| r.clone())
            .collect(),
        delete: installed
            .keys()
            .filter(|c| !desired.contains_key(*c))
            .copied()
            .collect(),
    }
}
