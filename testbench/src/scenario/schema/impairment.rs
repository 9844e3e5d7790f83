//! Steps that impair the underlay and check for corruption.

use schemars::JsonSchema;
use serde::Deserialize;

/// Impair the underlay from now on with the named `[impairments.NAME]` profile.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Impair {
    /// The profile.
    pub profile: String,
}

/// No packet out of a TUN device was corrupted or a splice of two: the
/// laptop's and the server-cluster pod's kernels counted no header or checksum
/// errors, and every teletun session summary so far reports 0 malformed packets.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoCorruption {}
