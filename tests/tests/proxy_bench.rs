//! Load generator of `cargo xtask bench proxy` (ignored as a test; run in release by xtask): fan-out
//! latency, proxy RSS and upstream watch count for podmesh-etcd-proxy, etcd grpc-proxy and direct etcd,
//! in two shapes: many watchers on few connections, and one connection per watch as agents hold them.
use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, WatchOptions};
use futures::StreamExt as _;
use podmesh_tests::{
    env_or,
    etcd::{Etcd, connect},
    free_port,
    pki::{CertFiles, CertSpec, Pki},
    proxy::Proxy,
};

const PREFIX: &str = "podmesh/v1/bench/";
const PER_STREAM: usize = 100;
const STREAMS_PER_CONN: usize = 10;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far, in milliseconds
/// (`/proc/<pid>/stat`, clock ticks of 10 ms); 0 when it cannot be read.
fn cpu_ms(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name, which may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 * 10.0
}

/// One put per entry of `sent` at `rate`/s on the bench prefix (keys
/// `k0`..`k63`, the value the put's sequence number, which the readers
/// look up in `sent`: when, since `base`, its put started); returns the
/// largest RSS of `pid` seen every `sample_every` puts, at least `rss`.
async fn write_paced(
    etcd: &Etcd,
    sent: &[AtomicU64],
    base: Instant,
    rate: u64,
    pid: Option<u32>,
    sample_every: usize,
    mut rss: u64,
) -> anyhow::Result<u64> {
    let mut writer = etcd.connect().await?;
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    for (seq, at) in sent.iter().enumerate() {
        tick.tick().await;
        at.store(base.elapsed().as_nanos() as u64, Ordering::Release);
        writer
            .put(format!("{PREFIX}k{}", seq % 64), seq.to_string(), None)
            .await?;
        if seq % sample_every == 0 {
            rss = rss.max(pid.map_or(0, rss_kib));
        }
    }
    Ok(rss)
}

#[derive(Debug, Clone, Default)]
struct Row {
    watchers: usize,
    target: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    delivered: f64,
    rss_mib: Option<f64>,
    upstream_watches: f64,
}

/// A watch target: where clients connect, with which CA and identity, and
/// which process to measure.
struct Target {
    name: &'static str,
    endpoint: String,
    ca: std::path::PathBuf,
    client: CertFiles,
    pid: Option<u32>,
}

struct GrpcProxy {
    child: Child,
    port: u16,
    pki: Pki,
    client: CertFiles,
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// etcd's own `etcd grpc-proxy`, with empty-CN certificates (a CN would be
/// taken as an etcd user name).
fn grpc_proxy(etcd: &Etcd) -> anyhow::Result<GrpcProxy> {
    let pki = Pki::new("grpc-proxy")?;
    let server = pki.issue(&CertSpec {
        name: "",
        file: Some("grpc-proxy-server"),
        sans: vec!["127.0.0.1".into()],
        server: true,
        client: true,
        expired: false,
    })?;
    let client = pki.client("bench-client")?;
    let upstream = etcd.pki().issue(&CertSpec {
        name: "",
        file: Some("grpc-proxy-upstream"),
        sans: vec![],
        server: false,
        client: true,
        expired: false,
    })?;
    let port = free_port();
    let mut cmd = Command::new("etcd");
    let child = podmesh_tests::daemon::without_etcd_env(&mut cmd)
        .args(["grpc-proxy", "start"])
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .arg(format!("--listen-addr=127.0.0.1:{port}"))
        .arg(format!("--cacert={}", etcd.pki().ca().display()))
        .arg(format!("--cert={}", upstream.cert.display()))
        .arg(format!("--key={}", upstream.key.display()))
        .arg(format!("--trusted-ca-file={}", pki.ca().display()))
        .arg(format!("--cert-file={}", server.cert.display()))
        .arg(format!("--key-file={}", server.key.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            std::env::temp_dir().join("podmesh-bench-grpc-proxy.log"),
        )?)
        .spawn()?;
    Ok(GrpcProxy {
        child,
        port,
        pki,
        client,
    })
}

async fn connect_retry(t: &Target) -> anyhow::Result<Client> {
    let mut last = None;
    for _ in 0..100 {
        match connect(std::slice::from_ref(&t.endpoint), &t.ca, Some(&t.client)).await {
            Ok(mut c) => {
                if c.status().await.is_ok() {
                    return Ok(c);
                }
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{} never answered", t.name)))
}

async fn run_target(
    etcd: &Etcd,
    t: &Target,
    watchers: usize,
    seconds: u64,
    rate: u64,
) -> anyhow::Result<Row> {
    let conns = watchers.div_ceil(PER_STREAM * STREAMS_PER_CONN);
    let base = Instant::now();
    let puts = (seconds * rate) as usize;
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..puts).map(|_| AtomicU64::new(0)).collect());
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers.div_ceil(PER_STREAM));
    let mut readers = Vec::new();
    let mut left = watchers;
    for _ in 0..conns {
        let client = connect_retry(t).await?;
        for _ in 0..STREAMS_PER_CONN {
            if left == 0 {
                break;
            }
            let n = left.min(PER_STREAM);
            left -= n;
            let mut wc = client.watch_client();
            let opts = || Some(WatchOptions::new().with_prefix());
            let mut s = wc.watch(PREFIX, opts()).await?;
            for _ in 1..n {
                s.watch(PREFIX, opts()).await?;
            }
            let sent = sent.clone();
            let ready = ready_tx.clone();
            readers.push(tokio::spawn(async move {
                let mut created = 0;
                let mut lat = Vec::with_capacity(n * puts);
                let deadline = Duration::from_secs(seconds + 20);
                loop {
                    let msg = tokio::time::timeout(deadline, s.message()).await;
                    let Ok(Ok(Some(resp))) = msg else { break };
                    if resp.created() {
                        created += 1;
                        if created == n {
                            let _ = ready.send(()).await;
                        }
                    }
                    let now = base.elapsed().as_nanos() as u64;
                    for e in resp.events() {
                        let Some(seq) = e
                            .kv()
                            .and_then(|kv| kv.value_str().ok()?.parse::<usize>().ok())
                        else {
                            continue;
                        };
                        let at = sent[seq].load(Ordering::Acquire);
                        lat.push(((now.saturating_sub(at)) / 1000) as u32);
                    }
                    if lat.len() >= n * puts {
                        break;
                    }
                }
                lat
            }));
        }
    }
    drop(ready_tx);
    for _ in 0..readers.len() {
        ready_rx.recv().await;
    }
    // Let the proxies settle their upstream watches.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A fresh etcd per measurement: every watch it holds belongs to this target.
    let upstream_watches = etcd.metric("etcd_debugging_mvcc_watcher_total")?;
    let mut rss = write_paced(etcd, &sent, base, rate, t.pid, 50, 0).await?;
    let mut lat = Vec::new();
    for r in readers {
        lat.extend(r.await?);
    }
    rss = rss.max(t.pid.map_or(0, rss_kib));
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Ok(Row {
        watchers,
        target: t.name,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        delivered: lat.len() as f64 / (watchers * puts) as f64,
        rss_mib: t.pid.map(|_| rss as f64 / 1024.0),
        upstream_watches,
    })
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run by `cargo xtask bench proxy`"]
async fn proxy_bench() {
    let counts = env_list("PODMESH_BENCH_WATCHERS", "1000");
    let seconds: u64 = env_or("PODMESH_BENCH_SECONDS", 10);
    let rate: u64 = env_or("PODMESH_BENCH_RATE", 100);
    let mut rows = Vec::new();
    for &w in &counts {
        for which in ["podmesh-etcd-proxy", "etcd grpc-proxy", "etcd (direct)"] {
            // A fresh etcd per measurement: nothing left from the previous one.
            let etcd = Etcd::start().unwrap();
            let row = match which {
                "podmesh-etcd-proxy" => {
                    let p = Proxy::start(&etcd, &[]).unwrap();
                    let t = Target {
                        name: "podmesh-etcd-proxy",
                        endpoint: p.endpoint(),
                        ca: p.pki().ca().to_path_buf(),
                        client: p.client().clone(),
                        pid: p.pid(),
                    };
                    run_target(&etcd, &t, w, seconds, rate).await
                }
                "etcd grpc-proxy" => {
                    let g = grpc_proxy(&etcd).unwrap();
                    let t = Target {
                        name: "etcd grpc-proxy",
                        endpoint: format!("https://127.0.0.1:{}", g.port),
                        ca: g.pki.ca().to_path_buf(),
                        client: g.client.clone(),
                        pid: Some(g.child.id()),
                    };
                    run_target(&etcd, &t, w, seconds, rate).await
                }
                _ => {
                    let t = Target {
                        name: "etcd (direct)",
                        endpoint: etcd.endpoint(),
                        ca: etcd.pki().ca().to_path_buf(),
                        client: etcd.root_client().clone(),
                        pid: None,
                    };
                    run_target(&etcd, &t, w, seconds, rate).await
                }
            };
            let row = row.unwrap_or_else(|e| panic!("{which} at {w} watchers: {e:#}"));
            eprintln!("{row:?}");
            rows.push(row);
        }
    }
    println!();
    println!(
        "proxy bench: put rate {rate}/s for {seconds}s, watchers on prefix {PREFIX}, {PER_STREAM} per gRPC stream"
    );
    println!(
        "{:>8}  {:<20} {:>9} {:>9} {:>10} {:>9} {:>17}",
        "watchers", "target", "p50 ms", "p99 ms", "delivered", "RSS MiB", "upstream watches"
    );
    for r in &rows {
        println!(
            "{:>8}  {:<20} {:>9.2} {:>9.2} {:>9.1}% {:>9} {:>17}",
            r.watchers,
            r.target,
            r.p50_ms,
            r.p99_ms,
            r.delivered * 100.0,
            r.rss_mib.map_or("-".into(), |m| format!("{m:.1}")),
            r.upstream_watches
        );
    }
    println!();
    for &w in &counts {
        let get = |t: &str| rows.iter().find(|r| r.watchers == w && r.target == t);
        if let (Some(p), Some(g)) = (get("podmesh-etcd-proxy"), get("etcd grpc-proxy")) {
            println!(
                "{w:>8} watchers: podmesh/grpc-proxy  p50 {:.2}x  p99 {:.2}x  RSS {:.2}x  upstream watches {} vs {}",
                p.p50_ms / g.p50_ms,
                p.p99_ms / g.p99_ms,
                p.rss_mib.unwrap_or(f64::NAN) / g.rss_mib.unwrap_or(f64::NAN),
                p.upstream_watches,
                g.upstream_watches
            );
        }
        if let (Some(p), Some(d)) = (get("podmesh-etcd-proxy"), get("etcd (direct)")) {
            println!(
                "{w:>8} watchers: podmesh/direct etcd p50 {:.2}x  p99 {:.2}x  upstream watches {} vs {}",
                p.p50_ms / d.p50_ms,
                p.p99_ms / d.p99_ms,
                p.upstream_watches,
                d.upstream_watches
            );
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ConnRow {
    connections: usize,
    target: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    delivered: f64,
    base_mib: f64,
    idle_mib: f64,
    peak_mib: f64,
    upstream_watches: f64,
    connect_s: f64,
    /// CPU the target used per put, from the first put until every
    /// connection has its events: what a delivery to all of them costs,
    /// which the load of other processes on the cores changes far less
    /// than it changes latency.
    target_cpu_ms: f64,
    /// CPU the load client (this process) used per put over the same time.
    client_cpu_ms: f64,
    /// Watch responses received per put, over every connection: fewer than
    /// connections when a target that falls behind sends several events in
    /// one response, which costs it (and the client) less per put.
    responses_per_put: f64,
}

impl ConnRow {
    /// RSS each idle watching connection adds, in KiB.
    fn per_conn_kib(&self) -> f64 {
        (self.idle_mib - self.base_mib) * 1024.0 / self.connections as f64
    }
}

/// `n` connections with one prefix watch each (spread over loopback source
/// addresses), then `puts` puts at `rate`/s: put → event latency of every
/// watcher, RSS before, idle and at the peak.
async fn run_connections(
    etcd: &Etcd,
    t: &Target,
    n: usize,
    puts: usize,
    rate: u64,
) -> anyhow::Result<ConnRow> {
    use podmesh_tests::watchconn::{WatchConn, event_values, prefix_watch, source, tls};
    let addr: std::net::SocketAddr = t
        .endpoint
        .trim_start_matches("https://")
        .parse()
        .map_err(|e| anyhow::anyhow!("endpoint {}: {e}", t.endpoint))?;
    // The target answers before the measurement starts.
    drop(connect_retry(t).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_kib = t.pid.map_or(0, rss_kib);
    let tls = tls(&t.ca, &t.client)?;
    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..puts).map(|_| AtomicU64::new(0)).collect());
    let started = Instant::now();
    // Connections open a few dozen at a time, as agents starting over a
    // while do; the proxy is measured once they all watch.
    let mut conns = Vec::with_capacity(n);
    let mut opening = futures::stream::iter((0..n).map(|i| {
        let tls = tls.clone();
        async move {
            let mut last = None;
            for _ in 0..20 {
                match WatchConn::open(addr, source(i), tls.clone(), prefix_watch(PREFIX, 0)).await {
                    Ok(mut c) => match c.created().await {
                        Ok(_) => return Ok(c),
                        Err(e) => last = Some(e),
                    },
                    Err(e) => last = Some(anyhow::anyhow!("{e}")),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        }
    }))
    .buffer_unordered(64);
    while let Some(c) = futures::StreamExt::next(&mut opening).await {
        conns.push(c.map_err(|e| anyhow::anyhow!("connection {}: {e:#}", conns.len()))?);
    }
    drop(opening);
    let connect_s = started.elapsed().as_secs_f64();
    // Let the proxies settle their upstream watches and allocations.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kib = t.pid.map_or(0, rss_kib);
    let upstream_watches = etcd.metric("etcd_debugging_mvcc_watcher_total")?;
    // One task per connection: the reader is also the connection's only
    // reader and writer (`WatchConn` has no task of its own).
    let mut readers = Vec::with_capacity(n);
    for mut c in conns {
        let sent = sent.clone();
        readers.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(puts);
            let mut responses = 0usize;
            // One deadline for the whole reading (the puts' time and a
            // minute): a timeout per message would add a timer to insert
            // and remove per delivery to the client's work.
            let deadline = Duration::from_secs(60 + puts as u64 / rate);
            let _ = tokio::time::timeout(deadline, async {
                while lat.len() < puts {
                    let Ok(Some(resp)) = c.next_raw().await else {
                        break;
                    };
                    responses += 1;
                    let now = base.elapsed().as_nanos() as u64;
                    // Only the values (the put's sequence number) are read:
                    // the client shares the cores with the target it measures.
                    for value in event_values(&resp) {
                        let Some(seq) = std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse::<usize>().ok())
                        else {
                            continue;
                        };
                        let at = sent[seq].load(Ordering::Acquire);
                        lat.push(((now.saturating_sub(at)) / 1000) as u32);
                    }
                }
            })
            .await;
            // The connection stays open until every reader is done: a
            // reader that closes its own while others still wait for their
            // last events would have the target (and the client) tear down
            // thousands of connections in the middle of the measurement.
            (lat, responses, c)
        }));
    }
    let target_pid = t.pid.map(|p| p.to_string()).unwrap_or_default();
    let cpu_before = (cpu_ms(&target_pid), cpu_ms("self"));
    // The writer has a thread and runtime of its own, as the agent that
    // publishes is another process: on the readers' runtime its puts (and
    // its etcd connection's task) would wait behind every reader woken
    // before them, and that wait would count as the target's latency.
    let write = || -> anyhow::Result<u64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(write_paced(etcd, &sent, base, rate, t.pid, 10, idle_kib))
    };
    // This worker's readers move to another while it waits.
    let mut peak = tokio::task::block_in_place(|| {
        std::thread::scope(|s| s.spawn(write).join())
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))
    })??;
    let mut lat = Vec::with_capacity(n * puts);
    let mut responses = 0;
    let mut open = Vec::with_capacity(n);
    for r in readers {
        let (l, m, c) = r.await?;
        lat.extend(l);
        responses += m;
        open.push(c);
    }
    let cpu_after = (cpu_ms(&target_pid), cpu_ms("self"));
    peak = peak.max(t.pid.map_or(0, rss_kib));
    drop(open);
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Ok(ConnRow {
        connections: n,
        target: t.name,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        delivered: lat.len() as f64 / (n * puts) as f64,
        base_mib: base_kib as f64 / 1024.0,
        idle_mib: idle_kib as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
        upstream_watches,
        connect_s,
        target_cpu_ms: (cpu_after.0 - cpu_before.0) / puts as f64,
        client_cpu_ms: (cpu_after.1 - cpu_before.1) / puts as f64,
        responses_per_put: responses as f64 / puts as f64,
    })
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run by `cargo xtask bench proxy --connections N`"]
async fn proxy_connections_bench() {
    let counts = env_list("PODMESH_BENCH_CONNECTIONS", "10000");
    let puts: usize = env_or("PODMESH_BENCH_PUTS", 200);
    let rate: u64 = env_or("PODMESH_BENCH_RATE", 50);
    let extra: Vec<String> = std::env::var("PODMESH_BENCH_PROXY_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let targets: Vec<String> = std::env::var("PODMESH_BENCH_TARGETS")
        .unwrap_or_else(|_| "podmesh-etcd-proxy,podmesh-etcd-proxy (hyper),etcd grpc-proxy".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    // One descriptor per connection here, as many in the proxy.
    let limit = podmesh_plumbing::limits::raise_nofile_limit().unwrap_or(0);
    if let Some(&most) = counts.iter().max() {
        assert!(
            limit as usize > most + 512,
            "the open-files limit ({limit}) is below {most} connections; raise the hard limit (ulimit -Hn)"
        );
    }
    let mut rows = Vec::new();
    for &n in &counts {
        for which in &targets {
            let etcd = Etcd::start().unwrap();
            let row = match which.as_str() {
                "podmesh-etcd-proxy" | "podmesh-etcd-proxy (hyper)" => {
                    // Room for every connection of the measurement (and the
                    // readiness check's), unless the flags say otherwise.
                    let max = (n + 64).to_string();
                    let mut flags: Vec<&str> = vec!["--max-connections", &max];
                    // The default HTTP/2 server (lean), or hyper's, in the same run.
                    let name = if which.ends_with("(hyper)") {
                        flags.extend(["--http2-server", "hyper"]);
                        "podmesh-etcd-proxy (hyper)"
                    } else {
                        "podmesh-etcd-proxy"
                    };
                    flags.extend(extra.iter().map(String::as_str));
                    let p = Proxy::start(&etcd, &flags).unwrap();
                    let t = Target {
                        name,
                        endpoint: p.endpoint(),
                        ca: p.pki().ca().to_path_buf(),
                        client: p.client().clone(),
                        pid: p.pid(),
                    };
                    let r = run_connections(&etcd, &t, n, puts, rate).await;
                    if let Ok(m) = p.metric("podmesh_proxy_watchers_cancelled_total", "") {
                        eprintln!("podmesh-etcd-proxy: watchers cancelled {m}");
                    }
                    r
                }
                "etcd grpc-proxy" => {
                    let g = grpc_proxy(&etcd).unwrap();
                    let t = Target {
                        name: "etcd grpc-proxy",
                        endpoint: format!("https://127.0.0.1:{}", g.port),
                        ca: g.pki.ca().to_path_buf(),
                        client: g.client.clone(),
                        pid: Some(g.child.id()),
                    };
                    run_connections(&etcd, &t, n, puts, rate).await
                }
                other => panic!("unknown target {other:?}"),
            };
            let row = row.unwrap_or_else(|e| panic!("{which} at {n} connections: {e:#}"));
            eprintln!("{row:?}");
            rows.push(row);
        }
    }
    println!();
    println!(
        "proxy bench, one connection per watch: {puts} puts at {rate}/s on prefix {PREFIX}, connections from {} loopback addresses",
        podmesh_tests::watchconn::SOURCES
    );
    println!(
        "{:>11}  {:<27} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9} {:>9} {:>12} {:>9} {:>10} {:>12} {:>12} {:>13}",
        "connections",
        "target",
        "p50 ms",
        "p99 ms",
        "max ms",
        "delivered",
        "base MiB",
        "idle MiB",
        "peak MiB",
        "KiB per conn",
        "upstream",
        "connect s",
        "CPU ms/put",
        "client ms/put",
        "responses/put"
    );
    for r in &rows {
        println!(
            "{:>11}  {:<27} {:>8.1} {:>8.1} {:>8.1} {:>9.1}% {:>9.1} {:>9.1} {:>9.1} {:>12.1} {:>9} {:>10.1} {:>12.1} {:>12.1} {:>13.0}",
            r.connections,
            r.target,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.delivered * 100.0,
            r.base_mib,
            r.idle_mib,
            r.peak_mib,
            r.per_conn_kib(),
            r.upstream_watches,
            r.connect_s,
            r.target_cpu_ms,
            r.client_cpu_ms,
            r.responses_per_put
        );
    }
    println!();
    for &n in &counts {
        let get = |t: &str| rows.iter().find(|r| r.connections == n && r.target == t);
        if let (Some(p), Some(g)) = (get("podmesh-etcd-proxy"), get("etcd grpc-proxy")) {
            println!(
                "{n:>8} connections: podmesh/grpc-proxy  p50 {:.2}x  p99 {:.2}x  peak RSS {:.2}x  KiB per connection {:.2}x",
                p.p50_ms / g.p50_ms,
                p.p99_ms / g.p99_ms,
                p.peak_mib / g.peak_mib,
                p.per_conn_kib() / g.per_conn_kib()
            );
        }
        if let (Some(l), Some(h)) = (get("podmesh-etcd-proxy"), get("podmesh-etcd-proxy (hyper)")) {
            println!(
                "{n:>8} connections: lean/hyper HTTP/2 server  p50 {:.2}x  p99 {:.2}x  peak RSS {:.2}x  KiB per connection {:.2}x",
                l.p50_ms / h.p50_ms,
                l.p99_ms / h.p99_ms,
                l.peak_mib / h.peak_mib,
                l.per_conn_kib() / h.per_conn_kib()
            );
        }
    }
}
