//! Steps that resolve names on the laptop.

use schemars::JsonSchema;
use serde::Deserialize;

use super::super::defaults;
use super::super::values::{Answer, LookupTool, Place, Target};

/// Resolve a name on the laptop (glibc, its resolv.conf) and expect an address,
/// or (with `expect = "nothing"`) no answer.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// The name.
    pub name: String,
    /// `POD`, `POD/ipv6`, `service:NAME`, an address, or `nothing`.
    pub expect: Answer,
    /// How to look it up.
    #[serde(default = "defaults::getent")]
    pub with: LookupTool,
    /// Exactly this many queries for the name (or for names that start with
    /// it, as the search list makes them) reach the LAN's and the cluster's DNS
    /// servers during the lookup; systemd-resolved's cache is flushed first.
    pub queries: Option<u32>,
}

/// Look a name up `count` times and report the median and 90th percentile
/// time of one lookup (of an answer, or with `missing`, of "not found"): as
/// applications do (getaddrinfo) on the laptop, or with `server`, one A query
/// straight to that DNS server (the baseline a pod in the cluster sees).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LookupLatency {
    /// The name; it must resolve (unless `missing`).
    pub name: String,
    /// How many lookups.
    #[serde(default = "defaults::hundred")]
    pub count: u32,
    /// The name exists nowhere: every lookup must end in "not found".
    #[serde(default)]
    pub missing: bool,
    /// Where the lookups run.
    #[serde(default = "defaults::laptop")]
    pub on: Place,
    /// Ask this DNS server directly (a pod, `service:NAME` or an address),
    /// not the resolver configuration.
    pub server: Option<Target>,
}
