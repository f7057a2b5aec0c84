//! What a remote cluster can make the `podmesh-agent` binary write into its
//! log: keys with a newline or ESC cannot forge a log line or drive a
//! terminal, and a thousand records rejected for one cause are one line with
//! a count, not a thousand lines.
use std::{process::Stdio, sync::Arc, time::Duration};

use podmesh_agent::model::{cluster_key, node_key};
use podmesh_tests::{
    etcd::{Etcd, http_get},
    eventually, free_port,
    mesh::workspace_binary,
    pki::Pki,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_keys_cannot_forge_log_lines_and_rejections_are_logged_per_cause() {
    let home = Etcd::start_with(Arc::new(Pki::new("home").unwrap()), "home").unwrap();
    let east = Etcd::start_with(Arc::new(Pki::new("east").unwrap()), "east").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("clustermesh");
    std::fs::create_dir(&secret).unwrap();
    east.client_config(&secret.join("east")).unwrap();
    let kv = home.client_config(&dir.path().join("local.yaml")).unwrap();

    let mut c = east.connect().await.unwrap();
    let cluster = serde_json::json!({"name": "east", "id": 1, "podCIDRs": ["10.1.0.0/16"], "serviceCIDRs": []});
    c.put(cluster_key("east"), cluster.to_string(), None)
        .await
        .unwrap();
    let node = |name: &str, pod: &str| {
        serde_json::json!({"name": name, "cluster": "east", "clusterID": 1,
            "addresses": ["192.168.1.1"], "podCIDRs": [pod], "vtepMAC": "02:00:00:00:00:01"})
        .to_string()
    };
    // Keys that try to forge a line and to drive the terminal.
    let forged = "x\nINFO podmesh_agent: FAKE all remotes healthy";
    let escape = "y\u{1b}[2J\u{1b}[31mred";
    for (i, name) in [forged, escape].iter().enumerate() {
        c.put(
            node_key("east", name),
            node(name, &format!("10.1.{i}.0/24")),
            None,
        )
        .await
        .unwrap();
    }
    // A thousand records rejected for one cause (Pod CIDRs outside the cluster's).
    for chunk in (0..1000u32).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let n = format!("bad-{i}");
                etcd_client::TxnOp::put(
                    node_key("east", &n),
                    node(&n, &format!("10.{}.{}.0/24", 2 + i / 250, i % 250)),
                    None,
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }

    let port = free_port();
    let log = dir.path().join("agent.log");
    let mut agent =
        std::process::Command::new(workspace_binary("podmesh-agent", "podmesh-agent").unwrap())
            .args([
                "--cluster-name",
                "home",
                "--cluster-id",
                "9",
                "--node-name",
                "h1",
                "--node-ip",
                "192.168.9.1",
                "--pod-cidr",
                "10.9.1.0/24",
                "--cluster-pod-cidr",
                "10.9.0.0/16",
                "--datapath-dry-run",
                "--secret-poll-ms",
                "100",
            ])
            .arg("--status-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--kvstore-config")
            .arg(&kv)
            .arg("--clustermesh-config")
            .arg(&secret)
            .env("RUST_LOG", "info")
            .env_remove("NODE_NAME")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("agent.err")).unwrap())
            .spawn()
            .unwrap();
    let status = eventually(Duration::from_secs(60), || {
        let b = http_get(port, "/status?rejected=true").map_err(|e| e.to_string())?;
        let body = b.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {b}"))?;
        let n = v["remotes"]["east"]["records"]
            .as_array()
            .map_or(0, Vec::len);
        if n == 1002 {
            Ok(v)
        } else {
            Err(format!("{n} rejected so far"))
        }
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(&std::fs::read_to_string(dir.path().join("agent.err")).unwrap());
    let status = status.unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(status["remotes"]["east"]["records"].as_array().is_some());
    for line in text.lines() {
        assert!(
            !line.trim_start().starts_with("INFO podmesh_agent: FAKE"),
            "a remote key forged a log line: {line:?}"
        );
    }
    assert!(!text.contains('\u{1b}'), "a raw ESC reached the log");
    let rejected_lines = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("east") && l.contains("reject"))
        .count();
    eprintln!("{rejected_lines} WARN lines about east's 1,002 rejected records");
    assert!(
        rejected_lines <= 10,
        "{rejected_lines} WARN lines for 1,002 rejected records of two causes:\n{text}"
    );
    assert!(
        text.contains("1000"),
        "the count of the rejections of one cause is not logged:\n{text}"
    );
}
