//! The shell around [`super::detect`]: reads the devices of the agent's
//! network namespace (netlink), the CNI config directory, Cilium's
//! `node_config.h` and Calico's pools, and keeps the findings in the status.
//!
//! Detection runs at start and then once per `--resync-interval`, like the
//! datapath's full resync: one netlink link dump, a directory of small files,
//! and (on Calico nodes only) one list of IPPools, so it is cheap. Each finding
//! is logged when it first appears or changes, not at every run.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use tokio::task::JoinHandle;

use super::{
    CiliumHostRouting, CiliumSeen, CniConfigSeen, CniFinding, LinkSeen, NodeObservation, Severity,
    calico::{KubePools, PoolSource, without_kubernetes},
    cilium_host_routing, detect, foreign_links, is_calico, is_cilium, parse_cni_config,
};
use crate::{
    config::{AgentConfig, DatapathMode, NodeSource},
    datapath::{nl::Netlink, rtnl},
    desired::{Decoded, MeshCache},
    status::Status,
};

/// Where the node's CNI leaves its traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sources {
    /// `--cni-conf-dir`.
    pub cni_conf_dir: PathBuf,
    /// `--cilium-state-dir`: holds `globals/node_config.h`.
    pub cilium_state_dir: PathBuf,
}

/// The devices of the calling thread's network namespace, less podmesh's own.
pub fn read_links() -> Result<Vec<LinkSeen>, String> {
    let mut nl = Netlink::open(None).map_err(|e| format!("listing network devices: {e}"))?;
    let links = rtnl::links(&mut nl).map_err(|e| format!("listing network devices: {e}"))?;
    Ok(foreign_links(
        links
            .into_iter()
            .map(|l| LinkSeen {
                name: l.name,
                kind: l.kind,
                vxlan_port: l.vxlan.map(|v| v.port),
                vni: l.vxlan.map(|v| v.vni),
            })
            .collect(),
    ))
}

/// The network configs of `dir` (`*.conf`, `*.conflist`, `*.json`), by file
/// name. A directory that does not exist holds none; one that cannot be read
/// is the error.
pub fn read_cni_dir(dir: &Path) -> Result<Vec<CniConfigSeen>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort();
    Ok(files
        .iter()
        .map(|p| {
            let file = p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            match std::fs::read_to_string(p) {
                Ok(text) => parse_cni_config(&file, &text),
                Err(e) => CniConfigSeen {
                    file,
                    error: Some(format!("cannot read: {e}")),
                    ..CniConfigSeen::default()
                },
            }
        })
        .collect())
}

/// Cilium's host routing from `<state_dir>/globals/node_config.h`.
pub fn read_cilium(state_dir: &Path) -> CiliumSeen {
    let path = state_dir.join("globals/node_config.h");
    match std::fs::read_to_string(&path) {
        Ok(text) => CiliumSeen {
            host_routing: cilium_host_routing(&text),
            detail: path.display().to_string(),
        },
        Err(e) => CiliumSeen {
            host_routing: CiliumHostRouting::Unknown,
            detail: format!("{}: {e}", path.display()),
        },
    }
}

/// What this node shows, without Calico's pools: devices, CNI configs and,
/// when Cilium is there, its host routing. Blocking (netlink, files): call it
/// on a thread that is in the node's network namespace.
pub fn observe_local(sources: &Sources, tunnel_port: Option<u16>) -> NodeObservation {
    let (links, links_error) = match read_links() {
        Ok(l) => (l, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let (cni_configs, cni_conf_error) = match read_cni_dir(&sources.cni_conf_dir) {
        Ok(c) => (c, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let mut obs = NodeObservation {
        links,
        links_error,
        cni_conf_dir: sources.cni_conf_dir.display().to_string(),
        cni_configs,
        cni_conf_error,
        tunnel_port,
        ..NodeObservation::default()
    };
    if is_cilium(&obs) {
        obs.cilium = read_cilium(&sources.cilium_state_dir);
    }
    obs
}

/// The findings for this node now: [`observe_local`] plus, on a Calico
/// node, its pools from `pools`, checked against `remote_pod_cidrs`.
pub async fn observe<P: PoolSource>(
    sources: &Sources,
    tunnel_port: Option<u16>,
    pools: &P,
    remote_pod_cidrs: Vec<IpNet>,
) -> NodeObservation {
    let s = sources.clone();
    let mut obs = tokio::task::spawn_blocking(move || observe_local(&s, tunnel_port))
        .await
        .unwrap_or_else(|e| NodeObservation {
            links_error: Some(format!("device scan failed: {e}")),
            ..NodeObservation::default()
        });
    obs.remote_pod_cidrs = remote_pod_cidrs;
    if is_calico(&obs) {
        obs.calico_pools = pools.pools().await;
    }
    obs
}

/// The remote clusters' Pod CIDRs the agent holds: those of their cluster
/// records, and node Pod CIDRs outside them.
pub fn remote_pod_cidrs(cache: &MeshCache) -> Vec<IpNet> {
    cache.with(|remotes| {
        let mut clusters: Vec<IpNet> = Vec::new();
        let mut nodes: Vec<IpNet> = Vec::new();
        for r in remotes.values() {
            for e in r.entries.values() {
                match &e.decoded {
                    Decoded::Cluster(c) => clusters.extend(c.pod_cidrs.iter().copied()),
                    Decoded::Node(n) => nodes.extend(n.pod_cidrs.iter().copied()),
                    Decoded::Invalid(_) => {}
                }
            }
        }
        for n in nodes {
            if !clusters.iter().any(|c| c.contains(&n)) {
                clusters.push(n);
            }
        }
        clusters.sort();
        clusters.dedup();
        clusters
    })
}

/// Logs the findings of `now` that were not in `before` (once each; again
/// when one changes), as info or, with the action as hint, as a warning.
pub fn log_new(before: &[CniFinding], now: &[CniFinding]) {
    for f in now.iter().filter(|f| !before.contains(f)) {
        let evidence = f.evidence.join("; ");
        match f.severity {
            Severity::Info => {
                tracing::info!(cni = %f.cni, evidence = %evidence, podmesh = %f.podmesh, hint = %f.action, "node CNI")
            }
            Severity::Warning => {
                tracing::warn!(cni = %f.cni, evidence = %evidence, podmesh = %f.podmesh, hint = %f.action, "node CNI: the operator must act")
            }
        }
    }
}

/// Detects at start and then every `every`, keeping the findings in `status`.
pub async fn follow<P: PoolSource>(
    sources: Sources,
    tunnel_port: Option<u16>,
    pools: P,
    cache: MeshCache,
    status: Status,
    every: Duration,
) {
    let mut last: Vec<CniFinding> = Vec::new();
    loop {
        let obs = observe(&sources, tunnel_port, &pools, remote_pod_cidrs(&cache)).await;
        let findings = detect(&obs);
        log_new(&last, &findings);
        status.update(|r| r.cni = findings.clone());
        last = findings;
        tokio::time::sleep(every).await;
    }
}

/// Starts [`follow`] for this agent: Calico's pools are read through the
/// Kubernetes API only when the agent uses it (its Node comes from there).
pub fn spawn(cfg: &AgentConfig, cache: MeshCache, status: Status) -> JoinHandle<()> {
    let sources = Sources {
        cni_conf_dir: cfg.cni_conf_dir.clone(),
        cilium_state_dir: cfg.cilium_state_dir.clone(),
    };
    let tunnel_port =
        matches!(cfg.datapath, DatapathMode::Ebpf | DatapathMode::Vxlan).then_some(cfg.tunnel_port);
    let every = cfg.resync_interval;
    match cfg.node_source {
        NodeSource::Kubernetes { .. } => tokio::spawn(follow(
            sources,
            tunnel_port,
            KubePools::from_env(),
            cache,
            status,
            every,
        )),
        NodeSource::Static { .. } => tokio::spawn(follow(
            sources,
            tunnel_port,
            without_kubernetes(),
            cache,
            status,
            every,
        )),
    }
}
