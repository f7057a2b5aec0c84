//! Arbitrary remote entries (key line + value) through the decoder and the
//! desired state: never panic; a rejected record never becomes a route; the
//! incremental engine agrees with the full computation.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use podmesh_agent::{
    desired::{self, Decoded, LocalRanges, RecordState, RemoteEntries, decode::decode, live::Live},
    model::cluster_key,
};

fuzz_target!(|data: &[u8]| {
    // First line: the key; the rest: the value. A second entry follows a NUL.
    let mut remote = RemoteEntries {
        synced_once: true,
        ..RemoteEntries::default()
    };
    remote.entries.insert(
        cluster_key("east"),
        decode(
            "east",
            &cluster_key("east"),
            br#"{"name":"east","id":1,"podCIDRs":["10.1.0.0/16","fd00:1::/56"],"serviceCIDRs":[]}"#,
            1,
            1,
        ),
    );
    for (i, part) in data.split(|b| *b == 0).take(4).enumerate() {
        let (key, value) = match part.iter().position(|b| *b == b'\n') {
            Some(p) => (&part[..p], &part[p + 1..]),
            None => (part, &[][..]),
        };
        let key = String::from_utf8_lossy(key).into_owned();
        let e = decode("east", &key, value, 2 + i as i64, 2 + i as i64);
        if let Decoded::Invalid(r) = &e.decoded {
            assert!(!r.code.is_empty() && !r.message.is_empty());
        }
        remote.entries.insert(key, e);
    }
    let mut remotes = BTreeMap::new();
    remotes.insert("east".to_string(), remote);
    let local = LocalRanges {
        cluster: "home".into(),
        cluster_id: 9,
        pod: vec!["10.9.0.0/16".parse().unwrap()],
        service: vec!["10.96.0.0/12".parse().unwrap()],
        node: vec!["192.168.9.1/32".parse().unwrap()],
    };
    let d = desired::desired(&local, &remotes, &BTreeMap::new());
    for r in &d.records {
        if let RecordState::Rejected(_) = r.state {
            for c in &r.pod_cidrs {
                assert!(
                    d.routes
                        .get(c)
                        .is_none_or(|x| x.node != r.name.clone().unwrap_or_default()),
                    "rejected {} programmed",
                    r.key
                );
            }
        }
    }
    for (cidr, route) in &d.routes {
        assert!(cidr.prefix_len() > 0, "default route programmed");
        assert_eq!(route.cidr, *cidr);
        assert!(
            !local
                .pod
                .iter()
                .any(|l| l.contains(cidr) || cidr.contains(l))
        );
    }
    let ops = desired::diff(&BTreeMap::new(), &d.routes);
    assert_eq!(ops.upsert.len(), d.routes.len());
    // The incremental engine the agent runs agrees with the full computation.
    let mut live = Live::new(local.clone(), Vec::new());
    let step = live.step(&remotes, Default::default());
    assert_eq!(step.ops.upsert.len(), d.routes.len());
    assert_eq!(live.routes(&remotes), d.routes);
    assert_eq!(live.records(&remotes), d.records);
});
