//! Wires the agent together: status server, publisher, remote clusters,
//! reconciler over any [`Datapath`]. Used by the `podmesh-agent` binary and
//! by tests (with the in-memory datapath).
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use podmesh_plumbing::lifecycle;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{AgentConfig, NodeSource},
    datapath::Datapath,
    desired::{LocalRanges, MeshCache},
    k8s,
    kvstore::{KvStore, etcd::EtcdStore},
    model::{ClusterRecord, format_mac},
    publish::{LocalNode, Publisher, boot_id},
    reconcile::Reconciler,
    remote::{Connector, EtcdConnector, RemoteSettings, Remotes, cluster::MIN_BACKOFF},
    status::{Status, agent_info::AgentInfo, server},
};

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The status server cannot bind.
    #[error(transparent)]
    Status(#[from] server::ServeError),
    /// The Kubernetes client cannot be built.
    #[error(transparent)]
    Kubernetes(#[from] k8s::K8sError),
}

/// A running agent. Dropping it (or [`Agent::stop`]) ends its tasks and
/// leaves the datapath and the node record's lease as they are.
#[derive(Debug)]
pub struct Agent {
    /// Its status.
    pub status: Status,
    /// The address the status server listens on.
    pub status_addr: SocketAddr,
    /// The remote entries it holds.
    pub cache: MeshCache,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Ends every task. Stop is not remove: routes and records stay.
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The local ranges no remote may take: this cluster's declared Pod and
/// service CIDRs, and this node's own Pod CIDRs and addresses as `node` last
/// reported them (from the flags, or the Kubernetes Node, which can change
/// while the agent runs); without `node`, those of the flags, if any.
pub fn local_ranges(cfg: &AgentConfig, node: Option<&LocalNode>) -> LocalRanges {
    let (own_pods, addrs): (&[IpNet], Vec<IpAddr>) = match (node, &cfg.node_source) {
        (Some(n), _) => (&n.pod_cidrs, n.addresses.clone()),
        (None, NodeSource::Static { ips, pod_cidrs }) => (pod_cidrs, ips.clone()),
        (None, NodeSource::Kubernetes { addresses }) => (&[], addresses.clone()),
    };
    let mut pod = cfg.cluster_pod_cidrs.clone();
    for c in own_pods {
        if !pod.contains(c) {
            pod.push(*c);
        }
    }
    let mut host = Vec::new();
    for a in addrs.into_iter().map(IpNet::from) {
        if !host.contains(&a) {
            host.push(a);
        }
    }
    LocalRanges {
        cluster: cfg.cluster_name.to_string(),
        cluster_id: cfg.cluster_id,
        pod,
        service: cfg.service_cidrs.clone(),
        node: host,
        underlay: cfg.underlay_family,
    }
}

/// Keeps this node's address and Pod CIDRs in the status (`agent`), for
/// `podmesh diagnose`.
async fn follow_node_identity(status: Status, mut node: watch::Receiver<Option<LocalNode>>) {
    loop {
        let (addresses, pod_cidrs) = node
            .borrow_and_update()
            .as_ref()
            .map(|n| (n.addresses.clone(), n.pod_cidrs.clone()))
            .unwrap_or_default();
        status.update(|r| {
            if let Some(a) = &mut r.agent {
                a.node_addresses = addresses;
                a.node_pod_cidrs = pod_cidrs;
            }
        });
        if node.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps `tx` at the local ranges of this node as `node` reports it, so that
/// the reconciler validates remote records against the current Node.
async fn follow_local_ranges(
    cfg: AgentConfig,
    mut node: watch::Receiver<Option<LocalNode>>,
    tx: watch::Sender<LocalRanges>,
) {
    while node.changed().await.is_ok() {
        let l = local_ranges(&cfg, node.borrow_and_update().as_ref());
        tx.send_if_modified(|cur| {
            let changed = *cur != l;
            *cur = l;
            changed
        });
    }
}

/// The local mesh etcd's connection lifecycle: connect and read this
/// cluster's record (the first answer) under the connect deadline, then
/// publish on that connection; the publisher re-publishes on failures of its
/// own on the same client.
#[derive(Debug)]
struct LocalEtcd {
    path: std::path::PathBuf,
    client_cfg: crate::kvstore::client_config::EtcdClientConfig,
    /// The publisher's settings; the store is the connection's.
    publisher: Publisher<()>,
}

impl lifecycle::Handler for LocalEtcd {
    type Conn = EtcdStore;
    type Error = crate::kvstore::KvError;

    async fn connect(&mut self) -> Result<EtcdStore, Self::Error> {
        let store = EtcdStore::connect(&self.client_cfg, &self.path).await?;
        store
            .get(&crate::model::cluster_key(&self.publisher.cluster.name))
            .await?;
        Ok(store)
    }

    async fn session(
        &mut self,
        store: EtcdStore,
        _backoff: &mut podmesh_plumbing::backoff::Backoff,
    ) -> Result<lifecycle::Next, Self::Error> {
        let p = &self.publisher;
        Publisher {
            store,
            cluster: p.cluster.clone(),
            node_name: p.node_name.clone(),
            boot_id: p.boot_id.clone(),
            ttl: p.ttl,
            status: p.status.clone(),
            node: p.node.clone(),
            connect_timeout: p.connect_timeout,
            wireguard_key: p.wireguard_key.clone(),
        }
        .run()
        .await;
        // The node source is gone: the agent is stopping.
        std::future::pending().await
    }

    async fn report(&mut self, event: lifecycle::Event<'_, Self::Error>) {
        if let lifecycle::Event::Failed { failure, .. } = event {
            tracing::warn!(error = %failure, hint = "check --kvstore-config and that the local mesh etcd is up", "cannot connect to the local mesh etcd; retrying");
            self.publisher
                .status
                .update(|r| r.local.last_error = Some(failure.to_string()));
        }
    }
}

/// Starts the agent with real etcd connections.
pub async fn start<D: Datapath + 'static>(
    cfg: &AgentConfig,
    datapath: D,
    vtep_mac: Option<[u8; 6]>,
) -> Result<Agent, StartError> {
    start_with(cfg, datapath, vtep_mac, EtcdConnector).await
}

/// Starts the agent with real etcd connections, publishing this node's
/// WireGuard public key as `key` says (it changes when the key is rotated).
pub async fn start_encrypted<D: Datapath + 'static>(
    cfg: &AgentConfig,
    datapath: D,
    vtep_mac: Option<[u8; 6]>,
    key: watch::Receiver<Option<String>>,
) -> Result<Agent, StartError> {
    start_inner(cfg, datapath, vtep_mac, key, EtcdConnector).await
}

/// Starts the agent; remote clusters are reached through `connector`.
pub async fn start_with<D: Datapath + 'static, C: Connector>(
    cfg: &AgentConfig,
    datapath: D,
    vtep_mac: Option<[u8; 6]>,
    connector: C,
) -> Result<Agent, StartError> {
    start_inner(cfg, datapath, vtep_mac, watch::channel(None).1, connector).await
}

async fn start_inner<D: Datapath + 'static, C: Connector>(
    cfg: &AgentConfig,
    datapath: D,
    vtep_mac: Option<[u8; 6]>,
    wireguard_key: watch::Receiver<Option<String>>,
    connector: C,
) -> Result<Agent, StartError> {
    let status = Status::new(cfg.cluster_name.as_str(), &cfg.node_name);
    status.update(|r| r.agent = Some(AgentInfo::from_config(cfg)));
    let cache = MeshCache::new();
    let mut tasks = Vec::new();
    let (status_addr, serve) = server::bind(
        cfg.status_addr,
        status.clone(),
        std::future::pending::<()>(),
    )
    .await?;
    tasks.push(tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "status server stopped");
        }
    }));

    // The local node: from flags, or watched from Kubernetes.
    let (node_tx, node_rx) = watch::channel(None::<LocalNode>);
    let mac = vtep_mac.map(format_mac);
    match &cfg.node_source {
        NodeSource::Static { ips, pod_cidrs } => {
            let _ = node_tx.send(Some(LocalNode {
                addresses: ips.clone(),
                pod_cidrs: pod_cidrs.clone(),
                vtep_mac: mac,
            }));
            // Keep the sender alive so the publisher sees no end of the source.
            tasks.push(tokio::spawn(async move {
                node_tx.closed().await;
            }));
        }
        NodeSource::Kubernetes { addresses } => {
            let api = k8s::KubeNodes::from_env().await?;
            let follower = k8s::NodeFollower {
                api,
                addresses: addresses.clone(),
                underlay: cfg.underlay_family,
                name: cfg.node_name.clone(),
                origin: cfg.node_name_origin,
                vtep_mac: mac,
                cluster_pod_cidrs: cfg.cluster_pod_cidrs.clone(),
                status: status.clone(),
            };
            tasks.push(tokio::spawn(follower.run(node_tx)));
        }
    }

    // Publishing into the local mesh etcd.
    if let Some(kv) = &cfg.kvstore_config {
        let (path, client_cfg) = (&kv.path, kv.client.clone());
        let publisher_cluster = ClusterRecord {
            name: cfg.cluster_name.to_string(),
            id: cfg.cluster_id,
            pod_cidrs: cfg.cluster_pod_cidrs.clone(),
            service_cidrs: cfg.service_cidrs.clone(),
        };
        let mut local = LocalEtcd {
            path: path.clone(),
            client_cfg,
            publisher: Publisher {
                store: (),
                cluster: publisher_cluster,
                node_name: cfg.node_name.clone(),
                boot_id: boot_id(),
                ttl: cfg.lease_ttl,
                status: status.clone(),
                node: node_rx.clone(),
                connect_timeout: cfg.connect_timeout,
                wireguard_key,
            },
        };
        let settings = lifecycle::Settings {
            min_backoff: MIN_BACKOFF,
            max_backoff: Duration::from_secs(10),
            connect_timeout: cfg.connect_timeout,
        };
        tasks.push(tokio::spawn(async move {
            lifecycle::run(&mut local, settings).await;
        }));
    }

    // Remote clusters: scan the Secret once before the reconciler starts, so
    // that routes of configured clusters are kept while they reconnect.
    let settings = RemoteSettings {
        empty_grace: cfg.empty_grace,
        min_backoff: MIN_BACKOFF,
        max_backoff: cfg.max_backoff,
        connect_timeout: cfg.connect_timeout,
    };
    if let Some(dir) = &cfg.clustermesh_config {
        let mut remotes = Remotes::new(
            dir.clone(),
            cfg.cluster_name.as_str(),
            connector,
            cache.clone(),
            status.clone(),
            settings,
        );
        remotes.sync_once();
        let poll = cfg.secret_poll;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(poll).await;
            remotes.run(poll).await;
        }));
    }

    let (local_tx, local_rx) = watch::channel(local_ranges(cfg, node_rx.borrow().as_ref()));
    tasks.push(tokio::spawn(follow_local_ranges(
        cfg.clone(),
        node_rx.clone(),
        local_tx,
    )));
    tasks.push(tokio::spawn(follow_node_identity(
        status.clone(),
        node_rx.clone(),
    )));
    let initial = local_rx.borrow().clone();
    let reconciler =
        Reconciler::new(datapath, initial, cache.clone(), status.clone()).follow_local(local_rx);
    tasks.push(tokio::spawn(reconciler.run(cfg.resync_interval)));
    tasks.push(crate::cni::observe::spawn(
        cfg,
        cache.clone(),
        status.clone(),
    ));
    tracing::info!(cluster = %cfg.cluster_name, node = %cfg.node_name, status = %status_addr, "podmesh-agent started");
    Ok(Agent {
        status,
        status_addr,
        cache,
        tasks,
    })
}

#[cfg(test)]
mod tests;
