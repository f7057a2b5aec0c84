//! `podmesh status`: the agent's `/status`, as a table or as JSON.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::Duration,
};

use crate::{desired::RecordState, status::StatusReport};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// The `/status` document.
    Json,
}

/// `podmesh status` arguments.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's status address (its --status-addr).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Fetching or reading the status failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The agent is not reachable.
    #[error(
        "cannot reach the agent at {addr}: {source} (is podmesh-agent running with --status-addr {addr}?)"
    )]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not a status document.
    #[error("{addr} did not answer with a podmesh status: {message}")]
    Answer {
        /// The address.
        addr: String,
        /// What was wrong.
        message: String,
    },
}

/// GETs `/status` from `addr` (plain HTTP/1.1 on loopback or the pod network).
pub fn fetch(addr: &str) -> Result<StatusReport, StatusError> {
    let connect = |source| StatusError::Connect {
        addr: addr.to_string(),
        source,
    };
    let sa: SocketAddr = addr
        .to_socket_addrs()
        .map_err(connect)?
        .next()
        .ok_or_else(|| connect(std::io::Error::other("no address")))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(connect)?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .map_err(connect)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(connect)?;
    let answer = |message: String| StatusError::Answer {
        addr: addr.to_string(),
        message,
    };
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| answer("no HTTP response".into()))?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let body = &buf[split + 4..];
    if !head.starts_with("HTTP/1.1 200") {
        return Err(answer(head.lines().next().unwrap_or("").to_string()));
    }
    // Chunk sizes count bytes, and a chunk may end inside a multi-byte
    // character: the body is joined as bytes, then read as UTF-8.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_vec()
    };
    serde_json::from_slice(&body).map_err(|e| answer(e.to_string()))
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let Some(n) = std::str::from_utf8(&s[..eol])
            .ok()
            .and_then(|len| usize::from_str_radix(len.trim(), 16).ok())
        else {
            break;
        };
        let rest = &s[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Renders the status as tables.
pub fn table(s: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cluster {}  node {}  published: {}  ready: {}  routes: {}",
        s.local.cluster,
        s.local.node,
        yes(s.local.published),
        yes(s.ready),
        s.routes_installed
    );
    if let Some(p) = &s.local.node_error {
        let _ = writeln!(o, "node NOT READ [{}]: {}", p.code, p.message);
    }
    if !s.local.pod_cidrs_outside_cluster.is_empty() {
        let _ = writeln!(
            o,
            "node REJECTED by remote clusters: {}",
            crate::status::outside_message(&s.local.pod_cidrs_outside_cluster)
        );
    }
    if let Some(e) = &s.local.last_error
        && s.local.node_error.as_ref().is_none_or(|p| &p.message != e)
    {
        let _ = writeln!(o, "local error: {e}");
    }
    if let Some(c) = &s.local.cluster_record_conflict {
        let _ = writeln!(o, "cluster record conflict: {c}");
    }
    if let Some(e) = &s.datapath_error {
        let _ = writeln!(o, "datapath error: {e}");
    }
    if !s.strict_rp_filter.is_empty() {
        let _ = writeln!(
            o,
            "strict rp_filter on: {} (packets from remote pods routed back through another device are dropped; see net.ipv4.conf.<device>.rp_filter)",
            s.strict_rp_filter.join(", ")
        );
    }
    if let Some(x) = &s.masquerade_exemption {
        match &x.error {
            None => {
                let _ = writeln!(
                    o,
                    "pod sources kept: {} remote Pod CIDRs exempt from masquerade (nft table inet podmesh{})",
                    x.cidrs,
                    if x.repairs > 0 {
                        format!(", repaired {} times", x.repairs)
                    } else {
                        String::new()
                    }
                );
            }
            Some(e) => {
                let _ = writeln!(o, "masquerade exemption FAILED: {e}");
            }
        }
    }
    let _ = writeln!(
        o,
        "\n{:<20} {:<9} {:<6} {:>7} {:>10} {:>8}  LAST ERROR",
        "REMOTE", "CONNECTED", "SYNCED", "ENTRIES", "PROGRAMMED", "REJECTED"
    );
    for r in s.remotes.values() {
        let rejected: usize = r.rejected_by_reason.values().sum();
        let _ = writeln!(
            o,
            "{:<20} {:<9} {:<6} {:>7} {:>10} {:>8}  {}",
            r.name,
            yes(r.connected),
            yes(r.synced),
            r.entries,
            r.nodes_programmed,
            rejected,
            r.last_error.as_deref().unwrap_or("-")
        );
        if r.empty_grace_until.is_some() {
            let _ = writeln!(
                o,
                "{:<20} came back empty: keeping its routes for the grace period",
                ""
            );
        }
    }
    cni_table(&mut o, &s.cni);
    let rejected: Vec<_> = s
        .remotes
        .values()
        .flat_map(|r| r.records.iter())
        .filter_map(|r| match &r.state {
            RecordState::Rejected(j) => Some((r, j)),
            RecordState::Programmed => None,
        })
        .collect();
    if !rejected.is_empty() {
        let _ = writeln!(o, "\nREJECTED RECORDS");
        for (r, j) in rejected {
            let _ = writeln!(o, "{}  [{}]  {}", r.key, j.code, j.message);
        }
    }
    o
}

/// The node's CNI findings: one line per CNI, then what podmesh did and
/// what the operator must set.
fn cni_table(o: &mut String, findings: &[crate::cni::CniFinding]) {
    use std::fmt::Write as _;
    if findings.is_empty() {
        return;
    }
    let _ = writeln!(o, "\n{:<10} {:<8} EVIDENCE", "CNI", "SEVERITY");
    for f in findings {
        let _ = writeln!(
            o,
            "{:<10} {:<8} {}",
            f.cni,
            f.severity,
            f.evidence.join("; ")
        );
        let _ = writeln!(o, "{:<19} podmesh: {}", "", f.podmesh);
        if !f.action.is_empty() {
            let mut lines = f.action.lines();
            let _ = writeln!(o, "{:<19} action: {}", "", lines.next().unwrap_or_default());
            for l in lines {
                let _ = writeln!(o, "{:<19}   {l}", "");
            }
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Runs `podmesh status`; returns the exit code (0 ready, 1 not ready, 2 unreachable).
pub fn run(a: &StatusArgs) -> u8 {
    match fetch(&a.addr) {
        Ok(s) => {
            match a.output {
                Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default())
                }
                Output::Table => print!("{}", table(&s)),
            }
            u8::from(!s.ready)
        }
        Err(e) => {
            eprintln!("podmesh status: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_each_cni_finding_with_its_action() {
        use crate::cni::{CniFinding, Severity};
        let s = StatusReport {
            cni: vec![CniFinding {
                cni: "calico".into(),
                severity: Severity::Warning,
                evidence: vec!["vxlan.calico (vxlan id 4096 dstport 4789)".into()],
                podmesh: "…".into(),
                action: "create:\nkind: IPPool".into(),
            }],
            ..StatusReport::default()
        };
        let t = table(&s);
        assert!(t.contains("calico     warning  vxlan.calico"), "{t}");
        assert!(t.contains("action: create:"), "{t}");
        assert!(t.contains("  kind: IPPool"), "{t}");
    }

    #[test]
    fn an_old_status_document_without_cni_still_parses() {
        let s: StatusReport = serde_json::from_str(
            r#"{"version":"0.1.0","ready":true,"local":{"cluster":"east","node":"n1","published":true,"lease":null,"publications":1,"cluster_record_conflict":null,"last_error":null},"remotes":{},"routes":[],"datapath_error":null}"#,
        )
        .unwrap();
        assert!(s.cni.is_empty());
    }

    #[test]
    fn the_table_says_why_the_node_is_not_read_and_what_is_out_of_range() {
        use crate::status::{LocalProblem, LocalStatus};
        let s = StatusReport {
            local: LocalStatus {
                node_error: Some(LocalProblem {
                    code: "kubernetes-forbidden".into(),
                    message: "grant list and watch on nodes".into(),
                }),
                last_error: Some("grant list and watch on nodes".into()),
                pod_cidrs_outside_cluster: vec!["fd00:9::/64".parse().unwrap()],
                ..LocalStatus::default()
            },
            ..StatusReport::default()
        };
        let t = table(&s);
        assert!(
            t.contains("node NOT READ [kubernetes-forbidden]: grant list and watch on nodes"),
            "{t}"
        );
        assert!(t.contains("Pod CIDRs fd00:9::/64"), "{t}");
        assert!(!t.contains("local error"), "said once: {t}");
        let s = StatusReport {
            local: LocalStatus {
                last_error: Some("etcd down".into()),
                ..LocalStatus::default()
            },
            ..StatusReport::default()
        };
        assert!(table(&s).contains("local error: etcd down"));
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }

    /// A chunk boundary inside a multi-byte character (`é` is two bytes).
    #[test]
    fn dechunks_a_character_split_across_chunks() {
        let body = "{\"x\":\"é\"}".as_bytes();
        let at = body.iter().position(|b| *b == 0xc3).expect("é") + 1;
        let mut chunked = Vec::new();
        for part in [&body[..at], &body[at..]] {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(dechunk(&chunked), body);
    }
}
