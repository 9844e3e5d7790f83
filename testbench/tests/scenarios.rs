//! Runs every shipped scenario on the netns backend through the real testbench
//! and teletun binaries. Needs root: network and mount namespaces.

use std::path::Path;
use std::process::Command;

/// Runs a scenario file and returns its results directory.
fn run_scenario(file: &str) -> std::path::PathBuf {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "scenario tests build network namespaces and need root: run `cargo test` as root"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let name = file.trim_end_matches(".toml");
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), Into::into)
        .join("testbench")
        .join(format!("test-{name}"));
    let out = Command::new(env!("CARGO_BIN_EXE_testbench"))
        .arg("scenario")
        .arg(root.join("scenarios").join(file))
        .arg("--output")
        .arg(&out_dir)
        .output()
        .expect("run testbench");
    assert!(
        out.status.success(),
        "scenario {file} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out_dir
}

/// The laptop's normalized state before, during and after a client, for every
/// DNS manager, against the snapshots in tests/snapshots/.
#[test]
fn laptop_state_snapshots() {
    let dir = run_scenario("state.toml");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).expect("results.json")).expect("JSON");
    let mut taken = 0;
    for case in results.as_array().expect("a list of cases") {
        let case_name = case["name"].as_str().expect("case name");
        let variant = case_name.trim_start_matches("state[resolvconf=").trim_end_matches(']');
        for check in case["checks"].as_array().expect("checks") {
            if let Some([name, text]) = check["snapshot"].as_array().map(Vec::as_slice) {
                let name = format!("{variant}-{}", name.as_str().expect("name"));
                insta::assert_snapshot!(name, text.as_str().expect("text"));
                taken += 1;
            }
        }
    }
    assert_eq!(taken, 9, "three snapshots for each of three DNS managers");
}

#[test]
fn kube_discovery_with_the_seed_usage_line() {
    run_scenario("kube-discovery.toml");
}

#[test]
fn kube_watch_routes_changes_live() {
    run_scenario("kube-watch.toml");
}

#[test]
fn two_clusters_at_once() {
    run_scenario("two-clusters.toml");
}

#[test]
fn multi_node_cluster() {
    run_scenario("multi-node.toml");
}

#[test]
fn kube_errors_are_one_clear_line() {
    run_scenario("kube-errors.toml");
}

#[test]
fn kube_rbac_each_permission_is_needed_and_named() {
    run_scenario("kube-rbac.toml");
}

#[test]
fn connectivity() {
    run_scenario("connectivity.toml");
}

#[test]
fn server_cluster_needs_no_privilege_but_net_admin() {
    run_scenario("least-privilege.toml");
}

#[test]
fn pods_and_services_come_and_go() {
    run_scenario("cluster-changes.toml");
}

#[test]
fn wrong_keys_are_refused_on_each_side() {
    run_scenario("wrong-keys.toml");
}

#[test]
fn a_second_client_is_refused_while_the_first_keeps_working() {
    run_scenario("one-client.toml");
}

#[test]
fn server_restarts() {
    run_scenario("server-restarts.toml");
}

#[test]
fn split_dns_beside_a_lan_resolver_under_every_dns_manager() {
    run_scenario("dns.toml");
}

#[test]
fn the_forwarder_follows_the_laptops_nameservers() {
    run_scenario("dns-follows.toml");
}

#[test]
fn resolved_routes_only_cluster_names_to_the_cluster() {
    run_scenario("dns-routing.toml");
}

#[test]
fn server_failures_end_a_session_that_gives_up_cleanly() {
    run_scenario("server-failures.toml");
}

#[test]
fn impaired_underlay_keeps_data_intact() {
    run_scenario("impairment.toml");
}

#[test]
fn crash_matrix_leaves_the_laptop_as_it_was() {
    run_scenario("crash.toml");
}

#[test]
fn cleanup_undoes_only_dead_clients() {
    run_scenario("cleanup.toml");
}

#[test]
fn hostile_networks_and_peers_are_refused_and_counted() {
    run_scenario("hostile.toml");
}

#[test]
fn sessions_survive_address_changes_nat_rebinding_and_uplink_switches() {
    run_scenario("roaming.toml");
}

#[test]
fn sessions_survive_sleep_and_server_restarts() {
    run_scenario("sleep-and-restarts.toml");
}

#[test]
fn a_sprayer_behind_the_laptops_nat_keeps_no_client_out() {
    run_scenario("sprayer.toml");
}

#[test]
fn an_mtu_black_hole_is_found_and_bulk_transfers_complete() {
    run_scenario("mtu-black-hole.toml");
}

#[test]
fn beside_a_corporate_vpn_s_routed_range_the_pod_address_is_taken_on() {
    run_scenario("corporate-vpn.toml");
}

#[test]
fn the_cluster_does_not_own_the_laptops_dns() {
    run_scenario("dns-authority.toml");
}

#[test]
fn every_scenario_file_has_a_test() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let this = std::fs::read_to_string(file!()).unwrap_or_else(|_| {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios.rs")).unwrap()
    });
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".toml") {
            assert!(
                this.contains(&format!("\"{name}\"")),
                "scenarios/{name} is not run by a test here"
            );
        }
    }
}
