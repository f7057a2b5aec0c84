//! What the agent runs with, as `/status` shows it (field `agent`): the
//! settings `podmesh diagnose` needs to compare the node against (datapath
//! mode, tunnel port, pin directory, this node's address and Pod CIDRs, the
//! Secret directory), so that it reads them from the agent instead of
//! asking the operator to repeat them.
use std::{net::IpAddr, path::PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, DatapathMode};

/// The agent's settings and this node's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// This cluster's ID.
    pub cluster_id: u32,
    /// `ebpf`, `vxlan`, `ipip` or `direct`.
    pub datapath: String,
    /// Routes are kept in memory only (`--datapath-dry-run`): nothing to compare in the kernel.
    #[serde(default)]
    pub dry_run: bool,
    /// VXLAN UDP port.
    pub tunnel_port: u16,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Pin directory of the eBPF maps.
    pub bpf_pin_dir: PathBuf,
    /// The clustermesh Secret directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clustermesh_config: Option<PathBuf>,
    /// The local mesh etcd's client YAML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvstore_config: Option<PathBuf>,
    /// This cluster's declared Pod CIDRs.
    #[serde(default, rename = "clusterPodCIDRs")]
    pub cluster_pod_cidrs: Vec<IpNet>,
    /// This node's addresses, tunnel endpoint first (empty until known).
    #[serde(default)]
    pub node_addresses: Vec<IpAddr>,
    /// This node's Pod CIDRs (empty until known).
    #[serde(default, rename = "nodePodCIDRs")]
    pub node_pod_cidrs: Vec<IpNet>,
    /// The userspace WireGuard's UAPI socket (`--encryption wireguard`;
    /// the kernel's device is read over netlink instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_socket: Option<PathBuf>,
}

/// The name of a datapath mode as its flag spells it.
pub fn mode_name(m: DatapathMode) -> &'static str {
    match m {
        DatapathMode::Ebpf => "ebpf",
        DatapathMode::Vxlan => "vxlan",
        DatapathMode::Ipip => "ipip",
        DatapathMode::Direct => "direct",
    }
}

impl AgentInfo {
    /// The settings of `cfg` (the node's identity is filled in as it becomes known).
    pub fn from_config(cfg: &AgentConfig) -> Self {
        Self {
            cluster_id: cfg.cluster_id,
            datapath: mode_name(cfg.datapath).to_string(),
            dry_run: cfg.datapath_dry_run,
            tunnel_port: cfg.tunnel_port,
            vni: cfg.vni,
            bpf_pin_dir: cfg.bpf_pin_dir.clone(),
            clustermesh_config: cfg.clustermesh_config.clone(),
            kvstore_config: cfg.kvstore_config.as_ref().map(|k| k.path.clone()),
            cluster_pod_cidrs: cfg.cluster_pod_cidrs.clone(),
            node_addresses: Vec::new(),
            node_pod_cidrs: Vec::new(),
            wireguard_socket: cfg.wireguard.as_ref().map(|w| w.socket()),
        }
    }
}
