//! A Kubernetes-like cluster built from network namespaces:
//!
//! ```text
//! laptop ── router ── node-1 (server-external, hostNetwork)
//!                       └─ br0 ── teletun (server-cluster), app (echo + HTTP), dns (dnsmasq)
//! ```
//!
//! Service IPs are DNAT rules (nft) in the node, as kube-proxy would install.
//! Bridged traffic passes netfilter (`bridge-nf-call-iptables`) so a pod's reply
//! to a pod on the same bridge is un-NATed (the service hairpin).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::exec::{self, Background};
use crate::impair::{Backend, Impairment};
use crate::kubeapi::{self, ApiOptions, ApiServer};
use crate::laptop::{DnsVariant, Laptop};
use crate::netns::{self, Netns};
use crate::scenario::Topology;

/// Where a cluster's laptop comes from.
enum LaptopSource {
    /// A new laptop with this DNS manager.
    New(DnsVariant),
    /// The laptop of a cluster built before.
    Shared(Arc<Laptop>),
}

/// How to start a client.
pub struct ClientOptions<'a> {
    /// Key pair it uses.
    pub client_key: &'a str,
    /// Public key it pins for the server.
    pub server_key: &'a str,
    /// `-pod` (with a Kubernetes API).
    pub pod: Option<&'a str>,
    /// A broken kubeconfig variant (with a Kubernetes API).
    pub kubeconfig: Option<&'a str>,
    /// More arguments.
    pub args: &'a [String],
}

impl Default for ClientOptions<'_> {
    fn default() -> Self {
        ClientOptions {
            client_key: "client",
            server_key: "server",
            pod: None,
            kubeconfig: None,
            args: &[],
        }
    }
}

/// The server-external pod's name in the Kubernetes API (it runs with hostNetwork).
pub const EXTERNAL_POD: &str = "teletun-external";

/// The Kubernetes namespace of a pod: the DNS pod lives in kube-system.
fn pod_namespace(name: &str) -> &'static str {
    if name == "dns" {
        "kube-system"
    } else {
        "default"
    }
}

fn meta(name: &str, namespace: Option<&str>) -> k8s::ObjectMeta {
    k8s::ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    }
}

/// The Kubernetes types the cluster publishes.
mod k8s {
    pub use k8s_openapi::api::core::v1::{
        Node, NodeAddress, NodeSpec, NodeStatus, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
    };
    pub use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
    pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
}

/// What server-external logs when it links up with server-cluster.
const LINKED: &str = "server-cluster connected";

/// The address plan of one cluster. A second cluster on the same laptop gets
/// index 1 and different networks and domain throughout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// 0 for the first cluster ("a"), 1 for the second ("b"), …
    pub index: u8,
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
        Ipv6Addr::new(
            0xfd00,
            0x10,
            0x244 + u16::from(self.index),
            u16::from(k),
            0,
            0,
            0,
            u16::from(host),
        )
    }
    /// Node `k`'s pod networks.
    pub fn pod_cidrs(self, k: u8) -> [String; 2] {
        [
            format!("10.{}.{k}.0/24", 244 + self.index),
            format!("fd00:10:{:x}:{k}::/64", 0x244 + u16::from(self.index)),
        ]
    }
    /// Service cluster IP `host`.
    pub fn service_ip(self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 96 + self.index, 0, host)
    }
    /// The service network.
    pub fn service_cidr(self) -> String {
        format!("10.{}.0.0/16", 96 + self.index)
    }
    /// Node `k`'s underlay address.
    pub fn node_ip(self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113 + self.index, 10 + k)
    }
    /// Node `k`'s IPv6 address between nodes.
    pub fn node_ip6(self, k: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x203 + u16::from(self.index), 0, 0, 0, 0, 0, u16::from(10 + k))
    }
    /// The router's address on the node bridge.
    pub fn router_nodes_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113 + self.index, 1)
    }
    /// The laptop's and the router's addresses on their link.
    pub fn laptop_link(self) -> (Ipv4Addr, Ipv4Addr) {
        (
            Ipv4Addr::new(198, 51, 100 + self.index, 2),
            Ipv4Addr::new(198, 51, 100 + self.index, 1),
        )
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
    pub fn static_routes(self) -> [String; 3] {
        [
            format!("10.{}.0.0/16", 244 + self.index),
            self.service_cidr(),
            format!("fd00:10:{:x}::/48", 0x244 + u16::from(self.index)),
        ]
    }
}

/// The port server-external listens on.
pub const SERVER_PORT: u16 = 8443;
/// Echo ports on the app pod.
pub const ECHO_PORT: u16 = 7007;
/// HTTP port on the app pod.
pub const HTTP_PORT: u16 = 8080;

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
    pub fn pod_cidrs(&self) -> [String; 2] {
        self.plan.pod_cidrs(self.index)
    }

    /// The node's own address in each pod network (the pods' gateway).
    pub fn gateways(&self) -> (Ipv4Addr, Ipv6Addr) {
        (self.plan.pod_v4(self.index, 1), self.plan.pod_v6(self.index, 1))
    }
}

/// A service: a cluster IP DNAT-ed to a pod port.
#[derive(Clone, Debug)]
pub struct Service {
    /// Name (`NAME.NAMESPACE.svc.cluster.local`).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Cluster IP.
    pub ip: Ipv4Addr,
    /// The pod behind it.
    pub pod: String,
    /// Service port.
    pub port: u16,
    /// The pod's port.
    pub target_port: u16,
    /// Also forward UDP on the port (DNS).
    pub udp: bool,
}

/// Addresses of the built cluster.
pub struct Cluster {
    /// Unique id of this run: the prefix of its namespaces' names.
    pub id: String,
    /// Scratch directory: keys, logs, configs.
    pub dir: PathBuf,
    /// The developer's machine (shared when several clusters are built for one laptop).
    pub laptop: Arc<Laptop>,
    /// Its address plan.
    pub plan: Plan,
    /// Between laptop and node.
    pub router: Netns,
    /// The node running server-external (hostNetwork) and server-cluster: node1.
    pub node: Netns,
    /// All nodes, node1 first.
    pub nodes: Vec<NodeNet>,
    /// The node's underlay address (what the client dials).
    pub node_ip: Ipv4Addr,
    /// Pods by role: `teletun` (server-cluster), `app`, `dns`.
    pub pods: Vec<Pod>,
    /// Services.
    pub services: Vec<Service>,
    /// Pods and services removed during the run: checks may still aim at them.
    gone: (Vec<Pod>, Vec<Service>),
    /// Nodes removed during the run.
    gone_nodes: Vec<NodeNet>,
    /// How it was built.
    topology: Topology,
    /// The Kubernetes API describing it, if the topology asks for one.
    api: Option<ApiServer>,
    /// When each pod or service (`POD`, `service:NAME`) was last added or removed.
    pub changed_at: HashMap<String, std::time::Instant>,
    /// Background processes (servers, daemons), killed at teardown.
    pub processes: Vec<Background>,
    /// The teletun binary.
    pub teletun: PathBuf,
    torn_down: bool,
}

fn unique_id() -> String {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("tt{}-{:02x}{:02x}{:02x}", std::process::id(), b[0], b[1], b[2])
}

impl Cluster {
    /// Builds the whole cluster and starts its pods' daemons (not the teletun roles).
    pub fn build(teletun: &Path, work: &Path, topology: &Topology) -> Result<Cluster> {
        let dns = DnsVariant::parse(&topology.resolvconf)?;
        Self::build_with(teletun, work, topology, Plan { index: 0 }, LaptopSource::New(dns))
    }

    /// Builds another cluster, with its own networks and domain, for the laptop
    /// of `first`, which reaches it through an uplink of its own.
    pub fn attach(first: &Cluster, work: &Path, topology: &Topology, index: u8) -> Result<Cluster> {
        let plan = Plan { index };
        Self::build_with(
            &first.teletun,
            work,
            topology,
            plan,
            LaptopSource::Shared(first.laptop.clone()),
        )
    }

    fn build_with(
        teletun: &Path,
        work: &Path,
        topology: &Topology,
        plan: Plan,
        laptop: LaptopSource,
    ) -> Result<Cluster> {
        for r in &topology.forbid {
            if !["nodes", "pods", "services", "servicecidrs"].contains(&r.as_str()) {
                bail!("forbid: unknown resource {r:?} (nodes, pods, services, servicecidrs)");
            }
        }
        let id = unique_id();
        let dir = work.join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut created: Vec<Netns> = Vec::new();
        let result = Self::build_in(&id, &dir, teletun, plan, laptop, topology, &mut created);
        if result.is_err() {
            for ns in created.iter().rev() {
                ns.delete();
            }
        }
        result
    }

    fn build_in(
        id: &str,
        dir: &Path,
        teletun: &Path,
        plan: Plan,
        laptop: LaptopSource,
        topology: &Topology,
        created: &mut Vec<Netns>,
    ) -> Result<Cluster> {
        let mut mk = |role: &str| -> Result<Netns> {
            let ns = Netns::create(&format!("{id}-{role}"))?;
            created.push(ns.clone());
            Ok(ns)
        };
        let laptop_ns = match &laptop {
            LaptopSource::New(_) => mk("laptop")?,
            LaptopSource::Shared(l) => l.ns.clone(),
        };
        let router = mk("router")?;
        let node = mk("node1")?;

        // Underlay: laptop 198.51.100.2 ─ .1 router 203.0.113.1 ─ bridge "nodes" ─ node K at 203.0.113.(10+K)
        // (a second cluster: 198.51.101.x, 203.0.114.x, on the laptop's eth1).
        // Nodes reach each other's pod networks across that bridge; the router
        // itself never routes pod networks, so the laptop reaches them only
        // through the tunnel.
        let node_ip = plan.node_ip(1);
        let (laptop_ip, router_ip) = plan.laptop_link();
        let uplink = format!("eth{}", plan.index);
        netns::veth(&laptop_ns, &uplink, &router, "to-laptop")?;
        laptop_ns.ip(&["addr", "add", &format!("{laptop_ip}/24"), "dev", &uplink])?;
        if plan.index == 0 {
            laptop_ns.ip(&["route", "add", "default", "via", &router_ip.to_string()])?;
        } else {
            let [a, b, c, _] = plan.router_nodes_ip().octets();
            let nodes_net = format!("{a}.{b}.{c}.0/24");
            laptop_ns.ip(&["route", "add", &nodes_net, "via", &router_ip.to_string()])?;
        }
        router.ip(&["addr", "add", &format!("{router_ip}/24"), "dev", "to-laptop"])?;
        router.ip(&["link", "add", "nodes", "type", "bridge"])?;
        router.ip(&["addr", "add", &format!("{}/24", plan.router_nodes_ip()), "dev", "nodes"])?;
        router.ip(&["link", "set", "nodes", "up"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        let services = vec![
            Service {
                name: "web".into(),
                namespace: "default".into(),
                ip: plan.service_ip(20),
                pod: "app".into(),
                port: 80,
                target_port: HTTP_PORT,
                udp: false,
            },
            Service {
                name: "kube-dns".into(),
                namespace: "kube-system".into(),
                ip: plan.service_ip(10),
                pod: "dns".into(),
                port: 53,
                target_port: 53,
                udp: true,
            },
        ];

        let laptop = match laptop {
            LaptopSource::New(dns) => Arc::new(Laptop::create(laptop_ns, dir, dns)?),
            LaptopSource::Shared(l) => l,
        };
        let mut cluster = Cluster {
            id: id.to_owned(),
            dir: dir.to_owned(),
            laptop,
            plan,
            router,
            node: node.clone(),
            nodes: Vec::new(),
            node_ip,
            pods: Vec::new(),
            services,
            gone: (Vec::new(), Vec::new()),
            gone_nodes: Vec::new(),
            topology: topology.clone(),
            api: None,
            changed_at: HashMap::new(),
            processes: Vec::new(),
            teletun: teletun.to_owned(),
            torn_down: false,
        };
        created.clear(); // the cluster owns them now
        cluster.setup_node(node, 1)?;
        for k in 2..=topology.nodes {
            cluster.add_node_numbered(k)?;
        }
        for (name, host) in [("teletun", 5u8), ("app", 6), ("dns", 4)] {
            cluster.add_pod_at(name, 1, host)?;
        }
        cluster.start_app("app")?;
        cluster.sync_services()?;
        cluster.start_dns()?;
        cluster.make_keys()?;
        if topology.kubernetes {
            cluster.start_api()?;
        }
        Ok(cluster)
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name:?}"))
    }

    /// The service called `name`, also if it was removed (checks may aim at it).
    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .chain(&self.gone.1)
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name:?}"))
    }

    /// The resolv.conf a pod of this cluster gets.
    pub fn pod_resolv_conf(&self) -> String {
        let (dns, d) = (self.plan.service_ip(10), self.plan.domain());
        format!("nameserver {dns}\nsearch default.svc.{d} svc.{d} {d}\noptions ndots:5\n")
    }

    /// The cluster's namespace-name prefix.
    fn prefix(&self) -> String {
        self.id.clone()
    }

    /// Wires node `k`'s namespace: underlay on the router's bridge, a pod
    /// bridge, forwarding, and routes to and from every other node's pods.
    fn setup_node(&mut self, ns: Netns, k: u8) -> Result<()> {
        let n = NodeNet {
            name: format!("node{k}"),
            ns,
            index: k,
            plan: self.plan,
        };
        // Owned by the cluster from here on, so teardown removes it even if set-up fails.
        self.nodes.push(n.clone());
        let uplink = format!("to-{}", n.name);
        netns::veth(&self.router, &uplink, &n.ns, "eth0")?;
        self.router.ip(&["link", "set", &uplink, "master", "nodes"])?;
        n.ns.ip(&["addr", "add", &format!("{}/24", n.ip()), "dev", "eth0"])?;
        n.ns.ip(&["addr", "add", &format!("{}/64", n.ip6()), "dev", "eth0", "nodad"])?;
        n.ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.plan.router_nodes_ip().to_string(),
        ])?;
        let (gw4, gw6) = n.gateways();
        n.ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        n.ns.ip(&["addr", "add", &format!("{gw4}/24"), "dev", "br0"])?;
        n.ns.ip(&["addr", "add", &format!("{gw6}/64"), "dev", "br0", "nodad"])?;
        n.ns.ip(&["link", "set", "br0", "up"])?;
        n.ns.sysctl("net.ipv4.ip_forward", "1")?;
        n.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        // Bridged replies must pass conntrack to be un-NATed (the service hairpin).
        n.ns.sysctl("net.bridge.bridge-nf-call-iptables", "1")
            .context("bridged traffic must pass netfilter for the service hairpin (br_netfilter)")?;
        for other in self.nodes.iter().filter(|o| o.index != k) {
            let [v4, v6] = other.pod_cidrs();
            n.ns.ip(&["route", "add", &v4, "via", &other.ip().to_string()])?;
            n.ns.ip(&["-6", "route", "add", &v6, "via", &other.ip6().to_string()])?;
            let [mine4, mine6] = n.pod_cidrs();
            other.ns.ip(&["route", "add", &mine4, "via", &n.ip().to_string()])?;
            other
                .ns
                .ip(&["-6", "route", "add", &mine6, "via", &n.ip6().to_string()])?;
        }
        Ok(())
    }

    fn add_node_numbered(&mut self, k: u8) -> Result<()> {
        let ns = Netns::create(&format!("{}-node{k}", self.prefix()))?;
        self.setup_node(ns, k)
    }

    /// Adds the next node, with its pod networks, to the cluster (and the API).
    pub fn add_node(&mut self) -> Result<String> {
        let k = self.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        self.add_node_numbered(k)?;
        self.sync_services()?;
        self.publish_node(k)?;
        let name = format!("node{k}");
        self.changed_at
            .insert(format!("node:{name}"), std::time::Instant::now());
        Ok(name)
    }

    /// Removes a node (not node1, which runs the servers) with its pods: the
    /// other nodes forget its pod networks, the API its objects.
    pub fn remove_node(&mut self, name: &str) -> Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name:?}"))?;
        if self.nodes[i].index == 1 {
            bail!("node1 runs the servers and stays");
        }
        let node = self.nodes.remove(i);
        let pods: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.node == node.index)
            .map(|p| p.name.clone())
            .collect();
        for pod in pods {
            self.remove_pod(&pod)?;
        }
        for other in &self.nodes {
            let [v4, v6] = node.pod_cidrs();
            other.ns.ip(&["route", "del", &v4])?;
            other.ns.ip(&["-6", "route", "del", &v6])?;
        }
        node.ns.delete();
        if let Some(api) = &self.api {
            api.delete(kubeapi::Kind::Node, None, name)?;
        }
        self.changed_at
            .insert(format!("node:{name}"), std::time::Instant::now());
        // Checks may still aim at it.
        self.gone_nodes.push(node);
        Ok(())
    }

    fn node_net(&self, index: u8) -> Result<&NodeNet> {
        self.nodes
            .iter()
            .find(|n| n.index == index)
            .with_context(|| format!("no node{index}"))
    }

    /// Creates pod `name` with host number `host` on node `k`'s bridge.
    fn add_pod_at(&mut self, name: &str, k: u8, host: u8) -> Result<()> {
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod {name:?} exists already");
        }
        let (node, (gw4, gw6)) = {
            let n = self.node_net(k)?;
            (n.ns.clone(), n.gateways())
        };
        let pod = Pod {
            name: name.into(),
            ns: Netns::create(&format!("{}-pod-{name}", self.prefix()))?,
            ipv4: self.plan.pod_v4(k, host),
            ipv6: self.plan.pod_v6(k, host),
            node: k,
        };
        // Owned by the cluster from here on, so teardown removes it even if set-up fails.
        self.pods.push(pod.clone());
        let host_side = format!("v-{name}");
        netns::veth(&pod.ns, "eth0", &node, &host_side)?;
        node.ip(&["link", "set", &host_side, "master", "br0"])?;
        pod.ns
            .ip(&["addr", "add", &format!("{}/24", pod.ipv4), "dev", "eth0"])?;
        pod.ns
            .ip(&["addr", "add", &format!("{}/64", pod.ipv6), "dev", "eth0", "nodad"])?;
        pod.ns.ip(&["route", "add", "default", "via", &gw4.to_string()])?;
        pod.ns.ip(&["-6", "route", "add", "default", "via", &gw6.to_string()])?;
        Ok(())
    }

    /// Adds a pod running the app agent (echo, HTTP, blobs) at the next free
    /// address on `node` (`node1` when not given).
    pub fn add_app_pod(&mut self, name: &str, node: Option<&str>) -> Result<()> {
        let k = match node {
            None => 1,
            Some(n) => {
                let k = n.strip_prefix("node").and_then(|i| i.parse::<u8>().ok());
                k.filter(|k| self.nodes.iter().any(|n| n.index == *k))
                    .with_context(|| format!("no node {n:?}"))?
            }
        };
        let host = self
            .pods
            .iter()
            .filter(|p| p.node == k)
            .map(|p| p.ipv4.octets()[3])
            .max()
            .unwrap_or(9)
            .max(9)
            + 1;
        self.add_pod_at(name, k, host)?;
        self.start_app(name)?;
        self.sync_dns()?;
        self.publish_pod(name)?;
        self.changed_at.insert(name.to_owned(), std::time::Instant::now());
        Ok(())
    }

    /// Removes a pod: its processes and its namespace (and so its veth).
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name:?}"))?;
        let pod = self.pods.remove(i);
        self.processes.retain(|p| p.name != format!("{name} agent"));
        pod.ns.delete();
        if let Some(api) = &self.api {
            api.delete(kubeapi::Kind::Pod, Some(pod_namespace(name)), name)?;
        }
        self.changed_at.insert(name.to_owned(), std::time::Instant::now());
        self.gone.0.push(pod);
        self.sync_dns()
    }

    /// Adds a service for `pod`'s `target_port` at the next free cluster IP.
    pub fn add_service(&mut self, name: &str, namespace: &str, pod: &str, port: u16, target_port: u16) -> Result<()> {
        if self.services.iter().any(|s| s.name == name && s.namespace == namespace) {
            bail!("service {namespace}/{name} exists already");
        }
        self.pod(pod)?;
        let host = self
            .services
            .iter()
            .map(|s| s.ip.octets()[3])
            .max()
            .unwrap_or(29)
            .max(29)
            + 1;
        self.services.push(Service {
            name: name.into(),
            namespace: namespace.into(),
            ip: self.plan.service_ip(host),
            pod: pod.into(),
            port,
            target_port,
            udp: false,
        });
        self.sync_services()?;
        self.sync_dns()?;
        self.publish_service(name)?;
        self.changed_at
            .insert(format!("service:{name}"), std::time::Instant::now());
        Ok(())
    }

    /// Removes a service: its DNAT rules and its DNS name.
    pub fn remove_service(&mut self, name: &str) -> Result<()> {
        let i = self
            .services
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no service {name:?}"))?;
        let service = self.services.remove(i);
        if let Some(api) = &self.api {
            api.delete(kubeapi::Kind::Service, Some(&service.namespace), name)?;
        }
        self.changed_at
            .insert(format!("service:{name}"), std::time::Instant::now());
        self.gone.1.push(service);
        self.sync_services()?;
        self.sync_dns()
    }

    /// Rewrites kube-proxy's DNAT table in every node from the service list.
    fn sync_services(&self) -> Result<()> {
        let mut rules = String::new();
        for s in &self.services {
            let Ok(pod) = self.pod(&s.pod) else { continue };
            for proto in ["tcp"].into_iter().chain(s.udp.then_some("udp")) {
                rules.push_str(&format!(
                    "    ip daddr {} {proto} dport {} dnat to {}:{}\n",
                    s.ip, s.port, pod.ipv4, s.target_port
                ));
            }
        }
        // Declaring the table first lets `delete` succeed on the first run too.
        let table = format!(
            "table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {{\n  chain prerouting {{\n    \
             type nat hook prerouting priority dstnat;\n{rules}  }}\n}}\n"
        );
        let file = self.dir.join("kube-proxy.nft");
        std::fs::write(&file, table)?;
        for n in &self.nodes {
            n.ns.run("nft", &["-f", &file.to_string_lossy()])
                .context("cannot install service DNAT rules (is nftables installed?)")?;
        }
        Ok(())
    }

    /// The cluster's DNS records, as a hosts file dnsmasq reads.
    fn dns_hosts(&self) -> String {
        let domain = self.plan.domain();
        let mut hosts = String::new();
        for s in &self.services {
            hosts.push_str(&format!("{} {}.{}.svc.{domain}\n", s.ip, s.name, s.namespace));
        }
        for p in &self.pods {
            hosts.push_str(&format!(
                "{} {}.pod.{domain}\n{} {}.pod.{domain}\n",
                p.ipv4, p.name, p.ipv6, p.name
            ));
        }
        hosts
    }

    /// Rewrites the DNS records and makes dnsmasq reread them.
    fn sync_dns(&mut self) -> Result<()> {
        std::fs::write(self.dir.join("dns-hosts"), self.dns_hosts())?;
        if let Ok(p) = self.process_mut("dnsmasq") {
            p.signal(libc::SIGHUP);
        }
        Ok(())
    }

    /// Starts the app agent in pod `name`.
    fn start_app(&mut self, name: &str) -> Result<()> {
        let me = std::env::current_exe()?;
        let pod = self.pod(name)?.clone();
        let mut cmd = pod.ns.cmd(&me);
        // The cluster is in the name so answers show which cluster replied.
        cmd.args([
            "agent",
            "serve",
            "--name",
            &format!("{name} in cluster {}", self.plan.name()),
        ])
        .arg(format!("--echo-port={ECHO_PORT}"))
        .arg(format!("--http-port={HTTP_PORT}"));
        let mut p = Background::spawn(&format!("{name} agent"), cmd, &self.dir.join(format!("{name}.log")))?;
        p.wait_for_log("serving", Duration::from_secs(10))?;
        self.processes.push(p);
        Ok(())
    }

    /// Starts dnsmasq, the cluster DNS, in the dns pod.
    fn start_dns(&mut self) -> Result<()> {
        let dns = self.pod("dns")?.clone();
        let args = vec![
            "--keep-in-foreground".to_string(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--conf-file=/dev/null".into(),
            "--pid-file=".into(),
            "--user=root".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={}", dns.ipv4),
            format!("--local=/{}/", self.plan.domain()),
            "--log-facility=-".into(),
            "--log-queries".into(),
            format!("--addn-hosts={}", self.dir.join("dns-hosts").display()),
        ];
        std::fs::write(self.dir.join("dns-hosts"), self.dns_hosts())?;
        let mut cmd = dns.ns.cmd("dnsmasq");
        cmd.args(&args);
        let p = Background::spawn("dnsmasq", cmd, &self.dir.join("dnsmasq.log"))?;
        self.processes.push(p);
        // dnsmasq has no readiness line when logging to stderr: wait for the port.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = dns.ns.run("ss", &["-lnu"]).unwrap_or_default();
            if out.contains(&format!("{}:53", dns.ipv4)) {
                break;
            }
            if let Some(status) = self
                .processes
                .last_mut()
                .and_then(|p| p.child.try_wait().ok().flatten())
            {
                bail!(
                    "dnsmasq exited ({status}): {}",
                    self.processes.last().map(|p| p.log_text()).unwrap_or_default()
                );
            }
            if std::time::Instant::now() > deadline {
                bail!("dnsmasq did not start listening within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn make_keys(&self) -> Result<()> {
        for name in ["server", "client", "other"] {
            let mut cmd = Command::new(&self.teletun);
            cmd.args(["keygen", "--out"]).arg(self.dir.join(name));
            exec::run(cmd, netns::CMD_TIMEOUT)?;
        }
        Ok(())
    }

    /// `DIR/NAME.key` or `.pub`.
    pub fn key(&self, name: &str, ext: &str) -> String {
        self.dir.join(format!("{name}.{ext}")).to_string_lossy().into_owned()
    }

    /// The server-cluster ↔ server-external socket (a hostPath in Kubernetes).
    pub fn sockfile(&self) -> String {
        self.dir.join("teletun.sock").to_string_lossy().into_owned()
    }

    /// Starts server-cluster in its pod, then server-external on the node, and
    /// waits until they are connected to each other.
    pub fn start_servers(&mut self) -> Result<()> {
        self.start_server_cluster()?;
        self.start_server_external()
    }

    /// How many times server-external has linked up with server-cluster so far.
    fn links_so_far(&self) -> Option<usize> {
        let ext = self.processes.iter().find(|p| p.name == "server-external")?;
        Some(ext.log_text().matches(LINKED).count())
    }

    /// When both roles run, waits until server-external logs one more link than `before`.
    fn wait_linked(&mut self, before: usize) -> Result<()> {
        if !self.processes.iter().any(|p| p.name == "server-cluster") {
            return Ok(());
        }
        let ext = self.process_mut("server-external")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ext.log_text().matches(LINKED).count() <= before {
            exec::check_interrupted()?;
            if std::time::Instant::now() > deadline {
                bail!(
                    "server-external did not link up with server-cluster within 10 s: {}",
                    exec::last_lines(&ext.log_text(), 3)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts server-cluster and waits for its takeover (and for server-external
    /// to link up with it, if that runs).
    pub fn start_server_cluster(&mut self) -> Result<()> {
        let before = self.links_so_far();
        let resolv = self.dir.join("pod-resolv.conf");
        std::fs::write(&resolv, self.pod_resolv_conf())?;
        let pod = self.pod("teletun")?.clone();
        let mut cmd = pod.ns.cmd(&self.teletun);
        cmd.arg("server-cluster")
            .arg(format!("-sockfile={}", self.sockfile()))
            .arg("--resolv-conf")
            .arg(&resolv);
        let mut p = Background::spawn("server-cluster", cmd, &self.dir.join("server-cluster.log"))?;
        p.wait_for_log("took over", Duration::from_secs(10))?;
        self.processes.retain(|p| p.name != "server-cluster");
        self.processes.push(p);
        match before {
            Some(n) => self.wait_linked(n),
            None => Ok(()),
        }
    }

    /// Starts server-external on the node (hostNetwork), and waits for it to
    /// link up with server-cluster if that runs.
    pub fn start_server_external(&mut self) -> Result<()> {
        let mut cmd = self.node.cmd(&self.teletun);
        cmd.arg("server-external")
            .arg(format!("-port={SERVER_PORT}"))
            .arg(format!("-server-pubkey={}", self.key("server", "pub")))
            .arg(format!("-server-privkey={}", self.key("server", "key")))
            .arg(format!("-client-pubkey={}", self.key("client", "pub")))
            .arg(format!("-sockfile={}", self.sockfile()));
        let mut p = Background::spawn("server-external", cmd, &self.dir.join("server-external.log"))?;
        p.wait_for_log("listening on", Duration::from_secs(10))?;
        self.processes.retain(|p| p.name != "server-external");
        self.processes.push(p);
        self.wait_linked(0)
    }

    /// A background process by name.
    pub fn process_mut(&mut self, name: &str) -> Result<&mut Background> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("{name} is not running"))
    }

    /// The client command line: with a Kubernetes API exactly the seed's
    /// usage line; without, the overrides that replace discovery.
    pub fn client_command(&self, o: &ClientOptions) -> Result<Command> {
        let mut cmd = self.laptop.cmd(&self.teletun);
        cmd.arg("client");
        if self.api.is_some() {
            let kubeconfig = match o.kubeconfig {
                None => self.kubeconfig(),
                Some(variant) => self.broken_kubeconfig(variant)?,
            };
            cmd.arg(format!("-kubeconfig={}", kubeconfig.display()))
                .arg(format!("-pod={}", o.pod.unwrap_or(EXTERNAL_POD)));
        } else if o.pod.is_some() || o.kubeconfig.is_some() {
            bail!("pod and kubeconfig need a Kubernetes API ([topology] kubernetes = true)");
        }
        cmd.arg(format!("-port={SERVER_PORT}"))
            .arg(format!("-server-pubkey={}", self.key(o.server_key, "pub")))
            .arg(format!("-client-pubkey={}", self.key(o.client_key, "pub")))
            .arg(format!("-client-privkey={}", self.key(o.client_key, "key")));
        if self.api.is_none() {
            cmd.arg(format!("--server-address={}", self.node_ip));
            for r in self.plan.static_routes() {
                cmd.arg(format!("--route={r}"));
            }
        }
        cmd.args(o.args);
        Ok(cmd)
    }

    /// A copy of the kubeconfig with a wrong token, or pointing where no API listens.
    fn broken_kubeconfig(&self, variant: &str) -> Result<PathBuf> {
        let good = std::fs::read_to_string(self.kubeconfig())?;
        let broken = match variant {
            "wrong-token" => good
                .lines()
                .map(|l| {
                    if l.trim_start().starts_with("token:") {
                        "    token: not-the-token"
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
            "unreachable" => good.replace(&format!(":{}", kubeapi::API_PORT), ":6999"),
            other => bail!("unknown kubeconfig variant {other:?}: use wrong-token or unreachable"),
        };
        let path = self.dir.join(format!("kubeconfig-{variant}"));
        std::fs::write(&path, broken)?;
        Ok(path)
    }

    /// The kubeconfig for the cluster's API.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Starts the Kubernetes API in node1 and publishes every object.
    fn start_api(&mut self) -> Result<()> {
        let api = ApiServer::start(
            &self.node.path(),
            self.node_ip.into(),
            &self.kubeconfig(),
            ApiOptions {
                forbidden: self.topology.forbid.clone(),
                serve_service_cidrs: self.topology.service_cidrs,
            },
        )?;
        self.api = Some(api);
        for k in self.nodes.iter().map(|n| n.index).collect::<Vec<_>>() {
            self.publish_node(k)?;
        }
        if self.topology.service_cidrs {
            let cidr = k8s::ServiceCIDR {
                metadata: meta("kubernetes", None),
                spec: Some(k8s::ServiceCIDRSpec {
                    cidrs: Some(vec![self.plan.service_cidr()]),
                }),
                ..Default::default()
            };
            self.api()?.put(kubeapi::Kind::ServiceCidr, &cidr)?;
        }
        let external = k8s::Pod {
            metadata: meta(EXTERNAL_POD, Some("default")),
            spec: Some(k8s::PodSpec {
                host_network: Some(true),
                node_name: Some("node1".into()),
                ..Default::default()
            }),
            status: Some(k8s::PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(self.node_ip.to_string()),
                pod_ips: Some(vec![k8s::PodIP {
                    ip: self.node_ip.to_string(),
                }]),
                host_ip: Some(self.node_ip.to_string()),
                ..Default::default()
            }),
        };
        self.api()?.put(kubeapi::Kind::Pod, &external)?;
        // For the error paths: a pod that does not run yet, and one on a node
        // without addresses.
        let mut pending = external.clone();
        pending.metadata = meta("teletun-pending", Some("default"));
        pending.status = Some(k8s::PodStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        self.api()?.put(kubeapi::Kind::Pod, &pending)?;
        let mut nowhere = external.clone();
        nowhere.metadata = meta("teletun-nowhere", Some("default"));
        if let Some(spec) = nowhere.spec.as_mut() {
            spec.node_name = Some("node-without-address".into());
        }
        self.api()?.put(kubeapi::Kind::Pod, &nowhere)?;
        let bare = k8s::Node {
            metadata: meta("node-without-address", None),
            ..Default::default()
        };
        self.api()?.put(kubeapi::Kind::Node, &bare)?;
        for name in self.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>() {
            self.publish_pod(&name)?;
        }
        for name in self.services.iter().map(|s| s.name.clone()).collect::<Vec<_>>() {
            self.publish_service(&name)?;
        }
        Ok(())
    }

    /// Makes the API forget its history and drop its watches; waits until
    /// the watchers got 410 Gone and listed again. Returns how many did.
    pub fn compact_api(&self) -> Result<u64> {
        let api = self.api()?;
        let (gone, lists) = api.counters();
        api.compact();
        let watched = if self.topology.service_cidrs { 4 } else { 3 };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (g, l) = api.counters();
            if g - gone >= watched && l - lists >= watched {
                return Ok(g - gone);
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "after compaction, {} watches got 410 Gone and {} lists followed; expected {watched} each",
                    g - gone,
                    l - lists
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn api(&self) -> Result<&ApiServer> {
        self.api
            .as_ref()
            .context("this cluster has no Kubernetes API ([topology] kubernetes = true)")
    }

    fn publish_node(&self, k: u8) -> Result<()> {
        let Some(api) = &self.api else { return Ok(()) };
        let n = self.node_net(k)?;
        let cidrs = self.topology.node_pod_cidrs.then(|| n.pod_cidrs().to_vec());
        let node = k8s::Node {
            metadata: meta(&n.name, None),
            spec: Some(k8s::NodeSpec {
                pod_cidr: cidrs.as_ref().map(|c| c[0].clone()),
                pod_cidrs: cidrs,
                ..Default::default()
            }),
            status: Some(k8s::NodeStatus {
                addresses: Some(vec![
                    k8s::NodeAddress {
                        type_: "InternalIP".into(),
                        address: format!("172.31.0.{}", 10 + k),
                    },
                    k8s::NodeAddress {
                        type_: "ExternalIP".into(),
                        address: n.ip().to_string(),
                    },
                    k8s::NodeAddress {
                        type_: "Hostname".into(),
                        address: n.name.clone(),
                    },
                ]),
                ..Default::default()
            }),
        };
        api.put(kubeapi::Kind::Node, &node)
    }

    fn publish_pod(&self, name: &str) -> Result<()> {
        let Some(api) = &self.api else { return Ok(()) };
        let p = self.pod(name)?;
        let node = self.node_net(p.node)?;
        let pod = k8s::Pod {
            metadata: meta(name, Some(pod_namespace(name))),
            spec: Some(k8s::PodSpec {
                node_name: Some(node.name.clone()),
                ..Default::default()
            }),
            status: Some(k8s::PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(p.ipv4.to_string()),
                pod_ips: Some(vec![
                    k8s::PodIP { ip: p.ipv4.to_string() },
                    k8s::PodIP { ip: p.ipv6.to_string() },
                ]),
                host_ip: Some(self.node_ip.to_string()),
                ..Default::default()
            }),
        };
        api.put(kubeapi::Kind::Pod, &pod)
    }

    fn publish_service(&self, name: &str) -> Result<()> {
        let Some(api) = &self.api else { return Ok(()) };
        let s = self
            .services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name:?}"))?;
        let mut ports = vec![k8s::ServicePort {
            port: i32::from(s.port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }];
        if s.udp {
            ports.push(k8s::ServicePort {
                name: Some("udp".into()),
                port: i32::from(s.port),
                protocol: Some("UDP".into()),
                ..Default::default()
            });
        }
        let service = k8s::Service {
            metadata: meta(name, Some(&s.namespace)),
            spec: Some(k8s::ServiceSpec {
                cluster_ip: Some(s.ip.to_string()),
                cluster_ips: Some(vec![s.ip.to_string()]),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        };
        api.put(kubeapi::Kind::Service, &service)
    }

    /// Resolves a target: `POD` (its IPv4), `POD/ipv6`, `service:NAME`.
    pub fn address(&self, target: &str, ipv6: bool) -> Result<IpAddr> {
        if let Some(name) = target.strip_prefix("node:") {
            let n = self
                .nodes
                .iter()
                .chain(&self.gone_nodes)
                .find(|n| n.name == name)
                .with_context(|| format!("no node {name:?}"))?;
            let (gw4, gw6) = n.gateways();
            return Ok(if ipv6 { gw6.into() } else { gw4.into() });
        }
        if let Some(svc) = target.strip_prefix("service:") {
            if ipv6 {
                bail!("services here are IPv4-only");
            }
            return Ok(self.service(svc)?.ip.into());
        }
        let pod = self
            .pods
            .iter()
            .chain(&self.gone.0)
            .find(|p| p.name == target)
            .with_context(|| format!("no pod {target:?}"))?;
        Ok(if ipv6 { pod.ipv6.into() } else { pod.ipv4.into() })
    }

    /// Impairs the underlay in the router from now on (replacing any earlier
    /// impairment): the seeded userspace impairer for delay, jitter, reorder,
    /// loss and duplication, tbf for rate.
    pub fn impair(&mut self, imp: &Impairment) -> Result<()> {
        self.clear_impairment();
        if imp.backend == Backend::Netem {
            // Probe on the router's loopback: does this kernel have netem at all?
            if self
                .router
                .run("tc", &["qdisc", "add", "dev", "lo", "root", "netem"])
                .is_err()
            {
                bail!(
                    "this kernel has no netem (sch_netem); use the seeded userspace impairer (backend = \"userspace\")"
                );
            }
            self.router.run("tc", &["qdisc", "del", "dev", "lo", "root"])?;
            for dev in ["to-laptop", "nodes"] {
                let mut args = vec![
                    "qdisc".to_owned(),
                    "replace".into(),
                    "dev".into(),
                    dev.into(),
                    "root".into(),
                ];
                args.extend(imp.netem_args());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                if let Err(e) = self.router.run("tc", &args) {
                    if format!("{e:#}").contains("\"seed\"") {
                        bail!("this tc cannot seed netem (iproute2 6.5 or later can); use backend = \"userspace\"");
                    }
                    return Err(e);
                }
            }
            return Ok(());
        }
        if imp.needs_impairer() {
            let me = std::env::current_exe()?;
            let mut cmd = self.router.cmd(&me);
            cmd.args(["agent", "impair", "--tun", "imp0"])
                .arg(format!("--delay-ms={}", imp.delay_ms))
                .arg(format!("--jitter-ms={}", imp.jitter_ms))
                .arg(format!("--reorder-percent={}", imp.reorder_percent))
                .arg(format!("--loss-percent={}", imp.loss_percent))
                .arg(format!("--duplicate-percent={}", imp.duplicate_percent))
                .arg(format!("--seed={}", imp.seed));
            let mut p = Background::spawn("impairer", cmd, &self.dir.join("impairer.log"))?;
            p.wait_for_log("impairing", Duration::from_secs(10))?;
            self.processes.push(p);
            // Everything the router forwards takes a detour through imp0 and back.
            for (pref, iif) in [("100", "to-laptop"), ("101", "nodes")] {
                self.router
                    .ip(&["rule", "add", "pref", pref, "iif", iif, "lookup", "100"])?;
            }
            self.router
                .ip(&["route", "add", "default", "dev", "imp0", "table", "100"])?;
            self.router.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            self.router.sysctl("net.ipv4.conf.imp0.rp_filter", "0")?;
        }
        if imp.rate_mbit > 0.0 {
            for dev in ["to-laptop", "nodes"] {
                let rate = format!("{}mbit", imp.rate_mbit);
                self.router.run(
                    "tc",
                    &[
                        "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kb", "latency",
                        "100ms",
                    ],
                )?;
            }
        }
        Ok(())
    }

    fn clear_impairment(&mut self) {
        if let Some(i) = self.processes.iter().position(|p| p.name == "impairer") {
            let mut p = self.processes.remove(i);
            p.kill();
            for pref in ["100", "101"] {
                let _ = self.router.ip(&["rule", "del", "pref", pref]);
            }
        }
        for dev in ["to-laptop", "nodes"] {
            let _ = self.router.run("tc", &["qdisc", "del", "dev", dev, "root"]);
        }
    }

    /// Stops every process and deletes every namespace and file this cluster made.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for p in self.processes.iter_mut().rev() {
            p.signal(libc::SIGTERM);
        }
        for p in self.processes.iter_mut().rev() {
            let _ = p.wait(Duration::from_secs(3));
        }
        self.processes.clear();
        self.api = None;
        // The first cluster made the laptop; the others only borrow it.
        if self.plan.index == 0 {
            self.laptop.teardown();
        }
        for pod in &self.pods {
            pod.ns.delete();
        }
        for n in &self.nodes {
            n.ns.delete();
        }
        self.node.delete();
        self.router.delete();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}
