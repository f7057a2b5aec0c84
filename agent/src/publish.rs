//! Publishes this node's record (under a lease, kept alive) and this cluster's
//! record (create-if-absent) into the local mesh etcd.
//!
//! The node record is re-created when the lease is lost (agent paused too long,
//! etcd restarted empty) and rewritten when the node's addresses or Pod CIDRs
//! change. A cluster record that differs from ours is reported, never
//! overwritten: another agent of this cluster, or an operator, wrote it, and
//! remote clusters validate our nodes against it. Shutdown leaves the node
//! record to its lease (stop is not remove).
use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;
use podmesh_plumbing::lifecycle::{self, Event, Next};
use tokio::sync::watch;

use crate::{
    kvstore::{KvError, KvStore, LeaseId},
    model::{ClusterRecord, NodeRecord, cluster_key, node_key},
    remote::backoff::Backoff,
    status::Status,
};

/// This node as the publisher needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    /// Tunnel endpoint first.
    pub addresses: Vec<IpAddr>,
    /// The node's Pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// MAC of this node's tunnel device, when the datapath has one.
    pub vtep_mac: Option<String>,
}

/// The publisher of one node and its cluster's record.
#[derive(Debug)]
pub struct Publisher<S> {
    /// The local mesh etcd.
    pub store: S,
    /// The cluster record this agent would write.
    pub cluster: ClusterRecord,
    /// This node's name.
    pub node_name: String,
    /// The node's boot ID (a reboot is visible to remote clusters).
    pub boot_id: Option<String>,
    /// Lease TTL.
    pub ttl: Duration,
    /// Where the state is reported.
    pub status: Status,
    /// The node's current addresses and CIDRs (`None` until known).
    pub node: watch::Receiver<Option<LocalNode>>,
    /// Deadline of the first answers of each publication (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// This node's WireGuard public key (base64), published as
    /// `wireguardPublicKey`; changes when the key is rotated.
    pub wireguard_key: watch::Receiver<Option<String>>,
}

/// This machine's boot ID.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

impl<S: KvStore> Publisher<S> {
    fn record(&self, n: &LocalNode) -> NodeRecord {
        NodeRecord {
            name: self.node_name.clone(),
            cluster: self.cluster.name.clone(),
            cluster_id: self.cluster.id,
            addresses: n.addresses.clone(),
            pod_cidrs: n.pod_cidrs.clone(),
            vtep_mac: n.vtep_mac.clone(),
            boot_id: self.boot_id.clone(),
            wireguard_public_key: self.wireguard_key.borrow().clone(),
        }
    }

    /// Ensures the cluster record: creates it when absent, reports a different one.
    async fn ensure_cluster_record(&self) -> Result<(), KvError> {
        let key = cluster_key(&self.cluster.name);
        let value = serde_json::to_vec(&self.cluster).unwrap_or_default();
        let existing = self.store.create(&key, value).await?;
        let conflict = match existing {
            None => {
                tracing::info!(key, "cluster record created");
                None
            }
            Some(kv) => match serde_json::from_slice::<ClusterRecord>(&kv.value) {
                Ok(r) if r == self.cluster => None,
                Ok(r) => Some(format!(
                    "{key} holds {} (ID {}, Pod CIDRs {:?}, service CIDRs {:?}) but this agent is configured with ID {}, Pod CIDRs {:?}, service CIDRs {:?}; not overwritten: make every agent of the cluster use the same --cluster-id/--cluster-pod-cidr/--service-cidr, then delete the key",
                    r.name,
                    r.id,
                    r.pod_cidrs,
                    r.service_cidrs,
                    self.cluster.id,
                    self.cluster.pod_cidrs,
                    self.cluster.service_cidrs
                )),
                Err(e) => Some(format!(
                    "{key} holds an undecodable record ({e}); not overwritten: delete the key so agents can recreate it"
                )),
            },
        };
        let changed = self.status.update(|r| {
            let changed = r.local.cluster_record_conflict != conflict;
            r.local.cluster_record_conflict = conflict.clone();
            changed
        });
        if changed && let Some(c) = &conflict {
            tracing::error!(conflict = %c, "conflicting cluster record in the local mesh etcd");
        }
        Ok(())
    }

    /// Runs until aborted (or until the node source is gone before the
    /// node was known): waits for the node, then publishes through the
    /// shared connection lifecycle.
    pub async fn run(mut self) {
        while self.node.borrow().is_none() {
            if self.node.changed().await.is_err() {
                return;
            }
        }
        let settings = lifecycle::Settings {
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            connect_timeout: self.connect_timeout,
        };
        lifecycle::run(&mut self, settings).await;
    }

    /// Publishes under `lease` until the lease is lost or a request fails.
    async fn session(&mut self, lease: LeaseId, backoff: &mut Backoff) -> Result<Next, KvError> {
        let key = node_key(&self.cluster.name, &self.node_name);
        let mut current = self.node.borrow_and_update().clone();
        let write = |n: &LocalNode| serde_json::to_vec(&self.record(n)).unwrap_or_default();
        if let Some(n) = &current {
            self.store.put(&key, write(n), Some(lease)).await?;
        }
        backoff.reset();
        self.status.update(|r| {
            r.local.published = true;
            r.local.lease = Some(lease);
            r.local.publications += 1;
            r.local.last_error = None;
        });
        tracing::info!(key, lease, "node record published");
        let period = (self.ttl / 3).max(Duration::from_millis(500));
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        let mut node = self.node.clone();
        let mut wg_key = self.wireguard_key.clone();
        wg_key.mark_unchanged();
        let mut key_alive = true;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !self.store.keep_alive(lease).await? {
                        tracing::warn!(
                            "node record's lease was lost (local etcd restarted or wiped, or the agent stalled); republishing"
                        );
                        self.status.update(|r| r.local.published = false);
                        return Ok(Next::Reconnect);
                    }
                    // An etcd restored without our keys but with our lease is
                    // not expected, but cheap to heal: re-put a missing record.
                    if self.store.get(&key).await?.is_none()
                        && let Some(n) = &current
                    {
                        self.store.put(&key, write(n), Some(lease)).await?;
                    }
                    self.ensure_cluster_record().await?;
                }
                r = node.changed() => {
                    if r.is_err() {
                        // The node source is gone: keep the record alive as is.
                        node = watch::channel(current.clone()).1;
                        continue;
                    }
                    let n = node.borrow_and_update().clone();
                    if n != current && let Some(v) = &n {
                        self.store.put(&key, write(v), Some(lease)).await?;
                        tracing::info!(key, "node record updated");
                    }
                    current = n;
                }
                r = wg_key.changed(), if key_alive => {
                    if r.is_err() {
                        key_alive = false;
                        continue;
                    }
                    wg_key.mark_unchanged();
                    if let Some(v) = &current {
                        self.store.put(&key, write(v), Some(lease)).await?;
                        tracing::info!("node record updated with this node's new WireGuard public key");
                    }
                }
            }
        }
    }
}

/// Publishing as the shared lifecycle drives it: the cluster record's check
/// and the lease grant are the first answers (under the connect deadline),
/// the rest is the session.
impl<S: KvStore> lifecycle::Handler for Publisher<S> {
    type Conn = LeaseId;
    type Error = KvError;

    async fn connect(&mut self) -> Result<LeaseId, KvError> {
        self.ensure_cluster_record().await?;
        self.store.grant_lease(self.ttl).await
    }

    async fn session(&mut self, lease: LeaseId, backoff: &mut Backoff) -> Result<Next, KvError> {
        Publisher::session(self, lease, backoff).await
    }

    async fn report(&mut self, event: Event<'_, KvError>) {
        if let Event::Failed { failure, .. } = event {
            tracing::warn!(error = %failure, hint = "check --kvstore-config and that the local mesh etcd is up", "publishing this node failed; retrying");
            self.status.update(|r| {
                r.local.published = false;
                r.local.last_error = Some(failure.to_string());
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvstore::memory::MemoryStore;

    fn publisher(
        store: &MemoryStore,
        cluster_id: u32,
    ) -> (
        Publisher<MemoryStore>,
        watch::Sender<Option<LocalNode>>,
        Status,
    ) {
        let (tx, rx) = watch::channel(Some(LocalNode {
            addresses: vec!["192.168.1.10".parse().unwrap()],
            pod_cidrs: vec!["10.1.1.0/24".parse().unwrap()],
            vtep_mac: None,
        }));
        let status = Status::new("east", "n1");
        let p = Publisher {
            store: store.clone(),
            cluster: ClusterRecord {
                name: "east".into(),
                id: cluster_id,
                pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
                service_cidrs: vec![],
            },
            node_name: "n1".into(),
            boot_id: None,
            ttl: Duration::from_secs(3),
            status: status.clone(),
            node: rx,
            connect_timeout: lifecycle::CONNECT_TIMEOUT,
            wireguard_key: watch::channel(None).1,
        };
        (p, tx, status)
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_republishes_and_follows_changes() {
        let store = MemoryStore::new();
        let (p, tx, status) = publisher(&store, 1);
        let h = tokio::spawn(p.run());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let key = node_key("east", "n1");
        let lease = store.lease_of(&key).expect("published under a lease");
        assert!(store.dump().contains_key(&cluster_key("east")));
        assert!(status.snapshot().local.published);
        // Lease lost: re-created under a new lease.
        store.expire_lease(lease);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let lease2 = store.lease_of(&key).expect("republished");
        assert_ne!(lease, lease2);
        // Wiped etcd: both records come back.
        store.wipe();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(store.dump().contains_key(&key));
        assert!(store.dump().contains_key(&cluster_key("east")));
        // Node change: rewritten.
        tx.send(Some(LocalNode {
            addresses: vec!["192.168.1.11".parse().unwrap()],
            pod_cidrs: vec!["10.1.2.0/24".parse().unwrap()],
            vtep_mac: None,
        }))
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r: NodeRecord = serde_json::from_slice(&store.dump()[&key]).unwrap();
        assert_eq!(r.pod_cidrs, vec!["10.1.2.0/24".parse::<IpNet>().unwrap()]);
        h.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn conflicting_cluster_record_is_reported_not_overwritten() {
        let store = MemoryStore::new();
        let (p1, _t1, _s1) = publisher(&store, 1);
        p1.ensure_cluster_record().await.unwrap();
        let (p2, _t2, s2) = publisher(&store, 2);
        p2.ensure_cluster_record().await.unwrap();
        let c: ClusterRecord = serde_json::from_slice(&store.dump()[&cluster_key("east")]).unwrap();
        assert_eq!(c.id, 1);
        assert!(
            s2.snapshot()
                .local
                .cluster_record_conflict
                .unwrap()
                .contains("not overwritten")
        );
    }
}
