//! The desired-state store: every remote cluster's decoded entries (written
//! by the remote connections, `crate::remote`) and the incremental desired state
//! ([`Live`]) the reconciler steps over them.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use super::{
    Entry, LocalRanges, RemoteEntries,
    live::{Dirty, Live, Step},
};

#[derive(Debug, Default)]
struct Inner {
    remotes: BTreeMap<String, RemoteEntries>,
    /// Keys of synced remotes changed since the engine last stepped (a set:
    /// a burst of changes to one key costs one re-validation).
    dirty: Dirty,
    /// The incremental desired state, once the reconciler installed it.
    live: Option<Live>,
}

impl Inner {
    fn mark(&mut self, cluster: &str, key: &str) {
        if self.live.is_some() && self.remotes.get(cluster).is_some_and(|r| r.synced_once) {
            let d = self.dirty.entry(cluster.to_string()).or_default();
            if !d.contains(key) {
                d.insert(key.to_string());
            }
        }
    }
}

/// Every remote cluster's decoded entries, shared by the connections (writers)
/// and the reconciler (which steps the incremental desired state over them),
/// with a notification on every change.
#[derive(Clone, Debug, Default)]
pub struct MeshCache {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

impl MeshCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("mesh cache lock")
    }

    /// Waits until something changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Wakes the reconciler.
    pub fn notify(&self) {
        self.changed.notify_one();
    }

    /// Runs `f` on all remotes' entries.
    pub fn with<T>(&self, f: impl FnOnce(&BTreeMap<String, RemoteEntries>) -> T) -> T {
        f(&self.lock().remotes)
    }

    /// Installs the incremental desired state the reconciler steps.
    pub fn install(&self, live: Live) {
        let mut g = self.lock();
        g.dirty.clear();
        g.live = Some(live);
    }

    /// Replaces the local ranges the desired state validates against (this
    /// node changed) and wakes the reconciler; the next step re-validates
    /// every record. Returns whether they changed (false also before the
    /// reconciler installed the desired state, which then starts from its own).
    pub fn set_local(&self, local: LocalRanges) -> bool {
        let changed = self
            .lock()
            .live
            .as_mut()
            .is_some_and(|l| l.set_local(local));
        if changed {
            self.notify();
        }
        changed
    }

    /// Steps the desired state over everything changed since the last step.
    pub fn step(&self) -> Option<Step> {
        let mut g = self.lock();
        let Inner {
            remotes,
            dirty,
            live,
        } = &mut *g;
        let dirty = std::mem::take(dirty);
        live.as_mut().map(|l| l.step(remotes, dirty))
    }

    /// Runs `f` on the desired state and the entries (status, resync).
    pub fn with_live<T>(
        &self,
        f: impl FnOnce(&Live, &BTreeMap<String, RemoteEntries>) -> T,
    ) -> Option<T> {
        let g = self.lock();
        g.live.as_ref().map(|l| f(l, &g.remotes))
    }

    /// Makes `cluster` known (not yet synced): what is programmed for it is kept until it syncs.
    pub fn register(&self, cluster: &str) {
        self.lock().remotes.entry(cluster.to_string()).or_default();
    }

    /// Starts a new list of `cluster`; returns its generation.
    pub fn begin_list(&self, cluster: &str) -> u64 {
        let mut g = self.lock();
        let r = g.remotes.entry(cluster.to_string()).or_default();
        r.generation += 1;
        r.generation
    }

    /// Stores `entry` under `key` of `cluster`, seen in list generation `generation`.
    pub fn put(&self, cluster: &str, generation: u64, key: String, entry: Entry) {
        self.put_batch(cluster, generation, vec![(key, entry)]);
    }

    /// Stores a batch of entries of `cluster` seen in list generation
    /// `generation` (a page of its list): a large batch is merged with full
    /// B-tree nodes ([`crate::compact`]).
    pub fn put_batch(&self, cluster: &str, generation: u64, mut batch: Vec<(String, Entry)>) {
        if batch.is_empty() {
            return;
        }
        let mut g = self.lock();
        for (key, entry) in &mut batch {
            entry.generation = generation;
            g.mark(cluster, key);
        }
        let entries = &mut g.remotes.entry(cluster.to_string()).or_default().entries;
        crate::compact::extend(entries, batch);
    }

    /// Removes `key` of `cluster`.
    pub fn delete(&self, cluster: &str, key: &str) {
        let mut g = self.lock();
        let removed = g
            .remotes
            .get_mut(cluster)
            .is_some_and(|r| r.entries.remove(key).is_some());
        if removed {
            g.mark(cluster, key);
        }
    }

    /// (entries seen in `generation`, entries held) of `cluster`.
    pub fn counts(&self, cluster: &str, generation: u64) -> (usize, usize) {
        let g = self.lock();
        g.remotes.get(cluster).map_or((0, 0), |r| {
            (
                r.entries
                    .values()
                    .filter(|e| e.generation >= generation)
                    .count(),
                r.entries.len(),
            )
        })
    }

    /// Marks `cluster` complete and removes its entries not seen since `generation` began.
    pub fn prune_stale(&self, cluster: &str, generation: u64) -> usize {
        let mut g = self.lock();
        let Some(r) = g.remotes.get_mut(cluster) else {
            return 0;
        };
        r.synced_once = true;
        let stale: Vec<String> = r
            .entries
            .iter()
            .filter(|(_, e)| e.generation < generation)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            r.entries.remove(k);
        }
        for k in &stale {
            g.mark(cluster, k);
        }
        stale.len()
    }

    /// Marks `cluster` complete without pruning (grace period).
    pub fn mark_synced(&self, cluster: &str) {
        if let Some(r) = self.lock().remotes.get_mut(cluster) {
            r.synced_once = true;
        }
    }

    /// Forgets `cluster` entirely (removed from the Secret: drain).
    pub fn remove(&self, cluster: &str) {
        let mut g = self.lock();
        let Inner { remotes, live, .. } = &mut *g;
        if let Some(l) = live {
            l.detach(cluster, remotes);
        }
        g.remotes.remove(cluster);
        g.dirty.remove(cluster);
    }
}
