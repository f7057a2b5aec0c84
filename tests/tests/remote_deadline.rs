//! A remote cluster whose endpoint accepts TCP connections and never answers: the agent's
//! attempts time out (connect, TLS handshake and the list's first page are under
//! --connect-timeout), /status says so, the agent keeps retrying, and once the endpoint answers
//! it lists the remote and programs its node.
use std::time::Duration;

use podmesh_agent::{config, datapath::memory::MemoryDatapath, runtime, status::StatusReport};
use podmesh_tests::{daemon::HOME_AGENT_FLAGS, etcd::Etcd, eventually_async, stall::Stall};

const WAIT: Duration = Duration::from_secs(30);

fn put(etcd: &Etcd, key: &str, value: &str) {
    let o = etcd.etcdctl(&["put", key, value]).expect("etcdctl put");
    assert!(o.status.success(), "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_times_out_on_a_silent_endpoint_and_recovers_when_it_answers() {
    let east = Etcd::start().expect("etcd");
    put(
        &east,
        "podmesh/v1/clusters/east",
        r#"{"name":"east","id":1,"podCIDRs":["10.1.0.0/16"],"serviceCIDRs":[]}"#,
    );
    put(
        &east,
        "podmesh/v1/nodes/east/e1",
        r#"{"name":"e1","cluster":"east","clusterID":1,"addresses":["192.168.1.10"],"podCIDRs":["10.1.1.0/24"]}"#,
    );
    let stall = Stall::start().expect("stall");
    let secret = tempfile::tempdir().unwrap();
    podmesh_tests::etcd::write_client_config(
        &secret.path().join("east"),
        &[stall.endpoint()],
        east.pki().ca(),
        east.root_client(),
    )
    .unwrap();
    let mut args = vec!["podmesh-agent"];
    args.extend(HOME_AGENT_FLAGS);
    args.extend([
        "--status-addr",
        "127.0.0.1:0",
        "--max-backoff",
        "1s",
        "--connect-timeout",
        "1s",
        "--clustermesh-config",
        secret.path().to_str().unwrap(),
    ]);
    let cfg = config::load_from(args).expect("config");
    let dp = MemoryDatapath::new();
    let agent = runtime::start(&cfg, dp.clone(), None)
        .await
        .expect("agent starts");
    let addr = agent.status_addr.to_string();
    let status = || -> Result<StatusReport, String> {
        podmesh_agent::cli::status::fetch(&addr).map_err(|e| e.to_string())
    };

    // Silent: not connected, the last error says the attempt timed out, and
    // the agent keeps trying.
    eventually_async(WAIT, || async {
        let s = status()?;
        let r = s.remotes.get("east").ok_or("no remote east")?;
        let err = r.last_error.clone().unwrap_or_default();
        if !r.connected && err.contains("timed out") && r.failures >= 2 && stall.held() >= 2 {
            Ok(())
        } else {
            Err(format!("{r:?}; held {}", stall.held()))
        }
    })
    .await
    .expect("the silent remote is reported as timed out");
    assert!(dp.snapshot().is_empty());

    // It answers: the next attempt lists it and its node is programmed.
    stall.forward_to(east.port());
    eventually_async(WAIT, || async {
        let s = status()?;
        let r = s.remotes.get("east").ok_or("no remote east")?;
        let routes: Vec<String> = dp.snapshot().keys().map(ToString::to_string).collect();
        if r.connected && r.synced && r.last_error.is_none() && routes == ["10.1.1.0/24"] {
            Ok(())
        } else {
            Err(format!("{r:?}; routes {routes:?}"))
        }
    })
    .await
    .expect("the remote syncs once it answers");
    drop(agent);
}
