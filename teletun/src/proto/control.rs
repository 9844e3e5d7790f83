//! The control-channel messages (sans-IO).
//!
//! The wire format is the seed's: the server sends the server-cluster pod's IP
//! addresses as ASCII text, one per line (the IPv4 address first, then any IPv6
//! addresses), terminated by a NUL byte; then the pod's `resolv.conf`, terminated
//! by a NUL byte. The same framing carries the same data from server-cluster to
//! server-external over the AF_UNIX socket.
//!
//! One TeleTUN extension: a first message that starts with `!` is a refusal whose
//! text (up to the NUL) says why, e.g. that the server already serves a client.
//! No address list can start with `!`, so a peer that follows the seed exactly
//! never sends one by accident.
//!
//! [`HelloDecoder`] accepts bytes in chunks of any size and never panics; both
//! messages are bounded ([`MAX_ADDRESSES_LEN`], [`MAX_RESOLV_CONF_LEN`]).

use std::fmt;
use std::net::IpAddr;

/// Largest accepted address-list message, without its NUL (IPv4 + 63 IPv6 addresses fit).
pub const MAX_ADDRESSES_LEN: usize = 4096;
/// Largest accepted `resolv.conf`, without its NUL.
pub const MAX_RESOLV_CONF_LEN: usize = 64 * 1024;
/// Largest accepted refusal text, without its NUL.
pub const MAX_REFUSAL_LEN: usize = 1024;

/// What the server tells a client before packets flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The pod's addresses: at most one IPv4 address, first; then IPv6 addresses.
    pub addresses: Vec<IpAddr>,
    /// The pod's `resolv.conf`, verbatim.
    pub resolv_conf: String,
}

/// Whether `ip` is a unicast address a pod can have (and this machine may
/// take on and trust): not unspecified, loopback, link-local, multicast,
/// broadcast or an IPv4-mapped IPv6 address.
pub fn usable_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_loopback() || a.is_link_local() || a.is_multicast() || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_unicast_link_local()
                || a.is_multicast()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

impl Hello {
    /// Refuses pod addresses this machine must not take on: not usable
    /// unicast ([`usable_unicast`]), one of this machine's own (`local`), or
    /// on one of its networks (`on_link`: its LAN's gateway, say). The error
    /// says which and why, in one line.
    pub fn check_addresses(&self, local: &[IpAddr], on_link: &[ipnet::IpNet]) -> Result<(), String> {
        for &ip in &self.addresses {
            if !usable_unicast(ip) {
                return Err(format!("{ip} is not a unicast address a pod can have"));
            }
            if local.contains(&ip) {
                return Err(format!("{ip} is one of this machine's own addresses"));
            }
            if let Some(net) = on_link.iter().find(|n| n.contains(&ip)) {
                return Err(format!("{ip} is on this machine's network {net}"));
            }
        }
        Ok(())
    }
}

/// The first thing a server says: either the session's [`Hello`] or a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerGreeting {
    /// The session is on.
    Hello(Hello),
    /// The server will not serve this client; the text says why.
    Refused(String),
}

/// Why bytes from the peer are not a valid greeting.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A message grew past its limit without a terminating NUL.
    #[error("the {what} message is longer than {limit} bytes")]
    TooLong {
        /// Which message.
        what: &'static str,
        /// Its limit in bytes.
        limit: usize,
    },
    /// The address list is not ASCII text of addresses in the required order.
    #[error("bad address list: {0}")]
    BadAddresses(String),
    /// The resolv.conf or refusal text is not UTF-8.
    #[error("the {0} message is not UTF-8 text")]
    NotText(&'static str),
    /// The peer sent bytes after the greeting where none may follow.
    #[error("unexpected bytes after the greeting")]
    TrailingBytes,
}

impl Hello {
    /// Checks the address rules: at least one address, at most one IPv4 address
    /// and, if there is one, it comes first.
    pub fn validate_addresses(addresses: &[IpAddr]) -> Result<(), DecodeError> {
        if addresses.is_empty() {
            return Err(DecodeError::BadAddresses("no addresses".into()));
        }
        if addresses.iter().skip(1).any(IpAddr::is_ipv4) {
            return Err(DecodeError::BadAddresses(
                "only one IPv4 address is allowed and it must come first".into(),
            ));
        }
        Ok(())
    }

    /// Encodes both messages, NUL-terminated, as the server sends them.
    ///
    /// Fails if the hello would not decode: bad addresses, a NUL inside
    /// `resolv_conf`, or a message over its size limit.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        Self::validate_addresses(&self.addresses)?;
        let list = self
            .addresses
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        if list.len() > MAX_ADDRESSES_LEN {
            return Err(DecodeError::TooLong {
                what: "address list",
                limit: MAX_ADDRESSES_LEN,
            });
        }
        if self.resolv_conf.len() > MAX_RESOLV_CONF_LEN {
            return Err(DecodeError::TooLong {
                what: "resolv.conf",
                limit: MAX_RESOLV_CONF_LEN,
            });
        }
        if self.resolv_conf.contains('\0') {
            return Err(DecodeError::NotText("resolv.conf"));
        }
        let mut out = Vec::with_capacity(list.len() + self.resolv_conf.len() + 2);
        out.extend_from_slice(list.as_bytes());
        out.push(0);
        out.extend_from_slice(self.resolv_conf.as_bytes());
        out.push(0);
        Ok(out)
    }
}

/// How a refusal starts when the server already serves a session; temporary.
pub const REFUSED_BUSY: &str = "busy: ";
/// How a refusal starts when server-cluster is not connected; temporary.
pub const REFUSED_NO_CLUSTER: &str = "server-cluster is not connected";

/// Whether a refusal may change if the client tries again later (a
/// reconnecting client keeps trying; any other refusal ends it).
pub fn refusal_is_temporary(reason: &str) -> bool {
    reason.starts_with(REFUSED_BUSY) || reason.starts_with(REFUSED_NO_CLUSTER)
}

/// Encodes a refusal (the TeleTUN extension described in the module docs).
/// The reason is cut to [`MAX_REFUSAL_LEN`] bytes and NULs are dropped.
pub fn encode_refusal(reason: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(reason.len() + 2);
    out.push(b'!');
    for c in reason.chars().filter(|&c| c != '\0') {
        if out.len() + c.len_utf8() > MAX_REFUSAL_LEN {
            break;
        }
        let mut buf = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    out.push(0);
    out
}

fn parse_addresses(text: &[u8]) -> Result<Vec<IpAddr>, DecodeError> {
    let text = std::str::from_utf8(text)
        .ok()
        .filter(|t| t.is_ascii())
        .ok_or_else(|| DecodeError::BadAddresses("not ASCII text".into()))?;
    // A trailing newline before the NUL is tolerated: the seed does not rule it out.
    let text = text.strip_suffix('\n').unwrap_or(text);
    let addresses = text
        .split('\n')
        .map(|line| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            line.parse::<IpAddr>()
                .map_err(|_| DecodeError::BadAddresses(format!("{line:?} is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Hello::validate_addresses(&addresses)?;
    Ok(addresses)
}

#[derive(Debug)]
enum State {
    Addresses,
    ResolvConf(Vec<IpAddr>),
    Done,
}

/// Incremental decoder for a [`ServerGreeting`]. Feed it bytes as they arrive.
#[derive(Debug)]
pub struct HelloDecoder {
    state: State,
    buf: Vec<u8>,
}

impl Default for HelloDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HelloDecoder {
    /// A decoder waiting for the first byte.
    pub fn new() -> Self {
        HelloDecoder {
            state: State::Addresses,
            buf: Vec::new(),
        }
    }

    /// Consumes bytes from `input`. Returns the greeting once complete, together
    /// with how many bytes of `input` it used (the rest belongs to whatever
    /// follows). Returns `Ok(None)` when more bytes are needed.
    pub fn feed(&mut self, input: &[u8]) -> Result<Option<(ServerGreeting, usize)>, DecodeError> {
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            let (limit, what) = match self.state {
                State::Addresses if self.buf.first() == Some(&b'!') => (MAX_REFUSAL_LEN, "refusal"),
                State::Addresses => (MAX_ADDRESSES_LEN, "address list"),
                State::ResolvConf(_) => (MAX_RESOLV_CONF_LEN, "resolv.conf"),
                State::Done => return Err(DecodeError::TrailingBytes),
            };
            let Some(nul) = rest.iter().position(|&b| b == 0) else {
                if self.buf.len() + rest.len() > limit {
                    return Err(DecodeError::TooLong { what, limit });
                }
                self.buf.extend_from_slice(rest);
                return Ok(None);
            };
            if self.buf.len() + nul > limit {
                return Err(DecodeError::TooLong { what, limit });
            }
            self.buf.extend_from_slice(&rest[..nul]);
            used += nul + 1;
            let message = std::mem::take(&mut self.buf);
            match std::mem::replace(&mut self.state, State::Done) {
                State::Addresses => {
                    if let Some(reason) = message.strip_prefix(b"!") {
                        let reason = String::from_utf8(reason.to_vec()).map_err(|_| DecodeError::NotText("refusal"))?;
                        return Ok(Some((ServerGreeting::Refused(reason), used)));
                    }
                    self.state = State::ResolvConf(parse_addresses(&message)?);
                }
                State::ResolvConf(addresses) => {
                    let resolv_conf = String::from_utf8(message).map_err(|_| DecodeError::NotText("resolv.conf"))?;
                    return Ok(Some((ServerGreeting::Hello(Hello { addresses, resolv_conf }), used)));
                }
                State::Done => unreachable!("checked at the top of the loop"),
            }
        }
        Ok(None)
    }
}

impl fmt::Display for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.addresses.iter().map(IpAddr::to_string).collect();
        write!(
            f,
            "addresses [{}], {} bytes of resolv.conf",
            list.join(", "),
            self.resolv_conf.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn decode_all(chunks: &[&[u8]]) -> Result<Option<(ServerGreeting, usize)>, DecodeError> {
        let mut d = HelloDecoder::new();
        let mut total = 0;
        for chunk in chunks {
            if let Some((g, used)) = d.feed(chunk)? {
                return Ok(Some((g, total + used)));
            }
            total += chunk.len();
        }
        Ok(None)
    }

    fn hello_strategy() -> impl Strategy<Value = Hello> {
        let v4 = proptest::option::of(any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))));
        let v6 = proptest::collection::vec(any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))), 0..8);
        let resolv = "[^\0]{0,300}";
        (v4, v6, resolv)
            .prop_filter("at least one address", |(v4, v6, _)| v4.is_some() || !v6.is_empty())
            .prop_map(|(v4, v6, resolv_conf)| Hello {
                addresses: v4.into_iter().chain(v6).collect(),
                resolv_conf,
            })
    }

    #[test]
    fn decodes_the_seed_example() {
        let bytes = b"10.244.0.5\nfd00::5\0nameserver 10.96.0.10\nsearch default.svc.cluster.local\n\0";
        let (g, used) = decode_all(&[bytes]).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            g,
            ServerGreeting::Hello(Hello {
                addresses: vec!["10.244.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
                resolv_conf: "nameserver 10.96.0.10\nsearch default.svc.cluster.local\n".into(),
            })
        );
    }

    #[test]
    fn rejects_a_second_ipv4_and_garbage() {
        assert!(matches!(
            decode_all(&[b"10.0.0.1\n10.0.0.2\0"]),
            Err(DecodeError::BadAddresses(_))
        ));
        assert!(matches!(
            decode_all(&[b"fd00::1\n10.0.0.2\0"]),
            Err(DecodeError::BadAddresses(_))
        ));
        assert!(matches!(decode_all(&[b"hello\0"]), Err(DecodeError::BadAddresses(_))));
        assert!(matches!(decode_all(&[b"\0"]), Err(DecodeError::BadAddresses(_))));
    }

    #[test]
    fn bounds_sizes_without_a_nul() {
        let big = vec![b'1'; MAX_ADDRESSES_LEN + 1];
        assert!(matches!(decode_all(&[&big]), Err(DecodeError::TooLong { .. })));
        let mut conf = b"10.0.0.1\0".to_vec();
        conf.extend(std::iter::repeat_n(b'a', MAX_RESOLV_CONF_LEN + 1));
        assert!(matches!(decode_all(&[&conf]), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn refusal_round_trips() {
        let bytes = encode_refusal("busy: already serving 192.0.2.7");
        let (g, used) = decode_all(&[&bytes]).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(g, ServerGreeting::Refused("busy: already serving 192.0.2.7".into()));
    }

    #[test]
    fn reports_where_the_greeting_ends() {
        let mut bytes = Hello {
            addresses: vec!["10.1.2.3".parse().unwrap()],
            resolv_conf: "x".into(),
        }
        .encode()
        .unwrap();
        let len = bytes.len();
        bytes.extend_from_slice(b"after");
        let (_, used) = decode_all(&[&bytes]).unwrap().unwrap();
        assert_eq!(used, len);
    }

    proptest! {
        #[test]
        fn any_chunking_decodes_the_same(hello in hello_strategy(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let bytes = hello.encode().unwrap();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for p in points {
                chunks.push(&bytes[start..p]);
                start = p;
            }
            chunks.push(&bytes[start..]);
            let (g, used) = decode_all(&chunks).unwrap().expect("complete");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(g, ServerGreeting::Hello(hello));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), split in any::<prop::sample::Index>()) {
            let at = split.index(bytes.len() + 1);
            let mut d = HelloDecoder::new();
            if let Ok(None) = d.feed(&bytes[..at]) {
                let _ = d.feed(&bytes[at..]);
            }
        }

        #[test]
        fn arbitrary_text_with_nuls_never_panics(text in "[0-9a-f:.\n\0!]{0,200}") {
            let _ = decode_all(&[text.as_bytes()]);
        }
    }
}

#[cfg(test)]
mod address_checks {
    use super::*;
    use proptest::prelude::*;

    fn hello(addresses: &[&str]) -> Hello {
        Hello {
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            resolv_conf: String::new(),
        }
    }

    #[test]
    fn pod_addresses_this_machine_must_not_take_on_are_refused() {
        let local: Vec<IpAddr> = vec!["192.168.1.10".parse().unwrap()];
        let lan = vec!["192.168.1.0/24".parse().unwrap()];
        assert_eq!(hello(&["10.244.1.5", "fd00::5"]).check_addresses(&local, &lan), Ok(()));
        for (bad, why) in [
            ("127.0.0.1", "not a unicast address"),
            ("0.0.0.0", "not a unicast address"),
            ("224.0.0.1", "not a unicast address"),
            ("169.254.1.1", "not a unicast address"),
            ("255.255.255.255", "not a unicast address"),
            ("fe80::1", "not a unicast address"),
            ("::ffff:10.0.0.1", "not a unicast address"),
            ("192.168.1.10", "this machine's own"),
            ("192.168.1.1", "on this machine's network 192.168.1.0/24"),
        ] {
            let e = hello(&[bad]).check_addresses(&local, &lan).unwrap_err();
            assert!(e.starts_with(bad) && e.contains(why), "{bad}: {e}");
        }
    }

    proptest! {
        /// Whatever the address, the check says yes exactly when it is usable
        /// unicast and neither local nor on-link.
        #[test]
        fn the_check_agrees_with_its_rules(a in any::<u32>(), b in any::<u128>()) {
            let local: Vec<IpAddr> = vec![IpAddr::from(std::net::Ipv4Addr::from(a.wrapping_add(1)))];
            let lan: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
            for ip in [IpAddr::from(std::net::Ipv4Addr::from(a)), IpAddr::from(std::net::Ipv6Addr::from(b))] {
                let ok = hello(&[]).check_addresses(&local, &lan).is_ok()
                    && Hello { addresses: vec![ip], resolv_conf: String::new() }.check_addresses(&local, &lan).is_ok();
                let expected = usable_unicast(ip) && !local.contains(&ip) && !lan[0].contains(&ip);
                prop_assert_eq!(ok, expected);
            }
        }
    }
}
