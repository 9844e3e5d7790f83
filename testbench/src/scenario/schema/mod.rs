//! The scenario file format as types: the file, and one struct per step kind
//! (`do = "…"`). serde reads them; schemars writes their JSON Schema
//! (`testbench schema`, kept in docs/scenario.schema.json).
//!
//! Adding a step kind: a struct in the family's file here (`processes`,
//! `connectivity`, `dns`, `changes`, `impairment`, `state`, `hostile`, `roaming`, as in `steps/`) and
//! a line in `steps!` below, its label in
//! `label.rs`, its checks in `validate.rs`, and its action in one of
//! `steps/*.rs` (dispatched in `steps/mod.rs`).

mod changes;
mod connectivity;
mod dns;
mod hostile;
mod impairment;
mod processes;
mod roaming;
mod state;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::impair::Impairment;
use crate::topology::Topology;

pub use changes::*;
pub use connectivity::*;
pub use dns::*;
pub use hostile::*;
pub use impairment::*;
pub use processes::*;
pub use roaming::*;
pub use state::*;

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
    "connect-in-turn" => ConnectInTurn,
    "status" => Status,
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
    "lookup-latency" => LookupLatency,
    "add-pod" => AddPod,
    "claim-pod" => ClaimPod,
    "remove-pod" => RemovePod,
    "add-service" => AddService,
    "remove-service" => RemoveService,
    "add-service-cidr" => AddServiceCidr,
    "add-node" => AddNode,
    "remove-node" => RemoveNode,
    "use-cluster" => UseCluster,
    "compact-api" => CompactApi,
    "client-role" => ClientRole,
    "pod-security" => PodSecurity,
    "impair" => Impair,
    "no-corruption" => NoCorruption,
    "laptop-unchanged" => LaptopUnchanged,
    "snapshot" => Snapshot,
    "teletun-cleanup" => TeletunCleanup,
    "log-contains" => LogContains,
    "run" => Run,
    "start-flood" => StartFlood,
    "stop-flood" => StopFlood,
    "throughput" => Throughput,
    "forge" => Forge,
    "plant-record" => PlantRecord,
    "connect-link" => ConnectLink,
    "counter" => Counter,
    "change-address" => ChangeAddress,
    "switch-uplink" => SwitchUplink,
    "nat-rebind" => NatRebind,
    "sleep" => Sleep,
    "start-probe" => StartProbe,
    "stop-probe" => StopProbe,
    "start-transfer" => StartTransfer,
    "finish-transfer" => FinishTransfer,
    "mtu-black-hole" => MtuBlackHole,
}
