//! The cluster's network: namespaces joined by veth pairs and bridges, their
//! addresses, routes and forwarding, all set over netlink:
//!
//! ```text
//! laptop eth0 ── lan0 home wan0 ── to-laptop router "nodes" bridge ── to-nodeK ── eth0 nodeK br0 ── v-POD ── eth0 POD
//!   (without a home LAN, or for another cluster: laptop ethN ── to-laptop router)
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};
use ipnet::IpNet;

use super::plan::{HomeLan, Plan};
use crate::netlink::Via;
use crate::netns::{self, Netns};

/// A pod: a namespace with `eth0` on its node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Kubernetes-style name.
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Pod IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Pod IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The node it runs on (1, 2, …).
    pub node: u8,
}

/// A node: a namespace with `eth0` on the router's node bridge (its underlay
/// address) and `br0` for its pods (its pod networks).
#[derive(Clone, Debug)]
pub struct NodeNet {
    /// `node1`, `node2`, …
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// 1, 2, …
    pub index: u8,
    /// Its cluster's address plan.
    pub plan: Plan,
}

impl NodeNet {
    /// Underlay IPv4 address (reachable from the laptop through the router).
    pub fn ip(&self) -> Ipv4Addr {
        self.plan.node_ip(self.index)
    }

    /// Underlay IPv6 address (between nodes only).
    pub fn ip6(&self) -> Ipv6Addr {
        self.plan.node_ip6(self.index)
    }

    /// Pod networks: IPv4 and IPv6.
    pub fn pod_cidrs(&self) -> [IpNet; 2] {
        self.plan.pod_cidrs(self.index)
    }

    /// The node's own address in each pod network (the pods' gateway).
    pub fn gateways(&self) -> (Ipv4Addr, Ipv6Addr) {
        self.plan.gateways(self.index)
    }
}

fn net(addr: impl Into<std::net::IpAddr>, prefix: u8) -> IpNet {
    IpNet::new(addr.into(), prefix).expect("a valid prefix")
}

fn default_route(v6: bool) -> IpNet {
    if v6 {
        net(Ipv6Addr::UNSPECIFIED, 0)
    } else {
        net(Ipv4Addr::UNSPECIFIED, 0)
    }
}

/// Joins `edge` (the laptop, or its home router) to `router` over `edge_if`
/// for `plan`, and gives the router its bridge for the nodes. The first
/// cluster's router is the edge's default route; another cluster's only routes
/// its nodes' network.
pub fn wire_router(edge: &Netns, edge_if: &str, router: &Netns, plan: Plan) -> Result<()> {
    let (edge_ip, router_ip) = plan.laptop_link();
    netns::veth(edge, edge_if, router, "to-laptop")?;
    let on_edge = edge.netlink()?;
    on_edge.add_address(edge_if, net(edge_ip, 24))?;
    let towards = if plan.index == 0 {
        default_route(false)
    } else {
        plan.nodes_net()
    };
    on_edge.add_route(towards, Via::Gateway(router_ip.into()), None)?;
    let on_router = router.netlink()?;
    on_router.add_address("to-laptop", net(router_ip, 24))?;
    on_router.add_bridge("nodes")?;
    on_router.add_address("nodes", net(plan.router_nodes_ip(), 24))?;
    router.sysctl("net.ipv4.ip_forward", "1")
}

/// The home router's interfaces: towards the laptop, and towards the internet.
pub const HOME_LAN_IF: &str = "lan0";
/// The home router's WAN interface.
pub const HOME_WAN_IF: &str = "wan0";

/// Puts the laptop on the home LAN: `eth0` with the address DHCP would give,
/// the home router as its gateway, and the home router masquerading what it
/// forwards to the internet (with `udp_timeout` as its UDP conntrack timeout).
pub fn wire_home(laptop: &Netns, home: &Netns, lan: HomeLan, udp_timeout: Option<u32>, dir: &Path) -> Result<()> {
    netns::veth(laptop, "eth0", home, HOME_LAN_IF)?;
    let on_laptop = laptop.netlink()?;
    on_laptop.add_address("eth0", net(lan.laptop_ip(), 24))?;
    on_laptop.add_route(default_route(false), Via::Gateway(lan.router_ip().into()), None)?;
    home.netlink()?.add_address(HOME_LAN_IF, net(lan.router_ip(), 24))?;
    home.sysctl("net.ipv4.ip_forward", "1")?;
    let nat = format!(
        "table ip home-nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n    \
         oifname \"{HOME_WAN_IF}\" masquerade\n  }}\n}}\n"
    );
    let file = dir.join("home-nat.nft");
    std::fs::write(&file, nat).with_context(|| format!("cannot write {}", file.display()))?;
    home.run("nft", &["-f", &file.to_string_lossy()])
        .context("cannot install the home router's NAT (is nftables installed?)")?;
    if let Some(seconds) = udp_timeout {
        // Exists once NAT has loaded conntrack in the namespace.
        home.sysctl("net.netfilter.nf_conntrack_udp_timeout", &seconds.to_string())?;
        home.sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", &seconds.to_string())?;
    }
    Ok(())
}

/// The /64 a flood from an IPv6 prefix takes its source addresses from
/// (documentation space).
pub fn stranger_prefix() -> ipnet::Ipv6Net {
    ipnet::Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0), 64).expect("a valid prefix")
}

/// Gives the router an IPv6 address on the node bridge and every address of
/// [`stranger_prefix`] (a local route, non-local binds allowed), and node `n`
/// a route back to that prefix through it.
pub fn wire_stranger_prefix(router: &Netns, n: &NodeNet) -> Result<()> {
    let router_ip6 = n.plan.router_nodes_ip6();
    let prefix = stranger_prefix().to_string();
    // nodad: usable at once, not after duplicate address detection.
    router.run(
        "ip",
        &[
            "-6",
            "addr",
            "replace",
            &format!("{router_ip6}/64"),
            "dev",
            "nodes",
            "nodad",
        ],
    )?;
    router.run("ip", &["-6", "route", "replace", "local", &prefix, "dev", "lo"])?;
    router.sysctl("net.ipv6.ip_nonlocal_bind", "1")?;
    n.ns.run(
        "ip",
        &["-6", "route", "replace", &prefix, "via", &router_ip6.to_string()],
    )?;
    Ok(())
}

/// Wires node `n`: underlay on the router's bridge, a bridge for its pods,
/// forwarding, and routes to and from the pods of every node in `others`.
/// The router never learns pod networks: the laptop reaches them only through
/// the tunnel.
pub fn wire_node(router: &Netns, n: &NodeNet, others: &[NodeNet]) -> Result<()> {
    let uplink = format!("to-{}", n.name);
    netns::veth(router, &uplink, &n.ns, "eth0")?;
    router.netlink()?.set_master(&uplink, "nodes")?;
    let on_node = n.ns.netlink()?;
    on_node.add_address("eth0", net(n.ip(), 24))?;
    on_node.add_address("eth0", net(n.ip6(), 64))?;
    on_node.add_route(
        default_route(false),
        Via::Gateway(n.plan.router_nodes_ip().into()),
        None,
    )?;
    let (gw4, gw6) = n.gateways();
    on_node.add_bridge("br0")?;
    on_node.add_address("br0", net(gw4, 24))?;
    on_node.add_address("br0", net(gw6, 64))?;
    n.ns.sysctl("net.ipv4.ip_forward", "1")?;
    n.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    // Bridged replies must pass conntrack to be un-NATed (the service hairpin).
    n.ns.sysctl("net.bridge.bridge-nf-call-iptables", "1")
        .context("bridged traffic must pass netfilter for the service hairpin (br_netfilter)")?;
    for other in others.iter().filter(|o| o.index != n.index) {
        let on_other = other.ns.netlink()?;
        let ([theirs4, theirs6], [mine4, mine6]) = (other.pod_cidrs(), n.pod_cidrs());
        on_node.add_route(theirs4, Via::Gateway(other.ip().into()), None)?;
        on_node.add_route(theirs6, Via::Gateway(other.ip6().into()), None)?;
        on_other.add_route(mine4, Via::Gateway(n.ip().into()), None)?;
        on_other.add_route(mine6, Via::Gateway(n.ip6().into()), None)?;
    }
    Ok(())
}

/// The other nodes forget the pod networks of node `gone`.
pub fn unroute_node(others: &[NodeNet], gone: &NodeNet) -> Result<()> {
    for other in others {
        let on_other = other.ns.netlink()?;
        for cidr in gone.pod_cidrs() {
            on_other.del_route(cidr)?;
        }
    }
    Ok(())
}

/// Wires `pod` onto its node's bridge with its addresses and default routes.
pub fn wire_pod(node: &NodeNet, pod: &Pod) -> Result<()> {
    let host_side = format!("v-{}", pod.name);
    netns::veth(&pod.ns, "eth0", &node.ns, &host_side)?;
    node.ns.netlink()?.set_master(&host_side, "br0")?;
    let on_pod = pod.ns.netlink()?;
    on_pod.add_address("eth0", net(pod.ipv4, 24))?;
    on_pod.add_address("eth0", net(pod.ipv6, 64))?;
    let (gw4, gw6) = node.gateways();
    on_pod.add_route(default_route(false), Via::Gateway(gw4.into()), None)?;
    on_pod.add_route(default_route(true), Via::Gateway(gw6.into()), None)
}
