//! `teletun guard` (internal): a process the client starts before it changes
//! anything, in a session of its own so that killing the client, or the
//! client's whole process group, does not kill it. The client tells it, over its
//! standard input, which change record to watch; if that pipe closes before the
//! client says `done`, the client died without cleaning up, and the guard undoes
//! what the record lists (the DNS entry: the TUN device, its addresses and
//! routes die with the client by themselves). This is sshuttle's
//! firewall-helper pattern.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::netconf::netlink::Netlink;
use crate::netconf::record;

/// What the guard heard from its client.
#[derive(Debug, Default, PartialEq, Eq)]
struct Heard {
    record: Option<PathBuf>,
    done: bool,
}

fn listen(input: impl BufRead) -> Heard {
    let mut heard = Heard::default();
    for line in input.lines() {
        let Ok(line) = line else { break };
        if let Some(path) = line.strip_prefix("record ") {
            heard.record = Some(PathBuf::from(path));
        } else if line == "done" {
            heard.done = true;
        }
    }
    heard
}

/// Runs the guard: waits for its client to finish or die.
pub async fn run() -> Result<()> {
    // Terminal signals are for the client; the guard must outlive it.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let heard = tokio::task::spawn_blocking(|| listen(std::io::stdin().lock())).await?;
    let (Some(path), false) = (heard.record, heard.done) else {
        return Ok(()); // a clean exit, or the client died before changing anything
    };
    let Ok(rec) = record::load(&path) else {
        return Ok(()); // already cleaned up
    };
    // The pipe can close a moment before the process is fully gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.owner_alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if rec.owner_alive() {
        warn!(
            "client pid {} closed its guard pipe but still runs; leaving its changes alone",
            rec.pid
        );
        return Ok(());
    }
    // Its TUN device closes with its last descriptor; give the kernel a moment.
    let netlink = Netlink::connect()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while netlink.link_index(&rec.iface).await?.is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Someone (a new client, `teletun cleanup`) may have handled it meanwhile.
    match record::load(&path) {
        Ok(now) if now == rec => {}
        _ => return Ok(()),
    }
    info!("client pid {} died without cleaning up; undoing its changes", rec.pid);
    super::cleanup::undo_record(&netlink, &rec, &path).await
}

/// The client's end of its guard.
pub struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Guard {
    /// Starts `teletun guard` in its own session.
    pub fn start() -> Result<Guard> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("cannot find the teletun executable for the guard")?;
        let mut cmd = Command::new(exe);
        cmd.arg("guard").stdin(Stdio::piped()).stdout(Stdio::null());
        // SAFETY: setsid and signal are async-signal-safe. setsid detaches the
        // guard from the client's session and process group; ignored signals
        // stay ignored across exec, so the guard is immune from its first
        // instruction, not only once `run` has set the same.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::signal(sig, libc::SIG_IGN);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("cannot start the cleanup guard process")?;
        let pipe = child.stdin.take();
        Ok(Guard { child, pipe })
    }

    fn say(&mut self, line: &str) -> Result<()> {
        use std::io::Write;
        let pipe = self.pipe.as_mut().context("the guard pipe is closed")?;
        if let Err(e) = writeln!(pipe, "{line}").and_then(|_| pipe.flush()) {
            let status = match self.child.try_wait() {
                Ok(Some(status)) => status.to_string(),
                Ok(None) => "still running".to_string(),
                Err(e) => format!("unknown: {e}"),
            };
            bail!(
                "the cleanup guard process (pid {}) is gone ({status}): {e}",
                self.child.id()
            );
        }
        Ok(())
    }

    /// Tells the guard which record to undo if the client dies. A guard that
    /// died before hearing it is replaced once (with a warning): the record is
    /// what it would protect, so a fresh guard protects it as well.
    pub fn watch(&mut self, record: &std::path::Path) -> Result<()> {
        let line = format!("record {}", record.display());
        if let Err(e) = self.say(&line) {
            warn!("{e:#}; starting a new cleanup guard");
            *self = Guard::start()?;
            self.say(&line)?;
        }
        Ok(())
    }

    /// Tells the guard the client cleaned up itself, and waits for it to exit.
    pub fn done(mut self) {
        let _ = self.say("done");
        self.pipe = None;
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_guard_is_reported_with_its_exit_status() {
        let mut child = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
        let pipe = child.stdin.take();
        let mut guard = Guard { child, pipe };
        // Wait for it to exit, so the pipe has no reader.
        while guard.child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = guard.say("record /run/teletun/tel0.json").unwrap_err().to_string();
        assert!(e.contains("is gone (exit status: 0)"), "{e}");
    }

    #[test]
    fn reads_the_record_and_done() {
        let h = listen("record /run/teletun/tel0.json\ndone\n".as_bytes());
        assert_eq!(
            (h.record.as_deref(), h.done),
            (Some(std::path::Path::new("/run/teletun/tel0.json")), true)
        );
        let h = listen("record /run/teletun/tel3.json\n".as_bytes());
        assert!(!h.done, "EOF without done means the client died");
        assert_eq!(listen("".as_bytes()), Heard::default());
    }
}
