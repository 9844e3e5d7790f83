//! kube-apiserver and etcd, built once from their published Go modules at the
//! versions `testbench/controlplane/go.mod` pins, into the testbench cache.
//! Go is a test-time tool only; the product stays pure Rust.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cache::{cache_dir, cached};
use crate::exec;
use crate::peers::go_command;

/// The pinned Kubernetes release (`k8s.io/kubernetes` in go.mod).
pub const KUBERNETES: &str = "v1.34.4";
/// The pinned etcd release: the one that Kubernetes release requires.
pub const ETCD: &str = "v3.6.4";

/// The module that pins both (build configuration, no Go code).
fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane")
}

/// The built binaries.
pub struct Binaries {
    /// kube-apiserver.
    pub apiserver: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
}

/// The cache entry's name: the versions, and a digest of go.mod and go.sum so
/// that any change to the pins builds anew.
fn key(go_mod: &[u8], go_sum: &[u8]) -> Result<String> {
    let mut h = openssl::sha::Sha256::new();
    h.update(go_mod);
    h.update(go_sum);
    let digest: String = h.finish()[..6].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("controlplane-kubernetes-{KUBERNETES}-etcd-{ETCD}-{digest}"))
}

/// The linker flags that give the binary its release in `--version` and
/// `/version` (a module build does not know it otherwise: "v0.0.0-master").
fn version_flags() -> String {
    let (major, minor) = KUBERNETES
        .trim_start_matches('v')
        .split_once('.')
        .map(|(a, rest)| (a, rest.split('.').next().unwrap_or_default()))
        .unwrap_or_default();
    ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"]
        .iter()
        .map(|pkg| {
            format!("-X {pkg}.gitVersion={KUBERNETES} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// kube-apiserver and etcd, built with `go build` the first time (a progress
/// line says so, and how long it took; later runs take them from the cache).
pub fn binaries() -> Result<Binaries> {
    let dir = module_dir();
    let read =
        |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("cannot read {}/{name}", dir.display()));
    let key = key(&read("go.mod")?, &read("go.sum")?)?;
    let tree = cached(&key, |tree| {
        let go = go_command().context(
            "Go is not installed: the real-api backend builds kube-apiserver and etcd from their modules (install Go 1.24 or newer)",
        )?;
        eprintln!(
            "testbench: building kube-apiserver {KUBERNETES} and etcd {ETCD} from their Go modules (once, about 5 min on 2 cores; cached in {})",
            tree.display()
        );
        let started = Instant::now();
        std::fs::create_dir_all(tree)?;
        let go_cache = cache_dir().join("go");
        for (package, binary, ldflags) in [
            ("go.etcd.io/etcd/server/v3", "etcd", String::new()),
            (
                "k8s.io/kubernetes/cmd/kube-apiserver",
                "kube-apiserver",
                version_flags(),
            ),
        ] {
            let mut c = Command::new(&go);
            c.current_dir(&dir)
                .args(["build", "-o"])
                .arg(tree.join(binary))
                .args(["-ldflags", &ldflags, package])
                .env("GOMODCACHE", go_cache.join("mod"))
                .env("GOCACHE", go_cache.join("build-cache"))
                .env("GOFLAGS", "-mod=readonly -trimpath -buildvcs=false")
                .env("GOTOOLCHAIN", "local")
                .env("CGO_ENABLED", "0");
            exec::run(c, Duration::from_secs(3600)).with_context(|| format!("go build {package} failed"))?;
        }
        eprintln!(
            "testbench: built kube-apiserver and etcd in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })?;
    let binaries = Binaries {
        apiserver: tree.join("kube-apiserver"),
        etcd: tree.join("etcd"),
    };
    for b in [&binaries.apiserver, &binaries.etcd] {
        if !b.is_file() {
            bail!(
                "go build left no {} (remove {} to build again)",
                b.display(),
                tree.display()
            );
        }
    }
    Ok(binaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_release_reaches_the_linker_and_the_pins_the_cache_key() {
        let flags = version_flags();
        assert!(flags.contains("k8s.io/component-base/version.gitVersion=v1.34.4"));
        assert!(flags.contains("gitMajor=1 ") && flags.contains("gitMinor=34 "));
        assert_ne!(key(b"a", b"b").unwrap(), key(b"a", b"c").unwrap());
        assert!(key(b"", b"")
            .unwrap()
            .starts_with("controlplane-kubernetes-v1.34.4-etcd-v3.6.4-"));
    }

    #[test]
    fn go_mod_pins_the_versions_named_here() {
        let go_mod = std::fs::read_to_string(module_dir().join("go.mod")).unwrap();
        assert!(go_mod.contains(&format!("k8s.io/kubernetes {KUBERNETES}")));
        assert!(go_mod.contains(&format!("go.etcd.io/etcd/server/v3 {ETCD}")));
        let minor = KUBERNETES.trim_start_matches("v1.");
        assert!(go_mod.contains(&format!("k8s.io/api => k8s.io/api v0.{minor}")));
    }
}
