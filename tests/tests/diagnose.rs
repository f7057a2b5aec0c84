//! `podmesh diagnose` against a real mesh (two clusters, real agents on the
//! ebpf datapath, mesh etcds with mTLS, proxies): a healthy mesh diagnoses
//! clean; each broken link is found in its layer, naming the cluster or
//! CIDR, with a fix. And `podmesh plan check --from-clustermesh` auditing
//! real etcds that hold Cilium's node records (both CIDR encodings).
//!
//! The broken Secrets are copies of the east cluster's Secret directory
//! handed to `diagnose --clustermesh-config`, so the agents keep running on
//! the good one; the broken kernel state (a route deleted by hand, a
//! firewall rule, a WireGuard peer changed by hand) and the overlapping
//! record are made live. Also the vxlan and direct datapaths, IPv6 Pod
//! CIDRs over an IPv6 underlay, and WireGuard between the clusters.
use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, ensure};
use aya::maps::{LpmTrie, MapData};
use podmesh_agent::{
    datapath::wireguard::{
        genl as wg_genl,
        uapi::{self as wg_uapi, PeerChange},
    },
    model::parse_wireguard_key,
};
use podmesh_common::{REMOTES_V4_MAP, RemoteNode};
use podmesh_tests::{
    describe_output,
    etcd::{Etcd, write_client_config},
    eventually,
    mesh::{Mesh, workspace_binary},
    pki::{CertSpec, Pki},
    require_root,
    topo::Underlay,
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(90);

/// The JSON report and exit status of `podmesh diagnose args…` on `node`.
fn diagnose(m: &Mesh, node: &str, args: &[&str]) -> anyhow::Result<(i32, Value)> {
    let mut all = vec!["diagnose", "-o", "json", "--timeout", "3s"];
    all.extend(args);
    let out = m.podmesh(node, &all)?;
    let code = out.status.code().unwrap_or(-1);
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("not a JSON report: {}", describe_output(&out)))?;
    Ok((code, v))
}

/// The failed checks of a report, as (layer, cluster, check, evidence, fix).
fn failures(v: &Value) -> Vec<(String, String, String, String, String)> {
    let s = |c: &Value, k: &str| c[k].as_str().unwrap_or("").to_string();
    v["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["ok"] == false && c["severity"] == "error")
        .map(|c| {
            (
                s(c, "layer"),
                s(c, "cluster"),
                s(c, "check"),
                s(c, "evidence"),
                s(c, "fix"),
            )
        })
        .collect()
}

/// The one failure of `cluster` in the report: in `layer`, by `check`, its
/// evidence naming `needle`, with a fix.
fn expect_failure(
    v: &Value,
    cluster: &str,
    layer: &str,
    check: &str,
    needle: &str,
) -> anyhow::Result<()> {
    let f: Vec<_> = failures(v).into_iter().filter(|f| f.1 == cluster).collect();
    ensure!(
        f.len() == 1,
        "expected one failure of {cluster}, got {f:#?}\n{v:#}"
    );
    let (l, _, c, evidence, fix) = &f[0];
    ensure!(
        l == layer && c == check,
        "expected {layer}/{check}, got {l}/{c}: {evidence}"
    );
    ensure!(
        evidence.contains(needle),
        "{layer}/{check} evidence does not name {needle:?}: {evidence}"
    );
    ensure!(!fix.is_empty(), "{layer}/{check} has no fix");
    // The walk stopped there: no check of a later layer ran for the cluster.
    let order = ["config", "reach", "authz", "sync", "datapath", "plan"];
    let at = order.iter().position(|x| *x == layer).unwrap_or(0);
    let later: Vec<&Value> = v["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["cluster"] == cluster)
        .filter(|c| order.iter().position(|x| c["layer"] == *x).unwrap_or(0) > at)
        .collect();
    ensure!(
        later.is_empty(),
        "checks after the failure in {layer}: {later:#?}"
    );
    Ok(())
}

/// Runs the nftables `script` in the network namespace `ns`.
fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            c.wait_with_output()
        })?;
    ensure!(out.status.success(), "nft: {}", describe_output(&out));
    Ok(())
}

/// Diagnoses from `node` while the network namespace `ns` drops what
/// `rule` matches on input (an nftables table of `family`, removed again
/// before the report is looked at, whatever it says).
fn diagnose_while_dropping(
    m: &Mesh,
    node: &str,
    ns: &str,
    family: &str,
    rule: &str,
) -> anyhow::Result<(i32, Value)> {
    nft(
        ns,
        &format!(
            "table {family} pmdiagtest {{\n chain input {{\n type filter hook input priority -10;\n {rule} drop\n }}\n}}\n"
        ),
    )?;
    let res = diagnose(m, node, &[]);
    nft(ns, &format!("delete table {family} pmdiagtest\n"))?;
    res
}

/// The checks of `cluster` named `check` that passed, by their evidence.
fn passed(v: &Value, cluster: &str, check: &str) -> Vec<String> {
    v["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["cluster"] == cluster && c["check"] == check && c["ok"] == true)
        .map(|c| c["evidence"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The probe of `cidr` answered, through `path` ("the tunnel", "WireGuard").
fn probe_answered(v: &Value, cidr: &str, path: &str) -> anyhow::Result<()> {
    let ok = passed(v, "west", "tunnel-probe");
    ensure!(
        ok.iter().any(|e| e.contains(&format!("({cidr})"))
            && e.contains("answered")
            && e.contains(&format!("through {path}"))),
        "no answered probe of {cidr} through {path}: {ok:#?}\n{v:#}"
    );
    Ok(())
}

/// A copy of `src` (a Secret directory: the visible files, resolved) with
/// `changes` applied (name → content; `None` removes).
fn secret_copy(src: &Path, dst: &Path, changes: &[(&str, Option<Vec<u8>>)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("..") {
            continue;
        }
        std::fs::write(dst.join(&name), std::fs::read(e.path())?)?;
    }
    for (name, content) in changes {
        match content {
            Some(c) => std::fs::write(dst.join(name), c)?,
            None => std::fs::remove_file(dst.join(name))?,
        }
    }
    Ok(())
}

#[test]
fn diagnose_a_healthy_mesh_then_each_broken_link_in_its_layer() -> anyhow::Result<()> {
    if !require_root("diagnose_a_healthy_mesh_then_each_broken_link_in_its_layer") {
        return Ok(());
    }
    // A long resync: a route deleted by hand stays deleted while we look.
    let mut m = Mesh::builder()
        .cluster("east", 1)
        .cluster("west", 1)
        .pods(1)
        .agent_args(&["--resync-interval", "1h"])
        .start()?;
    m.wait_ready(READY)?;
    let east = "east-n0";
    let cps = m.control_planes();
    let west_cp = cps.iter().find(|c| c.cluster == "west").context("west")?;
    let east_secret = cps
        .iter()
        .find(|c| c.cluster == "east")
        .context("east")?
        .secret_dir
        .clone();
    let west_node = m.node("west-n0")?;
    let west_cidr = west_node.pod_cidr.to_string();
    let east_cidr = m.node(east)?.pod_cidr.to_string();

    // 1. Healthy: every layer passes for west, exit 0, the probe answered.
    let (code, v) = eventually(Duration::from_secs(30), || {
        let (code, v) = diagnose(&m, east, &[]).map_err(|e| format!("{e:#}"))?;
        if code == 0 {
            Ok((code, v))
        } else {
            Err(format!("exit {code}: {:#?}", failures(&v)))
        }
    })?;
    ensure!(code == 0 && v["ok"] == true, "{v:#}");
    let started = std::time::Instant::now();
    let table = m.podmesh(east, &["diagnose"])?;
    eprintln!(
        "{}(podmesh diagnose took {:.0?})",
        String::from_utf8_lossy(&table.stdout),
        started.elapsed()
    );
    ensure!(table.status.success(), "{}", describe_output(&table));
    for (layer, check) in [
        ("config", "cert-expiry"),
        ("reach", "tls-handshake"),
        ("authz", "read"),
        ("authz", "write-refused"),
        ("sync", "synced"),
        ("datapath", "entries"),
        ("datapath", "tunnel-probe"),
        ("plan", "plan"),
    ] {
        ensure!(
            v["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["cluster"] == "west"
                    && c["layer"] == layer
                    && c["check"] == check
                    && c["ok"] == true),
            "no passed {layer}/{check} for west: {v:#}"
        );
    }

    // 1b. Without CAP_NET_RAW the probe uses the kernel's ping socket when
    // ping_group_range allows this group, and is skipped (saying why) when not.
    let probe_without_net_raw = |m: &Mesh| -> anyhow::Result<(i32, Value)> {
        let cli = workspace_binary("podmesh-agent", "podmesh")?;
        let out = m
            .node(east)?
            .ns
            .command("setpriv")
            .args(["--bounding-set", "-net_raw"])
            .arg(&cli)
            .args(["diagnose", "-o", "json", "--timeout", "3s"])
            .output()?;
        let v: Value =
            serde_json::from_slice(&out.stdout).with_context(|| describe_output(&out))?;
        Ok((out.status.code().unwrap_or(-1), v))
    };
    let probe_of = |v: &Value| -> anyhow::Result<String> {
        let c = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "tunnel-probe")
            .context("no tunnel-probe")?;
        ensure!(c["ok"] == true, "{c:#}");
        Ok(c["evidence"].as_str().unwrap_or("").to_string())
    };
    let ns = &m.node(east)?.ns;
    ns.sysctl("net.ipv4.ping_group_range", "1 0")?;
    let (code, v) = probe_without_net_raw(&m)?;
    let ev = probe_of(&v)?;
    ensure!(
        code == 0 && ev.starts_with("skipped") && ev.contains("CAP_NET_RAW"),
        "exit {code}: {ev}"
    );
    ns.sysctl("net.ipv4.ping_group_range", "0 0")?;
    let (code, v) = probe_without_net_raw(&m)?;
    let ev = probe_of(&v)?;
    ensure!(code == 0 && ev.contains("answered"), "exit {code}: {ev}");
    ns.sysctl("net.ipv4.ping_group_range", "1 0")?;

    let tmp = tempfile::tempdir()?;
    // 2. A foreign CA in west's entry: the server's certificate is not trusted.
    let foreign = Pki::new("foreign")?;
    let dir = tmp.path().join("foreign-ca");
    secret_copy(
        &east_secret,
        &dir,
        &[("west.ca.crt", Some(std::fs::read(foreign.ca())?))],
    )?;
    let (code, v) = diagnose(&m, east, &["--clustermesh-config", dir.to_str().unwrap()])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(&v, "west", "reach", "tls-handshake", "foreign")?;

    // 3. An expired client certificate.
    let expired = foreign.issue(&CertSpec {
        name: "east-agents",
        file: Some("expired"),
        sans: vec![],
        server: false,
        client: true,
        expired: true,
    })?;
    let dir = tmp.path().join("expired");
    secret_copy(
        &east_secret,
        &dir,
        &[
            ("west.client.crt", Some(std::fs::read(&expired.cert)?)),
            ("west.client.key", Some(std::fs::read(&expired.key)?)),
        ],
    )?;
    let (code, v) = diagnose(&m, east, &["--clustermesh-config", dir.to_str().unwrap()])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(&v, "west", "config", "cert-expiry", "expired")?;

    // 3b. A valid client certificate of a CA west's proxy does not accept:
    // refused, with the CAs the server accepts and the certificate's issuer.
    let stranger = foreign.client("east-agents")?;
    let dir = tmp.path().join("stranger");
    secret_copy(
        &east_secret,
        &dir,
        &[
            ("west.client.crt", Some(std::fs::read(&stranger.cert)?)),
            ("west.client.key", Some(std::fs::read(&stranger.key)?)),
        ],
    )?;
    let (code, v) = diagnose(&m, east, &["--clustermesh-config", dir.to_str().unwrap()])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(
        &v,
        "west",
        "reach",
        "tls-handshake",
        "accepts client certificates issued by: \"CN=podmesh test CA west proxy\"",
    )?;
    expect_failure(
        &v,
        "west",
        "reach",
        "tls-handshake",
        "cert-file is issued by \"CN=podmesh test CA foreign\"",
    )?;

    // 4. An endpoint where nothing listens.
    let dead = format!("https://{}:2399", west_cp.address);
    let yaml =
        std::fs::read_to_string(east_secret.join("west"))?.replace(&west_cp.proxy_endpoint, &dead);
    let dir = tmp.path().join("dead");
    secret_copy(&east_secret, &dir, &[("west", Some(yaml.into_bytes()))])?;
    let (code, v) = diagnose(&m, east, &["--clustermesh-config", dir.to_str().unwrap()])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(&v, "west", "reach", "tcp", "2399")?;

    // 5. An endpoint that accepts writes: west's mesh etcd itself, with
    // the read-write credentials of west's agents.
    let west_kv = west_cp
        .secret_dir
        .parent()
        .context("west's dir")?
        .join("kvstore.yaml");
    let dir = tmp.path().join("writable");
    secret_copy(
        &east_secret,
        &dir,
        &[("west", Some(std::fs::read(&west_kv)?))],
    )?;
    let (code, v) = diagnose(&m, east, &["--clustermesh-config", dir.to_str().unwrap()])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(&v, "west", "authz", "write-refused", "accepted a write")?;
    let probe = m.etcdctl("west", &["get", "podmesh/v1/diagnose-write-probe"])?;
    ensure!(probe.trim().is_empty(), "the write probe wrote: {probe}");

    // 6. The agent cannot be reached: exit 1, and the checks that need no agent ran.
    let (code, v) = diagnose(
        &m,
        east,
        &[
            "--addr",
            "127.0.0.1:1",
            "--clustermesh-config",
            east_secret.to_str().unwrap(),
        ],
    )?;
    ensure!(code == 1, "exit {code}");
    let f = failures(&v);
    ensure!(f.len() == 1 && f[0].2 == "agent", "{f:#?}");
    ensure!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["cluster"] == "west" && c["check"] == "write-refused" && c["ok"] == true),
        "authz did not run without the agent: {v:#}"
    );

    // 7. West's node drops tunnel traffic (a firewall rule in its namespace).
    let wns = west_node.ns.name().to_string();
    let (code, v) = diagnose_while_dropping(&m, east, &wns, "inet", "udp dport 8472")?;
    ensure!(code == 1, "exit {code}");
    expect_failure(&v, "west", "datapath", "tunnel-probe", &west_cidr)?;

    // 8. An overlapping record: west publishes a node claiming east-n0's Pod CIDR.
    let rogue = serde_json::json!({"name": "rogue", "cluster": "west", "clusterID": 2,
        "addresses": ["172.31.2.99"], "podCIDRs": [east_cidr], "vtepMAC": "02:00:00:00:00:99"});
    m.put_raw("west", "podmesh/v1/nodes/west/rogue", &rogue.to_string())?;
    let v = eventually(Duration::from_secs(30), || {
        let (_, v) = diagnose(&m, east, &[]).map_err(|e| format!("{e:#}"))?;
        let seen = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "rejected-record");
        if seen {
            Ok(v)
        } else {
            Err(format!("{:#?}", failures(&v)))
        }
    })?;
    // The audit of east's Secret (west, through its read-only proxy) sees it too.
    let audit = |m: &Mesh| -> anyhow::Result<(i32, Value)> {
        let out = m.podmesh(
            east,
            &[
                "plan",
                "check",
                "--from-clustermesh",
                east_secret.to_str().unwrap(),
                "-o",
                "json",
            ],
        )?;
        let v: Value =
            serde_json::from_slice(&out.stdout).with_context(|| describe_output(&out))?;
        Ok((out.status.code().unwrap_or(-1), v))
    };
    let (code, a) = audit(&m)?;
    let outside = a["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "node-pod-cidr-outside-cluster")
        .cloned()
        .unwrap_or_default();
    ensure!(
        code == 1 && outside["cidrs"][0] == east_cidr.as_str() && outside["clusters"][0] == "west",
        "exit {code}: {a:#}"
    );
    m.delete_raw("west", "podmesh/v1/nodes/west/rogue")?;
    let (code, a) = audit(&m)?;
    ensure!(
        code == 0 && a["summary"]["clusters"] == 1,
        "exit {code}: {a:#}"
    );
    expect_failure(&v, "west", "plan", "plan", &east_cidr)?;
    let rejected = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "rejected-record")
        .unwrap();
    ensure!(
        rejected["cluster"] == "west"
            && rejected["evidence"]
                .as_str()
                .unwrap()
                .contains("pod-cidr-overlap"),
        "{rejected:#}"
    );

    // 9. The LPM map entry of west's node deleted by hand, then its route,
    // before a resync repairs them.
    let data = MapData::from_pin(m.bpf_pin_dir(east).join(REMOTES_V4_MAP))?;
    let mut map: LpmTrie<MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    let cidr = west_node.pod_cidr;
    map.remove(&aya::maps::lpm_trie::Key::new(
        u32::from(cidr.prefix_len()),
        cidr.network().octets(),
    ))?;
    let (code, v) = diagnose(&m, east, &[])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(
        &v,
        "west",
        "datapath",
        "entries",
        &format!("{west_cidr} (node west-n0): no entry in the LPM map"),
    )?;
    m.node(east)?
        .ns
        .ip(&["route", "del", &west_cidr, "proto", "80"])?;
    let (code, v) = diagnose(&m, east, &[])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(
        &v,
        "west",
        "datapath",
        "entries",
        &format!("{west_cidr} (node west-n0): no route"),
    )?;
    // The table says the same, with the fix.
    let out = m.podmesh(east, &["diagnose", "--timeout", "3s"])?;
    let t = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1)
            && t.contains("FAIL")
            && t.contains("fix: ")
            && t.contains(&west_cidr),
        "{t}"
    );
    Ok(())
}

/// A Cilium ClusterMesh audited live: two etcds with Cilium's node records
/// (both CIDR encodings), one overlap and one hijack; nothing is written.
#[test]
fn plan_check_audits_cilium_records_in_a_live_mesh() -> anyhow::Result<()> {
    if !require_root("plan_check_audits_cilium_records_in_a_live_mesh") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let east = Etcd::start_with(Arc::new(Pki::new("cilium-east")?), "cilium-east")?;
    let west = Etcd::start_with(Arc::new(Pki::new("cilium-west")?), "cilium-west")?;
    let node = |cluster: &str, id: u32, name: &str, cidr: Value| {
        serde_json::json!({"Name": name, "Cluster": cluster, "ClusterID": id,
            "IPAddresses": [{"Type": "InternalIP", "IP": "192.168.0.1"}],
            "IPv4AllocCIDR": cidr, "IPv6AllocCIDR": null, "BootID": "b"})
        .to_string()
    };
    let records = [
        (
            &east,
            "east",
            node(
                "east",
                1,
                "e1",
                serde_json::json!({"IP": "10.6.6.0", "Mask": "////AA=="}),
            ),
        ),
        (
            &east,
            "east",
            node("east", 1, "e2", serde_json::json!("10.6.7.0/24")),
        ),
        (
            &west,
            "west",
            node("west", 2, "w1", serde_json::json!("10.6.6.0/24")),
        ),
        (
            &west,
            "west",
            node(
                "west",
                2,
                "w2",
                serde_json::json!({"IP": "10.6.7.128", "Mask": "////gA=="}),
            ),
        ),
        (
            &west,
            "west",
            node("west", 2, "w3", serde_json::json!("10.8.0.0/24")),
        ),
    ];
    let revisions = rt.block_on(async {
        for (etcd, cluster, value) in &records {
            let name = serde_json::from_str::<Value>(value)?["Name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            etcd.connect()
                .await?
                .put(
                    format!("cilium/state/nodes/v1/{cluster}/{name}"),
                    value.as_str(),
                    None,
                )
                .await?;
        }
        let mut revs = Vec::new();
        for e in [&east, &west] {
            revs.push(
                e.connect()
                    .await?
                    .get("x", None)
                    .await?
                    .header()
                    .map_or(0, |h| h.revision()),
            );
        }
        anyhow::Ok(revs)
    })?;
    let dir = tempfile::tempdir()?;
    for (e, name) in [(&east, "east"), (&west, "west")] {
        write_client_config(
            &dir.path().join(name),
            &[e.endpoint()],
            e.pki().ca(),
            e.root_client(),
        )?;
    }
    let cli = workspace_binary("podmesh-agent", "podmesh")?;
    let out = std::process::Command::new(&cli)
        .args(["plan", "check", "--from-clustermesh"])
        .arg(dir.path())
        .args(["-o", "json"])
        .output()?;
    ensure!(out.status.code() == Some(1), "{}", describe_output(&out));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let findings = v["findings"].as_array().context("findings")?;
    let find = |code: &str| {
        findings
            .iter()
            .filter(|f| f["code"] == code)
            .collect::<Vec<_>>()
    };
    let overlap = find("pod-cidr-overlap");
    ensure!(overlap.len() == 1, "{v:#}");
    ensure!(
        overlap[0]["cidrs"] == serde_json::json!(["10.6.6.0/24"])
            && overlap[0]["clusters"] == serde_json::json!(["east", "west"]),
        "{:#}",
        overlap[0]
    );
    let hijack = find("pod-cidr-hijack");
    ensure!(hijack.len() == 1, "{v:#}");
    ensure!(
        hijack[0]["clusters"] == serde_json::json!(["west", "east"])
            && hijack[0]["cidrs"] == serde_json::json!(["10.6.7.128/25", "10.6.7.0/24"]),
        "{:#}",
        hijack[0]
    );
    ensure!(
        findings.len() == 2,
        "only the overlap and the hijack: {v:#}"
    );
    ensure!(v["summary"]["clusters"] == 2, "{v:#}");
    // Read-only: neither etcd's revision moved.
    let after = rt.block_on(async {
        let mut revs = Vec::new();
        for e in [&east, &west] {
            revs.push(
                e.connect()
                    .await?
                    .get("x", None)
                    .await?
                    .header()
                    .map_or(0, |h| h.revision()),
            );
        }
        anyhow::Ok(revs)
    })?;
    ensure!(
        after == revisions,
        "the audit wrote: revisions {revisions:?} -> {after:?}"
    );
    // The table names both.
    let out = std::process::Command::new(&cli)
        .args(["plan", "check", "--from-clustermesh"])
        .arg(dir.path())
        .output()?;
    let t = String::from_utf8_lossy(&out.stdout);
    ensure!(
        t.contains("pod-cidr-hijack") && t.contains("10.6.6.0/24"),
        "{t}"
    );
    Ok(())
}

/// The vxlan datapath: desired against the routes, nexthops, neighbours and
/// fdb entries it programs, and its tunnel device.
#[test]
fn diagnose_compares_neighbours_and_fdb_in_vxlan_mode() -> anyhow::Result<()> {
    if !require_root("diagnose_compares_neighbours_and_fdb_in_vxlan_mode") {
        return Ok(());
    }
    let mut m = Mesh::builder()
        .cluster("east", 1)
        .cluster("west", 1)
        .pods(1)
        .datapath("vxlan")
        .agent_args(&["--resync-interval", "1h"])
        .start()?;
    m.wait_ready(READY)?;
    let east = "east-n0";
    let (code, v) = eventually(Duration::from_secs(30), || {
        let (code, v) = diagnose(&m, east, &[]).map_err(|e| format!("{e:#}"))?;
        if code == 0 {
            Ok((code, v))
        } else {
            Err(format!("exit {code}: {:#?}", failures(&v)))
        }
    })?;
    ensure!(code == 0, "{v:#}");
    let entries = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "entries" && c["cluster"] == "west")
        .context("entries")?;
    ensure!(
        entries["evidence"]
            .as_str()
            .unwrap()
            .contains("neighbour and fdb"),
        "{entries:#}"
    );
    let west = m.node("west-n0")?;
    let west_addr = west.addr.to_string();
    let west_cidr = west.pod_cidr.to_string();
    // West's VTEP MAC, as east's status has it.
    let s: Value = serde_json::from_str(&m.status(east)?)?;
    let mac = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cluster"] == "west")
        .and_then(|r| r["vtepMAC"].as_str())
        .context("west's vtepMAC")?
        .to_string();
    let ns = &m.node(east)?.ns;
    ns.run(
        "bridge",
        &["fdb", "del", &mac, "dev", "podmesh-vx", "dst", &west_addr],
    )?;
    let (code, v) = diagnose(&m, east, &[])?;
    ensure!(code == 1, "exit {code}");
    expect_failure(
        &v,
        "west",
        "datapath",
        "entries",
        &format!("{west_cidr}: no fdb entry"),
    )?;
    // An underlay narrower than the tunnel device plus VXLAN: a warning.
    ns.ip(&["link", "set", "eth0", "mtu", "1400"])?;
    let (_, v) = diagnose(&m, east, &[])?;
    let w = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "tunnel-mtu")
        .context("no tunnel-mtu")?;
    let ev = w["evidence"].as_str().unwrap_or("");
    ensure!(
        w["ok"] == false
            && w["severity"] == "warning"
            && ev.contains("podmesh-vx has MTU 1450")
            && ev.contains("eth0's MTU 1400"),
        "{w:#}"
    );
    // The tunnel device down: a node-wide failure.
    ns.ip(&["link", "set", "podmesh-vx", "down"])?;
    let (code, v) = diagnose(&m, east, &[])?;
    ensure!(code == 1, "exit {code}");
    let dev = failures(&v)
        .into_iter()
        .find(|f| f.2 == "tunnel-device")
        .context("no tunnel-device failure")?;
    ensure!(
        dev.0 == "datapath" && dev.1.is_empty() && dev.3.contains("podmesh-vx is down"),
        "{dev:?}"
    );
    Ok(())
}

/// A healthy dual-stack mesh diagnoses clean over an IPv6-only underlay
/// (vxlan: routes through the remote VTEPs' link-local addresses; ebpf:
/// IPv6 endpoints in the LPM map; direct), with an ICMPv6 probe of each
/// remote IPv6 Pod CIDR next to the ICMP one of its IPv4 Pod CIDR. A
/// firewall rule on the remote node that drops what the tunnel brings from
/// this node's IPv6 Pod CIDR fails the IPv6 probe alone; one that drops
/// the tunnel's UDP over the IPv6 underlay fails both.
#[test]
fn diagnose_probes_ipv6_pod_cidrs_over_an_ipv6_underlay() -> anyhow::Result<()> {
    if !require_root("diagnose_probes_ipv6_pod_cidrs_over_an_ipv6_underlay") {
        return Ok(());
    }
    let east = "east-n0";
    for datapath in ["vxlan", "ebpf", "direct"] {
        let mut m = Mesh::builder()
            .cluster("east", 1)
            .cluster("west", 1)
            .pods(1)
            .underlay(Underlay::Ipv6)
            .dual_stack_pods()
            .datapath(datapath)
            .start()?;
        m.wait_ready(READY)?;
        let west = m.node("west-n0")?;
        let (west_v4, west_v6) = (
            west.pod_cidr.to_string(),
            west.pod_cidr_v6.context("dual-stack")?.to_string(),
        );
        let v =
            clean(&m, east).with_context(|| format!("{datapath} over an IPv6-only underlay"))?;
        let path = if datapath == "direct" {
            "the direct route"
        } else {
            "the tunnel"
        };
        probe_answered(&v, &west_v4, path).context(datapath)?;
        probe_answered(&v, &west_v6, path).context(datapath)?;
        if datapath != "vxlan" {
            continue;
        }
        // Without CAP_NET_RAW, through the kernel's ICMPv6 ping socket.
        let ns = &m.node(east)?.ns;
        ns.sysctl("net.ipv4.ping_group_range", "0 0")?;
        let out = ns
            .command("setpriv")
            .args(["--bounding-set", "-net_raw"])
            .arg(workspace_binary("podmesh-agent", "podmesh")?)
            .args(["diagnose", "-o", "json", "--timeout", "3s"])
            .output()?;
        ns.sysctl("net.ipv4.ping_group_range", "1 0")?;
        let v: Value =
            serde_json::from_slice(&out.stdout).with_context(|| describe_output(&out))?;
        ensure!(out.status.success(), "{v:#}");
        probe_answered(&v, &west_v6, path).context("through the ping socket")?;
        // West drops the IPv6 pod traffic the tunnel brings from east.
        let wns = west.ns.name().to_string();
        let east_v6 = m.node(east)?.pod_cidr_v6.context("dual-stack")?;
        let (code, v) = diagnose_while_dropping(
            &m,
            east,
            &wns,
            "ip6",
            &format!("ip6 saddr {east_v6} icmpv6 type echo-request"),
        )?;
        ensure!(code == 1, "exit {code}: {v:#}");
        expect_failure(
            &v,
            "west",
            "datapath",
            "tunnel-probe",
            &format!("node west-n0 ({west_v6}"),
        )?;
        probe_answered(&v, &west_v4, "the tunnel")?;
        // West drops the tunnel itself (VXLAN over the IPv6 underlay).
        let (code, v) = diagnose_while_dropping(&m, east, &wns, "ip6", "udp dport 8472")?;
        ensure!(code == 1, "exit {code}: {v:#}");
        let f = failures(&v);
        ensure!(
            f.len() == 2
                && f.iter().all(|(l, c, k, _, fix)| l == "datapath"
                    && c == "west"
                    && k == "tunnel-probe"
                    && fix.contains("UDP 8472"))
                && f.iter().any(|x| x.3.contains(&west_v6))
                && f.iter().any(|x| x.3.contains(&west_v4)),
            "{f:#?}"
        );
        drop(m);
    }
    Ok(())
}

/// A report of `east` with exit 0 (retried while the mesh settles).
fn clean(m: &Mesh, east: &str) -> anyhow::Result<Value> {
    let (code, v) = eventually(Duration::from_secs(30), || {
        let (code, v) = diagnose(m, east, &[]).map_err(|e| format!("{e:#}"))?;
        if code == 0 {
            Ok((code, v))
        } else {
            Err(format!("exit {code}: {:#?}", failures(&v)))
        }
    })?;
    ensure!(code == 0 && v["ok"] == true, "{v:#}");
    Ok(v)
}

/// With WireGuard between the clusters (dual-stack pods): the device, the
/// peers and the handshakes check out and both probes go through
/// WireGuard; a peer whose allowed IPs lose a Pod CIDR, then a peer
/// removed, both by hand through WireGuard's own interface, and a route
/// deleted by hand are each found in the datapath layer.
#[test]
fn diagnose_checks_wireguard_peers_and_probes_through_them() -> anyhow::Result<()> {
    if !require_root("diagnose_checks_wireguard_peers_and_probes_through_them") {
        return Ok(());
    }
    let east = "east-n0";
    let mut m = Mesh::builder()
        .cluster("east", 1)
        .cluster("west", 1)
        .pods(1)
        .dual_stack_pods()
        .datapath("ebpf")
        .agent_args(&["--encryption", "wireguard", "--resync-interval", "1h"])
        .start()?;
    m.wait_ready(READY)?;
    let west = m.node("west-n0")?;
    let (west_v4, west_v6) = (
        west.pod_cidr.to_string(),
        west.pod_cidr_v6.context("dual-stack")?.to_string(),
    );
    let v = clean(&m, east).context("ebpf with WireGuard between the clusters")?;
    probe_answered(&v, &west_v4, "WireGuard")?;
    probe_answered(&v, &west_v6, "WireGuard")?;
    for (cluster, check, needle) in [
        (
            "",
            "wireguard-device",
            "published in podmesh/v1/nodes/east/east-n0",
        ),
        ("west", "wireguard-peer", "1 node(s) with a WireGuard key"),
        ("west", "wireguard-handshake", "west-n0"),
    ] {
        let ok = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == check && c["ok"] == true)
            .filter(|c| c["cluster"].as_str().unwrap_or("") == cluster)
            .filter_map(|c| c["evidence"].as_str())
            .any(|e| e.contains(needle));
        ensure!(ok, "no passed {check} naming {needle:?}: {v:#}");
    }
    // West's peer in east's device, as WireGuard itself is changed.
    let s: Value = serde_json::from_str(&m.status(east)?)?;
    let backend = s["wireguard"]["backend"].as_str().unwrap_or("").to_string();
    let key = s["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cluster"] == "west")
        .and_then(|r| r["wireguardPublicKey"].as_str())
        .and_then(parse_wireguard_key)
        .context("west's key in east's routes")?;
    let sock = m.wireguard_dir(east).join("run/podmesh-wg.sock");
    let netns = std::path::PathBuf::from("/run/netns").join(m.node(east)?.ns.name());
    let set = |change: PeerChange| -> anyhow::Result<()> {
        if backend == "kernel" {
            wg_genl::set(Some(&netns), "podmesh-wg", None, None, &[change])?;
        } else {
            wg_uapi::set(&sock, None, None, &[change])?;
        }
        Ok(())
    };
    let west_addr = m.node("west-n0")?.addr;
    set(PeerChange::Upsert {
        public_key: key,
        endpoint: std::net::SocketAddr::new(west_addr.into(), 51871),
        allowed_ips: [west_v4.parse()?].into(),
    })?;
    let (code, v) = diagnose(&m, east, &[])?;
    ensure!(code == 1, "exit {code}: {v:#}");
    expect_failure(
        &v,
        "west",
        "datapath",
        "wireguard-peer",
        &format!("node west-n0: its peer's allowed IPs ({west_v4}) lack its Pod CIDR {west_v6}"),
    )?;
    set(PeerChange::Remove(key))?;
    let (code, v) = diagnose(&m, east, &[])?;
    ensure!(code == 1, "exit {code}: {v:#}");
    expect_failure(
        &v,
        "west",
        "datapath",
        "wireguard-peer",
        "node west-n0: no peer with its key",
    )?;
    m.node(east)?
        .ns
        .run("ip", &["route", "del", &west_v4, "dev", "podmesh-wg"])?;
    let (code, v) = diagnose(&m, east, &[])?;
    ensure!(code == 1, "exit {code}: {v:#}");
    expect_failure(
        &v,
        "west",
        "datapath",
        "entries",
        &format!("{west_v4} (node west-n0): no route"),
    )?;
    Ok(())
}
