//! Steps that start, stop, crash and watch processes.

use schemars::JsonSchema;
use serde::Deserialize;

use super::super::defaults;
use super::super::values::{
    BrokenKubeconfig, CrashPoint, KeyName, KillMode, Place, Process, Role, ServerSignal, StopSignal,
};

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
    /// server-cluster only: the pod's resolv.conf instead of the one kubelet
    /// writes (a pod `dnsConfig`, or a compromised server, deciding the search list).
    pub resolv_conf: Option<String>,
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
    /// Seconds the tunnel may take to come up (or the client to fail).
    #[serde(default = "defaults::twenty")]
    pub within: u64,
}

/// Start `count` clients one after another, each stopped before the next
/// starts: each tunnel must come up within `within` seconds and each client
/// stop cleanly. Reports the median and worst time to come up.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectInTurn {
    /// How many clients.
    pub count: u32,
    /// Seconds each tunnel may take to come up.
    #[serde(default = "defaults::ten")]
    pub within: u64,
}

/// `teletun status` on the laptop (with `json`, `teletun status --json`)
/// exits 0 and prints every text in `expect`. Reports the first line.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Texts the output must contain.
    pub expect: Vec<String>,
    /// Ask for JSON.
    #[serde(default)]
    pub json: bool,
    /// Seconds to wait for the texts to appear (asking again every 100 ms).
    #[serde(default = "defaults::ten")]
    pub within: u64,
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
