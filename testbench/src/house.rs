//! The testbench's own house rules, checked on its sources: no file over 500
//! lines, and no import circle between files (a file's `use crate::…`,
//! `use super::…` and `crate::…` paths are its imports; `mod x;` is not).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a file may grow.
const MAX_LINES: usize = 500;

fn source_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            source_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// `src/a/b.rs` → `["a", "b"]`; `src/a/mod.rs` → `["a"]`; `src/main.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "main" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code of a file without its `#[cfg(test)]` tail and comments.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str, prefix: &str, into: &mut Vec<String>) {
    let tree = tree.trim();
    match tree.find('{') {
        None => into.push(format!("{prefix}{}", tree.split(" as ").next().unwrap_or(tree).trim())),
        Some(open) => {
            let head = &tree[..open];
            let body = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let (mut depth, mut last) = (0, 0);
            for (i, c) in body.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&body[last..i], &format!("{prefix}{head}"), into);
                        last = i + 1;
                    }
                    _ => {}
                }
            }
            if !body[last..].trim().is_empty() {
                expand(&body[last..], &format!("{prefix}{head}"), into);
            }
        }
    }
}

/// Every path a file names: its `use` trees and inline `crate::`/`super::` paths.
fn paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        // A `use` item starts its line (after `pub` or `pub(…)`); "use " inside a string does not.
        let line_start = rest[..i].rfind('\n').map_or(0, |n| n + 1);
        let lead = rest[line_start..i].trim();
        rest = &rest[i + 4..];
        if !(lead.is_empty() || lead == "pub" || (lead.starts_with("pub(") && lead.ends_with(')'))) {
            continue;
        }
        if let Some(end) = rest.find(';') {
            expand(&rest[..end], "", &mut found);
        }
    }
    for word in code.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("crate::") || word.starts_with("super::") {
            found.push(word.to_owned());
        }
    }
    found
}

/// Resolves `path`, named in module `from`, to the longest module that is a file.
fn resolve(path: &str, from: &[String], is_file: &BTreeSet<Vec<String>>, own_children: bool) -> Option<Vec<String>> {
    let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    let mut module: Vec<String> = match parts.first().copied() {
        Some("crate") | Some("$crate") => {
            parts.remove(0);
            Vec::new()
        }
        Some("super") => {
            let mut m = from.to_vec();
            while parts.first() == Some(&"super") {
                parts.remove(0);
                m.pop();
            }
            m
        }
        Some("self") => {
            parts.remove(0);
            from.to_vec()
        }
        // `use child::X` in a module that declares `mod child;`.
        Some(first) if own_children => {
            let mut child = from.to_vec();
            child.push(first.to_owned());
            if !is_file.contains(&child) {
                return None;
            }
            from.to_vec()
        }
        _ => return None,
    };
    let mut best = is_file.contains(&module).then(|| module.clone());
    for p in parts {
        module.push(p.to_owned());
        if is_file.contains(&module) {
            best = Some(module.clone());
        }
    }
    best
}

#[test]
fn no_file_is_over_500_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).ok()?.lines().count();
            (n > MAX_LINES).then(|| format!("{} has {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these rooms: {long:?}");
}

#[test]
fn no_import_circle_between_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files.iter().map(|f| (module_of(&src, f), f.clone())).collect();
    let is_file: BTreeSet<Vec<String>> = modules.keys().cloned().collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = code(&std::fs::read_to_string(file).expect("read"));
        for path in paths(&text) {
            if let Some(to) = resolve(&path, module, &is_file, true) {
                if &to != module {
                    edges.entry(module.clone()).or_default().insert(to);
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, bool>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        match state.get(m) {
            Some(true) => return None,
            Some(false) => {
                let start = stack.iter().position(|s| s == m).unwrap_or(0);
                let mut circle = stack[start..].to_vec();
                circle.push(m.clone());
                return Some(circle);
            }
            None => {}
        }
        state.insert(m.clone(), false);
        stack.push(m.clone());
        for to in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(to, edges, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(m.clone(), true);
        None
    }
    let mut state = BTreeMap::new();
    for m in modules.keys() {
        if let Some(circle) = visit(m, &edges, &mut state, &mut Vec::new()) {
            let names: Vec<String> = circle.iter().map(|m| format!("crate::{}", m.join("::"))).collect();
            panic!("import circle: {}", names.join(" → "));
        }
    }
}

#[test]
fn the_checker_sees_paths_and_circles() {
    let mut out = Vec::new();
    expand("super::{a, b::{C, D as E}}", "", &mut out);
    assert_eq!(out, ["super::a", "super::b::C", "super::b::D"]);
    let is_file: BTreeSet<Vec<String>> = [vec![], vec!["x".into()], vec!["x".into(), "y".into()]].into();
    let from = vec!["x".to_owned(), "y".to_owned()];
    assert_eq!(resolve("super::Thing", &from, &is_file, false), Some(vec!["x".into()]));
    assert_eq!(resolve("crate::x::y::Z", &[], &is_file, false), Some(from.clone()));
    assert_eq!(resolve("std::fs", &from, &is_file, false), None);
    assert!(paths("use crate::x::{y::A, B};\nlet v = crate::x::f();").contains(&"crate::x::y::A".to_owned()));
}
