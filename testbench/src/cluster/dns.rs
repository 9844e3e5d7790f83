//! The DNS servers: the cluster's (dnsmasq in the dns pod, answering for the
//! cluster's domain from a hosts file the testbench rewrites as pods and
//! services come and go, NXDOMAIN for any other name in the domain), and the
//! home LAN's (dnsmasq in the home router).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::net::Pod;
use super::plan::{HomeLan, Plan, LAN_DOMAIN};
use super::services::Service;
use crate::exec::{self, Background};
use crate::netns::Netns;

/// How many addresses `many.default.svc.DOMAIN` has: more than 512 bytes of answer.
pub const MANY_ADDRESSES: u8 = 40;

/// The name of dnsmasq's background process (and of its log).
pub const PROCESS: &str = "dnsmasq";

/// The cluster's DNS records, as a hosts file dnsmasq reads.
pub fn hosts(plan: Plan, services: &[Service], pods: &[Pod]) -> String {
    let domain = plan.domain();
    let mut hosts = String::new();
    for s in services {
        hosts.push_str(&format!("{} {}.{}.svc.{domain}\n", s.ip, s.name, s.namespace));
    }
    // An answer too large for 512 bytes over UDP: clients must ask again over TCP.
    for host in 1..=MANY_ADDRESSES {
        hosts.push_str(&format!("10.{}.1.{host} many.default.svc.{domain}\n", 96 + plan.index));
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
    cmd.args(COMMON)
        .arg(format!("--listen-address={}", pod.ipv4))
        .arg(format!("--local=/{}/", plan.domain()))
        .arg(format!("--addn-hosts={}", hosts_file.display()));
    ready(Background::spawn(PROCESS, cmd, log)?, &pod.ns)
}

/// The name of the home LAN resolver's process.
pub const LAN_PROCESS: &str = "lan-dns";

/// Starts the home router's resolver: it answers the LAN's names
/// (`nas.home.arpa`) and, as if forwarded, one internet name
/// (`www.example.com`), and NXDOMAIN for every other name, as a home router
/// does for names it does not know.
pub fn start_lan(home: &Netns, lan: HomeLan, log: &Path) -> Result<Background> {
    let (www, www_ip) = lan.internet_name();
    let mut cmd = home.cmd("dnsmasq");
    cmd.args(COMMON)
        .arg(format!("--listen-address={}", lan.router_ip()))
        .arg(format!("--local=/{LAN_DOMAIN}/"))
        .arg(format!("--host-record=nas.{LAN_DOMAIN},{}", lan.nas_ip()))
        .arg(format!("--host-record={www},{www_ip}"))
        // Everything else: NXDOMAIN.
        .arg("--address=/#/");
    ready(Background::spawn(LAN_PROCESS, cmd, log)?, home)
}

/// Options both resolvers share: foreground, no host files or upstreams, every
/// query logged (steps count them).
const COMMON: &[&str] = &[
    "--keep-in-foreground",
    "--no-resolv",
    "--no-hosts",
    "--conf-file=/dev/null",
    "--pid-file=",
    "--user=root",
    "--bind-interfaces",
    "--log-facility=-",
    "--log-queries",
];

/// Waits until dnsmasq listens on port 53 in `ns` (it has no readiness line
/// when logging to stderr).
fn ready(mut p: Background, ns: &Netns) -> Result<Background> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listens_on_port_53(ns)? {
        if let Some(status) = p.child.try_wait()? {
            bail!("{} exited ({status}): {}", p.name, exec::last_lines(&p.log_text(), 3));
        }
        if Instant::now() > deadline {
            bail!("{} did not start listening within 10 s", p.name);
        }
        exec::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(p)
}

/// Whether a UDP socket in `ns` is bound to port 53 (read from the
/// namespace's own /proc/net/udp, as `ss` would).
fn listens_on_port_53(ns: &Netns) -> Result<bool> {
    let table = ns.enter(|| std::fs::read_to_string("/proc/thread-self/net/udp"))??;
    // Lines: "sl local_address rem_address st …", addresses as HEXIP:HEXPORT.
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|local| local.ends_with(":0035")))
}
