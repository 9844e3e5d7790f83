//! The client's routes into the tunnel: a pure planner (what is wanted, what is
//! installed, what this machine already routes → what to add and remove, and
//! what to refuse and why) and the keeper that applies its plans over
//! rtnetlink as the cluster's networks change.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{bail, Result};
use ipnet::IpNet;
use tracing::{info, warn};

use super::netlink::{Netlink, Route};
use super::overlap;

/// The shortest prefixes routed into the tunnel from the Kubernetes API: a
/// cluster network wider than a /8 (IPv4) or a /16 (IPv6) would swallow much
/// of the internet, whatever the API says (`--route` may still ask for one).
pub const SHORTEST_V4: u8 = 8;
/// See [`SHORTEST_V4`].
pub const SHORTEST_V6: u8 = 16;

/// The most networks routed from the Kubernetes API: far more than a
/// cluster's node podCIDRs and ServiceCIDRs (or, without those, its pods'
/// addresses), few enough that a broken or hostile API cannot fill the
/// routing table.
pub const MAX_CLUSTER_NETWORKS: usize = 16384;

/// Address space no public host has: RFC 1918, the shared space of RFC 6598
/// (`100.64.0.0/10`, which some CNIs use), the benchmarking range
/// `198.18.0.0/15`, and IPv6 unique local addresses (`fc00::/7`).
pub const PRIVATE_USE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "198.18.0.0/15",
    "fc00::/7",
];

/// Whether all of `net` lies in [`PRIVATE_USE`] space.
pub fn private_use(net: &IpNet) -> bool {
    PRIVATE_USE
        .iter()
        .filter_map(|p| p.parse::<IpNet>().ok())
        .any(|p| p.contains(net))
}

/// Why this machine must not take on `ip` as the pod's address, if so: it is
/// the tunnel endpoint's or the Kubernetes API's (`never`: both would become
/// unreachable), or a public address (`allow_public` false: its traffic would
/// stay on this machine instead of reaching the internet).
pub fn pod_address_reason(ip: IpAddr, never: &[IpAddr], allow_public: bool) -> Option<String> {
    if never.contains(&ip) {
        return Some(format!("{ip} is the tunnel endpoint's or the Kubernetes API's address"));
    }
    if !allow_public && !private_use(&IpNet::from(ip)) {
        return Some(format!(
            "{ip} is a public address: this machine would keep its traffic to that host; --allow-public-networks takes it on anyway"
        ));
    }
    None
}

/// What decides which networks may go into the tunnel.
#[derive(Clone, Debug, Default)]
pub struct RoutePolicy {
    /// Addresses that must stay outside (the tunnel endpoint, the API server).
    pub never: Vec<IpAddr>,
    /// Whether the tunnel has an IPv6 address (else IPv6 networks stay out).
    pub with_v6: bool,
    /// Route networks that overlap this machine's routes anyway.
    pub allow_conflicting: bool,
    /// The tunnel's interface index (its own routes never conflict).
    pub own_index: Option<u32>,
    /// Networks the user asked for (`--route`): not held to the width,
    /// private-use or count limits.
    pub explicit: BTreeSet<IpNet>,
    /// Route public networks from the API too (`--allow-public-networks`).
    pub allow_public: bool,
}

/// What to change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Routes to add.
    pub add: Vec<IpNet>,
    /// Routes to remove.
    pub remove: Vec<IpNet>,
    /// Wanted networks left out, and why.
    pub refused: Vec<(IpNet, String)>,
}

impl RoutePolicy {
    /// Why `net` must not go into the tunnel whatever else is routed, if so.
    pub fn outside_reason(&self, net: &IpNet) -> Option<String> {
        if let Some(ip) = self.never.iter().find(|ip| net.contains(*ip)) {
            return Some(format!("it contains {ip}, the tunnel endpoint or the Kubernetes API"));
        }
        let shortest = if net.addr().is_ipv4() { SHORTEST_V4 } else { SHORTEST_V6 };
        let explicit = self.explicit.contains(net);
        if net.prefix_len() < shortest && !explicit {
            return Some(format!("it is wider than a /{shortest}, more than a cluster's network"));
        }
        if !explicit && !self.allow_public && !private_use(net) {
            return Some(format!(
                "it holds public addresses, whose traffic stays on the internet; --route {net} or --allow-public-networks routes it"
            ));
        }
        if net.addr().is_ipv6() && !self.with_v6 {
            return Some("the pod has no IPv6 address".into());
        }
        None
    }

    /// The plan that takes the tunnel from `installed` to `wanted`, given
    /// this machine's other routes `existing`. Pure: applying it and planning
    /// again gives an empty plan.
    pub fn plan(&self, wanted: &BTreeSet<IpNet>, installed: &BTreeSet<IpNet>, existing: &[Route]) -> RoutePlan {
        let mut plan = RoutePlan::default();
        let mut keep = BTreeSet::new();
        let mut from_cluster = 0;
        for net in wanted {
            let counted = !self.explicit.contains(net);
            match self.outside_reason(net) {
                Some(why) => plan.refused.push((*net, why)),
                None if counted && from_cluster >= MAX_CLUSTER_NETWORKS => plan.refused.push((
                    *net,
                    format!("the cluster names more than {MAX_CLUSTER_NETWORKS} networks; the rest are not routed"),
                )),
                None => {
                    from_cluster += usize::from(counted);
                    keep.insert(*net);
                }
            }
        }
        let new: Vec<IpNet> = keep.difference(installed).copied().collect();
        let conflicts = if self.allow_conflicting {
            Vec::new()
        } else {
            overlap::conflicts(existing, &new, self.own_index)
        };
        for net in new {
            match conflicts.iter().find(|(c, _)| *c == net) {
                Some((_, route)) => plan.refused.push((
                    net,
                    format!(
                        "it overlaps {} (another VPN or the LAN); --allow-conflicting routes it anyway",
                        overlap::describe(route)
                    ),
                )),
                None => plan.add.push(net),
            }
        }
        plan.remove = installed.difference(&keep).copied().collect();
        plan
    }
}

/// Keeps the tunnel's routes in step with the wanted networks.
pub struct RouteKeeper {
    netlink: Netlink,
    policy: RoutePolicy,
    fixed: BTreeSet<IpNet>,
    installed: BTreeSet<IpNet>,
    warned: BTreeSet<IpNet>,
}

impl RouteKeeper {
    /// Routes `fixed` always, plus what [`Self::sync`] is given; never a
    /// network containing one of `never`.
    pub fn new(
        fixed: &[IpNet],
        never: Vec<IpAddr>,
        allow_conflicting: bool,
        allow_public: bool,
    ) -> Result<RouteKeeper> {
        for route in fixed {
            if let Some(ip) = never.iter().find(|ip| route.contains(*ip)) {
                bail!("route {route} contains {ip}, which must stay outside the tunnel (the tunnel endpoint or the Kubernetes API)");
            }
        }
        Ok(RouteKeeper {
            netlink: Netlink::connect()?,
            policy: RoutePolicy {
                never,
                allow_conflicting,
                explicit: fixed.iter().copied().collect(),
                allow_public,
                ..RoutePolicy::default()
            },
            fixed: fixed.iter().copied().collect(),
            installed: BTreeSet::new(),
            warned: BTreeSet::new(),
        })
    }

    async fn existing_routes(&self) -> Result<Vec<Route>> {
        let mut all = self.netlink.routes(false).await?;
        all.extend(self.netlink.routes(true).await?);
        Ok(all)
    }

    /// Refuses, before anything changes, networks that overlap existing routes.
    pub async fn check_conflicts(&self, cluster: &BTreeSet<IpNet>) -> Result<()> {
        if self.policy.allow_conflicting {
            return Ok(());
        }
        // Whether the pod has IPv6 is not known yet: check those networks too.
        let policy = RoutePolicy {
            with_v6: true,
            ..self.policy.clone()
        };
        let wanted: Vec<IpNet> = self
            .fixed
            .iter()
            .chain(cluster)
            .filter(|n| policy.outside_reason(n).is_none())
            .copied()
            .collect();
        let existing = self.existing_routes().await?;
        if let Some((net, route)) = overlap::conflicts(&existing, &wanted, None).first() {
            bail!(
                "the cluster network {net} overlaps this machine's route {} (another VPN or the LAN?): \
                 refusing to route it; pass --allow-conflicting to route it anyway",
                overlap::describe(route)
            );
        }
        Ok(())
    }

    /// The tunnel exists now: its index, and whether it has IPv6.
    pub fn attach(&mut self, index: u32, with_v6: bool) {
        self.policy.own_index = Some(index);
        self.policy.with_v6 = with_v6;
    }

    /// Makes the tunnel's routes the fixed ones plus `cluster`.
    pub async fn sync(&mut self, cluster: &BTreeSet<IpNet>) -> Result<()> {
        let Some(index) = self.policy.own_index else {
            bail!("no tunnel to route into yet");
        };
        let wanted: BTreeSet<IpNet> = self.fixed.union(cluster).copied().collect();
        // Only new networks are checked against this machine's routes.
        let fresh = wanted.difference(&self.installed).next().is_some();
        let existing = if fresh && !self.policy.allow_conflicting {
            self.existing_routes().await?
        } else {
            Vec::new()
        };
        let plan = self.policy.plan(&wanted, &self.installed, &existing);
        for (net, why) in &plan.refused {
            if self.warned.insert(*net) {
                warn!("not routing {net}: {why}");
            }
        }
        for net in plan.add {
            self.netlink.add_route(net, index).await?;
            self.installed.insert(net);
            info!("routing {net} into the tunnel");
        }
        for net in plan.remove {
            self.netlink.del_route(net, index).await?;
            self.installed.remove(&net);
            info!("no longer routing {net}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netconf::netlink::TABLE_MAIN;
    use proptest::prelude::*;
    use rtnetlink::packet_route::route::RouteType;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn set(nets: &[&str]) -> BTreeSet<IpNet> {
        nets.iter().map(|s| net(s)).collect()
    }

    fn lan() -> Vec<Route> {
        vec![Route {
            destination: net("192.168.1.0/24"),
            // No interface: `describe` would name this machine's interface 2.
            oif: None,
            gateway: None,
            table: TABLE_MAIN,
            kind: RouteType::Unicast,
        }]
    }

    fn policy() -> RoutePolicy {
        RoutePolicy {
            never: vec!["203.0.113.11".parse().unwrap()],
            with_v6: false,
            allow_conflicting: false,
            own_index: Some(9),
            explicit: set(&["64.0.0.0/2"]),
            allow_public: false,
        }
    }

    #[test]
    fn plans_adds_removals_and_refusals_with_reasons() {
        let wanted = set(&[
            "10.96.0.0/12",
            "10.244.1.0/24",
            "192.168.1.0/25",
            "203.0.113.0/24",
            "1.0.0.0/1",
            "fd00::/64",
            "64.0.0.0/2",
            "8.8.8.8/32",
        ]);
        let installed = set(&["10.244.1.0/24", "10.245.0.0/16"]);
        let plan = policy().plan(&wanted, &installed, &lan());
        // A wide network the user asked for goes in.
        assert_eq!(plan.add, vec![net("10.96.0.0/12"), net("64.0.0.0/2")]);
        assert_eq!(plan.remove, vec![net("10.245.0.0/16")]);
        let refused: Vec<(String, &str)> = plan
            .refused
            .iter()
            .map(|(n, why)| (n.to_string(), why.split(',').next().unwrap()))
            .collect();
        assert_eq!(
            refused,
            [
                ("1.0.0.0/1".into(), "it is wider than a /8"),
                ("8.8.8.8/32".into(), "it holds public addresses"),
                ("203.0.113.0/24".into(), "it contains 203.0.113.11"),
                ("fd00::/64".into(), "the pod has no IPv6 address"),
                (
                    "192.168.1.0/25".into(),
                    "it overlaps 192.168.1.0/24 (another VPN or the LAN); --allow-conflicting routes it anyway"
                ),
            ]
        );
        // Allowed to conflict: the LAN overlap goes in; the others stay out.
        let plan = RoutePolicy {
            allow_conflicting: true,
            ..policy()
        }
        .plan(&wanted, &installed, &lan());
        assert_eq!(
            plan.add,
            vec![net("10.96.0.0/12"), net("64.0.0.0/2"), net("192.168.1.0/25")]
        );
    }

    #[test]
    fn public_networks_need_the_user_s_word() {
        let wanted = set(&["8.8.8.0/24", "100.64.0.0/16", "2001:db8::/64", "fd00:1::/64"]);
        let with_v6 = RoutePolicy {
            with_v6: true,
            ..policy()
        };
        let plan = with_v6.plan(&wanted, &BTreeSet::new(), &[]);
        assert_eq!(plan.add, vec![net("100.64.0.0/16"), net("fd00:1::/64")]);
        assert!(plan.refused.iter().all(|(_, why)| why.contains("--route")));
        let plan = RoutePolicy {
            allow_public: true,
            ..with_v6
        }
        .plan(&wanted, &BTreeSet::new(), &[]);
        assert_eq!(plan.add.len(), 4);
    }

    #[test]
    fn a_cluster_naming_too_many_networks_gets_a_bounded_table() {
        let wanted: BTreeSet<IpNet> = (0..MAX_CLUSTER_NETWORKS as u32 + 10)
            .map(|i| IpNet::from(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))))
            .chain([net("64.0.0.0/2")])
            .collect();
        let plan = policy().plan(&wanted, &BTreeSet::new(), &[]);
        assert_eq!(
            plan.add.len(),
            MAX_CLUSTER_NETWORKS + 1,
            "the cap and the user's own route"
        );
        assert!(plan.add.contains(&net("64.0.0.0/2")));
        assert_eq!(plan.refused.len(), 10);
        assert!(plan.refused[0].1.contains("more than 16384 networks"));
    }

    #[test]
    fn a_pod_address_must_be_private_and_not_the_endpoint() {
        let never: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let reason = |ip: &str, public| pod_address_reason(ip.parse().unwrap(), &never, public);
        assert_eq!(reason("10.244.1.5", false), None);
        assert_eq!(reason("fd00:10:244:1::5", false), None);
        assert!(reason("1.1.1.1", false).unwrap().contains("public address"));
        assert!(reason("2001:4860:4860::8888", false)
            .unwrap()
            .contains("public address"));
        assert_eq!(reason("1.1.1.1", true), None);
        assert!(reason("10.0.0.1", true).unwrap().contains("tunnel endpoint"));
    }

    fn nets() -> impl Strategy<Value = BTreeSet<IpNet>> {
        proptest::collection::btree_set(
            (0u8..4, 0u8..4, 0usize..5).prop_map(|(a, b, p)| {
                let prefix = [1u8, 12, 16, 24, 32][p];
                IpNet::new(IpAddr::from([10 + a * 50, b * 60, 0, 0]), prefix)
                    .unwrap()
                    .trunc()
            }),
            0..8,
        )
    }

    proptest! {
        /// Applying a plan and planning again changes nothing; what is
        /// installed is exactly what was wanted less what was refused; an
        /// endpoint is never routed; the inverse (want nothing) removes all.
        #[test]
        fn plans_converge_and_undo(wanted in nets(), installed in nets()) {
            let p = policy();
            let plan = p.plan(&wanted, &installed, &lan());
            let mut now = installed.clone();
            now.extend(plan.add.iter().copied());
            for n in &plan.remove {
                now.remove(n);
            }
            let refused: BTreeSet<IpNet> = plan.refused.iter().map(|(n, _)| *n).collect();
            let expected: BTreeSet<IpNet> = wanted.difference(&refused).copied().collect();
            prop_assert_eq!(&now, &expected);
            let again = p.plan(&wanted, &now, &lan());
            prop_assert!(again.add.is_empty() && again.remove.is_empty());
            prop_assert!(now.iter().all(|n| !p.never.iter().any(|ip| n.contains(ip))));
            prop_assert!(now.iter().all(|n| n.prefix_len() >= SHORTEST_V4 || p.explicit.contains(n)));
            prop_assert!(now.iter().all(|n| private_use(n) || p.explicit.contains(n)));
            let undo = p.plan(&BTreeSet::new(), &now, &lan());
            prop_assert_eq!(undo.remove.iter().copied().collect::<BTreeSet<_>>(), now);
        }
    }
}
