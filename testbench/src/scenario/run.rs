//! Running one case: build its clusters, run its steps in order, report each,
//! tear everything down (also on failure or Ctrl-C).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::case::Case;
use super::load::Scenario;
use super::steps;
use crate::cluster::Cluster;
use crate::exec;
use crate::report::{CaseResult, CheckResult, Outcome};
use crate::topology::Topology;

/// The name of the first check of every case, timed like the others.
pub const BUILD_CHECK: &str = "build cluster";

/// Builds a fresh cluster, runs the scenario's steps, tears everything down.
pub fn run(scenario: &Scenario, teletun: &Path, work: &Path, progress: &mut dyn FnMut(&CheckResult)) -> CaseResult {
    let started = Instant::now();
    let mut checks = Vec::new();
    let mut report = |c: CheckResult, checks: &mut Vec<CheckResult>| {
        progress(&c);
        checks.push(c);
    };
    let t = Instant::now();
    let clusters = match build_clusters(teletun, work, &scenario.topology) {
        Ok(c) => c,
        Err(e) => {
            report(
                CheckResult::new(BUILD_CHECK, t.elapsed(), Outcome::Fail(format!("{e:#}"))),
                &mut checks,
            );
            return CaseResult::new(&scenario.name, checks, started.elapsed(), None);
        }
    };
    let mut built = CheckResult::new(BUILD_CHECK, t.elapsed(), Outcome::Pass);
    // Which API server the case talks to, as it says itself (`/version`).
    let versions: Vec<String> = clusters
        .iter()
        .filter_map(|c| c.api_version().map(|v| format!("kube-apiserver {v}")))
        .collect();
    built.detail = (!versions.is_empty()).then(|| versions.join(", "));
    report(built, &mut checks);
    let logs: Vec<PathBuf> = clusters.iter().map(|c| c.dir.clone()).collect();
    let laptop_before = clusters[0].laptop.snapshot().unwrap_or_default();
    let mut case = Case {
        clusters,
        clients: BTreeMap::new(),
        client_logs: BTreeMap::new(),
        laptop_before,
        impairments: &scenario.impairments,
        detail: None,
        snapshot: None,
        flood: None,
        throughputs: BTreeMap::new(),
        roaming: Default::default(),
    };
    let mut aborted = false;
    for step in &scenario.steps {
        let label = step.label();
        if aborted || exec::INTERRUPTED.load(Ordering::Relaxed) {
            report(CheckResult::new(&label, Duration::ZERO, Outcome::Skip), &mut checks);
            continue;
        }
        let t = Instant::now();
        let outcome = match (steps::perform(&mut case, step), step.expects_failure()) {
            (Ok(()), false) => Outcome::Pass,
            (Err(e), true) => {
                let first = format!("{e:#}").lines().next().unwrap_or("").to_owned();
                case.detail = Some(format!("failed as expected: {first}"));
                Outcome::Pass
            }
            (Ok(()), true) => Outcome::Fail("it worked, but should have failed".into()),
            (Err(e), false) => {
                aborted = step.is_setup();
                Outcome::Fail(format!("{e:#}"))
            }
        };
        let mut c = CheckResult::new(&label, t.elapsed(), outcome);
        c.detail = case.detail.take();
        c.snapshot = case.snapshot.take();
        report(c, &mut checks);
    }
    // A flood left running by a failed case stops first.
    case.flood = None;
    // Stop clients before the servers so their cleanup runs normally.
    for (_, mut c) in std::mem::take(&mut case.clients) {
        c.signal(libc::SIGTERM);
        let _ = c.wait(Duration::from_secs(10));
    }
    let failed = checks.iter().any(|c| matches!(c.outcome, Outcome::Fail(_)));
    teardown(std::mem::take(&mut case.clusters));
    // TESTBENCH_KEEP_LOGS keeps the logs of passing cases too.
    let keep = (failed || std::env::var_os("TESTBENCH_KEEP_LOGS").is_some()).then(|| logs[0].clone());
    if keep.is_none() {
        for dir in &logs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    CaseResult::new(&scenario.name, checks, started.elapsed(), keep)
}

/// Tears clusters down, the first (which made the laptop) last.
fn teardown(mut clusters: Vec<Cluster>) {
    clusters.sort_by_key(|c| std::cmp::Reverse(c.plan.index));
    for mut c in clusters {
        c.teardown();
    }
}

/// The topology's clusters: the first makes the laptop, the others attach to it.
fn build_clusters(teletun: &Path, work: &Path, topology: &Topology) -> Result<Vec<Cluster>> {
    let mut clusters = vec![Cluster::build(teletun, work, topology)?];
    for index in 1..topology.clusters {
        match Cluster::attach(&clusters[0], work, topology, index) {
            Ok(c) => clusters.push(c),
            Err(e) => {
                teardown(clusters);
                return Err(e);
            }
        }
    }
    Ok(clusters)
}
