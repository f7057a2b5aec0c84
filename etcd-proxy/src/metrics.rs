//! Prometheus metrics of the proxy (served by [`crate::admin`]).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// Upstream connection states as exported in `podmesh_proxy_upstream_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamState {
    Disconnected = 0,
    Connecting = 1,
    Watching = 2,
}

impl UpstreamState {
    pub fn name(self) -> &'static str {
        match self {
            UpstreamState::Disconnected => "disconnected",
            UpstreamState::Connecting => "connecting",
            UpstreamState::Watching => "watching",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub watchers: Gauge,
    pub watch_streams: Gauge,
    pub upstream_state: Gauge,
    pub upstream_reconnects: Counter,
    pub upstream_relists: Counter,
    pub upstream_diverged: Counter,
    pub events_in: Counter,
    pub events_out: Counter,
    pub cache_keys: Gauge,
    pub cache_revision: Gauge,
    pub refused: Family<Reason, Counter>,
    pub watchers_cancelled: Family<Reason, Counter>,
    pub tls_reloads: Counter,
    pub upstream_config_reloads: Counter,
    pub connections: Gauge,
    pub max_connections: Gauge,
    pub connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("podmesh_proxy");
        let m = Metrics {
            registry: Registry::default(),
            watchers: Gauge::default(),
            watch_streams: Gauge::default(),
            upstream_state: Gauge::default(),
            upstream_reconnects: Counter::default(),
            upstream_relists: Counter::default(),
            upstream_diverged: Counter::default(),
            events_in: Counter::default(),
            events_out: Counter::default(),
            cache_keys: Gauge::default(),
            cache_revision: Gauge::default(),
            refused: Family::default(),
            watchers_cancelled: Family::default(),
            tls_reloads: Counter::default(),
            upstream_config_reloads: Counter::default(),
            connections: Gauge::default(),
            max_connections: Gauge::default(),
            connections_refused: Counter::default(),
        };
        registry.register("watchers", "Active downstream watchers", m.watchers.clone());
        registry.register(
            "watch_streams",
            "Open downstream Watch streams",
            m.watch_streams.clone(),
        );
        registry.register(
            "upstream_state",
            "Upstream connection: 0 disconnected, 1 connecting, 2 watching",
            m.upstream_state.clone(),
        );
        registry.register(
            "upstream_reconnects",
            "Upstream connection attempts after the first",
            m.upstream_reconnects.clone(),
        );
        registry.register(
            "upstream_relists",
            "Complete re-lists of the prefix (first sync, compaction, rewound upstream)",
            m.upstream_relists.clone(),
        );
        registry.register(
            "upstream_diverged",
            "Reconnects that found the upstream holding another history of the prefix at the proxy's revision (etcd rebuilt under the same cluster ID); each is followed by a re-list",
            m.upstream_diverged.clone(),
        );
        registry.register(
            "events_in",
            "Events received from the upstream watch",
            m.events_in.clone(),
        );
        registry.register(
            "events_out",
            "Events delivered to downstream watchers",
            m.events_out.clone(),
        );
        registry.register("cache_keys", "Keys held in the cache", m.cache_keys.clone());
        registry.register(
            "cache_revision",
            "Upstream revision the cache is complete up to",
            m.cache_revision.clone(),
        );
        registry.register(
            "refused_requests",
            "Refused requests by reason",
            m.refused.clone(),
        );
        registry.register(
            "watchers_cancelled",
            "Downstream watchers cancelled by the proxy, by reason",
            m.watchers_cancelled.clone(),
        );
        registry.register(
            "tls_reloads",
            "Server certificate reloads",
            m.tls_reloads.clone(),
        );
        registry.register(
            "upstream_config_reloads",
            "Changes of the upstream config or of the credentials it names, each followed by a reconnect",
            m.upstream_config_reloads.clone(),
        );
        registry.register(
            "connections",
            "Client connections in use (TLS done, HTTP/2 served)",
            m.connections.clone(),
        );
        registry.register(
            "max_connections",
            "Client connections the proxy serves at most (--max-connections)",
            m.max_connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections refused because --max-connections were in use",
            m.connections_refused.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn cancelled(&self, reason: &str, n: u64) {
        self.watchers_cancelled
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
