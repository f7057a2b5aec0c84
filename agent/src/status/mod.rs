//! The agent's observable state (per remote cluster: connection, sync, records)
//! and the HTTP status server that shows it (`/healthz`, `/readyz`, `/metrics`, `/status`).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{
        Counters, RemoteRoute,
        kernel::RpStrictHandle,
        masq::{ExemptionHandle, ExemptionStatus},
    },
    desired::RecordOutcome,
    model::{format_mac, format_wireguard_key},
};

pub mod agent_info;
pub mod metrics;
pub mod server;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One installed route as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// Remote node Pod CIDR.
    pub cidr: ipnet::IpNet,
    /// Remote cluster.
    pub cluster: String,
    /// Remote node.
    pub node: String,
    /// Tunnel endpoint / next hop.
    #[serde(rename = "nodeAddr")]
    pub node_addr: std::net::IpAddr,
    /// Remote VTEP MAC.
    #[serde(rename = "vtepMAC", default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    /// The remote node's WireGuard public key (base64), when it publishes one.
    #[serde(
        rename = "wireguardPublicKey",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub wireguard_public_key: Option<String>,
}

impl From<&RemoteRoute> for RouteStatus {
    fn from(r: &RemoteRoute) -> Self {
        Self {
            cidr: r.cidr,
            cluster: r.cluster.clone(),
            node: r.node.clone(),
            node_addr: r.node_addr,
            vtep_mac: r.vtep_mac.map(format_mac),
            wireguard_public_key: r.wireguard_key.as_ref().map(format_wireguard_key),
        }
    }
}

/// One remote cluster as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemoteStatus {
    /// Cluster name (the Secret file name).
    pub name: String,
    /// etcd endpoints from its client config.
    pub endpoints: Vec<String>,
    /// A connection is established and a list or watch is running.
    pub connected: bool,
    /// A complete list was received and the watch is live.
    pub synced: bool,
    /// Unix time of the last complete list.
    pub last_sync: Option<f64>,
    /// Seconds the last complete list took (connect to `ListDone`).
    pub sync_seconds: Option<f64>,
    /// Connection or watch failures since start.
    pub failures: u64,
    /// Lists of the remote's records started since start: one per connection,
    /// and one more each time the watch fell behind a compaction.
    #[serde(default)]
    pub lists: u64,
    /// Times the watch (or a list) fell behind a compaction of the remote's
    /// history and the agent re-listed.
    #[serde(default)]
    pub compactions: u64,
    /// Unix time of the last failure.
    pub last_failure: Option<f64>,
    /// Unix time of the last record change received from the remote (a
    /// complete list counts as one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<f64>,
    /// The last error, with a hint.
    pub last_error: Option<String>,
    /// Set while the remote came back empty and its old entries are kept: Unix time when they are pruned.
    pub empty_grace_until: Option<f64>,
    /// Entries held for this remote.
    pub entries: usize,
    /// Node records whose routes are programmed.
    pub nodes_programmed: usize,
    /// Records rejected, by reason code.
    pub rejected_by_reason: BTreeMap<String, usize>,
    /// Every record and its outcome.
    pub records: Vec<RecordOutcome>,
}

/// This node's publication in the local mesh etcd.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalStatus {
    /// This cluster.
    pub cluster: String,
    /// This node.
    pub node: String,
    /// The node record is written under a live lease.
    pub published: bool,
    /// The lease the node record is bound to.
    pub lease: Option<i64>,
    /// Times the node record was (re)published since start.
    pub publications: u64,
    /// Set when the local etcd holds a different cluster record than this agent would write.
    pub cluster_record_conflict: Option<String>,
    /// The last error, with a hint. While this node's Kubernetes Node
    /// cannot be read (`node_error`), that error, unless publishing failed too.
    pub last_error: Option<String>,
    /// Why this node's address and Pod CIDRs cannot be taken from its
    /// Kubernetes Node now, with the fix. `None` while they can, or when they
    /// come from --node-ip/--pod-cidr. The agent is not ready while it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_error: Option<LocalProblem>,
    /// Pod CIDRs of this node (from its Kubernetes Node) outside every
    /// declared --cluster-pod-cidr: every remote cluster rejects this node's
    /// record (`node-pod-cidr-outside-cluster`). Not ready while non-empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs_outside_cluster: Vec<ipnet::IpNet>,
}

/// A problem of this node's own configuration, with a stable code for
/// metrics and alerts, and a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalProblem {
    /// Stable code, e.g. `kubernetes-forbidden` or `node-not-found`.
    pub code: String,
    /// What is wrong and the fix.
    pub message: String,
}

impl LocalStatus {
    /// The reasons this node is not ready for the mesh, each with its fix.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.node_error {
            out.push(p.message.clone());
        }
        if !self.pod_cidrs_outside_cluster.is_empty() {
            out.push(outside_message(&self.pod_cidrs_outside_cluster));
        }
        out
    }
}

/// The message of Pod CIDRs outside the declared cluster ranges.
pub fn outside_message(cidrs: &[ipnet::IpNet]) -> String {
    let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
    format!(
        "this node's Pod CIDRs {} (spec.podCIDRs of its Node) are outside every --cluster-pod-cidr: \
         remote clusters reject this node (node-pod-cidr-outside-cluster); declare the cluster's \
         Pod CIDRs of both families in cluster-pod-cidr (the cluster CIDRs of kube-controller-manager \
         --cluster-cidr)",
        list.join(", ")
    )
}

/// The whole `/status` document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// podmesh version.
    pub version: String,
    /// Ready: this node's own Node read (when it comes from Kubernetes) with
    /// Pod CIDRs inside the declared ranges, and every configured remote
    /// connected and synced.
    pub ready: bool,
    /// The local publication.
    pub local: LocalStatus,
    /// Remote clusters by name.
    pub remotes: BTreeMap<String, RemoteStatus>,
    /// Number of routes the datapath holds (as last applied).
    #[serde(default)]
    pub routes_installed: usize,
    /// Routes the datapath holds (as last applied).
    pub routes: Vec<RouteStatus>,
    /// Last datapath error, if any.
    pub datapath_error: Option<String>,
    /// Times programming the datapath failed and was retried after a backoff.
    #[serde(default)]
    pub reconcile_retries: u64,
    /// Rejections counted since start, by (cluster, reason).
    #[serde(default)]
    pub rejections_total: BTreeMap<String, BTreeMap<String, u64>>,
    /// Packets the eBPF program handled since it was first loaded (ebpf mode;
    /// the counters are pinned, so they carry on across agent restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath_packets: Option<Counters>,
    /// What the node's own CNI appears to be, each with what podmesh did and
    /// what the operator must set (empty until the first detection).
    #[serde(default)]
    pub cni: Vec<crate::cni::CniFinding>,
    /// The masquerade exemption (nftables table `inet podmesh`) that keeps
    /// pod source addresses towards remote clusters (kernel datapaths).
    #[serde(
        rename = "masqueradeExemption",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub masquerade_exemption: Option<ExemptionStatus>,
    /// Devices of this node with strict reverse-path filtering (podmesh's own
    /// tunnel device gets mode 0; these are left as they are and reported).
    #[serde(
        rename = "strictRpFilter",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub strict_rp_filter: Vec<String>,
    /// What cannot be read in the clustermesh Secret now (`directory`, or a
    /// cluster's entry), while the last content read is kept.
    #[serde(
        rename = "secretProblems",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub secret_problems: BTreeMap<String, String>,
    /// What the agent runs with (`podmesh diagnose` compares the node against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<agent_info::AgentInfo>,
    /// WireGuard towards remote nodes (`--encryption wireguard`), read at request time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardStatus>,
}

/// The WireGuard device and its peers, as `/status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardStatus {
    /// `kernel` or `userspace`.
    pub backend: String,
    /// This node's public key, as published.
    #[serde(rename = "publicKey")]
    pub public_key: String,
    /// The UDP port.
    pub port: u16,
    /// `--encryption-strict`.
    pub strict: bool,
    /// One entry per remote node reached through WireGuard.
    pub peers: Vec<WireguardPeerStatus>,
    /// Remote nodes (`cluster/node`) reached in clear: they publish no key.
    #[serde(default)]
    pub unencrypted: Vec<String>,
    /// Why the device could not be read, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One WireGuard peer: a remote node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardPeerStatus {
    /// Its cluster.
    pub cluster: String,
    /// Its node.
    pub node: String,
    /// Its public key.
    #[serde(rename = "publicKey")]
    pub public_key: String,
    /// Where this node sends to.
    pub endpoint: Option<String>,
    /// Its Pod CIDRs.
    #[serde(rename = "allowedIPs")]
    pub allowed_ips: Vec<ipnet::IpNet>,
    /// Seconds since the latest handshake (none yet: absent).
    #[serde(rename = "latestHandshakeAgeSeconds")]
    pub latest_handshake_age: Option<u64>,
    /// Bytes received from it.
    #[serde(rename = "rxBytes")]
    pub rx_bytes: u64,
    /// Bytes sent to it.
    #[serde(rename = "txBytes")]
    pub tx_bytes: u64,
}

impl StatusReport {
    /// Whether this node's Node is read and in range, and every remote is connected and synced.
    pub fn compute_ready(&self) -> bool {
        self.local.node_error.is_none()
            && self.local.pod_cidrs_outside_cluster.is_empty()
            && self.remotes.values().all(|r| r.connected && r.synced)
    }
}

/// Shared, cheaply cloneable handle on the status.
#[derive(Clone, Debug, Default)]
pub struct Status {
    inner: Arc<Mutex<StatusReport>>,
    /// Where `/status` reads every record and route on request (never
    /// copied per change): the desired state, behind a closure so that the
    /// status does not depend on the modules that feed it.
    mesh: Arc<Mutex<Option<MeshSource>>>,
    /// Where the datapath's packet counters are read at request time.
    packets: Arc<Mutex<Option<PacketSource>>>,
    /// The masquerade exemption's state, read at request time.
    exemption: Arc<Mutex<Option<ExemptionHandle>>>,
    /// Devices with strict reverse-path filtering, read at request time.
    rp_strict: Arc<Mutex<Option<RpStrictHandle>>>,
    /// The WireGuard device, read at request time.
    wireguard: Arc<Mutex<Option<WireguardSource>>>,
}

/// Reads the WireGuard device's state.
struct WireguardSource(Box<dyn Fn() -> WireguardStatus + Send>);

impl std::fmt::Debug for WireguardSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireguardSource")
    }
}

/// Every remote record with its outcome, and every desired route, as
/// `/status` lists them.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    /// Each record and its outcome.
    pub records: Vec<RecordOutcome>,
    /// Each desired route.
    pub routes: Vec<RouteStatus>,
}

/// Reads the records and routes, of one cluster or of all (`None` until the
/// desired state exists).
struct MeshSource(Box<ReadMesh>);

/// Reads the mesh view of one cluster (`Some`) or of all.
type ReadMesh = dyn Fn(Option<&str>) -> Option<MeshView> + Send;

/// What a `/status` call asks for: `?cluster=east` (only that remote's
/// records and routes), `?rejected=true` (only rejected records, no routes),
/// `?summary=true` (neither records nor routes: the cheap call).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusQuery {
    /// Only this remote cluster's records and routes.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Only rejected records, and no routes.
    #[serde(default)]
    pub rejected: bool,
    /// No records and no routes.
    #[serde(default)]
    pub summary: bool,
}

impl std::fmt::Debug for MeshSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshSource")
    }
}

/// Reads the datapath's packet counters.
struct PacketSource(Box<dyn Fn() -> Result<Counters, String> + Send>);

impl std::fmt::Debug for PacketSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacketSource")
    }
}

impl Status {
    /// A status for this cluster and node.
    pub fn new(cluster: &str, node: &str) -> Self {
        let s = Self::default();
        s.update(|r| {
            r.version = env!("CARGO_PKG_VERSION").to_string();
            r.local.cluster = cluster.to_string();
            r.local.node = node.to_string();
        });
        s
    }

    /// Changes the status under its lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut StatusReport) -> T) -> T {
        let mut g = self.inner.lock().expect("status lock");
        f(&mut g)
    }

    /// Changes one remote's status, creating it if needed.
    pub fn remote<T>(&self, name: &str, f: impl FnOnce(&mut RemoteStatus) -> T) -> T {
        self.update(|r| {
            let e = r
                .remotes
                .entry(name.to_string())
                .or_insert_with(|| RemoteStatus {
                    name: name.to_string(),
                    ..RemoteStatus::default()
                });
            f(e)
        })
    }

    /// Reads the record outcomes and routes with `read` whenever the full
    /// status is asked for.
    pub fn set_mesh_source(
        &self,
        read: impl Fn(Option<&str>) -> Option<MeshView> + Send + 'static,
    ) {
        *self.mesh.lock().expect("status mesh lock") = Some(MeshSource(Box::new(read)));
    }

    /// Reads the datapath's packet counters with `read` whenever the status
    /// is asked for (ebpf mode).
    pub fn set_packet_source(&self, read: impl Fn() -> Result<Counters, String> + Send + 'static) {
        *self.packets.lock().expect("status packets lock") = Some(PacketSource(Box::new(read)));
    }

    /// Shows the masquerade exemption's state from `handle`.
    pub fn set_exemption_source(&self, handle: ExemptionHandle) {
        *self.exemption.lock().expect("status exemption lock") = Some(handle);
    }

    /// Shows the devices with strict reverse-path filtering from `handle`.
    pub fn set_rp_filter_source(&self, handle: RpStrictHandle) {
        *self.rp_strict.lock().expect("status rp_filter lock") = Some(handle);
    }

    /// Reads the WireGuard device with `read` whenever the status is asked for.
    pub fn set_wireguard_source(&self, read: impl Fn() -> WireguardStatus + Send + 'static) {
        *self.wireguard.lock().expect("status wireguard lock") =
            Some(WireguardSource(Box::new(read)));
    }

    /// A copy of the status with `ready` computed, without the per-record and route lists.
    pub fn summary(&self) -> StatusReport {
        let mut s = self.update(|r| r.clone());
        s.ready = s.compute_ready();
        if s.local.last_error.is_none() {
            s.local.last_error = s.local.node_error.as_ref().map(|p| p.message.clone());
        }
        if let Some(h) = &*self.exemption.lock().expect("status exemption lock") {
            s.masquerade_exemption = Some(h.lock().expect("exemption status lock").clone());
        }
        if let Some(h) = &*self.rp_strict.lock().expect("status rp_filter lock") {
            s.strict_rp_filter = h.lock().expect("rp_filter lock").clone();
        }
        if let Some(read) = &*self.wireguard.lock().expect("status wireguard lock") {
            s.wireguard = Some((read.0)());
        }
        if let Some(read) = &*self.packets.lock().expect("status packets lock") {
            match (read.0)() {
                Ok(c) => s.datapath_packets = Some(c),
                Err(e) => tracing::debug!(error = %e, "reading the datapath's packet counters"),
            }
        }
        s
    }

    /// A copy of the status with `ready` computed and each remote's records filled in.
    pub fn snapshot(&self) -> StatusReport {
        self.query(&StatusQuery::default())
    }

    /// The status as `q` asks for it.
    pub fn query(&self, q: &StatusQuery) -> StatusReport {
        let mut s = self.summary();
        if q.summary {
            return s;
        }
        let view = match &*self.mesh.lock().expect("status mesh lock") {
            Some(read) => (read.0)(q.cluster.as_deref()),
            None => None,
        };
        let Some(MeshView { records, routes }) = view else {
            return s;
        };
        if !q.rejected {
            s.routes = routes;
        }
        for r in records {
            if q.rejected && matches!(r.state, crate::desired::RecordState::Programmed) {
                continue;
            }
            if let Some(rs) = s.remotes.get_mut(&r.cluster) {
                rs.records.push(r);
            }
        }
        s
    }

    /// Whether this node's Node is read and every configured remote is connected and synced.
    pub fn ready(&self) -> bool {
        self.update(|r| r.compute_ready())
    }
}
