//! Datapath benchmarks, run by `cargo xtask bench install|datapath` (ignored
//! by plain `cargo test`): figures and ratios against the peer measured in
//! the same run, never asserted.
mod datapath_support;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use datapath_support::{Bpffs, Mesh};
use ipnet::{IpNet, Ipv4Net};
use podmesh_agent::{
    config::DatapathMode,
    datapath::{Datapath, KernelConfig, ROUTE_PROTOCOL, RemoteRoute, from_config, owners::Owners},
};
use podmesh_common::{OWNERS_MAP, REMOTES_V4_MAP, RemoteNode};
use podmesh_tests::{env_or, netns::NetNs, require_root};

/// Remote node `i` of the install benchmark: a /26 Pod CIDR in 10.0.0.0/8
/// and an underlay address in 100.64.0.0/10 (on the scratch veth).
fn remote(i: u32) -> RemoteRoute {
    let cidr = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i * 64), 26).expect("valid");
    let addr = Ipv4Addr::from(0x6440_0000 + 2 + i);
    let b = i.to_be_bytes();
    RemoteRoute {
        cidr: IpNet::V4(cidr),
        cluster: "bench".into(),
        node: format!("node-{i}"),
        node_addr: IpAddr::V4(addr),
        vtep_mac: Some([0x02, 0x00, b[0], b[1], b[2], b[3]]),
        wireguard_key: None,
    }
}

/// A scratch namespace with an underlay veth that has every node address on-link.
fn scratch() -> anyhow::Result<NetNs> {
    let ns = NetNs::new("bench")?;
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    ns.ip(&["addr", "add", "100.64.0.1/10", "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    Ok(ns)
}

fn config(mode: DatapathMode, ns: &NetNs, bpffs: &Bpffs) -> KernelConfig {
    let mut cfg = KernelConfig::new(mode).in_netns(format!("/run/netns/{}", ns.name()));
    cfg.pin_dir = bpffs.path().join(ns.name());
    cfg.underlay_mtu = Some(1500);
    cfg
}

/// Time to install `routes`, then time to withdraw them all with `prune`.
///
/// The namespace is emptied before it is dropped: the kernel removes the
/// nexthop objects of a dying namespace one by one with a whole-FIB flush
/// each while routes still use them (nexthop_net_exit_rtnl), which is
/// quadratic and stalls every netns creation on the machine for minutes.
async fn time_upsert(
    mode: DatapathMode,
    routes: &[RemoteRoute],
    bpffs: &Bpffs,
) -> anyhow::Result<(Duration, Duration)> {
    let ns = scratch()?;
    let mut dp = from_config(&config(mode, &ns, bpffs))?;
    let t = Instant::now();
    dp.upsert(routes).await?;
    let install = t.elapsed();
    let n = ns
        .ip(&["route", "show", "proto", &ROUTE_PROTOCOL.to_string()])?
        .lines()
        .count();
    if n != routes.len() {
        bail!("{mode:?}: {n} routes installed, expected {}", routes.len());
    }
    let t = Instant::now();
    dp.prune(&BTreeSet::new()).await?;
    let withdraw = t.elapsed();
    Ok((install, withdraw))
}

/// Only the maps: the same inserts the ebpf datapath makes, on the pinned
/// maps: the LPM map (what forwarding needs), then the owners map (what a
/// restarted agent reads back). Returns both times.
async fn time_map(routes: &[RemoteRoute], bpffs: &Bpffs) -> anyhow::Result<(Duration, Duration)> {
    let ns = scratch()?;
    let cfg = config(DatapathMode::Ebpf, &ns, bpffs);
    let _dp = from_config(&cfg)?;
    let data = MapData::from_pin(cfg.pin_dir.join(REMOTES_V4_MAP))?;
    let mut map: LpmTrie<MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    let t = Instant::now();
    for r in routes {
        let (IpNet::V4(net), IpAddr::V4(addr)) = (r.cidr, r.node_addr) else {
            unreachable!()
        };
        let v = RemoteNode::new(addr.into(), 1, r.vtep_mac.expect("mac"));
        map.insert(
            &Key::new(u32::from(net.prefix_len()), net.network().octets()),
            v,
            0,
        )?;
    }
    let lpm = t.elapsed();
    let mut owners = Owners::new(aya::maps::Map::HashMap(MapData::from_pin(
        cfg.pin_dir.join(OWNERS_MAP),
    )?))?;
    let t = Instant::now();
    if let Some(e) = owners.set_all(routes) {
        return Err(e.into());
    }
    Ok((lpm, t.elapsed()))
}

/// The masquerade exemption alone: adding every CIDR to the nft set in
/// batches, reading the set back (a resync's check), and emptying it; the
/// peer is what a rule per CIDR would cost: the same CIDRs as `ACCEPT` rules
/// of one iptables chain, loaded by one `iptables-restore`.
fn time_exemption(routes: &[RemoteRoute]) -> anyhow::Result<[Duration; 4]> {
    use podmesh_agent::datapath::masq::MasqExemption;
    let ns = scratch()?;
    let mut x = MasqExemption::new(Some(std::path::Path::new(&format!(
        "/run/netns/{}",
        ns.name()
    ))));
    x.ensure()?;
    let cidrs: Vec<IpNet> = routes.iter().map(|r| r.cidr).collect();
    let keep: BTreeSet<IpNet> = cidrs.iter().copied().collect();
    let t = Instant::now();
    x.add(cidrs.iter().copied())?;
    let add = t.elapsed();
    let t = Instant::now();
    let (added, removed) = x.sync(&keep)?;
    let check = t.elapsed();
    if added + removed != 0 || x.cidrs().len() != routes.len() {
        bail!("exemption: the set read back differs ({added} missing, {removed} extra)");
    }
    let t = Instant::now();
    x.sync(&BTreeSet::new())?;
    let withdraw = t.elapsed();
    let mut rules = String::from("*nat\n:BENCH-EXEMPT - [0:0]\n");
    for c in &cidrs {
        writeln!(rules, "-A BENCH-EXEMPT -d {c} -j ACCEPT")?;
    }
    rules.push_str("COMMIT\n");
    let t = Instant::now();
    let mut child = ns
        .command("iptables-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, rules.as_bytes())?;
    if !child.wait()?.success() {
        bail!("iptables-restore failed");
    }
    Ok([add, check, withdraw, t.elapsed()])
}

/// The peer: `ip -batch` with nexthop objects, the same entries as `direct`.
fn time_ip_batch(routes: &[RemoteRoute]) -> anyhow::Result<Duration> {
    let ns = scratch()?;
    let mut batch = String::new();
    for (i, r) in routes.iter().enumerate() {
        writeln!(
            batch,
            "nexthop add id {} via {} dev eth0 proto 80",
            1000 + i,
            r.node_addr
        )?;
    }
    for (i, r) in routes.iter().enumerate() {
        writeln!(batch, "route add {} nhid {} proto 80", r.cidr, 1000 + i)?;
    }
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), batch)?;
    let t = Instant::now();
    ns.ip(&["-batch", &file.path().to_string_lossy()])?;
    let d = t.elapsed();
    // Routes first, then the nexthops (see time_upsert).
    let mut undo = String::new();
    for r in routes {
        writeln!(undo, "route del {} proto 80", r.cidr)?;
    }
    std::fs::write(file.path(), undo)?;
    ns.ip(&["-batch", &file.path().to_string_lossy()])?;
    ns.ip(&["nexthop", "flush"])?;
    Ok(d)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

#[tokio::test]
#[ignore = "benchmark: cargo xtask bench install"]
async fn bench_install() -> anyhow::Result<()> {
    if !require_root("bench_install") {
        return Ok(());
    }
    let sizes: Vec<u32> = std::env::var("PODMESH_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .map(|s| s.trim().parse().context("PODMESH_BENCH_SIZES"))
        .collect::<Result<_, _>>()?;
    let bpffs = Bpffs::new()?;
    let mut table = String::from(
        "| remote nodes | ebpf LPM map only | ebpf LPM + owners maps | ebpf maps+routes | direct (nexthops) | vxlan (nh+neigh+fdb) | ip -batch (nexthops) | direct / ip -batch | withdraw all: ebpf / direct / vxlan |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for n in sizes {
        let routes: Vec<RemoteRoute> = (0..n).map(remote).collect();
        let (lpm, owners) = time_map(&routes, &bpffs).await?;
        let (ebpf, ebpf_rm) = time_upsert(DatapathMode::Ebpf, &routes, &bpffs).await?;
        let (direct, direct_rm) = time_upsert(DatapathMode::Direct, &routes, &bpffs).await?;
        let (vxlan, vxlan_rm) = time_upsert(DatapathMode::Vxlan, &routes, &bpffs).await?;
        let batch = time_ip_batch(&routes)?;
        writeln!(
            table,
            "| {n} | {} | {} | {} | {} | {} | {} | {:.2} | {} / {} / {} |",
            secs(lpm),
            secs(lpm + owners),
            secs(ebpf),
            secs(direct),
            secs(vxlan),
            secs(batch),
            direct.as_secs_f64() / batch.as_secs_f64(),
            secs(ebpf_rm),
            secs(direct_rm),
            secs(vxlan_rm)
        )?;
        eprintln!("{}", table.lines().last().unwrap_or_default());
    }
    println!("\n{table}");
    let mut masq = String::from(
        "| remote Pod CIDRs | exemption add (nft set) | read back (resync) | withdraw all | peer: iptables-restore, a rule per CIDR | add / peer |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for n in std::env::var("PODMESH_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse::<u32>().ok())
    {
        let routes: Vec<RemoteRoute> = (0..n).map(remote).collect();
        let [add, check, withdraw, peer] = time_exemption(&routes)?;
        writeln!(
            masq,
            "| {n} | {} | {} | {} | {} | {:.2} |",
            secs(add),
            secs(check),
            secs(withdraw),
            secs(peer),
            add.as_secs_f64() / peer.as_secs_f64()
        )?;
        eprintln!("{}", masq.lines().last().unwrap_or_default());
    }
    println!("\n{masq}");
    Ok(())
}

/// Two namespaces joined by one veth pair: the upper bound.
struct Baseline {
    a: NetNs,
    b: NetNs,
}

fn baseline() -> anyhow::Result<Baseline> {
    let a = NetNs::new("base-a")?;
    let b = NetNs::new("base-b")?;
    a.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        b.name(),
    ])?;
    a.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"])?;
    b.ip(&["addr", "add", "10.99.0.2/24", "dev", "eth0"])?;
    a.ip(&["link", "set", "eth0", "up"])?;
    b.ip(&["link", "set", "eth0", "up"])?;
    Ok(Baseline { a, b })
}

struct Figures {
    gbps: f64,
    rtt_ms: f64,
    /// TCP segments the sender retransmitted.
    retransmits: f64,
    /// RCU softirqs per second on the whole machine during the transfer:
    /// what the external (collect_md) device's per-packet metadata dst costs
    /// shows up as (it is freed through RCU).
    rcu_per_s: f64,
    /// CPU seconds the whole machine was busy (user, system, softirq: both
    /// ends of the transfer, and the userspace WireGuard where it runs) per
    /// GB received.
    cpu_s_per_gb: f64,
}

/// Busy and total CPU time of the machine so far, in clock ticks (`/proc/stat`).
fn cpu_ticks() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat without a cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Ok((total - idle, total))
}

/// The machine's RCU softirq count so far, all CPUs (`/proc/softirqs`).
fn rcu_softirqs() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/softirqs")?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("RCU:"))
        .context("/proc/softirqs without an RCU line")?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse::<u64>().ok())
        .sum())
}

fn measure(from: &NetNs, to: &NetNs, addr: &str, seconds: u32) -> anyhow::Result<Figures> {
    let mut server = podmesh_tests::flow::iperf3_server(to)?;
    let t = seconds.to_string();
    let rcu_before = rcu_softirqs()?;
    let (busy_before, _) = cpu_ticks()?;
    let started = std::time::Instant::now();
    let out = from.run("iperf3", &["-c", addr, "-p", "5201", "-t", &t, "-J"])?;
    let rcu_per_s =
        rcu_softirqs()?.saturating_sub(rcu_before) as f64 / started.elapsed().as_secs_f64();
    let busy_s = cpu_ticks()?.0.saturating_sub(busy_before) as f64 / clock_ticks_per_s();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received")?;
    let retransmits = json["end"]["sum_sent"]["retransmits"]
        .as_f64()
        .context("iperf3 JSON without end.sum_sent.retransmits")?;
    let bytes = json["end"]["sum_received"]["bytes"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bytes")?;
    let ping = from.run("ping", &["-n", "-q", "-c", "200", "-i", "0.005", addr])?;
    let rtt = ping
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .context("ping summary")?;
    Ok(Figures {
        gbps: bps / 1e9,
        rtt_ms: rtt,
        retransmits,
        rcu_per_s,
        cpu_s_per_gb: busy_s / (bytes / 1e9),
    })
}

/// `sysconf(_SC_CLK_TCK)`: 100 on Linux for every architecture podmesh runs on.
fn clock_ticks_per_s() -> f64 {
    100.0
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Every round's figures of one path.
struct Samples {
    name: String,
    rounds: Vec<Figures>,
}

impl Samples {
    /// One figure of every round.
    fn each(&self, figure: impl Fn(&Figures) -> f64) -> Vec<f64> {
        self.rounds.iter().map(figure).collect()
    }
}

#[tokio::test]
#[ignore = "benchmark: cargo xtask bench datapath"]
async fn bench_datapath() -> anyhow::Result<()> {
    if !require_root("bench_datapath") {
        return Ok(());
    }
    let rounds: usize = env_or("PODMESH_BENCH_ROUNDS", 5).max(1);
    let seconds: u32 = env_or("PODMESH_BENCH_SECONDS", 10).max(1);
    let modes = [
        DatapathMode::Ebpf,
        DatapathMode::Vxlan,
        DatapathMode::Direct,
    ];
    let mut meshes = Vec::new();
    for mode in modes {
        let mut mesh = Mesh::build(mode)?;
        mesh.resync_all().await?;
        let failed = mesh.cross_cluster_failures(None);
        if !failed.is_empty() {
            bail!("{mode:?}: not connected: {failed:?}");
        }
        meshes.push(mesh);
    }
    // Encrypted: WireGuard between the clusters, the userspace process
    // (this kernel has none), beside vxlan: podmesh's own packet loop, and
    // gotatun's device (`--packet-loop gotatun`) to compare it with.
    // PODMESH_BENCH_WG_LOOPS: which, as `loop[:threads]`, comma-separated.
    let loops = std::env::var("PODMESH_BENCH_WG_LOOPS").unwrap_or_else(|_| "own,gotatun".into());
    let mut wg_names = Vec::new();
    for which in loops.split(',').filter(|l| !l.is_empty()) {
        let (packet_loop, threads) = which.split_once(':').unwrap_or((which, "2"));
        let mut wg = Mesh::without_datapaths(
            DatapathMode::Vxlan,
            &[
                podmesh_tests::topo::ClusterPlan::new("east", "10.1.0.0/16", 2, 2),
                podmesh_tests::topo::ClusterPlan::new("west", "10.2.0.0/16", 2, 2),
            ],
            podmesh_agent::model::UnderlayFamily::Ipv4,
            Some(podmesh_agent::config::WireguardBackend::Userspace),
        )?;
        // The process is started by the datapath, with the arguments the
        // agent gives it: the packet loop goes through its environment.
        let bin = podmesh_tests::mesh::workspace_binary("podmesh-wireguard", "podmesh-wireguard")?;
        let wrapper = wg.wg_dir.path().join("podmesh-wireguard");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nPODMESH_WIREGUARD_PACKET_LOOP={packet_loop} PODMESH_WIREGUARD_THREADS={threads} exec {} \"$@\"\n",
                bin.display()
            ),
        )?;
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        wg.wg_binary = Some(wrapper);
        wg.build_datapaths()?;
        wg.resync_all().await?;
        let failed = wg.cross_cluster_failures(None);
        if !failed.is_empty() {
            bail!("wireguard ({packet_loop}): not connected: {failed:?}");
        }
        let backend = wg.dps[0]
            .wireguard()
            .map(|h| h.status().backend)
            .unwrap_or_default();
        wg_names.push(format!(
            "wireguard ({backend}, {packet_loop} loop, {threads} thread{})",
            if threads == "1" { "" } else { "s" }
        ));
        meshes.push(wg);
    }
    let base = baseline()?;
    // The pod pair of each path; the last is the plain veth pair.
    let mut paths: Vec<(&NetNs, &NetNs, String)> = meshes
        .iter()
        .map(|mesh| {
            let from = &mesh.topo.nodes[mesh.index("east-n0")].pods[0];
            let to = &mesh.topo.nodes[mesh.index("west-n0")].pods[0];
            (&from.ns, &to.ns, to.addr.to_string())
        })
        .collect();
    paths.push((&base.a, &base.b, "10.99.0.2".to_string()));
    let mut samples: Vec<Samples> = modes
        .iter()
        .map(|m| format!("{m:?}").to_lowercase())
        .chain(wg_names)
        .chain(["plain veth".to_string()])
        .map(|name| Samples {
            name,
            rounds: Vec::new(),
        })
        .collect();
    // Paths interleaved, and the order rotated every round, so that neither
    // load from other work on the machine nor a position in the round (first
    // after a pause, last after three runs) favours one path.
    for round in 0..rounds {
        for k in 0..paths.len() {
            let k = (k + round) % paths.len();
            let (from, to, addr) = &paths[k];
            samples[k].rounds.push(measure(from, to, addr, seconds)?);
        }
        let line: Vec<String> = samples
            .iter()
            .map(|s| {
                format!(
                    "{} {:.2}",
                    s.name,
                    s.rounds.last().map(|f| f.gbps).unwrap_or_default()
                )
            })
            .collect();
        eprintln!(
            "round {} of {rounds}: {} Gbit/s",
            round + 1,
            line.join(", ")
        );
    }
    let vxlan_gbps = samples[1].each(|f| f.gbps);
    let vxlan = (median(&vxlan_gbps), median(&samples[1].each(|f| f.rtt_ms)));
    let veth = median(&samples[samples.len() - 1].each(|f| f.gbps));
    let mut table = String::from(
        "| path (pod east-n0 -> pod west-n0) | TCP Gbit/s median | best | worst | ping avg RTT ms median | throughput vs vxlan | throughput vs veth | RTT vs vxlan | throughput vs vxlan, median of rounds | retransmits median | RCU softirqs/s median | CPU s per GB median |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in &samples {
        let all_gbps = s.each(|f| f.gbps);
        let gbps = median(&all_gbps);
        let rtt = median(&s.each(|f| f.rtt_ms));
        let best = all_gbps.iter().copied().fold(f64::MIN, f64::max);
        let worst = all_gbps.iter().copied().fold(f64::MAX, f64::min);
        // Paired: each round's figure against vxlan's in the same round,
        // which a load that comes and goes over the run moves less than
        // the ratio of the medians.
        let paired: Vec<f64> = all_gbps
            .iter()
            .zip(&vxlan_gbps)
            .map(|(g, v)| g / v)
            .collect();
        writeln!(
            table,
            "| {} | {gbps:.2} | {best:.2} | {worst:.2} | {rtt:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2} |",
            s.name,
            gbps / vxlan.0,
            gbps / veth,
            rtt / vxlan.1,
            median(&paired),
            median(&s.each(|f| f.retransmits)),
            median(&s.each(|f| f.rcu_per_s)),
            median(&s.each(|f| f.cpu_s_per_gb))
        )?;
    }
    println!(
        "\n{rounds} rounds (paths interleaved, order rotated), iperf3 -t {seconds}, 200 pings at 5 ms; ratios of medians\n{table}"
    );
    Ok(())
}

/// Each mode over an IPv6-only underlay next to the same mode over an IPv4
/// underlay, same run, same topology (2 clusters × 2 nodes × 2 pods), IPv4
/// pod traffic: what the IPv6 underlay costs (VXLAN over IPv6: 20 more
/// header bytes, route MTU 1430 instead of 1450).
#[tokio::test]
#[ignore = "benchmark: cargo xtask bench datapath --ip-family ipv6"]
async fn bench_datapath_ipv6_underlay() -> anyhow::Result<()> {
    use podmesh_agent::model::UnderlayFamily;
    use podmesh_tests::topo::{ClusterPlan, Underlay};

    if !require_root("bench_datapath_ipv6_underlay") {
        return Ok(());
    }
    let rounds: usize = env_or("PODMESH_BENCH_ROUNDS", 5).max(1);
    let seconds: u32 = env_or("PODMESH_BENCH_SECONDS", 10).max(1);
    let modes = [
        DatapathMode::Ebpf,
        DatapathMode::Vxlan,
        DatapathMode::Direct,
    ];
    let plans = |u: Underlay| {
        [
            ClusterPlan::new("east", "10.1.0.0/16", 2, 2).with_underlay(u),
            ClusterPlan::new("west", "10.2.0.0/16", 2, 2).with_underlay(u),
        ]
    };
    // Per mode: the IPv4 underlay, then the IPv6-only one.
    let mut meshes = Vec::new();
    for mode in modes {
        for (u, family) in [
            (Underlay::Ipv4, UnderlayFamily::Ipv4),
            (Underlay::Ipv6, UnderlayFamily::Ipv6),
        ] {
            let mut mesh = Mesh::with_underlay(mode, &plans(u), family)?;
            mesh.resync_all().await?;
            let failed = mesh.cross_cluster_failures(None);
            if !failed.is_empty() {
                bail!("{mode:?} over {family}: not connected: {failed:?}");
            }
            meshes.push(mesh);
        }
    }
    let paths: Vec<(&NetNs, &NetNs, String)> = meshes
        .iter()
        .map(|mesh| {
            let from = &mesh.topo.nodes[mesh.index("east-n0")].pods[0];
            let to = &mesh.topo.nodes[mesh.index("west-n0")].pods[0];
            (&from.ns, &to.ns, to.addr.to_string())
        })
        .collect();
    let mut samples: Vec<Samples> = modes
        .iter()
        .flat_map(|m| {
            let m = format!("{m:?}").to_lowercase();
            [format!("{m} over IPv4"), format!("{m} over IPv6")]
        })
        .map(|name| Samples {
            name,
            rounds: Vec::new(),
        })
        .collect();
    for round in 0..rounds {
        for k in 0..paths.len() {
            let k = (k + round) % paths.len();
            let (from, to, addr) = &paths[k];
            samples[k].rounds.push(measure(from, to, addr, seconds)?);
        }
        let line: Vec<String> = samples
            .iter()
            .map(|s| {
                format!(
                    "{} {:.2}",
                    s.name,
                    s.rounds.last().map(|f| f.gbps).unwrap_or_default()
                )
            })
            .collect();
        eprintln!(
            "round {} of {rounds}: {} Gbit/s",
            round + 1,
            line.join(", ")
        );
    }
    let mut table = String::from(
        "| mode | IPv4 underlay Gbit/s median | IPv6 underlay Gbit/s median | throughput IPv6/IPv4 | throughput IPv6/IPv4, median of rounds | IPv4 RTT ms | IPv6 RTT ms | RTT IPv6/IPv4 | retransmits IPv4 / IPv6 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, mode) in modes.iter().enumerate() {
        let (v4, v6) = (&samples[2 * i], &samples[2 * i + 1]);
        let (g4, g6) = (v4.each(|f| f.gbps), v6.each(|f| f.gbps));
        let (r4, r6) = (
            median(&v4.each(|f| f.rtt_ms)),
            median(&v6.each(|f| f.rtt_ms)),
        );
        let paired: Vec<f64> = g6.iter().zip(&g4).map(|(a, b)| a / b).collect();
        writeln!(
            table,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {r4:.3} | {r6:.3} | {:.2} | {:.0} / {:.0} |",
            format!("{mode:?}").to_lowercase(),
            median(&g4),
            median(&g6),
            median(&g6) / median(&g4),
            median(&paired),
            r6 / r4,
            median(&v4.each(|f| f.retransmits)),
            median(&v6.each(|f| f.retransmits)),
        )?;
    }
    println!(
        "\n{rounds} rounds (paths interleaved, order rotated), iperf3 -t {seconds}, 200 pings at 5 ms, IPv4 pod traffic; ratios of medians\n{table}"
    );
    Ok(())
}
