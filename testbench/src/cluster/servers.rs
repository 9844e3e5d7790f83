//! The teletun processes of a cluster: server-cluster in its pod,
//! server-external on node1 (as with hostNetwork), the keys they pin, and the
//! command line a client on the laptop runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::net::Pod;
use super::plan::SERVER_PORT;
use crate::closed_set::closed_set;
use crate::exec::{self, Background};
use crate::netns::Netns;

closed_set! {
    /// A key pair the testbench makes for each cluster.
    pub enum KeyName("key") {
        /// The client's own key pair, pinned by server-external.
        Client = "client",
        /// server-external's key pair, pinned by clients.
        Server = "server",
        /// A key pair nobody pins.
        Other = "other",
    }
}

/// Whose link key a server holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pair {
    /// The cluster's own pair's.
    This,
    /// Another pair's on the same node.
    Other,
}

/// What server-external logs when it links up with server-cluster.
const LINKED: &str = "server-cluster connected";

/// The files of one cluster's teletun roles, under its scratch directory.
#[derive(Clone, Debug)]
pub struct Files {
    /// The scratch directory.
    pub dir: PathBuf,
}

impl Files {
    /// Makes a key pair for each [`KeyName`] and a link key for this pair
    /// and for another, with `teletun keygen`'s own code.
    pub fn make_keys(&self) -> Result<()> {
        for name in KeyName::ALL {
            teletun::keys::generate(&self.dir.join(name.as_str()))
                .with_context(|| format!("cannot make the {name} key pair"))?;
        }
        for pair in [Pair::This, Pair::Other] {
            let path = self.link_key(pair);
            let prefix = path.with_extension("");
            teletun::keys::generate_link_key(&prefix).with_context(|| format!("cannot make {}", path.display()))?;
        }
        Ok(())
    }

    /// The link key of this pair of servers, or of another pair's.
    pub fn link_key(&self, pair: Pair) -> PathBuf {
        self.dir.join(match pair {
            Pair::This => "link.key",
            Pair::Other => "other-link.key",
        })
    }

    /// `DIR/NAME.key` (private) or `DIR/NAME.pub`.
    pub fn key(&self, name: KeyName, private: bool) -> String {
        let ext = if private { "key" } else { "pub" };
        self.dir.join(format!("{name}.{ext}")).to_string_lossy().into_owned()
    }

    /// The server-cluster ↔ server-external socket (a hostPath in Kubernetes).
    pub fn sockfile(&self) -> String {
        self.dir.join("teletun.sock").to_string_lossy().into_owned()
    }

    /// server-cluster's own state directory (an emptyDir in Kubernetes).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("server-cluster-state")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
}

/// The pod's sysctls (`securityContext.sysctls` in docs/deploy), which the
/// container runtime sets before server-cluster starts: what IPv6 takes
/// only through /proc/sys.
pub const POD_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.ipv6.conf.eth0.proxy_ndp", "1"),
];

/// Starts server-cluster in `pod` with `resolv_conf` as the pod's resolv.conf;
/// returns once it has taken over the pod's addresses. It runs as the
/// manifest's unprivileged container does: /proc/sys read-only (as runc
/// mounts it), no capability but `NET_ADMIN`, the pod's sysctls set first.
pub fn start_server_cluster(teletun: &Path, files: &Files, pod: &Pod, resolv_conf: &str) -> Result<Background> {
    let resolv = files.dir.join("pod-resolv.conf");
    std::fs::write(&resolv, resolv_conf)?;
    for (key, value) in POD_SYSCTLS {
        pod.ns.sysctl(key, value)?;
    }
    // `ip netns exec` runs it in a mount namespace of its own: the read-only
    // /proc/sys is this process tree's alone.
    let mut cmd = pod.ns.cmd("sh");
    cmd.args([
        "-c",
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec setpriv --inh-caps=-all --bounding-set=-all,+net_admin -- \"$0\" \"$@\"",
    ])
    .arg(teletun);
    cmd.arg("server-cluster")
        .arg(format!("-sockfile={}", files.sockfile()))
        .arg("--resolv-conf")
        .arg(&resolv)
        // The pod's own directory (an emptyDir in Kubernetes), apart from the socket's.
        .arg("--state-dir")
        .arg(files.state_dir())
        .arg("--link-key")
        .arg(files.link_key(Pair::This));
    let mut p = Background::spawn("server-cluster", cmd, &files.log("server-cluster"))?;
    p.wait_for_log("took over", Duration::from_secs(10))?;
    Ok(p)
}

/// Starts server-external of `pair` on `node`; returns once it listens.
/// Another pair's has its own keys, port and name, and this pair's socket.
pub fn start_server_external(teletun: &Path, files: &Files, node: &Netns, pair: Pair) -> Result<Background> {
    let (name, port, server, client) = match pair {
        Pair::This => ("server-external", SERVER_PORT, KeyName::Server, KeyName::Client),
        Pair::Other => ("other-server-external", SERVER_PORT + 1, KeyName::Other, KeyName::Other),
    };
    let mut cmd = node.cmd(teletun);
    cmd.arg("server-external")
        .arg(format!("-port={port}"))
        .arg(format!("-server-pubkey={}", files.key(server, false)))
        .arg(format!("-server-privkey={}", files.key(server, true)))
        .arg(format!("-client-pubkey={}", files.key(client, false)))
        .arg(format!("-sockfile={}", files.sockfile()))
        .arg("--link-key")
        .arg(files.link_key(pair));
    let mut p = Background::spawn(name, cmd, &files.log(name))?;
    p.wait_for_log("listening on", Duration::from_secs(10))?;
    Ok(p)
}

/// How many times server-external has linked up with server-cluster so far.
pub fn links_so_far(external: &Background) -> usize {
    external.log_text().matches(LINKED).count()
}

/// Waits until server-external logs one more link than `before`.
pub fn wait_linked(external: &Background, before: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while links_so_far(external) <= before {
        exec::check_interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "server-external did not link up with server-cluster within 10 s: {}",
                exec::last_lines(&external.log_text(), 3)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// How a client finds the cluster: through its Kubernetes API (the seed's
/// usage line), or without one, by address and routes given on the command line.
pub enum Discovery<'a> {
    /// `-kubeconfig=FILE -pod=NAME`.
    Kubernetes {
        /// The kubeconfig.
        kubeconfig: &'a Path,
        /// The server-external pod.
        pod: &'a str,
    },
    /// `--server-address=IP --route=CIDR…`.
    Direct {
        /// node1's underlay address.
        server: std::net::Ipv4Addr,
        /// The cluster's networks.
        routes: &'a [ipnet::IpNet],
    },
}

/// The client's command line on the laptop: with a Kubernetes API exactly the
/// seed's usage line; without, the overrides that replace discovery.
pub fn client_command(
    mut cmd: Command,
    files: &Files,
    discovery: Discovery,
    client_key: KeyName,
    server_key: KeyName,
    args: &[String],
) -> Command {
    cmd.arg("client");
    if let Discovery::Kubernetes { kubeconfig, pod } = &discovery {
        cmd.arg(format!("-kubeconfig={}", kubeconfig.display()))
            .arg(format!("-pod={pod}"));
    }
    cmd.arg(format!("-port={SERVER_PORT}"))
        .arg(format!("-server-pubkey={}", files.key(server_key, false)))
        .arg(format!("-client-pubkey={}", files.key(client_key, false)))
        .arg(format!("-client-privkey={}", files.key(client_key, true)));
    if let Discovery::Direct { server, routes } = discovery {
        cmd.arg(format!("--server-address={server}"));
        for r in routes {
            cmd.arg(format!("--route={r}"));
        }
    }
    cmd.args(args);
    cmd
}
