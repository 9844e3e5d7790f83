//! The client's RBAC, as a user's cluster admin would grant it: the roles
//! of `docs/deploy/rbac.yaml` (ClusterRoles, and a Role in `default`; whole,
//! or with permissions taken out for the tests that prove each one is
//! needed), bound to a ServiceAccount, and a kubeconfig with that account's
//! token.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{kubeconfig_text, write, ControlPlane, CLIENT_USER};

/// The client's ServiceAccount (in `default`).
const ACCOUNT: &str = "teletun-client";
/// The manifest users apply.
const ROLE_YAML: &str = include_str!("../../../docs/deploy/rbac.yaml");
/// Where the servers run, and so the Role's namespace.
const NAMESPACE: &str = "default";

/// One permission of the client's roles: a verb on a resource of a group,
/// cluster-wide or in the Role's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    /// get, list, watch.
    pub verb: String,
    /// The resource (plural).
    pub resource: String,
    /// Its API group ("" for core).
    pub group: String,
    /// The namespace of a Role's permission; `None` for a ClusterRole's.
    pub namespace: Option<String>,
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)
    }
}

/// The roles in `docs/deploy/rbac.yaml`, as JSON: named ClusterRoles, and
/// Roles in the servers' namespace.
fn roles() -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(ROLE_YAML).context("docs/deploy/rbac.yaml is not valid YAML")?;
    let roles: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    for role in &roles {
        let named = role["metadata"]["name"].as_str().is_some();
        let scoped = match role["kind"].as_str() {
            Some("ClusterRole") => role["metadata"]["namespace"].is_null(),
            Some("Role") => role["metadata"]["namespace"] == NAMESPACE,
            _ => false,
        };
        if !named || !scoped {
            bail!("docs/deploy/rbac.yaml must hold only named ClusterRoles and Roles in namespace {NAMESPACE}");
        }
    }
    if roles.is_empty() {
        bail!("docs/deploy/rbac.yaml holds no role");
    }
    Ok(roles)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The permissions one role grants, in its order.
fn permissions_of(role: &Value) -> Result<Vec<Permission>> {
    let namespace = role["metadata"]["namespace"].as_str().map(str::to_owned);
    let mut all = Vec::new();
    for rule in role["rules"].as_array().context("a role has no rules")? {
        // Rules this parser would misread are refused, not narrowed silently.
        let groups = strings(&rule["apiGroups"]);
        if groups.len() != 1 || !rule["resourceNames"].is_null() || !rule["nonResourceURLs"].is_null() {
            bail!("docs/deploy/rbac.yaml: each rule must name one API group and no resourceNames or nonResourceURLs (the testbench takes its permissions apart)");
        }
        let group = groups[0].clone();
        for resource in strings(&rule["resources"]) {
            for verb in strings(&rule["verbs"]) {
                all.push(Permission {
                    verb,
                    resource: resource.clone(),
                    group: group.clone(),
                    namespace: namespace.clone(),
                });
            }
        }
    }
    Ok(all)
}

/// Every permission the roles grant, in their order; each "VERB RESOURCE"
/// once, so that a step can name it.
pub fn permissions() -> Result<Vec<Permission>> {
    let mut all: Vec<Permission> = Vec::new();
    for role in roles()? {
        for p in permissions_of(&role)? {
            if all.iter().any(|q| q.to_string() == p.to_string()) {
                bail!("docs/deploy/rbac.yaml grants {p} twice");
            }
            all.push(p);
        }
    }
    Ok(all)
}

/// The permission named `text` ("VERB RESOURCE"), which a role must grant.
fn permission(text: &str) -> Result<Permission> {
    let all = permissions()?;
    all.iter()
        .find(|p| p.to_string() == text.trim())
        .cloned()
        .with_context(|| {
            let names: Vec<String> = all.iter().map(ToString::to_string).collect();
            format!(
                "docs/deploy/rbac.yaml grants no {text:?}; it grants: {}",
                names.join(", ")
            )
        })
}

/// The roles without the permissions in `without`: one rule per resource.
fn roles_without(without: &[Permission]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for mut role in roles()? {
        let mut rules: Vec<Value> = Vec::new();
        for p in permissions_of(&role)? {
            if without.contains(&p) {
                continue;
            }
            match rules
                .iter_mut()
                .find(|r| r["apiGroups"][0] == p.group.as_str() && r["resources"][0] == p.resource.as_str())
            {
                Some(rule) => rule["verbs"].as_array_mut().expect("built here").push(json!(p.verb)),
                None => rules.push(json!({"apiGroups": [p.group], "resources": [p.resource], "verbs": [p.verb]})),
            }
        }
        role["rules"] = json!(rules);
        out.push(role);
    }
    Ok(out)
}

impl ControlPlane {
    /// Makes the client's ServiceAccount, gives it the role of
    /// `docs/deploy/rbac.yaml` and writes a kubeconfig with its token to `path`.
    pub fn client_kubeconfig(&self, path: &Path) -> Result<()> {
        self.post(
            "/api/v1/namespaces/default/serviceaccounts",
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ACCOUNT}}),
        )?;
        self.set_client_role(&[])?;
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 86400}});
        let answer = self.post(
            &format!("/api/v1/namespaces/default/serviceaccounts/{ACCOUNT}/token"),
            &request,
        )?;
        let token = answer["status"]["token"]
            .as_str()
            .context("TokenRequest without a token")?;
        write(
            path,
            kubeconfig_text(&self.url(), &self.ca_pem, ACCOUNT, token).as_bytes(),
        )
    }

    /// Binds the client's account to the roles of `docs/deploy/rbac.yaml`
    /// less the permissions named in `without` ("VERB RESOURCE"), and waits
    /// until the API's authorizer answers accordingly for every permission.
    pub fn set_client_role(&self, without: &[String]) -> Result<()> {
        let without: Vec<Permission> = without.iter().map(|t| permission(t)).collect::<Result<_>>()?;
        let subjects = json!([{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}]);
        for role in roles_without(&without)? {
            let name = role["metadata"]["name"]
                .as_str()
                .expect("checked in roles()")
                .to_owned();
            let kind = role["kind"].as_str().expect("checked in roles()").to_owned();
            let (roles, bindings) = match role["metadata"]["namespace"].as_str() {
                None => (
                    "/apis/rbac.authorization.k8s.io/v1/clusterroles".to_owned(),
                    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings".to_owned(),
                ),
                Some(ns) => (
                    format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
                    format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
                ),
            };
            self.apply_json(&format!("{roles}/{name}"), serde_json::to_vec(&role)?)?;
            let mut binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": format!("{kind}Binding"),
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
                "subjects": subjects});
            if let Some(ns) = role["metadata"]["namespace"].as_str() {
                binding["metadata"]["namespace"] = json!(ns);
            }
            self.apply_json(&format!("{bindings}/{name}"), binding.to_string().into_bytes())?;
        }
        // The authorizer learns of RBAC changes from its own watch: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        'again: loop {
            for p in permissions()? {
                let want = !without.contains(&p);
                if self.allowed(&p)? != want {
                    if Instant::now() > deadline {
                        bail!(
                            "the API still says {CLIENT_USER} may{} {p} after 10 s",
                            if want { " not" } else { "" }
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue 'again;
                }
            }
            return Ok(());
        }
    }

    /// Whether the API lets the client's account do `p` (a SubjectAccessReview).
    fn allowed(&self, p: &Permission) -> Result<bool> {
        let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": CLIENT_USER,
                     "groups": ["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"],
                     "resourceAttributes": {"verb": p.verb, "group": p.group, "resource": p.resource,
                                            "namespace": p.namespace.as_deref().unwrap_or("")}}});
        let answer = self.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", &review)?;
        Ok(answer["status"]["allowed"].as_bool().unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_role_parses_and_loses_exactly_what_is_taken_out() {
        let all = permissions().unwrap();
        assert!(all.iter().any(|p| p.to_string() == "watch pods" && p.group.is_empty()));
        assert!(all
            .iter()
            .any(|p| p.to_string() == "list servicecidrs" && p.group == "networking.k8s.io"));
        let get = permission("get pods").unwrap();
        assert_eq!(
            get.namespace.as_deref(),
            Some(NAMESPACE),
            "the servers' pod, in their namespace only"
        );
        let without = [permission("watch pods").unwrap()];
        let granted: usize = roles_without(&without)
            .unwrap()
            .iter()
            .flat_map(|role| role["rules"].as_array().unwrap().iter())
            .map(|r| r["verbs"].as_array().unwrap().len())
            .sum();
        assert_eq!(granted, all.len() - 1);
        assert!(permission("delete pods").unwrap_err().to_string().contains("grants no"));
    }

    /// Every permission the shipped role grants is taken out alone in one
    /// step of scenarios/kube-rbac.toml, so each is proven needed (or its
    /// absence handled); a rule added to rbac.yaml fails this until it is.
    #[test]
    fn the_rbac_scenario_takes_out_each_permission_in_turn() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/kube-rbac.toml");
        let scenario: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let taken_out: Vec<String> = scenario["step"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["do"].as_str() == Some("client-role"))
            .filter_map(|s| s.get("without")?.as_array().cloned())
            .filter(|w| w.len() == 1)
            .map(|w| w[0].as_str().unwrap().to_owned())
            .collect();
        for p in permissions().unwrap() {
            assert!(taken_out.contains(&p.to_string()), "kube-rbac.toml never takes out {p}");
        }
    }
}
