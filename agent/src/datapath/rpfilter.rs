//! Reverse-path filtering: none of its own on podmesh's tunnel device, strict elsewhere reported.
//!
//! With strict filtering (`rp_filter=1`) the kernel drops a packet whose
//! source address is not routed back through the device it arrived on. The
//! effective value of a device is the larger of `all` and its own
//! (`IN_DEV_RPFILTER`). On a device without an IPv4 address, as podmesh's
//! tunnel devices are, loose mode (2) is strict too: `__fib_validate_source`
//! (net/ipv4/fib_frontend.c) sends a source not routed through the device to
//! `last_resort`, which rejects it for any non-zero mode. Measured: a remote
//! pod whose node masquerades it (no exemption there) arrives from the remote
//! node's underlay address and is dropped on `podmesh0` with mode 2
//! (`TcpExtIPReversePathFilter`), passes with 0. So podmesh sets 0 on the
//! device it owns (what `all` says still applies) and touches no other
//! device: it reports the strict ones with what to set. Traffic with pod
//! sources, which the exemption keeps, is routed back through the tunnel
//! device and passes any mode.
use std::path::{Path, PathBuf};

use super::nl::NlError;

/// The sysctl tree of the calling thread's network namespace.
const CONF: &str = "/proc/sys/net/ipv4/conf";

/// The devices with strict filtering, and podmesh's own whose mode it cleared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RpFilter {
    /// Devices (other than podmesh's and `lo`) whose effective mode is strict.
    pub strict: Vec<String>,
    /// podmesh's device, its own mode set to 0.
    pub cleared: Option<String>,
}

/// Sets mode 0 on `own` (when given) and lists the devices with strict
/// filtering, in the namespace at `netns` (`None`: this process's).
pub fn check(netns: Option<&Path>, own: Option<&str>) -> std::io::Result<RpFilter> {
    let run = || -> std::io::Result<RpFilter> {
        let mut r = RpFilter::default();
        if let Some(dev) = own {
            let path = PathBuf::from(CONF).join(dev).join("rp_filter");
            if path.exists() {
                if read(&path)? != 0 {
                    std::fs::write(&path, "0")?;
                }
                r.cleared = Some(dev.to_string());
            }
        }
        let all = read(&PathBuf::from(CONF).join("all/rp_filter")).unwrap_or(0);
        for e in std::fs::read_dir(CONF)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if matches!(name.as_str(), "all" | "default" | "lo") || Some(name.as_str()) == own {
                continue;
            }
            let dev = read(&PathBuf::from(CONF).join(&name).join("rp_filter")).unwrap_or(0);
            if all.max(dev) == 1 {
                r.strict.push(name);
            }
        }
        r.strict.sort();
        Ok(r)
    };
    match netns {
        None => run(),
        Some(path) => {
            super::nl::in_netns(path, || run().map_err(NlError::Io)).map_err(|e| match e {
                NlError::Io(e) => e,
                other => std::io::Error::other(other),
            })
        }
    }
}

fn read(path: &Path) -> std::io::Result<u8> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(std::io::Error::other)
}

/// The operator's hint for `strict` devices.
pub fn hint(strict: &[String]) -> String {
    format!(
        "strict reverse-path filtering on {}: a packet from a remote pod that arrives on one \
         of them is dropped unless the route back to its source leaves through the same \
         device (asymmetric underlays, several uplinks); podmesh leaves them as they are; \
         set net.ipv4.conf.<device>.rp_filter=2 (loose; as strict as 1 on a device without an \
         IPv4 address) where that applies",
        strict.join(", ")
    )
}
