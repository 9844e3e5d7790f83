//! Network namespaces and the commands that run inside them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::exec;

/// Generous bound for configuration commands.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// A named network namespace (`ip netns`), deleted by [`Netns::delete`].
#[derive(Clone, Debug)]
pub struct Netns {
    /// Full name under /run/netns.
    pub name: String,
}

fn ip_cmd(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

impl Netns {
    /// Creates the namespace with loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        exec::run(ip_cmd(&["netns", "add", name]), CMD_TIMEOUT)
            .with_context(|| format!("cannot create namespace {name}"))?;
        let ns = Netns { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on links made later: addresses are usable
        // at once and state snapshots do not catch them half-way.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        exec::run(ip_cmd(&full), CMD_TIMEOUT)
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

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
    }

    /// The namespace's file, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Kills every process inside, then deletes the namespace (even after an interrupt).
    pub fn delete(&self) {
        if let Ok(pids) = exec::run_to_completion(ip_cmd(&["netns", "pids", &self.name]), CMD_TIMEOUT) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
                // SAFETY: kill(2) on a pid that lives in our namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = exec::run_to_completion(ip_cmd(&["netns", "del", &self.name]), CMD_TIMEOUT);
    }
}

/// Creates a veth pair with each end directly inside its namespace (so names
/// never collide in the root namespace), both ends up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    exec::run(
        ip_cmd(&[
            "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
        ]),
        CMD_TIMEOUT,
    )?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// Namespaces whose names say they belong to a testbench process that no
/// longer runs (`tt<pid>-…`), and such a process's command scratch
/// directories: left by a killed run. Deleted on start.
pub fn remove_stale() {
    exec::remove_stale_scratch();
    let Ok(list) = exec::run(ip_cmd(&["netns", "list"]), CMD_TIMEOUT) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix("tt")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("testbench: removing namespace {name} left by dead run {pid}");
            Netns { name: name.to_owned() }.delete();
        }
    }
}
