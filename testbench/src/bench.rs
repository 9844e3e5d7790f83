//! `testbench bench`: iperf3 (TCP, one stream, each direction) and ping through
//! the raw underlay and through the tunnel, in one run on one topology.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::exec::{self, Background};

/// Benchmark settings.
pub struct BenchOptions {
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Repetitions; medians are reported.
    pub runs: u32,
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

/// Runs the benchmark and returns [raw, tunnel].
pub fn run(teletun: &Path, work: &Path, opts: &BenchOptions) -> Result<Vec<PathResult>> {
    if Command::new("iperf3").arg("--version").output().is_err() {
        bail!("iperf3 is not installed: apt-get install iperf3");
    }
    let mut cluster = Cluster::build(teletun, work, &crate::scenario::Topology::default())?;
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
    let node_ip = cluster.node_ip.to_string();
    let app_ip = app.ipv4.to_string();
    let mut raw = PathResult {
        path: "raw underlay (veth, routed)".into(),
        ..Default::default()
    };
    let mut tun = PathResult {
        path: "teletun (DTLS)".into(),
        ..Default::default()
    };
    for run in 1..=opts.runs {
        for (result, target) in [(&mut raw, &node_ip), (&mut tun, &app_ip)] {
            exec::check_interrupted()?;
            eprintln!("testbench: run {run}/{}: {} …", opts.runs, result.path);
            let up = iperf(&cluster, target, opts.seconds, false)?;
            let down = iperf(&cluster, target, opts.seconds, true)?;
            result.samples.push((up, down));
        }
    }
    for (result, target) in [(&mut raw, &node_ip), (&mut tun, &app_ip)] {
        result.upload_gbps = median(result.samples.iter().map(|s| s.0).collect());
        result.download_gbps = median(result.samples.iter().map(|s| s.1).collect());
        result.rtt_ms = ping_ms(&cluster, target)?;
    }
    client.signal(libc::SIGINT);
    let _ = client.wait(Duration::from_secs(10));
    cluster.teardown();
    let _ = std::fs::remove_dir_all(&cluster.dir);
    Ok(vec![raw, tun])
}

/// The table printed after a run.
pub fn table(results: &[PathResult]) -> String {
    let mut s = format!(
        "{:<30} {:>14} {:>14} {:>10}\n",
        "path", "up Gbit/s", "down Gbit/s", "RTT ms"
    );
    for r in results {
        s.push_str(&format!(
            "{:<30} {:>14.3} {:>14.3} {:>10.3}\n",
            r.path, r.upload_gbps, r.download_gbps, r.rtt_ms
        ));
    }
    if let [raw, tun] = results {
        s.push_str(&format!(
            "{:<30} {:>14.3} {:>14.3} {:>10.2}\n",
            "teletun / raw",
            tun.upload_gbps / raw.upload_gbps,
            tun.download_gbps / raw.download_gbps,
            tun.rtt_ms / raw.rtt_ms
        ));
    }
    s
}
