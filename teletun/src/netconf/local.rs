//! What is this machine's own, for the greeting check: its addresses and the
//! networks whose hosts are its neighbours.
//!
//! A network is on-link when the kernel reaches its hosts directly on a link
//! that resolves neighbours (ARP, neighbour discovery): a LAN's subnet, a
//! bridge's. A range routed into a TUN, WireGuard or PPP device (point-to-point
//! or `NOARP`) has no neighbours: it is another VPN's *routed* range, and a pod
//! address inside it belongs to nobody on this machine. Taking it on only
//! shadows one address of that VPN, which the route check
//! (`--allow-conflicting`) already speaks for.

use std::collections::HashSet;
use std::net::IpAddr;

use anyhow::Result;
use ipnet::IpNet;
use rtnetlink::packet_route::route::RouteType;

use super::netlink::{Netlink, Route, TABLE_MAIN};
use crate::proto::control::usable_unicast;

/// This machine's own addresses and the networks it reaches as neighbours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalNetworks {
    /// Every address of this machine (the `local` routes).
    pub addresses: Vec<IpAddr>,
    /// Networks reached without a gateway on a neighbour-resolving link.
    pub on_link: Vec<IpNet>,
}

impl LocalNetworks {
    /// Sorts `routes` (all tables, both families): `neighbour_links` are the
    /// indices of links that resolve neighbours; routes through interface
    /// `except` (our TUN, on a reconnection) do not count.
    pub fn from_routes(routes: &[Route], neighbour_links: &HashSet<u32>, except: Option<u32>) -> Self {
        let routes = routes.iter().filter(|r| except.is_none() || r.oif != except);
        let mut out = LocalNetworks::default();
        for r in routes {
            let d = r.destination;
            match r.kind {
                RouteType::Local => out.addresses.push(d.addr()),
                RouteType::Unicast
                    if r.table == TABLE_MAIN
                        && r.gateway.is_none()
                        && d.prefix_len() > 0
                        && usable_unicast(d.addr())
                        && r.oif.is_some_and(|i| neighbour_links.contains(&i)) =>
                {
                    out.on_link.push(d)
                }
                _ => {}
            }
        }
        out
    }

    /// Reads them from the kernel.
    pub async fn read(netlink: &Netlink, except: Option<u32>) -> Result<Self> {
        let mut routes = netlink.routes(false).await?;
        routes.extend(netlink.routes(true).await?);
        let links = netlink.neighbour_links().await?;
        Ok(Self::from_routes(&routes, &links, except))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(destination: &str, oif: u32, gateway: Option<&str>, kind: RouteType, table: u32) -> Route {
        Route {
            destination: destination.parse().unwrap(),
            oif: Some(oif),
            gateway: gateway.map(|g| g.parse().unwrap()),
            table,
            kind,
        }
    }

    const ETH: u32 = 2;
    const CORP_TUN: u32 = 7;
    const TEL: u32 = 9;

    /// A laptop on a home LAN whose corporate VPN routes 10.0.0.0/8 (and its
    /// own peer subnet) into a TUN device.
    fn laptop() -> Vec<Route> {
        vec![
            route("0.0.0.0/0", ETH, Some("192.168.1.1"), RouteType::Unicast, TABLE_MAIN),
            route("192.168.1.0/24", ETH, None, RouteType::Unicast, TABLE_MAIN),
            route("192.168.1.10/32", ETH, None, RouteType::Local, 255),
            route("10.0.0.0/8", CORP_TUN, None, RouteType::Unicast, TABLE_MAIN),
            route("10.8.0.0/24", CORP_TUN, None, RouteType::Unicast, TABLE_MAIN),
            route("10.8.0.2/32", CORP_TUN, None, RouteType::Local, 255),
            route(
                "172.20.0.0/16",
                ETH,
                Some("192.168.1.1"),
                RouteType::Unicast,
                TABLE_MAIN,
            ),
            route("10.244.1.5/32", TEL, None, RouteType::Local, 255),
            route("10.244.0.0/16", TEL, None, RouteType::Unicast, TABLE_MAIN),
            route("fd00:1::/64", ETH, None, RouteType::Unicast, TABLE_MAIN),
        ]
    }

    #[test]
    fn a_vpn_s_routed_range_is_not_on_link_but_its_addresses_are_this_machine_s() {
        let links = HashSet::from([ETH, TEL]);
        let found = LocalNetworks::from_routes(&laptop(), &links, None);
        let nets: Vec<String> = found.on_link.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["192.168.1.0/24", "10.244.0.0/16", "fd00:1::/64"]);
        let own: Vec<String> = found.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(own, ["192.168.1.10", "10.8.0.2", "10.244.1.5"]);
    }

    #[test]
    fn our_own_tun_does_not_count_on_a_reconnection() {
        let links = HashSet::from([ETH, TEL]);
        let found = LocalNetworks::from_routes(&laptop(), &links, Some(TEL));
        assert!(!found.on_link.iter().any(|n| n.to_string() == "10.244.0.0/16"));
        assert!(!found.addresses.iter().any(|a| a.to_string() == "10.244.1.5"));
    }

    #[test]
    fn a_route_without_an_interface_is_not_on_link() {
        let mut r = route("10.1.0.0/16", ETH, None, RouteType::Unicast, TABLE_MAIN);
        r.oif = None;
        let found = LocalNetworks::from_routes(&[r], &HashSet::from([ETH]), None);
        assert!(found.on_link.is_empty());
    }
}
