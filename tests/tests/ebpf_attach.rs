//! The embedded tc program loads into the real kernel and attaches to the
//! egress of `podmesh0` (VXLAN, external mode) inside a fresh network namespace.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};
use aya::{
    EbpfLoader,
    maps::{LpmTrie, lpm_trie::Key},
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use podmesh_common::{REMOTES_V4_MAP, RemoteNode, TUNNEL_DEVICE, TUNNEL_EGRESS_PROG};
use podmesh_tests::netns::NetNs;

/// A private bpffs instance on a temporary directory, unmounted on drop, so
/// pins of concurrent or crashed tests never collide with the host's.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path()))?;
        Ok(Self { dir })
    }
    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn tc_egress_program_attaches_to_podmesh0() -> anyhow::Result<()> {
    if !podmesh_tests::require_root("tc_egress_program_attaches_to_podmesh0") {
        return Ok(());
    }
    let ns = NetNs::new("attach")?;
    let _inside = ns.enter()?;
    let bpffs = Bpffs::new()?;
    run(Command::new("ip").args([
        "link",
        "add",
        TUNNEL_DEVICE,
        "type",
        "vxlan",
        "external",
        "dstport",
        "8472",
    ]))?;
    run(Command::new("ip").args(["link", "set", TUNNEL_DEVICE, "up"]))?;

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpffs.path())
        .load(podmesh_agent::EBPF_OBJECT)
        .context("loading the embedded object")?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(TUNNEL_EGRESS_PROG)
        .context("program in object")?
        .try_into()?;
    prog.load().context("verifier")?;
    prog.attach_with_options(
        TUNNEL_DEVICE,
        TcAttachType::Egress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )?;

    let (_, progs) = SchedClassifier::query_tcx(TUNNEL_DEVICE, TcAttachType::Egress)?;
    let names: Vec<String> = progs
        .iter()
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect();
    // The kernel keeps the first 15 bytes of a program name.
    assert!(
        names
            .iter()
            .any(|n| TUNNEL_EGRESS_PROG.starts_with(n.as_str()) && !n.is_empty()),
        "tc egress of {TUNNEL_DEVICE} has {names:?}, not {TUNNEL_EGRESS_PROG}"
    );

    // The LPM map was pinned by name and is writable from user space.
    let pinned = bpffs.path().join(REMOTES_V4_MAP);
    assert!(pinned.exists(), "{} not pinned", pinned.display());
    let mut remotes: LpmTrie<_, [u8; 4], RemoteNode> =
        LpmTrie::try_from(ebpf.map_mut(REMOTES_V4_MAP).context("map")?)?;
    let node = RemoteNode::new([192, 168, 50, 21].into(), 1, [2, 0, 0, 0, 0, 1]);
    remotes.insert(&Key::new(24, [10, 2, 1, 0]), node, 0)?;
    assert_eq!(remotes.get(&Key::new(32, [10, 2, 1, 7]), 0)?, node);
    Ok(())
}
