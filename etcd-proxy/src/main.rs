//! podmesh-etcd-proxy: serves one cluster's mesh state, read-only and confined to one prefix, to the other clusters.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use etcd_client::proto::{PbClusterServer, PbKvServer, PbMaintenanceServer, PbWatchServer};
use tokio_stream::wrappers::ReceiverStream;

mod cache;
mod hub;
mod metrics;
mod prefix;
mod service;
mod tls;
mod upstream;

use hub::Hub;
use prefix::Prefix;
use service::refuse::{Auth, Lease, RefuseService};
use tls::{Reloading, TlsFiles};
use upstream::UpstreamConfig;

/// mTLS, read-only, prefix-confined etcd v3 proxy: one upstream watch of the
/// mesh prefix fanned out to many remote watchers.
#[derive(Debug, Parser)]
#[command(name = "podmesh-etcd-proxy", version, about, long_about = None)]
struct Args {
    /// Address to serve the etcd v3 gRPC API on (TLS only).
    #[arg(long)]
    listen: SocketAddr,
    /// URL reported by Cluster.MemberList, so that clients which sync their
    /// endpoints keep talking to the proxy [default: https://<listen>].
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// etcd client YAML of the upstream (this cluster's mesh etcd): endpoints,
    /// trusted-ca-file, cert-file, key-file.
    #[arg(long, value_name = "FILE")]
    upstream_config: PathBuf,
    /// Server certificate (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// Server private key (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// CA that client certificates must chain to (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    client_ca: PathBuf,
    /// Only keys under this prefix are served; every other key or range is refused.
    #[arg(long, default_value = "podmesh/v1/")]
    allow_prefix: String,
    /// Address of /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Events kept for replaying watches that start in the past; older start
    /// revisions get the `compacted` answer and re-list.
    #[arg(long, default_value_t = 10_000)]
    history_events: usize,
    /// Updates a watch stream may fall behind before its watchers are
    /// cancelled (they re-list); one slow client never holds up the others.
    #[arg(long, default_value_t = 4096)]
    watch_buffer: usize,
    /// Interval of progress notifications to watchers that ask for them.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    progress_notify_interval: Duration,
    /// Interval at which the TLS files are checked for changes.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    tls_reload_interval: Duration,
    /// Longest delay between upstream reconnect attempts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    max_backoff: Duration,
}

/// "500ms", "5s", "10m", "1h".
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 10m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} has no unit (ms, s, m, h)")),
    }
}

/// Exit status for bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("podmesh-etcd-proxy: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            return config_error(format!("{line} (see --help)"));
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Some(prefix) = Prefix::new(&args.allow_prefix) else {
        return config_error(
            "--allow-prefix must not be empty (an empty prefix would confine nothing)",
        );
    };
    let upstream = match UpstreamConfig::load(&args.upstream_config) {
        Ok(u) => u,
        Err(e) => return config_error(e),
    };
    let tls = match Reloading::new(TlsFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        client_ca: args.client_ca.clone(),
    }) {
        Ok(t) => Arc::new(t),
        Err(e) => return config_error(e),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podmesh-etcd-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args, prefix, upstream, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podmesh-etcd-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    args: Args,
    prefix: Prefix,
    upstream: UpstreamConfig,
    tls: Arc<Reloading>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics_listener = match args.metrics_addr {
        Some(a) => Some(
            metrics::bind(a)
                .await
                .with_context(|| format!("cannot listen on --metrics-addr {a}"))?,
        ),
        None => None,
    };
    let advertise = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("https://{}", listener.local_addr().unwrap_or(args.listen)));
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let hub = Arc::new(Hub::new(
        prefix.clone(),
        args.history_events,
        args.watch_buffer,
        advertise.clone(),
        shutdown_rx.clone(),
    ));

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(upstream::run(
        upstream,
        prefix.as_bytes().to_vec(),
        hub.clone(),
        Duration::from_millis(200),
        args.max_backoff,
    ));
    tasks.spawn(
        tls.clone()
            .watch_files(hub.clone(), args.tls_reload_interval),
    );
    if let Some(l) = metrics_listener {
        let (hub, rx) = (hub.clone(), shutdown_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(l, hub, rx).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }

    let incoming = ReceiverStream::new(tls::accept_loop(listener, tls, hub.clone()));
    let watch_cfg = service::watch::WatchConfig {
        out_buffer: 1024,
        progress_interval: args.progress_notify_interval,
    };
    let mut shutdown_server = shutdown_rx.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(PbKvServer::new(service::kv::KvService::new(hub.clone())))
        .add_service(PbWatchServer::new(service::watch::WatchService::new(
            hub.clone(),
            watch_cfg,
        )))
        .add_service(PbMaintenanceServer::new(
            service::maintenance::MaintenanceService::new(hub.clone()),
        ))
        .add_service(PbClusterServer::new(
            service::maintenance::ClusterService::new(hub.clone()),
        ))
        .add_service(RefuseService::<Lease>::new(hub.clone()))
        .add_service(RefuseService::<Auth>::new(hub.clone()))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown_server.wait_for(|s| *s).await;
        });
    tracing::info!(listen = %args.listen, advertise = %advertise, prefix = %prefix.display(), "serving");

    let signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            r = tokio::signal::ctrl_c() => r?,
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => {
            r.context("gRPC server failed")?;
            return Ok(());
        }
        r = signal => r.context("cannot wait for signals")?,
    }
    tracing::info!("shutting down: closing watch streams and connections");
    let _ = shutdown_tx.send(true);
    // Watch streams end when they see the shutdown; bound the wait anyway.
    if tokio::time::timeout(Duration::from_secs(10), &mut server)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10s; exiting anyway");
    }
    tasks.abort_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("x").is_err());
    }
}
