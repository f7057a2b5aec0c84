//! `cargo xtask setup`: installs what a fresh machine lacks, skips what is there.
//!
//! Debian packages (etcd, protoc, iproute2, Debian's rustc-web with the
//! prebuilt BPF `core`, the LLVM that rustc-web is built on), then bpf-linker
//! built against that LLVM into `.tools/` (cached in `~/.cache/podmesh`).
use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

use crate::util::{answers_version, output, root, sh};

/// The bpf-linker release podmesh builds with.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages every build and test needs.
const PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // google/protobuf/*.proto, which etcd-client's protos import: protoc
    // alone does not ship them.
    "libprotobuf-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "procps",
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "zlib1g-dev",
    "libzstd-dev",
    // The venv that setup_deploy installs kubernetes-validate into.
    "python3-venv",
    // The standard CNI plugins (bridge, ptp, host-local) that attach every
    // pod of the tests and the demo, and the iptables (nf_tables variant)
    // through which their ipMasq rules are installed.
    "containernetworking-plugins",
    "iptables",
    "nftables",
];

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: &SetupArgs) -> anyhow::Result<()> {
    ensure_packages(PACKAGES, args.check)?;
    let llvm = rustc_llvm_major()?;
    eprintln!("setup: /usr/bin/rustc is built on LLVM {llvm}");
    ensure_packages(
        &[&format!("llvm-{llvm}-dev"), &format!("libpolly-{llvm}-dev")],
        args.check,
    )?;
    let linker = ensure_bpf_linker(llvm, args.check)?;
    eprintln!("setup: bpf-linker at {}", linker.display());
    crate::setup_deploy::run(args.check)?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn ensure_packages(pkgs: &[&str], check: bool) -> anyhow::Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present: {}", pkgs.join(" "));
        return Ok(());
    }
    if check {
        bail!("missing Debian packages: {}", missing.join(" "));
    }
    if !nix_is_root() {
        bail!(
            "missing Debian packages {}; run `cargo xtask setup` as root (apt-get needs it)",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    sh(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update failed; is a Debian mirror reachable?")?;
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| format!("could not install {}", missing.join(" ")))?;
    Ok(())
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s == "0")
        .unwrap_or(false)
}

/// The LLVM major version of Debian's rustc (`LLVM version: 22.1.8` -> 22).
pub fn rustc_llvm_major() -> anyhow::Result<u32> {
    let vv = output(Command::new("/usr/bin/rustc").arg("-vV"))
        .context("/usr/bin/rustc -vV (Debian rustc-web) failed")?;
    let line = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("no `LLVM version:` line in /usr/bin/rustc -vV")?;
    line.split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major of {line:?}"))
}

/// `.tools/bpf-linker-V/bin/bpf-linker`, built once per machine into
/// `~/.cache/podmesh` and copied from there.
fn ensure_bpf_linker(llvm: u32, check: bool) -> anyhow::Result<PathBuf> {
    let local = root().join(format!(
        ".tools/bpf-linker-{BPF_LINKER_VERSION}/bin/bpf-linker"
    ));
    if answers_version(&local) {
        return Ok(local);
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let cache_root =
        PathBuf::from(home).join(format!(".cache/podmesh/bpf-linker-{BPF_LINKER_VERSION}"));
    let cached = cache_root.join("bin/bpf-linker");
    if !answers_version(&cached) {
        if check {
            bail!("bpf-linker {BPF_LINKER_VERSION} is not built; run `cargo xtask setup`");
        }
        let prefix = format!("/usr/lib/llvm-{llvm}");
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against {prefix} (a few minutes, once)"
        );
        let path = format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.env("LLVM_PREFIX", &prefix)
            .env(format!("LLVM_SYS_{llvm}1_PREFIX"), &prefix)
            .env("PATH", path)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .args(["install", "--locked", "--no-default-features", "--features"])
            .arg(format!("llvm-{llvm}"))
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .arg("--root")
            .arg(&cache_root);
        sh(&mut cmd).context("building bpf-linker failed (is llvm-NN-dev installed?)")?;
    }
    std::fs::create_dir_all(local.parent().expect("has parent"))?;
    std::fs::copy(&cached, &local)
        .with_context(|| format!("copying {} to {}", cached.display(), local.display()))?;
    Ok(local)
}
