//! Pods attached by the standard CNI plugins, run exactly as a kubelet runs them.
//!
//! Each node's pod network is one CNI network config: the `bridge` plugin
//! (a `cni0` bridge, the node as gateway: kubenet, kindnet) or the `ptp`
//! plugin (a routed veth per pod: the layout of Calico and Cilium), both with
//! `host-local` addresses from the node's Pod CIDR and `ipMasq: true`, so the
//! node masquerades what its pods send outside its own subnet, as the CNIs in
//! the field do. The plugin runs in the node's namespace with `CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_PATH` and the config on
//! stdin; its result says which address the pod got.
use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, bail};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::netns::NetNs;

/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";
/// The pods' MTU, as CNI configs in the field default to: larger than the
/// tunnel's, so path MTU discovery through the tunnel is exercised.
pub const POD_MTU: u32 = 1500;

/// The main plugin of a node's pod network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cni {
    /// `bridge`: pods on the `cni0` bridge, the bridge's address their gateway.
    Bridge,
    /// `ptp`: one routed veth per pod, a /32 route each on the node.
    Ptp,
}

impl Cni {
    /// The plugin's name (its file in [`CNI_PATH`]).
    pub fn plugin(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Ptp => "ptp",
        }
    }
}

impl std::str::FromStr for Cni {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "bridge" => Ok(Self::Bridge),
            "ptp" => Ok(Self::Ptp),
            other => bail!("unknown CNI layout {other:?} (bridge or ptp)"),
        }
    }
}

impl std::fmt::Display for Cni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.plugin())
    }
}

/// Fails with what to do when the plugins are not installed.
pub fn require_plugins() -> anyhow::Result<()> {
    for p in ["bridge", "ptp", "host-local"] {
        let path = Path::new(CNI_PATH).join(p);
        if !path.exists() {
            bail!(
                "{} is missing: the tests attach pods with the standard CNI plugins \
                 (Debian containernetworking-plugins; `cargo xtask setup` installs them)",
                path.display()
            );
        }
    }
    Ok(())
}

/// One node's pod network: its plugin, its ranges and host-local's lease directory.
#[derive(Clone, Debug)]
pub struct CniNetwork {
    /// The main plugin.
    pub cni: Cni,
    /// The node's IPv4 Pod CIDR.
    pub subnet: Ipv4Net,
    /// The node's IPv6 Pod CIDR, for dual-stack pods.
    pub subnet_v6: Option<Ipv6Net>,
    /// host-local's `dataDir`.
    pub data_dir: PathBuf,
}

/// What `ADD` gave a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Its IPv4 address.
    pub addr: Ipv4Addr,
    /// Its IPv6 address, on a dual-stack network.
    pub addr6: Option<Ipv6Addr>,
}

impl CniNetwork {
    /// The gateway (first address) of the IPv4 range.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.hosts().next().expect("a Pod CIDR with hosts")
    }

    /// The network config the kubelet would hand the plugin.
    pub fn config(&self) -> serde_json::Value {
        let v4 = serde_json::json!({
            "subnet": self.subnet.to_string(),
            "rangeStart": self.subnet.hosts().nth(9).map(|a| a.to_string()),
            "gateway": self.gateway().to_string(),
        });
        let mut ranges = vec![serde_json::json!([v4])];
        let mut routes = vec![serde_json::json!({"dst": "0.0.0.0/0"})];
        if let Some(v6) = self.subnet_v6 {
            let base = u128::from(v6.network());
            ranges.push(serde_json::json!([{
                "subnet": v6.to_string(),
                "rangeStart": Ipv6Addr::from(base + 0x10).to_string(),
                "gateway": Ipv6Addr::from(base + 1).to_string(),
            }]));
            routes.push(serde_json::json!({"dst": "::/0"}));
        }
        let mut c = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "type": self.cni.plugin(),
            "ipMasq": true,
            "mtu": POD_MTU,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "routes": routes,
                "dataDir": self.data_dir,
            },
        });
        if self.cni == Cni::Bridge {
            c["bridge"] = "cni0".into();
            c["isGateway"] = true.into();
        }
        c
    }

    /// The same network as a `*.conflist` file in a node's CNI config dir,
    /// as the kubelet (and podmesh's CNI detection) reads it.
    pub fn conflist(&self) -> serde_json::Value {
        let mut plugin = self.config();
        let obj = plugin.as_object_mut().expect("an object");
        let version = obj.remove("cniVersion");
        let name = obj.remove("name");
        serde_json::json!({"cniVersion": version, "name": name, "plugins": [plugin]})
    }

    /// `CNI_COMMAND=ADD`: attaches `pod` (its `eth0`) from inside `node`.
    pub fn add(&self, node: &NetNs, pod: &NetNs) -> anyhow::Result<Attachment> {
        let out = self.invoke("ADD", node, pod)?;
        let result: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("{} ADD printed no CNI result: {out}", self.cni))?;
        let mut at = Attachment {
            addr: Ipv4Addr::UNSPECIFIED,
            addr6: None,
        };
        for ip in result["ips"].as_array().into_iter().flatten() {
            let a = ip["address"].as_str().unwrap_or_default();
            match a.split('/').next().unwrap_or_default().parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => at.addr = v4,
                Ok(IpAddr::V6(v6)) => at.addr6 = Some(v6),
                Err(_) => bail!("{} ADD gave an address {a:?} that is not one", self.cni),
            }
        }
        if at.addr.is_unspecified() {
            bail!(
                "{} ADD gave {} no IPv4 address: {out}",
                self.cni,
                pod.name()
            );
        }
        Ok(at)
    }

    /// `CNI_COMMAND=DEL`: detaches `pod` and releases its addresses.
    pub fn del(&self, node: &NetNs, pod: &NetNs) -> anyhow::Result<()> {
        self.invoke("DEL", node, pod).map(drop)
    }

    fn invoke(&self, command: &str, node: &NetNs, pod: &NetNs) -> anyhow::Result<String> {
        let plugin = Path::new(CNI_PATH).join(self.cni.plugin());
        let mut child = node
            .command(&plugin.to_string_lossy())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod.name())
            .env("CNI_NETNS", format!("/var/run/netns/{}", pod.name()))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} in {}", plugin.display(), node.name()))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(self.config().to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{} {command} of {} in {} failed: {}{}",
                self.cni,
                pod.name(),
                node.name(),
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }
}
