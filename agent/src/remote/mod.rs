//! Remote clusters: the Secret directory decides which exist; each gets a
//! connection lifecycle ([`cluster`]) that feeds its entries into the shared
//! [`MeshCache`], from which the reconciler computes the desired state.
//!
//! Data flows one way: records → remote (this module) → desired (the cache
//! and the desired state) → reconcile → datapath.
//!
//! Lifecycle ("connect, back off, report") is split from what is done with a
//! connection (list + watch into the cache), as in Cilium's clustermesh.
use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::task::JoinHandle;

use crate::{
    desired::MeshCache,
    kvstore::{KvError, KvStore, client_config::EtcdClientConfig, etcd::EtcdStore},
    model::ClusterName,
    status::Status,
};

pub mod backoff;
pub mod cluster;
pub mod hint;
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

/// Settings of the remote connections.
#[derive(Clone, Debug)]
pub struct RemoteSettings {
    /// How long to keep a remote's entries when it came back empty.
    pub empty_grace: Duration,
    /// First reconnect delay.
    pub min_backoff: Duration,
    /// Reconnect delay cap.
    pub max_backoff: Duration,
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
