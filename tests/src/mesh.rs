//! A whole mesh for end-to-end tests: clusters of nodes and pods, a mesh etcd and proxy per cluster, agents.
//!
//! Per cluster: a control-plane namespace on the underlay (`172.31.<c+1>.250`)
//! running the cluster's mesh etcd (mTLS) and a `podmesh-etcd-proxy` in
//! front of it (port 2379 on that address, its own CA), a clustermesh
//! directory laid out like a mounted Kubernetes Secret (`..data` symlink
//! swapped on every change) with one etcd client YAML per remote cluster,
//! and one `podmesh-agent` per node, running inside the node's namespace
//! with static node information and its status server on the node's
//! loopback. Only addresses inside namespaces this fixture creates are
//! used. Everything is stopped and removed on drop, also after a panic.
//!
//! Each node has its own bpffs, mounted by the fixture on a directory it
//! owns and handed to the agent with `--bpf-pin-dir`, like the host's
//! `/sys/fs/bpf` a DaemonSet mounts: it outlives the agent process, so a
//! killed agent's pins (and the forwarding they keep alive) stay for the next
//! one. (`ip netns exec` gives each process a private `/sys`; a bpffs mounted
//! there would die with the agent.)
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;

use crate::{
    etcd::{Etcd, http_get, write_client_config},
    netns::{self, NetNs},
    pki::Pki,
    topo::{ClusterPlan, Node, Pod, Topology, UNDERLAY_PREFIX_LEN},
};

/// Port of every agent's status server (on its node's loopback).
pub const STATUS_PORT: u16 = 9090;
/// Port the proxies serve remote clusters on (on the control-plane address).
pub const PROXY_PORT: u16 = 2379;
/// Port of every proxy's metrics/health server (on its namespace's loopback).
pub const PROXY_METRICS_PORT: u16 = 9091;

/// A workspace binary of package `package`, built once per test process
/// with the profile the tests run in (tests cannot use `CARGO_BIN_EXE_*`
/// for another package's binaries).
pub fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
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

/// One cluster's control plane.
#[derive(Debug)]
struct ClusterCp {
    name: String,
    id: u8,
    pod_cidr: Ipv4Net,
    cp_ip: Ipv4Addr,
    kvstore: PathBuf,
    upstream: PathBuf,
    proxy_pki: Arc<Pki>,
    proxy: Option<Child>,
    secret: SecretDir,
    // Dropped in this order: etcd is killed before its namespace goes.
    etcd: Etcd,
    cp: NetNs,
}

/// A running agent.
#[derive(Debug)]
struct AgentProc {
    node: String,
    child: Child,
}

/// The mesh. See the module documentation.
#[derive(Debug)]
pub struct Mesh {
    agents: Vec<AgentProc>,
    clusters: Vec<ClusterCp>,
    /// Nodes and pods of every cluster.
    pub topo: Topology,
    datapath: String,
    /// Nodes whose bpffs is mounted (under `dir/bpf/<node>`).
    bpffs: BTreeSet<String>,
    agent_bin: PathBuf,
    proxy_bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Mesh {
    /// Builds `clusters.len()` clusters named `clusters[i]` with Pod CIDR
    /// `10.<i+1>.0.0/16`, `nodes` nodes of `pods` pods each, and starts
    /// everything with agents on `datapath` (`ebpf`, `vxlan`, `direct`, …).
    pub fn start(
        clusters: &[&str],
        nodes: usize,
        pods: usize,
        datapath: &str,
    ) -> anyhow::Result<Self> {
        let agent_bin = workspace_binary("podmesh-agent", "podmesh-agent")?;
        let proxy_bin = workspace_binary("podmesh-etcd-proxy", "podmesh-etcd-proxy")?;
        let plans: Vec<ClusterPlan> = clusters
            .iter()
            .enumerate()
            .map(|(i, n)| ClusterPlan::new(n, &format!("10.{}.0.0/16", i + 1), nodes, pods))
            .collect();
        let dir = tempfile::Builder::new().prefix("podmesh-mesh-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let mut mesh = Mesh {
            agents: Vec::new(),
            clusters: Vec::new(),
            topo: Topology::build(&plans)?,
            datapath: datapath.to_string(),
            bpffs: BTreeSet::new(),
            agent_bin,
            proxy_bin,
            dir,
        };
        for (ci, plan) in plans.iter().enumerate() {
            let c = mesh.start_control_plane(ci, plan)?;
            mesh.clusters.push(c);
        }
        mesh.write_secrets()?;
        for ci in 0..mesh.clusters.len() {
            mesh.spawn_proxy(ci)?;
        }
        let nodes: Vec<String> = mesh.topo.nodes.iter().map(|n| n.name.clone()).collect();
        for n in nodes {
            mesh.spawn_agent(&n)?;
        }
        Ok(mesh)
    }

    fn start_control_plane(&self, ci: usize, plan: &ClusterPlan) -> anyhow::Result<ClusterCp> {
        let cp_ip = Ipv4Addr::new(172, 31, ci as u8 + 1, 250);
        let cp = NetNs::new(&format!("{}-cp", plan.name))?;
        let port = format!("u{ci}cp");
        self.topo.underlay.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            cp.name(),
        ])?;
        self.topo
            .underlay
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        cp.ip(&[
            "addr",
            "add",
            &format!("{cp_ip}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
        cp.ip(&["link", "set", "eth0", "up"])?;
        let cdir = self.dir.path().join(&plan.name);
        let pki = Arc::new(Pki::in_dir(
            &cdir.join("etcd-pki"),
            &format!("{} etcd", plan.name),
        )?);
        let etcd = in_netns(cp.name(), || {
            Etcd::start_listening(
                pki.clone(),
                &format!("{}-mesh", plan.name),
                IpAddr::V4(cp_ip),
            )
        })?;
        let endpoint = format!("https://{cp_ip}:{}", etcd.port());
        let agent_cert = pki.client(&format!("{}-agent", plan.name))?;
        let kvstore = write_client_config(
            &cdir.join("kvstore.yaml"),
            &[endpoint],
            pki.ca(),
            &agent_cert,
        )?;
        // The proxy runs next to etcd and reaches it on loopback.
        let upstream = etcd.client_config(&cdir.join("upstream.yaml"))?;
        let proxy_pki = Arc::new(Pki::in_dir(
            &cdir.join("proxy-pki"),
            &format!("{} proxy", plan.name),
        )?);
        Ok(ClusterCp {
            name: plan.name.clone(),
            id: ci as u8 + 1,
            pod_cidr: plan.pod_cidr,
            cp_ip,
            kvstore,
            upstream,
            proxy_pki,
            proxy: None,
            secret: SecretDir {
                root: cdir.join("clustermesh"),
                generation: 0,
                files: BTreeMap::new(),
                removed: BTreeSet::new(),
            },
            etcd,
            cp,
        })
    }

    /// Fills every cluster's Secret: per remote cluster its proxy's CA, a
    /// client certificate that CA issued for this cluster, and the client
    /// YAML (relative paths, resolved against the mounted directory).
    fn write_secrets(&mut self) -> anyhow::Result<()> {
        let remotes: Vec<(String, Ipv4Addr, Arc<Pki>)> = self
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.cp_ip, c.proxy_pki.clone()))
            .collect();
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
                        "endpoints:\n- https://{ip}:{PROXY_PORT}\ntrusted-ca-file: {r}.ca.crt\n\
                         cert-file: {r}.client.crt\nkey-file: {r}.client.key\n"
                    )
                    .into_bytes(),
                );
            }
            local.secret.publish()?;
        }
        Ok(())
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
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
        let server = c
            .proxy_pki
            .server(&format!("{}-proxy", c.name), &[&c.cp_ip.to_string()])?;
        let args: Vec<String> = vec![
            "--listen".into(),
            format!("{}:{PROXY_PORT}", c.cp_ip),
            "--upstream-config".into(),
            c.upstream.display().to_string(),
            "--tls-cert".into(),
            server.cert.display().to_string(),
            "--tls-key".into(),
            server.key.display().to_string(),
            "--client-ca".into(),
            c.proxy_pki.ca().display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{PROXY_METRICS_PORT}"),
            "--max-backoff".into(),
            "2s".into(),
        ];
        let name = format!("{}-proxy", c.name);
        let ns = c.cp.name().to_string();
        let mut child = self.spawn_in(&ns, &name, &self.proxy_bin, &args)?;
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
        self.clusters[ci].proxy = Some(child);
        Ok(())
    }

    /// The node's bpffs mount point (mounted when its first agent starts).
    fn bpffs_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("bpf").join(node)
    }

    /// Where the agent on `node` pins its maps and tc link (`--bpf-pin-dir`).
    pub fn bpf_pin_dir(&self, node: &str) -> PathBuf {
        self.bpffs_dir(node).join("podmesh")
    }

    fn mount_bpffs(&mut self, node: &str) -> anyhow::Result<()> {
        if self.bpffs.contains(node) {
            return Ok(());
        }
        let dir = self.bpffs_dir(node);
        std::fs::create_dir_all(&dir)?;
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a bpffs on {}", dir.display()))?;
        self.bpffs.insert(node.to_string());
        Ok(())
    }

    fn spawn_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.mount_bpffs(node)?;
        let pin_dir = self.bpf_pin_dir(node);
        let n = self.node(node)?;
        let c = self.cluster(&n.cluster)?;
        let args: Vec<String> = vec![
            "--cluster-name".into(),
            c.name.clone(),
            "--cluster-id".into(),
            c.id.to_string(),
            "--node-name".into(),
            n.name.clone(),
            "--node-ip".into(),
            n.addr.to_string(),
            "--pod-cidr".into(),
            n.pod_cidr.to_string(),
            "--cluster-pod-cidr".into(),
            c.pod_cidr.to_string(),
            "--kvstore-config".into(),
            c.kvstore.display().to_string(),
            "--clustermesh-config".into(),
            c.secret.root.display().to_string(),
            "--datapath".into(),
            self.datapath.clone(),
            "--status-addr".into(),
            format!("127.0.0.1:{STATUS_PORT}"),
            "--secret-poll-ms".into(),
            "200".into(),
            "--max-backoff".into(),
            "2".into(),
            "--bpf-pin-dir".into(),
            pin_dir.display().to_string(),
        ];
        let ns = n.ns.name().to_string();
        let child = self.spawn_in(&ns, node, &self.agent_bin, &args)?;
        self.agents.push(AgentProc {
            node: node.to_string(),
            child,
        });
        Ok(())
    }

    /// A node by name (e.g. `east-n0`).
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.topo
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in this mesh"))
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

    /// Whether the agent on `node` still runs; fails with its log if it exited.
    fn check_running(&mut self, node: &str) -> anyhow::Result<()> {
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.node == node)
            .with_context(|| format!("no agent on {node}"))?;
        if let Some(st) = a.child.try_wait()? {
            bail!(
                "agent on {node} exited with {st}:\n{}",
                self.log_tail(node, 30)
            );
        }
        Ok(())
    }

    /// Kills the agent on `node` with SIGKILL (no chance to clean up) and
    /// reaps it; its datapath and pins stay.
    pub fn kill_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let i = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .with_context(|| format!("no agent running on {node}"))?;
        let mut a = self.agents.remove(i);
        a.child.kill()?;
        a.child.wait()?;
        Ok(())
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
    /// early if it exits.
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
        let mut child = self.clusters[ci]
            .proxy
            .take()
            .with_context(|| format!("the proxy of {cluster} is not running"))?;
        child.kill()?;
        child.wait()?;
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
        let out = in_netns(c.cp.name(), || c.etcd.etcdctl(args))?;
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
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        // Releases the pins; what they kept attached goes with the namespaces.
        for node in std::mem::take(&mut self.bpffs) {
            let _ = nix::mount::umount2(&self.bpffs_dir(&node), nix::mount::MntFlags::MNT_DETACH);
        }
        for c in &mut self.clusters {
            if let Some(mut p) = c.proxy.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
        // Then the fields: etcds and control-plane namespaces, the
        // topology's namespaces, the directory.
    }
}
