//! Finding server-external: its pod, that pod's node, and the node's address.

use std::net::IpAddr;

use anyhow::anyhow;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;

use super::Kube;

/// Why server-external could not be found.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub struct LookupError {
    /// What went wrong.
    pub error: anyhow::Error,
    /// Trying again will not help: the pod is gone, or the API refuses us.
    pub lasting: bool,
    /// The pod is not there (404): lasting for a first lookup, but a pod
    /// may be recreated under its name.
    pub gone: bool,
}

/// Whether the API's answer will be the same next time: not found, or not allowed.
fn lasting(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 401 | 403 | 404))
}

/// The address to dial: the ExternalIP of the node that runs pod `name`,
/// else its InternalIP.
pub async fn server_address(kube: &Kube, name: &str) -> Result<IpAddr, LookupError> {
    let ns = kube.namespace.as_str();
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), ns);
    let passing = |error: anyhow::Error| LookupError {
        error,
        lasting: false,
        gone: false,
    };
    let pod = match pods.get(name).await {
        Ok(p) => p,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            return Err(LookupError {
                error: anyhow!(
                    "pod {name} not found in namespace {ns}: is server-external deployed there? (-pod, --namespace)"
                ),
                lasting: true,
                gone: true,
            })
        }
        Err(e) => {
            let lasting = lasting(&e);
            return Err(LookupError {
                error: kube.explain(e, "get", "pods", Some(ns)),
                lasting,
                gone: false,
            });
        }
    };
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    if phase != "Running" {
        return Err(passing(anyhow!(
            "pod {ns}/{name} is {phase}, not Running: wait until server-external runs"
        )));
    }
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| passing(anyhow!("pod {ns}/{name} is not on a node")))?;
    let nodes: Api<Node> = Api::all(kube.client.clone());
    let node = nodes.get(&node_name).await.map_err(|e| {
        let lasting = lasting(&e);
        LookupError {
            error: kube.explain(e, "get", "nodes", None),
            lasting,
            gone: false,
        }
    })?;
    node_address(&node).ok_or_else(|| {
        passing(anyhow!(
            "node {node_name} has no ExternalIP or InternalIP address; pass --server-address ADDR"
        ))
    })
}

/// A node's ExternalIP, else its InternalIP.
pub fn node_address(node: &Node) -> Option<IpAddr> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    ["ExternalIP", "InternalIP"].iter().find_map(|kind| {
        addresses
            .iter()
            .filter(|a| a.type_ == *kind)
            .find_map(|a| a.address.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn external_ip_wins_then_internal_ip() {
        let n = node(&[
            ("InternalIP", "10.0.0.2"),
            ("Hostname", "n1"),
            ("ExternalIP", "203.0.113.7"),
        ]);
        assert_eq!(node_address(&n), Some("203.0.113.7".parse().unwrap()));
        let n = node(&[("Hostname", "n1"), ("InternalIP", "10.0.0.2")]);
        assert_eq!(node_address(&n), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(node_address(&node(&[("Hostname", "n1")])), None);
        assert_eq!(node_address(&Node::default()), None);
    }
}
