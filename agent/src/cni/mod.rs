//! What the node's own CNI is, and what it means for cross-cluster traffic:
//! a pure function from what was seen on the node ([`NodeObservation`]) to
//! findings ([`CniFinding`]) that say what podmesh did and what the operator
//! must set. Reading the node is in [`observe`]; Calico's IP pools in [`calico`].
//!
//! podmesh never replaces the CNI: it routes remote clusters' Pod CIDRs into
//! its own tunnel device beside it, and keeps pod source addresses with a
//! masquerade exemption (nftables table `inet podmesh`, a nat postrouting
//! chain at priority srcnat-10 that gives connections towards remote Pod
//! CIDRs a null SNAT binding, so the CNI's own MASQUERADE rules in iptables'
//! nat POSTROUTING, priority 100, never see them). What that cannot cover —
//! NAT done in eBPF, forwarding that bypasses the host's routing table — is
//! what the findings' actions are about.
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod calico;
pub mod observe;
mod rules;

use rules::{aws_vpc, calico, cilium, flannel, kube_ipvs, nothing, plugin_finding};
pub use rules::{calico_no_nat_pool, is_calico, is_cilium};

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Nothing to do, or podmesh handles it.
    Info,
    /// The operator must set something, or check something podmesh cannot see.
    Warning,
}

impl Severity {
    /// The stable name (`info`, `warning`), as in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Stable CNI ids, in the order findings are reported.
pub mod id {
    /// flannel (`flannel.1`).
    pub const FLANNEL: &str = "flannel";
    /// Cilium (`cilium_host`, `cilium_net`, `cilium_vxlan`, `cilium_geneve`).
    pub const CILIUM: &str = "cilium";
    /// Calico (`vxlan.calico`, `cali*`, `tunl0` beside them).
    pub const CALICO: &str = "calico";
    /// AWS VPC CNI (`10-aws.conflist`, plugin `aws-cni`, `eni*` devices).
    pub const AWS_VPC: &str = "aws-vpc";
    /// kube-proxy in IPVS mode (`kube-ipvs0`).
    pub const KUBE_IPVS: &str = "kube-ipvs";
    /// The standard `bridge` plugin (also kubenet's `cbr0`, a `cni0` bridge).
    pub const BRIDGE: &str = "bridge";
    /// The standard `ptp` plugin (also kindnet).
    pub const PTP: &str = "ptp";
    /// Nothing recognised.
    pub const NONE: &str = "none";
}

/// One finding about the node's CNI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniFinding {
    /// Stable id of what was recognised (see [`id`]).
    pub cni: String,
    /// `info` or `warning`.
    pub severity: Severity,
    /// What was seen: device names, config files and plugin types, pool names.
    pub evidence: Vec<String>,
    /// What podmesh did about it.
    pub podmesh: String,
    /// What the operator must set (empty: nothing).
    #[serde(default)]
    pub action: String,
}

/// A network device of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkSeen {
    /// Device name.
    pub name: String,
    /// `rtnl_link_ops` kind (`vxlan`, `bridge`, `veth`, `dummy`, …), if any.
    pub kind: Option<String>,
    /// For VXLAN devices: destination UDP port.
    pub vxlan_port: Option<u16>,
    /// For VXLAN devices: VNI (0 for external devices).
    pub vni: Option<u32>,
}

/// One plugin of a CNI network configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginSeen {
    /// The plugin `type`.
    pub ty: String,
    /// Its `ipMasq`, when set.
    pub ip_masq: Option<bool>,
    /// Its `bridge` (the bridge plugin's device name), when set.
    pub bridge: Option<String>,
}

/// One file of the CNI config directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniConfigSeen {
    /// File name (without the directory).
    pub file: String,
    /// The network `name`.
    pub name: Option<String>,
    /// Its plugins (one for a `.conf`, the `plugins` list of a `.conflist`).
    pub plugins: Vec<PluginSeen>,
    /// Why it could not be read or parsed.
    pub error: Option<String>,
}

/// Whether Cilium's BPF host routing is on, from its `node_config.h`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum CiliumHostRouting {
    /// `#define ENABLE_HOST_ROUTING` is there: pod traffic bypasses the host stack.
    Bpf,
    /// The header is there without it: legacy (host stack) routing.
    Legacy,
    /// The header could not be read (this reason).
    #[default]
    Unknown,
}

/// What Cilium left on the node (read only when its devices are there).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CiliumSeen {
    /// From `node_config.h`.
    pub host_routing: CiliumHostRouting,
    /// Where it was looked for, or why it could not be read.
    pub detail: String,
}

/// One Calico IPPool (`crd.projectcalico.org/v1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalicoPool {
    /// `metadata.name`.
    pub name: String,
    /// `spec.cidr`.
    pub cidr: IpNet,
    /// `spec.natOutgoing`.
    pub nat_outgoing: bool,
    /// `spec.disabled`.
    pub disabled: bool,
}

/// Calico's IP pools as far as the agent could read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CalicoPools {
    /// Listed.
    Listed(Vec<CalicoPool>),
    /// Cannot tell (no Kubernetes API, no Calico CRD, forbidden): why.
    Unknown(String),
}

impl Default for CalicoPools {
    fn default() -> Self {
        Self::Unknown("not looked up".into())
    }
}

/// Everything detection looks at, gathered by [`observe`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeObservation {
    /// Devices of the agent's network namespace (the node's, in a DaemonSet with hostNetwork).
    pub links: Vec<LinkSeen>,
    /// Why the devices could not be listed.
    pub links_error: Option<String>,
    /// The CNI config directory (`--cni-conf-dir`).
    pub cni_conf_dir: String,
    /// Its network configurations.
    pub cni_configs: Vec<CniConfigSeen>,
    /// Why the directory could not be read (absent is not an error: empty list).
    pub cni_conf_error: Option<String>,
    /// What Cilium left, when its devices are there.
    pub cilium: CiliumSeen,
    /// Calico's pools, when its devices or config are there.
    pub calico_pools: CalicoPools,
    /// Remote clusters' Pod CIDRs known now.
    pub remote_pod_cidrs: Vec<IpNet>,
    /// The UDP port podmesh's VXLAN tunnel uses (`None`: a mode without VXLAN).
    pub tunnel_port: Option<u16>,
}

impl NodeObservation {
    fn link(&self, name: &str) -> Option<&LinkSeen> {
        self.links.iter().find(|l| l.name == name)
    }

    fn plugins(&self) -> impl Iterator<Item = (&CniConfigSeen, &PluginSeen)> {
        self.cni_configs
            .iter()
            .flat_map(|c| c.plugins.iter().map(move |p| (c, p)))
    }
}

/// Names podmesh gives its own devices: never evidence of another CNI.
fn is_podmesh_device(name: &str) -> bool {
    name.starts_with("podmesh")
}

/// The findings for what was seen, in a stable order: one per recognised
/// CNI (or component), or one `none`.
pub fn detect(obs: &NodeObservation) -> Vec<CniFinding> {
    let mut out = Vec::new();
    out.extend(flannel(obs));
    out.extend(cilium(obs));
    out.extend(calico(obs));
    out.extend(aws_vpc(obs));
    out.extend(kube_ipvs(obs));
    out.extend(plugin_finding(obs, id::BRIDGE));
    out.extend(plugin_finding(obs, id::PTP));
    if out.is_empty() {
        out.push(nothing(obs));
    }
    out
}

/// Parses one CNI network config (`.conf`/`.json`: one plugin; `.conflist`:
/// a `plugins` list). A file that is not JSON is reported, not an error.
pub fn parse_cni_config(file: &str, text: &str) -> CniConfigSeen {
    let mut seen = CniConfigSeen {
        file: file.to_string(),
        ..CniConfigSeen::default()
    };
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            seen.error = Some(format!("not JSON: {e}"));
            return seen;
        }
    };
    seen.name = v.get("name").and_then(|n| n.as_str()).map(str::to_string);
    let plugin = |p: &serde_json::Value| -> Option<PluginSeen> {
        Some(PluginSeen {
            ty: p.get("type")?.as_str()?.to_string(),
            ip_masq: p.get("ipMasq").and_then(serde_json::Value::as_bool),
            bridge: p.get("bridge").and_then(|b| b.as_str()).map(str::to_string),
        })
    };
    match v.get("plugins").and_then(|p| p.as_array()) {
        Some(list) => seen.plugins = list.iter().filter_map(plugin).collect(),
        None => seen.plugins = plugin(&v).into_iter().collect(),
    }
    if seen.plugins.is_empty() {
        seen.error = Some("no plugin type".into());
    }
    seen
}

/// Reads Cilium's `node_config.h` text: `ENABLE_HOST_ROUTING` defined means
/// BPF host routing (Cilium writes it unless enable-host-legacy-routing).
pub fn cilium_host_routing(node_config_h: &str) -> CiliumHostRouting {
    let defined = node_config_h.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("#define") && w.next() == Some("ENABLE_HOST_ROUTING")
    });
    if defined {
        CiliumHostRouting::Bpf
    } else {
        CiliumHostRouting::Legacy
    }
}

/// The links of `links` that are not podmesh's own.
pub fn foreign_links(links: Vec<LinkSeen>) -> Vec<LinkSeen> {
    links
        .into_iter()
        .filter(|l| !is_podmesh_device(&l.name))
        .collect()
}

#[cfg(test)]
mod tests;
