//! The `podmesh-agent` binary's configuration errors: a bad flag, value or
//! `--config` key exits with status 64 and exactly one line on stderr that
//! names it, before anything is started.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use podmesh_tests::{etcd::http_get, eventually, free_port, mesh::workspace_binary};

fn agent() -> PathBuf {
    workspace_binary("podmesh-agent", "podmesh-agent").expect("podmesh-agent builds")
}

/// The agent binary with `args`, without the variables it reads flags from.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(agent());
    for v in ["PODMESH_CLUSTER_NAME", "PODMESH_CLUSTER_ID", "NODE_NAME"] {
        cmd.env_remove(v);
    }
    cmd.env("RUST_LOG", "info").args(args);
    cmd
}

/// A valid command line: run alone, it starts an agent.
fn valid(status_port: u16) -> Vec<String> {
    [
        "--cluster-name",
        "east",
        "--cluster-id",
        "1",
        "--node-name",
        "n1",
        "--node-ip",
        "192.168.1.10",
        "--pod-cidr",
        "10.1.1.0/24",
        "--datapath-dry-run",
        "--status-addr",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([format!("127.0.0.1:{status_port}")])
    .collect()
}

fn show(o: &Output) -> String {
    format!(
        "status {}; stdout {:?}; stderr {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs the agent with `args` and checks: exit 64, nothing on stdout, one
/// line on stderr that contains every one of `names`.
fn assert_refused(args: &[String], names: &[&str]) {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = command(&argv)
        .stdin(Stdio::null())
        .output()
        .expect("run podmesh-agent");
    assert_eq!(o.status.code(), Some(64), "{args:?}: {}", show(&o));
    assert!(o.stdout.is_empty(), "{args:?}: {}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.ends_with('\n'), "{args:?}: {}", show(&o));
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err:?}");
    assert!(
        err.starts_with("podmesh-agent: "),
        "{args:?}: {err:?} does not say who"
    );
    for n in names {
        assert!(err.contains(n), "{args:?}: {err:?} does not name {n:?}");
    }
}

/// `valid` with `flag` set to `value` (replacing it when present).
fn with(port: u16, flag: &str, value: &str) -> Vec<String> {
    let mut a = valid(port);
    match a.iter().position(|x| x == flag) {
        Some(i) => a[i + 1] = value.to_string(),
        None => a.extend([flag.to_string(), value.to_string()]),
    }
    a
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p.display().to_string()
}

#[test]
fn agent_config_errors_exit_64_with_one_line_naming_the_flag_or_key() {
    let port = free_port();

    // The valid command line starts an agent: the refusals below come from
    // the one flag or key each changes.
    let mut child = command(&valid(port).iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start podmesh-agent");
    let up = eventually(Duration::from_secs(30), || {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(Err(st));
        }
        match http_get(port, "/healthz") {
            Ok(b) if b.contains(" 200 ") => Ok(Ok(())),
            other => Err(format!("{other:?}")),
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(up, Ok(Ok(()))),
        "the valid command line must run: {up:?}"
    );

    // Flags: a value out of range, a CIDR with host bits, a value that is
    // no CIDR at all, an unknown flag, flags that need each other.
    assert_refused(&with(port, "--cluster-id", "0"), &["--cluster-id", "0"]);
    assert_refused(&with(port, "--cluster-id", "256"), &["--cluster-id", "256"]);
    assert_refused(
        &with(port, "--pod-cidr", "10.1.1.1/24"),
        &["--pod-cidr", "10.1.1.1/24"],
    );
    assert_refused(
        &with(port, "--pod-cidr", "not-a-cidr"),
        &["--pod-cidr", "not-a-cidr"],
    );
    assert_refused(
        &with(port, "--cluster-name", "East_1"),
        &["--cluster-name", "East_1"],
    );
    assert_refused(&with(port, "--no-such-flag", "1"), &["--no-such-flag"]);
    let mut no_ip = valid(port);
    let i = no_ip.iter().position(|x| x == "--node-ip").unwrap();
    no_ip.drain(i..i + 2);
    assert_refused(&no_ip, &["--node-ip"]);

    // The --config file: an unknown key, a bad value in a known key, a
    // file that is not YAML, a file that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let status = format!("127.0.0.1:{port}");
    let unknown = write(
        dir.path(),
        "unknown.yaml",
        &format!(
            "cluster-name: east\ncluster-id: 1\nnode-name: n1\nnode-ip: 192.168.1.10\npod-cidr: [10.1.1.0/24]\nstatus-addr: {status}\ndatapath-dry-run: true\npod-cidrs: [10.1.2.0/24]\n"
        ),
    );
    assert_refused(
        &["--config".into(), unknown.clone()],
        &["--config", &unknown, "unknown key \"pod-cidrs\""],
    );
    let bad_id = write(
        dir.path(),
        "bad-id.yaml",
        &format!(
            "cluster-name: east\ncluster-id: 0\nnode-name: n1\nnode-ip: 192.168.1.10\npod-cidr: [10.1.1.0/24]\nstatus-addr: {status}\ndatapath-dry-run: true\n"
        ),
    );
    assert_refused(&["--config".into(), bad_id], &["--cluster-id", "0"]);
    let not_yaml = write(dir.path(), "broken.yaml", "cluster-name: [east\n");
    assert_refused(
        &["--config".into(), not_yaml.clone()],
        &["--config", &not_yaml, "not valid YAML"],
    );
    let missing = dir.path().join("missing.yaml").display().to_string();
    assert_refused(
        &["--config".into(), missing.clone()],
        &["--config", &missing, "cannot read"],
    );
}

/// A `--kvstore-config` that is no etcd client YAML is a configuration error
/// like a bad flag: exit 64 with one line naming the flag, the file and the
/// problem, before the datapath is built or the status port bound.
#[test]
fn a_bad_kvstore_config_exits_64_before_anything_is_created() {
    if !podmesh_tests::require_root("a_bad_kvstore_config_exits_64_before_anything_is_created") {
        return;
    }
    let ns = podmesh_tests::netns::NetNs::new("kvcfg").expect("netns");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let kv = write(
        dir.path(),
        "local.yaml",
        "endpoints:\n- mesh-etcd:2379\ntrusted-ca-file: ca.crt\n",
    );
    // The kernel datapath (not a dry run): had the agent got as far as
    // building it, the namespace would hold its VXLAN device.
    let mut args = valid(port);
    args.retain(|a| a != "--datapath-dry-run");
    args.extend(["--datapath", "vxlan", "--kvstore-config", &kv].map(String::from));
    let bin = agent();
    let o = ns
        .command(bin.to_str().unwrap())
        .args(&args)
        .env_remove("PODMESH_CLUSTER_NAME")
        .env_remove("PODMESH_CLUSTER_ID")
        .env_remove("NODE_NAME")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run podmesh-agent");
    assert_eq!(o.status.code(), Some(64), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    // One line: no log line, so neither "podmesh-agent started" (the status
    // server bound) nor anything of the datapath.
    assert_eq!(err.lines().count(), 1, "{}", show(&o));
    for want in ["podmesh-agent: --kvstore-config", &kv, "needs a scheme"] {
        assert!(err.contains(want), "{err:?} does not say {want:?}");
    }
    let links = ns.ip(&["-o", "link", "show"]).expect("ip link");
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(links.contains(": lo:"), "{links}");
    let routes = ns.ip(&["route", "show", "table", "all"]).expect("ip route");
    assert!(!routes.contains("podmesh"), "{routes}");
}
