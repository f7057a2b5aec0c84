//! `cargo xtask bench proxy`: watch fan-out through podmesh-etcd-proxy vs `etcd grpc-proxy` vs
//! direct etcd, same load in one run: latency p50/p99, proxy RSS, upstream watch count. Two shapes:
//! many watchers on a few connections (`--watchers`), and one TLS connection with one watch each,
//! as remote agents hold them (`--connections`).
use crate::util::sh;

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Watcher counts, comma separated (100 watchers per gRPC stream, 10 streams per connection).
    /// Without `--watchers` and `--connections` both shapes run with their defaults.
    #[arg(long)]
    pub watchers: Option<String>,
    /// Connection counts, comma separated: one TLS connection with one watch each, spread over
    /// 8 loopback source addresses (default 10000). Targets: `PODMESH_BENCH_TARGETS`, comma
    /// separated, of `podmesh-etcd-proxy` (its default, lean HTTP/2 server),
    /// `podmesh-etcd-proxy (hyper)` (`--http2-server hyper`) and `etcd grpc-proxy` (all three
    /// by default).
    #[arg(long)]
    pub connections: Option<String>,
    /// Puts per second on the watched prefix [default: 100 with --watchers, 50 with --connections].
    #[arg(long)]
    pub rate: Option<u64>,
    /// Seconds of load per measurement of the watchers shape.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Puts per measurement of the connections shape.
    #[arg(long, default_value_t = 200)]
    pub puts: u64,
    /// Extra podmesh-etcd-proxy flags for the connections shape (space separated).
    #[arg(long, default_value = "")]
    pub proxy_flags: String,
}

pub fn run(args: &ProxyArgs) -> anyhow::Result<()> {
    let both = args.watchers.is_none() && args.connections.is_none();
    if both || args.watchers.is_some() {
        sh(super::bench_test("proxy_bench", "proxy_bench")
            .env(
                "PODMESH_BENCH_WATCHERS",
                args.watchers.as_deref().unwrap_or("1000,10000"),
            )
            .env("PODMESH_BENCH_RATE", args.rate.unwrap_or(100).to_string())
            .env("PODMESH_BENCH_SECONDS", args.seconds.to_string()))?;
    }
    if both || args.connections.is_some() {
        sh(super::bench_test("proxy_bench", "proxy_connections_bench")
            .env(
                "PODMESH_BENCH_CONNECTIONS",
                args.connections.as_deref().unwrap_or("10000"),
            )
            .env("PODMESH_BENCH_RATE", args.rate.unwrap_or(50).to_string())
            .env("PODMESH_BENCH_PUTS", args.puts.to_string())
            .env("PODMESH_BENCH_PROXY_FLAGS", &args.proxy_flags))?;
    }
    Ok(())
}
