//! Scenario files (TOML) and their runner. See docs/testbench.md for the format.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::cluster::{ClientOptions, Cluster, ECHO_PORT, HTTP_PORT};
use crate::exec::{self, Background};
use crate::impair::Impairment;
use crate::report::{CaseResult, CheckResult, Outcome};

/// A scenario file as written: steps may hold `{axis}` placeholders that the
/// matrix fills in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: String,
    #[serde(default)]
    description: String,
    /// Axis name → values; every combination is one case.
    #[serde(default)]
    matrix: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    topology: Option<toml::Value>,
    /// Named impairment profiles for `impair` steps.
    #[serde(default)]
    impairments: BTreeMap<String, Impairment>,
    step: Vec<toml::Value>,
}

/// How the cluster of a case is built.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The laptop's DNS management: `debian` (resolvconf), `openresolv`,
    /// `systemd-resolved`.
    #[serde(default = "debian")]
    pub resolvconf: String,
    /// Serve a Kubernetes API describing the cluster; clients then use only
    /// the seed's usage line (`-kubeconfig`, `-pod`), no `--server-address` or
    /// `--route`.
    #[serde(default)]
    pub kubernetes: bool,
    /// Nodes carry `spec.podCIDRs` (else clients route each pod IP).
    #[serde(default = "yes")]
    pub node_pod_cidrs: bool,
    /// The API serves networking.k8s.io/v1 ServiceCIDRs (else clients route
    /// each service IP).
    #[serde(default = "yes")]
    pub service_cidrs: bool,
    /// Resources the API answers with 403 Forbidden (`pods`, `nodes`, …).
    #[serde(default)]
    pub forbid: Vec<String>,
    /// How many nodes (node1 runs the servers).
    #[serde(default = "one_node")]
    pub nodes: u8,
    /// How many clusters share the laptop (`a`, `b`, … with distinct networks
    /// and domains; see the `use-cluster` step).
    #[serde(default = "one_node")]
    pub clusters: u8,
}

fn one_node() -> u8 {
    1
}

fn yes() -> bool {
    true
}

fn debian() -> String {
    "debian".into()
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            resolvconf: debian(),
            kubernetes: false,
            node_pod_cidrs: true,
            service_cidrs: true,
            forbid: Vec::new(),
            nodes: 1,
            clusters: 1,
        }
    }
}

/// One runnable case: a scenario with its matrix values filled in.
#[derive(Debug)]
pub struct Scenario {
    /// `name` or `name[axis=value,…]`.
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The cluster to build.
    pub topology: Topology,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Impairment profiles by name.
    pub impairments: BTreeMap<String, Impairment>,
}

fn main_client() -> String {
    "main".into()
}
fn client_key() -> String {
    "client".into()
}
fn server_key() -> String {
    "server".into()
}
fn sigint() -> String {
    "SIGINT".into()
}

/// One step. `do` selects the kind.
#[derive(Debug, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// Start server-cluster and server-external and wait until they are linked.
    StartServers,
    /// Start a client on the laptop. With `expect_error`, the client must fail
    /// with that text in its one-line error and change nothing.
    StartClient {
        /// Name to refer to this client by.
        #[serde(default = "main_client")]
        name: String,
        /// Key pair the client uses (`client`, `other`).
        #[serde(default = "client_key")]
        client_key: String,
        /// Public key the client pins for the server (`server`, `other`).
        #[serde(default = "server_key")]
        server_key: String,
        /// Expect the client to exit non-zero with this text.
        expect_error: Option<String>,
        /// With a Kubernetes API: the pod to name with `-pod`.
        pod: Option<String>,
        /// With a Kubernetes API: `wrong-token` or `unreachable` for a broken kubeconfig.
        kubeconfig: Option<String>,
        /// More command-line arguments.
        #[serde(default)]
        args: Vec<String>,
    },
    /// Stop a client with a signal; it must exit 0 after cleaning up.
    StopClient {
        /// Which client.
        #[serde(default = "main_client")]
        name: String,
        /// SIGINT or SIGTERM.
        #[serde(default = "sigint")]
        signal: String,
    },
    /// ping from the laptop.
    Ping {
        /// `POD` or `service:NAME`.
        to: String,
        /// Use the pod's IPv6 address.
        #[serde(default)]
        ipv6: bool,
        /// Pass only if it fails.
        #[serde(default)]
        expect_failure: bool,
    },
    /// TCP echo from the laptop.
    TcpEcho {
        /// Pod.
        to: String,
        /// Use IPv6.
        #[serde(default)]
        ipv6: bool,
        /// Pass only if it fails.
        #[serde(default)]
        expect_failure: bool,
    },
    /// UDP echo from the laptop.
    UdpEcho {
        /// Pod.
        to: String,
        /// Use IPv6.
        #[serde(default)]
        ipv6: bool,
    },
    /// HTTP GET from the laptop; the answer must come from the right pod.
    Http {
        /// `POD` (port 8080) or `service:NAME` (its port).
        to: String,
        /// Pass only if it fails.
        #[serde(default)]
        expect_failure: bool,
    },
    /// Resolve a name on the laptop (glibc, /etc/resolv.conf) and expect an
    /// address, or (with `expect = "nothing"`) no answer.
    Resolve {
        /// The name.
        name: String,
        /// `POD`, `POD/ipv6`, `service:NAME`, or `nothing`.
        expect: String,
    },
    /// Add a pod running the app agent (echo, HTTP, blobs) to the cluster.
    AddPod {
        /// Its name.
        name: String,
        /// Its node (`node1` by default).
        node: Option<String>,
    },
    /// Add the next node (`nodeN`) with its pod networks.
    AddNode,
    /// Remove a node with its pods.
    RemoveNode {
        /// Its name (`node2`, …).
        name: String,
    },
    /// Act on cluster `name` (`a`, `b`, … with `[topology] clusters`) from now on.
    UseCluster {
        /// The cluster.
        name: String,
    },
    /// Remove a pod.
    RemovePod {
        /// Its name.
        name: String,
    },
    /// Add a service for a pod's port.
    AddService {
        /// Its name.
        name: String,
        /// Kubernetes namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
        /// The pod behind it.
        pod: String,
        /// Service port.
        #[serde(default = "port_80")]
        port: u16,
        /// The pod's port.
        #[serde(default = "http_port")]
        target_port: u16,
    },
    /// Remove a service.
    RemoveService {
        /// Its name.
        name: String,
    },
    /// The laptop routes `to` (a pod, `service:NAME` or an address) into the
    /// tunnel, or with `present = false` no longer does, within `within`
    /// seconds. Reports how long after the object's last change it happened.
    Route {
        /// Pod, `service:NAME`, or an IP address.
        to: String,
        /// Use the pod's IPv6 address.
        #[serde(default)]
        ipv6: bool,
        /// Whether the route must exist.
        #[serde(default = "yes")]
        present: bool,
        /// Seconds to wait.
        #[serde(default = "two")]
        within: u64,
    },
    /// Make the API forget its event history (as etcd compaction does):
    /// watchers get 410 Gone and must list again.
    CompactApi,
    /// A pod connects to the server-cluster pod's IP; a listener on the laptop must get it.
    ConnectBack {
        /// The pod that connects.
        from: String,
        /// Use IPv6.
        #[serde(default)]
        ipv6: bool,
    },
    /// The laptop's network state equals the state before any client ran
    /// (waiting up to `within` seconds for it to get there).
    LaptopUnchanged {
        /// Seconds to wait.
        #[serde(default)]
        within: u64,
    },
    /// Start a client that stops at crash point `point`, then `kill` it:
    /// SIGINT or SIGTERM (it must clean up and exit 0), SIGKILL (the client
    /// alone), or SIGKILL-group (its whole process group). For `mid-teardown`
    /// the client is first brought up and asked to stop with SIGTERM.
    CrashClient {
        /// A crash point (see `teletun::crashpoint::POINTS`).
        point: String,
        /// SIGINT, SIGTERM, SIGKILL or SIGKILL-group.
        kill: String,
    },
    /// Record the laptop's network state, normalized (no MAC addresses,
    /// link-local addresses or run ids), under `name` in the results; the
    /// test suite compares these with insta snapshots.
    Snapshot {
        /// The snapshot's name.
        name: String,
    },
    /// Run `teletun cleanup` on the laptop; it must succeed.
    TeletunCleanup,
    /// Impair the underlay from now on with the named `[impairments.NAME]` profile.
    Impair {
        /// The profile.
        profile: String,
    },
    /// Move `bytes` seeded bytes through the tunnel between the laptop and the
    /// app pod (`get`: pod → laptop, `put`: laptop → pod); the SHA-256 must
    /// match. Reports the throughput.
    Transfer {
        /// get or put.
        direction: String,
        /// How many bytes.
        bytes: u64,
        /// Seed of the content.
        #[serde(default = "seed_one")]
        seed: u64,
    },
    /// No packet that came out of a TUN device was corrupted or a splice: the
    /// kernels of the laptop and the server-cluster pod counted no header or
    /// checksum errors, and every teletun session summary so far reports
    /// 0 malformed packets.
    NoCorruption,
    /// Kill a running client (SIGKILL, SIGKILL-group, …) without expectations.
    KillClient {
        /// Which client.
        #[serde(default = "main_client")]
        name: String,
        /// The signal, or SIGKILL-group.
        signal: String,
    },
    /// Run a shell command on `laptop`, `node`, `router` or `pod:NAME`; it must
    /// exit 0 (or fail, with `expect_failure`), and print `expect_output` if given.
    Run {
        /// Where.
        on: String,
        /// `sh -c` command.
        command: String,
        /// Text the output must contain.
        expect_output: Option<String>,
        /// Expect a non-zero exit instead.
        #[serde(default)]
        expect_failure: bool,
    },
    /// A process's log contains a text (waiting up to `within` seconds).
    LogContains {
        /// `server-external`, `server-cluster`, or `client:NAME`.
        process: String,
        /// The text.
        text: String,
        /// Seconds to wait for it.
        #[serde(default = "ten")]
        within: u64,
        /// Require the text to be absent instead (checked at once).
        #[serde(default)]
        absent: bool,
    },
    /// Start one server role alone (`server-cluster` or `server-external`).
    StartServer {
        /// Which role.
        role: String,
    },
    /// Stop one server role with a signal (SIGTERM, SIGINT or SIGKILL).
    StopServer {
        /// Which role.
        role: String,
        /// The signal.
        #[serde(default = "sigterm")]
        signal: String,
    },
    /// A running client must exit by itself, non-zero, with this text in its
    /// one-line error, within `within` seconds.
    ClientExits {
        /// Which client.
        #[serde(default = "main_client")]
        name: String,
        /// Text of the error line.
        expect_error: String,
        /// Seconds to wait.
        #[serde(default = "ten")]
        within: u64,
    },
}

fn ten() -> u64 {
    10
}
fn two() -> u64 {
    2
}
fn default_namespace() -> String {
    "default".into()
}
fn port_80() -> u16 {
    80
}
fn http_port() -> u16 {
    HTTP_PORT
}
fn seed_one() -> u64 {
    1
}
fn sigterm() -> String {
    "SIGTERM".into()
}

fn signal_number(name: &str) -> Result<libc::c_int> {
    Ok(match name {
        "SIGINT" => libc::SIGINT,
        "SIGTERM" => libc::SIGTERM,
        "SIGKILL" => libc::SIGKILL,
        other => bail!("unknown signal {other:?}: use SIGINT, SIGTERM or SIGKILL"),
    })
}

impl Step {
    /// A one-line label for reports.
    pub fn label(&self) -> String {
        let fam = |v6: &bool| if *v6 { " (IPv6)" } else { "" };
        let fails = |f: &bool| if *f { " fails" } else { "" };
        match self {
            Step::StartServers => "start servers".into(),
            Step::StartClient {
                name,
                expect_error: None,
                ..
            } => format!("start client {name}"),
            Step::StartClient {
                name,
                expect_error: Some(e),
                ..
            } => format!("client {name} fails with {e:?}"),
            Step::StopClient { name, signal } => format!("stop client {name} with {signal}"),
            Step::Ping {
                to,
                ipv6,
                expect_failure,
            } => format!("ping {to}{}{}", fam(ipv6), fails(expect_failure)),
            Step::TcpEcho {
                to,
                ipv6,
                expect_failure,
            } => format!("TCP echo {to}{}{}", fam(ipv6), fails(expect_failure)),
            Step::UdpEcho { to, ipv6 } => format!("UDP echo {to}{}", fam(ipv6)),
            Step::Http { to, expect_failure } => format!("HTTP {to}{}", fails(expect_failure)),
            Step::Resolve { name, expect } => format!("resolve {name} → {expect}"),
            Step::AddPod { name, node: None } => format!("add pod {name}"),
            Step::AddPod { name, node: Some(n) } => format!("add pod {name} on {n}"),
            Step::AddNode => "add a node".into(),
            Step::RemoveNode { name } => format!("remove {name}"),
            Step::UseCluster { name } => format!("use cluster {name}"),
            Step::RemovePod { name } => format!("remove pod {name}"),
            Step::AddService { name, pod, .. } => format!("add service {name} → {pod}"),
            Step::RemoveService { name } => format!("remove service {name}"),
            Step::Route {
                to,
                ipv6,
                present: true,
                ..
            } => format!("{to}{} is routed into the tunnel", fam(ipv6)),
            Step::Route {
                to,
                ipv6,
                present: false,
                ..
            } => format!("{to}{} is not routed into the tunnel", fam(ipv6)),
            Step::CompactApi => "compact the API's history (410 Gone)".into(),
            Step::ConnectBack { from, ipv6 } => format!("{from} connects to the laptop{}", fam(ipv6)),
            Step::LaptopUnchanged { .. } => "laptop state unchanged".into(),
            Step::CrashClient { point, kill } => format!("client stopped at {point}, then {kill}"),
            Step::TeletunCleanup => "teletun cleanup".into(),
            Step::Snapshot { name } => format!("snapshot of the laptop: {name}"),
            Step::Impair { profile } => format!("impair the underlay: {profile}"),
            Step::Transfer { direction, bytes, .. } => format!("transfer {} MB ({direction})", bytes / 1_000_000),
            Step::NoCorruption => "no corrupted or spliced packets".into(),
            Step::KillClient { name, signal } => format!("kill client {name} with {signal}"),
            Step::Run { on, command, .. } => {
                let one_line: String = command.escape_debug().collect();
                let cut: String = one_line.chars().take(60).collect();
                format!("on {on}: {cut}{}", if cut.len() < one_line.len() { "…" } else { "" })
            }
            Step::LogContains {
                process,
                text,
                absent: false,
                ..
            } => format!("{process} log has {text:?}"),
            Step::LogContains {
                process,
                text,
                absent: true,
                ..
            } => format!("{process} log lacks {text:?}"),
            Step::StartServer { role } => format!("start {role}"),
            Step::StopServer { role, signal } => format!("stop {role} with {signal}"),
            Step::ClientExits { name, expect_error, .. } => format!("client {name} exits with {expect_error:?}"),
        }
    }

    /// Whether the step passes only when its check fails.
    fn expects_failure(&self) -> bool {
        matches!(
            self,
            Step::Ping {
                expect_failure: true,
                ..
            } | Step::TcpEcho {
                expect_failure: true,
                ..
            } | Step::Http {
                expect_failure: true,
                ..
            }
        )
    }

    fn is_setup(&self) -> bool {
        matches!(
            self,
            Step::StartServers | Step::StartServer { .. } | Step::StartClient { expect_error: None, .. }
        )
    }
}

/// Reads a scenario file and expands its matrix into cases.
pub fn load(path: &Path) -> Result<Vec<Scenario>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).map_err(|e| anyhow!("{}: {}", path.display(), format!("{e:#}").trim().replace('\n', " ")))
}

fn parse(text: &str) -> Result<Vec<Scenario>> {
    let file: ScenarioFile = toml::from_str(text)?;
    let mut combos: Vec<Vec<(&str, &str)>> = vec![Vec::new()];
    for (axis, values) in &file.matrix {
        if values.is_empty() {
            bail!("matrix axis {axis:?} has no values");
        }
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((axis.as_str(), v.as_str()));
                    c
                })
            })
            .collect();
    }
    combos
        .into_iter()
        .map(|combo| {
            let fill = |v: &toml::Value| substitute(v, &combo);
            let topology = match &file.topology {
                Some(t) => fill(t)?.try_into().context("bad [topology]")?,
                None => Topology::default(),
            };
            let steps = file
                .step
                .iter()
                .enumerate()
                .map(|(i, v)| fill(v)?.try_into().with_context(|| format!("step {}", i + 1)))
                .collect::<Result<Vec<Step>>>()?;
            let name = if combo.is_empty() {
                file.name.clone()
            } else {
                let axes: Vec<String> = combo.iter().map(|(a, v)| format!("{a}={v}")).collect();
                format!("{}[{}]", file.name, axes.join(","))
            };
            for step in &steps {
                if let Step::Impair { profile } = step {
                    if !file.impairments.contains_key(profile) {
                        bail!("no [impairments.{profile}] table for the impair step");
                    }
                }
            }
            Ok(Scenario {
                name,
                description: file.description.clone(),
                topology,
                steps,
                impairments: file.impairments.clone(),
            })
        })
        .collect()
}

/// Replaces `{axis}` in every string of `v` with the case's value.
fn substitute(v: &toml::Value, combo: &[(&str, &str)]) -> Result<toml::Value> {
    Ok(match v {
        toml::Value::String(s) => {
            let mut out = s.clone();
            for (axis, value) in combo {
                out = out.replace(&format!("{{{axis}}}"), value);
            }
            if let (Some(a), Some(b)) = (out.find('{'), out.find('}')) {
                if a < b && !out[a + 1..b].contains(char::is_whitespace) {
                    bail!("{:?} names no matrix axis", &out[a..=b]);
                }
            }
            toml::Value::String(out)
        }
        toml::Value::Array(a) => toml::Value::Array(a.iter().map(|x| substitute(x, combo)).collect::<Result<_>>()?),
        toml::Value::Table(t) => toml::Value::Table(
            t.iter()
                .map(|(k, x)| Ok((k.clone(), substitute(x, combo)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

/// State while a scenario runs.
struct Run<'a> {
    /// The clusters; steps act on the first (`use-cluster` brings another to the front).
    clusters: Vec<Cluster>,
    clients: BTreeMap<String, Background>,
    /// Every client's log, also after it ended.
    client_logs: BTreeMap<String, std::path::PathBuf>,
    laptop_before: String,
    impairments: &'a BTreeMap<String, Impairment>,
    /// What the current step measured, for its report line.
    detail: Option<String>,
    /// A state snapshot the current step took.
    snapshot: Option<(String, String)>,
}

/// Builds a fresh cluster, runs the scenario's steps, tears everything down.
pub fn run(scenario: &Scenario, teletun: &Path, work: &Path, progress: &mut dyn FnMut(&CheckResult)) -> CaseResult {
    let started = Instant::now();
    let mut checks = Vec::new();
    let t = Instant::now();
    let clusters = match build_clusters(teletun, work, &scenario.topology) {
        Ok(c) => c,
        Err(e) => {
            let c = CheckResult::new("build cluster", t.elapsed(), Outcome::Fail(format!("{e:#}")));
            progress(&c);
            checks.push(c);
            return CaseResult::new(&scenario.name, checks, started.elapsed(), None);
        }
    };
    let c = CheckResult::new("build cluster", t.elapsed(), Outcome::Pass);
    progress(&c);
    checks.push(c);
    let logs: Vec<std::path::PathBuf> = clusters.iter().map(|c| c.dir.clone()).collect();
    let laptop_before = clusters[0].laptop.snapshot().unwrap_or_default();
    let mut run = Run {
        clusters,
        clients: BTreeMap::new(),
        client_logs: BTreeMap::new(),
        laptop_before,
        impairments: &scenario.impairments,
        detail: None,
        snapshot: None,
    };
    let mut aborted = false;
    for step in &scenario.steps {
        let label = step.label();
        if aborted || exec::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            let c = CheckResult::new(&label, Duration::ZERO, Outcome::Skip);
            progress(&c);
            checks.push(c);
            continue;
        }
        let t = Instant::now();
        let outcome = match (run.step(step), step.expects_failure()) {
            (Ok(()), false) => Outcome::Pass,
            (Err(e), true) => {
                run.detail = Some(format!(
                    "failed as expected: {}",
                    format!("{e:#}").lines().next().unwrap_or("")
                ));
                Outcome::Pass
            }
            (Ok(()), true) => Outcome::Fail("it worked, but should have failed".into()),
            (Err(e), false) => {
                aborted = step.is_setup();
                Outcome::Fail(format!("{e:#}"))
            }
        };
        let mut c = CheckResult::new(&label, t.elapsed(), outcome);
        c.detail = run.detail.take();
        c.snapshot = run.snapshot.take();
        progress(&c);
        checks.push(c);
    }
    // Stop clients before the servers so their cleanup runs normally.
    for (_, mut c) in std::mem::take(&mut run.clients) {
        c.signal(libc::SIGTERM);
        let _ = c.wait(Duration::from_secs(10));
    }
    let failed = checks.iter().any(|c| matches!(c.outcome, Outcome::Fail(_)));
    // The first cluster made the laptop: it goes last.
    let mut clusters = std::mem::take(&mut run.clusters);
    clusters.sort_by_key(|c| std::cmp::Reverse(c.plan.index));
    for mut c in clusters {
        c.teardown();
    }
    let keep = failed.then(|| logs[0].clone());
    if !failed {
        for dir in &logs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    CaseResult::new(&scenario.name, checks, started.elapsed(), keep)
}

/// The topology's clusters: the first makes the laptop, the others attach to it.
fn build_clusters(teletun: &Path, work: &Path, topology: &Topology) -> Result<Vec<Cluster>> {
    let mut clusters = vec![Cluster::build(teletun, work, topology)?];
    for index in 1..topology.clusters {
        match Cluster::attach(&clusters[0], work, topology, index) {
            Ok(c) => clusters.push(c),
            Err(e) => {
                clusters.sort_by_key(|c| std::cmp::Reverse(c.plan.index));
                for mut c in clusters {
                    c.teardown();
                }
                return Err(e);
            }
        }
    }
    Ok(clusters)
}

impl Run<'_> {
    fn laptop_check(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut c = self.clusters[0].laptop.cmd(program);
        c.args(args);
        let out = exec::output(c, Duration::from_secs(20))?;
        if !out.status.success() {
            bail!("{}", exec::last_lines(&out.both(), 3));
        }
        Ok(out.stdout)
    }

    fn agent_on_laptop(&self, args: &[&str]) -> Result<String> {
        let me = std::env::current_exe()?;
        let mut full = vec!["agent"];
        full.extend_from_slice(args);
        self.laptop_check(&me.to_string_lossy(), &full)
    }

    fn step(&mut self, step: &Step) -> Result<()> {
        match step {
            Step::StartServers => self.clusters[0].start_servers(),
            Step::StartClient {
                name,
                client_key,
                server_key,
                expect_error,
                pod,
                kubeconfig,
                args,
            } => {
                let options = ClientOptions {
                    client_key,
                    server_key,
                    pod: pod.as_deref(),
                    kubeconfig: kubeconfig.as_deref(),
                    args,
                };
                self.start_client(name, &options, expect_error.as_deref())
            }
            Step::StopClient { name, signal } => {
                let sig = signal_number(signal)?;
                if sig == libc::SIGKILL {
                    bail!("stop-client is a clean stop: use SIGINT or SIGTERM");
                }
                let mut c = self
                    .clients
                    .remove(name)
                    .with_context(|| format!("no running client {name:?}"))?;
                c.signal(sig);
                let status = c.wait(Duration::from_secs(10))?;
                if !status.success() {
                    bail!("client exited with {status}: {}", exec::last_lines(&c.log_text(), 3));
                }
                if !c.log_text().contains("stopped by") {
                    bail!("client did not report its stop: {}", exec::last_lines(&c.log_text(), 3));
                }
                Ok(())
            }
            Step::Ping { to, ipv6, .. } => {
                let ip = self.clusters[0].address(to, *ipv6)?.to_string();
                self.laptop_check("ping", &["-c", "3", "-i", "0.2", "-W", "2", &ip])
                    .map(|_| ())
            }
            Step::TcpEcho { to, ipv6, .. } => {
                let addr = std::net::SocketAddr::new(self.clusters[0].address(to, *ipv6)?, ECHO_PORT).to_string();
                self.agent_on_laptop(&["tcp-echo", &addr]).map(|_| ())
            }
            Step::UdpEcho { to, ipv6 } => {
                let addr = std::net::SocketAddr::new(self.clusters[0].address(to, *ipv6)?, ECHO_PORT).to_string();
                self.agent_on_laptop(&["udp-echo", &addr]).map(|_| ())
            }
            Step::Http { to, .. } => {
                let (port, pod) = match to.strip_prefix("service:") {
                    Some(svc) => {
                        let s = self.clusters[0].service(svc)?;
                        (s.port, s.pod.clone())
                    }
                    None => (HTTP_PORT, to.clone()),
                };
                let addr = std::net::SocketAddr::new(self.clusters[0].address(to, false)?, port).to_string();
                self.agent_on_laptop(&["http", &addr, &format!("hello from {pod} ")])
                    .map(|_| ())
            }
            Step::Resolve { name, expect } if expect == "nothing" => {
                match self.laptop_check("getent", &["ahosts", name]) {
                    Ok(out) => bail!("{name} resolved: {}", out.lines().next().unwrap_or("")),
                    Err(_) => Ok(()),
                }
            }
            Step::AddPod { name, node } => self.clusters[0].add_app_pod(name, node.as_deref()),
            Step::RemoveNode { name } => self.clusters[0].remove_node(name),
            Step::UseCluster { name } => {
                let i = self
                    .clusters
                    .iter()
                    .position(|c| c.plan.name() == *name)
                    .with_context(|| format!("no cluster {name:?}: [topology] clusters says how many"))?;
                self.clusters.swap(0, i);
                Ok(())
            }
            Step::AddNode => {
                let name = self.clusters[0].add_node()?;
                self.detail = Some(format!("added {name}"));
                Ok(())
            }
            Step::RemovePod { name } => self.clusters[0].remove_pod(name),
            Step::AddService {
                name,
                namespace,
                pod,
                port,
                target_port,
            } => self.clusters[0].add_service(name, namespace, pod, *port, *target_port),
            Step::RemoveService { name } => self.clusters[0].remove_service(name),
            Step::CompactApi => {
                let n = self.clusters[0].compact_api()?;
                self.detail = Some(format!("{n} watches got 410 Gone and listed again"));
                Ok(())
            }
            Step::Route {
                to,
                ipv6,
                present,
                within,
            } => {
                let addr = match to.parse::<std::net::IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => self.clusters[0].address(to, *ipv6)?,
                };
                let since = self.clusters[0].changed_at.get(to).copied();
                let deadline = Instant::now() + Duration::from_secs(*within);
                loop {
                    let mut c = self.clusters[0].laptop.cmd("ip");
                    c.args(["-o", "route", "get", &addr.to_string()]);
                    let out = exec::output(c, Duration::from_secs(5))?;
                    let routed = out.status.success() && out.stdout.contains(" dev tel");
                    if routed == *present {
                        if let Some(t) = since {
                            self.detail = Some(format!("{} ms after the change", t.elapsed().as_millis()));
                        }
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        bail!("after {within} s: {}", out.both());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Step::Resolve { name, expect } => {
                let (target, v6) = match expect.strip_suffix("/ipv6") {
                    Some(t) => (t, true),
                    None => (expect.as_str(), false),
                };
                let want = self.clusters[0].address(target, v6)?;
                let family = if v6 { "ahostsv6" } else { "ahostsv4" };
                let out = self
                    .laptop_check("getent", &[family, name])
                    .with_context(|| format!("{name} does not resolve"))?;
                let got: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
                if got.first().copied() != Some(want.to_string().as_str()) {
                    bail!("{name} resolved to {got:?}, expected {want}");
                }
                Ok(())
            }
            Step::ConnectBack { from, ipv6 } => {
                let target = self.clusters[0].address("teletun", *ipv6)?;
                let token = format!("back-from-{from}");
                let me = std::env::current_exe()?;
                let mut listen = self.clusters[0].laptop.cmd(&me);
                listen.args(["agent", "listen", "9099", &token]);
                let mut l = Background::spawn("laptop listener", listen, &self.clusters[0].dir.join("listener.log"))?;
                l.wait_for_log("listening", Duration::from_secs(5))?;
                let pod = self.clusters[0].pod(from)?.ns.clone();
                let mut send = pod.cmd(&me);
                send.args([
                    "agent",
                    "send",
                    &std::net::SocketAddr::new(target, 9099).to_string(),
                    &token,
                ]);
                exec::run(send, Duration::from_secs(10))?;
                let status = l.wait(Duration::from_secs(10))?;
                if !status.success() {
                    bail!(
                        "the laptop listener did not get the connection: {}",
                        exec::last_lines(&l.log_text(), 2)
                    );
                }
                Ok(())
            }
            Step::LaptopUnchanged { within } => {
                let deadline = Instant::now() + Duration::from_secs(*within);
                loop {
                    let now = self.clusters[0].laptop.snapshot()?;
                    if now == self.laptop_before {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        bail!("laptop state differs:\n{}", diff(&self.laptop_before, &now));
                    }
                    exec::check_interrupted()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Step::CrashClient { point, kill } => self.crash_client(point, kill),
            Step::Impair { profile } => {
                let imp = self
                    .impairments
                    .get(profile)
                    .with_context(|| format!("no profile {profile:?}"))?
                    .clone();
                self.clusters[0].impair(&imp)?;
                self.detail = Some(imp.describe());
                Ok(())
            }
            Step::Transfer { direction, bytes, seed } => {
                let addr = std::net::SocketAddr::new(self.clusters[0].address("app", false)?, crate::agent::BLOB_PORT);
                let me = std::env::current_exe()?;
                let mut c = self.clusters[0].laptop.cmd(&me);
                c.args([
                    "agent",
                    "blob",
                    direction,
                    &addr.to_string(),
                    &bytes.to_string(),
                    &seed.to_string(),
                ]);
                let out = exec::output(c, Duration::from_secs(600))?;
                if !out.status.success() {
                    bail!("{}", exec::last_lines(&out.both(), 2));
                }
                self.detail = out
                    .stdout
                    .lines()
                    .last()
                    .map(|l| l.trim_start_matches("ok: ").to_owned());
                Ok(())
            }
            Step::NoCorruption => self.no_corruption(),
            Step::Snapshot { name } => {
                let state = normalize(&self.clusters[0].laptop.snapshot()?);
                self.snapshot = Some((name.clone(), state));
                Ok(())
            }
            Step::TeletunCleanup => self
                .laptop_check(&self.clusters[0].teletun.to_string_lossy(), &["cleanup"])
                .map(|_| ()),
            Step::KillClient { name, signal } => {
                let mut c = self
                    .clients
                    .remove(name)
                    .with_context(|| format!("no running client {name:?}"))?;
                match signal.as_str() {
                    "SIGKILL-group" => c.signal_group(libc::SIGKILL),
                    other => c.signal(signal_number(other)?),
                }
                c.wait(Duration::from_secs(10)).map(|_| ())
            }
            Step::Run {
                on,
                command,
                expect_output,
                expect_failure,
            } => {
                let mut c = match on.as_str() {
                    "laptop" => self.clusters[0].laptop.cmd("sh"),
                    "node" => self.clusters[0].node.cmd("sh"),
                    "router" => self.clusters[0].router.cmd("sh"),
                    other => match other.strip_prefix("pod:") {
                        Some(pod) => self.clusters[0].pod(pod)?.ns.cmd("sh"),
                        None => bail!("unknown place {other:?}: use laptop, node, router or pod:NAME"),
                    },
                };
                c.args(["-c", command]);
                let out = exec::output(c, Duration::from_secs(60))?;
                if out.status.success() == *expect_failure {
                    bail!(
                        "exit status {} (expected {}): {}",
                        out.status,
                        if *expect_failure { "failure" } else { "success" },
                        out.both()
                    );
                }
                if let Some(want) = expect_output {
                    if !out.both().contains(want.as_str()) {
                        bail!("output lacks {want:?}: {}", out.both());
                    }
                }
                Ok(())
            }
            Step::LogContains {
                process,
                text,
                within,
                absent,
            } => {
                let deadline = Instant::now() + Duration::from_secs(if *absent { 0 } else { *within });
                loop {
                    let log = match process.strip_prefix("client:") {
                        Some(name) => {
                            let path = self
                                .client_logs
                                .get(name)
                                .with_context(|| format!("no client {name:?} ran"))?;
                            std::fs::read_to_string(path)?
                        }
                        None => self.clusters[0].process_mut(process)?.log_text(),
                    };
                    match (log.contains(text.as_str()), absent) {
                        (true, false) => return Ok(()),
                        (false, true) => return Ok(()),
                        (true, true) => bail!("found: {}", exec::last_lines(&log, 3)),
                        (false, false) => {}
                    }
                    if Instant::now() > deadline {
                        bail!("not found within {within} s; last lines: {}", exec::last_lines(&log, 3));
                    }
                    exec::check_interrupted()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Step::StartServer { role } => match role.as_str() {
                "server-cluster" => self.clusters[0].start_server_cluster(),
                "server-external" => self.clusters[0].start_server_external(),
                other => bail!("unknown role {other:?}: use server-cluster or server-external"),
            },
            Step::StopServer { role, signal } => {
                let sig = signal_number(signal)?;
                let p = self.clusters[0].process_mut(role)?;
                p.signal(sig);
                let status = p.wait(Duration::from_secs(10))?;
                if sig != libc::SIGKILL && !status.success() {
                    bail!("{role} exited with {status}: {}", exec::last_lines(&p.log_text(), 3));
                }
                Ok(())
            }
            Step::ClientExits {
                name,
                expect_error,
                within,
            } => {
                let mut c = self
                    .clients
                    .remove(name)
                    .with_context(|| format!("no running client {name:?}"))?;
                let status = c.wait(Duration::from_secs(*within))?;
                check_one_error(status, &c.log_text(), expect_error)
            }
        }
    }

    fn no_corruption(&mut self) -> Result<()> {
        const COUNTERS: &[&str] = &[
            "IpInHdrErrors",
            "IpInTruncatedPkts",
            "IcmpInCsumErrors",
            "TcpInCsumErrors",
            "UdpInCsumErrors",
            "Ip6InHdrErrors",
            "Ip6InTruncatedPkts",
            "Udp6InCsumErrors",
        ];
        let mut problems = Vec::new();
        let places = [
            ("laptop", self.clusters[0].laptop.cmd("nstat")),
            ("server-cluster pod", self.clusters[0].pod("teletun")?.ns.cmd("nstat")),
        ];
        for (place, mut nstat) in places {
            nstat.arg("-asz");
            let out = exec::run(nstat, Duration::from_secs(10))?;
            for line in out.lines() {
                let mut w = line.split_whitespace();
                if let (Some(name), Some(value)) = (w.next(), w.next()) {
                    if COUNTERS.contains(&name) && value != "0" {
                        problems.push(format!("{place}: {name} = {value}"));
                    }
                }
            }
        }
        let mut summaries = 0;
        let mut logs: Vec<(String, String)> = std::fs::read_dir(&self.clusters[0].dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("client-"))
            })
            .map(|p| (p.display().to_string(), std::fs::read_to_string(&p).unwrap_or_default()))
            .collect();
        for role in ["server-cluster", "server-external"] {
            logs.push((role.to_owned(), self.clusters[0].process_mut(role)?.log_text()));
        }
        for (name, log) in &logs {
            for line in log.lines().filter(|l| l.contains(" malformed")) {
                summaries += 1;
                let words: Vec<&str> = line.split_whitespace().collect();
                for pair in words.windows(2).filter(|w| w[1].starts_with("malformed")) {
                    if pair[0] != "0" {
                        problems.push(format!("{name}: {}", line.trim()));
                    }
                }
            }
        }
        if summaries == 0 {
            bail!("no teletun session summary to check yet: stop the client first");
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        self.detail = Some(format!(
            "{summaries} session summaries, 0 malformed; kernel error counters 0"
        ));
        Ok(())
    }

    fn crash_client(&mut self, point: &str, kill: &str) -> Result<()> {
        let (signal, group) = match kill {
            "SIGKILL-group" => (libc::SIGKILL, true),
            other => (signal_number(other)?, false),
        };
        let mut cmd = self.clusters[0].client_command(&ClientOptions::default())?;
        cmd.env("TELETUN_TESTBENCH_CRASHPOINT", point);
        let log = self.clusters[0].dir.join(format!("client-crash-{point}.log"));
        let mut c = Background::spawn("crashing client", cmd, &log)?;
        let reached = format!("crashpoint {point} reached");
        if point == "mid-teardown" {
            c.wait_for_log("is up", Duration::from_secs(20))?;
            c.signal(libc::SIGTERM);
        }
        c.wait_for_log(&reached, Duration::from_secs(20))?;
        if group {
            c.signal_group(signal);
        } else {
            c.signal(signal);
        }
        let status = c.wait(Duration::from_secs(10))?;
        if signal != libc::SIGKILL && !status.success() {
            bail!(
                "after {kill} at {point} the client exited with {status}: {}",
                exec::last_lines(&c.log_text(), 3)
            );
        }
        Ok(())
    }

    fn start_client(&mut self, name: &str, options: &ClientOptions, expect_error: Option<&str>) -> Result<()> {
        if self.clients.contains_key(name) {
            bail!("client {name:?} already runs");
        }
        let cmd = self.clusters[0].client_command(options)?;
        let log = self.clusters[0].dir.join(format!("client-{name}.log"));
        self.client_logs.insert(name.to_owned(), log.clone());
        let mut c = Background::spawn(&format!("client {name}"), cmd, &log)?;
        match expect_error {
            None => {
                c.wait_for_log("is up", Duration::from_secs(20))?;
                self.clients.insert(name.to_owned(), c);
            }
            Some(text) => {
                let status = c.wait(Duration::from_secs(20))?;
                check_one_error(status, &c.log_text(), text)?;
            }
        }
        Ok(())
    }
}

/// A client that failed must have exited non-zero with exactly one
/// `teletun: ` error line, containing `text`.
fn check_one_error(status: std::process::ExitStatus, log: &str, text: &str) -> Result<()> {
    if status.success() {
        bail!("the client succeeded; expected it to fail with {text:?}");
    }
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("teletun: ")).collect();
    if errors.len() != 1 || !errors[0].contains(text) {
        bail!(
            "expected one error line containing {text:?}, got: {}",
            exec::last_lines(log, 3)
        );
    }
    Ok(())
}

/// Replaces what differs from run to run (MAC addresses, link-local addresses
/// derived from them, namespace names, peer interface numbers) with fixed words,
/// and sorts the listings whose order carries no meaning (links, addresses,
/// routes, rules: the kernel orders them by values that were just replaced).
fn normalize(state: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut unordered: Vec<String> = Vec::new();
    let mut sorting = false;
    for line in normalize_words(state).lines() {
        if line.starts_with("# ") {
            unordered.sort();
            out.append(&mut unordered);
            sorting = ["# links", "# addresses", "# routes", "# rules"].contains(&line);
            out.push(line.to_owned());
        } else if sorting {
            unordered.push(line.to_owned());
        } else {
            out.push(line.to_owned());
        }
    }
    unordered.sort();
    out.append(&mut unordered);
    out.join("\n")
}

fn normalize_words(state: &str) -> String {
    state
        .lines()
        .map(|line| {
            line.split(' ')
                .map(|w| {
                    let hexes: Vec<&str> = w.split(':').collect();
                    if hexes.len() == 6
                        && hexes
                            .iter()
                            .all(|h| h.len() == 2 && h.chars().all(|c| c.is_ascii_hexdigit()))
                    {
                        "MAC".to_owned()
                    } else if w.starts_with("fe80::") {
                        format!("fe80::LINKLOCAL{}", w.find('/').map(|i| &w[i..]).unwrap_or(""))
                    } else if let Some(role) = namespace_role(w) {
                        format!("RUN-{role}")
                    } else if let Some(i) = w.find("@if") {
                        format!("{}@ifN{}", &w[..i], if w.ends_with(':') { ":" } else { "" })
                    } else {
                        w.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `ROLE` of a namespace name `tt<pid>-<hex>-ROLE`.
fn namespace_role(word: &str) -> Option<&str> {
    let (pid, rest) = word.strip_prefix("tt")?.split_once('-')?;
    let (id, role) = rest.split_once('-')?;
    let ok = !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && id.chars().all(|c| c.is_ascii_hexdigit());
    ok.then_some(role)
}

/// Lines only in `a` (prefixed -) or only in `b` (prefixed +).
fn diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = Vec::new();
    out.extend(la.iter().filter(|l| !lb.contains(l)).map(|l| format!("- {l}")));
    out.extend(lb.iter().filter(|l| !la.contains(l)).map(|l| format!("+ {l}")));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                assert!(!load(&p).unwrap().is_empty());
                n += 1;
            }
        }
        assert!(n > 0);
    }

    #[test]
    fn unknown_keys_and_steps_are_errors() {
        assert!(parse("name='x'\n[[step]]\ndo='ping'\nto='app'\ncolour='red'\n").is_err());
        assert!(parse("name='x'\n[[step]]\ndo='dance'\n").is_err());
        assert!(parse("name='x'\n[[step]]\ndo='ping'\nto='app'\n").is_ok());
        assert!(parse("name='x'\n[topology]\nsize='huge'\n[[step]]\ndo='start-servers'\n").is_err());
    }

    #[test]
    fn normalize_removes_what_changes_between_runs() {
        let raw = "eth0@if3: <BROADCAST> mtu 1500 link/ether 5a:0b:11:22:33:44 brd ff:ff:ff:ff:ff:ff link-netns tt123-ab12cd-router\n\
                   eth0    inet6 fe80::580b:11ff:fe22:3344/64 scope link";
        assert_eq!(
            normalize(raw),
            "eth0@ifN: <BROADCAST> mtu 1500 link/ether MAC brd MAC link-netns RUN-router\n\
             eth0    inet6 fe80::LINKLOCAL/64 scope link"
        );
    }

    #[test]
    fn the_matrix_expands_into_named_cases() {
        let cases = parse(
            "name='crash'\n[matrix]\nkill=['SIGINT','SIGKILL']\nresolvconf=['debian','openresolv']\n\
             [topology]\nresolvconf='{resolvconf}'\n[[step]]\ndo='crash-client'\npoint='after-dns'\nkill='{kill}'\n",
        )
        .unwrap();
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "crash[kill=SIGINT,resolvconf=debian]",
                "crash[kill=SIGINT,resolvconf=openresolv]",
                "crash[kill=SIGKILL,resolvconf=debian]",
                "crash[kill=SIGKILL,resolvconf=openresolv]"
            ]
        );
        assert_eq!(cases[1].topology.resolvconf, "openresolv");
        assert!(matches!(&cases[2].steps[0], Step::CrashClient { kill, .. } if kill == "SIGKILL"));
        assert!(parse("name='x'\n[[step]]\ndo='crash-client'\npoint='{nope}'\nkill='SIGINT'\n").is_err());
    }
}
