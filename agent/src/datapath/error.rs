//! What a datapath operation can fail with: the kernel's refusal, a netlink, map, program or file
//! failure with its source, a datapath that cannot run here, or records the datapath refuses.
//!
//! Part of the bottom layer (see [`super`]): it uses nothing of the
//! datapath but the netlink socket's error type.
use std::{fmt, io, net::IpAddr};

use ipnet::IpNet;

use super::nl::NlError;

/// A datapath operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The kernel refused `op` for `cidr`: one request of a batch (the
    /// others of the batch were still tried).
    #[error("{op} {cidr}: {source}{}", more_failed(*others))]
    Op {
        /// What was attempted (e.g. "upsert route").
        op: &'static str,
        /// The CIDR concerned.
        cidr: IpNet,
        /// How many other requests of the same batch failed too.
        others: usize,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// A netlink exchange failed as a whole (socket, dump, single request).
    #[error("{context}: {source}")]
    Netlink {
        /// What was attempted.
        context: String,
        /// Why.
        #[source]
        source: NlError,
    },
    /// An eBPF map could not be opened, read or written.
    #[error("{context}: {source}")]
    Map {
        /// What was attempted (names the map or the CIDR).
        context: String,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
    /// The eBPF object could not be loaded, verified, attached or pinned:
    /// the datapath cannot run until the hint is followed.
    #[error("datapath unavailable: {context}: {}{}", chain(source.as_ref()), hint_of(hint))]
    Program {
        /// What was attempted.
        context: String,
        /// What the operator can do about it (may be empty).
        hint: &'static str,
        /// aya's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file or directory (pins, the pin directory) could not be handled.
    #[error("{context}: {source}")]
    Io {
        /// What was attempted, naming the path.
        context: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The datapath cannot run on this machine (missing kernel feature,
    /// missing privilege, a port taken); the message says what to do.
    #[error("datapath unavailable: {0}")]
    Unavailable(String),
    /// Records this datapath cannot program (one entry each). Everything
    /// else of the same upsert was installed.
    #[error("{}", refusals(.0))]
    Refused(Vec<Refusal>),
    /// Any other failure (an object without the expected map, an exhausted
    /// id range): a defect, not a condition of the machine.
    #[error("{0}")]
    Other(String),
}

/// errnos after which the same request may well succeed: the kernel was
/// short of memory or busy, or a device that the next resync's repair
/// puts back went away.
const TRANSIENT_ERRNOS: [i32; 7] = [
    libc::EAGAIN,
    libc::EBUSY,
    libc::EINTR,
    libc::ENOBUFS,
    libc::ENOMEM,
    libc::ETIMEDOUT,
    libc::ENODEV,
];

fn transient_io(e: &io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|n| TRANSIENT_ERRNOS.contains(&n))
}

impl DatapathError {
    /// Whether retrying the same operation may succeed without anyone
    /// changing anything: the kernel was busy or short of memory, the
    /// netlink socket failed, a device went away. Refused records,
    /// an unavailable datapath and program failures stay until the records,
    /// the machine or podmesh change.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Op { source, .. } | Self::Io { source, .. } => transient_io(source),
            Self::Netlink { source, .. } => match source {
                NlError::Io(e) => transient_io(e),
                NlError::Kernel { errno } => TRANSIENT_ERRNOS.contains(errno),
                NlError::Netns { .. } | NlError::Malformed(_) => false,
            },
            Self::Map { source, .. } => match source {
                aya::maps::MapError::SyscallError(e) => transient_io(&e.io_error),
                _ => false,
            },
            Self::Program { .. } | Self::Unavailable(_) | Self::Refused(_) | Self::Other(_) => {
                false
            }
        }
    }

    /// A refusal of `op` for `cidr` with the kernel's `errno`; `others`
    /// requests of the same batch failed too.
    pub fn op(op: &'static str, cidr: IpNet, errno: i32, others: usize) -> Self {
        Self::Op {
            op,
            cidr,
            others,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// A netlink failure while doing `context`.
    pub fn netlink(context: impl Into<String>, source: NlError) -> Self {
        Self::Netlink {
            context: context.into(),
            source,
        }
    }

    /// A map failure while doing `context`.
    pub fn map(context: impl Into<String>, source: aya::maps::MapError) -> Self {
        Self::Map {
            context: context.into(),
            source,
        }
    }

    /// A failure of the eBPF object or program while doing `context`.
    pub fn program(
        context: impl Into<String>,
        hint: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Program {
            context: context.into(),
            hint,
            source: Box::new(source),
        }
    }

    /// A file failure while doing `context`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// For [`super::nl::in_netns`], whose failure to enter the namespace
/// comes as an [`NlError`] naming the namespace.
impl From<NlError> for DatapathError {
    fn from(source: NlError) -> Self {
        Self::netlink("netlink", source)
    }
}

/// What an upsert that tried every record returns: its first failure,
/// else the records it refused, else success.
pub fn upsert_result(
    first_err: Option<DatapathError>,
    refused: Vec<Refusal>,
) -> Result<(), DatapathError> {
    match (first_err, refused.is_empty()) {
        (Some(e), _) => Err(e),
        (None, false) => Err(DatapathError::Refused(refused)),
        (None, true) => Ok(()),
    }
}

/// For `map_err`: a netlink failure while doing `context`.
pub fn netlink_err(context: &'static str) -> impl FnOnce(NlError) -> DatapathError {
    move |source| DatapathError::netlink(context, source)
}

/// One record the datapath refuses to program, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The record's Pod CIDR.
    pub cidr: IpNet,
    /// Its cluster.
    pub cluster: String,
    /// Its node.
    pub node: String,
    /// Why.
    pub reason: RefusalReason,
}

/// Why a datapath refuses a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The node published no VTEP MAC, which this mode needs (`ebpf`, `vxlan`).
    NoVtepMac {
        /// The datapath mode.
        mode: &'static str,
    },
    /// The node's tunnel endpoint is not of the underlay's family.
    UnderlayFamily {
        /// The node address.
        addr: IpAddr,
        /// The underlay's family.
        underlay: crate::model::UnderlayFamily,
    },
    /// An IPv6 Pod CIDR behind an IPv4 next hop (`direct`, `ipip`): Linux
    /// routes IPv6 through no IPv4 gateway.
    Ipv6OverIpv4 {
        /// The datapath mode.
        mode: &'static str,
        /// The node address.
        addr: IpAddr,
    },
    /// The node address is on no directly connected network (`direct`).
    NotConnected {
        /// The node address.
        addr: IpAddr,
    },
    /// `--encryption-strict` and the node published no WireGuard key.
    EncryptionRequired,
    /// The node's WireGuard key is already the key of `owner` (another node,
    /// or this node itself), which keeps it.
    WireguardKeyDuplicate {
        /// Who holds the key (`cluster/node`, or `this node`).
        owner: String,
    },
}

impl RefusalReason {
    /// The stable reason code the record's rejection carries.
    pub fn code(&self) -> &'static str {
        use crate::desired::code;
        match self {
            Self::EncryptionRequired => code::ENCRYPTION_REQUIRED,
            Self::WireguardKeyDuplicate { .. } => code::WIREGUARD_KEY_DUPLICATE,
            Self::NoVtepMac { .. }
            | Self::UnderlayFamily { .. }
            | Self::Ipv6OverIpv4 { .. }
            | Self::NotConnected { .. } => code::DATAPATH_REFUSED,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (cidr, cluster, node) = (self.cidr, &self.cluster, &self.node);
        match &self.reason {
            RefusalReason::NoVtepMac { mode } => write!(
                f,
                "upsert {cidr}: node {cluster}/{node} published no vtepMAC; the {mode} datapath \
                 needs it (is the remote agent older or in another datapath mode?)"
            ),
            RefusalReason::UnderlayFamily { addr, underlay } => write!(
                f,
                "upsert {cidr}: node {cluster}/{node} has {addr} as tunnel endpoint; this \
                 datapath tunnels over an {underlay} underlay (hint: give that node an {underlay} \
                 --node-ip, or run this node with --underlay-family {})",
                crate::model::UnderlayFamily::of(*addr).flag()
            ),
            RefusalReason::Ipv6OverIpv4 { mode, addr } => write!(
                f,
                "upsert {cidr}: node {cluster}/{node} is reached through the IPv4 address {addr}, \
                 and the {mode} datapath cannot route an IPv6 Pod CIDR through an IPv4 next hop \
                 (hint: the ebpf and vxlan datapaths carry IPv6 Pod CIDRs over an IPv4 underlay; \
                 or give the nodes IPv6 addresses and run with --underlay-family ipv6)"
            ),
            RefusalReason::NotConnected { addr } => write!(
                f,
                "upsert {cidr}: node address {addr} is not on a directly connected network \
                 (hint: the direct datapath needs a shared L2 underlay; use ebpf or vxlan)"
            ),
            RefusalReason::EncryptionRequired => write!(
                f,
                "upsert {cidr}: node {cluster}/{node} publishes no wireguardPublicKey and this \
                 node runs --encryption-strict, so it is not reached in clear (hint: run its \
                 agent with --encryption wireguard)"
            ),
            RefusalReason::WireguardKeyDuplicate { owner } => write!(
                f,
                "upsert {cidr}: node {cluster}/{node} publishes the wireguardPublicKey of \
                 {owner}, which keeps it; a key identifies one node (hint: remove the copied \
                 key file under --wireguard-key-dir on {node} and restart its agent)"
            ),
        }
    }
}

/// Refusals shown in one error message; the rest are counted.
const REFUSALS_SHOWN: usize = 3;

fn refusals(r: &[Refusal]) -> String {
    let mut s = r
        .iter()
        .take(REFUSALS_SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if r.len() > REFUSALS_SHOWN {
        s.push_str(&format!(
            "; and {} more records refused",
            r.len() - REFUSALS_SHOWN
        ));
    }
    s
}

fn more_failed(others: usize) -> String {
    match others {
        0 => String::new(),
        n => format!(" ({n} more of the batch failed)"),
    }
}

fn hint_of(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" (hint: {hint})")
    }
}

/// An error and its sources, `: `-separated: aya's errors keep the
/// kernel's reason in their sources.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(cidr: &str) -> Refusal {
        Refusal {
            cidr: cidr.parse().unwrap(),
            cluster: "west".into(),
            node: "n1".into(),
            reason: RefusalReason::NoVtepMac { mode: "ebpf" },
        }
    }

    #[test]
    fn refused_names_each_record_and_counts_the_rest() {
        let e =
            DatapathError::Refused((0..5).map(|i| refusal(&format!("10.2.{i}.0/24"))).collect());
        let msg = e.to_string();
        assert!(
            msg.contains("10.2.0.0/24") && msg.contains("vtepMAC"),
            "{msg}"
        );
        assert!(
            msg.contains("10.2.2.0/24") && !msg.contains("10.2.3.0/24"),
            "{msg}"
        );
        assert!(msg.ends_with("and 2 more records refused"), "{msg}");
        assert!(!e.is_transient());
    }

    #[test]
    fn transient_follows_the_errno() {
        let cidr: IpNet = "10.2.0.0/24".parse().unwrap();
        assert!(DatapathError::op("upsert route", cidr, libc::ENOBUFS, 0).is_transient());
        assert!(!DatapathError::op("upsert route", cidr, libc::EINVAL, 0).is_transient());
        assert!(
            DatapathError::netlink("listing routes", NlError::Kernel { errno: libc::EBUSY })
                .is_transient()
        );
        assert!(
            !DatapathError::netlink("listing routes", NlError::Kernel { errno: libc::EPERM })
                .is_transient()
        );
        assert!(!DatapathError::Unavailable("no IPIP".into()).is_transient());
        let e = DatapathError::op("upsert route", cidr, libc::EINVAL, 2);
        assert_eq!(
            e.to_string(),
            format!(
                "upsert route 10.2.0.0/24: {} (2 more of the batch failed)",
                io::Error::from_raw_os_error(libc::EINVAL)
            )
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn program_errors_show_their_sources_and_hint() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] io::Error);
        let e = DatapathError::program(
            "loading the eBPF object",
            "needs CAP_BPF",
            Outer(io::Error::other("inner")),
        );
        assert_eq!(
            e.to_string(),
            "datapath unavailable: loading the eBPF object: outer: inner (hint: needs CAP_BPF)"
        );
    }
}
