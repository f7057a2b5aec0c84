//! The configured kernel datapath: one type over the four modes, built by [`from_config`].
use std::collections::BTreeSet;

use ipnet::IpNet;

use podmesh_common::{
    COUNTERS_MAP, REMOTES_V4_MAP, REMOTES_V6_MAP, TUNNEL_DEVICE, TUNNEL_EGRESS_LINK_PIN,
};

use super::{
    base::{Counters, Datapath, DatapathError, KernelConfig, PruneReport, RemoteRoute},
    ebpf::EbpfDatapath,
    masq::{ExemptionHandle, MasqExemption},
    nl::Netlink,
    routes::{IP6_TUNNEL_DEVICE, RouteDatapath, VXLAN_DEVICE},
    rtnl,
    wireguard::{Split, WgHandle, Wireguard},
};
use crate::{config::DatapathMode, model::UnderlayFamily};

/// The datapath of the configured mode.
#[derive(Debug)]
pub struct KernelDatapath {
    cfg: KernelConfig,
    inner: Inner,
    /// The masquerade exemption of the remote Pod CIDRs (every mode).
    masq: MasqExemption,
    /// The exemption's last failure, logged once until it changes.
    masq_failure: Option<String>,
    /// Devices with strict reverse-path filtering, for `/status`.
    rp_strict: RpStrictHandle,
    /// WireGuard towards remote nodes that publish a key (`--encryption wireguard`).
    wg: Option<Box<Wireguard>>,
}

/// Devices with strict reverse-path filtering, as last checked.
pub type RpStrictHandle = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

#[derive(Debug)]
enum Inner {
    /// `ebpf`.
    Ebpf(Box<EbpfDatapath>),
    /// `vxlan`, `direct` or `ipip`.
    Routes(Box<RouteDatapath>),
}

impl Inner {
    fn build(cfg: &KernelConfig) -> Result<Self, DatapathError> {
        Ok(match cfg.mode {
            DatapathMode::Ebpf => Self::Ebpf(Box::new(EbpfDatapath::new(cfg)?)),
            DatapathMode::Vxlan => Self::Routes(Box::new(RouteDatapath::vxlan(cfg)?)),
            DatapathMode::Direct => Self::Routes(Box::new(RouteDatapath::direct(cfg)?)),
            DatapathMode::Ipip => Self::Routes(Box::new(RouteDatapath::ipip(cfg)?)),
        })
    }
}

/// Builds (creating or adopting devices, maps, programs) the datapath of
/// `cfg.mode`. Nothing already installed is removed: stale entries go with
/// the first `prune`.
pub fn from_config(cfg: &KernelConfig) -> Result<KernelDatapath, DatapathError> {
    let before = remove_other_modes(cfg, true)?;
    let inner = Inner::build(cfg)?;
    let after = remove_other_modes(cfg, false)?;
    let mut masq = MasqExemption::new(cfg.netns.as_deref());
    if before || after {
        // A takeover starts the exemption from a clean slate too; the first
        // resync fills it with what this mode programs.
        if let Err(e) = masq.remove_table() {
            tracing::warn!(error = %e, "cannot remove the masquerade exemption the previous mode left");
        }
    }
    let wg = match &cfg.wireguard {
        Some(w) => Some(Box::new(Wireguard::new(w, cfg)?)),
        None => None,
    };
    let mut dp = KernelDatapath {
        cfg: cfg.clone(),
        inner,
        masq,
        masq_failure: None,
        rp_strict: RpStrictHandle::default(),
        wg,
    };
    let r = dp.masq.ensure().map(drop);
    dp.note_masq(r);
    dp.check_rp_filter();
    Ok(dp)
}

/// Removes what another mode left when the node ran it; returns whether
/// there was anything: its VXLAN device
/// (which takes its routes with it), ipip's `podmesh-ip6` (ip6tnl) unless
/// this is ipip over an IPv6 underlay, and, away from ebpf, the program's link
/// and maps (the owners map stays: every mode keeps it). Before the new
/// mode is built (`before`), only a device on the UDP port the new mode
/// needs goes (ebpf's external `podmesh0` and vxlan's `podmesh-vx` cannot
/// share one); the rest waits until the new mode is up, so a mode that
/// cannot start (no IPIP) leaves the old forwarding in place. Routes and
/// nexthop objects of the other mode go with this mode's upserts and prune.
fn remove_other_modes(cfg: &KernelConfig, before: bool) -> Result<bool, DatapathError> {
    let mut removed = false;
    let mut nl = Netlink::open(cfg.netns.as_deref())
        .map_err(|e| DatapathError::netlink("opening netlink", e))?;
    let needs_port = matches!(cfg.mode, DatapathMode::Ebpf | DatapathMode::Vxlan);
    for (name, owner) in [
        (TUNNEL_DEVICE, DatapathMode::Ebpf),
        (VXLAN_DEVICE, DatapathMode::Vxlan),
    ] {
        if cfg.mode == owner {
            continue;
        }
        let link = rtnl::link_by_name(&mut nl, name)
            .map_err(|e| DatapathError::netlink(format!("listing links for {name}"), e))?;
        let Some(l) = link.filter(|l| l.kind.as_deref() == Some("vxlan")) else {
            continue;
        };
        let on_our_port = needs_port && l.vxlan.is_some_and(|v| v.port == cfg.tunnel_port);
        if before != on_our_port {
            continue;
        }
        tracing::warn!(
            device = name,
            "removing {name}, left by the {owner:?} datapath: this node now runs {:?}; \
             its routes come back with the first sync",
            cfg.mode
        );
        rtnl::delete_link(&mut nl, l.index)
            .map_err(|e| DatapathError::netlink(format!("removing {name}"), e))?;
        removed = true;
    }
    if before {
        return Ok(removed);
    }
    // ipip over an IPv6 underlay's ip6tnl: any other mode, or ipip over IPv4,
    // leaves it unused (tunl0 is the kernel's own and stays).
    let ip6_in_use = cfg.mode == DatapathMode::Ipip && cfg.underlay == UnderlayFamily::Ipv6;
    if !ip6_in_use {
        let link = rtnl::link_by_name(&mut nl, IP6_TUNNEL_DEVICE).map_err(|e| {
            DatapathError::netlink(format!("listing links for {IP6_TUNNEL_DEVICE}"), e)
        })?;
        if let Some(l) = link.filter(|l| l.kind.as_deref() == Some("ip6tnl")) {
            tracing::warn!(
                device = IP6_TUNNEL_DEVICE,
                "removing {IP6_TUNNEL_DEVICE}, left by the Ipip datapath over an IPv6 underlay: \
                 this node now runs {:?} over {:?}; its routes come back with the first sync",
                cfg.mode,
                cfg.underlay
            );
            rtnl::delete_link(&mut nl, l.index)
                .map_err(|e| DatapathError::netlink(format!("removing {IP6_TUNNEL_DEVICE}"), e))?;
            removed = true;
        }
    }
    // The program's pinned link marks a node that ran ebpf. (The route
    // modes pin the object's maps too, empty, to keep the owners map.)
    if cfg.mode != DatapathMode::Ebpf && cfg.pin_dir.join(TUNNEL_EGRESS_LINK_PIN).exists() {
        tracing::info!(
            pin_dir = %cfg.pin_dir.display(),
            "removing the ebpf datapath's pinned link and maps"
        );
        removed = true;
        for pin in [
            TUNNEL_EGRESS_LINK_PIN,
            REMOTES_V4_MAP,
            REMOTES_V6_MAP,
            COUNTERS_MAP,
        ] {
            let path = cfg.pin_dir.join(pin);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DatapathError::io(
                        format!("removing {}, left by the ebpf datapath", path.display()),
                        e,
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(removed)
}

impl KernelDatapath {
    /// podmesh's own tunnel device in this mode, if it has one.
    fn own_device(&self) -> Option<&'static str> {
        match self.cfg.mode {
            DatapathMode::Ebpf => Some(TUNNEL_DEVICE),
            DatapathMode::Vxlan => Some(VXLAN_DEVICE),
            DatapathMode::Ipip => Some(match self.cfg.underlay {
                crate::model::UnderlayFamily::Ipv4 => super::routes::IPIP_DEVICE,
                crate::model::UnderlayFamily::Ipv6 => super::routes::IP6_TUNNEL_DEVICE,
            }),
            DatapathMode::Direct => None,
        }
    }

    /// Mode 0 on podmesh's device (see [`super::rpfilter`]); strict devices
    /// elsewhere are logged (when the list changes) and kept for `/status`.
    fn check_rp_filter(&mut self) {
        match super::rpfilter::check(self.cfg.netns.as_deref(), self.own_device()) {
            Ok(r) => {
                let mut held = self.rp_strict.lock().expect("rp_filter lock");
                if *held != r.strict && !r.strict.is_empty() {
                    tracing::warn!("{}", super::rpfilter::hint(&r.strict));
                }
                *held = r.strict;
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read or set reverse-path filtering (net.ipv4.conf.*.rp_filter)"
            ),
        }
    }

    /// Devices with strict reverse-path filtering, for `/status`.
    pub fn rp_filter_strict(&self) -> RpStrictHandle {
        self.rp_strict.clone()
    }

    /// The WireGuard device's handle (status, public key, rotation), with `--encryption wireguard`.
    pub fn wireguard(&self) -> Option<WgHandle> {
        self.wg.as_ref().map(|w| w.handle())
    }

    /// The masquerade exemption's state, for `/status`.
    pub fn exemption(&self) -> ExemptionHandle {
        self.masq.handle()
    }

    /// Logs a failure of the masquerade exemption once (until it changes or
    /// clears). It never fails the routes: forwarding works without it, pods
    /// are only masqueraded where the CNI does.
    fn note_masq(&mut self, r: Result<(), super::masq::MasqError>) {
        match r {
            Ok(()) => {
                if self.masq_failure.take().is_some() {
                    tracing::info!("the masquerade exemption is in place again");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if self.masq_failure.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(
                        error = %msg,
                        "the masquerade exemption (nftables table inet podmesh) failed: pod traffic \
                         to remote clusters may leave with the node's address where the CNI \
                         masquerades; retried at every resync"
                    );
                    self.masq_failure = Some(msg);
                }
            }
        }
    }

    /// The MAC this node publishes as `vtepMAC` (its tunnel device's), in the
    /// modes that need one.
    pub fn vtep_mac(&self) -> Option<[u8; 6]> {
        match &self.inner {
            Inner::Ebpf(d) => Some(d.vtep_mac()),
            Inner::Routes(d) => d.vtep_mac(),
        }
    }

    /// Counters of the eBPF program (ebpf mode only).
    pub fn counters(&self) -> Option<Result<Counters, DatapathError>> {
        match &self.inner {
            Inner::Ebpf(d) => Some(d.counters()),
            Inner::Routes(_) => None,
        }
    }

    /// A reader of the eBPF program's counters for the status server (ebpf mode only).
    pub fn counter_reader(&self) -> Option<Result<super::ebpf::CounterReader, DatapathError>> {
        match &self.inner {
            Inner::Ebpf(d) => Some(d.counter_reader()),
            Inner::Routes(_) => None,
        }
    }
}

/// Runs a kernel call off the async runtime's workers. Installing 100k
/// routes takes seconds of netlink and map syscalls; on a worker thread that
/// would stall the status server, the etcd watches and the lease keepalive.
/// `block_in_place` hands this worker's other tasks to a new thread first
/// (the datapath and the borrowed routes stay where they are, which
/// `spawn_blocking` would not allow without copying 100k routes). On a
/// current-thread runtime (tests) there is no other worker: it runs inline.
fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Datapath for KernelDatapath {
    async fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        off_runtime(|| {
            let Some(wg) = &mut self.wg else {
                let programmed = match &mut self.inner {
                    Inner::Ebpf(d) => d.upsert(routes),
                    Inner::Routes(d) => d.upsert(routes),
                };
                // Also when one entry was refused: the others are installed,
                // and an exempt CIDR without a route is harmless.
                let r = self.masq.add(routes.iter().map(|r| r.cidr));
                self.note_masq(r);
                return programmed;
            };
            let Split {
                encrypted,
                clear,
                mut refused,
            } = wg.split(routes);
            let refused_cidrs: Vec<IpNet> = refused.iter().map(|r| r.cidr).collect();
            // Refused here: never in clear (a route a previous run left
            // goes), and off WireGuard.
            let mut first_err = wg.withdraw(&refused_cidrs).err();
            let mut masq_removed = Ok(());
            if !refused_cidrs.is_empty() {
                let r = match &mut self.inner {
                    Inner::Ebpf(d) => d.delete(&refused_cidrs),
                    Inner::Routes(d) => d.delete(&refused_cidrs),
                };
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
                masq_removed = self.masq.remove(&refused_cidrs);
            }
            let mut note = |r: Result<(), DatapathError>| match r {
                Ok(()) => {}
                Err(DatapathError::Refused(mut more)) => refused.append(&mut more),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            };
            // The clear ones first: a CIDR leaving WireGuard gets its new
            // route (a replace) before its peer lets it go.
            if !clear.is_empty() {
                note(match &mut self.inner {
                    Inner::Ebpf(d) => d.upsert(&clear),
                    Inner::Routes(d) => d.upsert(&clear),
                });
                let moved: Vec<IpNet> = clear.iter().map(|r| r.cidr).collect();
                note(wg.forget(&moved, true));
            }
            note(wg.upsert(&encrypted));
            let r = self
                .masq
                .add(encrypted.iter().chain(&clear).map(|r| r.cidr));
            self.note_masq(masq_removed.and(r));
            super::error::upsert_result(first_err, refused)
        })
    }

    async fn delete(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        off_runtime(|| {
            // The exemption goes first: a CIDR without a route but still
            // exempt is harmless, the other way round is not.
            let r = self.masq.remove(cidrs);
            self.note_masq(r);
            // The routes go by destination, whichever device they use.
            let r = match &mut self.inner {
                Inner::Ebpf(d) => d.delete(cidrs),
                Inner::Routes(d) => d.delete(cidrs),
            };
            match &mut self.wg {
                Some(wg) => r.and(wg.forget(cidrs, false)),
                None => r,
            }
        })
    }

    async fn prune(&mut self, keep: &BTreeSet<IpNet>) -> Result<PruneReport, DatapathError> {
        off_runtime(|| {
            let report = match &mut self.inner {
                Inner::Ebpf(d) => d.prune(keep),
                Inner::Routes(d) => d.prune(keep),
            }?;
            if let Some(wg) = &mut self.wg {
                wg.prune(keep)?;
            }
            let r = self.masq.sync(keep).map(|(added, removed)| {
                if added + removed > 0 {
                    tracing::info!(
                        added,
                        removed,
                        "resync brought the masquerade exemption's sets back to the programmed remote Pod CIDRs"
                    );
                }
            });
            self.note_masq(r);
            Ok(report)
        })
    }

    async fn repair(&mut self) -> Result<Option<String>, DatapathError> {
        off_runtime(|| {
            let masq = match self.masq.ensure() {
                Ok(wrong) => {
                    self.note_masq(Ok(()));
                    wrong
                }
                Err(e) => {
                    self.note_masq(Err(e));
                    None
                }
            };
            let wg_lost = match &mut self.wg {
                Some(wg) => wg.repair()?,
                None => None,
            };
            let masq = match (masq, wg_lost) {
                (Some(m), Some(w)) => Some(format!("{w}; {m}")),
                (m, w) => m.or(w),
            };
            let lost = match &mut self.inner {
                Inner::Ebpf(d) => d.device_lost()?,
                Inner::Routes(d) => d.device_lost()?,
            };
            self.check_rp_filter();
            if let Some(what) = lost {
                // Rebuilt as at start (device, program, maps adopted from their
                // pins), the device with the MAC the node published: the remote
                // nodes keep sending to it.
                let mut cfg = self.cfg.clone();
                cfg.tunnel_mac = self.vtep_mac();
                self.inner = Inner::build(&cfg)?;
                self.check_rp_filter();
                return Ok(Some(match masq {
                    Some(m) => format!("{what}; {m}"),
                    None => what,
                }));
            }
            Ok(masq)
        })
    }

    async fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
        off_runtime(|| {
            let mut routes = match &mut self.inner {
                Inner::Ebpf(d) => d.installed(),
                Inner::Routes(d) => d.installed(),
            }?;
            if let Some(wg) = &mut self.wg {
                let encrypted = wg.installed()?;
                let cidrs: std::collections::BTreeSet<IpNet> =
                    encrypted.iter().map(|r| r.cidr).collect();
                routes.retain(|r| !cidrs.contains(&r.cidr));
                routes.extend(encrypted);
            }
            Ok(routes)
        })
    }
}
