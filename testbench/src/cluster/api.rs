//! The cluster as the Kubernetes API sees it: Nodes, Pods and Services written
//! into a real kube-apiserver (the `controlplane`), as kubelets and controllers
//! would, and kept in step with what steps add and remove.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{
    Container, HostIP, Node, NodeAddress, NodeSpec, NodeStatus, Pod as PodObject, PodIP, PodSpec, PodStatus,
    Service as ServiceObject, ServicePort, ServiceSpec,
};
use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec, ServiceCIDRStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};

use super::net::{NodeNet, Pod};
use super::plan::Plan;
use super::services::Service;
use crate::closed_set::closed_set;
use crate::controlplane::{ControlPlane, Options, API_PORT};
use crate::topology::Topology;

closed_set! {
    /// A broken kubeconfig for a client.
    pub enum BrokenKubeconfig("kubeconfig variant") {
        /// The right API with a token it does not accept.
        WrongToken = "wrong-token",
        /// A port where no API listens.
        Unreachable = "unreachable",
        /// The right API, its certificate unchecked (`insecure-skip-tls-verify`).
        Insecure = "insecure",
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
        BrokenKubeconfig::Insecure => text
            .lines()
            .map(|l| match l.split_once("certificate-authority-data:") {
                Some((indent, _)) => format!("{indent}insecure-skip-tls-verify: true"),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
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

/// A pod bound to `node`, as the scheduler leaves it (no status yet).
fn pod_spec(name: &str, namespace: &str, node: &str, host_network: bool) -> PodObject {
    PodObject {
        metadata: meta(name, Some(namespace)),
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            host_network: host_network.then_some(true),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "main".into(),
                // Never pulled: no kubelet runs; the testbench runs the pod's processes.
                image: Some("teletun-testbench.invalid/pod".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// A running pod's status, as its kubelet writes it.
fn running(name: &str, namespace: &str, ips: &[String], host_ip: &str) -> PodObject {
    PodObject {
        metadata: meta(name, Some(namespace)),
        spec: None,
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ips.first().cloned(),
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
            host_ip: Some(host_ip.into()),
            host_ips: Some(vec![HostIP { ip: host_ip.into() }]),
            ..Default::default()
        }),
    }
}

/// The control plane of one cluster, and how it describes the cluster.
pub struct ClusterApi {
    control_plane: ControlPlane,
    node_pod_cidrs: bool,
    service_cidrs: bool,
    dns_ip: Ipv4Addr,
}

impl ClusterApi {
    /// Starts the control plane in node1's namespace at node1's address
    /// (files in `dir`), writes the client's kubeconfig (a ServiceAccount
    /// bound to `docs/deploy/rbac.yaml`'s role), and publishes the objects
    /// every cluster has besides its nodes, pods and services:
    /// server-external's pod, and pods for the error paths (one pending, one
    /// on a node without addresses).
    pub fn start(node: &NodeNet, dir: &Path, kubeconfig: &Path, topology: &Topology, plan: Plan) -> Result<ClusterApi> {
        let options = Options {
            service_cidr: plan.service_cidr(),
            serve_service_cidrs: topology.service_cidrs,
        };
        let control_plane = ControlPlane::start(&node.ns, node.ip().into(), dir, options)?;
        control_plane.client_kubeconfig(kubeconfig)?;
        let api = ClusterApi {
            control_plane,
            node_pod_cidrs: topology.node_pod_cidrs,
            service_cidrs: topology.service_cidrs,
            dns_ip: plan.dns_ip(),
        };
        let cp = &api.control_plane;
        let node_ip = node.ip().to_string();
        cp.apply(&pod_spec(EXTERNAL_POD, "default", &node.name, true))?;
        cp.apply_status(&running(
            EXTERNAL_POD,
            "default",
            std::slice::from_ref(&node_ip),
            &node_ip,
        ))?;
        cp.apply(&pod_spec("teletun-pending", "default", &node.name, true))?;
        // A node whose kubelet reports no address still has its pod network
        // (node 200's), as kube-controller-manager would have assigned it.
        let spare = api
            .node_pod_cidrs
            .then(|| plan.pod_cidrs(200).iter().map(|c| c.to_string()).collect::<Vec<_>>());
        cp.apply(&Node {
            metadata: meta("node-without-address", None),
            spec: Some(NodeSpec {
                pod_cidrs: spare,
                ..Default::default()
            }),
            ..Default::default()
        })?;
        cp.apply(&pod_spec("teletun-nowhere", "default", "node-without-address", true))?;
        cp.apply_status(&running(
            "teletun-nowhere",
            "default",
            std::slice::from_ref(&node_ip),
            &node_ip,
        ))?;
        Ok(api)
    }

    /// kube-apiserver's release (`gitVersion` from `/version`).
    pub fn version(&self) -> &str {
        &self.control_plane.version
    }

    /// Registers a node with its pod networks (spec) and addresses (status).
    pub fn put_node(&self, n: &NodeNet) -> Result<()> {
        let cidrs = self
            .node_pod_cidrs
            .then(|| n.pod_cidrs().iter().map(|c| c.to_string()).collect::<Vec<_>>());
        let address = |type_: &str, address: String| NodeAddress {
            type_: type_.into(),
            address,
        };
        self.control_plane.apply(&Node {
            metadata: meta(&n.name, None),
            spec: Some(NodeSpec {
                pod_cidr: cidrs.as_ref().map(|c| c[0].clone()),
                pod_cidrs: cidrs,
                ..Default::default()
            }),
            status: None,
        })?;
        self.control_plane.apply_status(&Node {
            metadata: meta(&n.name, None),
            spec: None,
            status: Some(NodeStatus {
                addresses: Some(vec![
                    address("InternalIP", format!("172.31.0.{}", 10 + n.index)),
                    address("ExternalIP", n.ip().to_string()),
                    address("Hostname", n.name.clone()),
                ]),
                ..Default::default()
            }),
        })?;
        Ok(())
    }

    /// Creates a pod on `node` and writes its status: running, with its addresses.
    pub fn put_pod(&self, p: &Pod, node: &NodeNet) -> Result<()> {
        let ns = pod_namespace(&p.name);
        self.control_plane.apply(&pod_spec(&p.name, ns, &node.name, false))?;
        let ips = [p.ipv4.to_string(), p.ipv6.to_string()];
        self.control_plane
            .apply_status(&running(&p.name, ns, &ips, &node.ip().to_string()))?;
        Ok(())
    }

    /// Publishes a running pod on node1 whose status claims `ips`, with no
    /// pod network behind it.
    pub fn put_claimed_pod(&self, name: &str, ips: &[std::net::IpAddr], node: &NodeNet) -> Result<()> {
        let ns = pod_namespace(name);
        self.control_plane.apply(&pod_spec(name, ns, &node.name, false))?;
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        self.control_plane
            .apply_status(&running(name, ns, &ips, &node.ip().to_string()))?;
        Ok(())
    }

    /// Creates a service; returns the cluster IP the API allocated, or the
    /// one `requested` (the DNS service asks for the service network's tenth
    /// address, as kubeadm does).
    pub fn put_service(&self, s: &Service, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        let port = |name: Option<&str>, protocol: &str| ServicePort {
            name: name.map(str::to_owned),
            port: i32::from(s.port),
            protocol: Some(protocol.into()),
            ..Default::default()
        };
        let mut ports = vec![port(s.udp.then_some("tcp"), "TCP")];
        if s.udp {
            ports.push(port(Some("udp"), "UDP"));
        }
        let fixed = match requested {
            Some(ip) => Some(ip.to_string()),
            None => (s.name == "kube-dns").then(|| self.dns_ip.to_string()),
        };
        let stored = self.control_plane.apply(&ServiceObject {
            metadata: meta(&s.name, Some(&s.namespace)),
            spec: Some(ServiceSpec {
                cluster_ip: fixed,
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        })?;
        let ip = stored.spec.and_then(|spec| spec.cluster_ip).unwrap_or_default();
        ip.parse()
            .with_context(|| format!("the API gave service {} no IPv4 cluster IP ({ip:?})", s.name))
    }

    /// Creates a ServiceCIDR and marks it Ready, as kube-controller-manager's
    /// ServiceCIDR controller does (the API's allocator takes addresses only
    /// from Ready ones).
    pub fn put_service_cidr(&self, name: &str, cidr: &str) -> Result<()> {
        let created = self.control_plane.apply(&ServiceCIDR {
            metadata: meta(name, None),
            spec: Some(ServiceCIDRSpec {
                cidrs: Some(vec![cidr.to_owned()]),
            }),
            status: None,
        })?;
        let since = created
            .metadata
            .creation_timestamp
            .context("a ServiceCIDR without a creation time")?;
        self.control_plane.apply_status(&ServiceCIDR {
            metadata: meta(name, None),
            spec: None,
            status: Some(ServiceCIDRStatus {
                conditions: Some(vec![Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    message: "Kubernetes Service CIDR is ready".into(),
                    last_transition_time: since,
                    observed_generation: None,
                    reason: String::new(),
                }]),
            }),
        })?;
        Ok(())
    }

    /// Deletes a node.
    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.control_plane.delete::<Node>(None, name)
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, name: &str) -> Result<()> {
        self.control_plane.delete::<PodObject>(Some(pod_namespace(name)), name)
    }

    /// Deletes a service.
    pub fn delete_service(&self, s: &Service) -> Result<()> {
        self.control_plane.delete::<ServiceObject>(Some(&s.namespace), &s.name)
    }

    /// Gives the client's account the shipped role less `without`.
    pub fn set_client_role(&self, without: &[String]) -> Result<()> {
        self.control_plane.set_client_role(without)
    }

    /// Dry runs of `docs/deploy/`'s server pods under each Pod Security level.
    pub fn pod_security(&self) -> Result<Vec<crate::controlplane::podsecurity::Verdict>> {
        self.control_plane.pod_security()
    }

    /// Compacts etcd and restarts kube-apiserver; waits until the client
    /// listed every kind it watches again (its watches got 410 Gone). Returns
    /// how many kinds it listed again.
    pub fn compact(&mut self) -> Result<u64> {
        let from = self.control_plane.compact_and_restart()?;
        let watched: &[&str] = if self.service_cidrs {
            &["nodes", "pods", "services", "servicecidrs"]
        } else {
            &["nodes", "pods", "services"]
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.control_plane.audit_events()?;
            let since = events.get(from..).unwrap_or_default();
            let relisted: Vec<&str> = watched
                .iter()
                .copied()
                .filter(|r| {
                    since
                        .iter()
                        .any(|(verb, res, code)| verb == "list" && res == r && *code == 200)
                })
                .collect();
            if relisted.len() == watched.len() {
                return Ok(relisted.len() as u64);
            }
            if Instant::now() > deadline {
                bail!(
                    "after the compaction and restart the client listed only {relisted:?} again within 20 s; it watches {watched:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
