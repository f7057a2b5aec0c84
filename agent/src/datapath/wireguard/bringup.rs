//! Bringing up the WireGuard device: the kernel's where it can be created, else the
//! userspace process's, adopted when one serves the socket, started detached when none does.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{Control, WG_DEVICE, WgConfig, genl, uapi};
use crate::{
    config::WireguardBackend,
    datapath::{
        base::{DatapathError, KernelConfig},
        error::netlink_err,
        nl::Netlink,
        rtnl,
    },
};

/// How long the agent waits for a userspace process to serve its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Brings up the device of the configured backend, or adopts it.
pub(super) fn bring_up(
    cfg: &WgConfig,
    kc: &KernelConfig,
    nl: &mut Netlink,
) -> Result<Control, DatapathError> {
    let existing = rtnl::link_by_name(nl, WG_DEVICE).map_err(netlink_err("listing links"))?;
    let kernel_there = existing
        .as_ref()
        .is_some_and(|l| l.kind.as_deref() == Some("wireguard"));
    let kernel = match cfg.backend {
        WireguardBackend::Userspace => false,
        WireguardBackend::Kernel => {
            if !kernel_there {
                if let Some(l) = &existing {
                    // A TUN left by a userspace process: the kernel device takes the name.
                    rtnl::delete_link(nl, l.index)
                        .map_err(netlink_err("removing the userspace podmesh-wg"))?;
                }
                genl::create_link(nl, WG_DEVICE)?;
            }
            true
        }
        WireguardBackend::Auto => {
            kernel_there || (existing.is_none() && genl::try_create(nl, WG_DEVICE))
        }
    };
    if kernel {
        return Ok(Control::Kernel(kc.netns.clone()));
    }
    if kernel_there {
        return Err(DatapathError::Unavailable(format!(
            "{WG_DEVICE} is a kernel WireGuard device and --wireguard-backend is userspace; \
             remove it (ip link del {WG_DEVICE}) or use --wireguard-backend auto"
        )));
    }
    let sock = cfg.socket();
    if uapi::get(&sock).is_ok() {
        tracing::info!(socket = %sock.display(), "adopting the running userspace WireGuard");
        return Ok(Control::Uapi(sock));
    }
    match &cfg.userspace_binary {
        Some(bin) => spawn_userspace(cfg, kc.netns.as_deref(), bin)?,
        None => {
            tracing::info!(socket = %sock.display(), "waiting for the userspace WireGuard (its own container) to serve its socket")
        }
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if uapi::get(&sock).is_ok() {
            return Ok(Control::Uapi(sock));
        }
        if Instant::now() > deadline {
            return Err(DatapathError::Unavailable(format!(
                "no userspace WireGuard serves {} after {}s (see {} for the podmesh-wireguard log)",
                sock.display(),
                START_TIMEOUT.as_secs(),
                cfg.run_dir.join(format!("{WG_DEVICE}.log")).display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `podmesh-wireguard` detached: its own process group (and, by
/// itself, session), output to a log next to its socket, reaped by a thread
/// while this agent lives; it outlives the agent.
fn spawn_userspace(cfg: &WgConfig, netns: Option<&Path>, bin: &Path) -> Result<(), DatapathError> {
    use std::os::unix::process::CommandExt as _;
    std::fs::create_dir_all(&cfg.run_dir)
        .map_err(|e| DatapathError::io(format!("creating {}", cfg.run_dir.display()), e))?;
    let log_path = cfg.run_dir.join(format!("{WG_DEVICE}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| DatapathError::io(format!("opening {}", log_path.display()), e))?;
    let err = log
        .try_clone()
        .map_err(|e| DatapathError::io(format!("opening {}", log_path.display()), e))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(["--interface", WG_DEVICE, "--run-dir"])
        .arg(&cfg.run_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        DatapathError::Unavailable(format!(
            "cannot start {} ({e}); install it next to podmesh-agent or set --wireguard-userspace-binary",
            bin.display()
        ))
    })?;
    tracing::info!(pid = child.id(), program = %bin.display(), "started the userspace WireGuard; it outlives this agent");
    std::thread::spawn(move || {
        if let Ok(st) = child.wait() {
            tracing::warn!(status = %st, "the userspace WireGuard this agent started exited");
        }
    });
    Ok(())
}
