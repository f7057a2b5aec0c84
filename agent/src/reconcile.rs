//! The reconciler: on every change of the remote entries (and periodically),
//! steps the incremental desired state, hands its delta to the [`Datapath`],
//! and reports records and rejections in the status.
//!
//! Bursts coalesce without a timer: changes that arrive while a step or the
//! datapath is busy are collected as a set of changed keys and taken by the
//! next step as one batch, so a single update at a low rate is applied at
//! once and 100 updates/s cost a few steps, not 100 full recomputations.
use std::{collections::BTreeSet, time::Duration};

use ipnet::IpNet;
use tokio::sync::watch;

use crate::{
    datapath::{Datapath, DatapathError, RemoteRoute},
    desired::{LocalRanges, MeshCache, live::Live},
    status::{MeshView, Status},
};

/// Routes per datapath call in a full resync, so that a resync of 100k routes
/// never holds them all in memory at once.
const RESYNC_CHUNK: usize = 4096;

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
    installed: Option<Vec<RemoteRoute>>,
    /// New local ranges as this node changes (a Node from Kubernetes gets or
    /// changes its Pod CIDRs and addresses while the agent runs).
    local_updates: Option<watch::Receiver<LocalRanges>>,
}

/// The next local ranges `updates` reports; pending forever without a
/// source, or once it ended (the last ranges stay).
async fn next_local(updates: &mut Option<watch::Receiver<LocalRanges>>) -> LocalRanges {
    if let Some(rx) = updates
        && rx.changed().await.is_ok()
    {
        return rx.borrow_and_update().clone();
    }
    *updates = None;
    std::future::pending().await
}

impl<D: Datapath> Reconciler<D> {
    /// A reconciler over `datapath`.
    pub fn new(datapath: D, local: LocalRanges, cache: MeshCache, status: Status) -> Self {
        let mesh = cache.clone();
        status.set_mesh_source(move || {
            mesh.with_live(|l, remotes| MeshView {
                records: l.records(remotes),
                routes: l.routes(remotes).values().map(Into::into).collect(),
            })
        });
        Self {
            datapath,
            local,
            cache,
            status,
            installed: None,
            local_updates: None,
        }
    }

    /// Validates remote records against the local ranges `updates` holds,
    /// now and whenever they change.
    pub fn follow_local(mut self, mut updates: watch::Receiver<LocalRanges>) -> Self {
        let now = updates.borrow_and_update().clone();
        self.set_local(now);
        self.local_updates = Some(updates);
        self
    }

    /// Validates remote records against `local` from the next pass on: a
    /// remote range that now overlaps a local one is withdrawn and reported.
    pub fn set_local(&mut self, local: LocalRanges) {
        if local == self.local {
            return;
        }
        tracing::info!(
            pod_cidrs = ?local.pod,
            addresses = ?local.node,
            "this node's Pod CIDRs or addresses changed; validating every remote record against them"
        );
        self.cache.set_local(local.clone());
        self.local = local;
    }

    /// Reads back what the datapath holds, so that a restart continues from
    /// the kernel's state (forwarding survived the restart) rather than from nothing.
    pub async fn adopt_installed(&mut self) -> Result<(), DatapathError> {
        self.installed = Some(self.datapath.installed().await?);
        Ok(())
    }

    async fn resync(&mut self) -> Result<(), DatapathError> {
        if let Some(what) = self.datapath.repair().await? {
            tracing::warn!(
                "{what} while podmesh ran; set it up again, re-installing every route \
                 (is another tool managing podmesh's devices?)"
            );
        }
        let keep: BTreeSet<IpNet> = self
            .cache
            .with_live(|l, r| l.routes(r).into_keys().collect())
            .unwrap_or_default();
        let cidrs: Vec<IpNet> = keep.iter().copied().collect();
        for chunk in cidrs.chunks(RESYNC_CHUNK) {
            let routes: Vec<RemoteRoute> = self
                .cache
                .with_live(|l, r| chunk.iter().filter_map(|c| l.route_at(r, c)).collect())
                .unwrap_or_default();
            self.datapath.upsert(&routes).await?;
        }
        let pruned = self.datapath.prune(&keep).await?;
        if !pruned.removed.is_empty() {
            tracing::info!(
                removed = pruned.removed.len(),
                "resync pruned routes podmesh no longer wants"
            );
        }
        Ok(())
    }

    /// One pass: step the desired state, apply its delta; `full` also
    /// re-applies everything and prunes.
    pub async fn reconcile(&mut self, full: bool) -> Action {
        if let Some(installed) = self.installed.take() {
            self.cache.install(Live::new(self.local.clone(), installed));
        } else if self.cache.with_live(|_, _| ()).is_none() {
            self.cache
                .install(Live::new(self.local.clone(), Vec::new()));
        }
        let step = self.cache.step().unwrap_or_default();
        let result = async {
            if !step.ops.delete.is_empty() {
                self.datapath.delete(&step.ops.delete).await?;
            }
            if full {
                self.resync().await?;
            } else if !step.ops.upsert.is_empty() {
                self.datapath.upsert(&step.ops.upsert).await?;
            }
            Ok::<(), DatapathError>(())
        }
        .await;
        let action = match &result {
            Ok(()) => Action::AwaitChange,
            Err(e) => {
                tracing::error!(error = %e, "programming the datapath failed; retrying with a full resync");
                Action::RequeueAfter(Duration::from_secs(1))
            }
        };
        // Log each rejection once, with its hint.
        for (cluster, key, why) in &step.newly_rejected {
            tracing::warn!(cluster = %cluster, key = %key, reason = %why.code, "remote record rejected: {}", why.message);
        }
        let per = self
            .cache
            .with_live(|l, remotes| {
                remotes
                    .iter()
                    .map(|(k, v)| (k.clone(), (v.entries.len(), l.counts(k))))
                    .collect::<std::collections::BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        let routes = self
            .cache
            .with_live(|l, _| l.route_count())
            .unwrap_or_default();
        let error = result.err().map(|e| e.to_string());
        self.status.update(|s| {
            for (name, rs) in s.remotes.iter_mut() {
                let (entries, counts) = per.get(name.as_str()).cloned().unwrap_or_default();
                rs.entries = entries;
                rs.nodes_programmed = counts.nodes_programmed;
                rs.rejected_by_reason = counts.rejected_by_reason;
            }
            for (cluster, _, why) in &step.newly_rejected {
                *s.rejections_total
                    .entry(cluster.clone())
                    .or_default()
                    .entry(why.code.clone())
                    .or_default() += 1;
            }
            s.routes_installed = routes;
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
                        () = self.cache.changed() => {
                            // Let connections that are ready too add their changes to this batch.
                            tokio::task::yield_now().await;
                        }
                        _ = tick.tick() => full = true,
                        local = next_local(&mut self.local_updates) => self.set_local(local),
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
