//! Links, addresses, routes and policy rules of one network namespace over
//! rtnetlink: a socket opened inside the namespace, so configuring a cluster
//! costs a message per change instead of an `ip` process per change.
//!
//! The testbench is synchronous; these calls block on one small runtime that
//! drives every socket's connection in the background.

use std::future::Future;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::LazyLock;

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::route::{RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, IpVersion, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Drives the connections of every namespace's socket.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("netlink")
        .enable_io()
        .build()
        .expect("a tokio runtime for netlink")
});

/// The table number that says "look in the RTA_TABLE attribute".
const RT_TABLE_COMPAT: u8 = 252;

/// A route's next hop.
#[derive(Clone, Copy, Debug)]
pub enum Via<'a> {
    /// A gateway address.
    Gateway(IpAddr),
    /// Straight out of an interface.
    Device(&'a str),
}

/// A netlink socket bound to one network namespace (clones share it).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

fn block<F: Future>(f: F) -> F::Output {
    RUNTIME.block_on(f)
}

impl Netlink {
    /// Opens a socket in the network namespace the calling thread is in.
    pub fn open_here() -> Result<Netlink> {
        let _runtime = RUNTIME.enter();
        let (connection, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
        RUNTIME.spawn(connection);
        Ok(Netlink { handle })
    }

    /// The index of link `name`.
    pub fn index(&self, name: &str) -> Result<u32> {
        block(async {
            let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
            match links.try_next().await {
                Ok(Some(link)) => Ok(link.header.index),
                Ok(None) => anyhow::bail!("no link {name}"),
                Err(e) => Err(e).with_context(|| format!("no link {name}")),
            }
        })
    }

    /// Sets link `name` up.
    pub fn set_up(&self, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_name(name).up().build();
        block(self.handle.link().set(msg).execute()).with_context(|| format!("cannot set {name} up"))
    }

    /// Creates a veth pair: `name` in the namespace of `ns_fd` and `peer` in the
    /// namespace of `peer_ns_fd` (names never meet in one namespace). Both are
    /// down: a veth end cannot come up before its peer exists (ENOTCONN).
    pub fn add_veth(&self, name: &str, ns_fd: RawFd, peer: &str, peer_ns_fd: RawFd) -> Result<()> {
        let peer_msg = LinkUnspec::new_with_name(peer).setns_by_fd(peer_ns_fd).build();
        let msg = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .setns_by_fd(ns_fd)
            .build();
        block(self.handle.link().add(msg).execute()).with_context(|| format!("cannot create veth pair {name} – {peer}"))
    }

    /// Sets link `name`'s MTU.
    pub fn set_mtu(&self, name: &str, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_name(name).mtu(mtu).build();
        block(self.handle.link().set(msg).execute()).with_context(|| format!("cannot set the MTU of {name}"))
    }

    /// Whether link `name` exists.
    pub fn has_link(&self, name: &str) -> bool {
        self.index(name).is_ok()
    }

    /// Creates bridge `name`, up.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        let msg = LinkBridge::new(name).up().build();
        block(self.handle.link().add(msg).execute()).with_context(|| format!("cannot create bridge {name}"))
    }

    /// Makes link `name` a port of bridge `bridge`.
    pub fn set_master(&self, name: &str, bridge: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_name(name).controller(self.index(bridge)?).build();
        block(self.handle.link().set(msg).execute()).with_context(|| format!("cannot add {name} to bridge {bridge}"))
    }

    /// Adds `address` (with its prefix) to link `name`; IPv6 without duplicate
    /// address detection, so it is usable at once.
    pub fn add_address(&self, name: &str, address: IpNet) -> Result<()> {
        let index = self.index(name)?;
        let mut req = self.handle.address().add(index, address.addr(), address.prefix_len());
        let msg = req.message_mut();
        // As `ip addr add` does: no broadcast address unless asked for.
        msg.attributes.retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        if address.addr().is_ipv6() {
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        block(req.execute()).with_context(|| format!("cannot add address {address} to {name}"))
    }

    /// Adds a route to `destination` via a gateway or out of a device, in the
    /// main table or `table`.
    pub fn add_route(&self, destination: IpNet, via: Via, table: Option<u32>) -> Result<()> {
        let oif = match via {
            Via::Device(dev) => Some(self.index(dev)?),
            Via::Gateway(_) => None,
        };
        let mut msg = match (destination, via) {
            (IpNet::V4(d), via) => {
                let mut b =
                    RouteMessageBuilder::<std::net::Ipv4Addr>::new().destination_prefix(d.addr(), d.prefix_len());
                if let Via::Gateway(IpAddr::V4(gw)) = via {
                    b = b.gateway(gw);
                }
                b.build()
            }
            (IpNet::V6(d), via) => {
                let mut b =
                    RouteMessageBuilder::<std::net::Ipv6Addr>::new().destination_prefix(d.addr(), d.prefix_len());
                if let Via::Gateway(IpAddr::V6(gw)) = via {
                    b = b.gateway(gw);
                }
                b.build()
            }
        };
        if let Via::Gateway(gw) = via {
            anyhow::ensure!(
                gw.is_ipv4() == destination.addr().is_ipv4(),
                "route {destination} via {gw}: mixed address families"
            );
        }
        // As `ip route add` does: protocol boot, link scope without a gateway.
        msg.header.protocol = RouteProtocol::Boot;
        if let Some(index) = oif {
            msg.header.scope = RouteScope::Link;
            msg.attributes.push(RouteAttribute::Oif(index));
        }
        if let Some(t) = table {
            msg.header.table = u8::try_from(t).unwrap_or(RT_TABLE_COMPAT);
            msg.attributes.push(RouteAttribute::Table(t));
        }
        block(self.handle.route().add(msg).execute()).with_context(|| format!("cannot add route {destination}"))
    }

    /// Deletes the main table's route to `destination`, whoever added it.
    pub fn del_route(&self, destination: IpNet) -> Result<()> {
        let mut msg = match destination {
            IpNet::V4(d) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .build(),
            IpNet::V6(d) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .build(),
        };
        // As `ip route del` does: match any protocol and scope.
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        block(self.handle.route().del(msg).execute()).with_context(|| format!("cannot delete route {destination}"))
    }

    /// Adds an IPv4 policy rule: packets arriving on `iif` look up `table`.
    pub fn add_rule(&self, priority: u32, iif: &str, table: u32) -> Result<()> {
        let req = self
            .handle
            .rule()
            .add()
            .v4()
            .priority(priority)
            .input_interface(iif)
            .table_id(table)
            .action(RuleAction::ToTable);
        block(req.execute()).with_context(|| format!("cannot add rule {priority}: iif {iif} lookup {table}"))
    }

    /// Deletes the IPv4 policy rules with `priority`.
    pub fn del_rule(&self, priority: u32) -> Result<()> {
        block(async {
            let rules: Vec<_> = self.handle.rule().get(IpVersion::V4).execute().try_collect().await?;
            for rule in rules {
                if rule.attributes.contains(&RuleAttribute::Priority(priority)) {
                    self.handle.rule().del(rule).execute().await?;
                }
            }
            Ok::<_, rtnetlink::Error>(())
        })
        .with_context(|| format!("cannot delete rule {priority}"))
    }
}
