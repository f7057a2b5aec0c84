use super::{calico::pool_from_json, *};

fn link(name: &str, kind: &str) -> LinkSeen {
    LinkSeen {
        name: name.into(),
        kind: Some(kind.into()),
        ..LinkSeen::default()
    }
}

fn vxlan(name: &str, vni: u32, port: u16) -> LinkSeen {
    LinkSeen {
        name: name.into(),
        kind: Some("vxlan".into()),
        vxlan_port: Some(port),
        vni: Some(vni),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn obs(links: Vec<LinkSeen>) -> NodeObservation {
    NodeObservation {
        links,
        cni_conf_dir: "/etc/cni/net.d".into(),
        tunnel_port: Some(8472),
        remote_pod_cidrs: vec![net("10.2.0.0/16")],
        ..NodeObservation::default()
    }
}

fn ids(f: &[CniFinding]) -> Vec<&str> {
    f.iter().map(|f| f.cni.as_str()).collect()
}

fn only<'a>(f: &'a [CniFinding], cni: &str) -> &'a CniFinding {
    let found: Vec<_> = f.iter().filter(|f| f.cni == cni).collect();
    assert_eq!(found.len(), 1, "one {cni} finding in {f:#?}");
    found[0]
}

const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "podnet",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

#[test]
fn a_node_with_nothing_says_none() {
    let f = detect(&obs(vec![link("lo", "loopback"), link("eth0", "veth")]));
    assert_eq!(ids(&f), ["none"]);
    assert_eq!(f[0].severity, Severity::Info);
    assert!(f[0].action.is_empty());
    assert!(
        f[0].evidence
            .iter()
            .any(|e| e.contains("no CNI network config in /etc/cni/net.d")),
        "{f:?}"
    );
}

#[test]
fn none_lists_unknown_plugins_and_unreadable_files() {
    let mut o = obs(vec![]);
    o.cni_configs = vec![
        parse_cni_config(
            "10-weave.conflist",
            r#"{"name":"weave","plugins":[{"type":"weave-net"}]}"#,
        ),
        parse_cni_config("99-broken.conf", "{"),
    ];
    let f = detect(&o);
    assert_eq!(ids(&f), ["none"]);
    let ev = f[0].evidence.join("\n");
    assert!(ev.contains("10-weave.conflist: type weave-net"), "{ev}");
    assert!(ev.contains("99-broken.conf: not JSON"), "{ev}");
}

#[test]
fn flannel_on_podmesh_port_is_a_warning_naming_the_flag() {
    let f = detect(&obs(vec![vxlan("flannel.1", 1, 8472)]));
    let fl = only(&f, "flannel");
    assert_eq!(fl.severity, Severity::Warning);
    assert_eq!(fl.evidence, ["flannel.1 (vxlan id 1 dstport 8472)"]);
    assert!(fl.action.contains("--tunnel-port"), "{}", fl.action);
    assert!(fl.action.contains("8473"), "{}", fl.action);
    assert!(fl.podmesh.contains("--ip-masq"), "{}", fl.podmesh);
    assert!(fl.podmesh.contains("null SNAT binding"), "{}", fl.podmesh);
    assert!(
        fl.podmesh.contains("routes are left untouched"),
        "{}",
        fl.podmesh
    );
}

#[test]
fn flannel_on_another_port_or_without_vxlan_needs_nothing() {
    let mut o = obs(vec![vxlan("flannel.1", 1, 8472)]);
    o.tunnel_port = Some(8473);
    let fl = only(&detect(&o), "flannel").clone();
    assert_eq!(fl.severity, Severity::Info);
    assert!(fl.action.is_empty());
    o.tunnel_port = None;
    assert_eq!(only(&detect(&o), "flannel").severity, Severity::Info);
}

#[test]
fn cilium_with_bpf_host_routing_asks_for_legacy_routing() {
    let mut o = obs(vec![
        link("cilium_host", "veth"),
        link("cilium_net", "veth"),
        vxlan("cilium_vxlan", 0, 8472),
    ]);
    o.tunnel_port = Some(8473);
    o.cilium = CiliumSeen {
        host_routing: CiliumHostRouting::Bpf,
        detail: "/var/run/cilium/state/globals/node_config.h".into(),
    };
    let f = detect(&o);
    let c = only(&f, "cilium");
    assert_eq!(c.severity, Severity::Warning);
    assert!(
        c.evidence
            .contains(&"cilium_vxlan (vxlan external dstport 8472)".to_string())
    );
    assert!(
        c.evidence
            .iter()
            .any(|e| e.starts_with("host routing: BPF"))
    );
    for s in [
        "enable-host-legacy-routing: true",
        "bpf.hostLegacyRouting=true",
        "nonMasqueradeCIDRs",
        "ipv4-native-routing-cidr",
        "10.2.0.0/16",
    ] {
        assert!(c.action.contains(s), "{s} not in {}", c.action);
    }
}

#[test]
fn cilium_with_legacy_routing_asks_only_for_the_masquerade_ranges() {
    let mut o = obs(vec![link("cilium_host", "veth")]);
    o.cilium.host_routing = CiliumHostRouting::Legacy;
    let c = only(&detect(&o), "cilium").clone();
    assert!(
        !c.action.contains("enable-host-legacy-routing"),
        "{}",
        c.action
    );
    assert!(c.action.contains("nonMasqueradeCIDRs"), "{}", c.action);
}

#[test]
fn cilium_host_routing_unknown_says_so_with_the_setting_to_check() {
    let mut o = obs(vec![vxlan("cilium_vxlan", 0, 8472)]);
    o.cilium = CiliumSeen {
        host_routing: CiliumHostRouting::Unknown,
        detail: "/var/run/cilium/state/globals/node_config.h: No such file".into(),
    };
    let c = only(&detect(&o), "cilium").clone();
    assert!(
        c.evidence
            .iter()
            .any(|e| e.starts_with("host routing: unknown"))
    );
    assert!(
        c.action.starts_with("vxlan") || c.action.contains("cilium_vxlan holds UDP 8472"),
        "{}",
        c.action
    );
    assert!(c.action.contains("cannot tell"), "{}", c.action);
    assert!(
        c.action.contains("enable-host-legacy-routing: true"),
        "{}",
        c.action
    );
}

#[test]
fn node_config_h_tells_host_routing() {
    assert_eq!(
        cilium_host_routing("#define ENABLE_NODEPORT 1\n#define ENABLE_HOST_ROUTING 1\n"),
        CiliumHostRouting::Bpf
    );
    assert_eq!(
        cilium_host_routing("#define ENABLE_NODEPORT 1\n// ENABLE_HOST_ROUTING off\n"),
        CiliumHostRouting::Legacy
    );
}

#[test]
fn calico_without_pools_gives_the_ippool_yaml_to_check() {
    let mut o = obs(vec![
        vxlan("vxlan.calico", 4096, 4789),
        link("tunl0", "ipip"),
    ]);
    o.calico_pools = CalicoPools::Unknown("no Kubernetes API".into());
    let c = only(&detect(&o), "calico").clone();
    assert_eq!(c.severity, Severity::Warning);
    assert!(
        c.evidence.contains(&"tunl0 (IPIP)".to_string()),
        "{:?}",
        c.evidence
    );
    assert!(
        c.evidence
            .iter()
            .any(|e| e.contains("cannot tell (no Kubernetes API)"))
    );
    assert!(c.action.contains("cidr: 10.2.0.0/16"), "{}", c.action);
}

#[test]
fn calico_masquerades_remote_cidrs_not_covered_by_a_disabled_no_nat_pool() {
    let mut o = obs(vec![vxlan("vxlan.calico", 4096, 4789)]);
    o.remote_pod_cidrs = vec![net("10.2.0.0/16"), net("10.3.0.0/16")];
    let default = CalicoPool {
        name: "default-ipv4-ippool".into(),
        cidr: net("10.1.0.0/16"),
        nat_outgoing: true,
        disabled: false,
    };
    let exempt = CalicoPool {
        name: "podmesh-no-nat-10-2-0-0-16".into(),
        cidr: net("10.2.0.0/15"),
        nat_outgoing: false,
        disabled: true,
    };
    o.calico_pools = CalicoPools::Listed(vec![default.clone()]);
    let c = only(&detect(&o), "calico").clone();
    assert_eq!(c.severity, Severity::Warning);
    assert!(c.action.contains("cidr: 10.2.0.0/16") && c.action.contains("cidr: 10.3.0.0/16"));
    assert!(
        c.evidence
            .contains(&"IPPool default-ipv4-ippool 10.1.0.0/16 natOutgoing".to_string())
    );

    // 10.2.0.0/15 covers both.
    o.calico_pools = CalicoPools::Listed(vec![default.clone(), exempt.clone()]);
    let c = only(&detect(&o), "calico").clone();
    assert_eq!(c.severity, Severity::Info, "{c:?}");
    assert!(c.action.is_empty());

    // An enabled pool, or one with natOutgoing, does not exempt.
    for bad in [
        CalicoPool {
            disabled: false,
            ..exempt.clone()
        },
        CalicoPool {
            nat_outgoing: true,
            ..exempt.clone()
        },
    ] {
        o.calico_pools = CalicoPools::Listed(vec![default.clone(), bad]);
        assert_eq!(only(&detect(&o), "calico").severity, Severity::Warning);
    }

    // Without natOutgoing anywhere, nothing to do.
    o.calico_pools = CalicoPools::Listed(vec![CalicoPool {
        nat_outgoing: false,
        ..default
    }]);
    assert_eq!(only(&detect(&o), "calico").severity, Severity::Info);
}

#[test]
fn tunl0_alone_is_not_calico() {
    let f = detect(&obs(vec![link("tunl0", "ipip")]));
    assert_eq!(ids(&f), ["none"]);
}

#[test]
fn calico_is_recognised_by_its_pod_veths_and_cni_config() {
    let f = detect(&obs(vec![
        link("cali1a2b3c4d5e6", "veth"),
        link("cali9f8e7d6c5b4", "veth"),
    ]));
    assert!(
        only(&f, "calico")
            .evidence
            .contains(&"2 cali* pod veths".to_string())
    );
    let mut o = obs(vec![]);
    o.cni_configs = vec![parse_cni_config(
        "10-calico.conflist",
        r#"{"name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"bandwidth"}]}"#,
    )];
    only(&detect(&o), "calico");
}

#[test]
fn the_no_nat_pool_yaml_is_a_valid_ippool() {
    let y: serde_json::Value =
        podmesh_plumbing::yaml::from_str(&calico_no_nat_pool(&net("fd00:2::/56"))).unwrap();
    assert_eq!(y["apiVersion"], "crd.projectcalico.org/v1");
    assert_eq!(y["kind"], "IPPool");
    assert_eq!(y["metadata"]["name"], "podmesh-no-nat-fd00-2-56");
    assert_eq!(y["spec"]["cidr"], "fd00:2::/56");
    assert_eq!(y["spec"]["disabled"], true);
    assert_eq!(y["spec"]["natOutgoing"], false);
}

#[test]
fn ippool_objects_are_read_from_json() {
    let p = pool_from_json(&serde_json::json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool",
        "metadata": {"name": "default-ipv4-ippool"},
        "spec": {"cidr": "10.1.0.0/16", "natOutgoing": true, "ipipMode": "Always"}
    }))
    .unwrap();
    assert_eq!(
        p,
        CalicoPool {
            name: "default-ipv4-ippool".into(),
            cidr: net("10.1.0.0/16"),
            nat_outgoing: true,
            disabled: false
        }
    );
    assert!(pool_from_json(&serde_json::json!({"metadata": {"name": "x"}, "spec": {}})).is_none());
}

#[test]
fn kube_ipvs0_of_any_kind_is_kube_proxy_ipvs_and_needs_nothing() {
    for kind in ["dummy", "bridge"] {
        let f = detect(&obs(vec![link("kube-ipvs0", kind)]));
        let k = only(&f, "kube-ipvs");
        assert_eq!(k.severity, Severity::Info);
        assert!(k.action.is_empty());
        assert!(k.podmesh.contains("KUBE-POSTROUTING"));
    }
}

#[test]
fn bridge_conflist_with_ip_masq_and_cni0_are_one_bridge_finding() {
    let mut o = obs(vec![link("cni0", "bridge")]);
    o.cni_configs = vec![parse_cni_config("10-podnet.conflist", BRIDGE_CONFLIST)];
    let f = detect(&o);
    assert_eq!(ids(&f), ["bridge"]);
    assert_eq!(
        f[0].evidence,
        [
            "10-podnet.conflist: type bridge, ipMasq: true",
            "cni0 (bridge)"
        ]
    );
    assert!(f[0].podmesh.contains("with ipMasq"), "{}", f[0].podmesh);
    assert!(f[0].action.is_empty());
    // The bridge device alone (kubenet's cbr0 too) is enough.
    assert_eq!(ids(&detect(&obs(vec![link("cbr0", "bridge")]))), ["bridge"]);
}

#[test]
fn ptp_and_kindnet() {
    let mut o = obs(vec![]);
    o.cni_configs = vec![parse_cni_config(
        "10-kindnet.conflist",
        r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp","ipMasq":false,"ipam":{"type":"host-local"}},{"type":"portmap"}]}"#,
    )];
    let f = detect(&o);
    assert_eq!(ids(&f), ["ptp"]);
    assert!(f[0].evidence.contains(&"kindnet".to_string()));
    assert!(
        f[0].podmesh.contains("does not masquerade"),
        "{}",
        f[0].podmesh
    );
}

#[test]
fn aws_vpc_cni_by_its_conflist() {
    let mut o = obs(vec![link("eni1a2b3c4d5e6", "veth")]);
    o.cni_configs = vec![parse_cni_config(
        "10-aws.conflist",
        r#"{"cniVersion":"0.4.0","name":"aws-cni","plugins":[{"type":"aws-cni","vethPrefix":"eni","mtu":"9001"},{"type":"egress-cni"},{"type":"portmap"}]}"#,
    )];
    let f = detect(&o);
    assert_eq!(ids(&f), ["aws-vpc"]);
    assert!(f[0].evidence.contains(&"1 eni* pod veths".to_string()));
    assert!(f[0].podmesh.contains("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS"));
}

#[test]
fn findings_come_in_a_stable_order() {
    let mut o = obs(vec![
        link("cni0", "bridge"),
        link("kube-ipvs0", "dummy"),
        vxlan("vxlan.calico", 4096, 4789),
        vxlan("cilium_vxlan", 0, 8472),
        vxlan("flannel.1", 1, 8472),
    ]);
    o.cni_configs = vec![parse_cni_config("10-podnet.conflist", BRIDGE_CONFLIST)];
    assert_eq!(
        ids(&detect(&o)),
        ["flannel", "cilium", "calico", "kube-ipvs", "bridge"]
    );
}

#[test]
fn podmesh_devices_are_not_evidence() {
    let links = foreign_links(vec![
        vxlan("podmesh0", 0, 8472),
        vxlan("podmesh-vx", 1, 8472),
        link("eth0", "veth"),
    ]);
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].name, "eth0");
}

#[test]
fn cni_configs_parse_single_plugins_and_lists() {
    let c = parse_cni_config(
        "10-bridge.conf",
        r#"{"name":"n","type":"bridge","ipMasq":true,"bridge":"br9"}"#,
    );
    assert_eq!(
        c.plugins,
        [PluginSeen {
            ty: "bridge".into(),
            ip_masq: Some(true),
            bridge: Some("br9".into())
        }]
    );
    assert!(c.error.is_none());
    let c = parse_cni_config("10-podnet.conflist", BRIDGE_CONFLIST);
    assert_eq!(c.name.as_deref(), Some("podnet"));
    assert_eq!(
        c.plugins.iter().map(|p| p.ty.as_str()).collect::<Vec<_>>(),
        ["bridge", "portmap"]
    );
    assert!(
        parse_cni_config("x.json", r#"{"name":"n"}"#)
            .error
            .is_some()
    );
}

#[test]
fn a_finding_serialises_with_stable_names() {
    let f = &detect(&obs(vec![link("kube-ipvs0", "dummy")]))[0];
    let v = serde_json::to_value(f).unwrap();
    assert_eq!(v["cni"], "kube-ipvs");
    assert_eq!(v["severity"], "info");
    assert_eq!(v["evidence"][0], "kube-ipvs0 (dummy)");
    assert!(v["podmesh"].is_string() && v["action"] == "");
    let back: CniFinding = serde_json::from_value(v).unwrap();
    assert_eq!(&back, f);
}
