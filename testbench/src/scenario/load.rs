//! Loading a scenario file: parse it keeping every value's place in the file,
//! expand the matrix, read each case's topology and steps into their types, and
//! check the case as a whole. Every problem is reported as
//! `FILE:LINE: what is wrong; the allowed values are …` before anything is built.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::matrix::{self, Axis, Combination};
use super::schema::{Step, FILE_KEYS};
use super::validate::{self, At};
use crate::impair::Impairment;
use crate::topology::Topology;

/// One runnable case: a scenario with its matrix values filled in.
#[derive(Debug)]
pub struct Scenario {
    /// `name` or `name[axis=value,…]`.
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The cluster to build.
    pub topology: Topology,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Impairment profiles by name.
    pub impairments: BTreeMap<String, Impairment>,
}

/// One problem, at a line of the file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// Everything wrong with one scenario file.
#[derive(Debug)]
pub struct LoadError {
    /// The file, as given.
    pub file: PathBuf,
    /// Its problems, by line.
    pub problems: Vec<Problem>,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self
            .problems
            .iter()
            .map(|p| match p.line {
                0 => format!("{}: {}", self.file.display(), p.message),
                line => format!("{}:{line}: {}", self.file.display(), p.message),
            })
            .collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for LoadError {}

/// Reads a scenario file and expands its matrix into cases.
pub fn load(path: &Path) -> Result<Vec<Scenario>, LoadError> {
    let fail = |line, message| LoadError {
        file: path.to_owned(),
        problems: vec![Problem { line, message }],
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(0, format!("cannot read the file: {e}")))?;
    parse(&text).map_err(|problems| LoadError {
        file: path.to_owned(),
        problems,
    })
}

/// Collects problems with their places in the text.
struct Problems<'t> {
    text: &'t str,
    found: BTreeSet<Problem>,
}

impl Problems<'_> {
    fn add(&mut self, span: Range<usize>, message: impl Into<String>) {
        let start = span.start.min(self.text.len());
        let line = self.text[..start].matches('\n').count() + 1;
        self.found.insert(Problem {
            line,
            message: message.into(),
        });
    }

    fn toml(&mut self, error: &toml::de::Error, fallback: Range<usize>, context: &str) {
        self.add(error.span().unwrap_or(fallback), explain(error.message(), context));
    }
}

/// Parses a scenario file's text into its cases, or every problem in it.
pub fn parse(text: &str) -> Result<Vec<Scenario>, Vec<Problem>> {
    let mut problems = Problems {
        text,
        found: BTreeSet::new(),
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            problems.toml(&e, 0..0, "the file");
            return Err(problems.found.into_iter().collect());
        }
    };
    let whole = root.span();
    let root = root.into_inner();
    for key in root.keys() {
        if !FILE_KEYS.contains(&key.get_ref().as_ref()) {
            problems.add(
                key.span(),
                format!(
                    "unknown key `{}`; the allowed keys are {}",
                    key.get_ref(),
                    FILE_KEYS.join(", ")
                ),
            );
        }
    }
    let name = match root.get("name").map(|v| (v.span(), v.get_ref().as_str())) {
        Some((_, Some(name))) if !name.is_empty() => name.to_owned(),
        Some((span, _)) => {
            problems.add(span, "`name` must be a non-empty string");
            String::new()
        }
        None => {
            problems.add(whole.start..whole.start, "a scenario needs `name = \"…\"`");
            String::new()
        }
    };
    let description = match root.get("description") {
        None => String::new(),
        Some(v) => v.get_ref().as_str().map(str::to_owned).unwrap_or_else(|| {
            problems.add(v.span(), "`description` must be a string");
            String::new()
        }),
    };
    let axes = read_matrix(root.get("matrix"), &mut problems);
    let impairments = read_impairments(root.get("impairments"), &mut problems);
    let steps: Vec<&Spanned<DeValue>> = match root.get("step").map(|v| (v, v.get_ref().as_array())) {
        Some((_, Some(items))) if !items.is_empty() => items.iter().collect(),
        Some((v, _)) => {
            problems.add(v.span(), "`step` must be a list of [[step]] tables");
            Vec::new()
        }
        None => {
            problems.add(whole.start..whole.start, "a scenario needs at least one [[step]]");
            Vec::new()
        }
    };
    let topology = root.get("topology");
    check_axes_used(&axes, root.get("matrix"), topology, &steps, &mut problems);

    let profiles: BTreeSet<String> = impairments.keys().cloned().collect();
    let mut cases = Vec::new();
    let count = matrix::case_count(&axes);
    let combinations = if count > matrix::MAX_CASES {
        let span = root.get("matrix").map_or(whole.start..whole.start, |m| m.span());
        problems.add(
            span,
            format!(
                "the matrix makes {count} cases; at most {} are allowed: split the file or drop an axis",
                matrix::MAX_CASES
            ),
        );
        Vec::new()
    } else {
        matrix::combinations(&axes)
    };
    for combination in combinations {
        let topology = read_topology(topology, &combination, &mut problems);
        let mut case_steps = Vec::new();
        for raw in &steps {
            case_steps.push(read_step(raw, &combination, &mut problems));
        }
        let (Some(topology), Some(case_steps)) = (topology, case_steps.into_iter().collect::<Option<Vec<Step>>>())
        else {
            continue;
        };
        for finding in validate::check(&topology, &case_steps, &profiles) {
            let span = match finding.at {
                At::Topology(key) => key_span(root.get("topology"), key),
                At::Step(i, key) => key_span(Some(steps[i]), key),
            };
            problems.add(span, finding.message);
        }
        cases.push(Scenario {
            name: matrix::case_name(&name, &combination),
            description: description.clone(),
            topology,
            steps: case_steps,
            impairments: impairments.clone(),
        });
    }
    if problems.found.is_empty() {
        Ok(cases)
    } else {
        Err(problems.found.into_iter().collect())
    }
}

/// The span of `key` in a table (or of the table itself without that key).
fn key_span(table: Option<&Spanned<DeValue>>, key: &str) -> Range<usize> {
    match table {
        Some(t) => t.get_ref().get(key).map_or_else(|| t.span(), |v| v.span()),
        None => 0..0,
    }
}

fn read_impairments(value: Option<&Spanned<DeValue>>, problems: &mut Problems) -> BTreeMap<String, Impairment> {
    let mut profiles = BTreeMap::new();
    let Some(value) = value else { return profiles };
    let Some(table) = value.get_ref().as_table() else {
        problems.add(value.span(), "`impairments` must hold [impairments.NAME] tables");
        return profiles;
    };
    for (name, profile) in table {
        let context = format!("[impairments.{}]", name.get_ref());
        match Impairment::deserialize(ValueDeserializer::from(profile.clone())) {
            Ok(imp) => {
                for wrong in imp.out_of_range() {
                    problems.add(profile.span(), format!("{context}: {wrong}"));
                }
                profiles.insert(name.get_ref().to_string(), imp);
            }
            Err(e) => problems.toml(&e, profile.span(), &context),
        }
    }
    profiles
}

fn read_matrix(value: Option<&Spanned<DeValue>>, problems: &mut Problems) -> Vec<Axis> {
    let Some(value) = value else { return Vec::new() };
    let Some(table) = value.get_ref().as_table() else {
        problems.add(value.span(), "`matrix` must be a table of axis = [\"value\", …]");
        return Vec::new();
    };
    let mut axes = Vec::new();
    for (name, values) in table {
        let name_text = name.get_ref().as_ref();
        if matrix::placeholders(&format!("{{{name_text}}}")).is_empty() {
            problems.add(
                name.span(),
                format!("matrix axis `{name_text}`: use letters, digits, '_' and '-'"),
            );
            continue;
        }
        let words: Option<Vec<String>> = values
            .get_ref()
            .as_array()
            .map(|a| a.iter().map(|v| v.get_ref().as_str().map(str::to_owned)).collect())
            .unwrap_or(None);
        match words {
            Some(words) if !words.is_empty() => axes.push(Axis {
                name: name_text.to_owned(),
                values: words,
            }),
            _ => problems.add(
                values.span(),
                format!("matrix axis `{name_text}` must be a non-empty list of strings"),
            ),
        }
    }
    axes
}

/// An axis no placeholder uses only repeats cases: almost always a typo.
fn check_axes_used(
    axes: &[Axis],
    matrix: Option<&Spanned<DeValue>>,
    topology: Option<&Spanned<DeValue>>,
    steps: &[&Spanned<DeValue>],
    problems: &mut Problems,
) {
    let mut used = BTreeSet::new();
    for v in topology.into_iter().chain(steps.iter().copied()) {
        matrix::used_axes(v.get_ref(), &mut used);
    }
    for axis in axes.iter().filter(|a| !used.contains(&a.name)) {
        let span = matrix
            .and_then(|m| m.get_ref().get(axis.name.as_str()))
            .map_or(0..0, |v| v.span());
        problems.add(
            span,
            format!(
                "matrix axis `{0}` is used nowhere; put `{{{0}}}` in [topology] or a step, or remove the axis",
                axis.name
            ),
        );
    }
}

fn substituted<'i>(
    value: &Spanned<DeValue<'i>>,
    combination: &Combination,
    problems: &mut Problems,
) -> Option<Spanned<DeValue<'i>>> {
    matrix::substitute(value, combination)
        .map_err(|e| {
            let axes: Vec<&str> = combination.iter().map(|(a, _)| a.as_str()).collect();
            let known = if axes.is_empty() {
                "this file has no [matrix]".to_owned()
            } else {
                format!(
                    "the allowed values are {}",
                    axes.iter().map(|a| format!("{{{a}}}")).collect::<Vec<_>>().join(", ")
                )
            };
            problems.add(e.span, format!("`{{{}}}` names no matrix axis; {known}", e.name));
        })
        .ok()
}

fn read_topology(
    value: Option<&Spanned<DeValue>>,
    combination: &Combination,
    problems: &mut Problems,
) -> Option<Topology> {
    let Some(value) = value else {
        return Some(Topology::default());
    };
    let filled = substituted(value, combination, problems)?;
    Topology::deserialize(ValueDeserializer::from(filled))
        .map_err(|e| problems.toml(&e, value.span(), "[topology]"))
        .ok()
}

fn read_step(raw: &Spanned<DeValue>, combination: &Combination, problems: &mut Problems) -> Option<Step> {
    let span = raw.span();
    let mut filled = substituted(raw, combination, problems)?;
    let DeValue::Table(keys) = filled.get_mut() else {
        problems.add(span, "a step must be a [[step]] table");
        return None;
    };
    let Some(kind) = keys.remove("do") else {
        problems.add(
            span,
            format!("a step needs `do`; the allowed values are {}", Step::KINDS.join(", ")),
        );
        return None;
    };
    let Some(word) = kind.get_ref().as_str().map(str::to_owned) else {
        problems.add(kind.span(), "`do` must be a string naming the step kind");
        return None;
    };
    match Step::deserialize_kind(&word, ValueDeserializer::from(filled)) {
        None => {
            problems.add(
                kind.span(),
                format!(
                    "unknown step kind {word:?}; the allowed values are {}",
                    Step::KINDS.join(", ")
                ),
            );
            None
        }
        Some(Err(e)) => {
            problems.toml(&e, span, &format!("a `{word}` step"));
            None
        }
        Some(Ok(step)) => Some(step),
    }
}

/// Rewrites serde's messages about keys into ours (what is wrong; what is allowed).
fn explain(message: &str, context: &str) -> String {
    let quoted = |s: &str| -> Vec<String> { s.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = quoted(rest);
        let (key, allowed) = names
            .split_first()
            .map_or(("?".to_owned(), &[][..]), |(k, a)| (k.clone(), a));
        return if allowed.is_empty() {
            format!("unknown key `{key}` in {context}, which takes no other keys")
        } else {
            format!(
                "unknown key `{key}` in {context}; the allowed keys are {}",
                allowed.join(", ")
            )
        };
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("{context} needs `{}`", quoted(rest).first().map_or("?", String::as_str));
    }
    message.trim().to_owned()
}
