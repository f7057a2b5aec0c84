//! Detection of the node's own CNI (`podmesh_agent::cni`): in a namespace
//! that imitates a node running flannel, Cilium (with BPF host routing),
//! Calico, kube-proxy in IPVS mode and the bridge plugin, the real agent
//! binary reports each in `podmesh status -o json`, the table, `/metrics`
//! and its log; the standard `bridge` and `ptp` plugins, run for real
//! against pod namespaces, are recognised from the devices and configs they
//! leave; a namespace with nothing says `none`.
//!
//! Imitations, because this kernel and machine lack the real thing: Calico's
//! `tunl0` needs IPIP and kube-proxy's `kube-ipvs0` is a dummy device (both
//! missing here), so kube-ipvs0 is a bridge (detection goes by name) and
//! tunl0 is left out.
use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::Context;
use podmesh_agent::{
    cni::{
        CniFinding, Severity, detect,
        observe::{Sources, observe_local},
    },
    status::StatusReport,
};
use podmesh_tests::{
    cni::{Cni, CniNetwork, require_plugins},
    daemon::{kill, log_tail},
    etcd::http_get,
    eventually,
    mesh::{in_netns, workspace_binary},
    netns::NetNs,
    require_root,
};

const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "podnet",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.1.0/25"}]], "dataDir": "DATA"}}
  ]
}"#;

fn finding<'a>(f: &'a [CniFinding], cni: &str) -> anyhow::Result<&'a CniFinding> {
    f.iter()
        .find(|x| x.cni == cni)
        .with_context(|| format!("no {cni} finding in {f:#?}"))
}

/// The namespace of a node that imitates several CNIs at once.
fn imitation_node() -> anyhow::Result<NetNs> {
    let ns = NetNs::new("cni")?;
    for args in [
        &[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "nolearning",
        ][..],
        &[
            "link",
            "add",
            "cilium_host",
            "type",
            "veth",
            "peer",
            "name",
            "cilium_net",
        ],
        &[
            "link",
            "add",
            "cilium_vxlan",
            "type",
            "vxlan",
            "external",
            "dstport",
            "8472",
        ],
        &[
            "link",
            "add",
            "vxlan.calico",
            "type",
            "vxlan",
            "id",
            "4096",
            "dstport",
            "4789",
        ],
        &["link", "add", "kube-ipvs0", "type", "bridge"],
        &["link", "add", "cni0", "type", "bridge"],
    ] {
        ns.ip(args)?;
    }
    Ok(ns)
}

/// A CNI config dir with `files` (name, content; `DATA` replaced by `data`).
fn conf_dir(dir: &Path, data: &Path, files: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let conf = dir.join("net.d");
    std::fs::create_dir_all(&conf)?;
    for (name, text) in files {
        std::fs::write(
            conf.join(name),
            text.replace("DATA", &data.display().to_string()),
        )?;
    }
    Ok(conf)
}

struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

#[test]
fn cni_detect_imitated_cnis_through_the_agent_status_metrics_and_log() -> anyhow::Result<()> {
    if !require_root("cni_detect_imitated_cnis_through_the_agent_status_metrics_and_log") {
        return Ok(());
    }
    let agent_bin = workspace_binary("podmesh-agent", "podmesh-agent")?;
    let podmesh = workspace_binary("podmesh-agent", "podmesh")?;
    let dir = tempfile::tempdir()?;
    let node = imitation_node()?;
    let conf = conf_dir(
        dir.path(),
        &dir.path().join("ipam"),
        &[("10-podnet.conflist", BRIDGE_CONFLIST)],
    )?;
    let cilium_state = dir.path().join("cilium-state");
    std::fs::create_dir_all(cilium_state.join("globals"))?;
    std::fs::write(
        cilium_state.join("globals/node_config.h"),
        "#define ENABLE_NODEPORT 1\n#define ENABLE_HOST_ROUTING 1\n#define TUNNEL_MODE 1\n",
    )?;

    let log = dir.path().join("agent.log");
    let mut agent = Agent {
        child: None,
        log: log.clone(),
    };
    let mut cmd = node.command(agent_bin.to_str().context("agent path")?);
    for v in ["PODMESH_CLUSTER_NAME", "PODMESH_CLUSTER_ID", "NODE_NAME"] {
        cmd.env_remove(v);
    }
    agent.child = Some(
        cmd.env("RUST_LOG", "info")
            .args([
                "--cluster-name",
                "east",
                "--cluster-id",
                "1",
                "--node-name",
                "n1",
            ])
            .args(["--node-ip", "192.168.1.10", "--pod-cidr", "10.1.1.0/24"])
            .args(["--datapath-dry-run", "--status-addr", "127.0.0.1:9090"])
            .arg("--cni-conf-dir")
            .arg(&conf)
            .arg("--cilium-state-dir")
            .arg(&cilium_state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );

    let status = |output: &str| -> Result<String, String> {
        let o = node
            .exec(
                podmesh.to_str().unwrap_or_default(),
                &["status", "--addr", "127.0.0.1:9090", "-o", output],
            )
            .map_err(|e| e.to_string())?;
        if o.status.code() == Some(2) {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let report: StatusReport = eventually(Duration::from_secs(30), || {
        if let Some(Some(st)) = agent.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
            return Err(format!(
                "agent exited with {st}: {}",
                log_tail(&agent.log, 20)
            ));
        }
        let s: StatusReport = serde_json::from_str(&status("json")?).map_err(|e| e.to_string())?;
        if s.cni.is_empty() {
            return Err("no CNI findings yet".into());
        }
        Ok(s)
    })
    .with_context(|| log_tail(&log, 30))?;

    let ids: Vec<&str> = report.cni.iter().map(|f| f.cni.as_str()).collect();
    assert_eq!(
        ids,
        ["flannel", "cilium", "calico", "kube-ipvs", "bridge"],
        "{:#?}",
        report.cni
    );
    let flannel = finding(&report.cni, "flannel")?;
    assert_eq!(flannel.severity, Severity::Warning, "{flannel:?}");
    assert_eq!(flannel.evidence, ["flannel.1 (vxlan id 1 dstport 8472)"]);
    assert!(flannel.action.contains("--tunnel-port"), "{flannel:?}");

    let cilium = finding(&report.cni, "cilium")?;
    assert_eq!(cilium.severity, Severity::Warning);
    for e in [
        "cilium_host (veth)",
        "cilium_net (veth)",
        "cilium_vxlan (vxlan external dstport 8472)",
    ] {
        assert!(cilium.evidence.iter().any(|x| x == e), "{e}: {cilium:?}");
    }
    assert!(
        cilium
            .evidence
            .iter()
            .any(|x| x.starts_with("host routing: BPF")),
        "{cilium:?}"
    );
    assert!(
        cilium.action.contains("enable-host-legacy-routing: true"),
        "{cilium:?}"
    );

    let calico = finding(&report.cni, "calico")?;
    assert_eq!(calico.severity, Severity::Warning);
    assert!(
        calico
            .evidence
            .iter()
            .any(|e| e == "vxlan.calico (vxlan id 4096 dstport 4789)"),
        "{calico:?}"
    );
    assert!(
        calico.evidence.iter().any(|e| e.contains("cannot tell")),
        "without the Kubernetes API the pools are unknown: {calico:?}"
    );
    assert!(calico.action.contains("natOutgoing: false"), "{calico:?}");

    let ipvs = finding(&report.cni, "kube-ipvs")?;
    assert_eq!(ipvs.severity, Severity::Info);
    assert!(ipvs.action.is_empty());

    let bridge = finding(&report.cni, "bridge")?;
    assert_eq!(
        bridge.evidence,
        [
            "10-podnet.conflist: type bridge, ipMasq: true",
            "cni0 (bridge)"
        ]
    );
    assert!(bridge.podmesh.contains("with ipMasq"), "{bridge:?}");

    let table = status("table").map_err(anyhow::Error::msg)?;
    assert!(table.contains("CNI        SEVERITY EVIDENCE"), "{table}");
    assert!(table.contains("flannel    warning  flannel.1"), "{table}");
    assert!(
        table.contains("action: flannel.1 holds UDP 8472"),
        "{table}"
    );

    let metrics = in_netns(node.name(), || http_get(9090, "/metrics"))?;
    for line in [
        "podmesh_node_cni_info{cni=\"flannel\",severity=\"warning\"} 1",
        "podmesh_node_cni_info{cni=\"cilium\",severity=\"warning\"} 1",
        "podmesh_node_cni_info{cni=\"calico\",severity=\"warning\"} 1",
        "podmesh_node_cni_info{cni=\"kube-ipvs\",severity=\"info\"} 1",
        "podmesh_node_cni_info{cni=\"bridge\",severity=\"info\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }

    // Logged once each at start: warnings carry the action as hint.
    let text = strip_ansi(&std::fs::read_to_string(&log)?);
    let warned = |cni: &str| {
        text.lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("cni={cni}")))
            .count()
    };
    assert_eq!(warned("flannel"), 1, "{text}");
    assert_eq!(warned("cilium"), 1, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("INFO") && l.contains("cni=kube-ipvs")),
        "{text}"
    );
    assert!(text.contains("hint="), "{text}");
    Ok(())
}

/// `s` without ANSI colour sequences (`ESC [ … m`), as the log has them.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn cni_detect_real_bridge_and_ptp_plugins() -> anyhow::Result<()> {
    if !require_root("cni_detect_real_bridge_and_ptp_plugins") {
        return Ok(());
    }
    if let Err(why) = require_plugins() {
        if std::env::var_os("CI").is_some() {
            panic!("cni_detect_real_bridge_and_ptp_plugins cannot run: {why:#}");
        }
        eprintln!("SKIPPED cni_detect_real_bridge_and_ptp_plugins: {why:#}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let node = NetNs::new("cninode")?;
    let pod_a = NetNs::new("cnipoda")?;
    let pod_b = NetNs::new("cnipodb")?;
    let conf = dir.path().join("net.d");
    std::fs::create_dir_all(&conf)?;
    let mut attached = Vec::new();
    for (file, cni, subnet, pod) in [
        ("10-podnet.conflist", Cni::Bridge, "10.1.1.0/24", &pod_a),
        ("20-ptpnet.conflist", Cni::Ptp, "10.1.2.0/24", &pod_b),
    ] {
        let net = CniNetwork {
            cni,
            subnet: subnet.parse()?,
            subnet_v6: None,
            data_dir: dir.path().join("ipam"),
        };
        std::fs::write(conf.join(file), net.conflist().to_string())?;
        let at = net.add(&node, pod)?;
        assert!(net.subnet.contains(&at.addr), "{cni} gave {}", at.addr);
        attached.push(at);
    }
    // The plugins did what a node shows: cni0 with pod a's veth, masquerading.
    let links = node.ip(&["-d", "link", "show", "cni0"])?;
    assert!(links.contains("bridge"), "{links}");
    let nat = node.run("iptables", &["-t", "nat", "-S", "POSTROUTING"])?;
    assert!(nat.contains("CNI-"), "ipMasq installed no chain: {nat}");

    let sources = Sources {
        cni_conf_dir: conf.clone(),
        cilium_state_dir: dir.path().join("no-cilium"),
    };
    let findings = in_netns(node.name(), || {
        Ok(detect(&observe_local(&sources, Some(8472))))
    })?;
    let ids: Vec<&str> = findings.iter().map(|f| f.cni.as_str()).collect();
    assert_eq!(ids, ["bridge", "ptp"], "{findings:#?}");
    let bridge = finding(&findings, "bridge")?;
    assert_eq!(
        bridge.evidence,
        [
            "10-podnet.conflist: type bridge, ipMasq: true",
            "cni0 (bridge)"
        ]
    );
    assert!(bridge.podmesh.contains("with ipMasq"), "{bridge:?}");
    let ptp = finding(&findings, "ptp")?;
    assert_eq!(ptp.evidence, ["20-ptpnet.conflist: type ptp, ipMasq: true"]);
    assert!(ptp.podmesh.contains("with ipMasq"), "{ptp:?}");
    for f in &findings {
        assert_eq!(f.severity, Severity::Info, "{f:?}");
        assert!(f.action.is_empty(), "{f:?}");
    }
    Ok(())
}

#[test]
fn cni_detect_an_empty_node_says_none() -> anyhow::Result<()> {
    if !require_root("cni_detect_an_empty_node_says_none") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let node = NetNs::new("cniempty")?;
    let sources = Sources {
        cni_conf_dir: dir.path().join("net.d"),
        cilium_state_dir: dir.path().join("cilium"),
    };
    let findings = in_netns(node.name(), || {
        Ok(detect(&observe_local(&sources, Some(8472))))
    })?;
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0].cni, "none");
    assert!(
        findings[0].evidence[0].starts_with("no CNI network config in "),
        "{findings:#?}"
    );
    Ok(())
}
