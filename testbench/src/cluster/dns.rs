//! The cluster's DNS: dnsmasq in the dns pod, answering for the cluster's
//! domain from a hosts file the testbench rewrites as pods and services come
//! and go (NXDOMAIN for any other name in the domain).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::net::Pod;
use super::plan::Plan;
use super::services::Service;
use crate::exec::{self, Background};

/// The name of dnsmasq's background process (and of its log).
pub const PROCESS: &str = "dnsmasq";

/// The cluster's DNS records, as a hosts file dnsmasq reads.
pub fn hosts(plan: Plan, services: &[Service], pods: &[Pod]) -> String {
    let domain = plan.domain();
    let mut hosts = String::new();
    for s in services {
        hosts.push_str(&format!("{} {}.{}.svc.{domain}\n", s.ip, s.name, s.namespace));
    }
    for p in pods {
        hosts.push_str(&format!(
            "{} {}.pod.{domain}\n{} {}.pod.{domain}\n",
            p.ipv4, p.name, p.ipv6, p.name
        ));
    }
    hosts
}

/// Starts dnsmasq in `pod` with the records in `hosts_file`; returns once it
/// listens on port 53.
pub fn start(pod: &Pod, plan: Plan, hosts_file: &Path, log: &Path) -> Result<Background> {
    let mut cmd = pod.ns.cmd("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--user=root",
        "--bind-interfaces",
        "--log-facility=-",
        "--log-queries",
    ])
    .arg(format!("--listen-address={}", pod.ipv4))
    .arg(format!("--local=/{}/", plan.domain()))
    .arg(format!("--addn-hosts={}", hosts_file.display()));
    let mut p = Background::spawn(PROCESS, cmd, log)?;
    // dnsmasq has no readiness line when logging to stderr: wait for its socket.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listens_on_port_53(pod)? {
        if let Some(status) = p.child.try_wait()? {
            bail!("dnsmasq exited ({status}): {}", exec::last_lines(&p.log_text(), 3));
        }
        if Instant::now() > deadline {
            bail!("dnsmasq did not start listening within 10 s");
        }
        exec::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(p)
}

/// Whether a UDP socket in the pod's namespace is bound to port 53 (read from
/// the namespace's own /proc/net/udp, as `ss` would).
fn listens_on_port_53(pod: &Pod) -> Result<bool> {
    let table = pod
        .ns
        .enter(|| std::fs::read_to_string("/proc/thread-self/net/udp"))??;
    // Lines: "sl local_address rem_address st …", addresses as HEXIP:HEXPORT.
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|local| local.ends_with(":0035")))
}
