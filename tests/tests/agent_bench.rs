//! `cargo xtask bench converge`: 20 clusters x 5,000 nodes in 20 real etcds with
//! mTLS. Cold start to the complete desired state (in-process and as the real
//! binary), propagation latency of single updates under 100 updates/s of churn,
//! and the agent's RSS. Goals: cold start <= 2 s, p99 <= 50 ms, RSS <= 100 MB.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use etcd_client::{Txn, TxnOp};
use futures::StreamExt;
use ipnet::IpNet;
use podmesh_agent::{
    config,
    datapath::{Datapath, DatapathError, PruneReport, RemoteRoute, memory::MemoryDatapath},
    model::{cluster_key, node_key},
    runtime,
};
use podmesh_tests::{env_or, etcd::Etcd, pki::Pki};

/// A datapath that remembers when each (CIDR, next hop) was installed.
#[derive(Clone, Default)]
struct Timed {
    inner: MemoryDatapath,
    seen: Arc<Mutex<HashMap<(IpNet, IpAddr), Instant>>>,
    installed: Arc<Mutex<std::collections::HashSet<IpNet>>>,
    count: Arc<AtomicUsize>,
}

impl Datapath for Timed {
    async fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        let now = Instant::now();
        {
            let mut s = self.seen.lock().unwrap();
            for r in routes {
                s.entry((r.cidr, r.node_addr)).or_insert(now);
            }
        }
        self.inner.upsert(routes).await?;
        let mut i = self.installed.lock().unwrap();
        i.extend(routes.iter().map(|r| r.cidr));
        self.count.store(i.len(), Ordering::Relaxed);
        Ok(())
    }
    async fn delete(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        {
            let mut i = self.installed.lock().unwrap();
            for c in cidrs {
                i.remove(c);
            }
            self.count.store(i.len(), Ordering::Relaxed);
        }
        self.inner.delete(cidrs).await
    }
    async fn prune(&mut self, keep: &BTreeSet<IpNet>) -> Result<PruneReport, DatapathError> {
        {
            let mut i = self.installed.lock().unwrap();
            i.retain(|c| keep.contains(c));
            self.count.store(i.len(), Ordering::Relaxed);
        }
        self.inner.prune(keep).await
    }
    async fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
        self.inner.installed().await
    }
}

fn cluster_cidr(c: usize) -> String {
    format!("10.{}.0.0/16", 100 + c)
}

fn node_cidr(c: usize, n: usize) -> IpNet {
    // 5,000 nodes of /29 inside the cluster's /16.
    let base = u32::from(std::net::Ipv4Addr::new(10, (100 + c) as u8, 0, 0));
    IpNet::V4(ipnet::Ipv4Net::new((base + (n as u32) * 8).into(), 29).unwrap())
}

fn node_addr(c: usize, n: usize, version: u32) -> IpAddr {
    let v = 1 + (n as u32) + version * 8192;
    IpAddr::V4(std::net::Ipv4Addr::new(
        172,
        16 + c as u8,
        ((v >> 8) & 0xff) as u8,
        (v & 0xff) as u8,
    ))
}

fn node_value(c: usize, n: usize, version: u32) -> String {
    serde_json::json!({
        "name": format!("n{n}"), "cluster": format!("c{c}"), "clusterID": c + 1,
        "addresses": [node_addr(c, n, version)], "podCIDRs": [node_cidr(c, n)],
        "vtepMAC": "02:00:00:00:00:01", "bootID": "b"
    })
    .to_string()
}

async fn load(etcd: &Etcd, c: usize, nodes: usize) -> anyhow::Result<()> {
    let mut client = etcd.connect().await?;
    let cr = serde_json::json!({"name": format!("c{c}"), "id": c + 1,
        "podCIDRs": [cluster_cidr(c)], "serviceCIDRs": []});
    client
        .put(cluster_key(&format!("c{c}")), cr.to_string(), None)
        .await?;
    let batches: Vec<Vec<usize>> = (0..nodes)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|c| c.to_vec())
        .collect();
    futures::stream::iter(batches)
        .map(|b| {
            let mut client = client.clone();
            async move {
                let ops: Vec<TxnOp> = b
                    .iter()
                    .map(|&n| {
                        TxnOp::put(
                            node_key(&format!("c{c}"), &format!("n{n}")),
                            node_value(c, n, 0),
                            None,
                        )
                    })
                    .collect();
                client.txn(Txn::new().and_then(ops)).await
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok(())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn agent_args(secret: &Path, status: &str) -> Vec<String> {
    [
        "podmesh-agent",
        "--cluster-name",
        "home",
        "--cluster-id",
        "200",
        "--node-name",
        "h1",
        "--node-ip",
        "192.168.200.1",
        "--pod-cidr",
        "10.200.1.0/24",
        "--cluster-pod-cidr",
        "10.200.0.0/16",
        "--datapath-dry-run",
        "--status-addr",
        status,
        "--clustermesh-config",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([secret.display().to_string()])
    .collect()
}

/// Runs the real binary until its datapath holds `want` routes; returns (cold start, VmHWM kB, VmRSS kB).
fn binary_cold_start(
    bin: &Path,
    secret: &Path,
    want: usize,
) -> anyhow::Result<(Duration, u64, u64)> {
    let port = podmesh_tests::free_port();
    let args = agent_args(secret, &format!("127.0.0.1:{port}"));
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args(&args[1..])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let deadline = t0 + Duration::from_secs(120);
    let line = format!("podmesh_datapath_routes {want}");
    let result = loop {
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("binary did not converge in 120 s"));
        }
        if let Ok(m) = podmesh_tests::etcd::http_get(port, "/metrics")
            && m.lines().any(|l| l == line)
        {
            let t = t0.elapsed();
            std::thread::sleep(Duration::from_secs(2));
            break Ok((t, rss_kb(pid, "VmHWM:"), rss_kb(pid, "VmRSS:")));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo xtask bench converge"]
async fn bench_converge() -> anyhow::Result<()> {
    let clusters = env_or::<usize>("PODMESH_BENCH_CLUSTERS", 20);
    let nodes = env_or::<usize>("PODMESH_BENCH_NODES", 5000);
    let rate = env_or::<usize>("PODMESH_BENCH_RATE", 100);
    let churn_secs = env_or::<usize>("PODMESH_BENCH_CHURN_SECS", 20);
    let total = clusters * nodes;
    eprintln!(
        "converge: {clusters} clusters x {nodes} nodes = {total} records, churn {rate}/s for {churn_secs} s"
    );

    let pki = Arc::new(Pki::new("bench")?);
    let secret = tempfile::tempdir()?;
    let mut etcds = Vec::new();
    let t = Instant::now();
    for c in 0..clusters {
        let e = Etcd::start_with(pki.clone(), &format!("c{c}"))?;
        e.client_config(&secret.path().join(format!("c{c}")))?;
        etcds.push(e);
    }
    futures::future::try_join_all(etcds.iter().enumerate().map(|(c, e)| load(e, c, nodes))).await?;
    eprintln!(
        "loaded {total} records into {clusters} etcds in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 1. The real binary: cold start and memory.
    let bin = std::env::var_os("PODMESH_AGENT_BIN").map(PathBuf::from);
    let binary = match &bin {
        Some(b) => Some(binary_cold_start(b, secret.path(), total)?),
        None => {
            eprintln!("PODMESH_AGENT_BIN unset: skipping the binary's cold start and RSS");
            None
        }
    };

    // 2. In-process: cold start, then churn latency.
    let cfg = config::load_from(agent_args(secret.path(), "127.0.0.1:0"))?;
    let dp = Timed::default();
    let t0 = Instant::now();
    let agent = runtime::start(&cfg, dp.clone(), None).await?;
    while dp.count.load(Ordering::Relaxed) < total {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "no convergence in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cold = t0.elapsed();
    eprintln!("in-process cold start: {:.3} s", cold.as_secs_f64());

    let clients: Vec<etcd_client::Client> =
        futures::future::try_join_all(etcds.iter().map(|e| e.connect())).await?;
    let mut sent: Vec<((IpNet, IpAddr), Instant)> = Vec::new();
    let failed = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(interval);
    let updates = rate * churn_secs;
    for i in 0..updates {
        tick.tick().await;
        let c = i % clusters;
        let n = (i * 7919) % nodes;
        let version = 1 + (i / (clusters * nodes)) as u32 + (i as u32 % 3);
        let key = (
            node_cidr(c, n),
            node_addr(c, n, version + 100 * (1 + i as u32 / 1000)),
        );
        let value = serde_json::json!({
            "name": format!("n{n}"), "cluster": format!("c{c}"), "clusterID": c + 1,
            "addresses": [key.1], "podCIDRs": [key.0]
        })
        .to_string();
        let cl = clients[c].clone();
        let at = Instant::now();
        // Writes go out at the target rate even if etcd or the machine lags.
        let failed = failed.clone();
        let k = node_key(&format!("c{c}"), &format!("n{n}"));
        tokio::spawn(async move {
            let mut cl = cl;
            if cl.put(k, value, None).await.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
        sent.push((key, at));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seen = dp.seen.lock().unwrap().clone();
    let mut lat: Vec<Duration> = Vec::new();
    let mut missing = 0;
    for (k, at) in &sent {
        match seen.get(k) {
            Some(t) if *t >= *at => lat.push(*t - *at),
            Some(_) => lat.push(Duration::ZERO),
            None => missing += 1,
        }
    }
    let inproc_rss = rss_kb(std::process::id(), "VmRSS:");
    drop(agent);
    let p50 = pct(&mut lat, 0.5);
    let p99 = pct(&mut lat, 0.99);
    let max = pct(&mut lat, 1.0);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!(
        "podmesh converge: {clusters} clusters x {nodes} nodes = {total} records (20 real etcds with mTLS, dry-run datapath)"
    );
    println!(
        "{:<44} {:>12} {:>10} {:>8}",
        "figure", "measured", "goal", "ratio"
    );
    let row = |name: &str, v: f64, goal: f64, unit: &str| {
        println!(
            "{name:<44} {v:>9.1} {unit:<2} {goal:>7.0} {unit:<2} {:>7.2}x",
            v / goal
        );
    };
    if let Some((t, hwm, rss)) = binary {
        row(
            "cold start, binary (spawn -> all routes)",
            ms(t),
            2000.0,
            "ms",
        );
        row(
            "agent peak RSS (VmHWM), binary",
            hwm as f64 / 1024.0,
            100.0,
            "MB",
        );
        row(
            "agent RSS after convergence, binary",
            rss as f64 / 1024.0,
            100.0,
            "MB",
        );
    }
    row(
        "cold start, in-process (start -> all routes)",
        ms(cold),
        2000.0,
        "ms",
    );
    row(
        &format!("propagation p50 ({rate} updates/s churn)"),
        ms(p50),
        50.0,
        "ms",
    );
    row(
        &format!("propagation p99 ({rate} updates/s churn)"),
        ms(p99),
        50.0,
        "ms",
    );
    println!("{:<44} {:>9.1} ms", "propagation max", ms(max));
    println!(
        "{:<44} {:>9} / {}",
        "updates not seen within 5 s",
        missing,
        sent.len()
    );
    println!(
        "{:<44} {:>9.1} MB",
        "bench process RSS (agent + load client)",
        inproc_rss as f64 / 1024.0
    );
    Ok(())
}
