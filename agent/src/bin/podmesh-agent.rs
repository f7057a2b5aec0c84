//! `podmesh-agent`: the node daemon.
use std::process::ExitCode;

use podmesh_agent::{
    config,
    datapath::{KernelConfig, from_config, memory::MemoryDatapath},
    runtime,
};

fn main() -> ExitCode {
    let cfg = match config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("podmesh-agent: {e}");
            return ExitCode::from(64);
        }
    };
    let rust_log = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !rust_log.contains("kube_runtime")
        && let Ok(d) = podmesh_agent::k8s::WATCHER_LOG_DIRECTIVE.parse()
    {
        filter = filter.add_directive(d);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podmesh-agent: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The causes the message does not already hold (errors keep
            // their sources and often quote them too).
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("podmesh-agent: {}", podmesh_agent::kvstore::one_line(e));
            ExitCode::from(1)
        }
    }
}

/// Rotates this node's WireGuard key on every SIGUSR1: a new key file, the
/// device's new private key, the new public key in the node record; the
/// remote nodes follow the record.
async fn rotate_on_signal(h: podmesh_agent::datapath::wireguard::WgHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        tracing::warn!("cannot listen for SIGUSR1; WireGuard key rotation by signal is off");
        return;
    };
    while usr1.recv().await.is_some() {
        match tokio::task::spawn_blocking({
            let h = h.clone();
            move || h.rotate()
        })
        .await
        {
            Ok(Ok(public)) => {
                tracing::info!(public_key = %public, "rotated this node's WireGuard key; publishing the new public key")
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "rotating the WireGuard key failed; the old key stays")
            }
            Err(e) => tracing::error!(error = %e, "rotating the WireGuard key failed"),
        }
    }
}

async fn run(cfg: config::AgentConfig) -> anyhow::Result<()> {
    // The one place where the datapath is chosen.
    let mut agent = if cfg.datapath_dry_run {
        runtime::start(&cfg, MemoryDatapath::new(), None).await?
    } else {
        let kc = KernelConfig {
            tunnel_port: cfg.tunnel_port,
            vni: cfg.vni,
            underlay_mtu: cfg.underlay_mtu,
            pin_dir: cfg.bpf_pin_dir.clone(),
            node_ip: cfg.underlay_ip(),
            underlay: cfg.underlay_family,
            wireguard: cfg.wireguard.clone(),
            ..KernelConfig::new(cfg.datapath)
        };
        let dp = from_config(&kc)?;
        let mac = dp.vtep_mac();
        let packets = dp.counter_reader();
        let exemption = dp.exemption();
        let rp_strict = dp.rp_filter_strict();
        let wg = dp.wireguard();
        let agent = match &wg {
            Some(h) => runtime::start_encrypted(&cfg, dp, mac, h.public_key()).await?,
            None => runtime::start(&cfg, dp, mac).await?,
        };
        if let Some(h) = wg {
            let read = h.clone();
            agent.status.set_wireguard_source(move || read.status());
            tokio::spawn(rotate_on_signal(h));
        }
        agent.status.set_exemption_source(exemption);
        agent.status.set_rp_filter_source(rp_strict);
        match packets {
            Some(Ok(r)) => agent
                .status
                .set_packet_source(move || r.read().map_err(|e| e.to_string())),
            Some(Err(e)) => tracing::warn!(
                error = %e,
                "the eBPF program's packet counters cannot be read; /metrics and /status will not show them"
            ),
            None => {}
        }
        agent
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping; routes and the node record (until its lease expires) stay in place");
    agent.stop();
    Ok(())
}
