//! Runs every shipped scenario on the netns backend through the real testbench
//! and teletun binaries. Needs root: network and mount namespaces.

use std::path::Path;
use std::process::Command;

fn run_scenario(file: &str) {
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
}

#[test]
fn connectivity() {
    run_scenario("connectivity.toml");
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
fn resolved_routes_only_cluster_names_to_the_cluster() {
    run_scenario("dns-routing.toml");
}

#[test]
fn server_failures_end_the_session_cleanly() {
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
