//! `testbench bench`: iperf3 (TCP, one stream, each direction) and ping through
//! the raw underlay, through teletun and through peer VPNs, in one run on one
//! topology, the paths taking turns within each run.

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

/// Medians for one path.
#[derive(Debug, Default, Serialize)]
pub struct PathResult {
    /// Which path.
    pub path: String,
    /// Laptop → cluster, Gbit/s.
    pub upload_gbps: f64,
    /// Cluster → laptop, Gbit/s.
    pub download_gbps: f64,
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Every iperf3 sample (Gbit/s), upload then download per run.
    pub samples: Vec<(f64, f64)>,
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

fn iperf(cluster: &Cluster, target: &str, seconds: u32, reverse: bool) -> Result<f64> {
    let mut c = cluster.laptop.cmd("iperf3");
    c.args(["-c", target, "-t", &seconds.to_string(), "-J"]);
    if reverse {
        c.arg("-R");
    }
    let out = exec::run(c, Duration::from_secs(u64::from(seconds) + 30))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 printed no JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 result without sum_received: {}", v["error"]))?;
    Ok(bps / 1e9)
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

fn iperf_server(ns_cmd: Command, name: &str, dir: &Path) -> Result<Background> {
    let mut cmd = ns_cmd;
    cmd.args(["-s", "--forceflush"]);
    let mut p = Background::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    p.wait_for_log("Server listening", Duration::from_secs(10))?;
    Ok(p)
}

/// Runs the benchmark and returns [raw, teletun, peers…].
pub fn run(teletun: &Path, work: &Path, opts: &BenchOptions) -> Result<Vec<PathResult>> {
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

fn measure(cluster: &mut Cluster, opts: &BenchOptions) -> Result<Vec<PathResult>> {
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

    // Every path with its target; a peer that cannot run keeps its row, saying why.
    let mut paths = vec![
        (
            PathResult::new("raw underlay (veth, routed)"),
            cluster.node_ip.to_string(),
        ),
        (PathResult::new("teletun (DTLS)"), app.ipv4.to_string()),
    ];
    let mut tunnels = Vec::new();
    for peer in &opts.peers {
        let mut row = PathResult::new(peer.name());
        match peers::start(*peer, cluster) {
            Ok(tunnel) => {
                paths.push((row, tunnel.target.to_string()));
                tunnels.push(tunnel);
            }
            Err(e) => {
                eprintln!("testbench: {} not measured: {e:#}", peer.name());
                row.not_measured = Some(format!("{e:#}"));
                paths.push((row, String::new()));
            }
        }
    }
    let measured = |p: &&mut (PathResult, String)| p.0.not_measured.is_none();
    for run in 1..=opts.runs {
        for (result, target) in paths.iter_mut().filter(|p| measured(p)) {
            exec::check_interrupted()?;
            eprintln!("testbench: run {run}/{}: {} …", opts.runs, result.path);
            let up = iperf(cluster, target, opts.seconds, false)?;
            let down = iperf(cluster, target, opts.seconds, true)?;
            result.samples.push((up, down));
        }
    }
    for (result, target) in paths.iter_mut().filter(|p| measured(p)) {
        result.upload_gbps = median(result.samples.iter().map(|s| s.0).collect());
        result.download_gbps = median(result.samples.iter().map(|s| s.1).collect());
        result.rtt_ms = ping_ms(cluster, target)?;
    }
    drop(tunnels);
    client.signal(libc::SIGINT);
    let _ = client.wait(Duration::from_secs(10));
    Ok(paths.into_iter().map(|(r, _)| r).collect())
}

/// The table printed after a run: medians, and each path against the raw
/// underlay (the first row).
pub fn table(results: &[PathResult]) -> String {
    let mut s = format!(
        "{:<28} {:>10} {:>12} {:>8} {:>9} {:>9} {:>8}\n",
        "path", "up Gbit/s", "down Gbit/s", "RTT ms", "up ×raw", "down ×raw", "RTT ×raw"
    );
    let raw = results.first();
    for r in results {
        if let Some(why) = &r.not_measured {
            s.push_str(&format!("{:<28} not measured: {why}\n", r.path));
            continue;
        }
        let ratio = |f: fn(&PathResult) -> f64| raw.map_or(f64::NAN, |raw| f(r) / f(raw));
        s.push_str(&format!(
            "{:<28} {:>10.3} {:>12.3} {:>8.3} {:>9.3} {:>9.3} {:>8.2}\n",
            r.path,
            r.upload_gbps,
            r.download_gbps,
            r.rtt_ms,
            ratio(|r| r.upload_gbps),
            ratio(|r| r.download_gbps),
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
            upload_gbps: up,
            download_gbps: down,
            rtt_ms: rtt,
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
    }

    #[test]
    fn medians_take_the_middle_sample() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }
}
