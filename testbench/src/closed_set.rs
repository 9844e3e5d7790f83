//! Closed sets of words in scenario files (signals, roles, DNS managers, …):
//! one macro gives each its enum, parsing with an error that lists the allowed
//! values, and a JSON Schema that editors can complete from.

use std::borrow::Cow;

use schemars::{json_schema, Schema};

/// The error for a word outside a closed set.
pub fn unknown(what: &str, got: &str, allowed: &[&str]) -> String {
    format!("unknown {what} {got:?}; the allowed values are {}", allowed.join(", "))
}

/// A `{axis}` matrix placeholder, allowed wherever a closed-set word is.
pub fn placeholder_schema() -> Schema {
    json_schema!({
        "type": "string",
        "pattern": r"^\{[A-Za-z0-9_-]+\}$",
        "description": "a [matrix] axis, filled in per case"
    })
}

/// The schema of a closed set: one `const` per word with its description, or a
/// matrix placeholder.
pub fn schema(words: &[(&str, &str)]) -> Schema {
    let mut choices: Vec<serde_json::Value> = words
        .iter()
        .map(|(word, doc)| serde_json::json!({ "const": word, "description": doc.trim() }))
        .collect();
    choices.push(placeholder_schema().to_value());
    json_schema!({ "type": "string", "anyOf": choices })
}

/// The schema name of a closed set.
pub fn schema_name(name: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(name)
}

/// Declares `enum NAME` whose variants are written as the given words:
///
/// ```ignore
/// closed_set! {
///     /// How a client is stopped cleanly.
///     pub enum StopSignal("signal") {
///         /// Like Ctrl-C.
///         Int = "SIGINT",
///         Term = "SIGTERM",
///     }
/// }
/// ```
///
/// The string in parentheses names the set in errors ("unknown signal …").
macro_rules! closed_set {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($what:literal) {
            $( $(#[doc = $doc:literal])* $variant:ident = $word:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name {
            $( $(#[doc = $doc])* $variant ),+
        }

        impl $name {
            /// Every member, in declaration order.
            #[allow(dead_code)]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every member's word, in declaration order.
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            /// The word for this member, as scenario files write it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($word => Ok($name::$variant),)+
                    other => Err($crate::closed_set::unknown($what, other, Self::WORDS)),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                word.parse().map_err(serde::de::Error::custom)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $crate::closed_set::schema_name(stringify!($name))
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                $crate::closed_set::schema(&[$(($word, concat!($($doc, "\n"),*))),+])
            }
        }
    };
}

pub(crate) use closed_set;

#[cfg(test)]
mod tests {
    closed_set! {
        /// A test set.
        enum Colour("colour") {
            /// The sky.
            Blue = "blue",
            Red = "red",
        }
    }

    #[test]
    fn words_parse_and_others_name_the_allowed_values() {
        assert_eq!("red".parse::<Colour>(), Ok(Colour::Red));
        assert_eq!(Colour::Blue.to_string(), "blue");
        assert_eq!(
            "green".parse::<Colour>().unwrap_err(),
            "unknown colour \"green\"; the allowed values are blue, red"
        );
        let schema = serde_json::to_string(&schemars::schema_for!(Colour)).unwrap();
        assert!(schema.contains("\"const\":\"blue\"") && schema.contains("The sky."));
    }
}
