//! The pin directory: where podmesh's maps and program link outlive the agent, on a bpffs.
use std::path::Path;

use super::base::DatapathError;

/// Whether `p` is (on) a bpffs.
pub fn is_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `dir` exists on a bpffs; mounts one on its parent when the
/// parent is not bpffs yet (the usual `/sys/fs/bpf` on a fresh host).
pub fn ensure_pin_dir(dir: &Path) -> Result<(), DatapathError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        std::fs::create_dir_all(parent)
            .map_err(|e| DatapathError::io(format!("creating {}", parent.display()), e))?;
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            DatapathError::Unavailable(format!(
                "mounting bpffs on {}: {e} (hint: mount it on the host, e.g. hostPath \
                 /sys/fs/bpf with mountPropagation, so pins outlive the agent)",
                parent.display()
            ))
        })?;
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| DatapathError::io(format!("creating {}", dir.display()), e))
}
