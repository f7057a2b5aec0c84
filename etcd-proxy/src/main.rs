//! podmesh-etcd-proxy: serves one cluster's mesh state to the other clusters.
use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;

/// mTLS, read-only, prefix-confined etcd v3 proxy: one upstream watch of the
/// mesh prefix fanned out to many remote watchers.
#[derive(Debug, Parser)]
#[command(name = "podmesh-etcd-proxy", version, about, long_about = None)]
struct Args {
    /// Address to serve the etcd v3 gRPC API on.
    #[arg(long)]
    listen: SocketAddr,
    /// etcd client YAML of the upstream (this cluster's mesh etcd).
    #[arg(long, value_name = "FILE")]
    upstream_config: PathBuf,
    /// Server certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    #[arg(long, value_name = "FILE")]
    client_ca: PathBuf,
    /// Only keys under this prefix are served.
    #[arg(long, default_value = "podmesh/v1/")]
    allow_prefix: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    eprintln!("podmesh-etcd-proxy: parsed {args:?}; serving is not wired yet");
    std::process::ExitCode::from(70)
}
