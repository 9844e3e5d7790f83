//! Intruders on the AF_UNIX link between server-cluster and server-external:
//! processes of another uid or of server-external's own, and a whole other
//! pair's server-external on the same node.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::super::case::Case;
use super::super::schema::{ConnectLink, LinkIntruder};
use crate::cluster::Pair;
use crate::exec;

/// `connect-link`: an intruder on the AF_UNIX socket gets nothing.
pub fn connect_link(case: &mut Case, s: &ConnectLink) -> Result<()> {
    match s.intruder {
        LinkIntruder::OtherPair => return other_pair(case),
        LinkIntruder::Silent => return silent(case),
        LinkIntruder::Nobody | LinkIntruder::SameUid => {}
    }
    let went_away = |case: &mut Case| -> Result<usize> {
        Ok(case
            .cluster_mut()
            .process_mut("server-external")?
            .log_text()
            .matches("went away")
            .count())
    };
    let refusals = |case: &mut Case| -> Result<usize> {
        Ok(case
            .cluster_mut()
            .process_mut("server-cluster")?
            .log_text()
            .matches("refused a second connection")
            .count())
    };
    let (before, refused_before) = (went_away(case)?, refusals(case)?);
    let cluster = case.cluster();
    if !cluster.sockfile().exists() {
        bail!("{} does not exist: nothing to intrude on", cluster.sockfile().display());
    }
    // A path socket needs no network namespace (and nobody may not enter one).
    let mut c = std::process::Command::new(std::env::current_exe()?);
    c.arg("agent").arg("link-probe").arg(cluster.sockfile());
    if s.intruder == LinkIntruder::Nobody {
        c.uid(65534).gid(65534);
    }
    let got = exec::run(c, Duration::from_secs(10))?;
    let got = got.trim();
    let expected = match s.intruder {
        LinkIntruder::Nobody => got.starts_with("refused:") && got.contains("os error 13"),
        LinkIntruder::SameUid => got == "closed",
        LinkIntruder::OtherPair | LinkIntruder::Silent => unreachable!("handled above"),
    };
    if !expected {
        bail!("the intruder's connection: {got}");
    }
    if s.intruder == LinkIntruder::SameUid {
        let deadline = Instant::now() + Duration::from_secs(3);
        while refusals(case)? == refused_before {
            if Instant::now() > deadline {
                bail!("server-cluster did not log the refused second connection");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if went_away(case)? != before {
        bail!("server-external lost its link to server-cluster");
    }
    case.detail = Some(got.to_owned());
    Ok(())
}

/// Another pair's server-external (its own keys and link key), aimed at
/// this pair's socket while this pair's server-external is stopped, must be
/// refused on both ends; then this pair's links up again.
fn other_pair(case: &mut Case) -> Result<()> {
    let cluster = case.cluster_mut();
    let ours = cluster.process_mut("server-external")?;
    ours.signal(libc::SIGTERM);
    ours.wait(Duration::from_secs(10))?;
    let refusals = |log: &str| log.matches("does not match this pair's link key").count();
    let refused_before = refusals(&cluster.process_mut("server-cluster")?.log_text());
    cluster.start_server_external(Pair::Other)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        exec::check_interrupted()?;
        let theirs = cluster.process_mut("other-server-external")?.log_text();
        if theirs.contains("server-cluster connected") {
            break Err(format!(
                "another pair's server-external linked up with this pair's server-cluster: {}",
                exec::last_lines(&theirs, 2)
            ));
        }
        let refused_by_cluster = refusals(&cluster.process_mut("server-cluster")?.log_text()) > refused_before;
        if let Some(line) = theirs.lines().find(|l| l.contains("refused the server-cluster")) {
            if refused_by_cluster {
                break Ok(line.to_owned());
            }
        }
        if Instant::now() > deadline {
            break Err(format!(
                "within 5 s neither refused the other (server-cluster refused: {refused_by_cluster}); the other pair's server-external says: {}",
                exec::last_lines(&theirs, 2)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    cluster.process_mut("other-server-external")?.kill();
    // This pair's own comes back whatever happened, so later steps and teardown find it.
    cluster.start_server_external(Pair::This)?;
    match outcome {
        Ok(line) => {
            let why = line.split("refused the server-cluster").nth(1).unwrap_or(&line);
            case.detail = Some(format!("refused{}", why.trim_end()));
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}

/// Silent connections (of server-external's uid: the testbench's own) hold
/// the socket while this pair's server-external is stopped and started
/// again: it must link up while they are still held, each of them waiting
/// out its own challenge rather than the one server-external answers.
fn silent(case: &mut Case) -> Result<()> {
    let cluster = case.cluster_mut();
    let ours = cluster.process_mut("server-external")?;
    ours.signal(libc::SIGTERM);
    ours.wait(Duration::from_secs(10))?;
    let sockfile = cluster.sockfile();
    let held: Vec<teletun::io::seqpacket::SeqPacket> = (0..3)
        .map(|_| teletun::io::seqpacket::SeqPacket::connect(&sockfile))
        .collect::<std::io::Result<_>>()?;
    let started = Instant::now();
    // Waits (10 s at most) until it is linked.
    cluster.start_server_external(Pair::This)?;
    let linked_in = started.elapsed();
    drop(held);
    case.detail = Some(format!(
        "linked in {} ms beside 3 silent connections",
        linked_in.as_millis()
    ));
    Ok(())
}
