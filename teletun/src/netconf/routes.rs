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
    /// Networks the user asked for (`--route`): not held to the width limit.
    pub explicit: BTreeSet<IpNet>,
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
        if net.prefix_len() < shortest && !self.explicit.contains(net) {
            return Some(format!("it is wider than a /{shortest}, more than a cluster's network"));
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
        for net in wanted {
            match self.outside_reason(net) {
                Some(why) => plan.refused.push((*net, why)),
                None => {
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
    pub fn new(fixed: &[IpNet], never: Vec<IpAddr>, allow_conflicting: bool) -> Result<RouteKeeper> {
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
            let undo = p.plan(&BTreeSet::new(), &now, &lan());
            prop_assert_eq!(undo.remove.iter().copied().collect::<BTreeSet<_>>(), now);
        }
    }
}
