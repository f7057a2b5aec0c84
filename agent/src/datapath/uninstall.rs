//! Removing everything podmesh installed on a node: an uninstall, not a stop.
//!
//! A stopped agent leaves its datapath in place (forwarding survives
//! upgrades and restarts). Once podmesh is taken off a node for good,
//! `podmesh cleanup` removes exactly what is podmesh's: the routes and
//! nexthop objects with its protocol number, its devices (`podmesh0`,
//! `podmesh-vx`, `podmesh-ip6`; `tunl0` belongs to the kernel's ipip module and only loses
//! podmesh's routes), its pinned maps and program link, and the masquerade
//! exemption (table `inet podmesh`). It keeps going after a failure and
//! reports every one; the CNI's objects are never touched.
use std::path::Path;

use podmesh_common::{
    COUNTERS_MAP, OWNERS_MAP, REMOTES_V4_MAP, REMOTES_V6_MAP, TUNNEL_DEVICE, TUNNEL_EGRESS_LINK_PIN,
};

use super::{
    base::{NEXTHOP_ID_FIRST, NEXTHOP_ID_LAST, ROUTE_PROTOCOL},
    masq::MasqExemption,
    nexthop,
    nl::Netlink,
    routes::{IP6_TUNNEL_DEVICE, VXLAN_DEVICE},
    rtnl,
};

/// What an uninstall removed and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// What was removed, one line each.
    pub removed: Vec<String>,
    /// What could not be removed, with why.
    pub failures: Vec<String>,
}

/// Removes podmesh's objects from the namespace at `netns` (`None`: this
/// process's) and its pins from `pin_dir`.
pub fn uninstall(netns: Option<&Path>, pin_dir: &Path) -> Removal {
    let mut r = Removal::default();
    let mut masq = MasqExemption::new(netns);
    match masq.remove_table() {
        Ok(true) => r.removed.push("nftables table inet podmesh".into()),
        Ok(false) => {}
        Err(e) => r.failures.push(format!("table inet podmesh: {e}")),
    }
    match Netlink::open(netns) {
        Ok(mut nl) => netlink_objects(&mut nl, &mut r),
        Err(e) => r.failures.push(format!("netlink: {e}")),
    }
    for pin in [
        TUNNEL_EGRESS_LINK_PIN,
        REMOTES_V4_MAP,
        REMOTES_V6_MAP,
        COUNTERS_MAP,
        OWNERS_MAP,
    ] {
        let path = pin_dir.join(pin);
        match std::fs::remove_file(&path) {
            Ok(()) => r.removed.push(format!("pin {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => r.failures.push(format!("pin {}: {e}", path.display())),
        }
    }
    // The directory goes only when nothing else is left in it.
    if std::fs::remove_dir(pin_dir).is_ok() {
        r.removed
            .push(format!("pin directory {}", pin_dir.display()));
    }
    r
}

fn netlink_objects(nl: &mut Netlink, r: &mut Removal) {
    match rtnl::routes_with_protocol(nl, ROUTE_PROTOCOL) {
        Ok(routes) => {
            let cidrs: Vec<_> = routes.into_iter().map(|x| x.dst).collect();
            match rtnl::delete_routes(nl, &cidrs) {
                Ok(()) if !cidrs.is_empty() => r
                    .removed
                    .push(format!("{} routes (proto {ROUTE_PROTOCOL})", cidrs.len())),
                Ok(()) => {}
                Err(e) => r.failures.push(format!("routes: {e}")),
            }
        }
        Err(e) => r.failures.push(format!("listing routes: {e}")),
    }
    match nexthop::nexthops_with_protocol(nl, ROUTE_PROTOCOL) {
        Ok(nhs) => {
            let ids: Vec<u32> = nhs
                .into_iter()
                .map(|n| n.id)
                .filter(|id| (NEXTHOP_ID_FIRST..=NEXTHOP_ID_LAST).contains(id))
                .collect();
            match nl.batch(ids.iter().map(|id| nexthop::nexthop_delete(*id))) {
                Ok(failed) => {
                    let gone = ids.len() - failed.len();
                    if gone > 0 {
                        r.removed.push(format!("{gone} nexthop objects"));
                    }
                    for (i, errno) in failed {
                        if errno != libc::ENOENT && errno != libc::ESRCH {
                            r.failures.push(format!(
                                "nexthop {}: {}",
                                ids[i],
                                std::io::Error::from_raw_os_error(errno)
                            ));
                        }
                    }
                }
                Err(e) => r.failures.push(format!("nexthops: {e}")),
            }
        }
        Err(e) => r.failures.push(format!("listing nexthops: {e}")),
    }
    for (name, kind) in [
        (TUNNEL_DEVICE, "vxlan"),
        (VXLAN_DEVICE, "vxlan"),
        (IP6_TUNNEL_DEVICE, "ip6tnl"),
    ] {
        match rtnl::link_by_name(nl, name) {
            Ok(Some(l)) if l.kind.as_deref() == Some(kind) => {
                match rtnl::delete_link(nl, l.index) {
                    Ok(()) => r.removed.push(format!("device {name}")),
                    Err(e) => r.failures.push(format!("device {name}: {e}")),
                }
            }
            Ok(Some(_)) => r.failures.push(format!(
                "{name} is not a VXLAN device: not podmesh's, left alone"
            )),
            Ok(None) => {}
            Err(e) => r.failures.push(format!("device {name}: {e}")),
        }
    }
    // The kernel WireGuard device goes; a userspace one (a TUN) belongs to
    // its process or container, which removes it when it stops.
    let wg = super::wireguard::WG_DEVICE;
    match rtnl::link_by_name(nl, wg) {
        Ok(Some(l)) if l.kind.as_deref() == Some("wireguard") => {
            match rtnl::delete_link(nl, l.index) {
                Ok(()) => r.removed.push(format!("device {wg}")),
                Err(e) => r.failures.push(format!("device {wg}: {e}")),
            }
        }
        Ok(_) => {}
        Err(e) => r.failures.push(format!("device {wg}: {e}")),
    }
}
