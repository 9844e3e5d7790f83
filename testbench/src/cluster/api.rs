//! The cluster as the Kubernetes API sees it: Nodes, Pods, Services and a
//! ServiceCIDR published into the testbench's API server, kept in step with
//! what steps add and remove.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeSpec, NodeStatus, Pod as PodObject, PodIP, PodSpec, PodStatus, Service as ServiceObject,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::net::{NodeNet, Pod};
use super::plan::Plan;
use super::services::Service;
use crate::closed_set::closed_set;
use crate::kubeapi::{ApiOptions, ApiServer, Kind, API_PORT};
use crate::topology::Topology;

closed_set! {
    /// A broken kubeconfig for a client.
    pub enum BrokenKubeconfig("kubeconfig variant") {
        /// The right API with a token it does not accept.
        WrongToken = "wrong-token",
        /// A port where no API listens.
        Unreachable = "unreachable",
    }
}

/// Writes a copy of the kubeconfig `good` next to it, broken as `variant` says.
pub fn broken_kubeconfig(good: &Path, variant: BrokenKubeconfig) -> Result<PathBuf> {
    let text = std::fs::read_to_string(good).with_context(|| format!("cannot read {}", good.display()))?;
    let broken = match variant {
        BrokenKubeconfig::WrongToken => text
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
        BrokenKubeconfig::Unreachable => text.replace(&format!(":{API_PORT}"), ":6999"),
    };
    let path = good.with_file_name(format!("kubeconfig-{variant}"));
    std::fs::write(&path, broken).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The server-external pod's name in the Kubernetes API (it runs with hostNetwork).
pub const EXTERNAL_POD: &str = "teletun-external";

/// The Kubernetes namespace of a pod: the DNS pod lives in kube-system.
pub fn pod_namespace(name: &str) -> &'static str {
    if name == "dns" {
        "kube-system"
    } else {
        "default"
    }
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    }
}

/// The API server of one cluster, and how it describes the cluster.
pub struct ClusterApi {
    server: ApiServer,
    node_pod_cidrs: bool,
    service_cidrs: bool,
}

impl ClusterApi {
    /// Starts the API in node1's namespace at node1's address, writes its
    /// kubeconfig, and publishes the objects every cluster has besides its
    /// nodes, pods and services: server-external's pod, pods for the error
    /// paths (one pending, one on a node without addresses), and the ServiceCIDR.
    pub fn start(node: &NodeNet, kubeconfig: &Path, topology: &Topology, plan: Plan) -> Result<ClusterApi> {
        let server = ApiServer::start(
            &node.ns.path(),
            node.ip().into(),
            kubeconfig,
            ApiOptions {
                forbidden: topology.forbid.iter().map(|r| r.as_str().to_owned()).collect(),
                serve_service_cidrs: topology.service_cidrs,
            },
        )?;
        let api = ClusterApi {
            server,
            node_pod_cidrs: topology.node_pod_cidrs,
            service_cidrs: topology.service_cidrs,
        };
        if api.service_cidrs {
            let cidr = ServiceCIDR {
                metadata: meta("kubernetes", None),
                spec: Some(ServiceCIDRSpec {
                    cidrs: Some(vec![plan.service_cidr().to_string()]),
                }),
                ..Default::default()
            };
            api.server.put(Kind::ServiceCidr, &cidr)?;
        }
        let node_ip = node.ip().to_string();
        let external = PodObject {
            metadata: meta(EXTERNAL_POD, Some("default")),
            spec: Some(PodSpec {
                host_network: Some(true),
                node_name: Some(node.name.clone()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(node_ip.clone()),
                pod_ips: Some(vec![PodIP { ip: node_ip.clone() }]),
                host_ip: Some(node_ip),
                ..Default::default()
            }),
        };
        api.server.put(Kind::Pod, &external)?;
        let mut pending = external.clone();
        pending.metadata = meta("teletun-pending", Some("default"));
        pending.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        api.server.put(Kind::Pod, &pending)?;
        let mut nowhere = external;
        nowhere.metadata = meta("teletun-nowhere", Some("default"));
        if let Some(spec) = nowhere.spec.as_mut() {
            spec.node_name = Some("node-without-address".into());
        }
        api.server.put(Kind::Pod, &nowhere)?;
        let bare = Node {
            metadata: meta("node-without-address", None),
            ..Default::default()
        };
        api.server.put(Kind::Node, &bare)?;
        Ok(api)
    }

    /// Publishes (or replaces) a node with its addresses and pod networks.
    pub fn put_node(&self, n: &NodeNet) -> Result<()> {
        let cidrs = self
            .node_pod_cidrs
            .then(|| n.pod_cidrs().iter().map(|c| c.to_string()).collect::<Vec<_>>());
        let address = |type_: &str, address: String| NodeAddress {
            type_: type_.into(),
            address,
        };
        let node = Node {
            metadata: meta(&n.name, None),
            spec: Some(NodeSpec {
                pod_cidr: cidrs.as_ref().map(|c| c[0].clone()),
                pod_cidrs: cidrs,
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    address("InternalIP", format!("172.31.0.{}", 10 + n.index)),
                    address("ExternalIP", n.ip().to_string()),
                    address("Hostname", n.name.clone()),
                ]),
                ..Default::default()
            }),
        };
        self.server.put(Kind::Node, &node)
    }

    /// Publishes a running pod on `node`.
    pub fn put_pod(&self, p: &Pod, node: &NodeNet) -> Result<()> {
        let pod = PodObject {
            metadata: meta(&p.name, Some(pod_namespace(&p.name))),
            spec: Some(PodSpec {
                node_name: Some(node.name.clone()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(p.ipv4.to_string()),
                pod_ips: Some(vec![PodIP { ip: p.ipv4.to_string() }, PodIP { ip: p.ipv6.to_string() }]),
                host_ip: Some(node.ip().to_string()),
                ..Default::default()
            }),
        };
        self.server.put(Kind::Pod, &pod)
    }

    /// Publishes a service with its cluster IP and ports.
    pub fn put_service(&self, s: &Service) -> Result<()> {
        let port = |name: Option<&str>, protocol: &str| ServicePort {
            name: name.map(str::to_owned),
            port: i32::from(s.port),
            protocol: Some(protocol.into()),
            ..Default::default()
        };
        let mut ports = vec![port(None, "TCP")];
        if s.udp {
            ports.push(port(Some("udp"), "UDP"));
        }
        let service = ServiceObject {
            metadata: meta(&s.name, Some(&s.namespace)),
            spec: Some(ServiceSpec {
                cluster_ip: Some(s.ip.to_string()),
                cluster_ips: Some(vec![s.ip.to_string()]),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.server.put(Kind::Service, &service)
    }

    /// Deletes a node.
    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.server.delete(Kind::Node, None, name)
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, name: &str) -> Result<()> {
        self.server.delete(Kind::Pod, Some(pod_namespace(name)), name)
    }

    /// Deletes a service.
    pub fn delete_service(&self, s: &Service) -> Result<()> {
        self.server.delete(Kind::Service, Some(&s.namespace), &s.name)
    }

    /// Makes the API forget its history and drop its watches; waits until
    /// the watchers got 410 Gone and listed again. Returns how many did.
    pub fn compact(&self) -> Result<u64> {
        let (gone, lists) = self.server.counters();
        self.server.compact();
        // The client watches nodes, pods and services, and ServiceCIDRs where served.
        let watched = if self.service_cidrs { 4 } else { 3 };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (g, l) = self.server.counters();
            if g - gone >= watched && l - lists >= watched {
                return Ok(g - gone);
            }
            if Instant::now() > deadline {
                bail!(
                    "after compaction, {} watches got 410 Gone and {} lists followed; expected {watched} each",
                    g - gone,
                    l - lists
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
