//! The reconciler: on every change of the remote entries (and periodically),
//! computes the desired state, diffs it against what was applied, drives the
//! [`Datapath`], and reports records and rejections in the status.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    datapath::{Datapath, DatapathError, RemoteRoute},
    desired::{self, LocalRanges, RecordState},
    remote::MeshCache,
    status::Status,
};

/// What the reconciler should do next, kube-rs style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wait for the next change (or the periodic resync).
    AwaitChange,
    /// Try again after this delay (the datapath failed).
    RequeueAfter(Duration),
}

/// The reconciler's state.
#[derive(Debug)]
pub struct Reconciler<D> {
    datapath: D,
    local: LocalRanges,
    cache: MeshCache,
    status: Status,
    /// What was last applied successfully (the datapath's state as far as we know).
    applied: Arc<BTreeMap<IpNet, RemoteRoute>>,
    /// Rejections already logged, so each is logged once.
    logged: BTreeSet<(String, String)>,
}

impl<D: Datapath> Reconciler<D> {
    /// A reconciler over `datapath`.
    pub fn new(datapath: D, local: LocalRanges, cache: MeshCache, status: Status) -> Self {
        Self {
            datapath,
            local,
            cache,
            status,
            applied: Arc::default(),
            logged: BTreeSet::new(),
        }
    }

    /// Reads back what the datapath holds, so that a restart continues from
    /// the kernel's state (forwarding survived the restart) rather than from nothing.
    pub async fn adopt_installed(&mut self) -> Result<(), DatapathError> {
        let installed = self.datapath.installed().await?;
        self.applied = Arc::new(installed.into_iter().map(|r| (r.cidr, r)).collect());
        Ok(())
    }

    /// One pass: desired state, diff, apply; `full` also re-applies everything and prunes.
    pub async fn reconcile(&mut self, full: bool) -> Action {
        let mut d = self
            .cache
            .with(|remotes| desired::desired(&self.local, remotes, &self.applied));
        let ops = desired::diff(&self.applied, &d.routes);
        let result = async {
            if !ops.delete.is_empty() {
                self.datapath.delete(&ops.delete).await?;
            }
            if full {
                let all: Vec<RemoteRoute> = d.routes.values().cloned().collect();
                self.datapath.upsert(&all).await?;
                let keep: BTreeSet<IpNet> = d.routes.keys().copied().collect();
                let pruned = self.datapath.prune(&keep).await?;
                if !pruned.removed.is_empty() {
                    tracing::info!(
                        removed = pruned.removed.len(),
                        "resync pruned routes podmesh no longer wants"
                    );
                }
            } else if !ops.upsert.is_empty() {
                self.datapath.upsert(&ops.upsert).await?;
            }
            Ok::<(), DatapathError>(())
        }
        .await;
        let action = match &result {
            Ok(()) => {
                self.applied = Arc::new(std::mem::take(&mut d.routes));
                Action::AwaitChange
            }
            Err(e) => {
                tracing::error!(error = %e, "programming the datapath failed; retrying with a full resync");
                Action::RequeueAfter(Duration::from_secs(1))
            }
        };
        // Log each rejection once, with its hint.
        let mut now_rejected = BTreeSet::new();
        let mut newly: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (rec, why) in d.rejected() {
            let id = (rec.key.clone(), why.code.clone());
            if !self.logged.contains(&id) {
                tracing::warn!(cluster = %rec.cluster, key = %rec.key, reason = %why.code, "remote record rejected: {}", why.message);
                *newly
                    .entry(rec.cluster.clone())
                    .or_default()
                    .entry(why.code.clone())
                    .or_default() += 1;
            }
            now_rejected.insert(id);
        }
        self.logged = now_rejected;
        // Report.
        let mut per: BTreeMap<String, (usize, BTreeMap<String, usize>)> = BTreeMap::new();
        for r in &d.records {
            let e = per.entry(r.cluster.clone()).or_default();
            match &r.state {
                RecordState::Programmed if r.kind == "node" => e.0 += 1,
                RecordState::Programmed => {}
                RecordState::Rejected(j) => *e.1.entry(j.code.clone()).or_default() += 1,
            }
        }
        let entries: BTreeMap<String, usize> = self.cache.with(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.entries.len()))
                .collect()
        });
        self.status.set_routes(self.applied.clone());
        let error = result.err().map(|e| e.to_string());
        // The full record list is handed over without copying; `/status` splits it per remote.
        self.status.set_records(std::sync::Arc::new(d.records));
        self.status.update(|s| {
            for (name, rs) in s.remotes.iter_mut() {
                let (programmed, rejected) = per.remove(name.as_str()).unwrap_or_default();
                rs.entries = entries.get(name).copied().unwrap_or(0);
                rs.nodes_programmed = programmed;
                rs.rejected_by_reason = rejected;
                rs.records.clear();
            }
            for (cluster, by) in newly {
                let t = s.rejections_total.entry(cluster).or_default();
                for (reason, n) in by {
                    *t.entry(reason).or_default() += n;
                }
            }
            s.routes_installed = self.applied.len();
            s.datapath_error = error;
        });
        action
    }

    /// Runs forever: reconcile on change, full resync every `resync`.
    pub async fn run(mut self, resync: Duration) {
        if let Err(e) = self.adopt_installed().await {
            tracing::warn!(error = %e, "cannot read back the installed routes; starting from an empty view (the first resync prunes leftovers)");
        }
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full = true;
        loop {
            match self.reconcile(full).await {
                Action::AwaitChange => {
                    full = false;
                    tokio::select! {
                        () = self.cache.changed() => {}
                        _ = tick.tick() => full = true,
                    }
                }
                Action::RequeueAfter(d) => {
                    full = true;
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}
