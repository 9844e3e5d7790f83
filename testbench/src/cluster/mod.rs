//! A Kubernetes-like cluster built from network namespaces:
//!
//! ```text
//! laptop ── home (NAT, LAN resolver) ── router ── node1 (server-external, hostNetwork)
//!                       └─ br0 ── teletun (server-cluster), app (echo + HTTP), dns (dnsmasq)
//! ```
//!
//! The rooms: `plan` (addresses and names, pure), `net` (namespaces, links,
//! routes), `services` (kube-proxy's DNAT), `dns` (dnsmasq), `api` (the
//! objects in the Kubernetes API), `servers` (the teletun roles and the client
//! command line), `impairment` (the router's impairment). [`Cluster`] holds
//! the state and keeps them in step; `changes` has its methods for pods,
//! services and nodes that come and go.

mod api;
mod changes;
mod dns;
mod impairment;
mod net;
mod plan;
mod servers;
mod services;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use api::{BrokenKubeconfig, EXTERNAL_POD};
pub use net::{NodeNet, Pod, HOME_WAN_IF};
pub use plan::{HomeLan, Plan, ECHO_PORT, HTTP_PORT, SERVER_PORT};
pub use servers::{KeyName, Pair};
pub use services::Service;

use crate::exec::Background;
use crate::impair::Impairment;
use crate::laptop::Laptop;
use crate::netns::Netns;
use crate::topology::Topology;
use api::ClusterApi;
use servers::{Discovery, Files};

/// How to start a client.
pub struct ClientOptions<'a> {
    /// Key pair it uses.
    pub client_key: KeyName,
    /// Public key it pins for the server.
    pub server_key: KeyName,
    /// `-pod` (with a Kubernetes API; server-external's pod by default).
    pub pod: Option<&'a str>,
    /// A broken kubeconfig (with a Kubernetes API).
    pub kubeconfig: Option<BrokenKubeconfig>,
    /// More arguments.
    pub args: &'a [String],
}

impl Default for ClientOptions<'_> {
    fn default() -> Self {
        ClientOptions {
            client_key: KeyName::Client,
            server_key: KeyName::Server,
            pod: None,
            kubeconfig: None,
            args: &[],
        }
    }
}

/// A built cluster and what runs in it.
pub struct Cluster {
    /// Unique id of this run: the prefix of its namespaces' names.
    pub id: String,
    /// Scratch directory: keys, logs, configs.
    pub dir: PathBuf,
    /// The developer's machine (shared when several clusters are built for one laptop).
    pub laptop: Arc<Laptop>,
    /// Its address plan.
    pub plan: Plan,
    /// The laptop's home router (NAT, LAN resolver), if it is on a home LAN.
    pub home: Option<Netns>,
    /// Between the laptop (or its home router) and the nodes.
    pub router: Netns,
    /// The node running server-external (hostNetwork) and server-cluster: node1.
    pub node: Netns,
    /// All nodes, node1 first.
    pub nodes: Vec<NodeNet>,
    /// The node's underlay address (what the client dials).
    pub node_ip: Ipv4Addr,
    /// Pods: `teletun` (server-cluster), `app`, `dns`, and those steps add.
    pub pods: Vec<Pod>,
    /// Services.
    pub services: Vec<Service>,
    /// Pods, services and nodes removed during the run: checks may still aim at them.
    gone: (Vec<Pod>, Vec<Service>, Vec<NodeNet>),
    /// The Kubernetes API describing it, if the topology asks for one.
    api: Option<ClusterApi>,
    /// When each pod, service or node (`POD`, `service:NAME`, `node:NAME`) was last added or removed.
    pub changed_at: HashMap<String, Instant>,
    /// Background processes (servers, daemons), stopped at teardown.
    pub processes: Vec<Background>,
    /// The teletun binary.
    pub teletun: PathBuf,
    files: Files,
    torn_down: bool,
}

/// Where a cluster's laptop comes from.
enum LaptopSource<'a> {
    /// A new laptop, built with the first cluster.
    New,
    /// The laptop of a cluster built before.
    Shared(&'a Arc<Laptop>),
}

impl Cluster {
    /// Builds the whole cluster and its laptop and starts its pods' daemons
    /// (not the teletun roles).
    pub fn build(teletun: &Path, work: &Path, topology: &Topology) -> Result<Cluster> {
        Self::build_with(teletun, work, topology, Plan { index: 0 }, LaptopSource::New)
    }

    /// Builds another cluster, with its own networks and domain, for the laptop
    /// of `first`, which reaches it through an uplink of its own.
    pub fn attach(first: &Cluster, work: &Path, topology: &Topology, index: u8) -> Result<Cluster> {
        let source = LaptopSource::Shared(&first.laptop);
        Self::build_with(&first.teletun, work, topology, Plan { index }, source)
    }

    fn build_with(
        teletun: &Path,
        work: &Path,
        topology: &Topology,
        plan: Plan,
        source: LaptopSource,
    ) -> Result<Cluster> {
        let id = plan::unique_id();
        let dir = work.join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut made: Vec<Netns> = Vec::new();
        let mut mk = |role: &str| -> Result<Netns> {
            let ns = Netns::create(&format!("{id}-{role}"))?;
            made.push(ns.clone());
            Ok(ns)
        };
        // Only a new laptop gets a home LAN; another cluster is reached over an uplink of its own.
        let with_home = matches!(source, LaptopSource::New) && topology.lan;
        let parts = (|| {
            let laptop_ns = match source {
                LaptopSource::New => Some(mk("laptop")?),
                LaptopSource::Shared(_) => None,
            };
            let home = if with_home { Some(mk("home")?) } else { None };
            Ok::<_, anyhow::Error>((laptop_ns, home, mk("router")?, mk("node1")?))
        })();
        let (laptop_ns, home, router, node) = match parts {
            Ok(p) => p,
            Err(e) => {
                made.iter().for_each(Netns::delete);
                return Err(e);
            }
        };
        let laptop = match (source, laptop_ns) {
            (LaptopSource::Shared(l), _) => l.clone(),
            (LaptopSource::New, Some(ns)) => match Laptop::create(ns.clone(), &dir, topology.resolvconf) {
                Ok(l) => Arc::new(l),
                Err(e) => {
                    made.iter().for_each(Netns::delete);
                    return Err(e);
                }
            },
            (LaptopSource::New, None) => unreachable!("a new laptop has its namespace"),
        };
        // From here on the cluster owns everything made, and teardown (on drop) removes it.
        let mut cluster = Cluster {
            id: id.clone(),
            files: Files { dir: dir.clone() },
            dir,
            laptop,
            plan,
            home,
            router,
            node: node.clone(),
            nodes: Vec::new(),
            node_ip: plan.node_ip(1),
            pods: Vec::new(),
            services: services::built_in(plan),
            gone: (Vec::new(), Vec::new(), Vec::new()),
            api: None,
            changed_at: HashMap::new(),
            processes: Vec::new(),
            teletun: teletun.to_owned(),
            torn_down: false,
        };
        cluster.populate(node, topology)?;
        Ok(cluster)
    }

    /// Wires the made namespaces and starts what the pods (and the home
    /// router) run.
    fn populate(&mut self, node1: Netns, topology: &Topology) -> Result<()> {
        match self.home.clone() {
            Some(home) => {
                net::wire_home(&self.laptop.ns, &home, HomeLan, topology.nat_udp_timeout, &self.dir)?;
                net::wire_router(&home, net::HOME_WAN_IF, &self.router, self.plan)?;
                let resolver = dns::start_lan(&home, HomeLan, &self.dir.join("lan-dns.log"))?;
                self.processes.push(resolver);
                self.laptop.register_lan_dns(HomeLan.router_ip(), plan::LAN_DOMAIN)?;
            }
            None => net::wire_router(&self.laptop.ns, &self.plan.uplink(), &self.router, self.plan)?,
        }
        self.add_node_numbered(1, Some(node1))?;
        for k in 2..=topology.nodes {
            self.add_node_numbered(k, None)?;
        }
        for (name, host) in [("teletun", 5u8), ("app", 6), ("dns", 4)] {
            self.add_pod_at(name, 1, host)?;
        }
        self.start_app("app")?;
        // The API first: it allocates the services' cluster IPs.
        if topology.kubernetes {
            self.start_api(topology)?;
        }
        self.sync_services()?;
        let hosts = self.dir.join("dns-hosts");
        std::fs::write(&hosts, dns::hosts(self.plan, &self.services, &self.pods))?;
        let dns_pod = self.pod("dns")?.clone();
        let dnsmasq = dns::start(&dns_pod, self.plan, &hosts, &self.dir.join("dnsmasq.log"))?;
        self.processes.push(dnsmasq);
        self.files.make_keys()?;
        Ok(())
    }

    /// The pod called `name` (a running one).
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

    /// Pod `name`'s address, also if it was removed.
    pub fn pod_address(&self, name: &str, ipv6: bool) -> Result<IpAddr> {
        let pod = self
            .pods
            .iter()
            .chain(&self.gone.0)
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name:?}"))?;
        Ok(if ipv6 { pod.ipv6.into() } else { pod.ipv4.into() })
    }

    /// Node `name`'s address in its pod networks, also if it was removed.
    pub fn node_address(&self, name: &str, ipv6: bool) -> Result<IpAddr> {
        let n = self
            .nodes
            .iter()
            .chain(&self.gone.2)
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name:?}"))?;
        let (gw4, gw6) = n.gateways();
        Ok(if ipv6 { gw6.into() } else { gw4.into() })
    }

    pub(super) fn node_net(&self, index: u8) -> Result<&NodeNet> {
        self.nodes
            .iter()
            .find(|n| n.index == index)
            .with_context(|| format!("no node{index}"))
    }

    /// Starts server-cluster, then server-external, and waits until they are
    /// connected to each other.
    pub fn start_servers(&mut self) -> Result<()> {
        self.start_server_cluster(None)?;
        self.start_server_external(Pair::This)
    }

    /// Starts server-cluster and waits for its takeover (and for server-external
    /// to link up with it, if that runs). Its pod's resolv.conf is the plan's
    /// unless `resolv_conf` says otherwise.
    pub fn start_server_cluster(&mut self, resolv_conf: Option<&str>) -> Result<()> {
        let before = self.running_mut("server-external").map(|p| servers::links_so_far(p));
        let pod = self.pod("teletun")?.clone();
        let resolv_conf = resolv_conf.map_or_else(|| self.plan.pod_resolv_conf(), str::to_owned);
        let p = servers::start_server_cluster(&self.teletun, &self.files, &pod, &resolv_conf)?;
        self.replace_process(p);
        match before {
            Some(n) => servers::wait_linked(self.process_mut("server-external")?, n),
            None => Ok(()),
        }
    }

    /// Starts server-external of `pair` on node1 (hostNetwork); this pair's
    /// waits to link up with server-cluster if that runs.
    pub fn start_server_external(&mut self, pair: Pair) -> Result<()> {
        let p = servers::start_server_external(&self.teletun, &self.files, &self.node, pair)?;
        self.replace_process(p);
        if pair == Pair::This && self.running_mut("server-cluster").is_some() {
            servers::wait_linked(self.process_mut("server-external")?, 0)?;
        }
        Ok(())
    }

    fn replace_process(&mut self, p: Background) {
        self.processes.retain(|old| old.name != p.name);
        self.processes.push(p);
    }

    /// A background process by name.
    pub fn process_mut(&mut self, name: &str) -> Result<&mut Background> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("{name} is not running"))
    }

    /// A background process by name, if it is still running.
    fn running_mut(&mut self, name: &str) -> Option<&mut Background> {
        let p = self.process_mut(name).ok()?;
        matches!(p.child.try_wait(), Ok(None)).then_some(p)
    }

    /// The client command line, run on the laptop: with a Kubernetes API
    /// exactly the seed's usage line; without, the overrides that replace discovery.
    pub fn client_command(&self, o: &ClientOptions) -> Result<Command> {
        let routes = self.plan.static_routes();
        let broken;
        let kubeconfig = self.kubeconfig();
        let discovery = match (&self.api, o.kubeconfig) {
            (Some(_), None) => Discovery::Kubernetes {
                kubeconfig: &kubeconfig,
                pod: o.pod.unwrap_or(EXTERNAL_POD),
            },
            (Some(_), Some(variant)) => {
                broken = api::broken_kubeconfig(&kubeconfig, variant)?;
                Discovery::Kubernetes {
                    kubeconfig: &broken,
                    pod: o.pod.unwrap_or(EXTERNAL_POD),
                }
            }
            (None, _) if o.pod.is_some() || o.kubeconfig.is_some() => {
                bail!("pod and kubeconfig need a Kubernetes API ([topology] kubernetes = true)")
            }
            (None, _) => Discovery::Direct {
                server: self.node_ip,
                routes: &routes,
            },
        };
        let cmd = self.laptop.cmd(&self.teletun);
        Ok(servers::client_command(
            cmd,
            &self.files,
            discovery,
            o.client_key,
            o.server_key,
            o.args,
        ))
    }

    /// The server-cluster ↔ server-external socket.
    pub fn sockfile(&self) -> PathBuf {
        PathBuf::from(self.files.sockfile())
    }

    /// server-cluster's own state directory, where its takeover record lives.
    pub fn server_cluster_state_dir(&self) -> PathBuf {
        self.files.state_dir()
    }

    /// The laptop's address on its uplink (on the home LAN, if it has one).
    pub fn laptop_address(&self) -> Ipv4Addr {
        match self.home {
            Some(_) => HomeLan.laptop_ip(),
            None => self.plan.laptop_link().0,
        }
    }

    /// The kubeconfig for the cluster's API.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Starts the Kubernetes control plane in node1 and publishes every
    /// object; services take the cluster IPs it allocates.
    fn start_api(&mut self, topology: &Topology) -> Result<()> {
        let api = ClusterApi::start(self.node_net(1)?, &self.dir, &self.kubeconfig(), topology, self.plan)?;
        for n in &self.nodes {
            api.put_node(n)?;
        }
        for p in &self.pods {
            api.put_pod(p, self.node_net(p.node)?)?;
        }
        for s in &mut self.services {
            s.ip = api.put_service(s, None)?;
        }
        self.api = Some(api);
        Ok(())
    }

    /// The cluster's Kubernetes API, if the topology asks for one.
    fn api(&self) -> Result<&ClusterApi> {
        self.api
            .as_ref()
            .context("this cluster has no Kubernetes API ([topology] kubernetes = true)")
    }

    /// kube-apiserver's release, if the cluster has an API.
    pub fn api_version(&self) -> Option<&str> {
        self.api.as_ref().map(ClusterApi::version)
    }

    /// Compacts the API's history and restarts it; waits until the client
    /// got 410 Gone and listed every kind it watches again. Returns how many.
    pub fn compact_api(&mut self) -> Result<u64> {
        self.api
            .as_mut()
            .context("this cluster has no Kubernetes API ([topology] kubernetes = true)")?
            .compact()
    }

    /// Gives the client's ServiceAccount the role of `docs/deploy/rbac.yaml`
    /// less the permissions in `without` ("VERB RESOURCE").
    pub fn set_client_role(&self, without: &[String]) -> Result<()> {
        self.api()?.set_client_role(without)
    }

    /// Lets the router reach node1 over IPv6 from every address of
    /// [`net::stranger_prefix`] (a stranger holding a whole /64); returns
    /// node1's address and the prefix. Idempotent.
    pub fn route_v6_prefix_from_router(&self) -> Result<(std::net::Ipv6Addr, ipnet::Ipv6Net)> {
        let node = self.nodes.first().context("the cluster has no node")?;
        net::wire_stranger_prefix(&self.router, node)?;
        Ok((node.ip6(), net::stranger_prefix()))
    }

    /// Impairs the underlay in the router from now on, replacing any earlier impairment.
    pub fn impair(&mut self, imp: &Impairment) -> Result<()> {
        let old = self
            .processes
            .iter()
            .position(|p| p.name == impairment::PROCESS)
            .map(|i| self.processes.remove(i));
        impairment::clear(&self.router, old);
        if let Some(p) = impairment::apply(&self.router, &self.dir, imp)? {
            self.processes.push(p);
        }
        Ok(())
    }

    /// Stops every process and deletes every namespace and file this cluster made.
    pub fn teardown(&mut self) {
        if std::mem::replace(&mut self.torn_down, true) {
            return;
        }
        for p in self.processes.iter_mut().rev() {
            p.signal(libc::SIGTERM);
        }
        for p in self.processes.iter_mut().rev() {
            let _ = p.wait(Duration::from_secs(3));
        }
        // The API before the rest, while its namespace is still there.
        self.api = None;
        self.processes.clear();
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
        if let Some(home) = &self.home {
            home.delete();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}
