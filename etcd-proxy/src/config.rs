//! Command-line flags of podmesh-etcd-proxy and the `--config` YAML file that may hold them, parsed once at start.
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use podmesh_plumbing::{
    duration,
    flags::{self, LoadError},
};

/// mTLS, read-only, prefix-confined etcd v3 proxy: one upstream watch of the
/// mesh prefix fanned out to many remote watchers.
#[derive(Debug, Parser)]
#[command(name = "podmesh-etcd-proxy", version, about, long_about = None)]
pub struct Args {
    /// YAML file of flags: keys are the long flag names (`listen`,
    /// `upstream-config`, …); flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve the etcd v3 gRPC API on (TLS only).
    #[arg(long)]
    pub listen: SocketAddr,
    /// URL reported by Cluster.MemberList, so that clients which sync their
    /// endpoints keep talking to the proxy [default: https://<listen>].
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// etcd client YAML of the upstream (this cluster's mesh etcd): endpoints,
    /// trusted-ca-file, cert-file, key-file.
    #[arg(long, value_name = "FILE")]
    pub upstream_config: PathBuf,
    /// Server certificate (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// Server private key (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub tls_key: PathBuf,
    /// CA that client certificates must chain to (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub client_ca: PathBuf,
    /// Only keys under this prefix are served; every other key or range is refused.
    #[arg(long, default_value = "podmesh/v1/")]
    pub allow_prefix: String,
    /// Address of /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Events kept for replaying watches that start in the past; older start
    /// revisions get the `compacted` answer and re-list.
    #[arg(long, default_value_t = 10_000)]
    pub history_events: usize,
    /// Updates a watch stream may fall behind before its watchers are
    /// cancelled (they re-list); one slow client never holds up the others.
    #[arg(long, default_value_t = 4096)]
    pub watch_buffer: usize,
    /// Responses per watcher (each carrying every update the stream took at
    /// once) a watch stream may have queued for its client, unread, before
    /// its watchers are cut off with a cancel reason (they watch again from
    /// the revision after their last event); bounds what one slow reader
    /// holds.
    #[arg(long, default_value_t = 256)]
    pub watch_backlog: usize,
    /// Client connections served at once. Beyond it a new connection is
    /// answered UNAVAILABLE with the reason (clients try another replica)
    /// and closed, and counted. Size the proxy's memory limit from it
    /// (docs/walkthrough.md, "Sizing the etcd proxy").
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// HTTP/2 server of client connections: `lean`, the proxy's own (buffers
    /// sized by the traffic, about half the memory per idle connection), or
    /// `hyper`, hyper's (h2) connection.
    #[arg(long, value_enum, default_value = "lean")]
    pub http2_server: crate::serve::Http2Server,
    /// Interval of progress notifications to watchers that ask for them.
    #[arg(long, default_value = "10m", value_parser = duration::with_unit)]
    pub progress_notify_interval: Duration,
    /// Interval at which the TLS files, the upstream config and the files it
    /// names are checked for changes (new upstream settings make the proxy
    /// reconnect upstream with them).
    #[arg(long, default_value = "5s", value_parser = duration::with_unit)]
    pub tls_reload_interval: Duration,
    /// Longest delay between upstream reconnect attempts.
    #[arg(long, default_value = "10s", value_parser = duration::with_unit)]
    pub max_backoff: Duration,
    /// Deadline of an upstream connection attempt: TCP connect, TLS handshake
    /// and the first answer. An upstream that accepts connections and never
    /// answers is retried with backoff, and /readyz says it timed out.
    #[arg(long, default_value = "10s", value_parser = duration::with_unit)]
    pub connect_timeout: Duration,
}

/// Flags whose value is a file: a relative path in the `--config` file is
/// taken relative to that file's directory (like the etcd client YAML).
const PATH_FLAGS: [&str; 4] = ["upstream-config", "tls-cert", "tls-key", "client-ca"];

/// A configuration problem; the proxy exits 64 with this one line.
pub type ConfigError = LoadError;

/// Parses the process arguments and the `--config` file they name.
/// `--help`/`--version` print and exit here, like clap does.
pub fn load() -> Result<Args, ConfigError> {
    load_from(std::env::args_os())
}

/// Parses these arguments (the first is the program name) and the
/// `--config` file they name; command-line flags override the file.
pub fn load_from<I, T>(args: I) -> Result<Args, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let loaded = flags::load(Args::command(), argv, &PATH_FLAGS)?;
    Args::from_arg_matches(&loaded.matches)
        .map_err(|e| LoadError::Cli(e.to_string().lines().next().unwrap_or("").into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("podmesh-proxy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    const FLAGS: [&str; 9] = [
        "podmesh-etcd-proxy",
        "--listen",
        "127.0.0.1:2379",
        "--upstream-config",
        "/u.yaml",
        "--tls-cert",
        "/t.crt",
        "--tls-key",
        "/t.key",
    ];

    #[test]
    fn flags_alone_and_missing_required_flags() {
        let a = load_from(FLAGS.iter().copied().chain(["--client-ca", "/ca.crt"])).unwrap();
        assert_eq!(a.listen, "127.0.0.1:2379".parse().unwrap());
        assert_eq!(a.allow_prefix, "podmesh/v1/");
        let e = load_from(FLAGS).unwrap_err().to_string();
        assert!(e.contains("--client-ca"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn file_fields_with_flags_overriding_and_paths_relative_to_the_file() {
        let d = dir("cfg-ok");
        let f = d.0.join("proxy.yaml");
        std::fs::write(
            &f,
            "listen: 127.0.0.1:1\nupstream-config: up.yaml\ntls-cert: /abs/t.crt\ntls-key: t.key\nclient-ca: ca.crt\nallow-prefix: mesh/\nhistory-events: 500\nwatch-buffer: 64\nprogress-notify-interval: 30s\n",
        )
        .unwrap();
        let cfg = f.to_str().unwrap();
        let a = load_from(["podmesh-etcd-proxy", "--config", cfg]).unwrap();
        assert_eq!(a.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(a.upstream_config, d.0.join("up.yaml"));
        assert_eq!(a.tls_cert, PathBuf::from("/abs/t.crt"));
        assert_eq!(a.client_ca, d.0.join("ca.crt"));
        assert_eq!(a.allow_prefix, "mesh/");
        assert_eq!((a.history_events, a.watch_buffer), (500, 64));
        assert_eq!(a.progress_notify_interval, Duration::from_secs(30));
        // The command line wins, before or after --config.
        let a = load_from([
            "podmesh-etcd-proxy",
            "--listen",
            "127.0.0.1:2",
            "--config",
            cfg,
            "--watch-buffer",
            "7",
        ])
        .unwrap();
        assert_eq!(a.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!((a.history_events, a.watch_buffer), (500, 7));
    }

    #[test]
    fn file_errors_name_the_field_in_one_line() {
        let d = dir("cfg-bad");
        let f = d.0.join("proxy.yaml");
        let cfg = f.to_str().unwrap().to_owned();
        let cases = [
            ("listen: 127.0.0.1:1\nlisten-addr: x\n", "\"listen-addr\""),
            ("listen: not-an-address\n", "\"listen\""),
            ("history-events: -3\n", "\"history-events\""),
            (
                "progress-notify-interval: 10\n",
                "\"progress-notify-interval\"",
            ),
            ("allow-prefix: [a, b]\n", "\"allow-prefix\""),
            ("config: other.yaml\n", "\"config\""),
            ("- listen\n", "mapping"),
            ("listen: [\n", "line"),
        ];
        for (text, want) in cases {
            std::fs::write(&f, text).unwrap();
            let e = load_from(["podmesh-etcd-proxy", "--config", &cfg])
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains(&cfg), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{text:?}: {e}");
        }
        let e = load_from(["podmesh-etcd-proxy", "--config", "/nonexistent/p.yaml"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
