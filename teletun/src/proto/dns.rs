//! Split DNS, sans-IO: which search domains the laptop takes from the pod,
//! which queries the cluster answers and which go to the laptop's own
//! resolvers, and the answers the local forwarder makes itself. Messages are
//! read and written with hickory-proto; nothing here touches a socket.

pub use hickory_proto::op::ResponseCode;
use hickory_proto::op::{Header, Message, MessageType, OpCode};
use hickory_proto::serialize::binary::BinDecodable;

/// The pod's search domains sorted into those the laptop installs and those
/// it leaves out (with why), and the zones the cluster answers for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitDomains {
    /// Search domains to install, in the pod's order.
    pub search: Vec<String>,
    /// Zones whose names go to the cluster's DNS (the cluster domain, e.g. `cluster.local`).
    pub zones: Vec<String>,
    /// Search domains left out: (domain, reason).
    pub dropped: Vec<(String, &'static str)>,
}

impl SplitDomains {
    /// Sorts a pod's search list. The cluster domain is `X` of a `svc.X`
    /// entry (Kubernetes writes `NS.svc.X svc.X X`); domains outside it (a
    /// node's own search domains, which pods inherit) and single-label ones
    /// (`com`) are left out. Without a `svc.X` entry every multi-label domain
    /// counts as the cluster's.
    pub fn from_search(search: &[String]) -> SplitDomains {
        let lower: Vec<String> = search
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        let cluster: Vec<String> = lower
            .iter()
            .filter_map(|d| d.strip_prefix("svc."))
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect();
        let mut out = SplitDomains::default();
        for d in lower {
            if d.is_empty() {
                continue;
            }
            if !d.contains('.') {
                out.dropped.push((
                    d,
                    "a single-label search domain would send every short name to the cluster",
                ));
            } else if !cluster.is_empty() && !cluster.iter().any(|c| within(&d, c)) {
                out.dropped.push((d, "it is outside the cluster's domain"));
            } else if !out.search.contains(&d) {
                out.search.push(d);
            }
        }
        out.zones = if cluster.is_empty() {
            out.search.clone()
        } else {
            let mut zones = Vec::new();
            for c in cluster {
                if !zones.contains(&c) {
                    zones.push(c);
                }
            }
            zones
        };
        out
    }

    /// Whether `name` is in one of the cluster's zones.
    pub fn is_cluster_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.zones.iter().any(|z| within(&name, z))
    }
}

/// Whether `name` is `zone` or under it (both lower case, no trailing dot).
fn within(name: &str, zone: &str) -> bool {
    name == zone || name.strip_suffix(zone).is_some_and(|head| head.ends_with('.'))
}

/// A query the forwarder accepted: one question, opcode QUERY.
#[derive(Clone, Debug)]
pub struct Query {
    /// The parsed message (to answer errors from).
    pub message: Message,
    /// Its question's name, lower case, without the trailing dot.
    pub name: String,
}

/// Reads a client's query; `None` for anything that is not one well-formed
/// standard query with exactly one question (dropped and counted by the caller).
pub fn read_query(packet: &[u8]) -> Option<Query> {
    let message = Message::from_vec(packet).ok()?;
    let m = &message.metadata;
    if m.message_type != MessageType::Query || m.op_code != OpCode::Query || message.queries.len() != 1 {
        return None;
    }
    let name = message.queries[0]
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    Some(Query { message, name })
}

/// An answer to `query` with `code` and no records (REFUSED, SERVFAIL, …).
pub fn error_reply(query: &Query, code: ResponseCode) -> Vec<u8> {
    let q = &query.message;
    let mut reply = Message::error_msg(q.metadata.id, q.metadata.op_code, code);
    reply.metadata.recursion_desired = q.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(q.queries.iter().cloned());
    // A message made of a parsed query always encodes.
    reply.to_vec().unwrap_or_default()
}

/// What an upstream's reply says, read from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    /// The ID, to match the query.
    pub id: u16,
    /// TC: the answer did not fit; ask again over TCP.
    pub truncated: bool,
    /// The response code.
    pub code: ResponseCode,
}

/// Reads a reply's header; `None` if it is not a DNS response.
pub fn read_reply_header(packet: &[u8]) -> Option<ReplyHeader> {
    let header = Header::from_bytes(packet).ok()?;
    let m = header.metadata;
    (m.message_type == MessageType::Response).then_some(ReplyHeader {
        id: m.id,
        truncated: m.truncation,
        code: m.response_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query as Question;
    use hickory_proto::rr::{Name, RecordType};
    use proptest::prelude::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_pod_search_list_keeps_the_cluster_domains_only() {
        let s = SplitDomains::from_search(&strings(&[
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local.",
            "us-east-1.compute.internal",
            "com",
        ]));
        assert_eq!(
            s.search,
            ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]
        );
        assert_eq!(s.zones, ["cluster.local"]);
        assert_eq!(s.dropped.len(), 2);
        assert_eq!(s.dropped[0].0, "us-east-1.compute.internal");
        assert_eq!(s.dropped[1].0, "com");
        assert!(s.is_cluster_name("web.default.svc.cluster.local."));
        assert!(s.is_cluster_name("Cluster.Local"));
        assert!(!s.is_cluster_name("notcluster.local"));
        assert!(!s.is_cluster_name("github.com"));
    }

    #[test]
    fn without_a_svc_entry_every_multi_label_domain_is_the_clusters() {
        let s = SplitDomains::from_search(&strings(&["corp.example", "lan"]));
        assert_eq!(s.zones, ["corp.example"]);
        assert_eq!(s.dropped.len(), 1);
    }

    fn query_bytes(name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Question::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[test]
    fn queries_are_read_and_refused_with_their_question() {
        let q = read_query(&query_bytes("Web.Default.svc.cluster.local.")).unwrap();
        assert_eq!(q.name, "web.default.svc.cluster.local");
        let reply = error_reply(&q, ResponseCode::Refused);
        let h = read_reply_header(&reply).unwrap();
        assert_eq!((h.id, h.truncated, h.code), (4242, false, ResponseCode::Refused));
        let parsed = Message::from_vec(&reply).unwrap();
        assert_eq!(parsed.queries, q.message.queries);
        // A response is not a query, and a query is not a reply.
        assert!(read_query(&reply).is_none());
        assert!(read_reply_header(&query_bytes("x.example.")).is_none());
    }

    proptest! {
        #[test]
        fn malformed_packets_never_panic(packet in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_query(&packet);
            let _ = read_reply_header(&packet);
        }

        #[test]
        fn search_lists_never_panic(list in proptest::collection::vec("[a-zA-Z0-9.-]{0,30}", 0..8)) {
            let s = SplitDomains::from_search(&list);
            for d in &s.search {
                prop_assert!(d.contains('.'));
            }
        }
    }
}
