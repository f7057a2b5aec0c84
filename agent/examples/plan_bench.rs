//! The `plan check` benchmark behind `cargo xtask bench plan`: the O(n log n)
//! check against a naive pairwise check, measured side by side in one run.
//!
//! Run it through `cargo xtask bench plan` (release build). The `podmesh`
//! binary next to this example is timed end to end on the same plans.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use podmesh_agent::{
    plan::Plan,
    validate::{
        self, ClusterSpec, Finding, NodeMaskSize, capacity, cidr_findings,
        conflicts::{self, classify},
        identity,
        overlap::span,
    },
};

/// Clusters per generated plan (IDs stay within 1-255).
const CLUSTERS: usize = 200;
/// Largest plan the naive check runs on in full (100k: some 5·10⁹ pairs, tens
/// of seconds); bigger ones are extrapolated.
const NAIVE_FULL_MAX: usize = 100_000;
/// Size of the plan the naive time at larger sizes is extrapolated from.
const NAIVE_SAMPLE: usize = 20_000;

fn cidr(k: usize) -> IpNet {
    let i = (k / 2) as u128;
    if k.is_multiple_of(2) {
        let a = Ipv4Addr::from(0x0a00_0000u32 + ((i as u32) << 4));
        IpNet::V4(Ipv4Net::new(a, 28).unwrap())
    } else {
        let a = Ipv6Addr::from((0xfd00u128 << 112) | (i << 64));
        IpNet::V6(Ipv6Net::new(a, 64).unwrap())
    }
}

/// A plan of `n` CIDRs over [`CLUSTERS`] dual-stack clusters (80 % Pod, 10 %
/// service, 10 % node CIDRs); in n/1000 clusters (at least one) the first Pod
/// CIDR is copied from the previous cluster so that there are overlap
/// findings to produce.
fn generate(n: usize) -> Vec<ClusterSpec> {
    let per = n / CLUSTERS;
    let every = CLUSTERS / (n / 1000).clamp(1, CLUSTERS);
    let mut k = 0;
    let mut out: Vec<ClusterSpec> = Vec::with_capacity(CLUSTERS);
    for c in 0..CLUSTERS {
        let mut s = ClusterSpec {
            name: format!("cluster-{c}"),
            id: c as i64 + 1,
            node_mask_size: Some(NodeMaskSize {
                ipv4: Some(28),
                ipv6: Some(64),
            }),
            nodes: Some((per * 8 / 10 / 2 / 2) as u64),
            ..ClusterSpec::default()
        };
        for j in 0..per {
            let mut net = cidr(k);
            k += 1;
            if j < per * 8 / 10 {
                if j == 0 && c > 0 && c % every == 1 % every && !out[c - 1].pod_cidrs.is_empty() {
                    net = out[c - 1].pod_cidrs[0];
                }
                s.pod_cidrs.push(net);
            } else if j < per * 9 / 10 {
                s.service_cidrs.push(net);
            } else {
                s.node_cidrs.push(net);
            }
        }
        out.push(s);
    }
    out
}

/// The peer: every rule as `validate::check`, but overlaps by comparing every
/// pair of CIDRs (spans precomputed, so the peer is as fast as pairwise gets).
fn naive(clusters: &[ClusterSpec]) -> Vec<Finding> {
    let mut out = identity::check(clusters);
    out.extend(cidr_findings(clusters));
    let es = conflicts::entries(clusters);
    let spans: Vec<_> = es.iter().map(|e| span(&e.cidr)).collect();
    for i in 0..es.len() {
        let (fa, sa, ea) = spans[i];
        for j in i + 1..es.len() {
            let (fb, sb, eb) = spans[j];
            if fa == fb && sa <= eb && sb <= ea {
                out.extend(classify(clusters, &es[i], &es[j]));
            }
        }
    }
    out.extend(capacity::check(clusters));
    out.sort_by_key(|f| f.severity);
    out
}

fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        last = Some(v);
    }
    (best, last.expect("reps > 0"))
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes are numbers of CIDRs"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000, 100_000]
    } else {
        sizes
    };
    let exe = std::env::current_exe().expect("own path");
    let podmesh: PathBuf = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("podmesh"))
        .filter(|p| p.exists())
        .expect("the podmesh binary next to examples/ (cargo xtask bench plan builds both)");
    let dir = tempfile::tempdir().expect("temp dir");

    println!("plan check, {CLUSTERS} dual-stack clusters, best of several runs (release build)\n");
    println!(
        "{:>7}  {:>8}  {:>10}  {:>13}  {:>16}  {:>11}  {:>20}",
        "CIDRs",
        "findings",
        "parse YAML",
        "check (sweep)",
        "naive pairwise",
        "naive/sweep",
        "podmesh binary e2e"
    );
    let mut notes = Vec::new();
    for &n in &sizes {
        let clusters = generate(n);
        let plan = Plan { clusters };
        let yaml = serde_saphyr::to_string(&plan).expect("plan serializes");
        let file = dir.path().join(format!("plan-{n}.yaml"));
        std::fs::write(&file, &yaml).expect("write plan");
        let reps = if n >= 100_000 { 5 } else { 20 };
        let (t_parse, parsed) = best(reps.min(5), || Plan::parse(&yaml, &file).expect("parses"));
        assert_eq!(parsed, plan, "YAML round trip");
        let (t_check, findings) = best(reps, || validate::check(&plan.clusters));
        let (t_naive, naive_note) = if n <= NAIVE_FULL_MAX {
            let reps = if n <= 1_000 {
                20
            } else if n <= 10_000 {
                2
            } else {
                1
            };
            let (t, nf) = best(reps, || naive(&plan.clusters));
            assert_eq!(nf, findings, "naive and sweep agree at {n}");
            (t, String::new())
        } else {
            let sample = Plan {
                clusters: generate(NAIVE_SAMPLE),
            };
            let (t, _) = best(1, || naive(&sample.clusters));
            let f = (n as f64 / NAIVE_SAMPLE as f64).powi(2);
            notes.push(format!(
                "* naive at {n}: measured {} on {NAIVE_SAMPLE} CIDRs, extrapolated x{f:.0} (pairs grow as n²)",
                ms(t)
            ));
            (t.mul_f64(f), " *".to_string())
        };
        let (t_e2e, status) = best(3, || {
            Command::new(&podmesh)
                .args(["plan", "check", "-o", "json"])
                .arg(&file)
                .stdout(Stdio::null())
                .status()
                .expect("run podmesh")
        });
        assert_eq!(
            status.code(),
            Some(1),
            "the generated plans have overlap errors"
        );
        let errors = findings
            .iter()
            .filter(|f| f.severity == validate::Severity::Error)
            .count();
        println!(
            "{:>7}  {:>8}  {:>10}  {:>13}  {:>16}  {:>10.0}x  {:>20}",
            n,
            format!("{}/{errors}e", findings.len()),
            ms(t_parse),
            ms(t_check),
            format!("{}{naive_note}", ms(t_naive)),
            t_naive.as_secs_f64() / t_check.as_secs_f64(),
            ms(t_e2e),
        );
    }
    println!();
    for n in notes {
        println!("{n}");
    }
    println!(
        "check = validate::check on a parsed plan (all rules); naive = the same rules with every pair of CIDRs compared;"
    );
    println!("e2e = `podmesh plan check -o json` on the YAML file (read, parse, check, print).");
}
