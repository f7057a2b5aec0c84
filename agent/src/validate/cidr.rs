//! Checks of a single CIDR: canonical form, reserved space, default route.
use std::fmt;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{code, overlap::overlaps};

/// Why a CIDR can never be a usable Pod, service or node range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CidrProblem {
    /// Host bits are set (`10.1.0.1/16`); routes and LPM maps only take the network.
    NotCanonical {
        /// The CIDR as written.
        given: IpNet,
        /// The same prefix with the host bits cleared.
        canonical: IpNet,
    },
    /// `0.0.0.0/0` or `::/0`: would take every address.
    DefaultRoute {
        /// The CIDR as written.
        given: IpNet,
    },
    /// Overlaps address space that is never routed to pods.
    Reserved {
        /// The CIDR as written.
        given: IpNet,
        /// The reserved range it overlaps.
        reserved: IpNet,
        /// What that range is for.
        what: &'static str,
    },
}

impl CidrProblem {
    /// The stable finding code of this problem.
    pub fn code(&self) -> &'static str {
        match self {
            CidrProblem::NotCanonical { .. } => code::CIDR_NOT_CANONICAL,
            CidrProblem::DefaultRoute { .. } => code::CIDR_DEFAULT_ROUTE,
            CidrProblem::Reserved { .. } => code::CIDR_RESERVED,
        }
    }

    /// The CIDR as written.
    pub fn given(&self) -> IpNet {
        match self {
            CidrProblem::NotCanonical { given, .. }
            | CidrProblem::DefaultRoute { given }
            | CidrProblem::Reserved { given, .. } => *given,
        }
    }
}

impl fmt::Display for CidrProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CidrProblem::NotCanonical { given, canonical } => write!(
                f,
                "{given} has host bits set; write {canonical} (or a longer prefix if only part of it is meant)"
            ),
            CidrProblem::DefaultRoute { given } => write!(
                f,
                "{given} is a default route and would capture every address; declare the range the cluster actually uses"
            ),
            CidrProblem::Reserved {
                given,
                reserved,
                what,
            } => {
                let free = match given {
                    IpNet::V4(_) => "10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16",
                    IpNet::V6(_) => "fd00::/8",
                };
                let rel = if reserved.contains(&given.trunc()) {
                    "is inside"
                } else {
                    "overlaps"
                };
                write!(
                    f,
                    "{given} {rel} {reserved} ({what}), which is never routed between hosts; pick a range in {free} (`podmesh plan suggest` lists free ones)"
                )
            }
        }
    }
}

/// Address space no Pod, service or node CIDR may touch, with what it is for.
pub fn reserved_ranges() -> [(IpNet, &'static str); 9] {
    let v4 = |a: [u8; 4], l| IpNet::V4(Ipv4Net::new(a.into(), l).expect("valid prefix"));
    let v6 = |a: [u16; 8], l| IpNet::V6(Ipv6Net::new(a.into(), l).expect("valid prefix"));
    [
        (v4([0, 0, 0, 0], 8), "\"this network\", RFC 1122"),
        (v4([127, 0, 0, 0], 8), "loopback"),
        (v4([169, 254, 0, 0], 16), "link-local"),
        (v4([224, 0, 0, 0], 4), "multicast"),
        (v4([255, 255, 255, 255], 32), "limited broadcast"),
        (v6([0; 8], 128), "unspecified address"),
        (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
        (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
        (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
    ]
}

/// What is wrong with `net`, or `None` when it may be used as a Pod, service or node CIDR.
///
/// Checked in this order, reporting the first hit: default route, host bits,
/// reserved space (on the canonical prefix).
pub fn cidr_problem(net: &IpNet) -> Option<CidrProblem> {
    let given = *net;
    if net.prefix_len() == 0 {
        return Some(CidrProblem::DefaultRoute { given });
    }
    let canonical = net.trunc();
    if canonical != given {
        return Some(CidrProblem::NotCanonical { given, canonical });
    }
    reserved_ranges()
        .into_iter()
        .find(|(r, _)| overlaps(r, &canonical))
        .map(|(reserved, what)| CidrProblem::Reserved {
            given,
            reserved,
            what,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<&'static str> {
        cidr_problem(&s.parse().unwrap()).map(|p| p.code())
    }

    #[test]
    fn usable_ranges_pass() {
        for ok in [
            "10.1.0.0/16",
            "192.168.1.0/24",
            "100.64.0.0/10",
            "1.0.0.0/8",
            "223.255.255.0/24",
            "fd00:1::/56",
            "2001:db8::/32",
            "::2/128",
            "fe00::/9",
        ] {
            assert_eq!(p(ok), None, "{ok}");
        }
    }

    #[test]
    fn host_bits_are_not_canonical_and_display_the_fix() {
        let pr = cidr_problem(&"10.1.0.1/16".parse().unwrap()).unwrap();
        assert_eq!(pr.code(), code::CIDR_NOT_CANONICAL);
        assert!(pr.to_string().contains("write 10.1.0.0/16"), "{pr}");
        assert_eq!(p("fd00::1/64"), Some(code::CIDR_NOT_CANONICAL));
    }

    #[test]
    fn default_routes() {
        assert_eq!(p("0.0.0.0/0"), Some(code::CIDR_DEFAULT_ROUTE));
        assert_eq!(p("::/0"), Some(code::CIDR_DEFAULT_ROUTE));
        assert_eq!(p("10.0.0.0/0"), Some(code::CIDR_DEFAULT_ROUTE));
    }

    #[test]
    fn reserved_space_inside_and_around() {
        for bad in [
            "0.0.0.0/8",
            "0.1.0.0/16",
            "127.0.0.0/8",
            "127.0.0.1/32",
            "169.254.0.0/16",
            "169.254.3.0/24",
            "224.0.0.0/4",
            "239.1.0.0/16",
            "255.255.255.255/32",
            "240.0.0.0/4",
            "0.0.0.0/4",
            "::/128",
            "::1/128",
            "::/64",
            "fe80::/10",
            "fe80::/64",
            "ff00::/8",
            "ff02::/16",
        ] {
            assert_eq!(p(bad), Some(code::CIDR_RESERVED), "{bad}");
        }
        let pr = cidr_problem(&"169.254.3.0/24".parse().unwrap()).unwrap();
        assert!(
            pr.to_string()
                .contains("is inside 169.254.0.0/16 (link-local)"),
            "{pr}"
        );
    }
}
