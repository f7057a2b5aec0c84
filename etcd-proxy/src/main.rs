//! podmesh-etcd-proxy: serves one cluster's mesh state, read-only and confined to one prefix, to the other clusters.
#![warn(unused_crate_dependencies)]
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::{PbClusterServer, PbKvServer, PbMaintenanceServer};

mod admin;
mod budget;
mod cache;
mod config;
mod hub;
mod lean;
mod metrics;
mod prefix;
mod purpose;
mod serve;
mod service;
mod tls;
mod txn;
mod upstream;

use config::Args;
use hub::Hub;
use prefix::Prefix;
use service::refuse::{Auth, Election, Lease, Lock, RefuseService};
use tls::{Reloading, TlsFiles};
use upstream::Settings;

/// mimalloc rather than glibc's malloc: every response to a watcher
/// allocates and frees a few short-lived buffers (the response, the HTTP/2
/// output, the TLS record) on whichever worker runs its connection, and
/// glibc's arenas spent about a tenth of the proxy's CPU on them at 10,000
/// connections (docs/benchmarks.md). Built without transparent huge pages
/// (`no_thp`): those would round every thread's heap up to 2 MiB of RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// How long connections may take to close after SIGTERM. Watch streams end
/// at once on shutdown, so only a client that stops reading holds a
/// connection this long; it stays below Kubernetes' default grace period
/// (30 s), so the proxy exits by itself rather than being killed.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("podmesh-etcd-proxy: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

fn main() -> ExitCode {
    let args = match config::load() {
        Ok(a) => a,
        Err(e) => return config_error(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: `kubectl logs` and journald show the
        // escape codes as they are.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Container runtimes often start processes with a soft limit of 1,024
    // open files and a far higher hard one: take the hard one.
    match podmesh_plumbing::limits::raise_nofile_limit() {
        Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit; it stays as it is")
        }
    }
    let Some(prefix) = Prefix::new(&args.allow_prefix) else {
        return config_error(
            "--allow-prefix must not be empty (an empty prefix would confine nothing)",
        );
    };
    let upstream = match Settings::load(&args.upstream_config) {
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
    let control = match control_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podmesh-etcd-proxy: cannot start the control runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let status = match rt.block_on(run(args, prefix, upstream, tls, control.handle())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podmesh-etcd-proxy: {e:#}");
            ExitCode::FAILURE
        }
    };
    control.shutdown_background();
    status
}

/// The runtime of the upstream watch, the file pollers and the metrics and
/// health endpoint: one thread of its own, beside the runtime that serves
/// clients. With thousands of watching connections, a task woken on the
/// clients' runtime waits behind every connection woken before it (a whole
/// fan-out of the previous update), and so would an event arriving from
/// the upstream before it is even published, or a kubelet's probe. Here
/// they run when they are woken, and the clients' runtime has only the
/// fan-out to do.
fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("podmesh-control")
        .enable_all()
        .build()
}

async fn run(
    args: Args,
    prefix: Prefix,
    upstream: Settings,
    tls: Arc<Reloading>,
    control: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics_listener = match args.metrics_addr {
        // Bound on the control runtime, whose thread serves it.
        Some(a) => Some(
            control
                .spawn(admin::bind(a))
                .await
                .context("the control runtime stopped")?
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
    let (settings_tx, settings_rx) = tokio::sync::watch::channel(Arc::new(upstream));
    tasks.spawn_on(
        upstream::settings::watch_files(
            args.upstream_config.clone(),
            settings_tx,
            hub.clone(),
            args.tls_reload_interval,
        ),
        control,
    );
    tasks.spawn_on(
        upstream::run(
            settings_rx,
            prefix.as_bytes().to_vec(),
            hub.clone(),
            podmesh_plumbing::lifecycle::Settings {
                min_backoff: Duration::from_millis(200),
                max_backoff: args.max_backoff,
                connect_timeout: args.connect_timeout,
            },
        ),
        control,
    );
    tasks.spawn_on(
        tls.clone()
            .watch_files(hub.clone(), args.tls_reload_interval),
        control,
    );
    if let Some(l) = metrics_listener {
        let (hub, rx) = (hub.clone(), shutdown_rx.clone());
        tasks.spawn_on(
            async move {
                if let Err(e) = admin::serve(l, hub, rx).await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            },
            control,
        );
    }

    let incoming = tls::accept_loop(listener, tls, hub.clone());
    let watch_cfg = service::watch::WatchConfig {
        out_buffer: 256,
        backlog: args.watch_backlog,
        progress_interval: args.progress_notify_interval,
    };
    let routes =
        tonic::service::Routes::new(PbKvServer::new(service::kv::KvService::new(hub.clone())))
            .add_service(service::watch::WatchServer::new(
                service::watch::WatchService::new(hub.clone(), watch_cfg),
            ))
            .add_service(PbMaintenanceServer::new(
                service::maintenance::MaintenanceService::new(hub.clone()),
            ))
            .add_service(PbClusterServer::new(
                service::maintenance::ClusterService::new(hub.clone()),
            ))
            .add_service(RefuseService::<Lease>::new(hub.clone()))
            .add_service(RefuseService::<Auth>::new(hub.clone()))
            .add_service(RefuseService::<Lock>::new(hub.clone()))
            .add_service(RefuseService::<Election>::new(hub.clone()));
    let server = serve::serve(
        incoming,
        routes,
        shutdown_rx.clone(),
        hub.clone(),
        args.max_connections.max(1),
        args.http2_server,
    );
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
        () = &mut server => return Ok(()),
        r = signal => r.context("cannot wait for signals")?,
    }
    tracing::info!("shutting down: closing watch streams and connections");
    let _ = shutdown_tx.send(true);
    // Watch streams end when they see the shutdown; bound the wait anyway.
    if tokio::time::timeout(DRAIN_DEADLINE, &mut server)
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?DRAIN_DEADLINE, "connections still open at the drain deadline; exiting anyway");
    }
    tasks.abort_all();
    Ok(())
}
