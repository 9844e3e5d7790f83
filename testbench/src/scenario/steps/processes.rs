//! Starting, stopping, crashing and watching processes: the server roles,
//! clients, their logs, and shell commands anywhere in the cluster.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::super::case::Case;
use super::super::schema::{
    ClientExits, ConnectInTurn, CrashClient, KillClient, LogContains, Run, StartClient, StartServer, Status,
    StopClient, StopServer,
};
use super::super::values::{CrashPoint, KillMode, Role};
use crate::cluster::{ClientOptions, Pair};
use crate::exec::{self, Background};

/// `start-server`: one role alone.
pub fn start_server(case: &mut Case, s: &StartServer) -> Result<()> {
    match s.role {
        Role::ServerCluster => case.cluster_mut().start_server_cluster(s.resolv_conf.as_deref())?,
        Role::ServerExternal => case.cluster_mut().start_server_external(Pair::This)?,
    }
    if case.roaming.probe.is_some() {
        // A probe running across a restart times its first reply from here.
        case.roaming.mark = Some(match s.role {
            Role::ServerCluster => ("server-cluster was back", Instant::now()),
            Role::ServerExternal => ("server-external was back", Instant::now()),
        });
    }
    Ok(())
}

/// `stop-server`: it must exit, with 0 unless killed.
pub fn stop_server(case: &mut Case, s: &StopServer) -> Result<()> {
    let p = case.cluster_mut().process_mut(s.role.as_str())?;
    p.signal(s.signal.number());
    let status = p.wait(Duration::from_secs(10))?;
    if s.signal.number() != libc::SIGKILL && !status.success() {
        bail!(
            "{} exited with {status}: {}",
            s.role,
            exec::last_lines(&p.log_text(), 3)
        );
    }
    Ok(())
}

/// `start-client`: the tunnel comes up, or with `expect_error` the client
/// fails with exactly that one-line error.
pub fn start_client(case: &mut Case, s: &StartClient) -> Result<()> {
    if case.clients.contains_key(&s.name) {
        bail!("client {:?} already runs", s.name);
    }
    let options = ClientOptions {
        client_key: s.client_key,
        server_key: s.server_key,
        pod: s.pod.as_deref(),
        kubeconfig: s.kubeconfig,
        args: &s.args,
    };
    let cmd = case.cluster().client_command(&options)?;
    let log = case.cluster().dir.join(format!("client-{}.log", s.name));
    case.client_logs.insert(s.name.clone(), log.clone());
    let started = Instant::now();
    let mut c = Background::spawn(&format!("client {}", s.name), cmd, &log)?;
    match &s.expect_error {
        None => {
            c.wait_for_log("is up", Duration::from_secs(s.within))?;
            case.detail = Some(format!("up in {} ms", started.elapsed().as_millis()));
            case.clients.insert(s.name.clone(), c);
        }
        Some(text) => {
            let status = c.wait(Duration::from_secs(s.within))?;
            check_one_error(status, &c.log_text(), text)?;
        }
    }
    Ok(())
}

/// `connect-in-turn`: clients one after another, each up within the time
/// allowed and stopped cleanly; reports the median and worst time to come up.
pub fn connect_in_turn(case: &mut Case, s: &ConnectInTurn) -> Result<()> {
    let mut times = Vec::new();
    for i in 1..=s.count {
        let cmd = case.cluster().client_command(&ClientOptions::default())?;
        let name = format!("turn-{i}");
        let log = case.cluster().dir.join(format!("client-{name}.log"));
        case.client_logs.insert(name.clone(), log.clone());
        let started = Instant::now();
        let mut c = Background::spawn(&format!("client {name}"), cmd, &log)?;
        c.wait_for_log("is up", Duration::from_secs(s.within))
            .with_context(|| format!("client {i} of {}", s.count))?;
        times.push(started.elapsed());
        c.signal(libc::SIGINT);
        let status = c.wait(Duration::from_secs(10))?;
        if !status.success() {
            bail!(
                "client {i} of {} exited with {status}: {}",
                s.count,
                exec::last_lines(&c.log_text(), 3)
            );
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_millis();
    case.detail = Some(format!(
        "{} of {} up; median {} ms, worst {} ms",
        times.len(),
        s.count,
        times.get(times.len() / 2).map_or(0, |d| ms(*d)),
        times.last().map_or(0, |d| ms(*d))
    ));
    Ok(())
}

/// `status`: `teletun status` shows every expected text (asked again until
/// it does, or `within` passes).
pub fn status(case: &mut Case, s: &Status) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(s.within);
    loop {
        let mut c = case.cluster().laptop.cmd(&case.cluster().teletun);
        c.arg("status");
        if s.json {
            c.arg("--json");
        }
        let out = exec::output(c, Duration::from_secs(10))?;
        let text = out.both();
        let missing: Vec<&String> = s.expect.iter().filter(|e| !text.contains(e.as_str())).collect();
        if out.status.success() && missing.is_empty() {
            // The state: the first line of text, the state's line of JSON.
            let shown = |l: &&str| {
                if s.json {
                    l.contains("\"state\"")
                } else {
                    !l.trim().is_empty()
                }
            };
            case.detail = text.lines().find(shown).map(|l| l.trim().to_owned());
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("teletun status ({}) lacks {missing:?}: {text}", out.status);
        }
        exec::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn take_client(case: &mut Case, name: &str) -> Result<Background> {
    case.clients
        .remove(name)
        .with_context(|| format!("no running client {name:?}"))
}

/// `stop-client`: it exits 0 after cleaning up and says it was stopped.
pub fn stop_client(case: &mut Case, s: &StopClient) -> Result<()> {
    let mut c = take_client(case, &s.name)?;
    c.signal(s.signal.number());
    let status = c.wait(Duration::from_secs(10))?;
    if !status.success() {
        bail!("client exited with {status}: {}", exec::last_lines(&c.log_text(), 3));
    }
    if !c.log_text().contains("stopped by") {
        bail!("client did not report its stop: {}", exec::last_lines(&c.log_text(), 3));
    }
    Ok(())
}

/// `client-exits`: a running client ends by itself with one error line.
pub fn client_exits(case: &mut Case, s: &ClientExits) -> Result<()> {
    let mut c = take_client(case, &s.name)?;
    let status = c.wait(Duration::from_secs(s.within))?;
    check_one_error(status, &c.log_text(), &s.expect_error)
}

fn send(c: &mut Background, kill: KillMode) {
    match kill.signal() {
        (signal, true) => c.signal_group(signal),
        (signal, false) => c.signal(signal),
    }
}

/// `kill-client`: no expectations.
pub fn kill_client(case: &mut Case, s: &KillClient) -> Result<()> {
    let mut c = take_client(case, &s.name)?;
    send(&mut c, s.signal);
    c.wait(Duration::from_secs(10)).map(|_| ())
}

/// `crash-client`: a client stopped at a crash point, then ended there.
pub fn crash_client(case: &mut Case, s: &CrashClient) -> Result<()> {
    let point = s.point.as_str();
    let mut cmd = case.cluster().client_command(&ClientOptions::default())?;
    cmd.env(teletun::crashpoint::ENV, point);
    let log = case.cluster().dir.join(format!("client-crash-{point}.log"));
    let mut c = Background::spawn("crashing client", cmd, &log)?;
    if s.point == CrashPoint::MidTeardown {
        c.wait_for_log("is up", Duration::from_secs(20))?;
        c.signal(libc::SIGTERM);
    }
    c.wait_for_log(&format!("crashpoint {point} reached"), Duration::from_secs(20))?;
    send(&mut c, s.kill);
    let status = c.wait(Duration::from_secs(10))?;
    if matches!(s.kill, KillMode::Int | KillMode::Term) && !status.success() {
        bail!(
            "after {} at {point} the client exited with {status}: {}",
            s.kill,
            exec::last_lines(&c.log_text(), 3)
        );
    }
    Ok(())
}

/// A client that failed must have exited non-zero with exactly one
/// `teletun: ` error line, containing `text`.
fn check_one_error(status: ExitStatus, log: &str, text: &str) -> Result<()> {
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

/// `log-contains`: the text shows up in the log in time (or, with `absent`,
/// is not there now).
pub fn log_contains(case: &mut Case, s: &LogContains) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(if s.absent { 0 } else { s.within });
    loop {
        let log = case.log_of(&s.process)?;
        match (log.contains(s.text.as_str()), s.absent) {
            (true, false) | (false, true) => return Ok(()),
            (true, true) => bail!("found: {}", exec::last_lines(&log, 3)),
            (false, false) => {}
        }
        if Instant::now() > deadline {
            bail!(
                "not found within {} s; last lines: {}",
                s.within,
                exec::last_lines(&log, 3)
            );
        }
        exec::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `run`: a shell command where the step says; exit status and output checked.
pub fn run(case: &mut Case, s: &Run) -> Result<()> {
    let mut c = case.command_on(&s.on, "sh")?;
    c.args(["-c", &s.command]);
    let out = exec::output(c, Duration::from_secs(60))?;
    if out.status.success() == s.expect_failure {
        bail!(
            "exit status {} (expected {}): {}",
            out.status,
            if s.expect_failure { "failure" } else { "success" },
            out.both()
        );
    }
    if let Some(want) = &s.expect_output {
        if !out.both().contains(want.as_str()) {
            bail!("output lacks {want:?}: {}", out.both());
        }
    }
    Ok(())
}
