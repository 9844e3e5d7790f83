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

/// Makes the run directory ready for records and sockets: created with mode
/// 0700, or, if it exists, a real directory (not a symlink) owned by this
/// user, tightened to 0700 if it was looser (made by an older version under
/// the umask). Anything else is refused: whoever else could write there could
/// plant records that `cleanup` acts on, or sockets `status` believes.
pub fn ensure_run_dir() -> Result<PathBuf> {
    let dir = run_dir();
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// See [`ensure_run_dir`].
fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("cannot look at {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        anyhow::bail!(
            "{} is not a directory (a symlink or a file): remove it, then start again",
            dir.display()
        );
    }
    if meta.uid() != me {
        anyhow::bail!(
            "{} belongs to uid {}, not to this user (uid {me}): remove it, then start again",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }
    Ok(())
}

/// Whether `name` can be a Linux interface name: 1–15 bytes, none of them
/// `/`, `:`, whitespace or control characters, and not `.` or `..`.
pub fn valid_interface_name(name: &str) -> bool {
    (1..libc::IF_NAMESIZE).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
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
        use std::os::unix::fs::OpenOptionsExt;
        let dir = ensure_run_dir()?;
        let path = self.path();
        let tmp = dir.join(format!(".{}.{}.tmp", self.iface, self.pid));
        let json = serde_json::to_vec_pretty(self)?;
        // A leftover of a crash (unlinked, never followed), then a file of
        // our own: never one a link points to.
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
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

/// The largest record file read (a real one is a few hundred bytes).
const MAX_RECORD_LEN: u64 = 64 * 1024;

/// Reads one record (not following a symlink), and checks that it names an
/// interface and a DNS entry a client could have made, so `cleanup` never
/// acts on another's (`eth0.dhcp`) or on a path outside the run directory.
pub fn load(path: &Path) -> Result<Record> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot read {} (a symlink is not read)", path.display()))?;
    let mut data = Vec::new();
    f.take(MAX_RECORD_LEN + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if data.len() as u64 > MAX_RECORD_LEN {
        anyhow::bail!("{} is larger than any TeleTUN record", path.display());
    }
    let rec: Record =
        serde_json::from_slice(&data).with_context(|| format!("{} is not a TeleTUN record", path.display()))?;
    if !valid_interface_name(&rec.iface) {
        anyhow::bail!(
            "{} names no interface a client could have made ({:?})",
            path.display(),
            rec.iface
        );
    }
    let ours = super::forwarder::registration_name(&rec.iface);
    if rec.dns_name.as_deref().is_some_and(|n| n != ours && n != rec.iface) {
        anyhow::bail!(
            "{} names a DNS entry no client of {} makes ({:?})",
            path.display(),
            rec.iface,
            rec.dns_name.as_deref().unwrap_or_default()
        );
    }
    Ok(rec)
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

    /// The run directory is made private, a loose one of ours tightened; a
    /// symlink or another user's directory refused.
    #[test]
    fn the_run_directory_is_private_and_ours() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let base = std::env::temp_dir().join(format!("teletun-rundir-{}", std::process::id()));
        fs::create_dir_all(&base).unwrap();
        let fresh = base.join("fresh");
        ensure_private_dir(&fresh).unwrap();
        assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        let loose = base.join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o777)).unwrap();
        ensure_private_dir(&loose).unwrap();
        assert_eq!(fs::metadata(&loose).unwrap().mode() & 0o777, 0o700);
        let link = base.join("link");
        std::os::unix::fs::symlink(&loose, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let theirs = base.join("theirs");
        fs::create_dir(&theirs).unwrap();
        // SAFETY: chown on a path we made; 65534 is nobody.
        let c = std::ffi::CString::new(theirs.as_os_str().as_encoded_bytes()).unwrap();
        if unsafe { libc::chown(c.as_ptr(), 65534, 65534) } == 0 {
            let e = ensure_private_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        } else {
            // Only root can give a directory away; the tests run as root.
            panic!("cannot chown {} (run the tests as root)", theirs.display());
        }
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn interface_names_are_checked() {
        for good in ["tel0", "tel-test", "wg.corp"] {
            assert!(valid_interface_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../../etc",
            "a/b",
            "eth0:1",
            "with space",
            "sixteen-bytes-xx",
        ] {
            assert!(!valid_interface_name(bad), "{bad}");
        }
    }

    /// A planted record names a path or another's DNS entry, or is a symlink:
    /// it is refused with its reason; a real one loads.
    #[test]
    fn records_that_no_client_wrote_are_refused() {
        let dir = std::env::temp_dir().join(format!("teletun-records-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, rec: &Record| {
            let path = dir.join(name);
            fs::write(&path, serde_json::to_vec(rec).unwrap()).unwrap();
            path
        };
        let good = Record {
            dns_name: Some("lo.teletun-tel0".into()),
            ..Record::for_self("tel0")
        };
        assert_eq!(load(&write("good.json", &good)).unwrap(), good);
        let climbing = Record {
            iface: "../../etc/x".into(),
            ..good.clone()
        };
        let e = load(&write("climbing.json", &climbing)).unwrap_err().to_string();
        assert!(e.contains("names no interface"), "{e}");
        let lan = Record {
            dns_name: Some("eth0.dhcp".into()),
            ..good.clone()
        };
        let e = load(&write("lan.json", &lan)).unwrap_err().to_string();
        assert!(e.contains("names a DNS entry no client"), "{e}");
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(dir.join("good.json"), &link).unwrap();
        let e = format!("{:#}", load(&link).unwrap_err());
        assert!(e.contains("symlink"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
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
