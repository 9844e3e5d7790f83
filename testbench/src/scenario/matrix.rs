//! The `[matrix]`: every combination of its axes' values is one case, and a
//! `{axis}` in any string of the topology or a step is that case's value.
//! Substitution works on the parsed file, so every value keeps its place in
//! the file for error messages.

use std::collections::BTreeSet;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One axis: its name and values, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Axis {
    /// The name used in `{name}`.
    pub name: String,
    /// Its values.
    pub values: Vec<String>,
}

/// One combination: a value for each axis.
pub type Combination = Vec<(String, String)>;

/// The most cases one file's matrix may make (the crash matrix makes 84):
/// a few dozen short axes would otherwise ask for more cases than memory holds.
pub const MAX_CASES: usize = 1000;

/// How many cases the axes make (saturating).
pub fn case_count(axes: &[Axis]) -> usize {
    axes.iter().fold(1usize, |n, a| n.saturating_mul(a.values.len()))
}

/// Every combination of the axes' values, the first axis varying slowest.
/// No axes give one empty combination (a scenario without a matrix is one case).
pub fn combinations(axes: &[Axis]) -> Vec<Combination> {
    let mut all: Vec<Combination> = vec![Vec::new()];
    for axis in axes {
        all = all
            .into_iter()
            .flat_map(|c| {
                axis.values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((axis.name.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    all
}

/// A case's name: `name` alone, or `name[axis=value,…]`.
pub fn case_name(name: &str, combination: &Combination) -> String {
    if combination.is_empty() {
        return name.to_owned();
    }
    let axes: Vec<String> = combination.iter().map(|(a, v)| format!("{a}={v}")).collect();
    format!("{name}[{}]", axes.join(","))
}

/// The `{word}` placeholders in `text`, with their byte ranges. A word is
/// letters, digits, `_` and `-`; braces around anything else (`{ type filter; }`)
/// are left alone.
pub fn placeholders(text: &str) -> Vec<(Range<usize>, &str)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(open) = text[from..].find('{').map(|i| i + from) {
        let rest = &text[open + 1..];
        let word_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(rest.len());
        if word_len > 0 && rest[word_len..].starts_with('}') {
            found.push((open..open + word_len + 2, &rest[..word_len]));
            from = open + word_len + 2;
        } else {
            from = open + 1;
        }
    }
    found
}

/// A placeholder that names no axis.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownAxis {
    /// Where the string holding it is.
    pub span: Range<usize>,
    /// The axis it names.
    pub name: String,
}

/// A copy of `value` with every `{axis}` replaced by the combination's value.
pub fn substitute<'i>(
    value: &Spanned<DeValue<'i>>,
    combination: &Combination,
) -> Result<Spanned<DeValue<'i>>, UnknownAxis> {
    let span = value.span();
    let filled = match value.get_ref() {
        DeValue::String(s) => {
            if placeholders(s).is_empty() {
                DeValue::String(s.clone())
            } else {
                DeValue::String(
                    fill(s, combination)
                        .map_err(|name| UnknownAxis {
                            span: span.clone(),
                            name,
                        })?
                        .into(),
                )
            }
        }
        DeValue::Array(items) => DeValue::Array(
            items
                .iter()
                .map(|v| substitute(v, combination))
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(table) => DeValue::Table(substitute_table(table, combination)?),
        other => other.clone(),
    };
    Ok(Spanned::new(span, filled))
}

/// [`substitute`] for every value of a table.
pub fn substitute_table<'i>(table: &DeTable<'i>, combination: &Combination) -> Result<DeTable<'i>, UnknownAxis> {
    let mut out = DeTable::new();
    for (key, value) in table {
        out.insert(key.clone(), substitute(value, combination)?);
    }
    Ok(out)
}

fn fill(text: &str, combination: &Combination) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (range, word) in placeholders(text) {
        let value = combination
            .iter()
            .find(|(axis, _)| axis == word)
            .map(|(_, v)| v)
            .ok_or_else(|| word.to_owned())?;
        out.push_str(&text[last..range.start]);
        out.push_str(value);
        last = range.end;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

/// Every axis name used by a placeholder anywhere in `value`.
pub fn used_axes(value: &DeValue<'_>, into: &mut BTreeSet<String>) {
    match value {
        DeValue::String(s) => into.extend(placeholders(s).into_iter().map(|(_, w)| w.to_owned())),
        DeValue::Array(items) => items.iter().for_each(|v| used_axes(v.get_ref(), into)),
        DeValue::Table(t) => t.values().for_each(|v| used_axes(v.get_ref(), into)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(name: &str, values: &[&str]) -> Axis {
        Axis {
            name: name.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn combinations_cover_every_pair_in_order() {
        let all = combinations(&[axis("kill", &["INT", "KILL"]), axis("dns", &["a", "b", "c"])]);
        assert_eq!(all.len(), 6);
        assert_eq!(case_name("crash", &all[0]), "crash[kill=INT,dns=a]");
        assert_eq!(case_name("crash", &all[5]), "crash[kill=KILL,dns=c]");
        assert_eq!(combinations(&[]), vec![Vec::new()]);
        assert_eq!(case_name("plain", &Vec::new()), "plain");
    }

    #[test]
    fn placeholders_are_words_in_braces_only() {
        let found: Vec<&str> = placeholders("a {x} b {y-2}{z_3} { not } {} {a b}")
            .into_iter()
            .map(|(_, w)| w)
            .collect();
        assert_eq!(found, ["x", "y-2", "z_3"]);
        assert!(placeholders("nft '{ type filter hook forward priority 0; }'").is_empty());
    }

    #[test]
    fn substitution_fills_strings_and_keeps_spans() {
        let text = "t = { a = \"{kill}\", b = [\"x-{dns}\"], c = 3 }\n";
        let doc = DeTable::parse(text).unwrap();
        let t = doc.get_ref().get("t").unwrap();
        let combo = vec![
            ("kill".to_owned(), "SIGINT".to_owned()),
            ("dns".to_owned(), "debian".to_owned()),
        ];
        let filled = substitute(t, &combo).unwrap();
        let a = filled.get_ref().get("a").unwrap();
        assert_eq!(a.get_ref().as_str(), Some("SIGINT"));
        assert_eq!(&text[a.span()], "\"{kill}\"");
        let b = &filled.get_ref().get("b").unwrap().get_ref().as_array().unwrap()[0];
        assert_eq!(b.get_ref().as_str(), Some("x-debian"));
        let err = substitute(t, &vec![("kill".to_owned(), "x".to_owned())]).unwrap_err();
        assert_eq!(err.name, "dns");
        let mut used = BTreeSet::new();
        used_axes(t.get_ref(), &mut used);
        assert_eq!(used.into_iter().collect::<Vec<_>>(), ["dns", "kill"]);
    }
}
