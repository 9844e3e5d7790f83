//! What a step's keys are when the file leaves them out.

use super::values::{KeyName, LookupTool, Place, ServerSignal, StopSignal};

pub fn main_client() -> String {
    "main".into()
}
pub fn client_key() -> KeyName {
    KeyName::Client
}
pub fn server_key() -> KeyName {
    KeyName::Server
}
pub fn sigint() -> StopSignal {
    StopSignal::Int
}
pub fn sigterm() -> ServerSignal {
    ServerSignal::Term
}
pub fn yes() -> bool {
    true
}
pub fn two() -> u64 {
    2
}
pub fn ten() -> u64 {
    10
}
pub fn sixty() -> u64 {
    60
}
pub fn twenty() -> u64 {
    20
}
pub fn default_namespace() -> String {
    "default".into()
}
pub fn port_80() -> u16 {
    80
}
pub fn http_port() -> u16 {
    crate::cluster::HTTP_PORT
}
pub fn seed_one() -> u64 {
    1
}
pub fn hundred() -> u32 {
    100
}
pub fn laptop() -> Place {
    Place::Laptop
}
pub fn getent() -> LookupTool {
    LookupTool::Getent
}
