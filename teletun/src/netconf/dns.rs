//! DNS registration. Where systemd-resolved runs, the tunnel link is configured
//! over D-Bus ([`super::resolved`]); elsewhere through `resolvconf`(8)
//! (Debian's resolvconf and openresolv): `resolvconf -a ENTRY` with a
//! resolv.conf on stdin naming the client's local forwarder
//! ([`super::forwarder`]), and `resolvconf -d ENTRY` to undo.

use std::process::Stdio;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::resolved::Resolved;
use crate::proto::resolv_conf::ResolvConf;

/// Which mechanism registered a client's DNS (kept in its change record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsVia {
    /// `resolvconf -a`: outlives the client, undone with `resolvconf -d`.
    #[default]
    Resolvconf,
    /// systemd-resolved link settings: vanish with the link.
    Resolved,
}

impl std::fmt::Display for DnsVia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DnsVia::Resolvconf => "resolvconf",
            DnsVia::Resolved => "systemd-resolved",
        })
    }
}

/// This machine's DNS manager.
pub enum DnsManager {
    /// `resolvconf`(8).
    Resolvconf,
    /// systemd-resolved on the system bus.
    Resolved(Resolved),
}

impl DnsManager {
    /// systemd-resolved if it runs, else resolvconf.
    pub async fn detect() -> DnsManager {
        match Resolved::find().await {
            Some(r) => DnsManager::Resolved(r),
            None => DnsManager::Resolvconf,
        }
    }

    /// Which mechanism this is.
    pub fn via(&self) -> DnsVia {
        match self {
            DnsManager::Resolvconf => DnsVia::Resolvconf,
            DnsManager::Resolved(_) => DnsVia::Resolved,
        }
    }

    /// Registers `conf` as entry `entry` (resolvconf), or as link `ifindex`'s
    /// servers and search domains (systemd-resolved; its domains route too).
    pub async fn register(&self, entry: &str, ifindex: u32, conf: &ResolvConf) -> Result<()> {
        match self {
            DnsManager::Resolvconf => register(entry, &conf.to_text()).await,
            DnsManager::Resolved(r) => r.configure(ifindex, conf).await,
        }
    }

    /// Removes what [`Self::register`] did.
    pub async fn unregister(&self, entry: &str, ifindex: u32) -> Result<()> {
        match self {
            DnsManager::Resolvconf => unregister(entry).await,
            DnsManager::Resolved(r) => r.revert(ifindex).await,
        }
    }
}
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
