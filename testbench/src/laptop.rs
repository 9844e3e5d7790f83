//! The laptop: a network namespace plus a persistent private mount namespace in
//! which `/etc`, `/usr` and `/run` are overlays or tmpfs, so a real Debian
//! `resolvconf` runs there (provisioned from the Debian package and cached)
//! without ever touching the host's DNS configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::exec;
use crate::netns::{Netns, CMD_TIMEOUT};

/// Where downloaded packages are cached between runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TESTBENCH_CACHE").map_or_else(|| PathBuf::from("/var/cache/teletun-testbench"), PathBuf::from)
}

/// Downloads and unpacks a Debian package once (at `version`, or the
/// archive's candidate); returns the unpacked tree.
pub fn debian_package(name: &str, version: Option<&str>) -> Result<PathBuf> {
    let root = cache_dir().join(match version {
        Some(v) => format!("{name}_{}", v.replace([':', '~', '+'], "_")),
        None => name.to_owned(),
    });
    let tree = root.join("tree");
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // Parallel runs share the cache: one downloads, the others wait.
    let lock = std::fs::File::create(root.join(".lock"))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!("cannot lock {}: {}", root.display(), std::io::Error::last_os_error());
    }
    if tree.join(".complete").exists() {
        return Ok(tree);
    }
    let spec = version.map_or_else(|| name.to_owned(), |v| format!("{name}={v}"));
    eprintln!(
        "testbench: downloading Debian package {spec} into {} (once)",
        root.display()
    );
    let mut dl = Command::new("apt-get");
    dl.args(["download", "-q", "-o", "APT::Sandbox::User=root", &spec])
        .current_dir(&root);
    exec::run(dl, std::time::Duration::from_secs(300))
        .with_context(|| format!("cannot download the Debian package {spec}; run `apt-get update` first"))?;
    let deb = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {name} left no .deb in {}", root.display()))?;
    let _ = std::fs::remove_dir_all(&tree);
    let mut x = Command::new("dpkg");
    x.arg("-x").arg(&deb).arg(&tree);
    exec::run(x, CMD_TIMEOUT)?;
    std::fs::write(tree.join(".complete"), b"")?;
    Ok(tree)
}

/// The laptop namespace pair.
pub struct Laptop {
    /// Its network namespace.
    pub ns: Netns,
    /// The bind-mounted mount-namespace file.
    mnt: PathBuf,
    /// Private mount point holding `mnt`.
    holder: PathBuf,
    mounted: std::sync::atomic::AtomicBool,
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(format!("{}/.", from.display())).arg(to);
    exec::run(cp, CMD_TIMEOUT).map(|_| ())
}

/// Which DNS manager the laptop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsVariant {
    /// Debian's `resolvconf` package: `/etc/resolv.conf` → `/run/resolvconf/resolv.conf`.
    Debian,
    /// `openresolv`: writes `/etc/resolv.conf` itself.
    Openresolv,
    /// systemd-resolved on a private system D-Bus; `/etc/resolv.conf` → its stub.
    Resolved,
}

fn installed_version(package: &str) -> Result<String> {
    let mut q = Command::new("dpkg-query");
    q.args(["-W", "-f=${Version}", package]);
    let v = exec::run(q, CMD_TIMEOUT).with_context(|| format!("{package} is not installed"))?;
    Ok(v.trim().to_owned())
}

/// systemd-resolved at the version of this machine's systemd libraries, or, if
/// the archive no longer has that version, its current one together with the
/// matching private library.
fn resolved_packages() -> Result<Vec<PathBuf>> {
    let version = installed_version("libsystemd-shared")?;
    match debian_package("systemd-resolved", Some(&version)) {
        Ok(tree) => Ok(vec![tree]),
        Err(e) => {
            eprintln!("testbench: {e:#}; using the archive's systemd-resolved with its libsystemd-shared");
            Ok(vec![
                debian_package("systemd-resolved", None)?,
                debian_package("libsystemd-shared", None)?,
            ])
        }
    }
}

/// A user line for systemd-resolved's account, with a uid and gid free in `passwd`/`group`.
fn resolved_account(passwd: &str, group: &str) -> (String, String) {
    let taken = |text: &str, id: u32| text.lines().any(|l| l.split(':').nth(2) == Some(&id.to_string()));
    let id = (900..999)
        .rev()
        .find(|&i| !taken(passwd, i) && !taken(group, i))
        .unwrap_or(997);
    (
        format!("systemd-resolve:x:{id}:{id}:systemd Resolver:/:/usr/sbin/nologin\n"),
        format!("systemd-resolve:x:{id}:\n"),
    )
}

impl DnsVariant {
    /// Parses the `[topology] resolvconf` value.
    pub fn parse(name: &str) -> Result<DnsVariant> {
        match name {
            "debian" => Ok(DnsVariant::Debian),
            "openresolv" => Ok(DnsVariant::Openresolv),
            "systemd-resolved" => Ok(DnsVariant::Resolved),
            other => bail!("unknown resolvconf variant {other:?}: use debian, openresolv or systemd-resolved"),
        }
    }

    fn packages(self) -> Result<Vec<PathBuf>> {
        match self {
            DnsVariant::Debian => Ok(vec![debian_package("resolvconf", None)?]),
            DnsVariant::Openresolv => Ok(vec![debian_package("openresolv", None)?]),
            DnsVariant::Resolved => resolved_packages(),
        }
    }
}

impl Laptop {
    /// Sets up the mount namespace for `ns` with the chosen DNS manager in it.
    pub fn create(ns: Netns, dir: &Path, variant: DnsVariant) -> Result<Laptop> {
        let packages = variant.packages()?;
        let pkg = &packages[0];
        let root = dir.join("laptop-fs");
        // Merged /usr: the packages' /sbin, /lib and /bin land under /usr.
        let stage = root.join("stage");
        for tree in &packages {
            for (from, to) in [
                ("usr", "usr"),
                ("sbin", "usr/sbin"),
                ("lib", "usr/lib"),
                ("bin", "usr/bin"),
            ] {
                if tree.join(from).is_dir() {
                    copy_tree(&tree.join(from), &stage.join(to))?;
                }
            }
        }
        let etc_up = root.join("etc-upper");
        std::fs::create_dir_all(&etc_up)?;
        let log = dir.join("systemd-resolved.log");
        let init = match variant {
            DnsVariant::Debian => {
                copy_tree(&pkg.join("etc/resolvconf"), &etc_up.join("resolvconf"))?;
                std::os::unix::fs::symlink("../run/resolvconf/resolv.conf", etc_up.join("resolv.conf"))?;
                "mkdir -p /run/resolvconf/interface\ntouch /run/resolvconf/enable-updates\nresolvconf -u\n".to_owned()
            }
            DnsVariant::Openresolv => {
                std::fs::copy(pkg.join("etc/resolvconf.conf"), etc_up.join("resolvconf.conf"))?;
                std::fs::write(
                    etc_up.join("resolv.conf"),
                    "# the laptop's resolv.conf before TeleTUN\n",
                )?;
                "resolvconf -u\n".to_owned()
            }
            DnsVariant::Resolved => {
                // Only the running daemon may answer; no D-Bus activation.
                let _ = std::fs::remove_file(
                    stage.join("usr/share/dbus-1/system-services/org.freedesktop.resolve1.service"),
                );
                let (passwd, group) = (
                    std::fs::read_to_string("/etc/passwd")?,
                    std::fs::read_to_string("/etc/group")?,
                );
                if !passwd.lines().any(|l| l.starts_with("systemd-resolve:")) {
                    let (user, grp) = resolved_account(&passwd, &group);
                    std::fs::write(etc_up.join("passwd"), passwd + &user)?;
                    std::fs::write(etc_up.join("group"), group + &grp)?;
                }
                std::fs::create_dir_all(etc_up.join("systemd"))?;
                // LLMNR and mDNS would stall lookups for seconds here.
                std::fs::write(
                    etc_up.join("systemd/resolved.conf"),
                    "[Resolve]\nLLMNR=no\nMulticastDNS=no\nDNSStubListener=yes\n",
                )?;
                std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", etc_up.join("resolv.conf"))?;
                format!(
                    "mkdir -p /run/dbus /run/systemd/resolve\n\
                     chown systemd-resolve:systemd-resolve /run/systemd/resolve\n\
                     dbus-daemon --system --fork --nopidfile\n\
                     setsid /lib/systemd/systemd-resolved >{log} 2>&1 < /dev/null &\n\
                     for i in $(seq 100); do resolvectl status >/dev/null 2>&1 && break; sleep 0.05; done\n\
                     resolvectl status >/dev/null\n",
                    log = log.display()
                )
            }
        };
        for d in ["etc-work", "usr-upper", "usr-work"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let holder = root.join("ns");
        std::fs::create_dir_all(&holder)?;
        let laptop = Laptop {
            ns,
            mnt: holder.join("mnt"),
            holder: holder.clone(),
            mounted: false.into(),
        };
        // A mount-namespace file can only be bound onto a private mount.
        let h = holder.to_string_lossy().into_owned();
        exec::run(cmd("mount", &["--bind", &h, &h]), CMD_TIMEOUT)?;
        laptop.mounted.store(true, std::sync::atomic::Ordering::Relaxed);
        exec::run(cmd("mount", &["--make-private", &h]), CMD_TIMEOUT)?;
        std::fs::write(&laptop.mnt, b"")?;
        let r = root.to_string_lossy();
        let setup = format!(
            "set -e\n\
             mount -t sysfs sysfs /sys\n\
             mount -t tmpfs -o mode=755 tmpfs /run\n\
             mount -t overlay overlay -o lowerdir=/etc,upperdir={r}/etc-upper,workdir={r}/etc-work /etc\n\
             mount -t overlay overlay -o lowerdir={r}/stage/usr:/usr,upperdir={r}/usr-upper,workdir={r}/usr-work /usr\n\
             {init}"
        );
        let mut c = Command::new("unshare");
        c.arg(format!("--mount={}", laptop.mnt.display()))
            .arg("--propagation=private")
            .arg("nsenter")
            .arg(format!("--net={}", laptop.ns.path().display()))
            .args(["sh", "-c", &setup]);
        exec::run(c, CMD_TIMEOUT).context("cannot set up the laptop's private /etc, /usr and /run")?;
        let probe = laptop
            .run_sh("command -v resolvconf; readlink /etc/resolv.conf; resolvconf --version 2>&1 | head -1; true")?;
        let ok = match variant {
            DnsVariant::Debian => probe.contains("/run/resolvconf/resolv.conf"),
            DnsVariant::Openresolv => probe.contains("openresolv"),
            DnsVariant::Resolved => probe.contains("stub-resolv.conf"),
        };
        if !ok {
            bail!("the laptop's DNS manager ({variant:?}) is not in place: {probe}");
        }
        Ok(laptop)
    }

    /// A command that runs `program` on the laptop (its network and mount namespaces).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.mnt.display()))
            .arg(format!("--net={}", self.ns.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs a shell snippet on the laptop; fails on a non-zero exit.
    pub fn run_sh(&self, script: &str) -> Result<String> {
        let mut c = self.cmd("sh");
        c.args(["-c", script]);
        exec::run(c, CMD_TIMEOUT)
    }

    /// Everything a client may change, normalized for comparison: links,
    /// addresses, routes, rules, resolv.conf bytes and resolvconf's own records.
    pub fn snapshot(&self) -> Result<String> {
        self.run_sh(
            "echo '# links'; ip -o link show | sed -e 's/^[0-9]*: //'\n\
             echo '# addresses'; ip -o addr show | sed -e 's/^[0-9]*: //' -e 's/ *valid_lft.*//'\n\
             echo '# routes'; ip -4 route show table all; ip -6 route show table all | grep -v ' expires '\n\
             echo '# rules'; ip rule; ip -6 rule\n\
             echo '# /etc/resolv.conf'; cat /etc/resolv.conf\n\
             echo '# resolvconf state'; find /run/resolvconf -type f 2>/dev/null | sort | while read -r f; do echo \"== $f\"; cat \"$f\"; done; true\n\
             echo '# systemd-resolved links'; resolvectl dns 2>/dev/null; resolvectl domain 2>/dev/null\n\
             echo '# teletun records'; ls -A /run/teletun 2>/dev/null; true",
        )
    }

    /// Removes the network and mount namespaces (once; later calls do nothing).
    pub fn teardown(&self) {
        self.ns.delete();
        if self.mounted.swap(false, std::sync::atomic::Ordering::Relaxed) {
            let _ = exec::run_to_completion(cmd("umount", &[&self.mnt.to_string_lossy()]), CMD_TIMEOUT);
            let _ = exec::run_to_completion(cmd("umount", &[&self.holder.to_string_lossy()]), CMD_TIMEOUT);
        }
    }
}

impl Drop for Laptop {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}
