//! systemd-resolved over D-Bus: the link's DNS servers and its search domains
//! (which resolved also uses as routing domains), and no default route, so only
//! cluster names go to the cluster's DNS. resolved forgets a link's settings
//! when the link disappears.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::proto::resolv_conf::ResolvConf;

/// resolved's well-known bus name.
pub const BUS_NAME: &str = "org.freedesktop.resolve1";

#[zbus::proxy(
    interface = "org.freedesktop.resolve1.Manager",
    default_service = "org.freedesktop.resolve1",
    default_path = "/org/freedesktop/resolve1",
    gen_blocking = false
)]
trait Manager {
    #[zbus(name = "SetLinkDNS")]
    fn set_link_dns(&self, ifindex: i32, addresses: &[(i32, Vec<u8>)]) -> zbus::Result<()>;
    #[zbus(name = "SetLinkDomains")]
    fn set_link_domains(&self, ifindex: i32, domains: &[(&str, bool)]) -> zbus::Result<()>;
    #[zbus(name = "SetLinkDefaultRoute")]
    fn set_link_default_route(&self, ifindex: i32, enable: bool) -> zbus::Result<()>;
    #[zbus(name = "SetLinkLLMNR")]
    fn set_link_llmnr(&self, ifindex: i32, mode: &str) -> zbus::Result<()>;
    #[zbus(name = "SetLinkMulticastDNS")]
    fn set_link_multicast_dns(&self, ifindex: i32, mode: &str) -> zbus::Result<()>;
    #[zbus(name = "RevertLink")]
    fn revert_link(&self, ifindex: i32) -> zbus::Result<()>;
}

/// A connection to systemd-resolved.
pub struct Resolved {
    manager: ManagerProxy<'static>,
}

impl Resolved {
    /// Connects if systemd-resolved runs on the system bus; `None` when there is
    /// no system bus or nobody owns resolved's name.
    pub async fn find() -> Option<Resolved> {
        let attempt = async {
            let conn = zbus::Connection::system().await.ok()?;
            let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
            let name = zbus::names::BusName::try_from(BUS_NAME).ok()?;
            if !dbus.name_has_owner(name).await.ok()? {
                return None;
            }
            Some(Resolved {
                manager: ManagerProxy::new(&conn).await.ok()?,
            })
        };
        tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .ok()
            .flatten()
    }

    /// Gives link `ifindex` the cluster's DNS servers and domains.
    pub async fn configure(&self, ifindex: u32, conf: &ResolvConf) -> Result<()> {
        let index = i32::try_from(ifindex).context("interface index out of range")?;
        let servers: Vec<(i32, Vec<u8>)> = conf
            .nameservers
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => (libc::AF_INET, v4.octets().to_vec()),
                IpAddr::V6(v6) => (libc::AF_INET6, v6.octets().to_vec()),
            })
            .collect();
        let domains: Vec<(&str, bool)> = conf.search.iter().map(|d| (d.as_str(), false)).collect();
        let why = "systemd-resolved refused to configure the tunnel's DNS";
        // Never a default DNS route, even without a domain to route by: only
        // the cluster's own names may go to the cluster. Set first, so no
        // lookup goes there in between.
        self.manager.set_link_default_route(index, false).await.context(why)?;
        self.manager.set_link_dns(index, &servers).await.context(why)?;
        self.manager.set_link_domains(index, &domains).await.context(why)?;
        self.manager.set_link_llmnr(index, "no").await.context(why)?;
        self.manager.set_link_multicast_dns(index, "no").await.context(why)?;
        Ok(())
    }

    /// Drops link `ifindex`'s settings.
    pub async fn revert(&self, ifindex: u32) -> Result<()> {
        let index = i32::try_from(ifindex).context("interface index out of range")?;
        self.manager
            .revert_link(index)
            .await
            .context("systemd-resolved refused to revert the tunnel's DNS settings")
    }
}
