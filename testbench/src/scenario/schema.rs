//! The scenario file format as types: the file, and one struct per step kind
//! (`do = "…"`). serde reads them; schemars writes their JSON Schema
//! (`testbench schema`, kept in docs/scenario.schema.json).
//!
//! Adding a step kind: a struct here and a line in `steps!` below, its label in
//! `label.rs`, its checks in `validate.rs`, and its action in one of
//! `steps/*.rs` (dispatched in `steps/mod.rs`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use super::defaults;
use super::values::{
    Answer, BrokenKubeconfig, CrashPoint, Direction, KeyName, KillMode, Place, Process, Role, ServerSignal, StopSignal,
    Target,
};
use crate::impair::Impairment;
use crate::topology::Topology;

/// A scenario file. Every combination of the `[matrix]` axes is one case; a
/// `{axis}` in any string of `[topology]` or of a step is that case's value.
#[derive(Debug, JsonSchema)]
#[schemars(deny_unknown_fields)]
#[allow(dead_code)] // read by hand (with spans) in load.rs; the type gives the schema
pub struct ScenarioFile {
    /// The scenario's name; cases are `name[axis=value,…]`.
    name: String,
    /// What it shows.
    #[schemars(default)]
    description: String,
    /// Axis name → values; every combination is one case.
    #[schemars(default)]
    matrix: BTreeMap<String, Vec<String>>,
    /// How each case's cluster is built.
    #[schemars(default)]
    topology: Topology,
    /// Named impairment profiles for `impair` steps.
    #[schemars(default)]
    impairments: BTreeMap<String, Impairment>,
    /// The steps, run in order.
    step: Vec<Step>,
}

/// The JSON Schema of scenario files, as `testbench schema` writes it (and
/// docs/scenario.schema.json keeps it).
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(ScenarioFile);
    serde_json::to_string_pretty(&schema).expect("a schema is JSON") + "\n"
}

/// The top-level keys of a scenario file (as in [`ScenarioFile`]).
pub const FILE_KEYS: &[&str] = &["name", "description", "matrix", "topology", "impairments", "step"];

/// Declares [`Step`] from the step kinds: each `do` word and the struct that
/// holds its keys.
macro_rules! steps {
    ($( $word:literal => $kind:ident ),+ $(,)?) => {
        /// One step of a scenario; `do` selects the kind.
        #[derive(Debug, JsonSchema)]
        #[schemars(tag = "do")]
        pub enum Step {
            $(
                #[schemars(rename = $word)]
                #[allow(missing_docs)]
                $kind($kind)
            ),+
        }

        impl Step {
            /// Every `do` word.
            pub const KINDS: &'static [&'static str] = &[$($word),+];

            /// Reads a step of kind `word` from its keys (without `do`); `None`
            /// for an unknown kind.
            pub fn deserialize_kind<'de, D: serde::Deserializer<'de>>(
                word: &str,
                keys: D,
            ) -> Option<Result<Step, D::Error>> {
                match word {
                    $($word => Some(<$kind as Deserialize>::deserialize(keys).map(Step::$kind)),)+
                    _ => None,
                }
            }
        }
    };
}

steps! {
    "start-servers" => StartServers,
    "start-server" => StartServer,
    "stop-server" => StopServer,
    "start-client" => StartClient,
    "stop-client" => StopClient,
    "client-exits" => ClientExits,
    "kill-client" => KillClient,
    "crash-client" => CrashClient,
    "ping" => Ping,
    "tcp-echo" => TcpEcho,
    "udp-echo" => UdpEcho,
    "http" => Http,
    "connect-back" => ConnectBack,
    "transfer" => Transfer,
    "route" => Route,
    "resolve" => Resolve,
    "add-pod" => AddPod,
    "remove-pod" => RemovePod,
    "add-service" => AddService,
    "remove-service" => RemoveService,
    "add-node" => AddNode,
    "remove-node" => RemoveNode,
    "use-cluster" => UseCluster,
    "compact-api" => CompactApi,
    "impair" => Impair,
    "no-corruption" => NoCorruption,
    "laptop-unchanged" => LaptopUnchanged,
    "snapshot" => Snapshot,
    "teletun-cleanup" => TeletunCleanup,
    "log-contains" => LogContains,
    "run" => Run,
}

/// Start server-cluster, then server-external, and wait until they are linked.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartServers {}

/// Start one server role alone; wait for its readiness (and the link, if both run).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartServer {
    /// Which role.
    pub role: Role,
}

/// Stop one server role with a signal; it must exit (0 unless SIGKILL).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopServer {
    /// Which role.
    pub role: Role,
    /// The signal.
    #[serde(default = "defaults::sigterm")]
    pub signal: ServerSignal,
}

/// Start a client on the laptop and wait until its tunnel is up. With
/// `expect_error`, the client must instead exit non-zero with exactly one
/// `teletun:` error line containing that text, and change nothing.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartClient {
    /// Name to refer to this client by.
    #[serde(default = "defaults::main_client")]
    pub name: String,
    /// Key pair the client uses.
    #[serde(default = "defaults::client_key")]
    pub client_key: KeyName,
    /// Public key the client pins for the server.
    #[serde(default = "defaults::server_key")]
    pub server_key: KeyName,
    /// Expect the client to exit non-zero with this text in its error line.
    pub expect_error: Option<String>,
    /// With a Kubernetes API: the pod to name with `-pod` (default: server-external's).
    pub pod: Option<String>,
    /// With a Kubernetes API: a broken kubeconfig.
    pub kubeconfig: Option<BrokenKubeconfig>,
    /// More command-line arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Stop a client with a signal; it must exit 0 after cleaning up and report the stop.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopClient {
    /// Which client.
    #[serde(default = "defaults::main_client")]
    pub name: String,
    /// The signal.
    #[serde(default = "defaults::sigint")]
    pub signal: StopSignal,
}

/// A running client must exit by itself, non-zero, with this text in its
/// one-line error, within `within` seconds.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientExits {
    /// Which client.
    #[serde(default = "defaults::main_client")]
    pub name: String,
    /// Text of the error line.
    pub expect_error: String,
    /// Seconds to wait.
    #[serde(default = "defaults::ten")]
    pub within: u64,
}

/// Kill a running client, without expectations.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillClient {
    /// Which client.
    #[serde(default = "defaults::main_client")]
    pub name: String,
    /// How.
    pub signal: KillMode,
}

/// Start a client that stops at crash point `point`, then end it with `kill`:
/// after SIGINT or SIGTERM it must clean up and exit 0. For `mid-teardown` the
/// client is first brought up and asked to stop with SIGTERM.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrashClient {
    /// Where the client stops.
    pub point: CrashPoint,
    /// How it is ended there.
    pub kill: KillMode,
}

/// ping from the laptop (3 packets).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// What to ping.
    pub to: Target,
    /// Use the target's IPv6 address.
    #[serde(default)]
    pub ipv6: bool,
    /// Pass only if it fails.
    #[serde(default)]
    pub expect_failure: bool,
}

/// TCP echo from the laptop to a pod's echo port.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpEcho {
    /// The pod (or address).
    pub to: Target,
    /// Use IPv6.
    #[serde(default)]
    pub ipv6: bool,
    /// Pass only if it fails.
    #[serde(default)]
    pub expect_failure: bool,
}

/// UDP echo from the laptop to a pod's echo port.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UdpEcho {
    /// The pod (or address).
    pub to: Target,
    /// Use IPv6.
    #[serde(default)]
    pub ipv6: bool,
}

/// HTTP GET from the laptop; the answer must come from the right pod.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// A pod (port 8080) or `service:NAME` (its port).
    pub to: Target,
    /// Pass only if it fails.
    #[serde(default)]
    pub expect_failure: bool,
}

/// A pod connects to the server-cluster pod's IP; a listener on the laptop must get it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectBack {
    /// The pod that connects.
    pub from: String,
    /// Use IPv6.
    #[serde(default)]
    pub ipv6: bool,
}

/// Move seeded bytes through the tunnel between the laptop and the app pod;
/// the SHA-256 must match. Reports the throughput.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// Which way.
    pub direction: Direction,
    /// How many bytes.
    pub bytes: u64,
    /// Seed of the content.
    #[serde(default = "defaults::seed_one")]
    pub seed: u64,
}

/// The laptop routes `to` into the tunnel (or, with `present = false`, no
/// longer does) within `within` seconds. Reports how long after the object's
/// last change it happened.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A pod, `service:NAME`, `node:NAME` or an address.
    pub to: Target,
    /// Use the target's IPv6 address.
    #[serde(default)]
    pub ipv6: bool,
    /// Whether the route must exist.
    #[serde(default = "defaults::yes")]
    pub present: bool,
    /// Seconds to wait.
    #[serde(default = "defaults::two")]
    pub within: u64,
}

/// Resolve a name on the laptop (glibc, its resolv.conf) and expect an address,
/// or (with `expect = "nothing"`) no answer.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// The name.
    pub name: String,
    /// `POD`, `POD/ipv6`, `service:NAME` or `nothing`.
    pub expect: Answer,
}

/// Add a pod running the app agent (echo, HTTP, blobs) to the cluster, with
/// its DNS name and its API object.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddPod {
    /// Its name.
    pub name: String,
    /// Its node (`node1` when not given).
    pub node: Option<String>,
}

/// Remove a pod with its DNS name and API object.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovePod {
    /// Its name.
    pub name: String,
}

/// Add a service for a pod's port at the next free cluster IP: a DNAT rule and
/// `NAME.NAMESPACE.svc.DOMAIN`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddService {
    /// Its name.
    pub name: String,
    /// Kubernetes namespace.
    #[serde(default = "defaults::default_namespace")]
    pub namespace: String,
    /// The pod behind it.
    pub pod: String,
    /// Service port.
    #[serde(default = "defaults::port_80")]
    pub port: u16,
    /// The pod's port.
    #[serde(default = "defaults::http_port")]
    pub target_port: u16,
}

/// Remove a service: its DNAT rules and its DNS name.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveService {
    /// Its name.
    pub name: String,
}

/// Add the next node (`nodeN`) with its pod networks, routed between nodes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNode {}

/// Remove a node (not node1) with its pods.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveNode {
    /// Its name (`node2`, …).
    pub name: String,
}

/// Act on cluster `name` (`a`, `b`, … with `[topology] clusters`) from now on.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UseCluster {
    /// The cluster.
    pub name: String,
}

/// Make the API forget its event history (as etcd compaction does): watchers
/// get 410 Gone and must list again.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompactApi {}

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

/// A process's log contains a text (waiting up to `within` seconds), or with
/// `absent`, does not (checked at once).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogContains {
    /// Whose log.
    pub process: Process,
    /// The text.
    pub text: String,
    /// Seconds to wait for it.
    #[serde(default = "defaults::ten")]
    pub within: u64,
    /// Require the text to be absent instead.
    #[serde(default)]
    pub absent: bool,
}

/// Run a shell command; it must exit 0 (or fail, with `expect_failure`), and
/// print `expect_output` if given.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Where.
    pub on: Place,
    /// The `sh -c` command.
    pub command: String,
    /// Text the output must contain.
    pub expect_output: Option<String>,
    /// Expect a non-zero exit instead.
    #[serde(default)]
    pub expect_failure: bool,
}
