//! `cargo xtask demo`: a whole multi-cluster mesh in network namespaces, in one command.
//!
//! N clusters × 2 nodes × 2 pods, run by the end-to-end tests' fixture
//! ([`podmesh_tests::mesh::Mesh`]): per cluster a mesh etcd with mTLS and a
//! podmesh-etcd-proxy in a control-plane namespace, certificates, a
//! Secret-style directory, one agent per node with static node information.
//! The demo checks the address plan first, shows progress, waits for
//! readiness, shows `podmesh status`, pings every pod of every other cluster
//! and prints a summary.
//!
//! Every namespace it makes is named `pmdemo-…` and every file lives in
//! `/run/podmesh-demo`. A state file there marks a demo as set up before
//! anything is made; with `--keep` it lists what the mesh left running
//! ([`Kept`]). `cargo xtask demo down` removes exactly that, and after an
//! interrupted run every `pmdemo-` namespace (with the processes inside) and
//! the directory. It uses only addresses inside the namespaces it creates,
//! and loopback.
use std::{
    fmt::Display,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use podmesh_tests::{
    mesh::{Binaries, Kept, KeptProcess, Mesh, MeshBuilder, remove_namespace, unmount_below},
    netns,
    topo::{ClusterPlan, Underlay},
};

use crate::util::{cargo, sh, target_dir};

/// Every namespace the demo creates starts with this.
pub const PREFIX: &str = "pmdemo-";
/// Where the demo keeps its state file, certificates, configs and logs.
const STATE_DIR: &str = "/run/podmesh-demo";
const NODES: usize = 2;
const PODS: usize = 2;
const NAMES: &[&str] = &[
    "east", "west", "north", "south", "central", "edge", "lab", "dr",
];
/// Steps the demo announces.
const STEPS: u32 = 8;

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
    /// How the standard CNI plugins attach the pods: `bridge` (a cni0
    /// bridge, kubenet style) or `ptp` (a routed veth per pod, as Calico and
    /// Cilium do); host-local addresses and ipMasq either way.
    #[arg(long, default_value = "bridge")]
    cni: podmesh_tests::cni::Cni,
    /// Address families: `ipv4` (an IPv4 underlay, IPv4 pods), `ipv6` (an
    /// IPv6-only underlay: no IPv4 address on any node's underlay device,
    /// mesh etcds and proxies reached over IPv6; dual-stack pods) or `dual`
    /// (a dual-stack underlay, tunnels over IPv4 unless the agents get
    /// `--underlay-family ipv6`; dual-stack pods).
    #[arg(long, value_enum, default_value = "ipv4")]
    ip_family: IpFamily,
    /// How long to wait for every pair of pods to reach each other.
    #[arg(long, default_value_t = 90)]
    timeout_secs: u64,
}

/// The demo's address families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum IpFamily {
    Ipv4,
    Ipv6,
    Dual,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Remove everything a previous `cargo xtask demo` made, and nothing else.
    Down,
}

fn state_path() -> PathBuf {
    Path::new(STATE_DIR).join("state.json")
}

/// The state file: `None` when no demo is set up; an empty [`Kept`] while
/// one is being set up (or was interrupted); what a kept mesh left running.
fn load_state() -> anyhow::Result<Option<Kept>> {
    match fs::read(state_path()) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is not a demo state file", state_path().display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("reading the demo state"),
    }
}

fn save_state(kept: &Kept) -> anyhow::Result<()> {
    fs::create_dir_all(STATE_DIR)?;
    fs::write(state_path(), serde_json::to_vec_pretty(kept)?).context("writing the demo state")
}

/// Network namespaces named with the demo's prefix.
fn demo_namespaces() -> Vec<String> {
    netns::ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_string)
        .collect()
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if let Some(Action::Down) = args.action {
        return down();
    }
    if !is_root() {
        bail!("the demo creates network namespaces: run it as root");
    }
    if load_state()?.is_some() || !demo_namespaces().is_empty() {
        bail!(
            "a demo is already set up (state in {STATE_DIR}, namespaces {PREFIX}…); \
             remove it with `cargo xtask demo down`"
        );
    }
    let started = Instant::now();
    step(1, "setup and build");
    if !args.skip_setup {
        crate::setup::run(&crate::setup::SetupArgs { check: false })?;
    }
    sh(cargo().args(["build", "-p", "podmesh-agent", "-p", "podmesh-etcd-proxy"]))?;
    let bins = locate_binaries()?;
    let cli = bins.cli.clone().expect("located with the CLI");

    let mut builder = NAMES[..usize::from(args.clusters)]
        .iter()
        .fold(Mesh::builder(), |b, name| b.cluster(name, NODES))
        .pods(PODS)
        .cni(&[args.cni])
        .datapath(&args.datapath)
        .namespace_prefix(PREFIX)
        .dir_in(Path::new(STATE_DIR))
        .binaries(bins)
        // What a user runs: the agents' and proxies' default timings.
        .quick_retries(false);
    builder = match args.ip_family {
        IpFamily::Ipv4 => builder,
        IpFamily::Ipv6 => builder.underlay(Underlay::Ipv6).dual_stack_pods(),
        IpFamily::Dual => builder.underlay(Underlay::Dual).dual_stack_pods(),
    };

    step(2, "address plan (podmesh plan check), network namespaces");
    save_state(&Kept::default())?;
    eprintln!("demo: if this is interrupted, `cargo xtask demo down` removes what was made so far");
    let mut mesh = match check_plan(&builder, &cli).and_then(|()| builder.create()) {
        Ok(m) => m,
        Err(e) => {
            if let Err(d) = down() {
                eprintln!("demo: tearing down after the failure also failed: {d:#}");
            }
            return Err(e);
        }
    };
    match bring_up(&mut mesh, args) {
        Ok(all_reachable) => {
            if args.keep {
                let how = instructions(&mesh, &cli);
                save_state(&mesh.into_kept())?;
                eprintln!("{how}");
            } else {
                step(STEPS, "tear down");
                let before = demo_namespaces().len();
                drop(mesh);
                remove_rest(before, None)?;
            }
            eprintln!("demo: finished in {:.0?}", started.elapsed());
            if !all_reachable {
                bail!("not every pod reached every pod of the other clusters (see above)");
            }
            Ok(())
        }
        Err(e) => {
            print_logs(&mesh);
            if args.keep {
                let logs = mesh.log_dir();
                save_state(&mesh.into_kept())?;
                eprintln!(
                    "demo: failed; left in place for inspection (logs in {}); \
                     `cargo xtask demo down` removes it",
                    logs.display()
                );
            } else {
                let before = demo_namespaces().len();
                drop(mesh);
                if let Err(d) = remove_rest(before, None) {
                    eprintln!("demo: tearing down after the failure also failed: {d:#}");
                }
            }
            Err(e)
        }
    }
}

fn step(n: u32, what: &str) {
    eprintln!("\n==> [{n}/{STEPS}] {what}");
}

fn is_root() -> bool {
    crate::util::output(Command::new("id").arg("-u")).is_ok_and(|s| s == "0")
}

/// The binaries `cargo build` just made.
fn locate_binaries() -> anyhow::Result<Binaries> {
    let dir = target_dir().join("debug");
    let b = Binaries {
        agent: dir.join("podmesh-agent"),
        proxy: dir.join("podmesh-etcd-proxy"),
        cli: Some(dir.join("podmesh")),
    };
    for p in [&b.agent, &b.proxy].into_iter().chain(&b.cli) {
        if !p.is_file() {
            bail!("{} was not built", p.display());
        }
    }
    Ok(b)
}

/// Writes the demo's address plan and runs `podmesh plan check` on it,
/// as an operator would before connecting clusters.
fn check_plan(builder: &MeshBuilder, cli: &Path) -> anyhow::Result<()> {
    let plans: Vec<ClusterPlan> = builder.plans();
    let mut y = String::from("clusters:\n");
    for (ci, p) in plans.iter().enumerate() {
        let mut pods = vec![p.pod_cidr.to_string()];
        pods.extend(p.pod_cidr_v6.map(|c| format!("\"{c}\"")));
        let mut nodes = Vec::new();
        if p.underlay.has_v4() {
            nodes.push(format!("172.31.{}.0/24", ci + 1));
        }
        if p.underlay.has_v6() {
            // fd31::<c+1>:<n+1>: one /112 per cluster.
            nodes.push(format!("\"fd31::{:x}:0/112\"", ci + 1));
        }
        y.push_str(&format!(
            "- name: {}\n  id: {}\n  podCIDRs: [{}]\n  serviceCIDRs: []\n  \
             nodeCIDRs: [{}]\n  nodeMaskSize: {{ipv4: {}, ipv6: 64}}\n  nodes: {}\n",
            p.name,
            ci + 1,
            pods.join(", "),
            nodes.join(", "),
            p.node_prefix_len,
            p.nodes
        ));
    }
    fs::create_dir_all(STATE_DIR)?;
    let path = Path::new(STATE_DIR).join("plan.yaml");
    fs::write(&path, y)?;
    let out = Command::new(cli)
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

/// Brings the created mesh up; returns whether every cross-cluster pair was reachable.
fn bring_up(mesh: &mut Mesh, args: &DemoArgs) -> anyhow::Result<bool> {
    for cp in mesh.control_planes() {
        let nodes: Vec<String> = mesh
            .topo
            .cluster_nodes(&cp.cluster)
            .map(|n| {
                let addrs: Vec<String> =
                    n.underlay_addrs().iter().map(ToString::to_string).collect();
                let mut pods = n.pod_cidr.to_string();
                if let Some(v6) = n.pod_cidr_v6 {
                    pods.push_str(&format!(" {v6}"));
                }
                format!("{} {} pods {pods}", n.name, addrs.join(" "))
            })
            .collect();
        eprintln!(
            "  {} (ID {}, Pod CIDR {}): nodes {} ; control plane {} ({})",
            cp.cluster,
            cp.id,
            cp.pod_cidr,
            nodes.join(", "),
            cp.namespace,
            cp.address
        );
    }

    step(
        3,
        "mesh etcd with mTLS per cluster, certificates, Secret directories",
    );
    mesh.start_kvstores()?;
    for cp in mesh.control_planes() {
        eprintln!(
            "  {}: mesh etcd at {} (mTLS); Secret directory {}",
            cp.cluster,
            cp.etcd_endpoint.as_deref().unwrap_or("-"),
            cp.secret_dir.display()
        );
    }

    step(4, "podmesh-etcd-proxy per cluster");
    mesh.start_proxies()?;
    for cp in mesh.control_planes() {
        eprintln!(
            "  {}: podmesh-etcd-proxy ready at {}",
            cp.cluster, cp.proxy_endpoint
        );
    }

    step(5, "agents (static node info) on every node");
    let agents_started = Instant::now();
    mesh.start_agents()?;
    let nodes: Vec<String> = mesh.topo.nodes.iter().map(|n| n.name.clone()).collect();
    for node in &nodes {
        mesh.wait_agent_ready(node, Duration::from_secs(60))?;
        eprintln!(
            "  {node}: agent ready after {:.1?}",
            agents_started.elapsed()
        );
    }

    step(6, "podmesh status (one node per cluster)");
    for cp in mesh.control_planes() {
        let Some(node) = mesh.nodes_of(&cp.cluster).into_iter().next() else {
            continue;
        };
        eprintln!("--- {} / {node} ---", cp.cluster);
        let out = mesh.podmesh(&node, &["status"])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }

    step(7, "ping every pod of every other cluster");
    let timeout = Duration::from_secs(args.timeout_secs);
    let pairs = mesh.cross_cluster_pairs();
    let (unreachable, converged) =
        ping_all(&pairs, |p| mesh.unreachable(p), timeout, agents_started);
    let total = pairs.len();
    let ok = total - unreachable.len();
    let pairs6 = mesh.cross_cluster_pairs6();
    let mut unreachable6 = Vec::new();
    if !pairs6.is_empty() {
        eprintln!("  IPv6 (dual-stack pods):");
        let (bad, _) = ping_all(&pairs6, |p| mesh.unreachable6(p), timeout, agents_started);
        unreachable6 = bad;
    }
    eprintln!("\n==> summary");
    eprintln!(
        "  clusters {}, nodes {}, pods {}",
        mesh.control_planes().len(),
        nodes.len(),
        mesh.topo.pods().count()
    );
    print_matrix(mesh, &unreachable);
    eprintln!("  cross-cluster pod pairs reachable: {ok}/{total}");
    if !pairs6.is_empty() {
        eprintln!(
            "  cross-cluster pod pairs reachable over IPv6: {}/{}",
            pairs6.len() - unreachable6.len(),
            pairs6.len()
        );
    }
    let sources_kept = if unreachable.is_empty() {
        check_sources(mesh)
    } else {
        false
    };
    match converged {
        Some(t) => {
            eprintln!("  time to converge (agents started -> every pair answers): {t:.1?}")
        }
        None => eprintln!("  did not converge within {timeout:?}"),
    }
    Ok(unreachable.is_empty() && unreachable6.is_empty() && sources_kept)
}

/// One TCP connection from the first pod of every cluster to the first pod
/// of every other: the receiver says which source address arrived. The CNI
/// masquerades pod traffic leaving the node (ipMasq); podmesh's exemption
/// keeps the pod's own address towards remote clusters.
fn check_sources(mesh: &Mesh) -> bool {
    use podmesh_tests::flow::{Sink, exchange};
    let firsts: Vec<(String, &podmesh_tests::topo::Pod)> = mesh
        .control_planes()
        .into_iter()
        .filter_map(|c| {
            let (_, pod) = mesh.topo.pods().find(|(n, _)| n.cluster == c.cluster)?;
            Some((c.cluster, pod))
        })
        .collect();
    let sinks: Vec<_> = firsts.iter().map(|(_, p)| Sink::start(&p.ns)).collect();
    if let Some(Err(e)) = sinks.iter().find(|s| s.is_err()) {
        eprintln!("  cannot listen in the pods: {e:#}");
        return false;
    }
    eprintln!("  pod source addresses across clusters (the CNI masquerades with ipMasq):");
    let mut all = true;
    for (a, from) in &firsts {
        for (b, to) in &firsts {
            if a == b {
                continue;
            }
            match exchange(&from.ns, std::net::IpAddr::V4(to.addr), 1024) {
                Ok(seen) => {
                    let kept = seen.source == std::net::IpAddr::V4(from.addr);
                    all &= kept;
                    eprintln!(
                        "    {a} {} ({}) -> {b} {}: arrived from {} ({})",
                        from.name,
                        from.addr,
                        to.name,
                        seen.source,
                        if kept {
                            "pod address kept"
                        } else {
                            "MASQUERADED"
                        }
                    );
                }
                Err(e) => {
                    all = false;
                    eprintln!("    {a} {} -> {b} {}: {e:#}", from.name, to.name);
                }
            }
        }
    }
    all
}

/// Pings every pair (1 packet each), retrying the pairs that do not answer
/// yet; returns the pairs that never answered and the time from `since`
/// until every pair had answered.
fn ping_all<A: Clone + Display>(
    pairs: &[(String, A)],
    unreachable: impl Fn(&[(String, A)]) -> Vec<(String, A)>,
    timeout: Duration,
    since: Instant,
) -> (Vec<(String, A)>, Option<Duration>) {
    let total = pairs.len();
    let mut pending = pairs.to_vec();
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    loop {
        pending = unreachable(&pending);
        let ok = total - pending.len();
        if pending.is_empty() {
            eprintln!("  {ok}/{total} pairs answer");
            return (pending, Some(since.elapsed()));
        }
        if Instant::now() > deadline {
            for (from, to) in pending.iter().take(10) {
                eprintln!("  unreachable: {from} -> {to}");
            }
            if pending.len() > 10 {
                eprintln!("  … and {} more unreachable pairs", pending.len() - 10);
            }
            return (pending, None);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("  {ok}/{total} pairs answer so far, retrying the rest");
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Pairs that answered, per (from cluster, to cluster), as a table.
fn print_matrix(mesh: &Mesh, unreachable: &[(String, std::net::Ipv4Addr)]) {
    let names: Vec<String> = mesh
        .control_planes()
        .into_iter()
        .map(|c| c.cluster)
        .collect();
    eprint!("  {:<10}", "from \\ to");
    for n in &names {
        eprint!(" {n:>9}");
    }
    eprintln!();
    for a in &names {
        eprint!("  {a:<10}");
        for b in &names {
            if a == b {
                eprint!(" {:>9}", "-");
                continue;
            }
            let pairs = mesh.pairs(a, b);
            let bad = pairs.iter().filter(|p| unreachable.contains(p)).count();
            eprint!(" {:>9}", format!("{}/{}", pairs.len() - bad, pairs.len()));
        }
        eprintln!();
    }
}

fn print_logs(mesh: &Mesh) {
    let Ok(rd) = fs::read_dir(mesh.log_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let s = fs::read_to_string(e.path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        let t = lines[lines.len().saturating_sub(5)..].join("\n");
        if !t.trim().is_empty() {
            eprintln!("--- {} ---\n{t}", e.path().display());
        }
    }
}

/// How to explore the mesh that keeps running.
fn instructions(mesh: &Mesh, cli: &Path) -> String {
    let topo = &mesh.topo;
    let names: Vec<String> = mesh
        .control_planes()
        .into_iter()
        .map(|c| c.cluster)
        .collect();
    let node = topo
        .cluster_nodes(&names[0])
        .next()
        .expect("clusters have nodes");
    let pod = node.pods[0].ns.name();
    let target = topo
        .cluster_nodes(&names[1])
        .last()
        .map(|n| n.pods[0].addr)
        .expect("clusters have nodes");
    let node_ns = node.ns.name();
    format!(
        "\nThe mesh keeps running.\n\
         \x20 a shell in a pod:        ip netns exec {pod} bash\n\
         \x20 ping across clusters:    ip netns exec {pod} ping {target}\n\
         \x20 status of a node:        ip netns exec {node_ns} {cli} status   (-o json for every record)\n\
         \x20 node routes/devices:     ip -n {node_ns} route; ip -n {node_ns} -d link show podmesh0\n\
         \x20 logs:                    {logs}/\n\
         \x20 certificates, Secret directories, etcd data: {dir}/\n\
         \x20 remove everything:       cargo xtask demo down",
        cli = cli.display(),
        logs = mesh.log_dir().display(),
        dir = mesh
            .log_dir()
            .parent()
            .unwrap_or(Path::new(STATE_DIR))
            .display(),
    )
}

/// `cargo xtask demo down`: removes what the state file lists (processes,
/// namespaces, mounts, the mesh's directory), then every other `pmdemo-`
/// namespace with the processes inside and every mount below the state
/// directory (an interrupted run), and the state directory.
/// Keeps going after a failure and reports them all.
pub fn down() -> anyhow::Result<()> {
    let before = demo_namespaces().len();
    let kept = load_state()?;
    remove_rest(before, kept.as_ref())
}

/// Removes `kept`, every `pmdemo-` namespace and the state directory, and
/// says how many of the `before` namespaces went.
fn remove_rest(before: usize, kept: Option<&Kept>) -> anyhow::Result<()> {
    let running = |p: &&KeptProcess| Path::new(&format!("/proc/{}", p.pid)).exists();
    let stopped = kept.map_or(0, |k| k.processes.iter().filter(running).count());
    let mut errors = kept.map(Kept::remove).unwrap_or_default();
    // Namespaces named with the demo's prefix are the demo's, also when a
    // run was interrupted before it could list them.
    for ns in demo_namespaces() {
        if let Err(e) = remove_namespace(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    errors.extend(unmount_below(Path::new(STATE_DIR)));
    if Path::new(STATE_DIR).exists()
        && let Err(e) = fs::remove_dir_all(STATE_DIR)
    {
        errors.push(format!("removing {STATE_DIR}: {e}"));
    }
    let left = demo_namespaces();
    if !left.is_empty() {
        errors.push(format!("namespaces still there: {}", left.join(" ")));
    }
    eprintln!(
        "demo down: removed {} namespaces{} and {STATE_DIR}",
        before.saturating_sub(left.len()),
        if stopped > 0 {
            format!(", stopped {stopped} processes")
        } else {
            String::new()
        }
    );
    if !errors.is_empty() {
        bail!(
            "demo down: {} failures:\n{}",
            errors.len(),
            errors.join("\n")
        );
    }
    Ok(())
}
