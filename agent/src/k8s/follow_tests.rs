//! The Node follower against a mocked API server, in paused time: each way
//! of failing to read the Node (403, 401, API down, no such Node) makes the
//! agent not ready, is shown in the status and the metrics with its fix and
//! logged once per cause; a failing list is retried with a growing delay,
//! capped, and reset once a list succeeds; Pod CIDRs outside the declared
//! ranges are reported in both families.
use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use kube::{Client, client::Body};
use tokio::{task::JoinHandle, time::Instant};
use tower_test::mock;

use super::{
    tests::{node_at, watch_line},
    *,
};
use crate::status::metrics;

type Send = mock::SendResponse<Response<Body>>;

/// How the mocked API server answers the next requests.
#[derive(Clone, Debug)]
enum Mode {
    /// Every request fails with this HTTP status.
    Status(u16),
    /// No answer: the connection fails.
    Down,
    /// Lists these Nodes; watches stay open (their senders are kept).
    List(Vec<serde_json::Value>),
    /// Lists these Nodes; every watch fails with 500.
    ListWatchFails(Vec<serde_json::Value>),
}

/// The mocked API server: its mode, what it was asked (when, and whether a
/// watch), and the watches it holds open.
#[derive(Clone)]
struct Server {
    mode: Arc<Mutex<Mode>>,
    asked: Arc<Mutex<Vec<(Instant, bool)>>>,
    held: Arc<Mutex<Vec<Send>>>,
}

impl Server {
    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    /// Times of the LIST (`watch == false`) or WATCH requests so far.
    fn times(&self, watch: bool) -> Vec<Instant> {
        let asked = self.asked.lock().unwrap();
        asked
            .iter()
            .filter(|(_, w)| *w == watch)
            .map(|(t, _)| *t)
            .collect()
    }
}

fn status_body(code: u16) -> Body {
    let (reason, message) = match code {
        403 => (
            "Forbidden",
            "nodes is forbidden: User \"system:serviceaccount:podmesh:podmesh-agent\" cannot list resource \"nodes\" in API group \"\" at the cluster scope",
        ),
        401 => ("Unauthorized", "Unauthorized"),
        _ => ("InternalError", "etcdserver: leader changed"),
    };
    let s = serde_json::json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "message": message, "reason": reason, "code": code
    });
    Body::from(serde_json::to_vec(&s).unwrap())
}

fn list_body(items: &[serde_json::Value]) -> Body {
    let l = serde_json::json!({
        "apiVersion": "v1", "kind": "NodeList",
        "metadata": {"resourceVersion": "7"}, "items": items
    });
    Body::from(serde_json::to_vec(&l).unwrap())
}

fn serve(mut handle: mock::Handle<Request<Body>, Response<Body>>, mode: Mode) -> Server {
    let server = Server {
        mode: Arc::new(Mutex::new(mode)),
        asked: Arc::default(),
        held: Arc::default(),
    };
    let s = server.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let watch = req.uri().query().unwrap_or("").contains("watch=true");
            s.asked.lock().unwrap().push((Instant::now(), watch));
            let mode = s.mode.lock().unwrap().clone();
            let respond = |code: u16, body| Response::builder().status(code).body(body).unwrap();
            match mode {
                Mode::Status(code) => send.send_response(respond(code, status_body(code))),
                Mode::Down => send.send_error(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "tcp connect error: Connection refused (os error 111)",
                )),
                Mode::List(_) | Mode::ListWatchFails(_) if !watch => {
                    let (Mode::List(items) | Mode::ListWatchFails(items)) = mode else {
                        unreachable!()
                    };
                    send.send_response(respond(200, list_body(&items)));
                }
                Mode::List(_) => s.held.lock().unwrap().push(send),
                Mode::ListWatchFails(_) => send.send_response(respond(500, status_body(500))),
            }
        }
    });
    server
}

/// The log lines written while the test runs (WARN and above, and INFO).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Logs {
    /// Captures this thread's log (the tests' runtime runs every task on
    /// it), filtered as the agent's is by default.
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
                "info,{WATCHER_LOG_DIRECTIVE}"
            )))
            .finish();
        (logs, tracing::subscriber::set_default(sub))
    }

    fn lines(&self, level: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(level))
            .map(str::to_string)
            .collect()
    }
}

struct Agent {
    server: Server,
    status: Status,
    rx: watch::Receiver<Option<LocalNode>>,
    task: JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(mode: Mode, declared: &[&str]) -> Agent {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = serve(handle, mode);
    let status = Status::new("home", "n1");
    let (tx, rx) = watch::channel(None);
    let follower = NodeFollower {
        api: KubeNodes::new(Client::new(svc, "default")),
        name: "n1".into(),
        addresses: Vec::new(),
        underlay: crate::model::UnderlayFamily::Ipv4,
        origin: NodeNameOrigin::Env,
        vtep_mac: None,
        cluster_pod_cidrs: declared.iter().map(|c| c.parse().unwrap()).collect(),
        status: status.clone(),
    };
    let task = tokio::spawn(follower.run(tx));
    Agent {
        server,
        status,
        rx,
        task,
    }
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

fn good_node() -> serde_json::Value {
    node_at("10.9.1.0/24", "192.168.9.1", "7")
}

/// 403, 401 and an unreachable API at start: over a minute the agent lists
/// a handful of times with growing gaps (not once a second: kube-runtime's
/// own backoff is reset by the watcher's `Init` before every list), says
/// why in the status, the metrics and one log line, and is not ready; once
/// the API answers, the Node arrives within the cap and all is cleared.
#[tokio::test(start_paused = true)]
async fn each_failure_at_start_is_reported_once_and_retried_with_backoff() {
    let cases: [(Mode, &str, &[&str]); 3] = [
        (
            Mode::Status(403),
            code::FORBIDDEN,
            &[
                "403 Forbidden",
                "list and watch on nodes",
                "ClusterRole podmesh-agent of deploy/base/rbac.yaml",
                "kubectl auth can-i watch nodes",
            ],
        ),
        (
            Mode::Status(401),
            code::UNAUTHORIZED,
            &["401 Unauthorized", "ServiceAccount token"],
        ),
        (
            Mode::Down,
            code::UNREACHABLE,
            &["cannot reach the Kubernetes API", "Connection refused"],
        ),
    ];
    for (mode, code, hints) in cases {
        let (logs, _guard) = Logs::capture();
        let mut a = start(mode, &[]);
        tokio::time::sleep(Duration::from_secs(60)).await;

        let lists = a.server.times(false);
        assert!(
            (3..=12).contains(&lists.len()),
            "{code}: {} lists in 60 s: {:?}",
            lists.len(),
            gaps(&lists)
        );
        let g = gaps(&lists);
        assert!(
            g.iter().skip(4).all(|d| *d >= RETRY_CAP / 2),
            "{code}: the delay grows to the cap and stays there: {g:?}"
        );
        assert!(
            a.server.times(true).is_empty(),
            "{code}: no watch without a list"
        );

        let s = a.status.summary();
        assert!(!s.ready, "{code}: ready without its Node");
        let p = s.local.node_error.as_ref().expect("node_error");
        assert_eq!(p.code, code);
        let last = s.local.last_error.as_deref().expect("last_error");
        for h in hints {
            assert!(last.contains(h), "{code}: {h:?} not in {last}");
        }
        let m = metrics::render(&s);
        let line = format!("podmesh_local_node_error{{reason=\"{code}\"}} 1");
        assert!(m.lines().any(|l| l == line), "{code}: no {line} in\n{m}");
        let warns = logs.lines("WARN");
        assert_eq!(warns.len(), 1, "{code}: once per cause: {warns:#?}");
        assert!(warns[0].contains(code), "{}", warns[0]);

        // The API answers again: the Node within the cap, the problem gone.
        let back = Instant::now();
        a.server.set(Mode::List(vec![good_node()]));
        tokio::time::timeout(RETRY_CAP, a.rx.wait_for(Option::is_some))
            .await
            .unwrap_or_else(|_| panic!("{code}: no Node {RETRY_CAP:?} after the API came back"))
            .unwrap();
        assert!(back.elapsed() <= RETRY_CAP);
        let s = a.status.summary();
        assert!(s.ready, "{code}: {:?}", s.local);
        assert_eq!(s.local.node_error, None);
        assert_eq!(s.local.last_error, None);
        assert!(!metrics::render(&s).contains("podmesh_local_node_error{"));
        assert_eq!(logs.lines("WARN").len(), 1, "{code}");
        assert!(
            logs.lines("INFO").iter().any(|l| l.contains("read again")),
            "{code}: the recovery is logged"
        );
    }
}

/// No Node of the name: said with the name and where it came from, listed
/// once (the watch waits for the Node), and the Node is taken when created.
#[tokio::test(start_paused = true)]
async fn a_node_name_no_node_has_is_reported_with_its_origin() {
    let (logs, _guard) = Logs::capture();
    let mut a = start(Mode::List(vec![]), &[]);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        a.server.times(false).len(),
        1,
        "the watch waits, no re-list"
    );
    let s = a.status.summary();
    assert!(!s.ready);
    let p = s.local.node_error.clone().expect("node_error");
    assert_eq!(p.code, code::NOT_FOUND);
    for h in [
        "no Node named \"n1\"",
        "the NODE_NAME environment variable",
        "spec.nodeName",
        "--node-name",
    ] {
        assert!(p.message.contains(h), "{h:?} not in {}", p.message);
    }
    assert_eq!(s.local.last_error.as_deref(), Some(p.message.as_str()));
    assert_eq!(logs.lines("WARN").len(), 1);

    // The Node is created: the held watch delivers it.
    let send = a
        .server
        .held
        .lock()
        .unwrap()
        .pop()
        .expect("a watch is open");
    let ev = serde_json::json!({"type": "ADDED", "object": good_node()});
    send.send_response(Response::builder().body(watch_line(&ev)).unwrap());
    a.rx.wait_for(Option::is_some).await.unwrap();
    assert!(a.status.summary().ready);
}

/// Where the name came from: the flag, the --config file, the host name.
/// (NODE_NAME is clap's `env`; tests set no environment.)
#[test]
fn the_origin_of_the_node_name_is_known() {
    if std::env::var_os("NODE_NAME").is_some() {
        panic!("NODE_NAME is set in the test environment: unset it to run this test");
    }
    let load = |args: &[&str]| {
        let mut argv = vec![
            "podmesh-agent",
            "--cluster-name",
            "home",
            "--cluster-id",
            "9",
        ];
        argv.extend(args);
        crate::config::load_from(argv).map(|c| (c.node_name, c.node_name_origin))
    };
    assert_eq!(
        load(&["--node-name", "n1"]).unwrap(),
        ("n1".to_string(), NodeNameOrigin::Flag)
    );
    if let Ok((_, o)) = load(&[]) {
        assert_eq!(o, NodeNameOrigin::HostName);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(&file, "node-name: from-file\n").unwrap();
    let path = file.to_str().unwrap();
    assert_eq!(
        load(&["--config", path]).unwrap(),
        ("from-file".to_string(), NodeNameOrigin::ConfigFile)
    );
    assert_eq!(
        load(&["--config", path, "--node-name", "n1"]).unwrap(),
        ("n1".to_string(), NodeNameOrigin::Flag)
    );
}

/// The backoff is capped (10 minutes of 403: no gap above the cap) and
/// reset by a list that succeeds (a watch failing right after it is
/// retried after the first delay, not the grown one).
#[tokio::test(start_paused = true)]
async fn the_backoff_is_capped_and_reset_by_a_list() {
    let (_logs, _guard) = Logs::capture();
    let mut a = start(Mode::Status(403), &[]);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let lists = a.server.times(false);
    let g = gaps(&lists);
    assert!(g.iter().all(|d| *d <= RETRY_CAP), "{g:?}");
    assert!(
        lists.len() <= 600 / 7 + 5,
        "{} lists in 10 minutes",
        lists.len()
    );

    a.server.set(Mode::ListWatchFails(vec![good_node()]));
    a.rx.wait_for(Option::is_some).await.unwrap();
    // The watch after the list fails, and again after the first delay.
    while a.server.times(true).len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = a.server.times(true);
    assert!(
        w[1] - w[0] <= RETRY_BASE,
        "after a list, the backoff starts over: {:?}",
        w[1] - w[0]
    );
    // The API failing after the Node was read: not ready, the last known
    // Node is kept.
    let s = a.status.summary();
    assert!(!s.ready);
    assert_eq!(s.local.node_error.unwrap().code, code::API);
    assert!(a.rx.borrow().is_some());
}

/// Pod CIDRs of the Node outside the declared cluster ranges, in either
/// family: reported (status, metric, one log line), not ready, and still
/// published as the Node says (remote clusters report the rejection too).
#[tokio::test(start_paused = true)]
async fn pod_cidrs_outside_the_declared_ranges_are_reported_in_both_families() {
    let mut dual = node_at("10.9.1.0/24", "192.168.9.1", "7");
    dual["spec"]["podCIDRs"] = serde_json::json!(["10.9.1.0/24", "fd00:9::/64"]);
    let cases: [(&[&str], &[&str]); 4] = [
        (&["10.9.0.0/16"], &["fd00:9::/64"]),
        (&["fd00:9::/48"], &["10.9.1.0/24"]),
        (&["10.9.0.0/16", "fd00:9::/48"], &[]),
        (&[], &[]),
    ];
    for (declared, outside) in cases {
        let (logs, _guard) = Logs::capture();
        let mut a = start(Mode::List(vec![dual.clone()]), declared);
        let got =
            a.rx.wait_for(Option::is_some)
                .await
                .unwrap()
                .clone()
                .unwrap();
        assert_eq!(got.pod_cidrs.len(), 2, "published as the Node says");
        let s = a.status.summary();
        let want: Vec<IpNet> = outside.iter().map(|c| c.parse().unwrap()).collect();
        assert_eq!(s.local.pod_cidrs_outside_cluster, want, "{declared:?}");
        assert_eq!(s.ready, want.is_empty(), "{declared:?}");
        let m = metrics::render(&s);
        let line = format!("podmesh_local_pod_cidrs_outside_cluster {}", want.len());
        assert!(m.lines().any(|l| l == line), "{declared:?}: {m}");
        let warns = logs.lines("WARN");
        assert_eq!(warns.len(), usize::from(!want.is_empty()), "{warns:#?}");
        if let Some(w) = warns.first() {
            assert!(
                w.contains(outside[0]) && w.contains("cluster-pod-cidr"),
                "{w}"
            );
        }
    }
}
