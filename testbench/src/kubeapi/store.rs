//! The objects the API serves, and their history for watches.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;
use tokio::sync::broadcast;

/// How many events are kept for watches; older resourceVersions get 410 Gone.
pub const EVENT_LOG: usize = 1000;

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Node (cluster-scoped).
    Node,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Service.
    Service,
    /// networking.k8s.io/v1 ServiceCIDR (cluster-scoped).
    ServiceCidr,
}

impl Kind {
    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::ServiceCidr => "servicecidrs",
        }
    }

    /// The kind of a list of these.
    pub fn list_kind(self) -> &'static str {
        match self {
            Kind::Node => "NodeList",
            Kind::Pod => "PodList",
            Kind::Service => "ServiceList",
            Kind::ServiceCidr => "ServiceCIDRList",
        }
    }

    /// The group and version.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::ServiceCidr => "networking.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The kind of one object.
    pub fn object_kind(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }
}

/// One change, for watches.
#[derive(Clone, Debug)]
pub struct Change {
    /// The resourceVersion it made.
    pub rv: u64,
    /// Of what.
    pub kind: Kind,
    /// In which namespace, if namespaced.
    pub namespace: Option<String>,
    /// ADDED, MODIFIED or DELETED.
    pub kind_of_event: &'static str,
    /// The object after the change.
    pub object: Value,
}

/// The objects and their history.
pub struct Store {
    /// The latest resourceVersion.
    pub rv: u64,
    /// Objects by kind, namespace ("" for cluster-scoped) and name.
    pub objects: BTreeMap<(Kind, String, String), Value>,
    /// The latest changes, oldest first.
    pub log: VecDeque<Change>,
    /// Resources answered with 403.
    pub forbidden: BTreeSet<String>,
    /// Whether ServiceCIDRs are served.
    pub serve_service_cidrs: bool,
    /// The bearer token clients must show.
    pub token: String,
    /// Live changes, for open watches.
    pub changes: broadcast::Sender<Change>,
    /// 410 Gone answers sent so far.
    pub gone_sent: u64,
    /// List requests served so far.
    pub lists_served: u64,
}

impl Store {
    /// The oldest resourceVersion a watch may start from.
    pub fn oldest_watchable(&self) -> u64 {
        self.log.front().map_or(self.rv, |c| c.rv - 1)
    }
}

/// Records a change and tells open watches.
pub fn record(s: &mut Store, kind: Kind, namespace: Option<String>, event: &'static str, object: Value) {
    let change = Change {
        rv: s.rv,
        kind,
        namespace,
        kind_of_event: event,
        object,
    };
    s.log.push_back(change.clone());
    while s.log.len() > EVENT_LOG {
        s.log.pop_front();
    }
    let _ = s.changes.send(change);
}
