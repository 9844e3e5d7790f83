//! Writing kernel parameters under /proc/sys.

use anyhow::{Context, Result};

/// Sets `/proc/sys/<key with dots as slashes>` to `value`.
pub fn set(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value)
        .with_context(|| format!("cannot set {key}={value} (needs CAP_NET_ADMIN in this network namespace)"))
}

/// Reads `/proc/sys/<key>`, trimmed.
pub fn get(key: &str) -> Result<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {key}"))?
        .trim()
        .to_owned())
}
