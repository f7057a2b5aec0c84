//! `podmesh status`: the agent's `/status`, as a table or as JSON.
use std::time::Duration;

use crate::{
    desired::RecordState,
    status::{StatusQuery, StatusReport},
};

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
    /// Only this remote cluster's records and routes (`/status?cluster=NAME`).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Only rejected records, and no routes (`/status?rejected=true`).
    #[arg(long)]
    pub rejected: bool,
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

/// GETs `/status` from `addr` (HTTP/1.1 on loopback or the pod network).
///
/// Blocking, for the CLI and for callers inside or outside a runtime: the
/// request runs on a thread of its own with a current-thread runtime.
pub fn fetch(addr: &str) -> Result<StatusReport, StatusError> {
    fetch_query(addr, &StatusQuery::default())
}

/// [`fetch`] with a query (one cluster, rejected records only, summary).
pub fn fetch_query(addr: &str, q: &StatusQuery) -> Result<StatusReport, StatusError> {
    let owned = addr.to_string();
    let q = q.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| StatusError::Connect {
                    addr: owned.clone(),
                    source,
                })?
                .block_on(fetch_async_query(&owned, &q))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(StatusError::Answer {
                addr: addr.to_string(),
                message: "the request thread panicked".into(),
            })
        })
    })
}

/// GETs `/status` from `addr` with hyper's HTTP/1.1 client: 5 s to connect,
/// 10 s for the whole answer.
pub async fn fetch_async(addr: &str) -> Result<StatusReport, StatusError> {
    fetch_async_query(addr, &StatusQuery::default()).await
}

/// The path and query of `q`.
fn status_path(q: &StatusQuery) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &q.cluster {
        // Cluster names are DNS labels: nothing to escape.
        parts.push(format!("cluster={c}"));
    }
    if q.rejected {
        parts.push("rejected=true".into());
    }
    if q.summary {
        parts.push("summary=true".into());
    }
    if parts.is_empty() {
        "/status".into()
    } else {
        format!("/status?{}", parts.join("&"))
    }
}

/// [`fetch_async`] with a query; an agent busy answering other full status
/// calls (503) is asked again, up to 5 times, a second apart.
pub async fn fetch_async_query(addr: &str, q: &StatusQuery) -> Result<StatusReport, StatusError> {
    let mut tries = 0;
    loop {
        match fetch_once(addr, q).await {
            Err(StatusError::Answer { message, .. }) if message.starts_with(BUSY) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

async fn fetch_once(addr: &str, q: &StatusQuery) -> Result<StatusReport, StatusError> {
    use http_body_util::BodyExt as _;

    let connect = |source| StatusError::Connect {
        addr: addr.to_string(),
        source,
    };
    let answer = |message: String| StatusError::Answer {
        addr: addr.to_string(),
        message,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| connect(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
        .map_err(connect)?;
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| answer(e.to_string()))?;
        // The connection task ends with the response (Connection: close).
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get(status_path(q))
            .header(hyper::header::HOST, addr)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONNECTION, "close")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| answer(e.to_string()))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| answer(e.to_string()))?;
        let status = res.status();
        // The agent answers 503 with Retry-After while it builds as many
        // full answers as it will at once.
        let busy = status == hyper::StatusCode::SERVICE_UNAVAILABLE
            && res.headers().contains_key(hyper::header::RETRY_AFTER);
        // Chunked or not, hyper hands over the body's bytes; they are read
        // as UTF-8 only once whole.
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| answer(e.to_string()))?
            .to_bytes();
        conn.abort();
        if busy {
            return Err(answer(format!("{BUSY}HTTP {status}")));
        }
        if status != hyper::StatusCode::OK {
            return Err(answer(format!("HTTP {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| answer(e.to_string()))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| answer(format!("no answer within {ANSWER_TIMEOUT:?}")))?
}

/// How a busy agent's answer starts (retried).
const BUSY: &str = "busy answering other /status calls: ";

/// How long `podmesh status` waits for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it waits for the whole answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Renders the status as tables.
pub fn table(s: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cluster {}  node {}  published: {}  ready: {}  routes: {}",
        safe(&s.local.cluster),
        safe(&s.local.node),
        yes(s.local.published),
        yes(s.ready),
        s.routes_installed
    );
    if let Some(p) = &s.local.node_error {
        let _ = writeln!(o, "node NOT READ [{}]: {}", safe(&p.code), safe(&p.message));
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
        let _ = writeln!(o, "local error: {}", safe(e));
    }
    if let Some(c) = &s.local.cluster_record_conflict {
        let _ = writeln!(o, "cluster record conflict: {}", safe(c));
    }
    for (what, p) in &s.secret_problems {
        let _ = writeln!(o, "clustermesh Secret ({}): {}", safe(what), safe(p));
    }
    if let Some(e) = &s.datapath_error {
        let _ = writeln!(o, "datapath error: {}", safe(e));
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
                let _ = writeln!(o, "masquerade exemption FAILED: {}", safe(e));
            }
        }
    }
    if let Some(w) = &s.wireguard {
        let _ = writeln!(
            o,
            "encryption: WireGuard ({}, port {}{}), {} remote nodes encrypted{}",
            w.backend,
            w.port,
            if w.strict { ", strict" } else { "" },
            w.peers.len(),
            if w.unencrypted.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} IN CLEAR (no key): {}",
                    w.unencrypted.len(),
                    safe(&w.unencrypted.join(", "))
                )
            }
        );
        if let Some(e) = &w.error {
            let _ = writeln!(o, "WireGuard device unreadable: {}", safe(e));
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
            safe(&r.name),
            yes(r.connected),
            yes(r.synced),
            r.entries,
            r.nodes_programmed,
            rejected,
            safe(r.last_error.as_deref().unwrap_or("-"))
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
            let _ = writeln!(
                o,
                "{}  [{}]  {}",
                safe(&r.key),
                safe(&j.code),
                safe(&j.message)
            );
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

/// `text` with every control character (newline, ESC, …) and every
/// bidirectional override written as an escape: keys, names and messages
/// come from remote clusters and must not move the cursor, colour the
/// terminal or forge a line of the table.
pub fn safe(text: &str) -> std::borrow::Cow<'_, str> {
    let bad =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Runs `podmesh status`; returns the exit code (0 ready, 1 not ready, 2 unreachable).
pub fn run(a: &StatusArgs) -> u8 {
    let q = StatusQuery {
        cluster: a.cluster.clone(),
        rejected: a.rejected,
        summary: false,
    };
    match fetch_query(&a.addr, &q) {
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

    /// Serves one raw HTTP answer on a loopback port; returns the address.
    async fn serve_once(answer: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(&answer).await.unwrap();
            let _ = s.shutdown().await;
        });
        addr
    }

    /// A chunk boundary inside a multi-byte character (`é` is two bytes):
    /// the body is read whole before it is read as UTF-8.
    #[tokio::test]
    async fn a_chunked_answer_split_inside_a_character_is_read() {
        let body = r#"{"version":"0.1.0","ready":true,"local":{"cluster":"été","node":"n1","published":true,"lease":null,"publications":1,"cluster_record_conflict":null,"last_error":null},"remotes":{},"routes":[],"datapath_error":null}"#.as_bytes();
        let at = body.iter().position(|b| *b == 0xc3).expect("é") + 1;
        let mut raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for part in [&body[..at], &body[at..]] {
            raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            raw.extend_from_slice(part);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let addr = serve_once(raw).await;
        let s = fetch_async(&addr).await.unwrap();
        assert_eq!(s.local.cluster, "été");
        assert!(s.ready);
    }

    #[tokio::test]
    async fn an_error_status_is_reported_with_its_code() {
        let addr =
            serve_once(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_vec())
                .await;
        let e = fetch_async(&addr).await.unwrap_err().to_string();
        assert!(e.contains("503"), "{e}");
    }

    /// The blocking form works from inside a runtime too (tests and
    /// `podmesh cleanup` call it from both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_blocking_form_works_inside_a_runtime() {
        let addr =
            serve_once(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
        let e = fetch(&addr).unwrap_err().to_string();
        assert!(e.contains("404"), "{e}");
        let e = fetch("127.0.0.1:1").unwrap_err();
        assert!(matches!(e, StatusError::Connect { .. }), "{e}");
    }

    #[test]
    fn remote_text_cannot_forge_lines_or_drive_the_terminal() {
        use crate::{
            desired::{RecordOutcome, decode::Rejection},
            status::RemoteStatus,
        };
        assert_eq!(safe("plain näme"), "plain näme");
        assert_eq!(
            safe("a\nINFO fake\u{1b}[2J\u{202e}x"),
            "a\\nINFO fake\\u{1b}[2J\\u{202e}x"
        );
        let remote = RemoteStatus {
            name: "we\nst".into(),
            last_error: Some("bad\u{1b}[31m".into()),
            records: vec![RecordOutcome {
                cluster: "west".into(),
                key: "podmesh/v1/nodes/west/x\nREMOTE ok".into(),
                kind: "node".into(),
                name: Some("x".into()),
                addresses: vec![],
                pod_cidrs: vec![],
                state: RecordState::Rejected(Rejection::new("decode", "m\r")),
            }],
            ..RemoteStatus::default()
        };
        let s = StatusReport {
            remotes: [("west".to_string(), remote)].into(),
            ..StatusReport::default()
        };
        let t = table(&s);
        assert!(!t.contains('\u{1b}') && !t.contains('\r'), "{t:?}");
        assert!(
            !t.lines()
                .any(|l| l.starts_with("REMOTE ok") || l.starts_with("st ")),
            "{t}"
        );
        assert!(t.contains("x\\nREMOTE ok"), "{t}");
    }
}
