//! `testbench bench`: iperf3 (TCP, one stream and four, each direction), ping,
//! and the tunnel processes' CPU time per byte, through the raw underlay,
//! through teletun and through peer VPNs, in one run on one topology, the paths
//! taking turns within each run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::exec::{self, Background};
use crate::peers::{self, Peer};

/// Benchmark settings.
pub struct BenchOptions {
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Repetitions; medians are reported.
    pub runs: u32,
    /// Peer VPNs to measure beside teletun.
    pub peers: Vec<Peer>,
}

/// Parallel TCP streams in the multi-stream runs.
pub const STREAMS: u32 = 4;

/// Everything one `bench` run measured.
#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    /// Each path: raw underlay, teletun, peers.
    pub paths: Vec<PathResult>,
    /// The teletun client's peak resident memory (VmHWM) over the run, KiB.
    pub client_peak_rss_kib: Option<u64>,
    /// Milliseconds from the client's start to its tunnel, routes and DNS in
    /// place, as the client itself reports it.
    pub client_ready_ms: Option<u64>,
    /// teletun's own session summaries (client, server-external, server-cluster).
    pub summaries: Vec<String>,
}

impl BenchReport {
    /// The lines printed after the table.
    pub fn footer(&self) -> String {
        let mut s = String::new();
        if let Some(kib) = self.client_peak_rss_kib {
            s.push_str(&format!("teletun client: peak RSS {:.1} MiB", kib as f64 / 1024.0));
        }
        if let Some(ms) = self.client_ready_ms {
            s.push_str(&format!("; tunnel, routes and DNS in place {ms} ms after start"));
        }
        if !s.is_empty() {
            s.push('\n');
        }
        for line in &self.summaries {
            s.push_str(&format!("  {line}\n"));
        }
        s
    }
}

/// The peak resident memory of process `pid`, KiB (`VmHWM` in /proc).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The client's own report of how long it took to be ready.
fn ready_ms(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(" is up, with its addresses"))?;
    line.split(" ms after start").next()?.rsplit(' ').next()?.parse().ok()
}

/// The lines in which teletun's roles sum up a session.
fn summary_lines(role: &str, log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" malformed"))
        .map(|l| {
            let text = l.split_once(" INFO ").map_or(l, |(_, t)| t);
            format!("{role}: {}", text.trim())
        })
        .collect()
}

/// One run of one path: Gbit/s of each iperf3 test.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Sample {
    /// One stream, laptop → cluster.
    pub up: f64,
    /// One stream, cluster → laptop.
    pub down: f64,
    /// [`STREAMS`] streams, laptop → cluster.
    pub up_parallel: f64,
    /// [`STREAMS`] streams, cluster → laptop.
    pub down_parallel: f64,
    /// The median ping round trip of the run, ms.
    pub rtt_ms: f64,
}

/// A measure's name (as in the chart) and how to read it from a sample.
pub type Measure = (&'static str, fn(&Sample) -> f64);

impl Sample {
    /// Every measure of a sample.
    pub const MEASURES: [Measure; 4] = [
        ("up", |s| s.up),
        ("down", |s| s.down),
        ("up ×4", |s| s.up_parallel),
        ("down ×4", |s| s.down_parallel),
    ];
}

/// Medians for one path.
#[derive(Debug, Default, Serialize)]
pub struct PathResult {
    /// Which path.
    pub path: String,
    /// The version measured, where it is not simply the Debian package's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The medians of the samples.
    pub median: Sample,
    /// Round-trip time, ms: the median of the runs' medians.
    pub rtt_ms: f64,
    /// User + system CPU seconds of the tunnel's processes (both ends) per
    /// 10⁹ bytes received, over every iperf3 test; none for the raw path,
    /// whose work is all in the kernel's softirqs.
    pub cpu_seconds_per_gb: Option<f64>,
    /// Every run's sample.
    pub samples: Vec<Sample>,
    /// Why this path was not measured (a peer that is not installed or did not start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_measured: Option<String>,
}

impl PathResult {
    fn new(path: &str) -> PathResult {
        PathResult {
            path: path.into(),
            ..Default::default()
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One iperf3 test from the laptop: Gbit/s and bytes received.
pub fn iperf(cluster: &Cluster, target: &str, seconds: u32, reverse: bool, streams: u32) -> Result<(f64, f64)> {
    let mut c = cluster.laptop.cmd("iperf3");
    c.args([
        "-c",
        target,
        "-t",
        &seconds.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]);
    if reverse {
        c.arg("-R");
    }
    let out = exec::run(c, Duration::from_secs(u64::from(seconds) + 30))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 printed no JSON")?;
    let received = &v["end"]["sum_received"];
    let (Some(bps), Some(bytes)) = (received["bits_per_second"].as_f64(), received["bytes"].as_f64()) else {
        bail!("iperf3 result without sum_received: {}", v["error"]);
    };
    Ok((bps / 1e9, bytes))
}

/// User + system CPU seconds so far of the processes `pids` (all their
/// threads), from /proc; a process that is gone counts 0.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| cpu_ticks(&stat))
        .sum::<u64>() as f64
        / ticks
}

/// utime + stime of a /proc/PID/stat line (fields 14 and 15; the command name
/// in parentheses may hold spaces).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn ping_ms(cluster: &Cluster, target: &str) -> Result<f64> {
    let mut c = cluster.laptop.cmd("ping");
    c.args(["-c", "40", "-i", "0.02", "-W", "2", target]);
    let out = exec::run(c, Duration::from_secs(30))?;
    let times: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if times.is_empty() {
        bail!("ping to {target} got no replies");
    }
    Ok(median(times))
}

/// Starts an iperf3 server (`ns_cmd` runs iperf3 where it should listen);
/// returns once it listens.
pub fn iperf_server(ns_cmd: Command, name: &str, dir: &Path) -> Result<Background> {
    let mut cmd = ns_cmd;
    cmd.args(["-s", "--forceflush"]);
    let mut p = Background::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    p.wait_for_log("Server listening", Duration::from_secs(10))?;
    Ok(p)
}

/// Runs the benchmark: [raw, teletun, peers…] and teletun's own figures.
pub fn run(teletun: &Path, work: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    if Command::new("iperf3").arg("--version").output().is_err() {
        bail!("iperf3 is not installed: apt-get install iperf3");
    }
    let mut cluster = Cluster::build(
        teletun,
        work,
        &crate::topology::Topology {
            lan: false,
            no_lan_because: Some("the benchmark compares with earlier runs, which had no NAT hop".into()),
            ..Default::default()
        },
    )?;
    let result = measure(&mut cluster, opts);
    cluster.teardown();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&cluster.dir);
    }
    result
}

fn measure(cluster: &mut Cluster, opts: &BenchOptions) -> Result<BenchReport> {
    cluster.start_servers()?;
    let mut client = Background::spawn(
        "client",
        cluster.client_command(&crate::cluster::ClientOptions::default())?,
        &cluster.dir.join("client.log"),
    )?;
    client.wait_for_log("is up", Duration::from_secs(20))?;
    let app = cluster.pod("app")?.clone();
    let _raw_server = iperf_server(cluster.node.cmd("iperf3"), "iperf3-node", &cluster.dir)?;
    let _tun_server = iperf_server(app.ns.cmd("iperf3"), "iperf3-app", &cluster.dir)?;

    // Every path with its target and the processes doing its work; a peer
    // that cannot run keeps its row, saying why.
    let teletun_pids = ["server-external", "server-cluster"]
        .iter()
        .map(|name| cluster.process_mut(name).map(|p| p.child.id()))
        .chain([Ok(client.child.id())])
        .collect::<Result<Vec<u32>>>()?;
    let mut paths = vec![
        BenchPath {
            result: PathResult::new("raw underlay (veth, routed)"),
            target: cluster.node_ip.to_string(),
            pids: Vec::new(),
        },
        BenchPath {
            result: PathResult::new("teletun (DTLS)"),
            target: app.ipv4.to_string(),
            pids: teletun_pids,
        },
    ];
    let mut tunnels = Vec::new();
    for peer in &opts.peers {
        let mut result = PathResult::new(peer.name());
        match peers::start(*peer, cluster) {
            Ok(tunnel) => {
                result.version = tunnel.version.clone();
                paths.push(BenchPath {
                    result,
                    target: tunnel.target.to_string(),
                    pids: tunnel.pids().to_vec(),
                });
                tunnels.push(tunnel);
            }
            Err(e) => {
                eprintln!("testbench: {} not measured: {e:#}", peer.name());
                result.not_measured = Some(format!("{e:#}"));
                paths.push(BenchPath {
                    result,
                    target: String::new(),
                    pids: Vec::new(),
                });
            }
        }
    }
    let measured = |p: &&mut BenchPath| p.result.not_measured.is_none();
    let mut work = vec![(0.0f64, 0.0f64); paths.len()]; // (CPU seconds, bytes) per path
    for run in 1..=opts.runs {
        for (path, work) in paths.iter_mut().zip(work.iter_mut()).filter(|(p, _)| measured(p)) {
            exec::check_interrupted()?;
            eprintln!("testbench: run {run}/{}: {} …", opts.runs, path.result.path);
            let mut test = |reverse: bool, streams: u32| -> Result<f64> {
                let cpu = cpu_seconds(&path.pids);
                let (gbps, bytes) = iperf(cluster, &path.target, opts.seconds, reverse, streams)?;
                work.0 += cpu_seconds(&path.pids) - cpu;
                work.1 += bytes;
                Ok(gbps)
            };
            let sample = Sample {
                up: test(false, 1)?,
                down: test(true, 1)?,
                up_parallel: test(false, STREAMS)?,
                down_parallel: test(true, STREAMS)?,
                rtt_ms: ping_ms(cluster, &path.target)?,
            };
            path.result.samples.push(sample);
        }
    }
    for (path, (cpu, bytes)) in paths.iter_mut().zip(work).filter(|(p, _)| measured(p)) {
        let r = &mut path.result;
        let median_of = |f: fn(&Sample) -> f64| median(r.samples.iter().map(f).collect());
        r.median = Sample {
            up: median_of(|s| s.up),
            down: median_of(|s| s.down),
            up_parallel: median_of(|s| s.up_parallel),
            down_parallel: median_of(|s| s.down_parallel),
            rtt_ms: median_of(|s| s.rtt_ms),
        };
        r.cpu_seconds_per_gb = (!path.pids.is_empty() && bytes > 0.0).then(|| cpu / (bytes / 1e9));
        r.rtt_ms = r.median.rtt_ms;
    }
    drop(tunnels);
    let client_peak_rss_kib = peak_rss_kib(client.child.id());
    client.signal(libc::SIGINT);
    let _ = client.wait(Duration::from_secs(10));
    // server-external sums up when the client leaves; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    let client_log = client.log_text();
    let mut summaries = summary_lines("client", &client_log);
    for role in ["server-external", "server-cluster"] {
        let log = cluster.process_mut(role)?.log_text();
        summaries.extend(summary_lines(role, &log));
    }
    Ok(BenchReport {
        paths: paths.into_iter().map(|p| p.result).collect(),
        client_peak_rss_kib,
        client_ready_ms: ready_ms(&client_log),
        summaries,
    })
}

/// A path being measured: its row, the address iperf3 and ping aim at, and
/// the processes whose CPU time it costs.
struct BenchPath {
    result: PathResult,
    target: String,
    pids: Vec<u32>,
}

/// The table printed after a run: medians, CPU per byte, and each path
/// against the raw underlay (the first row).
pub fn table(results: &[PathResult]) -> String {
    let mut s = format!(
        "{:<28} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7}\n",
        "path (Gbit/s; RTT ms)", "up", "down", "up ×4", "down ×4", "RTT", "CPU s/GB", "up/raw", "down/raw", "RTT/raw"
    );
    let raw = results.first();
    for r in results {
        if let Some(why) = &r.not_measured {
            s.push_str(&format!("{:<28} not measured: {why}\n", r.path));
            continue;
        }
        let ratio = |f: fn(&PathResult) -> f64| raw.map_or(f64::NAN, |raw| f(r) / f(raw));
        let cpu = r.cpu_seconds_per_gb.map_or("-".to_owned(), |c| format!("{c:.2}"));
        let m = &r.median;
        s.push_str(&format!(
            "{:<28} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7.3} {:>8} {:>7.3} {:>7.3} {:>7.2}\n",
            r.path,
            m.up,
            m.down,
            m.up_parallel,
            m.down_parallel,
            r.rtt_ms,
            cpu,
            ratio(|r| r.median.up),
            ratio(|r| r.median.down),
            ratio(|r| r.rtt_ms)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, up: f64, down: f64, rtt: f64) -> PathResult {
        PathResult {
            median: Sample {
                up,
                down,
                up_parallel: up * 2.0,
                down_parallel: down * 2.0,
                rtt_ms: rtt,
            },
            rtt_ms: rtt,
            cpu_seconds_per_gb: Some(1.5),
            ..PathResult::new(path)
        }
    }

    #[test]
    fn the_table_compares_every_path_with_the_raw_underlay_and_says_why_one_is_missing() {
        let mut missing = PathResult::new("openvpn");
        missing.not_measured = Some("openvpn is not installed (apt-get install openvpn)".into());
        let t = table(&[
            row("raw", 10.0, 20.0, 0.05),
            row("teletun (DTLS)", 1.0, 5.0, 0.5),
            missing,
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        let teletun: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(&teletun[teletun.len() - 3..], ["0.100", "0.250", "10.00"], "{t}");
        assert!(lines[3].starts_with("openvpn") && lines[3].contains("not measured: openvpn is not installed"));
        assert!(lines[2].contains(" 1.50 "), "{t}");
    }

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 6 0";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
        assert!(cpu_seconds(&[std::process::id()]) >= 0.0);
    }

    #[test]
    fn the_clients_own_figures_are_read_from_its_log() {
        let log = "2026-12-03T08:39:12.123456Z  INFO DTLS 1.2 up\n\
                   2026-12-03T08:39:12.223456Z  INFO tunnel tel0 is up, with its addresses, routes and DNS, 123 ms after start\n\
                   2026-12-03T08:40:12.223456Z  INFO session ends; to server: 5 packets, 9 bytes, 0 malformed, 0 refused, 0 coalesced\n";
        assert_eq!(ready_ms(log), Some(123));
        assert_eq!(
            summary_lines("client", log),
            ["client: session ends; to server: 5 packets, 9 bytes, 0 malformed, 0 refused, 0 coalesced"]
        );
        assert_eq!(ready_ms("nothing"), None);
        assert!(peak_rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn medians_take_the_middle_sample() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }
}
