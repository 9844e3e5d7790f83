//! Steps that change the cluster while clients run.

use schemars::JsonSchema;
use serde::Deserialize;

use super::super::defaults;

/// Add a pod running the app agent (echo, HTTP, blobs) to the cluster, with
/// its DNS name and its API object.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddPod {
    /// Its name.
    pub name: String,
    /// Its node (`node1` when not given).
    pub node: Option<String>,
}

/// Publish a pod object whose status claims `ips` (a broken or hostile
/// cluster: any address, public ones too), with nothing behind it: the
/// client must route none of them that is not a cluster's to route.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimPod {
    /// Its name.
    pub name: String,
    /// The addresses its `status.podIPs` claims.
    pub ips: Vec<std::net::IpAddr>,
}

/// Remove a pod with its DNS name and API object.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovePod {
    /// Its name.
    pub name: String,
}

/// Add a service for a pod's port: a DNAT rule and `NAME.NAMESPACE.svc.DOMAIN`,
/// at the cluster IP the API allocates (without an API, the next free one).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddService {
    /// Its name.
    pub name: String,
    /// Kubernetes namespace.
    #[serde(default = "defaults::default_namespace")]
    pub namespace: String,
    /// The pod behind it.
    pub pod: String,
    /// Service port.
    #[serde(default = "defaults::port_80")]
    pub port: u16,
    /// The pod's port.
    #[serde(default = "defaults::http_port")]
    pub target_port: u16,
    /// Ask the API for this cluster IP (it must lie in one of its
    /// ServiceCIDRs); needs a Kubernetes API.
    pub cluster_ip: Option<std::net::Ipv4Addr>,
}

/// Add a ServiceCIDR to the API (networking.k8s.io/v1), as an admin growing the
/// service network does, and mark it Ready as kube-controller-manager would.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddServiceCidr {
    /// Its name.
    pub name: String,
    /// The IPv4 network (`10.100.0.0/24`).
    pub cidr: String,
}

/// Remove a service: its DNAT rules and its DNS name.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveService {
    /// Its name.
    pub name: String,
}

/// Add the next node (`nodeN`) with its pod networks, routed between nodes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNode {}

/// Remove a node (not node1) with its pods.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveNode {
    /// Its name (`node2`, …).
    pub name: String,
}

/// Act on cluster `name` (`a`, `b`, … with `[topology] clusters`) from now on.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UseCluster {
    /// The cluster.
    pub name: String,
}

/// Compact etcd's history and restart kube-apiserver (as an upgrade or a
/// crash does): the client's watches get 410 Gone, and it must list every
/// kind it watches again (checked in the API's audit log).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompactApi {}

/// Give the client's ServiceAccount the ClusterRole of
/// `docs/deploy/rbac.yaml`, less the permissions in `without`; waits until the
/// API's authorizer answers accordingly.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientRole {
    /// Permissions taken out, each "VERB RESOURCE" as the role grants it
    /// ("watch pods", "list servicecidrs").
    #[serde(default)]
    pub without: Vec<String>,
}

/// Create each server pod of `docs/deploy/teletun-servers.yaml` with a
/// server-side dry run in namespaces enforcing each Pod Security level,
/// strictest first: `pod` must be admitted first at `lowest`, and the level
/// just stricter must refuse it for exactly the checks `stricter_refuses`
/// (so that a manifest needing more is a failure).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PodSecurity {
    /// The pod's name in the manifest.
    pub pod: String,
    /// `restricted`, `baseline` or `privileged`.
    pub lowest: String,
    /// The kinds of check the level just stricter refuses, as the admission
    /// names them ("host namespaces", "hostPath volumes", …); empty for
    /// `restricted`.
    #[serde(default)]
    pub stricter_refuses: Vec<String>,
}
