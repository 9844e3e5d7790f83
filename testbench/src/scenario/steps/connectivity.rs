//! Traffic from the laptop through the tunnel, and back from the cluster:
//! ping, echo, HTTP, bulk transfers, connections to the laptop, and routes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::super::case::Case;
use super::super::schema::{ConnectBack, Http, Ping, Route, TcpEcho, Transfer, UdpEcho};
use super::super::values::{Direction, Target};
use crate::cluster::{ECHO_PORT, HTTP_PORT};
use crate::exec::{self, Background};

/// `ping`: three packets from the laptop.
pub fn ping(case: &mut Case, s: &Ping) -> Result<()> {
    let ip = case.address(&s.to, s.ipv6)?.to_string();
    case.laptop_check("ping", &["-c", "3", "-i", "0.2", "-W", "2", &ip])
        .map(|_| ())
}

/// `tcp-echo`: bytes echoed by the pod over TCP.
pub fn tcp_echo(case: &mut Case, s: &TcpEcho) -> Result<()> {
    let addr = SocketAddr::new(case.address(&s.to, s.ipv6)?, ECHO_PORT).to_string();
    case.agent_on_laptop(&["tcp-echo", &addr]).map(|_| ())
}

/// `udp-echo`: bytes echoed by the pod over UDP.
pub fn udp_echo(case: &mut Case, s: &UdpEcho) -> Result<()> {
    let addr = SocketAddr::new(case.address(&s.to, s.ipv6)?, ECHO_PORT).to_string();
    case.agent_on_laptop(&["udp-echo", &addr]).map(|_| ())
}

/// `http`: `GET /` answered by the right pod (a service on its own port).
pub fn http(case: &mut Case, s: &Http) -> Result<()> {
    let (port, pod) = match &s.to {
        Target::Service(name) => {
            let svc = case.cluster().service(name)?;
            (svc.port, svc.pod.clone())
        }
        other => (HTTP_PORT, other.to_string()),
    };
    let addr = SocketAddr::new(case.address(&s.to, false)?, port).to_string();
    case.agent_on_laptop(&["http", &addr, &format!("hello from {pod} ")])
        .map(|_| ())
}

/// `connect-back`: a pod connects to the server-cluster pod's IP, and a
/// listener on the laptop must get the connection.
pub fn connect_back(case: &mut Case, s: &ConnectBack) -> Result<()> {
    let cluster = case.cluster();
    let target = cluster.pod_address("teletun", s.ipv6)?;
    let token = format!("back-from-{}", s.from);
    let me = std::env::current_exe()?;
    let mut listen = cluster.laptop.cmd(&me);
    listen.args(["agent", "listen", "9099", &token]);
    let mut l = Background::spawn("laptop listener", listen, &cluster.dir.join("listener.log"))?;
    l.wait_for_log("listening", Duration::from_secs(5))?;
    let mut send = cluster.pod(&s.from)?.ns.cmd(&me);
    send.args(["agent", "send", &SocketAddr::new(target, 9099).to_string(), &token]);
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

/// The laptop's agent moving `bytes` seeded bytes between it and the app pod
/// (SHA-256 checked by the agent, which prints `ok: …`).
pub fn blob_command(case: &Case, direction: Direction, bytes: u64, seed: u64) -> Result<std::process::Command> {
    let addr = SocketAddr::new(case.cluster().pod_address("app", false)?, crate::agent::BLOB_PORT);
    let me = std::env::current_exe()?;
    let mut c = case.cluster().laptop.cmd(&me);
    c.args([
        "agent",
        "blob",
        direction.as_str(),
        &addr.to_string(),
        &bytes.to_string(),
        &seed.to_string(),
    ]);
    Ok(c)
}

/// `transfer`: seeded bytes between the laptop and the app pod, SHA-256
/// checked; reports the throughput.
pub fn transfer(case: &mut Case, s: &Transfer) -> Result<()> {
    let c = blob_command(case, s.direction, s.bytes, s.seed)?;
    let out = exec::output(c, Duration::from_secs(600))?;
    if !out.status.success() {
        bail!("{}", exec::last_lines(&out.both(), 2));
    }
    case.detail = out
        .stdout
        .lines()
        .last()
        .map(|l| l.trim_start_matches("ok: ").to_owned());
    Ok(())
}

/// `route`: the laptop routes the target into the tunnel (or no longer does)
/// within the time allowed; reports how long after the object's change.
pub fn route(case: &mut Case, s: &Route) -> Result<()> {
    let addr = case.address(&s.to, s.ipv6)?;
    let since = case.cluster().changed_at.get(&s.to.to_string()).copied();
    let deadline = Instant::now() + Duration::from_secs(s.within);
    loop {
        let mut c = case.cluster().laptop.cmd("ip");
        c.args(["-o", "route", "get", &addr.to_string()]);
        let out = exec::output(c, Duration::from_secs(5))?;
        let routed = out.status.success() && out.stdout.contains(" dev tel");
        if routed == s.present {
            if let Some(t) = since {
                case.detail = Some(format!("{} ms after the change", t.elapsed().as_millis()));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("after {} s: {}", s.within, out.both());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
