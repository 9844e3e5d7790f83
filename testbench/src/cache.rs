//! The testbench's cache outside the clone (`/var/cache/teletun-testbench`, or
//! `$TESTBENCH_CACHE`): Debian packages, the laptop's staged layers, peers built
//! from Go modules. Entries are made once, under a lock, and marked complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where downloaded packages and built tools are cached between runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TESTBENCH_CACHE").map_or_else(|| PathBuf::from("/var/cache/teletun-testbench"), PathBuf::from)
}

/// A directory under the cache made once by `make` (which fills the path it
/// is given); parallel runs wait for the one that makes it. Returns its path.
pub fn cached(key: &str, make: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let root = cache_dir().join(key);
    let tree = root.join("tree");
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let lock = std::fs::File::create(root.join(".lock"))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!("cannot lock {}: {}", root.display(), std::io::Error::last_os_error());
    }
    if !tree.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&tree);
        make(&tree)?;
        std::fs::write(tree.join(".complete"), b"")?;
    }
    Ok(tree)
}
