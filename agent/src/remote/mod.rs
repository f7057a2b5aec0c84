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

/// Reconnect backoff (shared with the etcd proxy).
pub use podmesh_plumbing::backoff;
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
    /// Followed clusters missing from the directory's listing, since when.
    absent: BTreeMap<ClusterName, std::time::Instant>,
    /// The last problem reading the directory or an entry, logged once.
    problems: BTreeMap<String, String>,
}

/// How long a followed cluster must be missing from successful listings of
/// the Secret directory before its routes are withdrawn: a removal is a
/// positive, stable absence, never one odd scan.
pub const ABSENCE_CONFIRM: Duration = Duration::from_secs(2);

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
            absent: BTreeMap::new(),
            problems: BTreeMap::new(),
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
    ///
    /// Only a positive, stable absence removes: a cluster missing from
    /// successful listings for [`ABSENCE_CONFIRM`]. A directory that cannot
    /// be read (missing for a moment, out of file descriptors) or an entry
    /// that cannot (a symlink dangling during the kubelet's swap) keeps what
    /// was last read, and says so in the log and in `/status`.
    pub fn sync_once(&mut self) {
        self.sync_at(std::time::Instant::now());
    }

    fn sync_at(&mut self, now: std::time::Instant) {
        let listed = match secret::scan(&self.dir) {
            Ok(l) => {
                self.problem("directory", None);
                l
            }
            Err(e) => {
                // Before anything was followed, a missing directory is an
                // empty Secret; after, nothing can be concluded from it.
                if !(e.is_missing() && self.tasks.is_empty()) {
                    self.problem(
                        "directory",
                        Some(format!(
                            "{e}; keeping the {} remote clusters followed and their routes until it can be read",
                            self.tasks.len()
                        )),
                    );
                }
                return;
            }
        };
        let mut files = BTreeMap::new();
        let mut unreadable = Vec::new();
        for (name, l) in listed {
            if name.as_str() == self.local {
                if !self.warned_local {
                    self.warned_local = true;
                    tracing::warn!(cluster = %name, dir = %self.dir.display(), "the clustermesh Secret lists this agent's own cluster; ignoring it (remove the entry, or check --cluster-name)");
                }
                continue;
            }
            match l {
                secret::Listed::File(f) => {
                    self.problem(name.as_str(), None);
                    files.insert(name, f);
                }
                secret::Listed::Unreadable { path, reason } => {
                    let followed = self.tasks.contains_key(&name);
                    self.problem(
                        name.as_str(),
                        Some(format!(
                            "cannot read {}: {reason}; {}",
                            path.display(),
                            if followed {
                                "keeping its last configuration and its routes"
                            } else {
                                "it is followed once it can be read"
                            }
                        )),
                    );
                    unreadable.push(name);
                }
            }
        }
        self.absent
            .retain(|k, _| !files.contains_key(k) && !unreadable.contains(k));
        let missing: Vec<ClusterName> = self
            .tasks
            .keys()
            .filter(|k| !files.contains_key(*k) && !unreadable.contains(*k))
            .cloned()
            .collect();
        for name in missing {
            let since = *self.absent.entry(name.clone()).or_insert(now);
            if now.duration_since(since) < ABSENCE_CONFIRM {
                tracing::debug!(cluster = %name, "remote cluster missing from the clustermesh Secret; withdrawn if it stays missing");
                continue;
            }
            self.absent.remove(&name);
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

    /// Records the current problem of `what` (`directory` or a cluster):
    /// logged when it appears or changes and when it clears, shown in
    /// `/status` as `secretProblems`.
    fn problem(&mut self, what: &str, problem: Option<String>) {
        match problem {
            Some(p) => {
                if self.problems.get(what) != Some(&p) {
                    tracing::warn!(entry = what, "{p}");
                    self.problems.insert(what.to_string(), p);
                    self.publish_problems();
                }
            }
            None => {
                if self.problems.remove(what).is_some() {
                    tracing::info!(entry = what, dir = %self.dir.display(), "the clustermesh Secret reads again");
                    self.publish_problems();
                }
            }
        }
    }

    fn publish_problems(&self) {
        let problems = self.problems.clone();
        self.status.update(|r| r.secret_problems = problems);
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
