//! Topology builder: an underlay bridge, clusters of nodes, pods attached by the real CNI plugins.
//!
//! Addresses come from a small plan: cluster `c` (0-based) node `n` gets the
//! underlay address `172.31.<c+1>.<n+1>/16` and/or `fd31::<c+1>:<n+1>/64`
//! (the plan's [`Underlay`]), the Pod CIDR block `n` of the
//! cluster's Pod CIDR (a /24 by default), and its pods `.10`, `.11`, … of
//! that block, attached by the standard CNI plugins (`bridge` or `ptp` with
//! `host-local` and `ipMasq`, see [`crate::cni`]; the node's plan says which).
//! Same-cluster pod routes between nodes (the cluster CNI's overlay) are
//! installed; cross-cluster ones are what podmesh is for.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::Context;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    cni::{Cni, CniNetwork},
    netns::NetNs,
};

/// The address families on a cluster's node underlay devices (`eth0`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Underlay {
    /// `172.31.<c+1>.<n+1>/16` only.
    #[default]
    Ipv4,
    /// `fd31::<c+1>:<n+1>/64` only: no IPv4 address on `eth0`.
    Ipv6,
    /// Both.
    Dual,
}

impl Underlay {
    /// Whether nodes have an IPv4 underlay address.
    pub fn has_v4(self) -> bool {
        self != Self::Ipv6
    }

    /// Whether nodes have an IPv6 underlay address.
    pub fn has_v6(self) -> bool {
        self != Self::Ipv4
    }
}

/// A cluster to build.
#[derive(Clone, Debug)]
pub struct ClusterPlan {
    /// Cluster name.
    pub name: String,
    /// The cluster's Pod CIDR, split into per-node blocks.
    pub pod_cidr: Ipv4Net,
    /// Per-node block size.
    pub node_prefix_len: u8,
    /// Number of nodes.
    pub nodes: usize,
    /// Pods per node.
    pub pods_per_node: usize,
    /// The CNI layout of each node, cycled: node `n` runs `cni[n % len]`.
    pub cni: Vec<Cni>,
    /// An IPv6 Pod CIDR (a /48 or shorter) for dual-stack pods: node `n`
    /// gets its `n`-th /64.
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// The address families of the nodes' underlay.
    pub underlay: Underlay,
}

impl ClusterPlan {
    /// `nodes` nodes with `pods` pods each, /24 per node; even nodes on the
    /// `bridge` plugin, odd ones on `ptp`.
    pub fn new(name: &str, pod_cidr: &str, nodes: usize, pods: usize) -> Self {
        Self {
            name: name.to_string(),
            pod_cidr: pod_cidr.parse().expect("valid IPv4 CIDR"),
            node_prefix_len: 24,
            nodes,
            pods_per_node: pods,
            cni: vec![Cni::Bridge, Cni::Ptp],
            pod_cidr_v6: None,
            underlay: Underlay::Ipv4,
        }
    }

    /// The nodes' underlay address families.
    pub fn with_underlay(mut self, underlay: Underlay) -> Self {
        self.underlay = underlay;
        self
    }

    /// Every node of the cluster on these CNI layouts, cycled.
    pub fn with_cni(mut self, cni: &[Cni]) -> Self {
        assert!(!cni.is_empty(), "at least one CNI layout");
        self.cni = cni.to_vec();
        self
    }

    /// Dual-stack pods: node `n` gets the `n`-th /64 of `cidr`.
    pub fn with_ipv6(mut self, cidr: &str) -> Self {
        self.pod_cidr_v6 = Some(cidr.parse().expect("valid IPv6 CIDR"));
        self
    }

    /// The CNI layout of node `n`.
    pub fn cni_of(&self, n: usize) -> Cni {
        self.cni[n % self.cni.len()]
    }
}

/// A pod: its namespace and address.
#[derive(Debug)]
pub struct Pod {
    /// e.g. `east-n0-p1`.
    pub name: String,
    /// The address on its `eth0`.
    pub addr: Ipv4Addr,
    /// Its IPv6 address (dual-stack plans).
    pub addr6: Option<Ipv6Addr>,
    /// The pod's namespace.
    pub ns: NetNs,
}

/// A node: its namespace, underlay address, Pod CIDR and pods.
#[derive(Debug)]
pub struct Node {
    /// Cluster name.
    pub cluster: String,
    /// Cluster index (0-based).
    pub cluster_index: usize,
    /// e.g. `east-n0`.
    pub name: String,
    /// IPv4 underlay address, on `eth0` unless the underlay is IPv6-only.
    pub addr: Ipv4Addr,
    /// IPv6 underlay address on `eth0` (IPv6 and dual-stack underlays).
    pub addr6: Option<Ipv6Addr>,
    /// The address families on `eth0`.
    pub underlay: Underlay,
    /// The node's Pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// The node's IPv6 Pod CIDR (dual-stack plans).
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// The node's pod network (CNI plugin, ranges).
    pub cni: CniNetwork,
    /// Pods attached so far, for the next pod's name.
    pods_made: usize,
    /// The pods (dropped before the node: declared first).
    pub pods: Vec<Pod>,
    /// The node's namespace.
    pub ns: NetNs,
}

/// The whole topology; everything is removed on drop.
#[derive(Debug)]
pub struct Topology {
    /// Nodes of every cluster, cluster by cluster.
    pub nodes: Vec<Node>,
    /// The namespace holding the underlay bridge `br0`.
    pub underlay: NetNs,
    /// The plans it was built from.
    pub clusters: Vec<ClusterPlan>,
    /// Namespace name prefix (`None`: the per-process test names of [`NetNs::new`]).
    prefix: Option<String>,
    /// host-local's lease directories, one per node below it.
    cni_dir: PathBuf,
    /// Removes `cni_dir` on drop (not after [`Topology::detach`]).
    _cni_tmp: Option<tempfile::TempDir>,
}

/// Underlay prefix length: all clusters share one L2 segment.
pub const UNDERLAY_PREFIX_LEN: u8 = 16;
/// IPv6 underlay prefix length (`fd31::/64`): the same segment.
pub const UNDERLAY6_PREFIX_LEN: u8 = 64;

impl Node {
    /// The underlay addresses on `eth0`, IPv4 first.
    pub fn underlay_addrs(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if self.underlay.has_v4() {
            out.push(IpAddr::V4(self.addr));
        }
        out.extend(self.addr6.map(IpAddr::V6));
        out
    }

    /// The address other nodes use as next hop towards this one: IPv4
    /// where it has one.
    pub fn next_hop(&self) -> IpAddr {
        self.underlay_addrs()[0]
    }
}

/// `via` arguments of `ip route` towards `gw` (`via inet6 …` for an IPv6
/// gateway of an IPv4 route).
fn via(gw: IpAddr) -> Vec<String> {
    match gw {
        IpAddr::V4(a) => vec!["via".into(), a.to_string()],
        IpAddr::V6(a) => vec!["via".into(), "inet6".into(), a.to_string()],
    }
}

impl Topology {
    /// Builds the clusters of `plans` on one underlay bridge.
    pub fn build(plans: &[ClusterPlan]) -> anyhow::Result<Self> {
        Self::build_in(None, plans)
    }

    /// Like [`Topology::build`], but every namespace is named `<prefix><tag>`
    /// (`<prefix>ul`, `<prefix>east-n0`, `<prefix>east-n0-p1`), so that a
    /// long-lived topology (the demo) is recognisable and can be found again.
    pub fn build_named(prefix: &str, plans: &[ClusterPlan]) -> anyhow::Result<Self> {
        Self::build_in(Some(prefix), plans)
    }

    /// The namespace names [`Topology::build_named`] creates for `plans`.
    pub fn planned_names(prefix: &str, plans: &[ClusterPlan]) -> Vec<String> {
        let mut names = vec![format!("{prefix}ul")];
        for plan in plans {
            for ni in 0..plan.nodes {
                names.push(format!("{prefix}{}-n{ni}", plan.name));
                for pi in 0..plan.pods_per_node {
                    names.push(format!("{prefix}{}-n{ni}-p{pi}", plan.name));
                }
            }
        }
        names
    }

    /// Creates one more namespace named like this topology's (`<prefix><tag>`,
    /// or a per-process test name), e.g. for a control plane on the underlay.
    pub fn namespace(&self, tag: &str) -> anyhow::Result<NetNs> {
        Self::netns(self.prefix.as_deref(), tag)
    }

    fn netns(prefix: Option<&str>, tag: &str) -> anyhow::Result<NetNs> {
        match prefix {
            Some(p) => NetNs::named(&format!("{p}{tag}")),
            None => NetNs::new(tag),
        }
    }

    fn build_in(prefix: Option<&str>, plans: &[ClusterPlan]) -> anyhow::Result<Self> {
        crate::cni::require_plugins()?;
        let cni_tmp = tempfile::Builder::new().prefix("podmesh-cni-").tempdir()?;
        let underlay = Self::netns(prefix, "ul")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let mut topo = Topology {
            nodes: Vec::new(),
            underlay,
            clusters: plans.to_vec(),
            prefix: prefix.map(str::to_string),
            cni_dir: cni_tmp.path().to_path_buf(),
            _cni_tmp: Some(cni_tmp),
        };
        for (ci, plan) in plans.iter().enumerate() {
            let blocks = plan
                .pod_cidr
                .subnets(plan.node_prefix_len)
                .context("node prefix length longer than the cluster's")?;
            for (ni, block) in blocks.take(plan.nodes).enumerate() {
                let node = topo.add_node(ci, plan, ni, block)?;
                topo.nodes.push(node);
            }
        }
        topo.install_cluster_routes()?;
        Ok(topo)
    }

    /// Plugs namespace `ns` into the underlay bridge: a veth pair whose
    /// bridge end is `port` and whose other end is `eth0` in `ns`, with
    /// `addr` on it.
    pub fn attach(&self, ns: &NetNs, port: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        self.attach_addrs(ns, port, Some(addr), None)
    }

    /// Like [`Topology::attach`], with an IPv4 address, an IPv6 address
    /// (`/64`, no duplicate address detection), or both on `eth0`.
    pub fn attach_addrs(
        &self,
        ns: &NetNs,
        port: &str,
        addr: Option<Ipv4Addr>,
        addr6: Option<Ipv6Addr>,
    ) -> anyhow::Result<()> {
        self.underlay.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.underlay
            .ip(&["link", "set", port, "master", "br0", "up"])?;
        if let Some(addr) = addr {
            ns.ip(&[
                "addr",
                "add",
                &format!("{addr}/{UNDERLAY_PREFIX_LEN}"),
                "dev",
                "eth0",
            ])?;
        }
        if let Some(a6) = addr6 {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a6}/{UNDERLAY6_PREFIX_LEN}"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ns.ip(&["link", "set", "eth0", "up"]).map(drop)
    }

    fn add_node(
        &self,
        ci: usize,
        plan: &ClusterPlan,
        ni: usize,
        pod_cidr: Ipv4Net,
    ) -> anyhow::Result<Node> {
        let name = format!("{}-n{ni}", plan.name);
        let ns = Self::netns(self.prefix.as_deref(), &name)?;
        let addr = Ipv4Addr::new(172, 31, ci as u8 + 1, ni as u8 + 1);
        let addr6 = plan
            .underlay
            .has_v6()
            .then(|| Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, ci as u16 + 1, ni as u16 + 1));
        self.attach_addrs(
            &ns,
            &format!("u{ci}n{ni}"),
            plan.underlay.has_v4().then_some(addr),
            addr6,
        )?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let pod_cidr_v6 = match plan.pod_cidr_v6 {
            Some(v6) => Some(
                v6.subnets(64)
                    .context("IPv6 Pod CIDR longer than /64")?
                    .nth(ni)
                    .context("IPv6 Pod CIDR too small for the nodes")?,
            ),
            None => None,
        };
        if pod_cidr_v6.is_some() || addr6.is_some() {
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        let mut node = Node {
            cluster: plan.name.clone(),
            cluster_index: ci,
            cni: CniNetwork {
                cni: plan.cni_of(ni),
                subnet: pod_cidr,
                subnet_v6: pod_cidr_v6,
                data_dir: self.cni_dir.join(&name),
            },
            name,
            addr,
            addr6,
            underlay: plan.underlay,
            pod_cidr,
            pod_cidr_v6,
            pods_made: 0,
            pods: Vec::new(),
            ns,
        };
        for _ in 0..plan.pods_per_node {
            self.attach_pod(&mut node)?;
        }
        Ok(node)
    }

    /// Creates the next pod of `node` and attaches it with the node's CNI.
    fn attach_pod(&self, node: &mut Node) -> anyhow::Result<()> {
        let pod_name = format!("{}-p{}", node.name, node.pods_made);
        let pns = Self::netns(self.prefix.as_deref(), &pod_name)?;
        let at = node.cni.add(&node.ns, &pns)?;
        node.pods_made += 1;
        node.pods.push(Pod {
            name: pod_name,
            addr: at.addr,
            addr6: at.addr6,
            ns: pns,
        });
        Ok(())
    }

    /// Attaches one more pod to node `node` (CNI `ADD`), as a kubelet does
    /// when a pod is scheduled there.
    pub fn add_pod(&mut self, node: &str) -> anyhow::Result<&Pod> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .with_context(|| format!("no node {node} in this topology"))?;
        let mut n = self.nodes.remove(i);
        let r = self.attach_pod(&mut n);
        self.nodes.insert(i, n);
        r?;
        Ok(self.nodes[i].pods.last().expect("just attached"))
    }

    /// Detaches pod `pod` (CNI `DEL`, which removes its veth, its nat chain
    /// and its address lease) and removes its namespace.
    pub fn remove_pod(&mut self, pod: &str) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.pods.iter().any(|p| p.name == pod))
            .with_context(|| format!("no pod {pod} in this topology"))?;
        let i = node
            .pods
            .iter()
            .position(|p| p.name == pod)
            .expect("found above");
        let p = node.pods.remove(i);
        node.cni.del(&node.ns, &p.ns)
    }

    /// Adds one more node (with the plan's pods per node) to `cluster` at run
    /// time, taking the cluster's next per-node block, and installs the
    /// same-cluster pod routes between it and the cluster's other nodes.
    pub fn add_cluster_node(&mut self, cluster: &str) -> anyhow::Result<&Node> {
        let ci = self
            .clusters
            .iter()
            .position(|p| p.name == cluster)
            .with_context(|| format!("no cluster {cluster} in this topology"))?;
        let plan = self.clusters[ci].clone();
        let ni = self.cluster_nodes(cluster).count();
        let block = plan
            .pod_cidr
            .subnets(plan.node_prefix_len)
            .context("node prefix length longer than the cluster's")?
            .nth(ni)
            .with_context(|| format!("cluster {cluster} has no Pod CIDR block left"))?;
        let node = self.add_node(ci, &plan, ni, block)?;
        for other in self.cluster_nodes(cluster) {
            route_to(&node, other)?;
            route_to(other, &node)?;
        }
        self.nodes.push(node);
        Ok(self.nodes.last().expect("just pushed"))
    }

    /// Same-cluster pod routes between nodes (what the cluster's CNI does).
    fn install_cluster_routes(&self) -> anyhow::Result<()> {
        for a in &self.nodes {
            for b in self
                .nodes
                .iter()
                .filter(|b| b.cluster == a.cluster && b.name != a.name)
            {
                route_to(a, b)?;
            }
        }
        Ok(())
    }

    /// Leaves every namespace in place (no removal on drop) and returns their
    /// names; whoever calls this removes them later (`ip netns del`).
    pub fn detach(self) -> Vec<String> {
        let mut names = vec![self.underlay.name().to_string()];
        for n in &self.nodes {
            names.push(n.ns.name().to_string());
            names.extend(n.pods.iter().map(|p| p.ns.name().to_string()));
        }
        let mut this = self;
        // host-local's leases stay with the namespaces that hold the addresses.
        if let Some(t) = this._cni_tmp.take() {
            let _ = t.keep();
        }
        // Skips every NetNs drop; the namespaces outlive this process.
        std::mem::forget(this);
        names
    }

    /// The nodes of one cluster.
    pub fn cluster_nodes<'a>(&'a self, cluster: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.iter().filter(move |n| n.cluster == cluster)
    }

    /// Every pod of the topology.
    pub fn pods(&self) -> impl Iterator<Item = (&Node, &Pod)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
    }
}

/// On node `a`, the routes of node `b`'s Pod CIDRs (IPv4, and IPv6 when it
/// has one) through `b`'s underlay address.
fn route_to(a: &Node, b: &Node) -> anyhow::Result<()> {
    let mut args: Vec<String> = vec!["route".into(), "add".into(), b.pod_cidr.to_string()];
    args.extend(via(b.next_hop()));
    a.ns.ip(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    if let (Some(v6), Some(gw)) = (b.pod_cidr_v6, b.addr6) {
        a.ns.ip(&[
            "-6",
            "route",
            "add",
            &v6.to_string(),
            "via",
            &gw.to_string(),
        ])?;
    }
    Ok(())
}
