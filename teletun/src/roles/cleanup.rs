//! `teletun cleanup`: undo what dead client instances left behind (DNS entries;
//! their TUN devices, addresses and routes died with them), and nothing else.

use std::path::Path;

use anyhow::Result;
use tracing::{info, warn};

use crate::netconf::dns::{self, DnsVia};
use crate::netconf::netlink::Netlink;
use crate::netconf::record::{self, Record};

/// Undoes what the dead client of `rec` (read from `path`) left: its DNS entry,
/// unless an interface of that name exists again (then both belong to someone
/// else), and the record itself.
pub async fn undo_record(netlink: &Netlink, rec: &Record, path: &Path) -> Result<()> {
    // systemd-resolved dropped the link's settings when the link went away.
    if rec.dns_registered && rec.dns_via == DnsVia::Resolvconf {
        if netlink.link_index(&rec.iface).await?.is_some() {
            warn!(
                "{} exists again but not as the dead client pid {}'s device; leaving its DNS entry alone",
                rec.iface, rec.pid
            );
        } else {
            dns::unregister(rec.dns_entry()).await?;
        }
    }
    // Its status socket, which nobody answers on any more.
    let _ = std::fs::remove_file(crate::status::socket_path(&rec.iface));
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    info!("cleaned up after dead client pid {} ({})", rec.pid, rec.iface);
    Ok(())
}

/// Undoes the changes of every client instance that is no longer running.
/// Records of live instances are left alone. Returns how many were cleaned.
pub async fn undo_dead_instances(verbose: bool) -> Result<usize> {
    let mut cleaned = 0;
    let mut netlink = None;
    for (path, loaded) in record::load_all() {
        let rec = match loaded {
            Ok(r) => r,
            Err(e) => {
                warn!("{e:#}; leaving it alone");
                continue;
            }
        };
        if rec.owner_alive() {
            if verbose {
                info!(
                    "{} belongs to running client pid {}; leaving it alone",
                    rec.iface, rec.pid
                );
            }
            continue;
        }
        if netlink.is_none() {
            netlink = Some(Netlink::connect()?);
        }
        undo_record(netlink.as_ref().expect("just set"), &rec, &path).await?;
        cleaned += 1;
    }
    Ok(cleaned)
}

/// The `cleanup` subcommand.
pub async fn run() -> Result<()> {
    let n = undo_dead_instances(true).await?;
    if n == 0 {
        info!("nothing to clean up");
    }
    Ok(())
}
