//! Steps that check or record the laptop's state.

use schemars::JsonSchema;
use serde::Deserialize;

/// The laptop's network state equals the state before any client ran
/// (waiting up to `within` seconds for it to get there).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LaptopUnchanged {
    /// Seconds to wait.
    #[serde(default)]
    pub within: u64,
}

/// Record the laptop's network state, normalized, under `name` in the results
/// (the test suite compares these with insta snapshots).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The snapshot's name.
    pub name: String,
}

/// Run `teletun cleanup` on the laptop; it must succeed.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TeletunCleanup {}
