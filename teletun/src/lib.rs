//! TeleTUN: an L3 VPN that makes a developer's machine one pod of a Kubernetes
//! cluster. See `docs/architecture.md` for how the pieces fit.
//!
//! - [`proto`]: sans-IO codecs (control messages, IP packet inspection).
//! - [`control`]: the TCP + TLS 1.3 control channel.
//! - [`tunnel`]: the sans-IO tunnel cores (DTLS 1.2) behind one seam.
//! - [`plane`]: the data plane's runtime: threads running a tunnel's two
//!   directions, server-cluster's relay, the handshake over UDP.
//! - [`io`]: batched packet I/O (TUN, AF_UNIX, UDP) and segmentation offload.
//! - [`netconf`]: addresses, routes, DNS registration, and the record of changes.
//! - [`kube`]: finding server-external and the cluster's networks through the API.
//! - [`roles`]: `client`, `server-external`, `server-cluster`, `cleanup`, `keygen`.
//! - [`throttle`]: log lines a stranger could make us write by the thousand, said once a second.

pub mod cli;
pub mod control;
pub mod crashpoint;
pub mod io;
pub mod keys;
pub mod kube;
pub mod netconf;
pub mod plane;
pub mod proto;
pub mod roles;
pub mod status;
pub mod throttle;
pub mod tunnel;
