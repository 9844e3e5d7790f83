//! The TeleTUN testbench: builds clusters in network namespaces and runs
//! scenario files and benchmarks against the real `teletun` binary.

use testbench::{agent, bench, chart, exec, kind, netns, peers, report, scenario, topology};

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Builds TeleTUN clusters in network namespaces and tests them.
#[derive(Debug, Parser)]
#[command(name = "testbench", version, about)]
struct Cli {
    /// The teletun binary [default: next to this binary, built if missing].
    #[arg(long, global = true, value_name = "PATH")]
    teletun: Option<PathBuf>,
    /// Where results and logs go [default: target/testbench].
    #[arg(long, global = true, value_name = "DIR")]
    output: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run scenario files (all of scenarios/ when none are given).
    Scenario {
        /// Scenario files.
        files: Vec<PathBuf>,
        /// Only cases whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Only cases whose laptop runs this DNS manager (debian, openresolv,
        /// systemd-resolved); one CI job per variant uses it.
        #[arg(long, value_name = "MANAGER")]
        resolvconf: Option<topology::DnsManager>,
        /// Only load and check the files (every error as FILE:LINE: …); build
        /// and run nothing. Needs no root.
        #[arg(long)]
        check: bool,
        /// netns (network namespaces on this machine) or kind (Kubernetes in
        /// Docker: deploys the servers from docs/deploy/ in each kind config).
        #[arg(long, default_value = "netns", value_parser = ["netns", "kind"])]
        backend: String,
    },
    /// Build what the scenarios need once, into the testbench cache: the
    /// Kubernetes control plane (kube-apiserver and etcd from their pinned Go
    /// modules). ci/setup-debian.sh runs it; scenarios build it on first use too.
    Setup,
    /// Write the JSON Schema of scenario files (docs/scenario.schema.json), for editors.
    Schema {
        /// Write it to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Print what the kind backend would run for a kind config.
    KindPlan {
        /// single-node, two-nodes or dual-stack.
        #[arg(long, default_value = "single-node")]
        config: String,
    },
    /// Measure throughput (one and four TCP streams), RTT and CPU per byte
    /// through the raw underlay, teletun and peer VPNs.
    Bench {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Runs per path; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Peer VPNs measured beside teletun, comma-separated, or `none`
        /// (known: socat-dtls, openvpn, wireguard-go, boringtun; one that cannot run is reported, not measured).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "socat-dtls,openvpn,wireguard-go,boringtun"
        )]
        peers: Vec<String>,
    },
    /// Helpers that run inside namespaces (used by the testbench itself).
    #[command(hide = true, subcommand)]
    Agent(agent::AgentCommand),
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testbench lives in the workspace")
        .to_owned()
}

/// `target/testbench/` of this workspace (or of CARGO_TARGET_DIR).
fn output_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("testbench")
}

fn find_teletun(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit.or_else(|| std::env::var_os("TELETUN_BIN").map(PathBuf::from)) {
        if !p.is_file() {
            bail!("{} does not exist (--teletun / TELETUN_BIN)", p.display());
        }
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("no directory for this executable")?;
    // Integration tests run from target/<profile>/deps.
    let candidates = [dir.join("teletun"), dir.join("../teletun")];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.canonicalize()?);
    }
    let release = dir.components().any(|c| c.as_os_str() == "release");
    eprintln!("testbench: building teletun (not found next to {})", me.display());
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.args(["build", "-p", "teletun"]).current_dir(workspace_root());
    if release {
        cargo.arg("--release");
    }
    let status = cargo.status().context("cannot run cargo to build teletun")?;
    if !status.success() {
        bail!("building teletun failed");
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.to_owned())
        .context("teletun still missing after building it; pass --teletun PATH")
}

fn preflight(bench: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the netns backend needs root (network and mount namespaces); run as root");
    }
    let mut missing = Vec::new();
    let tools: &[(&str, &str)] = &[
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("dnsmasq", "dnsmasq-base"),
        ("ping", "iputils-ping"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("dpkg", "dpkg"),
        ("apt-get", "apt"),
    ];
    for (tool, package) in tools.iter().chain(bench.then_some(&("iperf3", "iperf3"))) {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(*package);
        }
    }
    if !missing.is_empty() {
        missing.dedup();
        bail!(
            "missing tools; install them with: apt-get install -y {}",
            missing.join(" ")
        );
    }
    Ok(())
}

fn scenario_files(files: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    if !files.is_empty() {
        return Ok(files);
    }
    let dir = workspace_root().join("scenarios");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    all.sort();
    Ok(all)
}

/// Which cases to run.
struct Selection {
    filter: Option<String>,
    resolvconf: Option<topology::DnsManager>,
}

/// Loads and checks every file, and keeps the selected cases; reports every
/// problem of every file (`FILE:LINE: …`) before anything is built.
fn load_scenarios(files: Vec<PathBuf>, select: &Selection) -> Result<Vec<(PathBuf, scenario::Scenario)>> {
    let mut cases = Vec::new();
    let (mut problems, mut bad_files) = (0, 0);
    for path in scenario_files(files)? {
        match scenario::load(&path) {
            Ok(loaded) => cases.extend(loaded.into_iter().map(|s| (path.clone(), s))),
            Err(e) => {
                // One `FILE:LINE: …` line each, as compilers print them, for editors.
                eprintln!("{e}");
                problems += e.problems.len();
                bad_files += 1;
            }
        }
    }
    if bad_files > 0 {
        let s = |n: usize| if n == 1 { "" } else { "s" };
        bail!(
            "{problems} problem{} in {bad_files} scenario file{}; nothing was built or run",
            s(problems),
            s(bad_files)
        );
    }
    cases.retain(|(_, s)| {
        let named = select.filter.as_deref().is_none_or(|f| s.name.contains(f));
        let variant = select.resolvconf.is_none_or(|v| s.topology.resolvconf == v);
        named && variant
    });
    Ok(cases)
}

/// Builds the Kubernetes control plane (or finds it in the cache) and says which.
fn control_plane() -> Result<()> {
    use testbench::controlplane::build;
    let built = build::binaries()?;
    println!(
        "control plane: kube-apiserver {} and etcd {}, built from their Go modules ({})",
        build::KUBERNETES,
        build::ETCD,
        built.apiserver.parent().unwrap_or(Path::new("")).display()
    );
    Ok(())
}

fn run_scenarios(teletun: &Path, out: &Path, scenarios: Vec<(PathBuf, scenario::Scenario)>) -> Result<bool> {
    let work = out.join("runs");
    let mut results = Vec::new();
    let total = scenarios.len();
    let mut described = None;
    // Build the control plane before the first case that needs it (once; cached).
    if scenarios.iter().any(|(_, s)| s.topology.kubernetes) {
        control_plane()?;
    }
    for (i, (path, s)) in scenarios.iter().enumerate() {
        if described != Some(path) {
            println!(
                "{}: {}",
                path.file_name().unwrap_or_default().to_string_lossy(),
                s.description
            );
            described = Some(path);
        }
        println!("[{}/{total}] {}", i + 1, s.name);
        let mut case = scenario::run(s, teletun, &work, &mut |c| println!("{}", c.line()));
        let shown = path.strip_prefix(workspace_root()).unwrap_or(path);
        case.rerun = format!(
            "cargo run -p testbench -- scenario {} --filter '{}'",
            shown.display(),
            s.name
        );
        results.push(case);
    }
    println!("\nSummary");
    for c in &results {
        let passed = c
            .checks
            .iter()
            .filter(|x| matches!(x.outcome, report::Outcome::Pass))
            .count();
        println!(
            "  {}  {:<40} {:>3}/{:<3} checks {:>7.1} s",
            if c.passed() { "PASS" } else { "FAIL" },
            c.name,
            passed,
            c.checks.len(),
            c.seconds
        );
    }
    if let Some(median) = report::median_check_seconds(&results, scenario::BUILD_CHECK) {
        println!(
            "  median {:?} over {} cases: {median:.3} s",
            scenario::BUILD_CHECK,
            results.len()
        );
    }
    let (json, junit) = report::write_files(out, &results)?;
    println!("results: {} and {}", json.display(), junit.display());
    let failed: Vec<&report::CaseResult> = results.iter().filter(|c| !c.passed()).collect();
    for c in &failed {
        println!("rerun {}: {}", c.name, c.rerun);
        if let Some(logs) = &c.logs {
            println!("  logs kept in {}", logs.display());
        }
    }
    Ok(failed.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Agent(a) = cli.command {
        return match agent::run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let out = cli.output.unwrap_or_else(output_dir);
    let result = (|| -> Result<bool> {
        exec::install_interrupt_handler()?;
        match cli.command {
            Cmd::Scenario {
                backend, files, filter, ..
            } if backend == "kind" => {
                if !files.is_empty() || filter.is_some() {
                    bail!("the kind backend runs its deployment check per kind config, not scenario files; drop them");
                }
                kind::check_tools()?;
                for config in kind::CONFIGS {
                    kind::execute(&workspace_root(), &kind::plan(&workspace_root(), config)?)?;
                    println!("PASS  kind {config}: the servers deploy and link up");
                }
                Ok(true)
            }
            Cmd::KindPlan { config } => {
                print!("{}", kind::plan(&workspace_root(), &config)?.render());
                Ok(true)
            }
            Cmd::Scenario {
                files,
                filter,
                resolvconf,
                check,
                ..
            } => {
                let scenarios = load_scenarios(files, &Selection { filter, resolvconf })?;
                if check {
                    println!("{} cases, no problems", scenarios.len());
                    return Ok(true);
                }
                if scenarios.is_empty() {
                    bail!("no scenario matches");
                }
                preflight(false)?;
                netns::remove_stale();
                let teletun = find_teletun(cli.teletun)?;
                run_scenarios(&teletun, &out, scenarios)
            }
            Cmd::Setup => {
                control_plane()?;
                Ok(true)
            }
            Cmd::Schema { out } => {
                let schema = scenario::json_schema();
                match out {
                    Some(path) => {
                        std::fs::write(&path, schema).with_context(|| format!("cannot write {}", path.display()))?
                    }
                    None => print!("{schema}"),
                }
                Ok(true)
            }
            Cmd::Bench { seconds, runs, peers } => {
                let peers = match peers.as_slice() {
                    [none] if none == "none" => Vec::new(),
                    names => names.iter().map(|n| peers::Peer::parse(n)).collect::<Result<_>>()?,
                };
                preflight(true)?;
                netns::remove_stale();
                let teletun = find_teletun(cli.teletun)?;
                let report = bench::run(
                    &teletun,
                    &out.join("runs"),
                    &bench::BenchOptions { seconds, runs, peers },
                )?;
                let results = &report.paths;
                for r in results.iter().filter(|r| r.version.is_some()) {
                    println!("{}: {}", r.path, r.version.as_deref().unwrap_or_default());
                }
                print!("{}", bench::table(results));
                print!("{}", report.footer());
                std::fs::create_dir_all(&out)?;
                let path = out.join("bench.json");
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
                let title = format!(
                    "TCP through each path, median of {runs} runs of {seconds} s (line: lowest to highest run)"
                );
                let chart = out.join("bench.svg");
                std::fs::write(&chart, chart::svg(&title, results))?;
                println!("results: {} and {}", path.display(), chart.display());
                Ok(true)
            }
            Cmd::Agent(_) => unreachable!("handled above"),
        }
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("testbench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
