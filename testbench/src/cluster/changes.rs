//! Pods, services and nodes that come and go while clients run: each change
//! reaches the network, kube-proxy's rules, the DNS records and the API.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::net::{self, NodeNet, Pod};
use super::plan::{ECHO_PORT, HTTP_PORT};
use super::services::{self, Service};
use super::{dns, Cluster};
use crate::exec::Background;
use crate::netns::Netns;

impl Cluster {
    /// Creates node `k` (in `ns`, or a new namespace) and wires it to the others.
    pub(super) fn add_node_numbered(&mut self, k: u8, ns: Option<Netns>) -> Result<()> {
        let ns = match ns {
            Some(ns) => ns,
            None => Netns::create(&format!("{}-node{k}", self.id))?,
        };
        let n = NodeNet {
            name: format!("node{k}"),
            ns,
            index: k,
            plan: self.plan,
        };
        // Owned by the cluster from here on, so teardown removes it even if wiring fails.
        self.nodes.push(n.clone());
        net::wire_node(&self.router, &n, &self.nodes)
    }

    /// Adds the next node, with its pod networks, to the cluster (and the API).
    pub fn add_node(&mut self) -> Result<String> {
        let k = self.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        self.add_node_numbered(k, None)?;
        self.sync_services()?;
        let name = format!("node{k}");
        if let Some(api) = &self.api {
            api.put_node(self.nodes.last().expect("just added"))?;
        }
        self.changed_at.insert(format!("node:{name}"), Instant::now());
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
        net::unroute_node(&self.nodes, &node)?;
        node.ns.delete();
        if let Some(api) = &self.api {
            api.delete_node(name)?;
        }
        self.changed_at.insert(format!("node:{name}"), Instant::now());
        self.gone.2.push(node);
        Ok(())
    }

    /// Creates pod `name` with host number `host` on node `k`'s bridge.
    pub(super) fn add_pod_at(&mut self, name: &str, k: u8, host: u8) -> Result<()> {
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod {name:?} exists already");
        }
        let node = self.node_net(k)?.clone();
        let pod = Pod {
            name: name.into(),
            ns: Netns::create(&format!("{}-pod-{name}", self.id))?,
            ipv4: self.plan.pod_v4(k, host),
            ipv6: self.plan.pod_v6(k, host),
            node: k,
        };
        // Owned by the cluster from here on, so teardown removes it even if wiring fails.
        self.pods.push(pod.clone());
        net::wire_pod(&node, &pod)
    }

    /// Adds a pod running the app agent (echo, HTTP, blobs) at the next free
    /// address on `node` (`node1` when not given).
    pub fn add_app_pod(&mut self, name: &str, node: Option<&str>) -> Result<()> {
        let k = match node {
            None => 1,
            Some(n) => n
                .strip_prefix("node")
                .and_then(|i| i.parse::<u8>().ok())
                .filter(|k| self.nodes.iter().any(|n| n.index == *k))
                .with_context(|| format!("no node {n:?}"))?,
        };
        let taken = self.pods.iter().filter(|p| p.node == k).map(|p| p.ipv4.octets()[3]);
        let host = taken.max().unwrap_or(9).max(9) + 1;
        self.add_pod_at(name, k, host)?;
        self.start_app(name)?;
        self.sync_dns()?;
        if let Some(api) = &self.api {
            api.put_pod(self.pod(name)?, self.node_net(k)?)?;
        }
        self.changed_at.insert(name.to_owned(), Instant::now());
        Ok(())
    }

    /// What Pod Security admission says of `docs/deploy/`'s server pods.
    pub fn pod_security(&self) -> Result<Vec<crate::controlplane::podsecurity::Verdict>> {
        self.api()?.pod_security()
    }

    /// Publishes a pod object claiming `ips` (nothing behind it).
    pub fn claim_pod(&self, name: &str, ips: &[std::net::IpAddr]) -> Result<()> {
        let node = self.node_net(1)?;
        self.api()?.put_claimed_pod(name, ips, node)
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
            api.delete_pod(name)?;
        }
        self.changed_at.insert(name.to_owned(), Instant::now());
        self.gone.0.push(pod);
        self.sync_dns()
    }

    /// Adds a service for `pod`'s `target_port`: at the cluster IP the API
    /// allocates, or without an API the next free one.
    /// `ports` are the service's and the pod's; `cluster_ip` is asked of the API.
    pub fn add_service(
        &mut self,
        name: &str,
        namespace: &str,
        pod: &str,
        (port, target_port): (u16, u16),
        cluster_ip: Option<Ipv4Addr>,
    ) -> Result<()> {
        if self.services.iter().any(|s| s.name == name && s.namespace == namespace) {
            bail!("service {namespace}/{name} exists already");
        }
        self.pod(pod)?;
        let mut service = Service {
            name: name.into(),
            namespace: namespace.into(),
            ip: Ipv4Addr::UNSPECIFIED,
            pod: pod.into(),
            port,
            target_port,
            udp: false,
        };
        // With an API, the address it allocates (or the one asked for); the
        // plan's next free one is only for clusters without (allocated
        // addresses may end in .255, past what the plan counts).
        service.ip = match (&self.api, cluster_ip) {
            (Some(api), requested) => api.put_service(&service, requested)?,
            (None, Some(_)) => bail!("cluster_ip needs a Kubernetes API"),
            (None, None) => self.plan.service_ip(services::next_host(&self.services)),
        };
        self.services.push(service);
        self.sync_services()?;
        self.sync_dns()?;
        self.changed_at.insert(format!("service:{name}"), Instant::now());
        Ok(())
    }

    /// Adds a ServiceCIDR to the API, ready to allocate from.
    pub fn add_service_cidr(&self, name: &str, cidr: &str) -> Result<()> {
        self.api
            .as_ref()
            .context("this cluster has no Kubernetes API ([topology] kubernetes = true)")?
            .put_service_cidr(name, cidr)
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
            api.delete_service(&service)?;
        }
        self.changed_at.insert(format!("service:{name}"), Instant::now());
        self.gone.1.push(service);
        self.sync_services()?;
        self.sync_dns()
    }

    /// Rewrites kube-proxy's DNAT table in every node from the service list.
    pub(super) fn sync_services(&self) -> Result<()> {
        let table = services::dnat_table(&self.services, &self.pods);
        services::install(&self.nodes, &table, &self.dir.join("kube-proxy.nft"))
    }

    /// Rewrites the DNS records and makes dnsmasq reread them.
    fn sync_dns(&mut self) -> Result<()> {
        std::fs::write(
            self.dir.join("dns-hosts"),
            dns::hosts(self.plan, &self.services, &self.pods),
        )?;
        if let Ok(p) = self.process_mut(dns::PROCESS) {
            p.signal(libc::SIGHUP);
        }
        Ok(())
    }

    /// Starts the app agent in pod `name`.
    pub(super) fn start_app(&mut self, name: &str) -> Result<()> {
        let me = std::env::current_exe()?;
        let mut cmd = self.pod(name)?.ns.cmd(&me);
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
}
