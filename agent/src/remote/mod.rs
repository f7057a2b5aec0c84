//! Remote clusters: the Secret directory decides which exist; each gets a
//! connection lifecycle ([`cluster`]) that feeds its entries into the shared
//! [`MeshCache`], from which the reconciler computes the desired state.
//!
//! Lifecycle ("connect, back off, report") is split from what is done with a
//! connection (list + watch into the cache), as in Cilium's clustermesh.
use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    desired::{
        Entry, LocalRanges, RemoteEntries,
        live::{Dirty, Live, Step},
    },
    kvstore::{KvError, KvStore, client_config::EtcdClientConfig, etcd::EtcdStore},
    model::ClusterName,
    status::Status,
};

/// Reconnect backoff (shared with the etcd proxy).
pub use podmesh_plumbing::backoff;
pub mod cluster;
mod probe;
pub mod secret;

/// Opens a store for a remote cluster's client config.
pub trait Connector: Clone + Send + Sync + 'static {
    /// The store it opens.
    type Store: KvStore;
    /// Connects to `cluster` with `cfg` (read from `path`).
    fn connect(
        &self,
        cluster: &str,
        path: &Path,
        cfg: &EtcdClientConfig,
    ) -> impl Future<Output = Result<Self::Store, KvError>> + Send;
}

/// Connects to real etcd.
#[derive(Clone, Copy, Debug, Default)]
pub struct EtcdConnector;

impl Connector for EtcdConnector {
    type Store = EtcdStore;
    async fn connect(
        &self,
        _cluster: &str,
        path: &Path,
        cfg: &EtcdClientConfig,
    ) -> Result<EtcdStore, KvError> {
        EtcdStore::connect(cfg, path).await
    }
}

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

/// Settings of the remote connections.
#[derive(Clone, Debug)]
pub struct RemoteSettings {
    /// How long to keep a remote's entries when it came back empty.
    pub empty_grace: Duration,
    /// First reconnect delay.
    pub min_backoff: Duration,
    /// Reconnect delay cap.
    pub max_backoff: Duration,
    /// Deadline of connect, TLS handshake and the first answer (the list's first page).
    pub connect_timeout: Duration,
}

/// Follows the Secret directory and runs one connection per remote cluster.
#[derive(Debug)]
pub struct Remotes<C: Connector> {
    dir: PathBuf,
    local: String,
    connector: C,
    cache: MeshCache,
    status: Status,
    settings: RemoteSettings,
    tasks: BTreeMap<ClusterName, (u64, JoinHandle<()>)>,
    warned_local: bool,
}

impl<C: Connector> Remotes<C> {
    /// A follower of `dir`; `local` is this cluster's name (never followed).
    pub fn new(
        dir: PathBuf,
        local: &str,
        connector: C,
        cache: MeshCache,
        status: Status,
        settings: RemoteSettings,
    ) -> Self {
        Self {
            dir,
            local: local.to_string(),
            connector,
            cache,
            status,
            settings,
            tasks: BTreeMap::new(),
            warned_local: false,
        }
    }

    /// Scans the directory every `period`, forever.
    pub async fn run(mut self, period: Duration) {
        loop {
            self.sync_once();
            tokio::time::sleep(period).await;
        }
    }

    /// Applies the directory's current content: starts added clusters,
    /// restarts changed ones (keeping their entries), drains removed ones.
    pub fn sync_once(&mut self) {
        let mut files = secret::scan(&self.dir);
        if let Some(k) = files.keys().find(|k| k.as_str() == self.local).cloned() {
            files.remove(&k);
            if !self.warned_local {
                self.warned_local = true;
                tracing::warn!(cluster = %k, dir = %self.dir.display(), "the clustermesh Secret lists this agent's own cluster; ignoring it (remove the entry, or check --cluster-name)");
            }
        }
        let gone: Vec<ClusterName> = self
            .tasks
            .keys()
            .filter(|k| !files.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            if let Some((_, h)) = self.tasks.remove(&name) {
                h.abort();
            }
            self.cache.remove(name.as_str());
            self.status.update(|r| {
                r.remotes.remove(name.as_str());
            });
            self.cache.notify();
            tracing::info!(cluster = %name, "remote cluster removed from the clustermesh Secret: withdrawing its routes");
        }
        for (name, file) in files {
            if let Some((fp, _)) = self.tasks.get(&name)
                && *fp == file.fingerprint
            {
                continue;
            }
            let restart = self.tasks.remove(&name).map(|(_, h)| h.abort()).is_some();
            if restart {
                tracing::info!(cluster = %name, path = %file.path.display(), "remote cluster configuration or certificates changed: reconnecting (its routes stay in place)");
            } else {
                tracing::info!(cluster = %name, path = %file.path.display(), "remote cluster added");
            }
            let fp = file.fingerprint;
            self.cache.register(name.as_str());
            let task = cluster::RemoteCluster {
                name: name.to_string(),
                file,
                connector: self.connector.clone(),
                cache: self.cache.clone(),
                status: self.status.clone(),
                settings: self.settings.clone(),
            };
            self.tasks.insert(name, (fp, tokio::spawn(task.run())));
        }
    }

    /// The clusters followed now.
    pub fn clusters(&self) -> Vec<String> {
        self.tasks.keys().map(|k| k.to_string()).collect()
    }
}

impl<C: Connector> Drop for Remotes<C> {
    fn drop(&mut self) {
        // Stop is not remove: the connections end, the cache and the datapath stay.
        for (_, h) in self.tasks.values() {
            h.abort();
        }
    }
}
