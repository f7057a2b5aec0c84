//! Command-line flags of `podmesh-agent` (DESIGN.md, "Commands"), the `--config` YAML file, and the
//! typed, validated [`AgentConfig`] built from them once at start.
use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum, parser::ValueSource};
use ipnet::IpNet;
use podmesh_plumbing::duration;
use podmesh_plumbing::flags::{self, LoadError};

use crate::{
    kvstore::client_config::EtcdClientConfig,
    model::{ClusterName, UnderlayFamily},
};

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

/// Whether traffic to remote clusters' nodes is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptionMode {
    /// In clear, as the datapath sends it.
    None,
    /// WireGuard from node to node for everything sent to a remote cluster's node.
    Wireguard,
}

/// Which WireGuard implementation carries the encrypted traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireguardBackend {
    /// Kernel WireGuard where the kernel has it, else userspace.
    Auto,
    /// Kernel WireGuard, configured over generic netlink.
    Kernel,
    /// The `podmesh-wireguard` process on a TUN device, configured through its UAPI socket.
    Userspace,
}

/// podmesh node agent: publishes this node into its cluster's mesh etcd,
/// follows the remote clusters listed in the clustermesh Secret, validates
/// their records and programs the cross-cluster datapath.
#[derive(Debug, Clone, Parser)]
#[command(name = "podmesh-agent", version, about, long_about = None)]
pub struct AgentArgs {
    /// YAML file with any of these flags as keys (e.g. `cluster-name: east`, `pod-cidr: [10.1.1.0/24]`); flags given on the command line or in the environment win.
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
    /// This node's underlay address (repeatable: one IPv4 and one IPv6 address for a dual-stack underlay; the record carries both, and each node tunnels to the address of its --underlay-family). With --pod-cidr the Node is not read; alone, the Pod CIDRs come from the Kubernetes Node and these addresses replace its InternalIPs of the same family (in a DaemonSet: NODE_IP from the downward API's status.hostIP, `--node-ip=$(NODE_IP)`); without either, both come from the Node.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ip: Vec<IpAddr>,
    /// Address family of the underlay: tunnels and next hops go to the remote nodes' addresses of this family, and a remote node without one is rejected (node-address-family-missing). Default: the family of the first --node-ip; ipv4 when the addresses come from the Kubernetes Node.
    #[arg(long, value_enum, value_name = "FAMILY")]
    pub underlay_family: Option<UnderlayFamily>,
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
    /// VXLAN network identifier (0-16777215).
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// MTU of the underlay network; routes into the tunnel get this minus the encapsulation overhead (VXLAN 50 over IPv4, 70 over IPv6; IPIP 20). Default: the MTU of the device holding --node-ip or, when the Node comes from Kubernetes, of the device the default route leaves by; else 1500.
    #[arg(long, value_name = "BYTES")]
    pub underlay_mtu: Option<u32>,
    /// Directory on a bpffs where the ebpf datapath pins its maps and tc link (the route modes: only the map of which cluster and node each route belongs to). It must outlive the agent (in a DaemonSet: hostPath /sys/fs/bpf) so that forwarding survives a restart and the next agent adopts what it finds; in ebpf mode a bpffs is mounted on its parent when there is none.
    #[arg(long, value_name = "DIR", default_value = podmesh_common::PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// Directory of the node's CNI network configs (*.conf, *.conflist, *.json), read to tell which CNI runs beside podmesh (in a DaemonSet: hostPath /etc/cni/net.d, read-only).
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Cilium's state directory; its globals/node_config.h tells whether Cilium's BPF host routing bypasses podmesh's routes (in a DaemonSet: hostPath /var/run/cilium, read-only).
    #[arg(long, value_name = "DIR", default_value = "/var/run/cilium/state")]
    pub cilium_state_dir: PathBuf,
    /// Address of the status server (/healthz /readyz /metrics /status).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub status_addr: SocketAddr,
    /// TTL of the lease this node's record is bound to (whole seconds: 15s, 1m; a bare number is seconds); the record disappears this long after the agent is gone.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = duration::bare_seconds)]
    pub lease_ttl: Duration,
    /// How long to keep a remote cluster's routes when its etcd comes back empty, so its agents can republish before traffic is withdrawn (60s, 2m; a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration::bare_seconds)]
    pub empty_grace: Duration,
    /// Interval of full resyncs of the datapath: read back, re-apply, prune (60s, 5m; a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration::bare_seconds)]
    pub resync_interval: Duration,
    /// Interval of scans of --clustermesh-config for added, changed or removed remote clusters and rotated certificates (1s, 500ms; a bare number is milliseconds, as the flag's name says).
    #[arg(long, value_name = "DURATION", default_value = "1000ms", value_parser = duration::bare_millis)]
    pub secret_poll_ms: Duration,
    /// Cap of the exponential reconnect backoff towards a remote cluster (30s, 2m; a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration::bare_seconds)]
    pub max_backoff: Duration,
    /// Deadline of a connection attempt to an etcd (the local one and every remote cluster's): TCP connect, TLS handshake and the first answer (10s, 1m). An endpoint that accepts connections and never answers is retried with backoff and reported as timed out.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration::with_unit)]
    pub connect_timeout: Duration,
    /// Encryption of what this node sends to remote clusters' nodes: with wireguard, every remote node that publishes a WireGuard key is reached through the WireGuard device podmesh-wg (kernel WireGuard where the kernel has it, else the podmesh-wireguard process); traffic inside the cluster is untouched.
    #[arg(long, value_enum, default_value = "none")]
    pub encryption: EncryptionMode,
    /// UDP port of WireGuard (--encryption wireguard); the remote nodes send to it.
    #[arg(long, default_value_t = 51871)]
    pub wireguard_port: u16,
    /// With --encryption wireguard: a remote node that publishes no WireGuard key is not programmed (rejected, encryption-required) instead of being reached in clear.
    #[arg(long)]
    pub encryption_strict: bool,
    /// Directory of this node's WireGuard private key (created on first start, mode 0600); it must outlive the agent (in a DaemonSet: a hostPath) so that a restart keeps the key.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/podmesh/wireguard")]
    pub wireguard_key_dir: PathBuf,
    /// Directory of the userspace WireGuard process's UAPI socket (podmesh-wg.sock), shared with it (in a DaemonSet: a hostPath both containers mount).
    #[arg(long, value_name = "DIR", default_value = "/var/run/wireguard")]
    pub wireguard_run_dir: PathBuf,
    /// Which WireGuard to use: kernel (refused where the kernel has no WireGuard), userspace (the podmesh-wireguard process), or auto (kernel where it can, else userspace).
    #[arg(long, value_enum, default_value = "auto")]
    pub wireguard_backend: WireguardBackend,
    /// The podmesh-wireguard program the agent starts when no process serves the UAPI socket; empty: never start one, wait for it (the DaemonSet runs it as a container of its own). Default: next to podmesh-agent, else on PATH.
    #[arg(long, value_name = "FILE", value_parser = path_or_empty)]
    pub wireguard_userspace_binary: Option<PathBuf>,
    /// Program nothing in the kernel; keep the desired routes in memory and show them in /status (testing and dry runs).
    #[arg(long, hide = true)]
    pub datapath_dry_run: bool,
    /// Where `node_name` was set, as [`load_from`] saw it (`None`: the command line).
    #[arg(skip)]
    pub node_name_origin: Option<NodeNameOrigin>,
}

/// Where this node's name came from: said in every message about a Node
/// of that name that cannot be found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeNameOrigin {
    /// `--node-name` on the command line.
    Flag,
    /// The `NODE_NAME` environment variable (the downward API's spec.nodeName in the DaemonSet).
    Env,
    /// `node-name` in the `--config` file.
    ConfigFile,
    /// The host name (`/proc/sys/kernel/hostname`): neither was given.
    HostName,
}

impl std::fmt::Display for NodeNameOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Flag => "--node-name",
            Self::Env => "the NODE_NAME environment variable",
            Self::ConfigFile => "node-name in the --config file",
            Self::HostName => "the host name, as neither NODE_NAME nor --node-name was set",
        })
    }
}

/// Where this node's identity comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeSource {
    /// `--node-ip` and `--pod-cidr` given.
    Static {
        /// The node's addresses (at most one per family), the underlay family's first.
        ips: Vec<IpAddr>,
        /// The node's Pod CIDRs.
        pod_cidrs: Vec<IpNet>,
    },
    /// Read (and watched) from the Kubernetes Node object named `node_name`;
    /// with `addresses` (`--node-ip` alone, e.g. the Pod's `status.hostIP`
    /// from the downward API), those replace the Node's InternalIPs of their
    /// family and only the Pod CIDRs come from the Node.
    Kubernetes {
        /// The addresses given by `--node-ip`, instead of the Node's InternalIPs of their family.
        addresses: Vec<IpAddr>,
    },
}

/// The agent's configuration, typed and validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This cluster.
    pub cluster_name: ClusterName,
    /// This cluster's ID (1-255).
    pub cluster_id: u32,
    /// This node.
    pub node_name: String,
    /// Where `node_name` came from.
    pub node_name_origin: NodeNameOrigin,
    /// Where the node's address and Pod CIDRs come from.
    pub node_source: NodeSource,
    /// The underlay's address family (`--underlay-family`, resolved).
    pub underlay_family: UnderlayFamily,
    /// Declared Pod CIDRs of this cluster.
    pub cluster_pod_cidrs: Vec<IpNet>,
    /// Service CIDRs of this cluster.
    pub service_cidrs: Vec<IpNet>,
    /// The local mesh etcd's client YAML, parsed; `None` runs without publishing.
    pub kvstore_config: Option<KvstoreConfig>,
    /// The clustermesh Secret directory; `None` follows no remote cluster.
    pub clustermesh_config: Option<PathBuf>,
    /// Forwarding mode.
    pub datapath: DatapathMode,
    /// Keep routes in memory only.
    pub datapath_dry_run: bool,
    /// VXLAN UDP port.
    pub tunnel_port: u16,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Underlay MTU; `None`: found from the node's device.
    pub underlay_mtu: Option<u32>,
    /// Pin directory of the ebpf datapath's maps and link.
    pub bpf_pin_dir: PathBuf,
    /// Where the node's CNI network configs are.
    pub cni_conf_dir: PathBuf,
    /// Cilium's state directory.
    pub cilium_state_dir: PathBuf,
    /// Status server address.
    pub status_addr: SocketAddr,
    /// Lease TTL of the node record.
    pub lease_ttl: Duration,
    /// Grace period before pruning a remote that came back empty.
    pub empty_grace: Duration,
    /// Period of full datapath resyncs.
    pub resync_interval: Duration,
    /// Period of Secret directory scans.
    pub secret_poll: Duration,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
    /// Deadline of connect, handshake and first answer towards an etcd.
    pub connect_timeout: Duration,
    /// WireGuard between this node and remote clusters' nodes (`None`: `--encryption none`).
    pub wireguard: Option<crate::datapath::wireguard::WgConfig>,
}

impl AgentConfig {
    /// The node addresses given by `--node-ip`, the underlay family's first.
    pub fn node_ips(&self) -> &[IpAddr] {
        match &self.node_source {
            NodeSource::Static { ips, .. } => ips,
            NodeSource::Kubernetes { addresses } => addresses,
        }
    }

    /// This node's tunnel endpoint, when `--node-ip` gives it.
    pub fn underlay_ip(&self) -> Option<IpAddr> {
        self.underlay_family.endpoint(self.node_ips())
    }
}

/// The local mesh etcd's client YAML (`--kvstore-config`), read and checked
/// with the other flags; its TLS files are read at every connect, so that a
/// rotated certificate is used without a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvstoreConfig {
    /// The file (named in messages; anchors its relative paths).
    pub path: PathBuf,
    /// What it says.
    pub client: EtcdClientConfig,
}

/// A configuration problem; the agent exits 64 with this one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line or the `--config` file does not parse.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A flag has an invalid value.
    #[error("--{flag}: {message}")]
    Invalid {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    fn invalid(flag: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            flag,
            message: message.into(),
        }
    }
}

/// Flags whose relative values in the `--config` file are taken relative to the file.
/// (Not `wireguard-userspace-binary`: a bare program name is looked up on
/// PATH, and the empty value means "start none".)
const PATH_FLAGS: [&str; 6] = [
    "kvstore-config",
    "clustermesh-config",
    "cni-conf-dir",
    "cilium-state-dir",
    "wireguard-key-dir",
    "wireguard-run-dir",
];

/// Parses the process arguments (and `--config`) into a validated config.
/// `--help`/`--version` print and exit here, like clap does.
pub fn load() -> Result<AgentConfig, ConfigError> {
    load_from(std::env::args_os())
}

/// Parses these arguments (first one is the program name) and the `--config` file they name.
pub fn load_from<I, T>(args: I) -> Result<AgentConfig, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let loaded = flags::load(AgentArgs::command(), argv, &PATH_FLAGS)?;
    let args = AgentArgs::from_arg_matches(&loaded.matches)
        .map_err(|e| LoadError::Cli(e.to_string().lines().next().unwrap_or("").into()))?;
    let origin = match loaded.command_line.value_source("node_name") {
        Some(ValueSource::EnvVariable) => NodeNameOrigin::Env,
        _ if loaded.from_file("node_name") => NodeNameOrigin::ConfigFile,
        _ => NodeNameOrigin::Flag,
    };
    AgentArgs {
        node_name_origin: Some(origin),
        ..args
    }
    .validate()
}

/// A path, or the empty string (which clap's path parser refuses).
fn path_or_empty(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn check_cidrs(flag: &'static str, cidrs: &[IpNet]) -> Result<(), ConfigError> {
    for c in cidrs {
        if let Some(problem) = crate::validate::cidr::cidr_problem(c) {
            return Err(ConfigError::invalid(flag, format!("{c}: {problem}")));
        }
    }
    Ok(())
}

impl AgentArgs {
    /// Checks every value once and builds the typed config.
    pub fn validate(self) -> Result<AgentConfig, ConfigError> {
        let name = self.cluster_name.ok_or_else(|| {
            ConfigError::invalid("cluster-name", "required (this cluster's name, e.g. east)")
        })?;
        let cluster_name = ClusterName::new(name)
            .map_err(|e| ConfigError::invalid("cluster-name", e.to_string()))?;
        let cluster_id = self.cluster_id.ok_or_else(|| {
            ConfigError::invalid("cluster-id", "required (1-255, unique in the mesh)")
        })?;
        if !(1..=255).contains(&cluster_id) {
            return Err(ConfigError::invalid(
                "cluster-id",
                format!("{cluster_id} is outside 1-255"),
            ));
        }
        let given = self.node_name.filter(|n| !n.is_empty());
        let node_name_origin = match &given {
            Some(_) => self.node_name_origin.unwrap_or(NodeNameOrigin::Flag),
            None => NodeNameOrigin::HostName,
        };
        // The kubelet lowercases the host name it registers its Node under.
        let node_name = given
            .or_else(|| host_name().map(|h| h.to_ascii_lowercase()))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "node-name",
                    "required when $NODE_NAME and the host name are unset",
                )
            })?;
        if let Some(why) = crate::model::node_name_problem(&node_name) {
            return Err(ConfigError::invalid(
                "node-name",
                format!(
                    "{node_name:?} is not a Kubernetes node name ({why}); give the Node's name (a DNS subdomain: lowercase letters, digits, '-' and '.')"
                ),
            ));
        }
        check_cidrs("pod-cidr", &self.pod_cidrs)?;
        check_cidrs("cluster-pod-cidr", &self.cluster_pod_cidrs)?;
        check_cidrs("service-cidr", &self.service_cidrs)?;
        let mut ips = self.node_ip.clone();
        for (i, a) in ips.iter().enumerate() {
            if let Some(b) = ips[..i]
                .iter()
                .find(|b| UnderlayFamily::of(**b) == UnderlayFamily::of(*a))
            {
                return Err(ConfigError::invalid(
                    "node-ip",
                    format!(
                        "{b} and {a} are both {}; give at most one address per family (one IPv4, one IPv6)",
                        UnderlayFamily::of(*a)
                    ),
                ));
            }
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
                return Err(ConfigError::invalid(
                    "node-ip",
                    format!("{a} cannot be a tunnel endpoint; give the node's underlay address"),
                ));
            }
        }
        let underlay_family = self
            .underlay_family
            .or_else(|| ips.first().map(|a| UnderlayFamily::of(*a)))
            .unwrap_or_default();
        if !ips.is_empty() && underlay_family.endpoint(&ips).is_none() {
            return Err(ConfigError::invalid(
                "underlay-family",
                format!(
                    "{} needs an {underlay_family} --node-ip (given: {})",
                    underlay_family.flag(),
                    ips.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        // The underlay family's address first: the record's readers that
        // take addresses[0] (older agents) tunnel to it.
        ips.sort_by_key(|a| !underlay_family.holds(*a));
        let node_source = match (ips.is_empty(), self.pod_cidrs.is_empty()) {
            (false, false) => NodeSource::Static {
                ips,
                pod_cidrs: self.pod_cidrs.clone(),
            },
            (_, true) => NodeSource::Kubernetes { addresses: ips },
            (true, false) => {
                return Err(ConfigError::invalid(
                    "node-ip",
                    "required with --pod-cidr (or give neither to read the Node from Kubernetes)",
                ));
            }
        };
        for c in &self.pod_cidrs {
            if !self.cluster_pod_cidrs.is_empty()
                && !self.cluster_pod_cidrs.iter().any(|p| p.contains(c))
            {
                return Err(ConfigError::invalid(
                    "pod-cidr",
                    format!("{c} is outside every --cluster-pod-cidr"),
                ));
            }
        }
        let kvstore_config = match self.kvstore_config {
            Some(path) if !path.is_file() => {
                return Err(ConfigError::invalid(
                    "kvstore-config",
                    format!("{} is not a readable file", path.display()),
                ));
            }
            Some(path) => {
                let client = EtcdClientConfig::load(&path)
                    .map_err(|e| ConfigError::invalid("kvstore-config", e.to_string()))?;
                Some(KvstoreConfig { path, client })
            }
            None => None,
        };
        if let Some(p) = &self.clustermesh_config
            && !p.is_dir()
        {
            return Err(ConfigError::invalid(
                "clustermesh-config",
                format!("{} is not a directory", p.display()),
            ));
        }
        if self.vni > 0x00ff_ffff {
            return Err(ConfigError::invalid(
                "vni",
                format!("{} does not fit in 24 bits", self.vni),
            ));
        }
        if !self.bpf_pin_dir.is_absolute() {
            return Err(ConfigError::invalid(
                "bpf-pin-dir",
                format!("{} is not an absolute path", self.bpf_pin_dir.display()),
            ));
        }
        if let Some(m) = self.underlay_mtu
            && !(576..=65535).contains(&m)
        {
            return Err(ConfigError::invalid(
                "underlay-mtu",
                format!("{m} is not an MTU between 576 and 65535"),
            ));
        }
        if self.tunnel_port == 0 {
            return Err(ConfigError::invalid("tunnel-port", "must not be 0"));
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::invalid(
                "lease-ttl",
                "must be at least 2 seconds",
            ));
        }
        if self.lease_ttl.subsec_nanos() != 0 {
            return Err(ConfigError::invalid(
                "lease-ttl",
                "must be whole seconds (etcd leases count seconds)",
            ));
        }
        if self.secret_poll_ms.is_zero() {
            return Err(ConfigError::invalid("secret-poll-ms", "must be positive"));
        }
        if self.max_backoff.is_zero() {
            return Err(ConfigError::invalid("max-backoff", "must be positive"));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::invalid("connect-timeout", "must be positive"));
        }
        if self.resync_interval.is_zero() {
            return Err(ConfigError::invalid("resync-interval", "must be positive"));
        }
        let wireguard = match self.encryption {
            EncryptionMode::None => None,
            EncryptionMode::Wireguard => {
                if self.wireguard_port == 0 {
                    return Err(ConfigError::invalid("wireguard-port", "must not be 0"));
                }
                if self.wireguard_port == self.tunnel_port {
                    return Err(ConfigError::invalid(
                        "wireguard-port",
                        format!("{} is --tunnel-port too", self.wireguard_port),
                    ));
                }
                Some(crate::datapath::wireguard::WgConfig {
                    port: self.wireguard_port,
                    strict: self.encryption_strict,
                    key_dir: self.wireguard_key_dir.clone(),
                    run_dir: self.wireguard_run_dir.clone(),
                    backend: self.wireguard_backend,
                    userspace_binary: match self.wireguard_userspace_binary.clone() {
                        Some(p) if p.as_os_str().is_empty() => None,
                        Some(p) => Some(p),
                        None => Some(crate::datapath::wireguard::default_userspace_binary()),
                    },
                })
            }
        };
        if wireguard.is_none() && self.encryption_strict {
            return Err(ConfigError::invalid(
                "encryption-strict",
                "needs --encryption wireguard",
            ));
        }
        Ok(AgentConfig {
            wireguard,
            cluster_name,
            cluster_id,
            node_name,
            node_name_origin,
            node_source,
            underlay_family,
            cluster_pod_cidrs: self.cluster_pod_cidrs,
            service_cidrs: self.service_cidrs,
            kvstore_config,
            clustermesh_config: self.clustermesh_config,
            datapath: self.datapath,
            datapath_dry_run: self.datapath_dry_run,
            tunnel_port: self.tunnel_port,
            vni: self.vni,
            underlay_mtu: self.underlay_mtu,
            bpf_pin_dir: self.bpf_pin_dir,
            cni_conf_dir: self.cni_conf_dir,
            cilium_state_dir: self.cilium_state_dir,
            status_addr: self.status_addr,
            lease_ttl: self.lease_ttl,
            empty_grace: self.empty_grace,
            resync_interval: self.resync_interval,
            secret_poll: self.secret_poll_ms,
            max_backoff: self.max_backoff,
            connect_timeout: self.connect_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec![
            "podmesh-agent",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--node-name",
            "n1",
        ]
    }

    #[test]
    fn flags_only() {
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.0/24"]);
        let c = load_from(a).unwrap();
        assert_eq!(c.cluster_name.as_str(), "east");
        assert!(matches!(c.node_source, NodeSource::Static { .. }));
    }

    /// `--node-ip` alone (a DaemonSet's status.hostIP): the Node gives the
    /// Pod CIDRs, the flag the address; `--pod-cidr` alone is still refused.
    #[test]
    fn node_ip_alone_reads_the_pod_cidrs_from_the_node() {
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10"]);
        let c = load_from(a).unwrap();
        assert_eq!(
            c.node_source,
            NodeSource::Kubernetes {
                addresses: vec!["192.168.1.10".parse().unwrap()]
            }
        );
        let mut a = base();
        a.extend(["--pod-cidr", "10.1.1.0/24"]);
        assert!(load_from(a).unwrap_err().to_string().contains("node-ip"));
    }

    /// `--node-ip` once per family; the underlay family defaults to the
    /// first one's and its address is published first.
    #[test]
    fn dual_stack_node_addresses_and_underlay_family() {
        let mut a = base();
        a.extend([
            "--node-ip",
            "fd00::a",
            "--node-ip",
            "192.168.1.10",
            "--pod-cidr",
            "10.1.1.0/24",
        ]);
        let c = load_from(a.clone()).unwrap();
        assert_eq!(c.underlay_family, UnderlayFamily::Ipv6);
        assert_eq!(c.underlay_ip(), Some("fd00::a".parse().unwrap()));
        a.extend(["--underlay-family", "ipv4"]);
        let c = load_from(a).unwrap();
        assert_eq!(c.underlay_family, UnderlayFamily::Ipv4);
        assert_eq!(
            c.node_ips(),
            [
                "192.168.1.10".parse::<IpAddr>().unwrap(),
                "fd00::a".parse().unwrap()
            ]
        );
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--node-ip", "192.168.1.11"]);
        assert!(
            load_from(a)
                .unwrap_err()
                .to_string()
                .contains("one address per family")
        );
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--underlay-family", "ipv6"]);
        assert!(
            load_from(a)
                .unwrap_err()
                .to_string()
                .starts_with("--underlay-family")
        );
        let c = load_from(base()).unwrap();
        assert_eq!(c.underlay_family, UnderlayFamily::Ipv4);
    }

    #[test]
    fn file_values_and_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "cluster-name: west\ncluster-id: 7\nnode-name: n9\nnode-ip: 10.0.0.1\npod-cidr: [10.2.1.0/24, 10.2.2.0/24]\nvni: 42\ndatapath-dry-run: true\n",
        )
        .unwrap();
        let c = load_from([
            "podmesh-agent",
            "--config",
            f.to_str().unwrap(),
            "--cluster-id",
            "3",
        ])
        .unwrap();
        assert_eq!(c.cluster_name.as_str(), "west");
        assert_eq!(c.cluster_id, 3);
        assert_eq!(c.vni, 42);
        assert!(c.datapath_dry_run);
        match c.node_source {
            NodeSource::Static { pod_cidrs, .. } => assert_eq!(pod_cidrs.len(), 2),
            NodeSource::Kubernetes { .. } => panic!("expected static"),
        }
    }

    #[test]
    fn errors_name_the_flag() {
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.1/24"]);
        let e = load_from(a).unwrap_err().to_string();
        assert!(e.starts_with("--pod-cidr:"), "{e}");
        let e = load_from([
            "podmesh-agent",
            "--cluster-name",
            "East",
            "--cluster-id",
            "1",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--cluster-name:"), "{e}");
        let mut a = base();
        a[4] = "300";
        let e = load_from(a).unwrap_err().to_string();
        assert!(e.starts_with("--cluster-id:"), "{e}");
        let e = load_from(["podmesh-agent", "--vni", "x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--vni"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn bpf_pin_dir_defaults_to_sys_fs_bpf_and_must_be_absolute() {
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.0/24"]);
        let c = load_from(a.clone()).unwrap();
        assert_eq!(c.bpf_pin_dir, PathBuf::from("/sys/fs/bpf/podmesh"));
        let mut b = a.clone();
        b.extend(["--bpf-pin-dir", "/run/podmesh/bpf/podmesh"]);
        assert_eq!(
            load_from(b).unwrap().bpf_pin_dir,
            PathBuf::from("/run/podmesh/bpf/podmesh")
        );
        a.extend(["--bpf-pin-dir", "bpf/podmesh"]);
        let e = load_from(a).unwrap_err().to_string();
        assert!(e.starts_with("--bpf-pin-dir:"), "{e}");
    }

    /// clap's consistency checks, and a description for every flag in `--help`.
    #[test]
    fn every_flag_is_consistent_and_documented() {
        let cmd = AgentArgs::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments() {
            if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
                continue;
            }
            assert!(
                arg.get_help().is_some(),
                "--{} has no description in --help",
                arg.get_id()
            );
        }
    }

    #[test]
    fn underlay_mtu_is_optional_and_bounded() {
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.0/24"]);
        assert_eq!(load_from(a.clone()).unwrap().underlay_mtu, None);
        let mut b = a.clone();
        b.extend(["--underlay-mtu", "1460"]);
        assert_eq!(load_from(b).unwrap().underlay_mtu, Some(1460));
        a.extend(["--underlay-mtu", "60"]);
        let e = load_from(a).unwrap_err().to_string();
        assert!(e.starts_with("--underlay-mtu:"), "{e}");
    }

    #[test]
    fn durations_take_units_and_the_bare_numbers_of_before() {
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.0/24"]);
        let c = load_from(a.clone()).unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(15));
        assert_eq!(c.secret_poll, Duration::from_secs(1));
        assert_eq!(c.max_backoff, Duration::from_secs(30));
        let mut b = a.clone();
        b.extend([
            "--lease-ttl",
            "20",
            "--secret-poll-ms",
            "250",
            "--max-backoff",
            "2m",
        ]);
        b.extend(["--empty-grace", "1m30s", "--resync-interval", "10s"]);
        let c = load_from(b).unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(20));
        assert_eq!(c.secret_poll, Duration::from_millis(250));
        assert_eq!(c.max_backoff, Duration::from_secs(120));
        assert_eq!(c.empty_grace, Duration::from_secs(90));
        assert_eq!(c.resync_interval, Duration::from_secs(10));
        let mut b = a.clone();
        b.extend(["--lease-ttl", "1500ms"]);
        let e = load_from(b).unwrap_err().to_string();
        assert!(e.starts_with("--lease-ttl:"), "{e}");
        a.extend(["--max-backoff", "soon"]);
        let e = load_from(a).unwrap_err().to_string();
        assert!(e.contains("--max-backoff") && e.contains("10s"), "{e}");
    }

    #[test]
    fn the_kvstore_config_is_parsed_with_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let kv = dir.path().join("kv.yaml");
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.0/24"]);
        a.extend(["--kvstore-config", kv.to_str().unwrap()]);
        std::fs::write(
            &kv,
            "endpoints: [https://mesh:2379]\ntrusted-ca-file: ca.crt\n",
        )
        .unwrap();
        let c = load_from(a.clone()).unwrap().kvstore_config.unwrap();
        assert_eq!(c.path, kv);
        assert_eq!(c.client.trusted_ca_file, Some(dir.path().join("ca.crt")));
        std::fs::write(&kv, "endpoints: [mesh:2379]\n").unwrap();
        let e = load_from(a).unwrap_err().to_string();
        assert!(
            e.starts_with("--kvstore-config:") && e.contains("kv.yaml"),
            "{e}"
        );
        assert!(e.contains("needs a scheme"), "{e}");
    }

    #[test]
    fn encryption_flags() {
        let mut a = base();
        a.extend(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.0/24"]);
        assert!(load_from(a.clone()).unwrap().wireguard.is_none());
        let mut strict_alone = a.clone();
        strict_alone.push("--encryption-strict");
        let e = load_from(strict_alone).unwrap_err().to_string();
        assert!(e.starts_with("--encryption-strict:"), "{e}");
        let mut wg = a.clone();
        wg.extend(["--encryption", "wireguard", "--encryption-strict"]);
        let c = load_from(wg.clone()).unwrap().wireguard.unwrap();
        assert_eq!(c.port, 51871);
        assert!(c.strict);
        assert_eq!(c.key_dir, PathBuf::from("/var/lib/podmesh/wireguard"));
        assert_eq!(
            c.socket(),
            PathBuf::from("/var/run/wireguard/podmesh-wg.sock")
        );
        assert!(c.userspace_binary.is_some());
        let mut external = wg.clone();
        external.extend(["--wireguard-userspace-binary", ""]);
        assert!(
            load_from(external)
                .unwrap()
                .wireguard
                .unwrap()
                .userspace_binary
                .is_none()
        );
        // As the DaemonSet's config file says it: the userspace WireGuard is a container.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "encryption: wireguard\nwireguard-userspace-binary: \"\"\nwireguard-run-dir: /var/run/wireguard\n",
        )
        .unwrap();
        let mut file = a.clone();
        file.extend(["--config", f.to_str().unwrap()]);
        let c = load_from(file).unwrap().wireguard.unwrap();
        assert!(c.userspace_binary.is_none());
        assert_eq!(c.run_dir, PathBuf::from("/var/run/wireguard"));
        wg.extend(["--wireguard-port", "8472"]);
        let e = load_from(wg).unwrap_err().to_string();
        assert!(e.starts_with("--wireguard-port:"), "{e}");
    }

    #[test]
    fn unknown_file_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "cluster-nam: west\n").unwrap();
        let e = load_from(["podmesh-agent", "--config", f.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key \"cluster-nam\""), "{e}");
    }
}
