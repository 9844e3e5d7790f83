//! The kind backend: a real Kubernetes cluster in Docker (kind), with the two
//! server pods deployed from `docs/deploy/`. It needs a running Docker engine
//! and `kind`; where either is missing it stops at once with a clear message
//! (this machine has neither). What it runs is [`plan`], printed by
//! `testbench kind-plan` and snapshot-tested.
//!
//! Scope today: create the cluster, build and load the image, deploy the
//! servers, and check that both came up (server-cluster took over its pod,
//! server-external linked to it); then delete the cluster. Client-side checks
//! need a laptop namespace routed to the kind network, which is not built yet:
//! the netns backend runs every scenario.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::exec;

/// The kind cluster configurations, in `kind-configs/`.
pub const CONFIGS: &[&str] = &["single-node", "two-nodes", "dual-stack"];
/// The image the plan builds and loads into the cluster.
pub const IMAGE: &str = "teletun:testbench";
/// The port server-external listens on, on its node.
pub const PORT: u16 = 8443;

/// One command of the plan.
#[derive(Debug, Clone)]
pub struct PlanStep {
    /// What it does.
    pub what: &'static str,
    /// The command line.
    pub argv: Vec<String>,
    /// Whether the executor runs it (the client's is shown, not run).
    pub run: bool,
}

/// Everything the backend would do for one configuration.
#[derive(Debug)]
pub struct Plan {
    /// The kind config's name.
    pub config: String,
    /// The kind cluster's name.
    pub cluster: String,
    /// Where keys, the kubeconfig and rendered manifests go (relative to the workspace).
    pub dir: PathBuf,
    /// The steps in order; the last deletes the cluster.
    pub steps: Vec<PlanStep>,
    /// The server manifests with image and port filled in.
    pub manifests: String,
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The plan for `config` (a name from [`CONFIGS`]), with paths relative to the
/// workspace root `root`.
pub fn plan(root: &Path, config: &str) -> Result<Plan> {
    if !CONFIGS.contains(&config) {
        bail!("unknown kind config {config:?}: use one of {}", CONFIGS.join(", "));
    }
    let config_file = format!("kind-configs/{config}.yaml");
    if !root.join(&config_file).is_file() {
        bail!("{} is missing", root.join(&config_file).display());
    }
    let template = std::fs::read_to_string(root.join("docs/deploy/teletun-servers.yaml"))
        .context("cannot read docs/deploy/teletun-servers.yaml")?;
    let cluster = format!("teletun-{config}");
    let manifests = template
        .replace("TELETUN_IMAGE", IMAGE)
        .replace("TELETUN_PORT", &PORT.to_string())
        .replace("TELETUN_PAIR", &cluster);
    let dir = PathBuf::from(format!("target/testbench/kind/{config}"));
    let d = dir.display().to_string();
    let kubeconfig = format!("{d}/kubeconfig");
    let teletun = "target/release/teletun";
    let kubectl = |rest: &[&str]| {
        let mut v = argv(&["kubectl", "--kubeconfig", &kubeconfig]);
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let step = |what, argv, run| PlanStep { what, argv, run };
    let steps = vec![
        step(
            "create the cluster",
            argv(&[
                "kind",
                "create",
                "cluster",
                "--name",
                &cluster,
                "--config",
                &config_file,
                "--kubeconfig",
                &kubeconfig,
                "--wait",
                "180s",
            ]),
            true,
        ),
        step(
            "build teletun",
            argv(&["cargo", "build", "--release", "-p", "teletun"]),
            true,
        ),
        step(
            "build the image",
            argv(&["docker", "build", "-t", IMAGE, "-f", "docs/deploy/Dockerfile", "."]),
            true,
        ),
        step(
            "load the image into the nodes",
            argv(&["kind", "load", "docker-image", IMAGE, "--name", &cluster]),
            true,
        ),
        step(
            "make the server keys",
            argv(&[teletun, "keygen", "--out", &format!("{d}/server")]),
            true,
        ),
        step(
            "make the client keys",
            argv(&[teletun, "keygen", "--out", &format!("{d}/client")]),
            true,
        ),
        step(
            "make the servers' link key",
            argv(&[teletun, "keygen", "--link", "--out", &format!("{d}/link")]),
            true,
        ),
        step(
            "store the keys the servers need",
            kubectl(&[
                "create",
                "secret",
                "generic",
                "teletun-keys",
                &format!("--from-file=server.key={d}/server.key"),
                &format!("--from-file=server.pub={d}/server.pub"),
                &format!("--from-file=client.pub={d}/client.pub"),
                &format!("--from-file=link.key={d}/link.key"),
            ]),
            true,
        ),
        step(
            "grant what the client reads",
            kubectl(&["apply", "-f", "docs/deploy/rbac.yaml"]),
            true,
        ),
        step(
            "deploy the servers",
            kubectl(&["apply", "-f", &format!("{d}/teletun-servers.yaml")]),
            true,
        ),
        step(
            "wait for both pods",
            kubectl(&[
                "wait",
                "--for=condition=Ready",
                "pod/teletun-external",
                "pod/teletun-cluster",
                "--timeout=180s",
            ]),
            true,
        ),
        step(
            "server-cluster took over its pod",
            kubectl(&["logs", "pod/teletun-cluster"]),
            true,
        ),
        step(
            "server-external linked to it",
            kubectl(&["logs", "pod/teletun-external"]),
            true,
        ),
        step(
            "connect a client (the seed's usage line; not run: needs a laptop namespace on the kind network)",
            argv(&[
                teletun,
                "client",
                &format!("-kubeconfig={kubeconfig}"),
                "-pod=teletun-external",
                &format!("-port={PORT}"),
                &format!("-server-pubkey={d}/server.pub"),
                &format!("-client-pubkey={d}/client.pub"),
                &format!("-client-privkey={d}/client.key"),
            ]),
            false,
        ),
        step(
            "delete the cluster",
            argv(&["kind", "delete", "cluster", "--name", &cluster]),
            true,
        ),
    ];
    Ok(Plan {
        config: config.into(),
        cluster,
        dir,
        steps,
        manifests,
    })
}

impl Plan {
    /// The plan as text: numbered commands, then the manifests.
    pub fn render(&self) -> String {
        let mut s = format!("# kind backend plan: {} (cluster {})\n", self.config, self.cluster);
        for (i, st) in self.steps.iter().enumerate() {
            s.push_str(&format!("{:>2}. {}\n    {}\n", i + 1, st.what, st.argv.join(" ")));
        }
        s.push_str(&format!(
            "\n# {}/teletun-servers.yaml\n{}",
            self.dir.display(),
            self.manifests
        ));
        s
    }
}

/// Fails unless a Docker engine answers and kind is installed.
pub fn check_tools() -> Result<()> {
    let docker = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    let engine = match &docker {
        Err(_) => Some("docker is not installed".to_owned()),
        Ok(o) if !o.status.success() => Some(format!(
            "no Docker engine answers (docker info: {})",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("failed")
                .trim()
        )),
        Ok(_) => None,
    };
    let kind = match Command::new("kind").arg("version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("kind is not installed".to_owned()),
    };
    let missing: Vec<String> = engine.into_iter().chain(kind).collect();
    if !missing.is_empty() {
        bail!(
            "the kind backend needs a running Docker engine and kind: {}; use the netns backend (the default) here",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Runs the plan from the workspace root, always deleting the cluster at the end.
pub fn execute(root: &Path, plan: &Plan) -> Result<()> {
    check_tools()?;
    let dir = root.join(&plan.dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("teletun-servers.yaml"), &plan.manifests)?;
    let (last, body) = plan.steps.split_last().context("empty plan")?;
    let result = (|| -> Result<()> {
        for st in body.iter().filter(|s| s.run) {
            eprintln!("testbench: kind {}: {}", plan.config, st.what);
            let mut cmd = Command::new(&st.argv[0]);
            cmd.args(&st.argv[1..]).current_dir(root);
            let out = exec::run(cmd, Duration::from_secs(900)).with_context(|| st.what.to_owned())?;
            let needs = match st.what {
                "server-cluster took over its pod" => Some("took over"),
                "server-external linked to it" => Some("server-cluster connected"),
                _ => None,
            };
            if let Some(text) = needs {
                if !out.contains(text) {
                    bail!("{}: the log lacks {text:?}: {}", st.what, exec::last_lines(&out, 5));
                }
            }
        }
        Ok(())
    })();
    let mut delete = Command::new(&last.argv[0]);
    delete.args(&last.argv[1..]).current_dir(root);
    let deleted = exec::run_to_completion(delete, Duration::from_secs(300));
    result.and(deleted.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_deploys_what_docs_deploy_holds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for config in CONFIGS {
            let p = plan(&root, config).unwrap();
            assert!(p.manifests.contains(IMAGE) && !p.manifests.contains("TELETUN_"));
            assert_eq!(p.steps.last().unwrap().argv[..3], ["kind", "delete", "cluster"]);
        }
        assert!(plan(&root, "huge").is_err());
    }
}
