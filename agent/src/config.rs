//! Command-line flags of `podmesh-agent` (DESIGN.md, "Commands").
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

/// The forwarding mode the agent programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// VXLAN device in collect_md mode steered by a tc eBPF program and an LPM map.
    Ebpf,
    /// VXLAN device with routes, permanent neighbours and fdb entries; no eBPF.
    Vxlan,
    /// IPIP (`tunl0`) with onlink routes through nexthop objects.
    Ipip,
    /// Plain routes via the remote node addresses (shared L2/L3 underlay).
    Direct,
}

/// podmesh node agent: publishes this node into its cluster's mesh etcd,
/// follows the remote clusters listed in the clustermesh Secret, validates
/// their records and programs the cross-cluster datapath.
#[derive(Debug, Clone, Parser)]
#[command(name = "podmesh-agent", version, about, long_about = None)]
pub struct AgentArgs {
    /// YAML file with any of these flags as keys (e.g. `cluster-name: east`); flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This cluster's name (DNS label, 1-32 characters).
    #[arg(long, env = "PODMESH_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// This cluster's ID (1-255, unique in the mesh).
    #[arg(long, env = "PODMESH_CLUSTER_ID")]
    pub cluster_id: Option<u32>,
    /// This node's name (default: $NODE_NAME, then the host name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's underlay address (the tunnel endpoint). Without it (and --pod-cidr) the Node is read from Kubernetes.
    #[arg(long)]
    pub node_ip: Option<IpAddr>,
    /// A Pod CIDR of this node (repeatable).
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<IpNet>,
    /// A Pod CIDR of this whole cluster, published in the cluster record (repeatable).
    #[arg(long = "cluster-pod-cidr", value_name = "CIDR")]
    pub cluster_pod_cidrs: Vec<IpNet>,
    /// A service CIDR of this cluster, published in the cluster record (repeatable).
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<IpNet>,
    /// etcd client YAML of this cluster's own mesh etcd (read-write credentials).
    #[arg(long, value_name = "FILE")]
    pub kvstore_config: Option<PathBuf>,
    /// Directory with one etcd client YAML per remote cluster (the mounted clustermesh Secret).
    #[arg(long, value_name = "DIR")]
    pub clustermesh_config: Option<PathBuf>,
    /// Forwarding mode.
    #[arg(long, value_enum, default_value = "ebpf")]
    pub datapath: DatapathMode,
    /// UDP port of the VXLAN tunnel.
    #[arg(long, default_value_t = 8472)]
    pub tunnel_port: u16,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// Address of the status server (/healthz /readyz /metrics /status).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub status_addr: SocketAddr,
}
