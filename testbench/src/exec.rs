//! Running commands: one-shot with a timeout and captured output, or in the
//! background with output to a log file. Every background process is tracked
//! so teardown can kill it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Set by SIGINT/SIGTERM; long waits give up when it is set.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Routes SIGINT and SIGTERM to [`INTERRUPTED`], so teardown still runs.
pub fn install_interrupt_handler() -> Result<()> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    std::thread::spawn(move || loop {
        if flag.load(Ordering::Relaxed) {
            INTERRUPTED.store(true, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    Ok(())
}

/// Fails if the run was interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Both streams, for error messages.
    pub fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr).trim().to_owned()
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (killing it after `timeout`, or at once when the
/// run is interrupted) and captures its output.
pub fn output(cmd: Command, timeout: Duration) -> Result<Output> {
    output_inner(cmd, timeout, true)
}

/// Like [`run`], but not cut short by an interrupt: for teardown.
pub fn run_to_completion(cmd: Command, timeout: Duration) -> Result<String> {
    let text = describe(&cmd);
    let out = output_inner(cmd, timeout, false)?;
    if !out.status.success() {
        bail!("`{text}` failed ({}): {}", out.status, out.both());
    }
    Ok(out.stdout)
}

fn output_inner(mut cmd: Command, timeout: Duration, interruptible: bool) -> Result<Output> {
    let text = describe(&cmd);
    let dir = scratch_dir()?;
    let (out_path, err_path) = (dir.join("out"), dir.join("err"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {text}"))?;
    let status = wait(&mut child, timeout, interruptible).with_context(|| text.clone())?;
    let out = Output {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_dir_all(dir);
    Ok(out)
}

/// Runs `cmd` and fails unless it exits 0; returns its standard output.
pub fn run(cmd: Command, timeout: Duration) -> Result<String> {
    let text = describe(&cmd);
    let out = output(cmd, timeout)?;
    if !out.status.success() {
        bail!("`{text}` failed ({}): {}", out.status, out.both());
    }
    Ok(out.stdout)
}

/// The prefix of the scratch directories of commands run by this process.
const SCRATCH_PREFIX: &str = "testbench-cmd-";

/// Removes the command scratch directories of testbench processes that no
/// longer run (a killed run leaves the one it was using).
pub fn remove_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn scratch_dir() -> Result<PathBuf> {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "{SCRATCH_PREFIX}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Waits for `child` up to `timeout`; kills it when time is up or on interrupt.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    wait(child, timeout, true)
}

/// Sleeps that start at 1 ms and double up to `max`: a quick command costs a
/// millisecond or two of waiting, a slow one a few wake-ups a second.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(1),
            max,
        }
    }

    fn sleep(&mut self) {
        std::thread::sleep(self.next);
        self.next = (self.next * 2).min(self.max);
    }
}

fn wait(child: &mut Child, timeout: Duration, interruptible: bool) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new(Duration::from_millis(10));
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let interrupted = interruptible && INTERRUPTED.load(Ordering::Relaxed);
        if Instant::now() >= deadline || interrupted {
            let _ = child.kill();
            let _ = child.wait();
            if interrupted {
                bail!("interrupted");
            }
            bail!("timed out after {timeout:?}");
        }
        backoff.sleep();
    }
}

/// A process running in the background, its output going to a log file.
pub struct Background {
    /// What it is, for messages ("server-external", "client main").
    pub name: String,
    /// The process.
    pub child: Child,
    /// Its combined stdout and stderr.
    pub log: PathBuf,
}

impl Background {
    /// Starts `cmd` with output to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Background> {
        let text = describe(&cmd);
        let f = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        // Its own process group, like a shell job: `signal_group` reaches it and its children.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = cmd.spawn().with_context(|| format!("cannot start {text}"))?;
        Ok(Background {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails if the process exits first
    /// or `timeout` passes.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(Duration::from_millis(20));
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            check_interrupted()?;
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing {needle:?}: {}",
                    self.name,
                    last_lines(&self.log_text(), 5)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}: {}",
                    self.name,
                    last_lines(&self.log_text(), 5)
                );
            }
            backoff.sleep();
        }
    }

    /// Sends `signal` to the process, unless it has already been reaped: its
    /// pid may belong to another process by now (pids wrap quickly here).
    pub fn signal(&mut self, signal: libc::c_int) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which is not yet reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        }
    }

    /// Sends `signal` to the process's whole process group, unless the process
    /// has already been reaped (then the group id may be someone else's).
    pub fn signal_group(&mut self, signal: libc::c_int) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the process group our unreaped child leads.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), signal) };
        }
    }

    /// Waits for exit up to `timeout` (then kills it).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_timeout(&mut self.child, timeout).with_context(|| format!("{} did not exit", self.name))
    }

    /// Kills the process if it still runs and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of `text`, joined with " | ".
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_scratch_goes_and_live_scratch_stays() {
        // No process can have a pid above the kernel's limit (at most 2^22).
        let dead = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}4294967295-0"));
        let live = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}-test-live", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("out"), "x").unwrap();
        }
        remove_stale_scratch();
        let (dead_gone, live_kept) = (!dead.exists(), live.exists());
        let _ = std::fs::remove_dir_all(&live);
        assert!(dead_gone, "a dead run's scratch is removed");
        assert!(live_kept, "a running process's scratch stays");
    }
}
