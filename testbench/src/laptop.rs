//! The laptop: a network namespace plus a persistent private mount namespace in
//! which `/etc`, `/usr` and `/run` are overlays or tmpfs, so a real Debian
//! `resolvconf` runs there (provisioned from the Debian package and cached)
//! without ever touching the host's DNS configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache::cached;
use crate::exec;
use crate::netns::{Netns, CMD_TIMEOUT};
use crate::topology::DnsManager;

/// Downloads and unpacks a Debian package once (at `version`, or the
/// archive's candidate); returns the unpacked tree.
pub fn debian_package(name: &str, version: Option<&str>) -> Result<PathBuf> {
    let key = match version {
        Some(v) => format!("{name}_{}", v.replace([':', '~', '+'], "_")),
        None => name.to_owned(),
    };
    cached(&key, |tree| {
        let root = tree.parent().context("a cache entry has a parent")?;
        let spec = version.map_or_else(|| name.to_owned(), |v| format!("{name}={v}"));
        eprintln!(
            "testbench: downloading Debian package {spec} into {} (once)",
            root.display()
        );
        let mut dl = Command::new("apt-get");
        dl.args(["download", "-q", "-o", "APT::Sandbox::User=root", &spec])
            .current_dir(root);
        exec::run(dl, std::time::Duration::from_secs(300))
            .with_context(|| format!("cannot download the Debian package {spec}; run `apt-get update` first"))?;
        let deb =
            deb_in(root).with_context(|| format!("apt-get download {name} left no .deb in {}", root.display()))?;
        let mut x = Command::new("dpkg");
        x.arg("-x").arg(&deb).arg(tree);
        exec::run(x, CMD_TIMEOUT).map(|_| ())
    })
}

/// The downloaded .deb next to an unpacked package tree's directory.
fn deb_in(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
}

/// The read-only layers a laptop with `dns` mounts under its per-case upper
/// layers, made once per set of packages: `usr/` (the packages' /usr, /sbin,
/// /lib and /bin, merged under /usr) and `etc/` (the DNS manager's fixed
/// configuration).
fn laptop_layers(dns: DnsManager, packages: &[PathBuf]) -> Result<PathBuf> {
    let debs: Vec<String> = packages
        .iter()
        .filter_map(|tree| deb_in(tree.parent()?))
        .filter_map(|deb| Some(deb.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    let key = format!("laptop-{dns}-{}", debs.join("+"));
    cached(&key, |layers| {
        let (usr, etc) = (layers.join("usr"), layers.join("etc"));
        for tree in packages {
            for (from, to) in [("usr", ""), ("sbin", "sbin"), ("lib", "lib"), ("bin", "bin")] {
                if tree.join(from).is_dir() {
                    copy_tree(&tree.join(from), &usr.join(to))?;
                }
            }
        }
        std::fs::create_dir_all(&etc)?;
        let pkg = &packages[0];
        match dns {
            DnsManager::Debian => {
                copy_tree(&pkg.join("etc/resolvconf"), &etc.join("resolvconf"))?;
                std::os::unix::fs::symlink("../run/resolvconf/resolv.conf", etc.join("resolv.conf"))?;
            }
            DnsManager::Openresolv => {
                std::fs::copy(pkg.join("etc/resolvconf.conf"), etc.join("resolvconf.conf"))?;
                std::fs::write(etc.join("resolv.conf"), "# the laptop's resolv.conf before TeleTUN\n")?;
            }
            DnsManager::Resolved => {
                // Only the running daemon may answer; no D-Bus activation.
                let _ = std::fs::remove_file(usr.join("share/dbus-1/system-services/org.freedesktop.resolve1.service"));
                std::fs::create_dir_all(etc.join("systemd"))?;
                // LLMNR and mDNS would stall lookups for seconds here.
                std::fs::write(
                    etc.join("systemd/resolved.conf"),
                    "[Resolve]\nLLMNR=no\nMulticastDNS=no\nDNSStubListener=yes\n",
                )?;
                std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", etc.join("resolv.conf"))?;
            }
        }
        Ok(())
    })
}

/// The laptop namespace pair.
pub struct Laptop {
    /// Its network namespace.
    pub ns: Netns,
    /// Its DNS manager.
    pub dns: DnsManager,
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

/// The unpacked Debian packages that make up `dns`.
fn packages(dns: DnsManager) -> Result<Vec<PathBuf>> {
    match dns {
        DnsManager::Debian => Ok(vec![debian_package("resolvconf", None)?]),
        DnsManager::Openresolv => Ok(vec![debian_package("openresolv", None)?]),
        DnsManager::Resolved => resolved_packages(),
    }
}

impl Laptop {
    /// Sets up the mount namespace for `ns` with the chosen DNS manager in it.
    pub fn create(ns: Netns, dir: &Path, variant: DnsManager) -> Result<Laptop> {
        let layers = laptop_layers(variant, &packages(variant)?)?;
        let root = dir.join("laptop-fs");
        let etc_up = root.join("etc-upper");
        for d in ["etc-upper", "etc-work", "usr-upper", "usr-work"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let log = dir.join("systemd-resolved.log");
        let init = match variant {
            DnsManager::Debian => {
                "mkdir -p /run/resolvconf/interface\ntouch /run/resolvconf/enable-updates\nresolvconf -u\n".to_owned()
            }
            DnsManager::Openresolv => "resolvconf -u\n".to_owned(),
            DnsManager::Resolved => {
                let (passwd, group) = (
                    std::fs::read_to_string("/etc/passwd")?,
                    std::fs::read_to_string("/etc/group")?,
                );
                if !passwd.lines().any(|l| l.starts_with("systemd-resolve:")) {
                    let (user, grp) = resolved_account(&passwd, &group);
                    std::fs::write(etc_up.join("passwd"), passwd + &user)?;
                    std::fs::write(etc_up.join("group"), group + &grp)?;
                }
                format!(
                    "mkdir -p /run/dbus /run/systemd/resolve\n\
                     chown systemd-resolve:systemd-resolve /run/systemd/resolve\n\
                     dbus-daemon --system --fork --nopidfile\n\
                     setsid /lib/systemd/systemd-resolved >{log} 2>&1 < /dev/null &\n\
                     for i in $(seq 500); do resolvectl status >/dev/null 2>&1 && break; sleep 0.01; done\n\
                     resolvectl status >/dev/null\n",
                    log = log.display()
                )
            }
        };
        let holder = root.join("ns");
        std::fs::create_dir_all(&holder)?;
        let laptop = Laptop {
            ns,
            dns: variant,
            mnt: holder.join("mnt"),
            holder: holder.clone(),
            mounted: false.into(),
        };
        // A mount-namespace file can only be bound onto a private mount.
        bind_private(&holder)?;
        laptop.mounted.store(true, std::sync::atomic::Ordering::Relaxed);
        std::fs::write(&laptop.mnt, b"")?;
        let (r, l) = (root.to_string_lossy(), layers.to_string_lossy());
        // Ends by printing what shows the DNS manager is in place.
        let setup = format!(
            "set -e\n\
             mount -t sysfs sysfs /sys\n\
             mount -t tmpfs -o mode=755 tmpfs /run\n\
             mount -t overlay overlay -o lowerdir={l}/etc:/etc,upperdir={r}/etc-upper,workdir={r}/etc-work /etc\n\
             mount -t overlay overlay -o lowerdir={l}/usr:/usr,upperdir={r}/usr-upper,workdir={r}/usr-work /usr\n\
             {init}\
             set +e; command -v resolvconf; readlink /etc/resolv.conf; resolvconf --version 2>&1 | head -1; true\n"
        );
        let mut c = Command::new("unshare");
        c.arg(format!("--mount={}", laptop.mnt.display()))
            .arg("--propagation=private")
            .arg("nsenter")
            .arg(format!("--net={}", laptop.ns.path().display()))
            .args(["sh", "-c", &setup]);
        let probe = exec::run(c, CMD_TIMEOUT).context("cannot set up the laptop's private /etc, /usr and /run")?;
        let ok = match variant {
            DnsManager::Debian => probe.contains("/run/resolvconf/resolv.conf"),
            DnsManager::Openresolv => probe.contains("openresolv"),
            DnsManager::Resolved => probe.contains("stub-resolv.conf"),
        };
        if !ok {
            bail!("the laptop's DNS manager ({variant}) is not in place: {probe}");
        }
        Ok(laptop)
    }

    /// Registers a LAN's resolver for `eth0` as DHCP would: `eth0.dhclient`
    /// (dhclient's hook for Debian resolvconf), `eth0` (for openresolv), or
    /// the link's DNS server and domain (systemd-resolved).
    pub fn register_lan_dns(&self, server: std::net::Ipv4Addr, domain: &str) -> Result<()> {
        let conf = format!("nameserver {server}\nsearch {domain}\n");
        let script = match self.dns {
            DnsManager::Debian => format!("printf '{conf}' | resolvconf -a eth0.dhclient"),
            DnsManager::Openresolv => format!("printf '{conf}' | resolvconf -a eth0"),
            DnsManager::Resolved => format!("resolvectl dns eth0 {server} && resolvectl domain eth0 {domain}"),
        };
        self.run_sh(&script)
            .map(|_| ())
            .context("cannot register the home LAN's resolver on the laptop")
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

/// Bind-mounts `dir` onto itself and makes it a private mount (where a
/// mount-namespace file may be bound).
fn bind_private(dir: &Path) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: mount(2) with valid NUL-terminated paths and no data.
    let bound = unsafe {
        libc::mount(
            c.as_ptr(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if bound != 0 {
        bail!(
            "cannot bind {} onto itself: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: as above; MS_PRIVATE changes only the propagation of this mount.
    let private = unsafe {
        libc::mount(
            std::ptr::null(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if private != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: unmounts the bind mount made just above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        bail!("cannot make {} a private mount: {e}", dir.display());
    }
    Ok(())
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}
