//! Topology builder: an underlay bridge, clusters of nodes, pods behind a per-node bridge.
//!
//! Addresses come from a small plan: cluster `c` (0-based) node `n` gets the
//! underlay address `172.31.<c+1>.<n+1>/16`, the Pod CIDR block `n` of the
//! cluster's Pod CIDR (a /24 by default), and its pods `.10`, `.11`, … of
//! that block behind the node's bridge `cni0` (gateway `.1`). Same-cluster
//! pod routes (the cluster CNI's job) are installed; cross-cluster ones are
//! what podmesh is for.
use std::net::Ipv4Addr;

use anyhow::Context;
use ipnet::Ipv4Net;

use crate::netns::NetNs;

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
}

impl ClusterPlan {
    /// `nodes` nodes with `pods` pods each, /24 per node.
    pub fn new(name: &str, pod_cidr: &str, nodes: usize, pods: usize) -> Self {
        Self {
            name: name.to_string(),
            pod_cidr: pod_cidr.parse().expect("valid IPv4 CIDR"),
            node_prefix_len: 24,
            nodes,
            pods_per_node: pods,
        }
    }
}

/// A pod: its namespace and address.
#[derive(Debug)]
pub struct Pod {
    /// e.g. `east-n0-p1`.
    pub name: String,
    /// The address on its `eth0`.
    pub addr: Ipv4Addr,
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
    /// Underlay address on `eth0`.
    pub addr: Ipv4Addr,
    /// The node's Pod CIDR.
    pub pod_cidr: Ipv4Net,
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
}

/// Underlay prefix length: all clusters share one L2 segment.
pub const UNDERLAY_PREFIX_LEN: u8 = 16;

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
        let underlay = Self::netns(prefix, "ul")?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let mut topo = Topology {
            nodes: Vec::new(),
            underlay,
            clusters: plans.to_vec(),
            prefix: prefix.map(str::to_string),
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
        ns.ip(&[
            "addr",
            "add",
            &format!("{addr}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
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
        self.attach(&ns, &format!("u{ci}n{ni}"), addr)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // Pods behind a bridge, gateway = first address of the node's block.
        let gw = pod_cidr.hosts().next().context("pod CIDR too small")?;
        ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{gw}/{}", pod_cidr.prefix_len()),
            "dev",
            "cni0",
        ])?;
        ns.ip(&["link", "set", "cni0", "up"])?;
        let mut pods = Vec::new();
        for pi in 0..plan.pods_per_node {
            let pod_name = format!("{name}-p{pi}");
            let pns = Self::netns(self.prefix.as_deref(), &pod_name)?;
            let paddr = pod_cidr
                .hosts()
                .nth(9 + pi)
                .context("pod CIDR too small for pods")?;
            let port = format!("vp{pi}");
            ns.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pns.name(),
            ])?;
            ns.ip(&["link", "set", &port, "master", "cni0", "up"])?;
            pns.ip(&[
                "addr",
                "add",
                &format!("{paddr}/{}", pod_cidr.prefix_len()),
                "dev",
                "eth0",
            ])?;
            pns.ip(&["link", "set", "eth0", "up"])?;
            pns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
            pods.push(Pod {
                name: pod_name,
                addr: paddr,
                ns: pns,
            });
        }
        Ok(Node {
            cluster: plan.name.clone(),
            cluster_index: ci,
            name,
            addr,
            pod_cidr,
            pods,
            ns,
        })
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
            node.ns.ip(&[
                "route",
                "add",
                &other.pod_cidr.to_string(),
                "via",
                &other.addr.to_string(),
            ])?;
            other.ns.ip(&[
                "route",
                "add",
                &node.pod_cidr.to_string(),
                "via",
                &node.addr.to_string(),
            ])?;
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
                a.ns.ip(&[
                    "route",
                    "add",
                    &b.pod_cidr.to_string(),
                    "via",
                    &b.addr.to_string(),
                ])?;
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
        // Skips every NetNs drop; the namespaces outlive this process.
        std::mem::forget(self);
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
