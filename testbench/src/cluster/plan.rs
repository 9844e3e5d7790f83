//! A cluster's addresses and names, computed, never configured: the same plan
//! gives the same networks on every run. A second cluster on the same laptop
//! gets index 1 and different networks and domain throughout.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The port server-external listens on.
pub const SERVER_PORT: u16 = 8443;
/// Echo ports on the app pods.
pub const ECHO_PORT: u16 = 7007;
/// HTTP port on the app pods.
pub const HTTP_PORT: u16 = 8080;

/// The nodes' own DNS search domain (a cloud provider's, say), which
/// kubelet appends to every pod's search list.
pub const NODE_DOMAIN: &str = "nodes.internal";

/// The home LAN's domain (the LAN resolver's own names).
pub const LAN_DOMAIN: &str = "home.arpa";

/// The home LAN (only the first cluster's uplink has one): the laptop, the
/// home router (gateway, NAT, resolver) and a NAS, on 192.168.1.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HomeLan;

impl HomeLan {
    /// The laptop's address, as DHCP gave it.
    pub fn laptop_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 1, 10)
    }
    /// The home router: gateway and resolver.
    pub fn router_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 1, 1)
    }
    /// A LAN host the resolver knows (`nas.home.arpa`); nothing listens there.
    pub fn nas_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 1, 20)
    }
    /// A name "on the internet" the home router's resolver answers, as it
    /// would by forwarding: `www.example.com` (RFC 2606 names only).
    pub fn internet_name(self) -> (&'static str, Ipv4Addr) {
        ("www.example.com", Ipv4Addr::new(198, 51, 100, 80))
    }
}

/// The address plan of one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// 0 for the first cluster ("a"), 1 for the second ("b"), …
    pub index: u8,
}

fn v4(addr: Ipv4Addr, prefix: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(addr, prefix).expect("a valid IPv4 prefix"))
}

fn v6(addr: Ipv6Addr, prefix: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new(addr, prefix).expect("a valid IPv6 prefix"))
}

impl Plan {
    /// The cluster's name in scenario files: a, b, …
    pub fn name(self) -> String {
        char::from(b'a' + self.index).to_string()
    }

    /// Pod `host` on node `k`, IPv4.
    pub fn pod_v4(self, k: u8, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244 + self.index, k, host)
    }

    /// Pod `host` on node `k`, IPv6.
    pub fn pod_v6(self, k: u8, host: u8) -> Ipv6Addr {
        let i = u16::from(self.index);
        Ipv6Addr::new(0xfd00, 0x10, 0x244 + i, u16::from(k), 0, 0, 0, u16::from(host))
    }

    /// Node `k`'s pod networks: IPv4 and IPv6.
    pub fn pod_cidrs(self, k: u8) -> [IpNet; 2] {
        [v4(self.pod_v4(k, 0), 24), v6(self.pod_v6(k, 0), 64)]
    }

    /// Service cluster IP `host`.
    pub fn service_ip(self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 96 + self.index, 0, host)
    }

    /// The service network.
    pub fn service_cidr(self) -> IpNet {
        v4(self.service_ip(0), 16)
    }

    /// Node `k`'s underlay address.
    pub fn node_ip(self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113 + self.index, 10 + k)
    }

    /// Node `k`'s IPv6 address between nodes.
    pub fn node_ip6(self, k: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x203 + u16::from(self.index), 0, 0, 0, 0, 0, u16::from(10 + k))
    }

    /// The node's address in its pod networks (the pods' gateway).
    pub fn gateways(self, k: u8) -> (Ipv4Addr, Ipv6Addr) {
        (self.pod_v4(k, 1), self.pod_v6(k, 1))
    }

    /// The router's address on the node bridge.
    pub fn router_nodes_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113 + self.index, 1)
    }

    /// The router's IPv6 address on the node bridge (given only to a flood
    /// from an IPv6 prefix).
    pub fn router_nodes_ip6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x203 + u16::from(self.index), 0, 0, 0, 0, 0, 1)
    }

    /// The network of the node bridge.
    pub fn nodes_net(self) -> IpNet {
        v4(self.router_nodes_ip(), 24).trunc()
    }

    /// The addresses on the link into the router: the laptop's (or, behind a
    /// home LAN, its home router's WAN side) and the router's.
    pub fn laptop_link(self) -> (Ipv4Addr, Ipv4Addr) {
        (
            Ipv4Addr::new(198, 51, 100 + self.index, 2),
            Ipv4Addr::new(198, 51, 100 + self.index, 1),
        )
    }

    /// The laptop's uplink to this cluster's router.
    pub fn uplink(self) -> String {
        format!("eth{}", self.index)
    }

    /// The cluster's DNS domain.
    pub fn domain(self) -> String {
        if self.index == 0 {
            "cluster.local".into()
        } else {
            format!("cluster-{}.local", self.name())
        }
    }

    /// What a client routes without a Kubernetes API.
    pub fn static_routes(self) -> [IpNet; 3] {
        [
            v4(Ipv4Addr::new(10, 244 + self.index, 0, 0), 16),
            self.service_cidr(),
            v6(self.pod_v6(0, 0), 48),
        ]
    }

    /// The cluster DNS service's IP.
    pub fn dns_ip(self) -> Ipv4Addr {
        self.service_ip(10)
    }

    /// The resolv.conf a pod of this cluster gets: as kubelet writes it, with
    /// the node's own search domain after the cluster's (pods inherit it).
    pub fn pod_resolv_conf(self) -> String {
        let (dns, d) = (self.dns_ip(), self.domain());
        format!("nameserver {dns}\nsearch default.svc.{d} svc.{d} {d} {NODE_DOMAIN}\noptions ndots:5\n")
    }
}

/// A name unique to this run: `tt<pid>-<6 hex digits>`, the prefix of its
/// namespaces' names (a later run removes those of a dead pid).
pub fn unique_id() -> String {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("tt{}-{:02x}{:02x}{:02x}", std::process::id(), b[0], b[1], b[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cluster_has_the_documented_addresses() {
        let a = Plan { index: 0 };
        assert_eq!(a.name(), "a");
        assert_eq!(a.pod_v4(1, 5).to_string(), "10.244.1.5");
        assert_eq!(HomeLan.laptop_ip().to_string(), "192.168.1.10");
        assert!(!a
            .static_routes()
            .iter()
            .any(|r| r.contains(&std::net::IpAddr::from(HomeLan.laptop_ip()))));
        assert_eq!(a.pod_v6(1, 5).to_string(), "fd00:10:244:1::5");
        assert_eq!(
            a.pod_cidrs(2).map(|c| c.to_string()),
            ["10.244.2.0/24", "fd00:10:244:2::/64"]
        );
        assert_eq!(a.service_cidr().to_string(), "10.96.0.0/16");
        assert_eq!(a.dns_ip().to_string(), "10.96.0.10");
        assert_eq!(a.node_ip(1).to_string(), "203.0.113.11");
        assert_eq!(a.node_ip6(2).to_string(), "fd00:203::c");
        assert_eq!(
            a.gateways(1),
            ("10.244.1.1".parse().unwrap(), "fd00:10:244:1::1".parse().unwrap())
        );
        assert_eq!(a.nodes_net().to_string(), "203.0.113.0/24");
        assert_eq!(a.laptop_link().0.to_string(), "198.51.100.2");
        assert_eq!(a.uplink(), "eth0");
        assert_eq!(a.domain(), "cluster.local");
        assert_eq!(
            a.static_routes().map(|c| c.to_string()),
            ["10.244.0.0/16", "10.96.0.0/16", "fd00:10:244::/48"]
        );
        assert_eq!(
            a.pod_resolv_conf(),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local nodes.internal\noptions ndots:5\n"
        );
    }

    #[test]
    fn a_second_cluster_shares_no_network_or_domain() {
        let (a, b) = (Plan { index: 0 }, Plan { index: 1 });
        assert_eq!(b.name(), "b");
        assert_eq!(b.domain(), "cluster-b.local");
        assert_eq!(b.uplink(), "eth1");
        for (x, y) in a.static_routes().iter().zip(b.static_routes().iter()) {
            assert!(!x.contains(y) && !y.contains(x), "{x} and {y} overlap");
        }
        assert_ne!(a.nodes_net(), b.nodes_net());
        assert_ne!(a.laptop_link(), b.laptop_link());
        assert_eq!(b.pod_v4(1, 5).to_string(), "10.245.1.5");
    }

    #[test]
    fn run_ids_name_their_process() {
        let id = unique_id();
        let (pid, hex) = id.strip_prefix("tt").unwrap().split_once('-').unwrap();
        assert_eq!(pid, std::process::id().to_string());
        assert!(hex.len() == 6 && hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
