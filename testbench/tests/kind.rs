//! The kind backend: its plan (commands and manifests) for each kind config is
//! snapshot-tested, and without Docker and kind it stops at once, clearly.

use std::process::Command;

fn testbench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_testbench"))
        .args(args)
        .output()
        .expect("run testbench")
}

#[test]
fn plans_for_every_kind_config() {
    for config in ["single-node", "two-nodes", "dual-stack"] {
        let out = testbench(&["kind-plan", "--config", config]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        insta::assert_snapshot!(format!("kind-plan-{config}"), String::from_utf8_lossy(&out.stdout));
    }
    let out = testbench(&["kind-plan", "--config", "huge"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kind config"));
}

#[test]
fn without_docker_and_kind_it_stops_at_once() {
    let engine = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    let kind = Command::new("kind")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if engine && kind {
        eprintln!("docker and kind are present here: the fail-fast path is not exercised on this machine");
        return;
    }
    let out = testbench(&["scenario", "--backend", "kind"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("the kind backend needs a running Docker engine and kind"),
        "{err}"
    );
}

/// The manifests in docs/deploy/ are Kubernetes objects of the right shape:
/// they parse into the k8s-openapi types, and carry what the servers need.
#[test]
fn deploy_manifests_are_kubernetes_objects() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy");
    let text = std::fs::read_to_string(root.join("teletun-servers.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("valid YAML");
    let docs: Vec<serde_json::Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let pods: Vec<Pod> = docs
        .iter()
        .filter(|d| d["kind"] == "Pod")
        .map(|d| serde_json::from_value(d.clone()).expect("a Pod"))
        .collect();
    // Nothing reaches the laptop at the pod's address until the user says so.
    let policies: Vec<NetworkPolicy> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .map(|d| serde_json::from_value(d.clone()).expect("a NetworkPolicy"))
        .collect();
    assert_eq!(policies.len(), 1);
    let policy = policies[0].spec.as_ref().unwrap();
    assert_eq!(
        policy.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["app.kubernetes.io/name"],
        "teletun-cluster"
    );
    assert_eq!(policy.policy_types.as_deref(), Some(&["Ingress".to_owned()][..]));
    assert!(policy.ingress.as_ref().is_none_or(Vec::is_empty), "default deny");
    assert_eq!(docs.len(), pods.len() + policies.len(), "only pods and the policy");
    let names: Vec<&str> = pods.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
    assert_eq!(names, ["teletun-external", "teletun-cluster"]);
    let external = pods[0].spec.as_ref().unwrap();
    assert_eq!(
        external.host_network,
        Some(true),
        "server-external must be reachable at its node's address"
    );
    let cluster = pods[1].spec.as_ref().unwrap();
    // Not privileged: NET_ADMIN alone (the testbench runs server-cluster so).
    let security = cluster.containers[0].security_context.as_ref().unwrap();
    assert_eq!(security.privileged, None, "server-cluster is not privileged");
    let capabilities = security.capabilities.as_ref().unwrap();
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(capabilities.add.as_deref(), Some(&["NET_ADMIN".to_owned()][..]));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert!(
        !text.contains("privileged: true"),
        "no container of the servers is privileged"
    );
    let affinity = cluster
        .affinity
        .as_ref()
        .and_then(|a| a.pod_affinity.as_ref())
        .expect("co-located with server-external");
    assert_eq!(
        affinity
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0]
            .topology_key,
        "kubernetes.io/hostname"
    );
    for spec in [external, cluster] {
        let socket = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "socket")
            .expect("the shared socket");
        // A directory of this pair's own, not one every session shares.
        assert_eq!(socket.host_path.as_ref().unwrap().path, "/var/run/teletun/TELETUN_PAIR");
        let args = &spec.containers[0].args.as_ref().unwrap();
        assert!(
            args.iter().any(|a| a == "--link-key=/keys/link.key"),
            "each server proves the pair's link key: {args:?}"
        );
    }
    // server-cluster sees the link key and no other.
    let keys = cluster
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "link-key")
        .and_then(|v| v.secret.as_ref())
        .expect("the link key's volume");
    let items: Vec<&str> = keys.items.iter().flatten().map(|i| i.key.as_str()).collect();
    assert_eq!(items, ["link.key"]);
    assert_eq!(keys.default_mode, Some(0o400));
    // The client's roles: ClusterRoles, and a Role for the servers' pod.
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(root.join("rbac.yaml")).unwrap()).expect("valid YAML");
    let mut verbs = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let rules = match doc["kind"].as_str() {
            Some("ClusterRole") => serde_json::from_value::<ClusterRole>(doc).expect("a ClusterRole").rules,
            Some("Role") => serde_json::from_value::<Role>(doc).expect("a Role").rules,
            other => panic!("rbac.yaml holds a {other:?}"),
        };
        verbs.extend(rules.unwrap().into_iter().flat_map(|r| r.verbs));
    }
    assert!(verbs.iter().any(|v| *v == "watch"), "the client watches");
}
