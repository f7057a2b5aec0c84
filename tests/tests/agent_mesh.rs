//! The agent's control plane against real etcd with mTLS: several simulated
//! remote clusters (each a real etcd), the bad-record corpus, etcd restarts
//! (also empty), compaction (also of a live watch), lease loss, a conflicting
//! cluster record, Secret changes including certificate rotation, and SIGTERM,
//! which leaves the node record to its lease. The agent runs in-process with
//! the in-memory datapath, or as the `podmesh-agent` binary with its dry-run
//! datapath where a test stops, continues or terminates it.
use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use podmesh_agent::{
    config,
    datapath::{RemoteRoute, memory::MemoryDatapath},
    desired::RecordState,
    model::{cluster_key, node_key},
    runtime::{self, Agent},
    status::StatusReport,
};
use podmesh_tests::{
    daemon::HOME_AGENT_FLAGS,
    etcd::{Etcd, http_get},
    eventually_async,
    pki::Pki,
};

const WAIT: Duration = Duration::from_secs(30);

/// A remote cluster: a real etcd its (simulated) agents write into.
struct Remote {
    name: &'static str,
    id: u32,
    etcd: Etcd,
    client: etcd_client::Client,
}

impl Remote {
    async fn start(name: &'static str, id: u32) -> anyhow::Result<Self> {
        let etcd = Etcd::start_with(Arc::new(Pki::new(name)?), name)?;
        let client = etcd.connect().await?;
        Ok(Self {
            name,
            id,
            etcd,
            client,
        })
    }

    async fn reconnect(&mut self) -> anyhow::Result<()> {
        self.client = self.etcd.connect().await?;
        Ok(())
    }

    async fn put_raw(&mut self, key: &str, value: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        self.client.put(key, value, None).await?;
        Ok(())
    }

    async fn cluster(&mut self, pods: &[&str]) -> anyhow::Result<()> {
        let v = serde_json::json!({"name": self.name, "id": self.id, "podCIDRs": pods, "serviceCIDRs": []});
        self.put_raw(&cluster_key(self.name), v.to_string()).await
    }

    async fn node(&mut self, node: &str, addr: &str, pods: &[&str]) -> anyhow::Result<()> {
        let v = serde_json::json!({"name": node, "cluster": self.name, "clusterID": self.id,
            "addresses": [addr], "podCIDRs": pods, "vtepMAC": "02:00:00:00:00:01"});
        self.put_raw(&node_key(self.name, node), v.to_string())
            .await
    }

    async fn delete(&mut self, key: &str) -> anyhow::Result<()> {
        self.client.delete(key, None).await?;
        Ok(())
    }

    /// Compacts the remote's history up to its current revision.
    async fn compact_history(&mut self) -> anyhow::Result<()> {
        let rev = self
            .client
            .get("x", None)
            .await?
            .header()
            .map(|h| h.revision())
            .context("revision")?;
        self.client.compact(rev, None).await?;
        Ok(())
    }
}

/// The clustermesh Secret as a directory that is updated like the kubelet does it.
struct SecretDir {
    root: tempfile::TempDir,
    generation: u32,
    files: BTreeMap<String, Vec<u8>>,
}

impl SecretDir {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            root: tempfile::tempdir()?,
            generation: 0,
            files: BTreeMap::new(),
        })
    }

    fn path(&self) -> &Path {
        self.root.path()
    }

    /// Adds or replaces the entry of `remote` (client YAML plus its three PEM files).
    fn set(&mut self, remote: &Remote, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<()> {
        let n = remote.name;
        self.files.insert(format!("{n}.ca.crt"), std::fs::read(ca)?);
        self.files
            .insert(format!("{n}.client.crt"), std::fs::read(cert)?);
        self.files
            .insert(format!("{n}.client.key"), std::fs::read(key)?);
        // Relative paths: resolved against the mounted directory.
        let yaml = format!(
            "endpoints:\n- {}\ntrusted-ca-file: {n}.ca.crt\ncert-file: {n}.client.crt\nkey-file: {n}.client.key\n",
            remote.etcd.endpoint()
        );
        self.files.insert(n.to_string(), yaml.into_bytes());
        self.publish()
    }

    fn set_valid(&mut self, remote: &Remote) -> anyhow::Result<()> {
        let c = remote.etcd.root_client().clone();
        self.set(remote, remote.etcd.pki().ca(), &c.cert, &c.key)
    }

    fn remove(&mut self, name: &str) -> anyhow::Result<()> {
        self.files
            .retain(|k, _| k != name && !k.starts_with(&format!("{name}.")));
        self.publish()
    }

    /// Writes a new `..<generation>` directory and swaps `..data` to it atomically.
    fn publish(&mut self) -> anyhow::Result<()> {
        self.generation += 1;
        let root = self.root.path();
        let data = format!("..2026_{}", self.generation);
        std::fs::create_dir(root.join(&data))?;
        for (n, c) in &self.files {
            std::fs::write(root.join(&data).join(n), c)?;
        }
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&data, &tmp)?;
        std::fs::rename(&tmp, root.join("..data"))?;
        for n in self.files.keys() {
            let link = root.join(n);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(n), &link)?;
            }
        }
        for e in std::fs::read_dir(root)?.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if !n.starts_with("..") && !self.files.contains_key(&n) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }
}

/// The agent under test (cluster "home", ID 9) with its own real etcd.
struct Home {
    etcd: Etcd,
    agent: Agent,
    dp: MemoryDatapath,
    _dir: tempfile::TempDir,
}

/// The home cluster's own mesh etcd, not yet used by an agent.
fn home_etcd() -> anyhow::Result<Etcd> {
    Etcd::start_with(Arc::new(Pki::new("home")?), "home")
}

/// Remote cluster east (10.1.0.0/16) with nodes e1 (10.1.1.0/24) and e2
/// (10.1.2.0/24), and a Secret directory that names it.
async fn east_with_two_nodes() -> anyhow::Result<(Remote, SecretDir)> {
    let mut east = Remote::start("east", 1).await?;
    east.cluster(&["10.1.0.0/16"]).await?;
    east.node("e1", "192.168.1.1", &["10.1.1.0/24"]).await?;
    east.node("e2", "192.168.1.2", &["10.1.2.0/24"]).await?;
    let mut secret = SecretDir::new()?;
    secret.set_valid(&east)?;
    Ok((east, secret))
}

async fn start_home(secret: &Path, extra: &[&str]) -> anyhow::Result<Home> {
    start_home_on(home_etcd()?, secret, extra).await
}

/// The agent under test, beyond `HOME_AGENT_FLAGS`: cluster "home"'s
/// ranges (10.9.0.0/16, services 10.96.0.0/12), quick Secret polling and a
/// short backoff cap.
const HOME_FLAGS: &[&str] = &[
    "--cluster-pod-cidr",
    "10.9.0.0/16",
    "--service-cidr",
    "10.96.0.0/12",
    "--secret-poll-ms",
    "100",
    "--max-backoff",
    "1",
];

/// Starts the agent under test on `etcd` (prepared by the caller).
async fn start_home_on(etcd: Etcd, secret: &Path, extra: &[&str]) -> anyhow::Result<Home> {
    let dir = tempfile::tempdir()?;
    let kv = etcd.client_config(&dir.path().join("local.yaml"))?;
    let mut args: Vec<String> = std::iter::once("podmesh-agent")
        .chain(HOME_AGENT_FLAGS.iter().copied())
        .chain(HOME_FLAGS.iter().copied())
        .chain(["--status-addr", "127.0.0.1:0", "--lease-ttl", "5"])
        .map(str::to_string)
        .collect();
    args.push("--kvstore-config".into());
    args.push(kv.display().to_string());
    args.push("--clustermesh-config".into());
    args.push(secret.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let cfg = config::load_from(args)?;
    let dp = MemoryDatapath::new();
    let agent = runtime::start(&cfg, dp.clone(), None).await?;
    Ok(Home {
        etcd,
        agent,
        dp,
        _dir: dir,
    })
}

fn routes(dp: &MemoryDatapath) -> BTreeMap<String, RemoteRoute> {
    dp.snapshot()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Waits until the datapath holds exactly `want` (CIDR -> node).
async fn wait_routes(dp: &MemoryDatapath, want: &[(&str, &str)]) -> anyhow::Result<()> {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(c, n)| (c.to_string(), n.to_string()))
        .collect();
    eventually_async(WAIT, || async {
        let have: BTreeMap<String, String> =
            routes(dp).into_iter().map(|(c, r)| (c, r.node)).collect();
        if have == want {
            Ok(())
        } else {
            Err(format!("routes {have:?}, want {want:?}"))
        }
    })
    .await
}

fn status(home: &Home) -> anyhow::Result<StatusReport> {
    podmesh_agent::cli::status::fetch(&home.agent.status_addr.to_string())
        .context("fetching /status")
}

async fn wait_status(
    home: &Home,
    what: &str,
    f: impl Fn(&StatusReport) -> bool,
) -> anyhow::Result<StatusReport> {
    wait_for(what, || status(home).map_err(|e| e.to_string()), f).await
}

/// Waits until the status that `fetch` reads satisfies `f`; the error names
/// `what` and shows the remotes as last seen.
async fn wait_for(
    what: &str,
    fetch: impl Fn() -> Result<StatusReport, String>,
    f: impl Fn(&StatusReport) -> bool,
) -> anyhow::Result<StatusReport> {
    eventually_async(WAIT, || async {
        let s = fetch()?;
        if f(&s) {
            Ok(s)
        } else {
            Err(format!(
                "{what}: {}",
                serde_json::to_string(&s.remotes).unwrap_or_default()
            ))
        }
    })
    .await
}

fn rejected_code(s: &StatusReport, key: &str) -> Option<String> {
    s.remotes
        .values()
        .flat_map(|r| r.records.iter())
        .find(|r| r.key == key)
        .and_then(|r| match &r.state {
            RecordState::Rejected(j) => Some(j.code.clone()),
            RecordState::Programmed => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_mesh_two_and_three_clusters_propagate_and_drain() -> anyhow::Result<()> {
    let (mut east, mut secret) = east_with_two_nodes().await?;
    let mut west = Remote::start("west", 2).await?;
    let home = start_home(secret.path(), &[]).await?;

    wait_routes(&home.dp, &[("10.1.1.0/24", "e1"), ("10.1.2.0/24", "e2")]).await?;
    wait_status(&home, "ready", |s| s.ready).await?;
    let readyz = http_get(home.agent.status_addr.port(), "/readyz")?;
    assert!(
        readyz.lines().next().unwrap_or("").contains(" 200 "),
        "{readyz}"
    );

    // The local node is published under a lease, with the cluster record.
    let mut local = home.etcd.connect().await?;
    let r = local.get(node_key("home", "h1"), None).await?;
    let kv = r.kvs().first().context("local node record")?;
    assert_ne!(kv.lease(), 0, "node record bound to a lease");
    let rec: serde_json::Value = serde_json::from_slice(kv.value())?;
    assert_eq!(rec["podCIDRs"][0], "10.9.1.0/24");
    assert!(!local.get(cluster_key("home"), None).await?.kvs().is_empty());

    // A third cluster appears in the Secret.
    west.cluster(&["10.2.0.0/16"]).await?;
    west.node("w1", "192.168.2.1", &["10.2.1.0/24", "10.2.2.0/24"])
        .await?;
    secret.set_valid(&west)?;
    wait_routes(
        &home.dp,
        &[
            ("10.1.1.0/24", "e1"),
            ("10.1.2.0/24", "e2"),
            ("10.2.1.0/24", "w1"),
            ("10.2.2.0/24", "w1"),
        ],
    )
    .await?;

    // Update and delete propagate.
    east.node("e1", "192.168.1.11", &["10.1.1.0/24"]).await?;
    eventually_async(WAIT, || async {
        let r = routes(&home.dp);
        match r.get("10.1.1.0/24") {
            Some(x) if x.node_addr.to_string() == "192.168.1.11" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    east.delete(&node_key("east", "e2")).await?;
    wait_routes(
        &home.dp,
        &[
            ("10.1.1.0/24", "e1"),
            ("10.2.1.0/24", "w1"),
            ("10.2.2.0/24", "w1"),
        ],
    )
    .await?;

    // Metrics name every remote.
    let m = http_get(home.agent.status_addr.port(), "/metrics")?;
    assert!(
        m.contains("podmesh_remote_ready{cluster=\"west\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("podmesh_remote_nodes{cluster=\"east\"} 1"),
        "{m}"
    );

    // Removing east from the Secret drains its routes; west stays.
    secret.remove("east")?;
    wait_routes(&home.dp, &[("10.2.1.0/24", "w1"), ("10.2.2.0/24", "w1")]).await?;
    let s = wait_status(&home, "east gone", |s| !s.remotes.contains_key("east")).await?;
    assert!(s.ready);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_bad_record_corpus_is_rejected_and_reported() -> anyhow::Result<()> {
    let mut west = Remote::start("west", 2).await?;
    west.cluster(&["10.2.0.0/16"]).await?;
    west.node("w1", "192.168.2.1", &["10.2.1.0/24"]).await?;
    let mut secret = SecretDir::new()?;
    secret.set_valid(&west)?;
    let home = start_home(secret.path(), &[]).await?;
    wait_routes(&home.dp, &[("10.2.1.0/24", "w1")]).await?;

    // east joins later, declaring a range that also covers west's.
    let mut east = Remote::start("east", 1).await?;
    east.cluster(&["10.0.0.0/14"]).await?;
    east.node("good", "192.168.1.1", &["10.1.1.0/24"]).await?;
    east.put_raw(&node_key("east", "json"), "{\"name\":")
        .await?;
    east.put_raw(
        &node_key("east", "mismatch"),
        serde_json::json!({"name":"other","cluster":"east","clusterID":1,"addresses":["192.168.1.2"],"podCIDRs":["10.1.2.0/24"]}).to_string(),
    )
    .await?;
    east.node("outside", "192.168.1.3", &["10.5.0.0/24"])
        .await?;
    east.node("remote", "192.168.1.5", &["10.2.1.0/24"]).await?;
    east.node("default", "192.168.1.6", &["0.0.0.0/0"]).await?;
    east.node("reserved", "192.168.1.7", &["127.0.0.0/24"])
        .await?;
    east.put_raw(&node_key("east", "huge"), vec![b' '; 70 * 1024])
        .await?;
    // Nodes claiming this cluster's service CIDR (10.96.0.0/12) and this
    // node's own address (192.168.9.1).
    east.node("svc", "192.168.1.9", &["10.96.4.0/24"]).await?;
    east.node("nodeaddr", "192.168.1.10", &["192.168.9.0/24"])
        .await?;
    east.put_raw(&node_key("west", "foreign"), "{}").await?;
    // dup: a cluster with west's ID.
    let mut dup = Remote::start("dup", 2).await?;
    dup.cluster(&["10.7.0.0/16"]).await?;
    dup.node("d1", "192.168.7.1", &["10.7.1.0/24"]).await?;
    // clash: declares this cluster's own Pod CIDR.
    let mut clash = Remote::start("clash", 3).await?;
    clash.cluster(&["10.9.0.0/16"]).await?;
    clash.node("k1", "192.168.3.1", &["10.9.5.0/24"]).await?;
    secret.set_valid(&east)?;
    secret.set_valid(&dup)?;
    secret.set_valid(&clash)?;

    let expect = [
        (node_key("east", "json"), "record-invalid-json"),
        (node_key("east", "mismatch"), "record-key-mismatch"),
        (node_key("east", "outside"), "node-pod-cidr-outside-cluster"),
        (cluster_key("clash"), "pod-cidr-overlap"),
        (node_key("clash", "k1"), "cluster-rejected"),
        (node_key("east", "remote"), "pod-cidr-overlap"),
        (node_key("east", "default"), "cidr-default-route"),
        (node_key("east", "reserved"), "cidr-reserved"),
        (node_key("east", "huge"), "record-too-large"),
        (node_key("east", "svc"), "pod-cidr-overlaps-service"),
        (node_key("east", "nodeaddr"), "pod-cidr-overlaps-node"),
        (node_key("west", "foreign"), "record-foreign-cluster"),
        (cluster_key("dup"), "cluster-id-duplicate"),
        (node_key("dup", "d1"), "cluster-rejected"),
    ];
    let s = wait_status(&home, "all rejected", |s| {
        s.ready && expect.iter().all(|(k, _)| rejected_code(s, k).is_some())
    })
    .await?;
    for (k, code) in &expect {
        assert_eq!(rejected_code(&s, k).as_deref(), Some(*code), "{k}");
    }
    wait_routes(&home.dp, &[("10.2.1.0/24", "w1"), ("10.1.1.0/24", "good")]).await?;
    let m = http_get(home.agent.status_addr.port(), "/metrics")?;
    for line in [
        "podmesh_remote_rejected_records{cluster=\"east\",reason=\"cidr-reserved\"} 1",
        "podmesh_remote_rejected_records{cluster=\"east\",reason=\"pod-cidr-overlaps-service\"} 1",
        "podmesh_remote_rejected_records{cluster=\"east\",reason=\"pod-cidr-overlaps-node\"} 1",
        "podmesh_remote_rejections_total{cluster=\"east\",reason=\"pod-cidr-overlaps-service\"} 1",
        "podmesh_remote_rejections_total{cluster=\"east\",reason=\"pod-cidr-overlaps-node\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "no {line} in:\n{m}");
    }
    // The messages name the local range each one would take.
    let message = |key: &str| {
        s.remotes["east"]
            .records
            .iter()
            .find(|r| r.key == key)
            .and_then(|r| match &r.state {
                RecordState::Rejected(j) => Some(j.message.clone()),
                RecordState::Programmed => None,
            })
            .unwrap_or_default()
    };
    let svc = message(&node_key("east", "svc"));
    assert!(svc.contains("service CIDR 10.96.0.0/12"), "{svc}");
    let addr = message(&node_key("east", "nodeaddr"));
    assert!(addr.contains("node address 192.168.9.1/32"), "{addr}");
    assert!(
        !s.routes
            .iter()
            .any(|r| r.node == "svc" || r.node == "nodeaddr"),
        "{:?}",
        s.routes
    );
    // The table view lists the rejected keys with their reasons.
    let table = podmesh_agent::cli::status::table(&s);
    assert!(
        table.contains("podmesh/v1/nodes/east/huge  [record-too-large]"),
        "{table}"
    );

    // Still serving: a good record still propagates, a fixed one is accepted.
    east.node("good2", "192.168.1.8", &["10.1.3.0/24"]).await?;
    east.node("outside", "192.168.1.3", &["10.1.4.0/24"])
        .await?;
    wait_routes(
        &home.dp,
        &[
            ("10.2.1.0/24", "w1"),
            ("10.1.1.0/24", "good"),
            ("10.1.3.0/24", "good2"),
            ("10.1.4.0/24", "outside"),
        ],
    )
    .await?;
    assert!(http_get(home.agent.status_addr.port(), "/healthz")?.contains("ok"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_etcd_restarts_compaction_and_certificate_rotation() -> anyhow::Result<()> {
    let (mut east, mut secret) = east_with_two_nodes().await?;
    let mut home = start_home(secret.path(), &["--empty-grace", "8"]).await?;
    let both = [("10.1.1.0/24", "e1"), ("10.1.2.0/24", "e2")];
    wait_routes(&home.dp, &both).await?;

    // Killed: not ready, last known routes kept, failure reported.
    east.etcd.kill();
    let s = wait_status(&home, "east down", |s| {
        !s.ready && s.remotes["east"].failures > 0
    })
    .await?;
    assert!(s.remotes["east"].last_error.is_some());
    assert_eq!(routes(&home.dp).len(), 2);
    // Restarted with its data, plus a change made while the agent was away.
    east.etcd.restart()?;
    east.reconnect().await?;
    east.delete(&node_key("east", "e2")).await?;
    wait_routes(&home.dp, &[("10.1.1.0/24", "e1")]).await?;
    wait_status(&home, "ready again", |s| s.ready).await?;

    // Compaction: history gone; updates keep flowing.
    for i in 0..20 {
        east.node("e1", &format!("192.168.1.{}", 20 + i), &["10.1.1.0/24"])
            .await?;
    }
    east.compact_history().await?;
    east.node("e3", "192.168.1.3", &["10.1.3.0/24"]).await?;
    wait_routes(&home.dp, &[("10.1.1.0/24", "e1"), ("10.1.3.0/24", "e3")]).await?;

    // Restarted empty: routes kept through the grace period (reported), then
    // only the nodes that republished stay.
    east.etcd.restart_empty()?;
    east.reconnect().await?;
    let s = wait_status(&home, "grace", |s| {
        s.remotes["east"].empty_grace_until.is_some()
    })
    .await?;
    assert!(s.remotes["east"].synced);
    assert_eq!(
        routes(&home.dp).len(),
        2,
        "routes kept during the grace period"
    );
    east.cluster(&["10.1.0.0/16"]).await?;
    east.node("e3", "192.168.1.3", &["10.1.3.0/24"]).await?;
    wait_routes(&home.dp, &[("10.1.3.0/24", "e3")]).await?;
    wait_status(&home, "grace over", |s| {
        s.remotes["east"].empty_grace_until.is_none()
    })
    .await?;

    // The local etcd restarted empty: the agent republishes its node and cluster records.
    home.etcd.restart_empty()?;
    let mut local = home.etcd.connect().await?;
    eventually_async(WAIT, || {
        let mut local = local.clone();
        async move {
            let n = local
                .get(node_key("home", "h1"), None)
                .await
                .map_err(|e| e.to_string())?;
            let c = local
                .get(cluster_key("home"), None)
                .await
                .map_err(|e| e.to_string())?;
            if !n.kvs().is_empty() && !c.kvs().is_empty() {
                Ok(())
            } else {
                Err("not republished yet".to_string())
            }
        }
    })
    .await?;
    let _ = local.status().await?;

    // Certificate rotation to a client certificate from a CA the server does not
    // trust: refused with a TLS error, routes kept.
    let stranger = Pki::new("stranger")?;
    let bad = stranger.client("intruder")?;
    secret.set(&east, east.etcd.pki().ca(), &bad.cert, &bad.key)?;
    let before = status(&home)?.remotes["east"].failures;
    east.etcd.restart()?; // drop the established connection
    east.reconnect().await?;
    let s = wait_status(&home, "refused", |s| {
        !s.remotes["east"].connected && s.remotes["east"].failures > before
    })
    .await?;
    eprintln!("refused with: {:?}", s.remotes["east"].last_error);
    assert_eq!(routes(&home.dp).len(), 1);
    // Rotated to a fresh valid certificate: reconnects without a restart.
    let fresh = east.etcd.pki().client("east-rotated")?;
    secret.set(&east, east.etcd.pki().ca(), &fresh.cert, &fresh.key)?;
    wait_status(&home, "reconnected", |s| s.ready).await?;
    east.node("e4", "192.168.1.4", &["10.1.4.0/24"]).await?;
    wait_routes(&home.dp, &[("10.1.3.0/24", "e3"), ("10.1.4.0/24", "e4")]).await?;
    drop(home);
    Ok(())
}

/// A real etcd without TLS on a loopback port (the "plaintext endpoint").
struct PlainEtcd {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PlainEtcd {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = podmesh_tests::free_port();
        let peer = podmesh_tests::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let child = std::process::Command::new("etcd")
            .args(["--name", "plain", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("plain={peer_url}")])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a plaintext etcd")?;
        Ok(Self {
            child,
            port,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PlainEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn last_error(s: &StatusReport, name: &str) -> String {
    s.remotes
        .get(name)
        .and_then(|r| r.last_error.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_bad_tls_per_remote_and_keeps_serving_the_others() -> anyhow::Result<()> {
    // east is fine; west's client certificate expired; north's comes from
    // another CA; south points its https:// endpoint at a plaintext etcd.
    let mut east = Remote::start("east", 1).await?;
    east.cluster(&["10.1.0.0/16"]).await?;
    east.node("e1", "192.168.1.1", &["10.1.1.0/24"]).await?;
    let mut west = Remote::start("west", 2).await?;
    west.cluster(&["10.2.0.0/16"]).await?;
    west.node("w1", "192.168.2.1", &["10.2.1.0/24"]).await?;
    let mut north = Remote::start("north", 3).await?;
    north.cluster(&["10.3.0.0/16"]).await?;
    north.node("n1", "192.168.3.1", &["10.3.1.0/24"]).await?;
    let plain = PlainEtcd::start()?;

    let mut secret = SecretDir::new()?;
    secret.set_valid(&east)?;
    let expired = west.etcd.pki().issue(&podmesh_tests::pki::CertSpec {
        name: "west-expired",
        file: None,
        sans: vec![],
        server: false,
        client: true,
        expired: true,
    })?;
    secret.set(&west, west.etcd.pki().ca(), &expired.cert, &expired.key)?;
    let stranger = Pki::new("stranger")?;
    let foreign = stranger.client("north-foreign")?;
    secret.set(&north, north.etcd.pki().ca(), &foreign.cert, &foreign.key)?;
    // south: TLS settings of a real CA, endpoint of the plaintext etcd.
    let ca = east.etcd.pki().ca().to_path_buf();
    let good = east.etcd.root_client().clone();
    secret
        .files
        .insert("south.ca.crt".into(), std::fs::read(&ca)?);
    secret
        .files
        .insert("south.client.crt".into(), std::fs::read(&good.cert)?);
    secret
        .files
        .insert("south.client.key".into(), std::fs::read(&good.key)?);
    secret.files.insert(
        "south".into(),
        format!(
            "endpoints:\n- https://127.0.0.1:{}\ntrusted-ca-file: south.ca.crt\ncert-file: south.client.crt\nkey-file: south.client.key\n",
            plain.port
        )
        .into_bytes(),
    );
    secret.publish()?;

    let home = start_home(secret.path(), &[]).await?;
    wait_routes(&home.dp, &[("10.1.1.0/24", "e1")]).await?;
    let s = wait_status(&home, "three refusals", |s| {
        ["west", "north", "south"].iter().all(|n| {
            s.remotes
                .get(*n)
                .is_some_and(|r| !r.connected && r.failures > 0 && r.last_error.is_some())
        })
    })
    .await?;
    for n in ["west", "north", "south"] {
        eprintln!("{n}: {}", last_error(&s, n));
    }
    let w = last_error(&s, "west");
    assert!(
        w.contains("expired") && w.contains("renewed client certificate"),
        "west: {w}"
    );
    let n = last_error(&s, "north");
    assert!(
        n.contains("refused this agent's client certificate")
            && n.contains("not by the CA of trusted-ca-file"),
        "north: {n}"
    );
    let so = last_error(&s, "south");
    assert!(so.contains("does not speak TLS"), "south: {so}");
    assert!(s.remotes["east"].connected && s.remotes["east"].synced);
    assert!(!s.ready, "not ready while remotes are refused");

    // Still serving the good remote.
    east.node("e2", "192.168.1.2", &["10.1.2.0/24"]).await?;
    wait_routes(&home.dp, &[("10.1.1.0/24", "e1"), ("10.1.2.0/24", "e2")]).await?;
    assert!(http_get(home.agent.status_addr.port(), "/healthz")?.contains("ok"));

    // Good certificates (and a plaintext endpoint named as such) in the
    // Secret: every remote connects without a restart.
    secret.set_valid(&west)?;
    let fresh = north.etcd.pki().client("north-fresh")?;
    secret.set(&north, north.etcd.pki().ca(), &fresh.cert, &fresh.key)?;
    secret.files.retain(|k, _| !k.starts_with("south."));
    secret.files.insert(
        "south".into(),
        format!("endpoints:\n- {}\n", plain.url()).into_bytes(),
    );
    secret.publish()?;
    let mut south = etcd_client::Client::connect([plain.url()], None).await?;
    south
        .put(
            cluster_key("south"),
            serde_json::json!({"name":"south","id":4,"podCIDRs":["10.4.0.0/16"],"serviceCIDRs":[]})
                .to_string(),
            None,
        )
        .await?;
    south
        .put(
            node_key("south", "s1"),
            serde_json::json!({"name":"s1","cluster":"south","clusterID":4,"addresses":["192.168.4.1"],"podCIDRs":["10.4.1.0/24"]})
                .to_string(),
            None,
        )
        .await?;
    wait_routes(
        &home.dp,
        &[
            ("10.1.1.0/24", "e1"),
            ("10.1.2.0/24", "e2"),
            ("10.2.1.0/24", "w1"),
            ("10.3.1.0/24", "n1"),
            ("10.4.1.0/24", "s1"),
        ],
    )
    .await?;
    let s = wait_status(&home, "all ready", |s| s.ready).await?;
    for n in ["west", "north", "south"] {
        assert!(
            s.remotes[n].last_error.is_none(),
            "{n}: {:?}",
            s.remotes[n].last_error
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_relists_after_the_remote_compacted_while_it_was_disconnected() -> anyhow::Result<()>
{
    let (mut east, mut secret) = east_with_two_nodes().await?;
    let home = start_home(secret.path(), &[]).await?;
    wait_routes(&home.dp, &[("10.1.1.0/24", "e1"), ("10.1.2.0/24", "e2")]).await?;

    // Disconnected: the Secret now holds a certificate the remote refuses.
    let stranger = Pki::new("stranger")?;
    let bad = stranger.client("intruder")?;
    secret.set(&east, east.etcd.pki().ca(), &bad.cert, &bad.key)?;
    let s = wait_status(&home, "disconnected", |s| !s.remotes["east"].connected).await?;
    let failures_before = s.remotes["east"].failures;
    let t0 = std::time::Instant::now();

    // Meanwhile the remote moves on and compacts its history past all of it.
    for i in 0..50 {
        east.node("e1", &format!("192.168.1.{}", 100 + i), &["10.1.1.0/24"])
            .await?;
    }
    east.delete(&node_key("east", "e2")).await?;
    east.node("e3", "192.168.1.3", &["10.1.3.0/24"]).await?;
    east.compact_history().await?;
    // Routes are kept as last known while disconnected.
    assert_eq!(routes(&home.dp).len(), 2);

    // Reconnected: a fresh list at the compacted revision, the deleted node
    // pruned, the new node and the last address programmed.
    secret.set_valid(&east)?;
    wait_routes(&home.dp, &[("10.1.1.0/24", "e1"), ("10.1.3.0/24", "e3")]).await?;
    eventually_async(WAIT, || async {
        match routes(&home.dp).get("10.1.1.0/24") {
            Some(r) if r.node_addr.to_string() == "192.168.1.149" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    let s = wait_status(&home, "ready", |s| s.ready).await?;
    // No hot loop: reconnect attempts are bounded by the backoff (at most one
    // per 200 ms even before it grows), not by how fast the remote refuses.
    let attempts = s.remotes["east"].failures - failures_before;
    let bound = 2 + 5 * t0.elapsed().as_secs();
    assert!(
        attempts <= bound,
        "{attempts} failures in {:?}",
        t0.elapsed()
    );
    // Writes after the reconnection keep flowing through the new watch.
    east.node("e4", "192.168.1.4", &["10.1.4.0/24"]).await?;
    wait_routes(
        &home.dp,
        &[
            ("10.1.1.0/24", "e1"),
            ("10.1.3.0/24", "e3"),
            ("10.1.4.0/24", "e4"),
        ],
    )
    .await?;
    Ok(())
}

/// The node record's lease and value as the local mesh etcd holds them (lease 0: none).
async fn local_node_record(
    local: &mut etcd_client::Client,
) -> Result<Option<(i64, serde_json::Value)>, String> {
    let r = local
        .get(node_key("home", "h1"), None)
        .await
        .map_err(|e| e.to_string())?;
    r.kvs()
        .first()
        .map(|kv| {
            serde_json::from_slice(kv.value())
                .map(|v| (kv.lease(), v))
                .map_err(|e| e.to_string())
        })
        .transpose()
}

/// The node record of h1 that must be in the local etcd, with its lease;
/// `missing` says what its absence means.
async fn present_node_record(
    local: &mut etcd_client::Client,
    missing: &str,
) -> anyhow::Result<(i64, serde_json::Value)> {
    local_node_record(local)
        .await
        .map_err(anyhow::Error::msg)?
        .with_context(|| missing.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_republishes_under_a_new_lease_after_its_lease_is_revoked() -> anyhow::Result<()> {
    let secret = SecretDir::new()?;
    let home = start_home(secret.path(), &[]).await?;
    let mut local = home.etcd.connect().await?;
    let s = wait_status(&home, "published", |s| s.local.published).await?;
    let (lease, rec) = present_node_record(&mut local, "node record published").await?;
    assert_ne!(lease, 0, "node record bound to a lease");
    assert_eq!(s.local.lease, Some(lease));
    assert_eq!(rec["podCIDRs"][0], "10.9.1.0/24");
    let publications = s.local.publications;

    // The local etcd stays up; only the lease goes (as when the agent
    // stalled past its TTL, or an operator revoked it): the record goes with it.
    local.lease_revoke(lease).await?;
    assert!(
        local_node_record(&mut local)
            .await
            .map_err(anyhow::Error::msg)?
            .is_none(),
        "revoking the lease deletes the record"
    );

    // Re-created under a new, live lease with a TTL.
    let (lease2, rec2) = eventually_async(WAIT, || {
        let mut local = local.clone();
        async move {
            match local_node_record(&mut local).await? {
                Some((l, v)) if l != 0 && l != lease => Ok((l, v)),
                other => Err(format!("node record {other:?}")),
            }
        }
    })
    .await?;
    assert_eq!(rec2, rec, "the same record, republished");
    let ttl = local.lease_time_to_live(lease2, None).await?;
    assert_eq!(ttl.granted_ttl(), 5, "--lease-ttl");
    assert!(ttl.ttl() > 0, "lease {lease2} is live: {ttl:?}");
    let old = local.lease_time_to_live(lease, None).await?;
    assert!(old.ttl() <= 0, "the revoked lease stays gone: {old:?}");

    // The status says so, and the metric.
    let s = wait_status(&home, "published again", |s| {
        s.local.published && s.local.lease == Some(lease2)
    })
    .await?;
    assert!(s.local.publications > publications, "{:?}", s.local);
    assert!(s.local.last_error.is_none(), "{:?}", s.local);
    let m = http_get(home.agent.status_addr.port(), "/metrics")?;
    assert!(
        m.lines().any(|l| l == "podmesh_local_node_published 1"),
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_leaves_a_conflicting_cluster_record_and_reports_it() -> anyhow::Result<()> {
    // Another agent of this cluster (or an operator) wrote another ID and Pod CIDR.
    let etcd = home_etcd()?;
    let mut local = etcd.connect().await?;
    let theirs =
        serde_json::json!({"name":"home","id":7,"podCIDRs":["10.7.0.0/16"],"serviceCIDRs":[]})
            .to_string();
    local.put(cluster_key("home"), theirs.clone(), None).await?;
    let written = local.get(cluster_key("home"), None).await?;
    let written_rev = written.kvs()[0].mod_revision();

    let secret = SecretDir::new()?;
    let home = start_home_on(etcd, secret.path(), &[]).await?;
    let s = wait_status(&home, "conflict reported", |s| {
        s.local.cluster_record_conflict.is_some() && s.local.published
    })
    .await?;
    let conflict = s.local.cluster_record_conflict.clone().unwrap_or_default();
    for part in [
        "podmesh/v1/clusters/home",
        "ID 7",
        "10.7.0.0/16",
        "ID 9",
        "not overwritten",
    ] {
        assert!(conflict.contains(part), "{part:?} not in {conflict}");
    }
    // The publisher checks the record on every keep-alive (every TTL/3,
    // 1.7 s here): after a few of them it is still what the other writer wrote.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let now = local.get(cluster_key("home"), None).await?;
    let kv = now.kvs().first().context("cluster record")?;
    assert_eq!(kv.value_str()?, theirs, "not overwritten");
    assert_eq!(kv.mod_revision(), written_rev, "not written at all");

    let m = http_get(home.agent.status_addr.port(), "/metrics")?;
    assert!(
        m.lines().any(|l| l == "podmesh_cluster_record_conflict 1"),
        "{m}"
    );
    // `podmesh status -o json` (the CLI binary) carries it, and the table.
    let bin = podmesh_tests::mesh::workspace_binary("podmesh-agent", "podmesh")?;
    let addr = home.agent.status_addr.to_string();
    let o = std::process::Command::new(&bin)
        .args(["status", "--addr", &addr, "-o", "json"])
        .output()?;
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(
        json["local"]["cluster_record_conflict"].as_str(),
        Some(conflict.as_str()),
        "{json}"
    );
    let o = std::process::Command::new(&bin)
        .args(["status", "--addr", &addr])
        .output()?;
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("cluster record conflict: podmesh/v1/clusters/home"),
        "{table}"
    );

    // The operator's fix (delete the key): the agent writes its own record
    // and the conflict clears.
    local.delete(cluster_key("home"), None).await?;
    wait_status(&home, "conflict cleared", |s| {
        s.local.cluster_record_conflict.is_none()
    })
    .await?;
    let now = local.get(cluster_key("home"), None).await?;
    let mine: serde_json::Value =
        serde_json::from_slice(now.kvs().first().context("recreated")?.value())?;
    assert_eq!(mine["id"], 9);
    assert_eq!(mine["podCIDRs"][0], "10.9.0.0/16");
    let m = http_get(home.agent.status_addr.port(), "/metrics")?;
    assert!(
        m.lines().any(|l| l == "podmesh_cluster_record_conflict 0"),
        "{m}"
    );
    Ok(())
}

/// The `podmesh-agent` binary (cluster "home", dry-run datapath) following
/// the Secret directory `secret`, as a process of its own that a test can
/// stop and continue; killed on drop.
struct AgentProcess {
    child: std::process::Child,
    addr: String,
    log: tempfile::NamedTempFile,
}

impl AgentProcess {
    fn start(secret: &Path) -> anyhow::Result<Self> {
        Self::start_with(secret, &[])
    }

    /// Like [`AgentProcess::start`], with `extra` flags after the others.
    fn start_with(secret: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let bin = podmesh_tests::mesh::workspace_binary("podmesh-agent", "podmesh-agent")?;
        let addr = format!("127.0.0.1:{}", podmesh_tests::free_port());
        let log = tempfile::NamedTempFile::new()?;
        let child = std::process::Command::new(bin)
            .args(HOME_AGENT_FLAGS)
            .args(HOME_FLAGS)
            .args(["--status-addr", &addr, "--clustermesh-config"])
            .arg(secret)
            .args(extra)
            .env_remove("NODE_NAME")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()?;
        Ok(Self { child, addr, log })
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, sig)?;
        Ok(())
    }

    fn status(&self) -> Result<StatusReport, String> {
        podmesh_agent::cli::status::fetch(&self.addr).map_err(|e| e.to_string())
    }

    /// SIGTERM, as the kubelet stops a pod; the exit status once it has exited.
    fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = &mut self.child;
        tokio::task::block_in_place(|| podmesh_tests::daemon::terminate(child, timeout))
    }

    fn log_tail(&self) -> String {
        podmesh_tests::daemon::log_tail(self.log.path(), 30)
    }

    async fn wait(
        &self,
        what: &str,
        f: impl Fn(&StatusReport) -> bool,
    ) -> anyhow::Result<StatusReport> {
        wait_for(what, || self.status(), f)
            .await
            .with_context(|| format!("agent log:\n{}", self.log_tail()))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CIDR -> (node, tunnel endpoint) of the routes the status shows.
fn status_routes(s: &StatusReport) -> BTreeMap<String, (String, String)> {
    s.routes
        .iter()
        .map(|r| {
            (
                r.cidr.to_string(),
                (r.node.clone(), r.node_addr.to_string()),
            )
        })
        .collect()
}

fn want_routes(want: &[(&str, &str, &str)]) -> BTreeMap<String, (String, String)> {
    want.iter()
        .map(|(c, n, a)| (c.to_string(), (n.to_string(), a.to_string())))
        .collect()
}

/// Every key under `podmesh/v1/` in `client`'s etcd.
async fn etcd_keys(client: &mut etcd_client::Client) -> anyhow::Result<Vec<String>> {
    let r = client
        .get(
            "podmesh/v1/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    Ok(r.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_relists_when_its_live_watch_falls_behind_a_compaction() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;

    const SLOW_WATCHERS: &str = "etcd_debugging_mvcc_slow_watcher_total";
    let (mut east, secret) = east_with_two_nodes().await?;
    let agent = AgentProcess::start(secret.path())?;
    let s = agent
        .wait("synced", |s| {
            s.ready
                && status_routes(s)
                    == want_routes(&[
                        ("10.1.1.0/24", "e1", "192.168.1.1"),
                        ("10.1.2.0/24", "e2", "192.168.1.2"),
                    ])
        })
        .await?;
    let before = s.remotes["east"].clone();
    assert_eq!(before.lists, 1, "{before:?}");
    assert_eq!(before.compactions, 0, "{before:?}");
    // The agent's watch is etcd's only watcher, and in step.
    eventually_async(WAIT, || async {
        match east.etcd.metric(SLOW_WATCHERS) {
            Ok(0.0) => Ok(()),
            other => Err(format!("{SLOW_WATCHERS} {other:?}")),
        }
    })
    .await?;

    // The agent stops reading while connected. Writes under the watched
    // prefix fill the connection's flow-control window and socket buffers,
    // then etcd's per-stream queue, until etcd parks the watcher as slow
    // (a "victim", its further events undelivered).
    agent.signal(Signal::SIGSTOP)?;
    let stopped = std::time::Instant::now();
    let filler = node_key("east", "filler");
    let chunk = "x".repeat(48 * 1024);
    let mut written = 0usize;
    while east.etcd.metric(SLOW_WATCHERS).unwrap_or(0.0) < 1.0 {
        anyhow::ensure!(
            written < 4000,
            "etcd did not park the stopped agent's watcher after {written} writes of 48 KiB"
        );
        let puts = (0..16).map(|_| {
            let mut c = east.client.clone();
            let (k, v) = (filler.clone(), chunk.clone());
            async move { c.put(k, v, None).await }
        });
        for r in futures::future::join_all(puts).await {
            r?;
        }
        written += 16;
    }
    // What the agent misses: a changed, a deleted and a new node; the filler
    // goes again. Then the history it would need is compacted away.
    east.node("e1", "192.168.1.11", &["10.1.1.0/24"]).await?;
    east.delete(&node_key("east", "e2")).await?;
    east.node("e3", "192.168.1.3", &["10.1.3.0/24"]).await?;
    east.delete(&filler).await?;
    east.compact_history().await?;
    agent.signal(Signal::SIGCONT)?;
    eprintln!(
        "agent stopped for {:?}; {written} writes of 48 KiB until etcd parked its watcher",
        stopped.elapsed()
    );

    // The parked watcher resumes below the compaction: etcd answers it with
    // a compacted response, and the agent re-lists on the same connection.
    let want = want_routes(&[
        ("10.1.1.0/24", "e1", "192.168.1.11"),
        ("10.1.3.0/24", "e3", "192.168.1.3"),
    ]);
    // Etcd's final state. Events etcd still delivers before it finds the
    // watcher's history compacted may already bring the routes to `want`
    // while the re-list that prunes the filler is under way: wait for the
    // records too.
    let mut in_etcd = etcd_keys(&mut east.client).await?;
    in_etcd.sort();
    let held = |s: &StatusReport| {
        let mut keys: Vec<String> = s.remotes["east"]
            .records
            .iter()
            .map(|r| r.key.clone())
            .collect();
        keys.sort();
        keys
    };
    let s = agent
        .wait("re-listed after the compaction", |s| {
            s.ready
                && s.remotes["east"].compactions > 0
                && status_routes(s) == want
                && held(s) == in_etcd
                // Records and routes are read live from the cache; the
                // entry count is written when the reconcile pass that
                // follows them ends.
                && s.remotes["east"].entries == in_etcd.len()
        })
        .await?;
    let after = s.remotes["east"].clone();
    assert_eq!(
        after.compactions, 1,
        "one compaction, one re-list: {after:?}"
    );
    assert_eq!(
        after.failures, before.failures,
        "the connection stayed up: {after:?}"
    );
    assert_eq!(after.lists, 2, "{after:?}");
    // Exactly etcd's state: the deleted node and the filler pruned.
    assert_eq!(after.entries, in_etcd.len());
    let port: u16 = agent.addr.rsplit(':').next().unwrap_or("0").parse()?;
    let metrics = http_get(port, "/metrics")?;
    for line in [
        "podmesh_remote_watch_compactions_total{cluster=\"east\"} 1",
        "podmesh_remote_lists_total{cluster=\"east\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }

    // No hot loop: nothing more is listed while nothing happens, and the
    // new watch delivers what comes next.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = agent.status().map_err(anyhow::Error::msg)?;
    assert_eq!(s.remotes["east"].lists, 2, "{:?}", s.remotes["east"]);
    east.node("e4", "192.168.1.4", &["10.1.4.0/24"]).await?;
    agent
        .wait("live again", |s| {
            status_routes(s)
                == want_routes(&[
                    ("10.1.1.0/24", "e1", "192.168.1.11"),
                    ("10.1.3.0/24", "e3", "192.168.1.3"),
                    ("10.1.4.0/24", "e4", "192.168.1.4"),
                ])
        })
        .await?;
    assert_eq!(
        agent.status().map_err(anyhow::Error::msg)?.remotes["east"].lists,
        2
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigterm_leaves_the_node_record_to_its_lease() -> anyhow::Result<()> {
    const TTL: i64 = 5;
    let etcd = home_etcd()?;
    let dir = tempfile::tempdir()?;
    let kv = etcd.client_config(&dir.path().join("local.yaml"))?;
    let kv = kv.to_str().context("kvstore config path")?;
    let ttl_flag = TTL.to_string();
    let secret = SecretDir::new()?;
    let mut agent = AgentProcess::start_with(
        secret.path(),
        &["--kvstore-config", kv, "--lease-ttl", &ttl_flag],
    )?;
    let s = agent.wait("published", |s| s.local.published).await?;
    let mut local = etcd.connect().await?;
    let (lease, rec) = present_node_record(&mut local, "node record published").await?;
    assert_ne!(lease, 0, "node record bound to a lease");
    assert_eq!(s.local.lease, Some(lease));
    // Kept alive while the agent runs (every TTL/3): past one TTL, the same lease.
    tokio::time::sleep(Duration::from_secs(TTL as u64 + 1)).await;
    let (kept, _) = present_node_record(&mut local, "node record of the running agent").await?;
    assert_eq!(kept, lease, "{}", agent.log_tail());

    // SIGTERM: a clean exit that leaves the record and its lease alone.
    let st = agent.terminate(Duration::from_secs(10))?;
    let log = agent.log_tail();
    assert_eq!(st.code(), Some(0), "exit status {st}; log:\n{log}");
    let (after, rec_after) = present_node_record(
        &mut local,
        &format!("the node record went with SIGTERM; log:\n{log}"),
    )
    .await?;
    assert_eq!(after, lease, "same lease");
    assert_eq!(rec_after, rec, "same record");
    let asked = tokio::time::Instant::now();
    let live = local
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await?;
    assert_eq!(live.granted_ttl(), TTL, "--lease-ttl");
    assert!(
        live.ttl() > 0,
        "the lease was revoked on SIGTERM: {live:?}; log:\n{log}"
    );
    let key = node_key("home", "h1");
    assert!(
        live.keys().iter().any(|k| k.as_slice() == key.as_bytes()),
        "{key} bound to lease {lease}: {live:?}"
    );
    assert!(
        !local.get(cluster_key("home"), None).await?.kvs().is_empty(),
        "the cluster record stays"
    );

    // Nobody keeps the lease alive any more: the record goes when it expires,
    // not before (etcd rounds the remaining TTL to whole seconds), and no
    // later than a few seconds after.
    let remaining = Duration::from_secs(u64::try_from(live.ttl())?);
    let gone_after = eventually_async(remaining + Duration::from_secs(5), || {
        let mut local = local.clone();
        async move {
            match local_node_record(&mut local).await? {
                None => Ok(asked.elapsed()),
                Some((l, _)) => Err(format!("node record still there under lease {l}")),
            }
        }
    })
    .await?;
    assert!(
        gone_after + Duration::from_secs(1) >= remaining,
        "the record went {gone_after:?} after the lease had {remaining:?} left"
    );
    let expired = local.lease_time_to_live(lease, None).await?;
    assert!(expired.ttl() <= 0, "the lease expired: {expired:?}");
    assert!(
        !local.get(cluster_key("home"), None).await?.kvs().is_empty(),
        "the cluster record has no lease and stays"
    );
    Ok(())
}

/// A Secret that cannot be read is not a Secret without entries: a
/// cluster's file that is a dangling symlink for a while, and the whole
/// directory missing for a while, keep the cluster's routes in place (checked
/// every 50 ms) and are reported in `/status` as `secretProblems`; only a
/// positive, stable absence (the entry gone from a readable directory)
/// withdraws them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_routes_while_the_secret_cannot_be_read_and_withdraws_on_removal()
-> anyhow::Result<()> {
    let (_east, mut secret) = east_with_two_nodes().await?;
    let home = start_home(secret.path(), &[]).await?;
    let both = [("10.1.1.0/24", "e1"), ("10.1.2.0/24", "e2")];
    wait_routes(&home.dp, &both).await?;

    // Routes must hold for the whole window, sampled often.
    let hold = |what: &'static str, secs: u64| {
        let dp = home.dp.clone();
        async move {
            let until = std::time::Instant::now() + Duration::from_secs(secs);
            while std::time::Instant::now() < until {
                let n = routes(&dp).len();
                anyhow::ensure!(n == 2, "{what}: {n} routes held instead of 2");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
    };

    // 1. east's file dangles (its ..data target is gone) for 3 s.
    let link = secret.path().join("east");
    let target = std::fs::read_link(&link)?;
    std::fs::remove_file(&link)?;
    std::os::unix::fs::symlink("..data/east-gone", &link)?;
    let s = wait_status(&home, "the dangling entry reported", |s| {
        s.secret_problems
            .get("east")
            .is_some_and(|p| p.contains("symlink to nothing") && p.contains("keeping"))
    })
    .await?;
    eprintln!("reported: {:?}", s.secret_problems);
    hold("east's entry dangling", 3).await?;
    std::fs::remove_file(&link)?;
    std::os::unix::fs::symlink(&target, &link)?;
    wait_status(&home, "the entry reads again", |s| {
        s.secret_problems.is_empty()
    })
    .await?;

    // 2. The whole directory is missing for 3 s.
    let aside = secret.path().with_extension("aside");
    std::fs::rename(secret.path(), &aside)?;
    let moved_back = async {
        wait_status(&home, "the missing directory reported", |s| {
            s.secret_problems
                .get("directory")
                .is_some_and(|p| p.contains("keeping the 1 remote clusters"))
        })
        .await?;
        hold("the Secret directory missing", 3).await
    }
    .await;
    std::fs::rename(&aside, secret.path())?;
    moved_back?;
    wait_status(&home, "the directory reads again", |s| {
        s.secret_problems.is_empty()
    })
    .await?;
    assert_eq!(routes(&home.dp).len(), 2);
    assert!(status(&home)?.remotes.contains_key("east"));

    // 3. A real removal withdraws east's routes.
    secret.remove("east")?;
    wait_routes(&home.dp, &[]).await?;
    wait_status(&home, "east gone from status", |s| {
        !s.remotes.contains_key("east")
    })
    .await?;
    Ok(())
}

/// `/status` at scale: with 20,000 remote records, a caller asks for one
/// cluster (`?cluster=`), only the rejected records (`?rejected=true`) or
/// the summary (`?summary=true`); full answers are built at most two at a
/// time, and more callers at once get 503 with `Retry-After` (which
/// `podmesh status` waits out) instead of the memory of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_pages_by_cluster_and_rejection_and_bounds_concurrent_calls()
-> anyhow::Result<()> {
    let (mut east, mut secret) = east_with_two_nodes().await?;
    let mut west = Remote::start("west", 2).await?;
    west.cluster(&["10.16.0.0/12"]).await?;
    // 20,000 nodes in west, one rejected (its Pod CIDR outside the cluster's).
    for chunk in (0..20_000u32).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let n = 4 * i;
                let pod = format!("10.{}.{}.{}/30", 16 + n / 65536, (n / 256) % 256, n % 256);
                let v = serde_json::json!({"name": format!("w{i}"), "cluster": "west", "clusterID": 2,
                    "addresses": [format!("192.168.{}.{}", 100 + i / 250, 1 + i % 250)],
                    "podCIDRs": [pod], "vtepMAC": "02:00:00:00:00:02"});
                etcd_client::TxnOp::put(node_key("west", &format!("w{i}")), v.to_string(), None)
            })
            .collect();
        west.client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await?;
    }
    west.node("wbad", "192.168.99.9", &["10.5.0.0/24"]).await?;
    secret.set_valid(&west)?;
    let home = start_home(secret.path(), &[]).await?;
    wait_status(&home, "both synced", |s| {
        s.remotes.len() == 2 && s.remotes.values().all(|r| r.synced) && s.routes.len() == 20_002
    })
    .await?;
    let addr = home.agent.status_addr.to_string();
    let q = |cluster: Option<&str>, rejected: bool, summary: bool| {
        podmesh_agent::cli::status::fetch_query(
            &addr,
            &podmesh_agent::status::StatusQuery {
                cluster: cluster.map(str::to_string),
                rejected,
                summary,
            },
        )
    };
    let s = q(Some("east"), false, false)?;
    assert_eq!(
        s.remotes["east"].records.len(),
        3,
        "east: cluster + 2 nodes"
    );
    assert!(s.remotes["west"].records.is_empty());
    assert_eq!(s.routes.len(), 2);
    assert!(s.routes.iter().all(|r| r.cluster == "east"));
    let s = q(None, true, false)?;
    let rejected: Vec<&str> = s
        .remotes
        .values()
        .flat_map(|r| r.records.iter().map(|r| r.key.as_str()))
        .collect();
    assert_eq!(rejected, [node_key("west", "wbad").as_str()]);
    assert!(s.routes.is_empty());
    let s = q(None, false, true)?;
    assert!(s.routes.is_empty() && s.remotes.values().all(|r| r.records.is_empty()));
    assert_eq!(s.remotes["west"].entries, 20_002);

    // Eight full calls at once: each is whole or told to come back.
    let port = home.agent.status_addr.port();
    let calls: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || http_get(port, "/status")))
        .collect();
    let (mut whole, mut busy) = (0, 0);
    for c in calls {
        let r = c.join().unwrap()?;
        let head = r.lines().next().unwrap_or("").to_string();
        if head.contains(" 200 ") {
            let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
            let s: StatusReport = serde_json::from_str(body)?;
            assert_eq!(s.routes.len(), 20_002);
            whole += 1;
        } else {
            assert!(head.contains(" 503 "), "{head}");
            assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
            busy += 1;
        }
    }
    // The agent runs in this process: its peak memory, with the test's own
    // share, stays far under the agent's deploy limit (256 MiB).
    let peak = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        >> 10;
    eprintln!(
        "8 concurrent full /status calls with 20,002 records: {whole} answered, {busy} told to retry; peak RSS of agent and test {peak} MiB"
    );
    assert!(whole >= 1);
    assert!(peak > 0 && peak < 256, "peak RSS {peak} MiB");
    // The CLI's fetch waits out a busy agent.
    assert_eq!(status(&home)?.routes.len(), 20_002);
    let _ = east.delete("nothing").await;
    Ok(())
}

/// A page of records past gRPC's default 4 MiB answer: five records of
/// 1 MiB among 600 valid ones (the first page of 500 holds all five). The
/// agent lists it anyway (its receive limit is a page of records at the
/// record size limit, and pages shrink when records are far larger),
/// rejects the five as `record-too-large` and programs the 600; after a
/// restart it does so again (it once programmed 0 and never got ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_lists_pages_past_4_mib_and_rejects_only_the_oversized_records() -> anyhow::Result<()>
{
    let (_east, mut secret) = east_with_two_nodes().await?;
    let mut west = Remote::start("west", 2).await?;
    west.cluster(&["10.16.0.0/12"]).await?;
    for i in 0..5 {
        // Keys sort first (w0000…), so the first page holds them.
        west.put_raw(
            &node_key("west", &format!("a-big-{i}")),
            vec![b' '; 1 << 20],
        )
        .await?;
    }
    for chunk in (0..600u32).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let v = serde_json::json!({"name": format!("w{i}"), "cluster": "west", "clusterID": 2,
                    "addresses": [format!("192.168.{}.{}", 100 + i / 250, 1 + i % 250)],
                    "podCIDRs": [format!("10.16.{}.{}/30", (4 * i) / 256, (4 * i) % 256)], "vtepMAC": "02:00:00:00:00:02"});
                etcd_client::TxnOp::put(node_key("west", &format!("w{i}")), v.to_string(), None)
            })
            .collect();
        west.client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await?;
    }
    secret.set_valid(&west)?;
    for round in ["first start", "after a restart"] {
        let mut home = start_home(secret.path(), &[]).await?;
        let s = wait_status(&home, round, |s| {
            s.ready
                && s.remotes
                    .get("west")
                    .is_some_and(|w| w.synced && w.nodes_programmed == 600)
        })
        .await?;
        let w = &s.remotes["west"];
        assert_eq!(
            w.rejected_by_reason.get("record-too-large"),
            Some(&5),
            "{round}: {:?}",
            w.rejected_by_reason
        );
        assert_eq!(s.routes.len(), 602, "{round}");
        home.agent.stop();
    }
    Ok(())
}

/// What a remote cluster can make the agent binary write into its log:
/// keys with a newline or ESC cannot forge a log line or drive a terminal,
/// and a thousand records rejected for one reason are one line with a
/// count, not a thousand lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_keys_cannot_forge_log_lines_and_rejections_are_logged_per_reason()
-> anyhow::Result<()> {
    let mut east = Remote::start("east", 1).await?;
    east.cluster(&["10.1.0.0/16"]).await?;
    // Keys that try to forge a line and to drive the terminal.
    let forged = "x\nINFO podmesh_agent: FAKE all remotes healthy";
    let escape = "y\u{1b}[2J\u{1b}[31mred";
    for (i, name) in [forged, escape].iter().enumerate() {
        east.node(name, "192.168.1.1", &[&format!("10.1.{i}.0/24")])
            .await?;
    }
    // A thousand records rejected for one reason (Pod CIDRs outside the cluster's).
    for chunk in (0..1000u32).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let n = format!("bad-{i}");
                let v = serde_json::json!({"name": n, "cluster": "east", "clusterID": 1,
                    "addresses": ["192.168.1.1"], "podCIDRs": [format!("10.{}.{}.0/24", 2 + i / 250, i % 250)]});
                etcd_client::TxnOp::put(node_key("east", &n), v.to_string(), None)
            })
            .collect();
        east.client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await?;
    }
    let mut secret = SecretDir::new()?;
    secret.set_valid(&east)?;
    let mut agent = AgentProcess::start(secret.path())?;
    agent
        .wait("1,002 records rejected", |s| {
            s.remotes
                .get("east")
                .is_some_and(|r| r.rejected_by_reason.values().sum::<usize>() == 1002)
        })
        .await?;
    agent.terminate(Duration::from_secs(30))?;
    let text = std::fs::read_to_string(agent.log.path())?;
    for line in text.lines() {
        assert!(
            !line.trim_start().starts_with("INFO podmesh_agent: FAKE"),
            "a remote key forged a log line: {line:?}"
        );
    }
    assert!(!text.contains('\u{1b}'), "a raw ESC reached the log");
    let rejected_lines = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("east") && l.contains("reject"))
        .count();
    eprintln!("{rejected_lines} WARN lines about east's 1,002 rejected records");
    assert!(
        rejected_lines <= 10,
        "{rejected_lines} WARN lines for 1,002 rejected records of two reasons:\n{text}"
    );
    assert!(
        text.contains("1000"),
        "the count of the rejections of one reason is not logged:\n{text}"
    );
    Ok(())
}
