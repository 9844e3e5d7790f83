//! Addresses, routes and policy rules over rtnetlink.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::neighbour::NeighbourFlags;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// The kernel's `local` routing table.
pub const TABLE_LOCAL: u32 = 255;
/// The kernel's `main` routing table.
pub const TABLE_MAIN: u32 = 254;

/// A route as read back from the kernel (only what TeleTUN looks at).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub destination: IpNet,
    /// Output interface index, if any.
    pub oif: Option<u32>,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// Routing table.
    pub table: u32,
    /// Unicast, local, blackhole, …
    pub kind: RouteType,
}

/// A policy rule as read back from the kernel.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Rule priority.
    pub priority: u32,
    /// Table it looks up.
    pub table: u32,
    /// The raw message, to delete it exactly.
    pub message: RuleMessage,
}

/// The name of interface `index`, if it exists.
pub fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into buf.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Tells when this machine's links, addresses or routes change (the kernel's
/// rtnetlink multicast groups, as `ip monitor` hears them).
pub struct ChangeWatch {
    events: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    connection: tokio::task::JoinHandle<()>,
}

impl ChangeWatch {
    /// Subscribes (the connection runs on the current tokio runtime).
    pub fn start() -> Result<Self> {
        use rtnetlink::MulticastGroup as G;
        let groups = [G::Link, G::Ipv4Ifaddr, G::Ipv4Route, G::Ipv6Ifaddr, G::Ipv6Route];
        let (conn, _, events) =
            rtnetlink::new_multicast_connection(&groups).context("cannot watch this machine's addresses and routes")?;
        Ok(ChangeWatch {
            events,
            connection: tokio::spawn(conn),
        })
    }

    /// Waits for a change; a burst (an address and its routes) counts once:
    /// the rest of it is taken within `settle`.
    pub async fn changed(&mut self, settle: std::time::Duration) {
        use futures::StreamExt;
        if self.events.next().await.is_none() {
            // The socket is gone: nothing will ever be heard again.
            std::future::pending::<()>().await;
        }
        let deadline = tokio::time::Instant::now() + settle;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, self.events.next()).await {}
    }
}

impl Drop for ChangeWatch {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// A connection to the kernel's routing subsystem.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket (the connection runs on the current tokio runtime).
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The index of the interface called `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up interface {name}")),
        }
    }

    /// The indices of links that resolve neighbours (ARP, neighbour
    /// discovery): not loopback, point-to-point or `NOARP` (TUN, WireGuard,
    /// PPP devices are one of those).
    pub async fn neighbour_links(&self) -> Result<std::collections::HashSet<u32>> {
        use rtnetlink::packet_route::link::LinkFlags;
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .context("cannot list links")?;
        let without = LinkFlags::Loopback | LinkFlags::Pointopoint | LinkFlags::Noarp;
        Ok(links
            .into_iter()
            .filter(|l| !l.header.flags.intersects(without))
            .map(|l| l.header.index)
            .collect())
    }

    /// Caps how many segments the kernel puts into one GSO packet for
    /// interface `index` (a TSO packet read from a TUN is split into that many).
    pub async fn set_gso_max_segments(&self, index: u32, segments: u32) -> Result<()> {
        let mut msg = rtnetlink::LinkUnspec::new_with_index(index).build();
        msg.attributes
            .push(rtnetlink::packet_route::link::LinkAttribute::GsoMaxSegs(segments));
        self.set_link(msg, || {
            format!("cannot set gso_max_segs {segments} on interface {index}")
        })
        .await
    }

    /// Sets one IPv4 parameter of interface `index` (`net.ipv4.conf.IFACE.*`,
    /// by its `IPV4_DEVCONF_*` number) over netlink: what works where
    /// /proc/sys is read-only (an unprivileged container). The kernel takes
    /// only the parameters named (`IFLA_INET_CONF` holds (number, value) pairs).
    pub async fn set_ipv4_devconf(&self, index: u32, param: u16, value: u32) -> Result<()> {
        use rtnetlink::packet_core::DefaultNla;
        use rtnetlink::packet_route::link::{AfSpecInet, AfSpecUnspec, LinkAttribute};
        /// `IFLA_INET_CONF`, inside `IFLA_AF_SPEC`'s `AF_INET`.
        const IFLA_INET_CONF: u16 = 1;
        let mut pair = Vec::with_capacity(8);
        pair.extend_from_slice(&8u16.to_ne_bytes());
        pair.extend_from_slice(&param.to_ne_bytes());
        pair.extend_from_slice(&value.to_ne_bytes());
        let conf = AfSpecInet::Other(DefaultNla::new(IFLA_INET_CONF, pair));
        let mut msg = rtnetlink::LinkUnspec::new_with_index(index).build();
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![conf])]));
        self.set_link(msg, || {
            format!("cannot set IPv4 parameter {param} to {value} on interface {index}")
        })
        .await
    }

    /// Sets interface `index`'s MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = rtnetlink::LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.set_link(msg, || format!("cannot set MTU {mtu} on interface {index}"))
            .await
    }

    /// Sends one RTM_SETLINK; `what` says what failed.
    async fn set_link(
        &self,
        msg: rtnetlink::packet_route::link::LinkMessage,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        self.handle.link().set(msg).execute().await.with_context(what)
    }

    /// Adds `address/prefix` to interface `index`. IPv6 addresses skip duplicate
    /// address detection so they are usable at once.
    pub async fn add_address(&self, index: u32, address: IpAddr, prefix: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, address, prefix);
        if address.is_ipv6() {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .with_context(|| format!("cannot add address {address}/{prefix}"))
    }

    /// The addresses on interface `index`, with prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("cannot list addresses")?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let prefix = m.header.prefix_len;
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some((ip, prefix)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Routes `destination` to interface `index` (main table).
    pub async fn add_route(&self, destination: IpNet, index: u32) -> Result<()> {
        self.change_route(true, destination, index, TABLE_MAIN, None).await
    }

    /// Removes the route to `destination` via interface `index` (main table).
    pub async fn del_route(&self, destination: IpNet, index: u32) -> Result<()> {
        self.change_route(false, destination, index, TABLE_MAIN, None).await
    }

    /// Routes `destination` to interface `index` in `table`.
    pub async fn add_route_in(&self, destination: IpNet, index: u32, table: u32) -> Result<()> {
        self.change_route(true, destination, index, table, None).await
    }

    /// Routes `destination` to interface `index` in the main table with metric
    /// `metric`, so it can be told apart from the kernel's own routes.
    pub async fn add_route_metric(&self, destination: IpNet, index: u32, metric: u32) -> Result<()> {
        self.change_route(true, destination, index, TABLE_MAIN, Some(metric))
            .await
    }

    /// Removes a route added with [`Self::add_route_metric`].
    pub async fn del_route_metric(&self, destination: IpNet, index: u32, metric: u32) -> Result<()> {
        self.change_route(false, destination, index, TABLE_MAIN, Some(metric))
            .await
    }

    async fn change_route(
        &self,
        add: bool,
        destination: IpNet,
        index: u32,
        table: u32,
        metric: Option<u32>,
    ) -> Result<()> {
        let mut msg = route_message(destination, index, table);
        if let Some(metric) = metric {
            msg.attributes.push(RouteAttribute::Priority(metric));
        }
        let result = if add {
            self.handle.route().add(msg).execute().await
        } else {
            self.handle.route().del(msg).execute().await
        };
        result.with_context(|| format!("cannot {} route {destination}", if add { "add" } else { "remove" }))
    }

    /// All routes of one family in all tables.
    pub async fn routes(&self, v6: bool) -> Result<Vec<Route>> {
        let query = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().table_id(0).build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().table_id(0).build()
        };
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .context("cannot list routes")?;
        Ok(msgs.into_iter().filter_map(parse_route).collect())
    }

    /// The policy rules of one family.
    pub async fn rules(&self, v6: bool) -> Result<Vec<Rule>> {
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        let msgs: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .context("cannot list policy rules")?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let priority = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RuleAttribute::Priority(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(0);
                let table = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RuleAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(m.header.table));
                Rule {
                    priority,
                    table,
                    message: m,
                }
            })
            .collect())
    }

    /// Adds a rule: at `priority`, packets (optionally only those arriving on
    /// `iif`, optionally only to `destination`) look up `table`.
    pub async fn add_rule(
        &self,
        v6: bool,
        priority: u32,
        table: u32,
        iif: Option<&str>,
        destination: Option<IpNet>,
    ) -> Result<()> {
        let mut req = self
            .handle
            .rule()
            .add()
            .priority(priority)
            .table_id(table)
            .action(RuleAction::ToTable);
        if let Some(iif) = iif {
            req = req.input_interface(iif);
        }
        let result = match (v6, destination) {
            (_, Some(IpNet::V4(n))) => req.v4().destination_prefix(n.addr(), n.prefix_len()).execute().await,
            (_, Some(IpNet::V6(n))) => req.v6().destination_prefix(n.addr(), n.prefix_len()).execute().await,
            (false, None) => req.v4().execute().await,
            (true, None) => req.v6().execute().await,
        };
        result.with_context(|| format!("cannot add policy rule {priority} (table {table})"))
    }

    /// Deletes a rule read with [`Self::rules`].
    pub async fn del_rule(&self, rule: &Rule) -> Result<()> {
        self.handle
            .rule()
            .del(rule.message.clone())
            .execute()
            .await
            .with_context(|| format!("cannot delete policy rule {}", rule.priority))
    }

    /// Removes `address/prefix` from interface `index`.
    pub async fn del_address(&self, index: u32, address: IpAddr, prefix: u8) -> Result<()> {
        let mut msgs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(address)
            .set_prefix_length_filter(prefix)
            .execute();
        while let Some(m) = msgs.try_next().await.context("cannot list addresses")? {
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .with_context(|| format!("cannot remove address {address}/{prefix}"))?;
        }
        Ok(())
    }

    /// Makes interface `index` answer neighbour solicitations for `address`
    /// (proxy ARP/NDP entry; needs `proxy_ndp` for IPv6).
    pub async fn add_proxy_neighbour(&self, index: u32, address: IpAddr) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, address)
            .flags(NeighbourFlags::Proxy)
            .execute()
            .await
            .with_context(|| format!("cannot add proxy neighbour entry for {address}"))
    }

    /// Removes a proxy entry added with [`Self::add_proxy_neighbour`].
    pub async fn del_proxy_neighbour(&self, index: u32, address: IpAddr) -> Result<()> {
        let mut add = self
            .handle
            .neighbours()
            .add(index, address)
            .flags(NeighbourFlags::Proxy);
        let msg = add.message_mut().clone();
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("cannot remove proxy neighbour entry for {address}"))
    }
}

fn route_message(destination: IpNet, index: u32, table: u32) -> RouteMessage {
    match destination {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .table_id(table)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .table_id(table)
            .build(),
    }
}

fn parse_route(m: RouteMessage) -> Option<Route> {
    let v6 = m.header.address_family == AddressFamily::Inet6;
    let mut dst: Option<IpAddr> = None;
    let (mut oif, mut gateway, mut table) = (None, None, u32::from(m.header.table));
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some((*ip).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some((*ip).into()),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some((*ip).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some((*ip).into()),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let dst = dst.unwrap_or(if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    });
    Some(Route {
        destination: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
        oif,
        gateway,
        table,
        kind: m.header.kind,
    })
}
