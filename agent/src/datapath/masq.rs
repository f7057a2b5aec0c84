//! The masquerade exemption: pod traffic to remote clusters' pods keeps the pod's source address.
//!
//! The node's CNI masquerades what its pods send outside the node's (or the
//! cluster's) pod network: the `bridge` and `ptp` plugins with `ipMasq`,
//! flannel, Calico's `natOutgoing`, ip-masq-agent. Left alone, every
//! cross-cluster connection would arrive from the sending node's address.
//! podmesh owns one object against that, never the CNI's chains:
//!
//! ```text
//! table inet podmesh {
//!     set remote-pods-v4 { type ipv4_addr; flags interval; }
//!     set remote-pods-v6 { type ipv6_addr; flags interval; }
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat - 10; policy accept;
//!         ip daddr @remote-pods-v4 snat ip to ip saddr
//!         ip6 daddr @remote-pods-v6 snat ip6 to ip6 saddr
//!     }
//! }
//! ```
//!
//! Why a null SNAT binding and not `accept`: every nat chain on a hook (the
//! iptables `nat` table, nft or legacy, and every nftables nat chain) is one
//! entry of the same list that `nf_nat_inet_fn` walks in priority order, and
//! an `accept` only ends its own chain; the CNI's MASQUERADE at priority
//! `srcnat` still runs. Once a chain has set up a source NAT binding, the walk
//! stops (`nf_nat_initialized`, net/netfilter/nf_nat_core.c). Translating the
//! source to itself is such a binding, and it changes nothing in the packet.
//! Only the first packet of a connection passes the nat hooks, so the cost
//! is one set lookup per new connection; the replies follow conntrack.
//!
//! The sets hold exactly the remote Pod CIDRs that are programmed, updated
//! incrementally with the routes, and the periodic resync makes them equal to
//! what is programmed and re-creates the table when someone removed or
//! changed it. The table itself is created and checked with `nft` (the
//! nftables package), as netavark does; the elements go over nf_tables
//! netlink ([`super::nftset`]), since nft's own element updates of interval
//! sets read the whole set each time and delete in quadratic time.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::nftset::NftSets;

/// The nftables table podmesh owns (family `inet`).
pub const TABLE: &str = "podmesh";
/// The set of remote IPv4 Pod CIDRs.
pub const SET_V4: &str = "remote-pods-v4";
/// The set of remote IPv6 Pod CIDRs.
pub const SET_V6: &str = "remote-pods-v6";
/// The nat chain on the postrouting hook.
pub const CHAIN: &str = "postrouting";
/// The chain's priority: before `srcnat` (100), where iptables' nat
/// POSTROUTING and the CNI's masquerade sit.
pub const PRIORITY: i32 = 90;

/// The exemption failed.
#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    /// `nft` is not installed.
    #[error(
        "cannot run {nft}: {source} (install the nftables package; without it, pod traffic to \
         remote clusters leaves with the node's address wherever the CNI masquerades)"
    )]
    NftMissing {
        /// The program looked for.
        nft: String,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused what podmesh asked.
    #[error("nft refused to {op}: {stderr}")]
    Refused {
        /// What was attempted.
        op: String,
        /// nft's message.
        stderr: String,
    },
    /// `nft -j` printed something that is not its JSON.
    #[error("cannot read nft's listing of table inet {TABLE}: {0}")]
    Listing(String),
    /// nf_tables refused a change of the sets' elements, or could not list them.
    #[error("{op} (table inet {TABLE}): {source}")]
    Elements {
        /// What was attempted.
        op: String,
        /// The netlink failure.
        #[source]
        source: super::nl::NlError,
    },
}

impl From<super::nl::NlError> for MasqError {
    /// Entering the node's network namespace to run nft failed.
    fn from(source: super::nl::NlError) -> Self {
        Self::Elements {
            op: "enter the network namespace to run nft".into(),
            source,
        }
    }
}

/// What `/status` says of the exemption.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExemptionStatus {
    /// The table is in place, as podmesh wants it.
    pub installed: bool,
    /// Remote Pod CIDRs in its sets.
    pub cidrs: usize,
    /// Times the table was found removed or altered and set up again.
    pub repairs: u64,
    /// The last failure, with what to do.
    pub error: Option<String>,
}

/// A shared view of the exemption's state for the status server.
pub type ExemptionHandle = Arc<Mutex<ExemptionStatus>>;

/// The exemption in one network namespace.
#[derive(Debug)]
pub struct MasqExemption {
    netns: Option<PathBuf>,
    nft: String,
    /// What the sets hold, as far as this process knows (read back from the
    /// kernel at start and whenever a change was refused).
    present: BTreeSet<IpNet>,
    /// The table was set up once by this process.
    set_up: bool,
    /// The nf_tables socket for the elements, opened on first use.
    sets: Option<NftSets>,
    state: ExemptionHandle,
}

impl MasqExemption {
    /// The exemption of the namespace at `netns` (`None`: this process's).
    /// Nothing is touched before [`MasqExemption::ensure`].
    pub fn new(netns: Option<&Path>) -> Self {
        Self {
            netns: netns.map(Path::to_path_buf),
            nft: "nft".to_string(),
            present: BTreeSet::new(),
            set_up: false,
            sets: None,
            state: ExemptionHandle::default(),
        }
    }

    /// The state for `/status`.
    pub fn handle(&self) -> ExemptionHandle {
        self.state.clone()
    }

    /// Records the outcome of an operation in the status and passes it on.
    fn record<T>(&mut self, r: Result<T, MasqError>) -> Result<T, MasqError> {
        let mut s = self.state.lock().expect("exemption status lock");
        match &r {
            Ok(_) => {
                s.error = None;
                s.installed = true;
            }
            Err(e) => s.error = Some(e.to_string()),
        }
        s.cidrs = self.present.len();
        r
    }

    /// Creates the table when it is missing and re-creates it (empty) when it
    /// is not as podmesh wants it. Returns what was wrong when it had to.
    /// The first call sets the table up and returns `None`; later ones
    /// return what they found wrong (a repair, counted in the status).
    pub fn ensure(&mut self) -> Result<Option<String>, MasqError> {
        let first = !self.set_up;
        let r = self.ensure_inner().map(|wrong| wrong.filter(|_| !first));
        if let Ok(w) = &r {
            self.set_up = true;
            if w.is_some() {
                self.state.lock().expect("exemption status lock").repairs += 1;
            }
        }
        self.record(r)
    }

    fn ensure_inner(&mut self) -> Result<Option<String>, MasqError> {
        let listing = self.list()?;
        let wrong = match &listing {
            None => Some(format!("table inet {TABLE} is missing")),
            Some(l) => l.defect(),
        };
        let Some(wrong) = wrong else {
            // Read once at set-up; later, the resync's `sync` reads them.
            if !self.set_up {
                self.present = self.read_elements()?;
            }
            return Ok(None);
        };
        self.present.clear();
        let mut script = String::new();
        if listing.is_some() {
            // Declaring the table first makes the delete valid either way,
            // all in one transaction: no moment without the exemption's rules
            // would be any better than this one.
            let _ = writeln!(script, "table inet {TABLE}\ndelete table inet {TABLE}");
        }
        script.push_str(&table_definition());
        self.run(&script, "create table inet podmesh")?;
        Ok(Some(wrong))
    }

    /// Adds these CIDRs to the sets (those already there are skipped).
    pub fn add(&mut self, cidrs: impl IntoIterator<Item = IpNet>) -> Result<(), MasqError> {
        let new: Vec<IpNet> = cidrs
            .into_iter()
            .filter(|c| !self.present.contains(c))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let r = self.change("add", &new);
        self.record(r)
    }

    /// Removes these CIDRs from the sets (absent ones are skipped).
    pub fn remove(&mut self, cidrs: &[IpNet]) -> Result<(), MasqError> {
        let gone: Vec<IpNet> = cidrs
            .iter()
            .filter(|c| self.present.contains(c))
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let r = self.change("delete", &gone);
        self.record(r)
    }

    /// Makes the sets hold exactly `keep`, from what the kernel holds now.
    /// Returns how many elements were added and removed.
    pub fn sync(&mut self, keep: &BTreeSet<IpNet>) -> Result<(usize, usize), MasqError> {
        let r = self.sync_inner(keep);
        self.record(r)
    }

    fn sync_inner(&mut self, keep: &BTreeSet<IpNet>) -> Result<(usize, usize), MasqError> {
        self.present = self.read_elements()?;
        let extra: Vec<IpNet> = self.present.difference(keep).copied().collect();
        let missing: Vec<IpNet> = keep.difference(&self.present).copied().collect();
        self.change("delete", &extra)?;
        self.change("add", &missing)?;
        Ok((missing.len(), extra.len()))
    }

    /// Adds or deletes elements; on a refusal, reads the sets back once
    /// (someone may have changed them) and retries what is still to do.
    fn change(&mut self, verb: &'static str, cidrs: &[IpNet]) -> Result<(), MasqError> {
        if cidrs.is_empty() {
            return Ok(());
        }
        let add = verb == "add";
        if let Err(first) = self.send(add, cidrs) {
            self.present = self.read_elements()?;
            let todo: Vec<IpNet> = cidrs
                .iter()
                .filter(|c| self.present.contains(c) != add)
                .copied()
                .collect();
            if !todo.is_empty() {
                self.send(add, &todo).map_err(|e| match e {
                    MasqError::Elements { .. } => e,
                    _ => first,
                })?;
            }
        }
        for c in cidrs {
            if add {
                self.present.insert(*c);
            } else {
                self.present.remove(c);
            }
        }
        Ok(())
    }

    /// The nf_tables socket, opened on first use (and again after a failure).
    fn sets(&mut self) -> Result<&mut NftSets, MasqError> {
        if self.sets.is_none() {
            self.sets = Some(NftSets::open(self.netns.as_deref()).map_err(|source| {
                MasqError::Elements {
                    op: "open an nf_tables netlink socket".into(),
                    source,
                }
            })?);
        }
        Ok(self.sets.as_mut().expect("just opened"))
    }

    fn send(&mut self, add: bool, cidrs: &[IpNet]) -> Result<(), MasqError> {
        for (set, v4) in [(SET_V4, true), (SET_V6, false)] {
            let family: Vec<IpNet> = cidrs
                .iter()
                .filter(|c| matches!(c, IpNet::V4(_)) == v4)
                .copied()
                .collect();
            if family.is_empty() {
                continue;
            }
            // Deleting most of a set: a flush and the few that stay, in one
            // transaction, instead of an erase per element.
            let keep: Vec<IpNet> = if add {
                Vec::new()
            } else {
                let gone: BTreeSet<&IpNet> = family.iter().collect();
                self.present
                    .iter()
                    .filter(|c| matches!(c, IpNet::V4(_)) == v4 && !gone.contains(c))
                    .copied()
                    .collect()
            };
            let r = if !add
                && keep.len() < family.len()
                && NftSets::fits_one_transaction(v4, keep.len())
            {
                self.sets()?.replace(TABLE, set, &keep)
            } else {
                self.sets()?.change(TABLE, set, add, &family)
            };
            if let Err(source) = r {
                self.sets = None;
                return Err(MasqError::Elements {
                    op: format!(
                        "{} {} elements of set {set}",
                        if add { "add" } else { "delete" },
                        family.len()
                    ),
                    source,
                });
            }
        }
        Ok(())
    }

    /// The prefixes both sets hold, read from the kernel.
    fn read_elements(&mut self) -> Result<BTreeSet<IpNet>, MasqError> {
        let mut all = BTreeSet::new();
        for set in [SET_V4, SET_V6] {
            let r = self.sets()?.list(TABLE, set);
            match r {
                Ok((prefixes, other)) => {
                    if other > 0 {
                        tracing::warn!(
                            set,
                            other,
                            "set {set} of table inet {TABLE} holds ranges podmesh did not write"
                        );
                    }
                    all.extend(prefixes);
                }
                Err(source) => {
                    self.sets = None;
                    return Err(MasqError::Elements {
                        op: format!("list set {set}"),
                        source,
                    });
                }
            }
        }
        Ok(all)
    }

    /// Removes the table, if there is one (uninstall, or a datapath takeover
    /// that starts from a clean slate).
    pub fn remove_table(&mut self) -> Result<bool, MasqError> {
        let there = self.list()?.is_some();
        if there {
            self.run(
                &format!("delete table inet {TABLE}\n"),
                "delete table inet podmesh",
            )?;
        }
        self.present.clear();
        let mut s = self.state.lock().expect("exemption status lock");
        s.installed = false;
        s.cidrs = 0;
        Ok(there)
    }

    /// The CIDRs the sets hold, as last read or written.
    pub fn cidrs(&self) -> &BTreeSet<IpNet> {
        &self.present
    }

    /// `nft -j list table inet podmesh`, or `None` when there is no such table.
    fn list(&self) -> Result<Option<Listing>, MasqError> {
        // Terse: the structure without the elements (100k of them take nft
        // about 2 s to print).
        let out = self.nft(&["-t", "-j", "list", "table", "inet", TABLE], None)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(MasqError::Refused {
                op: format!("list table inet {TABLE}"),
                stderr: stderr.trim().to_string(),
            });
        }
        Listing::parse(&out.stdout).map(Some)
    }

    fn run(&self, script: &str, op: &str) -> Result<(), MasqError> {
        let out = self.nft(&["-f", "-"], Some(script))?;
        if out.status.success() {
            return Ok(());
        }
        Err(MasqError::Refused {
            op: op.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / "),
        })
    }

    /// Runs nft, in the configured namespace: a child forked by a thread
    /// that entered it lives there.
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, MasqError> {
        let spawn = || -> Result<std::process::Output, MasqError> {
            let missing = |source| MasqError::NftMissing {
                nft: self.nft.clone(),
                source,
            };
            let mut child = Command::new(&self.nft)
                .args(args)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(missing)?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes()).map_err(missing)?;
            }
            child.wait_with_output().map_err(missing)
        };
        match &self.netns {
            None => spawn(),
            Some(path) => super::nl::in_netns(path, spawn),
        }
    }
}

/// The whole table, empty sets.
fn table_definition() -> String {
    format!(
        "table inet {TABLE} {{\n\
         \tcomment \"podmesh: remote clusters' Pod CIDRs keep pod source addresses\"\n\
         \tset {SET_V4} {{ type ipv4_addr; flags interval; }}\n\
         \tset {SET_V6} {{ type ipv6_addr; flags interval; }}\n\
         \tchain {CHAIN} {{\n\
         \t\ttype nat hook postrouting priority srcnat - 10; policy accept;\n\
         \t\tip daddr @{SET_V4} snat ip to ip saddr comment \"null binding: no CNI masquerade towards remote pods\"\n\
         \t\tip6 daddr @{SET_V6} snat ip6 to ip6 saddr comment \"null binding: no CNI masquerade towards remote pods\"\n\
         \t}}\n\
         }}\n"
    )
}

/// A chain as nft lists it: name, hook, type and priority.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChainInfo {
    name: String,
    hook: Option<String>,
    kind: Option<String>,
    prio: Option<i64>,
}

/// What `nft -t -j list table inet podmesh` shows.
#[derive(Debug, Default, PartialEq, Eq)]
struct Listing {
    /// The sets present.
    sets: BTreeSet<String>,
    /// Each chain.
    chains: Vec<ChainInfo>,
    /// The rules' expressions, as JSON text, by chain.
    rules: Vec<(String, String)>,
}

impl Listing {
    fn parse(json: &[u8]) -> Result<Self, MasqError> {
        let doc: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| MasqError::Listing(e.to_string()))?;
        let items = doc
            .get("nftables")
            .and_then(|v| v.as_array())
            .ok_or_else(|| MasqError::Listing("no `nftables` list".into()))?;
        let mut l = Listing::default();
        let text =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        for item in items {
            if let Some(set) = item.get("set") {
                l.sets.insert(text(set, "name").unwrap_or_default());
            } else if let Some(c) = item.get("chain") {
                l.chains.push(ChainInfo {
                    name: text(c, "name").unwrap_or_default(),
                    hook: text(c, "hook"),
                    kind: text(c, "type"),
                    prio: c.get("prio").and_then(|p| p.as_i64()),
                });
            } else if let Some(r) = item.get("rule") {
                l.rules.push((
                    text(r, "chain").unwrap_or_default(),
                    r.get("expr").map(|e| e.to_string()).unwrap_or_default(),
                ));
            }
        }
        Ok(l)
    }

    /// What differs from the table podmesh creates, if anything.
    fn defect(&self) -> Option<String> {
        for set in [SET_V4, SET_V6] {
            if !self.sets.contains(set) {
                return Some(format!("set {set} of table inet {TABLE} is missing"));
            }
        }
        let want = ChainInfo {
            name: CHAIN.to_string(),
            hook: Some("postrouting".to_string()),
            kind: Some("nat".to_string()),
            prio: Some(i64::from(PRIORITY)),
        };
        if self.chains != [want] {
            return Some(format!(
                "table inet {TABLE} does not hold exactly its nat chain {CHAIN} at priority srcnat - 10"
            ));
        }
        let snat = |set: &str| {
            self.rules
                .iter()
                .filter(|(c, e)| {
                    c == CHAIN && e.contains(&format!("@{set}")) && e.contains("\"snat\"")
                })
                .count()
        };
        if self.rules.len() != 2 || snat(SET_V4) != 1 || snat(SET_V6) != 1 {
            return Some(format!(
                "the rules of chain {CHAIN} in table inet {TABLE} were changed"
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listing nft 1.0.6 prints for the table as podmesh creates it.
    fn listing_json(rules: &str, prio: i64) -> Vec<u8> {
        format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6"}}}},
            {{"table": {{"family": "inet", "name": "podmesh", "handle": 2}}}},
            {{"set": {{"family": "inet", "name": "remote-pods-v4", "table": "podmesh", "type": "ipv4_addr", "handle": 1, "flags": ["interval"], "elem": [{{"prefix": {{"addr": "10.2.0.0", "len": 24}}}}, "10.3.0.7"]}}}},
            {{"set": {{"family": "inet", "name": "remote-pods-v6", "table": "podmesh", "type": "ipv6_addr", "handle": 2, "flags": ["interval"]}}}},
            {{"chain": {{"family": "inet", "table": "podmesh", "name": "postrouting", "handle": 3, "type": "nat", "hook": "postrouting", "prio": {prio}, "policy": "accept"}}}}
            {rules}]}}"#
        )
        .into_bytes()
    }

    const RULES: &str = r#",
        {"rule": {"family": "inet", "table": "podmesh", "chain": "postrouting", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@remote-pods-v4"}}, {"snat": {"family": "ip", "addr": {"payload": {"protocol": "ip", "field": "saddr"}}}}]}},
        {"rule": {"family": "inet", "table": "podmesh", "chain": "postrouting", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "@remote-pods-v6"}}, {"snat": {"family": "ip6", "addr": {"payload": {"protocol": "ip6", "field": "saddr"}}}}]}}"#;

    #[test]
    fn the_table_as_created_has_no_defect() {
        let l = Listing::parse(&listing_json(RULES, 90)).expect("parses");
        assert_eq!(l.defect(), None);
    }

    #[test]
    fn a_changed_priority_or_missing_rule_is_a_defect() {
        let moved = Listing::parse(&listing_json(RULES, 100)).expect("parses");
        assert!(moved.defect().expect("defect").contains("priority"));
        let bare = Listing::parse(&listing_json("", 90)).expect("parses");
        assert!(bare.defect().expect("defect").contains("rules"));
    }
}
