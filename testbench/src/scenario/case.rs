//! The state of a case while its steps run, and what most steps need from it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::values::{Place, Process, Target};
use crate::cluster::Cluster;
use crate::exec::{self, Background};
use crate::impair::Impairment;

/// A case under way.
pub struct Case<'a> {
    /// The clusters; steps act on the first (`use-cluster` brings another to the front).
    pub clusters: Vec<Cluster>,
    /// Running clients by name.
    pub clients: BTreeMap<String, Background>,
    /// Every client's log, also after it ended.
    pub client_logs: BTreeMap<String, PathBuf>,
    /// The laptop's state before any client ran.
    pub laptop_before: String,
    /// The scenario's impairment profiles.
    pub impairments: &'a BTreeMap<String, Impairment>,
    /// What the current step measured, for its report line.
    pub detail: Option<String>,
    /// A state snapshot the current step took: (name, normalized text).
    pub snapshot: Option<(String, String)>,
    /// A flood under way (`start-flood` … `stop-flood`).
    pub flood: Option<crate::hostile::FloodRun>,
    /// Throughput measurements so far, in bit/s, by name.
    pub throughputs: BTreeMap<String, f64>,
    /// What the roaming steps changed or started.
    pub roaming: Roaming,
}

/// What the roaming steps changed on the laptop, or run in the background.
#[derive(Default)]
pub struct Roaming {
    /// The laptop's address on the home LAN, once `change-address` changed it.
    pub laptop_ip: Option<std::net::Ipv4Addr>,
    /// The laptop uses its second uplink.
    pub second_uplink: bool,
    /// `nat-rebind` steps so far.
    pub rebinds: u32,
    /// The running probe (`start-probe`).
    pub probe: Option<crate::exec::Background>,
    /// Probes started so far (for their log names).
    pub probes: u32,
    /// The background transfer, and when it started.
    pub transfer: Option<(crate::exec::Background, std::time::Instant)>,
    /// The last event a running probe should time its first reply from
    /// (the laptop woke, a server came back), and when it happened.
    pub mark: Option<(&'static str, std::time::Instant)>,
}

impl Case<'_> {
    /// The cluster steps act on.
    pub fn cluster(&self) -> &Cluster {
        &self.clusters[0]
    }

    /// The cluster steps act on, to change it.
    pub fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.clusters[0]
    }

    /// The whole log of a process, also of one that has ended.
    pub fn log_of(&mut self, process: &Process) -> Result<String> {
        Ok(match process {
            Process::Client(name) => {
                let path = self
                    .client_logs
                    .get(name)
                    .with_context(|| format!("no client {name:?} ran"))?;
                std::fs::read_to_string(path)?
            }
            other => self.cluster_mut().process_mut(other.cluster_name())?.log_text(),
        })
    }

    /// A command running `program` at `place`.
    pub fn command_on(&self, place: &Place, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let cluster = self.cluster();
        Ok(match place {
            Place::Laptop => cluster.laptop.cmd(program),
            Place::Node => cluster.node.cmd(program),
            Place::Router => cluster.router.cmd(program),
            Place::Home => cluster
                .home
                .as_ref()
                .context("this laptop has no home LAN ([topology] lan = false)")?
                .cmd(program),
            Place::Pod(pod) => cluster.pod(pod)?.ns.cmd(program),
        })
    }

    /// Runs `program args…` at `place`; fails (with its last lines) unless it exits 0.
    pub fn check_on(&self, place: &Place, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Result<String> {
        let mut c = self.command_on(place, program)?;
        c.args(args);
        let out = exec::output(c, Duration::from_secs(20))?;
        if !out.status.success() {
            bail!("{}", exec::last_lines(&out.both(), 3));
        }
        Ok(out.stdout)
    }

    /// Runs `program args…` on the laptop; fails (with its last lines) unless it exits 0.
    pub fn laptop_check(&self, program: &str, args: &[&str]) -> Result<String> {
        self.check_on(&Place::Laptop, program, args)
    }

    /// Runs `testbench agent ARGS…` at `place`.
    pub fn agent_on(&self, place: &Place, args: &[&str]) -> Result<String> {
        let mut full = vec!["agent"];
        full.extend_from_slice(args);
        self.check_on(place, std::env::current_exe()?, &full)
    }

    /// Runs `testbench agent ARGS…` on the laptop.
    pub fn agent_on_laptop(&self, args: &[&str]) -> Result<String> {
        self.agent_on(&Place::Laptop, args)
    }

    /// The address a target stands for in the current cluster.
    pub fn address(&self, target: &Target, ipv6: bool) -> Result<IpAddr> {
        let cluster = self.cluster();
        match target {
            Target::Pod(p) => cluster.pod_address(p, ipv6),
            Target::Service(_) if ipv6 => bail!("services here are IPv4-only"),
            Target::Service(s) => Ok(cluster.service(s)?.ip.into()),
            Target::Node(n) => cluster.node_address(n, ipv6),
            Target::Address(a) => Ok(*a),
        }
    }
}
