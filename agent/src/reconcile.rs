//! The reconciler: on every change of the remote entries (and periodically),
//! steps the incremental desired state, hands its delta to the [`Datapath`],
//! and reports records and rejections in the status.
//!
//! Bursts coalesce without a timer: changes that arrive while a step or the
//! datapath is busy are collected as a set of changed keys and taken by the
//! next step as one batch, so a single update at a low rate is applied at
//! once and 100 updates/s cost a few steps, not 100 full recomputations.
//!
//! Error policy, as kube-rs's `error_policy`: an entry the datapath refuses
//! becomes its record's rejection (`datapath-refused`, see [`refused`]) and
//! is not retried in a loop; any other failure is retried with a full resync
//! after a capped, jittered backoff (1 s → 30 s), counted in the status.
use std::{collections::BTreeSet, time::Duration};

use ipnet::IpNet;
use tokio::sync::watch;

use crate::{
    datapath::{Datapath, DatapathError, RemoteRoute},
    desired::{LocalRanges, MeshCache, Rejection, live::Live},
    remote::backoff::Backoff,
    status::{MeshView, Status},
};

pub mod refused;
pub mod report;
#[cfg(test)]
mod tests;

use refused::Refusals;

/// First delay after a failed pass.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest delay between retries; also the delay after a failure that
/// retrying cannot fix soon ([`DatapathError::is_transient`] is false).
pub const RETRY_CAP: Duration = Duration::from_secs(30);

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
    /// Entries the datapath refused.
    refusals: Refusals,
    /// Records refused in the current pass (logged and counted with the rejections).
    newly_refused: Vec<(String, String, Rejection)>,
    /// Delays between retries of failed passes.
    backoff: Backoff,
    /// Failed passes retried since start.
    retries: u64,
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
        let (mesh, refusals) = (cache.clone(), Refusals::default());
        let shown = refusals.clone();
        status.set_mesh_source(move |cluster| {
            let mut view = mesh.with_live(|l, remotes| MeshView {
                records: l.records_of(remotes, cluster),
                routes: l
                    .routes_of(remotes, cluster)
                    .values()
                    .map(Into::into)
                    .collect(),
            })?;
            shown.overlay(&mut view.records, &mut view.routes);
            Some(view)
        });
        Self {
            datapath,
            local,
            cache,
            status,
            installed: None,
            local_updates: None,
            refusals,
            newly_refused: Vec::new(),
            backoff: Backoff::new(RETRY_BASE, RETRY_CAP),
            retries: 0,
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
            self.upsert(&routes).await?;
        }
        let pruned = self.datapath.prune(&keep).await?;
        self.refusals.retain(&keep);
        if !pruned.removed.is_empty() {
            tracing::info!(
                removed = pruned.removed.len(),
                "resync pruned routes podmesh no longer wants"
            );
        }
        Ok(())
    }

    /// Upserts `routes`; entries the datapath refuses are recorded (the
    /// others went through), any other failure is returned.
    async fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        let refused = match self.datapath.upsert(routes).await {
            Ok(()) => Vec::new(),
            Err(DatapathError::Refused(refused)) => refused,
            Err(e) => return Err(e),
        };
        let newly = self.refusals.applied(routes, &refused);
        self.newly_refused.extend(newly);
        Ok(())
    }

    /// What to do after a failed pass: retry with a full resync after a
    /// backoff (at once at the cap for a failure retrying cannot fix soon).
    fn error_policy(&mut self, e: &DatapathError) -> Action {
        let delay = if e.is_transient() {
            self.backoff.next_delay()
        } else {
            RETRY_CAP
        };
        self.retries += 1;
        // Debug-escaped: the message may name remote nodes.
        tracing::error!(
            error = ?e.to_string(),
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "programming the datapath failed; retrying with a full resync"
        );
        Action::RequeueAfter(delay)
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
                self.refusals.forget(&step.ops.delete);
            }
            if full {
                self.resync().await?;
            } else if !step.ops.upsert.is_empty() {
                self.upsert(&step.ops.upsert).await?;
            }
            Ok::<(), DatapathError>(())
        }
        .await;
        let action = match &result {
            Ok(()) => {
                self.backoff.reset();
                Action::AwaitChange
            }
            Err(e) => self.error_policy(e),
        };
        // Log each new rejection once per cause, with its hint.
        let mut rejected = step.newly_rejected;
        rejected.append(&mut self.newly_refused);
        report::log_rejections(&rejected);
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
            .unwrap_or_default()
            .saturating_sub(self.refusals.len());
        let refused = self.refusals.nodes_by_cluster();
        let error = result.err().map(|e| e.to_string());
        let retries = self.retries;
        self.status.update(|s| {
            for (name, rs) in s.remotes.iter_mut() {
                let (entries, mut counts) = per.get(name.as_str()).cloned().unwrap_or_default();
                for (code, n) in refused.get(name.as_str()).into_iter().flatten() {
                    counts.nodes_programmed = counts.nodes_programmed.saturating_sub(*n);
                    *counts
                        .rejected_by_reason
                        .entry((*code).to_string())
                        .or_default() += n;
                }
                rs.entries = entries;
                rs.nodes_programmed = counts.nodes_programmed;
                rs.rejected_by_reason = counts.rejected_by_reason;
            }
            for (cluster, _, why) in &rejected {
                *s.rejections_total
                    .entry(cluster.clone())
                    .or_default()
                    .entry(why.code.clone())
                    .or_default() += 1;
            }
            s.routes_installed = routes;
            s.datapath_error = error;
            s.reconcile_retries = retries;
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
