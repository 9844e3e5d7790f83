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

/// Downloads and unpacks a Debian package once; returns the unpacked tree.
pub fn debian_package(name: &str) -> Result<PathBuf> {
    let root = cache_dir().join(name);
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
    eprintln!(
        "testbench: downloading Debian package {name} into {} (once)",
        root.display()
    );
    let mut dl = Command::new("apt-get");
    dl.args(["download", "-q", "-o", "APT::Sandbox::User=root", name])
        .current_dir(&root);
    exec::run(dl, std::time::Duration::from_secs(300))
        .with_context(|| format!("cannot download the Debian package {name}; run `apt-get update` first"))?;
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
    mounted: bool,
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
}

impl DnsVariant {
    /// Parses the `[topology] resolvconf` value.
    pub fn parse(name: &str) -> Result<DnsVariant> {
        match name {
            "debian" => Ok(DnsVariant::Debian),
            "openresolv" => Ok(DnsVariant::Openresolv),
            other => bail!("unknown resolvconf variant {other:?}: use debian or openresolv"),
        }
    }

    fn package(self) -> &'static str {
        match self {
            DnsVariant::Debian => "resolvconf",
            DnsVariant::Openresolv => "openresolv",
        }
    }
}

impl Laptop {
    /// Sets up the mount namespace for `ns` with the chosen DNS manager in it.
    pub fn create(ns: Netns, dir: &Path, variant: DnsVariant) -> Result<Laptop> {
        let pkg = debian_package(variant.package())?;
        let root = dir.join("laptop-fs");
        // Merged /usr: the package's /sbin and /lib land under /usr.
        let stage = root.join("stage");
        copy_tree(&pkg.join("sbin"), &stage.join("usr/sbin"))?;
        copy_tree(&pkg.join("lib"), &stage.join("usr/lib"))?;
        let etc_up = root.join("etc-upper");
        std::fs::create_dir_all(&etc_up)?;
        let init = match variant {
            DnsVariant::Debian => {
                copy_tree(&pkg.join("etc/resolvconf"), &etc_up.join("resolvconf"))?;
                std::os::unix::fs::symlink("../run/resolvconf/resolv.conf", etc_up.join("resolv.conf"))?;
                "mkdir -p /run/resolvconf/interface\ntouch /run/resolvconf/enable-updates\nresolvconf -u\n"
            }
            DnsVariant::Openresolv => {
                std::fs::copy(pkg.join("etc/resolvconf.conf"), etc_up.join("resolvconf.conf"))?;
                std::fs::write(
                    etc_up.join("resolv.conf"),
                    "# the laptop's resolv.conf before TeleTUN\n",
                )?;
                "resolvconf -u\n"
            }
        };
        for d in ["etc-work", "usr-upper", "usr-work"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let holder = root.join("ns");
        std::fs::create_dir_all(&holder)?;
        let mut laptop = Laptop {
            ns,
            mnt: holder.join("mnt"),
            holder: holder.clone(),
            mounted: false,
        };
        // A mount-namespace file can only be bound onto a private mount.
        let h = holder.to_string_lossy().into_owned();
        exec::run(cmd("mount", &["--bind", &h, &h]), CMD_TIMEOUT)?;
        laptop.mounted = true;
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
        };
        if !ok {
            bail!("the laptop's {} is not in place: {probe}", variant.package());
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
             echo '# routes'; ip route show table all; ip -6 route show table all | grep -v ' expires '\n\
             echo '# rules'; ip rule; ip -6 rule\n\
             echo '# /etc/resolv.conf'; cat /etc/resolv.conf\n\
             echo '# resolvconf state'; find /run/resolvconf -type f 2>/dev/null | sort | while read -r f; do echo \"== $f\"; cat \"$f\"; done; true\n\
             echo '# teletun records'; ls -A /run/teletun 2>/dev/null; true",
        )
    }

    /// Removes the mount namespace (the network namespace goes with the cluster).
    pub fn teardown(&mut self) {
        self.ns.delete();
        if self.mounted {
            let _ = exec::run_to_completion(cmd("umount", &[&self.mnt.to_string_lossy()]), CMD_TIMEOUT);
            let _ = exec::run_to_completion(cmd("umount", &[&self.holder.to_string_lossy()]), CMD_TIMEOUT);
            self.mounted = false;
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
