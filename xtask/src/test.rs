//! `cargo xtask test`: the project's whole check, as CI runs it.
use std::process::Command;

use crate::util::{cargo, root, sh, target_dir};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup` (the machine is known to be ready).
    #[arg(long)]
    pub skip_setup: bool,
    /// Skip the formatting and clippy checks.
    #[arg(long)]
    pub skip_lint: bool,
    /// Run only the privileged integration tests whose names contain this
    /// (and not the VM run).
    #[arg(long)]
    pub filter: Option<String>,
    /// Skip the VM run (`cargo xtask vm-test`: the ipip and cls_bpf paths on
    /// Debian's kernel in qemu, about 2 minutes of software emulation).
    #[arg(long)]
    pub skip_vm: bool,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    if !args.skip_setup {
        crate::setup::run(&crate::setup::SetupArgs { check: false })?;
    }
    warn_if_disk_is_short();
    if !args.skip_lint {
        sh(cargo().args(["fmt", "--all", "--check"]))?;
        sh(Command::new("cargo")
            .current_dir(root().join("ebpf/podmesh-ebpf"))
            .args(["fmt", "--check"]))?;
        sh(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    if args.filter.is_none() {
        // Unit tests and doc tests of every crate but the privileged one.
        sh(cargo().args(["test", "--workspace", "--exclude", "podmesh-tests"]))?;
    }
    // Network namespaces, real etcd, real eBPF: they share kernel state, so
    // one at a time.
    let mut it = cargo();
    it.args(["test", "-p", "podmesh-tests", "--"]);
    if let Some(f) = &args.filter {
        it.arg(f);
    }
    it.arg("--test-threads=1");
    sh(&mut it)?;
    // This kernel has no IPIP and attaches through TCX: the ipip datapath
    // and the cls_bpf attachment are proven on Debian's kernel in a VM.
    if args.filter.is_none() && !args.skip_vm {
        crate::vm_test::run(&crate::vm_test::VmTestArgs::default())?;
    }
    eprintln!("xtask test: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The debug build of the workspace and its test binaries takes about 4 GiB;
/// a linker that runs out of disk dies with SIGBUS and a misleading message,
/// so say it up front.
fn warn_if_disk_is_short() {
    const NEEDED: u64 = 6 << 30;
    let target = target_dir();
    let dir = if target.exists() { target } else { root() };
    let Ok(out) = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(&dir)
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(avail) = text
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse::<u64>().ok())
    else {
        return;
    };
    if avail < NEEDED {
        eprintln!(
            "xtask test: warning: only {:.1} GiB free under {}; the build needs about {} GiB \
             (a linker killed by SIGBUS means the disk filled up): free space or set CARGO_TARGET_DIR",
            avail as f64 / f64::from(1u32 << 30),
            dir.display(),
            NEEDED >> 30
        );
    } else {
        eprintln!(
            "xtask test: {:.1} GiB free under {}",
            avail as f64 / f64::from(1u32 << 30),
            dir.display()
        );
    }
}
