//! Named network namespaces (netns-rs: bind-mounted under /run/netns, as
//! `ip netns` does), their netlink sockets and sysctls, and the commands that
//! run inside them.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use netns_rs::NetNs;

use crate::exec;
use crate::netlink::Netlink;

/// Generous bound for configuration commands.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// Where named namespaces live.
const NETNS_DIR: &str = "/run/netns";

/// A named network namespace, deleted by [`Netns::delete`]. Clones share it.
#[derive(Clone)]
pub struct Netns {
    /// Full name under /run/netns.
    pub name: String,
    inner: Arc<Inner>,
}

struct Inner {
    /// The namespace, until deleted.
    ns: Mutex<Option<NetNs>>,
    /// A netlink socket opened inside, on first use; closed with the namespace
    /// (an open socket would keep the namespace alive).
    netlink: Mutex<Option<Netlink>>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

impl Netns {
    /// Creates the namespace with loopback up and IPv6 duplicate address
    /// detection off on links made later (addresses are usable at once, and
    /// state snapshots do not catch them half-way).
    pub fn create(name: &str) -> Result<Netns> {
        let ns = NetNs::new(name).map_err(|e| anyhow!("cannot create namespace {name}: {e}"))?;
        let ns = Netns::wrap(name, ns);
        ns.netlink()?.set_up("lo")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        Ok(ns)
    }

    fn wrap(name: &str, ns: NetNs) -> Netns {
        Netns {
            name: name.to_owned(),
            inner: Arc::new(Inner {
                ns: Mutex::new(Some(ns)),
                netlink: Mutex::new(None),
            }),
        }
    }

    /// Runs `f` on this thread inside the namespace, then returns to where it was.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let guard = self.inner.ns.lock().unwrap_or_else(|e| e.into_inner());
        let ns = guard
            .as_ref()
            .with_context(|| format!("namespace {} is gone", self.name))?;
        ns.run(|_| f())
            .map_err(|e| anyhow!("cannot enter namespace {}: {e}", self.name))
    }

    /// The namespace's netlink socket (opened inside on first use).
    pub fn netlink(&self) -> Result<Netlink> {
        let mut socket = self.inner.netlink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = socket.as_ref() {
            return Ok(n.clone());
        }
        let opened = self.enter(Netlink::open_here)??;
        *socket = Some(opened.clone());
        Ok(opened)
    }

    /// A file descriptor of the namespace, for moving links into it.
    pub fn fd(&self) -> Result<RawFd> {
        let guard = self.inner.ns.lock().unwrap_or_else(|e| e.into_inner());
        let ns = guard
            .as_ref()
            .with_context(|| format!("namespace {} is gone", self.name))?;
        Ok(ns.file().as_raw_fd())
    }

    /// A command that runs `program` inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args…` inside and returns its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut c = self.cmd(program);
        c.args(args);
        exec::run(c, CMD_TIMEOUT)
    }

    /// Sets a sysctl inside the namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let file = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.enter(|| std::fs::write(&file, value))?
            .with_context(|| format!("cannot set {key}={value} in namespace {}", self.name))
    }

    /// The namespace's file, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Kills every process inside, then deletes the namespace (once; later
    /// calls do nothing).
    pub fn delete(&self) {
        self.inner.netlink.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(ns) = self.inner.ns.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        if let Ok(meta) = ns.file().metadata() {
            kill_processes_in(meta.dev(), meta.ino());
        }
        if let Err(e) = ns.remove() {
            eprintln!("testbench: cannot delete namespace {}: {e}", self.name);
        }
    }
}

/// SIGKILLs every process whose network namespace is the one with this device
/// and inode (what `ip netns pids` finds).
fn kill_processes_in(dev: u64, ino: u64) {
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        let inside = std::fs::metadata(entry.path().join("ns/net")).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
        if inside {
            // SAFETY: kill(2) on a pid that lives in our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Creates a veth pair with each end directly inside its namespace (so names
/// never collide in the root namespace), both ends up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    a.netlink()?.add_veth(a_name, a.fd()?, b_name, b.fd()?)?;
    a.netlink()?.set_up(a_name)?;
    b.netlink()?.set_up(b_name)
}

/// Namespaces whose names say they belong to a testbench process that no
/// longer runs (`tt<pid>-…`), the processes still inside them, and such a
/// process's command scratch directories: left by a killed run. Deleted on start.
pub fn remove_stale() {
    exec::remove_stale_scratch();
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for name in entries.flatten().filter_map(|e| e.file_name().into_string().ok()) {
        let Some(pid) = name
            .strip_prefix("tt")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("testbench: removing namespace {name} left by dead run {pid}");
        // What still runs inside (its daemons, the control plane) goes with it.
        let pids = std::process::Command::new("ip").args(["netns", "pids", &name]).output();
        for p in pids.iter().flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .into_owned()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        }) {
            if let Ok(p) = p.trim().parse::<libc::pid_t>() {
                // SAFETY: kill(2) of a process found inside a namespace only our runs create.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        match NetNs::get(&name) {
            Ok(ns) => Netns::wrap(&name, ns).delete(),
            // A mount point whose namespace is gone: just the file.
            Err(_) => {
                let _ = std::fs::remove_file(Path::new(NETNS_DIR).join(&name));
            }
        }
    }
}
