//! `cargo xtask bench proxy`: watch fan-out through podmesh-etcd-proxy vs `etcd grpc-proxy` vs
//! direct etcd, same load in one run: latency p50/p99, proxy RSS, upstream watch count.
use crate::util::sh;

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Watcher counts, comma separated (100 watchers per gRPC stream, 10 streams per connection).
    #[arg(long, default_value = "1000,10000")]
    pub watchers: String,
    /// Puts per second on the watched prefix.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

pub fn run(args: &ProxyArgs) -> anyhow::Result<()> {
    sh(super::bench_test("proxy_bench", "proxy_bench")
        .env("PODMESH_BENCH_WATCHERS", &args.watchers)
        .env("PODMESH_BENCH_RATE", args.rate.to_string())
        .env("PODMESH_BENCH_SECONDS", args.seconds.to_string()))
}
