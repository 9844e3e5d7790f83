//! Which of the machine's routes a cluster network would collide with: another
//! VPN's, the LAN's. Default routes and the `/1` halves VPNs use to override
//! them do not count (more specific routes win over them anyway), nor do
//! link-local, multicast or local-table routes, nor the tunnel's own routes.

use ipnet::IpNet;
use rtnetlink::packet_route::route::RouteType;

use super::netlink::{Route, TABLE_LOCAL};

fn counts(route: &Route, own_oif: Option<u32>) -> bool {
    let d = route.destination;
    let link_local = match d {
        IpNet::V4(n) => n.addr().is_link_local(),
        IpNet::V6(n) => n.addr().is_unicast_link_local(),
    };
    route.kind == RouteType::Unicast
        && route.table != TABLE_LOCAL
        && d.prefix_len() > 1
        && !link_local
        && !d.addr().is_multicast()
        && (own_oif.is_none() || route.oif != own_oif)
}

/// The existing routes each wanted network overlaps (either contains the other).
pub fn conflicts<'a>(existing: &'a [Route], wanted: &[IpNet], own_oif: Option<u32>) -> Vec<(IpNet, &'a Route)> {
    let mut out = Vec::new();
    for w in wanted {
        for r in existing.iter().filter(|r| counts(r, own_oif)) {
            let d = r.destination;
            if w.contains(&d.network()) || d.contains(&w.network()) {
                out.push((*w, r));
            }
        }
    }
    out
}

/// One line describing a route, as `ip route` would.
pub fn describe(route: &Route) -> String {
    let mut s = route.destination.to_string();
    if let Some(gw) = route.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(name) = route.oif.and_then(super::netlink::interface_name) {
        s.push_str(&format!(" dev {name}"));
    }
    if route.table != super::netlink::TABLE_MAIN {
        s.push_str(&format!(" table {}", route.table));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconf::netlink::TABLE_MAIN;

    fn route(dst: &str, oif: u32, table: u32, kind: RouteType) -> Route {
        Route {
            destination: dst.parse().unwrap(),
            oif: Some(oif),
            gateway: None,
            table,
            kind,
        }
    }

    #[test]
    fn finds_real_overlaps_only() {
        let existing = vec![
            route("0.0.0.0/0", 2, TABLE_MAIN, RouteType::Unicast),
            route("0.0.0.0/1", 7, TABLE_MAIN, RouteType::Unicast),
            route("128.0.0.0/1", 7, TABLE_MAIN, RouteType::Unicast),
            route("192.168.1.0/24", 2, TABLE_MAIN, RouteType::Unicast),
            route("10.96.0.0/24", 8, 51820, RouteType::Unicast),
            route("10.244.0.0/16", 9, TABLE_MAIN, RouteType::Unicast),
            route("10.244.1.5/32", 9, TABLE_LOCAL, RouteType::Local),
            route("fe80::/64", 2, TABLE_MAIN, RouteType::Unicast),
            route("ff00::/8", 2, TABLE_LOCAL, RouteType::Multicast),
        ];
        let wanted: Vec<IpNet> = ["10.96.0.0/16", "10.244.0.0/16", "172.16.0.0/12", "fd00::/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Interface 9 is our own tunnel.
        let found: Vec<(String, String)> = conflicts(&existing, &wanted, Some(9))
            .into_iter()
            .map(|(w, r)| (w.to_string(), r.destination.to_string()))
            .collect();
        assert_eq!(found, [("10.96.0.0/16".to_owned(), "10.96.0.0/24".to_owned())]);
        // A host route inside the LAN collides too; one containing it as well.
        let lan = conflicts(&existing, &["192.168.1.7/32".parse().unwrap()], None);
        assert_eq!(lan.len(), 1);
        assert_eq!(
            conflicts(&existing, &["192.168.0.0/16".parse().unwrap()], None).len(),
            1
        );
    }
}
