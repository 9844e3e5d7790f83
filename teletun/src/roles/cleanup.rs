//! `teletun cleanup`: undo what dead client instances left behind (DNS entries;
//! their TUN devices, addresses and routes died with them), and nothing else.

use anyhow::Result;
use tracing::{info, warn};

use crate::netconf::netlink::Netlink;
use crate::netconf::{dns, record};

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
        if rec.dns_registered {
            if netlink.is_none() {
                netlink = Some(Netlink::connect()?);
            }
            let nl = netlink.as_ref().expect("just set");
            // A dead client's TUN is gone; an interface of that name now belongs to
            // someone else, and so does any DNS entry under its name.
            if nl.link_index(&rec.iface).await?.is_some() {
                warn!(
                    "{} exists again but not as the dead client pid {}'s device; leaving its DNS entry alone",
                    rec.iface, rec.pid
                );
            } else {
                dns::unregister(&rec.iface).await?;
            }
        }
        std::fs::remove_file(&path).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        info!("cleaned up after dead client pid {} ({})", rec.pid, rec.iface);
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
