//! The layers that need no network, on made-up input: the Secret entry's
//! certificates, the agent's status, desired against installed, the report.
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use super::{Check, Layer, Report, Severity, check, config, datapath, render, sync};
use crate::{
    datapath::rtnl::{Link, Route},
    desired::{RecordOutcome, RecordState, Rejection},
    kvstore::client_config::EtcdClientConfig,
    remote::secret::{Listed, RemoteFile},
    status::{RemoteStatus, RouteStatus, StatusReport, agent_info::AgentInfo},
};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(p, key),
        pem,
    }
}

/// A client certificate of `ca` (PEM cert, PEM key); `days` of validity left (negative: expired).
fn client(ca: &Ca, days: i64) -> (String, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "east-agents");
    p.extended_key_usages
        .push(ExtendedKeyUsagePurpose::ClientAuth);
    // rcgen's dates, without naming the time crate's type.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |secs: i64| epoch + std::time::Duration::from_secs(secs as u64);
    p.not_before = at(now - 400 * 86_400);
    p.not_after = at(now + days * 86_400 + 3_600);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A Secret entry `west` in `dir` with these files.
fn entry(dir: &Path, ca: &str, cert: &str, key: &str) -> Listed {
    std::fs::write(dir.join("west.ca.crt"), ca).unwrap();
    std::fs::write(dir.join("west.client.crt"), cert).unwrap();
    std::fs::write(dir.join("west.client.key"), key).unwrap();
    let yaml = "endpoints: [https://10.0.0.1:2379]\ntrusted-ca-file: west.ca.crt\ncert-file: west.client.crt\nkey-file: west.client.key\n";
    std::fs::write(dir.join("west"), yaml).unwrap();
    let path = dir.join("west");
    Listed::File(RemoteFile {
        config: EtcdClientConfig::parse(yaml.as_bytes(), &path).map_err(|e| e.to_string()),
        path,
        fingerprint: 0,
    })
}

fn last(checks: &[Check]) -> (&'static str, bool, Severity, String) {
    let c = checks.last().unwrap();
    (c.check, c.ok, c.severity, c.evidence.clone())
}

#[test]
fn config_layer_tells_each_certificate_problem() {
    let d = tempfile::tempdir().unwrap();
    let west = ca("west proxy CA");
    let (cert, key) = client(&west, 300);
    let good = config::check_entry(
        "west",
        &entry(d.path(), &west.pem, &cert, &key),
        Some("east"),
    );
    assert!(good.iter().all(|c| c.ok), "{good:#?}");
    assert!(good.iter().any(|c| c.check == check::CERT_CHAIN));

    let (old, old_key) = client(&west, -3);
    let c = config::check_entry("west", &entry(d.path(), &west.pem, &old, &old_key), None);
    let (name, ok, sev, ev) = last(&c);
    assert!(
        name == check::CERT_EXPIRY && !ok && sev == Severity::Error && ev.contains("expired"),
        "{c:#?}"
    );

    let (soon, soon_key) = client(&west, 10);
    let c = config::check_entry("west", &entry(d.path(), &west.pem, &soon, &soon_key), None);
    let w = c.iter().find(|c| c.check == check::CERT_EXPIRY).unwrap();
    assert!(
        !w.ok && w.severity == Severity::Warning && w.evidence.contains("expires in"),
        "{w:#?}"
    );

    let c = config::check_entry("west", &entry(d.path(), &west.pem, &cert, &old_key), None);
    let (name, ok, ..) = last(&c);
    assert!(name == check::CERT_KEY_PAIR && !ok, "{c:#?}");

    let other = ca("someone else");
    let (foreign, foreign_key) = client(&other, 300);
    let c = config::check_entry(
        "west",
        &entry(d.path(), &west.pem, &foreign, &foreign_key),
        None,
    );
    let (name, ok, sev, ev) = last(&c);
    assert!(
        name == check::CERT_CHAIN && !ok && sev == Severity::Warning && ev.contains("someone else"),
        "{c:#?}"
    );

    let c = config::check_entry(
        "east",
        &entry(d.path(), &west.pem, &cert, &key),
        Some("east"),
    );
    let (name, ok, ..) = last(&c);
    assert!(name == check::LOCAL_CLUSTER_LISTED && !ok, "{c:#?}");

    let c = config::check_entry("west", &entry(d.path(), "not pem", &cert, &key), None);
    let (name, ok, ..) = last(&c);
    assert!(name == check::TLS_FILES && !ok, "{c:#?}");
}

#[test]
fn ignored_secret_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("west.yaml"), "endpoints: [https://a:1]\n").unwrap();
    let mut checks = Vec::new();
    let s = config::read_dir(d.path(), &mut checks).unwrap();
    assert!(s.entries.is_empty());
    assert!(
        checks
            .iter()
            .any(|c| c.check == check::SECRET_ENTRY_IGNORED && c.evidence.contains("west.yaml")),
        "{checks:#?}"
    );
}

fn status_with(remote: RemoteStatus) -> StatusReport {
    StatusReport {
        remotes: [(remote.name.clone(), remote)].into(),
        ..StatusReport::default()
    }
}

#[test]
fn sync_layer_reads_the_agent_view() {
    let down = RemoteStatus {
        name: "west".into(),
        last_error: Some("connection refused (hint: …)".into()),
        failures: 4,
        ..RemoteStatus::default()
    };
    let c = sync::check_cluster("west", &status_with(down));
    assert!(
        c.len() == 1
            && c[0].check == check::CONNECTED
            && c[0].is_failure()
            && c[0].evidence.contains("refused"),
        "{c:#?}"
    );

    let up = RemoteStatus {
        name: "west".into(),
        connected: true,
        synced: true,
        entries: 3,
        records: vec![RecordOutcome {
            cluster: "west".into(),
            key: "podmesh/v1/nodes/west/rogue".into(),
            kind: "node".into(),
            name: Some("rogue".into()),
            addresses: vec![],
            pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
            state: RecordState::Rejected(Rejection::new("pod-cidr-overlap", "overlaps east")),
        }],
        ..RemoteStatus::default()
    };
    let c = sync::check_cluster("west", &status_with(up));
    assert!(!c.iter().any(Check::is_failure), "{c:#?}");
    let r = c
        .iter()
        .find(|c| c.check == check::REJECTED_RECORD)
        .unwrap();
    assert!(
        r.severity == Severity::Warning
            && r.evidence.contains("pod-cidr-overlap")
            && r.evidence.contains("10.1.0.0/24"),
        "{r:#?}"
    );
    let c = sync::check_cluster(
        "north",
        &status_with(RemoteStatus {
            name: "west".into(),
            ..RemoteStatus::default()
        }),
    );
    assert!(c[0].is_failure(), "{c:#?}");
}

fn route(cidr: &str, node: &str, addr: &str, mac: &str) -> RouteStatus {
    RouteStatus {
        cidr: cidr.parse().unwrap(),
        cluster: "west".into(),
        node: node.into(),
        node_addr: addr.parse().unwrap(),
        vtep_mac: Some(mac.into()),
        wireguard_public_key: None,
    }
}

#[test]
fn entries_compare_desired_with_installed_per_mode() {
    let s = StatusReport {
        routes: vec![route(
            "10.2.0.0/24",
            "w0",
            "172.31.2.1",
            "02:00:00:00:00:01",
        )],
        ..StatusReport::default()
    };
    let cidr: ipnet::IpNet = "10.2.0.0/24".parse().unwrap();
    let addr: IpAddr = "172.31.2.1".parse().unwrap();
    let mac = [2, 0, 0, 0, 0, 1];
    let dev = Link {
        index: 7,
        name: "podmesh0".into(),
        flags: 1,
        mtu: 1450,
        mac: vec![],
        kind: None,
        vxlan: None,
    };
    let ebpf = AgentInfo {
        datapath: "ebpf".into(),
        ..AgentInfo::default()
    };
    let mut inst = datapath::Installed {
        device: Some(dev),
        routes: [(
            cidr,
            Route {
                dst: cidr,
                oif: Some(7),
                nhid: None,
                mtu: None,
            },
        )]
        .into(),
        lpm: Some(Ok([(cidr, (addr, mac))].into())),
        ..Default::default()
    };
    assert!(datapath::check_entries("west", &s, &ebpf, &inst).ok);
    inst.lpm = Some(Ok(BTreeMap::new()));
    let c = datapath::check_entries("west", &s, &ebpf, &inst);
    assert!(
        c.is_failure()
            && c.evidence
                .contains("10.2.0.0/24 (node w0): no entry in the LPM map"),
        "{c:#?}"
    );
    inst.routes.clear();
    let c = datapath::check_entries("west", &s, &ebpf, &inst);
    assert!(c.evidence.contains("no route"), "{c:#?}");

    // An entry no remote wants: a warning of the node.
    let extra: ipnet::IpNet = "10.9.0.0/24".parse().unwrap();
    let stale = datapath::Installed {
        routes: [
            (
                cidr,
                Route {
                    dst: cidr,
                    oif: Some(7),
                    nhid: None,
                    mtu: None,
                },
            ),
            (
                extra,
                Route {
                    dst: extra,
                    oif: Some(7),
                    nhid: None,
                    mtu: None,
                },
            ),
        ]
        .into(),
        lpm: Some(Ok([(cidr, (addr, mac))].into())),
        ..Default::default()
    };
    let c = datapath::node_checks(&s, &ebpf, &Ok(stale));
    let st = c
        .iter()
        .find(|c| c.check == check::STALE_ENTRIES)
        .expect("stale-entries");
    assert!(
        st.severity == Severity::Warning
            && st.evidence.contains("route 10.9.0.0/24")
            && !st.evidence.contains("10.2.0.0"),
        "{st:#?}"
    );

    // The tunnel device's MTU with VXLAN against the underlay's.
    let narrow = datapath::Installed {
        device: Some(Link {
            index: 7,
            name: "podmesh0".into(),
            flags: 1,
            mtu: 1450,
            mac: vec![],
            kind: None,
            vxlan: None,
        }),
        underlay: Some(("eth0".into(), 1400)),
        ..Default::default()
    };
    let c = datapath::node_checks(&s, &ebpf, &Ok(narrow));
    let m = c
        .iter()
        .find(|c| c.check == check::TUNNEL_MTU)
        .expect("tunnel-mtu");
    assert!(
        !m.ok && m.severity == Severity::Warning && m.evidence.contains("eth0's MTU 1400"),
        "{m:#?}"
    );

    let vxlan = AgentInfo {
        datapath: "vxlan".into(),
        ..AgentInfo::default()
    };
    let mut inst = datapath::Installed {
        routes: [(
            cidr,
            Route {
                dst: cidr,
                oif: None,
                nhid: Some(0x5000_0001),
                mtu: None,
            },
        )]
        .into(),
        nexthops: [(0x5000_0001, addr)].into(),
        neighbours: [(addr, mac)].into(),
        fdb: [(mac, addr)].into(),
        ..Default::default()
    };
    assert!(datapath::check_entries("west", &s, &vxlan, &inst).ok);
    inst.fdb.clear();
    let c = datapath::check_entries("west", &s, &vxlan, &inst);
    assert!(c.is_failure() && c.evidence.contains("fdb"), "{c:#?}");
    inst.nexthops
        .insert(0x5000_0001, "172.31.2.9".parse().unwrap());
    let c = datapath::check_entries("west", &s, &vxlan, &inst);
    assert!(c.evidence.contains("via 172.31.2.9"), "{c:#?}");
}

#[test]
fn report_fails_only_on_errors_and_the_table_shows_fixes() {
    let warn = Check::warn(
        Layer::Config,
        Some("west"),
        check::CERT_EXPIRY,
        "expires in 3 days",
        "renew",
    );
    let r = Report::new(vec![
        Check::pass(Layer::Reach, Some("west"), check::TCP, "connected"),
        warn.clone(),
    ]);
    assert!(r.ok);
    let fail = Check::fail(
        Layer::Authz,
        Some("west"),
        check::WRITE_REFUSED,
        "accepted a write",
        "use the proxy",
    );
    let r = Report::new(vec![warn, fail]);
    assert!(!r.ok);
    let t = render::table(&r);
    assert!(
        t.contains("FAIL") && t.contains("fix: use the proxy") && t.contains("WARN"),
        "{t}"
    );
    let j: serde_json::Value = serde_json::from_str(&render::json(&r)).unwrap();
    assert_eq!(j["ok"], false);
    let c = &j["checks"][1];
    for k in [
        "layer", "cluster", "check", "ok", "severity", "evidence", "fix",
    ] {
        assert!(c.get(k).is_some(), "no {k} in {c}");
    }
    assert_eq!(c["layer"], "authz");
    assert_eq!(c["severity"], "error");
}
