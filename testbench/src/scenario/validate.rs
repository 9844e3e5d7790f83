//! Checks that need the whole case: every pod, service, node, client, cluster
//! and profile a step names exists by then (the cluster's own, or made by an
//! earlier step), and every step fits the topology. Run at load, before any
//! namespace exists, so a typo costs nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::schema::*;
use super::values::{is_dns_label, Answer, Place, Process, Role, Target};
use crate::topology::{Topology, MAX_CLUSTERS, MAX_NODES};

/// Where a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// A key of `[topology]`.
    Topology(&'static str),
    /// A key of step N (0-based).
    Step(usize, &'static str),
}

/// Something wrong with a case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Where.
    pub at: At,
    /// What is wrong, and what would be right.
    pub message: String,
}

/// The pods every cluster starts with.
pub const BUILT_IN_PODS: &[&str] = &["teletun", "app", "dns"];
/// The services every cluster starts with.
pub const BUILT_IN_SERVICES: &[&str] = &["web", "kube-dns"];

/// What exists in one cluster at a step: name → still there (false once removed;
/// checks may still aim at a removed object).
struct Objects {
    pods: BTreeMap<String, bool>,
    services: BTreeMap<String, bool>,
    nodes: BTreeMap<u8, bool>,
}

impl Objects {
    fn new(nodes: u8) -> Objects {
        let all = |names: &[&str]| names.iter().map(|n| (n.to_string(), true)).collect();
        Objects {
            pods: all(BUILT_IN_PODS),
            services: all(BUILT_IN_SERVICES),
            nodes: (1..=nodes).map(|k| (k, true)).collect(),
        }
    }

    fn node_index(&self, name: &str) -> Option<u8> {
        name.strip_prefix("node")?
            .parse()
            .ok()
            .filter(|k| self.nodes.contains_key(k))
    }

    fn live_node(&self, name: &str) -> bool {
        self.node_index(name).is_some_and(|k| self.nodes[&k])
    }
}

fn no_pod(name: &str) -> String {
    format!(
        "no pod {name:?} exists here; add it with an earlier add-pod step (every cluster starts with {})",
        BUILT_IN_PODS.join(", ")
    )
}

fn no_service(name: &str) -> String {
    format!(
        "no service {name:?} exists here; add it with an earlier add-service step (every cluster starts with {})",
        BUILT_IN_SERVICES.join(", ")
    )
}

/// Checks one case: its topology and its steps in order.
pub fn check(topology: &Topology, steps: &[Step], profiles: &BTreeSet<String>) -> Vec<Finding> {
    let mut found = Vec::new();
    if !(1..=MAX_NODES).contains(&topology.nodes) {
        found.push(Finding {
            at: At::Topology("nodes"),
            message: format!(
                "nodes = {} is out of range; the allowed values are 1 to {MAX_NODES}",
                topology.nodes
            ),
        });
    }
    if !(1..=MAX_CLUSTERS).contains(&topology.clusters) {
        found.push(Finding {
            at: At::Topology("clusters"),
            message: format!(
                "clusters = {} is out of range; the allowed values are 1 to {MAX_CLUSTERS}",
                topology.clusters
            ),
        });
    }
    match (topology.lan, &topology.no_lan_because) {
        (false, None) => found.push(Finding {
            at: At::Topology("lan"),
            message: "lan = false needs no_lan_because = \"…\": say why this laptop has no home LAN".into(),
        }),
        (true, Some(_)) => found.push(Finding {
            at: At::Topology("no_lan_because"),
            message: "no_lan_because goes with lan = false".into(),
        }),
        _ => {}
    }
    if !topology.lan && topology.nat_udp_timeout.is_some() {
        found.push(Finding {
            at: At::Topology("nat_udp_timeout"),
            message: "nat_udp_timeout needs the home LAN (lan = true), whose router does the NAT".into(),
        });
    }
    let clusters = topology.clusters.clamp(1, MAX_CLUSTERS);
    let mut world: Vec<Objects> = (0..clusters).map(|_| Objects::new(topology.nodes)).collect();
    let names: Vec<String> = (0..clusters).map(|i| char::from(b'a' + i).to_string()).collect();
    let mut current = 0;
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut started: BTreeSet<String> = BTreeSet::new();
    let mut measured: BTreeSet<String> = BTreeSet::new();
    let mut flooding = false;
    let (mut probing, mut transferring) = (false, false);
    for (i, step) in steps.iter().enumerate() {
        let mut problem = |key: &'static str, message: String| {
            found.push(Finding {
                at: At::Step(i, key),
                message,
            })
        };
        let here = &mut world[current];
        let target = |t: &Target, ipv6: bool, problem: &mut dyn FnMut(&'static str, String)| match t {
            Target::Pod(p) if !here.pods.contains_key(p) => problem("to", no_pod(p)),
            Target::Service(s) if !here.services.contains_key(s) => problem("to", no_service(s)),
            Target::Service(_) if ipv6 => problem("ipv6", "services here are IPv4-only; drop `ipv6`".into()),
            Target::Node(n) if here.node_index(n).is_none() => problem(
                "to",
                format!(
                    "no node {n:?} exists here; nodes are node1 to node{} and those add-node adds",
                    topology.nodes
                ),
            ),
            _ => {}
        };
        match step {
            Step::StartClient(s) => {
                if !topology.kubernetes && (s.pod.is_some() || s.kubeconfig.is_some()) {
                    let key = if s.pod.is_some() { "pod" } else { "kubeconfig" };
                    problem(
                        key,
                        format!("`{key}` needs a Kubernetes API; set [topology] kubernetes = true"),
                    );
                }
                if s.expect_error.is_none() && !running.insert(s.name.clone()) {
                    problem(
                        "name",
                        format!(
                            "client {:?} already runs here; stop it first or name this one differently",
                            s.name
                        ),
                    );
                }
                started.insert(s.name.clone());
            }
            Step::StopClient(StopClient { name, .. })
            | Step::KillClient(KillClient { name, .. })
            | Step::ClientExits(ClientExits { name, .. }) => {
                let was_running = running.remove(name);
                if !was_running {
                    problem(
                        "name",
                        format!(
                            "no client {name:?} runs here; start it with an earlier start-client step (running: {})",
                            list(&running)
                        ),
                    );
                }
            }
            Step::Ping(s) => target(&s.to, s.ipv6, &mut problem),
            Step::TcpEcho(s) => target(&s.to, s.ipv6, &mut problem),
            Step::UdpEcho(s) => target(&s.to, s.ipv6, &mut problem),
            Step::Http(s) => target(&s.to, false, &mut problem),
            Step::Route(s) => target(&s.to, s.ipv6, &mut problem),
            Step::Resolve(s) => {
                if let Answer::Address { target: t, ipv6 } = &s.expect {
                    let mut at_expect = |_: &'static str, m: String| problem("expect", m);
                    target(t, *ipv6, &mut at_expect);
                }
            }
            Step::ConnectBack(s) if here.pods.get(&s.from) != Some(&true) => problem("from", no_pod(&s.from)),
            Step::Run(Run { on, .. }) => place(on, here, topology.lan && current == 0, &mut problem),
            Step::LookupLatency(s) => {
                place(&s.on, here, topology.lan && current == 0, &mut problem);
                if let Some(t) = &s.server {
                    let mut at_server = |_: &'static str, m: String| problem("server", m);
                    target(t, false, &mut at_server);
                }
            }
            Step::LogContains(LogContains {
                process: Process::LanDns,
                ..
            }) if !topology.lan || current != 0 => problem(
                "process",
                "lan-dns runs in the home router of the first cluster's uplink (and only with lan = true)".into(),
            ),
            Step::AddPod(s) => {
                if !is_dns_label(&s.name) {
                    problem(
                        "name",
                        format!("{:?} is not a pod name (lower-case letters, digits and '-')", s.name),
                    );
                } else if here.pods.get(&s.name) == Some(&true) {
                    problem("name", format!("pod {:?} exists already here", s.name));
                }
                if let Some(node) = &s.node {
                    if !here.live_node(node) {
                        problem(
                            "node",
                            format!("no node {node:?} runs here (nodes: {})", live_nodes(here)),
                        );
                    }
                }
                here.pods.insert(s.name.clone(), true);
            }
            Step::RemovePod(s) => match here.pods.get_mut(&s.name) {
                Some(alive @ true) => *alive = false,
                _ => problem("name", no_pod(&s.name)),
            },
            Step::AddService(s) => {
                for (key, value) in [("name", &s.name), ("namespace", &s.namespace)] {
                    if !is_dns_label(value) {
                        problem(
                            key,
                            format!("{value:?} is not a valid {key} (lower-case letters, digits and '-')"),
                        );
                    }
                }
                if here.services.get(&s.name) == Some(&true) {
                    problem("name", format!("service {:?} exists already here", s.name));
                }
                if here.pods.get(&s.pod) != Some(&true) {
                    problem("pod", no_pod(&s.pod));
                }
                if s.cluster_ip.is_some() && !topology.kubernetes {
                    problem("cluster_ip", "cluster_ip needs a Kubernetes API; set [topology] kubernetes = true".into());
                }
                here.services.insert(s.name.clone(), true);
            }
            Step::RemoveService(s) => match here.services.get_mut(&s.name) {
                Some(alive @ true) => *alive = false,
                _ => problem("name", no_service(&s.name)),
            },
            Step::AddNode(_) => {
                let next = here
                    .nodes
                    .iter()
                    .filter(|(_, alive)| **alive)
                    .map(|(k, _)| *k)
                    .max()
                    .unwrap_or(0)
                    + 1;
                here.nodes.insert(next, true);
            }
            Step::RemoveNode(s) => match here.node_index(&s.name) {
                Some(1) => problem("name", "node1 runs the servers and stays".into()),
                Some(k) if here.nodes[&k] => {
                    here.nodes.insert(k, false);
                }
                _ => problem(
                    "name",
                    format!("no node {:?} runs here (nodes: {})", s.name, live_nodes(here)),
                ),
            },
            Step::UseCluster(s) => match names.iter().position(|n| *n == s.name) {
                Some(k) => current = k,
                None => problem(
                    "name",
                    format!(
                        "no cluster {:?}; the allowed values are {} ([topology] clusters = {})",
                        s.name,
                        names.join(", "),
                        topology.clusters
                    ),
                ),
            },
            Step::StartServer(s) if s.resolv_conf.is_some() && s.role != Role::ServerCluster => problem(
                "resolv_conf",
                "only server-cluster reads the pod's resolv.conf; set role = \"server-cluster\"".into(),
            ),
            Step::CompactApi(_) if !topology.kubernetes => problem(
                "do",
                "compact-api needs a Kubernetes API; set [topology] kubernetes = true".into(),
            ),
            Step::AddServiceCidr(_) if !topology.kubernetes || !topology.service_cidrs => problem(
                "do",
                "add-service-cidr needs a Kubernetes API that serves ServiceCIDRs; set [topology] kubernetes = true (and keep service_cidrs)".into(),
            ),
            Step::AddServiceCidr(s) if s.cidr.parse::<ipnet::Ipv4Net>().is_err() => problem(
                "cidr",
                format!("{:?} is not an IPv4 network (like 10.100.0.0/24)", s.cidr),
            ),
            Step::PodSecurity(_) if !topology.kubernetes => problem(
                "do",
                "pod-security needs a Kubernetes API; set [topology] kubernetes = true".into(),
            ),
            Step::PodSecurity(s) if !crate::controlplane::podsecurity::LEVELS.contains(&s.lowest.as_str()) => problem(
                "lowest",
                format!("{:?} is not a Pod Security level (restricted, baseline, privileged)", s.lowest),
            ),
            Step::ClaimPod(_) if !topology.kubernetes => problem(
                "do",
                "claim-pod needs a Kubernetes API; set [topology] kubernetes = true".into(),
            ),
            Step::ClientRole(_) if !topology.kubernetes => problem(
                "do",
                "client-role needs a Kubernetes API; set [topology] kubernetes = true".into(),
            ),
            Step::ClientRole(s) => {
                let granted: Vec<String> = match crate::controlplane::rbac::permissions() {
                    Ok(all) => all.iter().map(ToString::to_string).collect(),
                    Err(e) => {
                        problem("without", format!("{e:#}"));
                        Vec::new()
                    }
                };
                for w in s.without.iter().filter(|_| !granted.is_empty()).filter(|w| !granted.contains(w)) {
                    problem(
                        "without",
                        format!(
                            "docs/deploy/rbac.yaml grants no {w:?}; it grants {}",
                            granted.join(", ")
                        ),
                    );
                }
            }
            Step::Impair(s) if !profiles.contains(&s.profile) => problem(
                "profile",
                format!(
                    "no [impairments.{}] table; the profiles are {}",
                    s.profile,
                    list(profiles)
                ),
            ),
            Step::StartFlood(s) => {
                if std::mem::replace(&mut flooding, true) {
                    problem("do", "a flood already runs here; stop-flood first".into());
                }
                if s.from == FloodFrom::Home && (!topology.lan || current != 0) {
                    problem(
                        "from",
                        "only the first cluster's laptop uplink has a home router (and only with lan = true)".into(),
                    );
                }
            }
            Step::StopFlood(_) if !std::mem::replace(&mut flooding, false) => problem(
                "do",
                "no flood runs here; start one with an earlier start-flood step".into(),
            ),
            Step::Throughput(s) => {
                if let Some(base) = s.compare_with.as_ref().filter(|b| !measured.contains(*b)) {
                    problem(
                        "compare_with",
                        format!(
                            "no earlier throughput step is named {base:?} (named: {})",
                            list(&measured)
                        ),
                    );
                }
                measured.insert(s.name.clone());
            }
            Step::ChangeAddress(_) | Step::SwitchUplink(_) | Step::NatRebind(_) if !topology.lan || current != 0 => {
                problem(
                    "do",
                    "the laptop's home LAN is the first cluster's uplink (and there only with lan = true)".into(),
                )
            }
            Step::MtuBlackHole(s) if !(576..=1500).contains(&s.mtu) => problem(
                "mtu",
                format!("{} is out of range; the allowed values are 576 to 1500", s.mtu),
            ),
            Step::StartProbe(s) => {
                if std::mem::replace(&mut probing, true) {
                    problem("do", "a probe already runs; stop-probe first".into());
                }
                target(&s.to, s.ipv6, &mut problem);
            }
            Step::StopProbe(_) if !std::mem::replace(&mut probing, false) => {
                problem("do", "no probe runs; start one with an earlier start-probe step".into())
            }
            Step::StartTransfer(_) if std::mem::replace(&mut transferring, true) => {
                problem("do", "a transfer already runs; finish-transfer first".into())
            }
            Step::FinishTransfer(_) if !std::mem::replace(&mut transferring, false) => problem(
                "do",
                "no transfer runs; start one with an earlier start-transfer step".into(),
            ),
            Step::Sleep(Sleep { client: name, .. })
            | Step::LogContains(LogContains {
                process: Process::Client(name),
                ..
            })
            | Step::Counter(Counter {
                process: Process::Client(name),
                ..
            }) if !started.contains(name) => problem(
                if matches!(step, Step::Sleep(_)) {
                    "client"
                } else {
                    "process"
                },
                format!(
                    "no client {name:?} was started before this step (started: {})",
                    list(&started)
                ),
            ),
            _ => {}
        }
    }
    found
}

/// A `place` names a live pod, or the home router only where there is one.
fn place(on: &Place, here: &Objects, has_home: bool, problem: &mut dyn FnMut(&'static str, String)) {
    match on {
        Place::Pod(p) if here.pods.get(p) != Some(&true) => problem("on", no_pod(p)),
        Place::Home if !has_home => problem(
            "on",
            "only the first cluster's laptop uplink has a home router (and only with lan = true)".into(),
        ),
        _ => {}
    }
}

fn list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn live_nodes(objects: &Objects) -> String {
    let live: Vec<String> = objects
        .nodes
        .iter()
        .filter(|(_, alive)| **alive)
        .map(|(k, _)| format!("node{k}"))
        .collect();
    live.join(", ")
}
