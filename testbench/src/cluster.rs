//! A Kubernetes-like cluster built from network namespaces:
//!
//! ```text
//! laptop ── router ── node-1 (server-external, hostNetwork)
//!                       └─ br0 ── teletun (server-cluster), app (echo + HTTP), dns (dnsmasq)
//! ```
//!
//! Service IPs are DNAT rules (nft) in the node, as kube-proxy would install.
//! Bridged traffic passes netfilter (`bridge-nf-call-iptables`) so a pod's reply
//! to a pod on the same bridge is un-NATed (the service hairpin).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::exec::{self, Background};
use crate::impair::Impairment;
use crate::laptop::{DnsVariant, Laptop};
use crate::netns::{self, Netns};
use crate::scenario::Topology;

/// What server-external logs when it links up with server-cluster.
const LINKED: &str = "server-cluster connected";

/// The port server-external listens on.
pub const SERVER_PORT: u16 = 8443;
/// Echo ports on the app pod.
pub const ECHO_PORT: u16 = 7007;
/// HTTP port on the app pod.
pub const HTTP_PORT: u16 = 8080;
/// The cluster's DNS domain.
pub const DOMAIN: &str = "cluster.local";

/// A pod: a namespace with `eth0` on its node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Kubernetes-style name.
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Pod IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Pod IPv6 address.
    pub ipv6: Ipv6Addr,
}

/// A service: a cluster IP DNAT-ed to a pod port.
#[derive(Clone, Debug)]
pub struct Service {
    /// Name (`NAME.NAMESPACE.svc.cluster.local`).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Cluster IP.
    pub ip: Ipv4Addr,
}

/// Addresses of the built cluster.
pub struct Cluster {
    /// Scratch directory: keys, logs, configs.
    pub dir: PathBuf,
    /// The developer's machine.
    pub laptop: Laptop,
    /// Between laptop and node.
    pub router: Netns,
    /// The node (hostNetwork pods run here).
    pub node: Netns,
    /// The node's underlay address (what the client dials).
    pub node_ip: Ipv4Addr,
    /// Pods by role: `teletun` (server-cluster), `app`, `dns`.
    pub pods: Vec<Pod>,
    /// Services.
    pub services: Vec<Service>,
    /// Background processes (servers, daemons), killed at teardown.
    pub processes: Vec<Background>,
    /// The teletun binary.
    pub teletun: PathBuf,
    torn_down: bool,
}

/// Networks the client routes into the tunnel.
pub const CLUSTER_ROUTES: &[&str] = &["10.244.0.0/16", "10.96.0.0/16", "fd00:10:244::/48"];

fn unique_id() -> String {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("tt{}-{:02x}{:02x}{:02x}", std::process::id(), b[0], b[1], b[2])
}

impl Cluster {
    /// Builds the whole cluster and starts its pods' daemons (not the teletun roles).
    pub fn build(teletun: &Path, work: &Path, topology: &Topology) -> Result<Cluster> {
        let dns = DnsVariant::parse(&topology.resolvconf)?;
        let id = unique_id();
        let dir = work.join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut created: Vec<Netns> = Vec::new();
        let result = Self::build_in(&id, &dir, teletun, dns, &mut created);
        if result.is_err() {
            for ns in created.iter().rev() {
                ns.delete();
            }
        }
        result
    }

    fn build_in(
        id: &str,
        dir: &Path,
        teletun: &Path,
        dns_variant: DnsVariant,
        created: &mut Vec<Netns>,
    ) -> Result<Cluster> {
        let mut mk = |role: &str| -> Result<Netns> {
            let ns = Netns::create(&format!("{id}-{role}"))?;
            created.push(ns.clone());
            Ok(ns)
        };
        let laptop_ns = mk("laptop")?;
        let router = mk("router")?;
        let node = mk("node1")?;
        let pod_specs = [("teletun", 5u8), ("app", 6), ("dns", 4)];
        let mut pods = Vec::new();
        for (name, host) in pod_specs {
            pods.push(Pod {
                name: name.into(),
                ns: mk(&format!("pod-{name}"))?,
                ipv4: Ipv4Addr::new(10, 244, 1, host),
                ipv6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, u16::from(host)),
            });
        }

        // Underlay: laptop 198.51.100.2 ─ .1 router 203.0.113.1 ─ node 203.0.113.11.
        let node_ip = Ipv4Addr::new(203, 0, 113, 11);
        netns::veth(&laptop_ns, "eth0", &router, "to-laptop")?;
        netns::veth(&router, "to-node1", &node, "eth0")?;
        laptop_ns.ip(&["addr", "add", "198.51.100.2/24", "dev", "eth0"])?;
        laptop_ns.ip(&["route", "add", "default", "via", "198.51.100.1"])?;
        router.ip(&["addr", "add", "198.51.100.1/24", "dev", "to-laptop"])?;
        router.ip(&["addr", "add", "203.0.113.1/24", "dev", "to-node1"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        node.ip(&["addr", "add", "203.0.113.11/24", "dev", "eth0"])?;
        node.ip(&["route", "add", "default", "via", "203.0.113.1"])?;

        // The node's pod network: a bridge, the pods on it, forwarding on.
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&["addr", "add", "10.244.1.1/24", "dev", "br0"])?;
        node.ip(&["addr", "add", "fd00:10:244:1::1/64", "dev", "br0", "nodad"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for pod in &pods {
            let host_side = format!("v-{}", pod.name);
            netns::veth(&pod.ns, "eth0", &node, &host_side)?;
            node.ip(&["link", "set", &host_side, "master", "br0"])?;
            pod.ns
                .ip(&["addr", "add", &format!("{}/24", pod.ipv4), "dev", "eth0"])?;
            pod.ns
                .ip(&["addr", "add", &format!("{}/64", pod.ipv6), "dev", "eth0", "nodad"])?;
            pod.ns.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
            pod.ns
                .ip(&["-6", "route", "add", "default", "via", "fd00:10:244:1::1"])?;
        }

        let services = vec![
            Service {
                name: "web".into(),
                namespace: "default".into(),
                ip: Ipv4Addr::new(10, 96, 0, 20),
            },
            Service {
                name: "kube-dns".into(),
                namespace: "kube-system".into(),
                ip: Ipv4Addr::new(10, 96, 0, 10),
            },
        ];
        // kube-proxy: service IPs DNAT-ed in the node; bridged replies pass conntrack.
        let app = pods[1].ipv4;
        let dns = pods[2].ipv4;
        let rules = format!(
            "table ip kube-proxy {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat;\n    \
             ip daddr 10.96.0.20 tcp dport 80 dnat to {app}:{HTTP_PORT}\n    \
             ip daddr 10.96.0.10 udp dport 53 dnat to {dns}:53\n    \
             ip daddr 10.96.0.10 tcp dport 53 dnat to {dns}:53\n  }}\n}}\n"
        );
        let rules_file = dir.join("kube-proxy.nft");
        std::fs::write(&rules_file, rules)?;
        node.run("nft", &["-f", &rules_file.to_string_lossy()])
            .context("cannot install service DNAT rules (is nftables installed?)")?;
        node.sysctl("net.bridge.bridge-nf-call-iptables", "1")
            .context("bridged traffic must pass netfilter for the service hairpin (br_netfilter)")?;

        let laptop = Laptop::create(laptop_ns, dir, dns_variant)?;
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            laptop,
            router,
            node,
            node_ip,
            pods,
            services,
            processes: Vec::new(),
            teletun: teletun.to_owned(),
            torn_down: false,
        };
        created.clear(); // the cluster owns them now
        cluster.start_pod_daemons()?;
        cluster.make_keys()?;
        Ok(cluster)
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name:?}"))
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name:?}"))
    }

    /// The resolv.conf a pod of this cluster gets.
    pub fn pod_resolv_conf(&self) -> String {
        format!("nameserver 10.96.0.10\nsearch default.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\noptions ndots:5\n")
    }

    fn start_pod_daemons(&mut self) -> Result<()> {
        let me = std::env::current_exe()?;
        let app = self.pod("app")?.clone();
        let mut cmd = app.ns.cmd(&me);
        cmd.args([
            "agent",
            "serve",
            "--name",
            "app",
            "--echo-port",
            &ECHO_PORT.to_string(),
            "--http-port",
            &HTTP_PORT.to_string(),
        ]);
        let mut p = Background::spawn("app agent", cmd, &self.dir.join("app.log"))?;
        p.wait_for_log("serving", Duration::from_secs(10))?;
        self.processes.push(p);

        let dns = self.pod("dns")?.clone();
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--conf-file=/dev/null".into(),
            "--pid-file=".into(),
            "--user=root".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={}", dns.ipv4),
            format!("--local=/{DOMAIN}/"),
            "--log-facility=-".into(),
            "--log-queries".into(),
        ];
        for s in &self.services {
            args.push(format!(
                "--host-record={}.{}.svc.{DOMAIN},{}",
                s.name, s.namespace, s.ip
            ));
        }
        for p in &self.pods {
            args.push(format!("--host-record={}.pod.{DOMAIN},{},{}", p.name, p.ipv4, p.ipv6));
        }
        let mut cmd = dns.ns.cmd("dnsmasq");
        cmd.args(&args);
        let p = Background::spawn("dnsmasq", cmd, &self.dir.join("dnsmasq.log"))?;
        self.processes.push(p);
        // dnsmasq has no readiness line when logging to stderr: wait for the port.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = dns.ns.run("ss", &["-lnu"]).unwrap_or_default();
            if out.contains(&format!("{}:53", dns.ipv4)) {
                break;
            }
            if let Some(status) = self
                .processes
                .last_mut()
                .and_then(|p| p.child.try_wait().ok().flatten())
            {
                bail!(
                    "dnsmasq exited ({status}): {}",
                    self.processes.last().map(|p| p.log_text()).unwrap_or_default()
                );
            }
            if std::time::Instant::now() > deadline {
                bail!("dnsmasq did not start listening within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn make_keys(&self) -> Result<()> {
        for name in ["server", "client", "other"] {
            let mut cmd = Command::new(&self.teletun);
            cmd.args(["keygen", "--out"]).arg(self.dir.join(name));
            exec::run(cmd, netns::CMD_TIMEOUT)?;
        }
        Ok(())
    }

    /// `DIR/NAME.key` or `.pub`.
    pub fn key(&self, name: &str, ext: &str) -> String {
        self.dir.join(format!("{name}.{ext}")).to_string_lossy().into_owned()
    }

    /// The server-cluster ↔ server-external socket (a hostPath in Kubernetes).
    pub fn sockfile(&self) -> String {
        self.dir.join("teletun.sock").to_string_lossy().into_owned()
    }

    /// Starts server-cluster in its pod, then server-external on the node, and
    /// waits until they are connected to each other.
    pub fn start_servers(&mut self) -> Result<()> {
        self.start_server_cluster()?;
        self.start_server_external()
    }

    /// How many times server-external has linked up with server-cluster so far.
    fn links_so_far(&self) -> Option<usize> {
        let ext = self.processes.iter().find(|p| p.name == "server-external")?;
        Some(ext.log_text().matches(LINKED).count())
    }

    /// When both roles run, waits until server-external logs one more link than `before`.
    fn wait_linked(&mut self, before: usize) -> Result<()> {
        if !self.processes.iter().any(|p| p.name == "server-cluster") {
            return Ok(());
        }
        let ext = self.process_mut("server-external")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ext.log_text().matches(LINKED).count() <= before {
            exec::check_interrupted()?;
            if std::time::Instant::now() > deadline {
                bail!(
                    "server-external did not link up with server-cluster within 10 s: {}",
                    exec::last_lines(&ext.log_text(), 3)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts server-cluster and waits for its takeover (and for server-external
    /// to link up with it, if that runs).
    pub fn start_server_cluster(&mut self) -> Result<()> {
        let before = self.links_so_far();
        let resolv = self.dir.join("pod-resolv.conf");
        std::fs::write(&resolv, self.pod_resolv_conf())?;
        let pod = self.pod("teletun")?.clone();
        let mut cmd = pod.ns.cmd(&self.teletun);
        cmd.arg("server-cluster")
            .arg(format!("-sockfile={}", self.sockfile()))
            .arg("--resolv-conf")
            .arg(&resolv);
        let mut p = Background::spawn("server-cluster", cmd, &self.dir.join("server-cluster.log"))?;
        p.wait_for_log("took over", Duration::from_secs(10))?;
        self.processes.retain(|p| p.name != "server-cluster");
        self.processes.push(p);
        match before {
            Some(n) => self.wait_linked(n),
            None => Ok(()),
        }
    }

    /// Starts server-external on the node (hostNetwork), and waits for it to
    /// link up with server-cluster if that runs.
    pub fn start_server_external(&mut self) -> Result<()> {
        let mut cmd = self.node.cmd(&self.teletun);
        cmd.arg("server-external")
            .arg(format!("-port={SERVER_PORT}"))
            .arg(format!("-server-pubkey={}", self.key("server", "pub")))
            .arg(format!("-server-privkey={}", self.key("server", "key")))
            .arg(format!("-client-pubkey={}", self.key("client", "pub")))
            .arg(format!("-sockfile={}", self.sockfile()));
        let mut p = Background::spawn("server-external", cmd, &self.dir.join("server-external.log"))?;
        p.wait_for_log("listening on", Duration::from_secs(10))?;
        self.processes.retain(|p| p.name != "server-external");
        self.processes.push(p);
        self.wait_linked(0)
    }

    /// A background process by name.
    pub fn process_mut(&mut self, name: &str) -> Result<&mut Background> {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("{name} is not running"))
    }

    /// The client command line (seed flags plus the overrides that replace
    /// Kubernetes discovery).
    pub fn client_command(&self, client_key: &str, server_key: &str) -> Command {
        let mut cmd = self.laptop.cmd(&self.teletun);
        cmd.arg("client")
            .arg(format!("-port={SERVER_PORT}"))
            .arg(format!("-server-pubkey={}", self.key(server_key, "pub")))
            .arg(format!("-client-pubkey={}", self.key(client_key, "pub")))
            .arg(format!("-client-privkey={}", self.key(client_key, "key")))
            .arg(format!("--server-address={}", self.node_ip));
        for r in CLUSTER_ROUTES {
            cmd.arg(format!("--route={r}"));
        }
        cmd
    }

    /// Resolves a target: `POD` (its IPv4), `POD/ipv6`, `service:NAME`.
    pub fn address(&self, target: &str, ipv6: bool) -> Result<IpAddr> {
        if let Some(svc) = target.strip_prefix("service:") {
            if ipv6 {
                bail!("services here are IPv4-only");
            }
            return Ok(self.service(svc)?.ip.into());
        }
        let pod = self.pod(target)?;
        Ok(if ipv6 { pod.ipv6.into() } else { pod.ipv4.into() })
    }

    /// Impairs the underlay in the router from now on (replacing any earlier
    /// impairment): the seeded userspace impairer for delay, jitter, reorder,
    /// loss and duplication, tbf for rate.
    pub fn impair(&mut self, imp: &Impairment) -> Result<()> {
        self.clear_impairment();
        if imp.needs_impairer() {
            let me = std::env::current_exe()?;
            let mut cmd = self.router.cmd(&me);
            cmd.args(["agent", "impair", "--tun", "imp0"])
                .arg(format!("--delay-ms={}", imp.delay_ms))
                .arg(format!("--jitter-ms={}", imp.jitter_ms))
                .arg(format!("--reorder-percent={}", imp.reorder_percent))
                .arg(format!("--loss-percent={}", imp.loss_percent))
                .arg(format!("--duplicate-percent={}", imp.duplicate_percent))
                .arg(format!("--seed={}", imp.seed));
            let mut p = Background::spawn("impairer", cmd, &self.dir.join("impairer.log"))?;
            p.wait_for_log("impairing", Duration::from_secs(10))?;
            self.processes.push(p);
            // Everything the router forwards takes a detour through imp0 and back.
            for (pref, iif) in [("100", "to-laptop"), ("101", "to-node1")] {
                self.router
                    .ip(&["rule", "add", "pref", pref, "iif", iif, "lookup", "100"])?;
            }
            self.router
                .ip(&["route", "add", "default", "dev", "imp0", "table", "100"])?;
            self.router.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            self.router.sysctl("net.ipv4.conf.imp0.rp_filter", "0")?;
        }
        if imp.rate_mbit > 0.0 {
            for dev in ["to-laptop", "to-node1"] {
                let rate = format!("{}mbit", imp.rate_mbit);
                self.router.run(
                    "tc",
                    &[
                        "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kb", "latency",
                        "100ms",
                    ],
                )?;
            }
        }
        Ok(())
    }

    fn clear_impairment(&mut self) {
        if let Some(i) = self.processes.iter().position(|p| p.name == "impairer") {
            let mut p = self.processes.remove(i);
            p.kill();
            for pref in ["100", "101"] {
                let _ = self.router.ip(&["rule", "del", "pref", pref]);
            }
        }
        for dev in ["to-laptop", "to-node1"] {
            let _ = self.router.run("tc", &["qdisc", "del", "dev", dev, "root"]);
        }
    }

    /// Stops every process and deletes every namespace and file this cluster made.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for p in self.processes.iter_mut().rev() {
            p.signal(libc::SIGTERM);
        }
        for p in self.processes.iter_mut().rev() {
            let _ = p.wait(Duration::from_secs(3));
        }
        self.processes.clear();
        self.laptop.teardown();
        for pod in &self.pods {
            pod.ns.delete();
        }
        self.node.delete();
        self.router.delete();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}
