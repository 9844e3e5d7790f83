//! The record of what a client changed on this machine, kept under
//! `/run/teletun/` (tmpfs: it never outlives a reboot, and neither do the
//! changes). `teletun cleanup`, and every client start, undo what a dead
//! instance left behind and never touch what a live instance owns.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Where records live, unless `TELETUN_RUN_DIR` says otherwise (tests).
pub const DEFAULT_RUN_DIR: &str = "/run/teletun";

/// The run directory in effect.
pub fn run_dir() -> PathBuf {
    std::env::var_os("TELETUN_RUN_DIR").map_or_else(|| PathBuf::from(DEFAULT_RUN_DIR), PathBuf::from)
}

/// One client instance's changes, written before each change is made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The client's process id.
    pub pid: u32,
    /// The process's start time (clock ticks since boot), so a reused pid is not mistaken for it.
    pub start_time: u64,
    /// The TUN interface's name.
    pub iface: String,
    /// Whether a DNS registration for `iface` may exist.
    pub dns_registered: bool,
    /// How it was registered.
    #[serde(default)]
    pub dns_via: super::dns::DnsVia,
    /// The name it was registered under with resolvconf (records from before
    /// the forwarder used the interface's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
}

/// A running (not zombie) process's start time from `/proc/PID/stat`.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // A zombie has released everything it held: it counts as dead.
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    // Field 22 overall is the 19th after the state.
    fields.nth(18)?.parse().ok()
}

impl Record {
    /// A record for the current process.
    pub fn for_self(iface: &str) -> Record {
        let pid = std::process::id();
        Record {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            iface: iface.to_owned(),
            dns_registered: false,
            dns_via: Default::default(),
            dns_name: None,
        }
    }

    /// The name of the resolvconf entry this client registers (or registered).
    pub fn dns_entry(&self) -> &str {
        self.dns_name.as_deref().unwrap_or(&self.iface)
    }

    /// The record's file.
    pub fn path(&self) -> PathBuf {
        run_dir().join(format!("{}.json", self.iface))
    }

    /// Whether the process that wrote this record still runs.
    pub fn owner_alive(&self) -> bool {
        process_start_time(self.pid).is_some_and(|t| t == self.start_time)
    }

    /// Writes the record atomically (write to a temporary file, then rename).
    pub fn save(&self) -> Result<()> {
        let dir = run_dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = self.path();
        let tmp = dir.join(format!(".{}.{}.tmp", self.iface, self.pid));
        let json = serde_json::to_vec_pretty(self)?;
        let mut f = fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&json)?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Deletes the record's file.
    pub fn remove(&self) -> Result<()> {
        match fs::remove_file(self.path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.path().display())),
        }
    }
}

/// Reads one record.
pub fn load(path: &Path) -> Result<Record> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&data).with_context(|| format!("{} is not a TeleTUN record", path.display()))
}

/// Every record on this machine, with the file it came from. Unreadable files
/// are returned as errors so cleanup can report them.
pub fn load_all() -> Vec<(PathBuf, Result<Record>)> {
    let Ok(entries) = fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let r = load(&p);
            (p, r)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_fake_one_is_not() {
        let me = Record::for_self("tel-test");
        assert!(me.start_time > 0);
        assert!(me.owner_alive());
        let reused = Record {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(
            !reused.owner_alive(),
            "a pid with another start time is another process"
        );
    }

    #[test]
    fn a_zombie_counts_as_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Let it exit without reaping it.
        while fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(process_start_time(pid), None);
        child.wait().unwrap();
    }
}
