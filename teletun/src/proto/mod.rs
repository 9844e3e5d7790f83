//! Sans-IO codecs: no sockets, no async runtime; pure functions and state machines.

pub mod checksum;
pub mod control;
pub mod dns;
pub mod link;
pub mod packet;
pub mod resolv_conf;
