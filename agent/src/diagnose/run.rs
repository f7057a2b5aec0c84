//! The walk: node-wide checks, then every remote cluster layer by layer
//! (each cluster on its own, concurrently), stopping a cluster at its first
//! failure; then the plan layer over every record read.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Check, Layer, Report, authz, check, config, datapath, probe, reach, sync, wireguard};
use crate::{
    cli::status::fetch_async,
    kvstore::client_config::EtcdClientConfig,
    plan::{
        live::{self, LiveCluster, RawRecord},
        read,
    },
    remote::secret::Listed,
    status::{StatusReport, agent_info::AgentInfo},
    validate,
};

/// Where the agent's Secret directory is in the DaemonSet.
pub const DEFAULT_CLUSTERMESH_DIR: &str = "/var/lib/podmesh/clustermesh";

/// What to diagnose.
#[derive(Clone, Debug)]
pub struct Options {
    /// The agent's status address.
    pub addr: String,
    /// The clustermesh Secret directory (default: the agent's).
    pub clustermesh_config: Option<PathBuf>,
    /// This cluster's mesh etcd client YAML (default: the agent's), for the plan layer.
    pub kvstore_config: Option<PathBuf>,
    /// Only these remote clusters (default: every one of the Secret).
    pub clusters: Vec<String>,
    /// Deadline of each network step.
    pub timeout: Duration,
}

/// Why the diagnosis cannot run at all (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CannotRun(pub String);

/// One cluster's walk.
struct Walked {
    checks: Vec<Check>,
    /// The records read in the authz layer; `None` when not reached.
    records: Option<Vec<RawRecord>>,
    /// Every layer before plan passed.
    reached_plan: bool,
}

fn failed(checks: &[Check]) -> bool {
    checks.iter().any(Check::is_failure)
}

/// Runs the diagnosis.
pub async fn diagnose(o: &Options) -> Result<Report, CannotRun> {
    let mut checks = Vec::new();
    let status = match tokio::time::timeout(
        o.timeout.max(Duration::from_secs(5)),
        fetch_async(&o.addr),
    )
    .await
    {
        Ok(Ok(s)) => {
            checks.push(Check::pass(
                Layer::Sync,
                None,
                check::AGENT,
                format!(
                    "agent at {} (cluster {}, node {}, {})",
                    o.addr,
                    s.local.cluster,
                    s.local.node,
                    if s.ready { "ready" } else { "not ready" }
                ),
            ));
            Some(s)
        }
        Ok(Err(e)) => {
            checks.push(Check::fail(Layer::Sync, None, check::AGENT, e.to_string(), "run this where the agent runs (`kubectl -n podmesh exec ds/podmesh-agent -c agent -- podmesh diagnose`), or give its --status-addr with --addr; the checks that need no agent ran"));
            None
        }
        Err(_) => {
            checks.push(Check::fail(
                Layer::Sync,
                None,
                check::AGENT,
                format!(
                    "the agent at {} did not answer within {}s",
                    o.addr,
                    o.timeout.as_secs()
                ),
                "the agent is overloaded or hung: its log says why",
            ));
            None
        }
    };
    let info: Option<AgentInfo> = status.as_ref().and_then(|s| s.agent.clone());
    let dir = o
        .clustermesh_config
        .clone()
        .or_else(|| info.as_ref().and_then(|i| i.clustermesh_config.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CLUSTERMESH_DIR));
    let secret = config::read_dir(&dir, &mut checks).map_err(|e| {
        CannotRun(format!(
            "{e} (give the Secret's directory with --clustermesh-config)"
        ))
    })?;
    let local = status
        .as_ref()
        .map(|s| s.local.cluster.clone())
        .filter(|c| !c.is_empty());
    let mut names: Vec<String> = secret.entries.keys().map(ToString::to_string).collect();
    if !o.clusters.is_empty() {
        for c in &o.clusters {
            if !names.contains(c) {
                checks.push(Check::fail(Layer::Config, Some(c), check::SECRET_PARSES, format!("{} has no entry {c}", dir.display()), "list the remote cluster in the clustermesh Secret (one key per cluster, named after it)"));
            }
        }
        names.retain(|n| o.clusters.contains(n));
    }
    // The kernel's state, read once for every cluster.
    let wg = status.as_ref().and_then(|s| s.wireguard.clone());
    let installed = match &info {
        Some(i) if !i.dry_run => {
            let (i, wg) = (i.clone(), wg.clone());
            Some(
                tokio::task::spawn_blocking(move || datapath::read_installed(&i, wg.as_ref()))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string())),
            )
        }
        _ => None,
    };
    // This cluster's records: this node's own (its published WireGuard
    // key), and the plan layer's.
    let kv_path = o
        .kvstore_config
        .clone()
        .or_else(|| info.as_ref().and_then(|i| i.kvstore_config.clone()));
    let local_live = match (&local, &kv_path) {
        (Some(local), Some(path)) => Some(read_local(local, path, o.timeout).await),
        _ => None,
    };
    if let (Some(s), Some(i)) = (&status, &info) {
        let none = Ok(datapath::Installed::default());
        let inst = installed.as_ref().unwrap_or(&none);
        checks.extend(datapath::node_checks(s, i, inst));
        if let (Some(w), Ok(inst)) = (&wg, inst)
            && let Some(dev) = &inst.wg_device
        {
            let key = crate::model::node_key(&s.local.cluster, &s.local.node);
            let record = local_live
                .as_ref()
                .and_then(|l| l.records.as_ref().ok())
                .map(|rs| {
                    let published = rs
                        .iter()
                        .find(|r| r.key == key)
                        .and_then(|r| wireguard::published_key(&r.value));
                    (key.clone(), published)
                });
            checks.push(wireguard::device_check(
                w,
                inst.wireguard.as_ref(),
                dev,
                record,
            ));
        }
    }
    let walks = futures::future::join_all(names.iter().map(|name| {
        let listed = secret
            .entries
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, l)| l);
        walk(
            name,
            listed,
            local.as_deref(),
            status.as_ref(),
            info.as_ref(),
            installed.as_ref(),
            o.timeout,
        )
    }))
    .await;
    // The plan layer: the live records of every cluster read, and of this one.
    let mut live_clusters: Vec<LiveCluster> = Vec::new();
    live_clusters.extend(local_live);
    for (name, w) in names.iter().zip(&walks) {
        if let Some(r) = &w.records {
            live_clusters.push(LiveCluster {
                name: name.clone(),
                records: Ok(r.clone()),
            });
        }
    }
    let findings = live::check(&live_clusters).findings;
    for (name, mut w) in names.iter().zip(walks) {
        if w.reached_plan {
            w.checks.push(plan_check(name, &findings));
        }
        checks.extend(w.checks);
    }
    if let Some(l) = &local {
        let own: Vec<&validate::Finding> = findings
            .iter()
            .filter(|f| f.clusters.iter().all(|c| c == l) && f.clusters.contains(l))
            .collect();
        if !own.is_empty() {
            checks.push(plan_check_of(l, &own));
        }
    }
    Ok(Report::new(checks))
}

async fn read_local(local: &str, path: &Path, wait: Duration) -> LiveCluster {
    let records = async {
        let cfg = EtcdClientConfig::load(path).map_err(|e| e.to_string())?;
        let client = read::connect(&cfg, path, wait).await?;
        read::read_records(&client, wait).await
    }
    .await;
    LiveCluster {
        name: local.to_string(),
        records,
    }
}

fn plan_check(cluster: &str, findings: &[validate::Finding]) -> Check {
    let mine: Vec<&validate::Finding> = findings
        .iter()
        .filter(|f| f.clusters.iter().any(|c| c == cluster))
        .collect();
    plan_check_of(cluster, &mine)
}

fn plan_check_of(cluster: &str, mine: &[&validate::Finding]) -> Check {
    let c = Some(cluster);
    let errors: Vec<&&validate::Finding> = mine
        .iter()
        .filter(|f| f.severity == validate::Severity::Error)
        .collect();
    let warnings: Vec<&&validate::Finding> = mine
        .iter()
        .filter(|f| f.severity == validate::Severity::Warning)
        .collect();
    let text = |fs: &[&&validate::Finding]| {
        fs.iter()
            .map(|f| format!("[{}] {}", f.code, f.message))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let fix = "fix the address plan: renumber the cluster or node that is wrong (`podmesh plan check --from-clustermesh DIR` lists every conflict of the mesh, `podmesh plan suggest` finds free blocks); each code is explained in docs/troubleshooting.md";
    if !errors.is_empty() {
        Check::fail(Layer::Plan, c, check::PLAN, text(&errors), fix)
    } else if !warnings.is_empty() {
        Check::warn(Layer::Plan, c, check::PLAN, text(&warnings), fix)
    } else {
        Check::pass(
            Layer::Plan,
            c,
            check::PLAN,
            "no overlap, hijack or invalid record among the live records of this cluster and the others read",
        )
    }
}

#[allow(clippy::too_many_arguments)]
async fn walk(
    name: &str,
    listed: Option<&Listed>,
    local: Option<&str>,
    status: Option<&StatusReport>,
    info: Option<&AgentInfo>,
    installed: Option<&Result<datapath::Installed, String>>,
    wait: Duration,
) -> Walked {
    let mut w = Walked {
        checks: Vec::new(),
        records: None,
        reached_plan: false,
    };
    let Some(listed) = listed else {
        return w;
    };
    w.checks.extend(config::check_entry(name, listed, local));
    if failed(&w.checks) {
        return w;
    }
    let Listed::File(f) = listed else { return w };
    let Ok(cfg) = &f.config else { return w };
    w.checks
        .extend(reach::check_cluster(name, &f.path, cfg, wait).await);
    if failed(&w.checks) {
        return w;
    }
    let (checks, records) = authz::check_cluster(name, &f.path, cfg, wait).await;
    w.checks.extend(checks);
    w.records = records;
    if failed(&w.checks) {
        return w;
    }
    match status {
        Some(s) => {
            w.checks.extend(sync::check_cluster(name, s));
            if failed(&w.checks) {
                return w;
            }
            match (info, installed) {
                (Some(i), Some(Ok(inst))) => {
                    w.checks.push(datapath::check_entries(name, s, i, inst));
                    if failed(&w.checks) {
                        return w;
                    }
                    let dev = inst.wg_device.as_ref().and_then(|d| d.as_ref().ok());
                    if let Some(d) = dev {
                        w.checks.extend(wireguard::peer_checks(name, s, d));
                        if failed(&w.checks) {
                            return w;
                        }
                    }
                    w.checks.extend(
                        probe::checks(name, s, i, dev, wait.min(Duration::from_secs(3))).await,
                    );
                    if failed(&w.checks) {
                        return w;
                    }
                    // The handshakes after the probes' traffic, read again.
                    if let (Some(_), Some(wg)) = (dev, &s.wireguard) {
                        let (i, wg) = (i.clone(), wg.clone());
                        if let Ok(Ok(after)) =
                            tokio::task::spawn_blocking(move || wireguard::read_device(&i, &wg))
                                .await
                        {
                            w.checks.extend(wireguard::handshake_check(name, s, &after));
                        }
                    }
                }
                (Some(i), None) if i.dry_run => w.checks.push(datapath::check_entries(
                    name,
                    s,
                    i,
                    &datapath::Installed::default(),
                )),
                (Some(_), _) => {}
                (None, _) => w.checks.push(skipped(
                    Layer::Datapath,
                    name,
                    check::ENTRIES,
                    "the agent's status does not say its datapath settings (an older agent)",
                )),
            }
        }
        None => {
            w.checks.push(skipped(
                Layer::Sync,
                name,
                check::CONNECTED,
                "the agent cannot be reached",
            ));
            w.checks.push(skipped(
                Layer::Datapath,
                name,
                check::ENTRIES,
                "the agent cannot be reached",
            ));
        }
    }
    w.reached_plan = true;
    w
}

fn skipped(layer: Layer, cluster: &str, name: &'static str, why: &str) -> Check {
    Check::pass(layer, Some(cluster), name, format!("skipped: {why}"))
}
