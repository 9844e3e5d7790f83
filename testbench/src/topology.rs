//! How a case's cluster is built: the `[topology]` table of a scenario file.
//! Both the scenario loader and the cluster builder use it, so it lives apart
//! from both.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::closed_set::closed_set;

closed_set! {
    /// The laptop's DNS manager.
    pub enum DnsManager("DNS manager") {
        /// Debian's `resolvconf` package: `/etc/resolv.conf` → `/run/resolvconf/resolv.conf`.
        Debian = "debian",
        /// `openresolv`: writes `/etc/resolv.conf` itself.
        Openresolv = "openresolv",
        /// systemd-resolved on a private system D-Bus; `/etc/resolv.conf` → its stub.
        Resolved = "systemd-resolved",
    }
}

/// The most nodes a cluster may have (node K's underlay address is 203.0.113.(10+K)).
pub const MAX_NODES: u8 = 50;
/// The most clusters that may share the laptop (`a` … `h`).
pub const MAX_CLUSTERS: u8 = 8;

/// How the cluster of a case is built.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The laptop's DNS manager.
    #[serde(default = "debian")]
    pub resolvconf: DnsManager,
    /// Run a real Kubernetes control plane (etcd and kube-apiserver) that
    /// describes the cluster; clients then use only the seed's usage line
    /// (`-kubeconfig`, `-pod`), no `--server-address` or `--route`.
    #[serde(default)]
    pub kubernetes: bool,
    /// Nodes carry `spec.podCIDRs` (else clients route each pod IP).
    #[serde(default = "yes")]
    pub node_pod_cidrs: bool,
    /// The API serves networking.k8s.io/v1 ServiceCIDRs (else it emulates
    /// Kubernetes 1.33 with them switched off, and clients route each service IP).
    #[serde(default = "yes")]
    pub service_cidrs: bool,
    /// How many nodes (node1 runs the servers), 1 to 50.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 50))]
    pub nodes: u8,
    /// How many clusters share the laptop (`a`, `b`, … with distinct networks
    /// and domains; see the `use-cluster` step), 1 to 8.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 8))]
    pub clusters: u8,
    /// The laptop sits on a home LAN: behind a home router with NAT and a LAN
    /// resolver registered as DHCP would (the first cluster's uplink). Turning
    /// it off needs `no_lan_because`.
    #[serde(default = "yes")]
    pub lan: bool,
    /// Why this scenario's laptop has no home LAN (required with `lan = false`).
    pub no_lan_because: Option<String>,
    /// The home router's conntrack timeout for UDP, in seconds (the kernel's
    /// default when not given): how long an idle NAT mapping lives.
    pub nat_udp_timeout: Option<u32>,
}

fn one() -> u8 {
    1
}

fn yes() -> bool {
    true
}

fn debian() -> DnsManager {
    DnsManager::Debian
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            resolvconf: DnsManager::Debian,
            kubernetes: false,
            node_pod_cidrs: true,
            service_cidrs: true,
            nodes: 1,
            clusters: 1,
            lan: true,
            no_lan_because: None,
            nat_udp_timeout: None,
        }
    }
}
