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
    pub dropped: Vec<(String, String)>,
}

/// Suffixes under which no public name exists, so a cluster may answer for
/// names below them: `local` (Kubernetes' `cluster.local`), `internal`
/// (ICANN's private-use TLD), RFC 6761's `test`, `example` and `invalid`,
/// RFC 8375's `home.arpa`, and the private TLDs RFC 6762 Appendix G lists as
/// seen in use. `localhost` is left out on purpose: its names are this machine's.
pub const PRIVATE_SUFFIXES: &[&str] = &[
    "local",
    "internal",
    "test",
    "example",
    "invalid",
    "home.arpa",
    "localdomain",
    "lan",
    "intranet",
    "private",
    "corp",
    "home",
];

/// Why the cluster may not answer for `zone`, if it may not: only zones
/// strictly below a private-use suffix ([`PRIVATE_SUFFIXES`]) or within a
/// domain the user named (`trusted`, from `--cluster-domain`) are its.
/// A public domain would take the laptop's lookups of real names (`example.org`,
/// `corp.example.com`, all of `com`) to the cluster.
fn zone_refusal(zone: &str, trusted: &[String]) -> Option<String> {
    if trusted.iter().any(|t| within(zone, t)) {
        return None;
    }
    if PRIVATE_SUFFIXES.iter().any(|p| zone != *p && within(zone, p)) {
        return None;
    }
    Some(if PRIVATE_SUFFIXES.contains(&zone) || !zone.contains('.') {
        format!("the cluster's domain would be {zone}, a whole top-level or private-use domain; --cluster-domain=NAME names a domain of it the cluster owns")
    } else {
        format!("the cluster's domain would be {zone}, a public domain whose names are not the cluster's; --cluster-domain={zone} trusts it")
    })
}

impl SplitDomains {
    /// Sorts a pod's search list. The cluster domain is `X` of a `svc.X`
    /// entry (Kubernetes writes `NS.svc.X svc.X X`); without a `svc.X` entry
    /// each multi-label domain is taken for one. A cluster domain is used only
    /// where the cluster may answer for it (see [`PRIVATE_SUFFIXES`]; `trusted`
    /// are domains the user says the cluster owns). Search domains outside the
    /// cluster's domains (a node's own, which pods inherit) and single-label
    /// ones (`com`) are left out.
    pub fn from_search(search: &[String], trusted: &[String]) -> SplitDomains {
        let normal = |d: &String| d.trim_end_matches('.').to_ascii_lowercase();
        let lower: Vec<String> = search.iter().map(normal).collect();
        let trusted: Vec<String> = trusted.iter().map(normal).collect();
        let from_svc: Vec<String> = lower
            .iter()
            .filter_map(|d| d.strip_prefix("svc."))
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect();
        let candidates = if from_svc.is_empty() {
            lower.iter().filter(|d| d.contains('.')).cloned().collect()
        } else {
            from_svc
        };
        let mut out = SplitDomains::default();
        let mut refused: Vec<(String, String)> = Vec::new();
        for c in candidates {
            if out.zones.contains(&c) || refused.iter().any(|(z, _)| *z == c) {
                continue;
            }
            match zone_refusal(&c, &trusted) {
                None => out.zones.push(c),
                Some(why) => refused.push((c, why)),
            }
        }
        for d in lower {
            if d.is_empty() {
                continue;
            }
            let why = if !d.contains('.') {
                "a single-label search domain would send every short name to the cluster".to_owned()
            } else if out.zones.iter().any(|z| within(&d, z)) {
                if !out.search.contains(&d) {
                    out.search.push(d);
                }
                continue;
            } else if let Some((_, why)) = refused.iter().find(|(z, _)| within(&d, z)) {
                why.clone()
            } else {
                "it is outside the cluster's domain".to_owned()
            };
            out.dropped.push((d, why));
        }
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
        let s = SplitDomains::from_search(
            &strings(&[
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local.",
                "us-east-1.compute.internal",
                "com",
            ]),
            &[],
        );
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
    fn without_a_svc_entry_every_private_multi_label_domain_is_the_clusters() {
        let s = SplitDomains::from_search(&strings(&["corp.example", "lan"]), &[]);
        assert_eq!(s.zones, ["corp.example"]);
        assert_eq!(s.dropped.len(), 1);
    }

    /// A pod's dnsConfig (or a compromised server) must not make the cluster
    /// answer for public names: `svc.com` would make the zone all of `com`.
    #[test]
    fn a_public_or_top_level_cluster_domain_is_refused() {
        for (search, zone) in [
            (&["default.svc.com", "svc.com", "com"][..], "com"),
            (&["example.org"][..], "example.org"),
            (&["corp.example.com"][..], "corp.example.com"),
            (&["svc.internal"][..], "internal"),
            (&["default.svc.home.arpa", "svc.home.arpa"][..], "home.arpa"),
            (&["svc.localhost"][..], "localhost"),
        ] {
            let s = SplitDomains::from_search(&strings(search), &[]);
            assert!(s.zones.is_empty() && s.search.is_empty(), "{search:?}: {s:?}");
            assert!(!s.is_cluster_name("www.example.com") && !s.is_cluster_name("example.org"));
            let (_, why) = s
                .dropped
                .iter()
                .find(|(d, _)| d.contains('.'))
                .expect("a dropped domain");
            assert!(why.contains(&format!("would be {zone}")), "{search:?}: {why}");
        }
    }

    #[test]
    fn a_domain_the_user_trusts_may_be_the_clusters() {
        let search = strings(&["default.svc.k8s.example.com", "svc.k8s.example.com", "k8s.example.com"]);
        let s = SplitDomains::from_search(&search, &strings(&["K8s.Example.com."]));
        assert_eq!(s.zones, ["k8s.example.com"]);
        assert_eq!(s.search.len(), 3);
        assert!(!s.is_cluster_name("www.example.com"));
        // Trusting a domain does not hand the cluster its parent.
        let s = SplitDomains::from_search(&strings(&["svc.example.com"]), &strings(&["k8s.example.com"]));
        assert!(s.zones.is_empty());
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
            let s = SplitDomains::from_search(&list, &[]);
            for d in &s.search {
                prop_assert!(d.contains('.'));
            }
        }

        /// Whatever the search list, every zone the cluster gets lies strictly
        /// below a private-use suffix, and every installed domain in a zone.
        #[test]
        fn zones_are_always_private(list in proptest::collection::vec("((svc|[a-z]{1,3})\\.){0,3}(com|org|local|internal|home\\.arpa|lan|x)", 0..8)) {
            let s = SplitDomains::from_search(&list, &[]);
            for z in &s.zones {
                prop_assert!(PRIVATE_SUFFIXES.iter().any(|p| z != p && within(z, p)), "{z}");
            }
            for d in &s.search {
                prop_assert!(s.zones.iter().any(|z| within(d, z)), "{d}");
            }
        }
    }
}
