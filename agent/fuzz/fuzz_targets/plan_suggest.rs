//! A plan from arbitrary bytes plus a request: every suggestion is free, aligned and in range.
#![no_main]

use std::path::Path;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use podmesh_agent::{
    plan::{
        Plan,
        suggest::{default_within, suggest},
    },
    validate::{cidr::reserved_ranges, overlap::overlaps},
};

fuzz_target!(|data: &[u8]| {
    let [len, count, fam, rest @ ..] = data else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(plan) = Plan::parse(text, Path::new("fuzz.yaml")) else {
        return;
    };
    let family = match fam % 3 {
        0 => None,
        1 => Some(4),
        _ => Some(6),
    };
    let len = len % 129;
    let count = usize::from(count % 32);
    let Ok(got) = suggest(&plan, len, &[], count, family) else {
        return;
    };
    assert!(got.len() <= count);
    let v6 = family == Some(6);
    let within = default_within(v6);
    let used: Vec<IpNet> = plan
        .clusters
        .iter()
        .flat_map(|c| c.pod_cidrs.iter().chain(&c.service_cidrs).chain(&c.node_cidrs))
        .filter(|n| n.prefix_len() > 0)
        .copied()
        .chain(reserved_ranges().into_iter().map(|(r, _)| r))
        .collect();
    for (i, b) in got.iter().enumerate() {
        assert_eq!(b.prefix_len(), len);
        assert_eq!(*b, b.trunc(), "aligned");
        assert!(within.iter().any(|w| w.contains(b)), "{b} inside the search space");
        assert!(used.iter().all(|u| !overlaps(u, b)), "{b} is free");
        assert!(got[..i].iter().all(|o| !overlaps(o, b)), "{b} suggested once");
    }
});
