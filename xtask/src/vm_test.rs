//! `cargo xtask vm-test`: the `ipip` and `ebpf` datapaths and kernel WireGuard on Debian's kernel, in qemu.
//!
//! The host kernel has no IPIP, so the ipip connectivity test (ignored on the
//! host) runs in a VM: Debian's `linux-image-amd64` kernel (extracted, not
//! installed) boots in qemu with software emulation on a small initramfs
//! (static busybox, the modules the test needs), which mounts the host's root
//! read-only over 9p, chroots into it and runs the test binary built here.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::util::{cargo, output, sh};

/// The tests the VM runs (tests/tests/datapath_modes.rs): ipip, also over an
/// IPv6 underlay (ip6tnl), which the host cannot run, and ebpf, which there
/// attaches through cls_bpf instead of TCX (Linux < 6.6, as on Debian 12's
/// stock kernel).
const TEST_TARGET: &str = "datapath_modes";
const TEST_NAMES: &[&str] = &[
    "ipip_mode_connects_every_pod_pair_across_clusters",
    "ipip_mode_over_an_ipv6_underlay_connects_every_pod_pair",
    "ebpf_mode_connects_every_pod_pair_across_clusters",
    "wireguard_kernel_connects_every_pod_pair_across_clusters",
    "userspace_wireguard_defers_only_to_a_kernel_with_wireguard",
];
/// Binaries the tests start, built here and copied into the guest's /tmp
/// (`PODMESH_BIN_DIR`): the guest runs no cargo.
const GUEST_BINS: &[(&str, &str)] = &[("podmesh-wireguard", "podmesh-wireguard")];
/// Modules the guest loads, dependencies first (resolved from the modules'
/// own `depends=`): 9p over virtio for the host filesystem, then what the
/// test topology and the ipip datapath use: the CNI plugins' ipMasq rules
/// (iptables-nft: nf_tables, its xtables compatibility and MASQUERADE) and
/// podmesh's masquerade exemption (an nftables nat chain with SNAT). The
/// guest has no modprobe: whatever the kernel would load on demand is
/// loaded here.
const ROOT_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "veth",
    "bridge",
    "ipip",
    "ip6_tunnel",
    "vxlan",
    "wireguard",
    "sch_ingress",
    "cls_bpf",
    // libcrc32c (nf_tables, nf_conntrack) asks the crypto API for crc32c at
    // load: a soft dependency, not in `depends=`.
    "crc32c_generic",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "xt_MASQUERADE",
    "xt_comment",
];

const DEFAULT_TIMEOUT_S: u64 = 1500;
const DEFAULT_MEMORY_MIB: u32 = 2048;

#[derive(Debug, clap::Args)]
pub struct VmTestArgs {
    /// Give up after this many seconds (software emulation is slow).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_S)]
    pub timeout: u64,
    /// Memory of the VM in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory: u32,
}

impl Default for VmTestArgs {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT_S,
            memory: DEFAULT_MEMORY_MIB,
        }
    }
}

pub fn run(args: &VmTestArgs) -> anyhow::Result<()> {
    ensure_qemu()?;
    let cache = cache_dir()?;
    let (vmlinuz, modules) = debian_kernel(&cache)?;
    let busybox = debian_busybox(&cache)?;
    let test_bin = build_test_binary()?;
    let bins = GUEST_BINS
        .iter()
        .map(|(package, bin)| build_binary(package, bin))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let initramfs = cache.join("initramfs.cpio");
    write_initramfs(&initramfs, &busybox, &modules, &test_bin, &bins)?;
    boot(args, &vmlinuz, &initramfs)
}

fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("$HOME")?;
    let dir = PathBuf::from(home).join(".cache/podmesh/vm");
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// qemu, installed the way `cargo xtask setup` installs packages (after an
/// `apt-get update`, which `apt-get download` below needs as well).
fn ensure_qemu() -> anyhow::Result<()> {
    crate::setup::ensure_packages(&["qemu-system-x86"], false)
}

/// `apt-get download` of `pkg` into `dir/pkg`, extracted (not installed: the
/// host keeps its own kernel and packages).
fn extract_package(dir: &Path, pkg: &str) -> anyhow::Result<PathBuf> {
    let out = dir.join(pkg);
    if out.join(".done").exists() {
        return Ok(out);
    }
    let dl = dir.join("debs");
    fs::create_dir_all(&dl)?;
    let download = || {
        sh(Command::new("apt-get")
            .current_dir(&dl)
            .args(["download", pkg]))
    };
    if download().is_err() {
        // A package index older than the mirror names files it no longer has.
        eprintln!(
            "vm-test: apt-get download {pkg} failed; updating the package index and retrying"
        );
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        download()?;
    }
    let deb = fs::read_dir(&dl)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("{pkg}: no .deb after apt-get download"))?;
    fs::create_dir_all(&out)?;
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&out))?;
    fs::write(out.join(".done"), "")?;
    Ok(out)
}

/// The current Debian kernel: its vmlinuz and the module files to load, in order.
fn debian_kernel(cache: &Path) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let pkg = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .context("apt-cache depends linux-image-amd64: no versioned kernel package")?
        .trim()
        .to_string();
    let root = extract_package(cache, &pkg)?;
    let version = pkg.trim_start_matches("linux-image-");
    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    let moddir = root.join(format!("lib/modules/{version}"));
    let mut by_name = BTreeMap::new();
    index_modules(&moddir, &mut by_name)?;
    let mut order = Vec::new();
    for m in ROOT_MODULES {
        resolve(m, &by_name, &mut order)?;
    }
    Ok((vmlinuz, order))
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
            && let Some(stem) = name.strip_suffix(".ko")
        {
            out.insert(stem.replace('-', "_"), p.clone());
        }
    }
    Ok(())
}

/// Appends `name` after its dependencies (read from the module's `.modinfo`).
fn resolve(
    name: &str,
    all: &BTreeMap<String, PathBuf>,
    order: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let path = all
        .get(&name.replace('-', "_"))
        .with_context(|| format!("module {name} not in the kernel package (built in?)"))?;
    if order.contains(path) {
        return Ok(());
    }
    let bytes = fs::read(path)?;
    let key = b"depends=";
    if let Some(at) = bytes.windows(key.len()).position(|w| w == key) {
        let rest = &bytes[at + key.len()..];
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        let deps = String::from_utf8_lossy(&rest[..end]).into_owned();
        for d in deps.split(',').filter(|d| !d.is_empty()) {
            resolve(d, all, order)?;
        }
    }
    order.push(path.clone());
    Ok(())
}

fn debian_busybox(cache: &Path) -> anyhow::Result<PathBuf> {
    let root = extract_package(cache, "busybox-static")?;
    let bin = root.join("bin/busybox");
    if !bin.exists() {
        bail!("{} missing", bin.display());
    }
    Ok(bin)
}

/// Builds the integration test and returns its executable.
fn build_test_binary() -> anyhow::Result<PathBuf> {
    let out = output(cargo().args([
        "test",
        "-p",
        "podmesh-tests",
        "--test",
        TEST_TARGET,
        "--no-run",
        "--message-format=json",
    ]))?;
    executable(&out, TEST_TARGET)
}

/// Builds binary `bin` of `package` in the profile of the test binary (dev).
fn build_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let out = output(cargo().args([
        "build",
        "-p",
        package,
        "--bin",
        bin,
        "--message-format=json",
    ]))?;
    executable(&out, bin)
}

/// The executable of target `name` in cargo's JSON output. Without a JSON
/// dependency: the target's artifact line names its executable.
fn executable(out: &str, name: &str) -> anyhow::Result<PathBuf> {
    let line = out
        .lines()
        .find(|l| {
            l.contains("\"reason\":\"compiler-artifact\"")
                && l.contains(&format!("\"name\":\"{name}\""))
                && l.contains("\"executable\":\"")
        })
        .with_context(|| format!("no executable of {name} in cargo's output"))?;
    let start = line.find("\"executable\":\"").expect("checked") + "\"executable\":\"".len();
    let end = line[start..].find('"').context("unterminated path")? + start;
    Ok(PathBuf::from(&line[start..end]))
}

fn init_script(modules: &[PathBuf], test_bin: &Path, bins: &[PathBuf]) -> String {
    let insmods: String = modules
        .iter()
        .map(|m| {
            format!(
                "/bin/busybox insmod /modules/{} || echo 'insmod {} failed'\n",
                m.file_name().and_then(|n| n.to_str()).unwrap_or_default(),
                m.display()
            )
        })
        .collect();
    // Copied before the guest's tmpfs hides the host's /tmp, moved after.
    let (mut bins_in, mut bins_mv) = (String::new(), String::new());
    for b in bins {
        let name = b.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        bins_in.push_str(&format!(
            "$B cp /host{} /{name} || echo 'copying {name} failed'\n",
            b.display()
        ));
        bins_mv.push_str(&format!("$B mv /{name} /host/tmp/{name}\n"));
    }
    format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /host
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
{insmods}
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 host /host || echo 'mounting the host fs failed'
$B mount -t proc proc /host/proc
$B mount -t sysfs sys /host/sys
$B mount -t devtmpfs dev /host/dev
# The test binary may live under the host's /tmp or /run (CARGO_TARGET_DIR),
# which the guest's own tmpfs mounts hide: it runs from a copy.
$B cp /host{bin} /podmesh-vm-test || echo 'copying the test binary failed'
{bins_in}$B mount -t tmpfs tmp /host/run
$B mount -t tmpfs tmp /host/tmp
$B mv /podmesh-vm-test /host/tmp/podmesh-vm-test
{bins_mv}echo "PODMESH-VM-KERNEL $($B uname -r)"
$B chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp CI=1 PODMESH_BIN_DIR=/tmp /tmp/podmesh-vm-test --include-ignored --exact {tests} --test-threads=1 --nocapture
echo "PODMESH-VM-EXIT $?"
$B poweroff -f
"#,
        bin = test_bin.display(),
        tests = TEST_NAMES.join(" ")
    )
}

/// A newc cpio archive (what the kernel unpacks as initramfs).
fn write_initramfs(
    path: &Path,
    busybox: &Path,
    modules: &[PathBuf],
    test_bin: &Path,
    bins: &[PathBuf],
) -> anyhow::Result<()> {
    let mut a = Vec::new();
    let mut ino = 1u32;
    let mut entry = |a: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let name_z = format!("{name}\0");
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name_z.len(),
            0
        );
        ino += 1;
        a.extend_from_slice(header.as_bytes());
        a.extend_from_slice(name_z.as_bytes());
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
        a.extend_from_slice(data);
        while !a.len().is_multiple_of(4) {
            a.push(0);
        }
    };
    for d in ["bin", "modules", "proc", "sys", "dev", "host"] {
        entry(&mut a, d, 0o040755, &[]);
    }
    entry(&mut a, "bin/busybox", 0o100755, &fs::read(busybox)?);
    for m in modules {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .context("module name")?;
        entry(&mut a, &format!("modules/{name}"), 0o100644, &fs::read(m)?);
    }
    entry(
        &mut a,
        "init",
        0o100755,
        init_script(modules, test_bin, bins).as_bytes(),
    );
    entry(&mut a, "TRAILER!!!", 0, &[]);
    fs::write(path, a).with_context(|| format!("writing {}", path.display()))
}

fn boot(args: &VmTestArgs, vmlinuz: &Path, initramfs: &Path) -> anyhow::Result<()> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m"])
        .arg(args.memory.to_string())
        .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=4",
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("+ {}", crate::util::show(&cmd));
    let mut child = cmd.spawn().context("starting qemu")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("vm| {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut exit = None;
    let mut kernel = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(5))) {
            Ok(line) => {
                // The console may prefix lines with terminal escapes.
                if let Some(at) = line.find("PODMESH-VM-KERNEL ") {
                    kernel = Some(line[at + 18..].trim().to_string());
                }
                if let Some(at) = line.find("PODMESH-VM-EXIT ") {
                    exit = Some(line[at + 16..].trim().to_string());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "vm-test: no result after {} s (software emulation)",
                    args.timeout
                );
            }
            Err(_) => {}
        }
    }
    let _ = child.wait();
    match exit.as_deref() {
        Some("0") => {
            eprintln!(
                "vm-test: {} passed on Linux {}",
                TEST_NAMES.join(", "),
                kernel.as_deref().unwrap_or("?")
            );
            Ok(())
        }
        Some(code) => bail!("vm-test: the tests failed in the VM (exit {code}); see vm| lines"),
        None => bail!("vm-test: the VM stopped before the test reported; see vm| lines"),
    }
}
