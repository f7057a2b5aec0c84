//! One rule per CNI: from a [`NodeObservation`] to its finding, if the CNI
//! is there. Kept apart from the types so each rule reads in one sitting.
use ipnet::IpNet;

use super::{
    CalicoPools, CiliumHostRouting, CniConfigSeen, CniFinding, LinkSeen, NodeObservation,
    PluginSeen, Severity, id,
};

/// `name (vxlan id 1 dstport 8472)`, as `ip -d link` would say it.
fn describe_link(l: &LinkSeen) -> String {
    match (l.kind.as_deref(), l.vni, l.vxlan_port) {
        (Some("vxlan"), Some(0), Some(port)) => {
            format!("{} (vxlan external dstport {port})", l.name)
        }
        (Some("vxlan"), Some(vni), Some(port)) => {
            format!("{} (vxlan id {vni} dstport {port})", l.name)
        }
        (Some(kind), _, _) => format!("{} ({kind})", l.name),
        (None, _, _) => format!("{} (device)", l.name),
    }
}

fn describe_plugin(c: &CniConfigSeen, p: &PluginSeen) -> String {
    let masq = match p.ip_masq {
        Some(true) => ", ipMasq: true",
        Some(false) => ", ipMasq: false",
        None => "",
    };
    format!("{}: type {}{masq}", c.file, p.ty)
}

/// A VXLAN device of another CNI on podmesh's tunnel port: the hint for the finding.
fn port_clash(obs: &NodeObservation, links: &[&LinkSeen]) -> Option<String> {
    let port = obs.tunnel_port?;
    let l = links.iter().find(|l| l.vxlan_port == Some(port))?;
    Some(format!(
        "{} holds UDP {port}, podmesh's --tunnel-port: podmesh refuses to start its tunnel on it; set --tunnel-port to a free port (e.g. {})",
        l.name,
        if port == 8473 { 8474 } else { 8473 }
    ))
}

const EXEMPTION: &str = "podmesh's masquerade exemption (nftables table inet podmesh, nat postrouting at priority srcnat-10: a null SNAT binding for connections to remote Pod CIDRs) runs before iptables' nat POSTROUTING, so pod source addresses reach the other clusters";

pub(super) fn flannel(obs: &NodeObservation) -> Option<CniFinding> {
    let links: Vec<&LinkSeen> = obs
        .links
        .iter()
        .filter(|l| l.name.starts_with("flannel.") || l.name == "flannel-wg")
        .collect();
    let plugins: Vec<_> = obs.plugins().filter(|(_, p)| p.ty == "flannel").collect();
    if links.is_empty() && plugins.is_empty() {
        return None;
    }
    let mut evidence: Vec<String> = links.iter().map(|l| describe_link(l)).collect();
    evidence.extend(plugins.iter().map(|(c, p)| describe_plugin(c, p)));
    let clash = port_clash(obs, &links);
    Some(CniFinding {
        cni: id::FLANNEL.into(),
        severity: if clash.is_some() {
            Severity::Warning
        } else {
            Severity::Info
        },
        evidence,
        podmesh: format!(
            "flannel's ipMasq (--ip-masq) masquerades pod traffic that leaves flannel's network; {EXEMPTION}. flannel's routes are left untouched. flannel.1 uses VXLAN UDP 8472 and VNI 1 by default, like podmesh, which refuses a port another device holds"
        ),
        action: clash.unwrap_or_default(),
    })
}

pub(super) fn cilium(obs: &NodeObservation) -> Option<CniFinding> {
    let links: Vec<&LinkSeen> = obs
        .links
        .iter()
        .filter(|l| CILIUM_DEVICES.contains(&l.name.as_str()))
        .collect();
    let plugins: Vec<_> = obs
        .plugins()
        .filter(|(_, p)| p.ty == "cilium-cni")
        .collect();
    if !is_cilium(obs) {
        return None;
    }
    let mut evidence: Vec<String> = links.iter().map(|l| describe_link(l)).collect();
    evidence.extend(plugins.iter().map(|(c, p)| describe_plugin(c, p)));
    let routing = match obs.cilium.host_routing {
        CiliumHostRouting::Bpf => "host routing: BPF",
        CiliumHostRouting::Legacy => "host routing: legacy",
        CiliumHostRouting::Unknown => "host routing: unknown",
    };
    evidence.push(format!("{routing} ({})", obs.cilium.detail));
    let masq = format!(
        "put the remote clusters' Pod CIDRs ({}) in Cilium's non-masquerade ranges: enable-ip-masq-agent: true with them in the ip-masq-agent ConfigMap's nonMasqueradeCIDRs (Helm ipMasqAgent.enabled=true, ipMasqAgent.config.nonMasqueradeCIDRs), or an ipv4-native-routing-cidr (Helm ipv4NativeRoutingCIDR) that covers them; Cilium's BPF masquerading (bpf.masquerade=true) happens in eBPF, where podmesh's nftables exemption does not reach",
        cidr_list(&obs.remote_pod_cidrs)
    );
    let legacy = "set enable-host-legacy-routing: true in the cilium-config ConfigMap (Helm bpf.hostLegacyRouting=true) so that Cilium hands pod traffic to the host stack and its routing table, where podmesh's routes are";
    let (severity, action) = match obs.cilium.host_routing {
        CiliumHostRouting::Bpf => (Severity::Warning, format!("{legacy}; {masq}")),
        CiliumHostRouting::Legacy => (Severity::Warning, masq),
        CiliumHostRouting::Unknown => (
            Severity::Warning,
            format!(
                "cannot tell whether Cilium's BPF host routing is on (mount /var/run/cilium into the agent, or run `cilium-dbg status --verbose` and look at Host Routing); if it says BPF, {legacy}; {masq}"
            ),
        ),
    };
    let clash = port_clash(obs, &links);
    Some(CniFinding {
        cni: id::CILIUM.into(),
        severity,
        evidence,
        podmesh: format!(
            "routes to remote Pod CIDRs go into podmesh's device beside Cilium's; Cilium's BPF host routing (on unless enable-host-legacy-routing) forwards pod traffic in eBPF past the host's routing table and netfilter, so neither podmesh's routes nor its exemption apply to it; with legacy routing, {EXEMPTION}. cilium_vxlan uses UDP 8472 by default, like podmesh"
        ),
        action: match clash {
            Some(c) => format!("{c}; {action}"),
            None => action,
        },
    })
}

fn cidr_list(cidrs: &[IpNet]) -> String {
    if cidrs.is_empty() {
        "none known yet".into()
    } else {
        cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The IPPool YAML that exempts `cidr` from Calico's natOutgoing.
pub fn calico_no_nat_pool(cidr: &IpNet) -> String {
    // A DNS subdomain: every run of '.', ':', '/' becomes one '-'.
    let mut name = String::from("podmesh-no-nat-");
    for c in cidr.to_string().chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    format!(
        "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n  disabled: true\n  natOutgoing: false\n"
    )
}

const CALICO_DEVICES: [&str; 4] = [
    "vxlan.calico",
    "vxlan-v6.calico",
    "wireguard.cali",
    "wg-v6.cali",
];

fn is_calico_veth(l: &LinkSeen) -> bool {
    l.name.starts_with("cali") && l.kind.as_deref() == Some("veth")
}

/// Whether Calico's devices or CNI config are on the node.
pub fn is_calico(obs: &NodeObservation) -> bool {
    obs.links
        .iter()
        .any(|l| CALICO_DEVICES.contains(&l.name.as_str()) || is_calico_veth(l))
        || obs.plugins().any(|(_, p)| p.ty == "calico")
}

const CILIUM_DEVICES: [&str; 4] = ["cilium_host", "cilium_net", "cilium_vxlan", "cilium_geneve"];

/// Whether Cilium's devices or CNI config are on the node.
pub fn is_cilium(obs: &NodeObservation) -> bool {
    obs.links
        .iter()
        .any(|l| CILIUM_DEVICES.contains(&l.name.as_str()))
        || obs.plugins().any(|(_, p)| p.ty == "cilium-cni")
}

pub(super) fn calico(obs: &NodeObservation) -> Option<CniFinding> {
    if !is_calico(obs) {
        return None;
    }
    let links: Vec<&LinkSeen> = obs
        .links
        .iter()
        .filter(|l| CALICO_DEVICES.contains(&l.name.as_str()))
        .collect();
    let mut evidence: Vec<String> = links.iter().map(|l| describe_link(l)).collect();
    let veths = obs.links.iter().filter(|l| is_calico_veth(l)).count();
    if veths > 0 {
        evidence.push(format!("{veths} cali* pod veths"));
    }
    // tunl0 is made by the kernel whenever the ipip module loads (and
    // podmesh's own ipip mode uses it): evidence only beside Calico's own.
    if let Some(t) = obs.link("tunl0") {
        evidence.push(format!("{} (IPIP)", t.name));
    }
    evidence.extend(
        obs.plugins()
            .filter(|(_, p)| p.ty == "calico")
            .map(|(c, p)| describe_plugin(c, p)),
    );
    let podmesh = format!(
        "Calico's natOutgoing masquerades traffic from its pools to every destination outside all its IP pools (disabled ones included); in Calico's iptables and nftables data planes {EXEMPTION}; Calico's eBPF data plane masquerades in eBPF, where the exemption does not reach"
    );
    let yaml = |cidrs: &[IpNet]| {
        cidrs
            .iter()
            .map(calico_no_nat_pool)
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let (severity, action) = match &obs.calico_pools {
        CalicoPools::Unknown(why) => {
            evidence.push(format!("IP pools: cannot tell ({why})"));
            (
                Severity::Warning,
                format!(
                    "if an IPPool has natOutgoing: true, create a disabled IPPool with natOutgoing: false for each remote cluster's Pod CIDR ({}), e.g.:\n{}",
                    cidr_list(&obs.remote_pod_cidrs),
                    yaml(&example_cidrs(&obs.remote_pod_cidrs))
                ),
            )
        }
        CalicoPools::Listed(pools) => {
            for p in pools {
                evidence.push(format!(
                    "IPPool {} {}{}{}",
                    p.name,
                    p.cidr,
                    if p.nat_outgoing { " natOutgoing" } else { "" },
                    if p.disabled { " disabled" } else { "" }
                ));
            }
            let masquerading = pools.iter().any(|p| p.nat_outgoing && !p.disabled);
            let uncovered: Vec<IpNet> = obs
                .remote_pod_cidrs
                .iter()
                .filter(|c| {
                    !pools
                        .iter()
                        .any(|p| p.disabled && !p.nat_outgoing && p.cidr.contains(*c))
                })
                .copied()
                .collect();
            if masquerading && !uncovered.is_empty() {
                (
                    Severity::Warning,
                    format!(
                        "Calico masquerades traffic to {}: create a disabled IPPool with natOutgoing: false for each:\n{}",
                        cidr_list(&uncovered),
                        yaml(&uncovered)
                    ),
                )
            } else {
                (Severity::Info, String::new())
            }
        }
    };
    Some(CniFinding {
        cni: id::CALICO.into(),
        severity,
        evidence,
        podmesh,
        action,
    })
}

/// The remote CIDRs, or one placeholder when none is known yet.
fn example_cidrs(cidrs: &[IpNet]) -> Vec<IpNet> {
    if cidrs.is_empty() {
        vec![IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 2, 0, 0), 16).expect("valid prefix"),
        )]
    } else {
        cidrs.to_vec()
    }
}

pub(super) fn aws_vpc(obs: &NodeObservation) -> Option<CniFinding> {
    let mut evidence: Vec<String> = obs
        .plugins()
        .filter(|(_, p)| p.ty == "aws-cni")
        .map(|(c, p)| describe_plugin(c, p))
        .collect();
    evidence.extend(
        obs.cni_configs
            .iter()
            .filter(|c| c.file == "10-aws.conflist" && c.plugins.iter().all(|p| p.ty != "aws-cni"))
            .map(|c| c.file.clone()),
    );
    if evidence.is_empty() {
        return None;
    }
    let enis = obs
        .links
        .iter()
        .filter(|l| l.name.starts_with("eni") && l.kind.as_deref() == Some("veth"))
        .count();
    if enis > 0 {
        evidence.push(format!("{enis} eni* pod veths"));
    }
    Some(CniFinding {
        cni: id::AWS_VPC.into(),
        severity: Severity::Info,
        evidence,
        podmesh: format!(
            "the AWS VPC CNI SNATs pod traffic to destinations outside the VPC (iptables AWS-SNAT-CHAIN in nat POSTROUTING); {EXEMPTION}. For belt and braces, set AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS on the aws-node DaemonSet to the remote clusters' Pod CIDRs ({})",
            cidr_list(&obs.remote_pod_cidrs)
        ),
        action: String::new(),
    })
}

pub(super) fn kube_ipvs(obs: &NodeObservation) -> Option<CniFinding> {
    let l = obs.link("kube-ipvs0")?;
    Some(CniFinding {
        cni: id::KUBE_IPVS.into(),
        severity: Severity::Info,
        evidence: vec![describe_link(l)],
        podmesh: "kube-proxy runs in IPVS mode: it holds the Service IPs on kube-ipvs0, and its KUBE-POSTROUTING chain masquerades only packets it marked (0x4000: Service traffic that needs it, --masquerade-all); pod-to-pod traffic to other clusters is not marked and keeps its source".into(),
        action: String::new(),
    })
}

/// One finding for the `bridge` or `ptp` plugin (`ty`), from the CNI configs
/// and, for the bridge, a `cni0`/`cbr0` bridge device.
pub(super) fn plugin_finding(obs: &NodeObservation, ty: &str) -> Option<CniFinding> {
    let plugins: Vec<_> = obs.plugins().filter(|(_, p)| p.ty == ty).collect();
    let mut evidence: Vec<String> = plugins.iter().map(|(c, p)| describe_plugin(c, p)).collect();
    if ty == id::BRIDGE {
        let mut names: Vec<&str> = vec!["cni0", "cbr0"];
        names.extend(plugins.iter().filter_map(|(_, p)| p.bridge.as_deref()));
        names.sort_unstable();
        names.dedup();
        evidence.extend(
            obs.links
                .iter()
                .filter(|l| names.contains(&l.name.as_str()))
                .map(describe_link),
        );
    }
    if evidence.is_empty() {
        return None;
    }
    let masq = plugins.iter().any(|(_, p)| p.ip_masq == Some(true));
    let kindnet = plugins
        .iter()
        .any(|(c, _)| c.file.contains("kindnet") || c.name.as_deref() == Some("kindnet"));
    if kindnet {
        evidence.push("kindnet".into());
    }
    let podmesh = if masq {
        format!(
            "with ipMasq the {ty} plugin masquerades pod traffic to everything outside the pod's own subnet (a per-pod chain in iptables' nat POSTROUTING); {EXEMPTION}"
        )
    } else {
        format!(
            "the {ty} plugin does not masquerade here (no ipMasq); podmesh's masquerade exemption keeps pod sources should another component masquerade"
        )
    };
    Some(CniFinding {
        cni: ty.into(),
        severity: Severity::Info,
        evidence,
        podmesh,
        action: String::new(),
    })
}

pub(super) fn nothing(obs: &NodeObservation) -> CniFinding {
    let mut evidence: Vec<String> = obs.plugins().map(|(c, p)| describe_plugin(c, p)).collect();
    evidence.extend(
        obs.cni_configs
            .iter()
            .filter_map(|c| c.error.as_ref().map(|e| format!("{}: {e}", c.file))),
    );
    if let Some(e) = &obs.links_error {
        evidence.push(e.clone());
    }
    if let Some(e) = &obs.cni_conf_error {
        evidence.push(format!("{}: {e}", obs.cni_conf_dir));
    } else if obs.cni_configs.is_empty() {
        evidence.push(format!("no CNI network config in {}", obs.cni_conf_dir));
    }
    CniFinding {
        cni: id::NONE.into(),
        severity: Severity::Info,
        evidence,
        podmesh: format!(
            "no known CNI recognised on this node (devices, {}); podmesh routes remote Pod CIDRs into its own device and keeps pod sources with its masquerade exemption whatever the CNI",
            obs.cni_conf_dir
        ),
        action: String::new(),
    }
}
