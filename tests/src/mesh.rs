//! A whole mesh: clusters of nodes and pods, a mesh etcd and proxy per cluster, agents.
//!
//! Per cluster: a control-plane namespace on the underlay (`172.31.<c+1>.250`,
//! or `fd31::<c+1>:250` when the underlay has IPv6: then etcd and the proxy
//! are reached over IPv6)
//! running the cluster's mesh etcd (mTLS) and a `podmesh-etcd-proxy` in
//! front of it (port 2379 on that address, its own CA), a clustermesh
//! directory laid out like a mounted Kubernetes Secret (`..data` symlink
//! swapped on every change) with one etcd client YAML per remote cluster,
//! and one `podmesh-agent` per node, running inside the node's namespace
//! with static node information and its status server on the node's
//! loopback. Only addresses inside namespaces this fixture creates are
//! used.
//!
//! Each node has its own bpffs, mounted by the fixture on a directory it
//! owns and handed to the agent with `--bpf-pin-dir`, like the host's
//! `/sys/fs/bpf` a DaemonSet mounts: it outlives the agent process, so a
//! killed agent's pins (and the forwarding they keep alive) stay for the next
//! one. (`ip netns exec` gives each process a private `/sys`; a bpffs mounted
//! there would die with the agent.)
//!
//! The end-to-end tests and `cargo xtask demo` both run it. Everything is
//! stopped and removed on drop, also after a panic, unless
//! [`Mesh::into_kept`] hands it over: then it keeps running and the
//! returned [`Kept`] names every namespace, process, mount and directory it made,
//! so that [`Kept::remove`] (the demo's `down`) removes exactly those.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::{
    etcd::{Etcd, http_get, write_client_config},
    netns::{self, NetNs},
    pki::Pki,
    topo::{ClusterPlan, Node, Pod, Topology, Underlay},
};

/// `ip` as the host of a URL: `[v6]` in brackets.
pub fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// Port of every agent's status server (on its node's loopback).
pub const STATUS_PORT: u16 = 9090;
/// Port the proxies serve remote clusters on (on the control-plane address).
pub const PROXY_PORT: u16 = 2379;
/// Port of every proxy's metrics/health server (on its namespace's loopback).
pub const PROXY_METRICS_PORT: u16 = 9091;

/// A workspace binary of package `package`, built once per test process
/// with the profile the tests run in (tests cannot use `CARGO_BIN_EXE_*`
/// for another package's binaries). Where no cargo runs (`cargo xtask
/// vm-test`'s guest), `$PODMESH_BIN_DIR` holds the binaries built beforehand.
pub fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PODMESH_BIN_DIR") {
        let p = PathBuf::from(dir).join(bin);
        anyhow::ensure!(p.is_file(), "{} missing (PODMESH_BIN_DIR)", p.display());
        return Ok(p);
    }
    static BUILT: OnceLock<std::sync::Mutex<BTreeMap<String, Result<PathBuf, String>>>> =
        OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .expect("binary lock");
    let r = built
        .entry(format!("{package}/{bin}"))
        .or_insert_with(|| build_binary(package, bin));
    r.clone().map_err(anyhow::Error::msg)
}

fn build_binary(package: &str, bin: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("test binary has no target dir")?
        .to_path_buf();
    let target = profile_dir.parent().ok_or("no target dir")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Cargo gives the test its package's variables; build scripts that
    // watch them (ring's watches CARGO_MANIFEST_DIR) would rebuild on every
    // alternation with a plain `cargo build`.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    let st = cmd
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--bin",
            bin,
            "--profile",
            &profile,
        ])
        .env("CARGO_TARGET_DIR", target)
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !st.success() {
        return Err(format!("cargo build -p {package} --bin {bin} failed: {st}"));
    }
    Ok(profile_dir.join(bin))
}

/// Runs `f` on a thread inside namespace `name` (processes it spawns are
/// born there), without taking ownership of the namespace.
pub fn in_netns<T: Send>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = NetNs::adopt(name);
            let entered = ns.enter();
            // Adopted only to enter it: never delete it here.
            std::mem::forget(ns);
            let _guard = entered?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread inside {name} panicked"))?
    })
}

/// The clustermesh Secret of one cluster, as the kubelet mounts it: the
/// files live in `..<generation>/`, `..data` points at the current one and
/// every visible name is a symlink through `..data`.
#[derive(Debug)]
struct SecretDir {
    root: PathBuf,
    generation: u32,
    /// Every file, by name (also those of removed clusters).
    files: BTreeMap<String, Vec<u8>>,
    /// Clusters currently left out.
    removed: BTreeSet<String>,
}

impl SecretDir {
    fn visible(&self) -> BTreeMap<&String, &Vec<u8>> {
        self.files
            .iter()
            .filter(|(n, _)| {
                !self
                    .removed
                    .iter()
                    .any(|r| *n == r || n.starts_with(&format!("{r}.")))
            })
            .collect()
    }

    /// Writes a new generation and swaps `..data` to it atomically.
    fn publish(&mut self) -> anyhow::Result<()> {
        self.generation += 1;
        let data = format!("..2026_{}", self.generation);
        std::fs::create_dir_all(self.root.join(&data))?;
        let visible = self.visible();
        for (n, c) in &visible {
            std::fs::write(self.root.join(&data).join(n), c)?;
        }
        let tmp = self.root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&data, &tmp)?;
        std::fs::rename(&tmp, self.root.join("..data"))?;
        for n in visible.keys() {
            let link = self.root.join(n);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(n), &link)?;
            }
        }
        for e in std::fs::read_dir(&self.root)?.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if !n.starts_with("..") && !visible.contains_key(&n) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }
}

/// The programs a mesh runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `podmesh-agent`.
    pub agent: PathBuf,
    /// `podmesh-etcd-proxy`.
    pub proxy: PathBuf,
    /// The `podmesh` CLI; built on first use when not given.
    pub cli: Option<PathBuf>,
}

impl Binaries {
    /// The workspace's agent and proxy, built for the profile the calling
    /// test runs in ([`workspace_binary`]).
    pub fn workspace() -> anyhow::Result<Self> {
        Ok(Self {
            agent: workspace_binary("podmesh-agent", "podmesh-agent")?,
            proxy: workspace_binary("podmesh-etcd-proxy", "podmesh-etcd-proxy")?,
            cli: None,
        })
    }
}

/// How to build a [`Mesh`]: clusters, pods per node, datapath, names and
/// places. Start from [`Mesh::builder`].
#[derive(Clone, Debug)]
pub struct MeshBuilder {
    clusters: Vec<(String, usize)>,
    pods: usize,
    datapath: String,
    prefix: Option<String>,
    parent: Option<PathBuf>,
    bins: Option<Binaries>,
    quick_retries: bool,
    agent_args: Vec<String>,
    cni: Option<Vec<crate::cni::Cni>>,
    underlay: Underlay,
    dual_stack_pods: bool,
}

impl MeshBuilder {
    /// The address families of every node's and control plane's underlay
    /// (default IPv4). With IPv6, the mesh etcds and proxies listen on the
    /// control planes' IPv6 addresses, and the agents get every node
    /// address (`--node-ip` per family).
    pub fn underlay(mut self, underlay: Underlay) -> Self {
        self.underlay = underlay;
        self
    }

    /// Dual-stack pods: cluster `i` also gets the IPv6 Pod CIDR
    /// `fd00:<i+1>::/48`, node `n` its `n`-th /64.
    pub fn dual_stack_pods(mut self) -> Self {
        self.dual_stack_pods = true;
        self
    }

    /// Adds cluster `name` with `nodes` nodes. Cluster `i` (0-based, in the
    /// order added) gets ID `i+1` and Pod CIDR `10.<i+1>.0.0/16`. A cluster
    /// without nodes runs only its control plane: its mesh etcd is what a
    /// test writes into.
    pub fn cluster(mut self, name: &str, nodes: usize) -> Self {
        self.clusters.push((name.to_string(), nodes));
        self
    }

    /// Pods per node (default 2).
    pub fn pods(mut self, pods: usize) -> Self {
        self.pods = pods;
        self
    }

    /// The CNI layouts of every cluster's nodes, cycled (default: node 0 on
    /// `bridge`, node 1 on `ptp`, …).
    pub fn cni(mut self, cni: &[crate::cni::Cni]) -> Self {
        self.cni = Some(cni.to_vec());
        self
    }

    /// The agents' `--datapath` (default `ebpf`).
    pub fn datapath(mut self, datapath: &str) -> Self {
        self.datapath = datapath.to_string();
        self
    }

    /// Names every namespace `<prefix><tag>` (`<prefix>east-n0`,
    /// `<prefix>east-cp`) instead of per-process test names, so that a
    /// long-lived mesh is recognisable.
    pub fn namespace_prefix(mut self, prefix: &str) -> Self {
        self.prefix = Some(prefix.to_string());
        self
    }

    /// Keeps certificates, configs, logs and etcd data in `<parent>/mesh`
    /// (which must not exist yet) instead of a new temp dir.
    pub fn dir_in(mut self, parent: &Path) -> Self {
        self.parent = Some(parent.to_path_buf());
        self
    }

    /// Runs these programs (default: [`Binaries::workspace`]).
    pub fn binaries(mut self, bins: Binaries) -> Self {
        self.bins = Some(bins);
        self
    }

    /// Whether agents scan the Secret every 200 ms and agents and proxies
    /// back off at most 2 s (default `true`: tests see changes quickly).
    /// With `false` they run with the defaults a user gets.
    pub fn quick_retries(mut self, quick: bool) -> Self {
        self.quick_retries = quick;
        self
    }

    /// Extra flags for every agent, after the ones the mesh gives (e.g.
    /// `--resync-interval 1`).
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The address plan of the clusters (per-node /24 blocks).
    pub fn plans(&self) -> Vec<ClusterPlan> {
        self.clusters
            .iter()
            .enumerate()
            .map(|(i, (n, nodes))| {
                let mut plan =
                    ClusterPlan::new(n, &format!("10.{}.0.0/16", i + 1), *nodes, self.pods)
                        .with_underlay(self.underlay);
                if self.dual_stack_pods {
                    plan = plan.with_ipv6(&format!("fd00:{}::/48", i + 1));
                }
                match &self.cni {
                    Some(cni) => plan.with_cni(cni),
                    None => plan,
                }
            })
            .collect()
    }

    /// Creates the namespaces (underlay, nodes, pods, control planes) and
    /// the directory; nothing runs yet. Continue with
    /// [`Mesh::start_kvstores`], [`Mesh::start_proxies`], [`Mesh::start_agents`].
    pub fn create(self) -> anyhow::Result<Mesh> {
        let bins = match self.bins.clone() {
            Some(b) => b,
            None => Binaries::workspace()?,
        };
        let plans = self.plans();
        let dir = match &self.parent {
            Some(p) => {
                std::fs::create_dir_all(p)?;
                tempfile::Builder::new()
                    .prefix("mesh")
                    .rand_bytes(0)
                    .tempdir_in(p)
                    .with_context(|| format!("creating {}/mesh", p.display()))?
            }
            None => tempfile::Builder::new().prefix("podmesh-mesh-").tempdir()?,
        };
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let topo = match &self.prefix {
            Some(p) => Topology::build_named(p, &plans)?,
            None => Topology::build(&plans)?,
        };
        let mut mesh = Mesh {
            agents: Vec::new(),
            bpffs: BTreeMap::new(),
            clusters: Vec::new(),
            topo,
            datapath: self.datapath,
            bins,
            quick_retries: self.quick_retries,
            agent_args: self.agent_args,
            node_args: BTreeMap::new(),
            dir,
        };
        for (ci, plan) in plans.iter().enumerate() {
            let c = mesh.add_control_plane(ci, plan)?;
            mesh.clusters.push(c);
        }
        Ok(mesh)
    }

    /// [`MeshBuilder::create`], then every mesh etcd, proxy and agent.
    pub fn start(self) -> anyhow::Result<Mesh> {
        let mut mesh = self.create()?;
        mesh.start_kvstores()?;
        mesh.start_proxies()?;
        mesh.start_agents()?;
        Ok(mesh)
    }
}

/// A cluster's mesh etcd and what is derived from it.
#[derive(Debug)]
struct Kvstore {
    /// The agents' client YAML (read-write).
    agents: PathBuf,
    /// The proxy's upstream client YAML.
    upstream: PathBuf,
    /// The proxy's CA: signs its server certificate and the remote clusters' client certificates.
    proxy_pki: Arc<Pki>,
    etcd: Etcd,
}

/// One cluster's control plane.
#[derive(Debug)]
struct ClusterCp {
    name: String,
    id: u8,
    pod_cidr: Ipv4Net,
    pod_cidr_v6: Option<Ipv6Net>,
    cp_ip: IpAddr,
    dir: PathBuf,
    secret: SecretDir,
    // Dropped in this order: the proxy, etcd, the namespace.
    proxy: Option<Owned>,
    kv: Option<Kvstore>,
    cp: NetNs,
}

impl ClusterCp {
    fn kv(&self) -> anyhow::Result<&Kvstore> {
        self.kv
            .as_ref()
            .with_context(|| format!("the mesh etcd of {} is not started", self.name))
    }
}

/// A running agent.
#[derive(Debug)]
struct AgentProc {
    node: String,
    child: Owned,
}

/// A child process, killed (SIGKILL) and reaped when dropped unless released.
#[derive(Debug)]
struct Owned(Option<Child>);

impl Owned {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("released only when consumed")
    }

    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Lets the process outlive this value; returns its ID.
    fn release(mut self) -> u32 {
        self.0.take().map_or(0, |c| c.id())
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A bpffs mount, detached when dropped unless released.
#[derive(Debug)]
struct Mount(Option<PathBuf>);

impl Mount {
    /// Mounts a new bpffs on `dir` (created if needed).
    fn bpffs(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        nix::mount::mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a bpffs on {}", dir.display()))?;
        Ok(Self(Some(dir.to_path_buf())))
    }

    /// Leaves it mounted; returns the mount point.
    fn release(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Releases the pins; what they kept attached goes with the namespaces.
        if let Some(d) = self.0.take() {
            let _ = nix::mount::umount2(&d, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// One cluster's control plane, as the demo shows it.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// Cluster name.
    pub cluster: String,
    /// Cluster ID.
    pub id: u8,
    /// The cluster's Pod CIDR.
    pub pod_cidr: Ipv4Net,
    /// The namespace holding its mesh etcd and proxy.
    pub namespace: String,
    /// Its underlay address (IPv6 when the underlay has IPv6).
    pub address: IpAddr,
    /// `https://<address>:<port>` of the mesh etcd, once started.
    pub etcd_endpoint: Option<String>,
    /// `https://<address>:2379`, where the other clusters reach its proxy.
    pub proxy_endpoint: String,
    /// Its clustermesh Secret directory (what the agents of this cluster read).
    pub secret_dir: PathBuf,
}

/// A process a kept mesh left running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptProcess {
    /// Its process ID.
    pub pid: u32,
    /// The program it runs (its file name identifies it again, since a PID may be reused).
    pub program: PathBuf,
}

/// Everything a kept mesh consists of ([`Mesh::into_kept`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// Network namespaces, in creation order.
    pub namespaces: Vec<String>,
    /// Agents, proxies and mesh etcds.
    pub processes: Vec<KeptProcess>,
    /// The nodes' bpffs mounts (inside `dir`).
    pub mounts: Vec<PathBuf>,
    /// The directory with certificates, configs, logs and etcd data.
    pub dir: Option<PathBuf>,
}

impl Kept {
    /// Stops the processes (only those still running their recorded
    /// program), deletes the namespaces with whatever still runs inside
    /// them, detaches the mounts and removes the directory. Keeps going after a failure and
    /// returns them all.
    pub fn remove(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut killed = Vec::new();
        for p in &self.processes {
            let exe = std::fs::read_link(format!("/proc/{}/exe", p.pid)).unwrap_or_default();
            if exe.file_name().is_some() && exe.file_name() == p.program.file_name() {
                let _ = Command::new("kill")
                    .args(["-9", &p.pid.to_string()])
                    .status();
                killed.push(p);
            }
        }
        // SIGKILL is asynchronous: say so if one outlives a few seconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while killed.iter().any(|p| !process_ended(p.pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in killed.iter().filter(|p| !process_ended(p.pid)) {
            errors.push(format!(
                "process {} ({}) still runs after SIGKILL",
                p.pid,
                p.program.display()
            ));
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = remove_namespace(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        for m in &self.mounts {
            if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH)
                && e != nix::errno::Errno::EINVAL
                && e != nix::errno::Errno::ENOENT
            {
                errors.push(format!("unmounting {}: {e}", m.display()));
            }
        }
        if let Some(d) = self.dir.as_ref().filter(|d| d.exists())
            && let Err(e) = std::fs::remove_dir_all(d)
        {
            errors.push(format!("removing {}: {e}", d.display()));
        }
        errors
    }
}

/// Whether process `pid` is gone or a zombie (ended, not yet reaped by its parent).
pub fn process_ended(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// Detaches every mount point at or below `dir`, deepest first (the bpffs
/// mounts of a mesh whose owner died before it could say what it made).
pub fn unmount_below(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    let mut errors = Vec::new();
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            errors.push(format!("unmounting {}: {e}", p.display()));
        }
    }
    errors
}

/// Kills every process inside namespace `name` and deletes it (nothing if it is gone).
pub fn remove_namespace(name: &str) -> anyhow::Result<()> {
    if !netns::exists(name) {
        return Ok(());
    }
    if let Ok(pids) = netns::ip(&["netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    netns::ip(&["netns", "del", name]).map(drop)
}

/// The mesh. See the module documentation.
#[derive(Debug)]
pub struct Mesh {
    // Dropped in this order: agents, their bpffs, control planes, the
    // topology's namespaces, the directory.
    agents: Vec<AgentProc>,
    /// The bpffs of each node that had an agent (under `dir/bpf/<node>`).
    bpffs: BTreeMap<String, Mount>,
    clusters: Vec<ClusterCp>,
    /// Nodes and pods of every cluster.
    pub topo: Topology,
    datapath: String,
    bins: Binaries,
    quick_retries: bool,
    agent_args: Vec<String>,
    /// Per node: flags used instead of `agent_args`.
    node_args: BTreeMap<String, Vec<String>>,
    dir: tempfile::TempDir,
}

impl Mesh {
    /// A builder without clusters yet (2 pods per node, `ebpf`, test names,
    /// a temp dir, the workspace's binaries, quick retries).
    pub fn builder() -> MeshBuilder {
        MeshBuilder {
            clusters: Vec::new(),
            pods: 2,
            datapath: "ebpf".to_string(),
            prefix: None,
            parent: None,
            bins: None,
            quick_retries: true,
            agent_args: Vec::new(),
            cni: None,
            underlay: Underlay::Ipv4,
            dual_stack_pods: false,
        }
    }

    /// Starts clusters named `clusters[i]`, `nodes` nodes of `pods` pods
    /// each, agents on `datapath` (`ebpf`, `vxlan`, `direct`, …).
    pub fn start(
        clusters: &[&str],
        nodes: usize,
        pods: usize,
        datapath: &str,
    ) -> anyhow::Result<Self> {
        clusters
            .iter()
            .fold(Self::builder(), |b, c| b.cluster(c, nodes))
            .pods(pods)
            .datapath(datapath)
            .start()
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds cluster `ci`'s control-plane namespace to the underlay.
    fn add_control_plane(&self, ci: usize, plan: &ClusterPlan) -> anyhow::Result<ClusterCp> {
        let v4 = Ipv4Addr::new(172, 31, ci as u8 + 1, 250);
        let v6 = Ipv6Addr::new(0xfd31, 0, 0, 0, 0, 0, ci as u16 + 1, 0x250);
        let u = plan.underlay;
        let cp_ip = if u.has_v6() {
            IpAddr::V6(v6)
        } else {
            IpAddr::V4(v4)
        };
        let topo = &self.topo;
        let cp = topo.namespace(&format!("{}-cp", plan.name))?;
        topo.attach_addrs(
            &cp,
            &format!("u{ci}cp"),
            u.has_v4().then_some(v4),
            u.has_v6().then_some(v6),
        )?;
        let dir = self.dir().join(&plan.name);
        Ok(ClusterCp {
            name: plan.name.clone(),
            id: ci as u8 + 1,
            pod_cidr: plan.pod_cidr,
            pod_cidr_v6: plan.pod_cidr_v6,
            cp_ip,
            secret: SecretDir {
                root: dir.join("clustermesh"),
                generation: 0,
                files: BTreeMap::new(),
                removed: BTreeSet::new(),
            },
            dir,
            proxy: None,
            kv: None,
            cp,
        })
    }

    /// Starts every cluster's mesh etcd (mTLS, its own CA, on the
    /// control-plane address), issues the certificates and fills every
    /// cluster's Secret directory.
    pub fn start_kvstores(&mut self) -> anyhow::Result<()> {
        for ci in 0..self.clusters.len() {
            if self.clusters[ci].kv.is_none() {
                let kv = self.start_kvstore(ci)?;
                self.clusters[ci].kv = Some(kv);
            }
        }
        self.write_secrets()
    }

    fn start_kvstore(&self, ci: usize) -> anyhow::Result<Kvstore> {
        let c = &self.clusters[ci];
        let pki = Arc::new(Pki::in_dir(
            &c.dir.join("etcd-pki"),
            &format!("{} etcd", c.name),
        )?);
        let etcd = in_netns(c.cp.name(), || {
            Etcd::start_listening_in(pki.clone(), &format!("{}-mesh", c.name), c.cp_ip, &c.dir)
        })?;
        let endpoint = format!("https://{}:{}", url_host(c.cp_ip), etcd.port());
        let agent_cert = pki.client(&format!("{}-agent", c.name))?;
        let agents = write_client_config(
            &c.dir.join("kvstore.yaml"),
            &[endpoint],
            pki.ca(),
            &agent_cert,
        )?;
        // The proxy runs next to etcd and reaches it on loopback.
        let upstream = etcd.client_config(&c.dir.join("upstream.yaml"))?;
        let proxy_pki = Arc::new(Pki::in_dir(
            &c.dir.join("proxy-pki"),
            &format!("{} proxy", c.name),
        )?);
        Ok(Kvstore {
            agents,
            upstream,
            proxy_pki,
            etcd,
        })
    }

    /// Fills every cluster's Secret: per remote cluster its proxy's CA, a
    /// client certificate that CA issued for this cluster, and the client
    /// YAML (relative paths, resolved against the mounted directory).
    fn write_secrets(&mut self) -> anyhow::Result<()> {
        let mut remotes = Vec::new();
        for c in &self.clusters {
            remotes.push((c.name.clone(), c.cp_ip, c.kv()?.proxy_pki.clone()));
        }
        for local in &mut self.clusters {
            for (r, ip, pki) in remotes.iter().filter(|(r, ..)| *r != local.name) {
                let cert = pki.client(&format!("{}-agents", local.name))?;
                let f = &mut local.secret.files;
                f.insert(format!("{r}.ca.crt"), std::fs::read(pki.ca())?);
                f.insert(format!("{r}.client.crt"), std::fs::read(&cert.cert)?);
                f.insert(format!("{r}.client.key"), std::fs::read(&cert.key)?);
                f.insert(
                    r.clone(),
                    format!(
                        "endpoints:\n- https://{}:{PROXY_PORT}\ntrusted-ca-file: {r}.ca.crt\n\
                         cert-file: {r}.client.crt\nkey-file: {r}.client.key\n",
                        url_host(*ip)
                    )
                    .into_bytes(),
                );
            }
            local.secret.publish()?;
        }
        Ok(())
    }

    /// Starts every cluster's proxy and waits until each is ready.
    pub fn start_proxies(&mut self) -> anyhow::Result<()> {
        for ci in 0..self.clusters.len() {
            if self.clusters[ci].proxy.is_none() {
                self.spawn_proxy(ci)?;
            }
        }
        Ok(())
    }

    /// Starts an agent on every node that has none (it does not wait: see
    /// [`Mesh::wait_ready`]).
    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        let nodes: Vec<String> = self.topo.nodes.iter().map(|n| n.name.clone()).collect();
        for n in nodes {
            if !self.agents.iter().any(|a| a.node == n) {
                self.spawn_agent(&n)?;
            }
        }
        Ok(())
    }

    /// Every cluster's control plane.
    pub fn control_planes(&self) -> Vec<ControlPlane> {
        self.clusters
            .iter()
            .map(|c| ControlPlane {
                cluster: c.name.clone(),
                id: c.id,
                pod_cidr: c.pod_cidr,
                namespace: c.cp.name().to_string(),
                address: c.cp_ip,
                etcd_endpoint: c
                    .kv
                    .as_ref()
                    .map(|kv| format!("https://{}:{}", url_host(c.cp_ip), kv.etcd.port())),
                proxy_endpoint: format!("https://{}:{PROXY_PORT}", url_host(c.cp_ip)),
                secret_dir: c.secret.root.clone(),
            })
            .collect()
    }

    /// Where the agents' and proxies' logs are (`<node>.log`, `<cluster>-proxy.log`).
    pub fn log_dir(&self) -> PathBuf {
        self.dir().join("logs")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.log_dir().join(format!("{name}.log"))
    }

    /// The last `n` lines of a process's log (`<node>` for agents, `<cluster>-proxy`).
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let s = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Starts `program args` inside namespace `ns`, output appended to `logs/<name>.log`.
    fn spawn_in(
        &self,
        ns: &str,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))?;
        // `ip netns exec` execs the program: the child is the program itself.
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} in {ns}", program.display()))
    }

    fn cluster(&self, name: &str) -> anyhow::Result<&ClusterCp> {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("no cluster {name} in this mesh"))
    }

    fn cluster_index(&self, name: &str) -> anyhow::Result<usize> {
        self.clusters
            .iter()
            .position(|c| c.name == name)
            .with_context(|| format!("no cluster {name} in this mesh"))
    }

    fn spawn_proxy(&mut self, ci: usize) -> anyhow::Result<()> {
        let c = &self.clusters[ci];
        let kv = c.kv()?;
        let server = kv
            .proxy_pki
            .server(&format!("{}-proxy", c.name), &[&c.cp_ip.to_string()])?;
        let mut args: Vec<String> = vec![
            "--listen".into(),
            SocketAddr::new(c.cp_ip, PROXY_PORT).to_string(),
            "--upstream-config".into(),
            kv.upstream.display().to_string(),
            "--tls-cert".into(),
            server.cert.display().to_string(),
            "--tls-key".into(),
            server.key.display().to_string(),
            "--client-ca".into(),
            kv.proxy_pki.ca().display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{PROXY_METRICS_PORT}"),
        ];
        if self.quick_retries {
            args.extend(["--max-backoff".into(), "2s".into()]);
        }
        let name = format!("{}-proxy", c.name);
        let ns = c.cp.name().to_string();
        let mut child = self.spawn_in(&ns, &name, &self.bins.proxy, &args)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait()? {
                bail!("{name} exited with {st}:\n{}", self.log_tail(&name, 20));
            }
            if in_netns(&ns, || http_get(PROXY_METRICS_PORT, "/readyz"))
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} not ready after 30s:\n{}", self.log_tail(&name, 20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.clusters[ci].proxy = Some(Owned(Some(child)));
        Ok(())
    }

    /// The node's bpffs mount point (mounted when its first agent starts).
    fn bpffs_dir(&self, node: &str) -> PathBuf {
        self.dir().join("bpf").join(node)
    }

    /// Where the agent on `node` pins its maps and tc link (`--bpf-pin-dir`).
    pub fn bpf_pin_dir(&self, node: &str) -> PathBuf {
        self.bpffs_dir(node).join("podmesh")
    }

    fn spawn_agent(&mut self, node: &str) -> anyhow::Result<()> {
        if !self.bpffs.contains_key(node) {
            let m = Mount::bpffs(&self.bpffs_dir(node))?;
            self.bpffs.insert(node.to_string(), m);
        }
        let pin_dir = self.bpf_pin_dir(node);
        let n = self.node(node)?;
        let c = self.cluster(&n.cluster)?;
        let mut args: Vec<String> = vec![
            "--cluster-name".into(),
            c.name.clone(),
            "--cluster-id".into(),
            c.id.to_string(),
            "--node-name".into(),
            n.name.clone(),
            "--pod-cidr".into(),
            n.pod_cidr.to_string(),
            "--cluster-pod-cidr".into(),
            c.pod_cidr.to_string(),
            "--kvstore-config".into(),
            c.kv()?.agents.display().to_string(),
            "--clustermesh-config".into(),
            c.secret.root.display().to_string(),
            "--datapath".into(),
            self.datapath.clone(),
            "--status-addr".into(),
            format!("127.0.0.1:{STATUS_PORT}"),
            "--bpf-pin-dir".into(),
            pin_dir.display().to_string(),
        ];
        for a in n.underlay_addrs() {
            args.extend(["--node-ip".into(), a.to_string()]);
        }
        if let (Some(node6), Some(cluster6)) = (n.pod_cidr_v6, c.pod_cidr_v6) {
            args.extend([
                "--pod-cidr".into(),
                node6.to_string(),
                "--cluster-pod-cidr".into(),
                cluster6.to_string(),
            ]);
        }
        if self.quick_retries {
            args.extend(["--secret-poll-ms", "200", "--max-backoff", "2"].map(String::from));
        }
        let extra = self.node_args.get(node).unwrap_or(&self.agent_args).clone();
        if extra
            .windows(2)
            .any(|w| w[0] == "--encryption" && w[1] == "wireguard")
        {
            // Per node, as a DaemonSet's hostPaths are: the key and the
            // userspace WireGuard's socket outlive the agent.
            let wg = self.wireguard_dir(node);
            args.extend([
                "--wireguard-key-dir".into(),
                wg.join("keys").display().to_string(),
                "--wireguard-run-dir".into(),
                wg.join("run").display().to_string(),
                "--wireguard-userspace-binary".into(),
                workspace_binary("podmesh-wireguard", "podmesh-wireguard")?
                    .display()
                    .to_string(),
            ]);
        }
        args.extend(extra);
        let ns = n.ns.name().to_string();
        let child = self.spawn_in(&ns, node, &self.bins.agent, &args)?;
        self.agents.push(AgentProc {
            node: node.to_string(),
            child: Owned(Some(child)),
        });
        Ok(())
    }

    /// Where the agent on `node` keeps its WireGuard key (`keys/`) and
    /// finds the userspace WireGuard's socket and log (`run/`).
    pub fn wireguard_dir(&self, node: &str) -> PathBuf {
        self.dir().join("wg").join(node)
    }

    /// The agent on `node` runs with `args` instead of the mesh's agent
    /// flags from its next start on.
    pub fn set_node_args(&mut self, node: &str, args: &[&str]) {
        self.node_args.insert(
            node.to_string(),
            args.iter().map(|a| a.to_string()).collect(),
        );
    }

    /// A node by name (e.g. `east-n0`).
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.topo
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in this mesh"))
    }

    /// The `--datapath` of agents started from now on (a mode change:
    /// stop the agents, set it, start them again).
    pub fn set_datapath(&mut self, datapath: &str) {
        self.datapath = datapath.to_string();
    }

    /// Names of the nodes of `cluster`.
    pub fn nodes_of(&self, cluster: &str) -> Vec<String> {
        self.topo
            .cluster_nodes(cluster)
            .map(|n| n.name.clone())
            .collect()
    }

    /// Every pod of `cluster`.
    pub fn pods_of<'a>(&'a self, cluster: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.topo.cluster_nodes(cluster).flat_map(|n| n.pods.iter())
    }

    /// GETs `path` from the status server of the agent on `node`; the body
    /// if it answered 200, else an error with the status line.
    pub fn agent_get(&self, node: &str, path: &str) -> anyhow::Result<String> {
        let ns = self.node(node)?.ns.name().to_string();
        let resp = in_netns(&ns, || http_get(STATUS_PORT, path))?;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head.lines().next().unwrap_or("");
        if !status.contains(" 200") {
            bail!("GET {path} on {node}: {status} {}", body.trim());
        }
        Ok(body.to_string())
    }

    /// The agent's `/status` JSON on `node`.
    pub fn status(&self, node: &str) -> anyhow::Result<String> {
        self.agent_get(node, "/status")
    }

    /// The process ID of the agent on `node`.
    pub fn agent_pid(&self, node: &str) -> anyhow::Result<u32> {
        self.agents
            .iter()
            .find(|a| a.node == node)
            .map(|a| a.child.id())
            .with_context(|| format!("no agent on {node}"))
    }

    /// Runs the `podmesh` CLI with `args` inside `node`'s namespace (where
    /// `podmesh status` finds the agent's status server by default).
    pub fn podmesh(&self, node: &str, args: &[&str]) -> anyhow::Result<Output> {
        let cli = match &self.bins.cli {
            Some(c) => c.clone(),
            None => workspace_binary("podmesh-agent", "podmesh")?,
        };
        let ns = &self.node(node)?.ns;
        ns.command(&cli.to_string_lossy())
            .args(args)
            .output()
            .with_context(|| format!("running podmesh {} on {node}", args.join(" ")))
    }

    /// Whether the agent on `node` still runs; fails with its log if it exited.
    fn check_running(&mut self, node: &str) -> anyhow::Result<()> {
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.node == node)
            .with_context(|| format!("no agent on {node}"))?;
        if let Some(st) = a.child.child().try_wait()? {
            bail!(
                "agent on {node} exited with {st}:\n{}",
                self.log_tail(node, 30)
            );
        }
        Ok(())
    }

    /// The running agent of `node`, no longer tracked by the mesh.
    fn take_agent(&mut self, node: &str) -> anyhow::Result<AgentProc> {
        let i = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .with_context(|| format!("no agent running on {node}"))?;
        Ok(self.agents.remove(i))
    }

    /// Kills the agent on `node` with SIGKILL (no chance to clean up) and
    /// reaps it; its datapath and pins stay.
    pub fn kill_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let mut a = self.take_agent(node)?;
        a.child.child().kill()?;
        a.child.child().wait()?;
        Ok(())
    }

    /// Stops the agent on `node` with SIGTERM, as the kubelet does, waits
    /// for it (at most `timeout`) and returns its exit status.
    pub fn stop_agent(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let mut a = self.take_agent(node)?;
        crate::daemon::terminate(a.child.child(), timeout)
            .with_context(|| format!("stopping the agent on {node}"))
    }

    /// Starts the agent on `node` again (same flags, same bpffs) after
    /// [`Mesh::kill_agent`]; wait for it with [`Mesh::wait_agent_ready`].
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        if self.agents.iter().any(|a| a.node == node) {
            bail!("an agent already runs on {node}");
        }
        self.spawn_agent(node)
    }

    /// Waits until every agent answers `/readyz` with 200 (every remote
    /// cluster connected and synced); fails early if an agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let nodes: Vec<String> = self.agents.iter().map(|a| a.node.clone()).collect();
        for node in nodes {
            self.ready_by(&node, deadline, timeout)?;
        }
        Ok(())
    }

    /// Waits until the agent on `node` answers `/readyz` with 200; fails
    /// early, with its log, if it exits.
    pub fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> anyhow::Result<()> {
        self.ready_by(node, Instant::now() + timeout, timeout)
    }

    fn ready_by(&mut self, node: &str, deadline: Instant, timeout: Duration) -> anyhow::Result<()> {
        loop {
            self.check_running(node)?;
            let r = self.agent_get(node, "/readyz");
            if r.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {node} not ready after {timeout:?} ({}); status: {}\nlog:\n{}",
                    r.err().map(|e| format!("{e:#}")).unwrap_or_default(),
                    self.status(node).unwrap_or_default(),
                    self.log_tail(node, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pings `to` once from the pod named `from` (e.g. `east-n0-p1`).
    pub fn ping(&self, from: &str, to: Ipv4Addr) -> bool {
        self.topo
            .pods()
            .find(|(_, p)| p.name == from)
            .is_some_and(|(_, p)| p.ns.ping(&to.to_string(), 1, None))
    }

    /// Every (from pod, to address) pair from a pod of `a` to a pod of `b`.
    pub fn pairs(&self, a: &str, b: &str) -> Vec<(String, Ipv4Addr)> {
        let mut v = Vec::new();
        for p in self.pods_of(a) {
            for q in self.pods_of(b) {
                v.push((p.name.clone(), q.addr));
            }
        }
        v
    }

    /// Every pair from a pod of one cluster to the IPv6 address of a pod of
    /// another cluster (dual-stack pods; empty without).
    pub fn cross_cluster_pairs6(&self) -> Vec<(String, Ipv6Addr)> {
        let mut v = Vec::new();
        for a in &self.clusters {
            for b in self.clusters.iter().filter(|b| b.name != a.name) {
                for p in self.pods_of(&a.name) {
                    for q in self.pods_of(&b.name) {
                        v.extend(q.addr6.map(|to| (p.name.clone(), to)));
                    }
                }
            }
        }
        v
    }

    /// The pairs of `pairs` (to IPv6 addresses) that do not answer one ping.
    pub fn unreachable6(&self, pairs: &[(String, Ipv6Addr)]) -> Vec<(String, Ipv6Addr)> {
        pairs
            .iter()
            .filter(|(from, to)| {
                !self
                    .topo
                    .pods()
                    .find(|(_, p)| p.name == *from)
                    .is_some_and(|(_, p)| p.ns.ping(&to.to_string(), 1, None))
            })
            .cloned()
            .collect()
    }

    /// Every pair from a pod of one cluster to a pod of another cluster.
    pub fn cross_cluster_pairs(&self) -> Vec<(String, Ipv4Addr)> {
        let names: Vec<&str> = self.clusters.iter().map(|c| c.name.as_str()).collect();
        let mut v = Vec::new();
        for a in &names {
            for b in names.iter().filter(|b| *b != a) {
                v.extend(self.pairs(a, b));
            }
        }
        v
    }

    /// The pairs of `pairs` that do not answer one ping.
    pub fn unreachable(&self, pairs: &[(String, Ipv4Addr)]) -> Vec<(String, Ipv4Addr)> {
        pairs
            .iter()
            .filter(|(from, to)| !self.ping(from, *to))
            .cloned()
            .collect()
    }

    /// Kills cluster `cluster`'s proxy (SIGKILL).
    pub fn kill_proxy(&mut self, cluster: &str) -> anyhow::Result<()> {
        let ci = self.cluster_index(cluster)?;
        let mut proxy = self.clusters[ci]
            .proxy
            .take()
            .with_context(|| format!("the proxy of {cluster} is not running"))?;
        proxy.child().kill()?;
        proxy.child().wait()?;
        Ok(())
    }

    /// Starts cluster `cluster`'s proxy again (same address and certificates)
    /// and waits until it is ready.
    pub fn restart_proxy(&mut self, cluster: &str) -> anyhow::Result<()> {
        let ci = self.cluster_index(cluster)?;
        if self.clusters[ci].proxy.is_some() {
            self.kill_proxy(cluster)?;
        }
        self.spawn_proxy(ci)
    }

    /// Adds a node (with the plan's pods) to `cluster` and starts its agent;
    /// returns the node's name.
    pub fn add_node(&mut self, cluster: &str) -> anyhow::Result<String> {
        let name = self.topo.add_cluster_node(cluster)?.name.clone();
        self.spawn_agent(&name)?;
        Ok(name)
    }

    /// Removes `remote`'s entry (client YAML and its certificate files) from
    /// `cluster`'s Secret directory, like an updated Secret.
    pub fn remove_from_secret(&mut self, cluster: &str, remote: &str) -> anyhow::Result<()> {
        let ci = self.cluster_index(cluster)?;
        let s = &mut self.clusters[ci].secret;
        s.removed.insert(remote.to_string());
        s.publish()
    }

    /// Puts `remote`'s entry back into `cluster`'s Secret directory.
    pub fn restore_in_secret(&mut self, cluster: &str, remote: &str) -> anyhow::Result<()> {
        let ci = self.cluster_index(cluster)?;
        let s = &mut self.clusters[ci].secret;
        s.removed.remove(remote);
        s.publish()
    }

    /// Runs `etcdctl args` against `cluster`'s mesh etcd (root certificate).
    pub fn etcdctl(&self, cluster: &str, args: &[&str]) -> anyhow::Result<String> {
        let c = self.cluster(cluster)?;
        let kv = c.kv()?;
        let out = in_netns(c.cp.name(), || kv.etcd.etcdctl(args))?;
        if !out.status.success() {
            bail!(
                "etcdctl {} in {cluster}'s etcd: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a raw record (no lease) into `cluster`'s mesh etcd.
    pub fn put_raw(&self, cluster: &str, key: &str, value: &str) -> anyhow::Result<()> {
        self.etcdctl(cluster, &["put", key, value]).map(drop)
    }

    /// Deletes a key from `cluster`'s mesh etcd.
    pub fn delete_raw(&self, cluster: &str, key: &str) -> anyhow::Result<()> {
        self.etcdctl(cluster, &["del", key]).map(drop)
    }

    /// `ip -n <node> route show` of the node's namespace.
    pub fn routes(&self, node: &str) -> anyhow::Result<String> {
        netns::ip(&["-n", self.node(node)?.ns.name(), "route", "show"])
    }

    /// Leaves everything running and in place, and returns what that is,
    /// for [`Kept::remove`] to remove later (from another process too).
    pub fn into_kept(self) -> Kept {
        let Mesh {
            agents,
            bpffs,
            clusters,
            topo,
            bins,
            dir,
            ..
        } = self;
        let mut kept = Kept::default();
        for a in agents {
            kept.processes.push(KeptProcess {
                pid: a.child.release(),
                program: bins.agent.clone(),
            });
        }
        kept.mounts = bpffs.into_values().filter_map(Mount::release).collect();
        let mut cps = Vec::new();
        for c in clusters {
            let ClusterCp { proxy, kv, cp, .. } = c;
            if let Some(p) = proxy {
                kept.processes.push(KeptProcess {
                    pid: p.release(),
                    program: bins.proxy.clone(),
                });
            }
            if let Some(kv) = kv
                && let (Some(pid), _) = kv.etcd.detach()
            {
                kept.processes.push(KeptProcess {
                    pid,
                    program: PathBuf::from("etcd"),
                });
            }
            cps.push(cp.name().to_string());
            // The namespace outlives this value.
            std::mem::forget(cp);
        }
        kept.namespaces = topo.detach();
        kept.namespaces.extend(cps);
        kept.dir = Some(dir.keep());
        kept
    }
}
