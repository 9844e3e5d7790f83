//! What Pod Security admission says of `docs/deploy/`'s server pods: each
//! pod is created with a server-side dry run (`dryRun=All`: admitted or
//! refused, never stored) in namespaces enforcing each level, from the
//! strictest, on the real kube-apiserver (its PodSecurity admission plugin is
//! on by default); the manifest's NetworkPolicy must pass a dry run too.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{message_of, ControlPlane};

/// Pod Security's levels, strictest first.
pub const LEVELS: [&str; 3] = ["restricted", "baseline", "privileged"];

/// The manifest users apply, its placeholders to be filled.
const SERVERS_YAML: &str = include_str!("../../../docs/deploy/teletun-servers.yaml");

/// One pod's verdict.
#[derive(Debug)]
pub struct Verdict {
    /// The pod's name in the manifest.
    pub pod: String,
    /// The strictest level that admits it.
    pub lowest: &'static str,
    /// What each stricter level refused, by kind of check ("host
    /// namespaces", "hostPath volumes", …), as the admission says them.
    pub refused: Vec<(&'static str, Vec<String>)>,
}

/// The kinds of check a refusal names: `violates PodSecurity
/// "baseline:latest": host namespaces (hostNetwork=true), hostPath volumes
/// (volume "socket")` names "host namespaces" and "hostPath volumes".
pub fn refused_checks(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once("\": ") else {
        return Vec::new();
    };
    let mut checks = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in list.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                checks.push(std::mem::take(&mut current).trim().to_owned());
                continue;
            }
            _ if depth == 0 => current.push(c),
            _ => {}
        }
    }
    checks.push(current.trim().to_owned());
    checks.retain(|c| !c.is_empty());
    checks
}

/// The manifest's objects, placeholders filled, as JSON.
fn server_objects() -> Result<Vec<Value>> {
    let text = SERVERS_YAML
        .replace("TELETUN_IMAGE", "teletun:testbench")
        .replace("TELETUN_PORT", "8443")
        .replace("TELETUN_PAIR", "pod-security");
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).context("docs/deploy/teletun-servers.yaml is not valid YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The manifest's pods.
fn server_pods() -> Result<Vec<Value>> {
    let pods: Vec<Value> = server_objects()?.into_iter().filter(|d| d["kind"] == "Pod").collect();
    if pods.is_empty() {
        bail!("docs/deploy/teletun-servers.yaml holds no Pod");
    }
    Ok(pods)
}

impl ControlPlane {
    /// Makes a namespace enforcing `level` (with the `default`
    /// ServiceAccount pods need), once.
    fn pod_security_namespace(&self, level: &str) -> Result<String> {
        let ns = format!("pod-security-{level}");
        if self.get(&format!("/api/v1/namespaces/{ns}"))?.status != 200 {
            self.post(
                "/api/v1/namespaces",
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {
                    "pod-security.kubernetes.io/enforce": level,
                    "pod-security.kubernetes.io/enforce-version": "latest"}}}),
            )?;
            self.post(
                &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
                &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
            )?;
        }
        Ok(ns)
    }

    /// Creates `object` at `path` in a server-side dry run: admitted (201)
    /// or refused, never stored.
    fn dry_run(&self, path: &str, object: &Value) -> Result<super::admin::Reply> {
        self.request(
            super::Target::Api,
            "POST",
            &format!("{path}?dryRun=All"),
            "application/json",
            object.to_string().into_bytes(),
        )
    }

    /// Each server pod's verdict: the strictest level whose namespace admits
    /// it in a dry run, and what the stricter ones refused. The manifest's
    /// NetworkPolicy must pass a dry run too.
    pub fn pod_security(&self) -> Result<Vec<Verdict>> {
        for policy in server_objects()?.into_iter().filter(|d| d["kind"] == "NetworkPolicy") {
            let ns = self.pod_security_namespace("privileged")?;
            let reply = self.dry_run(
                &format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"),
                &policy,
            )?;
            if reply.status != 201 {
                bail!(
                    "the API refused the manifest's NetworkPolicy ({}): {}",
                    reply.status,
                    message_of(&reply)
                );
            }
        }
        let mut verdicts = Vec::new();
        for mut pod in server_pods()? {
            let name = pod["metadata"]["name"]
                .as_str()
                .context("a pod without a name")?
                .to_owned();
            let mut refused = Vec::new();
            let mut lowest = None;
            for level in LEVELS {
                let ns = self.pod_security_namespace(level)?;
                pod["metadata"]["namespace"] = json!(ns);
                let reply = self.dry_run(&format!("/api/v1/namespaces/{ns}/pods"), &pod)?;
                match reply.status {
                    201 => {
                        lowest = Some(level);
                        break;
                    }
                    403 => refused.push((level, refused_checks(&message_of(&reply)))),
                    other => bail!(
                        "the API answered a dry run of pod {name} in {ns} with {other}: {}",
                        message_of(&reply)
                    ),
                }
            }
            let lowest = lowest.with_context(|| format!("no Pod Security level admits pod {name}: {refused:?}"))?;
            verdicts.push(Verdict {
                pod: name,
                lowest,
                refused,
            });
        }
        Ok(verdicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_its_checks() {
        let m = r#"pods "teletun-external" is forbidden: violates PodSecurity "baseline:latest": host namespaces (hostNetwork=true), hostPath volumes (volumes "socket", "tun")"#;
        assert_eq!(refused_checks(m), ["host namespaces", "hostPath volumes"]);
        assert!(refused_checks("something else").is_empty());
    }

    #[test]
    fn the_manifest_holds_both_server_pods() {
        let names: Vec<String> = server_pods()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["teletun-external", "teletun-cluster"]);
    }
}
