//! `podmesh diagnose`: walks the layers a cross-cluster connection needs,
//! for each remote cluster in order (config, reach, authz, sync, datapath,
//! plan), stops descending a cluster at its first failed check, and says
//! for every failed check what it saw and what to do.
//!
//! Each layer is a module that produces [`Check`]s; this module only orders
//! them. The layers reuse the agent's own cores: the Secret scan and etcd
//! client settings (`remote::secret`, `kvstore`), the TLS cause classifier
//! (`remote::hint`), `/status`, the datapath's readers of routes, nexthops,
//! neighbours, pinned maps and the WireGuard device, and the validation
//! core of `plan check`.
use serde::Serialize;

pub mod authz;
pub mod check;
pub mod config;
pub mod datapath;
pub mod probe;
pub mod reach;
pub mod render;
pub mod run;
pub mod sync;
pub mod tls;
pub mod wireguard;

pub use run::{Options, diagnose};

/// The layers, in the order they are walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// The clustermesh Secret: files, names, certificates.
    Config,
    /// DNS, TCP and the TLS handshake towards each endpoint.
    Reach,
    /// What the remote lets this node do: read yes, write no.
    Authz,
    /// The agent's view: connected, synced, records.
    Sync,
    /// The kernel: entries, tunnel device, path probes.
    Datapath,
    /// The address plan over the live records.
    Plan,
}

impl Layer {
    /// The name as JSON and tables spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Config => "config",
            Layer::Reach => "reach",
            Layer::Authz => "authz",
            Layer::Sync => "sync",
            Layer::Datapath => "datapath",
            Layer::Plan => "plan",
        }
    }
}

/// How bad a failed check is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The link is broken (or will break): exit 1, and the cluster's lower layers are not walked.
    Error,
    /// Works, but will not for long or not as intended.
    Warning,
    /// What was seen, for the record.
    Info,
}

/// One check: what was looked at, whether it passed, the evidence and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The layer.
    pub layer: Layer,
    /// The remote cluster it is about; `None` for checks of this node as a whole.
    pub cluster: Option<String>,
    /// The stable name of the check (see [`check`]).
    pub check: &'static str,
    /// Passed.
    pub ok: bool,
    /// `error` for a failed check that breaks the link, `warning`, or
    /// `info` (a passed check, or one that was skipped and why).
    pub severity: Severity,
    /// What was seen.
    pub evidence: String,
    /// What to do (empty when it passed).
    pub fix: String,
}

impl Check {
    /// A passed check.
    pub fn pass(
        layer: Layer,
        cluster: Option<&str>,
        check: &'static str,
        evidence: impl Into<String>,
    ) -> Self {
        Self {
            layer,
            cluster: cluster.map(str::to_string),
            check,
            ok: true,
            severity: Severity::Info,
            evidence: evidence.into(),
            fix: String::new(),
        }
    }

    /// A failed check that breaks the link.
    pub fn fail(
        layer: Layer,
        cluster: Option<&str>,
        check: &'static str,
        evidence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            layer,
            cluster: cluster.map(str::to_string),
            check,
            ok: false,
            severity: Severity::Error,
            evidence: evidence.into(),
            fix: fix.into(),
        }
    }

    /// A failed check that does not break the link (yet).
    pub fn warn(
        layer: Layer,
        cluster: Option<&str>,
        check: &'static str,
        evidence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::fail(layer, cluster, check, evidence, fix)
        }
    }

    /// Whether this check stops the walk of its cluster (and fails the run).
    pub fn is_failure(&self) -> bool {
        !self.ok && self.severity == Severity::Error
    }
}

/// The whole run, as `-o json` prints it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No check failed.
    pub ok: bool,
    /// Every check, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    /// A report of `checks`.
    pub fn new(checks: Vec<Check>) -> Self {
        Self {
            ok: !checks.iter().any(Check::is_failure),
            checks,
        }
    }
}

#[cfg(test)]
mod tests;
