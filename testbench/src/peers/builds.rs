//! Peers the bench builds from their published sources at pinned versions,
//! once, into the testbench cache: a modern wireguard-go (the one users run,
//! and Tailscale builds on, with its TUN and UDP offloads) from its Go module,
//! and boringtun-cli from its crate. Go is a test-time tool only; the product
//! stays pure Rust.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cache::cached;
use crate::exec;

/// boringtun-cli's pinned crate version.
pub const BORINGTUN_CLI: &str = "0.7.1";

/// A Go program pinned to a module version.
pub struct GoProgram {
    /// What it is called here.
    pub name: &'static str,
    /// The module (its main package sits at the module root).
    pub module: &'static str,
    /// The pinned version.
    pub version: &'static str,
    /// The binary `go install` makes (the last element of the module path).
    pub binary: &'static str,
}

/// wireguard-go. Its tags carry no `v`, so modules pin it by commit: this is
/// the module's newest (2026-05-22), newer than the 0.0.20250522 tag, which the
/// module proxy here does not serve (403 for commit f333402bd9cb).
pub const WIREGUARD_GO: GoProgram = GoProgram {
    name: "wireguard-go",
    module: "golang.zx2c4.com/wireguard",
    version: "v0.0.0-20260522210424-ecfc5a8d5446",
    binary: "wireguard",
};

/// An installed wireguard-go at least this new has TUN TSO/GRO and UDP
/// GSO/GRO: Debian 13's 0.0.20231211 (the offloads came in 2023; a release
/// between is not taken on trust).
const OFFLOADS_SINCE: u32 = 20231211;

/// The `go` command: on PATH, or where the Go tarball installs it.
pub(crate) fn go_command() -> Option<PathBuf> {
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("go")).find(|g| g.is_file()));
    on_path.or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|g| g.is_file()))
}

impl GoProgram {
    /// The cache key of this version.
    fn key(&self) -> String {
        format!("go-{}-{}", self.name, self.version)
    }

    /// The binary, built with `go install` the first time (a progress line
    /// says so; later runs take it from the cache).
    pub fn build(&self) -> Result<PathBuf> {
        let go = go_command().context("Go is not installed (needed to build it from its module)")?;
        let tree = cached(&self.key(), |tree| {
            eprintln!(
                "testbench: building {} {} with `go install {}@{}` (once; cached in {})",
                self.name,
                self.version,
                self.module,
                self.version,
                tree.display()
            );
            std::fs::create_dir_all(tree)?;
            let mut c = Command::new(&go);
            c.args(["install", &format!("{}@{}", self.module, self.version)])
                .env("GOBIN", tree)
                .env("CGO_ENABLED", "0")
                .env("GOFLAGS", "-buildvcs=false -trimpath");
            exec::run(c, Duration::from_secs(1200))
                .with_context(|| format!("go install {}@{} failed", self.module, self.version))?;
            Ok(())
        })?;
        let binary = tree.join(self.binary);
        if !binary.is_file() {
            bail!("go install left no {} in {}", self.binary, tree.display());
        }
        Ok(binary)
    }
}

/// boringtun-cli, built with `cargo install --locked` the first time.
pub fn boringtun() -> Result<(PathBuf, String)> {
    let tree = cached(&format!("cargo-boringtun-cli-{BORINGTUN_CLI}"), |tree| {
        eprintln!(
            "testbench: building boringtun-cli {BORINGTUN_CLI} with `cargo install` (once; cached in {})",
            tree.display()
        );
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.args([
            "install",
            "--locked",
            "--quiet",
            "boringtun-cli",
            "--version",
            BORINGTUN_CLI,
            "--root",
        ])
        .arg(tree)
        // Its own build directory: not the workspace's, whose lock it would wait on.
        .env("CARGO_TARGET_DIR", tree.join("build"));
        exec::run(c, Duration::from_secs(1800))
            .with_context(|| format!("cargo install boringtun-cli {BORINGTUN_CLI} failed"))?;
        let _ = std::fs::remove_dir_all(tree.join("build"));
        Ok(())
    })?;
    let binary = tree.join("bin/boringtun-cli");
    if !binary.is_file() {
        bail!("cargo install left no boringtun-cli in {}", tree.display());
    }
    Ok((binary, format!("{BORINGTUN_CLI} (cargo install)")))
}

/// The release date in a `wireguard-go --version` line ("wireguard-go
/// v0.0.20220316"), as YYYYMMDD.
fn release_date(version_output: &str) -> Option<u32> {
    version_output
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v0.0.").and_then(|d| d.get(..8)?.parse().ok()))
}

/// The wireguard-go to measure and where it came from: the pinned build, or,
/// where Go is missing, an installed one that has the offloads. An old one
/// does not count as the peer (it would flatter teletun).
pub fn wireguard_go() -> Result<(PathBuf, String)> {
    let built = WIREGUARD_GO.build();
    let built_error = match built {
        Ok(path) => return Ok((path, format!("{} (go install)", WIREGUARD_GO.version))),
        Err(e) => e,
    };
    let installed = Path::new("/usr/bin/wireguard-go");
    let version = Command::new(installed)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    match version.as_deref().and_then(release_date) {
        Some(date) if date >= OFFLOADS_SINCE => Ok((installed.into(), format!("0.0.{date} (installed)"))),
        Some(date) => bail!(
            "{built_error:#}; the installed wireguard-go 0.0.{date} predates its offloads and does not count: install Go, or Debian 13's wireguard-go"
        ),
        None => bail!("{built_error:#}; and no wireguard-go is installed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_dates_come_from_the_version_line() {
        assert_eq!(
            release_date("wireguard-go v0.0.20220316\n\nUserspace WireGuard daemon"),
            Some(20220316)
        );
        assert_eq!(release_date("wireguard-go v0.0.20231211"), Some(20231211));
        assert_eq!(release_date("something else"), None);
        assert!(release_date("wireguard-go v0.0.20220316").unwrap() < OFFLOADS_SINCE);
    }

    #[test]
    fn each_version_has_its_own_cache_entry() {
        assert_eq!(WIREGUARD_GO.key(), "go-wireguard-go-v0.0.0-20260522210424-ecfc5a8d5446");
    }
}
