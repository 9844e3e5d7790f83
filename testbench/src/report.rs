//! Results: live progress lines, a summary table, and JSON + JUnit XML files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

/// How one check ended.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "outcome", content = "error", rename_all = "lowercase")]
pub enum Outcome {
    /// It passed.
    Pass,
    /// It failed, with the reason.
    Fail(String),
    /// Not run because an earlier set-up step failed.
    Skip,
}

/// One check (a scenario step).
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// What was checked.
    pub name: String,
    /// How long it took, in seconds.
    pub seconds: f64,
    /// Pass, fail or skip.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// What it measured, if anything (e.g. a throughput).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A named state snapshot it took: (name, normalized text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<(String, String)>,
}

impl CheckResult {
    /// A result.
    pub fn new(name: &str, took: Duration, outcome: Outcome) -> Self {
        CheckResult {
            name: name.to_owned(),
            seconds: took.as_secs_f64(),
            outcome,
            detail: None,
            snapshot: None,
        }
    }

    /// One line for the table.
    pub fn line(&self) -> String {
        let (mark, detail) = match &self.outcome {
            Outcome::Pass => ("PASS", String::new()),
            Outcome::Fail(e) => ("FAIL", format!("  {}", e.replace('\n', "\n        "))),
            Outcome::Skip => ("SKIP", String::new()),
        };
        let measured = self.detail.as_ref().map(|d| format!("  [{d}]")).unwrap_or_default();
        format!("  {mark}  {:<46} {:>7.2} s{measured}{detail}", self.name, self.seconds)
    }
}

/// One scenario case.
#[derive(Debug, Serialize)]
pub struct CaseResult {
    /// Scenario name.
    pub name: String,
    /// Its checks in order.
    pub checks: Vec<CheckResult>,
    /// Total time in seconds.
    pub seconds: f64,
    /// Kept logs directory when it failed.
    pub logs: Option<PathBuf>,
    /// The command that reruns this case alone.
    pub rerun: String,
}

impl CaseResult {
    /// A case result (the rerun command is filled in by the caller).
    pub fn new(name: &str, checks: Vec<CheckResult>, took: Duration, logs: Option<PathBuf>) -> Self {
        CaseResult {
            name: name.to_owned(),
            checks,
            seconds: took.as_secs_f64(),
            logs,
            rerun: String::new(),
        }
    }

    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| matches!(c.outcome, Outcome::Pass))
    }
}

/// The median time of the check called `name` across cases (the "build
/// cluster" check, say), if any case has it.
pub fn median_check_seconds(cases: &[CaseResult], name: &str) -> Option<f64> {
    let mut times: Vec<f64> = cases
        .iter()
        .flat_map(|c| c.checks.iter().filter(|x| x.name == name).map(|x| x.seconds))
        .collect();
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes `results.json` and `junit.xml` into `dir`; returns their paths.
pub fn write_files(dir: &Path, cases: &[CaseResult]) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_vec_pretty(cases)?)?;
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for case in cases {
        let failures = case
            .checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Fail(_)))
            .count();
        let skipped = case
            .checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Skip))
            .count();
        xml.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{:.3}\">\n",
            xml_escape(&case.name),
            case.checks.len(),
            case.seconds
        ));
        for c in &case.checks {
            xml.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(&case.name),
                xml_escape(&c.name),
                c.seconds
            ));
            match &c.outcome {
                Outcome::Pass => xml.push_str("/>\n"),
                Outcome::Skip => xml.push_str("><skipped/></testcase>\n"),
                Outcome::Fail(e) => xml.push_str(&format!(
                    "><failure message=\"{}\">rerun: {}</failure></testcase>\n",
                    xml_escape(e),
                    xml_escape(&case.rerun)
                )),
            }
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    let junit = dir.join("junit.xml");
    std::fs::write(&junit, xml)?;
    Ok((json, junit))
}
