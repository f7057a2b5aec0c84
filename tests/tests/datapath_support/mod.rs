//! Shared by the datapath tests: two clusters of the harness topology, one
//! kernel datapath per node programmed from a desired state computed here.
#![allow(dead_code)]

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, process::Command};

use anyhow::{Context, bail};
use ipnet::IpNet;
use podmesh_agent::{
    config::{DatapathMode, WireguardBackend},
    datapath::{
        Datapath, KernelConfig, KernelDatapath, RemoteRoute, from_config, wireguard::WgConfig,
    },
    model::{UnderlayFamily, parse_wireguard_key},
};
use podmesh_tests::topo::{ClusterPlan, Node, Topology};

/// A private bpffs instance on a temporary directory, unmounted on drop, so
/// pins of one test never meet another's or the host's.
#[derive(Debug)]
pub struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()?;
        if !st.success() {
            bail!("mounting bpffs on {} failed", dir.path().display());
        }
        Ok(Self { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Two clusters (east 10.1.0.0/16, west 10.2.0.0/16) × 2 nodes × 2 pods,
/// and a datapath of `mode` on every node. Fields drop in order: datapaths,
/// then namespaces, then bpffs.
#[derive(Debug)]
pub struct Mesh {
    pub dps: Vec<KernelDatapath>,
    pub topo: Topology,
    pub bpffs: Bpffs,
    pub mode: DatapathMode,
    /// The tunnel endpoints' family.
    pub underlay: UnderlayFamily,
    /// With WireGuard of this backend towards the other cluster (keys under `wg_dir`).
    pub wireguard: Option<WireguardBackend>,
    pub wg_dir: tempfile::TempDir,
    /// The userspace WireGuard program to start (default: the workspace's).
    pub wg_binary: Option<std::path::PathBuf>,
}

impl Mesh {
    pub fn build(mode: DatapathMode) -> anyhow::Result<Self> {
        Self::with_plans(
            mode,
            &[
                ClusterPlan::new("east", "10.1.0.0/16", 2, 2),
                ClusterPlan::new("west", "10.2.0.0/16", 2, 2),
            ],
        )
    }

    /// Like [`Mesh::build`], with dual-stack pods (`fd00:1::/48`, `fd00:2::/48`).
    pub fn build_dual_stack(mode: DatapathMode) -> anyhow::Result<Self> {
        Self::with_plans(
            mode,
            &[
                ClusterPlan::new("east", "10.1.0.0/16", 2, 2).with_ipv6("fd00:1::/48"),
                ClusterPlan::new("west", "10.2.0.0/16", 2, 2).with_ipv6("fd00:2::/48"),
            ],
        )
    }

    pub fn with_plans(mode: DatapathMode, plans: &[ClusterPlan]) -> anyhow::Result<Self> {
        Self::assemble(mode, plans, UnderlayFamily::Ipv4, None)
    }

    /// Like [`Mesh::with_plans`], tunnelling between the nodes' addresses
    /// of `underlay` (the plans give the nodes addresses of that family).
    pub fn with_underlay(
        mode: DatapathMode,
        plans: &[ClusterPlan],
        underlay: UnderlayFamily,
    ) -> anyhow::Result<Self> {
        Self::assemble(mode, plans, underlay, None)
    }

    /// Like [`Mesh::with_plans`], with WireGuard of `backend` between the clusters.
    pub fn with_wireguard(
        mode: DatapathMode,
        plans: &[ClusterPlan],
        wireguard: Option<WireguardBackend>,
    ) -> anyhow::Result<Self> {
        Self::assemble(mode, plans, UnderlayFamily::Ipv4, wireguard)
    }

    fn assemble(
        mode: DatapathMode,
        plans: &[ClusterPlan],
        underlay: UnderlayFamily,
        wireguard: Option<WireguardBackend>,
    ) -> anyhow::Result<Self> {
        let mut mesh = Self::without_datapaths(mode, plans, underlay, wireguard)?;
        mesh.build_datapaths()?;
        Ok(mesh)
    }

    /// The namespaces and directories of a mesh, no datapath built yet (see
    /// [`Mesh::build_datapaths`]): for what must run on the nodes first.
    pub fn without_datapaths(
        mode: DatapathMode,
        plans: &[ClusterPlan],
        underlay: UnderlayFamily,
        wireguard: Option<WireguardBackend>,
    ) -> anyhow::Result<Self> {
        let topo = Topology::build(plans)?;
        let bpffs = Bpffs::new()?;
        Ok(Self {
            dps: Vec::new(),
            topo,
            bpffs,
            mode,
            underlay,
            wireguard,
            wg_dir: tempfile::tempdir()?,
            wg_binary: None,
        })
    }

    /// Builds the datapath of every node that has none yet.
    pub fn build_datapaths(&mut self) -> anyhow::Result<()> {
        for i in self.dps.len()..self.topo.nodes.len() {
            let dp = self.datapath(i)?;
            self.dps.push(dp);
        }
        Ok(())
    }

    /// The datapath configuration of node `i`.
    pub fn config(&self, i: usize) -> KernelConfig {
        let node = &self.topo.nodes[i];
        let mut cfg =
            KernelConfig::new(self.mode).in_netns(format!("/run/netns/{}", node.ns.name()));
        cfg.node_ip = self.underlay.endpoint(&node.underlay_addrs());
        cfg.underlay = self.underlay;
        cfg.pin_dir = self.bpffs.path().join(&node.name);
        cfg.wireguard = self.wireguard.map(|backend| {
            let dir = self.wg_dir.path().join(&node.name);
            WgConfig {
                port: 51871,
                strict: false,
                key_dir: dir.join("keys"),
                run_dir: dir.join("run"),
                backend,
                // The userspace process is started by the datapath, as the agent does.
                userspace_binary: (backend == WireguardBackend::Userspace).then(|| {
                    self.wg_binary.clone().unwrap_or_else(|| {
                        podmesh_tests::mesh::workspace_binary(
                            "podmesh-wireguard",
                            "podmesh-wireguard",
                        )
                        .expect("podmesh-wireguard builds")
                    })
                }),
            }
        });
        cfg
    }

    /// Builds (creates or adopts) the datapath of node `i`.
    pub fn datapath(&self, i: usize) -> anyhow::Result<KernelDatapath> {
        from_config(&self.config(i))
            .with_context(|| format!("datapath of {}", self.topo.nodes[i].name))
    }

    /// What node `i` must install: every node of the other cluster.
    pub fn desired(&self, i: usize) -> Vec<RemoteRoute> {
        let me = &self.topo.nodes[i];
        self.topo
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.cluster != me.cluster)
            .map(|(j, n)| self.route_to(j, n))
            .collect()
    }

    fn route_to(&self, j: usize, n: &Node) -> RemoteRoute {
        RemoteRoute {
            cidr: IpNet::V4(n.pod_cidr),
            cluster: n.cluster.clone(),
            node: n.name.clone(),
            node_addr: self.endpoint(j),
            vtep_mac: self.dps[j].vtep_mac(),
            wireguard_key: self.dps[j]
                .wireguard()
                .and_then(|h| parse_wireguard_key(h.public_key().borrow().as_deref()?)),
        }
    }

    /// Node `j`'s tunnel endpoint: its address of the underlay family.
    pub fn endpoint(&self, j: usize) -> IpAddr {
        let n = &self.topo.nodes[j];
        self.underlay
            .endpoint(&n.underlay_addrs())
            .unwrap_or(IpAddr::V4(n.addr))
    }

    /// [`Mesh::desired`] plus the IPv6 Pod CIDRs of dual-stack nodes.
    pub fn desired_dual(&self, i: usize) -> Vec<RemoteRoute> {
        let me = &self.topo.nodes[i];
        let mut out = self.desired(i);
        for (j, n) in self.topo.nodes.iter().enumerate() {
            if let (true, Some(v6)) = (n.cluster != me.cluster, n.pod_cidr_v6) {
                out.push(RemoteRoute {
                    cidr: IpNet::V6(v6),
                    ..self.route_to(j, n)
                });
            }
        }
        out
    }

    /// The periodic resync: repair the device, prune to the desired set,
    /// then upsert all of it.
    pub async fn resync(&mut self, i: usize) -> anyhow::Result<()> {
        self.dps[i].repair().await?;
        let desired = self.desired(i);
        let keep: BTreeSet<IpNet> = desired.iter().map(|r| r.cidr).collect();
        self.dps[i].prune(&keep).await?;
        self.dps[i].upsert(&desired).await?;
        Ok(())
    }

    pub async fn resync_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.dps.len() {
            self.resync(i).await?;
        }
        Ok(())
    }

    /// Pings every pod of the other cluster from every pod, `size` bytes with
    /// DF set when given; returns the pairs that got no answer.
    pub fn cross_cluster_failures(&self, size: Option<u32>) -> Vec<String> {
        let mut failed = Vec::new();
        for (from_node, from) in self.topo.pods() {
            for (to_node, to) in self.topo.pods() {
                if from_node.cluster == to_node.cluster {
                    continue;
                }
                if !from.ns.ping(&to.addr.to_string(), 2, size) {
                    failed.push(format!("{} -> {} ({})", from.name, to.name, to.addr));
                }
            }
        }
        failed
    }

    /// `ip <args>` inside node `i`.
    pub fn ip(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        self.topo.nodes[i].ns.ip(args)
    }

    /// Index of the node called `name`.
    pub fn index(&self, name: &str) -> usize {
        self.topo
            .nodes
            .iter()
            .position(|n| n.name == name)
            .expect("node exists")
    }
}

/// The podmesh routes (protocol 80) of a node's main table, as `ip` prints them.
pub fn podmesh_routes(mesh: &Mesh, i: usize) -> anyhow::Result<BTreeSet<String>> {
    Ok(mesh
        .ip(i, &["route", "show", "proto", "80"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// `podmesh-wireguard --defer-to-kernel-wireguard` in one namespace, as the
/// DaemonSet's `wireguard` container runs it; killed on drop.
#[derive(Debug)]
pub struct WireguardContainer {
    pub child: Option<std::process::Child>,
    /// Its stderr.
    pub log: PathBuf,
    /// Its `--run-dir` (the UAPI socket's directory).
    pub run_dir: PathBuf,
}

/// What `podmesh-wireguard --defer-to-kernel-wireguard` logs when it stands by.
pub const DEFERS_TO_KERNEL: &str = "the kernel's WireGuard serves this node";

impl WireguardContainer {
    /// Starts it in `ns` with `run_dir` (created), logging to `log`.
    pub fn start(
        ns: &podmesh_tests::netns::NetNs,
        run_dir: &std::path::Path,
        log: &std::path::Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(run_dir)?;
        let bin = podmesh_tests::mesh::workspace_binary("podmesh-wireguard", "podmesh-wireguard")?;
        let err = std::fs::File::create(log)?;
        let child = ns
            .command(&bin.display().to_string())
            .arg("--interface=podmesh-wg")
            .arg(format!("--run-dir={}", run_dir.display()))
            .arg("--defer-to-kernel-wireguard")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .context("starting podmesh-wireguard")?;
        Ok(Self {
            child: Some(child),
            log: log.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
        })
    }

    /// Waits until its log says `line` (fails at once if it exits).
    pub fn wait_for_log(&mut self, line: &str) -> anyhow::Result<()> {
        let log = self.log.clone();
        podmesh_tests::daemon::wait_until(
            "podmesh-wireguard",
            &mut self.child,
            &log,
            std::time::Duration::from_secs(30),
            || std::fs::read_to_string(&log).is_ok_and(|l| l.contains(line)),
        )
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops it with SIGTERM, as the kubelet does, and returns its exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        podmesh_tests::daemon::terminate(&mut child, std::time::Duration::from_secs(10))
    }
}

impl Drop for WireguardContainer {
    fn drop(&mut self) {
        podmesh_tests::daemon::kill(&mut self.child);
    }
}
