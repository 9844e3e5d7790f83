//! Reading the few `resolv.conf` directives TeleTUN needs when it configures
//! systemd-resolved instead of handing the file to `resolvconf` (sans-IO).

use std::net::IpAddr;

/// The DNS servers and search domains of a resolv.conf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` addresses, in order (IPv6 zone suffixes are dropped).
    pub nameservers: Vec<IpAddr>,
    /// The last `search` (or `domain`) line's domains, without trailing dots.
    pub search: Vec<String>,
}

impl ResolvConf {
    /// The resolv.conf text for these servers and domains (no options).
    pub fn to_text(&self) -> String {
        let mut text: String = self.nameservers.iter().map(|ip| format!("nameserver {ip}\n")).collect();
        if !self.search.is_empty() {
            text.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        text
    }
}

/// Parses resolv.conf text. Unknown directives and malformed lines are skipped,
/// as the C library does.
pub fn parse(text: &str) -> ResolvConf {
    let mut out = ResolvConf::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.split('%').next()?.parse().ok()) {
                    out.nameservers.push(ip);
                }
            }
            // As in glibc, the last search or domain line wins.
            Some("search") | Some("domain") => {
                out.search = words
                    .map(|d| d.trim_end_matches('.').to_owned())
                    .filter(|d| !d.is_empty())
                    .collect();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_a_kubernetes_pod_resolv_conf() {
        let r = parse(
            "# generated\nnameserver 10.96.0.10\nnameserver fd00::a%eth0\nsearch default.svc.cluster.local. svc.cluster.local cluster.local\noptions ndots:5\n",
        );
        assert_eq!(
            r.nameservers,
            ["10.96.0.10".parse::<IpAddr>().unwrap(), "fd00::a".parse().unwrap()]
        );
        assert_eq!(
            r.search,
            ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]
        );
    }

    #[test]
    fn the_last_search_line_wins_and_junk_is_skipped() {
        let r = parse("search a.example\nnameserver not-an-ip\ndomain b.example ; comment\nnameserver\n");
        assert!(r.nameservers.is_empty());
        assert_eq!(r.search, ["b.example"]);
    }

    #[test]
    fn written_text_reads_back() {
        let conf = ResolvConf {
            nameservers: vec!["127.0.53.1".parse().unwrap()],
            search: vec!["svc.cluster.local".into(), "cluster.local".into()],
        };
        assert_eq!(
            conf.to_text(),
            "nameserver 127.0.53.1\nsearch svc.cluster.local cluster.local\n"
        );
        assert_eq!(parse(&conf.to_text()), conf);
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,400}") {
            let _ = parse(&text);
        }
    }
}
