//! The stable names of `podmesh diagnose`'s checks (the `check` field; each
//! has its section in docs/troubleshooting.md).

/// The clustermesh Secret directory can be read.
pub const SECRET_DIR: &str = "secret-dir";
/// A file of the Secret directory that is neither a cluster entry nor a file an entry names.
pub const SECRET_ENTRY_IGNORED: &str = "secret-entry-ignored";
/// The cluster's entry reads and parses as an etcd client YAML.
pub const SECRET_PARSES: &str = "secret-parses";
/// The entry is not named after this agent's own cluster.
pub const LOCAL_CLUSTER_LISTED: &str = "local-cluster-listed";
/// The CA, certificate and key files are present and hold PEM.
pub const TLS_FILES: &str = "tls-files";
/// The certificate and the key are one pair.
pub const CERT_KEY_PAIR: &str = "cert-key-pair";
/// The client certificate chains to the CA of trusted-ca-file.
pub const CERT_CHAIN: &str = "cert-chain";
/// The client certificate and the CA are valid now, and for 30 days more.
pub const CERT_EXPIRY: &str = "cert-expiry";
/// The endpoint's host name resolves.
pub const DNS: &str = "dns";
/// A TCP connection to the endpoint opens.
pub const TCP: &str = "tcp";
/// The TLS handshake completes and the server accepts the client certificate.
pub const TLS_HANDSHAKE: &str = "tls-handshake";
/// The server certificate names the endpoint.
pub const SERVER_CERT_NAME: &str = "server-cert-name";
/// A read of the mesh prefix succeeds.
pub const READ: &str = "read";
/// A write is refused (the remote view is read-only).
pub const WRITE_REFUSED: &str = "write-refused";
/// The etcd version and cluster ID behind the endpoint.
pub const ETCD_IDENTITY: &str = "etcd-identity";
/// The agent's status server answers.
pub const AGENT: &str = "agent";
/// The agent is connected to the remote.
pub const CONNECTED: &str = "connected";
/// The agent has a complete list of the remote's records.
pub const SYNCED: &str = "synced";
/// What the agent holds for the remote.
pub const RECORDS: &str = "records";
/// A record of the remote the agent rejected or quarantined.
pub const REJECTED_RECORD: &str = "rejected-record";
/// How long ago the remote last changed.
pub const LAST_EVENT: &str = "last-event";
/// The tunnel device is there, up, with the configured port.
pub const TUNNEL_DEVICE: &str = "tunnel-device";
/// What should be programmed for the remote is what the kernel holds.
pub const ENTRIES: &str = "entries";
/// The tunnel device's MTU with the encapsulation fits the underlay device's.
pub const TUNNEL_MTU: &str = "tunnel-mtu";
/// podmesh's entries in the kernel that no remote cluster wants.
pub const STALE_ENTRIES: &str = "stale-entries";
/// What the agent found of the node's CNI.
pub const CNI: &str = "cni";
/// The masquerade exemption.
pub const MASQUERADE: &str = "masquerade";
/// Strict reverse-path filtering.
pub const RP_FILTER: &str = "rp-filter";
/// An echo through the tunnel to a remote node and back.
pub const TUNNEL_PROBE: &str = "tunnel-probe";
/// The address plan over the live records.
pub const PLAN: &str = "plan";
/// The WireGuard device is there, up, on the configured port, with the key this node publishes.
pub const WIREGUARD_DEVICE: &str = "wireguard-device";
/// Every remote node with a key is a peer with its Pod CIDRs and its address.
pub const WIREGUARD_PEER: &str = "wireguard-peer";
/// Remote nodes reached in clear: they publish no WireGuard key.
pub const WIREGUARD_CLEAR: &str = "wireguard-clear";
/// How long ago each remote node's WireGuard session was last keyed.
pub const WIREGUARD_HANDSHAKE: &str = "wireguard-handshake";
