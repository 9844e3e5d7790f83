//! Hostile networks and peers: floods, forged packets, planted takeover
//! records, and the counters that prove the roles noticed.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::super::case::Case;
use super::super::schema::{
    Counter, FloodAim, FloodFrom, Forge, ForgeWay, PlantRecord, PlantedRecord, StartFlood, StopFlood, Throughput,
};
use crate::bench;
use crate::cluster::SERVER_PORT;
use crate::exec::{self, Background};
use crate::hostile::FloodRun;

/// A port on the node nobody listens on.
const CLOSED_PORT: u16 = 9;
/// Where forged packets are aimed (collected there).
const FORGE_PORT: u16 = 7071;
/// An address no pod here has, planted in records: it must never appear.
const PLANTED_V6: &str = "fd00:dead::77";

fn ipv4(ip: IpAddr) -> Result<std::net::Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => bail!("expected an IPv4 address, got {ip}"),
    }
}

/// `start-flood`: the generator runs in the router (a stranger on the
/// internet) or in the laptop's home router (a host behind the laptop's NAT).
pub fn start_flood(case: &mut Case, s: &StartFlood) -> Result<()> {
    if case.flood.is_some() {
        bail!("a flood is already running; stop-flood first");
    }
    let port = match s.aim {
        FloodAim::Server => SERVER_PORT,
        FloodAim::ClosedPort => CLOSED_PORT,
    };
    let mut target = SocketAddr::from((case.cluster().node_ip, port));
    let mut sources = None;
    let router = match s.from {
        FloodFrom::Internet => case.cluster().router.clone(),
        FloodFrom::Home => case
            .cluster()
            .home
            .clone()
            .context("a flood from home needs the laptop's home LAN ([topology] lan = true)")?,
        FloodFrom::InternetV6Prefix => {
            let (node_ip6, prefix) = case.cluster().route_v6_prefix_from_router()?;
            target = SocketAddr::from((node_ip6, port));
            sources = Some(prefix);
            case.cluster().router.clone()
        }
    };
    // Thousands of connects a second need the whole port range, and ports
    // in TIME_WAIT reused (the router's own namespace only).
    router.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    router.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let me = std::env::current_exe()?;
    let mut cmd = router.cmd(me);
    cmd.args([
        "agent",
        "flood",
        "--control",
        &target.to_string(),
        "--data",
        &target.to_string(),
    ])
    .args(["--connects", &s.connects_per_second.to_string()])
    .args(["--datagrams", &s.datagrams_per_second.to_string()])
    .args(["--dtls-clients", &s.dtls_clients_per_second.to_string()]);
    if let Some(prefix) = sources {
        cmd.args(["--sources", &prefix.to_string()]);
    }
    let log = case.cluster().dir.join("flood.log");
    let generator = Background::spawn("flood", cmd, &log)?;
    let pid = case.cluster_mut().process_mut("server-external")?.child.id();
    // Turn-aways are counted for connections; datagrams alone are dropped quietly.
    let expect_turnaways = s.aim == FloodAim::Server && s.connects_per_second > 0;
    case.flood = Some(FloodRun::watch(generator, expect_turnaways, pid));
    case.detail = Some(match sources {
        Some(prefix) => format!("at {target} from all over {prefix}"),
        None => format!("at {target} from the {}", s.from),
    });
    Ok(())
}

/// `stop-flood`: server-external lived through it, within its limits.
pub fn stop_flood(case: &mut Case, s: &StopFlood) -> Result<()> {
    let flood = case.flood.take().context("no flood is running (start-flood first)")?;
    let at_server = flood.at_server;
    let (counts, most_fds, (cpu_share, generator_share)) = flood.finish()?;
    let external = case.cluster_mut().process_mut("server-external")?;
    if let Some(status) = external.child.try_wait()? {
        bail!(
            "server-external died during the flood ({status}): {}",
            exec::last_lines(&external.log_text(), 3)
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", external.child.id()))?;
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in server-external's /proc status")?;
    let reports = external.log_text().matches("turned away").count();
    let n = |k: &str| counts[k].as_u64().unwrap_or(0);
    let mut detail = format!(
        "{} connects ({} connected, {} refused, {} failed, {} skipped), {} datagrams, the generator using {:.0}% of a CPU; server-external: {:.0}% of a CPU, peak RSS {:.1} MiB, at most {most_fds} open files, {reports} turn-away reports",
        n("attempted"),
        n("connected"),
        n("refused"),
        n("failed"),
        n("skipped"),
        n("datagrams"),
        100.0 * generator_share,
        100.0 * cpu_share,
        peak_kib as f64 / 1024.0
    );
    if n("dtls_clients") > 0 {
        detail += &format!(
            ", {} DTLS clients ({} returned the server's cookie)",
            n("dtls_clients"),
            n("dtls_cookies_returned")
        );
        // Squatters that never got a cookie tested nothing.
        if n("dtls_cookies_returned") == 0 {
            bail!("no DTLS client got a cookie back from server-external: did they reach it? {detail}");
        }
    }
    // A flood that reached nobody proves nothing.
    if at_server && reports == 0 {
        bail!("server-external never reported turning anyone away: did the flood reach it? {detail}");
    }
    if n("attempted") + n("datagrams") + n("dtls_clients") == 0 {
        bail!("the generator sent nothing: {detail}");
    }
    if let Some(max) = s.max_rss_mib {
        if peak_kib > max * 1024 {
            bail!(
                "server-external's resident memory reached {} KiB (limit {max} MiB): {detail}",
                peak_kib
            );
        }
        detail += &format!(" (limit {max} MiB)");
    }
    if let Some(max) = s.max_fds {
        if most_fds >= max {
            bail!("server-external had {most_fds} open files (limit {max}): {detail}");
        }
    }
    case.detail = Some(detail);
    Ok(())
}

/// `throughput`: iperf3 from the laptop to the app pod through the tunnel.
pub fn throughput(case: &mut Case, s: &Throughput) -> Result<()> {
    let app = case.cluster().pod_address("app", false)?;
    let cluster = case.cluster();
    let server = bench::iperf_server(
        cluster.pod("app")?.ns.cmd("iperf3"),
        &format!("iperf3-{}", s.name),
        &cluster.dir,
    )?;
    let seconds = u32::try_from(s.seconds).context("seconds: too many")?;
    let measured = bench::iperf(cluster, &app.to_string(), seconds, false, 1);
    drop(server);
    let bps = measured?.0 * 1e9;
    let mut detail = format!("{:.3} Gbit/s", bps / 1e9);
    if let Some(base) = &s.compare_with {
        let b = case
            .throughputs
            .get(base)
            .with_context(|| format!("no earlier throughput named {base:?}"))?;
        detail += &format!(" = {:.0}% of {base} ({:.3} Gbit/s)", 100.0 * bps / b, b / 1e9);
    }
    case.throughputs.insert(s.name.clone(), bps);
    case.detail = Some(detail);
    Ok(())
}

/// `forge`: packets with a forged address go into the tunnel; none arrive.
pub fn forge(case: &mut Case, s: &Forge) -> Result<()> {
    let cluster = case.cluster();
    let me = std::env::current_exe()?;
    let client_ip = ipv4(cluster.pod_address("teletun", false)?)?;
    let (mut collector, dest, honest) = match s.way {
        ForgeWay::ToCluster => {
            let app = ipv4(cluster.pod_address("app", false)?)?;
            (
                cluster.pod("app")?.ns.cmd(&me),
                SocketAddrV4::new(app, FORGE_PORT),
                true,
            )
        }
        ForgeWay::ToLaptop => {
            let laptop = cluster.laptop_address();
            (cluster.laptop.cmd(&me), SocketAddrV4::new(laptop, FORGE_PORT), false)
        }
    };
    collector
        .args([
            "agent",
            "collect-udp",
            "--port",
            &FORGE_PORT.to_string(),
            "--seconds",
            "3",
        ])
        .stdout(Stdio::piped());
    let mut collector = collector.spawn().context("cannot start the collector")?;
    let result = (|| -> Result<String> {
        let mut reader = crate::hostile::wait_ready(&mut collector)?;
        let send = |source: std::net::Ipv4Addr, token: &str, count: u32, from_pod: bool| -> Result<()> {
            let mut c = if from_pod {
                cluster.pod("teletun")?.ns.cmd(&me)
            } else {
                cluster.laptop.cmd(&me)
            };
            c.args([
                "agent",
                "forge-udp",
                "--source",
                &source.to_string(),
                "--dest",
                &dest.to_string(),
            ])
            .args(["--token", token, "--count", &count.to_string()]);
            exec::run(c, Duration::from_secs(10)).map(drop)
        };
        match s.way {
            ForgeWay::ToCluster => {
                let other = ipv4(cluster.pod_address("dns", false)?)?;
                send(other, "forged", s.count, false)?;
                // Last: its arrival shows the collector heard all that came before.
                send(client_ip, "honest", 1, false)?;
            }
            ForgeWay::ToLaptop => {
                // The server side routes the laptop's own address into the tunnel.
                let pod = &cluster.pod("teletun")?.ns;
                let links = pod.run("ip", &["-o", "link", "show"])?;
                let tun = links
                    .lines()
                    .filter_map(|l| l.split(": ").nth(1))
                    .find(|name| name.starts_with("teletun"))
                    .context("no teletun device in server-cluster's pod")?
                    .to_owned();
                let route = format!("{}/32", dest.ip());
                pod.run("ip", &["route", "add", &route, "dev", &tun])?;
                let sent = send(client_ip, "forged", s.count, true);
                let _ = pod.run("ip", &["route", "del", &route, "dev", &tun]);
                sent?;
            }
        }
        let mut rest = String::new();
        reader.read_to_string(&mut rest)?;
        Ok(rest)
    })();
    let _ = collector.kill();
    let status = collector.wait()?;
    let got = result?;
    if !status.success() {
        bail!("the collector failed ({status})");
    }
    let forged = got.lines().filter(|l| l.starts_with("forged")).count();
    if forged > 0 {
        bail!(
            "{forged} of {} forged packets arrived at {dest}: {}",
            s.count,
            exec::last_lines(&got, 2)
        );
    }
    if honest && !got.lines().any(|l| l.starts_with("honest")) {
        bail!("the honest packet did not arrive at {dest} either: the check proves nothing");
    }
    case.detail = Some(format!("none of {} forged packets arrived", s.count));
    Ok(())
}

/// `plant-record`: a hostile or stale takeover record is discarded, and nothing of it applied.
pub fn plant_record(case: &mut Case, s: &PlantRecord) -> Result<()> {
    if let Ok(p) = case.cluster_mut().process_mut("server-cluster") {
        if p.child.try_wait()?.is_none() {
            bail!("server-cluster is running; stop-server it first");
        }
    }
    let cluster = case.cluster();
    let dir = cluster.server_cluster_state_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("takeover.json");
    let _ = std::fs::remove_file(&path);
    let pod = cluster.pod("teletun")?;
    let netns = std::fs::metadata(pod.ns.path())?.ino();
    let record = |netns: u64, interface: &str, done: &str| {
        format!(r#"{{"netns":{netns},"interface":"{interface}","done":[{done}]}}"#)
    };
    let move_v6 = format!(r#"{{"step":"move-v6","ip":"{PLANTED_V6}","prefix":64}}"#);
    let decoy = cluster.dir.join("decoy-record.json");
    let (text, expect) = match s.record {
        PlantedRecord::OtherNamespace => (record(netns + 1, "eth0", &move_v6), "another network namespace"),
        PlantedRecord::ForeignKey => (
            record(
                netns,
                "eth0",
                r#"{"step":"set","sysctl":{"name":"ip-default-ttl"},"value":1,"old":"64"}"#,
            ),
            "discarding",
        ),
        PlantedRecord::MissingInterface => (record(netns, "gone0", &move_v6), "is gone"),
        PlantedRecord::Symlink => {
            std::fs::write(&decoy, record(netns, "eth0", &move_v6))?;
            std::os::unix::fs::symlink(&decoy, &path)?;
            (String::new(), "discarding")
        }
    };
    if s.record != PlantedRecord::Symlink {
        std::fs::write(&path, &text)?;
    }
    let decoy_before = std::fs::read(&decoy).ok();
    case.cluster_mut().start_server_cluster(None)?;
    let log = case.cluster_mut().process_mut("server-cluster")?.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("takeover record") || l.contains("discarding"))
        .with_context(|| {
            format!(
                "server-cluster said nothing of the planted record: {}",
                exec::last_lines(&log, 3)
            )
        })?;
    if !line.contains(expect) {
        bail!("server-cluster discarded the record, but not for the expected reason ({expect:?}): {line}");
    }
    let addresses = case
        .cluster()
        .pod("teletun")?
        .ns
        .run("ip", &["-6", "-o", "addr", "show"])?;
    if addresses.contains(PLANTED_V6) {
        bail!("the planted address {PLANTED_V6} was applied to the pod");
    }
    let ttl = case
        .cluster()
        .pod("teletun")?
        .ns
        .run("cat", &["/proc/sys/net/ipv4/ip_default_ttl"])?;
    if ttl.trim() != "64" {
        bail!("the pod's ip_default_ttl is {} (was 64)", ttl.trim());
    }
    if decoy_before.is_some() && std::fs::read(&decoy).ok() != decoy_before {
        bail!("the symbolic link's target {} was changed", decoy.display());
    }
    let why = line
        .rsplit("takeover.json")
        .next()
        .unwrap_or(line)
        .trim_start_matches(':')
        .trim();
    case.detail = Some(format!("discarded: {why}"));
    Ok(())
}

/// `counter`: the last summary line with this counter says at least so many.
pub fn counter(case: &mut Case, s: &Counter) -> Result<()> {
    let log = case.log_of(&s.process)?;
    let word = format!(" {}", s.counter);
    let total = log.lines().rev().find_map(|line| {
        let values: Vec<u64> = line
            .split([',', ';', ':'])
            .filter_map(|part| part.trim().strip_suffix(&word[1..]))
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<u64>())
    });
    let total = total.with_context(|| format!("no line of the {} log counts {:?}", s.process, s.counter))?;
    if total < s.at_least {
        bail!("{} {} (at least {} expected)", total, s.counter, s.at_least);
    }
    case.detail = Some(format!("{total} {}", s.counter));
    Ok(())
}
