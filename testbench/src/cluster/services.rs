//! Services: cluster IPs DNAT-ed to pod ports by nft rules in every node, as
//! kube-proxy would install them.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};

use super::net::{NodeNet, Pod};
use super::plan::{Plan, HTTP_PORT};

/// A service: a cluster IP DNAT-ed to a pod port.
#[derive(Clone, Debug)]
pub struct Service {
    /// Name (`NAME.NAMESPACE.svc.DOMAIN`).
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

/// The services every cluster starts with: `web` (the app pod's HTTP) and
/// `kube-dns` (the DNS pod).
pub fn built_in(plan: Plan) -> Vec<Service> {
    vec![
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
            ip: plan.dns_ip(),
            pod: "dns".into(),
            port: 53,
            target_port: 53,
            udp: true,
        },
    ]
}

/// The next free cluster IP's host number (services made by steps start at .30).
pub fn next_host(services: &[Service]) -> u8 {
    services.iter().map(|s| s.ip.octets()[3]).max().unwrap_or(29).max(29) + 1
}

/// kube-proxy's table for these services: replaced as a whole each time.
/// Services whose pod is gone get no rule.
pub fn dnat_table(services: &[Service], pods: &[Pod]) -> String {
    let mut rules = String::new();
    for s in services {
        let Some(pod) = pods.iter().find(|p| p.name == s.pod) else {
            continue;
        };
        for proto in ["tcp"].into_iter().chain(s.udp.then_some("udp")) {
            rules.push_str(&format!(
                "    ip daddr {} {proto} dport {} dnat to {}:{}\n",
                s.ip, s.port, pod.ipv4, s.target_port
            ));
        }
    }
    // Declaring the table first lets `delete` succeed on the first run too.
    format!(
        "table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {{\n  chain prerouting {{\n    \
         type nat hook prerouting priority dstnat;\n{rules}  }}\n}}\n"
    )
}

/// Installs the table in every node (`file` holds it, for nft and for the logs).
pub fn install(nodes: &[NodeNet], table: &str, file: &Path) -> Result<()> {
    std::fs::write(file, table).with_context(|| format!("cannot write {}", file.display()))?;
    for n in nodes {
        n.ns.run("nft", &["-f", &file.to_string_lossy()])
            .context("cannot install service DNAT rules (is nftables installed?)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_the_services_and_skip_missing_pods() {
        let plan = Plan { index: 0 };
        let services = built_in(plan);
        assert_eq!(services[1].ip.to_string(), "10.96.0.10");
        assert_eq!(next_host(&services), 30);
        // No pods: no rules, but a valid table that replaces the old one.
        let empty = dnat_table(&services, &[]);
        assert!(empty.contains("delete table ip kube-proxy") && !empty.contains("dnat"));
        assert_eq!(built_in(Plan { index: 1 })[0].ip.to_string(), "10.97.0.20");
    }
}
