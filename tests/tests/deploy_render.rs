//! The Kubernetes manifests in `deploy/`: rendered with `kubectl kustomize`,
//! validated offline and strictly against the Kubernetes schemas, and checked
//! against what the binaries actually accept (flags, paths, ports).
//!
//! Needs `kubectl` (with kustomize v4+) and kubernetes-validate; `cargo xtask
//! setup` installs the validator into `.tools/bin/`.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use clap::CommandFactory;
use podmesh_agent::config::AgentArgs;
use serde_json::Value;

/// Secrets the operator creates (the certificates, and the remote clusters
/// with `podmesh secret render`), as docs/walkthrough.md says. The manifests
/// never contain them: `kubectl apply -k` would replace (or, through its
/// last-applied bookkeeping, empty) what the operator created.
const OPERATOR_SECRETS: &[&str] = &[
    "podmesh-kvstore-client",
    "podmesh-mesh-etcd-server",
    "podmesh-mesh-etcd-peer",
    "podmesh-etcd-proxy-tls",
    "podmesh-etcd-proxy-upstream",
    "podmesh-clustermesh",
];

/// The overlays that `kubectl apply -k` applies, and the base under them.
const KUSTOMIZATIONS: &[&str] = &["base", "overlays/east", "overlays/west"];

/// The flags of podmesh-etcd-proxy the base sets (DESIGN.md, "Commands").
const PROXY_FLAGS: &[&str] = &[
    "listen",
    "upstream-config",
    "tls-cert",
    "tls-key",
    "client-ca",
    "allow-prefix",
    "metrics-addr",
];

/// Flags of `podmesh-etcd-proxy --help` beyond DESIGN.md's that overlays may set.
const PROXY_EXTRA_FLAGS: &[&str] = &["advertise-url"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// `kubectl kustomize deploy/<dir>`.
fn render(dir: &str) -> String {
    let path = root().join("deploy").join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `kubectl kustomize` ({e}): install kubectl (1.27 or newer, \
                 kustomize v5) to render deploy/"
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

fn validator() -> PathBuf {
    let local = root().join(".tools/bin/kubernetes-validate");
    if local.exists() {
        return local;
    }
    let on_path = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    match on_path {
        Ok(o) if o.status.success() => PathBuf::from("kubernetes-validate"),
        _ => panic!("kubernetes-validate is not installed; run `cargo xtask setup`"),
    }
}

/// Runs `kubernetes-validate --strict` on `yaml`; returns (success, output).
fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(validator())
        .args(["--strict", "--no-warn"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn docs(yaml: &str) -> Vec<Value> {
    podmesh_plumbing::yaml::from_str_multi::<Value>(yaml)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"))
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    seq(&pod_spec["containers"])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// `--flag=value` arguments of a container as (flag, value) pairs.
fn flag_args(c: &Value) -> Vec<(String, String)> {
    seq(&c["args"])
        .iter()
        .map(|a| {
            let a = s(a).strip_prefix("--").expect("arguments are --flag=value");
            let (k, v) = a.split_once('=').expect("arguments are --flag=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn flag<'a>(args: &'a [(String, String)], name: &str) -> &'a str {
    args.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no --{name}"))
}

fn mount<'a>(c: &'a Value, path: &str) -> &'a Value {
    seq(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("no volume mounted at {path} in {}", s(&c["name"])))
}

fn volume<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    seq(&pod_spec["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The example clustermesh Secret of an overlay (not part of what it renders).
fn example_secret(cluster: &str) -> Value {
    let path = root().join(format!(
        "deploy/overlays/{cluster}/clustermesh-secret.example.yaml"
    ));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    podmesh_plumbing::yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn agent_config(docs: &[Value]) -> Value {
    let cm = find(docs, "ConfigMap", "podmesh-agent-config");
    podmesh_plumbing::yaml::from_str(s(&cm["data"]["config.yaml"])).expect("config.yaml parses")
}

#[test]
fn deploy_base_and_overlays_pass_strict_schema_validation() {
    for dir in KUSTOMIZATIONS {
        let yaml = render(dir);
        let n = docs(&yaml).len();
        assert!(n >= 15, "{dir}: only {n} objects rendered");
        let (ok, out) = validate(&yaml);
        assert!(ok, "{dir} fails strict schema validation:\n{out}");
        let passed = out.lines().filter(|l| l.contains(" passed for ")).count();
        assert_eq!(passed, n, "{dir}: {n} objects, {passed} validated:\n{out}");
    }
    for cluster in ["east", "west"] {
        let example = serde_saphyr::to_string(&example_secret(cluster)).unwrap();
        let (ok, out) = validate(&example);
        assert!(ok, "{cluster}'s example Secret fails validation:\n{out}");
    }
}

/// The validator really is strict: a misspelt field and a wrong type fail.
/// Without this, the test above could pass on a validator that checks nothing.
#[test]
fn deploy_schema_validation_rejects_unknown_fields_and_wrong_types() {
    let yaml = render("base");
    let typo = yaml.replacen("hostNetwork: true", "hostNetwrok: true", 1);
    assert_ne!(typo, yaml);
    let (ok, out) = validate(&typo);
    assert!(!ok, "a misspelt field passed validation:\n{out}");
    assert!(out.contains("hostNetwrok"), "{out}");

    let wrong = yaml.replacen("replicas: 3", "replicas: three", 1);
    assert_ne!(wrong, yaml);
    let (ok, out) = validate(&wrong);
    assert!(!ok, "a string replica count passed validation:\n{out}");
}

#[test]
fn deploy_agent_daemonset_runs_the_agent_as_designed() {
    let d = docs(&render("base"));
    let ds = find(&d, "DaemonSet", "podmesh-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "podmesh-agent");
    assert!(
        seq(&pod["tolerations"])
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null()),
        "the agent must tolerate every taint"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");

    let agent = container(pod, "agent");
    assert_eq!(seq(&agent["command"])[0], "podmesh-agent");
    let args = flag_args(agent);
    let config_path = flag(&args, "config");
    assert_eq!(config_path, "/etc/podmesh/config.yaml");

    let caps: BTreeSet<&str> = seq(&agent["securityContext"]["capabilities"]["add"])
        .iter()
        .map(s)
        .collect();
    for cap in ["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"] {
        assert!(caps.contains(cap), "agent lacks {cap}: {caps:?}");
    }
    assert_ne!(agent["securityContext"]["privileged"], true);

    let node_name = seq(&agent["env"])
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME is set");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    // The Secret is mounted whole (no subPath) where the config says, so that
    // Kubernetes' symlink swap reaches the agent.
    let cfg = agent_config(&d);
    let cm_dir = s(&cfg["clustermesh-config"]);
    assert_eq!(cm_dir, "/var/lib/podmesh/clustermesh");
    let m = mount(agent, cm_dir);
    assert!(
        m["subPath"].is_null(),
        "the clustermesh Secret must not use subPath"
    );
    assert_eq!(
        volume(pod, s(&m["name"]))["secret"]["secretName"],
        "podmesh-clustermesh"
    );

    // --config and kvstore-config resolve to files of the mounted ConfigMap.
    let cfg_mount = mount(agent, "/etc/podmesh");
    let items: BTreeSet<&str> = seq(&volume(pod, s(&cfg_mount["name"]))["configMap"]["items"])
        .iter()
        .map(|i| s(&i["path"]))
        .collect();
    let kv = s(&cfg["kvstore-config"]);
    for f in [config_path, kv] {
        let name = f.strip_prefix("/etc/podmesh/").expect("under /etc/podmesh");
        assert!(items.contains(name), "{f} is not in the mounted ConfigMap");
    }
    // The kvstore YAML names files of the mounted client-certificate Secret.
    let cm = find(&d, "ConfigMap", "podmesh-agent-config");
    let kv_yaml: Value = podmesh_plumbing::yaml::from_str(s(&cm["data"]["kvstore.yaml"]))
        .expect("kvstore.yaml parses");
    assert!(s(&seq(&kv_yaml["endpoints"])[0]).starts_with("https://"));
    let kv_mount = mount(agent, "/var/lib/podmesh/kvstore");
    assert_eq!(
        volume(pod, s(&kv_mount["name"]))["secret"]["secretName"],
        "podmesh-kvstore-client"
    );
    for key in ["trusted-ca-file", "cert-file", "key-file"] {
        assert!(
            s(&kv_yaml[key]).starts_with("/var/lib/podmesh/kvstore/"),
            "{key}"
        );
    }

    // /sys/fs/bpf: bpffs mounted on the host by a privileged init step with
    // Bidirectional propagation; the agent sees it (HostToContainer).
    let init = &seq(&pod["initContainers"])[0];
    assert_eq!(init["securityContext"]["privileged"], true);
    assert_eq!(
        mount(init, "/sys/fs/bpf")["mountPropagation"],
        "Bidirectional"
    );
    let bpf = mount(agent, "/sys/fs/bpf");
    assert_eq!(bpf["mountPropagation"], "HostToContainer");
    assert_eq!(
        volume(pod, s(&bpf["name"]))["hostPath"]["path"],
        "/sys/fs/bpf"
    );

    // Probes hit the status server where status-addr puts it.
    let status_addr = s(&cfg["status-addr"]);
    let (host, port) = status_addr.rsplit_once(':').unwrap();
    let port: u64 = port.parse().unwrap();
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"].as_u64(), Some(port), "{probe}");
        assert_eq!(get["host"], host, "{probe}");
    }

    let res = &agent["resources"];
    assert!(!res["requests"]["cpu"].is_null() && !res["limits"]["memory"].is_null());
}

/// Every key of the agent's YAML config is a flag of `podmesh-agent`.
#[test]
fn deploy_agent_config_keys_are_agent_flags() {
    let flags: BTreeSet<String> = AgentArgs::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    for dir in KUSTOMIZATIONS {
        let cfg = agent_config(&docs(&render(dir)));
        let map = cfg.as_object().expect("config.yaml is a mapping");
        assert!(map.len() >= 8, "{dir}: config.yaml has {} keys", map.len());
        for k in map.keys() {
            assert!(
                flags.contains(k.as_str()),
                "{dir}: config key {k:?} is not a podmesh-agent flag ({flags:?})"
            );
        }
    }
}

#[test]
fn deploy_overlays_configure_two_distinct_clusters_that_follow_each_other() {
    let plan: Value = podmesh_plumbing::yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/overlays/plan.yaml")).unwrap(),
    )
    .unwrap();
    let mut ids = BTreeSet::new();
    let mut pods = BTreeSet::new();
    for (name, id, remote) in [("east", 1, "west"), ("west", 2, "east")] {
        let d = docs(&render(&format!("overlays/{name}")));
        let cfg = agent_config(&d);
        assert_eq!(cfg["cluster-name"], name);
        assert_eq!(cfg["cluster-id"].as_u64(), Some(id));
        ids.insert(id);
        // Dual-stack: one Pod CIDR of each family (a dual-stack cluster's
        // nodes would otherwise all be rejected by the remote clusters).
        let cidrs: Vec<ipnet::IpNet> = seq(&cfg["cluster-pod-cidr"])
            .iter()
            .map(|c| s(c).parse().expect("a CIDR"))
            .collect();
        assert_eq!(cidrs.len(), 2, "{name}: {cidrs:?}");
        assert!(
            cidrs.iter().any(|c| matches!(c, ipnet::IpNet::V4(_)))
                && cidrs.iter().any(|c| matches!(c, ipnet::IpNet::V6(_))),
            "{name}: {cidrs:?}"
        );
        for c in cidrs {
            assert!(pods.insert(c.to_string()), "pod CIDR reused");
        }

        // The overlay agrees with the mesh's address plan.
        let planned = seq(&plan["clusters"])
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in plan.yaml"));
        assert_eq!(planned["id"].as_u64(), Some(id));
        assert_eq!(planned["podCIDRs"], cfg["cluster-pod-cidr"], "{name}");
        assert_eq!(planned["serviceCIDRs"], cfg["service-cidr"], "{name}");

        // The example Secret lists exactly the other cluster, in the wire format.
        let secret = example_secret(name);
        assert_eq!(secret["metadata"]["name"], "podmesh-clustermesh");
        assert_eq!(secret["metadata"]["namespace"], "podmesh");
        let data = secret["stringData"].as_object().expect("stringData");
        let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
        let want: BTreeSet<String> = ["", ".ca.crt", ".client.crt", ".client.key"]
            .iter()
            .map(|suffix| format!("{remote}{suffix}"))
            .collect();
        assert_eq!(
            keys,
            want.iter().map(String::as_str).collect::<BTreeSet<_>>(),
            "{name}"
        );
        let etcd: Value = podmesh_plumbing::yaml::from_str(s(&data[remote])).unwrap();
        assert!(s(&seq(&etcd["endpoints"])[0]).starts_with("https://"));
        for (key, suffix) in [
            ("trusted-ca-file", "ca.crt"),
            ("cert-file", "client.crt"),
            ("key-file", "client.key"),
        ] {
            assert_eq!(
                s(&etcd[key]),
                format!("/var/lib/podmesh/clustermesh/{remote}.{suffix}"),
                "{name}: {key}"
            );
        }
        // The proxy advertises the name the Secret of the other cluster uses.
        let proxy = find(&d, "Deployment", "podmesh-etcd-proxy");
        let pargs = flag_args(container(&proxy["spec"]["template"]["spec"], "etcd-proxy"));
        for (k, _) in &pargs {
            assert!(
                PROXY_FLAGS.contains(&k.as_str()) || PROXY_EXTRA_FLAGS.contains(&k.as_str()),
                "{name}: unknown proxy flag --{k}"
            );
        }
        assert_eq!(
            flag(&pargs, "advertise-url"),
            format!("https://{name}-mesh.example.com:2379")
        );
        let other_secret = example_secret(remote);
        let theirs: Value =
            podmesh_plumbing::yaml::from_str(s(&other_secret["stringData"][name])).unwrap();
        assert_eq!(
            seq(&theirs["endpoints"])[0].as_str(),
            Some(flag(&pargs, "advertise-url")),
            "{remote}'s Secret must point at {name}'s advertised proxy URL"
        );
        // Every object carries the cluster label.
        for o in &d {
            assert_eq!(
                o["metadata"]["labels"]["podmesh.io/cluster"],
                name,
                "{name}: {}/{}",
                s(&o["kind"]),
                s(&o["metadata"]["name"])
            );
        }
    }
    assert_eq!(ids.len(), 2);
}

/// Every proxy flag the manifests use is one `podmesh-etcd-proxy --help` lists.
#[test]
fn deploy_proxy_flags_are_flags_of_the_binary() {
    let bin = podmesh_tests::proxy::binary().expect("podmesh-etcd-proxy builds");
    let out = Command::new(&bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for f in PROXY_FLAGS.iter().chain(PROXY_EXTRA_FLAGS) {
        assert!(
            help.contains(&format!("--{f} ")),
            "podmesh-etcd-proxy has no --{f}:\n{help}"
        );
    }
}

/// The DaemonSet's `wireguard` container fits every node: its flags are
/// `podmesh-wireguard`'s, it defers to kernel WireGuard where there is one
/// (the agent's `auto` then takes the kernel's device), and it serves the
/// socket in the directory the agent looks in.
#[test]
fn deploy_wireguard_container_defers_to_kernel_wireguard() {
    let d = docs(&render("base"));
    let pod = &find(&d, "DaemonSet", "podmesh-agent")["spec"]["template"]["spec"];
    let wg = container(pod, "wireguard");
    assert_eq!(seq(&wg["command"])[0], "podmesh-wireguard");
    let args: Vec<&str> = seq(&wg["args"]).iter().map(s).collect();
    assert!(
        args.contains(&"--defer-to-kernel-wireguard"),
        "the container would hold podmesh-wg on nodes with kernel WireGuard: {args:?}"
    );
    let bin = podmesh_tests::mesh::workspace_binary("podmesh-wireguard", "podmesh-wireguard")
        .expect("podmesh-wireguard builds");
    let out = Command::new(&bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for a in &args {
        let name = a.split_once('=').map_or(*a, |(k, _)| k);
        assert!(
            help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
            "podmesh-wireguard has no {name}:\n{help}"
        );
    }
    let cfg = agent_config(&d);
    assert!(
        cfg["wireguard-backend"].is_null() || s(&cfg["wireguard-backend"]) == "auto",
        "the agent must pick the backend the container leaves it"
    );
    let run_dir = s(&cfg["wireguard-run-dir"]);
    assert!(
        args.contains(&format!("--run-dir={run_dir}").as_str()),
        "{args:?}"
    );
    assert!(args.contains(&"--interface=podmesh-wg"), "{args:?}");
    let agent = container(pod, "agent");
    assert_eq!(mount(wg, run_dir)["name"], mount(agent, run_dir)["name"]);
}

#[test]
fn deploy_mesh_etcd_and_proxy_use_mutual_tls() {
    let d = docs(&render("base"));
    let proxy = find(&d, "Deployment", "podmesh-etcd-proxy");
    let pod = &proxy["spec"]["template"]["spec"];
    let c = container(pod, "etcd-proxy");
    let args = flag_args(c);
    let names: BTreeSet<&str> = args.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, PROXY_FLAGS.iter().copied().collect::<BTreeSet<_>>());
    assert_eq!(flag(&args, "allow-prefix"), "podmesh/v1/");
    for f in ["tls-cert", "tls-key", "client-ca"] {
        let p = flag(&args, f);
        let dir = Path::new(p).parent().unwrap().to_str().unwrap();
        let m = mount(c, dir);
        assert_eq!(
            volume(pod, s(&m["name"]))["secret"]["secretName"],
            "podmesh-etcd-proxy-tls",
            "--{f}"
        );
    }
    let up = flag(&args, "upstream-config");
    let cm = find(&d, "ConfigMap", "podmesh-etcd-proxy-config");
    let name = Path::new(up).file_name().unwrap().to_str().unwrap();
    let upstream: Value = podmesh_plumbing::yaml::from_str(s(&cm["data"][name])).unwrap();
    assert!(s(&seq(&upstream["endpoints"])[0]).starts_with("https://podmesh-mesh-etcd-client."));

    // The LoadBalancer forwards 2379 to the port the proxy listens on.
    let listen_port: u64 = flag(&args, "listen")
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let svc = find(&d, "Service", "podmesh-etcd-proxy");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    let sp = &seq(&svc["spec"]["ports"])[0];
    assert_eq!(sp["port"].as_u64(), Some(2379));
    let target = seq(&c["ports"])
        .iter()
        .find(|p| p["name"] == sp["targetPort"])
        .expect("the Service's targetPort names a container port");
    assert_eq!(target["containerPort"].as_u64(), Some(listen_port));
    let metrics_port: u64 = flag(&args, "metrics-addr")
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    for probe in ["livenessProbe", "readinessProbe"] {
        let port = &c[probe]["httpGet"]["port"];
        let p = seq(&c["ports"])
            .iter()
            .find(|p| p["name"] == *port)
            .unwrap();
        assert_eq!(p["containerPort"].as_u64(), Some(metrics_port), "{probe}");
    }
    let labels = &proxy["spec"]["selector"]["matchLabels"];
    let pdb = find(&d, "PodDisruptionBudget", "podmesh-etcd-proxy");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&svc["spec"]["selector"], labels);
    assert!(proxy["spec"]["replicas"].as_u64().unwrap() >= 2);
    // The unauthenticated metrics port is not open to every source: the
    // policy selects the proxy's pods, lets anyone reach the etcd port
    // (mTLS decides) and only labelled namespaces reach the metrics port.
    let np = find(&d, "NetworkPolicy", "podmesh-etcd-proxy");
    assert_eq!(&np["spec"]["podSelector"]["matchLabels"], labels);
    let rules = seq(&np["spec"]["ingress"]);
    let port_names = |r: &Value| -> Vec<String> {
        seq(&r["ports"])
            .iter()
            .map(|p| p["port"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    for r in rules {
        let ports = port_names(r);
        assert!(
            !ports.is_empty(),
            "a rule without ports opens every port: {r:?}"
        );
        if ports.iter().any(|p| p == "metrics") {
            assert!(
                !seq(&r["from"]).is_empty(),
                "the metrics port is open to every source: {r:?}"
            );
        }
    }
    assert!(
        rules
            .iter()
            .any(|r| port_names(r) == ["etcd"] && r["from"].is_null())
    );

    let sts = find(&d, "StatefulSet", "podmesh-mesh-etcd");
    let etcd = container(&sts["spec"]["template"]["spec"], "etcd");
    let eargs = flag_args(etcd);
    assert_eq!(flag(&eargs, "client-cert-auth"), "true");
    assert_eq!(flag(&eargs, "peer-client-cert-auth"), "true");
    assert!(flag(&eargs, "listen-client-urls").starts_with("https://"));
    assert!(flag(&eargs, "listen-peer-urls").starts_with("https://"));
    let initial = flag(&eargs, "initial-cluster");
    assert_eq!(
        initial.split(',').count() as u64,
        sts["spec"]["replicas"].as_u64().unwrap(),
        "--initial-cluster lists every replica"
    );
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
}

/// Every ConfigMap and ServiceAccount a workload names is rendered; every
/// Secret it names is one the walkthrough tells the operator to create.
#[test]
fn deploy_every_referenced_object_exists_or_is_documented() {
    let walkthrough = std::fs::read_to_string(root().join("docs/walkthrough.md"))
        .expect("docs/walkthrough.md exists");
    for dir in KUSTOMIZATIONS {
        let d = docs(&render(dir));
        let rendered = |kind: &str, name: &str| {
            d.iter()
                .any(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        };
        let mut checked = 0;
        for w in d
            .iter()
            .filter(|o| ["DaemonSet", "Deployment", "StatefulSet"].contains(&s(&o["kind"])))
        {
            let pod = &w["spec"]["template"]["spec"];
            assert!(rendered("ServiceAccount", s(&pod["serviceAccountName"])));
            for v in seq(&pod["volumes"]) {
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    assert!(rendered("ConfigMap", cm), "{dir}: ConfigMap {cm}");
                    checked += 1;
                }
                if let Some(sec) = v["secret"]["secretName"].as_str() {
                    assert!(OPERATOR_SECRETS.contains(&sec), "{dir}: Secret {sec}");
                    assert!(
                        walkthrough.contains(sec),
                        "docs/walkthrough.md does not say how to create {sec}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 8, "{dir}: only {checked} references checked");
    }
}

/// The example mesh's address plan is clean by `podmesh plan check`'s rules,
/// and the same check catches the overlays' ranges colliding.
#[test]
fn deploy_example_plan_passes_plan_check() {
    use podmesh_agent::{plan::Plan, validate::Severity};
    let path = root().join("deploy/overlays/plan.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let findings = Plan::parse(&text, &path).expect("plan.yaml parses").check();
    assert!(findings.is_empty(), "{findings:#?}");

    let clash = text.replace(
        "podCIDRs: [10.2.0.0/16, \"fd00:2::/56\"]",
        "podCIDRs: [10.1.128.0/17, \"fd00:2::/56\"]",
    );
    assert_ne!(clash, text);
    let findings = Plan::parse(&clash, &path).unwrap().check();
    assert!(
        findings
            .iter()
            .any(|f| f.severity == Severity::Error && f.clusters.len() == 2),
        "an overlap of east's and west's Pod CIDRs is not an error: {findings:#?}"
    );
}

/// docs/walkthrough.md has the operator create the Secrets (step 2 the
/// certificates, step 3 `podmesh secret render` for the remote clusters)
/// before `kubectl apply -k` (step 4). A Secret of the same name in the
/// manifests would undo that: apply replaces its data, and even an empty one
/// removes the keys the operator's own `kubectl apply -f` recorded.
#[test]
fn deploy_manifests_leave_the_operators_secrets_alone() {
    for dir in KUSTOMIZATIONS {
        let d = docs(&render(dir));
        for o in d.iter().filter(|o| o["kind"] == "Secret") {
            let name = s(&o["metadata"]["name"]);
            assert!(
                !OPERATOR_SECRETS.contains(&name),
                "{dir} renders Secret {name}: `kubectl apply -k deploy/{dir}` would overwrite \
                 the one the operator created"
            );
        }
    }
    // The walkthrough renders the clustermesh Secret before it applies the
    // overlay, and does not send the operator to put its keys into the overlay.
    let walkthrough = std::fs::read_to_string(root().join("docs/walkthrough.md")).unwrap();
    let render_at = walkthrough
        .find("podmesh secret render --cluster")
        .expect("the walkthrough renders the clustermesh Secret");
    let apply_at = walkthrough
        .find("apply -k deploy/overlays/")
        .expect("the walkthrough applies an overlay");
    assert!(
        render_at < apply_at,
        "the Secret is rendered after apply -k"
    );
}

/// The volumes of the rendered podmesh-etcd-proxy Deployment, to edit.
fn proxy_volumes(d: &mut [Value]) -> &mut Vec<Value> {
    let proxy = d
        .iter_mut()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "podmesh-etcd-proxy")
        .unwrap();
    proxy["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
}

/// A Secret volume's files belong to root (to the pod's `fsGroup`, when it
/// has one, which the kubelet also makes group-readable). A container that
/// runs as another user reads them only through the "other" read bit, or
/// through fsGroup. Returns one line per secret mount that user cannot read.
fn unreadable_secret_mounts(docs: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for w in docs {
        let pod = match s(&w["kind"]) {
            "DaemonSet" | "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" => {
                &w["spec"]["template"]["spec"]
            }
            "CronJob" => &w["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            "Pod" => &w["spec"],
            _ => continue,
        };
        let workload = format!("{}/{}", s(&w["kind"]), s(&w["metadata"]["name"]));
        let psc = &pod["securityContext"];
        let has_fs_group = psc["fsGroup"].as_u64().is_some();
        let containers = seq(&pod["containers"])
            .iter()
            .chain(pod["initContainers"].as_array().into_iter().flatten());
        for c in containers {
            let csc = &c["securityContext"];
            let pick = |k: &str| {
                if csc[k].is_null() { &psc[k] } else { &csc[k] }
            };
            let non_root = match pick("runAsUser").as_u64() {
                Some(uid) => uid != 0,
                // The image's user, which runAsNonRoot guarantees is not root.
                None => pick("runAsNonRoot").as_bool() == Some(true),
            };
            let gid0 = pick("runAsGroup").as_u64() == Some(0);
            if !non_root || has_fs_group {
                continue;
            }
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let vol = volume(pod, s(&m["name"]));
                // (secret name, file mode) of every file the volume holds.
                let mut files: Vec<(String, u64)> = Vec::new();
                let mut secret = |src: &Value, default: u64| {
                    let mode = src["defaultMode"].as_u64().unwrap_or(default);
                    let name = src["secretName"]
                        .as_str()
                        .or(src["name"].as_str())
                        .unwrap_or("?")
                        .to_string();
                    match src["items"].as_array() {
                        // Only the listed keys, each with its own mode or the default.
                        Some(items) => files.extend(
                            items
                                .iter()
                                .map(|i| (name.clone(), i["mode"].as_u64().unwrap_or(mode))),
                        ),
                        None => files.push((name, mode)),
                    }
                };
                if !vol["secret"].is_null() {
                    secret(&vol["secret"], 0o644);
                }
                // A projected volume's secret sources take its defaultMode.
                let projected_mode = vol["projected"]["defaultMode"].as_u64().unwrap_or(0o644);
                for src in vol["projected"]["sources"].as_array().into_iter().flatten() {
                    if !src["secret"].is_null() {
                        secret(&src["secret"], projected_mode);
                    }
                }
                for (name, mode) in files {
                    let readable = mode & 0o004 != 0 || (gid0 && mode & 0o040 != 0);
                    if !readable {
                        out.push(format!(
                            "{workload}: container {} runs as non-root but Secret {name} is mounted \
                             at {} with mode {mode:#o} and the pod has no fsGroup",
                            s(&c["name"]),
                            s(&m["mountPath"])
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Every container that runs as a non-root user can read the Secrets it
/// mounts (the etcd proxy and the mesh etcd run as 65532 with 0440 keys).
#[test]
fn deploy_non_root_containers_can_read_their_secrets() {
    for dir in KUSTOMIZATIONS {
        let d = docs(&render(dir));
        let bad = unreadable_secret_mounts(&d);
        assert!(bad.is_empty(), "{dir}:\n{}", bad.join("\n"));
    }

    // The check finds the bug it is for: the proxy without its fsGroup.
    let mut d = docs(&render("base"));
    let proxy = d
        .iter_mut()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "podmesh-etcd-proxy")
        .unwrap();
    let sc = proxy["spec"]["template"]["spec"]["securityContext"]
        .as_object_mut()
        .expect("the proxy has a pod securityContext");
    assert!(sc.remove("fsGroup").is_some(), "the proxy sets fsGroup");
    let bad = unreadable_secret_mounts(&d);
    for sec in ["podmesh-etcd-proxy-tls", "podmesh-etcd-proxy-upstream"] {
        assert!(
            bad.iter()
                .any(|b| b.starts_with("Deployment/podmesh-etcd-proxy:") && b.contains(sec)),
            "{sec} not reported: {bad:?}"
        );
    }
    assert_eq!(bad.len(), 2, "{bad:?}");

    // World-readable files need no fsGroup; a projected volume is checked too.
    let volumes = proxy_volumes(&mut d);
    for v in volumes.iter_mut() {
        if let Some(sec) = v["secret"].as_object_mut() {
            sec.insert("defaultMode".into(), 0o444.into());
        }
    }
    assert_eq!(unreadable_secret_mounts(&d), Vec::<String>::new());
    let projected: Value = podmesh_plumbing::yaml::from_str(
        "name: tls\nprojected:\n  defaultMode: 0o400\n  sources:\n  - secret:\n      name: podmesh-etcd-proxy-tls\n",
    )
    .unwrap();
    let volumes = proxy_volumes(&mut d);
    let tls = volumes.iter_mut().find(|v| v["name"] == "tls").unwrap();
    *tls = projected;
    let bad = unreadable_secret_mounts(&d);
    assert!(
        bad.len() == 1 && bad[0].contains("podmesh-etcd-proxy-tls") && bad[0].contains("0o400"),
        "{bad:?}"
    );
}

/// The Pod templates of the rendered manifests: (kind/name, namespace, pod spec).
fn pod_templates(docs: &[Value]) -> Vec<(String, String, &Value)> {
    docs.iter()
        .filter(|d| {
            ["DaemonSet", "Deployment", "StatefulSet"].contains(&d["kind"].as_str().unwrap_or(""))
        })
        .map(|d| {
            (
                format!("{}/{}", s(&d["kind"]), s(&d["metadata"]["name"])),
                s(&d["metadata"]["namespace"]).to_string(),
                &d["spec"]["template"]["spec"],
            )
        })
        .collect()
}

/// Clusters that limit the critical priority classes (GKE by default; the
/// kube-apiserver's ResourceQuota `limitedResources` with a PriorityClass
/// scope) create a Pod of such a class only in a namespace whose
/// ResourceQuota covers the class. Every priorityClassName of deploy/ is
/// covered by a quota in its Pod's namespace, whose pod limit is no
/// practical limit.
#[test]
fn deploy_priority_classes_are_covered_by_a_resource_quota() {
    for dir in KUSTOMIZATIONS {
        let d = docs(&render(dir));
        let quotas: Vec<&Value> = d.iter().filter(|o| o["kind"] == "ResourceQuota").collect();
        let mut classes = 0;
        for (what, ns, pod) in pod_templates(&d) {
            let Some(class) = pod["priorityClassName"].as_str() else {
                continue;
            };
            classes += 1;
            let covering = quotas.iter().find(|q| {
                q["metadata"]["namespace"] == ns.as_str()
                    && seq(&q["spec"]["scopeSelector"]["matchExpressions"])
                        .iter()
                        .any(|e| {
                            e["scopeName"] == "PriorityClass"
                                && e["operator"] == "In"
                                && seq(&e["values"]).iter().any(|v| v == class)
                        })
            });
            let q = covering.unwrap_or_else(|| {
                panic!(
                    "{dir}: {what} uses priorityClassName {class}, and no ResourceQuota \
                     in namespace {ns} has a PriorityClass scope for it"
                )
            });
            let pods = s(&q["spec"]["hard"]["pods"]);
            let n: u64 = match pods.strip_suffix('k') {
                Some(k) => k.parse::<u64>().unwrap() * 1000,
                None => pods.parse().unwrap(),
            };
            assert!(
                n >= 15_000,
                "{dir}: the quota must not limit the agent's Pods (one per node): pods {pods}"
            );
        }
        assert!(classes >= 1, "{dir}: the agent runs system-node-critical");
    }
}

/// With hostNetwork a containerPort is a hostPort the scheduler reserves on
/// the node; the manifests declare none (nothing reaches them by a Service).
#[test]
fn deploy_host_network_pods_declare_no_container_ports() {
    for dir in KUSTOMIZATIONS {
        let d = docs(&render(dir));
        for (what, _, pod) in pod_templates(&d) {
            if pod["hostNetwork"] != true {
                continue;
            }
            for c in seq(&pod["containers"])
                .iter()
                .chain(pod["initContainers"].as_array().into_iter().flatten())
            {
                assert!(
                    c["ports"].is_null(),
                    "{dir}: {what} container {} declares ports with hostNetwork: {:?}",
                    s(&c["name"]),
                    c["ports"]
                );
            }
        }
    }
}

/// The ClusterRole grants on nodes exactly the verbs the agent uses (its
/// watcher lists and watches; a 403 names this role), bound to the
/// ServiceAccount the DaemonSet runs as.
#[test]
fn deploy_agent_cluster_role_grants_what_the_agent_uses_on_nodes() {
    use podmesh_agent::k8s::{CLUSTER_ROLE, NODE_VERBS};
    let d = docs(&render("base"));
    let role = find(&d, "ClusterRole", CLUSTER_ROLE);
    let nodes = seq(&role["rules"])
        .iter()
        .find(|r| seq(&r["resources"]).iter().any(|x| x == "nodes"))
        .expect("a rule on nodes");
    assert_eq!(seq(&nodes["apiGroups"]), [Value::from("")]);
    let verbs: BTreeSet<&str> = seq(&nodes["verbs"]).iter().map(s).collect();
    assert_eq!(verbs, NODE_VERBS.iter().copied().collect::<BTreeSet<_>>());
    let binding = find(&d, "ClusterRoleBinding", CLUSTER_ROLE);
    assert_eq!(binding["roleRef"]["name"], CLUSTER_ROLE);
    let ds = find(&d, "DaemonSet", "podmesh-agent");
    let sa = &ds["spec"]["template"]["spec"]["serviceAccountName"];
    assert!(
        seq(&binding["subjects"])
            .iter()
            .any(|x| x["kind"] == "ServiceAccount"
                && &x["name"] == sa
                && x["namespace"] == "podmesh"),
        "the binding names the DaemonSet's ServiceAccount"
    );
}
