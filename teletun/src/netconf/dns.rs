//! DNS registration through `resolvconf`(8): the seed's `resolvconf -a IFACE`
//! with the server's resolv.conf on stdin, and `resolvconf -d IFACE` to undo.
//! Works with Debian's resolvconf and openresolv.

use std::process::Stdio;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

fn not_found(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "resolvconf is not installed: install the resolvconf or openresolv package, or pass --no-dns to skip cluster DNS"
        )
    } else {
        anyhow::Error::new(e).context("cannot run resolvconf")
    }
}

/// Registers `resolv_conf` as interface `iface`'s DNS configuration.
pub async fn register(iface: &str, resolv_conf: &str) -> Result<()> {
    let mut child = Command::new("resolvconf")
        .args(["-a", iface])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(not_found)?;
    let mut stdin = child.stdin.take().context("resolvconf has no stdin")?;
    stdin
        .write_all(resolv_conf.as_bytes())
        .await
        .context("cannot write to resolvconf")?;
    drop(stdin);
    let out = child.wait_with_output().await.context("resolvconf did not finish")?;
    if !out.status.success() {
        bail!(
            "resolvconf -a {iface} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes interface `iface`'s DNS configuration; succeeds if there is none.
pub async fn unregister(iface: &str) -> Result<()> {
    let out = Command::new("resolvconf")
        .args(["-d", iface, "-f"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(not_found)?;
    if !out.status.success() {
        bail!(
            "resolvconf -d {iface} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
