//! `cargo xtask demo`: a whole multi-cluster mesh in network namespaces, in one command.
//!
//! N clusters × 2 nodes × 2 pods on one underlay bridge (the test harness's
//! topology), per cluster a mesh etcd with mTLS and a podmesh-etcd-proxy in a
//! control-plane namespace, certificates, a Secret-style directory per
//! cluster and one agent per node with static node information. It waits for
//! readiness, shows `podmesh status`, pings every pod of every other cluster
//! and prints a summary.
//!
//! Everything it makes is named `pmdemo-…` and recorded in a state file
//! before it is made, so `cargo xtask demo down` removes exactly that, also
//! after an interrupted run. It uses only addresses inside the namespaces it
//! creates, and loopback.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use podmesh_tests::{
    etcd::{Etcd, http_get, write_client_config},
    netns::{self, NetNs},
    pki::{CertSpec, Pki},
    topo::{ClusterPlan, Topology},
};
use serde::{Deserialize, Serialize};

use crate::util::{cargo, root, sh};

/// Every namespace the demo creates starts with this.
pub const PREFIX: &str = "pmdemo-";
/// Where the demo keeps its state file, certificates, configs and logs.
const STATE_DIR: &str = "/run/podmesh-demo";
/// Port of the agents' status server (each on its node's loopback).
const STATUS_PORT: u16 = 9090;
/// Port of the proxies' metrics/health server (each on its namespace's loopback).
const PROXY_METRICS_PORT: u16 = 9091;
/// Port the proxies serve remote clusters on.
const PROXY_PORT: u16 = 2379;
const NODES: usize = 2;
const PODS: usize = 2;
const NAMES: &[&str] = &[
    "east", "west", "north", "south", "central", "edge", "lab", "dr",
];

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    #[command(subcommand)]
    action: Option<Action>,
    /// Number of clusters (2 nodes with 2 pods each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
    clusters: u8,
    /// Leave the mesh running afterwards (remove it with `cargo xtask demo down`).
    #[arg(long)]
    keep: bool,
    /// Skip `cargo xtask setup` (the machine is known to be ready).
    #[arg(long)]
    skip_setup: bool,
    /// Datapath of the agents (ebpf, vxlan, ipip, direct).
    #[arg(long, default_value = "ebpf")]
    datapath: String,
    /// How long to wait for every pair of pods to reach each other.
    #[arg(long, default_value_t = 90)]
    timeout_secs: u64,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Remove everything a previous `cargo xtask demo` made, and nothing else.
    Down,
}

/// What the demo made, written before each thing is made.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// Network namespaces, in creation order.
    namespaces: Vec<String>,
    /// Processes started outside the namespaces' own lifetime: (pid, program).
    processes: Vec<(u32, String)>,
    /// Directories outside the state directory (etcd data).
    dirs: Vec<PathBuf>,
}

impl State {
    fn path() -> PathBuf {
        Path::new(STATE_DIR).join("state.json")
    }

    fn load() -> anyhow::Result<Option<Self>> {
        match fs::read(Self::path()) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("{} is not a demo state file", Self::path().display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("reading the demo state"),
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        fs::create_dir_all(STATE_DIR)?;
        fs::write(Self::path(), serde_json::to_vec_pretty(self)?).context("writing the demo state")
    }
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if let Some(Action::Down) = args.action {
        return down();
    }
    if !is_root() {
        bail!("the demo creates network namespaces: run it as root");
    }
    if State::load()?.is_some() {
        bail!(
            "a demo is already set up (state in {STATE_DIR}); remove it with `cargo xtask demo down`"
        );
    }
    let started = Instant::now();
    step(1, "setup and build");
    if !args.skip_setup {
        crate::setup::run(&crate::setup::SetupArgs { check: false })?;
    }
    let mut build = cargo();
    sh(build.args(["build", "-p", "podmesh-agent", "-p", "podmesh-etcd-proxy"]))?;
    let bins = Bins::locate()?;

    let mut demo = Demo {
        state: State::default(),
        dir: PathBuf::from(STATE_DIR),
        bins,
        clusters: Vec::new(),
        agents: Vec::new(),
    };
    eprintln!("demo: if this is interrupted, `cargo xtask demo down` removes what was made so far");
    let result = demo.bring_up(args);
    match result {
        Ok(all_reachable) => {
            if args.keep {
                demo.print_instructions();
            } else {
                step(8, "tear down");
                down()?;
            }
            eprintln!("demo: finished in {:.0?}", started.elapsed());
            if !all_reachable {
                bail!("not every pod reached every pod of the other clusters (see above)");
            }
            Ok(())
        }
        Err(e) => {
            demo.print_logs();
            if args.keep {
                eprintln!(
                    "demo: failed; left in place for inspection (logs in {STATE_DIR}/logs); \
                     `cargo xtask demo down` removes it"
                );
            } else if let Err(d) = down() {
                eprintln!("demo: tearing down after the failure also failed: {d:#}");
            }
            Err(e)
        }
    }
}

fn step(n: u32, what: &str) {
    eprintln!("\n==> [{n}/8] {what}");
}

fn is_root() -> bool {
    crate::util::output(Command::new("id").arg("-u")).is_ok_and(|s| s == "0")
}

/// The binaries `cargo build` just made.
#[derive(Debug)]
struct Bins {
    agent: PathBuf,
    cli: PathBuf,
    proxy: PathBuf,
}

impl Bins {
    fn locate() -> anyhow::Result<Self> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"))
            .join("debug");
        let b = Self {
            agent: target.join("podmesh-agent"),
            cli: target.join("podmesh"),
            proxy: target.join("podmesh-etcd-proxy"),
        };
        for p in [&b.agent, &b.cli, &b.proxy] {
            if !p.is_file() {
                bail!("{} was not built", p.display());
            }
        }
        Ok(b)
    }
}

/// One cluster as the demo runs it.
#[derive(Debug)]
struct Cluster {
    name: String,
    id: u8,
    pod_cidr: String,
    /// Control-plane namespace (mesh etcd and proxy) and its underlay address.
    cp_ns: String,
    cp_ip: Ipv4Addr,
    nodes: Vec<NodeInfo>,
    /// The proxy CA (trusted by the other clusters' agents).
    proxy_pki: Arc<Pki>,
}

#[derive(Debug, Clone)]
struct NodeInfo {
    name: String,
    ns: String,
    addr: Ipv4Addr,
    pod_cidr: String,
    pods: Vec<(String, Ipv4Addr)>,
}

#[derive(Debug)]
struct Demo {
    state: State,
    dir: PathBuf,
    bins: Bins,
    clusters: Vec<Cluster>,
    /// Running agents: (namespace, node name, PID).
    agents: Vec<(String, String, u32)>,
}

impl Demo {
    /// Brings the mesh up; returns whether every cross-cluster pair was reachable.
    fn bring_up(&mut self, args: &DemoArgs) -> anyhow::Result<bool> {
        let n = usize::from(args.clusters);
        let plans: Vec<ClusterPlan> = (0..n)
            .map(|i| ClusterPlan::new(NAMES[i], &format!("10.{}.0.0/16", i + 1), NODES, PODS))
            .collect();

        step(2, "address plan (podmesh plan check), network namespaces");
        fs::create_dir_all(self.dir.join("logs"))?;
        self.check_plan(&plans)?;
        self.state.namespaces = Topology::planned_names(PREFIX, &plans);
        let cp_names: Vec<String> = plans
            .iter()
            .map(|p| format!("{PREFIX}{}-cp", p.name))
            .collect();
        self.state.namespaces.extend(cp_names.iter().cloned());
        self.state.save()?;
        let topo = Topology::build_named(PREFIX, &plans)?;
        let underlay = topo.underlay.name().to_string();
        for (ci, plan) in plans.iter().enumerate() {
            let nodes = topo
                .cluster_nodes(&plan.name)
                .map(|nd| NodeInfo {
                    name: nd.name.clone(),
                    ns: nd.ns.name().to_string(),
                    addr: nd.addr,
                    pod_cidr: nd.pod_cidr.to_string(),
                    pods: nd
                        .pods
                        .iter()
                        .map(|p| (p.ns.name().to_string(), p.addr))
                        .collect(),
                })
                .collect();
            let cp_ip = Ipv4Addr::new(172, 31, ci as u8 + 1, 250);
            self.clusters.push(Cluster {
                name: plan.name.clone(),
                id: ci as u8 + 1,
                pod_cidr: plan.pod_cidr.to_string(),
                cp_ns: cp_names[ci].clone(),
                cp_ip,
                nodes,
                proxy_pki: Arc::new(Pki::in_dir(
                    &self.dir.join("pki").join(&plan.name).join("proxy"),
                    &format!("{} proxy", plan.name),
                )?),
            });
        }
        topo.detach();
        for (ci, c) in self.clusters.iter().enumerate() {
            add_cp_namespace(&underlay, &c.cp_ns, ci, c.cp_ip)?;
            eprintln!(
                "  {}: nodes {} ; control plane {} ({})",
                c.name,
                c.nodes
                    .iter()
                    .map(|n| format!("{} {} pods {}", n.name, n.addr, n.pod_cidr))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.cp_ns,
                c.cp_ip
            );
        }

        step(
            3,
            "mesh etcd with mTLS per cluster, certificates, Secret directories",
        );
        let mut kvstore = Vec::new();
        for ci in 0..self.clusters.len() {
            kvstore.push(self.start_etcd(ci)?);
        }
        self.write_clustermesh_dirs()?;

        step(4, "podmesh-etcd-proxy per cluster");
        for (ci, (_, upstream)) in kvstore.iter().enumerate() {
            self.start_proxy(ci, upstream)?;
        }

        step(5, "agents (static node info) on every node");
        let agents_started = Instant::now();
        for (ci, (kv, _)) in kvstore.iter().enumerate() {
            for ni in 0..self.clusters[ci].nodes.len() {
                self.start_agent(ci, ni, kv, &args.datapath)?;
            }
        }
        self.wait_agents_ready()?;

        step(6, "podmesh status (one node per cluster)");
        for c in &self.clusters {
            let node = &c.nodes[0];
            eprintln!("--- {} / {} ---", c.name, node.name);
            let out = Command::new("ip")
                .args(["netns", "exec", &node.ns])
                .arg(&self.bins.cli)
                .args(["status", "--addr", &format!("127.0.0.1:{STATUS_PORT}")])
                .output()
                .context("running podmesh status")?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }

        step(7, "ping every pod of every other cluster");
        let timeout = Duration::from_secs(args.timeout_secs);
        let (ok, total, converged) = self.ping_all(timeout, agents_started);
        eprintln!("\n==> summary");
        eprintln!(
            "  clusters {}, nodes {}, pods {}",
            self.clusters.len(),
            self.clusters.len() * NODES,
            self.clusters.len() * NODES * PODS
        );
        eprintln!("  cross-cluster pod pairs reachable: {ok}/{total}");
        match converged {
            Some(t) => {
                eprintln!("  time to converge (agents started -> every pair answers): {t:.1?}")
            }
            None => eprintln!("  did not converge within {timeout:?}"),
        }
        Ok(ok == total)
    }

    /// Writes the demo's address plan and runs `podmesh plan check` on it,
    /// as an operator would before connecting clusters.
    fn check_plan(&self, plans: &[ClusterPlan]) -> anyhow::Result<()> {
        let mut y = String::from("clusters:\n");
        for (ci, p) in plans.iter().enumerate() {
            y.push_str(&format!(
                "- name: {}\n  id: {}\n  podCIDRs: [{}]\n  serviceCIDRs: []\n  \
                 nodeCIDRs: [172.31.{}.0/24]\n  nodeMaskSize: {{ipv4: {}}}\n  nodes: {}\n",
                p.name,
                ci + 1,
                p.pod_cidr,
                ci + 1,
                p.node_prefix_len,
                p.nodes
            ));
        }
        let path = self.dir.join("plan.yaml");
        fs::write(&path, y)?;
        let out = Command::new(&self.bins.cli)
            .args(["plan", "check"])
            .arg(&path)
            .output()
            .context("running podmesh plan check")?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!(
                "podmesh plan check {} failed: {}",
                path.display(),
                out.status
            );
        }
        Ok(())
    }

    fn record_process(&mut self, pid: u32, program: &str) -> anyhow::Result<()> {
        self.state.processes.push((pid, program.to_string()));
        self.state.save()
    }

    /// Starts cluster `ci`'s mesh etcd inside its control-plane namespace,
    /// listening on the underlay address; returns the agents' kvstore config
    /// and the proxy's upstream config.
    fn start_etcd(&mut self, ci: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
        let c = &self.clusters[ci];
        let cdir = self.dir.join("clusters").join(&c.name);
        let pki = Arc::new(Pki::in_dir(
            &self.dir.join("pki").join(&c.name).join("etcd"),
            &format!("{} etcd", c.name),
        )?);
        let (name, ip) = (format!("{}-mesh", c.name), IpAddr::V4(c.cp_ip));
        let etcd = in_netns(&c.cp_ns, || Etcd::start_listening(pki.clone(), &name, ip))?;
        let endpoint = format!("https://{}:{}", c.cp_ip, etcd.port());
        let agent = pki.client(&format!("{}-agent", c.name))?;
        let proxy = pki.client(&format!("{}-proxy-upstream", c.name))?;
        let kv = write_client_config(
            &cdir.join("kvstore.yaml"),
            std::slice::from_ref(&endpoint),
            pki.ca(),
            &agent,
        )?;
        let up = write_client_config(
            &cdir.join("upstream.yaml"),
            std::slice::from_ref(&endpoint),
            pki.ca(),
            &proxy,
        )?;
        // The agents will reach it from their node namespaces over the underlay.
        let node_ns = c.nodes[0].ns.clone();
        etcdctl(
            &node_ns,
            &endpoint,
            pki.ca(),
            &agent.cert,
            &agent.key,
            &["endpoint", "health"],
        )
        .context("the mesh etcd is not reachable from a node with the agent's certificate")?;
        let (pid, dir) = etcd.detach();
        self.state.dirs.push(dir);
        if let Some(pid) = pid {
            self.record_process(pid, "etcd")?;
        }
        eprintln!(
            "  {}: mesh etcd at {endpoint} (mTLS), reachable from {node_ns} with the agent's certificate",
            self.clusters[ci].name
        );
        Ok((kv, up))
    }

    /// For every cluster, a directory like the mounted Secret: one etcd
    /// client YAML per remote cluster (pointing at its proxy) plus the remote
    /// proxy's CA and the client certificate that proxy's CA issued to us.
    fn write_clustermesh_dirs(&self) -> anyhow::Result<()> {
        for local in &self.clusters {
            let dir = self
                .dir
                .join("clusters")
                .join(&local.name)
                .join("clustermesh");
            fs::create_dir_all(&dir)?;
            for remote in self.clusters.iter().filter(|r| r.name != local.name) {
                let r = &remote.name;
                let cert = remote.proxy_pki.issue(&CertSpec {
                    name: &local.name,
                    file: Some(&format!("client-for-{}", local.name)),
                    sans: vec![],
                    server: false,
                    client: true,
                    expired: false,
                })?;
                fs::copy(remote.proxy_pki.ca(), dir.join(format!("{r}.ca.crt")))?;
                fs::copy(&cert.cert, dir.join(format!("{r}.client.crt")))?;
                fs::copy(&cert.key, dir.join(format!("{r}.client.key")))?;
                let files = podmesh_tests::pki::CertFiles {
                    cert: dir.join(format!("{r}.client.crt")),
                    key: dir.join(format!("{r}.client.key")),
                };
                write_client_config(
                    &dir.join(r),
                    &[format!("https://{}:{PROXY_PORT}", remote.cp_ip)],
                    &dir.join(format!("{r}.ca.crt")),
                    &files,
                )?;
            }
            eprintln!("  {}: Secret directory {}", local.name, dir.display());
        }
        Ok(())
    }

    fn start_proxy(&mut self, ci: usize, upstream: &Path) -> anyhow::Result<()> {
        let c = &self.clusters[ci];
        let server = c
            .proxy_pki
            .server(&format!("{}-proxy", c.name), &[&c.cp_ip.to_string()])?;
        let listen = format!("{}:{PROXY_PORT}", c.cp_ip);
        let mut cmd = Command::new(&self.bins.proxy);
        cmd.arg("--listen")
            .arg(&listen)
            .arg("--upstream-config")
            .arg(upstream)
            .arg("--tls-cert")
            .arg(&server.cert)
            .arg("--tls-key")
            .arg(&server.key)
            .arg("--client-ca")
            .arg(c.proxy_pki.ca())
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{PROXY_METRICS_PORT}"));
        let (ns, name) = (c.cp_ns.clone(), format!("{}-proxy", c.name));
        let pid = self.spawn_in(&ns, &name, cmd)?;
        self.wait_ready(&ns, &name, pid, PROXY_METRICS_PORT, Duration::from_secs(30))?;
        eprintln!(
            "  {}: podmesh-etcd-proxy ready on {listen}",
            self.clusters[ci].name
        );
        Ok(())
    }

    fn start_agent(
        &mut self,
        ci: usize,
        ni: usize,
        kvstore: &Path,
        datapath: &str,
    ) -> anyhow::Result<()> {
        let c = &self.clusters[ci];
        let node = &c.nodes[ni];
        let mut cmd = Command::new(&self.bins.agent);
        cmd.args(["--cluster-name", &c.name])
            .args(["--cluster-id", &c.id.to_string()])
            .args(["--node-name", &node.name])
            .args(["--node-ip", &node.addr.to_string()])
            .args(["--pod-cidr", &node.pod_cidr])
            .args(["--cluster-pod-cidr", &c.pod_cidr])
            .arg("--kvstore-config")
            .arg(kvstore)
            .arg("--clustermesh-config")
            .arg(self.dir.join("clusters").join(&c.name).join("clustermesh"))
            .args(["--datapath", datapath])
            .args(["--status-addr", &format!("127.0.0.1:{STATUS_PORT}")]);
        let (ns, name) = (node.ns.clone(), node.name.clone());
        let pid = self.spawn_in(&ns, &name, cmd)?;
        self.agents.push((ns, name, pid));
        Ok(())
    }

    /// Starts `cmd` inside namespace `ns` with its output in `logs/<name>.log`.
    fn spawn_in(&mut self, ns: &str, name: &str, cmd: Command) -> anyhow::Result<u32> {
        let log = fs::File::create(self.log(name))?;
        let mut full = Command::new("ip");
        full.args(["netns", "exec", ns])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // `ip netns exec` execs the program: the child's PID is the program's.
        let child = full
            .spawn()
            .with_context(|| format!("starting {}", crate::util::show(&full)))?;
        let pid = child.id();
        let program = cmd.get_program().to_string_lossy().into_owned();
        self.record_process(pid, &program)?;
        Ok(pid)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Polls `http://127.0.0.1:<port>/readyz` inside `ns` until it answers
    /// 200; fails at once, with the process's log, if the process exits.
    fn wait_ready(
        &self,
        ns: &str,
        name: &str,
        pid: u32,
        port: u16,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                bail!(
                    "{name} exited before it was ready; the last lines of {}:\n{}",
                    self.log(name).display(),
                    tail(&self.log(name), 15)
                );
            }
            let ready = in_netns(ns, || http_get(port, "/readyz"))
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"));
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} not ready after {timeout:?} (GET /readyz on 127.0.0.1:{port} in {ns}); \
                     the last lines of {}:\n{}",
                    self.log(name).display(),
                    tail(&self.log(name), 15)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_agents_ready(&self) -> anyhow::Result<()> {
        for (ns, name, pid) in &self.agents {
            self.wait_ready(ns, name, *pid, STATUS_PORT, Duration::from_secs(60))?;
            eprintln!("  {name}: agent ready");
        }
        Ok(())
    }

    /// Pings every pod of every other cluster (1 packet each), retrying the
    /// pairs that do not answer yet; returns (reachable, total, time from
    /// `since` until every pair had answered).
    fn ping_all(&self, timeout: Duration, since: Instant) -> (usize, usize, Option<Duration>) {
        let pods: Vec<(&str, &str, Ipv4Addr)> = self
            .clusters
            .iter()
            .flat_map(|c| {
                c.nodes.iter().flat_map(move |n| {
                    n.pods
                        .iter()
                        .map(move |(ns, a)| (c.name.as_str(), ns.as_str(), *a))
                })
            })
            .collect();
        let mut pending: Vec<(&str, Ipv4Addr)> = Vec::new();
        for (c1, ns1, _) in &pods {
            for (c2, _, a2) in &pods {
                if c1 != c2 {
                    pending.push((ns1, *a2));
                }
            }
        }
        let total = pending.len();
        let deadline = Instant::now() + timeout;
        let mut last_report = Instant::now();
        loop {
            pending.retain(|(ns, addr)| !ping(ns, *addr));
            let ok = total - pending.len();
            if pending.is_empty() {
                eprintln!("  {ok}/{total} pairs answer");
                return (ok, total, Some(since.elapsed()));
            }
            if Instant::now() > deadline {
                for (ns, addr) in pending.iter().take(10) {
                    eprintln!("  unreachable: {} -> {addr}", ns.trim_start_matches(PREFIX));
                }
                if pending.len() > 10 {
                    eprintln!("  … and {} more unreachable pairs", pending.len() - 10);
                }
                return (ok, total, None);
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!("  {ok}/{total} pairs answer so far, retrying the rest");
                last_report = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn print_logs(&self) {
        let Ok(rd) = fs::read_dir(self.dir.join("logs")) else {
            return;
        };
        for e in rd.flatten() {
            let t = tail(&e.path(), 5);
            if !t.trim().is_empty() {
                eprintln!("--- {} ---\n{t}", e.path().display());
            }
        }
    }

    fn print_instructions(&self) {
        let c0 = &self.clusters[0];
        let c1 = &self.clusters[1];
        let (pod, _) = &c0.nodes[0].pods[0];
        let (_, target) = &c1.nodes[1].pods[0];
        eprintln!(
            "\nThe mesh keeps running.\n\
             \x20 a shell in a pod:        ip netns exec {pod} bash\n\
             \x20 ping across clusters:    ip netns exec {pod} ping {target}\n\
             \x20 status of a node:        ip netns exec {node} {cli} status\n\
             \x20 node routes/devices:     ip -n {node} route; ip -n {node} -d link show podmesh0\n\
             \x20 logs, certificates, Secret directories: {STATE_DIR}/\n\
             \x20 remove everything:       cargo xtask demo down",
            node = c0.nodes[0].ns,
            cli = self.bins.cli.display(),
        );
    }
}

/// Attaches a control-plane namespace to the underlay bridge with `ip`.
fn add_cp_namespace(underlay: &str, name: &str, ci: usize, ip: Ipv4Addr) -> anyhow::Result<()> {
    let ns = NetNs::named(name)?;
    let port = format!("u{ci}cp");
    netns::ip(&[
        "-n", underlay, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", name,
    ])?;
    netns::ip(&["-n", underlay, "link", "set", &port, "master", "br0", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{ip}/{}", podmesh_tests::topo::UNDERLAY_PREFIX_LEN),
        "dev",
        "eth0",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    // Recorded in the state file; `demo down` removes it.
    std::mem::forget(ns);
    Ok(())
}

/// Runs `f` on a thread that has entered namespace `name` (children it
/// spawns are born there), without taking ownership of the namespace.
fn in_netns<T: Send>(
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

/// `etcdctl` (v3) inside namespace `ns` with a client certificate; fails with its output.
fn etcdctl(
    ns: &str,
    endpoint: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "etcdctl"]);
    // etcdctl reads every ETCDCTL_* variable as a flag.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--cacert")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["--dial-timeout", "5s", "--command-timeout", "5s"])
        .args(args)
        .output()
        .context("running etcdctl (install etcd-client: cargo xtask setup)")?;
    if !out.status.success() {
        bail!(
            "etcdctl {} against {endpoint} from {ns}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ping(ns: &str, addr: Ipv4Addr) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", "1",
        ])
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `cargo xtask demo down`: stops the recorded processes, deletes the
/// recorded namespaces (and any other `pmdemo-` namespace), removes the
/// recorded directories. Keeps going after a failure and reports them all.
pub fn down() -> anyhow::Result<()> {
    let state = State::load()?;
    let mut errors = Vec::new();
    let mut namespaces = state
        .as_ref()
        .map(|s| s.namespaces.clone())
        .unwrap_or_default();
    // Namespaces named with the demo's prefix are the demo's, also when the
    // state file was lost.
    if let Ok(list) = netns::ip(&["netns", "list"]) {
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) && !namespaces.iter().any(|n| n == name) {
                namespaces.push(name.to_string());
            }
        }
    }
    if let Some(s) = &state {
        for (pid, program) in &s.processes {
            // Only a process that still runs the program we started: a PID
            // may have been reused since.
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let name = Path::new(program).file_name().unwrap_or_default();
            if exe.file_name() == Some(name) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
    let mut removed = 0;
    for ns in namespaces.iter().rev() {
        if !netns::exists(ns) {
            continue;
        }
        if let Ok(pids) = netns::ip(&["netns", "pids", ns]) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        match netns::ip(&["netns", "del", ns]) {
            Ok(_) => removed += 1,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let mut dirs: Vec<PathBuf> = state.map(|s| s.dirs).unwrap_or_default();
    dirs.push(PathBuf::from(STATE_DIR));
    for d in dirs.iter().filter(|d| d.exists()) {
        if let Err(e) = fs::remove_dir_all(d) {
            errors.push(format!("removing {}: {e}", d.display()));
        }
    }
    eprintln!("demo down: removed {removed} namespaces and the demo's files");
    if !errors.is_empty() {
        bail!(
            "demo down: {} failures:\n{}",
            errors.len(),
            errors.join("\n")
        );
    }
    Ok(())
}
