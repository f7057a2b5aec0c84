//! Process limits a server needs raised at start.

/// Raises this process's soft limit of open files to its hard limit (1,024
/// soft is common in container runtimes, where the hard limit is far
/// higher): a proxy serving thousands of agents needs a descriptor for each.
/// Returns the limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_open_files_limit_becomes_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit};
        let n = super::raise_nofile_limit().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert_eq!(n, hard);
    }
}
